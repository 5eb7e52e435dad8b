//! What a run computes on a sample before training: `b_dec`'s starting point and the input
//! normalisation factor; and after it, the feature densities.

use candle_core::Tensor;

use crate::Result;

/// The geometric median of `rows` (`[n][d]`): the point minimising the sum of Euclidean
/// distances, by Weiszfeld's iterations from the mean (as SAELens's `compute_geometric_median`),
/// in f64. Stops after `max_iter` iterations or when the objective improves by less than a
/// relative `1e-9`. A point closer than `1e-8` to an iterate gets weight `1 / 1e-8`.
pub fn geometric_median(rows: &[Vec<f32>], max_iter: usize) -> Vec<f32> {
    let Some(d) = rows.first().map(Vec::len) else {
        return Vec::new();
    };
    const EPS: f64 = 1e-8;
    let mut y: Vec<f64> = mean(rows).into_iter().map(f64::from).collect();
    let distance = |y: &[f64], x: &[f32]| -> f64 {
        y.iter()
            .zip(x)
            .map(|(a, &b)| (a - f64::from(b)).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let objective = |y: &[f64]| rows.iter().map(|x| distance(y, x)).sum::<f64>();
    let mut best = objective(&y);
    for _ in 0..max_iter {
        let mut num = vec![0f64; d];
        let mut den = 0f64;
        for x in rows {
            let w = 1.0 / distance(&y, x).max(EPS);
            den += w;
            for (n, &v) in num.iter_mut().zip(x) {
                *n += w * f64::from(v);
            }
        }
        let next: Vec<f64> = num.iter().map(|n| n / den).collect();
        let value = objective(&next);
        y = next;
        if best - value <= 1e-9 * best {
            break;
        }
        best = value;
    }
    y.into_iter().map(|v| v as f32).collect()
}

/// The mean row of `rows` (`[n][d]`), accumulated in f64.
pub fn mean(rows: &[Vec<f32>]) -> Vec<f32> {
    let Some(d) = rows.first().map(Vec::len) else {
        return Vec::new();
    };
    let mut sum = vec![0f64; d];
    for x in rows {
        for (s, &v) in sum.iter_mut().zip(x) {
            *s += f64::from(v);
        }
    }
    sum.into_iter()
        .map(|s| (s / rows.len() as f64) as f32)
        .collect()
}

/// SAELens's `expected_average_only_in` factor `√d / E‖x‖` over `rows` (`[n][d]`); 1 when the
/// rows are all zero.
pub fn norm_scaling_factor(rows: &[Vec<f32>]) -> f32 {
    let Some(d) = rows.first().map(Vec::len) else {
        return 1.0;
    };
    let mean_norm = rows
        .iter()
        .map(|x| x.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt())
        .sum::<f64>()
        / rows.len() as f64;
    if mean_norm > 0.0 && mean_norm.is_finite() {
        ((d as f64).sqrt() / mean_norm) as f32
    } else {
        1.0
    }
}

/// `log10(fraction of rows where each feature fires + 1e-10)` of `sae` on `rows` (each of width
/// `d_in`), as SAELens's `log_feature_sparsity`. Encodes 1024 rows at a time, so memory stays at
/// `1024 × d_sae` features however many rows there are.
pub fn log_feature_density(sae: &crate::Sae, rows: &[Vec<f32>]) -> Result<Vec<f32>> {
    let mut fired = vec![0u64; sae.cfg.d_sae];
    for chunk in rows.chunks(1024) {
        let x = Tensor::new(chunk.to_vec(), &candle_core::Device::Cpu)?;
        let f = sae
            .encode(&x)?
            .gt(0f32)?
            .to_dtype(candle_core::DType::U32)?
            .sum(0)?;
        for (c, v) in fired.iter_mut().zip(f.to_vec1::<u32>()?) {
            *c += u64::from(v);
        }
    }
    let n = rows.len().max(1) as f64;
    Ok(fired
        .into_iter()
        .map(|c| ((c as f64 / n) + 1e-10).log10() as f32)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometric_median_of_a_hand_case() {
        // Three near points and a far outlier: the mean follows the outlier, the median does
        // not.
        let rows = vec![
            vec![0.0, 0.0],
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![100.0, 100.0],
        ];
        let m = geometric_median(&rows, 1000);
        let mu = mean(&rows);
        assert!(mu[0] > 25.0, "{mu:?}");
        // By symmetry it lies on the diagonal; the unit vectors to (1, 0) and (0, 1) cancel
        // those to (0, 0) and the outlier at (0.5, 0.5).
        assert!(
            (m[0] - 0.5).abs() < 1e-3 && (m[1] - 0.5).abs() < 1e-3,
            "{m:?}"
        );
        // Its defining property: the unit vectors from it to the points sum to zero.
        let g: Vec<f64> = (0..2)
            .map(|j| {
                rows.iter()
                    .map(|x| {
                        let dist = ((x[0] - m[0]).powi(2) + (x[1] - m[1]).powi(2)).sqrt();
                        f64::from((x[j] - m[j]) / dist)
                    })
                    .sum()
            })
            .collect();
        assert!(g.iter().all(|v| v.abs() < 1e-3), "gradient {g:?}");
        // Collinear odd set: the median is the middle point.
        let line = vec![vec![0.0], vec![1.0], vec![10.0]];
        assert!((geometric_median(&line, 1000)[0] - 1.0).abs() < 1e-3);
    }

    #[test]
    fn norm_factor_makes_the_mean_norm_sqrt_d() {
        let rows = vec![vec![3.0, 4.0], vec![6.0, 8.0]];
        let f = norm_scaling_factor(&rows);
        assert!((f - 2f32.sqrt() / 7.5).abs() < 1e-6);
    }
}
