//! Neuronpedia's official Python client against a running server: `scalpel serve`'s router on
//! `127.0.0.1:0`, and `scripts/neuronpedia_client_check.py` calling every route through
//! `neuronpedia-inference-client==1.10.1` (installed once into a virtualenv under
//! `~/.cache/scalpel/np-client-venv`). The client validates each response against the protocol's
//! models; this test then checks the values against the library.
//!
//! Where `python3` is absent the test prints a `SKIP` line and returns; a failed install of the
//! client (no network) is a failure, not a skip.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use scalpel_core::{HookPoint, Hooks};
use scalpel_dict::{Architecture, DictConfig, Sae};
use scalpel_models::generation::{generate, GenerateOptions};
use scalpel_web::state::{AppState, Limits, LoadedDict};
use serde_json::Value;

mod common;
use common::{close, floats};

const CLIENT: &str = "neuronpedia-inference-client==1.10.1";
const MODEL: &str = "smollm2-135m";
const SOURCE: &str = "3-res-test";
const SECRET: &str = "s3cret-for-the-test";
const PROMPT: &str = "The Eiffel Tower is in Paris, the capital of";

fn venv_dir() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache/scalpel/np-client-venv")
}

fn python_works(python: &Path, code: &str) -> bool {
    Command::new(python)
        .args(["-c", code])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The virtualenv's python with the client installed (installed now when missing).
fn client_python() -> PathBuf {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    let check = "import neuronpedia_inference_client as n; assert n.__version__ == '1.10.1'";
    if python_works(&python, check) {
        return python;
    }
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .expect("python3 -m venv");
    assert!(
        made.status.success(),
        "python3 -m venv {}: {}",
        venv.display(),
        String::from_utf8_lossy(&made.stderr)
    );
    let pip = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            CLIENT,
        ])
        .output()
        .expect("pip");
    assert!(
        pip.status.success(),
        "pip install {CLIENT}: {}",
        String::from_utf8_lossy(&pip.stderr)
    );
    assert!(
        python_works(&python, check),
        "{CLIENT} did not import after installing"
    );
    python
}

fn output(v: &Value, kind: &str) -> String {
    let outs = v["outputs"].as_array().unwrap();
    outs.iter().find(|o| o["type"] == kind).unwrap()["output"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn the_official_client_talks_to_scalpel() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!(
            "SKIP neuronpedia_client: python3 is not installed, so the official client cannot run"
        );
        return;
    }
    let python = client_python();

    let loaded = scalpel_models::loader::load(MODEL, &Device::Cpu).expect("default model");
    let tok = loaded.tokenizer.clone().expect("tokenizer");
    let model = loaded.model;
    let d = model.config().d_model;
    let sae = Sae::random(
        DictConfig::new(Architecture::Standard, d, 64),
        0.05,
        &Device::Cpu,
    )
    .unwrap();
    let hook = HookPoint::resid_pre(3);
    let dict = LoadedDict {
        id: SOURCE.into(),
        hook,
        layer: 3,
        sae: sae.clone(),
    };
    let state = AppState::new(
        model.clone(),
        tok.clone(),
        MODEL,
        vec![dict],
        None,
        Limits::default(),
        Some(SECRET.into()),
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, scalpel_web::server::router(state)).await });

    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/neuronpedia_client_check.py");
    let run = Command::new(&python)
        .arg(&script)
        .args([
            format!("http://{addr}"),
            SECRET.into(),
            MODEL.into(),
            SOURCE.into(),
        ])
        .output()
        .expect("run the client script");
    assert!(
        run.status.success(),
        "{}: {}",
        script.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    let out: Value = serde_json::from_slice(&run.stdout).expect("the script prints JSON");
    assert_eq!(out["client_version"], "1.10.1");
    // Round-trip times through the client, for the record (not checked: timing is no test).
    println!("seconds per call: {}", out["seconds"]);

    // What the library says.
    let ids = tok.encode(PROMPT, true).unwrap();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let (_, cache) = model.run_with_cache(&input, |p| p == hook).unwrap();
    let acts: Vec<Vec<f32>> = sae
        .encode(&cache.get(hook).unwrap().squeeze(0).unwrap())
        .unwrap()
        .to_vec2()
        .unwrap();
    let w_dec: Vec<Vec<f32>> = sae.tensor("W_dec").unwrap().to_vec2().unwrap();

    let got_ids: Vec<u32> = serde_json::from_value(out["tokenize"]["tokens"].clone()).unwrap();
    assert_eq!(got_ids, ids);

    let col7: Vec<f32> = acts.iter().map(|r| r[7]).collect();
    for (name, values) in [
        ("single", &out["single"]["activation"]["values"]),
        (
            "single_batch",
            &out["single_batch"]["results"][0]["activation"]["values"],
        ),
    ] {
        let got = floats(values);
        assert_eq!(got.len(), col7.len(), "{name}");
        assert!(
            got.iter().zip(&col7).all(|(a, b)| close(*a, *b)),
            "{name}: {got:?} vs {col7:?}"
        );
    }
    assert_eq!(out["single_batch"]["results"].as_array().unwrap().len(), 2);

    // activation/all: the first latent is the one with the largest activation anywhere.
    let (best, best_max) = (0..64)
        .map(|j| (j, acts.iter().map(|r| r[j]).fold(f32::MIN, f32::max)))
        .fold((0, f32::MIN), |b, x| if x.1 > b.1 { x } else { b });
    let first = &out["all"]["activations"][0];
    assert_eq!(first["index"], best);
    assert_eq!(first["source"], SOURCE);
    assert!(close(first["max_value"].as_f64().unwrap() as f32, best_max));
    assert!(out["all"]["activations"].as_array().unwrap().len() <= 5);
    assert_eq!(out["all_batch"]["results"].as_array().unwrap().len(), 2);

    // topk-by-token: the strongest latent at each token.
    let topk = out["topk"]["results"].as_array().unwrap();
    assert_eq!(topk.len(), ids.len());
    for (t, r) in topk.iter().enumerate() {
        let top = (0..64).fold(0, |b, j| if acts[t][j] > acts[t][b] { j } else { b });
        if acts[t][top] > 0.0 {
            assert_eq!(r["top_features"][0]["feature_index"], top, "token {t}");
        }
    }
    assert_eq!(out["topk_batch"]["results"].as_array().unwrap().len(), 2);
    let n_active: usize = acts.iter().flatten().filter(|&&a| a > 0.0).count();
    let active = out["source"]["results"][0]["activeFeatures"]
        .as_object()
        .unwrap();
    assert_eq!(
        active
            .values()
            .map(|l| l.as_array().unwrap().len())
            .sum::<usize>(),
        n_active
    );

    // util: the decoder row, and the row as its own nearest neighbour.
    let row = floats(&out["sae_vector"]["vector"]);
    assert!(row.iter().zip(&w_dec[5]).all(|(a, b)| close(*a, *b)));
    assert_eq!(out["sae_vector"]["hookName"], "blocks.3.hook_resid_pre");
    let hits = out["cossim"]["topk_decoder_cossim_features"]
        .as_array()
        .unwrap();
    assert_eq!(hits.len(), 4);
    assert_eq!(hits[0]["feature"]["index"], 5);
    assert!(close(
        hits[0]["cosine_similarity"].as_f64().unwrap() as f32,
        1.0
    ));

    // Steering: strength 0 is the default, which is the library's greedy continuation.
    let opts = GenerateOptions {
        max_new_tokens: 6,
        stop_tokens: tok.eos_ids().to_vec(),
        ..Default::default()
    };
    let greedy = generate(&model, &ids, &opts, &mut Hooks::new(), |_| {}).unwrap();
    let default = format!("{PROMPT}{}", tok.decode(&greedy.tokens, false).unwrap());
    assert_eq!(output(&out["steer_zero"], "DEFAULT"), default);
    assert_eq!(output(&out["steer_zero"], "STEERED"), default);
    assert_eq!(
        out["steer_zero"]["outputs"][0]["logprobs"][0]["top_logprobs"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_ne!(output(&out["steer_strong"], "STEERED"), default);
    assert_eq!(output(&out["steer_strong"], "DEFAULT"), default);
    let chat = &out["steer_chat"];
    assert_eq!(chat["outputs"][0]["raw"], chat["outputs"][1]["raw"]);
    assert_eq!(chat["outputs"][0]["chat_template"][1]["role"], "assistant");

    // Errors reach the client as its exceptions, with our JSON message.
    let errors = &out["errors"];
    assert_eq!(errors["wrong_secret"]["status"], 401);
    assert_eq!(errors["unknown_source"]["status"], 404);
    assert!(errors["unknown_source"]["body"]["error"]
        .as_str()
        .unwrap()
        .contains("99-res-none"));
    assert_eq!(errors["wrong_model"]["status"], 400);
    assert_eq!(errors["unsupported_method"]["status"], 400);
    assert!(errors["unsupported_method"]["body"]["error"]
        .as_str()
        .unwrap()
        .contains("SIMPLE_ADDITIVE"));
}
