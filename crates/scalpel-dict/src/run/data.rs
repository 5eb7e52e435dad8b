//! The run's activations: an activation store read in seeded epochs, or a model run over a
//! corpus while training. Batches are a pure function of (config, position), so a resumed run
//! sees the same batches as an uninterrupted one: a resume regenerates the epoch and skips the
//! batches already consumed.
//!
//! Several hooks are read in lockstep: every hook's batches come from the same seeded shuffle of
//! the same rows, so row `i` of every hook's batch is the same token (a transcoder's input and
//! target line up).

use std::ops::ControlFlow;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use scalpel_core::HookPoint;
use scalpel_data::harvest::{hook_width, ActivationStream};
use scalpel_data::packing::{Packer, PackingConfig};
use scalpel_data::store::StoreReader;
use scalpel_data::{corpus, DataError};
use scalpel_models::loader::{self, LoadedModel};
use serde_json::Value;

use super::config::{config_err, DataConfig};
use crate::{Metadata, Result};

/// Where the run is in its data: batches consumed in the current epoch, and totals.
#[derive(serde::Serialize, serde::Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Passes over the store begun (streaming: always 0).
    pub epoch: u64,
    /// Batches of `epoch` consumed.
    pub batch: u64,
    /// Optimiser steps taken (one per batch).
    pub steps: u64,
    /// Rows trained on.
    pub tokens: u64,
}

/// The run's data.
pub enum Source {
    Store {
        dir: PathBuf,
        reader: StoreReader,
        shuffle_buffer_shards: usize,
    },
    Stream {
        lm: Box<LoadedModel>,
        cfg: DataConfig,
        corpus: PathBuf,
    },
}

/// The seed of epoch `epoch`'s shuffle (splitmix64 of the pair, so epochs differ).
fn epoch_seed(seed: u64, epoch: u64) -> u64 {
    let mut z = seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sample's seed: a shuffle no training epoch uses.
const SAMPLE_EPOCH: u64 = u64::MAX;

impl Source {
    /// Opens the store, or loads the model for streaming.
    pub fn open(cfg: &DataConfig) -> Result<Source> {
        if let Some(dir) = &cfg.store {
            let reader = StoreReader::open(dir)?;
            return Ok(Source::Store {
                dir: dir.clone(),
                reader,
                shuffle_buffer_shards: cfg.shuffle_buffer_shards,
            });
        }
        let (Some(model), Some(corpus_spec)) = (&cfg.model, &cfg.corpus) else {
            return Err(config_err("data", "no store and no model + corpus"));
        };
        let lm = loader::load(model, &Device::Cpu).map_err(DataError::from)?;
        if cfg.context_size > lm.model.config().n_ctx {
            return Err(config_err(
                "data.context_size",
                format!(
                    "{} is longer than the model's context of {}",
                    cfg.context_size,
                    lm.model.config().n_ctx
                ),
            ));
        }
        Ok(Source::Stream {
            lm: Box::new(lm),
            cfg: cfg.clone(),
            corpus: corpus::resolve(corpus_spec)?,
        })
    }

    /// The hook's name as the data knows it and its width; an error lists the hooks there are.
    pub fn width(&self, hook: &str) -> Result<(String, usize)> {
        match self {
            Source::Store { reader, .. } => {
                let d = reader.manifest().hook_d(hook)?;
                Ok((hook.to_string(), d))
            }
            Source::Stream { lm, .. } => {
                let hp = self.hook_point(lm, hook)?;
                Ok((hp.to_string(), hook_width(&lm.model, hp)?))
            }
        }
    }

    fn hook_point(&self, lm: &LoadedModel, hook: &str) -> Result<HookPoint> {
        lm.model
            .hook_point(hook)
            .map_err(|e| DataError::Input(e.to_string()).into())
    }

    /// What the saved `cfg.json` says about the data: model, context size, BOS, corpus...
    pub fn metadata(&self) -> Metadata {
        let mut m = Metadata::default();
        match self {
            Source::Store { dir, reader, .. } => {
                let meta = &reader.manifest().meta;
                m.model_name = Some(meta.model.clone());
                m.context_size = Some(meta.context_size);
                m.prepend_bos = meta.packing.get("prepend_bos").and_then(Value::as_bool);
                m.dataset_path = Some(meta.corpus.clone());
                m.exclude_special_tokens = Some(Value::Bool(!meta.exclude_token_ids.is_empty()));
                m.seqpos_slice = meta.seqpos_slice.map(|s| {
                    Value::Array(
                        [s.start, s.end, s.step]
                            .iter()
                            .map(|v| v.map_or(Value::Null, Value::from))
                            .collect(),
                    )
                });
                m.extra.insert(
                    "activation_store".into(),
                    Value::from(dir.display().to_string()),
                );
            }
            Source::Stream { cfg, .. } => {
                m.model_name = cfg.model.clone();
                m.context_size = Some(cfg.context_size);
                m.prepend_bos = Some(cfg.prepend_bos);
                m.dataset_path = cfg.corpus.clone();
                m.exclude_special_tokens = Some(Value::Bool(false));
            }
        }
        m
    }

    /// Up to `n` rows of each of `hooks` (in lockstep), from a shuffle no epoch uses.
    pub fn sample(&self, hooks: &[String], n: usize, seed: u64) -> Result<Vec<Vec<Vec<f32>>>> {
        let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::new(); hooks.len()];
        let batch = match self {
            Source::Store { .. } => n,
            Source::Stream { cfg, .. } => n.min(cfg.shuffle_buffer_rows),
        };
        self.for_each_epoch_batch(hooks, batch, epoch_seed(seed, SAMPLE_EPOCH), true, |xs| {
            for (o, x) in out.iter_mut().zip(xs) {
                o.extend(x.to_vec2::<f32>()?);
            }
            Ok(if out[0].len() >= n {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            })
        })?;
        for o in &mut out {
            o.truncate(n);
        }
        Ok(out)
    }

    /// Calls `f` with every batch (one `[batch, d]` tensor per hook) from `start` on, in order,
    /// until it breaks; every batch is full (an epoch's partial last batch is dropped). The store
    /// is read epoch after epoch; a stream ends with its corpus. `f` gets the position after the
    /// batch (`steps` and `tokens` are the caller's).
    pub fn for_each_batch(
        &self,
        hooks: &[String],
        batch: usize,
        seed: u64,
        start: Position,
        mut f: impl FnMut(Position, &[Tensor]) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        let mut pos = start;
        loop {
            let mut skip = pos.batch;
            let mut seen = 0u64;
            let mut stop = false;
            self.for_each_epoch_batch(hooks, batch, epoch_seed(seed, pos.epoch), false, |xs| {
                seen += 1;
                if skip > 0 {
                    skip -= 1;
                    return Ok(ControlFlow::Continue(()));
                }
                pos.batch += 1;
                let flow = f(pos, xs)?;
                stop = flow.is_break();
                Ok(flow)
            })?;
            if stop {
                return Ok(());
            }
            if seen == 0 {
                return Err(DataError::Input(format!(
                    "the data has fewer rows than one batch ({batch}); lower batch_size"
                ))
                .into());
            }
            if matches!(self, Source::Stream { .. }) {
                tracing::warn!("the corpus ran out before the token budget was reached");
                return Ok(());
            }
            pos.epoch += 1;
            pos.batch = 0;
        }
    }

    /// One epoch's batches (`partial`: keep a short last batch).
    fn for_each_epoch_batch(
        &self,
        hooks: &[String],
        batch: usize,
        seed: u64,
        partial: bool,
        mut f: impl FnMut(&[Tensor]) -> Result<ControlFlow<()>>,
    ) -> Result<()> {
        match self {
            Source::Store {
                reader,
                shuffle_buffer_shards,
                ..
            } => {
                let mut iters = hooks
                    .iter()
                    .map(|h| reader.batches(h, batch, seed, *shuffle_buffer_shards))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                lockstep(&mut iters, batch, partial, &mut f)
            }
            Source::Stream { lm, cfg, corpus } => {
                let tokenizer = lm.tokenizer().map_err(DataError::from)?;
                let packing = PackingConfig {
                    context_size: cfg.context_size,
                    prepend_bos: cfg.prepend_bos,
                    ..PackingConfig::default()
                };
                // One forward pass serves every hook: the stream yields the hooks' rows side by
                // side, split here.
                let points = hooks
                    .iter()
                    .map(|h| self.hook_point(lm, h))
                    .collect::<Result<Vec<_>>>()?;
                let widths = points
                    .iter()
                    .map(|&p| hook_width(&lm.model, p))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let docs = corpus::open(corpus, &cfg.text_field)?;
                let contexts = Packer::new(tokenizer, &packing, docs)?;
                let stream = ActivationStream::new_multi(
                    &lm.model,
                    contexts,
                    &points,
                    cfg.forward_batch,
                    batch,
                    cfg.shuffle_buffer_rows.max(batch),
                    seed,
                )?;
                let split = stream.map(|x| {
                    let x = x?;
                    let mut at = 0;
                    widths
                        .iter()
                        .map(|&d| {
                            let part = x.narrow(1, at, d)?.contiguous();
                            at += d;
                            part
                        })
                        .collect::<candle_core::Result<Vec<Tensor>>>()
                        .map_err(scalpel_data::DataError::from)
                });
                for xs in split {
                    let xs = xs?;
                    if xs[0].dim(0)? < batch && !partial {
                        return Ok(());
                    }
                    if f(&xs)?.is_break() {
                        return Ok(());
                    }
                }
                Ok(())
            }
        }
    }
}

/// Draws one batch from every iterator at a time until one runs out (or a batch is short and
/// `partial` is false) or `f` breaks.
fn lockstep<I: Iterator<Item = scalpel_data::Result<Tensor>>>(
    iters: &mut [I],
    batch: usize,
    partial: bool,
    f: &mut impl FnMut(&[Tensor]) -> Result<ControlFlow<()>>,
) -> Result<()> {
    loop {
        let mut xs = Vec::with_capacity(iters.len());
        for it in iters.iter_mut() {
            match it.next() {
                Some(x) => xs.push(x?),
                None => return Ok(()),
            }
        }
        if xs[0].dim(0)? < batch && !partial {
            return Ok(());
        }
        if f(&xs)?.is_break() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_have_distinct_seeds() {
        assert_ne!(epoch_seed(1, 0), epoch_seed(1, 1));
        assert_ne!(epoch_seed(1, 0), epoch_seed(2, 0));
        assert_eq!(epoch_seed(7, 3), epoch_seed(7, 3));
    }
}
