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
