// scalpel's web app: a single page, plain JavaScript, no framework and no build step.
// It routes on location.pathname, talks to the JSON API under /api, and draws every chart as
// inline SVG. Text from the API only ever reaches the page through text nodes (never innerHTML).
'use strict';

// ---------------------------------------------------------------------------------------------
// Small helpers: elements, the API, formatting.

/** An HTML element: `el('a', {href: '/x', class: 'y'}, 'text', child, ...)`. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

/** An SVG element, as `el`. */
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  append(node, children);
  return node;
}

function setAttrs(node, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
}

function append(node, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Calls the API; resolves to the parsed JSON, or rejects with the server's error message. */
async function api(path, body) {
  const init = body === undefined
    ? {}
    : { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) };
  const resp = await fetch(path, init);
  if (!resp.ok) throw new Error(await errorText(resp));
  return resp.json();
}

async function errorText(resp) {
  const text = await resp.text();
  try {
    const j = JSON.parse(text);
    if (j && typeof j.error === 'string') return `${resp.status}: ${j.error}`;
  } catch (_) { /* not JSON: show the text as it came */ }
  return `${resp.status} ${resp.statusText}: ${text.slice(0, 300)}`;
}

/** Replaces the contents of `box` with a visible error. */
function showError(box, err) {
  box.replaceChildren(el('div', { class: 'error', role: 'alert' }, String(err && err.message ? err.message : err)));
}

/** A token as it is shown: newlines and tabs made visible, spaces kept. */
function tokenLabel(text) {
  return String(text).replace(/\n/g, '↵').replace(/\t/g, '⇥').replace(/\r/g, '␍');
}

function short(text, n) {
  const t = tokenLabel(text);
  return t.length > n ? t.slice(0, n - 1) + '…' : t;
}

function fmt(x, digits = 3) {
  if (typeof x !== 'number' || !isFinite(x)) return String(x);
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return x.toFixed(digits);
}

function pct(p) {
  return (100 * p).toFixed(p >= 0.1 ? 0 : 1) + '%';
}

/** The page address of a latent. */
function latentHref(dict, latent) {
  return `/latent/${encodeURIComponent(dict)}/${latent}`;
}

// ---------------------------------------------------------------------------------------------
// Routing: links marked data-nav (and every same-origin link to a page) push history entries.

const routes = [
  [/^\/$/, () => explorerPage()],
  [/^\/latent\/([^/]+)\/(\d+)\/?$/, (m) => latentPage(decodeURIComponent(m[1]), Number(m[2]))],
  [/^\/search\/?$/, () => searchPage()],
  [/^\/steer\/?$/, () => steerPage()],
  [/^\/patch\/?$/, () => patchPage()],
];

function navigate(href) {
  history.pushState(null, '', href);
  window.scrollTo(0, 0);
  render();
}

/** Counts renders, so that a slow page finishing after the reader moved on is dropped. */
let renders = 0;

function render() {
  const ticket = ++renders;
  const app = document.getElementById('app');
  const path = location.pathname;
  for (const a of document.querySelectorAll('header.top nav a')) {
    const target = a.getAttribute('href');
    a.classList.toggle('active', target === '/' ? path === '/' : path.startsWith(target));
  }
  for (const [re, page] of routes) {
    const m = path.match(re);
    if (m) {
      app.replaceChildren();
      page(m).then(
        (node) => { if (ticket === renders) app.replaceChildren(node); },
        (err) => { if (ticket === renders) showError(app, err); });
      return;
    }
  }
  app.replaceChildren(el('h1', {}, 'Not found'), el('p', {}, 'No page at ', el('code', {}, path), '.'));
}

document.addEventListener('click', (ev) => {
  const a = ev.target.closest && ev.target.closest('a');
  if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith('/api/') || a.target) return;
  ev.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener('popstate', render);

let infoPromise = null;
/** `/api/info`, fetched once. */
function info() {
  if (!infoPromise) {
    infoPromise = api('/api/info').catch((err) => { infoPromise = null; throw err; });
  }
  return infoPromise;
}

// ---------------------------------------------------------------------------------------------
// Charts, all inline SVG.

/** A histogram (`{edges, counts}`) as bars, with the value range under it. */
function histogramChart(hist, title, opts = {}) {
  const width = opts.width || 420, height = opts.height || 150, pad = 24;
  const counts = (hist && hist.counts) || [], edges = (hist && hist.edges) || [];
  const root = svg('svg', { class: 'histogram', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img' });
  root.append(svg('title', {}, title));
  const max = Math.max(1, ...counts);
  const plotH = height - 2 * pad, bw = counts.length ? (width - 2 * pad) / counts.length : 0;
  counts.forEach((c, i) => {
    const h = (c / max) * plotH;
    const lo = edges[i], hi = edges[i + 1];
    const negative = hi !== undefined && hi <= 0;
    root.append(svg('rect', {
      class: opts.signed ? (negative ? 'bar neg' : 'bar pos') : 'bar',
      x: pad + i * bw, y: pad + plotH - h, width: Math.max(bw - 1, 0.5), height: h,
    }, svg('title', {}, `[${fmt(lo)}, ${fmt(hi)}): ${c}`)));
  });
  root.append(svg('line', { class: 'axis', x1: pad, x2: width - pad, y1: pad + plotH, y2: pad + plotH }));
  root.append(svg('text', { x: pad, y: height - 6 }, edges.length ? fmt(edges[0]) : ''));
  root.append(svg('text', { x: width - pad, y: height - 6, 'text-anchor': 'end' }, edges.length ? fmt(edges[edges.length - 1]) : ''));
  root.append(svg('text', { x: pad, y: pad - 8 }, `${title} (max ${max})`));
  if (!counts.length) root.append(svg('text', { x: width / 2, y: height / 2, 'text-anchor': 'middle' }, 'no data'));
  return root;
}

/** Horizontal bars for tokens and values (logit effects), positive red and negative blue. */
function tokenBars(items, title) {
  const rowH = 16, labelW = 120, barW = 180, width = labelW + barW + 60;
  const height = 22 + rowH * items.length;
  const root = svg('svg', { class: 'logits', width, height, viewBox: `0 0 ${width} ${height}` });
  root.append(svg('text', { x: 0, y: 12 }, title));
  const max = Math.max(1e-9, ...items.map((t) => Math.abs(t.value)));
  items.forEach((t, i) => {
    const y = 20 + i * rowH, w = (Math.abs(t.value) / max) * barW;
    root.append(svg('text', { x: labelW - 4, y: y + 11, 'text-anchor': 'end' }, short(t.token, 16)));
    root.append(svg('rect', { class: t.value < 0 ? 'bar neg' : 'bar pos', x: labelW, y: y + 2, width: w, height: rowH - 4 },
      svg('title', {}, `${tokenLabel(t.token)} (id ${t.token_id}): ${fmt(t.value)}`)));
    root.append(svg('text', { x: labelW + w + 4, y: y + 11 }, fmt(t.value, 2)));
  });
  return root;
}

/**
 * A heatmap of `values[row][col]` with labels. `signed` uses a red/blue scale centred on 0,
 * otherwise one colour whose opacity is the value over the maximum.
 */
function heatmap(values, rowLabels, colLabels, opts = {}) {
  const cell = opts.cell || 18, labelW = opts.labelW || 90, labelH = opts.labelH || 70;
  const rows = values.length, cols = rows ? values[0].length : 0;
  const width = labelW + cols * cell + 8, height = labelH + rows * cell + 8;
  const root = svg('svg', { class: opts.cls || 'heatmap', width, height, viewBox: `0 0 ${width} ${height}` });
  let max = 0;
  for (const r of values) for (const v of r) if (isFinite(v)) max = Math.max(max, Math.abs(v));
  if (opts.max) max = opts.max;
  max = max || 1;
  values.forEach((r, i) => {
    r.forEach((v, j) => {
      let fill;
      if (!isFinite(v)) fill = '#eee';
      else if (opts.signed) fill = `rgba(var(${v < 0 ? '--neg' : '--pos'}), ${Math.min(1, Math.abs(v) / max).toFixed(3)})`;
      else fill = `rgba(var(--act), ${Math.min(1, Math.max(0, v) / max).toFixed(3)})`;
      const label = `${rowLabels[i] !== undefined ? tokenLabel(rowLabels[i]) : i} × ${colLabels[j] !== undefined ? tokenLabel(colLabels[j]) : j}: ${fmt(v)}`;
      root.append(svg('rect', { class: 'cell', x: labelW + j * cell, y: labelH + i * cell, width: cell, height: cell, style: `fill: ${fill}` },
        svg('title', {}, label)));
    });
  });
  rowLabels.forEach((l, i) => root.append(svg('text', { x: labelW - 4, y: labelH + i * cell + cell * 0.7, 'text-anchor': 'end' }, short(l, 12))));
  colLabels.forEach((l, j) => {
    const x = labelW + j * cell + cell * 0.65, y = labelH - 4;
    root.append(svg('text', { x, y, transform: `rotate(-60 ${x} ${y})` }, short(l, 12)));
  });
  return root;
}

/** A context: tokens with background opacity by activation, the peak token outlined. */
function contextView(ctx, maxAct) {
  const scale = maxAct > 0 ? maxAct : Math.max(1e-9, ...ctx.acts);
  const row = el('div', { class: 'context' }, el('span', { class: 'peak-act' }, fmt(ctx.peak_act, 2)));
  ctx.tokens.forEach((t, i) => {
    const a = ctx.acts[i] || 0;
    const alpha = Math.max(0, Math.min(1, a / scale));
    row.append(el('span', {
      class: i === ctx.peak ? 'ctx-token peak' : 'ctx-token',
      style: `background: rgba(var(--act), ${alpha.toFixed(3)})`,
      title: `${tokenLabel(t)} (id ${ctx.token_ids[i]}): ${fmt(a)}`,
    }, tokenLabel(t)));
  });
  return row;
}

function section(title, ...children) {
  return el('section', { class: 'panel' }, title ? el('h2', {}, title) : null, ...children);
}

function statBox(k, v) {
  return el('div', { class: 'stat' }, el('div', { class: 'v' }, v), el('div', { class: 'k' }, k));
}

/** A select of the loaded dictionaries (ids), or a note when none is loaded. */
function dictSelect(dicts, id, selected) {
  const s = el('select', { id });
  for (const d of dicts) s.append(el('option', { value: d.id, selected: d.id === selected }, `${d.id} (${d.hook})`));
  return s;
}

// ---------------------------------------------------------------------------------------------
// Prompt explorer.

async function explorerPage() {
  const inf = await info();
  const prompt = el('textarea', { id: 'prompt', placeholder: 'Type a prompt…', rows: 3 },);
  prompt.value = sessionStorage.getItem('scalpel.prompt') || 'The capital of France is Paris, and the capital of Italy is';
  const topK = el('input', { id: 'top-k', type: 'number', min: 1, max: 20, value: 5 });
  const dictBoxes = inf.dicts.map((d) => el('input', { type: 'checkbox', value: d.id, checked: true }));
  const run = el('button', { id: 'run', type: 'submit' }, 'Run');
  const out = el('div', { id: 'explore-out' });
  const form = el('form', { class: 'controls' },
    el('label', { class: 'wide' }, 'Prompt', prompt),
    el('label', {}, 'Top k', topK),
    inf.dicts.length
      ? el('div', {}, el('div', { class: 'muted' }, 'Dictionaries'),
        inf.dicts.map((d, i) => el('label', { style: 'flex-direction: row' }, dictBoxes[i], ` ${d.id}`)))
      : el('span', { class: 'muted' }, 'No dictionaries loaded.'),
    run);
  prompt.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); form.requestSubmit(); }
  });
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem('scalpel.prompt', prompt.value);
    run.disabled = true;
    out.replaceChildren(el('p', { class: 'busy' }, 'Running the model…'));
    try {
      const body = { text: prompt.value, top_k: Number(topK.value) || 5 };
      if (inf.dicts.length) body.dicts = dictBoxes.filter((b) => b.checked).map((b) => b.value);
      const res = await api('/api/explore', body);
      out.replaceChildren(...exploreResults(inf, res, prompt.value));
    } catch (err) {
      showError(out, err);
    } finally {
      run.disabled = false;
    }
  });
  return el('div', {}, el('h1', {}, 'Prompt explorer'), section(null, form), out);
}

function exploreResults(inf, res, text) {
  const n = res.tokens.length;
  const rows = [], tokenSpans = [];
  const select = (i) => {
    tokenSpans.forEach((s, j) => s.classList.toggle('selected', i === j));
    rows.forEach((r, j) => r.classList.toggle('selected', i === j));
    if (rows[i]) rows[i].scrollIntoView({ block: 'nearest' });
  };
  res.tokens.forEach((t, i) => {
    tokenSpans.push(el('span', { class: 'token', 'data-pos': i, title: `position ${i}, id ${t.id}`, onclick: () => select(i) }, tokenLabel(t.text)));
  });
  // Hovering a latent shows where, among the strongest latents of each position, it fires.
  const highlight = (dict, latent) => {
    const acts = res.latents.map((ls) => {
      const hit = (ls || []).find((l) => l.dict === dict && l.latent === latent);
      return hit ? hit.act : 0;
    });
    const max = Math.max(1e-9, ...acts);
    tokenSpans.forEach((s, i) => { s.style.background = `rgba(var(--act), ${(acts[i] / max).toFixed(3)})`; });
  };
  const unhighlight = () => tokenSpans.forEach((s) => { s.style.background = ''; });

  const table = el('table', { class: 'grid per-token' },
    el('tr', {}, el('th', {}, 'pos'), el('th', {}, 'token'), el('th', {}, 'next-token predictions'), el('th', {}, 'strongest latents')));
  for (let i = 0; i < n; i++) {
    const preds = (res.predictions[i] || []).map((p) => el('span', { class: 'prediction', title: `id ${p.id}` },
      el('span', { class: 'tok' }, tokenLabel(p.text)), el('span', { class: 'p' }, pct(p.prob))));
    const lats = (res.latents[i] || []).map((l) => el('a', {
      class: 'latent-link', href: latentHref(l.dict, l.latent), 'data-dict': l.dict, 'data-latent': l.latent,
      onmouseenter: () => highlight(l.dict, l.latent), onmouseleave: unhighlight,
    }, `${l.dict} #${l.latent}`, el('span', { class: 'act' }, fmt(l.act, 2))));
    const row = el('tr', { 'data-pos': i },
      el('td', {}, String(i)), el('td', {}, el('span', { class: 'token-cell' }, tokenLabel(res.tokens[i].text))),
      el('td', {}, el('div', { class: 'chips' }, preds)),
      el('td', {}, el('div', { class: 'chips' }, lats.length ? lats : el('span', { class: 'muted' }, inf.dicts.length ? 'none fire' : '—'))));
    rows.push(row);
    table.append(row);
  }
  return [
    section(`Tokens (${n})`, el('div', { class: 'tokens', id: 'tokens' }, tokenSpans),
      el('p', { class: 'muted' }, 'Click a token to find its row; hover a latent to see where it fires. Ctrl+Enter runs the prompt.')),
    section('Predictions and latents per position', table),
    section('Logit lens', lensGrid(res)),
    attentionPanel(inf, text),
  ];
}

/** The logit lens: one row per residual stream point, one column per position. */
function lensGrid(res) {
  const lens = res.lens;
  if (!lens || !lens.cells || !lens.cells.length) return el('p', { class: 'muted' }, 'No logit lens in the answer.');
  const head = el('tr', {}, el('th', {}, 'layer \\ position'), res.tokens.map((t, i) => el('th', { title: `position ${i}` }, short(t.text, 10))));
  const table = el('table', { class: 'grid lens' }, head);
  lens.cells.forEach((row, r) => {
    table.append(el('tr', {}, el('th', { class: 'row' }, lens.labels[r] || String(r)),
      row.map((c, i) => el('td', {
        style: `background: rgba(var(--act), ${(0.75 * Math.min(1, c.prob)).toFixed(3)})`,
        title: `${lens.labels[r]}, position ${i}: ${tokenLabel(c.text)} (id ${c.id}) ${pct(c.prob)}`,
      }, short(c.text, 8)))));
  });
  return el('div', {}, el('p', { class: 'muted' }, 'Top token of the unembedded residual stream; shade = its probability.'), table);
}

/** Attention patterns of one layer, every head as a small heatmap. */
function attentionPanel(inf, text) {
  const layer = el('select', { id: 'attn-layer' });
  for (let l = 0; l < inf.n_layers; l++) layer.append(el('option', { value: l }, `layer ${l}`));
  const show = el('button', { type: 'button', class: 'secondary', id: 'attn-show' }, 'Show patterns');
  const out = el('div', { class: 'heads' });
  show.addEventListener('click', async () => {
    show.disabled = true;
    out.replaceChildren(el('p', { class: 'busy' }, 'Computing attention…'));
    try {
      const res = await api('/api/attention', { text, layer: Number(layer.value) });
      const labels = res.tokens.map((t) => t.text);
      const cell = Math.max(6, Math.min(18, Math.floor(260 / Math.max(1, labels.length))));
      out.replaceChildren(...res.patterns.map((p, h) => el('div', { class: 'head' },
        el('div', {}, `L${res.layer} H${h}`),
        heatmap(p, labels, labels, { cls: 'attention', cell, max: 1 }))));
    } catch (err) {
      showError(out, err);
    } finally {
      show.disabled = false;
    }
  });
  return section('Attention patterns', el('div', { class: 'controls' }, layer, ' ', show),
    el('p', { class: 'muted' }, 'Rows are queries, columns keys; shade = attention weight.'), out);
}

// ---------------------------------------------------------------------------------------------
// Latent page.

async function latentPage(dict, latent) {
  const box = el('div', {});
  let d;
  try {
    d = await api(`/api/latent/${encodeURIComponent(dict)}/${latent}`);
  } catch (err) {
    showError(box, err);
    box.prepend(el('h1', {}, `${dict} #${latent}`));
    return box;
  }
  const loaded = await info().then((inf) => inf.dicts.find((x) => x.id === dict), () => undefined);
  const last = loaded ? latent + 1 >= loaded.d_sae : false;
  const nav = el('div', { class: 'chips latent-nav' },
    latent > 0 ? el('a', { href: latentHref(dict, latent - 1) }, '← previous') : null,
    last ? null : el('a', { href: latentHref(dict, latent + 1) }, 'next →'),
    loaded ? el('a', { href: `/steer?dict=${encodeURIComponent(dict)}&latent=${latent}` }, 'steer with this latent') : null);
  const similar = (d.similar || []).map((s) => el('a', { class: 'latent-link', href: latentHref(dict, s.latent) },
    `#${s.latent}`, el('span', { class: 'act' }, fmt(s.cosine, 2))));
  const quantiles = (d.quantiles || []).map((q) => el('div', { class: 'quantile' },
    el('h3', {}, `${q.name} `, el('span', { class: 'muted' }, `(${pct(q.fraction)} of activations)`)),
    q.contexts.length ? q.contexts.map((c) => contextView(c, d.max_act)) : el('p', { class: 'muted' }, 'no contexts')));
  box.append(
    el('h1', {}, `${d.dict} #${d.latent}`), nav,
    section('Statistics', el('div', { class: 'stats' },
      statBox('density', pct(d.density)), statBox('times fired', String(d.n_fired)),
      statBox('max activation', fmt(d.max_act)), statBox('mean activation', fmt(d.mean_act))),
    el('div', { class: 'charts' },
      histogramChart(d.histogram, 'activations'),
      histogramChart(d.logit_histogram, 'logit effects', { signed: true }))),
    section('Logit effects', el('div', { class: 'charts' },
      tokenBars(d.top_logits || [], 'promoted'), tokenBars(d.bottom_logits || [], 'suppressed'))),
    section('Top activations', el('div', { id: 'top-contexts' },
      d.top_contexts.length ? d.top_contexts.map((c) => contextView(c, d.max_act)) : el('p', { class: 'muted' }, 'no contexts'))),
    quantiles.length ? section('Activation bands', quantiles) : null,
    section('Similar latents (decoder cosine)', el('div', { class: 'chips' }, similar.length ? similar : el('span', { class: 'muted' }, 'none'))));
  return box;
}

// ---------------------------------------------------------------------------------------------
// Search.

async function searchPage() {
  const inf = await info();
  let dbDicts = [];
  try { dbDicts = (await api('/api/dicts')).filter((d) => d.has_dashboards); } catch (_) { /* shown below */ }
  const loaded = inf.dicts;
  const first = (list) => (list.length ? list[0].id : '');

  // By id: straight to the page.
  const idDict = dictSelect(dbDicts.length ? dbDicts : loaded, 'search-id-dict', first(dbDicts.length ? dbDicts : loaded));
  const idNum = el('input', { id: 'search-id', type: 'number', min: 0, value: 0 });
  const byId = el('form', { class: 'controls' }, el('label', {}, 'Dictionary', idDict), el('label', {}, 'Latent', idNum),
    el('button', { type: 'submit', id: 'search-id-run' }, 'Open'));
  byId.addEventListener('submit', (ev) => { ev.preventDefault(); navigate(latentHref(idDict.value, Number(idNum.value) || 0)); });

  // By token: from the dashboard database.
  const tokDict = dictSelect(dbDicts, 'search-token-dict', first(dbDicts));
  const tokText = el('input', { id: 'search-token', value: ' Paris', title: 'exactly one token; a leading space counts' });
  const tokOut = el('div', { id: 'search-token-out' });
  const byToken = el('form', { class: 'controls' }, el('label', {}, 'Dictionary', tokDict), el('label', {}, 'Token', tokText),
    el('button', { type: 'submit', id: 'search-token-run' }, 'Search'));
  byToken.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    tokOut.replaceChildren(el('p', { class: 'busy' }, 'Searching…'));
    try {
      const q = new URLSearchParams({ dict: tokDict.value, token: tokText.value, k: '20' });
      const res = await api(`/api/search/token?${q}`);
      tokOut.replaceChildren(el('p', {}, 'Token ', el('code', {}, tokenLabel(res.token.text)), ` (id ${res.token.id})`),
        hitList(tokDict.value, res.hits, (h) => []));
    } catch (err) { showError(tokOut, err); }
  });

  // By prompt: live.
  const prDict = dictSelect(loaded, 'search-prompt-dict', first(loaded));
  const prText = el('textarea', { id: 'search-prompt', rows: 2 });
  prText.value = 'The Eiffel Tower is in Paris';
  const prOut = el('div', { id: 'search-prompt-out' });
  const byPrompt = el('form', { class: 'controls' }, el('label', { class: 'wide' }, 'Prompt', prText),
    el('label', {}, 'Dictionary', prDict), el('button', { type: 'submit', id: 'search-prompt-run' }, 'Search'));
  byPrompt.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    prOut.replaceChildren(el('p', { class: 'busy' }, 'Running the model…'));
    try {
      const res = await api('/api/search/prompt', { text: prText.value, dict: prDict.value, k: 20 });
      prOut.replaceChildren(hitList(prDict.value, res.hits, (h) => [' at ', el('code', {}, tokenLabel(h.token.text)), ` (position ${h.position})`]));
    } catch (err) { showError(prOut, err); }
  });

  return el('div', {}, el('h1', {}, 'Search'),
    section('By id', byId),
    section('By token (dashboard database)', dbDicts.length ? byToken : el('p', { class: 'muted' }, 'No dashboards are loaded.'), tokOut),
    section('By prompt (live)', loaded.length ? byPrompt : el('p', { class: 'muted' }, 'No dictionaries are loaded.'), prOut));
}

/** Latent hits with a bar for `max_act`; `extra(hit)` adds text after each. */
function hitList(dict, hits, extra) {
  if (!hits.length) return el('p', { class: 'muted' }, 'No latents found.');
  const max = Math.max(1e-9, ...hits.map((h) => h.max_act));
  return el('ul', { class: 'hits' }, hits.map((h) => el('li', {},
    el('a', { class: 'latent-link', href: latentHref(dict, h.latent) }, `${dict} #${h.latent}`),
    el('span', { class: 'meter', style: `width: ${(120 * h.max_act / max).toFixed(1)}px` }),
    el('span', {}, fmt(h.max_act, 3)), el('span', {}, extra(h)))));
}

// ---------------------------------------------------------------------------------------------
// Steering playground: baseline and steered generations streamed side by side.

let steerAbort = null;

async function steerPage() {
  const inf = await info();
  const params = new URLSearchParams(location.search);
  const prompt = el('textarea', { id: 'steer-prompt', rows: 2 });
  prompt.value = params.get('prompt') || 'I think that';
  const kind = el('select', { id: 'steer-kind' },
    el('option', { value: 'latent' }, 'a latent'), el('option', { value: 'contrast' }, 'a contrast of two prompts'),
    el('option', { value: 'vector' }, 'a vector (JSON array)'));
  const dict = dictSelect(inf.dicts, 'steer-dict', params.get('dict') || (inf.dicts[0] && inf.dicts[0].id));
  const latent = el('input', { id: 'steer-latent', type: 'number', min: 0, value: params.get('latent') || 0 });
  const positive = el('input', { id: 'steer-positive', value: 'Love' });
  const negative = el('input', { id: 'steer-negative', value: 'Hate' });
  const vector = el('textarea', { id: 'steer-vector', rows: 2, placeholder: `[${inf.d_model} numbers]` });
  const dictLayer = () => { const d = inf.dicts.find((x) => x.id === dict.value); return d ? d.layer : 0; };
  const layer = el('input', { id: 'steer-layer', type: 'number', min: 0, max: inf.n_layers - 1, value: dictLayer() });
  dict.addEventListener('change', () => { layer.value = dictLayer(); });
  const coef = el('input', { id: 'steer-coef', type: 'number', step: 'any', value: 8 });
  const maxNew = el('input', { id: 'steer-max', type: 'number', min: 1, max: inf.limits.max_new_tokens, value: 32 });
  const temp = el('input', { id: 'steer-temp', type: 'number', min: 0, step: 'any', value: 0 });
  const seed = el('input', { id: 'steer-seed', type: 'number', min: 0, value: 0 });
  const go = el('button', { id: 'steer-run', type: 'submit' }, 'Generate');
  const stop = el('button', { type: 'button', class: 'secondary', disabled: true }, 'Stop');

  const latentPart = el('div', { class: 'controls' }, el('label', {}, 'Dictionary', dict), el('label', {}, 'Latent', latent));
  const contrastPart = el('div', { class: 'controls' }, el('label', {}, 'Positive', positive), el('label', {}, 'Negative', negative));
  const vectorPart = el('label', { class: 'wide' }, 'Vector', vector);
  const showKind = () => {
    latentPart.hidden = kind.value !== 'latent';
    contrastPart.hidden = kind.value !== 'contrast';
    vectorPart.hidden = kind.value !== 'vector';
  };
  kind.addEventListener('change', showKind);
  showKind();

  const baseline = el('pre', { id: 'baseline' }), steered = el('pre', { id: 'steered' });
  const status = el('div', {});
  const form = el('form', { class: 'controls' },
    el('label', { class: 'wide' }, 'Prompt', prompt), el('label', {}, 'Steer with', kind),
    latentPart, contrastPart, vectorPart,
    el('label', {}, 'Layer', layer), el('label', {}, 'Coefficient', coef), el('label', {}, 'New tokens', maxNew),
    el('label', {}, 'Temperature (0 = greedy)', temp), el('label', {}, 'Seed', seed), go, stop);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    status.replaceChildren();
    let source;
    if (kind.value === 'latent') source = { latent: { dict: dict.value, latent: Number(latent.value) } };
    else if (kind.value === 'contrast') source = { contrast: { positive: positive.value, negative: negative.value } };
    else {
      try {
        const v = JSON.parse(vector.value);
        if (!Array.isArray(v) || v.some((x) => typeof x !== 'number')) throw new Error('not an array of numbers');
        source = { vector: v };
      } catch (err) {
        showError(status, `The vector must be a JSON array of ${inf.d_model} numbers: ${err.message}`);
        return;
      }
    }
    const body = {
      prompt: prompt.value, layer: Number(layer.value), coefficient: Number(coef.value),
      max_new_tokens: Number(maxNew.value), source, temperature: Number(temp.value), seed: Number(seed.value),
    };
    baseline.replaceChildren(el('span', { class: 'prompt-part' }, prompt.value));
    steered.replaceChildren(el('span', { class: 'prompt-part' }, prompt.value));
    if (steerAbort) steerAbort.abort();
    steerAbort = new AbortController();
    go.disabled = true; stop.disabled = false;
    try {
      await streamSteer(body, steerAbort.signal, (msg) => {
        if (msg.stream === 'baseline' || msg.stream === 'steered') {
          const box = msg.stream === 'baseline' ? baseline : steered;
          box.append(el('span', { class: 'gen-token', title: `id ${msg.id}` }, msg.text));
        } else if (msg.done) {
          // Tokens decoded one by one can split a character; the final texts are decoded whole.
          finishGeneration(baseline, msg.baseline);
          finishGeneration(steered, msg.steered);
          status.replaceChildren(el('p', { class: 'muted', id: 'steer-done' }, 'Done.'));
        } else if (msg.error) {
          throw new Error(msg.error);
        }
      });
    } catch (err) {
      if (err.name !== 'AbortError') showError(status, err);
    } finally {
      go.disabled = false; stop.disabled = true;
    }
  });
  stop.addEventListener('click', () => { if (steerAbort) steerAbort.abort(); });

  return el('div', {}, el('h1', {}, 'Steering playground'), section(null, form), status,
    section(null, el('div', { class: 'gen' },
      el('div', {}, el('h3', {}, 'Baseline'), baseline), el('div', {}, el('h3', {}, 'Steered'), steered))));
}

/** Replaces a generation's streamed tokens by `text` when they do not already spell it. */
function finishGeneration(box, text) {
  const parts = [...box.querySelectorAll('.gen-token')];
  if (typeof text !== 'string' || parts.map((p) => p.textContent).join('') === text) return;
  parts.forEach((p) => p.remove());
  box.append(el('span', { class: 'gen-text' }, text));
}

/** POSTs to /api/steer and calls `onMessage` with each NDJSON line as it arrives. */
async function streamSteer(body, signal, onMessage) {
  const resp = await fetch('/api/steer', {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body), signal,
  });
  if (!resp.ok) throw new Error(await errorText(resp));
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (line) onMessage(JSON.parse(line));
    }
    if (done) break;
  }
  if (buf.trim()) onMessage(JSON.parse(buf));
}

// ---------------------------------------------------------------------------------------------
// Patching view.

async function patchPage() {
  const clean = el('input', { id: 'patch-clean', size: 50, value: 'When John and Mary went to the store, Mary gave a drink to' });
  const corrupt = el('input', { id: 'patch-corrupt', size: 50, value: 'When John and Mary went to the store, John gave a drink to' });
  const answer = el('input', { id: 'patch-answer', value: ' John' });
  const wrong = el('input', { id: 'patch-wrong', value: ' Mary' });
  const sweep = el('select', { id: 'patch-sweep' }, ['resid_pre', 'attn_out', 'mlp_out', 'z_head'].map((s) => el('option', { value: s }, s)));
  const method = el('select', { id: 'patch-method' }, el('option', { value: 'exact' }, 'exact'), el('option', { value: 'attribution' }, 'attribution'));
  const go = el('button', { id: 'patch-run', type: 'submit' }, 'Patch');
  const out = el('div', {});
  const form = el('form', { class: 'controls' },
    el('label', { class: 'wide' }, 'Clean prompt', clean), el('label', { class: 'wide' }, 'Corrupt prompt', corrupt),
    el('label', {}, 'Answer', answer), el('label', {}, 'Wrong answer', wrong),
    el('label', {}, 'Sweep', sweep), el('label', {}, 'Method', method), go);
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    go.disabled = true;
    out.replaceChildren(el('p', { class: 'busy' }, 'Patching (one forward pass per cell for exact patching)…'));
    try {
      const res = await api('/api/patch', {
        clean: clean.value, corrupt: corrupt.value, answer: answer.value, wrong: wrong.value,
        sweep: sweep.value, method: method.value, metric: 'logit_diff',
      });
      out.replaceChildren(patchResult(res));
    } catch (err) {
      showError(out, err);
    } finally {
      go.disabled = false;
    }
  });
  return el('div', {}, el('h1', {}, 'Patching'), section(null, form), out);
}

function patchResult(res) {
  const g = res.grid;
  const shape = g.shape && g.shape.length ? g.shape : [1, g.scores.length];
  const rows = shape[0], cols = shape.slice(1).reduce((a, b) => a * b, 1);
  const values = [];
  for (let r = 0; r < rows; r++) values.push(g.scores.slice(r * cols, (r + 1) * cols));
  const label = (list, n) => (list && list.length === n ? list : Array.from({ length: n }, (_, i) => String(i)));
  const rowLabels = label(res.row_labels, rows), colLabels = label(res.col_labels, cols);
  return section(`${g.method} patching of ${g.sweep} (${(g.axes || []).join(' × ')})`,
    el('div', { class: 'stats' },
      statBox(`clean ${g.metric}`, fmt(g.clean)), statBox(`corrupt ${g.metric}`, fmt(g.corrupt)),
      statBox('patched runs', String(g.runs))),
    el('p', { class: 'muted' }, 'Score = (patched − corrupt) / (clean − corrupt): red restores the clean behaviour, blue pushes the other way.'),
    signedLegend(values),
    heatmap(values, rowLabels, colLabels, { cls: 'patch', signed: true, cell: 22 }));
}

/** The colour scale of a signed heatmap: blue at −max, white at 0, red at +max. */
function signedLegend(values) {
  let max = 0;
  for (const r of values) for (const v of r) if (isFinite(v)) max = Math.max(max, Math.abs(v));
  const steps = 11, w = 16;
  const bar = svg('svg', { width: steps * w, height: 12 });
  for (let i = 0; i < steps; i++) {
    const t = (i / (steps - 1)) * 2 - 1;
    bar.append(svg('rect', { x: i * w, y: 0, width: w, height: 12, style: `fill: rgba(var(${t < 0 ? '--neg' : '--pos'}), ${Math.abs(t).toFixed(2)})` }));
  }
  return el('div', { class: 'legend' }, fmt(-max, 2), bar, fmt(max, 2));
}

// ---------------------------------------------------------------------------------------------
// Start: the model's name in the header, then the page.

info().then((inf) => {
  document.getElementById('model-info').textContent =
    `${inf.model} · ${inf.n_layers} layers · ${inf.dicts.length} dictionar${inf.dicts.length === 1 ? 'y' : 'ies'}`;
}, () => { /* each page shows the error itself */ });
render();
