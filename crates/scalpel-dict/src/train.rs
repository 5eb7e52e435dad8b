//! A TopK sparse-autoencoder trainer for the CPU that exploits sparsity: the forward pass keeps
//! only the `k` active latents per token, and the backward pass touches only their rows of
//! `W_dec` and `W_enc` (SAELens runs dense matmuls both ways).
//!
//! Follows Gao et al. 2024, "Scaling and evaluating sparse autoencoders"
//! (<https://arxiv.org/abs/2406.04093>): tied init (`W_enc = W_decᵀ`), unit-norm decoder rows
//! with the gradient component parallel to each row removed before the step, Adam, and the AuxK
//! loss (the `k_aux` largest *dead* latents reconstruct the residual, weight 1/32).
//!
//! Loss per batch of `n` tokens:
//! `L = (1/n) Σ_t ‖x_t − x̂_t‖² + aux_coef · (1/n) Σ_t ‖e_t − ê_t‖²`, where `e_t = x_t − x̂_t` is
//! detached (as in Gao et al.'s code) and `ê_t = Σ_{j ∈ topk_aux(dead)} f_j W_dec[j]`.

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rayon::prelude::*;

use crate::synthetic::gaussian;
use crate::{Architecture, DictConfig, DictError, Result, Sae};

/// Optimiser and AuxK settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Dead latents used by AuxK per token (Gao et al.: 512; sparsify: d_in / 2). 0 disables AuxK.
    pub k_aux: usize,
    /// AuxK weight (Gao et al.: 1/32).
    pub aux_coef: f32,
    /// A latent is dead when it has not fired in this many tokens.
    pub dead_window: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 2e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            k_aux: 256,
            aux_coef: 1.0 / 32.0,
            dead_window: 1_000_000,
        }
    }
}

/// What one step (or one evaluation) measured on its batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// `(1/n) Σ_t ‖x_t − x̂_t‖²`.
    pub mse: f64,
    /// AuxK loss before its weight (0 when no latent is dead).
    pub aux: f64,
    /// `mse + aux_coef · aux`, what the gradients are of.
    pub loss: f64,
    /// `1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖²` over the batch.
    pub explained_variance: f64,
    /// Latents dead at the start of the step.
    pub n_dead: usize,
}

/// Gradients of [`StepStats::loss`], laid out as the trainer's parameters.
#[derive(Debug, Clone)]
pub struct Gradients {
    /// `[d_sae, d_in]` (transposed `W_enc`).
    pub w_enc_t: Vec<f32>,
    pub b_enc: Vec<f32>,
    /// `[d_sae, d_in]`.
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
}

/// Adam moments for one parameter.
#[derive(Debug, Clone)]
struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Moments {
    fn new(len: usize) -> Self {
        Moments {
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }
}

/// Trains a TopK SAE (`d_out = d_in`) on batches of activations.
///
/// # Shapes
/// - `w_enc_t [d_sae, d_in]`: `W_enc` transposed, so a latent's encoder weights are contiguous
/// - `b_enc [d_sae]`, `w_dec [d_sae, d_in]`, `b_dec [d_in]`
/// - batches `x [n, d_in]`
#[derive(Debug, Clone)]
pub struct TopKTrainer {
    pub cfg: DictConfig,
    pub train: TrainConfig,
    pub w_enc_t: Vec<f32>,
    pub b_enc: Vec<f32>,
    pub w_dec: Vec<f32>,
    pub b_dec: Vec<f32>,
    /// Adam moments for w_enc_t, b_enc, w_dec, b_dec.
    moments: [Moments; 4],
    /// Optimiser steps taken.
    pub steps: u64,
    /// Tokens trained on.
    pub tokens_seen: u64,
    /// `tokens_seen` at the end of the last step where each latent fired.
    last_fired: Vec<u64>,
}

/// One token's forward pass.
struct TokenPass {
    /// Active latents (`f > 0`) among the top k, and their activations.
    idx: Vec<u32>,
    val: Vec<f32>,
    /// `dL/dx̂ [d]`.
    dx: Vec<f32>,
    /// AuxK's active dead latents, activations, and `dL/dê [d]`.
    aux_idx: Vec<u32>,
    aux_val: Vec<f32>,
    daux: Vec<f32>,
    sq_err: f64,
    aux_sq_err: f64,
}

impl TopKTrainer {
    /// A fresh trainer: random unit decoder rows, `W_enc = W_decᵀ`, zero biases (call
    /// [`TopKTrainer::init_b_dec`] with a first batch).
    pub fn new(cfg: DictConfig, train: TrainConfig, seed: u64) -> Result<Self> {
        cfg.validate("TopKTrainer")?;
        if cfg.architecture != Architecture::Topk || cfg.d_out() != cfg.d_in {
            return Err(DictError::Config {
                source_name: "TopKTrainer".into(),
                field: "architecture".into(),
                reason: format!(
                    "trains a topk SAE, found {} with d_out {}",
                    cfg.architecture.name(),
                    cfg.d_out()
                ),
            });
        }
        let (d, d_sae) = (cfg.d_in, cfg.d_sae);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut w_dec: Vec<f32> = (0..d_sae * d).map(|_| gaussian(&mut rng)).collect();
        normalise_rows(&mut w_dec, d);
        Ok(TopKTrainer {
            w_enc_t: w_dec.clone(),
            b_enc: vec![0.0; d_sae],
            w_dec,
            b_dec: vec![0.0; d],
            moments: [
                Moments::new(d_sae * d),
                Moments::new(d_sae),
                Moments::new(d_sae * d),
                Moments::new(d),
            ],
            steps: 0,
            tokens_seen: 0,
            last_fired: vec![0; d_sae],
            cfg,
            train,
        })
    }

    /// Sets `b_dec` to the mean of `x [n, d_in]`.
    pub fn init_b_dec(&mut self, x: &Tensor) -> Result<()> {
        let (x, n) = self.rows(x)?;
        let d = self.cfg.d_in;
        self.b_dec.fill(0.0);
        for row in x.chunks_exact(d) {
            for (b, v) in self.b_dec.iter_mut().zip(row) {
                *b += v / n as f32;
            }
        }
        Ok(())
    }

    fn rows(&self, x: &Tensor) -> Result<(Vec<f32>, usize)> {
        let d = self.cfg.d_in;
        if x.rank() != 2 || x.dims()[1] != d {
            return Err(DictError::Input {
                what: "training batch",
                expected: d,
                found: x.dims().to_vec(),
            });
        }
        let n = x.dims()[0];
        Ok((x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, n))
    }

    /// Latents that have not fired in the last `dead_window` tokens.
    pub fn dead(&self) -> Vec<bool> {
        self.last_fired
            .iter()
            .map(|&t| self.tokens_seen - t > self.train.dead_window)
            .collect()
    }

    /// The forward pass over `x [n * d]`, one [`TokenPass`] per token.
    fn forward(&self, x: &[f32], n: usize, dead: &[bool]) -> Vec<TokenPass> {
        let (d, d_sae, k) = (self.cfg.d_in, self.cfg.d_sae, self.cfg.k());
        let n_dead = dead.iter().filter(|&&b| b).count();
        let k_aux = self.train.k_aux.min(n_dead);
        let scale = 2.0 / n as f32;
        let aux_scale = self.train.aux_coef * scale;
        // The encoder is the one dense product (every latent's pre-activation is needed to pick
        // the top k): one GEMM over the whole batch. Everything after it touches k latents.
        // xc = x − b_dec   [n, d]
        let xc: Vec<f32> = x
            .chunks_exact(d)
            .flat_map(|x| x.iter().zip(&self.b_dec).map(|(a, b)| a - b))
            .collect();
        // pre = xc W_enc + b_enc   [n, d_sae], W_enc read from its transpose w_enc_t [d_sae, d]
        let mut pre_all: Vec<f32> = self.b_enc.repeat(n);
        // SAFETY: the pointers cover pre_all [n, d_sae], xc [n, d] and w_enc_t [d_sae, d] with the
        // given row-major strides; `read_dst` adds the b_enc rows already in pre_all.
        unsafe {
            gemm::gemm(
                n,
                d_sae,
                d,
                pre_all.as_mut_ptr(),
                1,
                d_sae as isize,
                true,
                xc.as_ptr(),
                1,
                d as isize,
                self.w_enc_t.as_ptr(),
                d as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        x.par_chunks(d)
            .zip(pre_all.par_chunks(d_sae))
            .map(|(x, pre)| {
                let (idx, val) = top_k(pre, k, |_| true);
                // x̂ = Σ_j f_j W_dec[j] + b_dec; dL/dx̂ = 2 (x̂ − x) / n
                let mut xhat = self.b_dec.clone();
                for (&j, &f) in idx.iter().zip(&val) {
                    axpy(f, self.row(&self.w_dec, j as usize), &mut xhat);
                }
                let mut sq_err = 0f64;
                let mut dx = vec![0f32; d];
                for ((g, xh), xe) in dx.iter_mut().zip(&xhat).zip(x) {
                    let r = xh - xe;
                    sq_err += (r as f64) * (r as f64);
                    *g = scale * r;
                }
                // AuxK: the top k_aux dead latents reconstruct e = x − x̂ (detached).
                let (aux_idx, aux_val, daux, aux_sq_err) = if k_aux > 0 {
                    let (ai, av) = top_k(pre, k_aux, |j| dead[j]);
                    // ê − e = Σ a_j W_dec[j] + (x̂ − x)
                    let mut r: Vec<f32> = xhat.iter().zip(x).map(|(a, b)| a - b).collect();
                    for (&j, &a) in ai.iter().zip(&av) {
                        axpy(a, self.row(&self.w_dec, j as usize), &mut r);
                    }
                    let s = r.iter().map(|&v| (v as f64) * (v as f64)).sum();
                    r.iter_mut().for_each(|v| *v *= aux_scale);
                    (ai, av, r, s)
                } else {
                    (Vec::new(), Vec::new(), Vec::new(), 0.0)
                };
                TokenPass {
                    idx,
                    val,
                    dx,
                    aux_idx,
                    aux_val,
                    daux,
                    sq_err,
                    aux_sq_err,
                }
            })
            .collect()
    }

    fn row<'a>(&self, w: &'a [f32], j: usize) -> &'a [f32] {
        let d = self.cfg.d_in;
        &w[j * d..(j + 1) * d]
    }

    /// The loss and its gradients on `x [n, d_in]`, without changing anything.
    pub fn gradients(&self, x: &Tensor) -> Result<(Gradients, StepStats)> {
        let (x, n) = self.rows(x)?;
        let dead = self.dead();
        let (g, stats, _) = self.backward(&x, n, &dead);
        Ok((g, stats))
    }

    /// Gradients, stats, and which latents fired (in the main top-k) on the batch.
    fn backward(&self, x: &[f32], n: usize, dead: &[bool]) -> (Gradients, StepStats, Vec<bool>) {
        let (d, d_sae) = (self.cfg.d_in, self.cfg.d_sae);
        let passes = self.forward(x, n, dead);
        let stats = self.stats(x, n, &passes, dead);
        let mut fired = vec![false; d_sae];
        for p in &passes {
            for &j in &p.idx {
                fired[j as usize] = true;
            }
        }

        // Invert token → latents into latent → (token, activation, which gradient), so the
        // sparse backward runs in parallel over latents, each writing only its own rows.
        let mut count = vec![0usize; d_sae + 1];
        for p in &passes {
            for &j in p.idx.iter().chain(&p.aux_idx) {
                count[j as usize + 1] += 1;
            }
        }
        for j in 0..d_sae {
            count[j + 1] += count[j];
        }
        let mut fill = count.clone();
        let mut entries = vec![(0u32, 0f32, false); count[d_sae]];
        for (t, p) in passes.iter().enumerate() {
            for (&j, &f) in p.idx.iter().zip(&p.val) {
                entries[fill[j as usize]] = (t as u32, f, false);
                fill[j as usize] += 1;
            }
            for (&j, &f) in p.aux_idx.iter().zip(&p.aux_val) {
                entries[fill[j as usize]] = (t as u32, f, true);
                fill[j as usize] += 1;
            }
        }

        let mut g = Gradients {
            w_enc_t: vec![0.0; d_sae * d],
            b_enc: vec![0.0; d_sae],
            w_dec: vec![0.0; d_sae * d],
            b_dec: vec![0.0; d],
        };
        g.w_dec
            .par_chunks_exact_mut(d)
            .zip(g.w_enc_t.par_chunks_exact_mut(d))
            .zip(g.b_enc.par_iter_mut())
            .enumerate()
            .for_each_init(
                || vec![0f32; d],
                |xc, (j, ((gw_dec, gw_enc), gb_enc))| {
                    let w_dec_j = self.row(&self.w_dec, j);
                    for &(t, f, aux) in &entries[count[j]..count[j + 1]] {
                        let p = &passes[t as usize];
                        let dvec = if aux { &p.daux } else { &p.dx };
                        // dL/dW_dec[j] += f_j dL/dx̂; dL/df_j = W_dec[j] · dL/dx̂, and
                        // relu' = 1 since f_j > 0.
                        axpy(f, dvec, gw_dec);
                        let gj = dot(w_dec_j, dvec);
                        // dL/dW_enc[:, j] += (x − b_dec) g_j; dL/db_enc[j] += g_j
                        let xt = &x[t as usize * d..(t as usize + 1) * d];
                        for ((c, xe), b) in xc.iter_mut().zip(xt).zip(&self.b_dec) {
                            *c = xe - b;
                        }
                        axpy(gj, xc, gw_enc);
                        *gb_enc += gj;
                    }
                },
            );
        // b_dec: decoder path Σ_t dL/dx̂_t; encoder path −Σ_j (Σ_t g_tj) W_enc[:, j].
        for p in &passes {
            for (b, v) in g.b_dec.iter_mut().zip(&p.dx) {
                *b += v;
            }
        }
        for (j, &gb) in g.b_enc.iter().enumerate() {
            if gb != 0.0 {
                axpy(-gb, self.row(&self.w_enc_t, j), &mut g.b_dec);
            }
        }
        (g, stats, fired)
    }

    fn stats(&self, x: &[f32], n: usize, passes: &[TokenPass], dead: &[bool]) -> StepStats {
        let d = self.cfg.d_in;
        let sq_err: f64 = passes.iter().map(|p| p.sq_err).sum();
        let aux_sq: f64 = passes.iter().map(|p| p.aux_sq_err).sum();
        let mut mean = vec![0f64; d];
        for row in x.chunks_exact(d) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64 / n as f64;
            }
        }
        let total: f64 = x
            .chunks_exact(d)
            .flat_map(|row| row.iter().zip(&mean).map(|(&v, m)| (v as f64 - m).powi(2)))
            .sum();
        let mse = sq_err / n as f64;
        let aux = aux_sq / n as f64;
        StepStats {
            mse,
            aux,
            loss: mse + self.train.aux_coef as f64 * aux,
            explained_variance: 1.0 - sq_err / total.max(f64::MIN_POSITIVE),
            n_dead: dead.iter().filter(|&&b| b).count(),
        }
    }

    /// Loss and reconstruction quality on `x [n, d_in]`, without changing anything.
    pub fn evaluate(&self, x: &Tensor) -> Result<StepStats> {
        let (x, n) = self.rows(x)?;
        let dead = self.dead();
        let passes = self.forward(&x, n, &dead);
        Ok(self.stats(&x, n, &passes, &dead))
    }

    /// One Adam step on `x [n, d_in]`; returns the batch's stats from before the step.
    pub fn step(&mut self, x: &Tensor) -> Result<StepStats> {
        let (x, n) = self.rows(x)?;
        let d = self.cfg.d_in;
        let dead = self.dead();
        let (mut g, stats, fired) = self.backward(&x, n, &dead);
        self.tokens_seen += n as u64;
        for (last, _) in self.last_fired.iter_mut().zip(&fired).filter(|(_, &f)| f) {
            *last = self.tokens_seen;
        }
        // Remove the gradient component parallel to each (unit) decoder row, since the row is
        // renormalised after the step anyway (Gao et al. §A).
        g.w_dec
            .par_chunks_exact_mut(d)
            .zip(self.w_dec.par_chunks_exact(d))
            .for_each(|(gr, w)| {
                let c = dot(gr, w);
                if c != 0.0 {
                    axpy(-c, w, gr);
                }
            });
        self.steps += 1;
        let t = self.steps as i32;
        let tc = &self.train;
        let (lr, b1, b2, eps) = (tc.lr, tc.beta1, tc.beta2, tc.eps);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let [m_enc, m_benc, m_dec, m_bdec] = &mut self.moments;
        for (p, gr, m) in [
            (&mut self.w_enc_t, &g.w_enc_t, m_enc),
            (&mut self.b_enc, &g.b_enc, m_benc),
            (&mut self.w_dec, &g.w_dec, m_dec),
            (&mut self.b_dec, &g.b_dec, m_bdec),
        ] {
            adam(p, gr, m, lr, b1, b2, eps, bc1, bc2);
        }
        normalise_rows(&mut self.w_dec, d);
        Ok(stats)
    }

    /// The trained dictionary (`W_enc` back in SAELens orientation `[d_in, d_sae]`).
    pub fn to_sae(&self) -> Result<Sae> {
        let (d, d_sae) = (self.cfg.d_in, self.cfg.d_sae);
        let cpu = Device::Cpu;
        let w_enc = Tensor::from_slice(&self.w_enc_t, (d_sae, d), &cpu)?
            .t()?
            .contiguous()?;
        let tensors = [
            ("W_enc", w_enc),
            ("b_enc", Tensor::from_slice(&self.b_enc, d_sae, &cpu)?),
            ("W_dec", Tensor::from_slice(&self.w_dec, (d_sae, d), &cpu)?),
            ("b_dec", Tensor::from_slice(&self.b_dec, d, &cpu)?),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_string(), t))
        .collect();
        Sae::from_tensors(self.cfg.clone(), tensors, "TopKTrainer")
    }
}

/// The (at most) `k` largest positive entries of `pre` among latents `keep` accepts, as
/// (indices, values). Ties and order do not matter to the loss.
fn top_k(pre: &[f32], k: usize, keep: impl Fn(usize) -> bool) -> (Vec<u32>, Vec<f32>) {
    // A running top-k with its minimum tracked: for k ≪ d_sae almost every entry is rejected by
    // one comparison.
    let mut idx: Vec<u32> = Vec::with_capacity(k);
    let mut val: Vec<f32> = Vec::with_capacity(k);
    let mut min_at = 0usize;
    for (j, &p) in pre.iter().enumerate() {
        // relu: a non-positive pre-activation contributes f = 0 and no gradient.
        if p <= 0.0 || !keep(j) {
            continue;
        }
        if val.len() < k {
            idx.push(j as u32);
            val.push(p);
            if val.len() == k {
                min_at = argmin(&val);
            }
        } else if p > val[min_at] {
            idx[min_at] = j as u32;
            val[min_at] = p;
            min_at = argmin(&val);
        }
    }
    (idx, val)
}

fn argmin(v: &[f32]) -> usize {
    let mut at = 0;
    for (i, &x) in v.iter().enumerate() {
        if x < v[at] {
            at = i;
        }
    }
    at
}

/// `a · b`: the encoder's inner loop, so it uses AVX2 + FMA where the CPU has them (checked at
/// run time; the workspace builds for baseline x86-64), else the portable loop.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features `dot_fma` is compiled for.
        return unsafe { dot_fma(a, b) };
    }
    dot_lanes::<false>(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes::<true>(a, b)
}

/// `a · b` with 16 independent accumulators so the compiler vectorises it; `FMA` uses
/// `mul_add`, which is a single instruction only where FMA is enabled (a libm call elsewhere).
#[inline(always)]
fn dot_lanes<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((a, &xe), &ye) in acc.iter_mut().zip(x).zip(y) {
            *a = if FMA {
                xe.mul_add(ye, *a)
            } else {
                *a + xe * ye
            };
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `y += a x`.
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (ye, xe) in y.iter_mut().zip(x) {
        *ye += a * xe;
    }
}

/// Scales each row of `w [_, d]` to unit norm.
fn normalise_rows(w: &mut [f32], d: usize) {
    w.par_chunks_exact_mut(d).for_each(|r| {
        let norm = dot(r, r).sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= norm);
    });
}

/// One bias-corrected Adam update of `p` with gradient `g` (`bc1 = 1 − β1ᵗ`, `bc2 = 1 − β2ᵗ`).
#[allow(clippy::too_many_arguments)]
fn adam(
    p: &mut [f32],
    g: &[f32],
    m: &mut Moments,
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    bc1: f32,
    bc2: f32,
) {
    const CHUNK: usize = 4096;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.m.par_chunks_mut(CHUNK))
        .zip(m.v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                *m = b1 * *m + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *p -= lr * (*m / bc1) / ((*v / bc2).sqrt() + eps);
            }
        });
}
