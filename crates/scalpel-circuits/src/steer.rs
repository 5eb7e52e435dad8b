//! Steering: a vector added to the residual stream, times a coefficient, at chosen positions,
//! while the model reads a prompt and generates.
//!
//! Three sources of vectors:
//! - **ActAdd** (Turner et al. 2023, "Activation Addition", <https://arxiv.org/abs/2308.10248>):
//!   the residuals of two contrasting prompts ("Love" vs "Hate") at the steering hook,
//!   subtracted position by position ([`actadd`]) and added to the first `k` positions of the
//!   user's prompt ([`Positions::First`]).
//! - **Mean difference** over contrastive pairs (as in Rimsky et al. 2023, "Steering Llama 2 via
//!   Contrastive Activation Addition", <https://arxiv.org/abs/2312.06681>): the mean over pairs of
//!   the residual at the last token of the positive text minus that of the negative
//!   ([`mean_difference`]), one vector added at every position.
//! - **A sparse-autoencoder latent** (Templeton et al. 2024, "Scaling Monosemanticity"): its
//!   decoder row added ([`sae_decoder_row`]), or the latent clamped: at every steered position the
//!   input is encoded and the reconstruction's change from holding latent `i` at
//!   `coef × max_act` is added ([`sae_clamp`]); for a plain SAE that is
//!   `(coef × max_act − f_i(x)) × W_dec[i]`.
//!
//! [`sweep`] runs a list of coefficients and reports, for each, the target effect (the mean
//! log-probability of a chosen continuation of the prompt), the side effects on unrelated text
//! (the mean KL divergence `KL(unsteered ‖ steered)` of the next-token distributions and the
//! cross-entropy loss), and optionally the generated text.
//!
//! With an added vector, coefficient 0 leaves every activation exactly as it was; a clamp at
//! coefficient 0 instead holds the latent at 0 (an ablation of that latent).

use std::path::Path;

use candle_core::{DType, Tensor, D};
use scalpel_core::{HookCtx, HookPoint, Hooks};
use scalpel_dict::Sae;
use scalpel_models::generation::{generate, GenerateOptions, Generation};
use scalpel_models::transformer::{Model, RunOptions};
use serde::Serialize;

use crate::{CircuitError, Result};

/// Neutral text for measuring side effects when the user gives none: a few paragraphs of plain
/// descriptive prose with no strong sentiment or single topic.
pub const HELD_OUT_TEXT: &str = "\
The town library opens at nine in the morning and closes at six in the evening. On the ground \
floor there are newspapers, a children's corner and a row of computers that visitors may use \
for an hour at a time. The reference collection is on the first floor, next to a quiet room \
with long wooden tables. Books may be borrowed for three weeks and renewed twice, either at the \
desk or on the library's website.

To make a simple loaf of bread, mix five hundred grams of flour with a teaspoon of salt and a \
packet of dried yeast. Add about three hundred millilitres of warm water and stir until the \
dough comes together. Knead it on a floured surface for ten minutes, then leave it in a covered \
bowl until it has doubled in size. Shape the dough, place it in a tin and bake it in a hot oven \
for roughly thirty-five minutes.

The river rises in the hills to the north and flows south for about two hundred kilometres \
before it reaches the sea. Several small towns grew up along its banks, where the water was \
shallow enough to cross. In the nineteenth century a canal was dug to connect it with the \
neighbouring valley, and barges carried coal, grain and timber between the two. Today the \
towpath is used mostly by walkers and cyclists.

A train leaves the central station every twenty minutes on weekdays. The journey to the airport \
takes about half an hour, with stops at the university, the exhibition centre and the old \
harbour. Tickets can be bought from machines on the platform or from the conductor, and a day \
pass covers all buses and trams in the city as well.";

/// Where a steering vector is added. Positions are counted in the whole sequence: `0..p` is the
/// prompt of `p` tokens, `p..` the generated tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Positions {
    /// Every position, prompt and generated.
    All,
    /// The first `k` prompt positions (ActAdd). A `[k, d_model]` vector adds row `i` at
    /// position `i`.
    First(usize),
    /// These prompt positions. A `[k, d_model]` vector adds row `i` at the `i`-th listed one.
    List(Vec<usize>),
    /// Only generated tokens (positions `p..`), each as it is read back in. The first new token
    /// is predicted from the unsteered prompt, so it is never affected.
    Generated,
}

impl Positions {
    /// How many positions are listed (`First`, `List`); `None` for `All` and `Generated`.
    pub fn listed(&self) -> Option<usize> {
        match self {
            Positions::All | Positions::Generated => None,
            Positions::First(k) => Some(*k),
            Positions::List(v) => Some(v.len()),
        }
    }

    /// Refuses positions that a prompt of `prompt_len` tokens does not have: listed positions
    /// must exist (an ActAdd vector longer than the prompt is an error, not clipped), and a list
    /// may not be empty or repeat a position.
    pub fn check(&self, prompt_len: usize) -> Result<()> {
        match self {
            Positions::All | Positions::Generated => Ok(()),
            Positions::First(0) => Err(CircuitError::Input(
                "steering the first 0 positions steers nothing".into(),
            )),
            Positions::First(k) if *k > prompt_len => Err(CircuitError::Input(format!(
                "the vector covers the first {k} positions but the prompt has only {prompt_len} \
                 tokens; use a longer prompt or shorter contrast prompts"
            ))),
            Positions::First(_) => Ok(()),
            Positions::List(v) => {
                if v.is_empty() {
                    return Err(CircuitError::Input("an empty list of positions".into()));
                }
                if let Some(p) = v.iter().find(|&&p| p >= prompt_len) {
                    return Err(CircuitError::Input(format!(
                        "position {p} is outside the prompt of {prompt_len} tokens (valid: 0..={})",
                        prompt_len.saturating_sub(1)
                    )));
                }
                let mut sorted = v.clone();
                sorted.sort_unstable();
                if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
                    return Err(CircuitError::Input(format!(
                        "position {} is listed twice",
                        w[0]
                    )));
                }
                Ok(())
            }
        }
    }

    /// The index among the listed positions of `pos` (0 for `All` and `Generated`), or `None`
    /// when `pos` is not steered.
    fn slot(&self, pos: usize, prompt_len: usize) -> Option<usize> {
        match self {
            Positions::All => Some(0),
            Positions::Generated => (pos >= prompt_len).then_some(0),
            Positions::First(k) => (pos < *k).then_some(pos),
            Positions::List(v) => v.iter().position(|&p| p == pos),
        }
    }
}

impl std::fmt::Display for Positions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Positions::All => f.write_str("every position"),
            Positions::First(k) => write!(f, "the first {k} prompt positions"),
            Positions::List(v) => write!(f, "prompt positions {v:?}"),
            Positions::Generated => f.write_str("generated tokens"),
        }
    }
}

/// A sparse-autoencoder latent held at `coef × max_act`.
#[derive(Debug, Clone)]
pub struct FeatureClamp {
    pub sae: Sae,
    /// The latent's index (`0..d_sae`).
    pub feature: usize,
    /// Its typical maximum activation (given, or measured with [`max_activation`]).
    pub max_act: f64,
}

/// What is added to the residual stream.
#[derive(Debug, Clone)]
pub enum Direction {
    /// `coef × vector`. `[d_model]`: the same at every steered position; `[k, d_model]`: one row
    /// per listed position (needs [`Positions::First`]`(k)` or a list of `k`).
    Add(Tensor),
    /// An SAE latent clamped at every steered position.
    Clamp(Box<FeatureClamp>),
}

/// A steering intervention at one residual hook.
#[derive(Debug, Clone)]
pub struct SteeringVector {
    /// `blocks.L.hook_resid_pre` (the usual choice), `hook_resid_mid` or `hook_resid_post`.
    pub hook: HookPoint,
    pub direction: Direction,
}

impl SteeringVector {
    /// The number of per-position rows: `k` for a `[k, d_model]` vector, else 1.
    pub fn rows(&self) -> usize {
        match &self.direction {
            Direction::Add(v) if v.rank() == 2 => v.dims()[0],
            _ => 1,
        }
    }

    /// Checks the hook and the width against `model`.
    pub fn check(&self, model: &Model) -> Result<()> {
        check_hook(model, self.hook)?;
        let d = model.config().d_model;
        match &self.direction {
            Direction::Add(v) => {
                let width = v.dims().last().copied().unwrap_or(0);
                if !(1..=2).contains(&v.rank()) || width != d || v.elem_count() == 0 {
                    return Err(CircuitError::Input(format!(
                        "a steering vector must be [d_model] or [k, d_model] with d_model {d}, \
                         got shape {:?}",
                        v.dims()
                    )));
                }
            }
            Direction::Clamp(c) => {
                check_sae(&c.sae, c.feature, d)?;
                check_finite("max_act", c.max_act)?;
            }
        }
        Ok(())
    }

    /// `hooks` with this steering added at its hook, scaled by `coef`, at `positions` of a
    /// sequence whose first `prompt_len` tokens are the prompt. Works across the steps of a
    /// KV-cached generation (each step's hook sees only its new positions, from
    /// `HookCtx::pos_offset` on). Listed positions past the end of a sequence are skipped; use
    /// [`Positions::check`] to refuse them instead.
    pub fn install<'a>(
        &'a self,
        hooks: Hooks<'a>,
        coef: f64,
        positions: &'a Positions,
        prompt_len: usize,
    ) -> Result<Hooks<'a>> {
        check_finite("coefficient", coef)?;
        let rows = self.rows();
        if rows > 1 && positions.listed() != Some(rows) {
            return Err(CircuitError::Input(format!(
                "a vector of {rows} rows (one per position, as ActAdd makes) needs exactly \
                 {rows} listed positions, got {positions:?}"
            )));
        }
        // The row each position of this step gets: None = not steered.
        let plan = move |ctx: &HookCtx, p: usize| -> Vec<Option<usize>> {
            (ctx.pos_offset..ctx.pos_offset + p)
                .map(|pos| {
                    positions
                        .slot(pos, prompt_len)
                        .map(|s| if rows == 1 { 0 } else { s })
                })
                .collect()
        };
        Ok(match &self.direction {
            Direction::Add(v) => {
                let d = match v.dims() {
                    [d] | [_, d] if *d > 0 => *d,
                    dims => {
                        return Err(CircuitError::Input(format!(
                            "a steering vector must be [d_model] or [k, d_model], got shape \
                             {dims:?}"
                        )))
                    }
                };
                // Row 0 is zeros (unsteered positions), rows 1.. are coef × the vector.
                let scaled = v
                    .to_dtype(DType::F32)?
                    .reshape((rows, d))?
                    .affine(coef, 0.0)?;
                let table = Tensor::cat(&[&scaled.zeros_like()?.narrow(0, 0, 1)?, &scaled], 0)?;
                hooks.with_hook(self.hook, move |x, ctx| {
                    let idx: Vec<u32> = plan(ctx, x.dim(1)?)
                        .iter()
                        .map(|r| r.map_or(0, |r| r as u32 + 1))
                        .collect();
                    if idx.iter().all(|&i| i == 0) {
                        return Ok(None);
                    }
                    let idx = Tensor::new(idx, x.device())?;
                    let delta = table.index_select(&idx, 0)?.to_dtype(x.dtype())?; // [p, d]
                    Ok(Some(x.broadcast_add(&delta)?))
                })
            }
            Direction::Clamp(c) => {
                check_sae(&c.sae, c.feature, c.sae.cfg.d_in)?;
                let target = coef * c.max_act;
                check_finite("clamped value (coefficient × max_act)", target)?;
                hooks.with_hook(self.hook, move |x, ctx| {
                    let (b, p, d) = x.dims3()?;
                    let mask: Vec<f32> = plan(ctx, p)
                        .iter()
                        .map(|r| if r.is_some() { 1.0 } else { 0.0 })
                        .collect();
                    if mask.iter().all(|&m| m == 0.0) {
                        return Ok(None);
                    }
                    let mask = Tensor::from_vec(mask, (1, p, 1), x.device())?;
                    let delta = clamp_delta(&c.sae, c.feature, target, x)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                    let delta = delta.reshape((b, p, d))?.broadcast_mul(&mask)?;
                    Ok(Some((x + delta.to_dtype(x.dtype())?)?))
                })
            }
        })
    }

    /// Fresh hooks with only this steering installed (see [`SteeringVector::install`]).
    pub fn hooks<'a>(
        &'a self,
        coef: f64,
        positions: &'a Positions,
        prompt_len: usize,
    ) -> Result<Hooks<'a>> {
        self.install(Hooks::new(), coef, positions, prompt_len)
    }
}

/// The change of the SAE's reconstruction of `x [b, p, d]` when latent `feature` is set to
/// `target`: `[b·p, d]`. Going through the decoder (rather than `W_dec[i]` alone) also undoes
/// a run-time input normalisation and a TopK decoder-norm rescaling.
fn clamp_delta(sae: &Sae, feature: usize, target: f64, x: &Tensor) -> Result<Tensor> {
    let (b, p, d) = x.dims3()?;
    let flat = x.reshape((b * p, d))?;
    let dict = |e: scalpel_dict::DictError| CircuitError::Input(e.to_string());
    let (f, norm) = sae.encode_with_norm(&flat).map_err(dict)?; // [n, d_sae]
    let change = f.narrow(1, feature, 1)?.affine(-1.0, target)?; // [n, 1]: target − f_i
    let mut onehot = vec![0f32; sae.cfg.d_sae];
    onehot[feature] = 1.0;
    let onehot = Tensor::from_vec(onehot, (1, sae.cfg.d_sae), f.device())?;
    let held = (&f + change.broadcast_mul(&onehot)?)?; // f with f_i = target
    let before = sae.decode_with_norm(&f, &norm).map_err(dict)?;
    let after = sae.decode_with_norm(&held, &norm).map_err(dict)?;
    Ok((after - before)?)
}

fn check_finite(what: &str, x: f64) -> Result<()> {
    if x.is_finite() {
        Ok(())
    } else {
        Err(CircuitError::Input(format!(
            "the {what} must be a finite number, got {x}"
        )))
    }
}

/// Refuses anything but a residual hook of a layer the model has.
pub fn check_hook(model: &Model, hook: HookPoint) -> Result<()> {
    let n = model.config().n_layers;
    if !hook.is_residual() {
        return Err(CircuitError::Input(format!(
            "steering adds to the residual stream: use blocks.L.hook_resid_pre, hook_resid_mid \
             or hook_resid_post, not {hook}"
        )));
    }
    match hook.layer() {
        Some(l) if l >= n => Err(CircuitError::Input(format!(
            "layer {l} is out of range: the model has layers 0..={}",
            n - 1
        ))),
        _ if !model.hook_points().contains(&hook) => Err(CircuitError::Input(format!(
            "the model has no {hook} (a model without MLPs has no hook_resid_mid); use \
             hook_resid_pre or hook_resid_post"
        ))),
        _ => Ok(()),
    }
}

fn check_sae(sae: &Sae, feature: usize, d_model: usize) -> Result<()> {
    let cfg = &sae.cfg;
    if cfg.architecture.is_transcoder() {
        return Err(CircuitError::Input(format!(
            "a {} writes to a different hook than it reads; steer with an SAE",
            cfg.architecture.name()
        )));
    }
    if cfg.d_in != d_model {
        return Err(CircuitError::Input(format!(
            "the dictionary reads vectors of width {} but the model's d_model is {d_model}",
            cfg.d_in
        )));
    }
    if feature >= cfg.d_sae {
        return Err(CircuitError::Input(format!(
            "feature {feature} is out of range: the dictionary has features 0..={}",
            cfg.d_sae - 1
        )));
    }
    Ok(())
}

/// The residual at `hook` (checked) for one sequence: `[p, d_model]` f32. Stops after the hook's
/// block.
pub fn residual(model: &Model, tokens: &[u32], hook: HookPoint) -> Result<Tensor> {
    check_hook(model, hook)?;
    if tokens.is_empty() {
        return Err(CircuitError::Input("an empty text has no residual".into()));
    }
    let layer = hook.layer().unwrap_or(0);
    let ids = Tensor::new(tokens, model.device())?.unsqueeze(0)?;
    let mut hooks = Hooks::new().with_cache_points([hook]);
    let opts = RunOptions {
        stop_at_layer: Some(layer + 1),
        ..Default::default()
    };
    model.forward_with(&ids, None, &mut hooks, opts)?;
    let x = hooks
        .take_cache()
        .remove(hook)
        .ok_or_else(|| CircuitError::Input(format!("{hook} was not cached")))?;
    Ok(x.squeeze(0)?.to_dtype(DType::F32)?)
}

/// ActAdd: `resid(positive) − resid(negative)` at `hook`, position by position: `[k, d_model]`
/// with `k` the longer prompt's length. The shorter prompt is padded at the end with `pad` (Turner
/// et al. pad with spaces), so both have `k` tokens. Add it with [`Positions::First`]`(k)`.
pub fn actadd(
    model: &Model,
    hook: HookPoint,
    positive: &[u32],
    negative: &[u32],
    pad: u32,
) -> Result<SteeringVector> {
    if positive.is_empty() || negative.is_empty() {
        return Err(CircuitError::Input(
            "ActAdd needs two non-empty prompts".into(),
        ));
    }
    if pad as usize >= model.config().d_vocab {
        return Err(CircuitError::Input(format!(
            "pad token {pad} is outside the vocabulary of {}",
            model.config().d_vocab
        )));
    }
    let k = positive.len().max(negative.len());
    let padded = |t: &[u32]| {
        let mut t = t.to_vec();
        t.resize(k, pad);
        t
    };
    let diff =
        (residual(model, &padded(positive), hook)? - residual(model, &padded(negative), hook)?)?;
    Ok(SteeringVector {
        hook,
        direction: Direction::Add(diff),
    })
}

/// One line of a contrastive-pairs JSONL file.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContrastPair {
    pub positive: String,
    pub negative: String,
}

/// Reads `{"positive": "...", "negative": "..."}` lines (blank lines skipped). An empty file is
/// an error; errors name the file and line.
pub fn read_contrast_pairs(path: &Path) -> Result<Vec<ContrastPair>> {
    crate::pairs::read_lines(
        path,
        r#"each line is {"positive": "...", "negative": "..."}"#,
        "contrastive pairs",
    )
}

/// The mean over `pairs` (token ids of a positive and a negative text) of the residual at `hook`
/// at the last token of the positive minus that of the negative: one `[d_model]` vector, to add
/// at every position.
pub fn mean_difference(
    model: &Model,
    hook: HookPoint,
    pairs: &[(Vec<u32>, Vec<u32>)],
) -> Result<SteeringVector> {
    if pairs.is_empty() {
        return Err(CircuitError::Input(
            "a mean difference needs at least one contrastive pair".into(),
        ));
    }
    let last = |t: &[u32]| -> Result<Tensor> {
        let x = residual(model, t, hook)?;
        Ok(x.get(x.dim(0)? - 1)?)
    };
    let mut sum = Tensor::zeros(model.config().d_model, DType::F32, model.device())?;
    for (pos, neg) in pairs {
        sum = (sum + (last(pos)? - last(neg)?)?)?;
    }
    Ok(SteeringVector {
        hook,
        direction: Direction::Add((sum / pairs.len() as f64)?),
    })
}

/// `max_act × W_dec[feature]` of a sparse autoencoder, added at `hook`.
pub fn sae_decoder_row(
    sae: &Sae,
    feature: usize,
    max_act: f64,
    hook: HookPoint,
) -> Result<SteeringVector> {
    check_sae(sae, feature, sae.cfg.d_in)?;
    check_finite("max_act", max_act)?;
    let w_dec = sae
        .tensor("W_dec")
        .ok_or_else(|| CircuitError::Input("the dictionary has no W_dec".into()))?;
    Ok(SteeringVector {
        hook,
        direction: Direction::Add(w_dec.get(feature)?.affine(max_act, 0.0)?),
    })
}

/// Holds latent `feature` of `sae` at `coef × max_act` wherever it steers.
pub fn sae_clamp(
    sae: Sae,
    feature: usize,
    max_act: f64,
    hook: HookPoint,
) -> Result<SteeringVector> {
    check_sae(&sae, feature, sae.cfg.d_in)?;
    check_finite("max_act", max_act)?;
    Ok(SteeringVector {
        hook,
        direction: Direction::Clamp(Box::new(FeatureClamp {
            sae,
            feature,
            max_act,
        })),
    })
}

/// The largest activation of latent `feature` over every position of `texts`, with the SAE
/// reading `hook`.
pub fn max_activation(
    model: &Model,
    sae: &Sae,
    hook: HookPoint,
    feature: usize,
    texts: &[Vec<u32>],
) -> Result<f64> {
    check_sae(sae, feature, model.config().d_model)?;
    let mut best = f64::NEG_INFINITY;
    for t in texts {
        let f = sae
            .encode(&residual(model, t, hook)?)
            .map_err(|e| CircuitError::Input(e.to_string()))?;
        let m = f.narrow(1, feature, 1)?.max_all()?.to_scalar::<f32>()? as f64;
        best = best.max(m);
    }
    if best == f64::NEG_INFINITY {
        return Err(CircuitError::Input(
            "no text to measure the feature's maximum activation on".into(),
        ));
    }
    Ok(best)
}

/// Continues `prompt` with the steering active: `coef × vector` at `positions` (checked against
/// the prompt), at every step of a KV-cached generation.
pub fn steer_generate(
    model: &Model,
    prompt: &[u32],
    vector: &SteeringVector,
    coef: f64,
    positions: &Positions,
    opts: &GenerateOptions,
) -> Result<Generation> {
    vector.check(model)?;
    positions.check(prompt.len())?;
    let mut hooks = vector.hooks(coef, positions, prompt.len())?;
    Ok(generate(model, prompt, opts, &mut hooks, |_| {})?)
}

/// The mean log-probability of the tokens of `target` following `prompt`, read in one forward
/// pass of `prompt ++ target` with `hooks` (target tokens stand where generated tokens would).
pub fn target_logprob(
    model: &Model,
    hooks: &mut Hooks,
    prompt: &[u32],
    target: &[u32],
) -> Result<f64> {
    if prompt.is_empty() || target.is_empty() {
        return Err(CircuitError::Input(
            "a target log-probability needs a prompt and a target of at least one token each"
                .into(),
        ));
    }
    let seq: Vec<u32> = prompt.iter().chain(target).copied().collect();
    let ids = Tensor::new(seq.as_slice(), model.device())?.unsqueeze(0)?;
    let logits = model.run_with_hooks(&ids, hooks)?.squeeze(0)?; // [p, v]
    let lp = log_softmax64(&logits.narrow(0, prompt.len() - 1, target.len())?)?; // [t, v]
    let idx = Tensor::new(target, model.device())?.unsqueeze(1)?;
    Ok(lp.gather(&idx, 1)?.mean_all()?.to_scalar::<f64>()?)
}

fn log_softmax64(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(
        &logits.to_dtype(DType::F64)?,
        D::Minus1,
    )?)
}

/// What [`sweep`] measures besides the side effects.
#[derive(Debug, Clone, Default)]
pub struct SweepInput<'a> {
    /// The prompt steered positions refer to.
    pub prompt: &'a [u32],
    /// A continuation of the prompt whose mean log-probability is the target effect.
    pub target: Option<&'a [u32]>,
    /// Generate from the prompt at each coefficient with these options.
    pub generate: Option<GenerateOptions>,
    /// Unrelated text, in windows, for the side effects. In each window, `All` and `Generated`
    /// steer every position (the text stands for generated text) and listed positions count
    /// from the window's start (skipped where the window is shorter).
    pub heldout: &'a [Vec<u32>],
}

impl SweepInput<'_> {
    /// The forward passes or generations [`sweep`] reports through its callback for `n_coefs`
    /// coefficients.
    pub fn steps(&self, n_coefs: usize) -> usize {
        (n_coefs + 1)
            * (self.heldout.len()
                + usize::from(self.target.is_some())
                + usize::from(self.generate.is_some()))
    }
}

/// One coefficient's measurements.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepPoint {
    pub coef: f64,
    /// Mean log-probability of the target continuation.
    pub target_logprob: Option<f64>,
    /// Mean over held-out positions of `KL(unsteered ‖ steered)` of the next-token
    /// distributions, in nats.
    pub kl: f64,
    /// Cross-entropy loss on the held-out text, in nats per token.
    pub loss: f64,
    /// Generated tokens.
    pub tokens: Option<Vec<u32>>,
}

/// The result of [`sweep`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sweep {
    pub hook: HookPoint,
    pub positions: Positions,
    /// Held-out positions the KL is averaged over.
    pub heldout_tokens: usize,
    /// The model with no hooks at all (`kl` 0).
    pub unsteered: SweepPoint,
    pub points: Vec<SweepPoint>,
}

/// Runs each of `coefs` and measures the target effect, the side effects on held-out text and
/// (optionally) the generation. `on_step` is called after each unit of work (see
/// [`SweepInput::steps`]).
pub fn sweep(
    model: &Model,
    vector: &SteeringVector,
    positions: &Positions,
    coefs: &[f64],
    input: &SweepInput,
    mut on_step: impl FnMut(),
) -> Result<Sweep> {
    vector.check(model)?;
    positions.check(input.prompt.len())?;
    if coefs.is_empty() {
        return Err(CircuitError::Input("no coefficients to sweep".into()));
    }
    for &c in coefs {
        check_finite("coefficient", c)?;
    }
    if input.heldout.iter().all(|w| w.len() < 2) {
        return Err(CircuitError::Input(
            "the held-out text needs at least two tokens".into(),
        ));
    }
    // Checks rows against positions once, before any work.
    vector.hooks(0.0, positions, input.prompt.len())?;
    let n = coefs.len();
    let dev = model.device();

    // Side effects, window by window so that only one window's distributions are held.
    let (mut kl, mut nll) = (vec![0f64; n], vec![0f64; n]);
    let (mut nll_unsteered, mut positions_seen, mut predicted) = (0f64, 0usize, 0usize);
    for w in input.heldout.iter().filter(|w| w.len() >= 2) {
        let ids = Tensor::new(w.as_slice(), dev)?.unsqueeze(0)?;
        let next = Tensor::new(&w[1..], dev)?.unsqueeze(1)?; // [p-1, 1]
        let nll_of = |lp: &Tensor| -> Result<f64> {
            let picked = lp.narrow(0, 0, w.len() - 1)?.gather(&next, 1)?;
            Ok(-picked.sum_all()?.to_scalar::<f64>()?)
        };
        let base = log_softmax64(&model.forward(&ids)?.squeeze(0)?)?; // [p, v]
        let base_p = base.exp()?;
        nll_unsteered += nll_of(&base)?;
        on_step();
        for (i, &c) in coefs.iter().enumerate() {
            let mut hooks = vector.hooks(c, positions, 0)?;
            let lp = log_softmax64(&model.run_with_hooks(&ids, &mut hooks)?.squeeze(0)?)?;
            kl[i] += (&base_p * (&base - &lp)?)?.sum_all()?.to_scalar::<f64>()?;
            nll[i] += nll_of(&lp)?;
            on_step();
        }
        positions_seen += w.len();
        predicted += w.len() - 1;
    }

    let (t, g) = measure(model, input, || Ok(Hooks::new()), &mut on_step)?;
    let unsteered = SweepPoint {
        coef: 0.0,
        target_logprob: t,
        kl: 0.0,
        loss: nll_unsteered / predicted as f64,
        tokens: g,
    };
    let mut points = Vec::with_capacity(n);
    for (i, &c) in coefs.iter().enumerate() {
        let steered = || vector.hooks(c, positions, input.prompt.len());
        let (t, g) = measure(model, input, steered, &mut on_step)?;
        points.push(SweepPoint {
            coef: c,
            target_logprob: t,
            kl: kl[i] / positions_seen as f64,
            loss: nll[i] / predicted as f64,
            tokens: g,
        });
    }
    Ok(Sweep {
        hook: vector.hook,
        positions: positions.clone(),
        heldout_tokens: positions_seen,
        unsteered,
        points,
    })
}

/// The target log-probability and the generation of one setting, each with fresh hooks from
/// `make`.
fn measure<'h>(
    model: &Model,
    input: &SweepInput,
    make: impl Fn() -> Result<Hooks<'h>>,
    on_step: &mut impl FnMut(),
) -> Result<(Option<f64>, Option<Vec<u32>>)> {
    let mut target = None;
    if let Some(t) = input.target {
        target = Some(target_logprob(model, &mut make()?, input.prompt, t)?);
        on_step();
    }
    let mut tokens = None;
    if let Some(o) = &input.generate {
        tokens = Some(generate(model, input.prompt, o, &mut make()?, |_| {})?.tokens);
        on_step();
    }
    Ok((target, tokens))
}

/// Splits `tokens` into windows of at most `size` tokens (the last may be shorter), each
/// starting with `bos` when given, for [`SweepInput::heldout`].
pub fn windows(tokens: &[u32], size: usize, bos: Option<u32>) -> Result<Vec<Vec<u32>>> {
    let body = size.saturating_sub(usize::from(bos.is_some()));
    if body < 1 {
        return Err(CircuitError::Input(format!(
            "windows of {size} tokens leave no room for text"
        )));
    }
    let tokens: Vec<u32> = match bos {
        Some(b) => tokens.iter().copied().filter(|&t| t != b).collect(),
        None => tokens.to_vec(),
    };
    Ok(tokens
        .chunks(body)
        .map(|c| bos.into_iter().chain(c.iter().copied()).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_positions_across_steps() {
        let p = 4; // prompt length
        let all: Vec<_> = (0..7).map(|i| Positions::All.slot(i, p)).collect();
        assert!(all.iter().all(|s| *s == Some(0)));
        let gen: Vec<_> = (0..7).map(|i| Positions::Generated.slot(i, p)).collect();
        assert_eq!(gen, [None, None, None, None, Some(0), Some(0), Some(0)]);
        let first: Vec<_> = (0..5).map(|i| Positions::First(2).slot(i, p)).collect();
        assert_eq!(first, [Some(0), Some(1), None, None, None]);
        let list: Vec<_> = (0..5)
            .map(|i| Positions::List(vec![3, 1]).slot(i, p))
            .collect();
        assert_eq!(list, [None, Some(1), None, Some(0), None]);
    }

    #[test]
    fn positions_outside_the_prompt_are_refused() {
        assert!(Positions::First(3).check(3).is_ok());
        let e = Positions::First(4).check(3).unwrap_err().to_string();
        assert!(e.contains("first 4") && e.contains("only 3"), "{e}");
        let e = Positions::List(vec![0, 5])
            .check(3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("position 5") && e.contains("0..=2"), "{e}");
        assert!(Positions::List(vec![1, 1]).check(3).is_err());
        assert!(Positions::List(vec![]).check(3).is_err());
        assert!(Positions::First(0).check(3).is_err());
        assert!(Positions::Generated.check(0).is_ok());
    }

    #[test]
    fn windows_start_with_bos() {
        let w = windows(&[9, 1, 2, 3, 4, 5], 3, Some(9)).unwrap();
        assert_eq!(w, vec![vec![9, 1, 2], vec![9, 3, 4], vec![9, 5]]);
        let w = windows(&[1, 2, 3], 2, None).unwrap();
        assert_eq!(w, vec![vec![1, 2], vec![3]]);
        assert!(windows(&[1], 1, Some(0)).is_err());
    }
}
