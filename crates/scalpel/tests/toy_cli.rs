//! `scalpel toy` and `scalpel diagnose` end to end: report folders with JSON, CSV and SVG files,
//! resumable checkpoints, `--bench` output, and clear errors on bad input.

mod common;

use common::{scalpel, scratch, text};

fn is_svg(path: &std::path::Path) -> bool {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    (s.starts_with("<svg") || s.starts_with("<?xml")) && s.trim_end().ends_with("</svg>")
}

#[test]
fn grokking_writes_a_report_and_diagnose_reads_it() {
    let dir = scratch("toy", "grok");
    let out = dir.join("report");
    let o = scalpel(&[
        "toy",
        "grokking",
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "300",
        "--eval-every",
        "50",
        "--checkpoint-every",
        "100",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let stdout = text(&o.stdout);
    assert!(stdout.contains("a + b mod 31"), "{stdout}");
    for f in [
        "loss.svg",
        "accuracy.svg",
        "progress_measures.svg",
        "embedding_spectrum.svg",
        "sparsity_and_norm.svg",
    ] {
        assert!(is_svg(&out.join(f)), "{f}");
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(csv.starts_with("epoch,train_loss,train_acc,test_loss,test_acc"));
    assert_eq!(csv.lines().count(), 1 + 6);
    let progress = std::fs::read_to_string(out.join("progress.csv")).unwrap();
    assert_eq!(progress.lines().count(), 1 + 3, "one row per checkpoint");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["config"]["p"], 31);
    assert_eq!(summary["checkpoints"].as_array().unwrap().len(), 3);

    // Diagnose the first checkpoint and the folder (its newest), as JSON.
    let first = out.join("checkpoints/checkpoint-0000100.safetensors");
    let o = scalpel(&[
        "diagnose",
        first.to_str().unwrap(),
        out.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let d: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let d = d.as_array().unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d[0]["epoch"], 100);
    assert_eq!(d[1]["epoch"], 300);
    for x in d {
        assert!(["memorising", "generalising"].contains(&x["verdict"].as_str().unwrap()));
    }

    // Extending the run resumes from the last checkpoint.
    let o = scalpel(&[
        "toy",
        "grokking",
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "400",
        "--eval-every",
        "50",
        "--checkpoint-every",
        "100",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 8);
    // ... but a different setting in the same folder is refused.
    let o = scalpel(&[
        "toy",
        "grokking",
        "--out",
        out.to_str().unwrap(),
        "--lr",
        "0.01",
    ]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("different configuration"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn bad_input_is_a_clear_error() {
    let o = scalpel(&["toy", "grokking", "--p", "2", "--bench", "1"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("p must be at least 3"),
        "{}",
        text(&o.stderr)
    );
    let o = scalpel(&["diagnose", "/nonexistent/checkpoint.safetensors"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("no such file"),
        "{}",
        text(&o.stderr)
    );
    let dir = scratch("toy", "bad");
    let junk = dir.join("checkpoint-0000001.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let o = scalpel(&["diagnose", junk.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("checkpoint-0000001.safetensors"),
        "{}",
        text(&o.stderr)
    );
    let o = scalpel(&["toy", "superposition", "--parts", "pentagons"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("unknown part"),
        "{}",
        text(&o.stderr)
    );
}

#[test]
fn superposition_and_induction_reports() {
    let dir = scratch("toy", "sp");
    let out = dir.join("sp");
    let o = scalpel(&[
        "toy",
        "superposition",
        "--out",
        out.to_str().unwrap(),
        "--parts",
        "pentagon,importance",
        "--steps",
        "300",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    for f in [
        "pentagon.svg",
        "wtw_0.svg",
        "bias_0.svg",
        "norms_6.svg",
        "loss_pentagon.svg",
    ] {
        assert!(is_svg(&out.join(f)), "{f}");
    }
    let features = std::fs::read_to_string(out.join("importance_sweep_features.csv")).unwrap();
    assert_eq!(features.lines().count(), 1 + 7 * 20);

    let out = dir.join("ind");
    let o = scalpel(&[
        "toy",
        "induction",
        "--out",
        out.to_str().unwrap(),
        "--steps",
        "100",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["config"]["steps"], 100);
    for f in [
        "loss.svg",
        "head_scores.svg",
        "ablation.svg",
        "k_composition.svg",
    ] {
        assert!(is_svg(&out.join(f)), "{f}");
    }
    assert!(out.join("ablation.csv").exists());

    let o = scalpel(&["toy", "induction", "--bench", "5", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let b: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(b["steps"], 5);
    assert!(b["steps_per_s"].as_f64().unwrap() > 0.0);
}
