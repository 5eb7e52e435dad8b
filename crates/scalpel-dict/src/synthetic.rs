//! Ground-truth data in superposition, for testing dictionary learning: `n_features` random unit
//! directions in `d` dimensions; each sample switches each feature on independently with
//! probability `p`, at a magnitude uniform in [0.5, 1.5], and is the sum `x = Σ a_i f_i`
//! (the toy setting of Elhage et al. 2022, "Toy Models of Superposition").

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::Result;

/// A seeded source of superposed samples.
#[derive(Debug, Clone)]
pub struct Synthetic {
    /// The true feature directions, unit norm, `[n_features][d]`.
    pub directions: Vec<Vec<f32>>,
    /// Probability that a feature is on in a sample.
    pub p: f64,
    rng: StdRng,
}

impl Synthetic {
    /// `n_features` random unit directions in `d` dimensions (from `seed`), each on with
    /// probability `p` (in (0, 1)).
    pub fn new(n_features: usize, d: usize, p: f64, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let directions = (0..n_features)
            .map(|_| {
                // A Gaussian vector, normalised, is uniform on the sphere.
                let v: Vec<f32> = (0..d).map(|_| gaussian(&mut rng)).collect();
                let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt().max(1e-12);
                v.into_iter().map(|a| a / norm).collect()
            })
            .collect();
        Synthetic { directions, p, rng }
    }

    /// The width `d` of a sample.
    pub fn d(&self) -> usize {
        self.directions.first().map_or(0, Vec::len)
    }

    /// `n` fresh samples `[n, d]`.
    pub fn batch(&mut self, n: usize) -> Result<Tensor> {
        let d = self.d();
        let n_features = self.directions.len();
        let mut out = vec![0f32; n * d];
        // Gaps between active features are geometric: skipping them costs O(active) random
        // draws per sample instead of O(n_features).
        let log_q = (1.0 - self.p).ln();
        for x in out.chunks_exact_mut(d) {
            let mut i = 0usize;
            loop {
                let u: f64 = self.rng.gen::<f64>().max(f64::MIN_POSITIVE);
                i += (u.ln() / log_q).floor() as usize;
                if i >= n_features {
                    break;
                }
                let a: f32 = self.rng.gen_range(0.5..1.5);
                for (xe, fe) in x.iter_mut().zip(&self.directions[i]) {
                    *xe += a * fe;
                }
                i += 1;
            }
        }
        Ok(Tensor::from_vec(out, (n, d), &Device::Cpu)?)
    }
}

/// A standard normal draw (Box–Muller), so the crate needs no `rand_distr`.
pub(crate) fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}
