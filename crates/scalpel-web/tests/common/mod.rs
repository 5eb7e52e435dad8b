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
