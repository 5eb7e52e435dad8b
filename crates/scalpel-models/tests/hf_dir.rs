//! Loading Hugging Face directories: sharded checkpoints, and every kind of broken input giving a
//! clear error that names the file or tensor (never a panic).

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture};
use scalpel_models::loader::load_hf_dir;
use scalpel_models::ModelError;

fn copy_fixture(family: &str, to: &Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(&format!("models/{family}/{f}")), to.join(f)).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match load_hf_dir(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(fixture("models/qwen2/config.json"), dir.join("config.json")).unwrap();
    let all =
        candle_core::safetensors::load(fixture("models/qwen2/model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let tensors: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join(&file)).unwrap();
        for n in part.iter() {
            map.insert((*n).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (sharded, stored) = load_hf_dir(dir, &Device::Cpu).unwrap();
    assert_eq!(stored.len(), all.len());
    let (single, _) = load_hf_dir(&fixture("models/qwen2"), &Device::Cpu).unwrap();
    let tokens = Tensor::new(&[[3u32, 17, 99, 5]], &Device::Cpu).unwrap();
    assert_close(
        "sharded vs single",
        &sharded.forward(&tokens).unwrap(),
        &single.forward(&tokens).unwrap(),
        0.0,
        0.0,
    );
    // A shard named in the index but absent.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let e = load_err(dir);
    assert!(
        e.contains("model-00002-of-00002.safetensors") && e.contains("missing"),
        "{e}"
    );
}

#[test]
fn bf16_and_f16_checkpoints_are_read_as_f32() {
    let all =
        candle_core::safetensors::load(fixture("models/llama/model.safetensors"), &Device::Cpu)
            .unwrap();
    let write = |dtype: DType, name: &str| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixture("models/llama/config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let ts: std::collections::HashMap<String, Tensor> = all
            .iter()
            .map(|(k, v)| (k.clone(), v.to_dtype(dtype).unwrap()))
            .collect();
        candle_core::safetensors::save(&ts, dir.path().join(name)).unwrap();
        dir
    };
    let tokens = Tensor::new(&[[3u32, 17, 99, 5]], &Device::Cpu).unwrap();
    for dtype in [DType::BF16, DType::F16] {
        let half = write(dtype, "model.safetensors");
        let (m, stored) = load_hf_dir(half.path(), &Device::Cpu).unwrap();
        assert!(
            stored.iter().all(|t| t.dtype == format!("{dtype:?}")),
            "{dtype:?}"
        );
        // The same values, rounded then widened to f32 before saving: must give identical logits.
        let rounded: std::collections::HashMap<String, Tensor> = all
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap(),
                )
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            fixture("models/llama/config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        candle_core::safetensors::save(&rounded, dir.path().join("model.safetensors")).unwrap();
        let (want, _) = load_hf_dir(dir.path(), &Device::Cpu).unwrap();
        assert_close(
            &format!("{dtype:?} checkpoint"),
            &m.forward(&tokens).unwrap(),
            &want.forward(&tokens).unwrap(),
            0.0,
            0.0,
        );
    }
}

#[test]
fn missing_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("config.json"), "{e}");
    std::fs::copy(
        fixture("models/llama/config.json"),
        tmp.path().join("config.json"),
    )
    .unwrap();
    let e = load_err(tmp.path());
    assert!(e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_and_lying_safetensors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_fixture("llama", dir);
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    // Truncated: half the file.
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(dir);
    assert!(
        e.contains("model.safetensors") || e.contains(&dir.display().to_string()),
        "{e}"
    );
    assert!(e.contains("safetensors"), "{e}");
    // A header that claims more data than the file holds: grow the last offset.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let total_data = bytes.len() - 8 - n;
    let lie = header.replace(
        &format!("{total_data}]"),
        &format!("{}]", total_data + 4096),
    );
    assert_ne!(
        lie, header,
        "test setup: end offset {total_data} not found in header"
    );
    // Keep the header length identical by trimming trailing spaces safetensors pads with.
    let mut lie = lie.into_bytes();
    lie.resize(n, b' ');
    let mut forged = bytes[..8].to_vec();
    forged.extend(&lie);
    forged.extend(&bytes[8 + n..]);
    std::fs::write(dir.join("model.safetensors"), &forged).unwrap();
    let e = load_err(dir);
    assert!(e.contains("safetensors"), "{e}");
    // Not a safetensors file at all.
    std::fs::write(dir.join("model.safetensors"), b"hello").unwrap();
    let e = load_err(dir);
    assert!(e.contains("safetensors"), "{e}");
}

#[test]
fn tensors_of_the_wrong_shape_are_named_with_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_fixture("llama", dir);
    // Claim a larger MLP than the weights have.
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg = cfg.replace("\"intermediate_size\": 128", "\"intermediate_size\": 96");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err = load_hf_dir(dir, &Device::Cpu).err().unwrap();
    match &err {
        ModelError::TensorShape {
            name,
            expected,
            found,
        } => {
            assert_eq!(name, "model.layers.0.mlp.gate_proj.weight");
            assert_eq!(expected, &vec![96, 64]);
            assert_eq!(found, &vec![128, 64]);
        }
        other => panic!("expected a shape error, got {other}"),
    }
    assert!(err.to_string().contains("[96, 64]"));
}

#[test]
fn a_missing_tensor_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::copy(
        fixture("models/llama3/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let mut all =
        candle_core::safetensors::load(fixture("models/llama3/model.safetensors"), &Device::Cpu)
            .unwrap();
    all.remove("lm_head.weight");
    candle_core::safetensors::save(&all, dir.join("model.safetensors")).unwrap();
    let e = load_err(dir);
    assert!(e.contains("lm_head.weight"), "{e}");
}

#[test]
fn unsupported_and_broken_configs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_fixture("llama", dir);
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "t5", "d_model": 8}"#,
    )
    .unwrap();
    let e = load_err(dir);
    assert!(e.contains("t5") && e.contains("config.json"), "{e}");
    std::fs::write(dir.join("config.json"), "{ truncated").unwrap();
    let e = load_err(dir);
    assert!(e.contains("config.json"), "{e}");
}
