//! AdamW over candle variables, fused and in place, with state that checkpoints can save.
//!
//! `candle_nn::AdamW` builds a dozen temporary tensors per parameter per step and keeps its
//! moments where nothing can save them. Toy models take tens of thousands of small steps, so here
//! each parameter is updated in one pass over its memory (decoupled weight decay, bias-corrected
//! moments, PyTorch's `torch.optim.AdamW` arithmetic), and the moments are plain vectors that
//! [`AdamW::state`] hands to a checkpoint.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Layout, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Result, ToyError};

/// Hyper-parameters of AdamW (PyTorch's defaults except the weight decay, which is 0 here).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    /// The settings with PyTorch's eps.
    pub fn new(lr: f64, beta1: f64, beta2: f64, weight_decay: f64) -> Self {
        AdamWConfig {
            lr,
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay,
        }
    }

    /// Rejects settings that cannot train, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(ToyError::Config(m.to_string()));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr must be a finite number ≥ 0");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad("beta1 and beta2 must lie in [0, 1)");
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps must be positive");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be a finite number ≥ 0");
        }
        Ok(())
    }
}

/// One trainable tensor and its moments.
struct Param {
    name: String,
    var: Var,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// The optimiser: named variables, their first and second moments, and the step count.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Param>,
    t: u64,
}

/// The in-place update of one parameter.
struct Update<'a> {
    grad: &'a [f32],
    m: RefCell<&'a mut [f32]>,
    v: RefCell<&'a mut [f32]>,
    lr: f32,
    decay: f32,
    b1: f32,
    b2: f32,
    /// `1 / (1 − β₁ᵗ)` and `1 / sqrt(1 − β₂ᵗ)`.
    c1: f32,
    c2: f32,
    eps: f32,
}

impl candle_core::InplaceOp1 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("AdamW updates f32 parameters only");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("AdamW needs contiguous parameters");
        };
        let p = &mut data[start..end];
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        for i in 0..p.len() {
            let g = self.grad[i];
            m[i] = self.b1 * m[i] + (1.0 - self.b1) * g;
            v[i] = self.b2 * v[i] + (1.0 - self.b2) * g * g;
            // PyTorch: p ← p·(1 − lr·wd) − lr · m̂ / (sqrt(v̂) + eps).
            let denom = (v[i].sqrt() * self.c2) + self.eps;
            p[i] = p[i] * self.decay - self.lr * (m[i] * self.c1) / denom;
        }
        Ok(())
    }
}

impl AdamW {
    /// An optimiser over `vars` (name, variable); names must be unique.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        cfg.validate()?;
        let mut seen = std::collections::HashSet::new();
        let mut params = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if !seen.insert(name.clone()) {
                return Err(ToyError::Config(format!("parameter {name} listed twice")));
            }
            let n = var.as_tensor().elem_count();
            params.push(Param {
                name,
                var,
                m: vec![0.0; n],
                v: vec![0.0; n],
            });
        }
        Ok(AdamW { cfg, params, t: 0 })
    }

    /// The settings.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Steps taken so far.
    pub fn t(&self) -> u64 {
        self.t
    }

    /// The variables, by name, in the order given.
    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.var))
    }

    /// The gradients of every parameter as flat vectors (`None` where the loss does not depend on
    /// it). Fails with [`ToyError::Diverged`] if any is not finite.
    pub fn gradients(&self, grads: &GradStore) -> Result<Vec<Option<Vec<f32>>>> {
        let mut out = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let g = match grads.get(p.var.as_tensor()) {
                Some(g) => g.flatten_all()?.to_vec1::<f32>()?,
                None => {
                    out.push(None);
                    continue;
                }
            };
            if let Some(i) = g.iter().position(|x| !x.is_finite()) {
                return Err(ToyError::Diverged {
                    step: self.t as usize,
                    what: format!("gradient of {} is {} at index {i}", p.name, g[i]),
                });
            }
            out.push(Some(g));
        }
        Ok(out)
    }

    /// One update at learning rate `lr` (a schedule may differ from the configured rate). A
    /// non-finite gradient anywhere leaves every parameter untouched and fails. Parameters the
    /// loss does not reach are skipped, as PyTorch skips parameters without a gradient.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let flat = self.gradients(grads)?;
        self.apply(&flat, lr)
    }

    /// The update from flat gradients (one per parameter, in order). A non-finite value
    /// anywhere leaves every parameter untouched and fails.
    pub fn apply(&mut self, flat: &[Option<Vec<f32>>], lr: f64) -> Result<()> {
        if flat.len() != self.params.len() {
            return Err(ToyError::Config(format!(
                "{} gradients for {} parameters",
                flat.len(),
                self.params.len()
            )));
        }
        for ((name, _), g) in self.vars().zip(flat) {
            if let Some(i) = g
                .as_ref()
                .and_then(|g| g.iter().position(|x| !x.is_finite()))
            {
                return Err(ToyError::Diverged {
                    step: self.t as usize,
                    what: format!("gradient of {name} is not finite at index {i}"),
                });
            }
        }
        self.t += 1;
        let t = self.t as i32;
        let c = &self.cfg;
        for (p, g) in self.params.iter_mut().zip(flat) {
            let Some(g) = g else { continue };
            let up = Update {
                grad: g,
                m: RefCell::new(&mut p.m),
                v: RefCell::new(&mut p.v),
                lr: lr as f32,
                decay: (1.0 - lr * c.weight_decay) as f32,
                b1: c.beta1 as f32,
                b2: c.beta2 as f32,
                c1: (1.0 / (1.0 - c.beta1.powi(t))) as f32,
                c2: (1.0 / (1.0 - c.beta2.powi(t)).sqrt()) as f32,
                eps: c.eps as f32,
            };
            p.var.as_tensor().inplace_op1(&up)?;
        }
        Ok(())
    }

    /// Parameters and moments as named tensors (`{name}`, `{name}.adam_m`, `{name}.adam_v`), for
    /// a checkpoint; the step count travels separately ([`AdamW::t`]).
    pub fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(3 * self.params.len());
        for p in &self.params {
            let t = p.var.as_tensor();
            let dev = t.device();
            out.push((p.name.clone(), t.copy()?));
            out.push((
                format!("{}.adam_m", p.name),
                Tensor::from_slice(&p.m, t.shape(), dev)?,
            ));
            out.push((
                format!("{}.adam_v", p.name),
                Tensor::from_slice(&p.v, t.shape(), dev)?,
            ));
        }
        Ok(out)
    }

    /// Restores what [`AdamW::state`] saved, checking every name and shape.
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>, t: u64) -> Result<()> {
        for p in &mut self.params {
            let shape = p.var.as_tensor().shape().clone();
            let get = |key: String| -> Result<Tensor> {
                let x = tensors
                    .get(&key)
                    .ok_or_else(|| ToyError::Config(format!("checkpoint has no tensor {key}")))?;
                if x.shape() != &shape {
                    return Err(ToyError::Config(format!(
                        "checkpoint tensor {key} has shape {:?}, the model needs {:?}",
                        x.dims(),
                        shape.dims()
                    )));
                }
                Ok(x.clone())
            };
            let w = get(p.name.clone())?;
            let m = get(format!("{}.adam_m", p.name))?;
            let v = get(format!("{}.adam_v", p.name))?;
            p.var.set(&w)?;
            p.m = m.flatten_all()?.to_vec1()?;
            p.v = v.flatten_all()?.to_vec1()?;
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Two steps against PyTorch's AdamW arithmetic written out in f64.
    #[test]
    fn matches_the_reference_update() {
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let w0 = [1.0f32, -2.0, 0.5];
        let var = Var::new(&w0, &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg).unwrap();
        let (mut p, mut m, mut v) = ([1.0f64, -2.0, 0.5], [0.0f64; 3], [0.0f64; 3]);
        for t in 1..=2 {
            // loss = Σ w³ → gradient 3w².
            let loss = var.as_tensor().powf(3.0).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, cfg.lr).unwrap();
            for i in 0..3 {
                let g = 3.0 * p[i] * p[i];
                p[i] *= 1.0 - cfg.lr * cfg.weight_decay;
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g;
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g * g;
                let mh = m[i] / (1.0 - cfg.beta1.powi(t));
                let vh = v[i] / (1.0 - cfg.beta2.powi(t));
                p[i] -= cfg.lr * mh / (vh.sqrt() + cfg.eps);
            }
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        for i in 0..3 {
            assert!((got[i] as f64 - p[i]).abs() < 1e-5, "{got:?} vs {p:?}");
        }
        assert_eq!(opt.t(), 2);
    }

    #[test]
    fn non_finite_gradient_leaves_weights_alone() {
        let var = Var::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
        // d/dw sqrt(w) at 0 is infinite.
        let loss = var.as_tensor().sqrt().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let err = opt.step(&grads, 1e-3).unwrap_err();
        assert!(matches!(err, ToyError::Diverged { .. }), "{err}");
        assert_eq!(var.as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 0.0]);
        assert_eq!(opt.t(), 0);
    }

    #[test]
    fn state_round_trips() {
        let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamWConfig::default()).unwrap();
        let loss = var.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 1e-2).unwrap();
        let state: HashMap<String, Tensor> = opt.state().unwrap().into_iter().collect();
        let other = Var::new(&[0.0f32, 0.0], &Device::Cpu).unwrap();
        let mut opt2 =
            AdamW::new(vec![("w".into(), other.clone())], AdamWConfig::default()).unwrap();
        opt2.restore(&state, opt.t()).unwrap();
        for o in [&mut opt, &mut opt2] {
            let w: Var = o.vars().next().unwrap().1.clone();
            let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
            o.step(&loss.backward().unwrap(), 1e-2).unwrap();
        }
        assert_eq!(
            var.as_tensor().to_vec1::<f32>().unwrap(),
            other.as_tensor().to_vec1::<f32>().unwrap()
        );
        assert!(AdamWConfig {
            beta2: 1.0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
