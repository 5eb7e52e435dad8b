//! The training driver end to end on tiny activation stores: config round trips and
//! validation, exact resume, several dictionaries from one pass, divergence handling.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use scalpel_data::store::{HookMeta, StoreDType, StoreMeta, StoreWriter};
use scalpel_dict::run::{self, BDecInit, DictSpec, Normalization, RunConfig, TrainOverrides};
use scalpel_dict::synthetic::Synthetic;
use scalpel_dict::train::Activation;
use scalpel_dict::{saelens, Architecture};

const CTX: usize = 16;

/// A store with hooks `a` (16 wide: synthetic sparse features), `b` (16: `a` permuted and
/// scaled) and `c` (8: a linear map of `a`), `n_ctx` contexts, 4 per shard. With `poison`, one
/// row of `a` in context `poison` is infinite.
fn make_store(dir: &Path, n_ctx: usize, poison: Option<usize>) {
    let meta = StoreMeta {
        model: "synthetic".into(),
        model_fingerprint: "0".into(),
        hooks: vec![
            HookMeta {
                name: "a".into(),
                d: 16,
            },
            HookMeta {
                name: "b".into(),
                d: 16,
            },
            HookMeta {
                name: "c".into(),
                d: 8,
            },
        ],
        dtype: StoreDType::F32,
        context_size: CTX,
        contexts_per_shard: 4,
        n_tokens: (n_ctx * CTX) as u64,
        corpus: "synthetic corpus".into(),
        corpus_hash: "0".into(),
        packing: serde_json::json!({"prepend_bos": true}),
        exclude_token_ids: Vec::new(),
        seqpos_slice: None,
    };
    let mut w = StoreWriter::create_or_resume(dir, meta).unwrap();
    let mut synth = Synthetic::new(48, 16, 0.08, 7);
    for ctx in 0..n_ctx {
        let mut a = synth.batch(CTX).unwrap().to_vec2::<f32>().unwrap();
        if poison == Some(ctx) {
            a[3][5] = f32::INFINITY;
        }
        let b: Vec<Vec<f32>> = a
            .iter()
            .map(|r| (0..16).map(|j| 2.0 * r[(j * 5) % 16] + 0.5).collect())
            .collect();
        let c: Vec<Vec<f32>> = a
            .iter()
            .map(|r| (0..8).map(|j| r[2 * j] - r[2 * j + 1]).collect())
            .collect();
        let t = |v: Vec<Vec<f32>>| Tensor::new(v, &Device::Cpu).unwrap();
        let tokens: Vec<u32> = (0..CTX as u32).collect();
        w.push(&tokens, &[("a", t(a)), ("b", t(b)), ("c", t(c))])
            .unwrap();
    }
    w.finish().unwrap();
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn dict(name: &str, hook: &str, activation: Activation) -> DictSpec {
    DictSpec {
        name: name.into(),
        hook: hook.into(),
        hook_out: None,
        activation,
        d_sae: 64,
        k: 4,
        skip: false,
        d_in: None,
        train: TrainOverrides::default(),
    }
}

/// 20 steps of 32 rows over a 10-context (160-row) store: four passes, resumed mid-pass.
fn config(store: &Path, out: &Path, dicts: Vec<DictSpec>) -> RunConfig {
    let mut cfg = RunConfig {
        out: out.to_path_buf(),
        tokens: 640,
        batch_size: 32,
        seed: 3,
        lr_warm_up_steps: 3,
        lr_decay_steps: 5,
        l1_warm_up_steps: 4,
        init_sample_rows: 100,
        normalize_activations: Normalization::ExpectedAverageOnlyIn,
        log_every_steps: 2,
        dict: dicts,
        ..RunConfig::default()
    };
    cfg.data.store = Some(store.to_path_buf());
    cfg.data.shuffle_buffer_shards = 2;
    cfg.train.lr = Some(1e-3);
    cfg.train.k_aux = Some(8);
    cfg.train.dead_window = Some(64);
    cfg
}

fn quiet(_: &run::Progress) -> ControlFlow<()> {
    ControlFlow::Continue(())
}

/// Every file under `dir`, relative path -> bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The files that must be bit-identical between two runs into different `out`s (the run
/// config and the checkpoint state name `out`).
fn comparable(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    files(dir)
        .into_iter()
        .filter(|(k, _)| !k.ends_with("run.toml") && !k.ends_with("state.json"))
        .collect()
}

#[test]
fn config_defaults_round_trip_through_toml() {
    let cfg = RunConfig::default();
    assert_eq!(RunConfig::from_toml(&cfg.to_toml()).unwrap(), cfg);
    assert_eq!(RunConfig::from_toml("").unwrap(), cfg);
    let full = RunConfig::from_toml(RunConfig::default_toml()).unwrap();
    assert_eq!(full.batch_size, 4096);
    assert_eq!(full.dict[0].activation, Activation::TopK);
    assert_eq!(RunConfig::from_toml(&full.to_toml()).unwrap(), full);
    let mut tc = full.clone();
    tc.dict[0].hook_out = Some("c".into());
    tc.dict[0].train.lr = Some(0.5);
    tc.train.sparsity_coef = Some(3.0);
    assert_eq!(RunConfig::from_toml(&tc.to_toml()).unwrap(), tc);
}

#[test]
fn validation_errors_name_the_field() {
    let root = scratch("validate");
    let store = root.join("store");
    make_store(&store, 4, None);
    let base = config(
        &store,
        &root.join("out"),
        vec![dict("x", "a", Activation::TopK)],
    );
    let err = |f: &dyn Fn(&mut RunConfig)| {
        let mut cfg = base.clone();
        f(&mut cfg);
        run::train(&cfg, &mut quiet).unwrap_err().to_string()
    };
    let e = err(&|c| c.dict[0].k = 65);
    assert!(
        e.contains("dict.x.k") && e.contains("65") && e.contains("64"),
        "{e}"
    );
    let e = err(&|c| c.dict[0].train.lr = Some(0.0));
    assert!(e.contains("dict.x.train.lr"), "{e}");
    let e = err(&|c| c.train.lr = Some(-1.0));
    assert!(e.contains("train.lr"), "{e}");
    let e = err(&|c| c.dict[0].train.beta1 = Some(1.5));
    assert!(e.contains("dict.x.beta1"), "{e}");
    let e = err(&|c| c.batch_size = 0);
    assert!(e.contains("batch_size"), "{e}");
    let e = err(&|c| c.dict[0].hook = "blocks.9.hook_resid_post".into());
    assert!(
        e.contains("dict.x.hook") && e.contains("blocks.9.hook_resid_post") && e.contains("\"c\""),
        "the error lists the store's hooks: {e}"
    );
    let e = err(&|c| c.dict[0].d_in = Some(32));
    assert!(
        e.contains("dict.x.d_in") && e.contains("32") && e.contains("16"),
        "{e}"
    );
    let e = err(&|c| c.dict[0].skip = true);
    assert!(e.contains("dict.x.hook_out"), "{e}");
    let e = err(&|c| c.dict.push(dict("x", "b", Activation::Relu)));
    assert!(e.contains("dict.x.name"), "{e}");
    let e = err(&|c| c.data.store = None);
    assert!(e.contains("`data`"), "{e}");
    let e = RunConfig::from_toml("tokens = 5\nbatch_sise = 3\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("batch_sise") && e.contains("batch_size"), "{e}");
    let e =
        RunConfig::from_toml("tokens = 5\n[[dict]]\nname = \"x\"\nhook = \"a\"\nd_sae = \"big\"\n")
            .unwrap_err()
            .to_string();
    assert!(e.contains("`dict.d_sae`") && e.contains("line 5"), "{e}");
    // Nothing was written by any of them.
    assert!(!root.join("out").exists());
}

#[test]
fn geometric_median_hand_case() {
    // The median of a point set's convex corners plus its centre is the centre (its unit
    // vectors to the corners cancel), whatever their distances.
    let rows = vec![
        vec![1.0, 1.0],
        vec![-5.0, 1.0],
        vec![1.0, 3.0],
        vec![11.0, 1.0],
        vec![1.0, -1.0],
    ];
    let m = run::geometric_median(&rows, 100);
    assert!(
        (m[0] - 1.0).abs() < 1e-4 && (m[1] - 1.0).abs() < 1e-4,
        "{m:?}"
    );
    assert_eq!(run::mean(&rows), vec![1.8, 1.0]);
}

#[test]
fn an_interrupted_and_resumed_run_is_bit_identical_to_a_straight_one() {
    let root = scratch("resume");
    let store = root.join("store");
    make_store(&store, 10, None);
    let dicts = || {
        let mut tc = dict("tc", "a", Activation::JumpRelu);
        tc.hook_out = Some("c".into());
        tc.skip = true;
        vec![
            dict("topk", "a", Activation::TopK),
            dict("batchtopk", "b", Activation::BatchTopK),
            tc,
        ]
    };
    let straight = config(&store, &root.join("straight"), dicts());
    let s = run::train(&straight, &mut quiet).unwrap();
    assert!(s.finished && s.steps == 20 && s.tokens == 640 && s.resumed_from_tokens.is_none());

    let mut cfg = config(&store, &root.join("resumed"), dicts());
    cfg.checkpoint_every_tokens = 96;
    // Killed right after the checkpoint at step 9 (288 tokens, inside the second pass).
    let mut stop = |p: &run::Progress| {
        if p.checkpointed && p.steps == 9 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let s = run::train(&cfg, &mut stop).unwrap();
    assert!(!s.finished && s.steps == 9);
    assert!(!root.join("resumed/topk").exists());
    let s = run::train(&cfg, &mut quiet).unwrap();
    assert_eq!(s.resumed_from_tokens, Some(288));
    assert!(s.finished && s.steps == 20);

    let a = comparable(&root.join("straight"));
    let b = comparable(&root.join("resumed"));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.contains_key("topk/sae_weights.safetensors"));
    assert!(a.contains_key("checkpoints/tc/training_log.jsonl"));
    let differ: Vec<&String> = a
        .iter()
        .filter(|(k, v)| !k.ends_with(".jsonl") && *v != &b[*k])
        .map(|(k, _)| k)
        .collect();
    assert!(
        differ.is_empty(),
        "differ between the straight and the resumed run: {differ:?}"
    );
    // The logged stats are sums over the batch whose order may vary between threads: equal to
    // rounding.
    for (k, v) in a.iter().filter(|(k, _)| k.ends_with(".jsonl")) {
        let rows = |bytes: &[u8]| -> Vec<run::LogRow> {
            String::from_utf8_lossy(bytes)
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        };
        let (ra, rb) = (rows(v), rows(&b[k]));
        assert_eq!(ra.len(), rb.len(), "{k}");
        for (x, y) in ra.iter().zip(&rb) {
            assert_eq!(
                (x.step, x.tokens, x.lr, x.l0),
                (y.step, y.tokens, y.lr, y.l0),
                "{k}"
            );
            for (p, q) in [
                (x.loss, y.loss),
                (x.mse, y.mse),
                (x.explained_variance, y.explained_variance),
            ] {
                assert!((p - q).abs() <= 1e-9 * p.abs().max(1.0), "{k}: {p} vs {q}");
            }
        }
    }

    // The output is a SAELens dictionary with the run's metadata and the factor folded in.
    let sae = saelens::load(&root.join("straight/tc"), &Device::Cpu).unwrap();
    assert_eq!(sae.cfg.architecture, Architecture::JumpreluSkipTranscoder);
    assert_eq!(sae.cfg.d_out, Some(8));
    let m = &sae.cfg.metadata;
    assert_eq!(m.hook_name.as_deref(), Some("a"));
    assert_eq!(m.hook_name_out.as_deref(), Some("c"));
    assert_eq!(m.context_size, Some(CTX));
    assert_eq!(m.prepend_bos, Some(true));
    assert_eq!(m.dataset_path.as_deref(), Some("synthetic corpus"));
    assert_eq!(m.model_name.as_deref(), Some("synthetic"));
    assert!(m
        .sae_lens_training_version
        .as_deref()
        .unwrap()
        .starts_with("scalpel"));
    assert!(m.extra["norm_scaling_factor"].as_f64().unwrap() > 0.0);
    assert!(sae.sparsity.is_some());
    let log = std::fs::read_to_string(root.join("straight/topk/training_log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 10);

    // A changed config does not resume from the checkpoint.
    let mut other = cfg.clone();
    other.dict[0].d_sae = 32;
    let e = run::train(&other, &mut quiet).unwrap_err().to_string();
    assert!(e.contains("`dict`") && e.contains("different run"), "{e}");
}

#[test]
fn dictionaries_trained_together_equal_each_trained_alone() {
    let root = scratch("multi");
    let store = root.join("store");
    make_store(&store, 8, None);
    let mut tc = dict("tc", "a", Activation::TopK);
    tc.hook_out = Some("c".into());
    let mut relu = dict("relu", "b", Activation::Relu);
    relu.train.sparsity_coef = Some(0.1);
    let all = vec![dict("sae_a", "a", Activation::TopK), relu, tc];
    let together = config(&store, &root.join("together"), all.clone());
    run::train(&together, &mut quiet).unwrap();
    let joint = comparable(&root.join("together"));
    for d in all {
        let name = d.name.clone();
        let alone = config(&store, &root.join(&name), vec![d]);
        run::train(&alone, &mut quiet).unwrap();
        let single = comparable(&root.join(&name));
        for file in [
            "sae_weights.safetensors",
            "sparsity.safetensors",
            "cfg.json",
        ] {
            let key = format!("{name}/{file}");
            assert!(
                single[&key] == joint[&key],
                "{key} differs when trained with others"
            );
        }
    }
}

#[test]
fn a_diverging_run_stops_naming_the_dictionary_and_keeps_the_last_checkpoint() {
    let root = scratch("diverge");
    let store = root.join("store");
    // One row in 160 is infinite: some batch holds it.
    make_store(&store, 10, Some(6));
    let mut cfg = config(
        &store,
        &root.join("out"),
        vec![dict("poisoned", "a", Activation::TopK)],
    );
    cfg.normalize_activations = Normalization::None;
    cfg.b_dec_init = BDecInit::Zeros;
    cfg.checkpoint_every_tokens = 32;
    let e = run::train(&cfg, &mut quiet).unwrap_err().to_string();
    assert!(e.contains("diverged") && e.contains("`poisoned`"), "{e}");
    assert!(e.contains("last checkpoint"), "{e}");
    assert!(
        !root.join("out/poisoned").exists(),
        "no dictionary is written"
    );
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("out/checkpoints/state.json")).unwrap(),
    )
    .unwrap();
    let steps = state["position"]["steps"].as_u64().unwrap();
    assert!(
        e.contains(&format!("step {}", steps + 1)),
        "{e} (checkpoint at {steps})"
    );
    let t = scalpel_dict::train::Trainer::load_checkpoint(&root.join("out/checkpoints/poisoned"))
        .unwrap();
    assert_eq!(t.steps, steps);
    assert!(t
        .params
        .w_dec
        .iter()
        .chain(&t.params.b_dec)
        .all(|v| v.is_finite()));

    // An absurd learning rate diverges at once, before any checkpoint.
    let store_ok = root.join("store_ok");
    make_store(&store_ok, 4, None);
    let mut cfg = config(
        &store_ok,
        &root.join("out2"),
        vec![dict("hot", "a", Activation::Relu)],
    );
    cfg.train.lr = Some(1e30);
    cfg.lr_warm_up_steps = 0;
    cfg.tokens = 320;
    cfg.lr_decay_steps = 0;
    let e = run::train(&cfg, &mut quiet).unwrap_err().to_string();
    assert!(
        e.contains("diverged") && e.contains("`hot`") && e.contains("no checkpoint"),
        "{e}"
    );
    assert!(!root.join("out2/hot").exists());
}
