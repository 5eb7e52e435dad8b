//! Exports: Neuronpedia-compatible JSON and a static HTML page per latent.
//!
//! Neuronpedia's import reads batches of gzip-compressed JSON lines: `features/batch-N.jsonl.gz`
//! (one feature row per latent) and `activations/batch-N.jsonl.gz` (one row per top context),
//! with the field names of `/work/shared/reference/formats.md` ("Neuronpedia export"). The
//! source id (Neuronpedia's `layer` field) is `"{layer}-{set}"`.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use super::db::DashboardDb;
use super::types::{Context, Histogram, LatentDashboard};
use crate::{Error, Result};

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    scalpel_models::files::write_atomically(path, |w| w.write_all(bytes))
        .map_err(|(p, e)| Error::msg(format!("could not write {}: {e}", p.display())))
}

fn gzip_lines(rows: &[Value]) -> Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for r in rows {
        serde_json::to_writer(&mut gz, r)?;
        gz.write_all(b"\n")?;
    }
    Ok(gz.finish()?)
}

/// Bin centres and counts of a histogram, as Neuronpedia's `*_bar_values` / `*_bar_heights`.
fn bars(h: &Histogram) -> (Vec<f32>, Vec<u64>) {
    let centres = h.edges.windows(2).map(|e| (e[0] + e[1]) / 2.0).collect();
    (centres, h.counts.clone())
}

/// One latent as a Neuronpedia feature row.
pub fn neuronpedia_feature(l: &LatentDashboard, model_id: &str, source: &str, hook: &str) -> Value {
    let (freq_values, freq_heights) = bars(&l.histogram);
    let (logit_values, logit_heights) = bars(&l.logit_histogram);
    json!({
        "modelId": model_id,
        "layer": source,
        "index": l.latent.to_string(),
        "maxActApprox": l.max_act,
        "hookName": hook,
        "pos_str": l.top_logits.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "pos_values": l.top_logits.iter().map(|t| t.value).collect::<Vec<_>>(),
        "neg_str": l.bottom_logits.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "neg_values": l.bottom_logits.iter().map(|t| t.value).collect::<Vec<_>>(),
        "frac_nonzero": l.density,
        "freq_hist_data_bar_heights": freq_heights,
        "freq_hist_data_bar_values": freq_values,
        "logits_hist_data_bar_heights": logit_heights,
        "logits_hist_data_bar_values": logit_values,
        "topkCosSimIndices": l.similar.iter().map(|s| s.latent).collect::<Vec<_>>(),
        "topkCosSimValues": l.similar.iter().map(|s| s.cosine).collect::<Vec<_>>(),
    })
}

/// One context as a Neuronpedia activation row.
pub fn neuronpedia_activation(c: &Context, model_id: &str, source: &str, latent: u32) -> Value {
    let min = c.acts.iter().copied().fold(f32::INFINITY, f32::min);
    json!({
        "modelId": model_id,
        "layer": source,
        "index": latent.to_string(),
        "tokens": c.tokens,
        "values": c.acts,
        "maxValue": c.peak_act,
        "maxValueTokenIndex": c.peak,
        "minValue": if min.is_finite() { min } else { 0.0 },
    })
}

/// One latent as Neuronpedia's feature detail JSON (`features/{scan}/{index}.json`): the top
/// contexts as a first group named "Top activations", then the activation bands.
pub fn feature_detail(l: &LatentDashboard) -> Value {
    let example = |c: &Context| {
        json!({
            "tokens": c.tokens,
            "tokens_acts_list": c.acts,
            "train_token_ind": c.peak,
            "is_repeated_datapoint": false,
        })
    };
    let mut groups = vec![json!({
        "quantile_name": "Top activations",
        "examples": l.top_contexts.iter().map(example).collect::<Vec<_>>(),
    })];
    for q in &l.quantiles {
        groups.push(json!({
            "quantile_name": q.name,
            "examples": q.contexts.iter().map(example).collect::<Vec<_>>(),
        }));
    }
    let act_min = l.histogram.edges.first().copied().unwrap_or(0.0);
    json!({
        "index": l.latent,
        "examples_quantiles": groups,
        "top_logits": l.top_logits.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "bottom_logits": l.bottom_logits.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "act_min": act_min,
        "act_max": l.max_act,
        "quantile_values": l.quantiles.iter().rev().map(|q| q.upper).collect::<Vec<_>>(),
        "histogram": l.histogram,
        "activation_frequency": l.density,
    })
}

/// What an export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportSummary {
    pub latents: usize,
    pub files: usize,
}

/// The dictionary's description and the latents held, or an error naming the ids there are.
fn dict_and_ids(db: &DashboardDb, dict: &str) -> Result<(super::types::DictInfo, Vec<u32>)> {
    let info = db
        .dictionaries()?
        .into_iter()
        .find(|d| d.id == dict)
        .ok_or_else(|| {
            let known: Vec<String> = db
                .dictionaries()
                .map(|v| v.into_iter().map(|d| d.id).collect())
                .unwrap_or_default();
            Error::msg(format!(
                "the database holds no dictionary `{dict}` (it holds: {})",
                if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                }
            ))
        })?;
    let ids = db.latent_ids(dict)?;
    Ok((info, ids))
}

/// Writes Neuronpedia batch files for dictionary `dict` under `out` (`features/`, `activations/`),
/// `batch_size` latents per file, and a feature detail file per latent
/// (`features/{source}/{index}.json`). `source` is Neuronpedia's source id (default
/// `"{layer}-{dict}"`).
pub fn neuronpedia(
    db: &DashboardDb,
    dict: &str,
    out: &Path,
    source: Option<&str>,
    batch_size: usize,
) -> Result<ExportSummary> {
    let (info, ids) = dict_and_ids(db, dict)?;
    let source = source.map_or_else(|| format!("{}-{}", info.layer, info.id), str::to_string);
    let detail_dir = out.join("features").join(&source);
    for dir in [&detail_dir, &out.join("activations")] {
        std::fs::create_dir_all(dir)?;
    }
    let mut files = 0;
    for (n, block) in ids.chunks(batch_size.max(1)).enumerate() {
        let mut features = Vec::with_capacity(block.len());
        let mut acts = Vec::new();
        for &i in block {
            let Some(l) = db.latent(dict, i)? else {
                continue;
            };
            features.push(neuronpedia_feature(&l, &info.model, &source, &info.hook));
            let detail = serde_json::to_vec(&feature_detail(&l))?;
            write_file(&detail_dir.join(format!("{i}.json")), &detail)?;
            files += 1;
            for c in &l.top_contexts {
                acts.push(neuronpedia_activation(c, &info.model, &source, l.latent));
            }
        }
        let name = format!("batch-{n}.jsonl.gz");
        write_file(&out.join("features").join(&name), &gzip_lines(&features)?)?;
        write_file(&out.join("activations").join(&name), &gzip_lines(&acts)?)?;
        files += 2;
    }
    Ok(ExportSummary {
        latents: ids.len(),
        files,
    })
}

/// Escapes text for HTML element content and attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Token text made visible: newlines and tabs as symbols, the rest escaped.
fn show_token(t: &str) -> String {
    escape_html(&t.replace('\n', "⏎").replace('\t', "⇥"))
}

fn context_html(c: &Context, max: f32) -> String {
    let mut s = String::from("<div class=\"ctx\">");
    for (i, (t, &a)) in c.tokens.iter().zip(&c.acts).enumerate() {
        let alpha = if max > 0.0 {
            (a / max).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let cls = if i == c.peak { " class=\"peak\"" } else { "" };
        s.push_str(&format!(
            "<span{cls} style=\"background:rgba(255,120,0,{alpha:.3})\" title=\"{:.4}\">{}</span>",
            a,
            show_token(t)
        ));
    }
    s.push_str(&format!(" <small>({:.3})</small></div>", c.peak_act));
    s
}

fn histogram_html(h: &Histogram) -> String {
    let top = h.counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let mut s = String::from("<div class=\"hist\">");
    for (i, &c) in h.counts.iter().enumerate() {
        let (lo, hi) = (h.edges[i], h.edges[i + 1]);
        s.push_str(&format!(
            "<span style=\"height:{:.1}px\" title=\"[{lo:.4}, {hi:.4}): {c}\"></span>",
            60.0 * c as f64 / top
        ));
    }
    s.push_str("</div>");
    s
}

/// A self-contained HTML page for one latent (no scripts, no external resources).
pub fn latent_html(l: &LatentDashboard, info: &super::types::DictInfo) -> String {
    let title = format!("{} latent {}", escape_html(&info.id), l.latent);
    let mut s = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title><style>\
         body{{font-family:sans-serif;max-width:60em;margin:2em auto;}}\
         .ctx{{font-family:monospace;white-space:pre-wrap;margin:.3em 0;}}\
         .ctx span{{border-radius:2px}} .peak{{outline:1px solid #c40}}\
         .hist{{display:flex;align-items:flex-end;height:62px;gap:1px}}\
         .hist span{{background:#48c;flex:1;min-width:2px}} td{{padding:0 .6em}}\
         </style></head><body><h1>{title}</h1>"
    );
    s.push_str(&format!(
        "<p>{} · {} · density {:.3e} ({} of {} tokens) · max {:.4} · mean {:.4}</p>",
        escape_html(&info.model),
        escape_html(&info.hook),
        l.density,
        l.n_fired,
        info.n_tokens,
        l.max_act,
        l.mean_act
    ));
    s.push_str("<h2>Activations (non-zero, log-spaced bins)</h2>");
    s.push_str(&histogram_html(&l.histogram));
    s.push_str("<h2>Logit effects</h2><table><tr><th>promoted</th><th></th><th>suppressed</th><th></th></tr>");
    for i in 0..l.top_logits.len().max(l.bottom_logits.len()) {
        let cell = |v: Option<&super::types::TokenValue>| match v {
            Some(t) => format!(
                "<td><code>{}</code></td><td>{:+.3}</td>",
                show_token(&t.token),
                t.value
            ),
            None => "<td></td><td></td>".into(),
        };
        s.push_str(&format!(
            "<tr>{}{}</tr>",
            cell(l.top_logits.get(i)),
            cell(l.bottom_logits.get(i))
        ));
    }
    s.push_str("</table>");
    s.push_str(&histogram_html(&l.logit_histogram));
    if !l.similar.is_empty() {
        s.push_str("<h2>Similar latents (decoder cosine)</h2><p>");
        let items: Vec<String> = l
            .similar
            .iter()
            .map(|x| format!("<a href=\"{0}.html\">{0}</a> ({1:.3})", x.latent, x.cosine))
            .collect();
        s.push_str(&items.join(", "));
        s.push_str("</p>");
    }
    s.push_str("<h2>Top activations</h2>");
    for c in &l.top_contexts {
        s.push_str(&context_html(c, l.max_act));
    }
    for q in &l.quantiles {
        s.push_str(&format!(
            "<h3>{} <small>(~{:.1}% of firings)</small></h3>",
            escape_html(&q.name),
            100.0 * q.fraction
        ));
        for c in &q.contexts {
            s.push_str(&context_html(c, l.max_act));
        }
    }
    s.push_str("</body></html>\n");
    s
}

/// Writes `{latent}.html` for every latent of `dict` under `out`.
pub fn html(db: &DashboardDb, dict: &str, out: &Path) -> Result<ExportSummary> {
    let (info, ids) = dict_and_ids(db, dict)?;
    std::fs::create_dir_all(out)?;
    for &i in &ids {
        if let Some(l) = db.latent(dict, i)? {
            write_file(
                &out.join(format!("{i}.html")),
                latent_html(&l, &info).as_bytes(),
            )?;
        }
    }
    Ok(ExportSummary {
        latents: ids.len(),
        files: ids.len(),
    })
}
