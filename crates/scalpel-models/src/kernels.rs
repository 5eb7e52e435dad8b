//! Fused CPU kernels for the inference fast path. Each has a plain composition of candle ops
//! beside it in `transformer.rs`, taken whenever hooks or gradients need the intermediate values;
//! the parity tests run both paths against the same reference.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape};
use rayon::prelude::*;

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
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("swiglu: only f32 is supported");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("swiglu: input must be contiguous");
        };
        let (n, two_m) = layout.shape().dims2()?;
        if two_m % 2 != 0 {
            candle_core::bail!("swiglu: last dimension {two_m} is odd");
        }
        let m = two_m / 2;
        let src = &data[start..end];
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
