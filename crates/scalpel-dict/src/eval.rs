//! Evaluating a dictionary inside the model it was trained on, with SAELens's metrics under
//! SAELens's names (`sae_lens/evals.py`: `get_sparsity_and_variance_metrics`, `get_recons_loss`
//! and `ExplainedVarianceCalculator`), grouped as SAELens's `run_evals` groups them, so numbers
//! compare with SAELens and Neuronpedia.
//!
//! Each batch of contexts `[b, p]` runs through the model three times (four with
//! [`EvalOptions::error_term`]):
//! 1. clean, caching the dictionary's input (and, for a transcoder, output) hook: the reference
//!    logits and the activations the reconstruction metrics compare against;
//! 2. with the dictionary's output `x̂` in place of the activation (computed once from the cached
//!    input: everything upstream of the hook is the clean pass);
//! 3. with the activation zero-ablated;
//! 4. optionally through [`crate::splice_at`] with the error term kept, which must reproduce the
//!    clean loss (a check of the splice, not a SAELens metric).
//!
//! Only running sums are kept between batches (in f64, as SAELens's explained-variance
//! calculator), so memory does not grow with the number of tokens.
//!
//! # Which positions count
//! As SAELens with `exclude_special_tokens`, a position whose token is in
//! [`EvalOptions::exclude_token_ids`] (BOS, EOS, chat markers) is left out of every metric, and in
//! pass 2 it keeps its clean activation; the zero ablation zeroes every position. The
//! cross-entropy at position `i` is the loss of predicting token `i + 1` (`p − 1` per context,
//! TransformerLens's `loss_per_token`) and counts when token `i` is not excluded, so with BOS
//! excluded the BOS position's prediction of the first token is left out. KL divergences
//! `KL(clean ‖ patched)` count at every kept position, the last included.
//!
//! # Where scalpel differs from SAELens
//! - Transcoders: the reconstruction is compared with the true activation at
//!   `metadata.hook_name_out` and replaces it there (SAELens's evals compare with, and replace,
//!   the input hook); the ablation zeroes the output hook; a skip transcoder's skip term is part
//!   of its output.
//! - `cossim` of a token whose activation or reconstruction is the zero vector is 0 (SAELens
//!   divides by the zero norm and gets NaN).
//! - `metadata.hook_head_index` (one head of a `hook_z` dictionary) is refused.
//!
//! `relative_reconstruction_bias` is, as in SAELens, a per-batch ratio of means averaged over
//! batches, so it depends slightly on the batch size. A metric that is 0/0 (the score of a
//! dictionary whose ablation costs nothing) is NaN, which serialises as JSON `null`.

use candle_core::{DType, Tensor};
use rayon::prelude::*;
use scalpel_core::{HookPoint, Hooks};
use scalpel_models::transformer::Model;
use serde::Serialize;

use crate::{splice_at, DictError, Result, Sae};

/// How to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Contexts per forward pass.
    pub batch_contexts: usize,
    /// Evaluate at most this many of the contexts given.
    pub max_contexts: Option<usize>,
    /// Positions holding these tokens are left out of every metric and keep their clean
    /// activation (SAELens's `exclude_special_tokens`; see the module docs).
    pub exclude_token_ids: Vec<u32>,
    /// The hook the dictionary reads, instead of its `metadata.hook_name` (name or shorthand).
    pub hook: Option<String>,
    /// A latent firing on more than this fraction of the evaluated tokens counts as dense.
    pub dense_threshold: f64,
    /// Bins of the log10 feature-density histogram.
    pub histogram_bins: usize,
    /// Also run with the error term kept (`x̂ + (x − x̂)`), reporting its cross-entropy, which
    /// must equal `ce_loss_without_sae`.
    pub error_term: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            batch_contexts: 8,
            max_contexts: None,
            exclude_token_ids: Vec::new(),
            hook: None,
            dense_threshold: 0.1,
            histogram_bins: 20,
            error_term: false,
        }
    }
}

/// Where a dictionary reads and writes in a model (the same point for an SAE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvalPoints {
    pub input: HookPoint,
    pub output: HookPoint,
}

/// Everything [`evaluate`] measures, in SAELens's groups and names.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub architecture: String,
    pub d_in: usize,
    pub d_sae: usize,
    /// The hook the dictionary reads.
    pub hook_name: String,
    /// The hook a transcoder writes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hook_name_out: Option<String>,
    pub model_behavior_preservation: BehaviorPreservation,
    pub model_performance_preservation: PerformancePreservation,
    pub reconstruction_quality: ReconstructionQuality,
    pub shrinkage: Shrinkage,
    pub sparsity: Sparsity,
    pub token_stats: TokenStats,
    pub features: FeatureStats,
}

/// KL divergences of the next-token distribution from the clean one.
#[derive(Debug, Clone, Serialize)]
pub struct BehaviorPreservation {
    /// `(kl_div_with_ablation − kl_div_with_sae) / kl_div_with_ablation`.
    pub kl_div_score: f64,
    /// Mean `KL(clean ‖ zero-ablated)` per position.
    pub kl_div_with_ablation: f64,
    /// Mean `KL(clean ‖ with the dictionary)` per position.
    pub kl_div_with_sae: f64,
}

/// Next-token cross-entropies (nats per token).
#[derive(Debug, Clone, Serialize)]
pub struct PerformancePreservation {
    /// `(ce_loss_with_ablation − ce_loss_with_sae) / (ce_loss_with_ablation − ce_loss_without_sae)`.
    pub ce_loss_score: f64,
    pub ce_loss_with_ablation: f64,
    pub ce_loss_with_sae: f64,
    pub ce_loss_without_sae: f64,
    /// With the error term kept (scalpel's check of the splice; equals `ce_loss_without_sae`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ce_loss_with_error_term: Option<f64>,
}

/// How well `x̂` reconstructs `x`, per token.
#[derive(Debug, Clone, Serialize)]
pub struct ReconstructionQuality {
    /// `1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²)` over all evaluated tokens together.
    pub explained_variance: f64,
    /// SAELens's older per-token `1 − ‖x − x̂‖² / ‖x − mean_batch(x)‖²`, averaged.
    pub explained_variance_legacy: f64,
    /// `E‖x − x̂‖²` (summed over dimensions, averaged over tokens).
    pub mse: f64,
    /// `E[cos(x, x̂)]`.
    pub cossim: f64,
}

/// Norms of input and reconstruction.
#[derive(Debug, Clone, Serialize)]
pub struct Shrinkage {
    /// `E‖x‖`.
    pub l2_norm_in: f64,
    /// `E‖x̂‖`.
    pub l2_norm_out: f64,
    /// `E[‖x̂‖ / ‖x‖]` (a norm below 1e-4 divides as 1).
    pub l2_ratio: f64,
    /// `E‖x̂‖² / E[x·x̂]` per batch, averaged (arXiv:2404.16014, eq. 10).
    pub relative_reconstruction_bias: f64,
}

/// Feature activations per token.
#[derive(Debug, Clone, Serialize)]
pub struct Sparsity {
    /// Mean number of non-zero latents.
    pub l0: f64,
    /// Mean sum of |latent activations|.
    pub l1: f64,
}

/// How much was evaluated.
#[derive(Debug, Clone, Serialize)]
pub struct TokenStats {
    pub contexts: usize,
    pub context_size: usize,
    /// `contexts · context_size` (SAELens's `total_tokens_eval_reconstruction`).
    pub total_tokens: u64,
    /// Positions counted by the reconstruction, sparsity, KL and density metrics.
    pub tokens_evaluated: u64,
    /// Positions counted by the cross-entropies.
    pub ce_positions: u64,
}

/// Per-latent firing statistics over the evaluated tokens.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureStats {
    /// Latents that never fired.
    pub dead: usize,
    /// Latents firing on more than `dense_threshold` of the tokens.
    pub dense: usize,
    pub dense_threshold: f64,
    /// Histogram of log10 density over the latents that fired.
    pub log10_density_histogram: Histogram,
    /// Per latent: the fraction of evaluated tokens on which it is non-zero (SAELens's
    /// `feature_density`).
    pub feature_density: Vec<f64>,
}

/// Counts in equal bins between `edges[i]` and `edges[i + 1]` (the last bin is closed).
#[derive(Debug, Clone, Serialize)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

/// Resolves where `sae` reads and writes in `model` and checks its widths against the model's:
/// the hook must be named (`hook`, or else `metadata.hook_name`), be a per-position hook of this
/// model, and have width `d_in`; a transcoder's `metadata.hook_name_out` must come later in the
/// forward pass and have width `d_out`.
pub fn eval_points(model: &Model, sae: &Sae, hook: Option<&str>) -> Result<EvalPoints> {
    let meta = &sae.cfg.metadata;
    if meta.hook_head_index.is_some() {
        return Err(DictError::Eval(
            "dictionaries of one attention head (`metadata.hook_head_index`) are not supported"
                .into(),
        ));
    }
    let valid = model.hook_points();
    let resolve = |name: &str, field: &'static str| {
        HookPoint::parse_for(name, &valid).map_err(|source| DictError::Hook {
            field,
            source: Box::new(source),
        })
    };
    let missing = |field: &str, reason: &str| DictError::Config {
        source_name: "dictionary config".into(),
        field: field.into(),
        reason: reason.into(),
    };
    let input = match hook {
        Some(name) => resolve(name, "hook (override of metadata.hook_name)")?,
        None => resolve(
            meta.hook_name.as_deref().ok_or_else(|| {
                missing(
                    "metadata.hook_name",
                    "absent: the dictionary does not say which hook it reads (give one)",
                )
            })?,
            "metadata.hook_name",
        )?,
    };
    let output = if sae.cfg.architecture.is_transcoder() {
        let name = meta.hook_name_out.as_deref().ok_or_else(|| {
            missing(
                "metadata.hook_name_out",
                "absent: a transcoder needs the hook it writes",
            )
        })?;
        resolve(name, "metadata.hook_name_out")?
    } else {
        input
    };
    let order = |hp| valid.iter().position(|&v| v == hp);
    if order(output) < order(input) {
        return Err(DictError::Eval(format!(
            "the transcoder writes `{output}`, which runs before the hook it reads, `{input}`"
        )));
    }
    let check = |what, hp: HookPoint, dict: usize| {
        let width = scalpel_data::harvest::hook_width(model, hp)?;
        if width != dict {
            return Err(DictError::HookWidth {
                what,
                hook: hp.to_string(),
                dict,
                model: width,
            });
        }
        Ok(())
    };
    check("d_in", input, sae.cfg.d_in)?;
    check("d_out", output, sae.cfg.d_out())?;
    Ok(EvalPoints { input, output })
}

/// Evaluates `sae` spliced into `model` over `contexts` (token ids, all of one length of at
/// least 2), `opts.batch_contexts` at a time; `on_batch` is told how many tokens each batch ran
/// (for progress bars). See the module docs for the metrics and the positions they count.
pub fn evaluate(
    model: &Model,
    sae: &Sae,
    contexts: &[Vec<u32>],
    opts: &EvalOptions,
    mut on_batch: impl FnMut(usize),
) -> Result<EvalReport> {
    let points = eval_points(model, sae, opts.hook.as_deref())?;
    let contexts = &contexts[..opts.max_contexts.unwrap_or(usize::MAX).min(contexts.len())];
    let Some(first) = contexts.first() else {
        return Err(DictError::Eval(
            "no contexts to evaluate (empty corpus?)".into(),
        ));
    };
    let p = first.len();
    if p < 2 {
        return Err(DictError::Eval(format!(
            "contexts need at least 2 tokens for a next-token loss, got {p}"
        )));
    }
    if let Some(bad) = contexts.iter().find(|c| c.len() != p) {
        return Err(DictError::Eval(format!(
            "contexts must have one length: {} vs {p}",
            bad.len()
        )));
    }
    if opts.batch_contexts == 0 || opts.histogram_bins == 0 {
        return Err(DictError::Eval(
            "batch_contexts and histogram_bins must be positive".into(),
        ));
    }
    let mut sums = Sums::new(sae.cfg.d_out(), sae.cfg.d_sae, opts.error_term);
    for batch in contexts.chunks(opts.batch_contexts) {
        eval_batch(model, sae, points, batch, opts, &mut sums)?;
        on_batch(batch.len() * p);
    }
    if sums.tokens == 0 {
        return Err(DictError::Eval(
            "every position holds an excluded token: nothing to evaluate".into(),
        ));
    }
    Ok(sums.report(sae, points, contexts.len(), p, opts))
}

/// The three (or four) forward passes of one batch, folded into `sums`.
fn eval_batch(
    model: &Model,
    sae: &Sae,
    points: EvalPoints,
    batch: &[Vec<u32>],
    opts: &EvalOptions,
    sums: &mut Sums,
) -> Result<()> {
    let (b, p) = (batch.len(), batch[0].len());
    let ids: Vec<u32> = batch.concat(); // [b·p]
    let tokens = Tensor::from_vec(ids.clone(), (b, p), model.device())?;
    let keep: Vec<bool> = ids
        .iter()
        .map(|t| !opts.exclude_token_ids.contains(t))
        .collect();

    // 1. Clean, caching the hooks the dictionary reads and writes.
    let mut hooks = Hooks::new().with_cache_points([points.input, points.output]);
    let clean = model.run_with_hooks(&tokens, &mut hooks)?;
    let cache = hooks.take_cache();
    let act = |hp: HookPoint| {
        cache
            .get(hp)
            .ok_or_else(|| DictError::Eval(format!("the forward pass did not record `{hp}`")))
    };
    let (x, y) = (act(points.input)?, act(points.output)?);
    let x_rows = x.reshape((b * p, ()))?.to_dtype(DType::F32)?; // [b·p, d_in]
    let y_rows = y.reshape((b * p, ()))?.to_dtype(DType::F32)?; // [b·p, d_out]
    let (x_hat, f) = reconstruct(sae, &x_rows)?; // [b·p, d_out], [b·p, d_sae]
    sums.add_reconstruction(
        &y_rows.flatten_all()?.to_vec1()?,
        &x_hat.flatten_all()?.to_vec1()?,
        &f.flatten_all()?.to_vec1()?,
        &keep,
    );

    // 2. With the dictionary: x̂ at kept positions, the clean activation at excluded ones.
    let mut mask_shape = vec![b, p];
    mask_shape.resize(y.rank(), 1);
    let mask = Tensor::from_vec(
        keep.iter().map(|&k| u8::from(k)).collect::<Vec<u8>>(),
        mask_shape,
        y.device(),
    )?
    .broadcast_as(y.dims())?
    .contiguous()?;
    let replacement = mask.where_cond(&x_hat.reshape(y.dims())?.to_dtype(y.dtype())?, y)?;
    let mut hooks =
        Hooks::new().with_hook(points.output, move |_, _| Ok(Some(replacement.clone())));
    let with_sae = model.run_with_hooks(&tokens, &mut hooks)?;

    // 3. Zero ablation, every position.
    let mut hooks = Hooks::new().with_hook(points.output, |a, _| Ok(Some(a.zeros_like()?)));
    let ablated = model.run_with_hooks(&tokens, &mut hooks)?;

    // 4. The error term kept, through the library's splice.
    let with_error = if opts.error_term {
        let mut hooks = splice_at(sae, Hooks::new(), points.input, points.output, true);
        Some(model.run_with_hooks(&tokens, &mut hooks)?)
    } else {
        None
    };

    let logits =
        |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
    let clean = Logits::new(logits(&clean)?, &ids, p, &keep);
    sums.ce_positions += clean.targets.iter().flatten().count() as u64;
    sums.ce_clean += clean.ce_sum();
    let (ce, kl) = clean.compare(&logits(&with_sae)?);
    sums.ce_sae += ce;
    sums.kl_sae += kl;
    let (ce, kl) = clean.compare(&logits(&ablated)?);
    sums.ce_abl += ce;
    sums.kl_abl += kl;
    if let Some(t) = with_error {
        sums.ce_err += clean.compare(&logits(&t)?).0;
    }
    Ok(())
}

/// The dictionary's output and features for activation rows `x [n, d_in]` (f32):
/// `(x̂ [n, d_out], f [n, d_sae])`, as [`Sae::forward`] (input normalisation undone, a skip
/// transcoder's skip term added) but keeping the features.
fn reconstruct(sae: &Sae, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let (f, norm) = sae.encode_with_norm(x)?;
    let x_hat = sae.decode_with_norm(&f, &norm)?;
    let x_hat = match sae.tensor("W_skip") {
        Some(w_skip) => (x_hat + x.matmul(&w_skip.t()?)?)?,
        None => x_hat,
    };
    Ok((x_hat, f))
}

/// The clean logits of one batch, with what every comparison needs.
struct Logits<'a> {
    /// `[b·p, d_vocab]`, flattened.
    values: Vec<f32>,
    d_vocab: usize,
    /// Per position: log-sum-exp of its logits.
    lse: Vec<f64>,
    /// Per position: the next token, where the cross-entropy counts.
    targets: Vec<Option<u32>>,
    /// Per position: whether the KL divergence counts.
    keep: &'a [bool],
}

impl<'a> Logits<'a> {
    fn new(values: Vec<f32>, ids: &[u32], p: usize, keep: &'a [bool]) -> Self {
        let n = ids.len();
        let d_vocab = values.len() / n;
        let lse = values.par_chunks(d_vocab).map(logsumexp).collect();
        let targets = (0..n)
            .map(|i| (keep[i] && (i + 1) % p != 0).then(|| ids[i + 1]))
            .collect();
        Logits {
            values,
            d_vocab,
            lse,
            targets,
            keep,
        }
    }

    /// Summed clean cross-entropy over the counted positions.
    fn ce_sum(&self) -> f64 {
        self.targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                t.map(|t| self.lse[i] - self.values[i * self.d_vocab + t as usize] as f64)
            })
            .sum()
    }

    /// Summed cross-entropy of `other` (logits of the same batch) and summed `KL(clean ‖ other)`,
    /// each over its counted positions.
    fn compare(&self, other: &[f32]) -> (f64, f64) {
        let per_pos: Vec<(f64, f64)> = other
            .par_chunks(self.d_vocab)
            .zip(self.values.par_chunks(self.d_vocab))
            .enumerate()
            .map(|(i, (new, clean))| {
                let lse_new = logsumexp(new);
                let ce = self.targets[i].map_or(0.0, |t| lse_new - new[t as usize] as f64);
                let kl = if self.keep[i] {
                    // Σ p_c (log p_c − log p_new) = Σ p_c (c − n) − lse_c + lse_new, as Σ p_c = 1.
                    let lse_c = self.lse[i];
                    let cross: f64 = clean
                        .iter()
                        .zip(new)
                        .map(|(&c, &n)| (c as f64 - lse_c).exp() * (c as f64 - n as f64))
                        .sum();
                    cross - lse_c + lse_new
                } else {
                    0.0
                };
                (ce, kl)
            })
            .collect();
        // Summed in order, so results do not depend on the thread schedule.
        per_pos
            .iter()
            .fold((0.0, 0.0), |(a, b), (ce, kl)| (a + ce, b + kl))
    }
}

fn logsumexp(row: &[f32]) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    max + row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
}

/// Running sums over the evaluated positions.
struct Sums {
    d_out: usize,
    d_sae: usize,
    /// Positions counted (not excluded).
    tokens: u64,
    rss: f64,
    cossim: f64,
    norm_in: f64,
    norm_out: f64,
    ratio: f64,
    ev_legacy: f64,
    l0: f64,
    l1: f64,
    /// Σ‖x‖² and Σx per dimension, for the explained variance.
    sq_norm: f64,
    sum_x: Vec<f64>,
    rrb: f64,
    rrb_batches: u64,
    /// Per latent: positions where it is non-zero.
    fired: Vec<u64>,
    ce_positions: u64,
    ce_clean: f64,
    ce_sae: f64,
    ce_abl: f64,
    ce_err: f64,
    error_term: bool,
    kl_sae: f64,
    kl_abl: f64,
}

impl Sums {
    fn new(d_out: usize, d_sae: usize, error_term: bool) -> Self {
        Sums {
            d_out,
            d_sae,
            tokens: 0,
            rss: 0.0,
            cossim: 0.0,
            norm_in: 0.0,
            norm_out: 0.0,
            ratio: 0.0,
            ev_legacy: 0.0,
            l0: 0.0,
            l1: 0.0,
            sq_norm: 0.0,
            sum_x: vec![0.0; d_out],
            rrb: 0.0,
            rrb_batches: 0,
            fired: vec![0; d_sae],
            ce_positions: 0,
            ce_clean: 0.0,
            ce_sae: 0.0,
            ce_abl: 0.0,
            ce_err: 0.0,
            error_term,
            kl_sae: 0.0,
            kl_abl: 0.0,
        }
    }

    /// Folds in one batch: true activations `x`, reconstructions `x_hat` (`[n, d_out]` each) and
    /// features `f [n, d_sae]`, flattened; rows where `keep` is false are skipped.
    fn add_reconstruction(&mut self, x: &[f32], x_hat: &[f32], f: &[f32], keep: &[bool]) {
        let (d, d_sae) = (self.d_out, self.d_sae);
        let kept: Vec<usize> = (0..keep.len()).filter(|&i| keep[i]).collect();
        if kept.is_empty() {
            return;
        }
        let n = kept.len() as f64;
        // The batch mean, for explained_variance_legacy.
        let mut mean = vec![0f64; d];
        for &i in &kept {
            for (m, &v) in mean.iter_mut().zip(&x[i * d..(i + 1) * d]) {
                *m += v as f64 / n;
            }
        }
        let (mut hat_sq, mut dot) = (0.0, 0.0);
        for &i in &kept {
            let (xr, hr) = (&x[i * d..(i + 1) * d], &x_hat[i * d..(i + 1) * d]);
            let (mut rss, mut xx, mut hh, mut xh, mut dev) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for j in 0..d {
                let (a, h) = (xr[j] as f64, hr[j] as f64);
                rss += (a - h) * (a - h);
                xx += a * a;
                hh += h * h;
                xh += a * h;
                dev += (a - mean[j]) * (a - mean[j]);
                self.sum_x[j] += a;
            }
            let (norm_in, norm_out) = (xx.sqrt(), hh.sqrt());
            self.tokens += 1;
            self.rss += rss;
            self.sq_norm += xx;
            self.norm_in += norm_in;
            self.norm_out += norm_out;
            self.ratio += norm_out / if norm_in < 1e-4 { 1.0 } else { norm_in };
            if norm_in > 0.0 && norm_out > 0.0 {
                self.cossim += xh / (norm_in * norm_out);
            }
            self.ev_legacy += 1.0 - rss / dev;
            hat_sq += hh;
            dot += xh;
            for (count, &a) in self.fired.iter_mut().zip(&f[i * d_sae..(i + 1) * d_sae]) {
                if a != 0.0 {
                    *count += 1;
                    self.l0 += 1.0;
                    self.l1 += a.abs() as f64;
                }
            }
        }
        self.rrb += (hat_sq / n) / (dot / n);
        self.rrb_batches += 1;
    }

    fn report(
        &self,
        sae: &Sae,
        points: EvalPoints,
        contexts: usize,
        p: usize,
        opts: &EvalOptions,
    ) -> EvalReport {
        let n = self.tokens as f64;
        let n_ce = self.ce_positions as f64;
        let mse = self.rss / n;
        let mean_sq: f64 = self.sum_x.iter().map(|s| (s / n) * (s / n)).sum();
        let total_variance = self.sq_norm / n - mean_sq;
        // As SAELens's ExplainedVarianceCalculator.compute.
        let explained_variance = if total_variance < 1e-10 {
            if mse < 1e-10 {
                1.0
            } else {
                0.0
            }
        } else {
            1.0 - mse / total_variance
        };
        let (ce_clean, ce_sae, ce_abl) =
            (self.ce_clean / n_ce, self.ce_sae / n_ce, self.ce_abl / n_ce);
        let (kl_sae, kl_abl) = (self.kl_sae / n, self.kl_abl / n);
        let density: Vec<f64> = self.fired.iter().map(|&c| c as f64 / n).collect();
        EvalReport {
            architecture: sae.cfg.architecture.name().to_string(),
            d_in: sae.cfg.d_in,
            d_sae: sae.cfg.d_sae,
            hook_name: points.input.to_string(),
            hook_name_out: sae
                .cfg
                .architecture
                .is_transcoder()
                .then(|| points.output.to_string()),
            model_behavior_preservation: BehaviorPreservation {
                kl_div_score: (kl_abl - kl_sae) / kl_abl,
                kl_div_with_ablation: kl_abl,
                kl_div_with_sae: kl_sae,
            },
            model_performance_preservation: PerformancePreservation {
                ce_loss_score: (ce_abl - ce_sae) / (ce_abl - ce_clean),
                ce_loss_with_ablation: ce_abl,
                ce_loss_with_sae: ce_sae,
                ce_loss_without_sae: ce_clean,
                ce_loss_with_error_term: self.error_term.then(|| self.ce_err / n_ce),
            },
            reconstruction_quality: ReconstructionQuality {
                explained_variance,
                explained_variance_legacy: self.ev_legacy / n,
                mse,
                cossim: self.cossim / n,
            },
            shrinkage: Shrinkage {
                l2_norm_in: self.norm_in / n,
                l2_norm_out: self.norm_out / n,
                l2_ratio: self.ratio / n,
                relative_reconstruction_bias: self.rrb / self.rrb_batches as f64,
            },
            sparsity: Sparsity {
                l0: self.l0 / n,
                l1: self.l1 / n,
            },
            token_stats: TokenStats {
                contexts,
                context_size: p,
                total_tokens: (contexts * p) as u64,
                tokens_evaluated: self.tokens,
                ce_positions: self.ce_positions,
            },
            features: FeatureStats {
                dead: self.fired.iter().filter(|&&c| c == 0).count(),
                dense: density
                    .iter()
                    .filter(|&&d| d > opts.dense_threshold)
                    .count(),
                dense_threshold: opts.dense_threshold,
                log10_density_histogram: log10_histogram(&density, n, opts.histogram_bins),
                feature_density: density,
            },
        }
    }
}

/// `bins` equal bins of log10 density from `floor(log10(1 / n_tokens))` (the rarest a firing
/// latent can be) to 0, over the latents with a non-zero density.
fn log10_histogram(density: &[f64], n_tokens: f64, bins: usize) -> Histogram {
    let lo = (1.0 / n_tokens).log10().floor();
    let width = -lo / bins as f64;
    let edges = (0..=bins).map(|i| lo + width * i as f64).collect();
    let mut counts = vec![0u64; bins];
    for &d in density.iter().filter(|&&d| d > 0.0) {
        let i = ((d.log10() - lo) / width).floor() as usize;
        counts[i.min(bins - 1)] += 1;
    }
    Histogram { edges, counts }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_puts_each_density_in_its_bin() {
        // 1000 tokens: the range is [-3, 0] in 3 bins of width 1.
        let h = log10_histogram(&[0.0, 0.001, 0.005, 0.05, 1.0, 0.5], 1000.0, 3);
        assert_eq!(h.edges, vec![-3.0, -2.0, -1.0, 0.0]);
        assert_eq!(h.counts, vec![2, 1, 2]);
    }

    #[test]
    fn logsumexp_is_stable() {
        let v = logsumexp(&[1000.0, 1000.0]);
        assert!((v - (1000.0 + 2f64.ln())).abs() < 1e-9, "{v}");
    }
}
