//! `scalpel eval` end to end on the default model (SmolLM2-135M-Instruct) and the held-out demo
//! corpus, with small random dictionaries saved in SAELens format.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::Device;
use scalpel_dict::{saelens, Architecture, DictConfig, Sae};
use serde_json::Value;

fn scalpel(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_scalpel"))
        .args(args)
        .output()
        .expect("the scalpel binary runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A random standard SAE of width `d_in` reading `hook`, saved in `dir`.
fn random_sae(dir: &Path, d_in: usize, hook: &str) {
    let mut cfg = DictConfig::new(Architecture::Standard, d_in, 128);
    cfg.metadata.hook_name = Some(hook.into());
    let sae = Sae::random(cfg, 0.05, &Device::Cpu).unwrap();
    saelens::save(&sae, dir).unwrap();
}

const SMALL: &[&str] = &["--tokens", "64", "--context-size", "32", "--batch", "2"];

#[test]
fn eval_reports_saelens_metrics_as_json_and_writes_only_when_asked() {
    let dir = scratch("json");
    let dict = dir.join("sae");
    random_sae(&dict, 576, "blocks.3.hook_resid_post");
    let out = dir.join("report.json");
    let mut args = vec!["eval", "--dict", dict.to_str().unwrap(), "--error-term"];
    args.extend(SMALL);
    args.extend(["--json", "--out", out.to_str().unwrap()]);
    let o = scalpel(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let v: Value = serde_json::from_slice(&o.stdout).expect("stdout is one JSON document");
    let written: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(v, written, "--out holds the report printed");

    assert_eq!(v["hook_name"], "blocks.3.hook_resid_post");
    assert_eq!(v["token_stats"]["contexts"], 2);
    assert_eq!(v["token_stats"]["total_tokens"], 64);
    let groups: &[(&str, &[&str])] = &[
        (
            "reconstruction_quality",
            &[
                "explained_variance",
                "explained_variance_legacy",
                "mse",
                "cossim",
            ],
        ),
        (
            "shrinkage",
            &[
                "l2_norm_in",
                "l2_norm_out",
                "l2_ratio",
                "relative_reconstruction_bias",
            ],
        ),
        ("sparsity", &["l0", "l1"]),
        (
            "model_performance_preservation",
            &[
                "ce_loss_score",
                "ce_loss_with_ablation",
                "ce_loss_with_sae",
                "ce_loss_without_sae",
                "ce_loss_with_error_term",
            ],
        ),
        (
            "model_behavior_preservation",
            &["kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"],
        ),
    ];
    for (group, names) in groups {
        for name in *names {
            let x = v[group][name].as_f64();
            assert!(
                x.is_some_and(f64::is_finite),
                "{group}.{name} is {:?}",
                v[group][name]
            );
        }
    }
    let m = &v["model_performance_preservation"];
    let clean = m["ce_loss_without_sae"].as_f64().unwrap();
    assert!(
        (m["ce_loss_with_error_term"].as_f64().unwrap() - clean).abs() < 1e-3,
        "{m}"
    );
    // The instruct model knows English: far below the uniform ln(49152) ≈ 10.8.
    assert!(clean > 0.5 && clean < 7.0, "{m}");
    let density = v["features"]["feature_density"].as_array().unwrap();
    assert_eq!(density.len(), 128);
    assert!(density
        .iter()
        .all(|d| d.as_f64().is_some_and(|d| (0.0..=1.0).contains(&d))));
    let h = &v["features"]["log10_density_histogram"];
    assert_eq!(
        h["edges"].as_array().unwrap().len(),
        h["counts"].as_array().unwrap().len() + 1
    );

    // Without --out nothing is written; the table names the metrics.
    let mut args = vec!["eval", "--dict", dict.to_str().unwrap()];
    args.extend(SMALL);
    let o = scalpel(&args);
    assert!(o.status.success());
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("explained_variance") && table.contains("ce_loss_score"),
        "{table}"
    );
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    files.sort();
    assert_eq!(files, ["report.json", "sae"]);
}

#[test]
fn bad_dictionaries_fail_with_one_clear_error_line() {
    let dir = scratch("bad");
    let absent = dir.join("absent-hook");
    random_sae(&absent, 576, "blocks.30.hook_resid_post");
    let narrow = dir.join("narrow");
    random_sae(&narrow, 64, "blocks.3.hook_resid_post");
    let cases: [(&Path, &[&str]); 3] = [
        (&absent, &["blocks.30.hook_resid_post", "did you mean"]),
        (&narrow, &["d_in is 64", "576", "blocks.3.hook_resid_post"]),
        (&dir.join("missing"), &["cfg.json"]),
    ];
    for (dict, expected) in cases {
        let mut args = vec!["eval", "--dict", dict.to_str().unwrap()];
        args.extend(SMALL);
        let o = scalpel(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{dict:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "not one line: {err}");
        assert!(lines[0].starts_with("error: "), "{err}");
        for e in expected {
            assert!(lines[0].contains(e), "{err} lacks {e:?}");
        }
    }
}
