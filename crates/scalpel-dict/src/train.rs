//! A sparse-dictionary trainer for the CPU that exploits sparsity: the encoder's dense product is
//! one GEMM over the batch, and everything after it (decoding, the backward pass, the decoder's
//! gradient) touches only the latents that fired on each token (SAELens runs dense matmuls both
//! ways).
//!
//! One trainer covers every activation SAELens trains, for sparse autoencoders (`d_out = d_in`,
//! `b_dec` subtracted from the input) and transcoders (read `x`, reconstruct another activation
//! `y` of width `d_out`, optionally plus a linear skip `x W_skipᵀ`):
//! - [`Activation::Relu`] ("standard"): `f = relu(pre)`, with the L1 penalty weighted by decoder
//!   norms, `λ (1/n) Σ_t Σ_j f_tj ‖W_dec[j]‖` (SAELens's `StandardTrainingSAE`); decoder rows
//!   start at norm 0.1 and are free.
//! - [`Activation::TopK`]: the `k` largest positive pre-activations per token (Gao et al. 2024,
//!   <https://arxiv.org/abs/2406.04093>): unit-norm decoder rows (the gradient's component along
//!   each row is removed before the step), and the AuxK loss where the `k_aux` largest *dead*
//!   latents reconstruct the detached residual, weight `aux_coef`.
//! - [`Activation::BatchTopK`]: the `n·k` largest positive pre-activations over a batch of `n`
//!   tokens (Bussmann et al. 2024); a running threshold (EMA of the smallest kept activation, as
//!   SAELens) becomes a JumpReLU threshold when the dictionary is saved.
//! - [`Activation::JumpRelu`]: `f = pre · H(pre − θ)` with a straight-through estimator of
//!   bandwidth `ε` for `θ` (Rajamanoharan et al. 2024): `∂f/∂θ ≈ −(θ/ε) K((pre−θ)/ε)` and the L0
//!   penalty `λ (1/n) Σ_t Σ_j H(pre_tj − θ_j)` with `∂/∂θ ≈ −(λ/(nε)) K(·)`, `K` the rectangle
//!   `1{|u| < 1/2}` (SAELens's "step" mode; no gradient reaches the pre-activations through the
//!   estimator, as DeepMind's and SAELens's default).
//!
//! Loss per batch of `n` tokens: `L = (1/n) Σ_t ‖y_t − ŷ_t‖² + aux_coef · AuxK + sparsity`,
//! minimised with AdamW (decoupled weight decay on the weight matrices only).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::synthetic::gaussian;
use crate::{Architecture, DictConfig, DictError, Metadata, Result, Sae};
use scalpel_core::gemm::matmul;

/// How latents are switched on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// ReLU + L1 ("standard").
    Relu,
    /// The `k` largest per token.
    TopK,
    /// The `n·k` largest over a batch of `n` tokens; saved as JumpReLU.
    BatchTopK,
    /// `pre · H(pre − θ)` with a learned `θ` per latent.
    JumpRelu,
}

impl Activation {
    const ALL: [(&'static str, Activation); 4] = [
        ("relu", Activation::Relu),
        ("topk", Activation::TopK),
        ("batchtopk", Activation::BatchTopK),
        ("jumprelu", Activation::JumpRelu),
    ];

    /// The name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .map_or("?", |(n, _)| n)
    }

    /// Parses a name (`standard` is accepted for `relu`).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.to_ascii_lowercase();
        if s == "standard" {
            return Some(Activation::Relu);
        }
        Self::ALL.iter().find(|(n, _)| *n == s).map(|(_, a)| *a)
    }

    fn uses_k(self) -> bool {
        matches!(self, Activation::TopK | Activation::BatchTopK)
    }
}

/// What is trained: the activation and the widths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DictShape {
    pub activation: Activation,
    pub d_in: usize,
    pub d_sae: usize,
    /// Latents per token for `topk` and (on average) `batchtopk`; ignored otherwise.
    #[serde(default)]
    pub k: usize,
    /// `Some(width)` for a transcoder, whose target is a different activation.
    #[serde(default)]
    pub d_out: Option<usize>,
    /// A transcoder's linear skip connection.
    #[serde(default)]
    pub skip: bool,
}

impl DictShape {
    /// A sparse autoencoder.
    pub fn sae(activation: Activation, d_in: usize, d_sae: usize, k: usize) -> Self {
        DictShape {
            activation,
            d_in,
            d_sae,
            k,
            d_out: None,
            skip: false,
        }
    }

    /// A transcoder from width `d_in` to `d_out`.
    pub fn transcoder(
        activation: Activation,
        d_in: usize,
        d_sae: usize,
        k: usize,
        d_out: usize,
        skip: bool,
    ) -> Self {
        DictShape {
            activation,
            d_in,
            d_sae,
            k,
            d_out: Some(d_out),
            skip,
        }
    }

    /// The target's width.
    pub fn d_out(&self) -> usize {
        self.d_out.unwrap_or(self.d_in)
    }

    pub fn is_transcoder(&self) -> bool {
        self.d_out.is_some()
    }

    /// The SAELens architecture the trained dictionary is saved as.
    pub fn architecture(&self) -> Architecture {
        use Activation::*;
        match (self.activation, self.is_transcoder(), self.skip) {
            (Relu, false, _) => Architecture::Standard,
            (TopK, false, _) => Architecture::Topk,
            (BatchTopK | JumpRelu, false, _) => Architecture::Jumprelu,
            (Relu, true, false) => Architecture::Transcoder,
            (Relu, true, true) => Architecture::SkipTranscoder,
            (TopK, true, false) => Architecture::TopkTranscoder,
            (TopK, true, true) => Architecture::TopkSkipTranscoder,
            (BatchTopK | JumpRelu, true, false) => Architecture::JumpreluTranscoder,
            (BatchTopK | JumpRelu, true, true) => Architecture::JumpreluSkipTranscoder,
        }
    }

    /// Checks the widths and `k`; errors name the field.
    pub fn validate(&self, source: &str) -> Result<()> {
        let err = |field: &str, reason: String| DictError::Config {
            source_name: source.to_string(),
            field: field.to_string(),
            reason,
        };
        for (field, v) in [("d_in", self.d_in), ("d_sae", self.d_sae)] {
            if v == 0 {
                return Err(err(field, "must be positive".into()));
            }
        }
        if self.d_out == Some(0) {
            return Err(err("d_out", "must be positive".into()));
        }
        if self.activation.uses_k() && (self.k == 0 || self.k > self.d_sae) {
            return Err(err(
                "k",
                format!(
                    "k = {} must be in 1..={} (d_sae) for {}",
                    self.k,
                    self.d_sae,
                    self.activation.name()
                ),
            ));
        }
        if self.skip && !self.is_transcoder() {
            return Err(err(
                "skip",
                "a skip connection needs a transcoder (set d_out)".into(),
            ));
        }
        Ok(())
    }
}

/// Optimiser and loss settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate (schedules scale it per step through [`Coefficients`]).
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// AdamW's decoupled weight decay on `W_enc`, `W_dec`, `W_skip`.
    pub weight_decay: f32,
    /// Dead latents used by AuxK per token (`topk`, `batchtopk`; Gao et al.: 512; SAELens and
    /// sparsify: d_in / 2). 0 disables AuxK.
    pub k_aux: usize,
    /// AuxK weight (Gao et al.: 1/32).
    pub aux_coef: f32,
    /// A latent is dead when it has not fired in this many tokens.
    pub dead_window: u64,
    /// The L1 coefficient (`relu`) or the L0 coefficient (`jumprelu`).
    pub sparsity_coef: f32,
    /// JumpReLU's straight-through bandwidth ε.
    pub bandwidth: f32,
    /// JumpReLU's initial threshold.
    pub init_threshold: f32,
    /// BatchTopK's threshold EMA rate.
    pub topk_threshold_lr: f32,
    /// TopK and BatchTopK: SAELens's parameterisation instead of Gao et al.'s unit-norm decoder:
    /// decoder rows start at norm 0.1 and are free, latents are ranked by `pre · ‖W_dec[j]‖`,
    /// and the norms are folded into the saved weights (unit rows, as SAELens saves).
    pub rescale_acts_by_decoder_norm: bool,
    /// Scale the whole gradient down to this global L2 norm when it is larger (SAELens always
    /// clips at 1.0); 0 disables clipping.
    pub clip_grad_norm: f32,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 3e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            k_aux: 256,
            aux_coef: 1.0 / 32.0,
            dead_window: 1_000_000,
            sparsity_coef: 1.0,
            bandwidth: 0.05,
            init_threshold: 0.01,
            topk_threshold_lr: 0.01,
            rescale_acts_by_decoder_norm: false,
            clip_grad_norm: 0.0,
        }
    }
}

impl TrainConfig {
    /// Checks every value's range; errors name the field.
    pub fn validate(&self, source: &str) -> Result<()> {
        let err = |field: &str, v: f32, want: &str| DictError::Config {
            source_name: source.to_string(),
            field: field.to_string(),
            reason: format!("{v} must be {want}"),
        };
        let positive = [
            ("lr", self.lr),
            ("eps", self.eps),
            ("bandwidth", self.bandwidth),
        ];
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return Err(err(field, v, "positive and finite"));
            }
        }
        let non_negative = [
            ("weight_decay", self.weight_decay),
            ("aux_coef", self.aux_coef),
            ("sparsity_coef", self.sparsity_coef),
            ("init_threshold", self.init_threshold),
            ("clip_grad_norm", self.clip_grad_norm),
        ];
        for (field, v) in non_negative {
            if !(v.is_finite() && v >= 0.0) {
                return Err(err(field, v, "non-negative and finite"));
            }
        }
        for (field, v) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(err(field, v, "in [0, 1)"));
            }
        }
        if !(self.topk_threshold_lr > 0.0 && self.topk_threshold_lr <= 1.0) {
            return Err(err(
                "topk_threshold_lr",
                self.topk_threshold_lr,
                "in (0, 1]",
            ));
        }
        Ok(())
    }
}

/// This step's learning rate and sparsity coefficient, after the run's schedules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefficients {
    pub lr: f32,
    pub sparsity: f32,
}

impl Coefficients {
    /// The config's peak values, unscheduled.
    pub fn of(train: &TrainConfig) -> Self {
        Coefficients {
            lr: train.lr,
            sparsity: train.sparsity_coef,
        }
    }
}

/// What one step (or one evaluation) measured on its batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// `(1/n) Σ_t ‖y_t − ŷ_t‖²`.
    pub mse: f64,
    /// AuxK loss before its weight (0 when no latent is dead).
    pub aux: f64,
    /// The sparsity penalty, coefficient included (0 for TopK and BatchTopK).
    pub sparsity_loss: f64,
    /// `mse + aux_coef · aux + sparsity_loss`, what the gradients are of.
    pub loss: f64,
    /// `1 − Σ‖y − ŷ‖² / Σ‖y − mean(y)‖²` over the batch.
    pub explained_variance: f64,
    /// Mean number of active latents per token.
    pub l0: f64,
    /// Latents dead at the start of the step.
    pub n_dead: usize,
}

/// The trainer's parameters (or gradients of the loss, in the same layout). Tensors an
/// architecture lacks are empty.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// `[d_sae, d_in]`: `W_enc` transposed, so a latent's encoder weights are contiguous.
    pub w_enc_t: Vec<f32>,
    pub b_enc: Vec<f32>,
    /// `[d_sae, d_out]`.
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// `[d_sae]` (JumpReLU).
    pub threshold: Vec<f32>,
    /// `[d_out, d_in]` (skip transcoders).
    pub w_skip: Vec<f32>,
}

/// The parameter names, in [`Params::get`]'s spelling.
pub const PARAM_NAMES: [&str; 6] = ["w_enc_t", "b_enc", "w_dec", "b_dec", "threshold", "w_skip"];

impl Params {
    fn zeros_like(p: &Params) -> Params {
        let z = |v: &Vec<f32>| vec![0f32; v.len()];
        Params {
            w_enc_t: z(&p.w_enc_t),
            b_enc: z(&p.b_enc),
            w_dec: z(&p.w_dec),
            b_dec: z(&p.b_dec),
            threshold: z(&p.threshold),
            w_skip: z(&p.w_skip),
        }
    }

    /// The parameter called `name` (see [`PARAM_NAMES`]).
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        Some(match name {
            "w_enc_t" => &self.w_enc_t,
            "b_enc" => &self.b_enc,
            "w_dec" => &self.w_dec,
            "b_dec" => &self.b_dec,
            "threshold" => &self.threshold,
            "w_skip" => &self.w_skip,
            _ => return None,
        })
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Vec<f32>> {
        Some(match name {
            "w_enc_t" => &mut self.w_enc_t,
            "b_enc" => &mut self.b_enc,
            "w_dec" => &mut self.w_dec,
            "b_dec" => &mut self.b_dec,
            "threshold" => &mut self.threshold,
            "w_skip" => &mut self.w_skip,
            _ => return None,
        })
    }

    fn all_mut(&mut self) -> [(&'static str, &mut Vec<f32>); 6] {
        [
            ("w_enc_t", &mut self.w_enc_t),
            ("b_enc", &mut self.b_enc),
            ("w_dec", &mut self.w_dec),
            ("b_dec", &mut self.b_dec),
            ("threshold", &mut self.threshold),
            ("w_skip", &mut self.w_skip),
        ]
    }

    fn all(&self) -> [(&'static str, &Vec<f32>); 6] {
        [
            ("w_enc_t", &self.w_enc_t),
            ("b_enc", &self.b_enc),
            ("w_dec", &self.w_dec),
            ("b_dec", &self.b_dec),
            ("threshold", &self.threshold),
            ("w_skip", &self.w_skip),
        ]
    }

    /// The first non-finite entry, as (name, index).
    fn first_non_finite(&self) -> Option<(&'static str, usize)> {
        self.first_beyond(f32::INFINITY)
    }

    /// The first entry that is not finite or has `|x| ≥ limit`, as (name, index).
    fn first_beyond(&self, limit: f32) -> Option<(&'static str, usize)> {
        self.all().into_iter().find_map(|(name, v)| {
            v.par_iter()
                .position_any(|x| x.is_nan() || x.abs() >= limit)
                .map(|i| (name, i))
        })
    }
}

/// Adam moments for one parameter.
#[derive(Debug, Clone, PartialEq)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Moments {
    fn new(len: usize) -> Self {
        Moments {
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }
}

/// Flags of [`Trainer::selection`].
pub const SELECTED_ACTIVE: u8 = ACTIVE;
pub const SELECTED_WINDOW: u8 = WINDOW;
pub const SELECTED_AUX: u8 = AUX;

/// Per-token entry flags.
const ACTIVE: u8 = 1;
/// JumpReLU: `|pre − θ| < ε/2`, where the straight-through estimator reaches `θ`.
const WINDOW: u8 = 2;
/// An AuxK latent.
const AUX: u8 = 4;

/// One token's forward pass.
struct TokenPass {
    /// (latent, activation or pre-activation, flags).
    entries: Vec<(u32, f32, u8)>,
    /// `dL/dŷ [d_out]`.
    dx: Vec<f32>,
    /// `dL/dê [d_out]` (AuxK), empty without.
    daux: Vec<f32>,
    sq_err: f64,
    aux_sq_err: f64,
    n_active: usize,
    /// `Σ_j f_j ‖W_dec[j]‖` (for the L1 penalty).
    weighted_l1: f64,
    /// The smallest positive activation kept (BatchTopK's threshold EMA).
    min_active: f32,
}

/// A whole batch's forward pass.
struct Forward {
    passes: Vec<TokenPass>,
    /// The encoder's input `[n, d_in]` (`x − b_dec` for an SAE, `x` for a transcoder).
    xin: Vec<f32>,
}

/// Trains one dictionary on batches of activations.
///
/// # Shapes
/// - inputs `x [n, d_in]`; a transcoder's targets `y [n, d_out]` (an SAE's target is `x`)
/// - parameters: see [`Params`]
#[derive(Debug, Clone)]
pub struct Trainer {
    pub shape: DictShape,
    pub train: TrainConfig,
    pub params: Params,
    /// BatchTopK's running threshold.
    pub topk_threshold: f64,
    /// Adam moments, in [`PARAM_NAMES`] order.
    moments: Vec<Moments>,
    /// Optimiser steps taken.
    pub steps: u64,
    /// Tokens trained on.
    pub tokens_seen: u64,
    /// `tokens_seen` at the end of the last step where each latent fired.
    last_fired: Vec<u64>,
    /// The pre-activation buffer `[n, d_sae]`, kept between steps: at batch 4096 and 9216
    /// latents it is 151 MB, and allocating it afresh each step costs a page fault per page.
    scratch: Scratch,
}

/// A reusable buffer; cloning a trainer gives the clone an empty one.
#[derive(Default)]
struct Scratch(std::sync::Mutex<Vec<f32>>);

impl Scratch {
    fn take(&self) -> Vec<f32> {
        self.0
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    fn put(&self, v: Vec<f32>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = v;
        }
    }
}

impl Clone for Scratch {
    fn clone(&self) -> Self {
        Scratch::default()
    }
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Scratch")
    }
}

impl Trainer {
    /// A fresh trainer from `seed`: random decoder rows (unit norm for TopK/BatchTopK, norm 0.1
    /// otherwise, as SAELens's `decoder_init_norm`), `W_enc = W_decᵀ` for an SAE (a transcoder's
    /// encoder gets its own random unit columns), zero biases (set `b_dec` with
    /// [`Trainer::set_b_dec`]), thresholds at `init_threshold`, a zero skip.
    pub fn new(shape: DictShape, train: TrainConfig, seed: u64) -> Result<Self> {
        shape.validate("dictionary")?;
        train.validate("training config")?;
        let (d_in, d_sae, d_out) = (shape.d_in, shape.d_sae, shape.d_out());
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w_dec: Vec<f32> = (0..d_sae * d_out).map(|_| gaussian(&mut rng)).collect();
        normalise_rows(&mut w_dec, d_out);
        let w_enc_t = if shape.is_transcoder() {
            let mut w: Vec<f32> = (0..d_sae * d_in).map(|_| gaussian(&mut rng)).collect();
            normalise_rows(&mut w, d_in);
            w
        } else {
            w_dec.clone()
        };
        let unit = unit_decoder(&shape, &train);
        if !unit {
            w_dec.iter_mut().for_each(|v| *v *= 0.1);
        }
        let w_enc_t = if !unit && !shape.is_transcoder() {
            w_dec.clone()
        } else {
            w_enc_t
        };
        let threshold = if shape.activation == Activation::JumpRelu {
            vec![train.init_threshold; d_sae]
        } else {
            Vec::new()
        };
        let w_skip = if shape.skip {
            vec![0.0; d_out * d_in]
        } else {
            Vec::new()
        };
        let params = Params {
            w_enc_t,
            b_enc: vec![0.0; d_sae],
            w_dec,
            b_dec: vec![0.0; d_out],
            threshold,
            w_skip,
        };
        let moments = params
            .all()
            .iter()
            .map(|(_, v)| Moments::new(v.len()))
            .collect();
        Ok(Trainer {
            params,
            topk_threshold: 0.0,
            moments,
            steps: 0,
            tokens_seen: 0,
            last_fired: vec![0; d_sae],
            scratch: Scratch::default(),
            shape,
            train,
        })
    }

    /// Sets `b_dec` (width `d_out`), e.g. to the mean or geometric median of the targets.
    pub fn set_b_dec(&mut self, b: &[f32]) -> Result<()> {
        if b.len() != self.shape.d_out() {
            return Err(DictError::Input {
                what: "b_dec",
                expected: self.shape.d_out(),
                found: vec![b.len()],
            });
        }
        self.params.b_dec.copy_from_slice(b);
        Ok(())
    }

    /// Sets `b_dec` to the mean of the targets `[n, d_out]`.
    pub fn init_b_dec_mean(&mut self, y: &Tensor) -> Result<()> {
        let d = self.shape.d_out();
        let (y, n) = rows(y, d, "b_dec sample")?;
        let mut mean = vec![0f64; d];
        for row in y.chunks_exact(d) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64 / n as f64;
            }
        }
        let mean: Vec<f32> = mean.into_iter().map(|v| v as f32).collect();
        self.set_b_dec(&mean)
    }

    /// Latents that have not fired in the last `dead_window` tokens.
    pub fn dead(&self) -> Vec<bool> {
        self.last_fired
            .iter()
            .map(|&t| self.tokens_seen - t > self.train.dead_window)
            .collect()
    }

    /// The batch `(x, y, n)` as flat f32 rows, checked.
    fn batch(&self, x: &Tensor, y: Option<&Tensor>) -> Result<(Vec<f32>, Option<Vec<f32>>, usize)> {
        let (xv, n) = rows(x, self.shape.d_in, "training input")?;
        match (y, self.shape.is_transcoder()) {
            (Some(y), true) => {
                let (yv, m) = rows(y, self.shape.d_out(), "transcoder target")?;
                if m != n {
                    return Err(DictError::Input {
                        what: "transcoder target (rows must match the input's)",
                        expected: self.shape.d_out(),
                        found: y.dims().to_vec(),
                    });
                }
                Ok((xv, Some(yv), n))
            }
            (None, false) => Ok((xv, None, n)),
            (Some(_), false) => Err(DictError::Config {
                source_name: "training batch".into(),
                field: "d_out".into(),
                reason: "a target was given to a sparse autoencoder (its target is its input)"
                    .into(),
            }),
            (None, true) => Err(DictError::Config {
                source_name: "training batch".into(),
                field: "d_out".into(),
                reason: "a transcoder needs a target batch".into(),
            }),
        }
    }

    /// `out[t] = x[t] W_skipᵀ`, `[n, d_out]` (zeros without a skip).
    fn skip_out(&self, x: &[f32], n: usize) -> Vec<f32> {
        let (d_in, d_out) = (self.shape.d_in, self.shape.d_out());
        let mut out = vec![0f32; n * d_out];
        if self.shape.skip {
            // rhs = W_skipᵀ [d_in, d_out]: element (i, o) at o·d_in + i.
            matmul(
                n,
                d_out,
                d_in,
                &mut out,
                false,
                (x, 1, d_in as isize),
                (&self.params.w_skip, d_in as isize, 1),
            );
        }
        out
    }

    /// The forward pass over `x [n · d_in]` with targets `y [n · d_out]`.
    fn forward(&self, x: &[f32], y: &[f32], n: usize, dead: &[bool]) -> Forward {
        let (d_in, d_sae, d_out, k) = (
            self.shape.d_in,
            self.shape.d_sae,
            self.shape.d_out(),
            self.shape.k,
        );
        let p = &self.params;
        let act = self.shape.activation;
        let n_dead = dead.iter().filter(|&&b| b).count();
        let k_aux = if act.uses_k() {
            self.train.k_aux.min(n_dead)
        } else {
            0
        };
        let dead_idx: Vec<u32> = if k_aux > 0 {
            (0..dead.len() as u32)
                .filter(|&j| dead[j as usize])
                .collect()
        } else {
            Vec::new()
        };
        let scale = 2.0 / n as f32;
        let aux_scale = self.train.aux_coef * scale;
        let half_band = 0.5 * self.train.bandwidth;
        // The encoder is the one dense product (every latent's pre-activation is needed to pick
        // the active ones): one GEMM over the whole batch.
        let xin: Vec<f32> = if self.shape.is_transcoder() {
            x.to_vec()
        } else {
            x.chunks_exact(d_in)
                .flat_map(|x| x.iter().zip(&p.b_dec).map(|(a, b)| a - b))
                .collect()
        };
        // pre = xin W_enc + b_enc   [n, d_sae], W_enc read from its transpose w_enc_t [d_sae, d_in]
        let mut pre_all = self.scratch.take();
        pre_all.clear();
        for _ in 0..n {
            pre_all.extend_from_slice(&p.b_enc);
        }
        matmul(
            n,
            d_sae,
            d_in,
            &mut pre_all,
            true,
            (&xin, 1, d_in as isize),
            (&p.w_enc_t, d_in as isize, 1),
        );
        // SAELens's rescaling: rank latents by pre · ‖W_dec[j]‖ (pre_all holds the product from
        // here on; an activation is the product divided by the norm again).
        let rescale = act.uses_k() && self.train.rescale_acts_by_decoder_norm;
        let w_norms: Vec<f32> = if act == Activation::Relu || rescale {
            p.w_dec
                .par_chunks_exact(d_out)
                .map(|r| dot(r, r).sqrt())
                .collect()
        } else {
            Vec::new()
        };
        if rescale {
            pre_all.par_chunks_mut(d_sae).for_each(|row| {
                for (v, nj) in row.iter_mut().zip(&w_norms) {
                    *v *= nj;
                }
            });
        }
        let unscale = |j: u32, v: f32| if rescale { v / w_norms[j as usize] } else { v };
        // BatchTopK: the (n·k)-th largest positive pre-activation of the batch.
        let batch_threshold = if act == Activation::BatchTopK {
            let mut pos: Vec<f32> = pre_all.par_iter().copied().filter(|&v| v > 0.0).collect();
            let keep = n * k;
            if pos.len() > keep {
                let (_, nth, _) = pos.select_nth_unstable_by(keep - 1, |a, b| b.total_cmp(a));
                *nth
            } else {
                f32::MIN_POSITIVE
            }
        } else {
            0.0
        };
        let skip = self.skip_out(x, n);
        let passes = y
            .par_chunks(d_out)
            .zip(pre_all.par_chunks(d_sae))
            .zip(skip.par_chunks(d_out))
            .map(|((y, pre), skip)| {
                let mut entries: Vec<(u32, f32, u8)> = Vec::new();
                match act {
                    Activation::TopK => {
                        let (idx, val) = top_k(pre, k, |_| true);
                        entries.extend(
                            idx.into_iter()
                                .zip(val)
                                .map(|(j, v)| (j, unscale(j, v), ACTIVE)),
                        );
                    }
                    Activation::BatchTopK => entries.extend(
                        pre.iter()
                            .enumerate()
                            .filter(|(_, &v)| v > 0.0 && v >= batch_threshold)
                            .map(|(j, &v)| (j as u32, unscale(j as u32, v), ACTIVE)),
                    ),
                    Activation::Relu => entries.extend(
                        pre.iter()
                            .enumerate()
                            .filter(|(_, &v)| v > 0.0)
                            .map(|(j, &v)| (j as u32, v, ACTIVE)),
                    ),
                    Activation::JumpRelu => {
                        for (j, (&v, &th)) in pre.iter().zip(&p.threshold).enumerate() {
                            let mut flags = 0;
                            if v > th {
                                flags |= ACTIVE;
                            }
                            if (v - th).abs() < half_band {
                                flags |= WINDOW;
                            }
                            if flags != 0 {
                                entries.push((j as u32, v, flags));
                            }
                        }
                    }
                }
                // ŷ = Σ_j f_j W_dec[j] + b_dec (+ skip); dL/dŷ = 2 (ŷ − y) / n
                let mut yhat: Vec<f32> = p.b_dec.iter().zip(skip).map(|(b, s)| b + s).collect();
                let (mut n_active, mut weighted_l1, mut min_active) = (0, 0f64, f32::INFINITY);
                for &(j, f, flags) in &entries {
                    if flags & ACTIVE != 0 {
                        axpy(f, row(&p.w_dec, j as usize, d_out), &mut yhat);
                        n_active += 1;
                        // In the ranking's units (BatchTopK's saved threshold is compared with
                        // the folded pre-activation).
                        let ranked = if rescale { f * w_norms[j as usize] } else { f };
                        min_active = min_active.min(ranked);
                        if act == Activation::Relu {
                            weighted_l1 += f as f64 * w_norms[j as usize] as f64;
                        }
                    }
                }
                let mut sq_err = 0f64;
                let mut dx = vec![0f32; d_out];
                for ((g, yh), ye) in dx.iter_mut().zip(&yhat).zip(y) {
                    let r = yh - ye;
                    sq_err += (r as f64) * (r as f64);
                    *g = scale * r;
                }
                // AuxK: the top k_aux dead latents reconstruct e = y − ŷ (detached).
                let (daux, aux_sq_err) = if k_aux > 0 {
                    let (ai, av) = top_k_among(pre, k_aux, &dead_idx);
                    let av: Vec<f32> = ai.iter().zip(av).map(|(&j, v)| unscale(j, v)).collect();
                    // ê − e = Σ a_j W_dec[j] + (ŷ − y)
                    let mut r: Vec<f32> = yhat.iter().zip(y).map(|(a, b)| a - b).collect();
                    for (&j, &a) in ai.iter().zip(&av) {
                        axpy(a, row(&p.w_dec, j as usize, d_out), &mut r);
                    }
                    let s = r.iter().map(|&v| (v as f64) * (v as f64)).sum();
                    r.iter_mut().for_each(|v| *v *= aux_scale);
                    entries.extend(ai.into_iter().zip(av).map(|(j, v)| (j, v, AUX)));
                    (r, s)
                } else {
                    (Vec::new(), 0.0)
                };
                TokenPass {
                    entries,
                    dx,
                    daux,
                    sq_err,
                    aux_sq_err,
                    n_active,
                    weighted_l1,
                    min_active,
                }
            })
            .collect();
        self.scratch.put(pre_all);
        Forward { passes, xin }
    }

    /// Which latents each token of a batch selects, as (latent, flags) with flags
    /// [`SELECTED_ACTIVE`], [`SELECTED_WINDOW`] (JumpReLU's estimator window), [`SELECTED_AUX`]
    /// (AuxK): what a small perturbation must not change for the loss to be smooth.
    pub fn selection(&self, x: &Tensor, y: Option<&Tensor>) -> Result<Vec<Vec<(u32, u8)>>> {
        let (x, y, n) = self.batch(x, y)?;
        let dead = self.dead();
        let fwd = self.forward(&x, y.as_deref().unwrap_or(&x), n, &dead);
        Ok(fwd
            .passes
            .into_iter()
            .map(|p| {
                let mut v: Vec<(u32, u8)> = p.entries.into_iter().map(|(j, _, f)| (j, f)).collect();
                v.sort_unstable();
                v
            })
            .collect())
    }

    /// The loss and its gradients on a batch, without changing anything.
    pub fn gradients(
        &self,
        x: &Tensor,
        y: Option<&Tensor>,
        c: Coefficients,
    ) -> Result<(Params, StepStats)> {
        let (x, y, n) = self.batch(x, y)?;
        let dead = self.dead();
        let (g, stats, _, _) = self.backward(&x, y.as_deref().unwrap_or(&x), n, &dead, c);
        Ok((g, stats))
    }

    /// Gradients, stats, which latents fired, and the smallest kept activation.
    fn backward(
        &self,
        x: &[f32],
        y: &[f32],
        n: usize,
        dead: &[bool],
        c: Coefficients,
    ) -> (Params, StepStats, Vec<bool>, f32) {
        let (d_in, d_sae, d_out) = (self.shape.d_in, self.shape.d_sae, self.shape.d_out());
        let p = &self.params;
        let act = self.shape.activation;
        let Forward { passes, xin } = self.forward(x, y, n, dead);
        let stats = self.stats(y, n, &passes, dead, c);
        let mut fired = vec![false; d_sae];
        let mut min_active = f32::INFINITY;
        for pass in &passes {
            min_active = min_active.min(pass.min_active);
            for &(j, _, flags) in &pass.entries {
                if flags & ACTIVE != 0 {
                    fired[j as usize] = true;
                }
            }
        }

        // Invert token → latents into latent → (token, value, flags), so the sparse backward
        // runs in parallel over latents, each writing only its own rows.
        let mut count = vec![0usize; d_sae + 1];
        for pass in &passes {
            for &(j, _, _) in &pass.entries {
                count[j as usize + 1] += 1;
            }
        }
        for j in 0..d_sae {
            count[j + 1] += count[j];
        }
        let mut fill = count.clone();
        let mut entries = vec![(0u32, 0f32, 0u8); count[d_sae]];
        for (t, pass) in passes.iter().enumerate() {
            for &(j, f, flags) in &pass.entries {
                entries[fill[j as usize]] = (t as u32, f, flags);
                fill[j as usize] += 1;
            }
        }

        let mut g = Params::zeros_like(p);
        let l1 = c.sparsity / n as f32;
        let (inv_band, l0_window) = (
            1.0 / self.train.bandwidth,
            c.sparsity / (n as f32 * self.train.bandwidth),
        );
        let mut g_threshold = vec![0f32; d_sae];
        g.w_dec
            .par_chunks_exact_mut(d_out)
            .zip(g.w_enc_t.par_chunks_exact_mut(d_in))
            .zip(g.b_enc.par_iter_mut())
            .zip(g_threshold.par_iter_mut())
            .enumerate()
            .for_each(|(j, (((gw_dec, gw_enc), gb_enc), gth))| {
                let w_dec_j = row(&p.w_dec, j, d_out);
                let mut f_sum = 0f32;
                for &(t, f, flags) in &entries[count[j]..count[j + 1]] {
                    let pass = &passes[t as usize];
                    let xt = row(&xin, t as usize, d_in);
                    if flags & AUX != 0 {
                        // dL/dW_dec[j] += a_j dL/dê; dL/dpre_j = W_dec[j] · dL/dê.
                        let gj = axpy_dot(f, &pass.daux, gw_dec, w_dec_j);
                        axpy(gj, xt, gw_enc);
                        *gb_enc += gj;
                        continue;
                    }
                    // dL/df_j through the reconstruction.
                    let grec = if flags & ACTIVE != 0 {
                        axpy_dot(f, &pass.dx, gw_dec, w_dec_j)
                    } else {
                        dot(w_dec_j, &pass.dx)
                    };
                    if flags & ACTIVE != 0 {
                        let mut gpre = grec;
                        if act == Activation::Relu {
                            // λ/n ‖W_dec[j]‖ from the weighted L1 penalty.
                            gpre += l1 * dot(w_dec_j, w_dec_j).sqrt();
                            f_sum += f;
                        }
                        // dL/dW_enc[:, j] += xin_t dL/dpre_j; dL/db_enc[j] += dL/dpre_j
                        axpy(gpre, xt, gw_enc);
                        *gb_enc += gpre;
                    }
                    if flags & WINDOW != 0 {
                        let th = p.threshold[j];
                        *gth += -(th * inv_band) * grec - l0_window;
                    }
                }
                if act == Activation::Relu && f_sum != 0.0 {
                    // ∂/∂W_dec[j] of λ/n Σ_t f_tj ‖W_dec[j]‖ = λ/n (Σ_t f_tj) W_dec[j] / ‖W_dec[j]‖
                    let norm = dot(w_dec_j, w_dec_j).sqrt().max(1e-12);
                    axpy(l1 * f_sum / norm, w_dec_j, gw_dec);
                }
            });
        if act == Activation::JumpRelu {
            g.threshold = g_threshold;
        }
        // b_dec: decoder path Σ_t dL/dŷ_t; for an SAE also the encoder path
        // −Σ_j (dL/db_enc[j]) W_enc[:, j].
        for pass in &passes {
            for (b, v) in g.b_dec.iter_mut().zip(&pass.dx) {
                *b += v;
            }
        }
        if !self.shape.is_transcoder() {
            for (j, &gb) in g.b_enc.iter().enumerate() {
                if gb != 0.0 {
                    axpy(-gb, row(&p.w_enc_t, j, d_in), &mut g.b_dec);
                }
            }
        }
        if self.shape.skip {
            // dL/dW_skip = Σ_t dL/dŷ_t ⊗ x_t = DXᵀ X   [d_out, d_in]
            let dxs: Vec<f32> = passes.iter().flat_map(|p| p.dx.iter().copied()).collect();
            matmul(
                d_out,
                d_in,
                n,
                &mut g.w_skip,
                false,
                (&dxs, d_out as isize, 1),
                (x, 1, d_in as isize),
            );
        }
        (g, stats, fired, min_active)
    }

    fn stats(
        &self,
        y: &[f32],
        n: usize,
        passes: &[TokenPass],
        dead: &[bool],
        c: Coefficients,
    ) -> StepStats {
        let d = self.shape.d_out();
        let sq_err: f64 = passes.iter().map(|p| p.sq_err).sum();
        let aux_sq: f64 = passes.iter().map(|p| p.aux_sq_err).sum();
        let active: usize = passes.iter().map(|p| p.n_active).sum();
        let mut mean = vec![0f64; d];
        for row in y.chunks_exact(d) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64 / n as f64;
            }
        }
        let total: f64 = y
            .chunks_exact(d)
            .flat_map(|row| row.iter().zip(&mean).map(|(&v, m)| (v as f64 - m).powi(2)))
            .sum();
        let mse = sq_err / n as f64;
        let aux = aux_sq / n as f64;
        let l0 = active as f64 / n as f64;
        let sparsity_loss = match self.shape.activation {
            Activation::Relu => {
                c.sparsity as f64 * passes.iter().map(|p| p.weighted_l1).sum::<f64>() / n as f64
            }
            Activation::JumpRelu => c.sparsity as f64 * l0,
            Activation::TopK | Activation::BatchTopK => 0.0,
        };
        StepStats {
            mse,
            aux,
            sparsity_loss,
            loss: mse + self.train.aux_coef as f64 * aux + sparsity_loss,
            explained_variance: 1.0 - sq_err / total.max(f64::MIN_POSITIVE),
            l0,
            n_dead: dead.iter().filter(|&&b| b).count(),
        }
    }

    /// Loss and reconstruction quality on a batch (at the config's sparsity coefficient),
    /// without changing anything.
    pub fn evaluate(&self, x: &Tensor, y: Option<&Tensor>) -> Result<StepStats> {
        let (x, y, n) = self.batch(x, y)?;
        let dead = self.dead();
        let c = Coefficients::of(&self.train);
        let yv = y.as_deref().unwrap_or(&x);
        let fwd = self.forward(&x, yv, n, &dead);
        Ok(self.stats(yv, n, &fwd.passes, &dead, c))
    }

    /// One AdamW step on a batch; returns the batch's stats from before the step. A non-finite
    /// loss or gradient returns [`DictError::Diverged`] and leaves every parameter as it was.
    pub fn step(&mut self, x: &Tensor, y: Option<&Tensor>, c: Coefficients) -> Result<StepStats> {
        let (x, y, n) = self.batch(x, y)?;
        if !(c.lr.is_finite() && c.lr >= 0.0 && c.sparsity.is_finite() && c.sparsity >= 0.0) {
            return Err(DictError::Config {
                source_name: "training step".into(),
                field: "lr".into(),
                reason: format!(
                    "scheduled lr {} and sparsity coefficient {} must be finite and non-negative",
                    c.lr, c.sparsity
                ),
            });
        }
        let d_out = self.shape.d_out();
        let dead = self.dead();
        let yv = y.as_deref().unwrap_or(&x);
        let (mut g, stats, fired, min_active) = self.backward(&x, yv, n, &dead, c);
        let diverged = |what: String| DictError::Diverged {
            step: self.steps + 1,
            tokens: self.tokens_seen + n as u64,
            what,
        };
        if !stats.loss.is_finite() {
            return Err(diverged(format!(
                "the loss is {} (mse {}); is the input finite?",
                stats.loss, stats.mse
            )));
        }
        if let Some((name, i)) = g.first_beyond(1e18) {
            return Err(diverged(format!(
                "the gradient of {name}[{i}] is not finite or beyond 1e18"
            )));
        }
        if self.train.clip_grad_norm > 0.0 {
            // torch.nn.utils.clip_grad_norm_: one L2 norm over every gradient entry.
            let sq: f64 = g
                .all()
                .iter()
                .map(|(_, v)| v.par_iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .sum();
            let coef = self.train.clip_grad_norm as f64 / (sq.sqrt() + 1e-6);
            if coef < 1.0 {
                for (_, v) in g.all_mut() {
                    v.par_iter_mut()
                        .for_each(|x| *x = (*x as f64 * coef) as f32);
                }
            }
        }
        let unit = unit_decoder(&self.shape, &self.train);
        if unit {
            // Remove the gradient component parallel to each (unit) decoder row, since the row
            // is renormalised after the step anyway (Gao et al. §A).
            g.w_dec
                .par_chunks_exact_mut(d_out)
                .zip(self.params.w_dec.par_chunks_exact(d_out))
                .for_each(|(gr, w)| {
                    let c = dot(gr, w);
                    if c != 0.0 {
                        axpy(-c, w, gr);
                    }
                });
        }
        // With finite gradients below 1e18 (checked above) the Adam moments stay finite and each
        // normalised update is at most a few units, so parameters can only overflow when the
        // learning rate or the weights are already absurd: only then is a copy kept to restore.
        let max_p = self
            .params
            .all()
            .iter()
            .map(|(_, v)| v.par_iter().map(|x| x.abs()).reduce(|| 0.0, f32::max))
            .fold(0f32, f32::max) as f64;
        let safe =
            c.lr as f64 * 1e3 * (1.0 + self.train.weight_decay as f64 * max_p) + max_p < 1e30;
        let before = (!safe).then(|| (self.params.clone(), self.moments.clone()));
        let t = (self.steps + 1) as i32;
        let tc = &self.train;
        let h = AdamHyper {
            lr: c.lr,
            b1: tc.beta1,
            b2: tc.beta2,
            eps: tc.eps,
            bc1: 1.0 - tc.beta1.powi(t),
            bc2: 1.0 - tc.beta2.powi(t),
        };
        let wd = tc.weight_decay;
        for (((name, p), (_, gr)), m) in self
            .params
            .all_mut()
            .into_iter()
            .zip(g.all())
            .zip(self.moments.iter_mut())
        {
            let decay = if name.starts_with('w') { wd } else { 0.0 };
            adam(p, gr, m, &h, decay);
        }
        if unit {
            normalise_rows(&mut self.params.w_dec, d_out);
        }
        if self.shape.activation == Activation::JumpRelu {
            // A negative threshold would let negative pre-activations through.
            self.params
                .threshold
                .iter_mut()
                .for_each(|t| *t = t.max(0.0));
        }
        if let Some((name, i)) = self.params.first_non_finite() {
            let step = self.steps + 1;
            let kept = match before {
                Some(b) => {
                    (self.params, self.moments) = b;
                    ""
                }
                None => "; the parameters are not usable, reload a checkpoint",
            };
            return Err(DictError::Diverged {
                step,
                tokens: self.tokens_seen + n as u64,
                what: format!(
                    "the update made {name}[{i}] non-finite (learning rate too high?){kept}"
                ),
            });
        }
        if self.shape.activation == Activation::BatchTopK && min_active.is_finite() {
            let r = self.train.topk_threshold_lr as f64;
            self.topk_threshold = (1.0 - r) * self.topk_threshold + r * min_active as f64;
        }
        self.steps += 1;
        self.tokens_seen += n as u64;
        for (last, _) in self.last_fired.iter_mut().zip(&fired).filter(|(_, &f)| f) {
            *last = self.tokens_seen;
        }
        Ok(stats)
    }

    /// The trained dictionary in SAELens orientation (`W_enc [d_in, d_sae]`), with `metadata`,
    /// folding in input/output normalisation: the trainer saw `scale_in · x` and
    /// `scale_out · y` (pass 1.0 for none; an SAE uses `scale_in` for both), the saved dictionary
    /// reads and writes the raw activations. BatchTopK is saved as JumpReLU with its running
    /// threshold for every latent.
    pub fn to_sae(&self, metadata: Metadata, scale_in: f32, scale_out: f32) -> Result<Sae> {
        let (d_in, d_sae, d_out) = (self.shape.d_in, self.shape.d_sae, self.shape.d_out());
        for (field, s) in [("scale_in", scale_in), ("scale_out", scale_out)] {
            if !(s.is_finite() && s > 0.0) {
                return Err(DictError::Config {
                    source_name: "to_sae".into(),
                    field: field.into(),
                    reason: format!("{s} must be positive and finite"),
                });
            }
        }
        let scale_out = if self.shape.is_transcoder() {
            scale_out
        } else {
            scale_in
        };
        let arch = self.shape.architecture();
        let mut cfg = DictConfig::new(arch, d_in, d_sae);
        cfg.d_out = self.shape.d_out;
        if arch.is_topk() {
            cfg.k = Some(self.shape.k);
        }
        cfg.metadata = metadata;
        let cpu = Device::Cpu;
        let folded;
        let p = if self.shape.activation.uses_k() && self.train.rescale_acts_by_decoder_norm {
            // pre'_j = ‖W_dec[j]‖ pre_j ranks as training did, and pre'_j W_dec[j]/‖W_dec[j]‖
            // reconstructs the same: fold the norms into the encoder.
            let mut q = self.params.clone();
            for j in 0..d_sae {
                let r = &mut q.w_dec[j * d_out..(j + 1) * d_out];
                let norm = dot(r, r).sqrt().max(1e-12);
                r.iter_mut().for_each(|v| *v /= norm);
                q.w_enc_t[j * d_in..(j + 1) * d_in]
                    .iter_mut()
                    .for_each(|v| *v *= norm);
                q.b_enc[j] *= norm;
            }
            folded = q;
            &folded
        } else {
            &self.params
        };
        let w_enc = (Tensor::from_slice(&p.w_enc_t, (d_sae, d_in), &cpu)?
            .t()?
            .contiguous()?
            * scale_in as f64)?;
        let inv_out = 1.0 / scale_out as f64;
        let mut tensors = vec![
            ("W_enc", w_enc),
            ("b_enc", Tensor::from_slice(&p.b_enc, d_sae, &cpu)?),
            (
                "W_dec",
                (Tensor::from_slice(&p.w_dec, (d_sae, d_out), &cpu)? * inv_out)?,
            ),
            (
                "b_dec",
                (Tensor::from_slice(&p.b_dec, d_out, &cpu)? * inv_out)?,
            ),
        ];
        match self.shape.activation {
            Activation::JumpRelu => {
                tensors.push(("threshold", Tensor::from_slice(&p.threshold, d_sae, &cpu)?))
            }
            Activation::BatchTopK => tensors.push((
                "threshold",
                Tensor::full(self.topk_threshold as f32, d_sae, &cpu)?,
            )),
            _ => {}
        }
        if self.shape.skip {
            let w = Tensor::from_slice(&p.w_skip, (d_out, d_in), &cpu)?;
            tensors.push(("W_skip", (w * (scale_in as f64 * inv_out))?));
        }
        let tensors = tensors
            .into_iter()
            .map(|(n, t)| (n.to_string(), t))
            .collect();
        Sae::from_tensors(cfg, tensors, "trainer")
    }

    /// Writes everything needed to continue training bit-for-bit: `trainer.json` (shape,
    /// settings) and `trainer.safetensors` (parameters, Adam moments, counters, firing times),
    /// each written atomically, into `dir` (created).
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| DictError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let cpu = Device::Cpu;
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for ((name, v), m) in self.params.all().into_iter().zip(&self.moments) {
            if v.is_empty() {
                continue;
            }
            t.insert(name.into(), Tensor::from_slice(v, v.len(), &cpu)?);
            t.insert(
                format!("adam_m.{name}"),
                Tensor::from_slice(&m.m, v.len(), &cpu)?,
            );
            t.insert(
                format!("adam_v.{name}"),
                Tensor::from_slice(&m.v, v.len(), &cpu)?,
            );
        }
        let last: Vec<i64> = self.last_fired.iter().map(|&v| v as i64).collect();
        t.insert(
            "last_fired".into(),
            Tensor::from_vec(last, self.last_fired.len(), &cpu)?,
        );
        let counters = vec![self.steps as i64, self.tokens_seen as i64];
        t.insert("counters".into(), Tensor::from_vec(counters, 2, &cpu)?);
        t.insert(
            "topk_threshold".into(),
            Tensor::from_vec(vec![self.topk_threshold], 1, &cpu)?,
        );
        crate::saelens::write_safetensors(&t, &dir.join(CHECKPOINT_TENSORS))?;
        let meta = CheckpointMeta {
            shape: self.shape.clone(),
            train: self.train.clone(),
        };
        let body = serde_json::to_string_pretty(&meta).unwrap_or_default();
        scalpel_models::files::write_atomically(&dir.join(CHECKPOINT_META), |w| {
            std::io::Write::write_all(w, body.as_bytes())
        })
        .map_err(|(path, source)| DictError::Io { path, source })
    }

    /// Reads a checkpoint written by [`Trainer::save_checkpoint`]; every tensor's presence and
    /// length is checked.
    pub fn load_checkpoint(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(CHECKPOINT_META);
        let text = std::fs::read_to_string(&meta_path).map_err(|source| DictError::Io {
            path: meta_path.clone(),
            source,
        })?;
        let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| DictError::Config {
            source_name: meta_path.display().to_string(),
            field: "(json)".into(),
            reason: e.to_string(),
        })?;
        let mut tr = Trainer::new(meta.shape, meta.train, 0)?;
        let path = dir.join(CHECKPOINT_TENSORS);
        let t = crate::saelens::read_safetensors(&path, &Device::Cpu)?;
        let source = path.display().to_string();
        let get = |name: &str, len: usize| -> Result<&Tensor> {
            let v = t.get(name).ok_or_else(|| DictError::MissingTensor {
                source_name: source.clone(),
                tensor: name.to_string(),
                architecture: "trainer checkpoint".into(),
            })?;
            if v.dims() != [len] {
                return Err(DictError::Shape {
                    source_name: source.clone(),
                    tensor: name.to_string(),
                    expected: vec![len],
                    found: v.dims().to_vec(),
                    hint: "",
                });
            }
            Ok(v)
        };
        let mut moments = std::mem::take(&mut tr.moments);
        for ((name, v), m) in tr.params.all_mut().into_iter().zip(moments.iter_mut()) {
            if v.is_empty() {
                continue;
            }
            let len = v.len();
            *v = get(name, len)?.to_vec1::<f32>()?;
            m.m = get(&format!("adam_m.{name}"), len)?.to_vec1::<f32>()?;
            m.v = get(&format!("adam_v.{name}"), len)?.to_vec1::<f32>()?;
        }
        tr.moments = moments;
        tr.last_fired = get("last_fired", tr.shape.d_sae)?
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v as u64)
            .collect();
        let counters = get("counters", 2)?.to_vec1::<i64>()?;
        (tr.steps, tr.tokens_seen) = (counters[0] as u64, counters[1] as u64);
        tr.topk_threshold = get("topk_threshold", 1)?.to_vec1::<f64>()?[0];
        if tr.last_fired.iter().any(|&v| v > tr.tokens_seen) {
            return Err(DictError::Config {
                source_name: source,
                field: "last_fired".into(),
                reason: "firing times lie beyond the tokens seen (corrupt checkpoint)".into(),
            });
        }
        Ok(tr)
    }
}

const CHECKPOINT_META: &str = "trainer.json";
const CHECKPOINT_TENSORS: &str = "trainer.safetensors";

#[derive(Serialize, Deserialize)]
struct CheckpointMeta {
    shape: DictShape,
    train: TrainConfig,
}

/// Decoder rows kept at unit norm (Gao et al.'s TopK) rather than free (SAELens's rescaled TopK,
/// and ReLU / JumpReLU, whose penalties or thresholds set the scale).
fn unit_decoder(shape: &DictShape, train: &TrainConfig) -> bool {
    shape.activation.uses_k() && !train.rescale_acts_by_decoder_norm
}

/// `x [n, d]` as flat f32 rows, checked.
fn rows(x: &Tensor, d: usize, what: &'static str) -> Result<(Vec<f32>, usize)> {
    if x.rank() != 2 || x.dims()[1] != d || x.dims()[0] == 0 {
        return Err(DictError::Input {
            what,
            expected: d,
            found: x.dims().to_vec(),
        });
    }
    let n = x.dims()[0];
    Ok((x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, n))
}

/// Row `j` of a row-major matrix of width `d`.
fn row(w: &[f32], j: usize, d: usize) -> &[f32] {
    &w[j * d..(j + 1) * d]
}

/// The (at most) `k` largest positive entries of `pre` at indices `among`, as (indices, values).
fn top_k_among(pre: &[f32], k: usize, among: &[u32]) -> (Vec<u32>, Vec<f32>) {
    largest(
        among
            .iter()
            .map(|&j| (j, pre[j as usize]))
            .filter(|&(_, p)| p > 0.0)
            .collect(),
        k,
    )
}

/// The `k` largest of `cand` by value (all when fewer), by one partition.
fn largest(mut cand: Vec<(u32, f32)>, k: usize) -> (Vec<u32>, Vec<f32>) {
    if cand.len() > k {
        cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
        cand.truncate(k);
    }
    cand.into_iter().unzip()
}

/// The (at most) `k` largest positive entries of `pre` among latents `keep` accepts, as
/// (indices, values). Ties and order do not matter to the loss.
fn top_k(pre: &[f32], k: usize, keep: impl Fn(usize) -> bool) -> (Vec<u32>, Vec<f32>) {
    if k > 64 {
        // Large k (AuxK): a running minimum would rescan k values per replacement; gather the
        // candidates and partition once instead.
        return largest(
            pre.iter()
                .enumerate()
                .filter(|&(j, &p)| p > 0.0 && keep(j))
                .map(|(j, &p)| (j as u32, p))
                .collect(),
            k,
        );
    }
    // A running top-k with its minimum tracked: for k ≪ d_sae almost every entry is rejected by
    // one comparison.
    let mut idx: Vec<u32> = Vec::with_capacity(k);
    let mut val: Vec<f32> = Vec::with_capacity(k);
    let mut min_at = 0usize;
    for (j, &p) in pre.iter().enumerate() {
        // relu: a non-positive pre-activation contributes f = 0 and no gradient.
        if p <= 0.0 || !keep(j) {
            continue;
        }
        if val.len() < k {
            idx.push(j as u32);
            val.push(p);
            if val.len() == k {
                min_at = argmin(&val);
            }
        } else if p > val[min_at] {
            idx[min_at] = j as u32;
            val[min_at] = p;
            min_at = argmin(&val);
        }
    }
    (idx, val)
}

fn argmin(v: &[f32]) -> usize {
    let mut at = 0;
    for (i, &x) in v.iter().enumerate() {
        if x < v[at] {
            at = i;
        }
    }
    at
}

/// `a · b`: the encoder's inner loop, so it uses AVX2 + FMA where the CPU has them (checked at
/// run time; the workspace builds for baseline x86-64), else the portable loop.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features `dot_fma` is compiled for.
        return unsafe { dot_fma(a, b) };
    }
    dot_lanes::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<true>(a, b)
}

/// `a · b` with 16 independent accumulators so the compiler vectorises it; `FMA` uses
/// `mul_add`, which is a single instruction only where FMA is enabled (a libm call elsewhere).
#[inline(always)]
fn dot_lanes<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((a, &xe), &ye) in acc.iter_mut().zip(x).zip(y) {
            *a = if FMA {
                xe.mul_add(ye, *a)
            } else {
                *a + xe * ye
            };
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a v` and `w · v` in one pass over `v` (the sparse backward's inner loop reads each
/// token's gradient once per latent instead of twice).
fn axpy_dot(a: f32, v: &[f32], y: &mut [f32], w: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features `axpy_dot_fma` is compiled for.
        return unsafe { axpy_dot_fma(a, v, y, w) };
    }
    axpy_dot_lanes::<false>(a, v, y, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_dot_fma(a: f32, v: &[f32], y: &mut [f32], w: &[f32]) -> f32 {
    axpy_dot_lanes::<true>(a, v, y, w)
}

#[inline(always)]
fn axpy_dot_lanes<const FMA: bool>(a: f32, v: &[f32], y: &mut [f32], w: &[f32]) -> f32 {
    const L: usize = 16;
    let n = v.len().min(y.len()).min(w.len());
    let (v, y, w) = (&v[..n], &mut y[..n], &w[..n]);
    let mut acc = [0f32; L];
    let split = n - n % L;
    for ((vc, yc), wc) in v[..split]
        .chunks_exact(L)
        .zip(y[..split].chunks_exact_mut(L))
        .zip(w[..split].chunks_exact(L))
    {
        for i in 0..L {
            let ve = vc[i];
            if FMA {
                yc[i] = ve.mul_add(a, yc[i]);
                acc[i] = ve.mul_add(wc[i], acc[i]);
            } else {
                yc[i] += a * ve;
                acc[i] += ve * wc[i];
            }
        }
    }
    let mut tail = 0f32;
    for i in split..n {
        y[i] += a * v[i];
        tail += v[i] * w[i];
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a x`, with AVX2 + FMA where the CPU has them (as [`dot`]).
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features `axpy_fma` is compiled for.
        return unsafe { axpy_fma(a, x, y) };
    }
    axpy_lanes::<false>(a, x, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn axpy_fma(a: f32, x: &[f32], y: &mut [f32]) {
    axpy_lanes::<true>(a, x, y)
}

#[inline(always)]
fn axpy_lanes<const FMA: bool>(a: f32, x: &[f32], y: &mut [f32]) {
    for (ye, &xe) in y.iter_mut().zip(x) {
        *ye = if FMA {
            xe.mul_add(a, *ye)
        } else {
            *ye + a * xe
        };
    }
}

/// Scales each row of `w [_, d]` to unit norm.
fn normalise_rows(w: &mut [f32], d: usize) {
    w.par_chunks_exact_mut(d).for_each(|r| {
        let norm = dot(r, r).sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= norm);
    });
}

struct AdamHyper {
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    /// `1 − β1ᵗ`, `1 − β2ᵗ`.
    bc1: f32,
    bc2: f32,
}

/// One bias-corrected AdamW update of `p` with gradient `g` and decoupled weight decay `wd`.
fn adam(p: &mut [f32], g: &[f32], m: &mut Moments, h: &AdamHyper, wd: f32) {
    const CHUNK: usize = 4096;
    let &AdamHyper {
        lr,
        b1,
        b2,
        eps,
        bc1,
        bc2,
    } = h;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.m.par_chunks_mut(CHUNK))
        .zip(m.v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                if wd != 0.0 {
                    *p -= lr * wd * *p;
                }
                *p -= lr * (*m / bc1) / ((*v / bc2).sqrt() + eps);
            }
        });
}
