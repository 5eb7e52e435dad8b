//! `scalpel serve`: the axum app, its JSON API under `/api`, and the embedded front end.
//!
//! Every answer that is not a page or an asset is JSON, errors included (`{"error": msg}`): bad
//! JSON, oversized bodies, unknown routes, wrong methods and panics are turned into [`ApiError`]s
//! here rather than left to axum's plain-text defaults. Model work goes through
//! [`AppState::run_model`], so a flood of requests is answered with 503s, never a hang.

use std::any::Any;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;

use crate::state::AppState;
use crate::ApiError;

#[path = "api/explore.rs"]
mod explore;
#[path = "api/extract.rs"]
pub(crate) mod extract;
#[path = "api/latent.rs"]
mod latent;
#[path = "api/meta.rs"]
mod meta;
#[path = "api/pages.rs"]
mod pages;
#[path = "api/patch.rs"]
mod patch;
#[path = "api/steer.rs"]
mod steer;

/// How long in-flight requests may run on after Ctrl-C before the server stops anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The whole app: pages, `/api`, and Neuronpedia's protocol.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/health", get(meta::health))
        .route("/api/info", get(meta::info))
        .route("/api/dicts", get(meta::dicts))
        .route("/api/tokenize", post(meta::tokenize))
        .route("/api/explore", post(explore::explore))
        .route("/api/attention", post(explore::attention))
        .route("/api/latent/{dict}/{latent}", get(latent::latent))
        .route("/api/search/token", get(latent::search_token))
        .route("/api/search/prompt", post(latent::search_prompt))
        .route("/api/steer", post(steer::steer))
        .route("/api/patch", post(patch::patch));
    Router::new()
        .merge(api)
        .merge(pages::routes())
        .merge(crate::neuronpedia::router(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("no route {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not answer {method}", uri.path()),
    )
}

/// A handler that panicked: a bug, logged, and answered as a 500 so the server keeps going.
fn panic_response(err: Box<dyn Any + Send + 'static>) -> Response {
    let what = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = what, "a request handler panicked");
    ApiError::internal(format!("internal error: {what}")).into_response()
}

/// Serves the app on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// for up to ten seconds.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stopping_tx, mut stopping_rx) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    });
    let deadline = async move {
        let _ = stopping_rx.wait_for(|&s| s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = server => r,
        _ = deadline => {
            tracing::warn!("requests still running {SHUTDOWN_GRACE:?} after shutdown; stopping anyway");
            Ok(())
        }
    }
}

/// A listener on `addr` with a long queue of pending connections (4096, as the kernel allows),
/// so a burst of clients waits to be accepted rather than being turned away.
pub fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Binds `addr`, calls `on_ready` with the bound address, and serves until Ctrl-C. For the CLI,
/// which has no async runtime of its own.
pub fn serve_until_ctrl_c(
    state: Arc<AppState>,
    addr: SocketAddr,
    on_ready: impl FnOnce(SocketAddr),
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = bind(addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        on_ready(listener.local_addr()?);
        serve(listener, state, async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::error!("cannot wait for Ctrl-C: {e}");
                std::future::pending::<()>().await;
            }
            tracing::info!("Ctrl-C: shutting down");
        })
        .await
    })
}
