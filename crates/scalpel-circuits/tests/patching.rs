//! Activation and attribution patching: every sweep against plain PyTorch forward hooks on
//! Hugging Face `transformers` (fixtures from scripts/make_patching_fixtures.py), and the
//! identities that hold for any model.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use scalpel_circuits::metric::Metric;
use scalpel_circuits::pairs::TokenPair;
use scalpel_circuits::patching::{attribute, Direction, Patch, Patcher, Sweep};
use scalpel_core::{BlockHook, HookPoint};
use scalpel_models::transformer::Model;

mod common;

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

struct Fixture {
    model: Model,
    pairs: Vec<TokenPair>,
    t: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let dir = repo_path(&format!("../scalpel-models/tests/fixtures/models/{name}"));
        let (model, _) = scalpel_models::loader::load_hf_dir(&dir, &Device::Cpu).unwrap();
        let t = candle_core::safetensors::load(
            repo_path(&format!("tests/fixtures/patching/{name}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let ids = |k: &str| -> Vec<Vec<u32>> {
            t[k].to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
        };
        let one =
            |k: &str| -> Vec<u32> { t[k].to_dtype(DType::U32).unwrap().to_vec1::<u32>().unwrap() };
        let (clean, corrupt, answer, wrong) =
            (ids("clean"), ids("corrupt"), one("answer"), one("wrong"));
        let pairs = (0..clean.len())
            .map(|i| TokenPair {
                clean: clean[i].clone(),
                corrupt: corrupt[i].clone(),
                answer: answer[i],
                wrong: wrong[i],
            })
            .collect();
        Fixture { model, pairs, t }
    }

    fn values(&self, key: &str) -> Vec<f64> {
        self.t[key]
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    }

    fn scalar(&self, key: &str) -> f64 {
        self.values(key)[0]
    }

    fn shape(&self, key: &str) -> Vec<usize> {
        self.t[key].dims().to_vec()
    }
}

fn assert_close(what: &str, ours: &[f64], want: &[f64], abs: f64, rel: f64) {
    assert_eq!(ours.len(), want.len(), "{what}: length");
    for (i, (a, b)) in ours.iter().zip(want).enumerate() {
        assert!(
            (a - b).abs() <= abs + rel * b.abs(),
            "{what}[{i}]: ours {a}, reference {b}"
        );
    }
}

#[test]
fn every_sweep_matches_pytorch_hooks_on_transformers() {
    for name in ["llama", "gpt2"] {
        let f = Fixture::load(name);
        let p = Patcher::new(&f.model, &f.pairs, &Metric::logit_diff()).unwrap();
        assert_close(
            &format!("{name} clean/corrupt"),
            &[p.clean_metric(), p.corrupt_metric()],
            &[f.scalar("metric.clean"), f.scalar("metric.corrupt")],
            1e-4,
            0.0,
        );
        for dir in [Direction::Denoise, Direction::Noise] {
            let base = match dir {
                Direction::Denoise => p.corrupt_metric(),
                Direction::Noise => p.clean_metric(),
            };
            let attr = p.attribution(&Sweep::ALL, dir).unwrap();
            // The lean attribution pass (no exact-patching caches) gives the same grids and
            // the same unpatched metrics.
            let lean =
                attribute(&f.model, &f.pairs, &Metric::logit_diff(), &Sweep::ALL, dir).unwrap();
            assert_close(
                &format!("{name} lean clean/corrupt"),
                &[lean.clean, lean.corrupt],
                &[p.clean_metric(), p.corrupt_metric()],
                1e-5,
                0.0,
            );
            for (a, b) in attr.iter().zip(&lean.grids) {
                assert_eq!((a.sweep, &a.shape), (b.sweep, &b.shape));
                let key = format!("{name} lean {}", a.sweep.name());
                assert_close(&key, &b.values, &a.values, 1e-5, 0.0);
                assert_close(&key, &b.scores, &a.scores, 1e-4, 0.0);
            }
            for (sweep, a) in Sweep::ALL.into_iter().zip(&attr) {
                let key = format!("{}.{}", dir.name(), sweep.name());
                let g = p.exact(sweep, dir, |_, _| {}).unwrap();
                assert_eq!(g.shape, f.shape(&key), "{name} {key} shape");
                assert_close(
                    &format!("{name} {key}"),
                    &g.values,
                    &f.values(&key),
                    1e-4,
                    0.0,
                );
                // The normalised score uses the unpatched metrics.
                let s =
                    (g.values[1] - p.corrupt_metric()) / (p.clean_metric() - p.corrupt_metric());
                assert!((g.scores[1] - s).abs() < 1e-12);

                let est: Vec<f64> = a.values.iter().map(|v| v - base).collect();
                assert_eq!(a.shape, g.shape);
                assert_close(
                    &format!("{name} attr.{key}"),
                    &est,
                    &f.values(&format!("attr.{key}")),
                    1e-4,
                    1e-3,
                );
            }
        }
        // A softmax metric: relative agreement (the probabilities are tiny).
        let pp = Patcher::new(&f.model, &f.pairs, &Metric::prob()).unwrap();
        let g = pp
            .exact(Sweep::ResidPre, Direction::Denoise, |_, _| {})
            .unwrap();
        assert_close(
            &format!("{name} denoise_prob.resid_pre"),
            &g.values,
            &f.values("denoise_prob.resid_pre"),
            0.0,
            2e-3,
        );
    }
}

/// Random pairs on a tiny model: `len` tokens, differing from position `first_diff` on.
fn random_pairs(n: usize, len: usize, first_diff: usize, seed: u64) -> Vec<TokenPair> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let clean: Vec<u32> = (0..len).map(|_| rng.gen_range(0..37)).collect();
            let mut corrupt = clean.clone();
            for t in corrupt.iter_mut().skip(first_diff) {
                if rng.gen_bool(0.5) {
                    *t = (*t + rng.gen_range(1..37)) % 37;
                }
            }
            corrupt[first_diff] = (clean[first_diff] + 1) % 37;
            let answer = rng.gen_range(0..37);
            TokenPair {
                clean,
                corrupt,
                answer,
                wrong: (answer + 5) % 37,
            }
        })
        .collect()
}

#[test]
fn nothing_patched_scores_zero_and_the_whole_residual_scores_one() {
    for (name, m) in common::models() {
        let pairs = random_pairs(3, 7, 2, 11);
        let p = Patcher::new(&m, &pairs, &Metric::logit_diff()).unwrap();
        let none = p.patched_score(Direction::Denoise, &[]).unwrap();
        // The patched runs take the plain forward path, the cached runs the KV-cache path.
        assert!(none.abs() < 1e-5, "{name}: patching nothing: {none}");
        let last = m.config().n_layers - 1;
        for l in [0, last] {
            let all = p
                .patched_score(Direction::Denoise, &[Patch::all(HookPoint::resid_pre(l))])
                .unwrap();
            assert!(
                (all - 1.0).abs() < 1e-4,
                "{name}: whole resid_pre {l}: {all}"
            );
            let all = p
                .patched_score(Direction::Noise, &[Patch::all(HookPoint::resid_pre(l))])
                .unwrap();
            assert!(
                all.abs() < 1e-4,
                "{name}: noising the whole resid_pre {l}: {all}"
            );
        }
    }
}

/// The fast sweeps (started at the patched block, positions before the patch skipped, variants
/// batched, a few unembedding rows) against plain full forward passes with one hook.
#[test]
fn fast_sweeps_equal_plain_patched_forwards() {
    for (name, m) in common::models() {
        // Two token lengths: the head sweeps average over both groups.
        let mut pairs = random_pairs(2, 7, 2, 5);
        pairs.extend(random_pairs(2, 5, 1, 6));
        let metric = Metric::parse("logprob(answer) - logit(wrong) / 2", None).unwrap();
        let p = Patcher::new(&m, &pairs, &metric).unwrap();
        let c = m.config();
        for dir in [Direction::Denoise, Direction::Noise] {
            for sweep in [Sweep::ZHead, Sweep::KHead, Sweep::PatternHead] {
                let g = p.exact(sweep, dir, |_, _| {}).unwrap();
                let nh = g.shape[1];
                for l in 0..c.n_layers {
                    for h in 0..nh {
                        let want = p
                            .patched_metric(
                                dir,
                                &[Patch {
                                    point: HookPoint::Block(l, sweep.hook()),
                                    positions: None,
                                    head: Some(h),
                                }],
                            )
                            .unwrap();
                        let got = g.values[l * nh + h];
                        assert!(
                            (got - want).abs() < 2e-4,
                            "{name} {} {} L{l}H{h}: {got} vs {want}",
                            dir.name(),
                            sweep.name()
                        );
                    }
                }
            }
        }
        // Position sweeps need one length.
        let err = p.exact(Sweep::ResidPre, Direction::Denoise, |_, _| {});
        let msg = err.unwrap_err().to_string();
        assert!(
            msg.contains("same length") && msg.contains("7 tokens"),
            "{msg}"
        );

        let pairs = random_pairs(3, 7, 2, 8);
        let p = Patcher::new(&m, &pairs, &metric).unwrap();
        for sweep in [
            Sweep::ResidPre,
            Sweep::AttnOut,
            Sweep::MlpOut,
            Sweep::ZHeadPos,
        ] {
            if sweep == Sweep::MlpOut && c.mlp.is_none() {
                let e = p.exact(sweep, Direction::Denoise, |_, _| {}).unwrap_err();
                assert!(e.to_string().contains("does not have"), "{e}");
                continue;
            }
            let g = p.exact(sweep, Direction::Denoise, |_, _| {}).unwrap();
            let mut runs = 0;
            let g2 = p
                .exact(sweep, Direction::Denoise, |done, total| {
                    runs = done;
                    assert!(done <= total);
                })
                .unwrap();
            assert_eq!(g.values, g2.values, "deterministic");
            assert_eq!(runs, g.runs);
            for l in 0..c.n_layers {
                for pos in 0..7 {
                    let heads: Vec<Option<usize>> = if sweep == Sweep::ZHeadPos {
                        (0..c.n_heads).map(Some).collect()
                    } else {
                        vec![None]
                    };
                    for (hi, head) in heads.into_iter().enumerate() {
                        let want = p
                            .patched_metric(
                                Direction::Denoise,
                                &[Patch {
                                    point: HookPoint::Block(l, sweep.hook()),
                                    positions: Some(vec![pos]),
                                    head,
                                }],
                            )
                            .unwrap();
                        let idx = if sweep == Sweep::ZHeadPos {
                            vec![l, hi, pos]
                        } else {
                            vec![l, pos]
                        };
                        let flat = idx.iter().zip(&g.shape).fold(0, |a, (i, n)| a * n + i);
                        let got = g.values[flat];
                        assert!(
                            (got - want).abs() < 2e-4,
                            "{name} {} {idx:?}: {got} vs {want}",
                            sweep.name()
                        );
                        if pos < 2 {
                            assert_eq!(got, p.corrupt_metric(), "identical prefix");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn attribution_equals_exact_patching_where_the_metric_is_linear() {
    // No normaliser anywhere: the logit difference is linear in the last block's MLP output and
    // in the last block's heads when the block has no MLP after them.
    let (name, m) = common::models().remove(2);
    assert_eq!(name, "no norm");
    let pairs = random_pairs(3, 6, 1, 21);
    let metric = Metric::logit_diff();
    assert!(metric.is_linear());
    let p = Patcher::new(&m, &pairs, &metric).unwrap();
    let last = m.config().n_layers - 1;
    for dir in [Direction::Denoise, Direction::Noise] {
        let exact = p.exact(Sweep::MlpOut, dir, |_, _| {}).unwrap();
        let attr = &p.attribution(&[Sweep::MlpOut], dir).unwrap()[0];
        let seq = exact.shape[1];
        for pos in 0..seq {
            let (e, a) = (
                exact.values[last * seq + pos],
                attr.values[last * seq + pos],
            );
            assert!(
                (e - a).abs() < 1e-4,
                "{} pos {pos}: exact {e}, attribution {a}",
                dir.name()
            );
        }
        // And not in general: the first block's residual feeds nonlinear layers.
        let exact = p.exact(Sweep::ResidPre, dir, |_, _| {}).unwrap();
        let attr = &p.attribution(&[Sweep::ResidPre], dir).unwrap()[0];
        let gap = exact
            .values
            .iter()
            .zip(&attr.values)
            .map(|(e, a)| (e - a).abs())
            .fold(0.0, f64::max);
        assert!(gap > 2e-4, "attribution is only first order ({gap})");
    }
}

#[test]
fn bad_requests_are_refused_clearly() {
    let (_, m) = common::models().remove(0);
    let metric = Metric::logit_diff();
    let e = Patcher::new(&m, &[], &metric).err().unwrap().to_string();
    assert!(e.contains("no prompt pairs"), "{e}");
    let mut pairs = random_pairs(2, 5, 1, 1);
    pairs[1].corrupt.push(3);
    let e = Patcher::new(&m, &pairs, &metric).err().unwrap().to_string();
    assert!(
        e.contains("pair 2") && e.contains("5 tokens") && e.contains("6"),
        "{e}"
    );
    let mut pairs = random_pairs(2, 5, 1, 1);
    pairs[0].answer = 999;
    let e = Patcher::new(&m, &pairs, &metric).err().unwrap().to_string();
    assert!(e.contains("pair 1") && e.contains("999"), "{e}");
    let e = Sweep::parse("resid_post").unwrap_err().to_string();
    assert!(e.contains("resid_pre") && e.contains("z_head_pos"), "{e}");
    let pairs = random_pairs(2, 5, 1, 1);
    let p = Patcher::new(&m, &pairs, &metric).unwrap();
    let e = p
        .patched_metric(
            Direction::Denoise,
            &[Patch::all(HookPoint::Block(9, BlockHook::ResidPre))],
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("blocks.9.hook_resid_pre"), "{e}");
}

/// Path patching by hand with plain full forward passes: step 1 records the receiver's input
/// with the sender from the source and every later head (and optionally MLP) frozen at base;
/// step 2 patches only that input.
fn path_by_hand(
    m: &Model,
    pairs: &[TokenPair],
    sender: (usize, usize),
    receiver: Option<(usize, usize, BlockHook)>,
    freeze_mlps: bool,
) -> f64 {
    use scalpel_core::Hooks;
    let dev = Device::Cpu;
    let seq = pairs[0].clean.len();
    let rows = |f: &dyn Fn(&TokenPair) -> &Vec<u32>| {
        let flat: Vec<u32> = pairs.iter().flat_map(|p| f(p).clone()).collect();
        Tensor::from_vec(flat, (pairs.len(), seq), &dev).unwrap()
    };
    // Noising: base = clean, source = corrupt.
    let (base, source) = (rows(&|p| &p.clean), rows(&|p| &p.corrupt));
    let c = m.config();
    let all = |_: HookPoint| true;
    let (_, src) = m.run_with_cache(&source, all).unwrap();
    let (_, bas) = m.run_with_cache(&base, all).unwrap();
    let (sl, sh) = sender;
    let head_mask = |heads: usize, h: usize| {
        let mut v = vec![0f32; heads];
        v[h] = 1.0;
        Tensor::from_vec(v, (1, 1, heads, 1), &dev).unwrap()
    };
    let zp = HookPoint::Block(sl, BlockHook::Z);
    let s = src.get(zp).unwrap().clone();
    let mask = head_mask(c.n_heads, sh);
    let mut hooks = Hooks::new().with_hook(zp, move |a, _| {
        Ok(Some((a + (&s - a)?.broadcast_mul(&mask)?)?))
    });
    for l in 0..c.n_layers {
        let mut frozen = vec![];
        if l > sl {
            frozen.push(HookPoint::Block(l, BlockHook::Z));
        }
        if freeze_mlps && l >= sl {
            frozen.push(HookPoint::Block(l, BlockHook::MlpOut));
        }
        for hp in frozen {
            let b = bas.get(hp).unwrap().clone();
            hooks = hooks.with_hook(hp, move |_, _| Ok(Some(b.clone())));
        }
    }
    let logits = match receiver {
        None => m.run_with_hooks(&base, &mut hooks).unwrap(),
        Some((rl, rh, input)) => {
            let rp = HookPoint::Block(rl, input);
            let mut hooks = hooks.with_cache_points([rp]);
            m.run_with_hooks(&base, &mut hooks).unwrap();
            let rec = hooks.cache().get(rp).unwrap().clone();
            let heads = rec.dim(2).unwrap();
            let mask = head_mask(heads, rh * heads / c.n_heads);
            let mut hooks = Hooks::new().with_hook(rp, move |a, _| {
                Ok(Some((a + (&rec - a)?.broadcast_mul(&mask)?)?))
            });
            m.run_with_hooks(&base, &mut hooks).unwrap()
        }
    };
    let last = logits.narrow(1, seq - 1, 1).unwrap().squeeze(1).unwrap();
    let answer: Vec<u32> = pairs.iter().map(|p| p.answer).collect();
    let wrong: Vec<u32> = pairs.iter().map(|p| p.wrong).collect();
    Metric::logit_diff().mean(&last, &answer, &wrong).unwrap()
}

#[test]
fn path_patching_equals_the_two_step_recipe() {
    use scalpel_circuits::patching::Receiver;
    for (name, m) in common::models() {
        let c = m.config().clone();
        let pairs = random_pairs(3, 6, 1, 31);
        let p = Patcher::new(&m, &pairs, &Metric::logit_diff()).unwrap();
        let freezes: &[bool] = if c.mlp.is_some() {
            &[false, true]
        } else {
            &[false]
        };
        for &freeze in freezes {
            let to_logits = p
                .path(&[Receiver::Logits], Direction::Noise, freeze, |_, _| {})
                .unwrap();
            let receiver = Receiver::Head {
                layer: 1,
                head: 1,
                input: BlockHook::K,
            };
            let to_head = p.path(&[receiver], Direction::Noise, freeze, |_, _| {});
            if c.n_layers < 2 {
                let e = to_head.as_ref().err().unwrap().to_string();
                assert!(e.contains("layers 0..1"), "{e}");
            }
            for l in 0..c.n_layers {
                for h in 0..c.n_heads {
                    let want = path_by_hand(&m, &pairs, (l, h), None, freeze);
                    let got = to_logits.values[l * c.n_heads + h];
                    assert!(
                        (got - want).abs() < 2e-4,
                        "{name} L{l}H{h}→logits: {got} vs {want}"
                    );
                    let Ok(to_head) = &to_head else {
                        continue;
                    };
                    assert_eq!(to_head.method, "path to L1H1.k");
                    let want = if l < 1 {
                        path_by_hand(&m, &pairs, (l, h), Some((1, 1, BlockHook::K)), freeze)
                    } else {
                        p.clean_metric()
                    };
                    let got = to_head.values[l * c.n_heads + h];
                    assert!(
                        (got - want).abs() < 2e-4,
                        "{name} L{l}H{h}→L1H1.k: {got} vs {want}"
                    );
                }
            }
        }
    }
    let e = Receiver::parse("L3H2.x").unwrap_err().to_string();
    assert!(e.contains("L9H6.q"), "{e}");
    assert_eq!(
        Receiver::parse("9.6.v").unwrap(),
        Receiver::Head {
            layer: 9,
            head: 6,
            input: BlockHook::V
        }
    );
}
