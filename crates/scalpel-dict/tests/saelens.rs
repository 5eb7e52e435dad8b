//! SAELens parity and file-format tests against fixtures written by SAELens itself
//! (`scripts/make_sae_fixtures.py`), bad-input errors, and splicing into the tiny llama fixture.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use scalpel_core::Hooks;
use scalpel_dict::{saelens, splice, Architecture, DictConfig, Sae};

/// Fixture directories and the architecture each holds.
const FIXTURES: [(&str, &str); 9] = [
    ("standard", "standard"),
    ("topk", "topk"),
    ("jumprelu", "jumprelu"),
    ("gated", "gated"),
    ("transcoder", "transcoder"),
    ("skip_transcoder", "skip_transcoder"),
    ("jumprelu_transcoder", "jumprelu_transcoder"),
    ("standard_layer_norm", "standard"),
    ("topk_constant_norm_rescale", "topk"),
];

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/saelens")
        .join(rel)
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `|a − e| ≤ atol + rtol·|e|` elementwise; names the worst index on failure. Returns max |a − e|.
fn assert_close(name: &str, a: &Tensor, e: &Tensor, atol: f32, rtol: f32) -> f32 {
    assert_eq!(a.dims(), e.dims(), "{name}: shape");
    let (a, e) = (flat(a), flat(e));
    let mut worst = (0usize, 0f32);
    let mut max = 0f32;
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
        max = max.max((x - y).abs());
        if excess > worst.1 || excess.is_nan() {
            worst = (
                i,
                if excess.is_nan() {
                    f32::INFINITY
                } else {
                    excess
                },
            );
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{name}: element {} is {} vs expected {} (excess {})",
        worst.0,
        a[worst.0],
        e[worst.0],
        worst.1
    );
    max
}

fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap()
}

fn check_parity(name: &str, sae: &Sae, r: &HashMap<String, Tensor>) {
    let (f, norm) = sae.encode_with_norm(&r["x"]).unwrap();
    assert_close(
        &format!("{name} encode"),
        &f,
        &r["feature_acts"],
        1e-5,
        1e-5,
    );
    let d = sae.decode_with_norm(&r["feature_acts"], &norm).unwrap();
    assert_close(&format!("{name} decode"), &d, &r["decoded"], 1e-5, 1e-5);
    let y = sae.forward(&r["x"]).unwrap();
    assert_close(&format!("{name} forward"), &y, &r["forward"], 1e-5, 1e-5);
    let active = flat(&f).iter().filter(|v| **v != 0.0).count();
    assert!(
        active > 0,
        "{name}: no feature fired, the test would be vacuous"
    );
}

#[test]
fn every_fixture_matches_saelens() {
    for (name, arch) in FIXTURES {
        let dir = fixture(name);
        let sae = saelens::load(&dir, &Device::Cpu).unwrap();
        assert_eq!(sae.cfg.architecture.name(), arch);
        check_parity(name, &sae, &reference(&dir));
    }
    let topk = saelens::load(&fixture("topk"), &Device::Cpu).unwrap();
    let f = flat(&topk.encode(&reference(&fixture("topk"))["x"]).unwrap());
    for row in f.chunks(topk.cfg.d_sae) {
        assert!(row.iter().filter(|v| **v != 0.0).count() <= 4);
    }
}

#[test]
fn pre_6_flat_config_reads_and_matches() {
    let dir = fixture("pre6");
    let sae = saelens::load(&dir, &Device::Cpu).unwrap();
    assert_eq!(sae.cfg.architecture, Architecture::Topk);
    assert_eq!(sae.cfg.k, Some(4));
    assert_eq!(sae.cfg.dtype, "float32");
    assert_eq!(
        sae.cfg.metadata.hook_name.as_deref(),
        Some("blocks.0.hook_resid_post")
    );
    assert_eq!(
        sae.cfg.metadata.sae_lens_training_version.as_deref(),
        Some("3.13.1")
    );
    check_parity("pre6", &sae, &reference(&dir));
}

#[test]
fn save_load_round_trip_is_bit_exact() {
    for arch in FIXTURES.map(|(dir, _)| dir).into_iter().chain(["pre6"]) {
        let mut sae = saelens::load(&fixture(arch), &Device::Cpu).unwrap();
        if arch == "standard" {
            sae.sparsity = Some(Tensor::randn(-3f32, 1.0, 48, &Device::Cpu).unwrap());
        }
        let tmp = tempfile::tempdir().unwrap();
        saelens::save(&sae, tmp.path()).unwrap();
        let back = saelens::load(tmp.path(), &Device::Cpu).unwrap();
        assert_eq!(back.cfg, sae.cfg, "{arch}: config");
        let (a, b) = (sae.named_tensors(), back.named_tensors());
        assert_eq!(a.len(), b.len());
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let bits = |t: &Tensor| flat(t).iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(ta),
                bits(tb),
                "{arch}: {na} differs after a round trip"
            );
        }
        assert_eq!(
            sae.sparsity.as_ref().map(flat),
            back.sparsity.as_ref().map(flat),
            "{arch}: sparsity"
        );
        // The written config is 6.x: SAELens reads it without the pre-6 path.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("cfg.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architecture"], sae.cfg.architecture.name());
        assert!(cfg["metadata"]["hook_name"].is_string());
    }
}

/// Copies the fixture `arch` to a temp dir, letting the `edit_*` functions change its config JSON
/// and tensors, and returns the load error.
fn broken(
    arch: &str,
    edit_cfg: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> String {
    let src = fixture(arch);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("cfg.json")).unwrap()).unwrap();
    edit_cfg(&mut cfg);
    std::fs::write(tmp.path().join("cfg.json"), cfg.to_string()).unwrap();
    let mut t =
        candle_core::safetensors::load(src.join("sae_weights.safetensors"), &Device::Cpu).unwrap();
    edit_tensors(&mut t);
    candle_core::safetensors::save(&t, tmp.path().join("sae_weights.safetensors")).unwrap();
    match saelens::load(tmp.path(), &Device::Cpu) {
        Ok(_) => panic!("a broken dictionary loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn transposed_w_enc_is_named() {
    let msg = broken(
        "standard",
        |_| {},
        |t| {
            let w = t["W_enc"].t().unwrap().contiguous().unwrap();
            t.insert("W_enc".into(), w);
        },
    );
    assert!(
        msg.contains("`W_enc`")
            && msg.contains("[48, 16]")
            && msg.contains("[16, 48]")
            && msg.contains("transposed")
            && msg.contains("sae_weights.safetensors"),
        "{msg}"
    );
}

#[test]
fn k_larger_than_d_sae_is_refused() {
    let msg = broken("topk", |c| c["k"] = 49.into(), |_| {});
    assert!(
        msg.contains("`k`") && msg.contains("49") && msg.contains("cfg.json"),
        "{msg}"
    );
}

#[test]
fn unknown_architecture_is_named() {
    let msg = broken("standard", |c| c["architecture"] = "mystery".into(), |_| {});
    assert!(
        msg.contains("mystery") && msg.contains("architecture"),
        "{msg}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let msg = broken(
        "jumprelu",
        |_| {},
        |t| {
            t.remove("threshold");
        },
    );
    assert!(
        msg.contains("`threshold`") && msg.contains("jumprelu") && msg.contains("sae_weights"),
        "{msg}"
    );
}

#[test]
fn bad_input_width_is_refused() {
    let sae = saelens::load(&fixture("standard"), &Device::Cpu).unwrap();
    let x = Tensor::zeros((2, 15), DType::F32, &Device::Cpu).unwrap();
    let msg = sae.encode(&x).unwrap_err().to_string();
    assert!(msg.contains("[2, 15]") && msg.contains("16"), "{msg}");
}

/// The tiny llama fixture of scalpel-models (d_model 64, 2 layers).
fn llama() -> scalpel_models::transformer::Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../scalpel-models/tests/fixtures/models/llama");
    scalpel_models::loader::load_hf_dir(&dir, &Device::Cpu)
        .unwrap()
        .0
}

/// Splices `sae` into the tiny llama fixture, replacing `output`: with the error term the logits
/// must equal the clean ones, without it they must change.
fn assert_splice(sae: &Sae, output: &str) {
    let model = llama();
    let tokens = Tensor::new(
        &[[1u32, 17, 42, 99, 5, 23], [1, 8, 3, 64, 120, 7]],
        &Device::Cpu,
    )
    .unwrap();
    let clean = model.forward(&tokens).unwrap();
    let point = model.hook_point(output).unwrap();
    let logits = |keep| {
        let mut hooks = splice(sae, Hooks::new(), point, keep).unwrap();
        model.run_with_hooks(&tokens, &mut hooks).unwrap()
    };
    assert_close("keep_error", &logits(true), &clean, 1e-4, 1e-4);
    let diff = assert_close("no error term", &logits(false), &clean, 1e9, 0.0);
    assert!(
        diff > 1e-2,
        "splicing without the error term changed the logits by only {diff}"
    );
}

#[test]
fn splicing_an_sae_with_the_error_term_reproduces_clean_logits() {
    let mut cfg = DictConfig::new(Architecture::Topk, 64, 128);
    cfg.k = Some(8);
    let sae = Sae::random(cfg, 0.2, &Device::Cpu).unwrap();
    assert_splice(&sae, "blocks.0.hook_resid_post");
}

#[test]
fn splicing_a_transcoder_reads_one_hook_and_writes_another() {
    let mut cfg = DictConfig::new(Architecture::SkipTranscoder, 64, 128);
    // The MLP's input: the model must expose this hook (HookPoint::parse would accept a name the
    // model never runs, and the splice would then fail at the output hook).
    cfg.metadata.hook_name = Some("blocks.1.ln2.hook_normalized".into());
    cfg.metadata.hook_name_out = Some("blocks.1.hook_mlp_out".into());
    let sae = Sae::random(cfg, 0.2, &Device::Cpu).unwrap();
    assert_splice(&sae, "blocks.1.hook_mlp_out");
}

#[test]
fn transcoder_output_before_its_input_is_an_error() {
    let mut cfg = DictConfig::new(Architecture::Transcoder, 64, 32);
    cfg.metadata.hook_name = Some("blocks.1.hook_resid_post".into());
    let sae = Sae::random(cfg, 0.2, &Device::Cpu).unwrap();
    let model = llama();
    let tokens = Tensor::new(&[[1u32, 17, 42]], &Device::Cpu).unwrap();
    let point = model.hook_point("blocks.0.hook_mlp_out").unwrap();
    let mut hooks = splice(&sae, Hooks::new(), point, true).unwrap();
    let msg = model
        .run_with_hooks(&tokens, &mut hooks)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("was not seen before"), "{msg}");
}
