//! Request extractors whose every rejection is an [`ApiError`] (JSON, naming what was wrong),
//! the token object the API answers with, and the bridge from handlers to blocking work.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::dashboards::DashboardDb;
use crate::state::AppState;
use crate::ApiError;

/// A JSON body. Any content type is read as JSON; the body limit answers 413.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| match e {
            e if e.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is larger than the limit of {} bytes",
                    state.limits.max_body_bytes
                ),
            ),
            BytesRejection::FailedToBufferBody(e) => {
                ApiError::bad_request(format!("could not read the request body: {e}"))
            }
            e => ApiError::new(e.status(), e.body_text()),
        })?;
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
    }
}

/// Path parameters.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(t)| ApiPath(t))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// Query-string parameters.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(t)| ApiQuery(t))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

/// A token as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Tok {
    pub id: u32,
    pub text: String,
}

/// A token with a probability.
#[derive(Debug, Clone, Serialize)]
pub struct TokProb {
    pub id: u32,
    pub text: String,
    pub prob: f64,
}

impl AppState {
    /// Token objects for `ids`.
    pub(super) fn toks(&self, ids: &[u32]) -> Vec<Tok> {
        ids.iter()
            .zip(self.tokenizer.token_strings(ids))
            .map(|(&id, text)| Tok { id, text })
            .collect()
    }

    /// The index in `self.dicts` of the loaded dictionary `id`, or 404 naming those loaded.
    pub(super) fn dict_index(&self, id: &str) -> Result<usize, ApiError> {
        self.dict(id)?;
        Ok(self
            .dicts
            .iter()
            .position(|d| d.id == id)
            .unwrap_or_default())
    }

    /// One token object.
    pub(super) fn tok_prob(&self, id: u32, prob: f64) -> TokProb {
        let text = self.tokenizer.token_strings(&[id]).remove(0);
        TokProb { id, text, prob }
    }
}

/// Runs `f` on the dashboard database off the async threads (SQLite blocks). 404 when the
/// server has no database; database failures are 500s.
pub async fn with_db<T, F>(state: &Arc<AppState>, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&DashboardDb) -> Result<T, ApiError> + Send + 'static,
{
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || match &state.db {
        Some(db) => f(db),
        None => Err(no_db()),
    })
    .await
    .map_err(|e| ApiError::internal(format!("dashboard lookup failed: {e}")))?
}

/// The error for a route that needs the dashboard database when none is loaded.
pub fn no_db() -> ApiError {
    ApiError::not_found(
        "this server has no dashboard database; start it with `scalpel serve --db FILE`",
    )
}

/// A database failure, as a 500 (the request was fine).
pub fn db_error(e: crate::Error) -> ApiError {
    ApiError::internal(format!("dashboard database: {e}"))
}

/// Refuses a count outside `1..=max`, naming the field.
pub fn check_count(name: &str, n: usize, max: usize) -> Result<usize, ApiError> {
    if n == 0 || n > max {
        return Err(ApiError::bad_request(format!(
            "`{name}` must be between 1 and {max}, got {n}"
        )));
    }
    Ok(n)
}

/// Library errors met while doing model work for a request.
pub fn model_error(e: impl Into<crate::Error>) -> ApiError {
    ApiError::from(e.into())
}
