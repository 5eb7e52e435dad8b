//! `scalpel lens` and `scalpel dla` on the default model (SmolLM2-135M-Instruct, fetched once into
//! the cache): the lens's last layer is the model's own prediction, and the attribution's parts
//! sum to the logit difference.

mod common;

use common::{scalpel, text};

fn json(args: &[&str]) -> serde_json::Value {
    let o = scalpel(args);
    assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn lens_ends_at_the_models_prediction() {
    let v = json(&[
        "lens",
        "--prompt",
        "The capital of France is",
        "--target",
        " Paris",
        "--json",
    ]);
    let cells = v.as_array().unwrap();
    assert_eq!(
        cells.len(),
        31,
        "embeddings + 30 blocks at the last position"
    );
    let last = cells.last().unwrap();
    assert_eq!(last["hook"], "blocks.29.hook_resid_post");
    assert_eq!(last["top"][0]["text"], " Paris");
    assert_eq!(last["targets"][0]["rank"], 0);
    // At the embeddings, " Paris" is far from the top.
    assert!(cells[0]["targets"][0]["rank"].as_u64().unwrap() > 100);
}

#[test]
fn attribution_sums_to_the_logit_difference() {
    let v = json(&[
        "dla",
        "--prompt",
        "The capital of France is",
        "--answer",
        " Paris",
        "--wrong",
        " London",
        "--json",
    ]);
    let (total, logit) = (v["total"].as_f64().unwrap(), v["logit"].as_f64().unwrap());
    assert!(logit > 1.0, "Paris should beat London: {logit}");
    assert!(
        (total - logit).abs() < 1e-3 * (1.0 + logit.abs()),
        "{total} vs {logit}"
    );
    // 30 layers × 9 heads, 30 MLPs and the embedding (rotary: no positional part).
    assert_eq!(v["parts"].as_array().unwrap().len(), 30 * 9 + 30 + 1);
    // A multi-token answer is refused with its tokens named.
    let o = scalpel(&[
        "dla",
        "--prompt",
        "The capital of France is",
        "--answer",
        "Parisians",
    ]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(err.contains("2 tokens") && err.contains("ians"), "{err}");
}

#[test]
fn smollm2_has_induction_and_previous_token_heads() {
    let v = json(&["heads", "--half", "24", "--batch", "4", "--json"]);
    let best = |key: &str| {
        v[key]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
            .fold(0.0f64, f64::max)
    };
    let chance = v["chance"][1].as_f64().unwrap();
    // A pretrained model of this size has sharp induction and previous-token heads (uniform
    // attention would score a few percent).
    assert!(
        best("induction") > 0.5 && best("induction") > 10.0 * chance,
        "{v}"
    );
    assert!(best("previous_token") > 0.5, "{v}");
    assert!(best("duplicate_token") > 0.3, "{v}");
    assert_eq!(v["induction"].as_array().unwrap().len(), 30);
}
