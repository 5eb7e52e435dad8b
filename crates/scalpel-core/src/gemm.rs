//! Dense f32 matrix products on raw slices, through the `gemm` crate on all rayon threads: the
//! building block of the hand-written training paths (dictionaries, toy transformers), where
//! candle's per-op allocations would cost more than the arithmetic.

/// `dst [m, n] (+)= lhs [m, k] · rhs [k, n]`, each operand given as (data, column stride, row
/// stride), through the `gemm` crate on all rayon threads.
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
) {
    matmul_strided(m, n, k, (dst, n), accumulate, lhs, rhs);
}

/// [`matmul`] into a destination whose rows lie `dst.1` elements apart (a block of a wider
/// matrix, e.g. one head's columns).
pub fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: (&mut [f32], usize),
    accumulate: bool,
    lhs: (&[f32], isize, isize),
    rhs: (&[f32], isize, isize),
) {
    let (dst, dst_rs) = dst;
    assert!(
        m == 0 || n == 0 || (dst_rs >= n && (m - 1) * dst_rs + n <= dst.len()),
        "matmul: destination too small"
    );
    let reach = |(data, cs, rs): (&[f32], isize, isize), rows: usize, cols: usize| {
        rows == 0 || cols == 0 || {
            let last = (rows as isize - 1) * rs + (cols as isize - 1) * cs;
            (last as usize) < data.len()
        }
    };
    assert!(
        reach(lhs, m, k) && reach(rhs, k, n),
        "matmul: operand too small"
    );
    // SAFETY: the asserts above check that every index the strides reach lies inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.1,
            lhs.2,
            rhs.0.as_ptr(),
            rhs.1,
            rhs.2,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
}

/// Threads for one product: none inside a task that already runs on the pool (the caller splits
/// the work at a coarser grain), and none below about sixteen million multiply-adds, where waking
/// the pool costs more than it saves.
fn parallelism(m: usize, n: usize, k: usize) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    let nested = rayon::current_thread_index().is_some();
    if nested || threads <= 1 || m.saturating_mul(n).saturating_mul(k) < SERIAL_BELOW {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    }
}

const SERIAL_BELOW: usize = 1 << 24;

/// `a · b` with eight independent partial sums, so the compiler can keep them in vector
/// registers (one running sum would serialise every addition). Inlined into callers compiled
/// for wider vector units.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}
