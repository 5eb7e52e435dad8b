//! The fused forward/backward pass against candle's autograd through the core model's
//! differentiable path, and against central finite differences, for every layer type the toys
//! use: embeddings and learned positions, LayerNorm or none, attention with and without biases,
//! ReLU MLP, final norm, untied unembedding, and a loss on all or only some positions (the last
//! block then computes only the targeted rows).

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use scalpel_models::config::{Act, Config, Mlp, Norm};
use scalpel_toys::fused::Fused;
use scalpel_toys::optim::AdamWConfig;
use scalpel_toys::transformer::{CrossEntropy, Init, Trainable};

fn model(cfg: Config, seed: u64) -> Trainable {
    // Non-trivial values everywhere (biases and norm weights too) so every gradient is exercised.
    Trainable::new(
        cfg,
        seed,
        |name, _| {
            if name.ends_with(".b") {
                Init::Normal(0.1)
            } else if name.contains("ln") {
                Init::Normal(0.5)
            } else {
                Init::Normal(0.4)
            }
        },
        AdamWConfig::default(),
    )
    .unwrap()
}

/// Variants: (name, config).
fn variants() -> Vec<(&'static str, Config)> {
    let attn_only = Config::toy(2, 8, 2, 11, 6, true);
    let mut no_norm = Config::toy(1, 8, 2, 11, 6, false);
    no_norm.norm = Norm::None;
    no_norm.final_norm = false;
    no_norm.qkv_bias = false;
    no_norm.attn_out_bias = false;
    no_norm.mlp = Some(Mlp::Standard { act: Act::Relu });
    no_norm.d_mlp = 12;
    let mut full = Config::toy(2, 8, 2, 11, 6, false);
    full.mlp = Some(Mlp::Standard { act: Act::Relu });
    full.d_mlp = 12;
    vec![
        ("attn-only LN", attn_only),
        ("no-norm MLP", no_norm),
        ("LN + MLP", full),
    ]
}

/// Tokens and targets: `batch` rows of `p`; `every` = a target at every position but the last,
/// else only at the last position.
fn data(
    seed: u64,
    batch: usize,
    p: usize,
    vocab: u32,
    every: bool,
) -> (Vec<u32>, Vec<Option<u32>>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tokens: Vec<u32> = (0..batch * p).map(|_| rng.gen_range(0..vocab)).collect();
    let targets = (0..batch * p)
        .map(|i| {
            let last = i % p == p - 1;
            if every != last {
                Some(rng.gen_range(0..vocab))
            } else {
                None
            }
        })
        .collect();
    (tokens, targets)
}

fn autograd(
    m: &Trainable,
    tokens: &[u32],
    batch: usize,
    targets: &[Option<u32>],
) -> (f64, Vec<Option<Vec<f32>>>) {
    let p = tokens.len() / batch;
    let t = Tensor::from_slice(tokens, (batch, p), &Device::Cpu).unwrap();
    let logits = m.logits(&t).unwrap();
    let loss = CrossEntropy::loss(&logits, targets.to_vec()).unwrap();
    let grads = loss.backward().unwrap();
    (
        loss.to_scalar::<f32>().unwrap() as f64,
        m.opt.gradients(&grads).unwrap(),
    )
}

/// Small batches run as one pass; large ones (≥ 256 tokens) split over the threads by whole
/// sequences and sum the gradients. Both are checked.
#[test]
fn fused_matches_autograd_through_the_core_model() {
    for (name, cfg) in variants() {
        for (every, batch) in [(true, 3), (false, 3), (true, 50), (false, 51)] {
            let m = model(cfg.clone(), 3);
            let fused = Fused::new(&cfg).unwrap();
            let (tokens, targets) = data(5, batch, 6, cfg.d_vocab as u32, every);
            let (l_f, g_f) = fused
                .loss_and_grads(&m.opt, &tokens, batch, &targets)
                .unwrap();
            let (l_a, g_a) = autograd(&m, &tokens, batch, &targets);
            assert!(
                (l_f - l_a).abs() <= 1e-5 * l_a.abs().max(1.0),
                "{name}: loss {l_f} vs {l_a}"
            );
            for ((pname, _), (gf, ga)) in m.opt.vars().zip(g_f.iter().zip(&g_a)) {
                let gf = gf.as_ref().unwrap();
                // A parameter the loss does not reach has no autograd gradient; fused gives 0s.
                let zeros = vec![0f32; gf.len()];
                let ga = ga.as_ref().unwrap_or(&zeros);
                let scale = ga.iter().fold(0f32, |m, x| m.max(x.abs()));
                let (i, worst) = gf
                    .iter()
                    .zip(ga)
                    .map(|(a, b)| (a - b).abs())
                    .enumerate()
                    .fold((0, 0f32), |m, (i, x)| if x > m.1 { (i, x) } else { m });
                assert!(
                    worst <= 1e-5 + 1e-4 * scale,
                    "{name} (targets everywhere: {every}): gradient of {pname} differs by {worst} at {i} (scale {scale})"
                );
            }
        }
    }
}

#[test]
fn fused_gradients_match_finite_differences() {
    for (name, cfg) in variants() {
        for every in [true, false] {
            let m = model(cfg.clone(), 11);
            let fused = Fused::new(&cfg).unwrap();
            let (tokens, targets) = data(7, 2, 6, cfg.d_vocab as u32, every);
            let (_, grads) = fused.loss_and_grads(&m.opt, &tokens, 2, &targets).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(1);
            let (mut total, mut checked) = (0, 0);
            let vars: Vec<(String, candle_core::Var)> = m
                .opt
                .vars()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect();
            for ((pname, var), g) in vars.iter().zip(&grads) {
                let g = g.as_ref().unwrap();
                let base = var
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let shape = var.as_tensor().shape().clone();
                // A few coordinates per tensor, including the largest gradient.
                let largest = (0..g.len())
                    .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
                    .unwrap();
                let mut picks = vec![largest];
                picks.extend((0..3).map(|_| rng.gen_range(0..g.len())));
                for i in picks {
                    let eps = 2e-3f32;
                    let at = |delta: f32| {
                        let mut w = base.clone();
                        w[i] += delta;
                        var.set(&Tensor::from_vec(w, shape.clone(), &Device::Cpu).unwrap())
                            .unwrap();
                        fused
                            .loss_and_grads(&m.opt, &tokens, 2, &targets)
                            .unwrap()
                            .0
                    };
                    let (up, mid, down) = (at(eps), at(0.0), at(-eps));
                    var.set(&Tensor::from_vec(base.clone(), shape.clone(), &Device::Cpu).unwrap())
                        .unwrap();
                    // A ReLU switching inside [−eps, eps] makes the two one-sided slopes
                    // disagree; such a coordinate says nothing about the gradient.
                    let (right, left) = ((up - mid) / eps as f64, (mid - down) / eps as f64);
                    total += 1;
                    if (right - left).abs() > 0.05 * right.abs().max(left.abs()) + 5e-3 {
                        continue;
                    }
                    checked += 1;
                    let fd = (up - down) / (2.0 * eps as f64);
                    let an = g[i] as f64;
                    assert!(
                        (fd - an).abs() <= 2e-3 + 2e-2 * an.abs(),
                        "{name} (targets everywhere: {every}): d loss / d {pname}[{i}] = {an}, finite differences {fd}"
                    );
                }
            }
            assert!(
                checked * 10 >= total * 9,
                "{name}: only {checked} of {total} coordinates away from a kink"
            );
        }
    }
}

#[test]
fn training_steps_agree_between_fused_and_autograd() {
    let (_, cfg) = variants().remove(2);
    let mut a = model(cfg.clone(), 2);
    let mut b = model(cfg.clone(), 2);
    b.use_autograd();
    assert!(a.is_fused() && !b.is_fused());
    let (tokens, targets) = data(9, 4, 6, cfg.d_vocab as u32, true);
    for _ in 0..5 {
        let la = a.train_step(&tokens, 4, &targets, 1e-2).unwrap();
        let lb = b.train_step(&tokens, 4, &targets, 1e-2).unwrap();
        assert!((la - lb).abs() < 1e-4, "{la} vs {lb}");
    }
    // Bad input is an error, not a panic.
    assert!(a.train_step(&tokens, 5, &targets, 1e-2).is_err());
    let mut bad = tokens.clone();
    bad[0] = 999;
    assert!(a.train_step(&bad, 4, &targets, 1e-2).is_err());
}

#[test]
fn an_optimiser_without_the_models_weights_is_an_error() {
    let (_, cfg) = variants().remove(1);
    let fused = Fused::new(&cfg).unwrap();
    let var = candle_core::Var::new(&[1.0f32], &Device::Cpu).unwrap();
    let opt =
        scalpel_toys::optim::AdamW::new(vec![("embed.w".into(), var)], AdamWConfig::default())
            .unwrap();
    let (tokens, targets) = data(1, 2, 6, cfg.d_vocab as u32, true);
    let err = fused
        .loss_and_grads(&opt, &tokens, 2, &targets)
        .unwrap_err();
    assert!(err.to_string().contains("holds no parameter"), "{err}");
}
