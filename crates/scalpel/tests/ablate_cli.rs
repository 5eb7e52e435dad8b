//! `scalpel ablate` on the default model (SmolLM2-135M-Instruct, fetched once into the cache):
//! the report's numbers hang together, rankings are sorted, `--each-head` draws its heatmap, and
//! bad targets and text are refused with the valid ranges named.

mod common;

use common::{scalpel, scratch, text};
use serde_json::Value;

fn json(args: &[&str]) -> Value {
    let o = scalpel(args);
    assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// `change` is `ablated − clean`.
fn consistent(c: &Value) {
    let (clean, ablated, change) = (num(&c["clean"]), num(&c["ablated"]), num(&c["change"]));
    assert!((ablated - clean - change).abs() < 1e-9, "{c}");
}

#[test]
fn targets_ablated_together_change_metric_and_loss() {
    let v = json(&[
        "ablate", "--ioi", "4", "--target", "L0H0", "--target", "mlp0", "--method", "mean",
        "--json",
    ]);
    let e = &v["effect"];
    assert_eq!(e["targets"], serde_json::json!(["L0H0", "mlp0"]));
    assert_eq!(
        (v["pairs"].as_u64(), v["method"].as_str()),
        (Some(4), Some("mean"))
    );
    assert_eq!(v["metric"], "logit_diff");
    consistent(&e["metric"]);
    consistent(&e["loss"]);
    assert!(
        num(&e["metric"]["clean"]) > 0.5,
        "SmolLM2 prefers the indirect object: {v}"
    );
    // The first MLP is most of what the model knows about its input tokens.
    assert!(num(&e["loss"]["change"]) > 0.5, "{v}");
    assert!(v["text_positions"].as_u64().unwrap() > 100, "{v}");
    // The human table says the same.
    let o = scalpel(&[
        "ablate",
        "--ioi",
        "4",
        "--target",
        "n3.7",
        "--method",
        "zero",
        "--no-loss",
    ]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        out.contains("zero ablation of L3N7") && out.contains("logit_diff over 4 pairs"),
        "{out}"
    );
}

#[test]
fn each_ranks_targets_by_the_metric_drop() {
    let v = json(&[
        "ablate",
        "--ioi",
        "4",
        "--each",
        "--target",
        "L3H1",
        "--target",
        "attn0",
        "--target",
        "5.2",
        "--method",
        "resample",
        "--no-loss",
        "--json",
    ]);
    let ranking = v["ranking"].as_array().unwrap();
    assert_eq!(ranking.len(), 3);
    let drops: Vec<f64> = ranking
        .iter()
        .map(|e| {
            consistent(&e["metric"]);
            assert!(e["loss"].is_null(), "--no-loss: {e}");
            -num(&e["metric"]["change"])
        })
        .collect();
    assert!(drops.windows(2).all(|w| w[0] >= w[1]), "{drops:?}");
    assert_eq!(v["from"], "from the corrupt prompts");
}

#[test]
fn each_head_draws_a_layer_by_head_heatmap() {
    let dir = scratch("ablate", "heads");
    let out = dir.join("plots");
    let v = json(&[
        "ablate",
        "--ioi",
        "1",
        "--each-head",
        "--method",
        "zero",
        "--no-loss",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]);
    let ranking = v["ranking"].as_array().unwrap();
    assert_eq!(ranking.len(), 30 * 9);
    let svg = std::fs::read_to_string(out.join("ablate-heads.svg")).unwrap();
    assert!(
        svg.contains("<svg") && svg.contains("layer"),
        "not a heatmap"
    );
    // Some head matters to the answer (IOI runs through a handful of heads).
    assert!(
        num(&ranking[0]["metric"]["change"]) < -0.1,
        "{}",
        ranking[0]
    );
}

#[test]
fn bad_targets_and_text_are_refused() {
    let dir = scratch("ablate", "bad");
    let short = dir.join("short.txt");
    std::fs::write(&short, "Hi").unwrap();
    for (args, needle) in [
        (vec!["--target", "L30H0"], "30 layers (0 to 29)"),
        (vec!["--target", "L2H9"], "9 heads per layer (0 to 8)"),
        (vec!["--target", "n2.1536"], "d_mlp is 1536 (0 to 1535)"),
        (vec!["--target", "head2"], "unknown target `head2`"),
        (vec!["--target", "sae:4"], "no SAE was given"),
        (vec![], "nothing to ablate"),
        (
            vec!["--target", "mlp1", "--text", short.to_str().unwrap()],
            "needs at least 2",
        ),
        (
            vec!["--target", "mlp1", "--no-loss", "--method", "mean"],
            "nothing to measure",
        ),
    ] {
        let mut all = vec!["ablate"];
        all.extend(&args);
        let o = scalpel(&all);
        assert!(!o.status.success(), "{all:?} succeeded");
        let err = text(&o.stderr);
        assert!(
            err.contains(needle),
            "{all:?}: expected {needle:?} in {err}"
        );
    }
}

#[test]
fn sae_latents_and_pairs_files() {
    use candle_core::Device;
    use scalpel_dict::{saelens, Architecture, DictConfig, Sae};
    let dir = scratch("ablate", "sae");
    let mut cfg = DictConfig::new(Architecture::Standard, 576, 64);
    cfg.metadata.hook_name = Some("blocks.3.hook_resid_pre".into());
    let sae = Sae::random(cfg, 0.05, &Device::Cpu).unwrap();
    let sae_dir = dir.join("sae");
    saelens::save(&sae, &sae_dir).unwrap();
    let pairs = dir.join("pairs.jsonl");
    std::fs::write(
        &pairs,
        concat!(
            r#"{"clean": "When Mary and John went to the store, John gave a drink to", "#,
            r#""corrupt": "When Alice and Bob went to the store, Carl gave a drink to", "#,
            r#""answer": " Mary", "wrong": " John"}"#,
            "\n"
        ),
    )
    .unwrap();
    let (sae_arg, pairs_arg) = (sae_dir.to_str().unwrap(), pairs.to_str().unwrap());
    let v = json(&[
        "ablate",
        "--pairs",
        pairs_arg,
        "--sae",
        sae_arg,
        "--target",
        "sae:5",
        "--target",
        "SAE:63",
        "--method",
        "zero",
        "--no-loss",
        "--json",
    ]);
    assert_eq!(
        v["effect"]["targets"],
        serde_json::json!(["sae:5", "sae:63"])
    );
    assert_eq!(v["pairs"], 1);
    consistent(&v["effect"]["metric"]);
    let o = scalpel(&[
        "ablate",
        "--pairs",
        pairs_arg,
        "--sae",
        sae_arg,
        "--target",
        "sae:64",
        "--no-loss",
    ]);
    let err = text(&o.stderr);
    assert!(
        !o.status.success() && err.contains("d_sae 64 (0 to 63)"),
        "{err}"
    );
}
