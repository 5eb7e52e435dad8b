//! Ablation against forward passes edited by hand on tiny random models (LayerNorm with learned
//! positions; RMSNorm with rotary and a gated MLP), and on the real default model
//! (SmolLM2-135M-Instruct, grouped-query attention, fetched once into the cache) a hand check and
//! a sanity check of the sizes of effects.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use scalpel_circuits::ablate::{
    ablate, rank, Data, Effect, LatentSae, Method, Reference, Source, Target,
};
use scalpel_circuits::metric::Metric;
use scalpel_circuits::pairs::{self, TokenPair};
use scalpel_core::{BlockHook, HookPoint, Hooks};
use scalpel_dict::{Architecture, DictConfig, Sae};
use scalpel_models::loader::LoadedModel;
use scalpel_models::transformer::Model;

/// The shared tiny models with two layers and an MLP: LayerNorm with learned positions and
/// biases; RMSNorm with rotary and a gated MLP.
fn models() -> Vec<(&'static str, Model)> {
    common::models()
        .into_iter()
        .filter(|(_, m)| m.config().n_layers >= 2 && m.config().mlp.is_some())
        .collect()
}

/// Seeded normal draws (for SAE weights).
fn normal(seed: u64, shape: &[usize], std: f64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    (0..n)
        .map(|_| {
            let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
            (std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

fn pair(clean: &[u32], corrupt: &[u32], answer: u32, wrong: u32) -> TokenPair {
    TokenPair {
        clean: clean.to_vec(),
        corrupt: corrupt.to_vec(),
        answer,
        wrong,
    }
}

/// Two prompts of 5 tokens and one of 7: two forward passes.
fn pairs() -> Vec<TokenPair> {
    vec![
        pair(&[3, 14, 15, 9, 26], &[3, 14, 30, 9, 26], 7, 21),
        pair(&[5, 35, 8, 9, 7, 9, 3], &[5, 35, 8, 2, 7, 9, 3], 12, 4),
        pair(&[2, 7, 18, 28, 18], &[2, 7, 18, 1, 18], 30, 11),
    ]
}

fn text() -> Vec<Vec<u32>> {
    vec![
        vec![1, 5, 9, 2, 6, 5, 3, 5, 8],
        vec![9, 7, 9, 3, 2, 3, 8, 4, 6],
        vec![2, 6, 4, 3, 3, 8],
    ]
}

fn mask(len: usize, at: usize) -> Vec<f32> {
    (0..len).map(|i| if i == at { 1.0 } else { 0.0 }).collect()
}

/// `x·(1 − m) + v·m` for a 0/1 mask `m` over axis 2, broadcast over the rest: replacement by
/// arithmetic, independent of the library's slicing.
fn masked(x: &Tensor, m: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
    let keep = m.affine(-1.0, 1.0)?;
    x.broadcast_mul(&keep)?.broadcast_add(&v.broadcast_mul(m)?)
}

/// The mean metric and loss of a model run one prompt at a time with `hooks(prompt)` (the
/// library batches; this does not).
fn by_hand<'a>(
    m: &Model,
    pairs: &'a [TokenPair],
    text: &'a [Vec<u32>],
    hooks: impl Fn(&'a [u32], Option<&'a [u32]>) -> Hooks<'a>,
) -> (f64, f64) {
    let run = |tokens: &'a [u32], corrupt: Option<&'a [u32]>| {
        let t = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut h = hooks(tokens, corrupt);
        m.run_with_hooks(&t, &mut h)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    };
    let metric = pairs
        .iter()
        .map(|p| {
            let logits = run(&p.clean, Some(&p.corrupt));
            let last = logits.last().unwrap();
            (last[p.answer as usize] - last[p.wrong as usize]) as f64
        })
        .sum::<f64>()
        / pairs.len() as f64;
    let (mut nll, mut n) = (0.0, 0);
    for s in text {
        let logits = run(s, None);
        for (pos, row) in logits.iter().enumerate().take(s.len() - 1) {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            nll += max + z.ln() - row[s[pos + 1] as usize] as f64;
            n += 1;
        }
    }
    (metric, nll / n as f64)
}

fn data<'a>(pairs: &'a [TokenPair], text: &'a [Vec<u32>], metric: &'a Metric) -> Data<'a> {
    Data {
        pairs: Some((pairs, metric)),
        text: Some(text),
    }
}

fn assert_near(what: &str, a: f64, b: f64) {
    assert!(
        (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
        "{what}: {a} vs {b} (by hand)"
    );
}

fn check(what: &str, e: &Effect, (metric, loss): (f64, f64)) {
    assert_near(&format!("{what} metric"), e.metric.unwrap().ablated, metric);
    assert_near(&format!("{what} loss"), e.loss.unwrap().ablated, loss);
}

/// Builds the hand-made hooks of one run.
type MakeHooks = Box<dyn Fn() -> Hooks<'static>>;

#[test]
fn zero_ablation_equals_zeroing_by_hand() {
    let (pairs, text, metric) = (pairs(), text(), Metric::logit_diff());
    for (name, m) in models() {
        let c = m.config().clone();
        let d = data(&pairs, &text, &metric);
        let clean = by_hand(&m, &pairs, &text, |_, _| Hooks::new());
        let none = ablate(&m, &[], &Method::Zero, None, d).unwrap();
        check(&format!("{name}: nothing"), &none, clean);
        let (mc, lc) = (none.metric.unwrap(), none.loss.unwrap());
        assert_near(name, mc.clean, clean.0);
        assert_near(name, lc.clean, clean.1);
        assert_eq!(
            (mc.change, lc.change),
            (0.0, 0.0),
            "{name}: ablating nothing"
        );

        let zero = |x: &Tensor| x.zeros_like();
        let head_mask =
            Tensor::from_vec(mask(c.n_heads, 2), (1, 1, c.n_heads, 1), &Device::Cpu).unwrap();
        let neuron_mask =
            Tensor::from_vec(mask(c.d_mlp, 17), (1, 1, c.d_mlp), &Device::Cpu).unwrap();
        let cases: Vec<(Vec<Target>, MakeHooks)> = vec![
            (
                vec![Target::Head { layer: 1, head: 2 }],
                Box::new({
                    let hm = head_mask.clone();
                    move || {
                        let hm = hm.clone();
                        Hooks::new().with_hook(HookPoint::block(1, BlockHook::Z), move |x, _| {
                            Ok(Some(masked(x, &hm, &zero(x)?)?))
                        })
                    }
                }),
            ),
            (
                vec![
                    Target::Neuron {
                        layer: 0,
                        neuron: 17,
                    },
                    Target::Attn { layer: 1 },
                ],
                Box::new({
                    let nm = neuron_mask.clone();
                    move || {
                        let nm = nm.clone();
                        Hooks::new()
                            .with_hook(HookPoint::block(0, BlockHook::MlpPost), move |x, _| {
                                Ok(Some(masked(x, &nm, &zero(x)?)?))
                            })
                            .with_hook(HookPoint::block(1, BlockHook::AttnOut), |x, _| {
                                Ok(Some(x.zeros_like()?))
                            })
                    }
                }),
            ),
            (
                vec![Target::Mlp { layer: 0 }],
                Box::new(|| {
                    Hooks::new().with_hook(HookPoint::block(0, BlockHook::MlpOut), |x, _| {
                        Ok(Some(x.zeros_like()?))
                    })
                }),
            ),
        ];
        for (targets, hooks) in &cases {
            let e = ablate(&m, targets, &Method::Zero, None, d).unwrap();
            let hand = by_hand(&m, &pairs, &text, |_, _| hooks());
            check(&format!("{name} {targets:?}"), &e, hand);
            assert!(
                e.metric.unwrap().change.abs() > 1e-3 && e.loss.unwrap().change.abs() > 1e-4,
                "{name} {targets:?} changes nothing: {e:?}"
            );
        }
    }
}

#[test]
fn mean_ablation_uses_the_mean_over_every_reference_position() {
    let (pairs, text, metric) = (pairs(), text(), Metric::logit_diff());
    let reference = vec![vec![4u32, 8, 15, 16], vec![23, 4, 2, 11, 9, 30]];
    for (name, m) in models() {
        let c = m.config().clone();
        // The means by hand: every position of both sequences counts once.
        let (z, post) = (
            HookPoint::block(0, BlockHook::Z),
            HookPoint::block(1, BlockHook::MlpPost),
        );
        let (mut z_sum, mut post_sum) = (
            Tensor::zeros((c.n_heads, c.d_head), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros(c.d_mlp, DType::F32, &Device::Cpu).unwrap(),
        );
        for s in &reference {
            let t = Tensor::new(s.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let (_, cache) = m.run_with_cache(&t, |p| p == z || p == post).unwrap();
            z_sum = (z_sum + cache.get(z).unwrap().squeeze(0).unwrap().sum(0).unwrap()).unwrap();
            post_sum =
                (post_sum + cache.get(post).unwrap().squeeze(0).unwrap().sum(0).unwrap()).unwrap();
        }
        let z_mean = (z_sum / 10.0)
            .unwrap()
            .reshape((1, 1, c.n_heads, c.d_head))
            .unwrap();
        let post_mean = (post_sum / 10.0).unwrap().reshape((1, 1, c.d_mlp)).unwrap();
        let hm = Tensor::from_vec(mask(c.n_heads, 3), (1, 1, c.n_heads, 1), &Device::Cpu).unwrap();
        let nm = Tensor::from_vec(mask(c.d_mlp, 40), (1, 1, c.d_mlp), &Device::Cpu).unwrap();
        let hand = by_hand(&m, &pairs, &text, |_, _| {
            let (hm, nm, zm, pm) = (hm.clone(), nm.clone(), z_mean.clone(), post_mean.clone());
            Hooks::new()
                .with_hook(z, move |x, _| Ok(Some(masked(x, &hm, &zm)?)))
                .with_hook(post, move |x, _| Ok(Some(masked(x, &nm, &pm)?)))
        });
        let targets = [
            Target::Head { layer: 0, head: 3 },
            Target::Neuron {
                layer: 1,
                neuron: 40,
            },
        ];
        let method = Method::Mean(Reference::Sequences(reference.clone()));
        let e = ablate(&m, &targets, &method, None, data(&pairs, &text, &metric)).unwrap();
        check(name, &e, hand);
        assert!(e.metric.unwrap().change.abs() > 1e-3, "{name}: {e:?}");
    }
}

#[test]
fn mean_over_the_prompt_itself_at_one_position_changes_nothing() {
    let metric = Metric::logit_diff();
    let one = [pair(&[9], &[4], 7, 21)];
    let longer = [pair(&[9, 3, 14, 15, 22, 6], &[4, 3, 14, 15, 22, 6], 7, 21)];
    let targets = [
        Target::Head { layer: 0, head: 1 },
        Target::Neuron {
            layer: 1,
            neuron: 3,
        },
        Target::Mlp { layer: 0 },
        Target::Attn { layer: 1 },
    ];
    let method = Method::Mean(Reference::CleanPrompts);
    for (name, m) in models() {
        let measure = |pairs: &[TokenPair]| {
            let d = Data {
                pairs: Some((pairs, &metric)),
                text: None,
            };
            ablate(&m, &targets, &method, None, d).unwrap()
        };
        let e = measure(&one);
        // One position: its mean is itself, so nothing is replaced by anything different.
        assert_eq!(e.metric.unwrap().change, 0.0, "{name}: {e:?}");
        assert!(e.loss.is_none());
        // Over six positions the mean differs from each position's own value.
        let e = measure(&longer);
        assert!(e.metric.unwrap().change.abs() > 1e-3, "{name}: {e:?}");
    }
}

#[test]
fn resampling_from_the_corrupt_prompt_patches_its_activations() {
    let (pairs, metric) = (pairs(), Metric::logit_diff());
    for (name, m) in models() {
        let c = m.config().clone();
        let (z, out) = (
            HookPoint::block(0, BlockHook::Z),
            HookPoint::block(1, BlockHook::MlpOut),
        );
        let hm = Tensor::from_vec(mask(c.n_heads, 1), (1, 1, c.n_heads, 1), &Device::Cpu).unwrap();
        let hand = by_hand(&m, &pairs, &[], |_, corrupt| {
            let t = Tensor::new(corrupt.unwrap(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let (_, cache) = m.run_with_cache(&t, |p| p == z || p == out).unwrap();
            let (zc, oc, hm) = (
                cache.get(z).unwrap().clone(),
                cache.get(out).unwrap().clone(),
                hm.clone(),
            );
            Hooks::new()
                .with_hook(z, move |x, _| Ok(Some(masked(x, &hm, &zc)?)))
                .with_hook(out, move |_, _| Ok(Some(oc.clone())))
        });
        let targets = [Target::Head { layer: 0, head: 1 }, Target::Mlp { layer: 1 }];
        let method = Method::Resample(Source::Corrupt);
        let d = Data {
            pairs: Some((&pairs, &metric)),
            text: None,
        };
        let e = ablate(&m, &targets, &method, None, d).unwrap();
        assert_near(name, e.metric.unwrap().ablated, hand.0);
        assert!(e.metric.unwrap().change.abs() > 1e-3, "{name}: {e:?}");
        // A corrupt prompt equal to the clean one changes nothing.
        let same: Vec<TokenPair> = pairs
            .iter()
            .map(|p| pair(&p.clean, &p.clean, p.answer, p.wrong))
            .collect();
        let d = Data {
            pairs: Some((&same, &metric)),
            text: None,
        };
        let e = ablate(&m, &targets, &method, None, d).unwrap();
        assert_eq!(e.metric.unwrap().change, 0.0, "{name}");
    }
}

#[test]
fn resampling_from_other_prompts_changes_nothing_when_they_are_all_alike() {
    let metric = Metric::logit_diff();
    let alike = vec![pair(&[3, 14, 15, 9], &[3, 1, 15, 9], 7, 21); 3];
    let unlike = [
        pair(&[3, 14, 15, 9], &[3, 1, 15, 9], 7, 21),
        pair(&[8, 2, 33, 6, 5], &[8, 2, 1, 6, 5], 7, 21),
        pair(&[4, 4, 29, 10, 2], &[4, 4, 1, 10, 2], 7, 21),
    ];
    let text: Vec<Vec<u32>> = vec![vec![5, 6, 7, 8, 9, 10]; 2];
    let targets = [
        Target::Attn { layer: 0 },
        Target::Head { layer: 1, head: 0 },
    ];
    let method = Method::Resample(Source::Other { seed: 3 });
    let (_, m) = models().remove(0);
    let e = ablate(&m, &targets, &method, None, data(&alike, &text, &metric)).unwrap();
    assert_eq!(e.metric.unwrap().change, 0.0);
    assert_eq!(e.loss.unwrap().change, 0.0);
    let e = ablate(&m, &targets, &method, None, data(&unlike, &text, &metric)).unwrap();
    assert!(e.metric.unwrap().change.abs() > 1e-3, "{e:?}");
    // The 5-token prompt is the longest: nothing to resample it from.
    let e = ablate(
        &m,
        &targets,
        &method,
        None,
        data(&unlike[..2], &text, &metric),
    )
    .unwrap_err();
    assert!(e.to_string().contains("prompt 2 (5 tokens)"), "{e}");
}

/// An SAE on `d_model` with `d_sae` latents whose latent 0 never fires (`b_enc = −100`).
fn sae(d_model: usize, d_sae: usize, seed: u64) -> Sae {
    let dev = &Device::Cpu;
    let t = |s: u64, shape: &[usize], std: f64| {
        Tensor::from_vec(normal(seed + s, shape, std), shape, dev).unwrap()
    };
    let mut b_enc = normal(seed + 2, &[d_sae], 0.1);
    b_enc[0] = -100.0;
    let tensors = HashMap::from([
        ("W_enc".to_string(), t(1, &[d_model, d_sae], 0.5)),
        ("b_enc".to_string(), Tensor::new(b_enc, dev).unwrap()),
        ("W_dec".to_string(), t(3, &[d_sae, d_model], 0.5)),
        ("b_dec".to_string(), t(4, &[d_model], 0.1)),
    ]);
    let cfg = DictConfig::new(Architecture::Standard, d_model, d_sae);
    Sae::from_tensors(cfg, tensors, "test").unwrap()
}

#[test]
fn latent_ablation_adds_the_decoded_difference_and_keeps_the_error() {
    let (pairs, text, metric) = (pairs(), text(), Metric::logit_diff());
    for (name, m) in models() {
        let d_model = m.config().d_model;
        let raw = sae(d_model, 24, 100);
        let hook = "blocks.1.hook_resid_pre";
        let s = LatentSae::new(&m, raw.clone(), Some(hook)).unwrap();
        let point = HookPoint::resid_pre(1);
        // The latent most active over the clean prompts.
        let t = Tensor::new(pairs[0].clean.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let (_, cache) = m.run_with_cache(&t, |p| p == point).unwrap();
        let f = raw
            .encode(&cache.get(point).unwrap().squeeze(0).unwrap())
            .unwrap();
        let best = f
            .sum(0)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap() as usize;
        let w_dec = raw.tensor("W_dec").unwrap().clone();
        let hand = by_hand(&m, &pairs, &text, |_, _| {
            let (raw, w_dec) = (raw.clone(), w_dec.clone());
            Hooks::new().with_hook(point, move |x, _| {
                // x − f_best · W_dec[best]
                let rows = x.squeeze(0)?;
                let f = raw
                    .encode(&rows)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let fi = f.narrow(1, best, 1)?; // [p, 1]
                let wi = w_dec.narrow(0, best, 1)?; // [1, d]
                Ok(Some((rows - fi.matmul(&wi)?)?.unsqueeze(0)?))
            })
        });
        let d = data(&pairs, &text, &metric);
        let e = ablate(
            &m,
            &[Target::Latent { latent: best }],
            &Method::Zero,
            Some(&s),
            d,
        )
        .unwrap();
        check(name, &e, hand);
        assert!(e.metric.unwrap().change.abs() > 1e-3, "{name}: {e:?}");
        // A latent that never fires: replacing its zeros by zeros leaves the activation,
        // reconstruction error included, as it was.
        let dead = ablate(
            &m,
            &[Target::Latent { latent: 0 }],
            &Method::Zero,
            Some(&s),
            d,
        )
        .unwrap();
        assert_eq!(dead.metric.unwrap().change, 0.0, "{name}");
        assert_eq!(dead.loss.unwrap().change, 0.0, "{name}");
        // Mean ablation of a latent over the prompt itself at one position changes nothing.
        let one = [pair(&[9], &[4], 7, 21)];
        let d1 = Data {
            pairs: Some((&one, &metric)),
            text: None,
        };
        let mean = Method::Mean(Reference::CleanPrompts);
        let e = ablate(&m, &[Target::Latent { latent: best }], &mean, Some(&s), d1).unwrap();
        assert!(e.metric.unwrap().change.abs() < 1e-5, "{name}: {e:?}");
    }
}

#[test]
fn bad_saes_are_refused() {
    let (_, m) = models().remove(0);
    let d_model = m.config().d_model;
    let mut tensors: HashMap<String, Tensor> = sae(d_model, 8, 5)
        .named_tensors()
        .into_iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let mut w = normal(9, &[8, d_model], 0.5);
    w[5] = f32::NAN;
    tensors.insert(
        "W_dec".into(),
        Tensor::from_vec(w, (8, d_model), &Device::Cpu).unwrap(),
    );
    let nan = Sae::from_tensors(
        DictConfig::new(Architecture::Standard, d_model, 8),
        tensors,
        "t",
    )
    .unwrap();
    let e = LatentSae::new(&m, nan, Some("resid_pre1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("W_dec") && e.contains("NaN"), "{e}");
    let e = LatentSae::new(&m, sae(d_model, 8, 5), Some("blocks.0.mlp.hook_post"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("d_in") && e.contains("64"), "{e}");
    let e = LatentSae::new(&m, sae(d_model, 8, 5), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hook_name"), "{e}");
    let e = LatentSae::new(&m, sae(d_model, 8, 5), Some("resid_pre7"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("resid_pre"), "{e}");
    let s = LatentSae::new(&m, sae(d_model, 8, 5), Some("resid_pre1")).unwrap();
    let e = Target::parse("sae:8", m.config(), Some(&s))
        .unwrap_err()
        .to_string();
    assert!(e.contains("d_sae 8 (0 to 7)"), "{e}");
    assert_eq!(
        Target::parse("SAE:7", m.config(), Some(&s)).unwrap(),
        Target::Latent { latent: 7 }
    );
}

#[test]
fn prompts_of_different_lengths_average_per_prompt_and_rank_matches_ablate() {
    let (pairs, text, metric) = (pairs(), text(), Metric::logit_diff());
    let (_, m) = models().remove(1);
    let targets = [
        Target::Head { layer: 0, head: 0 },
        Target::Mlp { layer: 1 },
        Target::Neuron {
            layer: 0,
            neuron: 9,
        },
    ];
    let method = Method::Mean(Reference::Sequences(text.clone()));
    let together = ablate(&m, &targets, &method, None, data(&pairs, &text, &metric)).unwrap();
    // The same prompts one at a time: the metric is the mean over prompts, not over batches.
    let single: f64 = pairs
        .iter()
        .map(|p| {
            let d = Data {
                pairs: Some((std::slice::from_ref(p), &metric)),
                text: None,
            };
            ablate(&m, &targets, &method, None, d)
                .unwrap()
                .metric
                .unwrap()
                .ablated
        })
        .sum::<f64>()
        / pairs.len() as f64;
    assert_near("per prompt", together.metric.unwrap().ablated, single);
    let mut calls = (0, 0);
    let ranked = rank(
        &m,
        &targets,
        &method,
        None,
        data(&pairs, &text, &metric),
        |done, total| calls = (done, total),
    )
    .unwrap();
    // Two batches of prompts and two of text, all targets of each in one pass.
    assert_eq!(calls, (4 * targets.len(), 4 * targets.len()));
    for (t, r) in targets.iter().zip(&ranked) {
        let alone = ablate(&m, &[*t], &method, None, data(&pairs, &text, &metric)).unwrap();
        assert_eq!(r.targets, vec![*t]);
        assert_near(
            &t.to_string(),
            r.metric.unwrap().ablated,
            alone.metric.unwrap().ablated,
        );
        assert_near(
            &t.to_string(),
            r.loss.unwrap().ablated,
            alone.loss.unwrap().ablated,
        );
    }
}

#[test]
fn bad_input_is_refused() {
    let (pairs, text, metric) = (pairs(), text(), Metric::logit_diff());
    let (_, m) = models().remove(0);
    let t = [Target::Mlp { layer: 0 }];
    let err = |targets: &[Target], method: Method, d: Data| {
        ablate(&m, targets, &method, None, d)
            .unwrap_err()
            .to_string()
    };
    let none = Data::default();
    for (e, needle) in [
        (err(&t, Method::Zero, none), "nothing to measure"),
        (
            err(
                &t,
                Method::Zero,
                Data {
                    pairs: Some((&[], &metric)),
                    text: None,
                },
            ),
            "no prompt pairs",
        ),
        (
            err(
                &t,
                Method::Zero,
                Data {
                    pairs: None,
                    text: Some(&[]),
                },
            ),
            "no held-out text",
        ),
        (
            err(
                &t,
                Method::Zero,
                Data {
                    pairs: None,
                    text: Some(&[vec![1, 2, 3], vec![4]]),
                },
            ),
            "sequence 2 has 1 token(s)",
        ),
        (
            err(
                &t,
                Method::Mean(Reference::CleanPrompts),
                Data {
                    pairs: None,
                    text: Some(&text),
                },
            ),
            "needs prompt pairs",
        ),
        (
            err(
                &t,
                Method::Mean(Reference::Sequences(vec![])),
                data(&pairs, &text, &metric),
            ),
            "no sequences",
        ),
        (
            err(
                &t,
                Method::Resample(Source::Corrupt),
                Data {
                    pairs: Some((&[pair(&[1, 2, 3], &[1, 2], 4, 5)], &metric)),
                    text: None,
                },
            ),
            "needs equal lengths",
        ),
        (
            err(
                &[Target::Head { layer: 2, head: 0 }],
                Method::Zero,
                data(&pairs, &text, &metric),
            ),
            "2 layers (0 to 1)",
        ),
        (
            err(
                &[Target::Latent { latent: 0 }],
                Method::Zero,
                data(&pairs, &text, &metric),
            ),
            "no SAE",
        ),
    ] {
        assert!(e.contains(needle), "expected {needle:?} in {e:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The real default model

fn smollm2() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        scalpel_models::loader::load(scalpel_models::hub::DEFAULT_MODEL, &Device::Cpu).unwrap()
    })
}

const PARAGRAPH: &str = "The history of the city goes back more than two thousand years. It \
    began as a small fishing village on the northern bank of the river, where traders stopped \
    to rest before crossing the mountains. Over the centuries the village grew into a market \
    town, and later into the capital of a large province. Today it is known for its old \
    university, its many bridges and the cathedral that stands at the centre of the old town.";

#[test]
fn smollm2_layers_move_the_loss_and_a_mean_neuron_barely() {
    let lm = smollm2();
    let (m, tok) = (&lm.model, lm.tokenizer().unwrap());
    let text = vec![tok.encode(PARAGRAPH, true).unwrap()];
    let pairs = pairs::tokenize(tok, &pairs::ioi(tok, 4, 1).unwrap()).unwrap();
    let metric = Metric::logit_diff();
    let d = data(&pairs, &text, &metric);
    let mean = Method::Mean(Reference::Sequences(text.clone()));
    let targets = [
        Target::Mlp { layer: 0 },
        Target::Attn { layer: 0 },
        Target::Neuron {
            layer: 5,
            neuron: 100,
        },
    ];
    let ranked = rank(m, &targets, &mean, None, d, |_, _| {}).unwrap();
    let heads: Vec<Target> = (0..m.config().n_heads)
        .map(|head| Target::Head { layer: 0, head })
        .collect();
    let heads = ablate(m, &heads, &mean, None, d).unwrap();
    let loss = |e: &Effect| e.loss.unwrap();
    let (mlp, attn, neuron) = (&ranked[0], &ranked[1], &ranked[2]);
    assert!(
        loss(mlp).clean > 1.0 && loss(mlp).clean < 4.0,
        "a fluent paragraph: {:?}",
        mlp.loss
    );
    assert!(
        mlp.metric.unwrap().clean > 0.5,
        "SmolLM2 prefers the indirect object: {:?}",
        mlp.metric
    );
    assert!(loss(mlp).change > 0.5, "{mlp:?}");
    assert!(loss(attn).change > 0.03, "{attn:?}");
    // The attention output is linear in z and SmolLM2 has no output bias: the mean of every
    // head's z is the mean of the layer's output.
    assert!(
        (loss(&heads).ablated - loss(attn).ablated).abs() < 1e-3,
        "{heads:?} vs {attn:?}"
    );
    assert!(loss(neuron).change.abs() < 0.02, "{neuron:?}");
    assert!(
        loss(neuron).change != 0.0,
        "the neuron is not ablated at all"
    );
}

#[test]
fn smollm2_zero_ablating_a_grouped_query_head_equals_zeroing_it_by_hand() {
    let lm = smollm2();
    let (m, tok) = (&lm.model, lm.tokenizer().unwrap());
    let c = m.config();
    assert!(c.n_kv_heads < c.n_heads, "SmolLM2 shares keys and values");
    let text = vec![tok.encode(PARAGRAPH, true).unwrap()];
    let pairs = pairs::tokenize(tok, &pairs::ioi(tok, 3, 2).unwrap()).unwrap();
    let metric = Metric::logit_diff();
    // Head 4 shares its key/value head with heads 3 and 5, which must stay as they are.
    let hm = Tensor::from_vec(mask(c.n_heads, 4), (1, 1, c.n_heads, 1), &Device::Cpu).unwrap();
    let hand = by_hand(m, &pairs, &text, |_, _| {
        let hm = hm.clone();
        Hooks::new().with_hook(HookPoint::block(3, BlockHook::Z), move |x, _| {
            Ok(Some(masked(x, &hm, &x.zeros_like()?)?))
        })
    });
    let target = [Target::Head { layer: 3, head: 4 }];
    let e = ablate(
        m,
        &target,
        &Method::Zero,
        None,
        data(&pairs, &text, &metric),
    )
    .unwrap();
    check("SmolLM2 L3H4", &e, hand);
    assert!(e.loss.unwrap().change.abs() > 1e-4, "{e:?}");
}
