//! `scalpel_dict::eval` on the tiny Llama fixture: an exact (identity-like) dictionary preserves
//! everything, a zero dictionary is the ablation, the error term reproduces the clean loss, and
//! every metric matches a plain per-token recomputation from the model's activations and logits.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use scalpel_core::{HookPoint, Hooks};
use scalpel_dict::eval::{eval_points, evaluate, EvalOptions, EvalReport};
use scalpel_dict::{Architecture, DictConfig, Sae};
use scalpel_models::transformer::Model;

/// The tiny llama fixture of scalpel-models (d_model 64, 2 layers, vocabulary 512, BOS 1).
fn llama() -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scalpel-models/tests/fixtures/models/llama");
    scalpel_models::loader::load_hf_dir(&dir, &Device::Cpu)
        .unwrap()
        .0
}

const D: usize = 64;
const BOS: u32 = 1;

/// `n` contexts of `p` tokens starting with BOS, pseudo-random ids in 3..512; a BOS also sits in
/// the middle of the second context (a document boundary), so exclusion is not only position 0.
fn contexts(n: usize, p: usize) -> Vec<Vec<u32>> {
    let mut s = 12345u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        3 + ((s >> 33) % 509) as u32
    };
    let mut v: Vec<Vec<u32>> = (0..n)
        .map(|_| std::iter::once(BOS).chain((1..p).map(|_| next())).collect())
        .collect();
    v[1][p / 2] = BOS;
    v
}

fn sae_at(cfg: DictConfig, tensors: Vec<(&str, Tensor)>) -> Sae {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
    Sae::from_tensors(cfg, map, "test").unwrap()
}

fn standard_cfg(hook: &str, d_sae: usize) -> DictConfig {
    let mut cfg = DictConfig::new(Architecture::Standard, D, d_sae);
    cfg.metadata.hook_name = Some(hook.into());
    cfg
}

/// `W_enc = [I, −I]`, `W_dec = [I; −I]`, no biases: `relu(x) − relu(−x) = x` exactly.
fn identity_sae(hook: &str) -> Sae {
    let dev = &Device::Cpu;
    let eye = Tensor::eye(D, DType::F32, dev).unwrap();
    let w_enc = Tensor::cat(&[&eye, &eye.neg().unwrap()], 1).unwrap(); // [d, 2d]
    let w_dec = Tensor::cat(&[&eye, &eye.neg().unwrap()], 0).unwrap(); // [2d, d]
    sae_at(
        standard_cfg(hook, 2 * D),
        vec![
            ("W_enc", w_enc),
            ("b_enc", Tensor::zeros(2 * D, DType::F32, dev).unwrap()),
            ("W_dec", w_dec),
            ("b_dec", Tensor::zeros(D, DType::F32, dev).unwrap()),
        ],
    )
}

fn zero_sae(hook: &str) -> Sae {
    let dev = &Device::Cpu;
    let cfg = standard_cfg(hook, 32);
    let tensors = Sae::expected_tensors(&cfg)
        .into_iter()
        .map(|(n, shape)| (n, Tensor::zeros(shape, DType::F32, dev).unwrap()))
        .collect();
    sae_at(cfg, tensors)
}

fn opts(exclude: &[u32], batch: usize) -> EvalOptions {
    EvalOptions {
        batch_contexts: batch,
        exclude_token_ids: exclude.to_vec(),
        ..EvalOptions::default()
    }
}

fn run(sae: &Sae, o: &EvalOptions) -> EvalReport {
    evaluate(&llama(), sae, &contexts(5, 16), o, |_| {}).unwrap()
}

/// `|a − b| ≤ atol + rtol·|b|`, naming the metric.
fn close(name: &str, a: f64, b: f64, atol: f64, rtol: f64) {
    assert!(
        (a - b).abs() <= atol + rtol * b.abs(),
        "{name}: {a} vs expected {b} (diff {})",
        (a - b).abs()
    );
}

#[test]
fn an_exact_dictionary_preserves_the_model() {
    let r = run(&identity_sae("blocks.0.hook_resid_post"), &opts(&[BOS], 2));
    let q = &r.reconstruction_quality;
    close("explained_variance", q.explained_variance, 1.0, 1e-9, 0.0);
    close("mse", q.mse, 0.0, 1e-9, 0.0);
    close("cossim", q.cossim, 1.0, 1e-6, 0.0);
    close("l2_ratio", r.shrinkage.l2_ratio, 1.0, 1e-6, 0.0);
    close(
        "relative_reconstruction_bias",
        r.shrinkage.relative_reconstruction_bias,
        1.0,
        1e-6,
        0.0,
    );
    let m = &r.model_performance_preservation;
    close(
        "ce_loss_with_sae",
        m.ce_loss_with_sae,
        m.ce_loss_without_sae,
        1e-6,
        0.0,
    );
    close("ce_loss_score", m.ce_loss_score, 1.0, 1e-4, 0.0);
    assert!(
        (m.ce_loss_with_ablation - m.ce_loss_without_sae).abs() > 1e-3,
        "ablating the residual stream should change the loss: {m:?}"
    );
    let b = &r.model_behavior_preservation;
    close("kl_div_with_sae", b.kl_div_with_sae, 0.0, 1e-7, 0.0);
    close("kl_div_score", b.kl_div_score, 1.0, 1e-5, 0.0);
    // Every dimension is non-zero: exactly one of each latent pair (x_j > 0, x_j < 0) fires.
    close("l0", r.sparsity.l0, D as f64, 0.0, 0.0);
    let dens = &r.features.feature_density;
    assert_eq!(dens.len(), 2 * D);
    for j in 0..D {
        close("density pair", dens[j] + dens[j + D], 1.0, 1e-12, 0.0);
    }
    // 5 contexts of 16 tokens, 6 BOS excluded; the CE drops each context's last position too.
    assert_eq!(r.token_stats.total_tokens, 80);
    assert_eq!(r.token_stats.tokens_evaluated, 74);
    assert_eq!(r.token_stats.ce_positions, 80 - 5 - 6);
    assert_eq!(
        r.features
            .log10_density_histogram
            .counts
            .iter()
            .sum::<u64>() as usize
            + r.features.dead,
        2 * D
    );
}

#[test]
fn a_zero_dictionary_is_the_ablation() {
    // Layer 0, so that layer 1's attention carries what excluded positions keep (below).
    let sae = zero_sae("blocks.0.hook_resid_post");
    let r = run(&sae, &opts(&[], 2));
    let m = &r.model_performance_preservation;
    close(
        "ce_loss_with_sae",
        m.ce_loss_with_sae,
        m.ce_loss_with_ablation,
        1e-9,
        0.0,
    );
    close("ce_loss_score", m.ce_loss_score, 0.0, 1e-6, 0.0);
    let b = &r.model_behavior_preservation;
    close(
        "kl_div_with_sae",
        b.kl_div_with_sae,
        b.kl_div_with_ablation,
        1e-9,
        0.0,
    );
    close("kl_div_score", b.kl_div_score, 0.0, 1e-6, 0.0);
    assert_eq!(r.features.dead, 32);
    assert_eq!(r.sparsity.l0, 0.0);
    assert_eq!(r.shrinkage.l2_norm_out, 0.0);
    assert!(r.reconstruction_quality.explained_variance <= 0.0);

    // Excluding BOS keeps the clean activation there in the spliced pass but not in the ablation.
    let r = run(&sae, &opts(&[BOS], 2));
    let m = &r.model_performance_preservation;
    assert!(
        (m.ce_loss_with_sae - m.ce_loss_with_ablation).abs() > 1e-4,
        "excluded positions must keep their activation: {m:?}"
    );
}

#[test]
fn the_error_term_reproduces_the_clean_loss() {
    let mut cfg = DictConfig::new(Architecture::Topk, D, 128);
    cfg.k = Some(8);
    cfg.metadata.hook_name = Some("blocks.0.hook_resid_post".into());
    let sae = Sae::random(cfg, 0.2, &Device::Cpu).unwrap();
    let o = EvalOptions {
        error_term: true,
        ..opts(&[BOS], 3)
    };
    let m = run(&sae, &o).model_performance_preservation;
    let with_error = m.ce_loss_with_error_term.unwrap();
    close(
        "ce_loss_with_error_term",
        with_error,
        m.ce_loss_without_sae,
        1e-4,
        0.0,
    );
    assert!(
        (m.ce_loss_with_sae - m.ce_loss_without_sae).abs() > 1e-3,
        "a random dictionary should change the loss: {m:?}"
    );
}

/// Every metric recomputed plainly, token by token, from the model's activations and logits.
#[derive(Debug, Default)]
struct Expected {
    mse: f64,
    cossim: f64,
    explained_variance: f64,
    explained_variance_legacy: f64,
    l2_norm_in: f64,
    l2_norm_out: f64,
    l2_ratio: f64,
    rrb: f64,
    l0: f64,
    l1: f64,
    density: Vec<f64>,
    ce_clean: f64,
    ce_sae: f64,
    ce_abl: f64,
    kl_sae: f64,
    kl_abl: f64,
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    let (b, p) = (t.dim(0).unwrap(), t.dim(1).unwrap());
    t.reshape((b * p, ()))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&v| v as f64 - z).collect()
}

fn expected(
    model: &Model,
    sae: &Sae,
    input: HookPoint,
    output: HookPoint,
    ctxs: &[Vec<u32>],
    exclude: &[u32],
    batch: usize,
) -> Expected {
    let mut e = Expected {
        density: vec![0.0; sae.cfg.d_sae],
        ..Expected::default()
    };
    let (mut all_x, mut all_rss) = (Vec::new(), Vec::new());
    let (mut n_ce, mut rrb_batches) = (0.0, 0.0);
    for chunk in ctxs.chunks(batch) {
        let tokens = Tensor::new(chunk.to_vec(), &Device::Cpu).unwrap();
        let ids: Vec<u32> = chunk.concat();
        let keep: Vec<bool> = ids.iter().map(|t| !exclude.contains(t)).collect();
        let (clean, cache) = model
            .run_with_cache(&tokens, |hp| hp == input || hp == output)
            .unwrap();
        let x_in = Tensor::new(rows(cache.get(input).unwrap()), &Device::Cpu).unwrap();
        let x = rows(cache.get(output).unwrap());
        let x_hat: Vec<Vec<f32>> = sae.forward(&x_in).unwrap().to_vec2().unwrap();
        let f: Vec<Vec<f32>> = sae.encode(&x_in).unwrap().to_vec2().unwrap();
        let kept: Vec<usize> = (0..ids.len()).filter(|&i| keep[i]).collect();
        let n = kept.len() as f64;
        let mut mean = vec![0.0; D];
        for &i in &kept {
            for j in 0..D {
                mean[j] += x[i][j] as f64 / n;
            }
        }
        let (mut hat_sq, mut dot) = (0.0, 0.0);
        for &i in &kept {
            let dotp = |a: &[f32], b: &[f32]| -> f64 {
                a.iter().zip(b).map(|(&u, &v)| u as f64 * v as f64).sum()
            };
            let rss: f64 = (0..D)
                .map(|j| (x[i][j] as f64 - x_hat[i][j] as f64).powi(2))
                .sum();
            let dev: f64 = (0..D).map(|j| (x[i][j] as f64 - mean[j]).powi(2)).sum();
            let (nx, nh) = (dotp(&x[i], &x[i]).sqrt(), dotp(&x_hat[i], &x_hat[i]).sqrt());
            e.mse += rss;
            e.cossim += dotp(&x[i], &x_hat[i]) / (nx * nh);
            e.explained_variance_legacy += 1.0 - rss / dev;
            e.l2_norm_in += nx;
            e.l2_norm_out += nh;
            e.l2_ratio += nh / nx;
            hat_sq += nh * nh / n;
            dot += dotp(&x[i], &x_hat[i]) / n;
            e.l0 += f[i].iter().filter(|&&a| a != 0.0).count() as f64;
            e.l1 += f[i].iter().map(|a| a.abs() as f64).sum::<f64>();
            for (d, &a) in e.density.iter_mut().zip(&f[i]) {
                *d += f64::from(u8::from(a != 0.0));
            }
            all_x.push(x[i].clone());
            all_rss.push(rss);
        }
        e.rrb += hat_sq / dot;
        rrb_batches += 1.0;

        // The dictionary's output at kept rows, recomputed inside the pass from the input hook.
        let seen: Rc<RefCell<Option<Tensor>>> = Rc::default();
        let seen2 = seen.clone();
        let keep2 = keep.clone();
        let mut hooks = Hooks::new()
            .with_hook(input, move |a, _| {
                *seen2.borrow_mut() = Some(a.clone());
                Ok(None)
            })
            .with_hook(output, move |a, _| {
                let x_in = seen.borrow().clone().unwrap();
                let (b, p) = (x_in.dim(0)?, x_in.dim(1)?);
                let out: Vec<Vec<f32>> = sae
                    .forward(&x_in.reshape((b * p, ()))?)
                    .unwrap()
                    .to_vec2()?;
                let orig = rows(a);
                let mixed: Vec<Vec<f32>> = (0..b * p)
                    .map(|i| {
                        if keep2[i] {
                            out[i].clone()
                        } else {
                            orig[i].clone()
                        }
                    })
                    .collect();
                Ok(Some(Tensor::new(mixed, a.device())?.reshape(a.dims())?))
            });
        let with_sae = model.run_with_hooks(&tokens, &mut hooks).unwrap();
        let mut hooks = Hooks::new().with_hook(output, |a, _| Ok(Some(a.zeros_like()?)));
        let ablated = model.run_with_hooks(&tokens, &mut hooks).unwrap();

        let (clean, with_sae, ablated) = (rows(&clean), rows(&with_sae), rows(&ablated));
        let p = chunk[0].len();
        for &i in &kept {
            let lc = log_softmax(&clean[i]);
            let ls = log_softmax(&with_sae[i]);
            let la = log_softmax(&ablated[i]);
            let kl =
                |lq: &[f64]| -> f64 { lc.iter().zip(lq).map(|(a, b)| a.exp() * (a - b)).sum() };
            e.kl_sae += kl(&ls);
            e.kl_abl += kl(&la);
            if (i + 1) % p != 0 {
                let t = ids[i + 1] as usize;
                e.ce_clean -= lc[t];
                e.ce_sae -= ls[t];
                e.ce_abl -= la[t];
                n_ce += 1.0;
            }
        }
    }
    let n = all_x.len() as f64;
    let mut mean = vec![0.0; D];
    for x in &all_x {
        for j in 0..D {
            mean[j] += x[j] as f64 / n;
        }
    }
    let var: f64 = all_x
        .iter()
        .map(|x| (0..D).map(|j| (x[j] as f64 - mean[j]).powi(2)).sum::<f64>())
        .sum::<f64>()
        / n;
    e.explained_variance = 1.0 - all_rss.iter().sum::<f64>() / n / var;
    for v in [
        &mut e.mse,
        &mut e.cossim,
        &mut e.explained_variance_legacy,
        &mut e.l2_norm_in,
        &mut e.l2_norm_out,
        &mut e.l2_ratio,
        &mut e.l0,
        &mut e.l1,
        &mut e.kl_sae,
        &mut e.kl_abl,
    ] {
        *v /= n;
    }
    for d in &mut e.density {
        *d /= n;
    }
    e.rrb /= rrb_batches;
    e.ce_clean /= n_ce;
    e.ce_sae /= n_ce;
    e.ce_abl /= n_ce;
    e
}

fn assert_matches_plain_recomputation(sae: &Sae) {
    let model = llama();
    let ctxs = contexts(5, 12);
    let o = opts(&[BOS], 2);
    let r = evaluate(&model, sae, &ctxs, &o, |_| {}).unwrap();
    let pts = eval_points(&model, sae, None).unwrap();
    let e = expected(&model, sae, pts.input, pts.output, &ctxs, &[BOS], 2);
    let (q, s, m, b) = (
        &r.reconstruction_quality,
        &r.shrinkage,
        &r.model_performance_preservation,
        &r.model_behavior_preservation,
    );
    let c = |name, a, b| close(name, a, b, 1e-6, 1e-4);
    c("mse", q.mse, e.mse);
    c("cossim", q.cossim, e.cossim);
    c(
        "explained_variance",
        q.explained_variance,
        e.explained_variance,
    );
    c(
        "explained_variance_legacy",
        q.explained_variance_legacy,
        e.explained_variance_legacy,
    );
    c("l2_norm_in", s.l2_norm_in, e.l2_norm_in);
    c("l2_norm_out", s.l2_norm_out, e.l2_norm_out);
    c("l2_ratio", s.l2_ratio, e.l2_ratio);
    c(
        "relative_reconstruction_bias",
        s.relative_reconstruction_bias,
        e.rrb,
    );
    c("l0", r.sparsity.l0, e.l0);
    c("l1", r.sparsity.l1, e.l1);
    for (i, (a, b)) in r
        .features
        .feature_density
        .iter()
        .zip(&e.density)
        .enumerate()
    {
        close(&format!("feature_density[{i}]"), *a, *b, 1e-12, 0.0);
    }
    c("ce_loss_without_sae", m.ce_loss_without_sae, e.ce_clean);
    c("ce_loss_with_sae", m.ce_loss_with_sae, e.ce_sae);
    c("ce_loss_with_ablation", m.ce_loss_with_ablation, e.ce_abl);
    c(
        "ce_loss_score",
        m.ce_loss_score,
        (e.ce_abl - e.ce_sae) / (e.ce_abl - e.ce_clean),
    );
    c("kl_div_with_sae", b.kl_div_with_sae, e.kl_sae);
    c("kl_div_with_ablation", b.kl_div_with_ablation, e.kl_abl);
    c(
        "kl_div_score",
        b.kl_div_score,
        (e.kl_abl - e.kl_sae) / e.kl_abl,
    );
    let dead = e.density.iter().filter(|&&d| d == 0.0).count();
    let dense = e.density.iter().filter(|&&d| d > 0.1).count();
    assert_eq!((r.features.dead, r.features.dense), (dead, dense));
    // The metrics are not degenerate: a random dictionary reconstructs poorly.
    assert!(q.mse > 1e-3 && e.kl_sae > 1e-4, "{r:?}");
}

#[test]
fn sae_metrics_match_a_plain_recomputation() {
    let mut cfg = standard_cfg("blocks.0.hook_resid_post", 96);
    cfg.architecture = Architecture::Jumprelu;
    let sae = Sae::random(cfg, 0.3, &Device::Cpu).unwrap();
    assert_matches_plain_recomputation(&sae);
}

#[test]
fn transcoder_metrics_match_a_plain_recomputation() {
    let mut cfg = DictConfig::new(Architecture::SkipTranscoder, D, 96);
    cfg.metadata.hook_name = Some("blocks.1.ln2.hook_normalized".into());
    cfg.metadata.hook_name_out = Some("blocks.1.hook_mlp_out".into());
    let sae = Sae::random(cfg, 0.2, &Device::Cpu).unwrap();
    assert_matches_plain_recomputation(&sae);
    let o = EvalOptions {
        error_term: true,
        ..opts(&[BOS], 5)
    };
    let r = run(&sae, &o);
    assert_eq!(r.hook_name_out.as_deref(), Some("blocks.1.hook_mlp_out"));
    let m = r.model_performance_preservation;
    close(
        "ce_loss_with_error_term",
        m.ce_loss_with_error_term.unwrap(),
        m.ce_loss_without_sae,
        1e-4,
        0.0,
    );
}

fn eval_err(sae: &Sae, ctxs: &[Vec<u32>], o: &EvalOptions) -> String {
    evaluate(&llama(), sae, ctxs, o, |_| {})
        .unwrap_err()
        .to_string()
}

#[test]
fn bad_inputs_are_named() {
    let ctxs = contexts(2, 8);
    let o = EvalOptions::default();
    // A hook the model lacks (it has 2 layers), with suggestions.
    let e = eval_err(&zero_sae("blocks.7.hook_resid_post"), &ctxs, &o);
    assert!(
        e.contains("metadata.hook_name")
            && e.contains("blocks.7.hook_resid_post")
            && e.contains("did you mean"),
        "{e}"
    );
    // No hook at all.
    let mut sae = zero_sae("x");
    sae.cfg.metadata.hook_name = None;
    let e = eval_err(&sae, &ctxs, &o);
    assert!(
        e.contains("metadata.hook_name") && e.contains("absent"),
        "{e}"
    );
    // ...unless the caller names one.
    let named = EvalOptions {
        hook: Some("resid_post.1".into()),
        ..EvalOptions::default()
    };
    let r = evaluate(&llama(), &sae, &ctxs, &named, |_| {}).unwrap();
    assert_eq!(r.hook_name, "blocks.1.hook_resid_post");
    // Width mismatch: both numbers and the hook.
    let cfg = {
        let mut c = DictConfig::new(Architecture::Standard, 32, 16);
        c.metadata.hook_name = Some("blocks.0.hook_resid_post".into());
        c
    };
    let e = eval_err(&Sae::random(cfg, 0.1, &Device::Cpu).unwrap(), &ctxs, &o);
    assert!(
        e.contains("d_in is 32")
            && e.contains("width 64")
            && e.contains("blocks.0.hook_resid_post"),
        "{e}"
    );
    // Attention patterns are not per-position activations.
    let e = eval_err(&zero_sae("blocks.0.attn.hook_pattern"), &ctxs, &o);
    assert!(e.contains("blocks.0.attn.hook_pattern"), "{e}");
    // Empty and ragged corpora.
    let sae = zero_sae("blocks.0.hook_resid_post");
    assert!(eval_err(&sae, &[], &o).contains("no contexts"));
    let ragged = vec![vec![1, 5, 6], vec![1, 5]];
    assert!(eval_err(&sae, &ragged, &o).contains("one length"));
    // Every position excluded.
    let e = eval_err(&sae, &[vec![1, 1, 1]], &opts(&[BOS], 1));
    assert!(e.contains("excluded"), "{e}");
}
