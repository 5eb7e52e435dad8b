//! Helpers shared by the integration tests: fixture paths and a two-sided closeness check that
//! names the worst element when it fails.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Tensor};

/// `crates/scalpel-models/tests/fixtures/<rel>`.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The default model's GGUF: `$SCALPEL_TEST_GGUF`, else resolved (and fetched if needed) through
/// the built-in default.
pub fn smollm2_gguf() -> PathBuf {
    if let Ok(p) = std::env::var("SCALPEL_TEST_GGUF") {
        return PathBuf::from(p);
    }
    match scalpel_models::hub::resolve(scalpel_models::hub::DEFAULT_MODEL) {
        Ok(scalpel_models::hub::ModelFiles::Gguf(p)) => p,
        other => panic!(
            "the default model did not resolve to a GGUF: {:?}",
            other.err()
        ),
    }
}

/// Checks `|a − e| ≤ atol + rtol·|e|` elementwise. NaN in `expected` marks "undefined, skip";
/// equal infinities match. Returns the number of compared elements.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, atol: f32, rtol: f32) -> usize {
    assert_eq!(
        actual.dims(),
        expected.dims(),
        "{name}: shape {:?} vs expected {:?}",
        actual.dims(),
        expected.dims()
    );
    let a = actual
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let e = expected
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut worst: Option<(usize, f32)> = None;
    let mut n = 0;
    for (i, (&x, &y)) in a.iter().zip(&e).enumerate() {
        if y.is_nan() {
            continue;
        }
        n += 1;
        if x == y {
            continue;
        }
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        if (excess > 0.0 || excess.is_nan())
            && worst.is_none_or(|(_, w)| excess > w || excess.is_nan())
        {
            worst = Some((
                i,
                if excess.is_nan() {
                    f32::INFINITY
                } else {
                    excess
                },
            ));
        }
    }
    if let Some((i, _)) = worst {
        let idx = unravel(i, expected.dims());
        panic!(
            "{name}: worst mismatch at {idx:?}: got {}, expected {} (atol {atol}, rtol {rtol})",
            a[i], e[i]
        );
    }
    n
}

fn unravel(mut i: usize, dims: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; dims.len()];
    for (k, &d) in dims.iter().enumerate().rev() {
        idx[k] = i % d;
        i /= d;
    }
    idx
}
