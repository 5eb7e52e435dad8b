//! `scalpel train` and `scalpel convert` end to end on a tiny activation store.

use std::path::{Path, PathBuf};
use std::process::Output;

use candle_core::{Device, Tensor};
use scalpel_data::store::{HookMeta, StoreDType, StoreMeta, StoreWriter};
use scalpel_dict::run::RunConfig;
use scalpel_dict::{saelens, Architecture};
use serde_json::Value;

mod common;
use common::{scalpel, text};

fn scratch(name: &str) -> PathBuf {
    common::scratch("train-cli", name)
}

/// A store with hooks `a` (12 wide) and `b` (6 wide), 8 contexts of 16 tokens.
fn make_store(dir: &Path) {
    let meta = StoreMeta {
        model: "tiny".into(),
        model_fingerprint: "0".into(),
        hooks: vec![
            HookMeta {
                name: "a".into(),
                d: 12,
            },
            HookMeta {
                name: "b".into(),
                d: 6,
            },
        ],
        dtype: StoreDType::F32,
        context_size: 16,
        contexts_per_shard: 2,
        n_tokens: 128,
        corpus: "tiny corpus".into(),
        corpus_hash: "0".into(),
        packing: serde_json::json!({"prepend_bos": false}),
        exclude_token_ids: Vec::new(),
        seqpos_slice: None,
    };
    let mut w = StoreWriter::create_or_resume(dir, meta).unwrap();
    for ctx in 0..8u32 {
        // Deterministic, varied rows: a few "features" switched on by a hash of the position.
        let a: Vec<Vec<f32>> = (0..16u32)
            .map(|p| {
                let h = (ctx * 31 + p * 17) % 12;
                (0..12u32)
                    .map(|j| {
                        if j == h || j == (h * 5 + 1) % 12 {
                            1.0 + (j as f32) / 10.0
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let b: Vec<Vec<f32>> = a
            .iter()
            .map(|r| (0..6).map(|j| r[2 * j] + r[2 * j + 1]).collect())
            .collect();
        let t = |v: Vec<Vec<f32>>| Tensor::new(v, &Device::Cpu).unwrap();
        let tokens: Vec<u32> = (0..16).collect();
        w.push(&tokens, &[("a", t(a)), ("b", t(b))]).unwrap();
    }
    w.finish().unwrap();
}

/// A failing command prints exactly one `error:` line and no panic.
fn assert_one_error_line(o: &Output, needle: &str) -> String {
    assert!(
        !o.status.success(),
        "expected failure, stdout: {}",
        text(&o.stdout)
    );
    let err = text(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains(needle), "`{needle}` not in: {err}");
    err
}

#[test]
fn print_config_parses_back() {
    let o = scalpel(&["train", "--print-config"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cfg = RunConfig::from_toml(&text(&o.stdout)).unwrap();
    assert_eq!(cfg.batch_size, 4096);
    let o = scalpel(&[
        "train",
        "--print-config",
        "--store",
        "acts",
        "--hook",
        "blocks.2.hook_resid_post",
        "--activation",
        "jumprelu",
        "--d-sae",
        "128",
        "--lr",
        "0.01",
        "--tokens",
        "1000",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let cfg = RunConfig::from_toml(&text(&o.stdout)).unwrap();
    assert_eq!(cfg.dict.len(), 1);
    assert_eq!(cfg.dict[0].hook, "blocks.2.hook_resid_post");
    assert_eq!(cfg.dict[0].d_sae, 128);
    assert_eq!(cfg.train.lr, Some(0.01));
    assert_eq!(cfg.tokens, 1000);
    assert_eq!(cfg.data.store.as_deref(), Some(Path::new("acts")));
}

#[test]
fn train_writes_saelens_dictionaries_and_resumes() {
    let root = scratch("e2e");
    let store = root.join("store");
    make_store(&store);
    let out = root.join("out");
    let (s, o) = (store.to_str().unwrap(), out.to_str().unwrap());
    let args = [
        "train",
        "--store",
        s,
        "--hook",
        "a",
        "--activation",
        "topk",
        "--d-sae",
        "24",
        "--k",
        "3",
        "--tokens",
        "320",
        "--batch",
        "32",
        "--out",
        o,
        "--lr",
        "0.003",
        "--json",
    ];
    let r = scalpel(&args);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let v: Value = serde_json::from_str(&text(&r.stdout)).unwrap();
    assert_eq!(v["tokens"], 320);
    assert_eq!(v["finished"], true);
    let sae = saelens::load(&out.join("a"), &Device::Cpu).unwrap();
    assert_eq!(sae.cfg.architecture, Architecture::Topk);
    assert_eq!((sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k), (12, 24, Some(3)));
    assert_eq!(sae.cfg.metadata.hook_name.as_deref(), Some("a"));
    assert_eq!(sae.cfg.metadata.model_name.as_deref(), Some("tiny"));
    assert!(sae.sparsity.is_some());
    assert!(out.join("a/training_log.jsonl").is_file());
    let weights = std::fs::read(out.join("a/sae_weights.safetensors")).unwrap();

    // Run again: the checkpoint is complete, nothing more to train, same weights.
    let r = scalpel(&args);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let v: Value = serde_json::from_str(&text(&r.stdout)).unwrap();
    assert_eq!(v["resumed_from_tokens"], 320);
    assert_eq!(
        std::fs::read(out.join("a/sae_weights.safetensors")).unwrap(),
        weights
    );

    // A TOML config with two dictionaries, one a transcoder a -> b.
    let cfg = format!(
        "out = {o2:?}\ntokens = 256\nbatch_size = 32\n[data]\nstore = {s:?}\n\
         [[dict]]\nname = \"sae\"\nhook = \"b\"\nactivation = \"relu\"\nd_sae = 12\n\
         [[dict]]\nname = \"tc\"\nhook = \"a\"\nhook_out = \"b\"\nactivation = \"batchtopk\"\n\
         d_sae = 16\nk = 2\n",
        o2 = root.join("out2").display().to_string(),
    );
    let path = root.join("run.toml");
    std::fs::write(&path, cfg).unwrap();
    let r = scalpel(&["train", path.to_str().unwrap()]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    assert!(
        text(&r.stdout).contains("trained 2 dictionaries"),
        "{}",
        text(&r.stdout)
    );
    let tc = saelens::load(&root.join("out2/tc"), &Device::Cpu).unwrap();
    assert_eq!(tc.cfg.architecture, Architecture::JumpreluTranscoder);
    assert_eq!(tc.cfg.metadata.hook_name_out.as_deref(), Some("b"));
    assert_eq!(tc.cfg.d_out, Some(6));

    // convert --from saelens rewrites it; the weights read back the same.
    let conv = root.join("converted");
    let r = scalpel(&[
        "convert",
        "--from",
        "saelens",
        root.join("out2/tc").to_str().unwrap(),
        "--out",
        conv.to_str().unwrap(),
        "--json",
    ]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let back = saelens::load(&conv, &Device::Cpu).unwrap();
    assert_eq!(back.cfg, tc.cfg);
    let w = |s: &scalpel_dict::Sae| {
        s.tensor("W_dec")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(w(&back), w(&tc));
}

#[test]
fn bad_inputs_fail_with_one_error_line() {
    let root = scratch("bad");
    let store = root.join("store");
    make_store(&store);
    let s = store.to_str().unwrap();
    let out = root.join("out");
    let o = out.to_str().unwrap();
    let base = ["train", "--store", s, "--out", o, "--tokens", "64"];
    let with = |extra: &[&str]| {
        let mut v: Vec<&str> = base.to_vec();
        v.extend_from_slice(extra);
        scalpel(&v)
    };
    assert_one_error_line(
        &with(&["--hook", "a", "--d-sae", "8", "--k", "9", "--batch", "32"]),
        "dict.a.k",
    );
    let e = assert_one_error_line(&with(&["--hook", "zzz"]), "dict.zzz.hook");
    assert!(
        e.contains("\"a\"") && e.contains("\"b\""),
        "lists the store's hooks: {e}"
    );
    assert_one_error_line(&with(&["--hook", "a", "--lr", "0"]), "train.lr");
    assert_one_error_line(&with(&["--hook", "a", "--batch", "0"]), "batch_size");
    assert_one_error_line(&with(&[]), "dict");
    assert_one_error_line(
        &scalpel(&["train", "--store", "/nonexistent/store", "--hook", "a"]),
        "/nonexistent/store",
    );
    assert_one_error_line(
        &scalpel(&["train", "/nonexistent/run.toml"]),
        "/nonexistent/run.toml",
    );
    let bad = root.join("bad.toml");
    std::fs::write(&bad, "tokens = \"many\"\n").unwrap();
    assert_one_error_line(&scalpel(&["train", bad.to_str().unwrap()]), "tokens");
    assert_one_error_line(
        &scalpel(&["convert", "--from", "gemma-scope", "x.npz", "--out", o]),
        "--hook",
    );
    assert_one_error_line(
        &scalpel(&[
            "convert",
            "--from",
            "saelens",
            "/nonexistent/sae",
            "--out",
            o,
        ]),
        "/nonexistent/sae",
    );
    assert!(!out.exists(), "nothing written by failed runs");
}
