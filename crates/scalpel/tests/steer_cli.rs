//! `scalpel steer` on the default model (SmolLM2-135M-Instruct, fetched once into the cache):
//! the three sources of vectors, the unsteered and steered text side by side, the sweep's table,
//! JSON and plot, and one clear error line for bad input.

mod common;

use std::process::Output;

use candle_core::Device;
use common::{scalpel, scratch, text};
use scalpel_dict::{saelens, Architecture, DictConfig, Sae};

fn ok(args: &[&str]) -> Output {
    let o = scalpel(args);
    assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    o
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&ok(args).stdout).unwrap()
}

/// The stderr of a run that must fail.
fn fails(args: &[&str]) -> String {
    let o = scalpel(args);
    assert!(
        !o.status.success(),
        "{args:?} succeeded: {}",
        text(&o.stdout)
    );
    text(&o.stderr)
}

const ACTADD: [&str; 9] = [
    "steer",
    "--prompt",
    "I hate you because",
    "--actadd",
    "Love",
    "Hate",
    "--layer",
    "6",
    "--max-new-tokens",
];

#[test]
fn actadd_shows_unsteered_and_steered_text() {
    let mut args = ACTADD.to_vec();
    args.extend(["8", "--coef", "5", "--json"]);
    let v = json(&args);
    assert_eq!(v["hook"], "blocks.6.hook_resid_pre");
    // "Hate" is two tokens here, so the vector covers two positions.
    assert_eq!(v["positions"]["first"], 2);
    let unsteered = v["unsteered"]["text"].as_str().unwrap();
    let steered = v["points"][0]["text"].as_str().unwrap();
    assert!(!unsteered.is_empty() && !steered.is_empty());
    assert_ne!(unsteered, steered);
    assert!(v["points"][0]["kl"].as_f64().unwrap() > 0.0);
    assert_eq!(v["unsteered"]["kl"].as_f64(), Some(0.0));

    let mut args = ACTADD.to_vec();
    args.extend(["8", "--coef", "5"]);
    let out = text(&ok(&args).stdout);
    // Each text is shown on one line.
    let (unsteered, steered) = (unsteered.replace('\n', "⏎"), steered.replace('\n', "⏎"));
    assert!(
        out.contains(&format!("unsteered:  I hate you because{unsteered}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("steered ×5: I hate you because{steered}")),
        "{out}"
    );
    assert!(out.contains("KL(unsteered ‖ steered)"), "{out}");
}

#[test]
fn sweep_prints_a_table_and_writes_json_and_a_plot() {
    let dir = scratch("steer", "sweep");
    let out_dir = dir.to_str().unwrap();
    let mut args = ACTADD.to_vec();
    args.extend([
        "6", "--sweep", "-5,0,5", "--target", " love", "--out", out_dir,
    ]);
    let out = text(&ok(&args).stdout);
    let lines: Vec<&str> = out.lines().collect();
    let header = lines
        .iter()
        .position(|l| l.contains("coef") && l.contains("KL") && l.contains("loss"))
        .unwrap_or_else(|| panic!("no table header: {out}"));
    assert!(lines[header].contains("logp \" love\""), "{out}");
    assert!(
        lines[header + 1].trim_start().starts_with("unsteered"),
        "{out}"
    );
    for (i, c) in ["-5", "0", "5"].iter().enumerate() {
        assert!(lines[header + 2 + i].trim_start().starts_with(c), "{out}");
    }

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("steer.json")).unwrap()).unwrap();
    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 3);
    let u = &report["unsteered"];
    // Coefficient 0 is the unsteered model.
    assert_eq!(points[1]["kl"].as_f64(), Some(0.0));
    assert_eq!(points[1]["text"], u["text"]);
    assert_eq!(points[1]["target_logprob"], u["target_logprob"]);
    let logp = |p: &serde_json::Value| p["target_logprob"].as_f64().unwrap();
    assert!(logp(&points[2]) > logp(u) && logp(u) > logp(&points[0]));
    let svg = std::fs::read_to_string(dir.join("steer.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("coefficient"));
}

#[test]
fn mean_difference_and_sae_sources() {
    let dir = scratch("steer", "sources");
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(
        &pairs,
        "{\"positive\": \"I am very happy\", \"negative\": \"I am very sad\"}\n\
         {\"positive\": \"What a lovely day\", \"negative\": \"What an awful day\"}\n",
    )
    .unwrap();
    let v = json(&[
        "steer",
        "--prompt",
        "The weather today is",
        "--mean-diff",
        pairs.to_str().unwrap(),
        "--layer",
        "8",
        "--coef",
        "4",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(v["positions"], "all");
    assert_eq!(v["hook"], "blocks.8.hook_resid_pre");
    assert!(v["source"].as_str().unwrap().contains("2 pairs"));

    // A random dictionary at blocks.3.hook_resid_post, in SAELens format.
    let mut cfg = DictConfig::new(Architecture::Standard, 576, 16);
    cfg.metadata.hook_name = Some("blocks.3.hook_resid_post".into());
    let sae = Sae::random(cfg, 0.05, &Device::Cpu).unwrap();
    let sae_dir = dir.join("sae");
    saelens::save(&sae, &sae_dir).unwrap();
    let sae_dir = sae_dir.to_str().unwrap();
    let base = [
        "steer",
        "--prompt",
        "The weather today is",
        "--sae",
        sae_dir,
        "--feature",
        "3",
        "--max-new-tokens",
        "3",
    ];
    let mut args = base.to_vec();
    args.extend(["--clamp", "2", "--max-act", "1.5", "--json"]);
    let v = json(&args);
    assert_eq!(v["hook"], "blocks.3.hook_resid_post");
    assert_eq!(v["max_act"].as_f64(), Some(1.5));
    assert!(v["source"].as_str().unwrap().contains("clamped"));
    assert_eq!(v["points"][0]["coef"].as_f64(), Some(2.0));
    // The dictionary's own hook wins; a different --layer is refused.
    let mut args = base.to_vec();
    args.extend(["--coef", "1", "--layer", "5"]);
    let e = fails(&args);
    assert!(e.contains("blocks.3.hook_resid_post"), "{e}");
}

#[test]
fn bad_input_fails_with_the_reason() {
    let with = |extra: &[&'static str]| {
        let mut args = ACTADD.to_vec();
        args.push("2");
        args.extend(extra);
        fails(&args)
    };
    let e = with(&["--coef", "nan"]);
    assert!(e.contains("NaN") && e.contains("finite"), "{e}");
    let e = with(&["--sweep", "1,inf"]);
    assert!(e.contains("inf"), "{e}");
    let e = with(&[]);
    assert!(e.contains("give a coefficient"), "{e}");
    let e = with(&["--coef", "1", "--positions", "0,1,2"]);
    assert!(
        e.contains("2 rows") && e.contains("2 listed positions"),
        "{e}"
    );
    let e = fails(&[
        "steer", "--prompt", "Hi", "--actadd", "Love", "Hate", "--layer", "30", "--coef", "1",
    ]);
    assert!(e.contains("layer 30") && e.contains("0..=29"), "{e}");
    let empty = scratch("steer", "empty").join("pairs.jsonl");
    std::fs::write(&empty, "").unwrap();
    let e = fails(&[
        "steer",
        "--prompt",
        "Hi",
        "--mean-diff",
        empty.to_str().unwrap(),
        "--layer",
        "3",
        "--coef",
        "1",
    ]);
    assert!(e.contains("no contrastive pairs"), "{e}");
}
