//! End-to-end tests of the `scalpel` binary on the default model (SmolLM2-135M-Instruct, Q4_1
//! GGUF, fetched once into the cache) and on the tiny tokenizer-less Llama fixture.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn scalpel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .output()
        .expect("the scalpel binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a command that must succeed and returns its stdout as JSON.
fn json(args: &[&str]) -> Value {
    let o = scalpel(args);
    assert!(o.status.success(), "{args:?} failed: {}", stderr(&o));
    serde_json::from_str(&stdout(&o)).expect("stdout is one JSON document")
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scalpel-models/tests/fixtures/models/llama")
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn run_predicts_paris_after_the_capital_of_france() {
    let v = json(&["run", "--prompt", "The capital of France is", "--json"]);
    assert_eq!(v["model"], "smollm2-135m");
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens[0]["text"], "The");
    assert_eq!(tokens[1]["text"], " capital");
    let last = tokens.last().unwrap();
    let top: Vec<&str> = last["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["text"].as_str().unwrap())
        .collect();
    assert_eq!(top.len(), 5);
    assert!(top.contains(&" Paris"), "top-5 after `is`: {top:?}");
    let probs: Vec<f64> = last["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["prob"].as_f64().unwrap())
        .collect();
    assert!(
        probs.windows(2).all(|w| w[0] >= w[1]) && probs.iter().sum::<f64>() <= 1.0 + 1e-6,
        "{probs:?}"
    );
}

#[test]
fn generate_streams_paris_and_reports_json() {
    let o = scalpel(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).starts_with(" Paris"), "{:?}", stdout(&o));
    assert!(stderr(&o).contains("tokens/s"), "{}", stderr(&o));

    let v = json(&[
        "generate",
        "--prompt",
        "The capital of France is",
        "--max-new-tokens",
        "5",
        "--json",
    ]);
    assert!(v["text"].as_str().unwrap().starts_with(" Paris"), "{v}");
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(v["stop_reason"], "length");
    assert!(v["tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn hooks_lists_every_hook_with_its_shape() {
    let v = json(&["hooks", "--json"]);
    let hooks = v["hooks"].as_array().unwrap();
    let find = |name: &str| hooks.iter().find(|h| h["name"] == name).cloned();
    let resid = find("blocks.29.hook_resid_post").expect("blocks.29.hook_resid_post listed");
    assert_eq!(resid["shape"], serde_json::json!(["b", "p", 576]));
    assert!(find("blocks.0.mlp.hook_pre_linear").is_some());
    assert_eq!(
        find("blocks.0.attn.hook_pattern").unwrap()["shape"],
        serde_json::json!(["b", 9, "p", "p"])
    );
    assert!(find("blocks.30.hook_resid_post").is_none());
}

#[test]
fn broken_pipe_on_stdout_is_success() {
    // Like `scalpel hooks | head -0`: the reader is gone before anything is written.
    let mut child = Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .arg("hooks")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "exit {:?}: {}", o.status, stderr(&o));
    assert!(!stderr(&o).contains("error"), "{}", stderr(&o));
}

#[test]
fn inspect_reports_config_and_dtype_histogram() {
    let v = json(&["inspect", "--json"]);
    assert_eq!(v["config"]["n_layers"], 30);
    assert_eq!(v["config"]["d_model"], 576);
    assert_eq!(v["dtypes"]["Q4_1"], 210);
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["tokenizer"]["vocab_size"], 49152);
    assert!(v["n_params"].as_u64().unwrap() > 100_000_000);
    assert!(v.get("tensors").is_none());
}

#[test]
fn model_without_tokenizer_runs_token_ids() {
    let dir = fixture();
    let dir = dir.to_str().unwrap();
    let v = json(&[
        "run",
        "--model",
        dir,
        "--tokens",
        "1,2,3",
        "--json",
        "--hooks",
        "resid_post.1",
    ]);
    let tokens = v["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 3);
    assert_eq!(tokens[2]["id"], 3);
    assert!(tokens[2]["text"].is_null());
    assert_eq!(tokens[2]["top"].as_array().unwrap().len(), 5);
    assert_eq!(v["hooks"][0]["name"], "blocks.1.hook_resid_post");
    assert_eq!(v["hooks"][0]["shape"], serde_json::json!([1, 3, 64]));

    let o = scalpel(&["run", "--model", dir, "--prompt", "hello"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no tokenizer"), "{}", stderr(&o));
}

#[test]
fn bad_inputs_fail_with_one_clear_error_line() {
    let gguf = match scalpel_models::hub::resolve("smollm2-135m").unwrap() {
        scalpel_models::hub::ModelFiles::Gguf(p) => p,
        other => panic!("default model is a GGUF, got {other:?}"),
    };
    let truncated = scratch("truncated").join("truncated.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&truncated, &bytes[..1 << 20]).unwrap();
    let unsupported = scratch("mamba");
    std::fs::write(
        unsupported.join("config.json"),
        r#"{"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2}"#,
    )
    .unwrap();
    let missing = scratch("missing").join("no-such-model");

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["inspect", "--model", missing.to_str().unwrap()],
            "no such file",
        ),
        (
            vec![
                "run",
                "--prompt",
                "hi",
                "--hooks",
                "blocks.3.hook_resid_psot",
            ],
            "did you mean blocks.3.hook_resid_post",
        ),
        (vec!["run", "--prompt", ""], "empty prompt"),
        (vec!["generate", "--prompt", ""], "empty prompt"),
        (
            vec!["hooks", "--model", truncated.to_str().unwrap()],
            "truncated.gguf",
        ),
        (
            vec!["hooks", "--model", unsupported.to_str().unwrap()],
            "mamba",
        ),
    ];
    for (args, expected) in cases {
        let o = scalpel(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: not one line: {err}");
        assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
        assert!(
            lines[0].contains(expected),
            "{args:?}: {err} lacks {expected:?}"
        );
    }
}
