//! Neuronpedia's inference protocol (v1), answered for the loaded model and dictionaries.

use std::sync::Arc;

use axum::Router;

use crate::state::AppState;

/// The protocol's routes.
pub fn router(state: Arc<AppState>) -> Router<Arc<AppState>> {
    let _ = state;
    Router::new()
}
