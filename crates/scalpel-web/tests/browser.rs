//! The web app end to end in a real browser: headless Chromium (Debian's package, installed by
//! `scripts/install_chromium.sh` when missing) driven over the Chrome DevTools Protocol.
//!
//! The test serves the real router in-process (the default model, a small dictionary with
//! seeded weights, a dashboard database written here), types a prompt into the explorer, checks
//! that tokens, predictions and latent links match what the API answers, follows a latent link
//! and checks the latent page's contexts and histogram, and saves screenshots to
//! `target/browser/{explorer,latent}.png`.
//!
//! Where Chromium is missing and cannot be installed (no root, no apt-get) it prints a `SKIP`
//! line saying why and returns.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::Request;
use base64::Engine;
use candle_core::{Device, Tensor};
use http_body_util::BodyExt;
use rand::{Rng, SeedableRng};
use scalpel_core::HookPoint;
use scalpel_dict::{Architecture, DictConfig, Sae};
use scalpel_models::tokenizer::Tokenizer;
use scalpel_web::dashboards::{
    Context, DashboardDb, DictInfo, Histogram, LatentDashboard, QuantileGroup, Similar, TokenValue,
};
use scalpel_web::state::{AppState, Limits, LoadedDict};
use serde_json::{json, Value};
use tower::ServiceExt;
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

const DICT: &str = "test-res-64";
const LAYER: usize = 3;
const D_SAE: usize = 64;
const PROMPT: &str = "The Eiffel Tower is in Paris, the capital of";
/// How long the page may take to show a result (a forward pass on a shared CPU).
const WAIT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------------
// Chromium over the DevTools protocol: a browser process and one page session.

/// A headless Chromium with a fresh profile, and a DevTools connection attached to one page.
struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    profile: PathBuf,
    /// Uncaught JavaScript exceptions the page reported.
    exceptions: Vec<String>,
}

impl Browser {
    fn launch(chromium: &Path) -> Browser {
        let profile = std::env::temp_dir().join(format!("scalpel-browser-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("create the browser profile folder");
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {}: {e}", chromium.display()));
        // Chromium prints its DevTools address on stderr; keep draining stderr afterwards so it
        // never blocks on a full pipe.
        let stderr = child.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url.trim().to_string());
                    }
                } else if std::env::var_os("SCALPEL_BROWSER_LOG").is_some() {
                    eprintln!("chromium: {line}");
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("Chromium did not print its DevTools address within 60 s");
        let (ws, _) = tungstenite::connect(url.as_str()).expect("connect to Chromium's DevTools");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(240)))
                .expect("set a read timeout");
        }
        let mut b = Browser {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            profile,
            exceptions: vec![],
        };
        let target = b.call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"]
            .as_str()
            .expect("a target id")
            .to_string();
        let attached = b.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_string();
        b.call("Runtime.enable", json!({}));
        b.call("Page.enable", json!({}));
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}),
        );
        b
    }

    /// Sends one command (to the page session once attached) and returns its result, recording
    /// the events that arrive meanwhile.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.try_call(method, params)
            .unwrap_or_else(|err| panic!("DevTools command {method} failed: {err}"))
    }

    /// As `call`, but a command the browser refuses is an `Err` with its message.
    fn try_call(&mut self, method: &str, params: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .expect("send a DevTools command");
        loop {
            let reply = match self.ws.read().expect("read from DevTools") {
                Message::Text(t) => t,
                _ => continue,
            };
            let v: Value = serde_json::from_str(reply.as_str()).expect("DevTools sends JSON");
            if v["method"] == "Runtime.exceptionThrown" {
                let d = &v["params"]["exceptionDetails"];
                self.exceptions
                    .push(format!("{} {}", d["text"], d["exception"]["description"]));
            }
            if v["id"] == json!(id) {
                return match v.get("error") {
                    Some(err) => Err(err.to_string()),
                    None => Ok(v["result"].clone()),
                };
            }
        }
    }

    /// Evaluates a JavaScript expression in the page (promises awaited) and returns its value.
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("evaluating `{expr}` threw: {e}");
        }
        r["result"]["value"].clone()
    }

    fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    /// Whether `expr` is truthy now; false also while a navigation replaces the document.
    fn holds(&mut self, expr: &str) -> bool {
        let params = json!({"expression": format!("Boolean({expr})"), "returnByValue": true});
        matches!(self.try_call("Runtime.evaluate", params), Ok(r) if r["result"]["value"] == json!(true))
    }

    /// Polls `expr` until it is truthy; with `errors_fail`, fails on a visible page error.
    fn wait_for(&mut self, what: &str, expr: &str, errors_fail: bool) {
        let start = Instant::now();
        loop {
            if self.holds(expr) {
                return;
            }
            if errors_fail && self.holds("document.querySelector('.error')") {
                let err = self.eval("document.querySelector('.error').textContent");
                panic!("waiting for {what}, the page shows an error: {err}");
            }
            assert!(
                start.elapsed() < WAIT,
                "timed out after {WAIT:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A real mouse click at the middle of the first element matching `selector`.
    fn click(&mut self, selector: &str) {
        let rect = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return null;
               e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();
               return [r.left + r.width / 2, r.top + r.height / 2]; }})()",
            sel = json!(selector)
        ));
        let (x, y) = match (rect[0].as_f64(), rect[1].as_f64()) {
            (Some(x), Some(y)) => (x, y),
            _ => panic!("nothing on the page matches `{selector}`"),
        };
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }

    /// Saves a PNG of the whole page (up to 4,000 px tall).
    fn screenshot(&mut self, path: &Path) {
        self.eval("window.scrollTo(0, 0)");
        let height = self
            .eval("document.documentElement.scrollHeight")
            .as_f64()
            .unwrap_or(900.0);
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": 0, "y": 0, "width": 1280, "height": height.min(4000.0), "scale": 1}}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot is base64");
        assert_eq!(
            &png[..8],
            b"\x89PNG\r\n\x1a\n",
            "the screenshot is not a PNG"
        );
        let dir = path.parent().expect("screenshot folder");
        std::fs::create_dir_all(dir).expect("create the screenshot folder");
        let tmp = path.with_extension("png.tmp");
        std::fs::write(&tmp, &png).expect("write the screenshot");
        std::fs::rename(&tmp, path).expect("move the screenshot into place");
        println!("screenshot: {} ({} bytes)", path.display(), png.len());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// `/usr/bin/chromium`, or `chromium` on PATH, installing it with the project's script when
/// missing. `Err` says why there is none.
fn find_chromium() -> Result<PathBuf, String> {
    let look = || {
        let fixed = PathBuf::from("/usr/bin/chromium");
        if fixed.is_file() {
            return Some(fixed);
        }
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    };
    if let Some(p) = look() {
        return Ok(p);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/install_chromium.sh");
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("could not run {}: {e}", script.display()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let last = why.lines().last().unwrap_or("no message");
        return Err(format!(
            "Chromium is missing and {} failed: {last}",
            script.display()
        ));
    }
    look().ok_or_else(|| "the install script ran but no chromium is on PATH".to_string())
}

// ---------------------------------------------------------------------------------------------
// The app under test.

/// A standard dictionary with weights drawn from a seeded generator (so the same latents fire
/// on every run).
fn seeded_sae(d_model: usize) -> Sae {
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    let mut uniform = |n: usize, scale: f32| -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
    };
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let w_enc = uniform(d_model * D_SAE, 0.1);
    let b_enc = uniform(D_SAE, 0.5);
    let w_dec = uniform(D_SAE * d_model, 0.1);
    t.insert(
        "W_enc".into(),
        Tensor::from_vec(w_enc, (d_model, D_SAE), &dev).unwrap(),
    );
    t.insert(
        "b_enc".into(),
        Tensor::from_vec(b_enc, D_SAE, &dev).unwrap(),
    );
    t.insert(
        "W_dec".into(),
        Tensor::from_vec(w_dec, (D_SAE, d_model), &dev).unwrap(),
    );
    t.insert(
        "b_dec".into(),
        Tensor::zeros(d_model, candle_core::DType::F32, &dev).unwrap(),
    );
    let cfg = DictConfig::new(Architecture::Standard, d_model, D_SAE);
    Sae::from_tensors(cfg, t, "the test's seeded dictionary").expect("a valid dictionary")
}

/// Sentences the dashboards' contexts are cut from.
const CORPUS: [&str; 4] = [
    "Paris is the capital and largest city of France.",
    "The river Seine flows through the centre of the city.",
    "Rome, the capital of Italy, was founded long ago.",
    "She bought bread at a small bakery near the station.",
];

/// A made-up but well-formed dashboard for `latent`: contexts from real tokens, activations from
/// a seeded generator, a histogram of those activations.
fn dashboard(tok: &Tokenizer, latent: u32) -> LatentDashboard {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + latent as u64);
    let contexts: Vec<Context> = CORPUS
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let token_ids = tok.encode(text, false).expect("tokenise the corpus");
            let tokens = tok.token_strings(&token_ids);
            let acts: Vec<f32> = token_ids
                .iter()
                .map(|_| {
                    if rng.gen_bool(0.5) {
                        rng.gen_range(0.0..4.0)
                    } else {
                        0.0
                    }
                })
                .collect();
            let peak = (0..acts.len()).fold(0, |b, j| if acts[j] > acts[b] { j } else { b });
            Context {
                token_ids,
                tokens,
                peak_act: acts[peak],
                acts,
                peak,
                source_index: i as u64,
                source_pos: peak as u32,
            }
        })
        .collect();
    let mut top = contexts.clone();
    top.sort_by(|a, b| b.peak_act.total_cmp(&a.peak_act));
    let nonzero: Vec<f32> = contexts
        .iter()
        .flat_map(|c| c.acts.iter().copied())
        .filter(|&a| a > 0.0)
        .collect();
    let max_act = nonzero.iter().copied().fold(0.0, f32::max);
    let n_bins = 8;
    let edges: Vec<f32> = (0..=n_bins)
        .map(|i| max_act * i as f32 / n_bins as f32)
        .collect();
    let mut counts = vec![0u64; n_bins];
    for &a in &nonzero {
        counts[((a / max_act * n_bins as f32) as usize).min(n_bins - 1)] += 1;
    }
    let logit = |id: u32, value: f32| TokenValue {
        token_id: id,
        token: tok.token_strings(&[id]).remove(0),
        value,
    };
    LatentDashboard {
        dict: DICT.into(),
        latent,
        n_fired: nonzero.len() as u64,
        density: nonzero.len() as f64 / 1000.0,
        max_act,
        mean_act: nonzero.iter().sum::<f32>() / nonzero.len().max(1) as f32,
        histogram: Histogram { edges, counts },
        quantiles: vec![QuantileGroup {
            name: format!("Interval 1: 0.00 - {max_act:.2}"),
            lower: 0.0,
            upper: max_act,
            fraction: 1.0,
            contexts: contexts[..2].to_vec(),
        }],
        top_contexts: top,
        top_logits: (0..5)
            .map(|i| logit(100 + i, 2.0 - 0.3 * i as f32))
            .collect(),
        bottom_logits: (0..5)
            .map(|i| logit(200 + i, -2.0 + 0.3 * i as f32))
            .collect(),
        logit_histogram: Histogram {
            edges: vec![-2.0, -1.0, 0.0, 1.0, 2.0],
            counts: vec![3, 40, 50, 4],
        },
        similar: vec![Similar {
            latent: (latent + 1) % D_SAE as u32,
            cosine: 0.5,
        }],
    }
}

/// POSTs JSON to the router in-process and returns the JSON answer.
fn post(rt: &tokio::runtime::Runtime, app: &axum::Router, path: &str, body: Value) -> Value {
    serde_json::from_str(&post_text(rt, app, path, body)).unwrap()
}

/// POSTs JSON to the router in-process and returns the answer's text (NDJSON for `/api/steer`).
fn post_text(rt: &tokio::runtime::Runtime, app: &axum::Router, path: &str, body: Value) -> String {
    let req = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let (status, text) = send(rt, app, req);
    assert_eq!(status, 200, "{path} answered {status}: {text}");
    text
}

/// Sends `req` to the router in-process; the status and the body as text.
fn send(rt: &tokio::runtime::Runtime, app: &axum::Router, req: Request<Body>) -> (u16, String) {
    let resp = rt.block_on(app.clone().oneshot(req)).unwrap();
    let status = resp.status().as_u16();
    let bytes = rt.block_on(resp.into_body().collect()).unwrap().to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// GETs JSON from the router in-process.
fn get(rt: &tokio::runtime::Runtime, app: &axum::Router, path: &str) -> Value {
    let (status, body) = send(rt, app, Request::get(path).body(Body::empty()).unwrap());
    assert_eq!(status, 200, "{path} answered {status}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Sets a form field's value as typing would (an `input` event follows).
fn set_field(browser: &mut Browser, selector: &str, value: &str) {
    browser.eval(&format!(
        "(() => {{ const e = document.querySelector({sel}); e.value = {v};
           e.dispatchEvent(new Event('input', {{bubbles: true}}));
           e.dispatchEvent(new Event('change', {{bubbles: true}})); }})()",
        sel = json!(selector),
        v = json!(value)
    ));
}

/// A token as the page shows it (control characters made visible, as app.js does).
fn label(text: &str) -> String {
    text.replace('\n', "↵")
        .replace('\t', "⇥")
        .replace('\r', "␍")
}

fn screenshot_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("browser").join(name)
}

#[test]
fn explorer_and_latent_page_in_chromium() {
    let chromium = match find_chromium() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIP explorer_and_latent_page_in_chromium: {why}");
            return;
        }
    };

    // The app: the default model, one seeded dictionary, dashboards for all its latents.
    let loaded =
        scalpel_models::loader::load("smollm2-135m", &Device::Cpu).expect("load the default model");
    let tokenizer = loaded.tokenizer.expect("the default model has a tokenizer");
    let d_model = loaded.model.config().d_model;
    let hook = HookPoint::parse(&format!("blocks.{LAYER}.hook_resid_pre")).unwrap();
    let sae = seeded_sae(d_model);
    let db_dir = std::env::temp_dir().join(format!("scalpel-browser-db-{}", std::process::id()));
    std::fs::create_dir_all(&db_dir).unwrap();
    let db = DashboardDb::create(&db_dir.join("dashboards.sqlite"))
        .expect("create the dashboard database");
    db.put_dict(&DictInfo {
        id: DICT.into(),
        hook: hook.to_string(),
        layer: LAYER,
        d_in: d_model,
        d_sae: D_SAE,
        architecture: "standard".into(),
        model: "smollm2-135m".into(),
        n_tokens: 1000,
    })
    .expect("store the dictionary");
    let dashboards: Vec<LatentDashboard> = (0..D_SAE as u32)
        .map(|l| dashboard(&tokenizer, l))
        .collect();
    db.put_latents(&dashboards).expect("store the dashboards");
    let dicts = vec![LoadedDict {
        id: DICT.into(),
        hook,
        layer: LAYER,
        sae,
    }];
    let state: Arc<AppState> = AppState::new(
        loaded.model,
        tokenizer,
        "smollm2-135m",
        dicts,
        Some(db),
        Limits::default(),
        None,
    );
    let app = scalpel_web::server::router(state);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let served = app.clone();
    rt.spawn(async move { axum::serve(listener, served).await });

    // What the page should show, from the API itself.
    let expected = post(
        &rt,
        &app,
        "/api/explore",
        json!({"text": PROMPT, "top_k": 5}),
    );
    let tokens: Vec<String> = expected["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| label(t["text"].as_str().unwrap()))
        .collect();
    assert!(
        tokens.len() > 3,
        "the prompt should split into several tokens: {tokens:?}"
    );
    let fired = expected["latents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_array().unwrap().len())
        .sum::<usize>();
    assert!(
        fired > 0,
        "no latent of the seeded dictionary fires on the prompt"
    );

    let mut browser = Browser::launch(&chromium);

    // Explorer: type the prompt, run, read back tokens, predictions and latent links.
    browser.navigate(&format!("{base}/"));
    browser.wait_for("the prompt box", "document.querySelector('#prompt')", true);
    browser.eval(
        "(() => { const p = document.querySelector('#prompt'); p.value = ''; p.focus(); })()",
    );
    browser.call("Input.insertText", json!({"text": PROMPT}));
    assert_eq!(
        browser.eval("document.querySelector('#prompt').value"),
        json!(PROMPT)
    );
    browser.click("#run");
    browser.wait_for(
        "tokens, predictions and latent links",
        "document.querySelector('#tokens .token') && document.querySelector('.prediction') \
         && document.querySelector('.latent-link')",
        true,
    );
    let shown = browser.eval(
        "({tokens: [...document.querySelectorAll('#tokens .token')].map(e => e.textContent),
           rows: [...document.querySelectorAll('table.per-token tr[data-pos]')].map(r => ({
             preds: [...r.querySelectorAll('.prediction .tok')].map(e => e.textContent),
             links: [...r.querySelectorAll('a.latent-link')].map(a => a.getAttribute('href')) })),
           lensRows: document.querySelectorAll('table.lens tr').length})",
    );
    let shown_tokens: Vec<String> = serde_json::from_value(shown["tokens"].clone()).unwrap();
    assert_eq!(
        shown_tokens, tokens,
        "the token strip differs from /api/explore's tokens"
    );
    let rows = shown["rows"].as_array().unwrap();
    assert_eq!(rows.len(), tokens.len(), "one row per position");
    for (pos, row) in rows.iter().enumerate() {
        let want_preds: Vec<String> = expected["predictions"][pos]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| label(p["text"].as_str().unwrap()))
            .collect();
        let got_preds: Vec<String> = serde_json::from_value(row["preds"].clone()).unwrap();
        assert_eq!(got_preds, want_preds, "predictions at position {pos}");
        let want_links: Vec<String> = expected["latents"][pos]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| format!("/latent/{}/{}", l["dict"].as_str().unwrap(), l["latent"]))
            .collect();
        let got_links: Vec<String> = serde_json::from_value(row["links"].clone()).unwrap();
        assert_eq!(got_links, want_links, "latent links at position {pos}");
    }
    let n_layers = browser.eval("fetch('/api/info').then(r => r.json()).then(j => j.n_layers)");
    assert_eq!(
        shown["lensRows"].as_u64(),
        n_layers.as_u64().map(|n| n + 2),
        "the logit lens grid has a header and one row per residual point"
    );
    // Attention patterns: one heatmap per head, one cell per (query, key).
    browser.click("#attn-show");
    browser.wait_for(
        "attention patterns",
        "document.querySelector('svg.attention')",
        true,
    );
    let n_heads = browser.eval("fetch('/api/info').then(r => r.json()).then(j => j.n_heads)");
    let heads = browser.eval("document.querySelectorAll('svg.attention').length");
    assert_eq!(heads, n_heads, "one attention heatmap per head");
    let cells = browser
        .eval("document.querySelector('svg.attention').querySelectorAll('rect.cell').length");
    assert_eq!(
        cells.as_u64(),
        Some((tokens.len() * tokens.len()) as u64),
        "a cell per query and key"
    );
    browser.screenshot(&screenshot_path("explorer.png"));

    // Latent page: follow the first latent link.
    let href = rows
        .iter()
        .flat_map(|r| r["links"].as_array().unwrap())
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let latent: u32 = href.rsplit('/').next().unwrap().parse().unwrap();
    browser.click("a.latent-link");
    browser.wait_for(
        "the latent page",
        &format!(
            "location.pathname === {} && document.querySelector('.context')",
            json!(href)
        ),
        true,
    );
    let page = browser.eval(
        "({title: document.querySelector('h1').textContent,
           contexts: [...document.querySelectorAll('#top-contexts .context')].map(c =>
             [...c.querySelectorAll('.ctx-token')].map(t => t.textContent).join('')),
           bars: [...document.querySelector('svg.histogram').querySelectorAll('rect.bar')].map(r => Number(r.getAttribute('height')))})",
    );
    let want = &dashboards[latent as usize];
    assert_eq!(page["title"], json!(format!("{DICT} #{latent}")));
    let want_contexts: Vec<String> = want
        .top_contexts
        .iter()
        .map(|c| c.tokens.iter().map(|t| label(t)).collect())
        .collect();
    let got_contexts: Vec<String> = serde_json::from_value(page["contexts"].clone()).unwrap();
    assert_eq!(
        got_contexts, want_contexts,
        "the top contexts of latent {latent}"
    );
    let bars: Vec<f64> = serde_json::from_value(page["bars"].clone()).unwrap();
    assert_eq!(
        bars.len(),
        want.histogram.counts.len(),
        "one bar per histogram bin"
    );
    let tallest = (0..bars.len()).fold(0, |b, i| if bars[i] > bars[b] { i } else { b });
    let most = want.histogram.counts.iter().max().unwrap();
    assert_eq!(
        want.histogram.counts[tallest], *most,
        "the tallest bar is the fullest bin"
    );
    assert!(bars[tallest] > 0.0);
    browser.screenshot(&screenshot_path("latent.png"));

    // An unknown latent shows the API's error on the page rather than a blank page.
    browser.navigate(&format!("{base}/latent/{DICT}/99999"));
    browser.wait_for(
        "the error of an unknown latent",
        "location.pathname.endsWith('/99999') && document.querySelector('.error')",
        false,
    );
    let err = browser.eval("document.querySelector('.error').textContent");
    assert!(
        err.as_str().unwrap().contains("404"),
        "the error names the status: {err}"
    );

    // Search by token, from the database: the page lists the API's hits in order.
    let token = " city";
    let want = get(
        &rt,
        &app,
        &format!("/api/search/token?dict={DICT}&token=%20city&k=20"),
    );
    let want_hits: Vec<String> = want["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("/latent/{DICT}/{}", h["latent"]))
        .collect();
    assert!(!want_hits.is_empty(), "some stored context holds `{token}`");
    browser.navigate(&format!("{base}/search"));
    browser.wait_for(
        "the search page",
        "document.querySelector('#search-token-run')",
        true,
    );
    set_field(&mut browser, "#search-token", token);
    browser.click("#search-token-run");
    browser.wait_for(
        "token search hits",
        "document.querySelector('#search-token-out ul.hits')",
        true,
    );
    let got_hits = browser.eval(
        "[...document.querySelectorAll('#search-token-out a.latent-link')].map(a => a.getAttribute('href'))",
    );
    assert_eq!(got_hits, json!(want_hits), "hits of the token search");

    // Search by prompt, live: the same hits as the API.
    let want = post(
        &rt,
        &app,
        "/api/search/prompt",
        json!({"text": PROMPT, "dict": DICT, "k": 20}),
    );
    let want_hits: Vec<String> = want["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("/latent/{DICT}/{}", h["latent"]))
        .collect();
    set_field(&mut browser, "#search-prompt", PROMPT);
    browser.click("#search-prompt-run");
    browser.wait_for(
        "prompt search hits",
        "document.querySelector('#search-prompt-out ul.hits')",
        true,
    );
    let got_hits = browser.eval(
        "[...document.querySelectorAll('#search-prompt-out a.latent-link')].map(a => a.getAttribute('href'))",
    );
    assert_eq!(got_hits, json!(want_hits), "hits of the prompt search");
    browser.screenshot(&screenshot_path("search.png"));

    // Steering: both generations stream into the page and end as the API's texts.
    let steer = json!({"prompt": "I think that", "layer": LAYER, "coefficient": 8.0, "max_new_tokens": 8,
                       "source": {"latent": {"dict": DICT, "latent": latent}}, "temperature": 0.0, "seed": 0});
    let lines: Vec<Value> = post_text(&rt, &app, "/api/steer", steer)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let done = lines.last().unwrap();
    assert_eq!(
        done["done"],
        json!(true),
        "the stream ends with the final texts"
    );
    browser.navigate(&format!("{base}/steer?dict={DICT}&latent={latent}"));
    browser.wait_for(
        "the steering page",
        "document.querySelector('#steer-run')",
        true,
    );
    set_field(&mut browser, "#steer-prompt", "I think that");
    set_field(&mut browser, "#steer-coef", "8");
    set_field(&mut browser, "#steer-max", "8");
    assert_eq!(
        browser.eval("document.querySelector('#steer-layer').value"),
        json!(LAYER.to_string())
    );
    browser.click("#steer-run");
    browser.wait_for(
        "the end of the generations",
        "document.querySelector('#steer-done')",
        true,
    );
    for stream in ["baseline", "steered"] {
        let shown = browser.eval(&format!(
            "[...document.querySelectorAll('#{stream} .gen-token, #{stream} .gen-text')].map(e => e.textContent).join('')"
        ));
        assert_eq!(shown, done[stream], "the {stream} generation");
        let streamed: Vec<&str> = lines
            .iter()
            .filter(|l| l["stream"] == json!(stream))
            .map(|l| l["text"].as_str().unwrap())
            .collect();
        assert!(!streamed.is_empty(), "the API streamed {stream} tokens");
        // Where the tokens spell the final text, the page keeps one span per streamed token.
        if streamed.concat() == done[stream].as_str().unwrap() {
            let spans = browser.eval(&format!(
                "document.querySelectorAll('#{stream} .gen-token').length"
            ));
            assert_eq!(
                spans.as_u64(),
                Some(streamed.len() as u64),
                "{stream} tokens shown as streamed"
            );
        }
    }
    browser.screenshot(&screenshot_path("steer.png"));

    // Patching: the heatmap has one cell per grid cell, labelled by the API's labels.
    let patch = json!({"clean": "When John and Mary went to the store, Mary gave a drink to",
                       "corrupt": "When John and Mary went to the store, John gave a drink to",
                       "answer": " John", "wrong": " Mary", "sweep": "resid_pre", "method": "attribution"});
    let want = post(&rt, &app, "/api/patch", patch);
    let n_cells: u64 = want["grid"]["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .product();
    browser.navigate(&format!("{base}/patch"));
    browser.wait_for(
        "the patching page",
        "document.querySelector('#patch-run')",
        true,
    );
    set_field(&mut browser, "#patch-method", "attribution");
    browser.click("#patch-run");
    browser.wait_for(
        "the patching heatmap",
        "document.querySelector('svg.patch')",
        true,
    );
    let cells = browser.eval("document.querySelectorAll('svg.patch rect.cell').length");
    assert_eq!(
        cells.as_u64(),
        Some(n_cells),
        "one heatmap cell per grid cell"
    );
    let first_row = browser.eval("document.querySelector('svg.patch rect.cell title').textContent");
    let row0 = want["row_labels"][0].as_str().unwrap();
    assert!(
        first_row.as_str().unwrap().starts_with(row0),
        "cell titles name the row: {first_row}"
    );
    browser.screenshot(&screenshot_path("patch.png"));

    // Token text is text, never markup; a refused request shows the server's reason.
    let markup = "Say <b>bold</b> & <img src=x onerror=alert(1)>";
    browser.navigate(&format!("{base}/"));
    browser.wait_for("the prompt box", "document.querySelector('#prompt')", true);
    set_field(&mut browser, "#prompt", markup);
    browser.click("#run");
    browser.wait_for(
        "the tokens of a prompt holding markup",
        "[...document.querySelectorAll('#tokens .token')].map(e => e.textContent).join('').includes('<b>')",
        true,
    );
    let injected =
        browser.eval("document.querySelectorAll('#explore-out b, #explore-out img').length");
    assert_eq!(injected, json!(0), "token text was parsed as HTML");
    set_field(&mut browser, "#prompt", "");
    browser.click("#run");
    browser.wait_for(
        "the error of an empty prompt",
        "document.querySelector('#explore-out .error')",
        false,
    );
    let err = browser.eval("document.querySelector('#explore-out .error').textContent");
    assert!(
        err.as_str().unwrap().starts_with("400"),
        "the error names the status: {err}"
    );

    assert!(
        browser.exceptions.is_empty(),
        "the page threw: {:?}",
        browser.exceptions
    );
    drop(browser);
    let _ = std::fs::remove_dir_all(&db_dir);
}
