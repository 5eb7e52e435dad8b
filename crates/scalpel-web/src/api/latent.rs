//! `/api/latent/{dict}/{latent}` (a latent's dashboard) and search: `/api/search/token` (from
//! the dashboard database) and `/api/search/prompt` (live, over a typed prompt).

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::explore::top_indices;
use super::extract::{
    check_count, db_error, model_error, no_db, with_db, ApiJson, ApiPath, ApiQuery, Tok,
};
use crate::dashboards::{LatentDashboard, TokenHit};
use crate::state::AppState;
use crate::ApiError;

/// Most hits one search may ask for.
const MAX_HITS: usize = 1000;

pub async fn latent(
    State(state): State<Arc<AppState>>,
    ApiPath((dict, latent)): ApiPath<(String, String)>,
) -> Result<Json<LatentDashboard>, ApiError> {
    let index: u32 = latent.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "a latent id is a non-negative integer, got {latent:?}"
        ))
    })?;
    if state.db.is_none() {
        return Err(no_db());
    }
    // A loaded dictionary says at once whether the index can exist at all.
    if let Some(d) = state.dicts.iter().find(|d| d.id == dict) {
        if index as usize >= d.sae.cfg.d_sae {
            return Err(ApiError::not_found(format!(
                "latent {index} is out of range: dictionary `{dict}` has latents 0..={}",
                d.sae.cfg.d_sae - 1
            )));
        }
    }
    let found = with_db(&state, {
        let dict = dict.clone();
        move |db| db.latent(&dict, index).map_err(db_error)
    })
    .await?;
    found.map(Json).ok_or_else(|| {
        ApiError::not_found(format!(
            "no dashboard for latent {index} of dictionary `{dict}`"
        ))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenQuery {
    dict: String,
    token: String,
    #[serde(default = "default_k")]
    k: usize,
}

fn default_k() -> usize {
    20
}

#[derive(Serialize)]
pub struct TokenSearch {
    token: Tok,
    hits: Vec<TokenHit>,
}

pub async fn search_token(
    State(state): State<Arc<AppState>>,
    ApiQuery(q): ApiQuery<TokenQuery>,
) -> Result<Json<TokenSearch>, ApiError> {
    let k = check_count("k", q.k, MAX_HITS)?;
    let ids = state
        .tokenizer
        .encode(&q.token, false)
        .map_err(|e| ApiError::bad_request(format!("could not tokenise {:?}: {e}", q.token)))?;
    let id = match ids.as_slice() {
        [id] => *id,
        [] => {
            return Err(ApiError::bad_request(format!(
                "{:?} is no token; give one token",
                q.token
            )))
        }
        _ => {
            return Err(ApiError::bad_request(format!(
                "{:?} is {} tokens {:?}; search by one token (a leading space matters: \" the\" \
                 and \"the\" differ)",
                q.token,
                ids.len(),
                state.tokenizer.token_strings(&ids)
            )))
        }
    };
    let dict = q.dict.clone();
    let hits = with_db(&state, move |db| {
        let held = db.dictionaries().map_err(db_error)?;
        if !held.iter().any(|d| d.id == dict) {
            let names: Vec<&str> = held.iter().map(|d| d.id.as_str()).collect();
            return Err(ApiError::not_found(format!(
                "the dashboard database has no dictionary `{dict}` (it has: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )));
        }
        db.latents_for_token(&dict, id, k).map_err(db_error)
    })
    .await?;
    let token = state.toks(&[id]).remove(0);
    Ok(Json(TokenSearch { token, hits }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptQuery {
    text: String,
    dict: String,
    #[serde(default = "default_k")]
    k: usize,
}

#[derive(Serialize)]
pub struct PromptHit {
    latent: u32,
    max_act: f32,
    /// Where in the prompt the latent is strongest, and the token there.
    position: usize,
    token: Tok,
}

#[derive(Serialize)]
pub struct PromptSearch {
    hits: Vec<PromptHit>,
}

pub async fn search_prompt(
    State(state): State<Arc<AppState>>,
    ApiJson(q): ApiJson<PromptQuery>,
) -> Result<Json<PromptSearch>, ApiError> {
    let ids = state.tokenize(&q.text)?;
    let k = check_count("k", q.k, MAX_HITS)?;
    let d = state.dict_index(&q.dict)?;
    let hits = state
        .run_model(move |s| {
            let (_, codes) = s.dict_activations(&ids, &[d]).map_err(model_error)?;
            let code = codes[0].to_dtype(DType::F32).map_err(model_error)?; // [p, d_sae]
            let max = code
                .max(0)
                .and_then(|m| m.to_vec1::<f32>())
                .map_err(model_error)?;
            let at = code
                .argmax(0)
                .and_then(|m| m.to_vec1::<u32>())
                .map_err(model_error)?;
            Ok(top_indices(&max, k)
                .into_iter()
                .filter(|&i| max[i] > 0.0)
                .map(|i| {
                    let position = at[i] as usize;
                    PromptHit {
                        latent: i as u32,
                        max_act: max[i],
                        position,
                        token: s.toks(&ids[position..=position]).remove(0),
                    }
                })
                .collect())
        })
        .await?;
    Ok(Json(PromptSearch { hits }))
}
