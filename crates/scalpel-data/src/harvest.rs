//! Harvesting: run the model over packed contexts and hand every requested activation, one
//! context at a time, to a sink (the activation store, or a streaming shuffle buffer).
//!
//! One forward pass fills every requested hook at once, truncated after the deepest block that
//! any of them lives in. Activations with extra per-position axes (`hook_z`: `[p, h, dh]`) are
//! flattened per position (SAELens's `reshape_activations = "hook_z"`); activations that are not
//! per position (attention patterns) cannot be harvested and are refused up front.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use scalpel_core::{HookPoint, Hooks};
use scalpel_models::transformer::{Model, RunOptions};

use crate::{DataError, Result};

/// The block count a forward must run to fill all of `hooks`: `Some(l)` stops before block `l`;
/// `None` needs the whole model (final norm or unembedding hooks).
pub fn stop_layer(model: &Model, hooks: &[HookPoint]) -> Option<usize> {
    let mut deepest = 0;
    for hp in hooks {
        match hp {
            HookPoint::Embed | HookPoint::PosEmbed => {}
            HookPoint::Block(l, _) => deepest = deepest.max(l + 1),
            _ => return None,
        }
    }
    (deepest <= model.config().n_layers).then_some(deepest)
}

/// The width of one position's activation at `hp` (`d` of the store), or an error for hooks
/// that are not per position.
pub fn hook_width(model: &Model, hp: HookPoint) -> Result<usize> {
    let shape = model.hook_shape(hp, 2, 3);
    // Per-position activations are [b, p, ...]: probe with b=2, p=3 and check the layout.
    if shape.len() < 3 || shape[0] != 2 || shape[1] != 3 || model.hook_shape(hp, 2, 5)[1] != 5 {
        return Err(DataError::Input(format!(
            "`{hp}` is not a per-position activation (shape {shape:?} for 2 sequences of 3 \
             tokens) and cannot be harvested"
        )));
    }
    let d = shape[2..].iter().product();
    // Attention patterns are [b, h, p, p]: the probe above catches them through dim 1.
    Ok(d)
}

/// Runs `contexts` through the model `batch` contexts at a time and calls `sink` once per
/// context with its token ids and, per hook, its activations `[context_size, d]` (f32).
/// `on_batch` is told how many tokens each forward processed (for progress bars).
pub fn harvest<I, S, P>(
    model: &Model,
    contexts: I,
    hooks: &[HookPoint],
    batch: usize,
    mut sink: S,
    mut on_batch: P,
) -> Result<u64>
where
    I: Iterator<Item = Result<Vec<u32>>>,
    S: FnMut(&[u32], &[(HookPoint, Tensor)]) -> Result<()>,
    P: FnMut(usize),
{
    if hooks.is_empty() {
        return Err(DataError::Input("no hooks to harvest".into()));
    }
    if batch == 0 {
        return Err(DataError::Input("batch must be at least 1 context".into()));
    }
    for &hp in hooks {
        hook_width(model, hp)?;
    }
    let stop = stop_layer(model, hooks);
    let mut contexts = contexts.peekable();
    let mut done = 0u64;
    let mut buf: Vec<Vec<u32>> = Vec::with_capacity(batch);
    while contexts.peek().is_some() {
        buf.clear();
        while buf.len() < batch {
            match contexts.next() {
                Some(c) => buf.push(c?),
                None => break,
            }
        }
        let n_ctx = buf[0].len();
        if let Some(bad) = buf.iter().find(|c| c.len() != n_ctx) {
            return Err(DataError::Input(format!(
                "contexts must have one length: {} vs {}",
                bad.len(),
                n_ctx
            )));
        }
        let tokens = Tensor::new(buf.clone(), &Device::Cpu)?;
        let mut h = Hooks::new().with_cache_points(hooks.iter().copied());
        model.forward_with(
            &tokens,
            None,
            &mut h,
            RunOptions {
                stop_at_layer: stop,
                differentiable: false,
            },
        )?;
        let cache = h.take_cache();
        let per_hook: Vec<(HookPoint, Tensor)> = hooks
            .iter()
            .map(|&hp| {
                let t = cache.get(hp).ok_or_else(|| {
                    DataError::Input(format!("`{hp}` was not produced by the forward pass"))
                })?;
                let (b, p) = (t.dim(0)?, t.dim(1)?);
                Ok((hp, t.reshape((b, p, ()))?))
            })
            .collect::<Result<_>>()?;
        for (i, ctx) in buf.iter().enumerate() {
            let acts: Vec<(HookPoint, Tensor)> = per_hook
                .iter()
                .map(|(hp, t)| Ok((*hp, t.get(i)?)))
                .collect::<Result<_>>()?;
            sink(ctx, &acts)?;
        }
        let n = buf.len() * n_ctx;
        done += n as u64;
        on_batch(n);
    }
    Ok(done)
}

/// Activations produced on the fly, for training without an on-disk store: rows of one hook (or
/// of several, side by side: `[batch, Σ d]` in the order given, from one forward pass), shuffled
/// through a buffer of `buffer_rows`, in batches of `batch_size`.
pub struct ActivationStream<'m, I> {
    model: &'m Model,
    contexts: I,
    hooks: Vec<HookPoint>,
    forward_batch: usize,
    batch_size: usize,
    buffer_rows: usize,
    rows: Vec<Vec<f32>>,
    rng: rand::rngs::StdRng,
    exhausted: bool,
}

impl<'m, I: Iterator<Item = Result<Vec<u32>>>> ActivationStream<'m, I> {
    /// A stream over `contexts`; `forward_batch` contexts per forward pass.
    pub fn new(
        model: &'m Model,
        contexts: I,
        hook: HookPoint,
        forward_batch: usize,
        batch_size: usize,
        buffer_rows: usize,
        seed: u64,
    ) -> Result<Self> {
        Self::new_multi(
            model,
            contexts,
            &[hook],
            forward_batch,
            batch_size,
            buffer_rows,
            seed,
        )
    }

    /// A stream of several hooks read in the same forward passes: each row is the hooks' rows
    /// concatenated in the order of `hooks` (split them with `Tensor::narrow`), so every hook
    /// sees the same tokens.
    pub fn new_multi(
        model: &'m Model,
        contexts: I,
        hooks: &[HookPoint],
        forward_batch: usize,
        batch_size: usize,
        buffer_rows: usize,
        seed: u64,
    ) -> Result<Self> {
        if hooks.is_empty() {
            return Err(DataError::Input("no hooks to stream".into()));
        }
        for &hook in hooks {
            hook_width(model, hook)?;
        }
        if batch_size == 0 || forward_batch == 0 || buffer_rows < batch_size {
            return Err(DataError::Input(
                "batch sizes must be positive and the buffer at least one batch".into(),
            ));
        }
        Ok(ActivationStream {
            model,
            contexts,
            hooks: hooks.to_vec(),
            forward_batch,
            batch_size,
            buffer_rows,
            rows: Vec::new(),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            exhausted: false,
        })
    }

    /// Runs forwards until the buffer holds `buffer_rows` rows or the contexts run out.
    fn refill(&mut self) -> Result<()> {
        while !self.exhausted && self.rows.len() < self.buffer_rows {
            let chunk: Vec<Result<Vec<u32>>> =
                self.contexts.by_ref().take(self.forward_batch).collect();
            if chunk.is_empty() {
                self.exhausted = true;
                break;
            }
            let rows = &mut self.rows;
            harvest(
                self.model,
                chunk.into_iter(),
                &self.hooks,
                self.forward_batch,
                |_, acts| {
                    let parts: Vec<Tensor> = acts.iter().map(|(_, t)| t.clone()).collect();
                    rows.extend(Tensor::cat(&parts, 1)?.to_vec2::<f32>()?);
                    Ok(())
                },
                |_| {},
            )?;
        }
        self.rows.shuffle(&mut self.rng);
        Ok(())
    }
}

impl<I: Iterator<Item = Result<Vec<u32>>>> Iterator for ActivationStream<'_, I> {
    type Item = Result<Tensor>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rows.len() < self.batch_size {
            if let Err(e) = self.refill() {
                return Some(Err(e));
            }
        }
        if self.rows.len() < self.batch_size {
            return None; // a final partial batch is dropped, as in SAELens's store
        }
        let keep = self.rows.len() - self.batch_size;
        let batch: Vec<Vec<f32>> = self.rows.split_off(keep);
        Some(Tensor::new(batch, &Device::Cpu).map_err(DataError::from))
    }
}
