//! What a caller asks of one forward pass: activations to cache, activations to read or replace,
//! and activations to track for gradients.
//!
//! The model calls [`Hooks::apply`] at every hook point. With nothing requested that call returns
//! its input at once, so a forward pass without hooks does no extra work; expensive optional
//! activations (`attn.hook_result`, the unfused normaliser's `hook_scale`) are computed only when
//! [`Hooks::wants`] says someone asked for them.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::{ActivationCache, HookError, HookPoint};

/// What a hook function learns about the place it runs.
#[derive(Debug, Clone, Copy)]
pub struct HookCtx {
    /// The hook point being run.
    pub point: HookPoint,
    /// Position of the first token of this forward in the whole sequence (non-zero while
    /// generating with a KV cache).
    pub pos_offset: usize,
}

/// A hook function: reads the activation and optionally returns a replacement of the same shape.
pub type HookFn<'a> = Box<dyn FnMut(&Tensor, &HookCtx) -> candle_core::Result<Option<Tensor>> + 'a>;

type Filter<'a> = Box<dyn Fn(HookPoint) -> bool + 'a>;

/// The hooks of one forward pass (or of every step of a generation).
#[derive(Default)]
pub struct Hooks<'a> {
    cache_filter: Option<Filter<'a>>,
    fns: HashMap<HookPoint, Vec<HookFn<'a>>>,
    grad_points: HashSet<HookPoint>,
    grad_vars: HashMap<HookPoint, Var>,
    cache: ActivationCache,
    pos_offset: usize,
}

impl<'a> Hooks<'a> {
    /// No hooks: the forward pass runs as if the machinery did not exist.
    pub fn new() -> Self {
        Self::default()
    }

    /// Caches every hook point for which `filter` is true.
    pub fn with_cache(mut self, filter: impl Fn(HookPoint) -> bool + 'a) -> Self {
        self.cache_filter = Some(Box::new(filter));
        self
    }

    /// Caches exactly these hook points.
    pub fn with_cache_points(self, points: impl IntoIterator<Item = HookPoint>) -> Self {
        let set: HashSet<HookPoint> = points.into_iter().collect();
        self.with_cache(move |p| set.contains(&p))
    }

    /// Adds a function that reads, and may replace, the activation at `point`. Several functions
    /// at one point run in the order they were added, each seeing the previous one's output.
    pub fn with_hook(
        mut self,
        point: HookPoint,
        f: impl FnMut(&Tensor, &HookCtx) -> candle_core::Result<Option<Tensor>> + 'a,
    ) -> Self {
        self.fns.entry(point).or_default().push(Box::new(f));
        self
    }

    /// Tracks the activation at `point` for gradients: after `loss.backward()`,
    /// [`Hooks::gradients`] returns d loss / d activation. The model then takes differentiable
    /// code paths everywhere (no fused kernels without a backward pass).
    pub fn with_grad(mut self, point: HookPoint) -> Self {
        self.grad_points.insert(point);
        self
    }

    /// True when nothing at all was requested.
    pub fn is_empty(&self) -> bool {
        self.cache_filter.is_none() && self.fns.is_empty() && self.grad_points.is_empty()
    }

    /// True when gradients are tracked, so the forward pass must stay differentiable.
    pub fn needs_grad(&self) -> bool {
        !self.grad_points.is_empty()
    }

    /// True when someone reads, replaces or tracks the activation at `point`.
    pub fn wants(&self, point: HookPoint) -> bool {
        self.fns.contains_key(&point)
            || self.grad_points.contains(&point)
            || self.cache_filter.as_ref().is_some_and(|f| f(point))
    }

    /// Every hook point something was asked of (functions and gradients; cache filters are
    /// closures and cannot be listed).
    pub fn requested_points(&self) -> impl Iterator<Item = HookPoint> + '_ {
        self.fns.keys().chain(self.grad_points.iter()).copied()
    }

    /// Sets the sequence offset reported to hook functions (used by generation).
    pub fn set_pos_offset(&mut self, offset: usize) {
        self.pos_offset = offset;
    }

    /// Runs the hooks at `point` on `x` and returns the activation the model continues with.
    pub fn apply(&mut self, point: HookPoint, x: Tensor) -> Result<Tensor, HookError> {
        if self.is_empty() {
            return Ok(x);
        }
        let mut x = x;
        if let Some(fns) = self.fns.get_mut(&point) {
            let ctx = HookCtx {
                point,
                pos_offset: self.pos_offset,
            };
            for f in fns.iter_mut() {
                let replacement = f(&x, &ctx).map_err(|source| HookError::Failed {
                    hook: point.to_string(),
                    source,
                })?;
                if let Some(r) = replacement {
                    if r.dims() != x.dims() {
                        return Err(HookError::ReplacementShape {
                            hook: point.to_string(),
                            expected: x.dims().to_vec(),
                            found: r.dims().to_vec(),
                        });
                    }
                    x = r;
                }
            }
        }
        if self.grad_points.contains(&point) {
            // x + 0 where 0 is a variable: the graph through x stays intact (so gradients of
            // earlier tracked points are complete) and d loss / d var = d loss / d x.
            let failed = |source| HookError::Failed {
                hook: point.to_string(),
                source,
            };
            let zero = Var::zeros(x.dims(), x.dtype(), x.device()).map_err(failed)?;
            x = x.broadcast_add(zero.as_tensor()).map_err(failed)?;
            self.grad_vars.insert(point, zero);
        }
        if self.cache_filter.as_ref().is_some_and(|f| f(point)) {
            self.cache.insert(point, x.clone());
        }
        Ok(x)
    }

    /// The cache filled so far (cleared).
    pub fn take_cache(&mut self) -> ActivationCache {
        std::mem::take(&mut self.cache)
    }

    /// The cache filled so far.
    pub fn cache(&self) -> &ActivationCache {
        &self.cache
    }

    /// d loss / d activation for every point tracked with [`Hooks::with_grad`], given the result
    /// of `loss.backward()`. Points the loss does not depend on get zeros.
    pub fn gradients(&self, grads: &GradStore) -> candle_core::Result<HashMap<HookPoint, Tensor>> {
        self.grad_vars
            .iter()
            .map(|(p, v)| {
                let g = match grads.get(v.as_tensor()) {
                    Some(g) => g.clone(),
                    None => v.as_tensor().zeros_like()?,
                };
                Ok((*p, g))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn empty_hooks_pass_through() {
        let mut h = Hooks::new();
        let x = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = h.apply(HookPoint::Embed, x.clone()).unwrap();
        assert_eq!(x.id(), y.id());
        assert!(h.cache().is_empty());
    }

    #[test]
    fn replacement_of_wrong_shape_is_refused() {
        let mut h = Hooks::new().with_hook(HookPoint::Embed, |x, _| Ok(Some(x.narrow(1, 0, 1)?)));
        let x = Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let err = h.apply(HookPoint::Embed, x).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("hook_embed") && msg.contains("[2, 1]") && msg.contains("[2, 3]"),
            "{msg}"
        );
    }

    #[test]
    fn cache_sees_the_replaced_value_and_grad_flows() {
        let mut h = Hooks::new()
            .with_hook(HookPoint::Embed, |x, _| Ok(Some((x * 2.0)?)))
            .with_cache_points([HookPoint::Embed])
            .with_grad(HookPoint::Embed);
        let x = Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let y = h.apply(HookPoint::Embed, x).unwrap();
        let cached = h
            .cache()
            .get(HookPoint::Embed)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(cached, vec![2., 4., 6.]);
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = h.gradients(&grads).unwrap()[&HookPoint::Embed]
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(g, vec![4., 8., 12.]);
    }
}
