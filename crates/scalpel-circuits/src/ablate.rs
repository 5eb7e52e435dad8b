//! Ablation: knock components out of the forward pass and measure what the model loses, as in
//! Wang et al. 2022 ("Interpretability in the Wild", <https://arxiv.org/abs/2211.00593>) and
//! TransformerLens's ablation helpers.
//!
//! - [`Target`]: what is ablated: an attention head (its slice of `blocks.L.attn.hook_z`), an MLP
//!   neuron (`blocks.L.mlp.hook_post`), a whole MLP (`blocks.L.hook_mlp_out`), a whole attention
//!   layer (`blocks.L.hook_attn_out`) or a latent of a sparse autoencoder ([`LatentSae`]).
//! - [`Method`]: what replaces it: zero; its mean over reference sequences; or its value at the
//!   same position of another prompt (a pair's corrupt prompt, or another clean prompt).
//! - [`ablate`] ablates targets together, [`rank`] each on its own. Both report the mean
//!   [`Metric`] over prompt pairs' clean prompts and the next-token loss over held-out text, with
//!   and without the ablation.
//!
//! An SAE latent is ablated inside the activation: the SAE encodes it, the latent's value is
//! replaced and the decoded difference, `(new − old)·W_dec[latent]`, is added to the activation,
//! so the SAE's reconstruction error stays where it was and only that one direction changes.
//!
//! Sequences of equal length run in one forward pass (split past [`MAX_BATCH_TOKENS`]), sequences
//! of different lengths in separate ones. Ablated runs start from the cached residual stream that
//! enters the first ablated block, since nothing below it changes; `tests/ablate.rs` compares
//! this with full forward passes edited by hand.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::ops::Range;

use candle_core::{DType, Tensor, D};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use scalpel_core::{BlockHook, HookPoint, Hooks};
use scalpel_dict::{InputNorm, Sae};
use scalpel_models::config::Config;
use scalpel_models::transformer::{Model, RunOptions};
use serde::Serialize;

use crate::metric::Metric;
use crate::pairs::TokenPair;
use crate::{CircuitError, Result};

/// Most tokens in one forward pass (whole sequences; a longer sequence runs alone). Bounds the
/// memory of the logits (`[tokens, d_vocab]`) and of cached activations.
pub const MAX_BATCH_TOKENS: usize = 1024;

/// The target syntax, for error messages.
const SYNTAX: &str = "expected `L5H3` or `5.3` (head 3 of layer 5), `L5N1024` or `n5.1024` \
                      (neuron 1024 of layer 5's MLP), `mlp5` (layer 5's MLP), `attn5` (layer 5's \
                      attention) or `sae:123` (latent 123 of the SAE)";

/// A component to ablate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// An attention head: its slice `[.., head, :]` of `blocks.{layer}.attn.hook_z`
    /// `[b, p, n_heads, d_head]`, so its output through `W_O` (and nothing else) changes.
    Head { layer: usize, head: usize },
    /// One MLP neuron: its entry of `blocks.{layer}.mlp.hook_post` `[b, p, d_mlp]`.
    Neuron { layer: usize, neuron: usize },
    /// A whole MLP: `blocks.{layer}.hook_mlp_out` `[b, p, d_model]`.
    Mlp { layer: usize },
    /// A whole attention layer, output bias included: `blocks.{layer}.hook_attn_out`.
    Attn { layer: usize },
    /// A latent of the [`LatentSae`] given alongside.
    Latent { latent: usize },
}

impl Target {
    /// Parses a target, case-insensitively:
    /// - `L5H3` or `5.3`: head 3 of layer 5;
    /// - `L5N1024` or `n5.1024`: neuron 1024 of layer 5's MLP;
    /// - `mlp5`, `attn5`: layer 5's whole MLP or attention;
    /// - `sae:123`: latent 123 of `sae`.
    ///
    /// Unknown syntax and indices outside the model (or the SAE) are errors that give the valid
    /// ranges.
    pub fn parse(text: &str, cfg: &Config, sae: Option<&LatentSae>) -> Result<Target> {
        let target = parse_syntax(&text.trim().to_ascii_lowercase())
            .ok_or_else(|| CircuitError::Input(format!("unknown target `{text}`: {SYNTAX}")))?;
        target
            .check(cfg, sae)
            .map_err(|why| CircuitError::Input(format!("target `{text}`: {why}")))?;
        Ok(target)
    }

    /// Every attention head, layer by layer (`L0H0, L0H1, …`).
    pub fn all_heads(cfg: &Config) -> Vec<Target> {
        (0..cfg.n_layers)
            .flat_map(|layer| (0..cfg.n_heads).map(move |head| Target::Head { layer, head }))
            .collect()
    }

    /// Why this target does not exist in the model (or the SAE), if it does not.
    fn check(self, cfg: &Config, sae: Option<&LatentSae>) -> std::result::Result<(), String> {
        let range = |n: usize| match n {
            0 => "none".to_string(),
            n => format!("0 to {}", n - 1),
        };
        if let Target::Head { layer, .. }
        | Target::Neuron { layer, .. }
        | Target::Mlp { layer }
        | Target::Attn { layer } = self
        {
            if layer >= cfg.n_layers {
                return Err(format!(
                    "layer {layer} is out of range: the model has {} layers ({})",
                    cfg.n_layers,
                    range(cfg.n_layers)
                ));
            }
        }
        match self {
            Target::Head { head, .. } if head >= cfg.n_heads => Err(format!(
                "head {head} is out of range: the model has {} heads per layer ({})",
                cfg.n_heads,
                range(cfg.n_heads)
            )),
            Target::Neuron { .. } | Target::Mlp { .. } if cfg.mlp.is_none() => {
                Err("the model has no MLPs (it is attention-only)".into())
            }
            Target::Neuron { neuron, .. } if neuron >= cfg.d_mlp => Err(format!(
                "neuron {neuron} is out of range: d_mlp is {} ({})",
                cfg.d_mlp,
                range(cfg.d_mlp)
            )),
            Target::Latent { latent } => match sae {
                None => Err("it names an SAE latent, but no SAE was given".into()),
                Some(s) if latent >= s.sae.cfg.d_sae => Err(format!(
                    "latent {latent} is out of range: the SAE has d_sae {} ({})",
                    s.sae.cfg.d_sae,
                    range(s.sae.cfg.d_sae)
                )),
                Some(_) => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// The hook point whose activation is edited.
    fn point(self, sae: Option<&LatentSae>) -> Result<HookPoint> {
        Ok(match self {
            Target::Head { layer, .. } => HookPoint::block(layer, BlockHook::Z),
            Target::Neuron { layer, .. } => HookPoint::block(layer, BlockHook::MlpPost),
            Target::Mlp { layer } => HookPoint::block(layer, BlockHook::MlpOut),
            Target::Attn { layer } => HookPoint::block(layer, BlockHook::AttnOut),
            Target::Latent { .. } => {
                sae.ok_or_else(|| {
                    CircuitError::Input(format!("target {self} needs an SAE, and none was given"))
                })?
                .point
            }
        })
    }

    /// The shape of this target's component after `[b, p]`: `[1, d_head]` for a head, `[1]` for
    /// a neuron or latent, `[d_model]` for a whole layer. The `1` keeps the sliced axis.
    fn component_dims(self, cfg: &Config) -> Vec<usize> {
        match self {
            Target::Head { .. } => vec![1, cfg.d_head],
            Target::Neuron { .. } | Target::Latent { .. } => vec![1],
            Target::Mlp { .. } | Target::Attn { .. } => vec![cfg.d_model],
        }
    }
}

fn parse_syntax(t: &str) -> Option<Target> {
    let num = |s: &str| -> Option<usize> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let two = |s: &str, sep: char| -> Option<(usize, usize)> {
        let (a, b) = s.split_once(sep)?;
        Some((num(a)?, num(b)?))
    };
    if let Some(rest) = t.strip_prefix("sae:") {
        return Some(Target::Latent {
            latent: num(rest.trim())?,
        });
    }
    if let Some(rest) = t.strip_prefix("mlp") {
        return Some(Target::Mlp { layer: num(rest)? });
    }
    if let Some(rest) = t.strip_prefix("attn") {
        return Some(Target::Attn { layer: num(rest)? });
    }
    if let Some(rest) = t.strip_prefix('l') {
        if let Some((layer, head)) = two(rest, 'h') {
            return Some(Target::Head { layer, head });
        }
        let (layer, neuron) = two(rest, 'n')?;
        return Some(Target::Neuron { layer, neuron });
    }
    if let Some(rest) = t.strip_prefix('n') {
        let (layer, neuron) = two(rest, '.')?;
        return Some(Target::Neuron { layer, neuron });
    }
    let (layer, head) = two(t, '.')?;
    Some(Target::Head { layer, head })
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Head { layer, head } => write!(f, "L{layer}H{head}"),
            Target::Neuron { layer, neuron } => write!(f, "L{layer}N{neuron}"),
            Target::Mlp { layer } => write!(f, "mlp{layer}"),
            Target::Attn { layer } => write!(f, "attn{layer}"),
            Target::Latent { latent } => write!(f, "sae:{latent}"),
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A sparse autoencoder and the hook point it reads and writes, whose latents can be ablated.
#[derive(Debug, Clone)]
pub struct LatentSae {
    pub sae: Sae,
    pub point: HookPoint,
}

impl LatentSae {
    /// Checks `sae` against `model`: its hook (`hook`, else the SAE's `metadata.hook_name`) must
    /// be one of the model's per-position activations with `d_in` values per position (a
    /// `hook_z` SAE reads `n_heads·d_head`), and every weight must be finite. Transcoders, which
    /// write another hook than they read, are refused.
    pub fn new(model: &Model, sae: Sae, hook: Option<&str>) -> Result<LatentSae> {
        if sae.cfg.architecture.is_transcoder() {
            return Err(CircuitError::Input(format!(
                "a {} dictionary writes another hook than it reads; latent ablation needs an SAE",
                sae.cfg.architecture.name()
            )));
        }
        let name = hook
            .or(sae.cfg.metadata.hook_name.as_deref())
            .ok_or_else(|| {
                CircuitError::Input(
                    "the SAE does not say which hook it reads (no metadata.hook_name): give one"
                        .into(),
                )
            })?;
        let point = HookPoint::parse_for(name, &model.hook_points())
            .map_err(|e| CircuitError::Input(format!("the SAE's hook: {e}")))?;
        if matches!(
            point,
            HookPoint::Block(_, BlockHook::AttnScores | BlockHook::Pattern)
        ) {
            return Err(CircuitError::Input(format!(
                "the SAE's hook {point} is indexed by query and key positions, not one position"
            )));
        }
        let width: usize = model.hook_shape(point, 1, 1)[2..].iter().product();
        if width != sae.cfg.d_in {
            return Err(CircuitError::Input(format!(
                "the SAE reads {} values per position (d_in) but {point} holds {width}",
                sae.cfg.d_in
            )));
        }
        for (name, t) in sae.named_tensors() {
            let bad = t
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .filter(|x| !x.is_finite())
                .count();
            if bad > 0 {
                return Err(CircuitError::Input(format!(
                    "the SAE's {name} holds {bad} NaN or infinite values"
                )));
            }
        }
        Ok(LatentSae { sae, point })
    }

    /// Latent activations `[b·p, d_sae]` of an activation `[b, p, ..]` at the SAE's hook, and
    /// what decoding needs to undo the SAE's input normalisation.
    fn encode(&self, act: &Tensor) -> Result<(Tensor, InputNorm)> {
        let rows = act.dim(0)? * act.dim(1)?;
        let x = act.reshape((rows, self.sae.cfg.d_in))?;
        self.sae
            .encode_with_norm(&x)
            .map_err(|e| CircuitError::Input(format!("the SAE at {}: {e}", self.point)))
    }

    fn decode(&self, f: &Tensor, norm: &InputNorm) -> Result<Tensor> {
        self.sae
            .decode_with_norm(f, norm)
            .map_err(|e| CircuitError::Input(format!("the SAE at {}: {e}", self.point)))
    }
}

/// What replaces an ablated component.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Zero.
    Zero,
    /// The component's mean over reference sequences: over every position of every sequence,
    /// each token counting once. Computed once, from unablated runs.
    Mean(Reference),
    /// The component's value at the same position of another sequence, from an unablated run.
    Resample(Source),
}

/// The sequences a [`Method::Mean`] averages over.
#[derive(Debug, Clone, PartialEq)]
pub enum Reference {
    /// The clean prompts of the pairs measured.
    CleanPrompts,
    /// Any token sequences, e.g. a text corpus cut into contexts.
    Sequences(Vec<Vec<u32>>),
}

/// Where a [`Method::Resample`] takes its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Each pair's corrupt prompt (TransformerLens's "resample from the corrupted distribution").
    /// Held-out text has no corrupt version: its sequences resample from one another as with
    /// `Other { seed: 0 }`.
    Corrupt,
    /// Another sequence of the same set, drawn with `seed` among those at least as long; its
    /// first `p` positions are used (a causal model's activations there do not see the rest).
    Other { seed: u64 },
}

/// What an ablation is measured on; at least one must be given.
#[derive(Debug, Clone, Copy, Default)]
pub struct Data<'a> {
    /// Prompt pairs, and the metric read at the last position of their clean prompts.
    pub pairs: Option<(&'a [TokenPair], &'a Metric)>,
    /// Held-out token sequences for the next-token loss, each at least 2 tokens.
    pub text: Option<&'a [Vec<u32>]>,
}

/// A measurement without and with the ablation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Change {
    pub clean: f64,
    pub ablated: f64,
    /// `ablated − clean`.
    pub change: f64,
}

/// What ablating some targets together did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Effect {
    pub targets: Vec<Target>,
    /// The metric averaged over the clean prompts, when pairs were given.
    pub metric: Option<Change>,
    /// The next-token cross-entropy (nats) averaged over every predicted position of the
    /// held-out text, when text was given.
    pub loss: Option<Change>,
}

/// Ablates `targets` together (none: the unablated model) and measures the effect on `data`.
pub fn ablate(
    model: &Model,
    targets: &[Target],
    method: &Method,
    sae: Option<&LatentSae>,
    data: Data,
) -> Result<Effect> {
    let mut effects =
        Prepared::new(model, targets, method, sae, data)?.effects(&[targets], |_, _| {})?;
    Ok(effects.remove(0))
}

/// Ablates each of `targets` on its own (the unablated runs, means and resampling sources are
/// computed once, and several targets share a forward pass); effects come in the order of
/// `targets`. `on_progress(done, total)` counts target-batch runs.
pub fn rank(
    model: &Model,
    targets: &[Target],
    method: &Method,
    sae: Option<&LatentSae>,
    data: Data,
    on_progress: impl FnMut(usize, usize),
) -> Result<Vec<Effect>> {
    let groups: Vec<&[Target]> = targets.iter().map(std::slice::from_ref).collect();
    Prepared::new(model, targets, method, sae, data)?.effects(&groups, on_progress)
}

/// One forward pass's worth of sequences of one length.
struct Batch {
    /// Indices into the set's sequences.
    idx: Vec<usize>,
    /// `[b, p]`
    tokens: Tensor,
    /// The residual stream entering block `l` in the unablated run `[b, p, d_model]`, for every
    /// `l > 0` an ablated run may start at.
    resid_pre: HashMap<usize, Tensor>,
    /// Resampling: each target's component in the source sequences `[b, p, ..]`.
    source: HashMap<Target, Tensor>,
}

/// What a set of sequences measures.
enum Measure<'a> {
    /// The metric at the last position of each clean prompt.
    Metric {
        pairs: &'a [TokenPair],
        metric: &'a Metric,
    },
    /// The next-token loss at every position.
    Loss,
}

struct Set<'a> {
    measure: Measure<'a>,
    batches: Vec<Batch>,
    /// Prompts (metric) or predicted positions (loss) the sums are divided by.
    count: usize,
    /// The unablated mean.
    clean: f64,
}

/// Everything that does not depend on which targets are ablated.
struct Prepared<'a> {
    model: &'a Model,
    sae: Option<&'a LatentSae>,
    points: HashMap<Target, HookPoint>,
    /// Replacements the same for every batch (zero, mean), `[1, 1, ..]`.
    fixed: HashMap<Target, Tensor>,
    sets: Vec<Set<'a>>,
}

impl<'a> Prepared<'a> {
    fn new(
        model: &'a Model,
        targets: &[Target],
        method: &Method,
        sae: Option<&'a LatentSae>,
        data: Data<'a>,
    ) -> Result<Self> {
        let cfg = model.config();
        check_data(&data, method)?;
        let mut points = HashMap::new();
        for &t in targets {
            t.check(cfg, sae)
                .map_err(|why| CircuitError::Input(format!("target {t}: {why}")))?;
            points.insert(t, t.point(sae)?);
        }
        let fixed = match method {
            Method::Zero => points
                .keys()
                .map(|&t| {
                    let mut dims = vec![1, 1];
                    dims.extend(t.component_dims(cfg));
                    Ok((t, Tensor::zeros(dims, DType::F32, model.device())?))
                })
                .collect::<Result<_>>()?,
            Method::Mean(reference) => {
                let seqs: Vec<&[u32]> = match (reference, data.pairs) {
                    (Reference::CleanPrompts, Some((pairs, _))) => {
                        pairs.iter().map(|p| p.clean.as_slice()).collect()
                    }
                    (Reference::CleanPrompts, None) => {
                        return Err(CircuitError::Input(
                            "a mean over the clean prompts needs prompt pairs".into(),
                        ))
                    }
                    (Reference::Sequences(s), _) => s.iter().map(Vec::as_slice).collect(),
                };
                if seqs.is_empty() {
                    return Err(CircuitError::Input(
                        "the mean's reference set holds no sequences".into(),
                    ));
                }
                if let Some(i) = seqs.iter().position(|s| s.is_empty()) {
                    return Err(CircuitError::Input(format!(
                        "reference sequence {} of the mean is empty",
                        i + 1
                    )));
                }
                means(model, &seqs, &points, sae)?
            }
            Method::Resample(_) => HashMap::new(),
        };
        let mut prepared = Prepared {
            model,
            sae,
            points,
            fixed,
            sets: Vec::new(),
        };
        let resample = match method {
            Method::Resample(s) => Some(*s),
            _ => None,
        };
        if let Some((pairs, metric)) = data.pairs {
            let seqs: Vec<&[u32]> = pairs.iter().map(|p| p.clean.as_slice()).collect();
            let sources = match resample {
                None => None,
                Some(Source::Corrupt) => Some(pairs.iter().map(|p| p.corrupt.clone()).collect()),
                Some(Source::Other { seed }) => Some(others(&seqs, seed, "prompt")?),
            };
            let measure = Measure::Metric { pairs, metric };
            let set = prepared.set(&seqs, sources, measure, pairs.len())?;
            prepared.sets.push(set);
        }
        if let Some(text) = data.text {
            let seqs: Vec<&[u32]> = text.iter().map(Vec::as_slice).collect();
            let sources = match resample {
                None => None,
                Some(Source::Corrupt) => Some(others(&seqs, 0, "text sequence")?),
                Some(Source::Other { seed }) => Some(others(&seqs, seed, "text sequence")?),
            };
            let positions = seqs.iter().map(|s| s.len() - 1).sum();
            let set = prepared.set(&seqs, sources, Measure::Loss, positions)?;
            prepared.sets.push(set);
        }
        Ok(prepared)
    }

    /// Batches `seqs`, runs them unablated (keeping the residual streams ablated runs start
    /// from) and, when resampling, runs `sources` to keep every target's component.
    fn set(
        &self,
        seqs: &[&[u32]],
        sources: Option<Vec<Vec<u32>>>,
        measure: Measure<'a>,
        count: usize,
    ) -> Result<Set<'a>> {
        let starts: HashSet<HookPoint> = self
            .points
            .values()
            .filter_map(|p| p.layer())
            .filter(|&l| l > 0)
            .map(HookPoint::resid_pre)
            .collect();
        let by_point = by_point(&self.points);
        let mut set = Set {
            measure,
            batches: Vec::new(),
            count,
            clean: 0.0,
        };
        let mut total = 0.0;
        for idx in batches(seqs) {
            let tokens = stack(self.model, seqs, &idx)?;
            let mut hooks = Hooks::new().with_cache_points(starts.iter().copied());
            let logits = self.forward(set.measure.last_only(), &tokens, None, &mut hooks)?;
            let cache = hooks.take_cache();
            let resid_pre = starts
                .iter()
                .filter_map(|&p| Some((p.layer()?, cache.get(p)?.clone())))
                .collect();
            let mut source = HashMap::new();
            if let Some(sources) = &sources {
                let seqs: Vec<&[u32]> = sources.iter().map(Vec::as_slice).collect();
                let src_tokens = stack(self.model, &seqs, &idx)?;
                let (_, cache) = self
                    .model
                    .run_with_cache(&src_tokens, |p| by_point.contains_key(&p))?;
                for (point, ts) in &by_point {
                    let act = cached(&cache, *point)?;
                    source.extend(ts.iter().copied().zip(components(ts, act, self.sae)?));
                }
            }
            let batch = Batch {
                idx,
                tokens,
                resid_pre,
                source,
            };
            total += set.score(&batch, &logits)?;
            set.batches.push(batch);
        }
        set.clean = total / count as f64;
        Ok(set)
    }

    /// The effect of ablating each of `groups` (each a set of targets ablated together). Several
    /// groups share one forward pass: the batch is repeated along the batch axis, each copy with
    /// its own ablation, up to [`MAX_BATCH_TOKENS`] (one copy per pass is the plain path).
    /// `on_progress(done, total)` counts group-batch runs.
    fn effects(
        &self,
        groups: &[&[Target]],
        mut on_progress: impl FnMut(usize, usize),
    ) -> Result<Vec<Effect>> {
        if let Some(t) = groups
            .iter()
            .flat_map(|g| g.iter())
            .find(|t| !self.points.contains_key(t))
        {
            return Err(CircuitError::Input(format!(
                "target {t} was not among the targets prepared"
            )));
        }
        // Groups that start at the same block share passes.
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|&g| self.start(groups[g]));
        let mut effects: Vec<Effect> = groups
            .iter()
            .map(|g| Effect {
                targets: g.to_vec(),
                metric: None,
                loss: None,
            })
            .collect();
        let total: usize = self.sets.iter().map(|s| s.batches.len()).sum::<usize>() * groups.len();
        let mut done = 0;
        for set in &self.sets {
            let mut sums = vec![0.0; groups.len()];
            for batch in &set.batches {
                let (b, p) = batch.tokens.dims2()?;
                let copies = (MAX_BATCH_TOKENS / (b * p)).max(1);
                for chunk in order.chunks(copies) {
                    let chunk_groups: Vec<&[Target]> = chunk.iter().map(|&g| groups[g]).collect();
                    let last_only = set.measure.last_only();
                    let logits = self.ablated_logits(batch, &chunk_groups, last_only)?;
                    for (j, &g) in chunk.iter().enumerate() {
                        sums[g] += set.score(batch, &logits.narrow(0, j * b, b)?)?;
                    }
                    done += chunk.len();
                    on_progress(done, total);
                }
            }
            for (effect, sum) in effects.iter_mut().zip(sums) {
                let ablated = sum / set.count as f64;
                let change = Some(Change {
                    clean: set.clean,
                    ablated,
                    change: ablated - set.clean,
                });
                match set.measure {
                    Measure::Metric { .. } => effect.metric = change,
                    Measure::Loss => effect.loss = change,
                }
            }
        }
        Ok(effects)
    }

    /// The first block an ablation of `targets` changes (0 when it may change the embeddings).
    fn start(&self, targets: &[Target]) -> usize {
        targets
            .iter()
            .map(|t| self.points[t].layer().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    /// Logits of `batch` repeated `k = groups.len()` times, copy `j` with the targets of
    /// `groups[j]` ablated: `[k·b, p, d_vocab]`, or `[k·b, 1, d_vocab]` with `last_only` (see
    /// [`Prepared::forward`]).
    fn ablated_logits(
        &self,
        batch: &Batch,
        groups: &[&[Target]],
        last_only: bool,
    ) -> Result<Tensor> {
        let (k, b) = (groups.len(), batch.tokens.dim(0)?);
        // Per hook point, what each copy replaces there.
        let mut at: BTreeMap<HookPoint, Vec<Vec<(Target, &Tensor)>>> = BTreeMap::new();
        for (j, group) in groups.iter().enumerate() {
            for t in group.iter() {
                let fill = self
                    .fixed
                    .get(t)
                    .or_else(|| batch.source.get(t))
                    .expect("every prepared target has a replacement");
                at.entry(self.points[t])
                    .or_insert_with(|| vec![Vec::new(); k])[j]
                    .push((*t, fill));
            }
        }
        let sae = self.sae;
        let mut hooks = Hooks::new();
        for (point, items) in at {
            hooks = hooks.with_hook(point, move |x, _| {
                let edit = || -> Result<Tensor> {
                    if k == 1 {
                        return replace(x, &items[0], sae);
                    }
                    let parts = items
                        .iter()
                        .enumerate()
                        .map(|(j, its)| {
                            let xj = x.narrow(0, j * b, b)?;
                            if its.is_empty() {
                                Ok(xj)
                            } else {
                                replace(&xj, its, sae)
                            }
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Ok(Tensor::cat(&parts, 0)?)
                };
                edit()
                    .map(Some)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            });
        }
        let repeat = |t: &Tensor| -> Result<Tensor> {
            Ok(if k == 1 {
                t.clone()
            } else {
                Tensor::cat(&vec![t; k], 0)?
            })
        };
        let start = groups.iter().map(|g| self.start(g)).min().unwrap_or(0);
        let tokens = repeat(&batch.tokens)?;
        match batch.resid_pre.get(&start) {
            // Blocks below `start` run exactly as in the unablated pass.
            Some(x) if start > 0 => {
                let x = repeat(x)?;
                self.forward(last_only, &tokens, Some((start, &x)), &mut hooks)
            }
            _ => self.forward(last_only, &tokens, None, &mut hooks),
        }
    }

    /// Runs `tokens` `[b, p]` (or, with `from = (l, x)`, the residual `x` entering block `l`)
    /// with `hooks`: logits `[b, p, d_vocab]`, or with `last_only` those of the last position
    /// `[b, 1, d_vocab]`, skipping the unembedding elsewhere (unless a target's hook lies past the
    /// blocks). Unablated and ablated runs of a set take the same path.
    fn forward(
        &self,
        last_only: bool,
        tokens: &Tensor,
        from: Option<(usize, &Tensor)>,
        hooks: &mut Hooks,
    ) -> Result<Tensor> {
        let last_only = last_only && self.points.values().all(|p| p.layer().is_some());
        let opts = RunOptions {
            stop_at_layer: last_only.then_some(self.model.config().n_layers),
            ..RunOptions::default()
        };
        let out = match from {
            Some((l, x)) => self.model.forward_from(l, x, None, hooks, opts)?,
            None => self.model.forward_with(tokens, None, hooks, opts)?,
        };
        if !last_only {
            return Ok(out);
        }
        let p = out.dim(1)?;
        Ok(self.model.unembed_residual(&out.narrow(1, p - 1, 1)?)?)
    }
}

impl Measure<'_> {
    /// Whether only the last position's logits are read.
    fn last_only(&self) -> bool {
        matches!(self, Measure::Metric { .. })
    }
}

impl Set<'_> {
    /// The metric or the next-token loss summed over the batch (prompts or positions).
    fn score(&self, batch: &Batch, logits: &Tensor) -> Result<f64> {
        let (b, p, _) = logits.dims3()?;
        let values = match self.measure {
            Measure::Metric { pairs, metric } => {
                let last = logits.narrow(1, p - 1, 1)?.squeeze(1)?; // [b, d_vocab]
                let answers: Vec<u32> = batch.idx.iter().map(|&i| pairs[i].answer).collect();
                let wrongs: Vec<u32> = batch.idx.iter().map(|&i| pairs[i].wrong).collect();
                metric.eval(&last, &answers, &wrongs)? // [b]
            }
            Measure::Loss => {
                let lp = candle_nn::ops::log_softmax(
                    &logits.narrow(1, 0, p - 1)?.to_dtype(DType::F32)?,
                    D::Minus1,
                )?; // [b, p − 1, d_vocab]
                let next = batch.tokens.narrow(1, 1, p - 1)?.contiguous()?;
                lp.gather(&next.unsqueeze(2)?, 2)?
                    .neg()?
                    .reshape(b * (p - 1))?
            }
        };
        Ok(values
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .iter()
            .sum::<f64>())
    }
}

fn check_data(data: &Data, method: &Method) -> Result<()> {
    let bad = |m: String| Err(CircuitError::Input(m));
    if data.pairs.is_none() && data.text.is_none() {
        return bad("nothing to measure: give prompt pairs, held-out text or both".into());
    }
    if let Some((pairs, _)) = data.pairs {
        if pairs.is_empty() {
            return bad("no prompt pairs to measure the metric on".into());
        }
        for (i, p) in pairs.iter().enumerate() {
            if p.clean.is_empty() {
                return bad(format!("pair {}: the clean prompt is empty", i + 1));
            }
            if *method == Method::Resample(Source::Corrupt) && p.corrupt.len() != p.clean.len() {
                return bad(format!(
                    "pair {}: the clean prompt has {} tokens, the corrupt one {}; resampling \
                     from the corrupt prompt needs equal lengths",
                    i + 1,
                    p.clean.len(),
                    p.corrupt.len()
                ));
            }
        }
    }
    if let Some(text) = data.text {
        if text.is_empty() {
            return bad("no held-out text to measure the loss on".into());
        }
        if let Some(i) = text.iter().position(|s| s.len() < 2) {
            return bad(format!(
                "held-out text sequence {} has {} token(s); the next-token loss needs at least 2",
                i + 1,
                text[i].len()
            ));
        }
    }
    Ok(())
}

/// Indices of `seqs` by length, each length cut into batches of at most [`MAX_BATCH_TOKENS`].
fn batches(seqs: &[&[u32]]) -> Vec<Vec<usize>> {
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, s) in seqs.iter().enumerate() {
        by_len.entry(s.len()).or_default().push(i);
    }
    by_len
        .into_iter()
        .flat_map(|(len, idx)| {
            let per = (MAX_BATCH_TOKENS / len.max(1)).max(1);
            idx.chunks(per).map(<[usize]>::to_vec).collect::<Vec<_>>()
        })
        .collect()
}

/// `[b, p]` tokens of the sequences `idx` (all of one length).
fn stack(model: &Model, seqs: &[&[u32]], idx: &[usize]) -> Result<Tensor> {
    let p = seqs[idx[0]].len();
    let flat: Vec<u32> = idx.iter().flat_map(|&i| seqs[i].iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (idx.len(), p), model.device())?)
}

/// For each sequence, the first `len` tokens of another one at least as long, drawn with `seed`.
fn others(seqs: &[&[u32]], seed: u64, what: &str) -> Result<Vec<Vec<u32>>> {
    let mut rng = StdRng::seed_from_u64(seed);
    seqs.iter()
        .enumerate()
        .map(|(i, s)| {
            let candidates: Vec<usize> = (0..seqs.len())
                .filter(|&j| j != i && seqs[j].len() >= s.len())
                .collect();
            if candidates.is_empty() {
                return Err(CircuitError::Input(format!(
                    "{what} {} ({} tokens) has no other {what} at least as long to resample \
                     from (resampling from other {what}s needs two of the longest length)",
                    i + 1,
                    s.len()
                )));
            }
            let j = candidates[rng.gen_range(0..candidates.len())];
            Ok(seqs[j][..s.len()].to_vec())
        })
        .collect()
}

/// Targets grouped by their hook point.
fn by_point(points: &HashMap<Target, HookPoint>) -> BTreeMap<HookPoint, Vec<Target>> {
    let mut by_point: BTreeMap<HookPoint, Vec<Target>> = BTreeMap::new();
    for (&t, &p) in points {
        by_point.entry(p).or_default().push(t);
    }
    by_point
}

fn cached(cache: &scalpel_core::ActivationCache, point: HookPoint) -> Result<&Tensor> {
    cache
        .get(point)
        .ok_or_else(|| CircuitError::Input(format!("{point} was not cached")))
}

/// Every target's mean component over every position of `seqs`, `[1, 1, ..]`.
fn means(
    model: &Model,
    seqs: &[&[u32]],
    points: &HashMap<Target, HookPoint>,
    sae: Option<&LatentSae>,
) -> Result<HashMap<Target, Tensor>> {
    let by_point = by_point(points);
    let mut sums: HashMap<Target, Tensor> = HashMap::new();
    if by_point.is_empty() {
        return Ok(sums);
    }
    let mut count = 0;
    for idx in batches(seqs) {
        let tokens = stack(model, seqs, &idx)?;
        let (_, cache) = model.run_with_cache(&tokens, |p| by_point.contains_key(&p))?;
        for (point, ts) in &by_point {
            for (t, c) in ts.iter().zip(components(ts, cached(&cache, *point)?, sae)?) {
                let s = c.to_dtype(DType::F32)?.sum_keepdim(0)?.sum_keepdim(1)?;
                let s = match sums.remove(t) {
                    Some(prev) => (prev + s)?,
                    None => s,
                };
                sums.insert(*t, s);
            }
        }
        count += tokens.elem_count();
    }
    sums.into_iter()
        .map(|(t, s)| Ok((t, (s / count as f64)?)))
        .collect()
}

/// Each target's component of the activation `act` at their shared hook: `[b, p, 1, d_head]`
/// for a head, `[b, p, 1]` for a neuron or a latent, `[b, p, d_model]` for a whole layer.
fn components(targets: &[Target], act: &Tensor, sae: Option<&LatentSae>) -> Result<Vec<Tensor>> {
    let (b, p) = (act.dim(0)?, act.dim(1)?);
    let mut latents: Option<Tensor> = None;
    let mut out = Vec::with_capacity(targets.len());
    for &t in targets {
        out.push(match t {
            Target::Head { head: i, .. } | Target::Neuron { neuron: i, .. } => {
                act.narrow(2, i, 1)?
            }
            Target::Mlp { .. } | Target::Attn { .. } => act.clone(),
            Target::Latent { latent } => {
                if latents.is_none() {
                    let sae = sae.expect("latent targets are checked to have an SAE");
                    latents = Some(sae.encode(act)?.0);
                }
                let f = latents.as_ref().expect("encoded above");
                f.narrow(1, latent, 1)?.reshape((b, p, 1))?
            }
        });
    }
    Ok(out)
}

/// The activation `x` at one hook with each target's component replaced by its fill (broadcast
/// over batch and positions). Latents are read from the unedited `x`, all at once, and their
/// change is added as the difference of two decodings, so the SAE's error term is kept.
fn replace(x: &Tensor, items: &[(Target, &Tensor)], sae: Option<&LatentSae>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, p) = (dims[0], dims[1]);
    let mut y = x.clone();
    let mut latents = Vec::new();
    for &(t, fill) in items {
        let fill = fill.to_dtype(x.dtype())?;
        match t {
            Target::Head { head: i, .. } | Target::Neuron { neuron: i, .. } => {
                let mut slice = dims.clone();
                slice[2] = 1;
                let ranges: Vec<Range<usize>> = dims
                    .iter()
                    .enumerate()
                    .map(|(k, &n)| if k == 2 { i..i + 1 } else { 0..n })
                    .collect();
                y = y.slice_assign(&ranges, &fill.broadcast_as(slice)?.contiguous()?)?;
            }
            Target::Mlp { .. } | Target::Attn { .. } => {
                y = fill.broadcast_as(dims.as_slice())?.contiguous()?;
            }
            Target::Latent { latent } => latents.push((latent, fill)),
        }
    }
    if !latents.is_empty() {
        let sae = sae.expect("latent targets are checked to have an SAE");
        let (f, norm) = sae.encode(x)?; // [b·p, d_sae]
        let mut g = f.clone();
        for (i, fill) in latents {
            let new = fill.broadcast_as((b, p, 1))?.reshape((b * p, 1))?;
            g = g.slice_assign(&[0..b * p, i..i + 1], &new.to_dtype(g.dtype())?)?;
        }
        let delta = (sae.decode(&g, &norm)? - sae.decode(&f, &norm)?)?;
        y = (y + delta.reshape(dims)?.to_dtype(x.dtype())?)?;
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_syntax_round_trips() {
        let cfg = Config::toy(4, 16, 4, 37, 12, false);
        for (text, t) in [
            ("L2H3", Target::Head { layer: 2, head: 3 }),
            ("2.3", Target::Head { layer: 2, head: 3 }),
            ("l0h0", Target::Head { layer: 0, head: 0 }),
            (
                "n1.63",
                Target::Neuron {
                    layer: 1,
                    neuron: 63,
                },
            ),
            (
                "L1N5",
                Target::Neuron {
                    layer: 1,
                    neuron: 5,
                },
            ),
            ("mlp3", Target::Mlp { layer: 3 }),
            (" ATTN0 ", Target::Attn { layer: 0 }),
        ] {
            let parsed = Target::parse(text, &cfg, None).unwrap();
            assert_eq!(parsed, t, "{text}");
            assert_eq!(Target::parse(&parsed.to_string(), &cfg, None).unwrap(), t);
        }
        assert_eq!(Target::all_heads(&cfg).len(), 16);
    }

    #[test]
    fn bad_targets_name_the_valid_range() {
        let cfg = Config::toy(4, 16, 4, 37, 12, false);
        for (text, needle) in [
            ("L4H0", "4 layers (0 to 3)"),
            ("L1H4", "4 heads per layer (0 to 3)"),
            ("n1.64", "d_mlp is 64 (0 to 63)"),
            ("mlp9", "4 layers"),
            ("sae:3", "no SAE was given"),
            ("head5", "unknown target"),
            ("L1H", "unknown target"),
            ("1.2.3", "unknown target"),
            ("", "unknown target"),
        ] {
            let e = Target::parse(text, &cfg, None).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let attn_only = Config::toy(2, 16, 4, 37, 12, true);
        let e = Target::parse("mlp0", &attn_only, None).unwrap_err();
        assert!(e.to_string().contains("no MLPs"), "{e}");
    }

    #[test]
    fn batches_group_lengths_and_cap_tokens() {
        let a = vec![1u32; 3];
        let b = vec![1u32; 5];
        let long = vec![1u32; MAX_BATCH_TOKENS / 2];
        let seqs: Vec<&[u32]> = vec![&b, &a, &long, &b, &a, &long, &long];
        assert_eq!(
            batches(&seqs),
            vec![vec![1, 4], vec![0, 3], vec![2, 5], vec![6]]
        );
    }

    #[test]
    fn resampling_sources_are_other_sequences_at_least_as_long() {
        let seqs: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8], vec![0, 0]];
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let src = others(&refs, 7, "prompt").unwrap();
        for (i, s) in src.iter().enumerate() {
            assert_eq!(s.len(), seqs[i].len());
            let from = seqs
                .iter()
                .enumerate()
                .find(|(j, t)| *j != i && t.starts_with(s))
                .map(|(j, _)| j);
            assert!(from.is_some(), "sequence {i} took {s:?}");
        }
        // The longest sequence has nothing to resample from.
        let e = others(&refs[..2], 0, "prompt").unwrap_err().to_string();
        assert!(e.contains("prompt 1 (3 tokens)"), "{e}");
    }
}
