//! The TopK trainer: hand-written sparse gradients against finite differences, the fast forward
//! against `Sae::forward`, and recovery of ground-truth features in superposition.

use std::time::Instant;

use candle_core::{Device, Tensor};
use scalpel_dict::synthetic::Synthetic;
use scalpel_dict::train::{TopKTrainer, TrainConfig};
use scalpel_dict::{Architecture, DictConfig};

fn trainer(d: usize, d_sae: usize, k: usize, train: TrainConfig, seed: u64) -> TopKTrainer {
    let mut cfg = DictConfig::new(Architecture::Topk, d, d_sae);
    cfg.k = Some(k);
    TopKTrainer::new(cfg, train, seed).unwrap()
}

/// The nonzero pattern of the reference encoder: the top-k selection.
fn active(t: &TopKTrainer, x: &Tensor) -> Vec<Vec<bool>> {
    let f = t
        .to_sae()
        .unwrap()
        .encode(x)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    f.into_iter()
        .map(|r| r.into_iter().map(|v| v > 0.0).collect())
        .collect()
}

/// The selection a perturbation must not change: the top-k pattern, and which latents have a
/// positive pre-activation (what AuxK selects from when `k_aux` ≥ the dead count).
fn selection(t: &TopKTrainer, x: &Tensor) -> (Vec<Vec<bool>>, Vec<Vec<bool>>) {
    let mut all = t.clone();
    all.cfg.k = Some(t.cfg.d_sae);
    (active(t, x), active(&all, x))
}

/// Compares `t.gradients(x)` with central differences of the loss for every parameter entry
/// `check(name, index)` accepts; returns how many were checked and the largest analytic |grad|.
fn check_gradients(
    t: &TopKTrainer,
    x: &Tensor,
    check: impl Fn(&str, usize) -> bool,
) -> (usize, f64) {
    let (g, _) = t.gradients(x).unwrap();
    let sel = selection(t, x);
    // With the selection fixed the loss is quadratic in each single parameter, so central
    // differences are exact up to f32 rounding.
    let eps = 1e-2f32;
    let (atol, rtol) = (2e-3f64, 1e-2f64);
    let (mut checked, mut skipped, mut largest) = (0, 0, 0f64);
    let mut worst = (f64::MIN, String::new());
    for name in ["w_enc_t", "b_enc", "w_dec", "b_dec"] {
        let grad = match name {
            "w_enc_t" => &g.w_enc_t,
            "b_enc" => &g.b_enc,
            "w_dec" => &g.w_dec,
            _ => &g.b_dec,
        };
        for (i, &analytic) in grad.iter().enumerate() {
            if !check(name, i) {
                continue;
            }
            let analytic = analytic as f64;
            let loss_at = |delta: f32| {
                let mut p = t.clone();
                let v = match name {
                    "w_enc_t" => &mut p.w_enc_t[i],
                    "b_enc" => &mut p.b_enc[i],
                    "w_dec" => &mut p.w_dec[i],
                    _ => &mut p.b_dec[i],
                };
                *v += delta;
                (p.evaluate(x).unwrap().loss, selection(&p, x) == sel)
            };
            let ((lp, sp), (lm, sm)) = (loss_at(eps), loss_at(-eps));
            if !(sp && sm) {
                skipped += 1;
                continue;
            }
            let numeric = (lp - lm) / (2.0 * eps as f64);
            let excess = (analytic - numeric).abs() - (atol + rtol * numeric.abs());
            if excess > worst.0 {
                worst = (
                    excess,
                    format!("{name}[{i}]: analytic {analytic}, numeric {numeric}"),
                );
            }
            largest = largest.max(analytic.abs());
            checked += 1;
        }
    }
    assert!(worst.0 <= 0.0, "worst gradient: {}", worst.1);
    assert!(
        checked > 5 * skipped,
        "{checked} checked, {skipped} skipped (selection changed)"
    );
    (checked, largest)
}

#[test]
fn sparse_backward_matches_finite_differences() {
    let (d, d_sae, k, n) = (6, 10, 3, 8);
    let train = TrainConfig {
        k_aux: 0,
        ..TrainConfig::default()
    };
    let mut t = trainer(d, d_sae, k, train, 1);
    // Non-zero biases so every gradient path is exercised.
    for (i, b) in t.b_enc.iter_mut().enumerate() {
        *b = 0.05 * (i as f32 - 4.0);
    }
    for (i, b) in t.b_dec.iter_mut().enumerate() {
        *b = 0.1 * (i as f32 - 2.5);
    }
    let x = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap();
    let (checked, largest) = check_gradients(&t, &x, |_, _| true);
    assert!(checked > 100 && largest > 1e-2, "{checked} checked");
}

/// AuxK's gradient reaches only dead latents; for a dead latent outside every token's top k the
/// main loss does not depend on its parameters, so finite differences of the whole loss check
/// the AuxK gradient alone (the residual `e` being detached does not matter there).
#[test]
fn auxk_backward_matches_finite_differences() {
    let (d, d_sae, k, n) = (6, 10, 2, 4);
    let train = TrainConfig {
        k_aux: d_sae,
        dead_window: 0,
        lr: 1e-4,
        ..TrainConfig::default()
    };
    let mut t = trainer(d, d_sae, k, train, 5);
    let x = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap();
    t.step(&x).unwrap();
    let dead = t.dead();
    let in_top_k: Vec<bool> = (0..d_sae)
        .map(|j| active(&t, &x).iter().any(|r| r[j]))
        .collect();
    let only_aux: Vec<bool> = (0..d_sae).map(|j| dead[j] && !in_top_k[j]).collect();
    assert!(only_aux.iter().any(|&b| b), "no dead latent to check");
    let (checked, largest) = check_gradients(&t, &x, |name, i| match name {
        "b_enc" => only_aux[i],
        "w_enc_t" | "w_dec" => only_aux[i / d],
        _ => false,
    });
    assert!(t.evaluate(&x).unwrap().aux > 0.0);
    assert!(
        checked > 0 && largest > 1e-3,
        "{checked} checked, largest {largest}"
    );
}

#[test]
fn fast_forward_matches_sae_forward() {
    // d 20 and 18 tokens reach the vector loops' remainders (16 lanes, 8 lanes, 4-token tiles).
    let mut t = trainer(20, 40, 5, TrainConfig::default(), 2);
    let x = Tensor::randn(0f32, 1.0, (18, 20), &Device::Cpu).unwrap();
    t.init_b_dec(&x).unwrap();
    t.b_enc.iter_mut().for_each(|b| *b = 0.1);
    let stats = t.evaluate(&x).unwrap();
    let xhat = t.to_sae().unwrap().forward(&x).unwrap();
    let mse = (xhat - &x).unwrap().sqr().unwrap().sum_all().unwrap();
    let mse = mse.to_scalar::<f32>().unwrap() as f64 / 18.0;
    assert!(
        (mse - stats.mse).abs() <= 1e-5 + 1e-4 * mse,
        "Sae::forward mse {mse}, trainer {}",
        stats.mse
    );
}

#[test]
fn synthetic_samples_have_n_p_features_on_average() {
    let mut s = Synthetic::new(512, 16, 8.0 / 512.0, 0);
    // E‖x‖² = n p E[a²] (cross terms have mean 0), E[a²] = 1 + 1/12 for a ~ U[0.5, 1.5].
    let x = s.batch(4000).unwrap().to_vec2::<f32>().unwrap();
    let e: f32 = x
        .iter()
        .map(|r| r.iter().map(|a| a * a).sum::<f32>())
        .sum::<f32>()
        / 4000.0;
    let expect = 8.0 * (1.0 + 1.0 / 12.0);
    assert!(
        (e - expect).abs() < 0.1 * expect,
        "E‖x‖² = {e}, expected ≈ {expect}"
    );
    let norms: Vec<f32> = s
        .directions
        .iter()
        .map(|f| f.iter().map(|a| a * a).sum())
        .collect();
    assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
}

/// Best cosine of each true direction with any decoder row, averaged over true features.
fn mean_best_cosine(directions: &[Vec<f32>], w_dec: &[f32], d: usize) -> f64 {
    let rows: Vec<&[f32]> = w_dec.chunks_exact(d).collect();
    let total: f64 = directions
        .iter()
        .map(|f| {
            rows.iter()
                .map(|r| r.iter().zip(f).map(|(a, b)| (a * b) as f64).sum::<f64>())
                .fold(f64::MIN, f64::max)
        })
        .sum();
    total / directions.len() as f64
}

/// The acceptance test: 512 features in 64 dims, ~8 active per sample.
#[test]
fn recovers_ground_truth_features_in_superposition() {
    let (n_features, d, d_sae, k) = (512, 64, 1024, 8);
    let mut data = Synthetic::new(n_features, d, k as f64 / n_features as f64, 7);
    let train = TrainConfig {
        lr: 3e-3,
        k_aux: 32,
        dead_window: 50_000,
        ..TrainConfig::default()
    };
    let mut t = trainer(d, d_sae, k, train, 3);
    t.init_b_dec(&data.batch(4096).unwrap()).unwrap();
    let start = Instant::now();
    let (steps, batch) = (1500, 1024);
    for s in 0..steps {
        let x = data.batch(batch).unwrap();
        let st = t.step(&x).unwrap();
        if s % 250 == 0 {
            eprintln!(
                "step {s}: mse {:.4} aux {:.4} ev {:.4} dead {} cos {:.4}",
                st.mse,
                st.aux,
                st.explained_variance,
                st.n_dead,
                mean_best_cosine(&data.directions, &t.w_dec, d)
            );
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let eval = t.evaluate(&data.batch(8192).unwrap()).unwrap();
    let cos = mean_best_cosine(&data.directions, &t.w_dec, d);
    eprintln!(
        "{steps} steps x {batch} in {secs:.1} s ({:.0} act/s): mean best cosine {cos:.4}, \
         explained variance {:.4}, dead {}",
        (steps * batch) as f64 / secs,
        eval.explained_variance,
        eval.n_dead
    );
    assert!(cos >= 0.9, "mean best cosine {cos}");
}

/// Throughput at a GPT-2-small-like width; prints activations per second.
#[test]
#[ignore = "benchmark: prints throughput, asserts nothing"]
fn throughput_d576_dsae9216_k32() {
    let (d, d_sae, k, batch, steps) = (576, 9216, 32, 1024, 5);
    let mut t = trainer(d, d_sae, k, TrainConfig::default(), 0);
    let x = Tensor::randn(0f32, 1.0, (batch, d), &Device::Cpu).unwrap();
    t.init_b_dec(&x).unwrap();
    t.step(&x).unwrap();
    let start = Instant::now();
    for _ in 0..steps {
        t.step(&x).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "d {d}, d_sae {d_sae}, k {k}: {:.0} activations/s",
        (steps * batch) as f64 / secs
    );
}
