//! `scalpel patch`, `scalpel attribute` and `scalpel ioi` on the default model (SmolLM2-135M):
//! the grids, the heatmaps, path patching, and clear refusals of bad requests.

mod common;

use common::{scalpel, scratch, text};

fn json(args: &[&str]) -> serde_json::Value {
    let o = scalpel(args);
    assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let o = scalpel(args);
    assert!(!o.status.success(), "{args:?} should fail");
    let err = text(&o.stderr);
    for n in needles {
        assert!(err.contains(n), "{args:?}: {n:?} not in {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn exact_and_attribution_grids_with_heatmaps() {
    let dir = scratch("patch", "grids");
    let pairs = dir.join("pairs.jsonl");
    let v = json(&[
        "patch",
        "--ioi",
        "3",
        "--sweep",
        "z_head,resid_pre",
        "--method",
        "both",
        "--out",
        dir.to_str().unwrap(),
        "--save-pairs",
        pairs.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(v["pairs"], 3);
    let (clean, corrupt) = (v["clean"].as_f64().unwrap(), v["corrupt"].as_f64().unwrap());
    assert!(clean > corrupt + 1.0, "IOI: clean {clean}, ABC {corrupt}");
    let grids = v["grids"].as_array().unwrap();
    assert_eq!(grids.len(), 4, "two sweeps, two methods");
    let seq = v["positions"].as_array().unwrap().len();
    for g in grids {
        let shape: Vec<u64> = g["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let want = if g["sweep"] == "z_head" {
            vec![30, 9]
        } else {
            vec![30, seq as u64]
        };
        assert_eq!(shape, want);
        let scores = floats(&g["scores"]);
        assert_eq!(scores.len() as u64, shape.iter().product::<u64>());
        assert!(scores.iter().all(|s| s.is_finite()));
        if g["method"] == "exact" {
            let c = g["correlation_with_exact"].as_f64().unwrap();
            assert!(c > 0.5, "{} attribution vs exact: {c}", g["sweep"]);
        }
        let svg = dir.join(format!(
            "denoise_{}_{}.svg",
            g["sweep"].as_str().unwrap(),
            g["method"].as_str().unwrap()
        ));
        let body = std::fs::read_to_string(&svg).unwrap();
        assert!(body.contains("layer"), "{}", svg.display());
    }
    // Position labels carry the tokens and the IOI roles.
    let labels = v["positions"].to_string();
    assert!(labels.contains("(IO)") && labels.contains("(S2)") && labels.contains("(end)"));
    // Patching the last position in the last layer restores most of the answer (the rest
    // comes through attention to earlier, still corrupt, positions); the first tokens are the
    // same in both prompts, so patching them changes nothing.
    let resid = grids
        .iter()
        .find(|g| g["sweep"] == "resid_pre" && g["method"] == "exact")
        .unwrap();
    let scores = floats(&resid["scores"]);
    let last = scores[29 * seq + seq - 1];
    assert!(last > 0.8, "{last}");
    assert!((0..30).all(|l| scores[l * seq] == 0.0));
    // The saved pairs rerun to the same metrics, and `attribute` skips exact patching. Its own
    // leaner passes use other kernels (e.g. the fused attention), so agreement is to rounding.
    let v = json(&[
        "attribute",
        "--pairs",
        pairs.to_str().unwrap(),
        "--sweep",
        "z_head",
        "--json",
    ]);
    let d = (v["clean"].as_f64().unwrap() - clean).abs();
    assert!(d < 1e-4, "clean metric {} vs {clean}", v["clean"]);
    let grids = v["grids"].as_array().unwrap();
    assert_eq!(grids.len(), 1);
    assert_eq!(grids[0]["method"], "attribution");
}

#[test]
fn path_patching_to_the_logits_and_to_a_head() {
    let v = json(&[
        "patch",
        "--ioi",
        "2",
        "--path-to",
        "logits",
        "--direction",
        "noise",
        "--json",
    ]);
    let g = &v["grids"][0];
    assert_eq!(g["method"], "path to logits");
    let scores = floats(&g["scores"]);
    assert_eq!(scores.len(), 270);
    // Noising one head barely moves the answer for most heads.
    let near_one = scores.iter().filter(|s| (*s - 1.0).abs() < 0.05).count();
    assert!(near_one > 200, "{near_one}");
    let v = json(&[
        "patch",
        "--ioi",
        "2",
        "--path-to",
        "L23H3.v",
        "--direction",
        "noise",
        "--json",
    ]);
    let scores = floats(&v["grids"][0]["scores"]);
    // Heads at or above the receiver's layer cannot reach it.
    assert!(scores[23 * 9..].iter().all(|s| *s == 1.0));
}

#[test]
fn bad_requests_name_the_problem() {
    fails_with(
        &[
            "patch",
            "--clean",
            "When Mary and John went out, John gave a book to",
            "--corrupt",
            "When Mary and John went out, Christopher Columbus gave a book to",
            "--answer",
            " Mary",
            "--wrong",
            " John",
        ],
        &["pair 1", "tokens", "position"],
    );
    fails_with(
        &[
            "patch",
            "--clean",
            "a b c",
            "--corrupt",
            "a b d",
            "--answer",
            " Mary Jane",
            "--wrong",
            " John",
        ],
        &["Mary Jane", "one"],
    );
    fails_with(
        &["patch", "--ioi", "2", "--sweep", "resid_post"],
        &["resid_pre", "z_head_pos"],
    );
    fails_with(
        &["patch", "--ioi", "2", "--path-to", "L40H1.q"],
        &["layers 0..30"],
    );
    fails_with(
        &["patch", "--ioi", "2", "--metric", "logit(answer"],
        &["missing `)`"],
    );
    fails_with(
        &["patch", "--ioi", "2", "--direction", "sideways"],
        &["denoise or noise"],
    );
    fails_with(&["patch", "--ioi", "0"], &["0 IOI pairs"]);
    let dir = scratch("patch", "empty");
    let empty = dir.join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    fails_with(
        &["patch", "--pairs", empty.to_str().unwrap()],
        &["no pairs"],
    );
}
