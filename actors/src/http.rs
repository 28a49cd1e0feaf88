//! HTTP for operators: `/healthz`, `/metrics` (Prometheus text), `/api/stats` (JSON) and
//! `/dashboard`, a self-contained page (no CDN, no build step) that polls `/api/stats`; and for
//! the P/D router, `POST /api/lookup` ([`crate::http_lookup`]) and `POST /api/holders`
//! ([`crate::http_holders`]).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pegaflow_config::NodeConfig;
use tokio::task::JoinHandle;

use crate::context::NodeContext;
use crate::node::StartError;

/// Binds `http.addr` and serves until the returned task is aborted.
pub async fn serve(
    config: &NodeConfig,
    ctx: Arc<NodeContext>,
) -> Result<(SocketAddr, JoinHandle<()>), StartError> {
    let addr = config.http.addr;
    let http_error = |source| StartError::Http { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(http_error)?;
    let bound = listener.local_addr().map_err(http_error)?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/stats", get(stats))
        .route("/api/lookup", post(crate::http_lookup::lookup))
        .route("/dashboard", get(dashboard))
        .route("/", get(dashboard))
        .with_state(ctx.clone())
        .merge(crate::http_holders::routes(ctx, &config.fabric));
    let task = tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "HTTP server stopped");
        }
    });
    Ok((bound, task))
}

/// `ok` while every pool and transfer actor runs; else 503 with one line per problem (an actor
/// down, or a transfer actor restarting too often).
async fn healthz(State(ctx): State<Arc<NodeContext>>) -> Response {
    let mut problems = ctx.pools.problems();
    problems.extend(ctx.transfers.problems());
    if problems.is_empty() {
        return "ok\n".into_response();
    }
    let body = problems.join("\n") + "\n";
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn metrics(State(ctx): State<Arc<NodeContext>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        ctx.metrics.render(),
    )
        .into_response()
}

async fn stats(State(ctx): State<Arc<NodeContext>>) -> Response {
    match ctx.stats().await {
        Ok(stats) => Json(stats).into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.message).into_response(),
    }
}

/// The dashboard page: HTML, CSS and JS compiled into the binary, so it works offline and
/// always matches this node's stats document.
async fn dashboard() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        crate::dashboard::PAGE,
    )
        .into_response()
}
