//! The front end: one page (`index.html`) for every client-side route, and its two assets, all
//! compiled into the binary. No route here reads a file, so no path can reach the disk; any
//! other `/assets/...` path is a 404.

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::extract::ApiPath;
use crate::state::AppState;
use crate::ApiError;

const INDEX_HTML: &str = include_str!("../../assets/index.html");
const APP_JS: &str = include_str!("../../assets/app.js");
const STYLE_CSS: &str = include_str!("../../assets/style.css");

/// The single-page app's routes and assets.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/latent/{dict}/{latent}", get(index))
        .route("/search", get(index))
        .route("/steer", get(index))
        .route("/patch", get(index))
        .route("/assets/{*file}", get(asset))
}

async fn index() -> Response {
    embedded("text/html; charset=utf-8", INDEX_HTML)
}

async fn asset(ApiPath(file): ApiPath<String>) -> Response {
    match file.as_str() {
        "app.js" => embedded("text/javascript; charset=utf-8", APP_JS),
        "style.css" => embedded("text/css; charset=utf-8", STYLE_CSS),
        _ => ApiError::not_found(format!("no asset {file:?}")).into_response(),
    }
}

fn embedded(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
