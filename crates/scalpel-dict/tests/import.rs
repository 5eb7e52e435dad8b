//! Importers of foreign dictionary formats against fixtures written by
//! `scripts/make_import_fixtures.py` (expected values from each source's own formula, in numpy),
//! and the errors for transposed tensors, missing tensors and bad `.npy` headers.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use scalpel_dict::import::{self, TranscoderSetConfig};
use scalpel_dict::Architecture;

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/import")
        .join(rel)
}

fn expected(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `|a − e| ≤ atol + rtol·|e|` elementwise; names the worst index on failure.
fn assert_close(name: &str, a: &Tensor, e: &Tensor, atol: f32, rtol: f32) {
    assert_eq!(a.dims(), e.dims(), "{name}: shape");
    let (a, e) = (flat(a), flat(e));
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        let excess = (x - y).abs() - (atol + rtol * y.abs());
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
    let i = worst.0;
    assert!(
        worst.1 <= 0.0,
        "{name}: index {i}: {} vs expected {}",
        a[i],
        e[i]
    );
}

#[test]
fn sparsify_topk_matches_sparsify_formula() {
    let dir = fixture("sparsify/layers.3");
    let sae = import::sparsify(&dir, None, &Device::Cpu).unwrap();
    let e = expected("sparsify/layers.3/expected.safetensors");
    assert_eq!(sae.cfg.architecture, Architecture::Topk);
    assert_eq!((sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k), (16, 32, Some(4)));
    assert!(sae.cfg.apply_b_dec_to_input);
    assert_eq!(
        sae.cfg.metadata.hook_name.as_deref(),
        Some("blocks.3.hook_resid_post")
    );
    for name in ["W_enc", "b_enc", "W_dec", "b_dec"] {
        assert_close(name, sae.tensor(name).unwrap(), &e[name], 0.0, 0.0);
    }
    let f = sae.encode(&e["x"]).unwrap();
    assert_close("feature_acts", &f, &e["feature_acts"], 1e-5, 1e-4);
    assert_close(
        "forward",
        &sae.forward(&e["x"]).unwrap(),
        &e["forward"],
        1e-5,
        1e-4,
    );
    // The round trip through SAELens's own format keeps everything.
    let tmp = tempfile::tempdir().unwrap();
    scalpel_dict::saelens::save(&sae, tmp.path()).unwrap();
    let back = scalpel_dict::saelens::load(tmp.path(), &Device::Cpu).unwrap();
    assert_eq!(back.cfg, sae.cfg);
}

#[test]
fn sparsify_transcoder_reads_mlp_in_without_b_dec() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model.layers.2.mlp");
    copy_dir(&fixture("sparsify/layers.3"), &dir);
    let cfg = std::fs::read_to_string(dir.join("cfg.json")).unwrap();
    let cfg = cfg.replace("\"transcode\": false", "\"transcode\": true");
    std::fs::write(dir.join("cfg.json"), cfg).unwrap();
    let sae = import::sparsify(&dir, None, &Device::Cpu).unwrap();
    assert!(!sae.cfg.apply_b_dec_to_input);
    assert_eq!(
        sae.cfg.metadata.hook_name.as_deref(),
        Some("blocks.2.hook_mlp_in")
    );
    assert_eq!(
        sae.cfg.metadata.hook_name_out.as_deref(),
        Some("blocks.2.hook_mlp_out")
    );
    // sparsify's transcoder encodes its input as is: its features at x - b_dec are the
    // autoencoder's at x.
    let e = expected("sparsify/layers.3/expected.safetensors");
    let x = (&e["x"]
        - e["b_dec"]
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((6, 16))
            .unwrap())
    .unwrap();
    assert_close(
        "feature_acts",
        &sae.encode(&x).unwrap(),
        &e["feature_acts"],
        1e-5,
        1e-4,
    );
}

#[test]
fn hf_module_paths_map_to_transformer_lens_hooks() {
    let cases = [
        ("layers.10", Some("blocks.10.hook_resid_post")),
        ("layers.10.mlp", Some("blocks.10.hook_mlp_out")),
        ("model.layers.2.self_attn", Some("blocks.2.hook_attn_out")),
        ("gpt_neox.layers.0", Some("blocks.0.hook_resid_post")),
        ("transformer.h.5.mlp", Some("blocks.5.hook_mlp_out")),
        ("layers.10.mlp.act_fn", None),
        ("embed_tokens", None),
    ];
    for (module, hook) in cases {
        assert_eq!(
            import::hf_module_to_hook(module).as_deref(),
            hook,
            "{module}"
        );
    }
}

/// Copies a fixture directory so a test can break one of its files.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn sparsify_wrong_orientation_and_missing_tensor_name_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("layers.3");
    copy_dir(&fixture("sparsify/layers.3"), &dir);
    let weights = dir.join("sae.safetensors");
    let mut t = candle_core::safetensors::load(&weights, &Device::Cpu).unwrap();
    // SAELens orientation where sparsify's is expected.
    let w = t["encoder.weight"].t().unwrap().contiguous().unwrap();
    t.insert("encoder.weight".into(), w);
    candle_core::safetensors::save(&t, &weights).unwrap();
    let e = import::sparsify(&dir, None, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sae.safetensors") && e.contains("`encoder.weight`") && e.contains("transposed"),
        "{e}"
    );
    t.remove("encoder.weight");
    candle_core::safetensors::save(&t, &weights).unwrap();
    let e = import::sparsify(&dir, None, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("sae.safetensors") && e.contains("missing tensor `encoder.weight`"),
        "{e}"
    );
}

#[test]
fn gemma_scope_jumprelu_matches_gemma_scope_formula() {
    let path = fixture("gemma_scope/params.npz");
    let sae = import::gemma_scope(&path, "blocks.5.hook_resid_post", None, &Device::Cpu).unwrap();
    let e = expected("gemma_scope/expected.safetensors");
    assert_eq!(sae.cfg.architecture, Architecture::Jumprelu);
    assert!(!sae.cfg.apply_b_dec_to_input);
    assert_eq!(
        sae.cfg.metadata.hook_name.as_deref(),
        Some("blocks.5.hook_resid_post")
    );
    for name in ["W_enc", "b_enc", "W_dec", "b_dec", "threshold"] {
        assert_close(name, sae.tensor(name).unwrap(), &e[name], 0.0, 0.0);
    }
    let f = sae.encode(&e["x"]).unwrap();
    assert_close("feature_acts", &f, &e["feature_acts"], 1e-5, 1e-4);
    assert_close(
        "forward",
        &sae.forward(&e["x"]).unwrap(),
        &e["forward"],
        1e-5,
        1e-4,
    );
    // float16 params read too, equal to the f32 ones to half precision.
    let half = import::gemma_scope(
        &fixture("gemma_scope/params_f16.npz"),
        "blocks.5.hook_resid_post",
        None,
        &Device::Cpu,
    )
    .unwrap();
    assert_close(
        "W_enc f16",
        half.tensor("W_enc").unwrap(),
        &e["W_enc"],
        1e-4,
        1e-3,
    );
    // An unknown hook is refused with the field named.
    let err = import::gemma_scope(&path, "blocks.5.hook_nonsense", None, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hook_name"), "{err}");
}

/// An `.npy` with the given header dict and `n` float32 zeros.
fn npy(header: &str, n: usize) -> Vec<u8> {
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    out.extend(vec![0u8; 4 * n]);
    out
}

#[test]
fn npy_headers_parse_and_bad_ones_say_why() {
    let t = import::parse_npy(
        &npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }",
            6,
        ),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(t.dims(), [2, 3]);
    let t = import::parse_npy(
        &npy(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (5,), }",
            5,
        ),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(t.dims(), [5]);
    let cases = [
        (
            "{'descr': '<i8', 'fortran_order': False, 'shape': (2,), }",
            4,
            "`<i8`",
        ),
        (
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }",
            2,
            "fortran_order",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
            2,
            "expected 12",
        ),
        (
            "{'descr': '<f4', 'fortran_order': False, }",
            2,
            "no `shape`",
        ),
    ];
    for (header, n, want) in cases {
        let e = import::parse_npy(&npy(header, n), &Device::Cpu).unwrap_err();
        assert!(e.contains(want), "{header}: {e}");
    }
    let e = import::parse_npy(b"PK\x03\x04", &Device::Cpu).unwrap_err();
    assert!(e.contains("magic"), "{e}");
}

#[test]
fn bad_npz_member_names_file_and_array() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("params.npz");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("W_enc.npy", opts).unwrap();
    zip.write_all(&npy(
        "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }",
        2,
    ))
    .unwrap();
    zip.finish().unwrap();
    let e = import::gemma_scope(&path, "blocks.0.hook_resid_post", None, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("params.npz:W_enc") && e.contains("`>f4`"), "{e}");
}

#[test]
fn gemma_scope_transposed_w_dec_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let e = expected("gemma_scope/expected.safetensors");
    let path = tmp.path().join("params.npz");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    for name in ["W_enc", "W_dec", "b_enc", "b_dec", "threshold"] {
        let t = if name == "W_dec" {
            e[name].t().unwrap().contiguous().unwrap()
        } else {
            e[name].clone()
        };
        let shape = t.dims().iter().map(|d| format!("{d},")).collect::<String>();
        let mut bytes = npy(
            &format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({shape}), }}"),
            0,
        );
        for v in flat(&t) {
            bytes.extend(v.to_le_bytes());
        }
        zip.start_file(format!("{name}.npy"), opts).unwrap();
        zip.write_all(&bytes).unwrap();
    }
    zip.finish().unwrap();
    let err = import::gemma_scope(&path, "blocks.0.hook_resid_post", None, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("params.npz") && err.contains("`W_dec`") && err.contains("transposed"),
        "{err}"
    );
}

#[test]
fn circuit_tracer_set_matches_circuit_tracer_formula() {
    let saes =
        import::circuit_tracer(&fixture("circuit_tracer/config.yaml"), &Device::Cpu).unwrap();
    let e = expected("circuit_tracer/expected.safetensors");
    assert_eq!(saes.len(), 2);
    let archs = [
        Architecture::JumpreluTranscoder,
        Architecture::SkipTranscoder,
    ];
    for (layer, sae) in saes.iter().enumerate() {
        assert_eq!(sae.cfg.architecture, archs[layer]);
        assert_eq!(
            (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.d_out),
            (16, 32, Some(16))
        );
        assert_eq!(
            sae.cfg.metadata.hook_name,
            Some(format!("blocks.{layer}.hook_mlp_in"))
        );
        assert_eq!(
            sae.cfg.metadata.hook_name_out,
            Some(format!("blocks.{layer}.hook_mlp_out"))
        );
        assert_eq!(sae.cfg.metadata.model_name.as_deref(), Some("tiny/model"));
        let w = &e[&format!("{layer}.W_enc")];
        assert_close("W_enc", sae.tensor("W_enc").unwrap(), w, 0.0, 0.0);
        let f = sae.encode(&e["x"]).unwrap();
        assert_close(
            &format!("{layer}.feature_acts"),
            &f,
            &e[&format!("{layer}.feature_acts")],
            1e-5,
            1e-4,
        );
        assert_close(
            &format!("{layer}.forward"),
            &sae.forward(&e["x"]).unwrap(),
            &e[&format!("{layer}.forward")],
            1e-5,
            1e-4,
        );
    }
}

#[test]
fn circuit_tracer_config_yaml_forms() {
    let cfg = TranscoderSetConfig::parse(
        "model_kind: 'transcoder_set'\nfeature_input_hook: hook_resid_mid\n\
         feature_output_hook: mlp.hook_out\nactivation: topk\nk: 8\ntranscoders:\n  1: b.safetensors\n  0: \"hf://org/repo/a.safetensors\"\n",
        "config.yaml",
    )
    .unwrap();
    assert_eq!(
        cfg.transcoders,
        ["hf://org/repo/a.safetensors", "b.safetensors"]
    );
    assert_eq!((cfg.activation.as_deref(), cfg.k), (Some("topk"), Some(8)));
    assert_eq!(
        import::circuit_tracer_hook(&cfg.feature_output_hook, 3),
        "blocks.3.hook_mlp_out"
    );
    let e = TranscoderSetConfig::parse(
        "model_kind: cross_layer_transcoder\nfeature_input_hook: a\nfeature_output_hook: b\ntranscoders:\n - x\n",
        "config.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("config.yaml") && e.contains("model_kind"), "{e}");
    let e = TranscoderSetConfig::parse(
        "model_kind: transcoder_set\nfeature_input_hook: a\nfeature_output_hook: b\ntranscoders:\n  1: x\n",
        "config.yaml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("without gaps"), "{e}");
}

#[test]
fn circuit_tracer_transposed_and_missing_tensors_name_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture("circuit_tracer"), tmp.path());
    let layer1 = tmp.path().join("layer_1.safetensors");
    let mut t = candle_core::safetensors::load(&layer1, &Device::Cpu).unwrap();
    let w = t["W_enc"].t().unwrap().contiguous().unwrap();
    t.insert("W_enc".into(), w);
    candle_core::safetensors::save(&t, &layer1).unwrap();
    let config = tmp.path().join("config.yaml");
    let e = import::circuit_tracer(&config, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer_1.safetensors") && e.contains("`W_enc`") && e.contains("transposed"),
        "{e}"
    );
    let w = t["W_enc"].t().unwrap().contiguous().unwrap();
    t.insert("W_enc".into(), w);
    t.remove("W_dec");
    candle_core::safetensors::save(&t, &layer1).unwrap();
    let e = import::circuit_tracer(&config, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("layer_1.safetensors") && e.contains("`W_dec`"),
        "{e}"
    );
}
