//! `/v1/tokenize`, `/v1/util/sae-vector` (a latent's decoder row) and
//! `/v1/util/sae-topk-by-decoder-cossim` (the latents whose decoder rows point most nearly the
//! same way as a given latent's or vector).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{check_latent, check_model, l2_norm, source, NpJson, OrApi};
use crate::state::{AppState, LoadedDict};
use crate::ApiError;

/// Most latents `sae-topk-by-decoder-cossim` returns (the protocol's clamp).
const MAX_COSSIM_RESULTS: usize = 128;

#[derive(Deserialize)]
pub struct TokenizeRequest {
    model: String,
    text: String,
    #[serde(default)]
    prepend_bos: Option<bool>,
}

#[derive(Serialize)]
pub struct TokenizeResponse {
    tokens: Vec<u32>,
    token_strings: Vec<String>,
    prepend_bos: bool,
}

pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    check_model(&state, &req.model)?;
    let tok = &state.tokenizer;
    let mut tokens = tok.encode(&req.text, false).api()?;
    let bos = match (req.prepend_bos.unwrap_or(tok.add_bos()), tok.bos_id()) {
        (true, Some(bos)) => Some(bos),
        _ => None,
    };
    if let Some(bos) = bos {
        tokens.insert(0, bos);
    }
    let max = state
        .limits
        .max_prompt_tokens
        .min(state.model.config().n_ctx);
    if tokens.len() > max {
        return Err(ApiError::bad_request(format!(
            "the text has {} tokens; at most {max} are accepted",
            tokens.len()
        )));
    }
    Ok(Json(TokenizeResponse {
        token_strings: tok.token_strings(&tokens),
        tokens,
        prepend_bos: bos.is_some(),
    }))
}

#[derive(Deserialize, Serialize, Clone)]
pub struct Feature {
    model: String,
    source: String,
    index: i64,
}

#[derive(Serialize)]
pub struct SaeVectorResponse {
    vector: Vec<f32>,
    #[serde(rename = "hookName")]
    hook_name: String,
}

pub async fn sae_vector(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<Feature>,
) -> Result<Json<SaeVectorResponse>, ApiError> {
    check_model(&state, &req.model)?;
    let (_, dict) = source(&state, &req.source)?;
    let index = check_latent(dict, req.index)?;
    Ok(Json(SaeVectorResponse {
        vector: decoder(dict)?.get(index).api()?.to_vec1().api()?,
        hook_name: dict.hook.to_string(),
    }))
}

#[derive(Deserialize)]
pub struct CossimRequest {
    #[serde(default)]
    feature: Option<Feature>,
    #[serde(default)]
    vector: Option<Vec<f32>>,
    model: String,
    source: String,
    num_results: i64,
}

#[derive(Serialize)]
struct CossimHit {
    feature: Feature,
    cosine_similarity: f32,
}

#[derive(Serialize)]
pub struct CossimResponse {
    #[serde(skip_serializing_if = "Option::is_none")]
    feature: Option<Feature>,
    topk_decoder_cossim_features: Vec<CossimHit>,
}

pub async fn topk_by_decoder_cossim(
    State(state): State<Arc<AppState>>,
    NpJson(req): NpJson<CossimRequest>,
) -> Result<Json<CossimResponse>, ApiError> {
    check_model(&state, &req.model)?;
    let (_, dict) = source(&state, &req.source)?;
    let w_dec = decoder(dict)?; // [d_sae, d]
    let query: Tensor = match (&req.feature, &req.vector) {
        (Some(f), None) => {
            check_model(&state, &f.model)?;
            let (_, of) = source(&state, &f.source)?;
            decoder(of)?.get(check_latent(of, f.index)?).api()?
        }
        (None, Some(v)) => Tensor::new(v.as_slice(), &Device::Cpu).api()?,
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of `feature` and `vector`",
            ))
        }
    };
    let (d_sae, d) = w_dec.dims2().api()?;
    if query.elem_count() != d {
        return Err(ApiError::bad_request(format!(
            "the query has {} values but `{}`'s decoder rows have {d}",
            query.elem_count(),
            dict.id
        )));
    }
    if req.num_results < 0 {
        return Err(ApiError::bad_request(format!(
            "num_results must be >= 0, got {}",
            req.num_results
        )));
    }
    let n = (req.num_results as usize)
        .min(MAX_COSSIM_RESULTS)
        .min(d_sae);
    let cos = cosines(w_dec, &query)?;
    let mut order: Vec<usize> = (0..d_sae).collect();
    order.sort_by(|&a, &b| cos[b].total_cmp(&cos[a]).then(a.cmp(&b)));
    order.truncate(n);
    let topk_decoder_cossim_features = order
        .into_iter()
        .map(|i| CossimHit {
            feature: Feature {
                model: state.model_id.clone(),
                source: dict.id.clone(),
                index: i as i64,
            },
            cosine_similarity: cos[i],
        })
        .collect();
    Ok(Json(CossimResponse {
        feature: req.feature,
        topk_decoder_cossim_features,
    }))
}

/// `W_dec [d_sae, d]` of a dictionary.
fn decoder(dict: &LoadedDict) -> Result<&Tensor, ApiError> {
    dict.sae
        .tensor("W_dec")
        .ok_or_else(|| ApiError::bad_request(format!("`{}` has no decoder (W_dec)", dict.id)))
}

/// The cosine of each row of `rows [n, d]` with `query` (`d` values); 0 for a row of norm 0.
fn cosines(rows: &Tensor, query: &Tensor) -> Result<Vec<f32>, ApiError> {
    let q = query.to_dtype(DType::F32).api()?.flatten_all().api()?;
    let q_norm = l2_norm(&q)?;
    if !(q_norm.is_finite() && q_norm > 0.0) {
        return Err(ApiError::bad_request(format!(
            "the query vector has norm {q_norm}; it needs a finite, non-zero norm"
        )));
    }
    let dots: Vec<f32> = rows
        .matmul(&q.unsqueeze(1).api()?)
        .api()?
        .flatten_all()
        .api()?
        .to_vec1()
        .api()?;
    let norms: Vec<f32> = rows
        .sqr()
        .api()?
        .sum(1)
        .api()?
        .sqrt()
        .api()?
        .to_vec1()
        .api()?;
    Ok(dots
        .iter()
        .zip(&norms)
        .map(|(&dot, &n)| if n > 0.0 { dot / (n * q_norm) } else { 0.0 })
        .collect())
}
