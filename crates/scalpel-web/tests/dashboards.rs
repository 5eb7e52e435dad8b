//! Dashboards on a planted dictionary: latent `i` reads exactly the direction that token `i`'s
//! activations carry, so the contexts where each latent must fire, and how strongly, are known.
//! The top contexts are checked against a plain reference computed from the same data, and
//! against hand-derived values; logit effects and similar latents against direct sums; then
//! resuming, bad inputs, the database lookups and the exports.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{Device, Tensor};
use scalpel_data::store::{HookMeta, StoreMeta, StoreReader, StoreWriter};
use scalpel_dict::{Architecture, DictConfig, Sae};
use scalpel_web::dashboards::compute::{self, DictSource, Options, Run, Unembed};
use scalpel_web::dashboards::{export, DashboardDb, DictInfo, LatentDashboard};

const D: usize = 10; // d_in = d_sae = vocabulary of planted tokens
const VOCAB: usize = 16;
const CS: usize = 8; // context size
const N_CTX: usize = 12;
const HOOK: &str = "blocks.0.hook_resid_post";

/// Token of context `c`, position `p`: varied, with repeats, and token 0 in half the contexts.
fn token(c: usize, p: usize) -> u32 {
    ((c * 7 + p * 3 + (c * p) % 5) % (D + 2)) as u32
}

/// Activation scale of the row: distinct for every row, not monotonic in the row order.
fn scale(c: usize, p: usize) -> f32 {
    1.0 + ((c * CS + p) * 37 % 101) as f32 / 10.0
}

/// The store: row (c, p) is `scale · e_token` (tokens ≥ D carry no direction: zero rows).
fn make_store(dir: &Path) -> StoreReader {
    let meta = StoreMeta {
        model: "planted".into(),
        model_fingerprint: "planted".into(),
        hooks: vec![HookMeta {
            name: HOOK.into(),
            d: D,
        }],
        dtype: Default::default(),
        context_size: CS,
        contexts_per_shard: 3,
        n_tokens: (N_CTX * CS) as u64,
        corpus: "planted".into(),
        corpus_hash: "planted".into(),
        packing: serde_json::Value::Null,
        exclude_token_ids: Vec::new(),
        seqpos_slice: None,
    };
    let mut w = StoreWriter::create_or_resume(dir, meta).unwrap();
    for c in 0..N_CTX {
        let toks: Vec<u32> = (0..CS).map(|p| token(c, p)).collect();
        let mut acts = vec![0f32; CS * D];
        for p in 0..CS {
            let t = toks[p] as usize;
            if t < D {
                acts[p * D + t] = scale(c, p);
            }
        }
        let acts = Tensor::from_vec(acts, (CS, D), &Device::Cpu).unwrap();
        w.push(&toks, &[(HOOK, acts)]).unwrap();
    }
    w.finish().unwrap();
    StoreReader::open(dir).unwrap()
}

/// Standard SAE: `W_enc = I` (latent i reads direction i), `W_dec` row i = e_i + ½ e_{i+1}.
fn planted_sae() -> Sae {
    let mut cfg = DictConfig::new(Architecture::Standard, D, D);
    cfg.metadata.hook_name = Some(HOOK.into());
    let mut w_enc = vec![0f32; D * D];
    let mut w_dec = vec![0f32; D * D];
    for i in 0..D {
        w_enc[i * D + i] = 1.0;
        w_dec[i * D + i] = 1.0;
        w_dec[i * D + (i + 1) % D] = 0.5;
    }
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &Device::Cpu).unwrap();
    let tensors = HashMap::from([
        ("W_enc".to_string(), t(w_enc, &[D, D])),
        ("W_dec".to_string(), t(w_dec, &[D, D])),
        ("b_enc".to_string(), t(vec![0.0; D], &[D])),
        ("b_dec".to_string(), t(vec![0.0; D], &[D])),
    ]);
    Sae::from_tensors(cfg, tensors, "planted").unwrap()
}

/// `W_U` rows `[VOCAB, D]`: direction i promotes token (i+1) % VOCAB and suppresses token
/// (i+2) % VOCAB, with small distinct values elsewhere.
fn unembedding() -> Vec<f32> {
    let mut w = vec![0f32; VOCAB * D];
    for v in 0..VOCAB {
        for i in 0..D {
            w[v * D + i] = if v == (i + 1) % VOCAB {
                3.0
            } else if v == (i + 2) % VOCAB {
                -3.0
            } else {
                ((v * 7 + i * 3) % 11) as f32 / 100.0 - 0.05
            };
        }
    }
    w
}

fn token_text(ids: &[u32]) -> Vec<String> {
    // Token 3's text needs escaping in HTML.
    ids.iter()
        .map(|&t| {
            if t == 3 {
                "<b>&\"x".to_string()
            } else {
                format!("t{t}")
            }
        })
        .collect()
}

fn opts() -> Options {
    Options {
        top_k: 3,
        before: 2,
        after: 1,
        n_bands: 3,
        per_band: 2,
        reservoir: 4,
        batch_contexts: 2,
        threads: 3,
        ..Options::default()
    }
}

fn full_run(reader: &StoreReader, sae: &Sae, dir: &Path, o: &Options) -> Run {
    let mut run = Run::start(&[D], o, &dir.join("ckpt"), "fp").unwrap();
    let src = [DictSource {
        sae,
        hook: HOOK.into(),
    }];
    compute::run_store(&mut run, reader, &src, 2, None, &mut |_| {}).unwrap();
    run
}

/// The reference: for every latent, the best firing of each context, sorted by activation
/// (descending), then by context.
fn reference_top(latent: u32, k: usize) -> Vec<(f32, u64, u32)> {
    let mut best: Vec<(f32, u64, u32)> = Vec::new();
    for c in 0..N_CTX {
        let mut b: Option<(f32, u64, u32)> = None;
        for p in 0..CS {
            if token(c, p) == latent {
                let a = scale(c, p);
                if b.is_none_or(|x| a > x.0) {
                    b = Some((a, c as u64, p as u32));
                }
            }
        }
        best.extend(b);
    }
    best.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
    best.truncate(k);
    best
}

#[test]
fn planted_latents_have_exactly_the_expected_statistics_and_top_contexts() {
    let dir = tempfile::tempdir().unwrap();
    let reader = make_store(&dir.path().join("store"));
    let sae = planted_sae();
    let o = opts();
    let run = full_run(&reader, &sae, dir.path(), &o);
    let pass = &run.passes[0];
    assert_eq!(pass.n_tokens(), (N_CTX * CS) as u64);
    let dash = pass.dashboards("planted", 0..D, &token_text);
    for l in 0..D as u32 {
        let d = &dash[l as usize];
        let fired: Vec<f32> = (0..N_CTX)
            .flat_map(|c| (0..CS).map(move |p| (c, p)))
            .filter(|&(c, p)| token(c, p) == l)
            .map(|(c, p)| scale(c, p))
            .collect();
        assert!(!fired.is_empty(), "the planted data never shows token {l}");
        assert_eq!(d.n_fired, fired.len() as u64, "latent {l}");
        assert_eq!(d.density, fired.len() as f64 / (N_CTX * CS) as f64);
        assert_eq!(d.max_act, fired.iter().copied().fold(0.0, f32::max));
        let mean = fired.iter().map(|&a| a as f64).sum::<f64>() / fired.len() as f64;
        assert!((d.mean_act as f64 - mean).abs() < 1e-5, "latent {l} mean");
        assert_eq!(d.histogram.counts.iter().sum::<u64>(), fired.len() as u64);

        let want = reference_top(l, o.top_k);
        let got: Vec<(f32, u64, u32)> = d
            .top_contexts
            .iter()
            .map(|c| (c.peak_act, c.source_index, c.source_pos))
            .collect();
        assert_eq!(got, want, "top contexts of latent {l}");
        for c in &d.top_contexts {
            let (ctx, pos) = (c.source_index as usize, c.source_pos as usize);
            let start = pos.saturating_sub(o.before);
            let end = (pos + o.after + 1).min(CS);
            let ids: Vec<u32> = (start..end).map(|p| token(ctx, p)).collect();
            assert_eq!(c.token_ids, ids);
            assert_eq!(c.tokens, token_text(&ids));
            assert_eq!(c.peak, pos - start);
            assert_eq!(
                c.token_ids[c.peak], l,
                "the peak token is the planted token"
            );
            let acts: Vec<f32> = (start..end)
                .map(|p| {
                    if token(ctx, p) == l {
                        scale(ctx, p)
                    } else {
                        0.0
                    }
                })
                .collect();
            assert_eq!(c.acts, acts, "window activations of latent {l}");
        }
        // Quantile samples: every sample is a real firing of the latent inside its band.
        let mut frac = 0.0;
        for q in &d.quantiles {
            frac += q.fraction;
            assert!(q.contexts.len() <= o.per_band);
            for c in &q.contexts {
                assert_eq!(c.token_ids[c.peak], l);
                assert_eq!(
                    c.peak_act,
                    scale(c.source_index as usize, c.source_pos as usize)
                );
                assert!(c.peak_act > q.lower - 1e-6 && c.peak_act <= q.upper + 1e-5);
            }
        }
        assert!(
            (frac - 1.0).abs() < 1e-9,
            "band fractions of latent {l} sum to {frac}"
        );
    }
    // A hand check: token 0 first appears at context 0 position 0 (scale 1.0).
    assert_eq!(token(0, 0), 0);
    assert!(dash[0]
        .top_contexts
        .iter()
        .all(|c| c.token_ids[c.peak] == 0));
}

#[test]
fn logit_effects_and_similar_latents_are_the_direct_sums() {
    let sae = planted_sae();
    let w_u = Tensor::from_vec(unembedding(), (VOCAB, D), &Device::Cpu).unwrap();
    let g = Tensor::from_vec(vec![2f32; D], D, &Device::Cpu).unwrap();
    let o = Options {
        n_logits: 4,
        n_similar: 2,
        ..opts()
    };
    let effects = compute::logit_effects(&sae, &w_u, Some(&g), 0..D, &o, &token_text).unwrap();
    let wu = unembedding();
    for (i, e) in effects.iter().enumerate() {
        let (top, bottom, hist) = (&e.top, &e.bottom, &e.histogram);
        // effect[v] = 2 · (W_U[v, i] + ½ W_U[v, i+1])
        let eff: Vec<f32> = (0..VOCAB)
            .map(|v| 2.0 * (wu[v * D + i] + 0.5 * wu[v * D + (i + 1) % D]))
            .collect();
        let mut order: Vec<usize> = (0..VOCAB).collect();
        order.sort_by(|&a, &b| eff[b].total_cmp(&eff[a]).then(a.cmp(&b)));
        let want_top: Vec<u32> = order[..4].iter().map(|&v| v as u32).collect();
        let got_top: Vec<u32> = top.iter().map(|t| t.token_id).collect();
        assert_eq!(got_top, want_top, "top logits of latent {i}");
        // The planted promotion: token i+1 gets 2·(3 + ½·small) ≈ 6, far above the rest.
        assert_eq!(top[0].token_id as usize, (i + 1) % VOCAB);
        for t in top.iter().chain(bottom.iter()) {
            assert!((t.value - eff[t.token_id as usize]).abs() < 1e-5);
            assert_eq!(t.token, token_text(&[t.token_id])[0]);
        }
        order.sort_by(|&a, &b| eff[a].total_cmp(&eff[b]).then(a.cmp(&b)));
        let want_bottom: Vec<u32> = order[..4].iter().map(|&v| v as u32).collect();
        let got_bottom: Vec<u32> = bottom.iter().map(|t| t.token_id).collect();
        assert_eq!(got_bottom, want_bottom, "bottom logits of latent {i}");
        assert_eq!(hist.counts.iter().sum::<u64>(), VOCAB as u64);
    }
    // Rows i-1 and i+1 share a direction with row i: cosine 0.5 / 1.25 = 0.4; others 0.
    let sim = compute::similar_latents(&sae, 0..D, &o).unwrap();
    for (i, s) in sim.iter().enumerate() {
        let mut want = [(i + D - 1) % D, (i + 1) % D];
        want.sort();
        let got: Vec<usize> = s.iter().map(|x| x.latent as usize).collect();
        assert_eq!(got, want, "similar latents of {i}");
        for x in s {
            assert!((x.cosine - 0.4).abs() < 1e-6);
        }
    }
}

#[test]
fn an_interrupted_run_resumes_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let reader = make_store(&dir.path().join("store"));
    let sae = planted_sae();
    let o = opts();
    let whole = full_run(&reader, &sae, dir.path(), &o);
    let want = whole.passes[0].dashboards("p", 0..D, &token_text);

    let ckpt = dir.path().join("resume.ckpt");
    let src = [DictSource {
        sae: &sae,
        hook: HOOK.into(),
    }];
    let mut first = Run::start(&[D], &o, &ckpt, "fp").unwrap();
    compute::run_store(&mut first, &reader, &src, 1, Some(2), &mut |_| {}).unwrap();
    assert_eq!(first.contexts_done(), 6, "two shards of three contexts");
    drop(first);
    // Another thread count does not matter; other inputs or options are refused.
    let o2 = Options {
        threads: 1,
        ..o.clone()
    };
    let err = Run::start(&[D], &o2, &ckpt, "other")
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("different inputs"), "{err}");
    let err = Run::start(
        &[D],
        &Options {
            top_k: 4,
            ..o.clone()
        },
        &ckpt,
        "fp",
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("other options"), "{err}");
    let mut second = Run::start(&[D], &o2, &ckpt, "fp").unwrap();
    assert_eq!(second.contexts_done(), 6);
    let mut seen = 0;
    compute::run_store(&mut second, &reader, &src, 1, None, &mut |n| seen += n).unwrap();
    assert_eq!(seen, (6 * CS) as u64, "only the remaining shards are read");
    assert_eq!(second.passes[0].dashboards("p", 0..D, &token_text), want);
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let err = StoreReader::open(dir.path().join("missing"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing"), "{err}");
    let reader = make_store(&dir.path().join("store"));
    let o = opts();
    // A dictionary whose d_in does not match the hook's width.
    let mut cfg = DictConfig::new(Architecture::Standard, D + 1, 4);
    cfg.metadata.hook_name = Some(HOOK.into());
    let wide = Sae::random(cfg, 0.1, &Device::Cpu).unwrap();
    let mut run = Run::start(&[4], &o, &dir.path().join("a.ckpt"), "fp").unwrap();
    let src = [DictSource {
        sae: &wide,
        hook: HOOK.into(),
    }];
    let err = compute::run_store(&mut run, &reader, &src, 0, None, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("d_in 11") && err.contains("width 10"), "{err}");
    // A hook the store does not hold.
    let sae = planted_sae();
    let mut run = Run::start(&[D], &o, &dir.path().join("b.ckpt"), "fp").unwrap();
    let src = [DictSource {
        sae: &sae,
        hook: "blocks.3.hook_resid_pre".into(),
    }];
    let err = compute::run_store(&mut run, &reader, &src, 0, None, &mut |_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("blocks.3.hook_resid_pre") && err.contains("not in the store"),
        "{err}"
    );
    // Nonsense options.
    assert!(Run::start(
        &[D],
        &Options { top_k: 0, ..o },
        &dir.path().join("c"),
        "fp"
    )
    .is_err());
    // A checkpoint that is not one.
    std::fs::write(dir.path().join("junk.ckpt"), b"\x01\0\0\0\0\0\0\0garbage").unwrap();
    assert!(Run::start(&[D], &opts(), &dir.path().join("junk.ckpt"), "fp").is_err());
}

fn info() -> DictInfo {
    DictInfo {
        id: "planted".into(),
        hook: HOOK.into(),
        layer: 0,
        d_in: D,
        d_sae: D,
        architecture: "standard".into(),
        model: "planted-model".into(),
        n_tokens: (N_CTX * CS) as u64,
    }
}

fn build_db(dir: &Path) -> (DashboardDb, Vec<LatentDashboard>) {
    let reader = make_store(&dir.join("store"));
    let sae = planted_sae();
    let o = opts();
    let run = full_run(&reader, &sae, dir, &o);
    let db = DashboardDb::create(&dir.join("d.db")).unwrap();
    let w_u = Tensor::from_vec(unembedding(), (VOCAB, D), &Device::Cpu).unwrap();
    let u = Unembed {
        w_u_rows: &w_u,
        norm_weight: None,
    };
    compute::store_dashboards(
        &db,
        &info(),
        &run.passes[0],
        &sae,
        Some(&u),
        &token_text,
        4,
        &mut |_| {},
    )
    .unwrap();
    let mut all = run.passes[0].dashboards("planted", 0..D, &token_text);
    let eff = compute::logit_effects(&sae, &w_u, None, 0..D, &o, &token_text).unwrap();
    let sim = compute::similar_latents(&sae, 0..D, &o).unwrap();
    for ((d, e), s) in all.iter_mut().zip(eff).zip(sim) {
        d.top_logits = e.top;
        d.bottom_logits = e.bottom;
        d.logit_histogram = e.histogram;
        d.similar = s;
    }
    (db, all)
}

#[test]
fn the_database_answers_one_latent_and_the_latents_of_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let (db, want) = build_db(dir.path());
    assert_eq!(db.dictionaries().unwrap(), vec![info()]);
    for l in 0..D as u32 {
        assert_eq!(
            db.latent("planted", l).unwrap().as_ref(),
            Some(&want[l as usize])
        );
        // Token l is the peak token of latent l's top contexts, and only of latent l's.
        let hits = db.latents_for_token("planted", l, 5).unwrap();
        assert_eq!(hits.len(), 1, "token {l}: {hits:?}");
        assert_eq!(hits[0].latent, l);
        assert_eq!(hits[0].max_act, want[l as usize].max_act);
    }
    assert_eq!(db.latent("planted", D as u32).unwrap(), None);
    assert_eq!(db.latent("nope", 0).unwrap(), None);
    assert!(db
        .latents_for_token("planted", (D + 1) as u32, 5)
        .unwrap()
        .is_empty());
    drop(db);
    // Reopened read-only, the same answers.
    let db = DashboardDb::open(&dir.path().join("d.db")).unwrap();
    assert_eq!(db.latent("planted", 3).unwrap().as_ref(), Some(&want[3]));
    // Not a database / not a dashboard database.
    let err = DashboardDb::open(&dir.path().join("none.db"))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("none.db"), "{err}");
    std::fs::write(dir.path().join("text.db"), "hello").unwrap();
    assert!(DashboardDb::open(&dir.path().join("text.db")).is_err());
}

fn gunzip_lines(path: &Path) -> Vec<serde_json::Value> {
    let mut s = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut s)
        .unwrap();
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn exports_write_neuronpedia_batches_and_escaped_html() {
    let dir = tempfile::tempdir().unwrap();
    let (db, want) = build_db(dir.path());
    let np = dir.path().join("np");
    let s = export::neuronpedia(&db, "planted", &np, None, 4).unwrap();
    assert_eq!(s.latents, D);
    let mut features = Vec::new();
    let mut acts = Vec::new();
    for n in 0..D.div_ceil(4) {
        features.extend(gunzip_lines(
            &np.join(format!("features/batch-{n}.jsonl.gz")),
        ));
        acts.extend(gunzip_lines(
            &np.join(format!("activations/batch-{n}.jsonl.gz")),
        ));
    }
    assert_eq!(features.len(), D);
    let keys = [
        "modelId",
        "layer",
        "index",
        "maxActApprox",
        "hookName",
        "pos_str",
        "pos_values",
        "neg_str",
        "neg_values",
        "frac_nonzero",
        "freq_hist_data_bar_heights",
        "freq_hist_data_bar_values",
        "logits_hist_data_bar_heights",
        "logits_hist_data_bar_values",
        "topkCosSimIndices",
        "topkCosSimValues",
    ];
    for (f, w) in features.iter().zip(&want) {
        let mut got: Vec<&str> = f.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        got.sort();
        let mut k = keys.to_vec();
        k.sort();
        assert_eq!(got, k);
        assert_eq!(f["layer"], "0-planted");
        assert_eq!(f["modelId"], "planted-model");
        assert_eq!(f["index"], w.latent.to_string());
        assert_eq!(f["pos_str"][0], w.top_logits[0].token);
        assert_eq!(f["topkCosSimIndices"][0], w.similar[0].latent);
        assert_eq!(f["maxActApprox"].as_f64().unwrap() as f32, w.max_act);
    }
    let n_ctx: usize = want.iter().map(|w| w.top_contexts.len()).sum();
    assert_eq!(acts.len(), n_ctx);
    for a in &acts {
        let tokens = a["tokens"].as_array().unwrap();
        let values = a["values"].as_array().unwrap();
        assert_eq!(tokens.len(), values.len());
        let i = a["maxValueTokenIndex"].as_u64().unwrap() as usize;
        assert_eq!(values[i], a["maxValue"]);
    }

    // Feature detail JSON, one per latent.
    let detail: serde_json::Value =
        serde_json::from_slice(&std::fs::read(np.join("features/0-planted/3.json")).unwrap())
            .unwrap();
    assert_eq!(detail["index"], 3);
    let top = &detail["examples_quantiles"][0];
    assert_eq!(top["quantile_name"], "Top activations");
    assert_eq!(
        top["examples"].as_array().unwrap().len(),
        want[3].top_contexts.len()
    );
    let first = &top["examples"][0];
    assert_eq!(first["train_token_ind"], want[3].top_contexts[0].peak);
    assert_eq!(
        first["tokens"][first["train_token_ind"].as_u64().unwrap() as usize],
        "<b>&\"x"
    );
    assert_eq!(detail["top_logits"][0], want[3].top_logits[0].token);
    assert_eq!(s.files, 2 * D.div_ceil(4) + D);

    let html = dir.path().join("html");
    export::html(&db, "planted", &html).unwrap();
    let page = std::fs::read_to_string(html.join("3.html")).unwrap();
    assert!(
        page.contains("&lt;b&gt;&amp;&quot;x"),
        "token text is escaped"
    );
    assert!(!page.contains("<b>&"), "no raw token text");
    assert!(page.contains("planted latent 3"));
    let err = export::html(&db, "other", &html).err().unwrap().to_string();
    assert!(
        err.contains("planted"),
        "names the dictionaries there are: {err}"
    );
}

/// The pass's fast encoder (one GEMM and the sparsity function on slices) gives the dashboards
/// that [`Sae::encode`] gives, for each architecture it covers.
#[test]
fn the_fast_encoder_agrees_with_sae_encode() {
    use scalpel_web::dashboards::compute::{Chunk, DictPass};
    let d_sae = 24;
    let x = Tensor::randn(0f32, 1.0, (N_CTX * CS, D), &Device::Cpu).unwrap();
    let tokens: Vec<u32> = (0..N_CTX * CS).map(|i| (i % VOCAB) as u32).collect();
    let mut keep = vec![true; N_CTX * CS];
    keep[5] = false; // an excluded row must never fire
    let mut topk = DictConfig::new(Architecture::Topk, D, d_sae);
    topk.k = Some(5);
    topk.rescale_acts_by_decoder_norm = Some(true);
    let mut no_b_dec = DictConfig::new(Architecture::Standard, D, d_sae);
    no_b_dec.apply_b_dec_to_input = false;
    let configs = [
        DictConfig::new(Architecture::Standard, D, d_sae),
        no_b_dec,
        DictConfig::new(Architecture::Jumprelu, D, d_sae),
        topk,
        DictConfig::new(Architecture::Topk, D, d_sae),
    ];
    for cfg in configs {
        let name = format!("{:?} k={:?}", cfg.architecture, cfg.k);
        let mut cfg = cfg;
        cfg.k = cfg.k.map(|k| k.min(d_sae));
        let sae = Sae::random(cfg, 0.5, &Device::Cpu).unwrap();
        let chunk = Chunk {
            first_context: 0,
            context_size: CS,
            tokens: &tokens,
            acts: &x,
            keep: &keep,
        };
        let mut fast = DictPass::new(d_sae, opts()).unwrap();
        fast.push(&sae, &chunk).unwrap();
        let mut plain = DictPass::new(d_sae, opts()).unwrap().plain_encoder();
        plain.push(&sae, &chunk).unwrap();
        let a = fast.dashboards("x", 0..d_sae, &token_text);
        let b = plain.dashboards("x", 0..d_sae, &token_text);
        let mut fired = 0;
        for (a, b) in a.iter().zip(&b) {
            assert_eq!(a.n_fired, b.n_fired, "{name}: latent {}", a.latent);
            fired += a.n_fired;
            assert_eq!(a.top_contexts.len(), b.top_contexts.len());
            for (ca, cb) in a.top_contexts.iter().zip(&b.top_contexts) {
                assert_eq!(
                    (ca.source_index, ca.source_pos),
                    (cb.source_index, cb.source_pos)
                );
                assert_ne!(
                    (ca.source_index, ca.source_pos),
                    (0, 5),
                    "excluded row fired"
                );
                for (u, v) in ca.acts.iter().zip(&cb.acts) {
                    assert!((u - v).abs() <= 1e-5 + 1e-5 * v.abs(), "{name}: {u} vs {v}");
                }
            }
        }
        assert!(
            fired > 0,
            "{name}: nothing fired; the comparison would be empty"
        );
    }
}
