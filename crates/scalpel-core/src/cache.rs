//! The activations one forward pass cached, keyed by hook point.

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::{HookError, HookPoint};

/// Cached activations, in forward order of their hook points.
#[derive(Debug, Default, Clone)]
pub struct ActivationCache {
    acts: BTreeMap<HookPoint, Tensor>,
}

impl ActivationCache {
    /// Stores (or overwrites) the activation at `point`.
    pub fn insert(&mut self, point: HookPoint, t: Tensor) {
        self.acts.insert(point, t);
    }

    /// The activation at `point`, if cached.
    pub fn get(&self, point: HookPoint) -> Option<&Tensor> {
        self.acts.get(&point)
    }

    /// The activation named `name` (canonical or shorthand); an error lists the cached names
    /// nearest to it.
    pub fn get_by_name(&self, name: &str) -> Result<&Tensor, HookError> {
        let keys: Vec<HookPoint> = self.acts.keys().copied().collect();
        let p = HookPoint::parse_for(name, &keys)?;
        Ok(&self.acts[&p])
    }

    /// Number of cached activations.
    pub fn len(&self) -> usize {
        self.acts.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.acts.is_empty()
    }

    /// Cached activations in forward order.
    pub fn iter(&self) -> impl Iterator<Item = (HookPoint, &Tensor)> {
        self.acts.iter().map(|(p, t)| (*p, t))
    }

    /// Removes and returns the activation at `point`.
    pub fn remove(&mut self, point: HookPoint) -> Option<Tensor> {
        self.acts.remove(&point)
    }
}

impl IntoIterator for ActivationCache {
    type Item = (HookPoint, Tensor);
    type IntoIter = std::collections::btree_map::IntoIter<HookPoint, Tensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.acts.into_iter()
    }
}
