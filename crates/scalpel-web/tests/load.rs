//! 1,000 concurrent requests to a real server on loopback (raw HTTP/1.1 over `TcpStream`): a mix
//! of health checks, latent pages and prompt-explorer requests. Every one must get a well-formed
//! JSON answer, 200 or (model work beyond the bounded queue) 503, and the server must go on
//! answering afterwards.

use std::sync::Arc;

use candle_core::Device;
use scalpel_core::HookPoint;
use scalpel_dict::{Architecture, DictConfig, Sae};
use scalpel_web::dashboards::{DashboardDb, DictInfo, Histogram, LatentDashboard};
use scalpel_web::state::{AppState, Limits, LoadedDict};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REQUESTS: usize = 1000;
const DICT: &str = "3-res-load";

fn state() -> Arc<AppState> {
    let loaded = scalpel_models::loader::load("smollm2-135m", &Device::Cpu).expect("default model");
    let tok = loaded.tokenizer.clone().expect("tokenizer");
    let d = loaded.model.config().d_model;
    let sae = Sae::random(
        DictConfig::new(Architecture::Standard, d, 32),
        0.05,
        &Device::Cpu,
    )
    .unwrap();
    let dir = std::env::temp_dir().join(format!("scalpel-web-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dashboards.db");
    let _ = std::fs::remove_file(&path);
    let db = DashboardDb::create(&path).unwrap();
    db.put_dict(&DictInfo {
        id: DICT.into(),
        hook: "blocks.3.hook_resid_pre".into(),
        layer: 3,
        d_in: d,
        d_sae: 32,
        architecture: "standard".into(),
        model: "smollm2-135m".into(),
        n_tokens: 100,
    })
    .unwrap();
    let latents: Vec<LatentDashboard> = (0..32)
        .map(|l| LatentDashboard {
            dict: DICT.into(),
            latent: l,
            n_fired: 1,
            density: 0.01,
            max_act: 1.0,
            mean_act: 1.0,
            histogram: Histogram {
                edges: vec![0.0, 1.0],
                counts: vec![1],
            },
            top_contexts: Vec::new(),
            quantiles: Vec::new(),
            top_logits: Vec::new(),
            bottom_logits: Vec::new(),
            logit_histogram: Histogram {
                edges: vec![0.0, 1.0],
                counts: vec![1],
            },
            similar: Vec::new(),
        })
        .collect();
    db.put_latents(&latents).unwrap();
    let dict = LoadedDict {
        id: DICT.into(),
        hook: HookPoint::resid_pre(3),
        layer: 3,
        sae,
    };
    let limits = Limits {
        max_prompt_tokens: 16,
        workers: 1,
        queue: 8,
        ..Limits::default()
    };
    AppState::new(
        loaded.model,
        tok,
        "smollm2-135m",
        vec![dict],
        Some(db),
        limits,
        None,
    )
}

/// One request over a fresh connection; the status and the JSON body.
async fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, Value), String> {
    let mut s = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: \
         application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // Head and body in separate writes, as many clients send them.
    let (head, body) = request.split_at(request.len() - body.len());
    for part in [head, body] {
        s.write_all(part.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8(raw).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(format!("no header end: {text:?}"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("no status line: {head:?}"))?;
    if !head
        .to_ascii_lowercase()
        .contains("content-type: application/json")
    {
        return Err(format!("{status} without a JSON content type: {head:?}"));
    }
    let json = serde_json::from_str(body)
        .map_err(|e| format!("{status}: body is not JSON ({e}): {body:?}"))?;
    Ok((status, json))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_requests_all_get_json_answers() {
    let state = tokio::task::spawn_blocking(state).await.unwrap();
    let listener = scalpel_web::server::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(scalpel_web::server::serve(listener, state, async {
        let _ = stopped.await;
    }));

    let explore = r#"{"text": "Hello there", "top_k": 1, "dicts": []}"#;
    let tasks: Vec<_> = (0..REQUESTS)
        .map(|i| {
            let (method, path, body) = match i % 3 {
                0 => ("GET", "/api/health".to_string(), ""),
                1 => ("GET", format!("/api/latent/{DICT}/{}", i % 32), ""),
                _ => ("POST", "/api/explore".to_string(), explore),
            };
            tokio::spawn(async move { (i, request(addr, method, &path, body).await) })
        })
        .collect();
    let mut ok = [0usize; 3];
    let mut busy = 0;
    for t in tasks {
        let (i, r) = t.await.expect("the client task runs");
        let (status, json) = r.unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        match status {
            200 => {
                ok[i % 3] += 1;
                match i % 3 {
                    0 => assert_eq!(json["ok"], true),
                    1 => assert_eq!(json["latent"], (i % 32) as u64),
                    _ => assert!(json["lens"]["cells"].is_array(), "{json}"),
                }
            }
            503 => {
                assert_eq!(
                    i % 3,
                    2,
                    "only model work may be refused, request {i}: {json}"
                );
                assert!(json["error"].as_str().unwrap().contains("busy"), "{json}");
                busy += 1;
            }
            s => panic!("request {i}: status {s}: {json}"),
        }
    }
    eprintln!("answered: {ok:?} ok (health, latent, explore), {busy} busy");
    assert_eq!(
        ok[0] + ok[1],
        REQUESTS / 3 * 2 + 1,
        "every health and latent request succeeds"
    );
    assert!(ok[2] >= 1, "at least one explore request was served");
    // Still alive.
    let (status, _) = request(addr, "GET", "/api/health", "").await.unwrap();
    assert_eq!(status, 200);
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
