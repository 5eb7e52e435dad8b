//! The run config: one TOML file naming the data, the budget, the schedules and the list of
//! dictionaries trained together. Every field has a default; unknown fields are refused.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::train::{Activation, DictShape, TrainConfig};
use crate::{DictError, Result};

/// What `scalpel train` reads: data, budget, schedules and the dictionaries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Output directory: `<out>/<dict name>/` per dictionary and `<out>/checkpoints/`.
    pub out: PathBuf,
    /// Tokens (activation rows) every dictionary trains on.
    pub tokens: u64,
    /// Rows per optimiser step.
    pub batch_size: usize,
    /// Seeds the initialisation and the data order.
    pub seed: u64,
    /// Steps of linear learning-rate warm-up from `lr / lr_warm_up_steps` to `lr`.
    pub lr_warm_up_steps: u64,
    /// Steps at the end over which the learning rate decays to `lr_end` (0: no decay).
    pub lr_decay_steps: u64,
    /// Shape of the decay.
    pub lr_decay: Decay,
    /// The learning rate at the last step when decaying (`lr / 10` when absent, as SAELens).
    pub lr_end: Option<f32>,
    /// Steps of linear warm-up of the sparsity coefficient from 0.
    pub l1_warm_up_steps: u64,
    /// How `b_dec` starts.
    pub b_dec_init: BDecInit,
    /// Rows sampled before training for `b_dec_init`, the normalisation factor and the final
    /// feature densities (`sparsity.safetensors`).
    pub init_sample_rows: usize,
    /// Input normalisation during training (folded into the weights at the end).
    pub normalize_activations: Normalization,
    /// Tokens between checkpoints (0: only at the end).
    pub checkpoint_every_tokens: u64,
    /// Steps between rows of `training_log.jsonl` (and progress log lines).
    pub log_every_steps: u64,
    /// Where the activations come from.
    pub data: DataConfig,
    /// Optimiser and loss settings for every dictionary (each may override them).
    pub train: TrainOverrides,
    /// The dictionaries, trained together from one pass over the data.
    pub dict: Vec<DictSpec>,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            out: PathBuf::from("dicts"),
            tokens: 10_000_000,
            batch_size: 4096,
            seed: 42,
            lr_warm_up_steps: 0,
            lr_decay_steps: 0,
            lr_decay: Decay::Linear,
            lr_end: None,
            l1_warm_up_steps: 0,
            b_dec_init: BDecInit::GeometricMedian,
            init_sample_rows: 16_384,
            normalize_activations: Normalization::None,
            checkpoint_every_tokens: 0,
            log_every_steps: 100,
            data: DataConfig::default(),
            train: TrainOverrides::default(),
            dict: Vec::new(),
        }
    }
}

/// The learning-rate decay shape over the last `lr_decay_steps` steps.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Linear,
    Cosine,
}

/// How `b_dec` is initialised (SAELens's `b_dec_init_method`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum BDecInit {
    /// The geometric median of a sample (Weiszfeld iterations).
    GeometricMedian,
    /// The mean of a sample.
    Mean,
    Zeros,
}

/// Input normalisation during training (SAELens's `normalize_activations`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    None,
    /// Multiply every row by `√d / E‖x‖` (estimated on a sample before training); the factor is
    /// folded into the saved weights, which then read raw activations.
    ExpectedAverageOnlyIn,
}

/// Where activations come from: an activation store (`scalpel harvest`), or a model run over a
/// corpus while training (`model` + `corpus`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// An activation store directory.
    pub store: Option<PathBuf>,
    /// Store reading: shards pooled for shuffling.
    pub shuffle_buffer_shards: usize,
    /// Streaming: the model spec (as `--model`).
    pub model: Option<String>,
    /// Streaming: the corpus spec (as `scalpel harvest --data`).
    pub corpus: Option<String>,
    /// Streaming: JSONL key or Parquet column holding the text.
    pub text_field: String,
    /// Streaming: tokens per context.
    pub context_size: usize,
    /// Streaming: start every context with BOS.
    pub prepend_bos: bool,
    /// Streaming: contexts per forward pass.
    pub forward_batch: usize,
    /// Streaming: rows shuffled together.
    pub shuffle_buffer_rows: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            store: None,
            shuffle_buffer_shards: 16,
            model: None,
            corpus: None,
            text_field: "text".into(),
            context_size: 128,
            prepend_bos: true,
            forward_batch: 8,
            shuffle_buffer_rows: 65_536,
        }
    }
}

macro_rules! train_overrides {
    ($($(#[$doc:meta])* $field:ident: $ty:ty,)*) => {
        /// [`TrainConfig`] fields to change; absent ones keep their value.
        #[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct TrainOverrides {
            $($(#[$doc])* #[serde(skip_serializing_if = "Option::is_none")] pub $field: Option<$ty>,)*
        }

        impl TrainOverrides {
            /// Writes the present fields into `t`.
            pub fn apply(&self, t: &mut TrainConfig) {
                $(if let Some(v) = self.$field { t.$field = v; })*
            }
        }
    };
}

train_overrides! {
    /// Adam learning rate.
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    /// Dead latents AuxK uses per row (0: no AuxK).
    k_aux: usize,
    /// AuxK loss weight.
    aux_coef: f32,
    /// Tokens without firing after which a latent counts as dead.
    dead_window: u64,
    /// L1 coefficient (relu) or L0 coefficient (jumprelu).
    sparsity_coef: f32,
    /// JumpReLU straight-through bandwidth.
    bandwidth: f32,
    /// JumpReLU initial threshold.
    init_threshold: f32,
    /// BatchTopK: learning rate of the inference threshold.
    topk_threshold_lr: f32,
    /// TopK/BatchTopK: SAELens's free decoder norms, ranking by pre · ‖W_dec row‖.
    rescale_acts_by_decoder_norm: bool,
    /// Clip the gradient's global L2 norm to this (0: no clipping; SAELens clips at 1.0).
    clip_grad_norm: f32,
}

/// One dictionary of the run.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DictSpec {
    /// Directory name under `out`.
    pub name: String,
    /// The hook read (a store hook name; for streaming, any name the model accepts).
    pub hook: String,
    /// A transcoder's target hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook_out: Option<String>,
    pub activation: Activation,
    pub d_sae: usize,
    /// Active latents per row (topk, batchtopk).
    #[serde(default = "default_k")]
    pub k: usize,
    /// A transcoder's linear skip connection.
    #[serde(default)]
    pub skip: bool,
    /// The input width; checked against the data when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub d_in: Option<usize>,
    /// Changes to the run's `[train]` for this dictionary.
    #[serde(default)]
    pub train: TrainOverrides,
}

fn default_k() -> usize {
    32
}

/// A dictionary with everything resolved against the data.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedDict {
    pub name: String,
    /// Hook names as the data source knows them.
    pub hook: String,
    pub hook_out: Option<String>,
    pub shape: DictShape,
    pub train: TrainConfig,
}

/// The `source_name` of config errors.
pub(crate) const SOURCE: &str = "run config";

pub(crate) fn config_err(field: impl Into<String>, reason: impl Into<String>) -> DictError {
    DictError::Config {
        source_name: SOURCE.into(),
        field: field.into(),
        reason: reason.into(),
    }
}

impl RunConfig {
    /// Parses a TOML run config; errors name the field.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            let msg = e.message().to_string();
            // An error on one line (a bad value) is named by the key on that line, under the
            // last table header before it; toml names unknown and missing fields itself.
            let line = e
                .span()
                .filter(|s| !text.get(s.clone()).unwrap_or("\n").contains('\n'))
                .map(|s| text[..s.start].matches('\n').count());
            let key_at = |n: usize| -> Option<String> {
                let lines: Vec<&str> = text.lines().collect();
                let key = lines.get(n)?.split_once('=')?.0.trim().to_string();
                let table = lines[..n]
                    .iter()
                    .rev()
                    .map(|l| l.trim())
                    .find(|l| l.starts_with('['))
                    .map(|l| l.trim_matches(['[', ']']).to_string());
                Some(table.map_or(key.clone(), |t| format!("{t}.{key}")))
            };
            let field = match msg.split('`').nth(1).filter(|_| msg.contains("field")) {
                Some(f) => f.to_string(),
                None => line.and_then(key_at).unwrap_or_else(|| "(toml)".into()),
            };
            let at = line
                .map(|n| format!(" (line {})", n + 1))
                .unwrap_or_default();
            config_err(field, format!("{msg}{at}"))
        })
    }

    /// The config as TOML (what `--print-config` shows once flags are applied).
    pub fn to_toml(&self) -> String {
        // Plain data serialises; a failure would be an internal error.
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot serialise: {e}\n"))
    }

    /// A commented config with every default and one example dictionary.
    pub fn default_toml() -> &'static str {
        DEFAULT_TOML
    }

    /// Checks what needs no data: budgets, schedules, names and shapes.
    pub fn validate(&self) -> Result<()> {
        if self.tokens == 0 {
            return Err(config_err("tokens", "must be positive"));
        }
        if self.batch_size == 0 {
            return Err(config_err("batch_size", "must be positive"));
        }
        if self.init_sample_rows == 0 && self.b_dec_init != BDecInit::Zeros {
            return Err(config_err(
                "init_sample_rows",
                "must be positive (b_dec_init and the feature densities need a sample)",
            ));
        }
        if self.log_every_steps == 0 {
            return Err(config_err("log_every_steps", "must be positive"));
        }
        if let Some(end) = self.lr_end {
            if !(end >= 0.0 && end.is_finite()) {
                return Err(config_err(
                    "lr_end",
                    format!("{end} is not a finite non-negative number"),
                ));
            }
        }
        let total = self.total_steps();
        if self.lr_warm_up_steps + self.lr_decay_steps > total {
            return Err(config_err(
                "lr_decay_steps",
                format!(
                    "lr_warm_up_steps {} + lr_decay_steps {} exceed the run's {total} steps \
                     (tokens / batch_size)",
                    self.lr_warm_up_steps, self.lr_decay_steps
                ),
            ));
        }
        let d = &self.data;
        match (&d.store, &d.model, &d.corpus) {
            (Some(_), None, None) => {
                if d.shuffle_buffer_shards == 0 {
                    return Err(config_err("data.shuffle_buffer_shards", "must be positive"));
                }
            }
            (None, Some(_), Some(_)) => {
                for (field, v) in [
                    ("data.context_size", d.context_size),
                    ("data.forward_batch", d.forward_batch),
                ] {
                    if v == 0 {
                        return Err(config_err(field, "must be positive"));
                    }
                }
                if d.shuffle_buffer_rows < self.batch_size {
                    return Err(config_err(
                        "data.shuffle_buffer_rows",
                        format!(
                            "{} is smaller than batch_size {}",
                            d.shuffle_buffer_rows, self.batch_size
                        ),
                    ));
                }
            }
            (Some(_), _, _) => {
                return Err(config_err(
                    "data.store",
                    "give either a store or a model and a corpus, not both",
                ))
            }
            _ => {
                return Err(config_err(
                    "data",
                    "no data: give `store` (an activation store) or `model` and `corpus`",
                ))
            }
        }
        if self.dict.is_empty() {
            return Err(config_err("dict", "no [[dict]] to train"));
        }
        validate_train("train", &self.train)?;
        for (i, spec) in self.dict.iter().enumerate() {
            let f = |field: &str| format!("dict.{}.{field}", spec.name);
            if spec.name.is_empty()
                || spec.name.starts_with('.')
                || spec.name == "checkpoints"
                || spec.name.contains(['/', '\\'])
            {
                return Err(config_err(
                    format!("dict[{i}].name"),
                    format!(
                        "{:?} cannot name a directory under `out` (not empty, no slashes, no \
                         leading dot, not \"checkpoints\")",
                        spec.name
                    ),
                ));
            }
            if self.dict[..i].iter().any(|o| o.name == spec.name) {
                return Err(config_err(
                    f("name"),
                    "two dictionaries have this name".to_string(),
                ));
            }
            if spec.d_sae == 0 {
                return Err(config_err(f("d_sae"), "must be positive"));
            }
            if matches!(spec.activation, Activation::TopK | Activation::BatchTopK)
                && (spec.k == 0 || spec.k > spec.d_sae)
            {
                return Err(config_err(
                    f("k"),
                    format!("k = {} must be in 1..={} (d_sae)", spec.k, spec.d_sae),
                ));
            }
            if spec.skip && spec.hook_out.is_none() {
                return Err(config_err(
                    f("hook_out"),
                    "`skip` makes a transcoder, which needs `hook_out`",
                ));
            }
            validate_train(&f("train"), &spec.train)?;
        }
        Ok(())
    }

    /// Optimiser steps of the run: every step reads `batch_size` rows.
    pub fn total_steps(&self) -> u64 {
        self.tokens.div_ceil(self.batch_size.max(1) as u64)
    }

    /// Resolves every dictionary against the data: `width(hook)` gives the hook's name as the
    /// data knows it and its width, or an error listing the hooks there are.
    pub fn resolve(
        &self,
        mut width: impl FnMut(&str) -> Result<(String, usize)>,
    ) -> Result<Vec<ResolvedDict>> {
        self.dict
            .iter()
            .map(|spec| {
                let f = |field: &str| format!("dict.{}.{field}", spec.name);
                let (hook, d_in) =
                    width(&spec.hook).map_err(|e| config_err(f("hook"), e.to_string()))?;
                if let Some(want) = spec.d_in {
                    if want != d_in {
                        return Err(config_err(
                            f("d_in"),
                            format!("d_in = {want}, but the data's `{hook}` has width {d_in}"),
                        ));
                    }
                }
                let (hook_out, d_out) = match &spec.hook_out {
                    Some(h) => {
                        let (h, d) =
                            width(h).map_err(|e| config_err(f("hook_out"), e.to_string()))?;
                        (Some(h), Some(d))
                    }
                    None => (None, None),
                };
                let mut train = TrainConfig::default();
                self.train.apply(&mut train);
                spec.train.apply(&mut train);
                Ok(ResolvedDict {
                    name: spec.name.clone(),
                    hook,
                    hook_out,
                    shape: DictShape {
                        activation: spec.activation,
                        d_in,
                        d_sae: spec.d_sae,
                        k: spec.k,
                        d_out,
                        skip: spec.skip,
                    },
                    train,
                })
            })
            .collect()
    }
}

/// The checks on optimiser values the trainer would otherwise report without the dictionary's
/// name.
fn validate_train(prefix: &str, t: &TrainOverrides) -> Result<()> {
    if let Some(lr) = t.lr {
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(config_err(
                format!("{prefix}.lr"),
                format!("{lr} is not a positive finite number"),
            ));
        }
    }
    Ok(())
}

const DEFAULT_TOML: &str = r#"# scalpel train: a run config. Every field shows its default; delete what you do not change.
# Several [[dict]] entries are trained together from one pass over the data.

# Output: <out>/<dict name>/ (SAELens format) per dictionary, <out>/checkpoints/ to resume.
out = "dicts"
# Tokens (activation rows) every dictionary trains on; a store smaller than this is reread,
# reshuffled.
tokens = 10_000_000
# Rows per optimiser step.
batch_size = 4096
# Seeds the initialisation (mixed with each dictionary's name) and the data order.
seed = 42
# Learning rate: linear warm-up over the first steps, then constant, then a decay to lr_end
# ("linear" or "cosine") over the last lr_decay_steps steps (SAELens's names).
lr_warm_up_steps = 0
lr_decay_steps = 0
lr_decay = "linear"
# lr_end = 2e-5         # default: lr / 10
# Linear warm-up of the sparsity coefficient (relu: L1, jumprelu: L0) from 0.
l1_warm_up_steps = 0
# b_dec starts at the "geometric_median" (Weiszfeld), the "mean" or "zeros" of a sample.
b_dec_init = "geometric_median"
# Rows sampled before training: b_dec init, the normalisation factor, and the feature
# densities written to sparsity.safetensors.
init_sample_rows = 16_384
# "none", or "expected_average_only_in": scale inputs by sqrt(d) / E|x| (estimated on the
# sample) while training; the factor is folded into the saved weights.
normalize_activations = "none"
# Tokens between checkpoints (0: only at the end). A rerun with the same config resumes from
# the last one and ends bit-identical to an uninterrupted run.
checkpoint_every_tokens = 0
# Steps between rows of training_log.jsonl and progress lines.
log_every_steps = 100

[data]
# An activation store made by `scalpel harvest` ...
store = "acts"
shuffle_buffer_shards = 16
# ... or activations computed while training (give model and corpus instead of store):
# model = "smollm2-135m"
# corpus = "demo"
text_field = "text"
context_size = 128
prepend_bos = true
forward_batch = 8
shuffle_buffer_rows = 65_536

# Optimiser and loss settings for every dictionary (any [dict.train] overrides them).
[train]
# lr = 3e-4
# beta1 = 0.9
# beta2 = 0.999
# eps = 1e-8
# weight_decay = 0.0
# k_aux = 256            # dead latents in the AuxK loss (topk, batchtopk); 0 disables it
# aux_coef = 0.03125
# dead_window = 1_000_000 # tokens without firing before a latent counts as dead
# sparsity_coef = 1.0     # relu: L1 coefficient; jumprelu: L0 coefficient
# bandwidth = 0.05        # jumprelu straight-through bandwidth
# init_threshold = 0.01   # jumprelu initial threshold
# topk_threshold_lr = 0.01 # batchtopk: the inference threshold's running-average rate
# rescale_acts_by_decoder_norm = false # topk, batchtopk: true = SAELens's free decoder norms
#                                      # (start 0.1, latents ranked by pre * |W_dec row|);
#                                      # false = unit-norm decoder rows (Gao et al. 2024)
# clip_grad_norm = 0.0    # clip the gradient's global L2 norm (SAELens always clips at 1.0)

[[dict]]
# Directory name under `out`.
name = "resid"
# The hook read; hook_out makes a transcoder that predicts another hook.
hook = "blocks.0.hook_resid_post"
# hook_out = "blocks.0.hook_mlp_out"
# "topk", "batchtopk", "jumprelu" or "relu".
activation = "topk"
d_sae = 4096
# Active latents per row (topk, batchtopk).
k = 32
# A transcoder's linear skip connection.
skip = false
# d_in = 576            # checked against the data when given
# [dict.train]          # overrides of [train] for this dictionary
# lr = 1e-3
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_commented_default_parses_to_the_defaults() {
        let cfg = RunConfig::from_toml(DEFAULT_TOML).unwrap();
        let mut want = RunConfig::default();
        want.data.store = Some("acts".into());
        assert_eq!(cfg.data, want.data);
        assert_eq!(cfg.dict.len(), 1);
        assert_eq!(cfg.dict[0].k, 32);
        let back = RunConfig::from_toml(&cfg.to_toml()).unwrap();
        assert_eq!(back, cfg);
        want.dict = cfg.dict.clone();
        assert_eq!(cfg, want);
    }
}
