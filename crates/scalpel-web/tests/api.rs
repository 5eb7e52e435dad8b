//! The web app's JSON API answered in-process by `server::router` (`oneshot` requests): every
//! route checked against the library (predictions against a softmax of `Model::forward`, lens
//! cells against `scalpel_circuits::lens`, attention against the cached `hook_pattern`,
//! latents against `Sae::encode`, generations against `generate` and `steer_generate`, patching
//! against `Patcher`), and every error path answering JSON.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use candle_core::{DType, Device, Tensor};
use http_body_util::BodyExt;
use scalpel_circuits::lens::logit_lens;
use scalpel_circuits::metric::Metric;
use scalpel_circuits::pairs::{self, PromptPair};
use scalpel_circuits::patching::{Direction, Patcher, Sweep};
use scalpel_circuits::steer::{sae_decoder_row, steer_generate, Positions};
use scalpel_core::{BlockHook, HookPoint, Hooks};
use scalpel_models::generation::{generate, GenerateOptions};
use scalpel_web::dashboards::{
    Context, DashboardDb, DictInfo, Histogram, LatentDashboard, Similar, TokenValue,
};
use scalpel_web::server::router;
use scalpel_web::state::{AppState, Limits};
use serde_json::{json, Value};
use tower::ServiceExt;

mod common;
use common::{parts, DICT, D_SAE, LAYER, MODEL, PROMPT};

fn limits() -> Limits {
    Limits {
        max_body_bytes: 16 * 1024,
        max_prompt_tokens: 64,
        max_new_tokens: 16,
        workers: 1,
        queue: 32,
    }
}

fn state_with(limits: Limits, db: Option<DashboardDb>) -> Arc<AppState> {
    common::state(limits, db, None)
}

/// The app with no dashboard database.
fn app() -> Router {
    static STATE: OnceLock<Arc<AppState>> = OnceLock::new();
    router(STATE.get_or_init(|| state_with(limits(), None)).clone())
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("scalpel-web-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

/// A hand-made dashboard for latent `latent` of `DICT`, firing hardest on token `token`.
fn dashboard(latent: u32, token: u32, max_act: f32) -> LatentDashboard {
    let (_, tok, _) = parts();
    let ids = vec![1, token, 2];
    LatentDashboard {
        dict: DICT.into(),
        latent,
        n_fired: 7,
        density: 7.0 / 1000.0,
        max_act,
        mean_act: max_act / 2.0,
        histogram: Histogram {
            edges: vec![0.0, max_act / 2.0, max_act],
            counts: vec![4, 3],
        },
        top_contexts: vec![Context {
            tokens: tok.token_strings(&ids),
            token_ids: ids,
            acts: vec![0.0, max_act, 0.1],
            peak: 1,
            peak_act: max_act,
            source_index: 5,
            source_pos: 9,
        }],
        quantiles: Vec::new(),
        top_logits: vec![TokenValue {
            token_id: token,
            token: "x".into(),
            value: 1.5,
        }],
        bottom_logits: vec![TokenValue {
            token_id: 3,
            token: "y".into(),
            value: -1.5,
        }],
        logit_histogram: Histogram {
            edges: vec![-1.0, 1.0],
            counts: vec![10],
        },
        similar: vec![Similar {
            latent: (latent + 1) % D_SAE as u32,
            cosine: 0.25,
        }],
    }
}

/// The app with a dashboard database holding latents 0..4 of `DICT`; latent `l` fires on the
/// token " Paris" with max activation `l + 1`.
fn app_with_db() -> (Router, Vec<LatentDashboard>) {
    let (_, tok, _) = parts();
    let paris = tok.encode(" Paris", false).unwrap()[0];
    let path = temp_path("dashboards.db");
    let db = DashboardDb::create(&path).expect("create db");
    db.put_dict(&DictInfo {
        id: DICT.into(),
        hook: HookPoint::resid_pre(LAYER).to_string(),
        layer: LAYER,
        d_in: parts().0.config().d_model,
        d_sae: D_SAE,
        architecture: "standard".into(),
        model: MODEL.into(),
        n_tokens: 1000,
    })
    .expect("put_dict");
    let latents: Vec<LatentDashboard> = (0..4)
        .map(|l| dashboard(l, paris, l as f32 + 1.0))
        .collect();
    db.put_latents(&latents).expect("put_latents");
    (router(state_with(limits(), Some(db))), latents)
}

async fn send(app: Router, req: Request<Body>) -> (StatusCode, String, Vec<u8>) {
    let res = app.oneshot(req).await.expect("the router answers");
    let status = res.status();
    let ctype = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = res
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .to_vec();
    (status, ctype, body)
}

async fn get(app: Router, uri: &str) -> (StatusCode, Value) {
    let req = Request::get(uri).body(Body::empty()).unwrap();
    json_of(send(app, req).await)
}

async fn post_raw(app: Router, uri: &str, body: impl Into<Body>) -> (StatusCode, Value) {
    let req = Request::post(uri)
        .header("content-type", "application/json")
        .body(body.into())
        .unwrap();
    json_of(send(app, req).await)
}

async fn post(app: Router, uri: &str, body: Value) -> (StatusCode, Value) {
    post_raw(app, uri, body.to_string()).await
}

fn json_of((status, ctype, body): (StatusCode, String, Vec<u8>)) -> (StatusCode, Value) {
    assert!(
        ctype.starts_with("application/json"),
        "{status}: content type {ctype:?}"
    );
    let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| {
        panic!(
            "{status}: not JSON ({e}): {}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, v)
}

/// Asserts a JSON error with `status` whose message contains `needle`.
fn assert_error((status, v): (StatusCode, Value), want: StatusCode, needle: &str) {
    assert_eq!(status, want, "{v}");
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error message in {v}"));
    assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
}

fn close(a: f64, b: f64, atol: f64, rtol: f64) -> bool {
    (a - b).abs() <= atol + rtol * b.abs()
}

fn ids_of(text: &str) -> Vec<u32> {
    parts().1.encode(text, true).unwrap()
}

/// The test dictionary's latent activations `[p][d_sae]` on `ids`, computed directly.
fn codes(ids: &[u32]) -> Vec<Vec<f32>> {
    let (model, _, sae) = parts();
    let hp = HookPoint::resid_pre(LAYER);
    let (_, cache) = model.run_with_cache(&input(ids), |h| h == hp).unwrap();
    let x = cache.get(hp).unwrap().squeeze(0).unwrap();
    let x = x.to_dtype(DType::F32).unwrap();
    sae.encode(&x).unwrap().to_vec2::<f32>().unwrap()
}

fn input(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_info_and_dicts_describe_the_server() {
    let (model, _, _) = parts();
    let c = model.config();
    let (s, v) = get(app(), "/api/health").await;
    assert_eq!((s, v), (StatusCode::OK, json!({"ok": true})));

    let (s, v) = get(app(), "/api/info").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["model"], MODEL);
    assert_eq!(v["n_layers"], c.n_layers);
    assert_eq!(v["n_heads"], c.n_heads);
    assert_eq!(v["d_model"], c.d_model);
    assert_eq!(v["d_vocab"], c.d_vocab);
    assert_eq!(v["n_ctx"], c.n_ctx);
    assert_eq!(
        v["dicts"],
        json!([{"id": DICT, "hook": "blocks.3.hook_resid_pre", "layer": 3, "d_sae": D_SAE,
                "has_dashboards": false}])
    );
    assert_eq!(
        v["limits"],
        json!({"max_prompt_tokens": 64, "max_new_tokens": 16})
    );

    let (s, v) = get(app(), "/api/dicts").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v[0]["id"], DICT);
    assert_eq!(v[0]["d_in"], c.d_model);
    assert_eq!(v[0]["architecture"], "standard");
    assert_eq!(
        (v[0]["loaded"].clone(), v[0]["has_dashboards"].clone()),
        (json!(true), json!(false))
    );

    // With a database, its dictionaries are marked and described.
    let (app, _) = app_with_db();
    let (_, v) = get(app.clone(), "/api/dicts").await;
    assert_eq!(v[0]["has_dashboards"], true);
    assert_eq!(v[0]["n_tokens"], 1000);
    let (_, v) = get(app, "/api/info").await;
    assert_eq!(v["dicts"][0]["has_dashboards"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_matches_the_tokenizer_and_bounds_prompts() {
    let (_, tok, _) = parts();
    let (s, v) = post(app(), "/api/tokenize", json!({"text": PROMPT})).await;
    assert_eq!(s, StatusCode::OK);
    let ids = ids_of(PROMPT);
    let texts = tok.token_strings(&ids);
    let want: Vec<Value> = ids
        .iter()
        .zip(&texts)
        .map(|(i, t)| json!({"id": i, "text": t}))
        .collect();
    assert_eq!(v["tokens"], Value::Array(want));

    assert_error(
        post(app(), "/api/tokenize", json!({"text": ""})).await,
        StatusCode::BAD_REQUEST,
        "empty",
    );
    let long = "word ".repeat(100);
    assert_error(
        post(app(), "/api/tokenize", json!({"text": long})).await,
        StatusCode::BAD_REQUEST,
        "at most 64",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explore_matches_forward_the_logit_lens_and_the_dictionary() {
    let (model, tok, _) = parts();
    let c = model.config();
    let (s, v) = post(app(), "/api/explore", json!({"text": PROMPT, "top_k": 3})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids = ids_of(PROMPT);
    let p = ids.len();
    assert_eq!(v["tokens"].as_array().unwrap().len(), p);

    // Predictions: the top 3 of softmax(forward(tokens)) at every position.
    let logits = model.forward(&input(&ids)).unwrap().squeeze(0).unwrap();
    let logits = logits
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    for (pos, row) in logits.iter().enumerate() {
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = row.iter().map(|x| (x - max).exp()).sum();
        let mut order: Vec<usize> = (0..row.len()).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let got = v["predictions"][pos].as_array().unwrap();
        assert_eq!(got.len(), 3);
        for (k, g) in got.iter().enumerate() {
            assert_eq!(g["id"], order[k], "position {pos} rank {k}");
            assert_eq!(g["text"], tok.token_strings(&[order[k] as u32])[0]);
            let want = (row[order[k]] - max).exp() / z;
            let prob = g["prob"].as_f64().unwrap();
            assert!(
                close(prob, want, 1e-6, 1e-4),
                "position {pos} rank {k}: {prob} vs {want}"
            );
        }
    }

    // The lens grid: n_layers + 1 rows, each cell the top-1 of scalpel_circuits::lens.
    let lens = logit_lens(model, &input(&ids), 1, &[]).unwrap();
    let labels = v["lens"]["labels"].as_array().unwrap();
    assert_eq!(labels.len(), c.n_layers + 1);
    assert_eq!(labels[0], "resid_pre 0");
    assert_eq!(labels[c.n_layers], format!("resid_post {}", c.n_layers - 1));
    for depth in 0..=c.n_layers {
        for pos in 0..p {
            let want = &lens.cell(depth, pos).unwrap().top[0];
            let got = &v["lens"]["cells"][depth][pos];
            assert_eq!(got["id"], want.token, "depth {depth} position {pos}");
            let prob = got["prob"].as_f64().unwrap();
            assert!(
                close(prob, want.prob, 1e-6, 1e-4),
                "depth {depth} position {pos}"
            );
        }
    }

    // Latents: the 5 strongest of sae.encode(resid_pre 3) per position, positive only.
    let f = codes(&ids);
    let mut fired_somewhere = false;
    for (pos, row) in f.iter().enumerate() {
        let mut order: Vec<usize> = (0..row.len()).filter(|&i| row[i] > 0.0).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        order.truncate(5);
        let got = v["latents"][pos].as_array().unwrap();
        assert_eq!(got.len(), order.len(), "position {pos}");
        for (g, &i) in got.iter().zip(&order) {
            assert_eq!(g["dict"], DICT);
            assert_eq!(g["latent"], i);
            let act = g["act"].as_f64().unwrap();
            assert!(
                close(act, row[i] as f64, 1e-5, 1e-4),
                "position {pos} latent {i}"
            );
        }
        fired_somewhere |= !order.is_empty();
    }
    assert!(
        fired_somewhere,
        "the random dictionary should fire somewhere"
    );

    // Asking for no dictionary lists no latents.
    let (_, v) = post(app(), "/api/explore", json!({"text": PROMPT, "dicts": []})).await;
    assert!(v["latents"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l.as_array().unwrap().is_empty()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explore_refuses_bad_requests_with_json_errors() {
    let bad = StatusCode::BAD_REQUEST;
    assert_error(
        post(
            app(),
            "/api/explore",
            json!({"text": PROMPT, "dicts": ["nope"]}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "no dictionary `nope`",
    );
    assert_error(
        post(app(), "/api/explore", json!({"text": PROMPT, "top_k": 0})).await,
        bad,
        "top_k",
    );
    assert_error(
        post(app(), "/api/explore", json!({"text": ""})).await,
        bad,
        "empty",
    );
    assert_error(
        post_raw(app(), "/api/explore", "{\"text\": ").await,
        bad,
        "malformed JSON",
    );
    assert_error(
        post_raw(app(), "/api/explore", "not json").await,
        bad,
        "malformed JSON",
    );
    assert_error(
        post(app(), "/api/explore", json!({"txt": PROMPT})).await,
        bad,
        "txt",
    );
    assert_error(
        post(app(), "/api/explore", json!({"text": 5})).await,
        bad,
        "malformed JSON",
    );
    let huge = json!({ "text": "a".repeat(20_000) }).to_string();
    assert_error(
        post_raw(app(), "/api/explore", huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "16384 bytes",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attention_rows_sum_to_one_and_equal_the_cached_pattern() {
    let (model, _, _) = parts();
    let layer = 2;
    let (s, v) = post(
        app(),
        "/api/attention",
        json!({"text": PROMPT, "layer": layer}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids = ids_of(PROMPT);
    let hp = HookPoint::block(layer, BlockHook::Pattern);
    let (_, cache) = model.run_with_cache(&input(&ids), |h| h == hp).unwrap();
    let want = cache
        .get(hp)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let want = want.to_vec3::<f32>().unwrap();
    assert_eq!(v["layer"], layer);
    assert_eq!(v["n_heads"], model.config().n_heads);
    let got = v["patterns"].as_array().unwrap();
    assert_eq!(got.len(), model.config().n_heads);
    for (h, head) in got.iter().enumerate() {
        for (q, row) in head.as_array().unwrap().iter().enumerate() {
            let row: Vec<f64> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(row.len(), ids.len());
            let sum: f64 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "head {h} query {q} sums to {sum}");
            for (k, x) in row.iter().enumerate() {
                assert!(
                    close(*x, want[h][q][k] as f64, 1e-6, 1e-5),
                    "head {h} [{q}, {k}]"
                );
                if k > q {
                    assert_eq!(*x, 0.0, "head {h} attends ahead at [{q}, {k}]");
                }
            }
        }
    }
    assert_error(
        post(
            app(),
            "/api/attention",
            json!({"text": PROMPT, "layer": 99}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "layer 99 is out of range",
    );
    assert_error(
        post(app(), "/api/attention", json!({"text": PROMPT})).await,
        StatusCode::BAD_REQUEST,
        "layer",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latent_pages_come_from_the_database() {
    let (app, latents) = app_with_db();
    let (s, v) = get(app.clone(), &format!("/api/latent/{DICT}/2")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let got: LatentDashboard = serde_json::from_value(v).expect("a LatentDashboard");
    assert_eq!(got, latents[2]);

    let nf = StatusCode::NOT_FOUND;
    assert_error(
        get(app.clone(), &format!("/api/latent/{DICT}/9")).await,
        nf,
        "no dashboard for latent 9",
    );
    assert_error(
        get(app.clone(), &format!("/api/latent/{DICT}/64")).await,
        nf,
        "out of range",
    );
    assert_error(get(app.clone(), "/api/latent/other/1").await, nf, "`other`");
    assert_error(
        get(app.clone(), &format!("/api/latent/{DICT}/-1")).await,
        StatusCode::BAD_REQUEST,
        "\"-1\"",
    );
    assert_error(
        get(app.clone(), &format!("/api/latent/{DICT}/abc")).await,
        StatusCode::BAD_REQUEST,
        "integer",
    );
    assert_error(
        get(app.clone(), &format!("/api/latent/{DICT}")).await,
        nf,
        "no route",
    );
    // Without a database every latent is unknown.
    assert_error(
        get(self::app(), &format!("/api/latent/{DICT}/2")).await,
        nf,
        "--db",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_search_reads_the_database_and_wants_one_token() {
    let (app, _) = app_with_db();
    let (_, tok, _) = parts();
    let paris = tok.encode(" Paris", false).unwrap()[0];
    let (s, v) = get(
        app.clone(),
        &format!("/api/search/token?dict={DICT}&token=%20Paris&k=3"),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["token"], json!({"id": paris, "text": " Paris"}));
    let hits = v["hits"].as_array().unwrap();
    let latents: Vec<u64> = hits.iter().map(|h| h["latent"].as_u64().unwrap()).collect();
    assert_eq!(latents, vec![3, 2, 1], "strongest first: {v}");
    assert_eq!(hits[0]["max_act"], 4.0);

    let bad = StatusCode::BAD_REQUEST;
    assert_error(
        get(
            app.clone(),
            &format!("/api/search/token?dict={DICT}&token=Eiffel%20Tower"),
        )
        .await,
        bad,
        "tokens",
    );
    assert_error(
        get(app.clone(), &format!("/api/search/token?dict={DICT}")).await,
        bad,
        "token",
    );
    assert_error(
        get(
            app.clone(),
            &format!("/api/search/token?dict={DICT}&token=a&k=0"),
        )
        .await,
        bad,
        "`k`",
    );
    assert_error(
        get(
            app.clone(),
            &format!("/api/search/token?dict={DICT}&token=a&k=x"),
        )
        .await,
        bad,
        "k",
    );
    assert_error(
        get(app, "/api/search/token?dict=nope&token=a").await,
        StatusCode::NOT_FOUND,
        "nope",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_search_finds_the_strongest_latents_live() {
    let (s, v) = post(
        app(),
        "/api/search/prompt",
        json!({"text": PROMPT, "dict": DICT, "k": 4}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let ids = ids_of(PROMPT);
    let f = codes(&ids);
    // Per latent: (max over positions, position).
    let mut best: Vec<(usize, f32, usize)> = (0..D_SAE)
        .map(|i| {
            let (pos, act) = f
                .iter()
                .map(|r| r[i])
                .enumerate()
                .fold((0, f32::MIN), |b, (p, a)| if a > b.1 { (p, a) } else { b });
            (i, act, pos)
        })
        .filter(|b| b.1 > 0.0)
        .collect();
    best.sort_by(|a, b| b.1.total_cmp(&a.1));
    best.truncate(4);
    let hits = v["hits"].as_array().unwrap();
    assert_eq!(hits.len(), best.len());
    for (h, (i, act, pos)) in hits.iter().zip(&best) {
        assert_eq!(h["latent"], *i);
        assert_eq!(h["position"], *pos);
        assert_eq!(h["token"]["id"], ids[*pos]);
        assert!(close(
            h["max_act"].as_f64().unwrap(),
            *act as f64,
            1e-5,
            1e-4
        ));
    }
    assert_error(
        post(
            app(),
            "/api/search/prompt",
            json!({"text": PROMPT, "dict": "nope"}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "nope",
    );
    assert_error(
        post(app(), "/api/search/prompt", json!({"text": PROMPT})).await,
        StatusCode::BAD_REQUEST,
        "dict",
    );
}

/// Posts a steering request and splits the NDJSON answer into (stream, id) tokens and the
/// final line.
async fn steer(app: Router, body: Value) -> (Vec<(String, u32)>, Value) {
    let req = Request::post("/api/steer")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, ctype, bytes) = send(app, req).await;
    let text = String::from_utf8(bytes).unwrap();
    assert_eq!(status, StatusCode::OK, "{text}");
    assert_eq!(ctype, "application/x-ndjson");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (last, tokens) = lines.split_last().expect("at least the final line");
    assert_eq!(last["done"], true, "{last}");
    let tokens = tokens
        .iter()
        .map(|l| {
            (
                l["stream"].as_str().unwrap().to_string(),
                l["id"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    (tokens, last.clone())
}

fn stream(tokens: &[(String, u32)], name: &str) -> Vec<u32> {
    tokens
        .iter()
        .filter(|(s, _)| s == name)
        .map(|(_, t)| *t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steering_streams_baseline_and_steered_tokens_as_the_library_generates_them() {
    let (model, tok, sae) = parts();
    let prompt = ids_of("My favourite food is");
    let opts = GenerateOptions {
        max_new_tokens: 8,
        stop_tokens: tok.eos_ids().to_vec(),
        ..Default::default()
    };
    let baseline = generate(model, &prompt, &opts, &mut Hooks::new(), |_| {})
        .unwrap()
        .tokens;

    // A latent's decoder row, scaled hard enough to change the text.
    let coef = 200.0;
    let body = json!({"prompt": "My favourite food is", "layer": LAYER, "coefficient": coef,
                      "max_new_tokens": 8, "source": {"latent": {"dict": DICT, "latent": 5}}});
    let (tokens, done) = steer(app(), body).await;
    let vector = sae_decoder_row(sae, 5, 1.0, HookPoint::resid_pre(LAYER)).unwrap();
    let steered = steer_generate(model, &prompt, &vector, coef, &Positions::All, &opts)
        .unwrap()
        .tokens;
    assert_eq!(stream(&tokens, "baseline"), baseline);
    assert_eq!(stream(&tokens, "steered"), steered);
    assert_ne!(
        baseline, steered,
        "coefficient {coef} should change the text"
    );
    // Interleaved: while both run, a baseline token then a steered token.
    let names: Vec<&str> = tokens.iter().map(|(s, _)| s.as_str()).collect();
    for pair in names.chunks(2).take(baseline.len().min(steered.len())) {
        assert_eq!(pair, ["baseline", "steered"]);
    }
    assert_eq!(done["baseline"], tok.decode(&baseline, false).unwrap());
    assert_eq!(done["steered"], tok.decode(&steered, false).unwrap());

    // A raw vector at coefficient 0 changes nothing.
    let zero = vec![1.0f32; model.config().d_model];
    let body = json!({"prompt": "My favourite food is", "layer": 1, "coefficient": 0.0,
                      "max_new_tokens": 8, "source": {"vector": zero}});
    let (tokens, _) = steer(app(), body).await;
    assert_eq!(stream(&tokens, "baseline"), baseline);
    assert_eq!(stream(&tokens, "steered"), baseline);

    // A contrast pair runs; sampling with a seed is reproducible.
    let body = json!({"prompt": "I think that", "layer": 4, "coefficient": 4.0, "max_new_tokens": 4,
                      "temperature": 0.8, "seed": 3,
                      "source": {"contrast": {"positive": "Love", "negative": "Hate"}}});
    let (a, _) = steer(app(), body.clone()).await;
    let (b, _) = steer(app(), body).await;
    assert_eq!(a, b);
    assert_eq!(stream(&a, "steered").len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steering_refuses_bad_requests_before_streaming() {
    let d = parts().0.config().d_model;
    let ok = json!({"prompt": "Hello", "layer": 1, "coefficient": 1.0,
                    "source": {"latent": {"dict": DICT, "latent": 1}}});
    let with = |key: &str, value: Value| {
        let mut b = ok.clone();
        b[key] = value;
        b
    };
    let bad = StatusCode::BAD_REQUEST;
    let nf = StatusCode::NOT_FOUND;
    assert_error(
        post(app(), "/api/steer", with("layer", json!(30))).await,
        bad,
        "layer 30",
    );
    assert_error(
        post(app(), "/api/steer", with("max_new_tokens", json!(17))).await,
        bad,
        "max_new_tokens",
    );
    assert_error(
        post(app(), "/api/steer", with("temperature", json!(-1))).await,
        bad,
        "temperature",
    );
    assert_error(
        post(app(), "/api/steer", with("prompt", json!(""))).await,
        bad,
        "empty",
    );
    assert_error(
        post(
            app(),
            "/api/steer",
            with("source", json!({"latent": {"dict": "x", "latent": 1}})),
        )
        .await,
        nf,
        "`x`",
    );
    assert_error(
        post(
            app(),
            "/api/steer",
            with("source", json!({"latent": {"dict": DICT, "latent": 64}})),
        )
        .await,
        nf,
        "latent 64",
    );
    assert_error(
        post(
            app(),
            "/api/steer",
            with("source", json!({"vector": [1.0, 2.0]})),
        )
        .await,
        bad,
        "got 2",
    );
    assert_error(
        post(
            app(),
            "/api/steer",
            with(
                "source",
                json!({"contrast": {"positive": "", "negative": "a"}}),
            ),
        )
        .await,
        bad,
        "positive",
    );
    assert_error(
        post(app(), "/api/steer", with("source", json!({"wat": 1}))).await,
        bad,
        "malformed JSON",
    );
    assert_error(
        post(
            app(),
            "/api/steer",
            with("source", json!({"vector": vec![0.5; d + 1]})),
        )
        .await,
        bad,
        "d_model",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patching_returns_the_patcher_grid_with_labels() {
    let (model, tok, _) = parts();
    let pair = PromptPair {
        clean: "John and Mary went out. John gave it to".into(),
        corrupt: "John and Anna went out. John gave it to".into(),
        answer: " Mary".into(),
        wrong: " Anna".into(),
    };
    let body = json!({"clean": pair.clean, "corrupt": pair.corrupt, "answer": pair.answer,
                      "wrong": pair.wrong, "sweep": "resid_pre"});
    let (s, v) = post(app(), "/api/patch", body.clone()).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let tokens = pairs::tokenize(tok, std::slice::from_ref(&pair)).unwrap();
    let patcher = Patcher::new(model, &tokens, &Metric::logit_diff()).unwrap();
    let want = patcher
        .exact(Sweep::ResidPre, Direction::Denoise, |_, _| {})
        .unwrap();
    let n = model.config().n_layers;
    let seq = tokens[0].clean.len();
    assert_eq!(v["grid"]["shape"], json!([n, seq]));
    assert_eq!(v["grid"]["axes"], json!(["layer", "position"]));
    let scores: Vec<f64> = serde_json::from_value(v["grid"]["scores"].clone()).unwrap();
    assert_eq!(scores.len(), want.scores.len());
    for (i, (a, b)) in scores.iter().zip(&want.scores).enumerate() {
        assert!(close(*a, *b, 1e-6, 1e-6), "cell {i}: {a} vs {b}");
    }
    // Patching the one differing token's embedding makes the corrupt run the clean run.
    let diff = tokens[0]
        .clean
        .iter()
        .zip(&tokens[0].corrupt)
        .position(|(a, b)| a != b)
        .unwrap();
    assert!(close(want.score_at(&[0, diff]).unwrap(), 1.0, 1e-4, 0.0));
    assert_eq!(v["row_labels"][0], "L0");
    assert_eq!(v["row_labels"].as_array().unwrap().len(), n);
    assert_eq!(v["col_labels"], json!(tok.token_strings(&tokens[0].clean)));

    // A head sweep by attribution: head labels.
    let mut heads = body.clone();
    heads["sweep"] = json!("z_head");
    heads["method"] = json!("attribution");
    let (s, v) = post(app(), "/api/patch", heads).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(v["grid"]["method"], "attribution");
    assert_eq!(
        v["col_labels"].as_array().unwrap().len(),
        model.config().n_heads
    );
    assert_eq!(v["col_labels"][1], "H1");

    let bad = StatusCode::BAD_REQUEST;
    let with = |key: &str, value: &str| {
        let mut b = body.clone();
        b[key] = json!(value);
        b
    };
    for (key, value, needle) in [
        ("corrupt", "Anna went out.", "equal token length"),
        ("answer", " Mary Anna", "must be one"),
        ("sweep", "everything", "unknown sweep"),
        ("sweep", "z_head_pos", "two-axis"),
        ("method", "guess", "unknown method"),
    ] {
        assert_error(
            post(app(), "/api/patch", with(key, value)).await,
            bad,
            needle,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_a_panicking_job_500() {
    let state = state_with(
        Limits {
            workers: 1,
            queue: 0,
            ..limits()
        },
        None,
    );
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let holder = Arc::clone(&state);
    let job = tokio::spawn(async move {
        holder
            .run_model(move |_| {
                let _ = started_tx.send(());
                let _ = held.recv();
                Ok(())
            })
            .await
    });
    started.await.unwrap();
    assert_error(
        post(
            router(state.clone()),
            "/api/explore",
            json!({"text": PROMPT}),
        )
        .await,
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
    );
    let body = json!({"prompt": "Hi", "layer": 1, "coefficient": 1.0, "source": {"vector": vec![0.0; 576]}});
    assert_error(
        post(router(state.clone()), "/api/steer", body).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "busy",
    );
    // Routes without model work still answer.
    assert_eq!(
        get(router(state.clone()), "/api/health").await.0,
        StatusCode::OK
    );
    release.send(()).unwrap();
    job.await.unwrap().unwrap();
    assert_eq!(
        post(router(state.clone()), "/api/tokenize", json!({"text": "a"}))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        post(
            router(state.clone()),
            "/api/explore",
            json!({"text": PROMPT})
        )
        .await
        .0,
        StatusCode::OK
    );

    // A bug in a model job is a 500, and the server goes on.
    let r: Result<(), _> = state.run_model(|_| panic!("deliberate test panic")).await;
    assert_eq!(r.unwrap_err().status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        post(router(state), "/api/explore", json!({"text": PROMPT}))
            .await
            .0,
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_and_assets_are_embedded_and_nothing_else_is_served() {
    for page in ["/", "/latent/3-res-test/5", "/search", "/steer", "/patch"] {
        let (s, ctype, body) = send(app(), Request::get(page).body(Body::empty()).unwrap()).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        assert!(ctype.starts_with("text/html"), "{page}: {ctype}");
        assert_eq!(body, include_bytes!("../assets/index.html"), "{page}");
    }
    let (s, ctype, body) = send(
        app(),
        Request::get("/assets/app.js").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(
        (s, ctype.starts_with("text/javascript")),
        (StatusCode::OK, true)
    );
    assert_eq!(body, include_bytes!("../assets/app.js"));
    let (s, ctype, _) = send(
        app(),
        Request::get("/assets/style.css")
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!((s, ctype.starts_with("text/css")), (StatusCode::OK, true));

    let nf = StatusCode::NOT_FOUND;
    for path in [
        "/assets/../Cargo.toml",
        "/assets/%2e%2e/Cargo.toml",
        "/assets/..%2f..%2fCargo.toml",
        "/assets/%2e%2e%2fsrc%2flib.rs",
        "/assets/index.html/../../Cargo.toml",
        "/assets/secret.txt",
        "/assets/",
        "/../Cargo.toml",
        "/etc/passwd",
        "/api/nope",
        "/api/latent/a/b/c",
    ] {
        assert_error(get(app(), path).await, nf, "");
    }
    assert_error(
        get(app(), "/api/explore").await,
        StatusCode::METHOD_NOT_ALLOWED,
        "GET",
    );
    assert_error(
        post(app(), "/api/health", json!({})).await,
        StatusCode::METHOD_NOT_ALLOWED,
        "POST",
    );
}
