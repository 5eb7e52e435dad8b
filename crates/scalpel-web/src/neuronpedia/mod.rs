//! Neuronpedia's inference protocol (v1), answered for the loaded model and dictionaries, so a
//! self-hosted Neuronpedia (or any script written against `neuronpedia-inference-client`) can use
//! `scalpel serve` as its inference server.
//!
//! The request and response shapes follow the OpenAPI models of the PyPI package
//! `neuronpedia-inference-client==1.10.1`; every route is `POST /v1/...` with a JSON body, and
//! when a secret is set every route wants it in header `X-SECRET-KEY`. Errors are
//! `{"error": "..."}` with a 4xx status, as Neuronpedia's own server answers them.
//! What is supported and what is not: `docs/neuronpedia.md`.

mod activation;
mod steer;
mod util;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use crate::state::{AppState, LoadedDict};
use crate::ApiError;

/// The header holding the shared secret.
pub const SECRET_HEADER: &str = "x-secret-key";

/// The protocol's routes, under `/v1`.
pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/activation/all", post(activation::all))
        .route("/v1/activation/all-batch", post(activation::all_batch))
        .route("/v1/activation/single", post(activation::single))
        .route(
            "/v1/activation/single-batch",
            post(activation::single_batch),
        )
        .route("/v1/activation/source", post(activation::source_acts))
        .route(
            "/v1/activation/topk-by-token",
            post(activation::topk_by_token),
        )
        .route(
            "/v1/activation/topk-by-token-batch",
            post(activation::topk_by_token_batch),
        )
        .route("/v1/steer/completion", post(steer::completion))
        .route("/v1/steer/completion-chat", post(steer::completion_chat))
        .route("/v1/tokenize", post(util::tokenize))
        .route(
            "/v1/util/sae-topk-by-decoder-cossim",
            post(util::topk_by_decoder_cossim),
        )
        .route("/v1/util/sae-vector", post(util::sae_vector))
        .route_layer(middleware::from_fn_with_state(state, require_secret))
}

/// Refuses a request without the right `X-SECRET-KEY` when the server has a secret.
async fn require_secret(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(secret) = &state.secret {
        let given = req.headers().get(SECRET_HEADER).map(|v| v.as_bytes());
        match given {
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "this server wants its secret in header X-SECRET-KEY",
                )
                .into_response()
            }
            Some(given) if !same_secret(given, secret.as_bytes()) => {
                return ApiError::new(StatusCode::UNAUTHORIZED, "wrong X-SECRET-KEY")
                    .into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Compares without stopping at the first differing byte, so timing says nothing about how much
/// of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Request bodies are read as the web API reads them: 413 past the body limit, 400 naming what
/// is wrong with the JSON.
pub(crate) use crate::server::extract::ApiJson as NpJson;

/// Refuses a request for a model this server does not hold.
fn check_model(state: &AppState, model: &str) -> Result<(), ApiError> {
    if model == state.model_id {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "this server holds model `{}`, not `{model}`",
            state.model_id
        )))
    }
}

/// The position in `state.dicts` of source `id`, and the dictionary (404 when not loaded).
fn source<'a>(state: &'a AppState, id: &str) -> Result<(usize, &'a LoadedDict), ApiError> {
    let dict = state.dict(id)?;
    let at = state
        .dicts
        .iter()
        .position(|d| d.id == id)
        .unwrap_or_default();
    Ok((at, dict))
}

/// Refuses a latent index outside `0..d_sae` of `dict`.
fn check_latent(dict: &LoadedDict, index: i64) -> Result<usize, ApiError> {
    let d_sae = dict.sae.cfg.d_sae;
    usize::try_from(index)
        .ok()
        .filter(|&i| i < d_sae)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "latent index {index} is out of range for `{}` (0..{d_sae})",
                dict.id
            ))
        })
}

/// The text of each token, and whether it is one of the tokenizer's special tokens.
fn token_texts(state: &AppState, ids: &[u32]) -> (Vec<String>, Vec<bool>) {
    let tok = &state.tokenizer;
    let added = tok.inner().get_added_vocabulary();
    let special = ids
        .iter()
        .map(|&id| {
            tok.bos_id() == Some(id)
                || tok.eos_ids().contains(&id)
                || added
                    .simple_id_to_token(id)
                    .is_some_and(|t| added.is_special_token(&t))
        })
        .collect();
    (tok.token_strings(ids), special)
}

/// Library failures met while answering a request, as the request's error (see
/// `From<Error> for ApiError`).
trait OrApi<T> {
    fn api(self) -> Result<T, ApiError>;
}

impl<T, E: Into<crate::Error>> OrApi<T> for Result<T, E> {
    fn api(self) -> Result<T, ApiError> {
        self.map_err(|e| ApiError::from(e.into()))
    }
}

/// The Euclidean norm of a vector (any shape, read as one vector).
fn l2_norm(v: &candle_core::Tensor) -> Result<f32, ApiError> {
    v.to_dtype(candle_core::DType::F32)
        .and_then(|v| v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>())
        .api()
}

/// Refuses an empty batch of prompts.
fn check_batch(prompts: &[String]) -> Result<(), ApiError> {
    if prompts.is_empty() {
        Err(ApiError::bad_request(
            "`prompts` is empty; give at least one prompt",
        ))
    } else {
        Ok(())
    }
}
