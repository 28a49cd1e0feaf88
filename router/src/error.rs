//! Errors the router itself answers with, in the OpenAI error shape vLLM also uses, so clients
//! handle them like an engine's own errors.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::pd::Outcome;

/// Why the router answers with an error instead of an engine's answer.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The client's body is not one the router can forward.
    #[error("request body: {0}")]
    BadRequest(String),
    /// Every decode attempt failed; the message names each backend and its failure.
    #[error("no decode backend answered: {0}")]
    DecodeFailed(String),
    /// The request's overall deadline passed first.
    #[error("no answer within the request deadline of {0:?} (--request-timeout-s)")]
    Deadline(Duration),
}

impl RouterError {
    fn status(&self) -> StatusCode {
        match self {
            RouterError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RouterError::DecodeFailed(_) => StatusCode::BAD_GATEWAY,
            RouterError::Deadline(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The `outcome` label this error is counted under.
    pub fn outcome(&self) -> Outcome {
        match self {
            RouterError::BadRequest(_) => Outcome::Rejected,
            RouterError::DecodeFailed(_) => Outcome::Error,
            RouterError::Deadline(_) => Outcome::Timeout,
        }
    }
}

impl IntoResponse for RouterError {
    fn into_response(self) -> Response {
        let status = self.status();
        (status, Json(error_json(status, &self.to_string()))).into_response()
    }
}

/// `{"error": {"message", "type", "param", "code"}}`, as vLLM's `ErrorResponse`.
pub fn error_json(status: StatusCode, message: &str) -> Value {
    json!({"error": {
        "message": message,
        "type": "pegaflow_router_error",
        "param": null,
        "code": status.as_u16(),
    }})
}
