//! The real default model, SmolLM2-135M-Instruct (Q4_1 GGUF), against Hugging Face
//! `transformers` loading the same file (`scripts/make_smollm2_fixtures.py`).

mod common;

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor, D};
use common::{assert_close, fixture, smollm2_gguf};
use scalpel_core::Hooks;
use scalpel_models::hub::ModelFiles;
use scalpel_models::loader::{load_files, LoadedModel};

fn model() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| load_files(ModelFiles::Gguf(smollm2_gguf()), &Device::Cpu).unwrap())
}

fn refs() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture("smollm2/reference.safetensors"), &Device::Cpu).unwrap()
}

#[test]
fn config_read_from_gguf_metadata() {
    let c = model().model.config();
    assert_eq!(
        (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.d_head, c.d_mlp, c.d_vocab),
        (30, 576, 9, 3, 64, 1536, 49152)
    );
    assert!(c.tied_embeddings);
    assert_eq!(model().stored.len(), 272);
}

#[test]
fn logits_and_hooks_match_transformers() {
    let r = refs();
    let m = &model().model;
    let tokens = r["input_ids"].to_dtype(DType::U32).unwrap();
    let names: Vec<&str> = r.keys().filter(|k| k.contains("hook")).map(|s| s.as_str()).collect();
    let points: Vec<_> = names.iter().map(|n| m.hook_point(n).unwrap()).collect();
    let mut hooks = Hooks::new().with_cache_points(points.clone());
    let logits = m.run_with_hooks(&tokens, &mut hooks).unwrap().squeeze(0).unwrap(); // [p, v]

    // Top-1 agreement at every position (>= 99%), allowing swaps only where the reference's own
    // top-2 gap is tiny.
    let top1: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let want: Vec<i64> = r["top1"].to_vec1().unwrap();
    let agree = top1.iter().zip(&want).filter(|(a, b)| **a as i64 == **b).count();
    let frac = agree as f64 / want.len() as f64;
    assert!(frac >= 0.99, "top-1 agreement {agree}/{} = {frac:.3}", want.len());

    // The reference's 20 best logits per position, within 2e-3 absolute (both sides dequantize
    // the same Q4_1 blocks; differences are f32 summation order over 30 layers).
    let ids = r["topk_ids"].to_dtype(DType::U32).unwrap();
    let ours = logits.gather(&ids, 1).unwrap();
    assert_close("top-20 logits", &ours, &r["topk_logits"], 2e-3, 1e-4);
    let lse = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let lse = (logits.narrow(1, 0, 1).unwrap() - lse.narrow(1, 0, 1).unwrap()).unwrap().squeeze(1).unwrap();
    assert_close("logsumexp", &lse, &r["logsumexp"], 2e-3, 1e-4);

    // Hooks, including q and k before rotary: these only agree if llama.cpp's Q/K row
    // permutation was undone.
    for (name, hp) in names.iter().zip(points) {
        let got = hooks.cache().get(hp).unwrap();
        let (atol, rtol) = if name.contains("pattern") { (1e-4, 1e-3) } else { (2e-3, 1e-3) };
        assert_close(name, got, &r[*name], atol, rtol);
    }
}

#[test]
fn tokenizer_ids_equal_transformers() {
    let r = refs();
    let tok = model().tokenizer().unwrap();
    let text = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(fixture("smollm2/meta.json")).unwrap(),
    )
    .unwrap()["paragraph"]
        .as_str()
        .unwrap()
        .to_string();
    let ids = tok.encode(&text, true).unwrap();
    let want: Vec<i64> = r["input_ids"].squeeze(0).unwrap().to_vec1().unwrap();
    assert_eq!(ids.iter().map(|&x| x as i64).collect::<Vec<_>>(), want);
}

#[test]
fn batched_padded_forward_equals_single_rows() {
    let m = &model().model;
    let tok = model().tokenizer().unwrap();
    let a = tok.encode("The capital of France is", false).unwrap();
    let b = tok.encode("Hello", false).unwrap();
    let p = a.len();
    let mut padded = vec![2u32; p - b.len()];
    padded.extend(&b);
    let mut mask = vec![0u32; p - b.len()];
    mask.extend(vec![1u32; b.len()]);
    let tokens = Tensor::new(vec![a.clone(), padded], &Device::Cpu).unwrap();
    let mask = Tensor::new(vec![vec![1u32; p], mask], &Device::Cpu).unwrap();
    let batch = m
        .forward_with(&tokens, Some(&mask), &mut Hooks::new(), Default::default())
        .unwrap();
    let alone = m.forward(&Tensor::new(vec![b.clone()], &Device::Cpu).unwrap()).unwrap();
    let row = batch.get(1).unwrap().narrow(0, p - b.len(), b.len()).unwrap().unsqueeze(0).unwrap();
    assert_close("padded row vs alone", &row, &alone, 1e-3, 1e-4);
}
