//! Fused CPU kernels for the inference fast path. Each has a plain composition of candle ops
//! beside it in `transformer.rs`, taken whenever hooks or gradients need the intermediate values;
//! the parity tests run both paths against the same reference.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;
use scalpel_core::gemm::dot;

/// The data of a contiguous f32 CPU tensor.
fn f32_contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: only f32 is supported");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous");
    };
    Ok(&data[start..end])
}

/// `silu(gate) * up` for a gated MLP whose gate and up projections were computed by one matmul:
/// input `[n, 2m]` (gate columns first), output `[n, m]`. One pass over memory, parallel over
/// rows, instead of three element-wise ops and two temporaries.
pub struct SwiGlu;

impl CustomOp1 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_contiguous(storage, layout, "swiglu")?;
        let (n, two_m) = layout.shape().dims2()?;
        if two_m % 2 != 0 {
            candle_core::bail!("swiglu: last dimension {two_m} is odd");
        }
        let m = two_m / 2;
        let mut out = vec![0f32; n * m];
        out.par_chunks_mut(m)
            .zip(src.par_chunks(two_m))
            .for_each(|(o, row)| {
                let (gate, up) = row.split_at(m);
                for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, m))))
    }

    fn bwd(
        &self,
        arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let x = arg.contiguous()?;
        let g = grad_res.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&g, &SwiGluBackward)?))
    }
}

/// d/d(gate, up) of [`SwiGlu`]: with `σ = sigmoid(gate)`, `d gate = g·up·σ·(1 + gate·(1 − σ))`
/// and `d up = g·gate·σ`.
struct SwiGluBackward;

impl candle_core::CustomOp2 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(xs, xl, "swiglu-backward")?;
        let g = f32_contiguous(gs, gl, "swiglu-backward")?;
        let (n, two_m) = xl.shape().dims2()?;
        let m = two_m / 2;
        if g.len() != n * m {
            candle_core::bail!(
                "swiglu-backward: gradient of {} values for [{n}, {m}]",
                g.len()
            );
        }
        let mut dx = vec![0f32; n * two_m];
        dx.par_chunks_mut(two_m)
            .zip(x.par_chunks(two_m).zip(g.par_chunks(m)))
            .for_each(|(dx, (x, g))| {
                let (gate, up) = x.split_at(m);
                let (dgate, dup) = dx.split_at_mut(m);
                for j in 0..m {
                    let a = gate[j];
                    let sig = 1.0 / (1.0 + (-a).exp());
                    dgate[j] = g[j] * up[j] * sig * (1.0 + a * (1.0 - sig));
                    dup[j] = g[j] * a * sig;
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// Causal self-attention for the inference fast path, straight from the fused q/k/v projection:
/// rotary on q and k, scaled dot products over the visible keys only, softmax and the weighted sum
/// of values, written as `z [b, p, h, dh]` (the layout the output projection reads). It replaces
/// four transposes, the full `p × p` score matrix, the mask addition and two temporaries.
///
/// Input `[b, p, h + 2·kv_heads, dh]` (q heads, then k, then v). Query head `i` reads key/value
/// head `i / (h / kv_heads)`. A padding query attends to itself only, as in the plain path.
pub struct CausalAttention<'a> {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub scale: f32,
    /// cos and sin tables `[b, p, dh/2]`, absent for models without rotary.
    pub cos_sin: Option<(&'a [f32], &'a [f32])>,
    /// Per row: which positions are real tokens.
    pub real: &'a [Vec<bool>],
}

/// The per-query work of [`CausalAttention`]: all heads of one query position.
struct AttentionRows<'a> {
    /// Rotated, scaled queries `[b·p, h, dh]`.
    q: &'a [f32],
    /// Rotated keys `[b·p, kv_heads, dh]`.
    k: &'a [f32],
    /// The fused projection `[b·p, h + 2·kv_heads, dh]` (values are read from it).
    src: &'a [f32],
    p: usize,
    h: usize,
    kvh: usize,
    dh: usize,
    real: &'a [Vec<bool>],
}

impl AttentionRows<'_> {
    fn run(&self, r: usize, zr: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has the features this copy of the loop was compiled for.
            unsafe { self.run_avx2(r, zr) };
            return;
        }
        self.run_generic(r, zr);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self, r: usize, zr: &mut [f32]) {
        self.run_generic(r, zr);
    }

    /// Scores over the visible keys, softmax, weighted sum of values; written for the
    /// auto-vectoriser (inlined into each target-feature copy).
    #[inline(always)]
    fn run_generic(&self, r: usize, zr: &mut [f32]) {
        let (p, h, kvh, dh) = (self.p, self.h, self.kvh, self.dh);
        let (bi, i) = (r / p, r % p);
        let real = &self.real[bi];
        let row = (h + 2 * kvh) * dh;
        let n_rep = h / kvh;
        let mut w = vec![0f32; i + 1];
        for head in 0..h {
            let g = head / n_rep;
            let qv = &self.q[(r * h + head) * dh..][..dh];
            let mut max = f32::NEG_INFINITY;
            for (j, wj) in w.iter_mut().enumerate() {
                let visible = if real[i] { real[j] } else { j == i };
                *wj = if visible {
                    let s = dot(qv, &self.k[((bi * p + j) * kvh + g) * dh..][..dh]);
                    max = max.max(s);
                    s
                } else {
                    f32::NEG_INFINITY
                };
            }
            let mut sum = 0f32;
            for wj in w.iter_mut() {
                *wj = (*wj - max).exp();
                sum += *wj;
            }
            let inv = 1.0 / sum;
            let out = &mut zr[head * dh..(head + 1) * dh];
            out.fill(0.0);
            for (j, &wj) in w.iter().enumerate() {
                if wj == 0.0 {
                    continue;
                }
                let v = &self.src[(bi * p + j) * row + (h + kvh + g) * dh..][..dh];
                let a = wj * inv;
                for (o, &x) in out.iter_mut().zip(v) {
                    *o += a * x;
                }
            }
        }
    }
}

/// Half-split rotary of one head vector, times `scale`, into `out`.
#[inline]
fn rotate_into(x: &[f32], cos: &[f32], sin: &[f32], scale: f32, out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        o1[i] = (x1[i] * cos[i] - x2[i] * sin[i]) * scale;
        o2[i] = (x2[i] * cos[i] + x1[i] * sin[i]) * scale;
    }
}

impl CustomOp1 for CausalAttention<'_> {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_contiguous(storage, layout, "causal-attention")?;
        let (b, p, heads, dh) = layout.shape().dims4()?;
        let (h, kvh) = (self.n_heads, self.n_kv_heads);
        if heads != h + 2 * kvh || self.real.len() != b || h % kvh != 0 {
            candle_core::bail!("causal-attention: inconsistent head counts");
        }
        let row = heads * dh;
        let half = dh / 2;
        // Rotated (and, for q, pre-scaled) queries and keys, [b·p, heads, dh].
        let mut q = vec![0f32; b * p * h * dh];
        let mut k = vec![0f32; b * p * kvh * dh];
        q.par_chunks_mut(h * dh)
            .zip(k.par_chunks_mut(kvh * dh))
            .enumerate()
            .for_each(|(r, (qr, kr))| {
                let x = &src[r * row..(r + 1) * row];
                match self.cos_sin {
                    Some((cos, sin)) => {
                        let (c, s) = (
                            &cos[r * half..(r + 1) * half],
                            &sin[r * half..(r + 1) * half],
                        );
                        for (i, o) in qr.chunks_exact_mut(dh).enumerate() {
                            rotate_into(&x[i * dh..(i + 1) * dh], c, s, self.scale, o);
                        }
                        for (g, o) in kr.chunks_exact_mut(dh).enumerate() {
                            rotate_into(&x[(h + g) * dh..(h + g + 1) * dh], c, s, 1.0, o);
                        }
                    }
                    None => {
                        for (o, &v) in qr.iter_mut().zip(&x[..h * dh]) {
                            *o = v * self.scale;
                        }
                        kr.copy_from_slice(&x[h * dh..(h + kvh) * dh]);
                    }
                }
            });
        let mut z = vec![0f32; b * p * h * dh];
        let job = AttentionRows {
            q: &q,
            k: &k,
            src,
            p,
            h,
            kvh,
            dh,
            real: self.real,
        };
        z.par_chunks_mut(h * dh)
            .enumerate()
            .for_each(|(r, zr)| job.run(r, zr));
        Ok((CpuStorage::F32(z), Shape::from((b, p, h, dh))))
    }
}

/// `x · wᵀ` for a frozen weight `w [n, k]` and an input `x [m, k]` that carries gradients: the
/// backward pass returns only d/dx (`grad · w`). Candle's own matmul also computes the weight's
/// gradient, which doubles the backward cost of taking gradients with respect to activations.
pub(crate) struct FrozenLinear {
    pub w: candle_core::Tensor,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(storage, layout, "frozen-linear")?;
        let (m, k) = layout.shape().dims2()?;
        let (n, kw) = self.w.dims2()?;
        if k != kw {
            candle_core::bail!("frozen-linear: input width {k}, weight width {kw}");
        }
        let (ws, wl) = self.w.storage_and_layout();
        let candle_core::Storage::Cpu(wc) = &*ws else {
            candle_core::bail!("frozen-linear: the weight is not on the CPU");
        };
        let w = f32_contiguous(wc, wl, "frozen-linear")?;
        let mut y = vec![0f32; m * n];
        // y[i, j] = Σ x[i, kk] w[j, kk]: lhs rows k apart, rhs (wᵀ) columns k apart.
        scalpel_core::gemm::matmul(
            m,
            n,
            k,
            &mut y,
            false,
            (x, 1, k as isize),
            (w, k as isize, 1),
        );
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        Ok(Some(grad_res.matmul(&self.w)?))
    }
}

/// The data of a CPU f32 tensor made contiguous (a copy only when it is not).
fn f32_vec(t: &candle_core::Tensor, op: &str) -> candle_core::Result<Vec<f32>> {
    if t.dtype() != candle_core::DType::F32 {
        candle_core::bail!("{op}: only f32 is supported");
    }
    t.flatten_all()?.to_vec1::<f32>()
}

/// RMS normalisation with a weight, `y = x / sqrt(mean(x²) + eps) · w` over the last axis, for
/// the differentiable path: one pass forward, and a backward pass (to `x` only; the weight is
/// frozen) of one pass too, instead of six element-wise ops and their gradients.
pub(crate) struct RmsNormGrad {
    pub w: candle_core::Tensor,
    pub eps: f32,
}

impl CustomOp1 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(storage, layout, "rms-norm")?;
        let d = layout.shape().dims().last().copied().unwrap_or(0);
        let w = f32_vec(&self.w, "rms-norm")?;
        if d == 0 || w.len() != d {
            candle_core::bail!("rms-norm: width {d}, weight of {}", w.len());
        }
        let eps = self.eps;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(&w) {
                *y = x * r * w;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let x = arg.contiguous()?;
        let g = grad_res.contiguous()?;
        let back = RmsNormBackward {
            w: f32_vec(&self.w, "rms-norm")?,
            eps: self.eps,
        };
        Ok(Some(x.apply_op2_no_bwd(&g, &back)?))
    }
}

/// d/dx of [`RmsNormGrad`]: with `r = 1/sqrt(mean(x²) + eps)` and `u = g·w`,
/// `dx = r·u − x·r³·mean(u·x)`.
struct RmsNormBackward {
    w: Vec<f32>,
    eps: f32,
}

impl candle_core::CustomOp2 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(xs, xl, "rms-norm-backward")?;
        let g = f32_contiguous(gs, gl, "rms-norm-backward")?;
        let d = self.w.len();
        if x.len() != g.len() || d == 0 || x.len() % d != 0 {
            candle_core::bail!("rms-norm-backward: shapes do not match");
        }
        let (w, eps) = (&self.w, self.eps);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(dx, (x, g))| {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
                let r = 1.0 / (ms + eps).sqrt();
                let ux: f32 = x.iter().zip(g).zip(w).map(|((x, g), w)| x * g * w).sum();
                let c = r * r * r * ux / d as f32;
                for (((dx, &x), &g), &w) in dx.iter_mut().zip(x).zip(g).zip(w) {
                    *dx = r * g * w - x * c;
                }
            });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// Softmax over the last axis (rows may hold `-inf`, which get probability 0), with a
/// one-pass backward `dx = y·(g − Σ g·y)`.
pub(crate) struct SoftmaxGrad;

impl CustomOp1 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(storage, layout, "softmax")?;
        let d = layout.shape().dims().last().copied().unwrap_or(0);
        if d == 0 {
            candle_core::bail!("softmax: empty last axis");
        }
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y;
            }
            for y in y.iter_mut() {
                *y /= sum;
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &candle_core::Tensor,
        res: &candle_core::Tensor,
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let y = res.contiguous()?;
        let g = grad_res.contiguous()?;
        Ok(Some(y.apply_op2_no_bwd(&g, &SoftmaxBackward)?))
    }
}

struct SoftmaxBackward;

impl candle_core::CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = f32_contiguous(ys, yl, "softmax-backward")?;
        let g = f32_contiguous(gs, gl, "softmax-backward")?;
        let d = yl.shape().dims().last().copied().unwrap_or(0);
        if y.len() != g.len() || d == 0 {
            candle_core::bail!("softmax-backward: shapes do not match");
        }
        let mut dx = vec![0f32; y.len()];
        dx.par_chunks_mut(d)
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(dx, (y, g))| {
                let s: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                    *dx = y * (g - s);
                }
            });
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}

/// Rotary embedding in the half-split layout, `[x1, x2] → [x1 cos − x2 sin, x2 cos + x1 sin]`,
/// for `x [b, heads, p, dh]` and tables `[b, p, dh/2]`. The rotation is orthogonal, so its
/// backward pass is the same op with `sin` negated.
pub(crate) struct RopeGrad {
    pub cos: std::sync::Arc<Vec<f32>>,
    pub sin: std::sync::Arc<Vec<f32>>,
    /// Rotate by minus the angle (the backward pass).
    pub inverse: bool,
}

impl CustomOp1 for RopeGrad {
    fn name(&self) -> &'static str {
        "rope-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_contiguous(storage, layout, "rope")?;
        let (b, h, p, dh) = layout.shape().dims4()?;
        let half = dh / 2;
        if dh % 2 != 0 || self.cos.len() != b * p * half || self.sin.len() != b * p * half {
            candle_core::bail!("rope: tables do not match x of shape [{b}, {h}, {p}, {dh}]");
        }
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let (cos, sin) = (&self.cos, &self.sin);
        let mut y = vec![0f32; x.len()];
        // One chunk per (batch row, head): p rows of dh.
        y.par_chunks_mut(p * dh)
            .zip(x.par_chunks(p * dh))
            .enumerate()
            .for_each(|(bh, (y, x))| {
                let bi = bh / h;
                for i in 0..p {
                    let t = (bi * p + i) * half;
                    let (xr, yr) = (&x[i * dh..(i + 1) * dh], &mut y[i * dh..(i + 1) * dh]);
                    for j in 0..half {
                        let (c, s) = (cos[t + j], sign * sin[t + j]);
                        let (x1, x2) = (xr[j], xr[j + half]);
                        yr[j] = x1 * c - x2 * s;
                        yr[j + half] = x2 * c + x1 * s;
                    }
                }
            });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let back = RopeGrad {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            inverse: !self.inverse,
        };
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

#[cfg(test)]
mod grad_tests {
    //! Each differentiable kernel against the same function composed of candle ops: values and
    //! gradients of a random linear read-out.
    use candle_core::{Device, Tensor, Var, D};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Value and d/dx of `sum(f(x) · r)` for the kernel and the composition.
    fn check(
        shape: &[usize],
        kernel: impl Fn(&Tensor) -> Tensor,
        reference: impl Fn(&Tensor) -> Tensor,
    ) {
        let x = Var::from_tensor(&randn(shape, 1)).unwrap();
        let ya = kernel(x.as_tensor());
        let yb = reference(x.as_tensor());
        let r = randn(ya.dims(), 2);
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(diff(&ya, &yb) < 1e-5, "values differ by {}", diff(&ya, &yb));
        let ga = ya.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = yb.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(diff(ga, gb) < 1e-4, "gradients differ by {}", diff(ga, gb));
        assert!(
            ga.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.1
        );
    }

    #[test]
    fn rms_norm_matches_its_composition() {
        let w = randn(&[8], 3);
        check(
            &[3, 5, 8],
            |x| {
                x.apply_op1(super::RmsNormGrad {
                    w: w.clone(),
                    eps: 1e-5,
                })
                .unwrap()
            },
            |x| {
                let s = (x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
                    .unwrap()
                    .sqrt()
                    .unwrap();
                x.broadcast_div(&s).unwrap().broadcast_mul(&w).unwrap()
            },
        );
    }

    #[test]
    fn softmax_matches_its_composition_with_masked_entries() {
        let mut m = vec![0f32; 4 * 6];
        for i in 0..4 {
            for j in i + 3..6 {
                m[i * 6 + j] = f32::NEG_INFINITY;
            }
        }
        let mask = Tensor::from_vec(m, (4, 6), &Device::Cpu).unwrap();
        check(
            &[2, 4, 6],
            |x| {
                x.broadcast_add(&mask)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .apply_op1(super::SoftmaxGrad)
                    .unwrap()
            },
            |x| {
                let x = x.broadcast_add(&mask).unwrap();
                let max = x.max_keepdim(D::Minus1).unwrap().detach();
                let e = x.broadcast_sub(&max).unwrap().exp().unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
            },
        );
    }

    #[test]
    fn rope_matches_its_composition() {
        let (b, h, p, dh) = (2, 3, 4, 8);
        let cos = randn(&[b, p, dh / 2], 4).cos().unwrap();
        let sin = randn(&[b, p, dh / 2], 4).sin().unwrap();
        let cd = std::sync::Arc::new(cos.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let sd = std::sync::Arc::new(sin.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        check(
            &[b, h, p, dh],
            |x| {
                x.apply_op1(super::RopeGrad {
                    cos: cd.clone(),
                    sin: sd.clone(),
                    inverse: false,
                })
                .unwrap()
            },
            |x| {
                let half = dh / 2;
                let x1 = x.narrow(D::Minus1, 0, half).unwrap();
                let x2 = x.narrow(D::Minus1, half, half).unwrap();
                let (c, s) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
                let a = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
                let bb = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
                Tensor::cat(&[&a, &bb], D::Minus1).unwrap()
            },
        );
    }

    #[test]
    fn swiglu_matches_its_composition() {
        check(
            &[5, 12],
            |x| x.apply_op1(super::SwiGlu).unwrap(),
            |x| {
                let gate = x.narrow(1, 0, 6).unwrap();
                let up = x.narrow(1, 6, 6).unwrap();
                (gate.silu().unwrap() * up).unwrap()
            },
        );
    }
}

/// Shared cos and sin tables `[b, p, dh/2]`.
pub(crate) type RotaryTables = (std::sync::Arc<Vec<f32>>, std::sync::Arc<Vec<f32>>);

/// [`CausalAttention`] with a backward pass, for gradients that do not need the attention's
/// internals (queries, keys, values, scores or pattern) as separate values: the forward pass is the
/// fused kernel, and the backward pass recomputes each row's attention weights and returns the
/// gradient with respect to the fused q/k/v projection `[b, p, h + 2·kv_heads, dh]`.
pub(crate) struct CausalAttentionGrad {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub scale: f32,
    pub cos_sin: Option<RotaryTables>,
    pub real: std::sync::Arc<Vec<Vec<bool>>>,
}

impl CausalAttentionGrad {
    fn fused(&self) -> CausalAttention<'_> {
        CausalAttention {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            scale: self.scale,
            cos_sin: self
                .cos_sin
                .as_ref()
                .map(|(c, s)| (c.as_slice(), s.as_slice())),
            real: &self.real,
        }
    }
}

impl CustomOp1 for CausalAttentionGrad {
    fn name(&self) -> &'static str {
        "causal-attention-grad"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fused().cpu_fwd(storage, layout)
    }

    fn bwd(
        &self,
        arg: &candle_core::Tensor,
        _res: &candle_core::Tensor,
        grad_res: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let back = CausalAttentionBackward {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            scale: self.scale,
            cos_sin: self.cos_sin.clone(),
            real: self.real.clone(),
        };
        let x = arg.contiguous()?;
        let g = grad_res.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&g, &back)?))
    }
}

struct CausalAttentionBackward {
    n_heads: usize,
    n_kv_heads: usize,
    scale: f32,
    cos_sin: Option<RotaryTables>,
    real: std::sync::Arc<Vec<Vec<bool>>>,
}

impl candle_core::CustomOp2 for CausalAttentionBackward {
    fn name(&self) -> &'static str {
        "causal-attention-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = f32_contiguous(xs, xl, "causal-attention-backward")?;
        let dz = f32_contiguous(gs, gl, "causal-attention-backward")?;
        let (b, p, heads, dh) = xl.shape().dims4()?;
        let (h, kvh) = (self.n_heads, self.n_kv_heads);
        if heads != h + 2 * kvh
            || self.real.len() != b
            || h % kvh != 0
            || dz.len() != b * p * h * dh
        {
            candle_core::bail!("causal-attention-backward: inconsistent shapes");
        }
        let (row, half, n_rep, scale) = (heads * dh, dh / 2, h / kvh, self.scale);
        let tables = self.cos_sin.as_ref();
        // Rotation of one head vector by the angle at row r (`sign` −1: the inverse rotation).
        let rot = |x: &[f32], r: usize, sign: f32, out: &mut [f32]| match tables {
            Some((cos, sin)) => {
                let (c, s) = (
                    &cos[r * half..(r + 1) * half],
                    &sin[r * half..(r + 1) * half],
                );
                for i in 0..half {
                    let (x1, x2) = (x[i], x[i + half]);
                    out[i] = x1 * c[i] - sign * x2 * s[i];
                    out[i + half] = x2 * c[i] + sign * x1 * s[i];
                }
            }
            None => out.copy_from_slice(x),
        };
        // One task per (batch row, key/value head): it owns that head's keys and values and the
        // queries of its group. Returns d q [p, n_rep, dh], d k [p, dh], d v [p, dh].
        let tasks: Vec<(usize, usize)> = (0..b)
            .flat_map(|bi| (0..kvh).map(move |g| (bi, g)))
            .collect();
        let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = tasks
            .par_iter()
            .map(|&(bi, g)| {
                let real = &self.real[bi];
                let at = |i: usize, slot: usize| &src[(bi * p + i) * row + slot * dh..][..dh];
                let mut k = vec![0f32; p * dh];
                for j in 0..p {
                    rot(at(j, h + g), bi * p + j, 1.0, &mut k[j * dh..(j + 1) * dh]);
                }
                let (mut dq, mut dk, mut dv) = (
                    vec![0f32; p * n_rep * dh],
                    vec![0f32; p * dh],
                    vec![0f32; p * dh],
                );
                let mut q = vec![0f32; dh];
                let mut dqr = vec![0f32; dh];
                let mut w = vec![0f32; p];
                let mut dp = vec![0f32; p];
                for i in 0..p {
                    for rep in 0..n_rep {
                        let head = g * n_rep + rep;
                        rot(at(i, head), bi * p + i, 1.0, &mut q);
                        for v in q.iter_mut() {
                            *v *= scale;
                        }
                        let dzr = &dz[((bi * p + i) * h + head) * dh..][..dh];
                        let mut max = f32::NEG_INFINITY;
                        for j in 0..=i {
                            let visible = if real[i] { real[j] } else { j == i };
                            w[j] = if visible {
                                let s = dot(&q, &k[j * dh..(j + 1) * dh]);
                                max = max.max(s);
                                s
                            } else {
                                f32::NEG_INFINITY
                            };
                        }
                        let mut sum = 0f32;
                        for wj in w[..=i].iter_mut() {
                            *wj = (*wj - max).exp();
                            sum += *wj;
                        }
                        let mut s = 0f32;
                        for j in 0..=i {
                            w[j] /= sum;
                            dp[j] = if w[j] == 0.0 {
                                0.0
                            } else {
                                dot(dzr, at(j, h + kvh + g))
                            };
                            s += w[j] * dp[j];
                        }
                        dqr.fill(0.0);
                        for j in 0..=i {
                            if w[j] == 0.0 {
                                continue;
                            }
                            let ds = w[j] * (dp[j] - s);
                            let kj = &k[j * dh..(j + 1) * dh];
                            let dkj = &mut dk[j * dh..(j + 1) * dh];
                            let dvj = &mut dv[j * dh..(j + 1) * dh];
                            for t in 0..dh {
                                dqr[t] += ds * kj[t];
                                dkj[t] += ds * q[t];
                                dvj[t] += w[j] * dzr[t];
                            }
                        }
                        // Through the scale and back through the rotation.
                        for v in dqr.iter_mut() {
                            *v *= scale;
                        }
                        let o = (i * n_rep + rep) * dh;
                        rot(&dqr, bi * p + i, -1.0, &mut dq[o..o + dh]);
                    }
                }
                let mut dk_raw = vec![0f32; p * dh];
                for j in 0..p {
                    rot(
                        &dk[j * dh..(j + 1) * dh],
                        bi * p + j,
                        -1.0,
                        &mut dk_raw[j * dh..(j + 1) * dh],
                    );
                }
                (dq, dk_raw, dv)
            })
            .collect();
        let mut out = vec![0f32; src.len()];
        for (&(bi, g), (dq, dk, dv)) in tasks.iter().zip(&parts) {
            for i in 0..p {
                let base = (bi * p + i) * row;
                for rep in 0..n_rep {
                    let head = g * n_rep + rep;
                    out[base + head * dh..][..dh]
                        .copy_from_slice(&dq[(i * n_rep + rep) * dh..][..dh]);
                }
                out[base + (h + g) * dh..][..dh].copy_from_slice(&dk[i * dh..(i + 1) * dh]);
                out[base + (h + kvh + g) * dh..][..dh].copy_from_slice(&dv[i * dh..(i + 1) * dh]);
            }
        }
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

#[cfg(test)]
mod attention_grad_tests {
    //! The fused attention's backward pass against candle's autograd through the same attention
    //! composed of ops (rotary, grouped-query scores, causal mask with a padded row, softmax).
    use candle_core::{Device, Tensor, Var, D};
    use std::sync::Arc;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.5f32..1.5)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn composed(
        x: &Tensor,
        h: usize,
        kvh: usize,
        cos: &Tensor,
        sin: &Tensor,
        real: &[Vec<bool>],
    ) -> Tensor {
        let (b, p, _, dh) = x.dims4().unwrap();
        let half = dh / 2;
        let rope = |t: &Tensor| {
            // t [b, heads, p, dh]
            let x1 = t.narrow(D::Minus1, 0, half).unwrap();
            let x2 = t.narrow(D::Minus1, half, half).unwrap();
            let (c, s) = (cos.unsqueeze(1).unwrap(), sin.unsqueeze(1).unwrap());
            let a = (x1.broadcast_mul(&c).unwrap() - x2.broadcast_mul(&s).unwrap()).unwrap();
            let bb = (x2.broadcast_mul(&c).unwrap() + x1.broadcast_mul(&s).unwrap()).unwrap();
            Tensor::cat(&[&a, &bb], D::Minus1).unwrap()
        };
        let q = rope(
            &x.narrow(2, 0, h)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap(),
        );
        let k = rope(
            &x.narrow(2, h, kvh)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap(),
        );
        let v = x
            .narrow(2, h + kvh, kvh)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let n_rep = h / kvh;
        let rep = |t: &Tensor| {
            let parts: Vec<Tensor> = (0..h).map(|i| t.narrow(1, i / n_rep, 1).unwrap()).collect();
            Tensor::cat(&parts, 1).unwrap()
        };
        let (k, v) = (rep(&k), rep(&v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() / (dh as f64).sqrt()).unwrap();
        let mut m = vec![0f32; b * p * p];
        for (r, row) in real.iter().enumerate() {
            for i in 0..p {
                for j in 0..p {
                    let visible = if row[i] { j <= i && row[j] } else { j == i };
                    if !visible {
                        m[(r * p + i) * p + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, p, p), &Device::Cpu).unwrap();
        let s = scores.broadcast_add(&mask).unwrap();
        let max = s.max_keepdim(D::Minus1).unwrap().detach();
        let e = s.broadcast_sub(&max).unwrap().exp().unwrap();
        let pat = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        pat.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    }

    #[test]
    fn fused_attention_gradient_matches_autograd() {
        let (b, p, h, kvh, dh) = (2, 5, 4, 2, 8);
        let x = Var::from_tensor(&randn(&[b, p, h + 2 * kvh, dh], 7)).unwrap();
        let angles = randn(&[b, p, dh / 2], 8);
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        // The second row is left-padded at its first position.
        let real = vec![vec![true; p], {
            let mut r = vec![true; p];
            r[0] = false;
            r
        }];
        let op = super::CausalAttentionGrad {
            n_heads: h,
            n_kv_heads: kvh,
            scale: 1.0 / (dh as f32).sqrt(),
            cos_sin: Some((
                Arc::new(cos.flatten_all().unwrap().to_vec1().unwrap()),
                Arc::new(sin.flatten_all().unwrap().to_vec1().unwrap()),
            )),
            real: Arc::new(real.clone()),
        };
        let za = x.as_tensor().apply_op1(op).unwrap();
        let zb = composed(x.as_tensor(), h, kvh, &cos, &sin, &real);
        let r = randn(za.dims(), 9);
        let maxdiff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(
            maxdiff(&za, &zb) < 1e-5,
            "z differs by {}",
            maxdiff(&za, &zb)
        );
        let ga = za.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = zb.mul(&r).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (
            ga.get(x.as_tensor()).unwrap(),
            gb.get(x.as_tensor()).unwrap(),
        );
        assert!(
            maxdiff(ga, gb) < 1e-4,
            "gradients differ by {}",
            maxdiff(ga, gb)
        );
        // Every part of the projection gets a gradient: queries, keys and values.
        for (start, n) in [(0, h), (h, kvh), (h + kvh, kvh)] {
            let part = ga
                .narrow(2, start, n)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap();
            assert!(part.to_scalar::<f32>().unwrap() > 1e-3);
        }
    }
}
