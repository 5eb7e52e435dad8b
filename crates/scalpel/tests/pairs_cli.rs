//! `scalpel pairs` on the default model's tokenizer: generated IOI and factual pairs pass
//! `scalpel pairs check`, and a broken file fails it with the pair and the reason.

mod common;

use common::{scalpel, scratch, text};

fn json(args: &[&str]) -> serde_json::Value {
    let o = scalpel(args);
    assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn generated_pairs_pass_the_check() {
    let dir = scratch("pairs", "generate");
    let ioi = dir.join("ioi.jsonl");
    let ioi = ioi.to_str().unwrap();
    let v = json(&[
        "pairs", "ioi", "--n", "40", "--seed", "3", "--out", ioi, "--json",
    ]);
    assert_eq!(v["pairs"], 40);
    let checked = json(&["pairs", "check", ioi, "--json"]);
    assert_eq!(checked["pairs"], 40);
    assert_eq!(checked["lengths"], v["lengths"]);
    let total: u64 = checked["lengths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["pairs"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 40);
    assert_eq!(std::fs::read_to_string(ioi).unwrap().lines().count(), 40);

    // Without --out the pairs are JSONL on stdout, the same for the same seed.
    let o = scalpel(&["pairs", "ioi", "--n", "40", "--seed", "3"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), std::fs::read_to_string(ioi).unwrap());

    let factual = dir.join("factual.jsonl");
    let factual = factual.to_str().unwrap();
    let o = scalpel(&["pairs", "factual", "--n", "12", "--out", factual]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let o = scalpel(&["pairs", "check", factual]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("12 pairs, all usable"), "{out}");
    assert!(out.contains("The capital city of"), "{out}");
}

#[test]
fn a_broken_file_fails_the_check_with_the_reason() {
    let dir = scratch("pairs", "broken");
    let file = dir.join("broken.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"clean": "The capital of France is", "corrupt": "The capital of Japan is", "answer": " Paris", "wrong": " Tokyo"}"#,
            "\n",
            r#"{"clean": "The capital of France is", "corrupt": "The capital of Japan is", "answer": " Paris", "wrong": " New York"}"#,
            "\n"
        ),
    )
    .unwrap();
    let o = scalpel(&["pairs", "check", file.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("broken.jsonl"), "{err}");
    assert!(
        err.contains(r#"pair 2: the wrong answer " New York" is 2 tokens"#),
        "{err}"
    );

    std::fs::write(&file, "{\"clean\": \"x\"}\n").unwrap();
    let o = scalpel(&["pairs", "check", file.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("line 1") && err.contains("missing field"),
        "{err}"
    );

    let o = scalpel(&["pairs", "ioi", "--n", "0"]);
    assert!(!o.status.success());
    assert!(
        text(&o.stderr).contains("0 IOI pairs"),
        "{}",
        text(&o.stderr)
    );
}
