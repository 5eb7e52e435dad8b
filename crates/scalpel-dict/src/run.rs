//! The training driver: reads a [`RunConfig`], trains every dictionary it lists from one pass
//! over the data (each batch is read once and fed to every trainer on its hooks), checkpoints,
//! resumes bit-exactly, and writes each dictionary in SAELens format.
//!
//! ```text
//! <out>/<name>/cfg.json                  SAELens 6.x config with the run's metadata
//! <out>/<name>/sae_weights.safetensors   the weights (input normalisation folded in)
//! <out>/<name>/sparsity.safetensors      log10 feature density on the final sample
//! <out>/<name>/training_log.jsonl        one row every `log_every_steps` steps
//! <out>/<name>/run.toml                  the run config that produced it
//! <out>/checkpoints/                     the last checkpoint (see `checkpoint`)
//! ```
//!
//! Schedules follow SAELens (`lr_warm_up_steps`, `lr_decay_steps`, `lr_end`,
//! `l1_warm_up_steps`); the geometric-median `b_dec` and the `expected_average_only_in`
//! normalisation are SAELens's too.

mod checkpoint;
mod config;
mod data;
mod init;

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use config::{
    BDecInit, DataConfig, Decay, DictSpec, Normalization, ResolvedDict, RunConfig, TrainOverrides,
};
pub use data::{Position, Source};
pub use init::{geometric_median, log_feature_density, mean, norm_scaling_factor};

use crate::train::{Coefficients, StepStats, Trainer};
use crate::{saelens, DictError, Result};

/// Weiszfeld iterations for the geometric median (SAELens: 100).
const MEDIAN_ITERATIONS: usize = 100;

/// One row of `training_log.jsonl`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct LogRow {
    pub step: u64,
    pub tokens: u64,
    pub lr: f32,
    pub sparsity_coef: f32,
    pub loss: f64,
    pub mse: f64,
    pub aux: f64,
    pub sparsity_loss: f64,
    pub l0: f64,
    pub explained_variance: f64,
    pub dead_fraction: f64,
}

/// What the progress callback is told after every step.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    pub steps: u64,
    pub total_steps: u64,
    pub tokens: u64,
    pub total_tokens: u64,
    /// Tokens per second since this process started training.
    pub tokens_per_sec: f64,
    /// Per dictionary, this step's stats (the same row the log would get).
    pub dicts: &'a [(String, LogRow)],
    /// True on the steps that are also written to the log.
    pub logged: bool,
    /// True when a checkpoint was just written.
    pub checkpointed: bool,
}

/// What a finished run reports.
#[derive(Serialize, Debug, Clone)]
pub struct RunSummary {
    pub out: PathBuf,
    /// False when the progress callback stopped the run early.
    pub finished: bool,
    pub steps: u64,
    pub tokens: u64,
    /// Tokens already trained when this process started (from a checkpoint).
    pub resumed_from_tokens: Option<u64>,
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub dicts: Vec<DictSummary>,
}

/// One saved dictionary.
#[derive(Serialize, Debug, Clone)]
pub struct DictSummary {
    pub name: String,
    pub dir: PathBuf,
    pub architecture: String,
    pub hook_name: String,
    pub hook_name_out: Option<String>,
    pub d_in: usize,
    pub d_sae: usize,
    /// The last step's stats.
    pub last: Option<LogRow>,
    /// Latents that never fired on the final sample.
    pub dead_on_sample: usize,
}

/// The seed of dictionary `name`'s initialisation: the run's seed mixed with the name, so a
/// dictionary starts the same whatever else the run trains.
fn dict_seed(seed: u64, name: &str) -> u64 {
    // FNV-1a.
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// This step's learning rate and sparsity coefficient (`step` counts from 0).
pub fn coefficients(cfg: &RunConfig, peak_lr: f32, sparsity: f32, step: u64) -> Coefficients {
    let total = cfg.total_steps();
    let mut lr = peak_lr as f64;
    if step < cfg.lr_warm_up_steps {
        lr *= (step + 1) as f64 / cfg.lr_warm_up_steps as f64;
    }
    let decay_start = total.saturating_sub(cfg.lr_decay_steps);
    if cfg.lr_decay_steps > 0 && step >= decay_start {
        let end = cfg.lr_end.map_or(peak_lr as f64 / 10.0, f64::from);
        let p = (step - decay_start + 1) as f64 / cfg.lr_decay_steps as f64;
        lr = match cfg.lr_decay {
            Decay::Linear => peak_lr as f64 + (end - peak_lr as f64) * p,
            Decay::Cosine => {
                end + (peak_lr as f64 - end) * (1.0 + (std::f64::consts::PI * p).cos()) / 2.0
            }
        };
    }
    let warm = if cfg.l1_warm_up_steps > 0 {
        ((step + 1) as f64 / cfg.l1_warm_up_steps as f64).min(1.0)
    } else {
        1.0
    };
    Coefficients {
        lr: lr as f32,
        sparsity: (sparsity as f64 * warm) as f32,
    }
}

/// Trains the run `cfg` describes: validates everything first, resumes from `<out>/checkpoints`
/// when it holds a checkpoint of the same config, and calls `on_progress` after every step.
/// When `on_progress` breaks, the run stops there as if killed (no checkpoint beyond the last
/// one, no dictionary written) and returns a summary with `finished` false.
///
/// On a diverged step (non-finite loss or update) the run stops with
/// [`DictError::Diverged`] naming the dictionary; the last checkpoint stays as it was and no
/// dictionary is written.
pub fn train(
    cfg: &RunConfig,
    on_progress: &mut dyn FnMut(&Progress) -> ControlFlow<()>,
) -> Result<RunSummary> {
    cfg.validate()?;
    let source = Source::open(&cfg.data)?;
    let dicts = cfg.resolve(|h| source.width(h))?;
    let names: Vec<String> = dicts.iter().map(|d| d.name.clone()).collect();
    // Every hook read, each once, in first-use order.
    let mut hooks: Vec<String> = Vec::new();
    for d in &dicts {
        for h in std::iter::once(&d.hook).chain(&d.hook_out) {
            if !hooks.contains(h) {
                hooks.push(h.clone());
            }
        }
    }
    let hook_index = |h: &str| hooks.iter().position(|x| x == h).unwrap_or(0);
    // Validates every shape and setting before any data is read.
    let fresh: Vec<Trainer> = dicts
        .iter()
        .map(|d| {
            Trainer::new(
                d.shape.clone(),
                d.train.clone(),
                dict_seed(cfg.seed, &d.name),
            )
            .map_err(|e| match e {
                DictError::Config { field, reason, .. } => {
                    config::config_err(format!("dict.{}.{field}", d.name), reason)
                }
                e => e,
            })
        })
        .collect::<Result<_>>()?;

    let resumed = match checkpoint::find(&cfg.out) {
        Some(dir) => {
            let (state, trainers, logs) = checkpoint::load(&dir, &names, cfg)?;
            tracing::info!(
                tokens = state.position.tokens,
                steps = state.position.steps,
                "resuming from {}",
                dir.display()
            );
            Some((state, trainers, logs))
        }
        None => None,
    };
    let sample_rows = cfg.init_sample_rows.max(1);
    let sample = source.sample(&hooks, sample_rows, cfg.seed)?;
    let resumed_from_tokens = resumed.as_ref().map(|(s, _, _)| s.position.tokens);
    let (mut state, mut trainers, mut logs) = match resumed {
        Some(r) => r,
        None => {
            let mut norm_factors = BTreeMap::new();
            if cfg.normalize_activations == Normalization::ExpectedAverageOnlyIn {
                for (h, rows) in hooks.iter().zip(&sample) {
                    norm_factors.insert(h.clone(), norm_scaling_factor(rows));
                }
            }
            let mut trainers = fresh;
            let mut b_dec_init = BTreeMap::new();
            for (d, t) in dicts.iter().zip(&mut trainers) {
                let target = d.hook_out.as_ref().unwrap_or(&d.hook);
                let factor = norm_factors.get(target).copied().unwrap_or(1.0);
                let rows: Vec<Vec<f32>> = sample[hook_index(target)]
                    .iter()
                    .map(|r| r.iter().map(|v| v * factor).collect())
                    .collect();
                let b = match cfg.b_dec_init {
                    BDecInit::GeometricMedian => geometric_median(&rows, MEDIAN_ITERATIONS),
                    BDecInit::Mean => mean(&rows),
                    BDecInit::Zeros => vec![0.0; d.shape.d_out()],
                };
                if let Some(bad) = b.iter().find(|v| !v.is_finite()) {
                    return Err(DictError::Diverged {
                        step: 0,
                        tokens: 0,
                        what: format!(
                            "dictionary `{}`: b_dec init is {bad}; does `{target}` hold \
                             non-finite values?",
                            d.name
                        ),
                    });
                }
                t.set_b_dec(&b)?;
                b_dec_init.insert(d.name.clone(), b);
            }
            let state = checkpoint::State {
                format: checkpoint::FORMAT,
                config: cfg.clone(),
                position: Position::default(),
                norm_factors,
                b_dec_init,
            };
            (state, trainers, vec![Vec::new(); dicts.len()])
        }
    };
    // A checkpoint may come from a run with another `out` or reporting interval.
    state.config = cfg.clone();

    let total_steps = cfg.total_steps();
    let factors: Vec<f32> = hooks
        .iter()
        .map(|h| state.norm_factors.get(h).copied().unwrap_or(1.0))
        .collect();
    let start = Instant::now();
    let start_tokens = state.position.tokens;
    let mut last_ckpt = state.position.tokens;
    let mut interrupted = false;
    let mut rows: Vec<(String, LogRow)> = names.iter().map(|n| (n.clone(), empty_row())).collect();
    if state.position.steps < total_steps {
        source.for_each_batch(
            &hooks,
            cfg.batch_size,
            cfg.seed,
            state.position,
            |pos, xs| {
                let xs: Vec<Tensor> = xs
                    .iter()
                    .zip(&factors)
                    .map(|(x, &f)| {
                        if f == 1.0 {
                            Ok(x.clone())
                        } else {
                            x.affine(f as f64, 0.0)
                        }
                    })
                    .collect::<candle_core::Result<_>>()?;
                let step = state.position.steps;
                let n = xs[0].dim(0)? as u64;
                for (i, (d, t)) in dicts.iter().zip(&mut trainers).enumerate() {
                    let x = &xs[hook_index(&d.hook)];
                    let y = d.hook_out.as_ref().map(|h| &xs[hook_index(h)]);
                    let c = coefficients(cfg, d.train.lr, d.train.sparsity_coef, step);
                    let stats = t
                        .step(x, y, c)
                        .map_err(|e| diverged(e, &d.name, &cfg.out))?;
                    rows[i].1 = log_row(step + 1, state.position.tokens + n, c, &stats, d);
                }
                state.position = Position {
                    epoch: pos.epoch,
                    batch: pos.batch,
                    steps: step + 1,
                    tokens: state.position.tokens + n,
                };
                let logged = (step + 1) % cfg.log_every_steps == 0 || step + 1 == total_steps;
                if logged {
                    for (log, (_, row)) in logs.iter_mut().zip(&rows) {
                        log.push(row.clone());
                    }
                }
                let every = cfg.checkpoint_every_tokens;
                let checkpointed = every > 0
                    && state.position.steps < total_steps
                    && state.position.tokens / every > last_ckpt / every;
                if checkpointed {
                    checkpoint::save(&cfg.out, &state, &names, &trainers, &logs)?;
                    last_ckpt = state.position.tokens;
                }
                let secs = start.elapsed().as_secs_f64().max(1e-9);
                let flow = on_progress(&Progress {
                    steps: state.position.steps,
                    total_steps,
                    tokens: state.position.tokens,
                    total_tokens: total_steps * cfg.batch_size as u64,
                    tokens_per_sec: (state.position.tokens - start_tokens) as f64 / secs,
                    dicts: &rows,
                    logged,
                    checkpointed,
                });
                if flow.is_break() {
                    interrupted = true;
                    return Ok(flow);
                }
                Ok(if state.position.steps >= total_steps {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                })
            },
        )?;
    }
    let seconds = || start.elapsed().as_secs_f64();
    let summary = |dicts| RunSummary {
        out: cfg.out.clone(),
        finished: !interrupted,
        steps: state.position.steps,
        tokens: state.position.tokens,
        resumed_from_tokens,
        seconds: seconds(),
        tokens_per_second: (state.position.tokens - start_tokens) as f64 / seconds().max(1e-9),
        dicts,
    };
    if interrupted {
        return Ok(summary(Vec::new()));
    }
    checkpoint::save(&cfg.out, &state, &names, &trainers, &logs)?;

    let metadata = source.metadata();
    let mut summaries = Vec::with_capacity(dicts.len());
    for ((d, t), log) in dicts.iter().zip(&trainers).zip(&logs) {
        let scale_in = factors[hook_index(&d.hook)];
        let scale_out = d
            .hook_out
            .as_ref()
            .map_or(scale_in, |h| factors[hook_index(h)]);
        let mut meta = metadata.clone();
        meta.hook_name = Some(d.hook.clone());
        meta.hook_name_out = d.hook_out.clone();
        meta.sae_lens_training_version = Some(format!("scalpel {}", env!("CARGO_PKG_VERSION")));
        let extra = &mut meta.extra;
        extra.insert("trained_with".into(), Value::from("scalpel"));
        extra.insert("training_tokens".into(), Value::from(state.position.tokens));
        extra.insert("activation".into(), Value::from(d.shape.activation.name()));
        extra.insert(
            "normalize_activations_during_training".into(),
            serde_json::to_value(cfg.normalize_activations).unwrap_or(Value::Null),
        );
        extra.insert("norm_scaling_factor".into(), Value::from(scale_in));
        if d.hook_out.is_some() {
            extra.insert("norm_scaling_factor_out".into(), Value::from(scale_out));
        }
        let mut sae = t.to_sae(meta, scale_in, scale_out)?;
        for (name, tensor) in sae.named_tensors() {
            let finite = tensor
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|v| v.is_finite());
            if !finite {
                return Err(DictError::Diverged {
                    step: state.position.steps,
                    tokens: state.position.tokens,
                    what: format!(
                        "dictionary `{}`: {name} is not finite; nothing written",
                        d.name
                    ),
                });
            }
        }
        // The saved dictionary reads raw activations: its densities come from the raw sample.
        let density = log_feature_density(&sae, &sample[hook_index(&d.hook)])?;
        let dead_on_sample = density.iter().filter(|&&v| v <= -9.9).count();
        sae.sparsity = Some(Tensor::new(density, &Device::Cpu)?);
        let dir = cfg.out.join(&d.name);
        saelens::save(&sae, &dir)?;
        write_file(&dir.join("training_log.jsonl"), &checkpoint::log_jsonl(log))?;
        write_file(&dir.join("run.toml"), &cfg.to_toml())?;
        summaries.push(DictSummary {
            name: d.name.clone(),
            dir,
            architecture: sae.cfg.architecture.name().into(),
            hook_name: d.hook.clone(),
            hook_name_out: d.hook_out.clone(),
            d_in: d.shape.d_in,
            d_sae: d.shape.d_sae,
            last: log.last().cloned(),
            dead_on_sample,
        });
    }
    Ok(summary(summaries))
}

fn write_file(path: &std::path::Path, body: &str) -> Result<()> {
    scalpel_models::files::write_atomically(path, |w| w.write_all(body.as_bytes()))
        .map_err(|(path, source)| DictError::Io { path, source })
}

fn empty_row() -> LogRow {
    LogRow {
        step: 0,
        tokens: 0,
        lr: 0.0,
        sparsity_coef: 0.0,
        loss: 0.0,
        mse: 0.0,
        aux: 0.0,
        sparsity_loss: 0.0,
        l0: 0.0,
        explained_variance: 0.0,
        dead_fraction: 0.0,
    }
}

fn log_row(step: u64, tokens: u64, c: Coefficients, s: &StepStats, d: &ResolvedDict) -> LogRow {
    LogRow {
        step,
        tokens,
        lr: c.lr,
        sparsity_coef: c.sparsity,
        loss: s.loss,
        mse: s.mse,
        aux: s.aux,
        sparsity_loss: s.sparsity_loss,
        l0: s.l0,
        explained_variance: s.explained_variance,
        dead_fraction: s.n_dead as f64 / d.shape.d_sae as f64,
    }
}

/// Names the dictionary in a divergence and says what was kept.
fn diverged(e: DictError, name: &str, out: &std::path::Path) -> DictError {
    match e {
        DictError::Diverged { step, tokens, what } => {
            let kept = match checkpoint::find(out) {
                Some(dir) => format!("the last checkpoint in {} is kept", dir.display()),
                None => "no checkpoint was written".to_string(),
            };
            DictError::Diverged {
                step,
                tokens,
                what: format!("dictionary `{name}`: {what}; nothing written, {kept}"),
            }
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_warm_up_and_decay() {
        let cfg = RunConfig {
            tokens: 100,
            batch_size: 1,
            lr_warm_up_steps: 10,
            lr_decay_steps: 20,
            lr_end: Some(0.0),
            l1_warm_up_steps: 4,
            ..RunConfig::default()
        };
        let c = |s| coefficients(&cfg, 1.0, 2.0, s);
        assert!((c(0).lr - 0.1).abs() < 1e-6);
        assert_eq!(c(9).lr, 1.0);
        assert_eq!(c(50).lr, 1.0);
        assert!((c(89).lr - 0.5).abs() < 1e-6, "{}", c(89).lr);
        assert_eq!(c(99).lr, 0.0);
        assert_eq!(c(0).sparsity, 0.5);
        assert_eq!(c(3).sparsity, 2.0);
        let cos = RunConfig {
            lr_decay: Decay::Cosine,
            lr_end: None,
            ..cfg.clone()
        };
        let c = |s| coefficients(&cos, 1.0, 2.0, s);
        assert!((c(89).lr - 0.55).abs() < 1e-6, "{}", c(89).lr);
        assert!((c(99).lr - 0.1).abs() < 1e-6);
    }

    #[test]
    fn dict_seeds_depend_on_the_name_only() {
        assert_eq!(dict_seed(1, "a"), dict_seed(1, "a"));
        assert_ne!(dict_seed(1, "a"), dict_seed(1, "b"));
        assert_ne!(dict_seed(1, "a"), dict_seed(2, "a"));
    }
}
