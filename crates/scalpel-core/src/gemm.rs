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
    assert!(dst.len() >= m * n, "matmul: destination too small");
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
            n as isize,
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
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}
