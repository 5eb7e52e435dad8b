//! `scalpel train` streaming activations from the default model (SmolLM2-135M-Instruct, fetched
//! once into the cache, as in `cli.rs`) over a small JSONL corpus written by the test, instead of
//! reading an activation store: an SAE and a transcoder trained together, written in SAELens
//! format, and a rerun of the finished run that resumes from its final checkpoint without
//! changing anything.

use std::path::{Path, PathBuf};

use candle_core::Device;
use scalpel_dict::run::LogRow;
use scalpel_dict::{saelens, Architecture};
use serde_json::Value;

mod common;
use common::{scalpel, text};

fn scratch(name: &str) -> PathBuf {
    common::scratch("train-stream", name)
}

/// A JSONL corpus of plain English documents, a few thousand tokens in all: enough for the
/// init sample and 256 training rows through a 128-row shuffle buffer, for every hook.
fn write_corpus(path: &Path) {
    let subjects = [
        "The old lighthouse keeper",
        "A young botanist from the valley",
        "The river near the mill",
        "Our neighbour's grey cat",
        "The committee of the village school",
        "A travelling musician",
        "The baker on the corner",
        "The northern wind",
    ];
    let verbs = [
        "watched the ships return before the storm",
        "counted the seeds that had sprouted overnight",
        "carried the letters across the bridge every morning",
        "remembered the songs her grandmother used to sing",
        "argued for a new library with many windows",
        "walked slowly along the frozen canal at dawn",
        "painted the fence a bright and cheerful yellow",
        "listened to the rain falling on the tin roof",
    ];
    let mut lines = String::new();
    for doc in 0..40usize {
        let mut body = String::new();
        for s in 0..6usize {
            let subj = subjects[(doc * 3 + s) % subjects.len()];
            let verb = verbs[(doc * 5 + s * 7) % verbs.len()];
            body.push_str(&format!(
                "{subj} {verb}, and on day {} it was noted. ",
                doc * 6 + s
            ));
        }
        let line = serde_json::json!({ "text": body.trim_end() });
        lines.push_str(&line.to_string());
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

fn log_rows(dir: &Path) -> Vec<LogRow> {
    let body = std::fs::read_to_string(dir.join("training_log.jsonl")).unwrap();
    body.lines()
        .map(|l| serde_json::from_str::<LogRow>(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn assert_finite_log(dir: &Path, rows: &[LogRow]) {
    // 256 tokens / 64 rows per step = 4 steps, logged every step.
    let steps: Vec<u64> = rows.iter().map(|r| r.step).collect();
    assert_eq!(steps, [1, 2, 3, 4], "{}", dir.display());
    let tokens: Vec<u64> = rows.iter().map(|r| r.tokens).collect();
    assert_eq!(tokens, [64, 128, 192, 256], "{}", dir.display());
    for r in rows {
        for (what, v) in [
            ("loss", r.loss),
            ("mse", r.mse),
            ("l0", r.l0),
            ("explained_variance", r.explained_variance),
        ] {
            assert!(v.is_finite(), "{}: {what} = {v} in {r:?}", dir.display());
        }
        assert!(r.loss > 0.0 && r.mse > 0.0, "{}: {r:?}", dir.display());
        assert!(r.lr > 0.0 && r.lr.is_finite(), "{r:?}");
    }
}

#[test]
fn train_streams_from_the_model_and_resumes_a_finished_run() {
    let root = scratch("e2e");
    let corpus = root.join("corpus.jsonl");
    write_corpus(&corpus);
    let out = root.join("out");
    let cfg = format!(
        "out = {out:?}\ntokens = 256\nbatch_size = 64\ninit_sample_rows = 64\n\
         log_every_steps = 1\n\
         [data]\nmodel = \"smollm2-135m\"\ncorpus = {corpus:?}\ncontext_size = 32\n\
         forward_batch = 4\nshuffle_buffer_rows = 128\n\
         [[dict]]\nname = \"resid\"\nhook = \"blocks.2.hook_resid_post\"\nactivation = \"topk\"\n\
         d_sae = 128\nk = 8\n\
         [[dict]]\nname = \"mlp_tc\"\nhook = \"blocks.2.hook_mlp_in\"\n\
         hook_out = \"blocks.2.hook_mlp_out\"\nactivation = \"relu\"\nd_sae = 128\n",
        out = out.display().to_string(),
        corpus = corpus.display().to_string(),
    );
    let path = root.join("run.toml");
    std::fs::write(&path, cfg).unwrap();
    let p = path.to_str().unwrap();

    let r = scalpel(&["train", p, "--json"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let v: Value = serde_json::from_str(&text(&r.stdout)).expect("stdout is one JSON document");
    assert_eq!(v["finished"], true, "{v}");
    assert_eq!(v["steps"], 4, "{v}");
    assert_eq!(v["tokens"], 256, "the corpus lasts the whole budget: {v}");
    assert_eq!(v["resumed_from_tokens"], Value::Null, "{v}");
    let dicts = v["dicts"].as_array().unwrap();
    assert_eq!(dicts.len(), 2, "{v}");
    assert_eq!(dicts[0]["name"], "resid");
    assert_eq!(dicts[0]["architecture"], "topk");
    assert_eq!(dicts[0]["hook_name"], "blocks.2.hook_resid_post");
    assert_eq!(dicts[0]["hook_name_out"], Value::Null);
    assert_eq!(
        (&dicts[0]["d_in"], &dicts[0]["d_sae"]),
        (&576.into(), &128.into())
    );
    assert_eq!(dicts[1]["name"], "mlp_tc");
    assert_eq!(dicts[1]["architecture"], "transcoder");
    assert_eq!(dicts[1]["hook_name"], "blocks.2.hook_mlp_in");
    assert_eq!(dicts[1]["hook_name_out"], "blocks.2.hook_mlp_out");
    assert_eq!(
        (&dicts[1]["d_in"], &dicts[1]["d_sae"]),
        (&576.into(), &128.into())
    );
    for d in dicts {
        assert_eq!(d["last"]["step"], 4, "{d}");
        assert_eq!(d["last"]["tokens"], 256, "{d}");
    }

    // The SAE on the residual stream.
    let resid = out.join("resid");
    for f in [
        "cfg.json",
        "sae_weights.safetensors",
        "sparsity.safetensors",
        "training_log.jsonl",
        "run.toml",
    ] {
        assert!(
            resid.join(f).is_file(),
            "{f} missing in {}",
            resid.display()
        );
    }
    let raw: Value =
        serde_json::from_str(&std::fs::read_to_string(resid.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(raw["architecture"], "topk", "{raw}");
    assert_eq!(raw["d_in"], 576, "{raw}");
    assert_eq!(raw["d_sae"], 128, "{raw}");
    let sae = saelens::load(&resid, &Device::Cpu).unwrap();
    assert_eq!(sae.cfg.architecture, Architecture::Topk);
    assert_eq!(
        (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k),
        (576, 128, Some(8))
    );
    let m = &sae.cfg.metadata;
    assert_eq!(m.hook_name.as_deref(), Some("blocks.2.hook_resid_post"));
    assert_eq!(m.hook_name_out, None);
    assert_eq!(m.model_name.as_deref(), Some("smollm2-135m"));
    assert_eq!(m.context_size, Some(32));
    assert_eq!(m.prepend_bos, Some(true));
    assert_eq!(m.dataset_path.as_deref(), corpus.to_str());
    assert_eq!(m.extra.get("training_tokens"), Some(&Value::from(256)));
    assert!(!m.extra.contains_key("activation_store"), "{m:?}");
    assert!(sae.sparsity.is_some());
    let resid_log = log_rows(&resid);
    assert_finite_log(&resid, &resid_log);
    // TopK keeps exactly k latents per row; no sparsity penalty.
    assert!(
        resid_log
            .iter()
            .all(|r| r.l0 == 8.0 && r.sparsity_loss == 0.0),
        "{resid_log:?}"
    );

    // The transcoder mlp_in -> mlp_out.
    let tc_dir = out.join("mlp_tc");
    let raw: Value =
        serde_json::from_str(&std::fs::read_to_string(tc_dir.join("cfg.json")).unwrap()).unwrap();
    assert_eq!(raw["architecture"], "transcoder", "{raw}");
    assert_eq!(raw["d_in"], 576, "{raw}");
    let tc = saelens::load(&tc_dir, &Device::Cpu).unwrap();
    assert_eq!(tc.cfg.architecture, Architecture::Transcoder);
    assert_eq!(
        (tc.cfg.d_in, tc.cfg.d_sae, tc.cfg.d_out),
        (576, 128, Some(576))
    );
    let m = &tc.cfg.metadata;
    assert_eq!(m.hook_name.as_deref(), Some("blocks.2.hook_mlp_in"));
    assert_eq!(m.hook_name_out.as_deref(), Some("blocks.2.hook_mlp_out"));
    assert_eq!(m.model_name.as_deref(), Some("smollm2-135m"));
    let tc_log = log_rows(&tc_dir);
    assert_finite_log(&tc_dir, &tc_log);
    // The relu transcoder pays an L1 penalty.
    assert!(tc_log.iter().all(|r| r.sparsity_loss > 0.0), "{tc_log:?}");

    // The weights actually moved away from each other (two distinct trained dictionaries).
    let w_sae = std::fs::read(resid.join("sae_weights.safetensors")).unwrap();
    let w_tc = std::fs::read(tc_dir.join("sae_weights.safetensors")).unwrap();
    assert_ne!(w_sae, w_tc);
    let log_bytes = [
        std::fs::read(resid.join("training_log.jsonl")).unwrap(),
        std::fs::read(tc_dir.join("training_log.jsonl")).unwrap(),
    ];
    assert!(
        out.join("checkpoints").is_dir(),
        "final checkpoint kept for a resume"
    );

    // Rerun: the final checkpoint is found, nothing is left to train, and the dictionaries are
    // rewritten bit-identical.
    let r = scalpel(&["train", p, "--json"]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let v: Value = serde_json::from_str(&text(&r.stdout)).expect("stdout is one JSON document");
    assert_eq!(v["resumed_from_tokens"], 256, "{v}");
    assert_eq!(v["finished"], true, "{v}");
    assert_eq!(v["steps"], 4, "{v}");
    assert_eq!(v["tokens"], 256, "{v}");
    assert_eq!(v["dicts"].as_array().unwrap().len(), 2, "{v}");
    assert_eq!(
        std::fs::read(resid.join("sae_weights.safetensors")).unwrap(),
        w_sae
    );
    assert_eq!(
        std::fs::read(tc_dir.join("sae_weights.safetensors")).unwrap(),
        w_tc
    );
    // The logs are rewritten from the checkpoint's copy: byte-identical (serde_json's
    // `float_roundtrip` reads every f64 back exactly).
    for (dir, before) in [&resid, &tc_dir].into_iter().zip(&log_bytes) {
        let after = std::fs::read(dir.join("training_log.jsonl")).unwrap();
        assert_eq!(
            &after,
            before,
            "{}: training log changed on rerun",
            dir.display()
        );
    }

    // The human-readable summary of a rerun says where it resumed.
    let r = scalpel(&["train", p]);
    assert!(r.status.success(), "{}", text(&r.stderr));
    let s = text(&r.stdout);
    assert!(
        s.contains("trained 2 dictionaries on 256 tokens") && s.contains("resumed at 256"),
        "{s}"
    );
    assert!(
        s.contains("blocks.2.hook_mlp_in -> blocks.2.hook_mlp_out"),
        "{s}"
    );
}
