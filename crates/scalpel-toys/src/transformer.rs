//! Growing the core transformer from scratch: seeded initialisation into trainable variables, a
//! cross-entropy with its own backward pass (log-sum-exp in f64, so a loss of 1e-7 is still
//! resolved), and the training step shared by the transformer toys.
//!
//! The model trained here is `scalpel_models::transformer::Model` itself, run on its
//! differentiable path; analyses then use the same object through hook points.

use std::collections::HashMap;

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var};
use rand::{Rng, SeedableRng};
use scalpel_core::Hooks;
use scalpel_models::config::Config;
use scalpel_models::transformer::{Model, RunOptions, WeightSource};

use crate::fused::Fused;
use crate::optim::{AdamW, AdamWConfig};
use crate::{Result, ToyError};

/// How one weight is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
}

/// A seeded weight source: each tensor's values depend only on the seed and its name.
pub struct SeededInit<F: Fn(&str, &[usize]) -> Init> {
    seed: u64,
    rule: F,
    vars: Vec<(String, Var)>,
}

impl<F: Fn(&str, &[usize]) -> Init> SeededInit<F> {
    /// `rule(name, shape)` picks the initialisation of each canonical weight.
    pub fn new(seed: u64, rule: F) -> Self {
        SeededInit {
            seed,
            rule,
            vars: Vec::new(),
        }
    }
}

impl<F: Fn(&str, &[usize]) -> Init> WeightSource for SeededInit<F> {
    fn get(&mut self, name: &str, shape: &[usize], dev: &Device) -> scalpel_models::Result<Tensor> {
        let n: usize = shape.iter().product();
        let data = match (self.rule)(name, shape) {
            Init::Zeros => vec![0f32; n],
            Init::Ones => vec![1f32; n],
            Init::Normal(std) => normals(stream_seed(self.seed, name), n, std),
        };
        let var = Var::from_tensor(&Tensor::from_vec(data, shape, dev)?)?;
        let t = var.as_tensor().clone();
        self.vars.push((name.to_string(), var));
        Ok(t)
    }
}

/// A per-name seed, so adding a tensor elsewhere does not change this one's values.
fn stream_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = seed ^ 0x9e37_79b9_7f4a_7c15;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// `n` draws from N(0, std²) (Box–Muller).
pub fn normals(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
            let u2: f64 = rng.gen();
            (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// A model with trainable weights and its optimiser.
pub struct Trainable {
    pub model: Model,
    pub opt: AdamW,
    /// The hand-written forward and backward pass, when the configuration allows it.
    fused: Option<Fused>,
}

impl Trainable {
    /// Builds `cfg` with weights from `rule` and an AdamW over all of them.
    pub fn new(
        cfg: Config,
        seed: u64,
        rule: impl Fn(&str, &[usize]) -> Init,
        adam: AdamWConfig,
    ) -> Result<Self> {
        let mut init = SeededInit::new(seed, rule);
        let model = Model::load(cfg, &mut init, &Device::Cpu)?;
        let opt = AdamW::new(init.vars, adam)?;
        let fused = Fused::supports(model.config())
            .then(|| Fused::new(model.config()))
            .transpose()?;
        Ok(Trainable { model, opt, fused })
    }

    /// Trains through candle's autograd on the model's differentiable path even where the fused
    /// pass exists (a slower reference; the two agree, see `tests/fused.rs`).
    pub fn use_autograd(&mut self) {
        self.fused = None;
    }

    /// Whether training steps take the fused path.
    pub fn is_fused(&self) -> bool {
        self.fused.is_some()
    }

    /// Puts saved parameters (by canonical name) into the model's variables.
    pub fn set_params(&mut self, params: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.opt.vars() {
            let t = params
                .get(name)
                .ok_or_else(|| ToyError::Config(format!("no saved tensor {name}")))?;
            if t.dims() != var.as_tensor().dims() {
                return Err(ToyError::Config(format!(
                    "saved tensor {name} has shape {:?}, the model needs {:?}",
                    t.dims(),
                    var.as_tensor().dims()
                )));
            }
            var.set(t)?;
        }
        Ok(())
    }

    /// The current parameters by canonical name (copies).
    pub fn params(&self) -> Result<HashMap<String, Tensor>> {
        self.opt
            .vars()
            .map(|(n, v)| Ok((n.to_string(), v.as_tensor().copy()?)))
            .collect()
    }

    /// Differentiable logits `[b, p, d_vocab]`.
    pub fn logits(&self, tokens: &Tensor) -> Result<Tensor> {
        let opts = RunOptions {
            differentiable: true,
            ..Default::default()
        };
        Ok(self
            .model
            .forward_with(tokens, None, &mut Hooks::new(), opts)?)
    }

    /// One training step on next-token-style targets: `tokens` holds `batch` rows of equal
    /// length, `targets` one entry per token (`None`: no loss at that position); the loss is the
    /// mean cross-entropy over the targeted positions. Returns the loss before the update.
    pub fn train_step(
        &mut self,
        tokens: &[u32],
        batch: usize,
        targets: &[Option<u32>],
        lr: f64,
    ) -> Result<f64> {
        if batch == 0 || !tokens.len().is_multiple_of(batch) || targets.len() != tokens.len() {
            return Err(ToyError::Config(format!(
                "{} tokens and {} targets do not form {batch} equal rows",
                tokens.len(),
                targets.len()
            )));
        }
        if let Some(f) = &self.fused {
            let (loss, grads) = f.loss_and_grads(&self.opt, tokens, batch, targets)?;
            if !loss.is_finite() {
                return Err(ToyError::Diverged {
                    step: self.opt.t() as usize,
                    what: format!("loss is {loss}"),
                });
            }
            self.opt.apply(&grads, lr)?;
            f.recycle(grads);
            return Ok(loss);
        }
        let p = tokens.len() / batch;
        let t = Tensor::from_slice(tokens, (batch, p), &Device::Cpu)?;
        let logits = self.logits(&t)?;
        let loss = CrossEntropy::loss(&logits, targets.to_vec())?;
        self.step(&loss, lr)
    }

    /// One optimiser step on `loss` at learning rate `lr`; returns the loss value.
    pub fn step(&mut self, loss: &Tensor, lr: f64) -> Result<f64> {
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(ToyError::Diverged {
                step: self.opt.t() as usize,
                what: format!("loss is {value}"),
            });
        }
        let grads = loss.backward()?;
        self.opt.step(&grads, lr)?;
        Ok(value)
    }
}

/// Mean cross-entropy of rows of logits against integer targets, with a hand-written backward.
/// A target of `None` leaves its row out of the mean.
pub struct CrossEntropy {
    targets: Vec<Option<u32>>,
}

impl CrossEntropy {
    /// The loss of `logits [rows, classes]` (any leading shape flattened) against `targets`.
    pub fn loss(logits: &Tensor, targets: Vec<Option<u32>>) -> Result<Tensor> {
        let classes = logits.dim(candle_core::D::Minus1)?;
        let rows = logits.elem_count() / classes.max(1);
        if targets.len() != rows {
            return Err(ToyError::Config(format!(
                "{} targets for {rows} rows of logits",
                targets.len()
            )));
        }
        if let Some(t) = targets.iter().flatten().find(|&&t| t as usize >= classes) {
            return Err(ToyError::Config(format!(
                "target {t} is out of range for {classes} classes"
            )));
        }
        let flat = logits.reshape((rows, classes))?;
        Ok(flat.apply_op1_arc(std::sync::Arc::new(Box::new(CrossEntropy { targets })))?)
    }

    fn rows<'a>(&self, storage: &'a CpuStorage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("cross-entropy takes f32 logits");
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("cross-entropy needs contiguous logits");
        };
        Ok(&data[a..b])
    }

    fn counted(&self) -> usize {
        self.targets.iter().flatten().count().max(1)
    }
}

/// `ln Σ exp(row)` in f64, with the maximum returned too.
fn log_sum_exp(row: &[f32]) -> (f64, f64) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    (max, s.ln())
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = self.rows(storage, layout)?;
        let classes = layout.dims()[1];
        let mut total = 0f64;
        for (row, t) in data.chunks_exact(classes).zip(&self.targets) {
            if let Some(t) = *t {
                total += row_loss(row, t as usize);
            }
        }
        let loss = (total / self.counted() as f64) as f32;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rows, classes) = arg.dims2()?;
        let g = grad_res.to_scalar::<f32>()? as f64 / self.counted() as f64;
        let arg = arg.contiguous()?;
        let (storage, layout) = arg.storage_and_layout();
        let candle_core::Storage::Cpu(storage) = &*storage else {
            candle_core::bail!("cross-entropy runs on the CPU");
        };
        let data = self.rows(storage, layout)?;
        let mut out = vec![0f32; rows * classes];
        for ((row, t), o) in data
            .chunks_exact(classes)
            .zip(&self.targets)
            .zip(out.chunks_exact_mut(classes))
        {
            if let Some(t) = *t {
                row_grad(row, t as usize, g, o);
            }
        }
        Ok(Some(Tensor::from_vec(out, (rows, classes), arg.device())?))
    }
}

/// Cross-entropy of one row of logits against class `t`, in f64. When the target holds the
/// maximum, ln Σ exp(x_j − x_t) = ln(1 + Σ_{j≠t} exp(x_j − x_t)): `ln_1p` keeps a loss of 1e-7
/// exact instead of cancelling two large numbers.
pub(crate) fn row_loss(row: &[f32], t: usize) -> f64 {
    let xt = row[t] as f64;
    let (max, lse) = log_sum_exp(row);
    if xt >= max {
        let rest: f64 = row
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != t)
            .map(|(_, &x)| (x as f64 - xt).exp())
            .sum();
        rest.ln_1p()
    } else {
        max + lse - xt
    }
}

/// Writes `g · (softmax(row) − onehot(t))` into `out` and returns the row's loss.
pub(crate) fn row_loss_grad(row: &[f32], t: usize, g: f64, out: &mut [f32]) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    // One f32 exponential per entry (relative error ~1e-7 even for tiny values), e_j = exp(x_j −
    // max), kept in `out` until normalised; sums in f64.
    for (&x, o) in row.iter().zip(out.iter_mut()) {
        *o = (x - max).exp();
    }
    let et = out[t] as f64;
    let others: f64 = out.iter().map(|&e| e as f64).sum::<f64>() - et;
    let others = others.max(0.0);
    let total = et + others;
    let scale = (g / total) as f32;
    for o in out.iter_mut() {
        *o *= scale;
    }
    out[t] = (-g * others / total) as f32;
    let xt = row[t];
    if xt >= max {
        // e_t = 1: ln(1 + Σ_{j≠t} e_j) without cancellation.
        others.ln_1p()
    } else {
        total.ln() - (xt as f64 - max as f64)
    }
}

/// Writes `g · (softmax(row) − onehot(t))` into `out`.
pub(crate) fn row_grad(row: &[f32], t: usize, g: f64, out: &mut [f32]) {
    let (max, lse) = log_sum_exp(row);
    let mut others = 0f64;
    for (j, (&x, o)) in row.iter().zip(out.iter_mut()).enumerate() {
        let p = (x as f64 - max - lse).exp();
        if j != t {
            others += p;
            *o = (g * p) as f32;
        }
    }
    // p_t − 1 = −Σ_{j≠t} p_j, exact even when p_t rounds to 1.
    out[t] = (-g * others) as f32;
}

/// Per-row cross-entropy (no gradient), in f64, for analyses.
pub fn per_row_loss(logits: &Tensor, targets: &[u32]) -> Result<Vec<f64>> {
    let classes = logits.dim(candle_core::D::Minus1)?;
    let data = logits.flatten_all()?.to_vec1::<f32>()?;
    Ok(data
        .chunks_exact(classes)
        .zip(targets)
        .map(|(row, &t)| row_loss(row, t as usize))
        .collect())
}
