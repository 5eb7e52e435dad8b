//! `scalpel serve`: the axum app, its JSON API under `/api`, and the embedded front end.

use std::sync::Arc;

use axum::Router;

use crate::state::AppState;

/// The whole app: pages, `/api`, and Neuronpedia's protocol.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(crate::neuronpedia::router(state.clone()))
        .with_state(state)
}
