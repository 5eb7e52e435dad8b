//! `/api/health`, `/api/info`, `/api/dicts`, `/api/tokenize`: what the server holds.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::extract::{db_error, with_db, ApiJson, Tok};
use crate::dashboards::DictInfo;
use crate::state::AppState;
use crate::ApiError;

pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "ok": true }))
}

#[derive(Serialize)]
pub struct Info {
    model: String,
    n_layers: usize,
    n_heads: usize,
    d_model: usize,
    d_vocab: usize,
    n_ctx: usize,
    dicts: Vec<InfoDict>,
    limits: InfoLimits,
}

#[derive(Serialize)]
struct InfoDict {
    id: String,
    hook: String,
    layer: usize,
    d_sae: usize,
    has_dashboards: bool,
}

#[derive(Serialize)]
struct InfoLimits {
    max_prompt_tokens: usize,
    max_new_tokens: usize,
}

/// The ids of the dictionaries the dashboard database holds (none without a database).
async fn dashboard_dicts(state: &Arc<AppState>) -> Result<Vec<DictInfo>, ApiError> {
    if state.db.is_none() {
        return Ok(Vec::new());
    }
    with_db(state, |db| db.dictionaries().map_err(db_error)).await
}

pub async fn info(State(state): State<Arc<AppState>>) -> Result<Json<Info>, ApiError> {
    let held = dashboard_dicts(&state).await?;
    let c = state.model.config();
    let dicts = state
        .dicts
        .iter()
        .map(|d| InfoDict {
            id: d.id.clone(),
            hook: d.hook.to_string(),
            layer: d.layer,
            d_sae: d.sae.cfg.d_sae,
            has_dashboards: held.iter().any(|h| h.id == d.id),
        })
        .collect();
    Ok(Json(Info {
        model: state.model_id.clone(),
        n_layers: c.n_layers,
        n_heads: c.n_heads,
        d_model: c.d_model,
        d_vocab: c.d_vocab,
        n_ctx: c.n_ctx,
        dicts,
        limits: InfoLimits {
            max_prompt_tokens: state.limits.max_prompt_tokens.min(c.n_ctx),
            max_new_tokens: state.limits.max_new_tokens,
        },
    }))
}

/// A dictionary the server knows: loaded for live encoding, or held in the dashboard database,
/// or both.
#[derive(Serialize)]
pub struct DictEntry {
    #[serde(flatten)]
    info: DictInfo,
    loaded: bool,
    has_dashboards: bool,
}

pub async fn dicts(State(state): State<Arc<AppState>>) -> Result<Json<Vec<DictEntry>>, ApiError> {
    let held = dashboard_dicts(&state).await?;
    let mut out: Vec<DictEntry> = state
        .dicts
        .iter()
        .map(|d| {
            // The database's description, when it has one, says how many tokens it saw.
            let info = held
                .iter()
                .find(|h| h.id == d.id)
                .cloned()
                .unwrap_or_else(|| DictInfo {
                    id: d.id.clone(),
                    hook: d.hook.to_string(),
                    layer: d.layer,
                    d_in: d.sae.cfg.d_in,
                    d_sae: d.sae.cfg.d_sae,
                    architecture: d.sae.cfg.architecture.name().to_string(),
                    model: state.model_id.clone(),
                    n_tokens: 0,
                });
            let has_dashboards = held.iter().any(|h| h.id == d.id);
            DictEntry {
                info,
                loaded: true,
                has_dashboards,
            }
        })
        .collect();
    for h in held {
        if !state.dicts.iter().any(|d| d.id == h.id) {
            out.push(DictEntry {
                info: h,
                loaded: false,
                has_dashboards: true,
            });
        }
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    text: String,
}

#[derive(Serialize)]
pub struct Tokens {
    tokens: Vec<Tok>,
}

pub async fn tokenize(
    State(state): State<Arc<AppState>>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<Tokens>, ApiError> {
    let ids = state.tokenize(&req.text)?;
    Ok(Json(Tokens {
        tokens: state.toks(&ids),
    }))
}
