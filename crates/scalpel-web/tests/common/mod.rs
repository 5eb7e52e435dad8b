//! What the web tests share: the default model and a random dictionary, loaded once per test
//! binary.
#![allow(dead_code)]

use std::sync::OnceLock;

use candle_core::Device;
use scalpel_dict::{Architecture, DictConfig, Sae};
use scalpel_models::tokenizer::Tokenizer;
use scalpel_models::transformer::Model;

pub const MODEL: &str = "smollm2-135m";
/// The dictionary's layer: it reads `blocks.{LAYER}.hook_resid_pre`.
pub const LAYER: usize = 3;
pub const D_SAE: usize = 64;
pub const PROMPT: &str = "The Eiffel Tower is in Paris, the capital of";

/// The default model and a random dictionary at `blocks.3.hook_resid_pre`, loaded once.
pub fn parts() -> &'static (Model, Tokenizer, Sae) {
    static PARTS: OnceLock<(Model, Tokenizer, Sae)> = OnceLock::new();
    PARTS.get_or_init(|| {
        let loaded = scalpel_models::loader::load(MODEL, &Device::Cpu).expect("default model");
        let tok = loaded.tokenizer.clone().expect("tokenizer");
        let d = loaded.model.config().d_model;
        let cfg = DictConfig::new(Architecture::Standard, d, D_SAE);
        let sae = Sae::random(cfg, 0.05, &Device::Cpu).expect("random dictionary");
        (loaded.model, tok, sae)
    })
}

/// The dictionary's id (a Neuronpedia source id).
pub const DICT: &str = "3-res-test";

/// Server state over [`parts`]: the model and the dictionary as [`DICT`].
pub fn state(
    limits: scalpel_web::state::Limits,
    db: Option<scalpel_web::dashboards::DashboardDb>,
    secret: Option<&str>,
) -> std::sync::Arc<scalpel_web::state::AppState> {
    let (model, tok, sae) = parts();
    let dict = scalpel_web::state::LoadedDict {
        id: DICT.into(),
        hook: scalpel_core::HookPoint::resid_pre(LAYER),
        layer: LAYER,
        sae: sae.clone(),
    };
    scalpel_web::state::AppState::new(
        model.clone(),
        tok.clone(),
        MODEL,
        vec![dict],
        db,
        limits,
        secret.map(str::to_string),
    )
}

/// A JSON array of numbers as f32.
pub fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .expect("a JSON array")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

/// Equal to 1e-4, absolute plus relative.
pub fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-4 + 1e-4 * b.abs()
}
