//! The data model of a dashboard, shared by the computation, the database, the exports and the
//! web app. Everything serialises to JSON as the web API serves it.

use serde::{Deserialize, Serialize};

/// One dictionary whose dashboards the database holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DictInfo {
    /// The id pages and the API use, e.g. `15-res-9k` (Neuronpedia's source id) or a file stem.
    pub id: String,
    /// The hook the dictionary reads (TransformerLens name), e.g. `blocks.15.hook_resid_pre`.
    pub hook: String,
    /// The layer of `hook`.
    pub layer: usize,
    pub d_in: usize,
    pub d_sae: usize,
    /// The architecture name (`standard`, `topk`, `jumprelu`, ...).
    pub architecture: String,
    /// The model the dashboards were computed on.
    pub model: String,
    /// Tokens the statistics were computed over.
    pub n_tokens: u64,
}

/// A window of tokens around one activation of a latent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Context {
    pub token_ids: Vec<u32>,
    /// The tokens as text (decoded one by one).
    pub tokens: Vec<String>,
    /// The latent's activation on every token of the window.
    pub acts: Vec<f32>,
    /// Index in the window of the token the context was chosen for.
    pub peak: usize,
    /// The activation at `peak`.
    pub peak_act: f32,
    /// Which context (sequence) of the source it came from, and the position of `peak` in it.
    pub source_index: u64,
    pub source_pos: u32,
}

/// Contexts sampled from one activation band, as SAEDashboard's quantile groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantileGroup {
    /// e.g. `"Interval 3: 0.42 - 0.63"`.
    pub name: String,
    pub lower: f32,
    pub upper: f32,
    /// Fraction of the latent's non-zero activations that fall in this band.
    pub fraction: f64,
    pub contexts: Vec<Context>,
}

/// A histogram: `counts[i]` values fell in `[edges[i], edges[i + 1])` (the last bin is closed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Histogram {
    pub edges: Vec<f32>,
    pub counts: Vec<u64>,
}

/// A token and a value (a logit effect, an activation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenValue {
    pub token_id: u32,
    pub token: String,
    pub value: f32,
}

/// Another latent of the same dictionary and the cosine similarity of its decoder row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Similar {
    pub latent: u32,
    pub cosine: f32,
}

/// Everything known about one latent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatentDashboard {
    pub dict: String,
    pub latent: u32,
    /// Tokens on which the latent was non-zero, and that count over all tokens seen.
    pub n_fired: u64,
    pub density: f64,
    pub max_act: f32,
    /// Mean of the non-zero activations.
    pub mean_act: f32,
    /// Histogram of the non-zero activations.
    pub histogram: Histogram,
    /// The highest-activating contexts, best first.
    pub top_contexts: Vec<Context>,
    /// Samples from activation bands, highest band first.
    pub quantiles: Vec<QuantileGroup>,
    /// Tokens the decoder row promotes most / least through the unembedding, strongest first.
    pub top_logits: Vec<TokenValue>,
    pub bottom_logits: Vec<TokenValue>,
    /// Histogram of the decoder row's effect on every token's logit.
    pub logit_histogram: Histogram,
    /// Latents whose decoder rows are most similar (not including this one), most similar first.
    pub similar: Vec<Similar>,
}

/// A latent that fired on a token, with its largest activation there (from the database's token
/// index: the peak tokens of each latent's top contexts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenHit {
    pub latent: u32,
    pub max_act: f32,
}
