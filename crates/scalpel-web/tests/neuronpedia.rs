//! Neuronpedia's inference protocol (`/v1/...`) answered in-process by `server::router`: every
//! route, checked against the library (activations against `Sae::encode` of the cached hook,
//! cosines against a hand computation, the default completion against
//! `scalpel_models::generation::generate`), and its errors.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use candle_core::{Device, Tensor};
use http_body_util::BodyExt;
use scalpel_core::{HookPoint, Hooks};
use scalpel_models::generation::{generate, GenerateOptions};
use scalpel_web::state::{AppState, Limits};
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;
use common::{close, floats, parts, D_SAE, LAYER, MODEL, PROMPT};

use common::DICT as SOURCE;

fn state_with(secret: Option<&str>, limits: Limits) -> Arc<AppState> {
    common::state(limits, None, secret)
}

fn app() -> Router {
    scalpel_web::server::router(state_with(None, Limits::default()))
}

async fn call_raw(
    app: &Router,
    path: &str,
    body: String,
    secret: Option<&str>,
) -> (StatusCode, String, String) {
    let mut req = Request::post(path).header("content-type", "application/json");
    if let Some(s) = secret {
        req = req.header("X-SECRET-KEY", s);
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, ctype, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn call(app: &Router, path: &str, body: Value) -> (StatusCode, Value) {
    let (status, _, text) = call_raw(app, path, body.to_string(), None).await;
    let value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {text}"));
    (status, value)
}

/// Asserts a 4xx JSON error whose message contains `needle`.
async fn expect_error(app: &Router, path: &str, body: Value, status: StatusCode, needle: &str) {
    let (got, v) = call(app, path, body.clone()).await;
    assert_eq!(got, status, "{path} {body}: {v}");
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message: {v}"));
    assert!(
        msg.contains(needle),
        "{path}: `{msg}` does not mention `{needle}`"
    );
}

/// The prompt's tokens and the dictionary's activations `[p][d_sae]`, computed with the
/// library directly (not through `AppState`).
fn expected_acts(prompt: &str) -> (Vec<u32>, Vec<Vec<f32>>) {
    let (model, tok, sae) = parts();
    let ids = tok.encode(prompt, true).unwrap();
    let hook = HookPoint::resid_pre(LAYER);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (_, cache) = model.run_with_cache(&input, |p| p == hook).unwrap();
    let x = cache.get(hook).unwrap().squeeze(0).unwrap();
    (ids, sae.encode(&x).unwrap().to_vec2().unwrap())
}

fn resid(prompt: &str) -> Vec<Vec<f32>> {
    let (model, tok, _) = parts();
    let ids = tok.encode(prompt, true).unwrap();
    let hook = HookPoint::resid_pre(LAYER);
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (_, cache) = model.run_with_cache(&input, |p| p == hook).unwrap();
    cache
        .get(hook)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn w_dec() -> Vec<Vec<f32>> {
    parts().2.tensor("W_dec").unwrap().to_vec2().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!(close(*a, *b), "{what}[{i}]: {a} vs {b}");
    }
}

#[tokio::test]
async fn tokenize_matches_the_tokenizer() {
    let app = app();
    let tok = &parts().1;
    let (s, v) = call(
        &app,
        "/v1/tokenize",
        json!({"model": MODEL, "text": PROMPT}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids: Vec<u32> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(ids, tok.encode(PROMPT, true).unwrap());
    let strings: Vec<String> = serde_json::from_value(v["token_strings"].clone()).unwrap();
    assert_eq!(strings, tok.token_strings(&ids));
    assert_eq!(
        v["prepend_bos"],
        json!(tok.add_bos() && tok.bos_id().is_some())
    );
    // Forcing BOS on puts the BOS id first (when the tokenizer has one).
    let (_, on) = call(
        &app,
        "/v1/tokenize",
        json!({"model": MODEL, "text": PROMPT, "prepend_bos": true}),
    )
    .await;
    if let Some(bos) = tok.bos_id() {
        assert_eq!(on["tokens"][0], json!(bos));
        assert_eq!(on["prepend_bos"], json!(true));
        assert_eq!(
            on["tokens"].as_array().unwrap().len(),
            tok.encode(PROMPT, false).unwrap().len() + 1
        );
    }
    let (_, off) = call(
        &app,
        "/v1/tokenize",
        json!({"model": MODEL, "text": PROMPT, "prepend_bos": false}),
    )
    .await;
    assert_eq!(off["prepend_bos"], json!(false));
    assert_eq!(
        off["tokens"].as_array().unwrap().len(),
        tok.encode(PROMPT, false).unwrap().len()
    );
    expect_error(
        &app,
        "/v1/tokenize",
        json!({"model": "gpt2-small", "text": "x"}),
        StatusCode::BAD_REQUEST,
        "gpt2-small",
    )
    .await;
}

#[tokio::test]
async fn single_latent_equals_sae_encode_of_the_cached_hook() {
    let app = app();
    let (ids, acts) = expected_acts(PROMPT);
    let index = 7;
    let body =
        json!({"prompt": PROMPT, "model": MODEL, "source": SOURCE, "index": index.to_string()});
    let (s, v) = call(&app, "/v1/activation/single", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let want: Vec<f32> = acts.iter().map(|row| row[index]).collect();
    let got = floats(&v["activation"]["values"]);
    assert_close(&got, &want, "values");
    let (arg, max) = want
        .iter()
        .enumerate()
        .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
    assert!(close(
        v["activation"]["max_value"].as_f64().unwrap() as f32,
        max
    ));
    assert_eq!(v["activation"]["max_value_index"], json!(arg));
    assert_eq!(v["tokens"].as_array().unwrap().len(), ids.len());
    let special: Vec<bool> = serde_json::from_value(v["tokens_is_special"].clone()).unwrap();
    assert_eq!(special.len(), ids.len());
    let tok = &parts().1;
    for (i, &id) in ids.iter().enumerate() {
        assert_eq!(
            special[i],
            tok.bos_id() == Some(id) || tok.eos_ids().contains(&id),
            "token {i}"
        );
    }

    // The batch form answers each prompt as the single form does.
    let other = "Steering vectors change what a model writes.";
    let body = json!({"prompts": [PROMPT, other], "model": MODEL, "source": SOURCE, "index": "7"});
    let (s, b) = call(&app, "/v1/activation/single-batch", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_close(
        &floats(&b["results"][0]["activation"]["values"]),
        &want,
        "batch[0]",
    );
    let want1: Vec<f32> = expected_acts(other).1.iter().map(|r| r[7]).collect();
    assert_close(
        &floats(&b["results"][1]["activation"]["values"]),
        &want1,
        "batch[1]",
    );
}

#[tokio::test]
async fn single_custom_vector_is_a_dot_product_with_the_hook() {
    let app = app();
    let x = resid(PROMPT);
    let v: Vec<f32> = (0..x[0].len())
        .map(|i| ((i % 7) as f32 - 3.0) / 10.0)
        .collect();
    let body =
        json!({"prompt": PROMPT, "model": MODEL, "vector": v, "hook": "blocks.3.hook_resid_pre"});
    let (s, r) = call(&app, "/v1/activation/single", body).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let want: Vec<f32> = x
        .iter()
        .map(|row| row.iter().zip(&v).map(|(a, b)| a * b).sum())
        .collect();
    let got = floats(&r["activation"]["values"]);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 + 1e-3 * b.abs(),
            "position {i}: {a} vs {b}"
        );
    }
}

#[tokio::test]
async fn single_refuses_bad_requests() {
    let app = app();
    let p = "/v1/activation/single";
    let bad = StatusCode::BAD_REQUEST;
    let hook = "blocks.3.hook_resid_pre";
    let cases = [
        (
            json!({"prompt": PROMPT, "model": MODEL, "source": SOURCE, "index": "64"}),
            bad,
            "out of range",
        ),
        (
            json!({"prompt": PROMPT, "model": MODEL, "source": SOURCE, "index": "seven"}),
            bad,
            "seven",
        ),
        (
            json!({"prompt": PROMPT, "model": MODEL, "source": "9-res-none", "index": "1"}),
            StatusCode::NOT_FOUND,
            "9-res-none",
        ),
        (
            json!({"prompt": PROMPT, "model": MODEL, "source": SOURCE}),
            bad,
            "either",
        ),
        (
            json!({"prompt": PROMPT, "model": MODEL, "vector": [1.0, 2.0], "hook": hook}),
            bad,
            "width",
        ),
        (
            json!({"prompt": PROMPT, "model": MODEL, "vector": [1.0], "hook": "blocks.99.hook_nowhere"}),
            bad,
            "hook",
        ),
        (
            json!({"prompt": "", "model": MODEL, "source": SOURCE, "index": "1"}),
            bad,
            "empty",
        ),
        (
            json!({"prompt": PROMPT, "model": "gemma-2-2b", "source": SOURCE, "index": "1"}),
            bad,
            "gemma-2-2b",
        ),
        (json!({"prompt": PROMPT}), bad, "model"),
    ];
    for (body, status, needle) in cases {
        expect_error(&app, p, body, status, needle).await;
    }
    let empty = json!({"prompts": [], "model": MODEL, "source": SOURCE, "index": "1"});
    expect_error(&app, "/v1/activation/single-batch", empty, bad, "prompts").await;
    // Malformed JSON.
    let (s, _, text) = call_raw(&app, p, "{\"prompt\": ".into(), None).await;
    assert_eq!(s, bad);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("malformed JSON body"),
        "{v}"
    );
    // A prompt over the limit, and a body over the limit.
    let body = json!({"prompt": PROMPT, "model": MODEL, "source": SOURCE, "index": "1"});
    let limits = Limits {
        max_prompt_tokens: 4,
        ..Limits::default()
    };
    let small = scalpel_web::server::router(state_with(None, limits));
    expect_error(&small, p, body.clone(), bad, "at most 4").await;
    let limits = Limits {
        max_body_bytes: 16,
        ..Limits::default()
    };
    let tiny = scalpel_web::server::router(state_with(None, limits));
    expect_error(
        &tiny,
        p,
        body,
        StatusCode::PAYLOAD_TOO_LARGE,
        "limit of 16 bytes",
    )
    .await;
}

#[tokio::test]
async fn all_ranks_latents_by_their_largest_activation() {
    let app = app();
    let (ids, acts) = expected_acts(PROMPT);
    let body = json!({"prompt": PROMPT, "model": MODEL, "source_set": "res-test", "selected_sources": [],
                      "sort_by_token_indexes": [], "ignore_bos": false, "num_results": 10});
    let (s, v) = call(&app, "/v1/activation/all", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["tokens"].as_array().unwrap().len(), ids.len());
    let got = v["activations"].as_array().unwrap();
    // The expected ranking: latents active somewhere, by their maximum.
    let mut maxes: Vec<(usize, f32)> = (0..D_SAE)
        .map(|j| (j, acts.iter().map(|r| r[j]).fold(f32::MIN, f32::max)))
        .filter(|&(_, m)| m > 0.0)
        .collect();
    maxes.sort_by(|a, b| b.1.total_cmp(&a.1));
    assert_eq!(got.len(), maxes.len().min(10));
    for (entry, (j, m)) in got.iter().zip(&maxes) {
        assert_eq!(entry["source"], json!(SOURCE));
        assert_eq!(entry["index"], json!(j));
        assert!(close(entry["max_value"].as_f64().unwrap() as f32, *m));
        let col: Vec<f32> = acts.iter().map(|r| r[*j]).collect();
        assert_close(&floats(&entry["values"]), &col, "values");
        let sum: f32 = col.iter().sum();
        assert!(
            (entry["sum_values"].as_f64().unwrap() as f32 - sum).abs() < 1e-3 * (1.0 + sum.abs())
        );
    }

    // Sorting by the activations at chosen tokens.
    let at = [1usize, ids.len() - 1];
    let body = json!({"prompt": PROMPT, "model": MODEL, "source_set": "res-test", "selected_sources": [SOURCE],
                      "sort_by_token_indexes": at, "ignore_bos": false, "num_results": 5});
    let (s, v) = call(&app, "/v1/activation/all", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let sums: Vec<f32> = v["activations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["sum_values"].as_f64().unwrap() as f32)
        .collect();
    assert!(sums.windows(2).all(|w| w[0] >= w[1]), "{sums:?}");
    for e in v["activations"].as_array().unwrap() {
        let j = e["index"].as_u64().unwrap() as usize;
        let want: f32 = at.iter().map(|&t| acts[t][j]).sum();
        assert!(
            (e["sum_values"].as_f64().unwrap() as f32 - want).abs() < 1e-3 * (1.0 + want.abs())
        );
    }
    let mut best: Vec<f32> = (0..D_SAE)
        .filter(|&j| acts.iter().any(|r| r[j] > 0.0))
        .map(|j| at.iter().map(|&t| acts[t][j]).sum())
        .collect();
    best.sort_by(|a, b| b.total_cmp(a));
    assert!(close(sums[0], best[0]), "{} vs {}", sums[0], best[0]);

    // The batch form.
    let body = json!({"prompts": [PROMPT, "Hello"], "model": MODEL, "source_set": "res-test", "selected_sources": [],
                      "sort_by_token_indexes": [], "ignore_bos": true, "num_results": 3});
    let (s, b) = call(&app, "/v1/activation/all-batch", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["results"].as_array().unwrap().len(), 2);
    assert!(b["results"][1]["activations"].as_array().unwrap().len() <= 3);

    let bad = StatusCode::BAD_REQUEST;
    let p = "/v1/activation/all";
    expect_error(
        &app,
        p,
        json!({"prompt": PROMPT, "model": MODEL, "source_set": "res-other", "selected_sources": [],
        "sort_by_token_indexes": [], "ignore_bos": false}),
        StatusCode::NOT_FOUND,
        "res-other",
    )
    .await;
    expect_error(&app, p, json!({"prompt": PROMPT, "model": MODEL, "source_set": "res-other", "selected_sources": [SOURCE],
        "sort_by_token_indexes": [], "ignore_bos": false}), bad, "not in source set").await;
    expect_error(
        &app,
        p,
        json!({"prompt": PROMPT, "model": MODEL, "source_set": "res-test", "selected_sources": [],
        "sort_by_token_indexes": [500], "ignore_bos": false}),
        bad,
        "500",
    )
    .await;
    expect_error(
        &app,
        p,
        json!({"prompt": PROMPT, "model": MODEL, "source_set": "res-test", "selected_sources": [],
        "sort_by_token_indexes": [], "ignore_bos": false, "num_results": -1}),
        bad,
        "num_results",
    )
    .await;
}

#[tokio::test]
async fn topk_by_token_and_source_match_the_activations() {
    let app = app();
    let (ids, acts) = expected_acts(PROMPT);
    let body = json!({"prompt": PROMPT, "model": MODEL, "source": SOURCE, "top_k": 3, "ignore_bos": false});
    let (s, v) = call(&app, "/v1/activation/topk-by-token", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), ids.len());
    for (t, r) in results.iter().enumerate() {
        assert_eq!(r["token_position"], json!(t));
        let mut order: Vec<usize> = (0..D_SAE).filter(|&j| acts[t][j] > 0.0).collect();
        order.sort_by(|&a, &b| acts[t][b].total_cmp(&acts[t][a]));
        order.truncate(3);
        let got: Vec<usize> = r["top_features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["feature_index"].as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got, order, "position {t}");
        for f in r["top_features"].as_array().unwrap() {
            let j = f["feature_index"].as_u64().unwrap() as usize;
            assert!(close(
                f["activation_value"].as_f64().unwrap() as f32,
                acts[t][j]
            ));
        }
    }
    let body =
        json!({"prompts": [PROMPT, PROMPT], "model": MODEL, "source": SOURCE, "ignore_bos": false});
    let (s, b) = call(&app, "/v1/activation/topk-by-token-batch", body).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["results"].as_array().unwrap().len(), 2);
    assert_eq!(
        b["results"][1]["results"][2]["top_features"]
            .as_array()
            .unwrap()
            .len(),
        5.min((0..D_SAE).filter(|&j| acts[2][j] > 0.0).count())
    );
    expect_error(&app, "/v1/activation/topk-by-token", json!({"prompt": PROMPT, "model": MODEL, "source": SOURCE, "top_k": -2, "ignore_bos": false}),
        StatusCode::BAD_REQUEST, "top_k").await;

    let body = json!({"prompts": [PROMPT], "model": MODEL, "source": SOURCE});
    let (s, v) = call(&app, "/v1/activation/source", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let active = v["results"][0]["activeFeatures"].as_object().unwrap();
    let n_active: usize = acts.iter().flatten().filter(|&&a| a > 0.0).count();
    assert_eq!(
        active
            .values()
            .map(|l| l.as_array().unwrap().len())
            .sum::<usize>(),
        n_active
    );
    for (j, list) in active {
        let j: usize = j.parse().unwrap();
        for pair in list.as_array().unwrap() {
            let t = pair[0].as_u64().unwrap() as usize;
            assert!(close(pair[1].as_f64().unwrap() as f32, acts[t][j]));
        }
    }
}

#[tokio::test]
async fn sae_vector_and_decoder_cosines() {
    let app = app();
    let w = w_dec();
    let (s, v) = call(
        &app,
        "/v1/util/sae-vector",
        json!({"model": MODEL, "source": SOURCE, "index": 5}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_close(&floats(&v["vector"]), &w[5], "W_dec[5]");
    assert_eq!(v["hookName"], json!("blocks.3.hook_resid_pre"));
    expect_error(
        &app,
        "/v1/util/sae-vector",
        json!({"model": MODEL, "source": SOURCE, "index": 64}),
        StatusCode::BAD_REQUEST,
        "out of range",
    )
    .await;
    expect_error(
        &app,
        "/v1/util/sae-vector",
        json!({"model": MODEL, "source": SOURCE, "index": -1}),
        StatusCode::BAD_REQUEST,
        "out of range",
    )
    .await;

    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let cos = |a: &[f32], b: &[f32]| {
        a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>() / (norm(a) * norm(b))
    };
    let body = json!({"feature": {"model": MODEL, "source": SOURCE, "index": 5}, "model": MODEL, "source": SOURCE, "num_results": 4});
    let (s, v) = call(&app, "/v1/util/sae-topk-by-decoder-cossim", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let hits = v["topk_decoder_cossim_features"].as_array().unwrap();
    assert_eq!(hits.len(), 4);
    assert_eq!(hits[0]["feature"]["index"], json!(5));
    assert!(close(
        hits[0]["cosine_similarity"].as_f64().unwrap() as f32,
        1.0
    ));
    let mut want: Vec<(usize, f32)> = (0..D_SAE).map(|j| (j, cos(&w[j], &w[5]))).collect();
    want.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (h, (j, c)) in hits.iter().zip(&want) {
        assert_eq!(h["feature"]["index"], json!(j));
        assert_eq!(h["feature"]["source"], json!(SOURCE));
        assert!(close(h["cosine_similarity"].as_f64().unwrap() as f32, *c));
    }
    assert_eq!(v["feature"]["index"], json!(5));

    // A custom vector; num_results is clamped to the dictionary's size.
    let q: Vec<f32> = w[9].iter().zip(&w[2]).map(|(a, b)| a - 0.5 * b).collect();
    let body = json!({"vector": q, "model": MODEL, "source": SOURCE, "num_results": 1000});
    let (s, v) = call(&app, "/v1/util/sae-topk-by-decoder-cossim", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let hits = v["topk_decoder_cossim_features"].as_array().unwrap();
    assert_eq!(hits.len(), D_SAE);
    for h in hits {
        let j = h["feature"]["index"].as_u64().unwrap() as usize;
        assert!(close(
            h["cosine_similarity"].as_f64().unwrap() as f32,
            cos(&w[j], &q)
        ));
    }
    let p = "/v1/util/sae-topk-by-decoder-cossim";
    let bad = StatusCode::BAD_REQUEST;
    expect_error(
        &app,
        p,
        json!({"model": MODEL, "source": SOURCE, "num_results": 3}),
        bad,
        "exactly one",
    )
    .await;
    expect_error(&app, p, json!({"vector": vec![0.0; w[0].len()], "model": MODEL, "source": SOURCE, "num_results": 3}), bad, "norm").await;
    expect_error(
        &app,
        p,
        json!({"vector": [1.0, 2.0], "model": MODEL, "source": SOURCE, "num_results": 3}),
        bad,
        "values",
    )
    .await;
}

fn steer_body(strength: f64, extra: Value) -> Value {
    let mut body = json!({
        "prompt": PROMPT, "model": MODEL, "steer_method": "SIMPLE_ADDITIVE", "normalize_steering": false,
        "types": ["STEERED", "DEFAULT"],
        "features": [{"model": MODEL, "source": SOURCE, "index": 3, "strength": strength}],
        "n_completion_tokens": 6, "temperature": 0, "strength_multiplier": 4, "freq_penalty": 0, "seed": 16,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

fn output(v: &Value, kind: &str) -> String {
    v["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["type"] == kind)
        .unwrap()["output"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn steering_of_strength_zero_is_the_default_completion() {
    let app = app();
    let (model, tok, _) = parts();
    let (s, v) = call(&app, "/v1/steer/completion", steer_body(0.0, json!({}))).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["outputs"][0]["type"], json!("STEERED"));
    assert_eq!(output(&v, "STEERED"), output(&v, "DEFAULT"));
    assert!(v["outputs"][0].get("logprobs").is_none());
    // The default text is the library's greedy continuation, after the prompt.
    let ids = tok.encode(PROMPT, true).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 6,
        stop_tokens: tok.eos_ids().to_vec(),
        ..Default::default()
    };
    let g = generate(model, &ids, &opts, &mut Hooks::new(), |_| {}).unwrap();
    assert_eq!(
        output(&v, "DEFAULT"),
        format!("{PROMPT}{}", tok.decode(&g.tokens, false).unwrap())
    );

    // A strong push changes the text; the same push given as a raw vector gives the same text.
    let (_, strong) = call(&app, "/v1/steer/completion", steer_body(40.0, json!({}))).await;
    assert_ne!(output(&strong, "STEERED"), output(&strong, "DEFAULT"));
    assert_eq!(output(&strong, "DEFAULT"), output(&v, "DEFAULT"));
    let row = w_dec()[3].clone();
    let as_vector = steer_body(
        0.0,
        json!({"features": null,
        "vectors": [{"steering_vector": row, "strength": 40.0, "hook": "blocks.3.hook_resid_pre"}]}),
    );
    let (s, vv) = call(&app, "/v1/steer/completion", as_vector).await;
    assert_eq!(s, StatusCode::OK, "{vv}");
    assert_eq!(output(&vv, "STEERED"), output(&strong, "STEERED"));

    // Sampling with a seed repeats; logprobs come with the requested number of candidates.
    let sampled = steer_body(
        10.0,
        json!({"temperature": 0.8, "freq_penalty": 1.0, "n_logprobs": 3, "types": ["STEERED"]}),
    );
    let (s, a) = call(&app, "/v1/steer/completion", sampled.clone()).await;
    assert_eq!(s, StatusCode::OK, "{a}");
    let (_, b) = call(&app, "/v1/steer/completion", sampled).await;
    assert_eq!(a, b);
    let lps = a["outputs"][0]["logprobs"].as_array().unwrap();
    assert!(!lps.is_empty() && lps.len() <= 6);
    for lp in lps {
        let top = lp["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        assert!(lp["logprob"].as_f64().unwrap() <= 0.0);
        assert!(top[0]["logprob"].as_f64().unwrap() >= top[2]["logprob"].as_f64().unwrap());
    }
    // Greedy picks the likeliest candidate.
    let (_, g) = call(
        &app,
        "/v1/steer/completion",
        steer_body(0.0, json!({"n_logprobs": 2})),
    )
    .await;
    for lp in g["outputs"][0]["logprobs"].as_array().unwrap() {
        assert_eq!(lp["token"], lp["top_logprobs"][0]["token"]);
        assert_eq!(lp["logprob"], lp["top_logprobs"][0]["logprob"]);
    }

    // Streaming answers one server-sent event with the whole result.
    let (s, ctype, text) = call_raw(
        &app,
        "/v1/steer/completion",
        steer_body(0.0, json!({"stream": true})).to_string(),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(ctype.starts_with("text/event-stream"), "{ctype}");
    let event: Value =
        serde_json::from_str(text.strip_prefix("data: ").unwrap().trim_end()).unwrap();
    assert_eq!(event, v);
}

#[tokio::test]
async fn steering_refuses_what_it_cannot_do() {
    let app = app();
    let hook = "blocks.3.hook_resid_pre";
    let zeros = vec![0.0; parts().0.config().d_model];
    let cases = [
        (
            json!({"steer_method": "ORTHOGONAL_DECOMP"}),
            "SIMPLE_ADDITIVE",
        ),
        (json!({"steer_method": "SIDEWAYS"}), "malformed JSON body"),
        (
            json!({"n_completion_tokens": 100000}),
            "n_completion_tokens",
        ),
        (json!({"n_completion_tokens": 0}), "n_completion_tokens"),
        (json!({"types": []}), "types"),
        (json!({"temperature": -1}), "temperature"),
        (json!({"n_logprobs": 11}), "n_logprobs"),
        (
            json!({"vectors": [{"steering_vector": [1.0], "strength": 1, "hook": hook}]}),
            "exactly one",
        ),
        (
            json!({"features": [{"model": MODEL, "source": SOURCE, "index": 99, "strength": 1}]}),
            "out of range",
        ),
        (
            json!({"features": null, "vectors": [{"steering_vector": [1.0, 2.0], "strength": 1, "hook": hook}]}),
            "d_model",
        ),
        (
            json!({"features": null, "normalize_steering": true,
                "vectors": [{"steering_vector": zeros, "strength": 1, "hook": hook}]}),
            "norm 0",
        ),
        (json!({"prompt": ""}), "empty"),
    ];
    for (change, needle) in cases {
        let body = steer_body(1.0, change);
        expect_error(
            &app,
            "/v1/steer/completion",
            body,
            StatusCode::BAD_REQUEST,
            needle,
        )
        .await;
    }
}

#[tokio::test]
async fn chat_steering_uses_the_chat_template() {
    let app = app();
    let tok = &parts().1;
    let messages = json!([{"role": "user", "content": "Name a colour."}]);
    let body = |strength: f64, special: bool| {
        let mut b = steer_body(
            strength,
            json!({"prompt": messages, "steer_special_tokens": special}),
        );
        b["n_completion_tokens"] = json!(5);
        b
    };
    let (s, v) = call(&app, "/v1/steer/completion-chat", body(0.0, false)).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let template = tok
        .apply_chat_template(
            &[scalpel_models::chat::ChatMessage::new(
                "user",
                "Name a colour.",
            )],
            true,
        )
        .unwrap();
    assert_eq!(v["input"]["raw"], json!(template));
    assert_eq!(v["input"]["chat_template"], messages);
    let outs = v["outputs"].as_array().unwrap();
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[0]["raw"], outs[1]["raw"]);
    for o in outs {
        assert!(o["raw"].as_str().unwrap().starts_with(&template));
        let turns = o["chat_template"].as_array().unwrap();
        assert_eq!(turns.len(), 2);
        assert_eq!(turns[1]["role"], json!("assistant"));
    }
    let (s, strong) = call(&app, "/v1/steer/completion-chat", body(40.0, true)).await;
    assert_eq!(s, StatusCode::OK, "{strong}");
    assert_ne!(strong["outputs"][0]["raw"], strong["outputs"][1]["raw"]);
    assert_eq!(strong["outputs"][1]["raw"], v["outputs"][1]["raw"]);
    let (s, partial) = call(&app, "/v1/steer/completion-chat", body(40.0, false)).await;
    assert_eq!(s, StatusCode::OK, "{partial}");
    expect_error(
        &app,
        "/v1/steer/completion-chat",
        steer_body(0.0, json!({"prompt": [], "steer_special_tokens": true})),
        StatusCode::BAD_REQUEST,
        "no messages",
    )
    .await;
}

#[tokio::test]
async fn a_secret_guards_every_route() {
    let app = scalpel_web::server::router(state_with(Some("hunter2"), Limits::default()));
    let body = json!({"model": MODEL, "text": "hi"}).to_string();
    let routes = [
        "/v1/activation/all",
        "/v1/activation/all-batch",
        "/v1/activation/single",
        "/v1/activation/single-batch",
        "/v1/activation/source",
        "/v1/activation/topk-by-token",
        "/v1/activation/topk-by-token-batch",
        "/v1/steer/completion",
        "/v1/steer/completion-chat",
        "/v1/tokenize",
        "/v1/util/sae-topk-by-decoder-cossim",
        "/v1/util/sae-vector",
    ];
    for route in routes {
        for secret in [None, Some("hunter3"), Some("hunter")] {
            let (s, _, text) = call_raw(&app, route, body.clone(), secret).await;
            assert_eq!(s, StatusCode::UNAUTHORIZED, "{route} with {secret:?}");
            let v: Value = serde_json::from_str(&text).unwrap();
            assert!(v["error"].as_str().unwrap().contains("X-SECRET-KEY"), "{v}");
        }
    }
    let (s, _, text) = call_raw(&app, "/v1/tokenize", body, Some("hunter2")).await;
    assert_eq!(s, StatusCode::OK, "{text}");
}

#[tokio::test]
async fn special_tokens_are_flagged_and_ignore_bos_leaves_out_the_bos_token() {
    let app = app();
    let tok = &parts().1;
    let (Some(bos), Some(bos_text)) = (tok.bos_id(), tok.bos_token()) else {
        panic!("the default model's tokenizer has a BOS token");
    };
    // Special tokens written in the text are matched whole, so this prompt starts with BOS
    // whether or not the tokenizer adds one itself.
    let prompt = format!("{bos_text}{PROMPT}");
    let (ids, acts) = expected_acts(&prompt);
    assert_eq!(ids[0], bos);
    let body = json!({"prompt": prompt, "model": MODEL, "source": SOURCE, "index": "0"});
    let (s, v) = call(&app, "/v1/activation/single", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let special: Vec<bool> = serde_json::from_value(v["tokens_is_special"].clone()).unwrap();
    assert!(special[0], "BOS is special");
    assert_eq!(
        special.iter().filter(|&&b| b).count(),
        ids.iter().filter(|&&i| i == bos).count()
    );

    // Chat turn markers are special too.
    let chat = "<|im_start|>user\nHi<|im_end|>";
    let start = tok
        .token_to_id("<|im_start|>")
        .expect("the chat model has <|im_start|>");
    let body = json!({"prompt": chat, "model": MODEL, "source": SOURCE, "index": "0"});
    let (s, v) = call(&app, "/v1/activation/single", body).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let chat_ids = tok.encode(chat, true).unwrap();
    let special: Vec<bool> = serde_json::from_value(v["tokens_is_special"].clone()).unwrap();
    let at = chat_ids.iter().position(|&i| i == start).unwrap();
    assert!(special[at], "<|im_start|> is special: {special:?}");
    assert_eq!(special.iter().filter(|&&b| b).count(), 2, "{special:?}");

    let all = |ignore: bool| {
        json!({"prompt": prompt, "model": MODEL, "source_set": "res-test", "selected_sources": [],
               "sort_by_token_indexes": [], "ignore_bos": ignore, "num_results": D_SAE})
    };
    let (_, kept) = call(&app, "/v1/activation/all", all(false)).await;
    let (_, ignored) = call(&app, "/v1/activation/all", all(true)).await;
    let peaks_at_bos: Vec<usize> = (0..D_SAE)
        .filter(|&j| {
            let col: Vec<f32> = acts.iter().map(|r| r[j]).collect();
            let max = col.iter().copied().fold(f32::MIN, f32::max);
            max > 0.0 && col.iter().position(|&x| x == max) == Some(0)
        })
        .collect();
    let indexes = |v: &Value| -> Vec<usize> {
        v["activations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["index"].as_u64().unwrap() as usize)
            .collect()
    };
    assert!(
        !peaks_at_bos.is_empty(),
        "no latent peaks on BOS: the check below would be empty"
    );
    let (kept, ignored) = (indexes(&kept), indexes(&ignored));
    assert_eq!(
        kept.len(),
        ignored.len() + peaks_at_bos.len(),
        "kept {kept:?}, ignored {ignored:?}"
    );
    assert!(ignored.iter().all(|j| !peaks_at_bos.contains(j)));

    let topk = |ignore: bool| json!({"prompt": prompt, "model": MODEL, "source": SOURCE, "top_k": 2, "ignore_bos": ignore});
    let (_, with) = call(&app, "/v1/activation/topk-by-token", topk(false)).await;
    let (_, without) = call(&app, "/v1/activation/topk-by-token", topk(true)).await;
    assert_eq!(with["results"].as_array().unwrap().len(), ids.len());
    assert_eq!(without["results"].as_array().unwrap().len(), ids.len() - 1);
    assert_eq!(without["results"][0]["token_position"], json!(1));
    assert_eq!(with["results"][0]["is_special"], json!(true));
}
