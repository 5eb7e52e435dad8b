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
        (
            c.n_layers,
            c.d_model,
            c.n_heads,
            c.n_kv_heads,
            c.d_head,
            c.d_mlp,
            c.d_vocab
        ),
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
    let names: Vec<&str> = r
        .keys()
        .filter(|k| k.contains("hook"))
        .map(|s| s.as_str())
        .collect();
    let points: Vec<_> = names.iter().map(|n| m.hook_point(n).unwrap()).collect();
    let mut hooks = Hooks::new().with_cache_points(points.clone());
    let logits = m
        .run_with_hooks(&tokens, &mut hooks)
        .unwrap()
        .squeeze(0)
        .unwrap(); // [p, v]

    // Top-1 agreement at every position (>= 99%), allowing swaps only where the reference's own
    // top-2 gap is tiny.
    let top1: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
    let want: Vec<i64> = r["top1"].to_vec1().unwrap();
    let agree = top1
        .iter()
        .zip(&want)
        .filter(|(a, b)| **a as i64 == **b)
        .count();
    let frac = agree as f64 / want.len() as f64;
    assert!(
        frac >= 0.99,
        "top-1 agreement {agree}/{} = {frac:.3}",
        want.len()
    );

    // The reference's 20 best logits per position, within 2e-3 absolute (both sides dequantize
    // the same Q4_1 blocks; differences are f32 summation order over 30 layers).
    let ids = r["topk_ids"].to_dtype(DType::U32).unwrap();
    let ours = logits.gather(&ids, 1).unwrap();
    assert_close("top-20 logits", &ours, &r["topk_logits"], 2e-3, 1e-4);
    let lse = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let lse = (logits.narrow(1, 0, 1).unwrap() - lse.narrow(1, 0, 1).unwrap())
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert_close("logsumexp", &lse, &r["logsumexp"], 2e-3, 1e-4);

    // Hooks, including q and k before rotary: these only agree if llama.cpp's Q/K row
    // permutation was undone.
    for (name, hp) in names.iter().zip(points) {
        let got = hooks.cache().get(hp).unwrap();
        let (atol, rtol) = if name.contains("pattern") {
            (1e-4, 1e-3)
        } else {
            (2e-3, 1e-3)
        };
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
    let alone = m
        .forward(&Tensor::new(vec![b.clone()], &Device::Cpu).unwrap())
        .unwrap();
    let row = batch
        .get(1)
        .unwrap()
        .narrow(0, p - b.len(), b.len())
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    assert_close("padded row vs alone", &row, &alone, 1e-3, 1e-4);
}

fn greedy_fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/greedy.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn greedy_generation_says_paris_and_matches_transformers() {
    use scalpel_models::generation::{generate, GenerateOptions};
    let g = greedy_fixture();
    let lm = model();
    let tok = lm.tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is", false).unwrap();
    assert_eq!(prompt, ids(&g["plain"]["prompt_ids"]));
    let opts = GenerateOptions {
        max_new_tokens: 12,
        ..Default::default()
    };
    let out = generate(&lm.model, &prompt, &opts, &mut Hooks::new(), |_| {}).unwrap();
    let text = tok.decode(&out.tokens, false).unwrap();
    assert!(text.starts_with(" Paris"), "{text:?}");
    // Every step whose reference top-2 gap is clear must agree exactly (cache path = full path).
    let want = ids(&g["plain"]["new_ids"]);
    assert_eq!(out.tokens, want, "ours {text:?}");
}

#[test]
fn chat_template_prompt_and_greedy_reply_match_transformers() {
    use scalpel_models::chat::ChatMessage;
    use scalpel_models::generation::{generate, GenerateOptions};
    let g = greedy_fixture();
    let lm = model();
    let tok = lm.tokenizer().unwrap();
    let msgs = [ChatMessage {
        role: "user".into(),
        content: g["chat"]["message"].as_str().unwrap().into(),
    }];
    let text = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(text, g["chat"]["prompt_text"].as_str().unwrap());
    let prompt = tok.encode(&text, false).unwrap();
    assert_eq!(prompt, ids(&g["chat"]["prompt_ids"]));
    let opts = GenerateOptions {
        max_new_tokens: 16,
        stop_tokens: tok.eos_ids().to_vec(),
        ..Default::default()
    };
    let out = generate(&lm.model, &prompt, &opts, &mut Hooks::new(), |_| {}).unwrap();
    let reply = tok.decode(&out.tokens, true).unwrap();
    assert!(reply.contains("Paris"), "{reply:?}");
    assert_eq!(out.tokens, ids(&g["chat"]["new_ids"]), "{reply:?}");
}

#[test]
fn kv_cache_steps_equal_a_full_forward() {
    use scalpel_models::transformer::KvCache;
    let m = &model().model;
    let tok = model().tokenizer().unwrap();
    let ids = tok.encode("One two three four five six", false).unwrap();
    let full = m
        .forward(&Tensor::new(vec![ids.clone()], &Device::Cpu).unwrap())
        .unwrap();
    let mut cache = KvCache::default();
    let mut hooks = Hooks::new();
    let head = Tensor::new(vec![ids[..3].to_vec()], &Device::Cpu).unwrap();
    let mut parts = vec![m
        .forward_cached(&head, None, &mut hooks, &mut cache)
        .unwrap()];
    for &t in &ids[3..] {
        let step = Tensor::new(vec![vec![t]], &Device::Cpu).unwrap();
        parts.push(
            m.forward_cached(&step, None, &mut hooks, &mut cache)
                .unwrap(),
        );
    }
    let stepped = Tensor::cat(&parts, 1).unwrap();
    assert_close("cached steps vs full forward", &stepped, &full, 1e-3, 1e-4);
}

#[test]
fn hooks_stay_active_during_generation() {
    use scalpel_core::HookPoint;
    use scalpel_models::generation::{generate, GenerateOptions};
    let lm = model();
    let tok = lm.tokenizer().unwrap();
    let prompt = tok.encode("The capital of France is", false).unwrap();
    let calls = std::cell::Cell::new(0);
    let mut offsets = Vec::new();
    {
        let mut hooks = Hooks::new().with_hook(HookPoint::resid_post(10), |x, ctx| {
            calls.set(calls.get() + 1);
            offsets.push(ctx.pos_offset);
            // Steer hard: zero the residual stream; the output must change.
            Ok(Some(x.zeros_like()?))
        });
        let opts = GenerateOptions {
            max_new_tokens: 4,
            ..Default::default()
        };
        let out = generate(&lm.model, &prompt, &opts, &mut hooks, |_| {}).unwrap();
        let text = tok.decode(&out.tokens, false).unwrap();
        assert!(
            !text.starts_with(" Paris"),
            "zeroing the residual changed nothing: {text:?}"
        );
    }
    assert_eq!(calls.get(), 4);
    assert_eq!(offsets, vec![0, 5, 6, 7]);
}

#[test]
fn sampling_is_reproducible_with_a_seed() {
    use scalpel_models::generation::{generate, GenerateOptions};
    let lm = model();
    let prompt = lm
        .tokenizer()
        .unwrap()
        .encode("Once upon a time", false)
        .unwrap();
    let opts = |seed| GenerateOptions {
        max_new_tokens: 10,
        temperature: 1.0,
        top_k: Some(50),
        top_p: Some(0.95),
        seed,
        ..Default::default()
    };
    let run = |seed| {
        generate(&lm.model, &prompt, &opts(seed), &mut Hooks::new(), |_| {})
            .unwrap()
            .tokens
    };
    assert_eq!(run(3), run(3));
    assert!(
        (0..4).any(|s| run(s) != run(3)),
        "different seeds never differ"
    );
}

#[test]
fn bad_requests_are_clear_errors() {
    use scalpel_models::generation::{generate, GenerateOptions};
    let m = &model().model;
    let err = generate(
        m,
        &[],
        &GenerateOptions::default(),
        &mut Hooks::new(),
        |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("empty prompt"), "{err}");
    let long = vec![5u32; m.config().n_ctx + 1];
    let err = m
        .forward(&Tensor::new(vec![long], &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(
        err.to_string().contains("longer than the model's context"),
        "{err}"
    );
    let err = m
        .forward(&Tensor::new(vec![vec![1u32, 60000]], &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let opts = GenerateOptions {
        temperature: -1.0,
        ..Default::default()
    };
    assert!(generate(m, &[1], &opts, &mut Hooks::new(), |_| {}).is_err());
}
