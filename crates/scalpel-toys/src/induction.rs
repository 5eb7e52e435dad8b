//! Induction heads (Olsson et al. 2022, "In-context Learning and Induction Heads"; Elhage et al.
//! 2021, "A Mathematical Framework for Transformer Circuits").
//!
//! A two-layer attention-only transformer learns sequences made of a random segment followed by
//! the same segment again (evaluated on a random half repeated, `2·half` tokens; trained on
//! segments of varying length, see [`training_sequences`]). The first half cannot be predicted (loss ≈ ln vocab); the second half can, by
//! an induction circuit: a layer-0 previous-token head writes "the token before me was A" into
//! each position, and a layer-1 head whose keys read that (K-composition) attends from a repeated
//! A to the token after the earlier A and copies it. The circuit forms abruptly (the phase
//! change): the induction score and the second-half loss jump together.
//!
//! Everything is measured on the core [`Model`] through hook points: patterns from
//! `blocks.{l}.attn.hook_pattern`, ablations by replacing one head's slice of
//! `blocks.{l}.attn.hook_z`, and composition scores from the weights.
//!
//! Positions: a sequence has `L = 2·half` tokens; position `t` predicts token `t + 1`. The
//! *first-half* loss is over positions `0..=half−2` (targets inside the random half, not
//! predictable); the *second-half* (in-context) loss is over positions `half−1..=2·half−2`
//! (targets in the repeated half). Position `half−1` predicts the first repeated token, which a
//! model can find from position alone (attend to position 0): it belongs to the second half by
//! its target, as the definition says.

pub mod report;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use scalpel_core::{BlockHook, HookPoint, Hooks};
use scalpel_models::config::Config;
use scalpel_models::transformer::Model;
use serde::{Deserialize, Serialize};

use crate::optim::AdamWConfig;
use crate::transformer::{normals, per_row_loss, Init, Trainable};
use crate::{checkpoint, Result, ToyError};

/// Settings of an induction-head run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InductionConfig {
    /// Vocabulary size; tokens are drawn uniformly from it.
    pub vocab: usize,
    /// Length of the random half; sequences are `2·half` tokens long.
    pub half: usize,
    /// Shortest repeated segment in training sequences (segments are `min_segment..=half` long,
    /// see [`training_sequences`]); `half` trains on the evaluation format alone, which a
    /// positional shortcut solves.
    pub min_segment: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_model: usize,
    /// Standard deviation of the initial token embedding. Large (1) against small positions
    /// (0.02): the residual stream starts out carrying token identity, and the positional
    /// shortcuts a repeated-sequence task invites stay slow to learn (see `training_sequences`).
    pub embed_std: f64,
    /// Standard deviation of the initial positional embedding.
    pub pos_std: f64,
    /// Sequences per training step (fresh ones every step).
    pub batch: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub steps: usize,
    pub seed: u64,
    /// Sequences in the fixed held-out evaluation batch.
    pub eval_batch: usize,
    /// Evaluate losses and attention scores every this many steps.
    pub eval_every: usize,
    /// Save a checkpoint every this many steps (a multiple of `eval_every`).
    pub checkpoint_every: usize,
}

impl Default for InductionConfig {
    fn default() -> Self {
        InductionConfig {
            vocab: 64,
            half: 16,
            min_segment: 4,
            n_layers: 2,
            n_heads: 2,
            d_model: 64,
            embed_std: 1.0,
            pos_std: 0.02,
            batch: 64,
            lr: 1e-3,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            steps: 3000,
            seed: 0,
            eval_batch: 256,
            eval_every: 50,
            checkpoint_every: 500,
        }
    }
}

impl InductionConfig {
    /// Rejects settings that cannot run, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ToyError::Config(m));
        if self.vocab < 2 {
            return bad(format!("vocab must be at least 2, got {}", self.vocab));
        }
        if self.half < 2 {
            return bad(format!("half must be at least 2, got {}", self.half));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.embed_std) || !positive(self.pos_std) {
            return bad("embed_std and pos_std must be positive".into());
        }
        if self.min_segment == 0 || self.min_segment > self.half {
            return bad(format!(
                "min_segment must lie in 1..=half ({}), got {}",
                self.half, self.min_segment
            ));
        }
        if self.n_layers == 0 {
            return bad("n_layers must be positive".into());
        }
        if self.n_heads == 0 {
            return bad("n_heads must be positive".into());
        }
        if self.d_model == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "d_model ({}) must be a positive multiple of n_heads ({})",
                self.d_model, self.n_heads
            ));
        }
        for (name, v) in [
            ("batch", self.batch),
            ("steps", self.steps),
            ("eval_batch", self.eval_batch),
            ("eval_every", self.eval_every),
            ("checkpoint_every", self.checkpoint_every),
        ] {
            if v == 0 {
                return bad(format!("{name} must be positive"));
            }
        }
        checkpoint::check_cadence(self.eval_every, self.checkpoint_every)?;
        self.adam().validate()
    }

    fn adam(&self) -> AdamWConfig {
        AdamWConfig::new(self.lr, self.beta1, self.beta2, self.weight_decay)
    }

    /// Sequence length `2·half`.
    pub fn seq_len(&self) -> usize {
        2 * self.half
    }

    /// The transformer: attention-only, LayerNorm, learned positions, biases, untied, final norm.
    pub fn model_config(&self) -> Config {
        Config::toy(
            self.n_layers,
            self.d_model,
            self.n_heads,
            self.vocab,
            self.seq_len(),
            true,
        )
    }

    /// Builds the model from the seed with its optimiser: embeddings N(0, 0.02²), other matrices
    /// N(0, 1/fan_in), biases 0, normaliser weights 1.
    pub fn build(&self) -> Result<Trainable> {
        let (e, p) = (self.embed_std, self.pos_std);
        Trainable::new(
            self.model_config(),
            self.seed,
            move |name, shape| init_rule(name, shape, e, p),
            self.adam(),
        )
    }

    /// The training batch of `step` (0-based), from [`training_sequences`]: it depends only on
    /// the seed and the step, so a resumed run sees the same data.
    pub fn train_batch(&self, step: usize) -> Vec<u32> {
        let seed = mix(self.seed, step as u64 + 1);
        training_sequences(self.vocab, self.half, self.min_segment, self.batch, seed)
    }

    /// The fixed held-out evaluation batch, `[eval_batch, 2·half]` (its own seed stream).
    pub fn eval_tokens(&self) -> Result<Tensor> {
        let data = repeated_sequences(self.vocab, self.half, self.eval_batch, mix(self.seed, 0));
        Ok(Tensor::from_vec(
            data,
            (self.eval_batch, self.seq_len()),
            &Device::Cpu,
        )?)
    }
}

/// The initialisation of [`InductionConfig::build`].
fn init_rule(name: &str, shape: &[usize], embed_std: f64, pos_std: f64) -> Init {
    if name.ends_with(".b") {
        Init::Zeros
    } else if shape.len() == 1 {
        Init::Ones
    } else if name == "embed.w" {
        Init::Normal(embed_std)
    } else if name == "pos_embed.w" {
        Init::Normal(pos_std)
    } else {
        Init::Normal(1.0 / (shape[1] as f64).sqrt())
    }
}

/// SplitMix64 of `seed` and `k`: independent, reproducible streams.
fn mix(seed: u64, k: u64) -> u64 {
    let mut z = seed
        .wrapping_add(0x9e37_79b9_7f4a_7c15_u64.wrapping_mul(k.wrapping_add(1)))
        .wrapping_add(0x6a09_e667_f3bc_c909);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` rows of a random half (uniform over `vocab`) followed by itself, flattened `[n · 2·half]`.
pub fn repeated_sequences(vocab: usize, half: usize, n: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n * 2 * half);
    for _ in 0..n {
        let row: Vec<u32> = (0..half).map(|_| rng.gen_range(0..vocab as u32)).collect();
        out.extend_from_slice(&row);
        out.extend_from_slice(&row);
    }
    out
}

/// `n` training rows of `2·half` tokens: `2·(half − k)` random filler tokens, then a random
/// segment of length `k` (drawn per row uniformly from `min_segment..=half`) twice.
///
/// Why not always `k = half` (the evaluation format): with learned positions and a fixed period,
/// "token `i + 1` equals token `i − (half − 1)`" holds in every sequence, and a single layer-0
/// head learns to attend there *by position* within ~100 steps. That head has a perfect
/// induction score and solves the task without any induction circuit (a one-layer model does
/// it too). With the repeat's position varying per row only content-based induction works; the
/// evaluation batch ([`repeated_sequences`]) is the `k = half` case. (Repeating the segment
/// cyclically instead opens other shortcuts: the model then detects the period.)
pub fn training_sequences(
    vocab: usize,
    half: usize,
    min_segment: usize,
    n: usize,
    seed: u64,
) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let len = 2 * half;
    let mut out = Vec::with_capacity(n * len);
    for _ in 0..n {
        let row0 = out.len();
        for _ in 0..len {
            out.push(rng.gen_range(0..vocab as u32));
        }
        // A segment of length k copied from [a, a + k) to [b, b + k), b ≥ a + k: the distance
        // between the copies varies from k to 2·half − k, so no fixed positional offset
        // predicts the repeat; only matching content (induction) does.
        let k = rng.gen_range(min_segment.clamp(1, half)..=half);
        let a = rng.gen_range(0..=len - 2 * k);
        let b = rng.gen_range(a + k..=len - k);
        out.copy_within(row0 + a..row0 + a + k, row0 + b);
    }
    out
}

/// Next-token targets of flattened rows of length `seq`: token `t + 1` at position `t`, none at
/// the last position.
pub fn next_token_targets(tokens: &[u32], seq: usize) -> Vec<Option<u32>> {
    tokens
        .chunks_exact(seq)
        .flat_map(|row| (0..seq).map(move |t| row.get(t + 1).copied()))
        .collect()
}

/// Mean next-token losses of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Losses {
    /// Over every position `0..=2·half−2`.
    pub loss: f64,
    /// Over positions `0..=half−2` (targets in the random half).
    pub first_half: f64,
    /// Over positions `half−1..=2·half−2` (targets in the repeated half): the in-context loss.
    pub second_half: f64,
}

/// The losses of logits `[b, 2·half, vocab]` on `tokens` `[b, 2·half]`.
pub fn split_losses(logits: &Tensor, tokens: &Tensor, half: usize) -> Result<Losses> {
    let (b, p) = tokens.dims2()?;
    if p != 2 * half {
        return Err(ToyError::Config(format!(
            "sequences of {p} tokens, expected 2·half = {}",
            2 * half
        )));
    }
    let ids = tokens.flatten_all()?.to_vec1::<u32>()?;
    // Rows for positions 0..p−1 of every sequence, with their targets.
    let logits = logits.narrow(1, 0, p - 1)?.contiguous()?;
    let targets: Vec<u32> = ids.chunks_exact(p).flat_map(|r| r[1..].to_vec()).collect();
    let per = per_row_loss(&logits, &targets)?; // [b·(p−1)]
    let (mut all, mut first, mut second) = (0.0, 0.0, 0.0);
    for row in per.chunks_exact(p - 1) {
        for (t, &l) in row.iter().enumerate() {
            all += l;
            if t + 1 < half {
                first += l;
            } else {
                second += l;
            }
        }
    }
    Ok(Losses {
        loss: all / (b * (p - 1)) as f64,
        first_half: first / (b * (half - 1)) as f64,
        second_half: second / (b * half) as f64,
    })
}

pub use scalpel_circuits::heads::{chance_scores, induction_scores, prev_token_scores};

/// One evaluation point of a run, on the held-out batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub step: usize,
    pub loss: f64,
    pub first_half_loss: f64,
    pub second_half_loss: f64,
    /// `[layer][head]`
    pub prev_token_scores: Vec<Vec<f64>>,
    /// `[layer][head]`
    pub induction_scores: Vec<Vec<f64>>,
}

/// Losses and per-head scores of `model` on `tokens` `[b, 2·half]` (one forward, caching the
/// patterns).
pub fn evaluate(model: &Model, tokens: &Tensor, half: usize, step: usize) -> Result<Point> {
    let (logits, cache) = model.run_with_cache(tokens, |hp| {
        matches!(hp, HookPoint::Block(_, BlockHook::Pattern))
    })?;
    let losses = split_losses(&logits, tokens, half)?;
    let mut prev = Vec::new();
    let mut ind = Vec::new();
    for l in 0..model.config().n_layers {
        let pat = cache
            .get(HookPoint::Block(l, BlockHook::Pattern))
            .ok_or_else(|| ToyError::Config(format!("no pattern cached for layer {l}")))?;
        prev.push(prev_token_scores(pat)?);
        ind.push(induction_scores(pat, half)?);
    }
    Ok(Point {
        step,
        loss: losses.loss,
        first_half_loss: losses.first_half,
        second_half_loss: losses.second_half,
        prev_token_scores: prev,
        induction_scores: ind,
    })
}

/// When the phase change happened.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PhaseChange {
    /// First evaluated step whose second-half loss is below `ln(vocab)/2`.
    pub loss_step: Option<usize>,
    /// First evaluated step where some head's induction score exceeds 0.5.
    pub induction_step: Option<usize>,
}

/// The phase-change steps of a run's evaluation points.
pub fn phase_change(points: &[Point], vocab: usize) -> PhaseChange {
    let threshold = (vocab as f64).ln() / 2.0;
    let max_ind = |p: &Point| {
        p.induction_scores
            .iter()
            .flatten()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max)
    };
    PhaseChange {
        loss_step: points
            .iter()
            .find(|p| p.second_half_loss < threshold)
            .map(|p| p.step),
        induction_step: points.iter().find(|p| max_ind(p) > 0.5).map(|p| p.step),
    }
}

/// How a head is knocked out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Ablation {
    /// Its slice of `hook_z` set to 0 (its output is then only the shared output bias).
    Zero,
    /// Its slice of `hook_z` replaced, at every position, by its mean over the batch at that
    /// position.
    Mean,
}

/// Losses of `model` on `tokens` `[b, 2·half]` with head `head` of layer `layer` ablated
/// through `blocks.{layer}.attn.hook_z`.
pub fn ablate_head(
    model: &Model,
    layer: usize,
    head: usize,
    how: Ablation,
    tokens: &Tensor,
    half: usize,
) -> Result<Losses> {
    let c = model.config();
    if layer >= c.n_layers || head >= c.n_heads {
        return Err(ToyError::Config(format!(
            "no head {layer}.{head} in a model of {} layers × {} heads",
            c.n_layers, c.n_heads
        )));
    }
    let h = c.n_heads;
    let mut hooks = Hooks::new().with_hook(HookPoint::Block(layer, BlockHook::Z), move |z, _| {
        // z: [b, p, h, dh]; keep = 1 except at `head`.
        let keep: Vec<f32> = (0..h).map(|i| if i == head { 0.0 } else { 1.0 }).collect();
        let keep = Tensor::from_vec(keep, (1, 1, h, 1), z.device())?;
        let kept = z.broadcast_mul(&keep)?;
        Ok(Some(match how {
            Ablation::Zero => kept,
            Ablation::Mean => {
                let drop = keep.affine(-1.0, 1.0)?;
                let mean = z.mean_keepdim(0)?.broadcast_mul(&drop)?; // [1, p, h, dh]
                kept.broadcast_add(&mean)?
            }
        }))
    });
    let logits = model.run_with_hooks(tokens, &mut hooks)?;
    split_losses(&logits, tokens, half)
}

/// The induction scores of layer `reader`'s heads when head `head` of layer `writer` is
/// zero-ablated at `hook_z`: the causal side of composition. An induction head whose score
/// collapses without a layer-0 previous-token head reads that head's output.
pub fn induction_scores_without(
    model: &Model,
    writer: usize,
    head: usize,
    reader: usize,
    tokens: &Tensor,
    half: usize,
) -> Result<Vec<f64>> {
    let c = model.config();
    if writer >= reader || reader >= c.n_layers || head >= c.n_heads {
        return Err(ToyError::Config(format!(
            "need writer < reader < {} layers and head < {} (got {writer}, {reader}, {head})",
            c.n_layers, c.n_heads
        )));
    }
    let h = c.n_heads;
    let mut hooks = Hooks::new()
        .with_hook(HookPoint::Block(writer, BlockHook::Z), move |z, _| {
            let keep: Vec<f32> = (0..h).map(|i| if i == head { 0.0 } else { 1.0 }).collect();
            let keep = Tensor::from_vec(keep, (1, 1, h, 1), z.device())?;
            Ok(Some(z.broadcast_mul(&keep)?))
        })
        .with_cache_points([HookPoint::Block(reader, BlockHook::Pattern)]);
    model.run_with_hooks(tokens, &mut hooks)?;
    let cache = hooks.take_cache();
    let pat = cache
        .get(HookPoint::Block(reader, BlockHook::Pattern))
        .ok_or_else(|| ToyError::Config(format!("no pattern cached for layer {reader}")))?;
    Ok(induction_scores(pat, half)?)
}

/// One row of the ablation table.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AblationRow {
    pub layer: usize,
    pub head: usize,
    pub losses: Losses,
    /// Second-half loss minus the clean second-half loss.
    pub delta_second_half: f64,
}

/// Every head ablated in turn.
pub fn ablation_table(
    model: &Model,
    tokens: &Tensor,
    half: usize,
    how: Ablation,
    clean: &Losses,
) -> Result<Vec<AblationRow>> {
    let c = model.config();
    let mut rows = Vec::new();
    for layer in 0..c.n_layers {
        for head in 0..c.n_heads {
            let losses = ablate_head(model, layer, head, how, tokens, half)?;
            rows.push(AblationRow {
                layer,
                head,
                losses,
                delta_second_half: losses.second_half - clean.second_half,
            });
        }
    }
    Ok(rows)
}

/// One head's matrices in TransformerLens's row-vector convention (`x [1, d]` times them), in
/// f64: `w_q`, `w_k`, `w_v` `[d, dh]`, `w_o` `[dh, d]`.
///
/// Our weights are stored `[out, in]`, so `W_Q = q.w[h·dh..(h+1)·dh, :]ᵀ` and
/// `W_O = o.w[:, h·dh..(h+1)·dh]ᵀ`. The block's `ln1` weight is folded into the reading matrices
/// (`diag(ln1.w) W`), and `W_O` is centred over `d` (the next LayerNorm removes the mean anyway),
/// as TransformerLens's weight processing does; biases and the normaliser's scale are left out.
pub struct HeadWeights {
    pub w_q: Tensor,
    pub w_k: Tensor,
    pub w_v: Tensor,
    pub w_o: Tensor,
}

impl HeadWeights {
    /// Head `head` of layer `layer`.
    pub fn new(model: &Model, layer: usize, head: usize) -> Result<Self> {
        let c = model.config();
        if layer >= c.n_layers || head >= c.n_heads {
            return Err(ToyError::Config(format!(
                "no head {layer}.{head} in a model of {} layers × {} heads",
                c.n_layers, c.n_heads
            )));
        }
        let dh = c.d_head;
        let kv_head = head / c.n_rep();
        let blk = &model.blocks()[layer];
        let f = |t: &Tensor| t.to_dtype(DType::F64);
        let read = |w: &Tensor, h: usize| -> Result<Tensor> {
            let w = f(&w.narrow(0, h * dh, dh)?.t()?)?; // [d, dh]
            Ok(match &blk.ln1 {
                Some(ln) => w.broadcast_mul(&f(&ln.w)?.unsqueeze(1)?)?,
                None => w,
            })
        };
        let w_o = f(&blk.attn.o.w.narrow(1, head * dh, dh)?.t()?)?; // [dh, d]
        let w_o = w_o.broadcast_sub(&w_o.mean_keepdim(1)?)?;
        Ok(HeadWeights {
            w_q: read(&blk.attn.q.w, head)?,
            w_k: read(&blk.attn.k.w, kv_head)?,
            w_v: read(&blk.attn.v.w, kv_head)?,
            w_o,
        })
    }

    /// `W_QK = W_Q W_Kᵀ` `[d, d]`: the score is `x_q W_QK x_kᵀ`.
    pub fn qk(&self) -> Result<Tensor> {
        Ok(self.w_q.matmul(&self.w_k.t()?)?)
    }

    /// `W_OV = W_V W_O` `[d, d]`: the head writes `x_k W_OV` (pattern-weighted).
    pub fn ov(&self) -> Result<Tensor> {
        Ok(self.w_v.matmul(&self.w_o)?)
    }
}

/// `‖A B‖_F / (‖A‖_F ‖B‖_F)`.
pub fn composition_score(a: &Tensor, b: &Tensor) -> Result<f64> {
    let n = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
    Ok(n(&a.matmul(b)?)? / (n(a)? * n(b)?).max(f64::MIN_POSITIVE))
}

/// The three composition scores of a writer head (earlier layer, `W_OV^w`) into a reader head
/// (later layer), `(q, k, v)`:
/// - Q: `‖W_OV^w W_QK^r‖` — the writer's output read by the reader's queries;
/// - K: `‖W_OV^w W_QK^rᵀ‖` — read by the keys (the score is `x_q W_QK (x_k W_OV)ᵀ =
///   x_q W_QK W_OVᵀ x_kᵀ`, whose norm equals that of `W_OV W_QKᵀ`);
/// - V: `‖W_OV^w W_OV^r‖` — read by the values;
///
/// each divided by the product of the two norms (TransformerLens's `composition_scores`).
pub fn composition_scores(writer: &HeadWeights, reader: &HeadWeights) -> Result<(f64, f64, f64)> {
    let ov = writer.ov()?;
    let qk = reader.qk()?;
    Ok((
        composition_score(&ov, &qk)?,
        composition_score(&ov, &qk.t()?)?,
        composition_score(&ov, &reader.ov()?)?,
    ))
}

/// Composition scores of every (reader, writer) head pair between two layers, with the baseline
/// of random matrices of the same shapes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Composition {
    pub writer_layer: usize,
    pub reader_layer: usize,
    /// `[reader head][writer head]`
    pub q: Vec<Vec<f64>>,
    pub k: Vec<Vec<f64>>,
    pub v: Vec<Vec<f64>>,
    /// Mean and standard deviation of the score of unrelated random heads (Gaussian `W_Q`,
    /// `W_K`, `W_V`, `W_O` of the same shapes; the same for Q, K and V composition).
    pub baseline_mean: f64,
    pub baseline_std: f64,
}

/// Q-, K- and V-composition of every head of `writer_layer` into every head of `reader_layer`.
pub fn composition(model: &Model, writer_layer: usize, reader_layer: usize) -> Result<Composition> {
    let c = model.config();
    if writer_layer >= reader_layer || reader_layer >= c.n_layers {
        return Err(ToyError::Config(format!(
            "composition needs writer layer < reader layer < {}, got {writer_layer} → {reader_layer}",
            c.n_layers
        )));
    }
    let writers: Vec<HeadWeights> = (0..c.n_heads)
        .map(|h| HeadWeights::new(model, writer_layer, h))
        .collect::<Result<_>>()?;
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..c.n_heads {
        let reader = HeadWeights::new(model, reader_layer, r)?;
        let (mut qr, mut kr, mut vr) = (Vec::new(), Vec::new(), Vec::new());
        for w in &writers {
            let (a, b, cc) = composition_scores(w, &reader)?;
            qr.push(a);
            kr.push(b);
            vr.push(cc);
        }
        q.push(qr);
        k.push(kr);
        v.push(vr);
    }
    let (baseline_mean, baseline_std) = random_composition_baseline(c.d_model, c.d_head, 32, 0)?;
    Ok(Composition {
        writer_layer,
        reader_layer,
        q,
        k,
        v,
        baseline_mean,
        baseline_std,
    })
}

/// Mean and standard deviation of `‖W_OV W_QKᵀ‖ / (‖W_OV‖ ‖W_QK‖)` for `samples` pairs of
/// independent Gaussian heads (`d_model`, `d_head`): what "no composition" looks like.
pub fn random_composition_baseline(
    d_model: usize,
    d_head: usize,
    samples: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    let g = |k: u64, r: usize, c: usize| -> Result<Tensor> {
        let data: Vec<f64> = normals(mix(seed, k), r * c, 1.0)
            .into_iter()
            .map(f64::from)
            .collect();
        Ok(Tensor::from_vec(data, (r, c), &Device::Cpu)?)
    };
    let mut scores = Vec::with_capacity(samples);
    for s in 0..samples as u64 {
        let head = |j: u64| -> Result<HeadWeights> {
            let k = 8 * s + 4 * j;
            Ok(HeadWeights {
                w_q: g(k, d_model, d_head)?,
                w_k: g(k + 1, d_model, d_head)?,
                w_v: g(k + 2, d_model, d_head)?,
                w_o: g(k + 3, d_head, d_model)?,
            })
        };
        let (_, kc, _) = composition_scores(&head(0)?, &head(1)?)?;
        scores.push(kc);
    }
    let n = samples.max(1) as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let var = scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
    Ok((mean, var.sqrt()))
}

/// Copying score of each head of `layer`: the fraction of tokens whose own logit is the largest
/// in their row of the full OV circuit `W_E W_OV W_U` `[vocab, vocab]` (embedding centred,
/// `ln1` and `ln_final` weights folded in). A copying head raises the logit of the token it
/// attends to.
pub fn copying_scores(model: &Model, layer: usize) -> Result<Vec<f64>> {
    let c = model.config();
    let f = |t: &Tensor| t.to_dtype(DType::F64);
    let w_e = f(model.w_e())?;
    let w_e = w_e.broadcast_sub(&w_e.mean_keepdim(1)?)?; // [v, d]
    let mut w_u = f(&model.w_u_rows().t()?)?; // [d, v]
    if let Some(ln) = model.ln_final() {
        w_u = w_u.broadcast_mul(&f(&ln.w)?.unsqueeze(1)?)?;
    }
    (0..c.n_heads)
        .map(|h| {
            let hw = HeadWeights::new(model, layer, h)?;
            let full = w_e.matmul(&hw.ov()?)?.matmul(&w_u)?; // [v, v]
            let best = full.argmax(1)?.to_vec1::<u32>()?;
            let hits = best
                .iter()
                .enumerate()
                .filter(|&(i, &j)| i == j as usize)
                .count();
            Ok(hits as f64 / c.d_vocab as f64)
        })
        .collect()
}

/// The mechanism of a trained model, measured on the evaluation batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub clean: Point,
    /// Chance previous-token and induction scores (uniform causal attention).
    pub chance_prev_token: f64,
    pub chance_induction: f64,
    /// Layer-0 head with the highest previous-token score.
    pub prev_token_head: (usize, usize),
    /// Head (in a layer ≥ 1 when there is one) with the highest induction score.
    pub induction_head: (usize, usize),
    /// Every head zero-ablated in turn.
    pub ablation: Vec<AblationRow>,
    /// `[layer][head]`
    pub copying_scores: Vec<Vec<f64>>,
    /// Layer 0 → layer 1 (absent with one layer).
    pub composition: Option<Composition>,
    /// The induction head's score with the previous-token head zero-ablated (absent with one
    /// layer): composition seen causally.
    pub induction_score_without_prev_token_head: Option<f64>,
}

/// Measures `model` (trained with `cfg`) on the evaluation batch.
pub fn analyse(cfg: &InductionConfig, model: &Model, step: usize) -> Result<Analysis> {
    let tokens = cfg.eval_tokens()?;
    let clean = evaluate(model, &tokens, cfg.half, step)?;
    let argmax = |v: &[f64]| {
        v.iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i)
    };
    let prev_token_head = (0, argmax(&clean.prev_token_scores[0]));
    let first = usize::from(cfg.n_layers > 1);
    let induction_head = (first..cfg.n_layers)
        .map(|l| (l, argmax(&clean.induction_scores[l])))
        .max_by(|a, b| {
            clean.induction_scores[a.0][a.1].total_cmp(&clean.induction_scores[b.0][b.1])
        })
        .unwrap_or((0, 0));
    let losses = Losses {
        loss: clean.loss,
        first_half: clean.first_half_loss,
        second_half: clean.second_half_loss,
    };
    let ablation = ablation_table(model, &tokens, cfg.half, Ablation::Zero, &losses)?;
    let copying_scores = (0..cfg.n_layers)
        .map(|l| copying_scores(model, l))
        .collect::<Result<_>>()?;
    let composition = if cfg.n_layers > 1 {
        Some(composition(model, 0, 1)?)
    } else {
        None
    };
    let induction_score_without_prev_token_head = if cfg.n_layers > 1 {
        let scores = induction_scores_without(
            model,
            0,
            prev_token_head.1,
            induction_head.0,
            &tokens,
            cfg.half,
        )?;
        Some(scores[induction_head.1])
    } else {
        None
    };
    let (chance_prev_token, chance_induction) = chance_scores(cfg.half);
    Ok(Analysis {
        induction_score_without_prev_token_head,
        clean,
        chance_prev_token,
        chance_induction,
        prev_token_head,
        induction_head,
        ablation,
        copying_scores,
        composition,
    })
}

/// What a run leaves behind.
pub struct Run {
    pub model: Trainable,
    pub points: Vec<Point>,
    pub phase: PhaseChange,
    /// Checkpoint files in step order.
    pub checkpoints: Vec<(usize, PathBuf)>,
}

/// Callbacks while training: `(step, train loss)` after each step.
pub type OnStep<'a> = &'a mut dyn FnMut(usize, f64);

/// Trains from the seed (or resumes from the newest checkpoint in `dir`), evaluating every
/// `eval_every` steps (and at step 0) and checkpointing every `checkpoint_every` into `dir`
/// (none when `dir` is `None`). A resumed run must have been made with the same config.
pub fn train(cfg: &InductionConfig, dir: Option<&Path>, on_step: OnStep) -> Result<Run> {
    cfg.validate()?;
    let eval = cfg.eval_tokens()?;
    let mut model = cfg.build()?;
    let mut points = Vec::new();
    let mut checkpoints = Vec::new();
    let mut start = 0;
    if let Some(dir) = dir {
        checkpoints = list_checkpoints(dir)?;
        let extend = |saved: InductionConfig| InductionConfig {
            steps: cfg.steps,
            ..saved
        };
        if let Some((step, saved)) = checkpoint::resume(dir, cfg, extend, &mut model.opt)? {
            points = saved;
            start = step;
        }
    }
    if start == 0 {
        points.push(evaluate(&model.model, &eval, cfg.half, 0)?);
    }
    let seq = cfg.seq_len();
    for step in start..cfg.steps {
        let tokens = cfg.train_batch(step);
        let targets = next_token_targets(&tokens, seq);
        let loss = model.train_step(&tokens, cfg.batch, &targets, cfg.lr)?;
        let done = step + 1;
        on_step(done, loss);
        if done % cfg.eval_every == 0 || done == cfg.steps {
            points.push(evaluate(&model.model, &eval, cfg.half, done)?);
            if let Some(dir) = dir {
                if done % cfg.checkpoint_every == 0 || done == cfg.steps {
                    let path = dir.join(format!("checkpoint-{done:07}.safetensors"));
                    let meta = serde_json::json!({"config": cfg, "step": done, "points": points});
                    checkpoint::save(&path, &model.opt, &meta)?;
                    checkpoints.push((done, path));
                }
            }
        }
    }
    let phase = phase_change(&points, cfg.vocab);
    Ok(Run {
        model,
        points,
        phase,
        checkpoints,
    })
}

/// The checkpoints in `dir`, by step.
pub fn list_checkpoints(dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    checkpoint::list(dir)
}

/// Loads an induction checkpoint into a fresh model, with its config.
pub fn load(path: &Path) -> Result<(InductionConfig, Trainable)> {
    let ck = checkpoint::load(path)?;
    let cfg: InductionConfig =
        serde_json::from_value(ck.meta["config"].clone()).map_err(|e| ToyError::File {
            path: path.display().to_string(),
            msg: format!("not an induction checkpoint: {e}"),
        })?;
    cfg.validate()?;
    let mut model = cfg.build()?;
    model.set_params(&ck.params())?;
    Ok((cfg, model))
}
