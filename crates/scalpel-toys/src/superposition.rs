//! Toy Models of Superposition (Elhage et al. 2022, <https://transformer-circuits.pub/2022/toy_model>).
//!
//! The model is `h = W x`, `x' = ReLU(Wᵀ h + b)` with `W` of shape `[m, n]`: `n` features squeezed
//! through `m < n` hidden dimensions. Features are uniform on `[0, 1)` and each is zero with
//! probability `S` (its *sparsity*); the loss weighs each feature's squared error by its
//! importance. Many instances (one per sparsity, or per phase-diagram cell) train side by side as
//! one batched model, `W [I, m, n]`, `b [I, n]`.
//!
//! Training runs a fused forward and backward pass written out by hand ([`ToyModel::fused_grads`]):
//! the model is tiny, so candle's per-op cost would dominate, and sparse inputs let the pass skip
//! the zero features. The plain candle-autograd path ([`ToyModel::loss`]) sits beside it and the
//! tests compare both with finite differences.
//!
//! The analyses are the paper's: feature norms `‖W_i‖`, superposition `Σ_{j≠i} (Ŵ_i·W_j)²`, feature
//! dimensionality `D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)²`, dimensions per feature `D* = m / ‖W‖_F²`, the
//! geometry of interfering features (antipodal pairs, pentagons, ...), the dimensionality sweep
//! over sparsity and the two-feature phase diagram.

pub mod report;

use scalpel_core::gemm::dot;
use std::path::Path;

use candle_core::{Device, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::optim::{AdamW, AdamWConfig};
use crate::transformer::normals;
use crate::{checkpoint, Result, ToyError};

/// A feature whose direction is shorter than this is dead: its dimensionality is 0.
const DEAD_NORM: f64 = 1e-3;
/// A feature whose direction is at least this long is represented (trained ones sit near 1).
const REPRESENTED_NORM: f64 = 0.5;
/// Two represented features interfere when `|Ŵ_i·Ŵ_j|` exceeds this.
const INTERFERENCE: f64 = 0.1;
/// How far a group's mean dimensionality may sit from its structure's value.
const STRUCTURE_TOL: f64 = 0.05;

/// How important each feature is.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Importance {
    /// Feature `i` has importance `r^i` in every instance (`1.0`: all equal).
    Decay(f64),
    /// One row of `n_features` importances per instance.
    PerInstance(Vec<Vec<f64>>),
}

/// Settings of a superposition run; one instance per entry of `feature_probs`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SuperpositionConfig {
    /// `n`, the number of features.
    pub n_features: usize,
    /// `m`, the hidden dimensions.
    pub d_hidden: usize,
    /// Per instance, the probability `1 − S` that a feature is non-zero, in `(0, 1]`.
    pub feature_probs: Vec<f64>,
    /// Feature importances.
    pub importance: Importance,
    /// Examples per instance per step.
    pub batch: usize,
    /// Optimiser steps.
    pub steps: usize,
    /// AdamW learning rate (constant).
    pub lr: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// Seeds the initial weights and the data stream.
    pub seed: u64,
    /// Record (and report) the loss every this many steps.
    pub log_every: usize,
}

impl Default for SuperpositionConfig {
    /// The paper's introductory setting: 20 features in 5 dimensions, importance `0.9^i`, seven
    /// instances with `1 − S` on a geometric grid from 1 to 0.001.
    fn default() -> Self {
        SuperpositionConfig {
            n_features: 20,
            d_hidden: 5,
            feature_probs: geomspace(1.0, 1e-3, 7),
            importance: Importance::Decay(0.9),
            batch: 1024,
            steps: 10_000,
            lr: 1e-3,
            weight_decay: 0.0,
            seed: 0,
            log_every: 100,
        }
    }
}

/// `k` points from `a` to `b` (both included) spaced evenly in log scale.
pub fn geomspace(a: f64, b: f64, k: usize) -> Vec<f64> {
    if k == 1 {
        return vec![a];
    }
    let (la, lb) = (a.ln(), b.ln());
    (0..k)
        .map(|i| (la + (lb - la) * i as f64 / (k - 1) as f64).exp())
        .collect()
}

impl SuperpositionConfig {
    /// The number of instances trained side by side.
    pub fn n_instances(&self) -> usize {
        self.feature_probs.len()
    }

    /// The importances, one row of `n_features` per instance.
    pub fn importances(&self) -> Vec<Vec<f64>> {
        match &self.importance {
            Importance::Decay(r) => {
                let row: Vec<f64> = (0..self.n_features).map(|i| r.powi(i as i32)).collect();
                vec![row; self.n_instances()]
            }
            Importance::PerInstance(rows) => rows.clone(),
        }
    }

    /// Rejects settings that cannot train, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ToyError::Config(m));
        for (name, v) in [
            ("n_features", self.n_features),
            ("d_hidden", self.d_hidden),
            ("batch", self.batch),
            ("steps", self.steps),
            ("log_every", self.log_every),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.feature_probs.is_empty() {
            return bad("feature_probs must list at least one instance".into());
        }
        if let Some(p) = self
            .feature_probs
            .iter()
            .find(|p| !(**p > 0.0 && **p <= 1.0))
        {
            return bad(format!("feature_probs must lie in (0, 1], found {p}"));
        }
        match &self.importance {
            Importance::Decay(r) if !(r.is_finite() && *r > 0.0) => {
                return bad(format!(
                    "importance decay must be finite and > 0, found {r}"
                ));
            }
            Importance::PerInstance(rows) => {
                if rows.len() != self.n_instances() {
                    return bad(format!(
                        "importance has {} rows for {} instances (feature_probs)",
                        rows.len(),
                        self.n_instances()
                    ));
                }
                for (i, row) in rows.iter().enumerate() {
                    if row.len() != self.n_features {
                        return bad(format!(
                            "importance row {i} has {} entries, n_features is {}",
                            row.len(),
                            self.n_features
                        ));
                    }
                    if let Some(v) = row.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
                        return bad(format!("importance row {i} has {v}; need finite ≥ 0"));
                    }
                }
            }
            Importance::Decay(_) => {}
        }
        self.adam().validate()
    }

    fn adam(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            weight_decay: self.weight_decay,
            ..AdamWConfig::default()
        }
    }

    /// The pentagon: 5 equally important, very sparse features (`1 − S = 0.05`) in 2 dimensions,
    /// `instances` copies from one seed (training occasionally settles in a worse local minimum).
    pub fn pentagon(instances: usize) -> Self {
        SuperpositionConfig {
            n_features: 5,
            d_hidden: 2,
            feature_probs: vec![0.05; instances],
            importance: Importance::Decay(1.0),
            ..Default::default()
        }
    }

    /// The dimensionality sweep: `n` equally important features in `m` dimensions, one instance
    /// per point of a geometric grid of `1/(1 − S)` from 1 to 20. The paper's scale is
    /// `n = 400, m = 20, steps = 10_000`; `n = 100, m = 10` shows the same plateaus faster.
    pub fn dimensionality_sweep(n: usize, m: usize, points: usize, steps: usize) -> Self {
        SuperpositionConfig {
            n_features: n,
            d_hidden: m,
            feature_probs: geomspace(1.0, 20.0, points)
                .iter()
                .map(|k| 1.0 / k)
                .collect(),
            importance: Importance::Decay(1.0),
            steps,
            ..Default::default()
        }
    }

    /// The two-feature phase diagram (`n = 2, m = 1`): `replicas` instances per cell,
    /// importance-major (instance `(r · densities.len() + c) · replicas + k` has feature 2 at
    /// importance `importances[r]` and both features at density `densities[c]`); feature 1 has
    /// importance 1. One hidden dimension leaves room for local minima (a feature stuck on the
    /// wrong side of its ReLU), so [`phase_diagram`] keeps each cell's best replica.
    pub fn phase_diagram(
        importances: &[f64],
        densities: &[f64],
        replicas: usize,
        steps: usize,
    ) -> Self {
        let cells = importances
            .iter()
            .flat_map(|&r| densities.iter().map(move |&p| (r, p)));
        let (rows, probs): (Vec<Vec<f64>>, Vec<f64>) = cells
            .flat_map(|(r, p)| std::iter::repeat_n((vec![1.0, r], p), replicas))
            .unzip();
        SuperpositionConfig {
            n_features: 2,
            d_hidden: 1,
            feature_probs: probs,
            importance: Importance::PerInstance(rows),
            steps,
            ..Default::default()
        }
    }
}

/// A batch of toy models, one per instance.
pub struct ToyModel {
    /// `W [I, m, n]`.
    w: Var,
    /// `b [I, n]`.
    b: Var,
    n_instances: usize,
    n_features: usize,
    d_hidden: usize,
}

impl ToyModel {
    /// Fresh weights: Xavier-normal `W` (std `sqrt(2 / (m + n))`) from `seed`, zero `b`.
    pub fn new(n_instances: usize, n_features: usize, d_hidden: usize, seed: u64) -> Result<Self> {
        let (i, n, m) = (n_instances, n_features, d_hidden);
        let std = (2.0 / (m + n) as f64).sqrt();
        let w = Tensor::from_vec(normals(seed, i * m * n, std), (i, m, n), &Device::Cpu)?;
        ToyModel::from_tensors(
            &w,
            &Tensor::zeros((i, n), candle_core::DType::F32, &Device::Cpu)?,
        )
    }

    /// A model from its weights, e.g. read back from a checkpoint.
    ///
    /// # Shapes
    /// - `w`: `[I, m, n]`, `b`: `[I, n]`, both f32.
    pub fn from_tensors(w: &Tensor, b: &Tensor) -> Result<Self> {
        let (i, m, n) = w.dims3()?;
        if b.dims() != [i, n] {
            return Err(ToyError::Config(format!(
                "b has shape {:?}, W [I, m, n] = {:?} needs [{i}, {n}]",
                b.dims(),
                w.dims()
            )));
        }
        Ok(ToyModel {
            w: Var::from_tensor(&w.to_dtype(candle_core::DType::F32)?.contiguous()?)?,
            b: Var::from_tensor(&b.to_dtype(candle_core::DType::F32)?.contiguous()?)?,
            n_instances: i,
            n_features: n,
            d_hidden: m,
        })
    }

    /// Reads a checkpoint written by [`Trained::save`]: the config that trained it, and the model.
    pub fn load(path: &Path) -> Result<(SuperpositionConfig, ToyModel)> {
        let ck = checkpoint::load(path)?;
        let file_err = |msg: String| ToyError::File {
            path: path.display().to_string(),
            msg,
        };
        let cfg: SuperpositionConfig = serde_json::from_value(ck.meta["config"].clone())
            .map_err(|e| file_err(format!("not a superposition checkpoint: {e}")))?;
        let p = ck.params();
        let get = |k: &str| p.get(k).ok_or_else(|| file_err(format!("no tensor {k}")));
        Ok((cfg, ToyModel::from_tensors(get("W")?, get("b")?)?))
    }

    /// `I`, the number of instances.
    pub fn n_instances(&self) -> usize {
        self.n_instances
    }

    /// `n`, the number of features.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// `m`, the hidden dimensions.
    pub fn d_hidden(&self) -> usize {
        self.d_hidden
    }

    /// The trainable weight.
    ///
    /// # Shapes
    /// - `[I, m, n]`.
    pub fn w(&self) -> &Var {
        &self.w
    }

    /// The trainable bias.
    ///
    /// # Shapes
    /// - `[I, n]`.
    pub fn b(&self) -> &Var {
        &self.b
    }

    /// Instance `i`'s weight as rows: `[m][n]`, column `j` is feature `j`'s direction `W_j`.
    pub fn weights(&self, i: usize) -> Result<Vec<Vec<f64>>> {
        let w = self
            .w
            .as_tensor()
            .get(i)?
            .to_dtype(candle_core::DType::F64)?;
        Ok(w.to_vec2()?)
    }

    /// Instance `i`'s bias, `[n]`.
    pub fn bias(&self, i: usize) -> Result<Vec<f64>> {
        let b = self
            .b
            .as_tensor()
            .get(i)?
            .to_dtype(candle_core::DType::F64)?;
        Ok(b.to_vec1()?)
    }

    /// The reconstruction `ReLU(Wᵀ W x + b)` through candle ops (differentiable).
    ///
    /// # Shapes
    /// - `x`: `[I, B, n]` → `[I, B, n]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.w.as_tensor();
        let h = x.matmul(&w.transpose(1, 2)?)?; // [I, B, m]
        let out = h
            .matmul(w)?
            .broadcast_add(&self.b.as_tensor().unsqueeze(1)?)?; // [I, B, n]
        Ok(out.relu()?)
    }

    /// The loss `Σ_instances mean_batch Σ_i I_i (x_i − x'_i)²` through candle autograd: the
    /// plain reference path for [`ToyModel::fused_grads`].
    ///
    /// # Shapes
    /// - `x`: `[I, B, n]`, `importance`: `[I, n]` → a scalar.
    pub fn loss(&self, x: &Tensor, importance: &Tensor) -> Result<Tensor> {
        let batch = x.dim(1)?;
        let err = (self.forward(x)? - x)?.sqr()?; // [I, B, n]
        let weighted = err.broadcast_mul(&importance.unsqueeze(1)?)?;
        Ok((weighted.sum_all()? / batch as f64)?)
    }

    /// The loss and its gradients by the fused hand-written pass, for a given batch.
    ///
    /// # Shapes
    /// - `x`: `[I, B, n]` flattened, `importance`: `[I, n]` flattened.
    /// - returns the loss per instance `[I]`, `∂L/∂W` as `[I, m, n]` and `∂L/∂b` as `[I, n]`,
    ///   flattened.
    pub fn fused_grads(
        &self,
        x: &[f32],
        importance: &[f32],
    ) -> Result<(Vec<f64>, Vec<f32>, Vec<f32>)> {
        let (i, n) = (self.n_instances, self.n_features);
        if importance.len() != i * n || x.is_empty() || !x.len().is_multiple_of(i * n) {
            return Err(ToyError::Config(format!(
                "fused_grads needs x [I, B, n] and importance [I, n] with I = {i}, n = {n}; got \
                 {} and {} values",
                x.len(),
                importance.len()
            )));
        }
        let batch = x.len() / (i * n);
        let mut kernel = Kernel::new(self, batch)?;
        let losses = kernel.run(importance, &mut vec![(); i], |inst, _, xs| {
            xs.copy_from_slice(&x[inst * batch * n..(inst + 1) * batch * n])
        });
        Ok((losses, kernel.gw, kernel.gb))
    }
}

/// Per-instance scratch of the fused pass.
struct Scratch {
    /// This instance's batch, `[B, n]`.
    xs: Vec<f32>,
    /// `Wᵀ`, `[n, m]`, so a feature's direction is contiguous.
    wt: Vec<f32>,
    /// `∂L/∂Wᵀ` from the sparse loops, `[n, m]`.
    gwt: Vec<f32>,
    /// Indices of the non-zero features, `[n]` (the first `nnz` used).
    nz: Vec<usize>,
    /// Indices of the outputs the ReLU passes, `[n]` (the first `nact` used).
    act: Vec<usize>,
    h: Vec<f32>,
    dh: Vec<f32>,
    out: Vec<f32>,
    dout: Vec<f32>,
}

/// The fused forward and backward pass over every instance.
struct Kernel {
    n: usize,
    m: usize,
    batch: usize,
    /// Current `W [I, m, n]` and `b [I, n]`, copied out of the variables.
    w: Vec<f32>,
    b: Vec<f32>,
    /// Gradients, `[I, m, n]` and `[I, n]`.
    gw: Vec<f32>,
    gb: Vec<f32>,
    scratch: Vec<Scratch>,
}

impl Kernel {
    fn new(model: &ToyModel, batch: usize) -> Result<Self> {
        let (i, n, m) = (model.n_instances, model.n_features, model.d_hidden);
        let scratch = (0..i)
            .map(|_| Scratch {
                xs: vec![0.0; batch * n],
                wt: vec![0.0; n * m],
                gwt: vec![0.0; n * m],
                nz: vec![0; n],
                act: vec![0; n],
                h: vec![0.0; m],
                dh: vec![0.0; m],
                out: vec![0.0; n],
                dout: vec![0.0; n],
            })
            .collect();
        let mut k = Kernel {
            n,
            m,
            batch,
            w: Vec::new(),
            b: Vec::new(),
            gw: vec![0.0; i * m * n],
            gb: vec![0.0; i * n],
            scratch,
        };
        k.load(model)?;
        Ok(k)
    }

    /// Copies the current weights out of the model's variables.
    fn load(&mut self, model: &ToyModel) -> Result<()> {
        self.w = model.w.as_tensor().flatten_all()?.to_vec1()?;
        self.b = model.b.as_tensor().flatten_all()?.to_vec1()?;
        Ok(())
    }

    /// Fills each instance's batch with `fill(instance, state[instance], xs)`, then computes every instance's loss
    /// and the gradients into `gw`, `gb`. Instances run in parallel; each one's arithmetic is
    /// sequential, so the result does not depend on the thread count.
    fn run<R: Send>(
        &mut self,
        importance: &[f32],
        state: &mut [R],
        fill: impl Fn(usize, &mut R, &mut [f32]) + Sync,
    ) -> Vec<f64> {
        let (n, m, batch) = (self.n, self.m, self.batch);
        let (w, b) = (&self.w, &self.b);
        self.gw
            .par_chunks_mut(m * n)
            .zip(self.gb.par_chunks_mut(n))
            .zip(self.scratch.par_iter_mut())
            .zip(state.par_iter_mut())
            .enumerate()
            .map(|(inst, (((gw, gb), s), r))| {
                fill(inst, r, &mut s.xs);
                let w = &w[inst * m * n..(inst + 1) * m * n];
                let b = &b[inst * n..(inst + 1) * n];
                let imp = &importance[inst * n..(inst + 1) * n];
                instance_pass(w, b, imp, s, gw, gb, n, m, batch)
            })
            .collect()
    }
}

/// [`instance_pass_body`], compiled for AVX2 + FMA where the CPU has them (the default x86-64
/// target only assumes SSE2, and these loops are most of a step).
#[allow(clippy::too_many_arguments)]
fn instance_pass(
    w: &[f32],
    b: &[f32],
    imp: &[f32],
    s: &mut Scratch,
    gw: &mut [f32],
    gb: &mut [f32],
    n: usize,
    m: usize,
    batch: usize,
) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(
            w: &[f32],
            b: &[f32],
            imp: &[f32],
            s: &mut Scratch,
            gw: &mut [f32],
            gb: &mut [f32],
            n: usize,
            m: usize,
            batch: usize,
        ) -> f64 {
            instance_pass_body(w, b, imp, s, gw, gb, n, m, batch)
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features `avx2` was compiled for.
            return unsafe { avx2(w, b, imp, s, gw, gb, n, m, batch) };
        }
    }
    instance_pass_body(w, b, imp, s, gw, gb, n, m, batch)
}

/// One instance's loss `mean_batch Σ_j I_j (x_j − x'_j)²` and its gradients, accumulated into
/// `gw [m, n]` and `gb [n]` (which it zeroes first).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn instance_pass_body(
    w: &[f32],
    b: &[f32],
    imp: &[f32],
    s: &mut Scratch,
    gw: &mut [f32],
    gb: &mut [f32],
    n: usize,
    m: usize,
    batch: usize,
) -> f64 {
    gw.fill(0.0);
    gb.fill(0.0);
    s.gwt.fill(0.0);
    for k in 0..m {
        for j in 0..n {
            s.wt[j * m + k] = w[k * n + j];
        }
    }
    let scale = 2.0 / batch as f32;
    let mut loss = 0.0f64;
    for x in s.xs.chunks_exact(n) {
        // The non-zero features (branch-free: most rows of a sparse instance have none or few).
        let mut nnz = 0;
        for (j, &xj) in x.iter().enumerate() {
            s.nz[nnz] = j;
            nnz += (xj != 0.0) as usize;
        }
        // Few non-zero features: walk them (through Wᵀ, so each direction is contiguous);
        // many: dense vector loops over W's rows.
        let sparse = 4 * nnz <= n;
        // h = W x.                                                 // [m]
        if sparse {
            s.h.fill(0.0);
            for &j in &s.nz[..nnz] {
                for (h, &wv) in s.h.iter_mut().zip(&s.wt[j * m..(j + 1) * m]) {
                    *h += x[j] * wv;
                }
            }
        } else {
            for (k, h) in s.h.iter_mut().enumerate() {
                *h = dot(&w[k * n..(k + 1) * n], x);
            }
        }
        // out = Wᵀ h + b.                                          // [n]
        s.out.copy_from_slice(b);
        if nnz > 0 {
            for (k, &hk) in s.h.iter().enumerate() {
                for (o, &wv) in s.out.iter_mut().zip(&w[k * n..(k + 1) * n]) {
                    *o += hk * wv;
                }
            }
        }
        // Loss, and ∂L/∂out through the ReLU; the outputs the ReLU passes.   // [n]
        let mut row = 0.0f32;
        let mut nact = 0;
        for j in 0..n {
            let o = s.out[j];
            let d = o.max(0.0) - x[j];
            row += imp[j] * d * d;
            s.dout[j] = if o > 0.0 { scale * imp[j] * d } else { 0.0 };
            s.act[nact] = j;
            nact += (o > 0.0) as usize;
        }
        loss += row as f64;
        for (g, &d) in gb.iter_mut().zip(&s.dout) {
            *g += d;
        }
        if nnz == 0 {
            // h = 0: W gets no gradient from this row.
            continue;
        }
        // Output side: dh = W dout, ∂L/∂W[:, j] += dout_j · h; over the passed outputs only when
        // few (a trained sparse model's negative biases cut most).
        if 4 * nact <= n {
            s.dh.fill(0.0);
            for &j in &s.act[..nact] {
                let d = s.dout[j];
                let (wj, gj) = (&s.wt[j * m..(j + 1) * m], &mut s.gwt[j * m..(j + 1) * m]);
                for ((dh, g), (&wv, &hk)) in s.dh.iter_mut().zip(gj).zip(wj.iter().zip(&s.h)) {
                    *dh += d * wv;
                    *g += d * hk;
                }
            }
        } else {
            for k in 0..m {
                let hk = s.h[k];
                s.dh[k] = dot(&w[k * n..(k + 1) * n], &s.dout);
                for (g, &d) in gw[k * n..(k + 1) * n].iter_mut().zip(&s.dout) {
                    *g += hk * d;
                }
            }
        }
        // Input side: ∂L/∂W[:, j] += x_j · dh.
        if sparse {
            for &j in &s.nz[..nnz] {
                for (g, &d) in s.gwt[j * m..(j + 1) * m].iter_mut().zip(&s.dh) {
                    *g += x[j] * d;
                }
            }
        } else {
            for (k, &dh) in s.dh.iter().enumerate() {
                for (g, &xv) in gw[k * n..(k + 1) * n].iter_mut().zip(x) {
                    *g += dh * xv;
                }
            }
        }
    }
    for k in 0..m {
        for j in 0..n {
            gw[k * n + j] += s.gwt[j * m + k];
        }
    }
    loss / batch as f64
}

/// xoshiro256++ (Blackman & Vigna): the data stream. StdRng (ChaCha12) costs more than the whole
/// forward and backward pass at these sizes.
struct Xoshiro([u64; 4]);

impl Xoshiro {
    /// Seeded through splitmix64, as the authors recommend.
    fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Xoshiro([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = (s[0].wrapping_add(s[3])).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Fills `xs` with features: each non-zero with probability `p`, then uniform on `[0, 1)`.
    /// One draw per feature: the top 32 bits decide presence, the low 24 the value.
    fn fill_features(&mut self, xs: &mut [f32], p: f64) {
        let threshold = (p * 4_294_967_296.0).min(u32::MAX as f64 + 1.0) as u64;
        for x in xs {
            let r = self.next_u64();
            *x = if (r >> 32) < threshold {
                (r & 0xff_ffff) as f32 * (1.0 / 16_777_216.0)
            } else {
                0.0
            };
        }
    }
}

/// A trained run: the config, the model, its loss curve and the optimiser state.
pub struct Trained {
    /// The exact settings that produced this run.
    pub config: SuperpositionConfig,
    /// The trained weights.
    pub model: ToyModel,
    /// `(step, loss summed over instances)` every `log_every` steps and at the last step.
    pub losses: Vec<(usize, f64)>,
    /// Each instance's loss on the last batch.
    pub final_losses: Vec<f64>,
    opt: AdamW,
}

impl Trained {
    /// Writes parameters, AdamW moments, the config and the loss curve to one checkpoint.
    pub fn save(&self, path: &Path) -> Result<()> {
        let meta = serde_json::json!({
            "model": "superposition",
            "config": self.config,
            "losses": self.losses,
            "final_losses": self.final_losses,
        });
        checkpoint::save(path, &self.opt, &meta)
    }
}

/// The seed of instance `i`'s data stream.
fn data_seed(seed: u64, i: usize) -> u64 {
    (seed ^ 0xda7a_da7a_0000_0000).wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Trains every instance of `cfg` side by side with AdamW, drawing a fresh batch each step;
/// `progress(step, loss)` hears the summed loss every `log_every` steps.
pub fn train(cfg: &SuperpositionConfig, progress: &mut dyn FnMut(usize, f64)) -> Result<Trained> {
    cfg.validate()?;
    let (i, n, m) = (cfg.n_instances(), cfg.n_features, cfg.d_hidden);
    let model = ToyModel::new(i, n, m, cfg.seed)?;
    let mut opt = AdamW::new(
        vec![("W".into(), model.w.clone()), ("b".into(), model.b.clone())],
        cfg.adam(),
    )?;
    let importance: Vec<f32> = cfg
        .importances()
        .concat()
        .iter()
        .map(|&v| v as f32)
        .collect();
    let mut rngs: Vec<Xoshiro> = (0..i)
        .map(|inst| Xoshiro::new(data_seed(cfg.seed, inst)))
        .collect();
    let mut kernel = Kernel::new(&model, cfg.batch)?;
    let mut flat = vec![None, None];
    let mut losses = Vec::new();
    let mut final_losses = Vec::new();
    for step in 1..=cfg.steps {
        kernel.load(&model)?;
        // Each instance has its own data stream, so the batch does not depend on the threads.
        let inst_losses = kernel.run(&importance, &mut rngs, |inst, rng, xs| {
            rng.fill_features(xs, cfg.feature_probs[inst])
        });
        let loss: f64 = inst_losses.iter().sum();
        if !loss.is_finite() {
            return Err(ToyError::Diverged {
                step,
                what: format!("loss is {loss}"),
            });
        }
        flat[0] = Some(std::mem::take(&mut kernel.gw));
        flat[1] = Some(std::mem::take(&mut kernel.gb));
        opt.apply(&flat, cfg.lr)?;
        kernel.gw = flat[0].take().unwrap_or_default();
        kernel.gb = flat[1].take().unwrap_or_default();
        if step % cfg.log_every == 0 || step == cfg.steps {
            losses.push((step, loss));
            progress(step, loss);
            tracing::debug!(step, loss, "superposition");
        }
        if step == cfg.steps {
            final_losses = inst_losses;
        }
    }
    Ok(Trained {
        config: cfg.clone(),
        model,
        losses,
        final_losses,
        opt,
    })
}

/// The structures the paper finds interfering features in.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Structure {
    /// One feature alone in its direction, `D ≈ 1`.
    Dedicated,
    /// Two features on opposite directions, `D ≈ 1/2`.
    AntipodalPair,
    /// Three features in a plane, `D ≈ 2/3`.
    Triangle,
    /// Four features in 3 dimensions, `D ≈ 3/4`.
    Tetrahedron,
    /// Five features in a plane, `D ≈ 2/5`.
    Pentagon,
    /// Eight features in 3 dimensions, `D ≈ 3/8`.
    SquareAntiprism,
    /// Anything else.
    Other,
}

impl Structure {
    /// The structure a connected group of `size` interfering features with mean dimensionality
    /// `d` forms: the named one whose size matches and whose `D` lies within 0.05, else `Other`.
    pub fn classify(size: usize, d: f64) -> Structure {
        let named = [
            (1, 1.0, Structure::Dedicated),
            (2, 0.5, Structure::AntipodalPair),
            (3, 2.0 / 3.0, Structure::Triangle),
            (4, 0.75, Structure::Tetrahedron),
            (5, 0.4, Structure::Pentagon),
            (8, 0.375, Structure::SquareAntiprism),
        ];
        named
            .iter()
            .find(|(s, target, _)| *s == size && (d - target).abs() < STRUCTURE_TOL)
            .map_or(Structure::Other, |(_, _, st)| *st)
    }
}

/// A connected group of represented features that interfere with one another.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    /// What the group's size and mean dimensionality make it.
    pub structure: Structure,
    /// Feature indices, ascending.
    pub features: Vec<usize>,
    /// Mean `D_i` over the group.
    pub mean_dimensionality: f64,
}

/// What one instance learned.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InstanceAnalysis {
    /// `1 − S`.
    pub feature_prob: f64,
    /// `W`, `[m][n]`.
    pub w: Vec<Vec<f64>>,
    /// `WᵀW`, `[n][n]`.
    pub wtw: Vec<Vec<f64>>,
    /// `b`, `[n]`.
    pub bias: Vec<f64>,
    /// `‖W_i‖` per feature: near 1 when represented, near 0 when dropped.
    pub norms: Vec<f64>,
    /// `Σ_{j≠i} (Ŵ_i·W_j)²` per feature: how much it shares its direction.
    pub superposition: Vec<f64>,
    /// `D_i = ‖W_i‖² / Σ_j (Ŵ_i·W_j)²` per feature (0 for a dead feature, `‖W_i‖ < 1e-3`).
    pub dimensionality: Vec<f64>,
    /// `D* = m / ‖W‖_F²`, dimensions per (represented) feature.
    pub dims_per_feature: f64,
    /// Features with `‖W_i‖ > 0.5`.
    pub n_represented: usize,
    /// Represented features grouped by interference (`|Ŵ_i·Ŵ_j| > 0.1`, connected components).
    pub geometry: Vec<Group>,
}

/// Analyses every instance of `model`; `feature_probs` come from the config that trained it.
pub fn analyse(model: &ToyModel, feature_probs: &[f64]) -> Result<Vec<InstanceAnalysis>> {
    if feature_probs.len() != model.n_instances {
        return Err(ToyError::Config(format!(
            "{} feature_probs for {} instances",
            feature_probs.len(),
            model.n_instances
        )));
    }
    (0..model.n_instances)
        .map(|i| {
            Ok(analyse_weights(
                model.weights(i)?,
                model.bias(i)?,
                feature_probs[i],
            ))
        })
        .collect()
}

/// The analysis of one instance's weights `w [m][n]` and bias `b [n]`.
pub fn analyse_weights(w: Vec<Vec<f64>>, bias: Vec<f64>, feature_prob: f64) -> InstanceAnalysis {
    let m = w.len();
    let n = bias.len();
    let wtw: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| (0..m).map(|k| w[k][i] * w[k][j]).sum())
                .collect()
        })
        .collect();
    let norms: Vec<f64> = (0..n).map(|i| wtw[i][i].sqrt()).collect();
    // (Ŵ_i·W_j)² = (W_i·W_j)² / ‖W_i‖².
    let overlap = |i: usize, j: usize| wtw[i][j] * wtw[i][j] / wtw[i][i];
    let mut superposition = vec![0.0; n];
    let mut dimensionality = vec![0.0; n];
    for i in (0..n).filter(|&i| norms[i] >= DEAD_NORM) {
        superposition[i] = (0..n).filter(|&j| j != i).map(|j| overlap(i, j)).sum();
        dimensionality[i] = wtw[i][i] / (wtw[i][i] + superposition[i]);
    }
    let frob: f64 = (0..n).map(|i| wtw[i][i]).sum();
    let represented: Vec<usize> = (0..n).filter(|&i| norms[i] > REPRESENTED_NORM).collect();
    let geometry = groups(&represented, |i, j| {
        (wtw[i][j] / (norms[i] * norms[j])).abs() > INTERFERENCE
    })
    .into_iter()
    .map(|features| {
        let d = features.iter().map(|&i| dimensionality[i]).sum::<f64>() / features.len() as f64;
        Group {
            structure: Structure::classify(features.len(), d),
            features,
            mean_dimensionality: d,
        }
    })
    .collect();
    InstanceAnalysis {
        feature_prob,
        w,
        wtw,
        bias,
        norms,
        superposition,
        dimensionality,
        dims_per_feature: m as f64 / frob,
        n_represented: represented.len(),
        geometry,
    }
}

/// Connected components of `nodes` under `linked`, each sorted, in order of their first node.
fn groups(nodes: &[usize], linked: impl Fn(usize, usize) -> bool) -> Vec<Vec<usize>> {
    let mut seen = vec![false; nodes.len()];
    let mut out = Vec::new();
    for start in 0..nodes.len() {
        if seen[start] {
            continue;
        }
        seen[start] = true;
        let mut stack = vec![start];
        let mut comp = Vec::new();
        while let Some(a) = stack.pop() {
            comp.push(nodes[a]);
            for c in 0..nodes.len() {
                if !seen[c] && linked(nodes[a], nodes[c]) {
                    seen[c] = true;
                    stack.push(c);
                }
            }
        }
        comp.sort_unstable();
        out.push(comp);
    }
    out
}

/// Phase-diagram categories, indexed by [`PhaseDiagram::grid`].
pub const PHASES: [&str; 3] = ["not represented", "dedicated dimension", "superposition"];

/// Examples in the shared batch that picks each phase-diagram cell's best replica.
const EVAL_BATCH: usize = 16_384;

/// The two-feature phase diagram: what happens to feature 2 as its importance and the density
/// vary.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PhaseDiagram {
    /// Feature 2's importance per row (feature 1 has 1).
    pub importances: Vec<f64>,
    /// Density `1 − S` of both features per column.
    pub densities: Vec<f64>,
    /// The category names, [`PHASES`].
    pub categories: Vec<String>,
    /// `[row][column]` index into `categories`.
    pub grid: Vec<Vec<usize>>,
    /// `[row][column]`, the best replica's `(W_1, W_2)` on the one hidden dimension.
    pub w: Vec<Vec<[f64; 2]>>,
    /// `[row][column]`, the best replica's bias `(b_1, b_2)`.
    pub bias: Vec<Vec<[f64; 2]>>,
    /// `[row][column]`, the best replica's loss on a shared evaluation batch.
    pub loss: Vec<Vec<f64>>,
}

/// Classifies each cell of a model trained from [`SuperpositionConfig::phase_diagram`] with the
/// same axes and replicas. Each cell keeps the replica with the lowest loss on one shared batch
/// of 16,384 examples (the same draws for every replica of a cell). With one hidden dimension a
/// feature is represented when `|W_i| > 0.5`; then feature 2 is
/// - *superposition* when both features are represented: they share the one dimension (training
///   makes them antipodal, `W_1 W_2 < 0`, with a negative bias to filter interference);
/// - *dedicated dimension* when feature 2 alone is represented;
/// - *not represented* otherwise.
pub fn phase_diagram(
    importances: &[f64],
    densities: &[f64],
    replicas: usize,
    model: &ToyModel,
) -> Result<PhaseDiagram> {
    let (rows, cols) = (importances.len(), densities.len());
    let cells = rows * cols;
    if model.n_features != 2 || model.d_hidden != 1 || model.n_instances != cells * replicas {
        return Err(ToyError::Config(format!(
            "a phase diagram needs n_features 2, d_hidden 1 and {cells} cells × {replicas} \
             replicas; the model has {}, {} and {} instances",
            model.n_features, model.d_hidden, model.n_instances
        )));
    }
    // The evaluation batch: one stream per cell, shared by its replicas.
    let mut x = vec![0f32; model.n_instances * EVAL_BATCH * 2];
    let mut imp = Vec::with_capacity(model.n_instances * 2);
    for (inst, xs) in x.chunks_mut(EVAL_BATCH * 2).enumerate() {
        let cell = inst / replicas;
        Xoshiro::new(data_seed(0xe7a1, cell)).fill_features(xs, densities[cell % cols]);
        imp.extend([1.0, importances[cell / cols] as f32]);
    }
    let (losses, _, _) = model.fused_grads(&x, &imp)?;
    let w: Vec<f32> = model.w.as_tensor().flatten_all()?.to_vec1()?;
    let b: Vec<f32> = model.b.as_tensor().flatten_all()?.to_vec1()?;
    let mut pd = PhaseDiagram {
        importances: importances.to_vec(),
        densities: densities.to_vec(),
        categories: PHASES.iter().map(|s| s.to_string()).collect(),
        grid: vec![vec![0; cols]; rows],
        w: vec![vec![[0.0; 2]; cols]; rows],
        bias: vec![vec![[0.0; 2]; cols]; rows],
        loss: vec![vec![0.0; cols]; rows],
    };
    for cell in 0..cells {
        let best = (cell * replicas..(cell + 1) * replicas)
            .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
            .unwrap_or(cell * replicas);
        let (w1, w2) = (w[2 * best] as f64, w[2 * best + 1] as f64);
        let (on1, on2) = (w1.abs() > REPRESENTED_NORM, w2.abs() > REPRESENTED_NORM);
        let (r, c) = (cell / cols, cell % cols);
        pd.grid[r][c] = match (on1, on2) {
            (true, true) => 2,
            (false, true) => 1,
            _ => 0,
        };
        pd.w[r][c] = [w1, w2];
        pd.bias[r][c] = [b[2 * best] as f64, b[2 * best + 1] as f64];
        pd.loss[r][c] = losses[best];
    }
    Ok(pd)
}
