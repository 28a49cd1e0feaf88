//! The router's HTTP surface: the two OpenAI-compatible endpoints it splits into prefill and
//! decode, plus `/metrics` and `/healthz` for operators.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;

use crate::pd::{Endpoint, PdRouter};

/// Largest client body accepted: long prompts as JSON token ids run to megabytes.
const MAX_BODY_BYTES: usize = 64 << 20;

/// The router's routes, serving with `router`.
pub fn app(router: Arc<PdRouter>) -> Router {
    Router::new()
        .route(Endpoint::Completions.path(), post(completions))
        .route(Endpoint::ChatCompletions.path(), post(chat_completions))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(router)
}

async fn completions(State(router): State<Arc<PdRouter>>, body: Bytes) -> Response {
    router.serve(Endpoint::Completions, body).await
}

async fn chat_completions(State(router): State<Arc<PdRouter>>, body: Bytes) -> Response {
    router.serve(Endpoint::ChatCompletions, body).await
}

async fn metrics(State(router): State<Arc<PdRouter>>) -> Response {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        router.metrics().render(),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}
