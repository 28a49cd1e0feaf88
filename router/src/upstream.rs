//! The router's HTTP client for engines and the node: one pooled hyper client, every call
//! bounded by a deadline, and failures sorted into what may be retried elsewhere and what may
//! not.

use std::error::Error as StdError;

use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use tokio::time::{timeout_at, Instant};

use crate::config::BaseUrl;

/// Longest part of an upstream error body quoted in an error message.
const QUOTED_BODY_CHARS: usize = 300;

/// Why a call to an engine or the node failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing listens, or the host is unreachable: the request never reached the backend.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The deadline passed before the answer was complete.
    #[error("no complete answer before the deadline")]
    Timeout,
    /// The backend answered with an error status.
    #[error("answered {status}: {body}")]
    Status {
        /// The status the backend sent.
        status: StatusCode,
        /// The start of its body.
        body: String,
    },
    /// The connection broke after the request was sent (reset, closed mid-answer).
    #[error("connection broke: {0}")]
    Broken(String),
    /// The answer arrived but is not the JSON expected.
    #[error("unexpected answer: {0}")]
    BadAnswer(String),
}

impl UpstreamError {
    /// A 4xx: the request itself is at fault, so another backend would refuse it too.
    pub fn is_client_error(&self) -> bool {
        matches!(self, UpstreamError::Status { status, .. } if status.is_client_error())
    }
}

/// The shared client; cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl Upstream {
    /// POSTs a JSON body; the response head (any status) before `deadline`.
    pub async fn post(
        &self,
        base: &BaseUrl,
        path: &str,
        body: Bytes,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let uri = base.join(path).map_err(UpstreamError::Connect)?;
        let request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|error| UpstreamError::Connect(error.to_string()))?;
        match timeout_at(deadline, self.client.request(request)).await {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(Ok(response)) => Ok(response),
            Ok(Err(error)) if error.is_connect() => Err(UpstreamError::Connect(chain(&error))),
            Ok(Err(error)) => Err(UpstreamError::Broken(chain(&error))),
        }
    }

    /// POSTs a JSON body and reads a 2xx JSON answer as `T` (`Value` for any JSON), all before
    /// `deadline`; an answer of another shape is a `BadAnswer`.
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        base: &BaseUrl,
        path: &str,
        body: Bytes,
        deadline: Instant,
    ) -> Result<T, UpstreamError> {
        let response = self.post(base, path, body, deadline).await?;
        let status = response.status();
        let bytes = read_body(response.into_body(), deadline).await?;
        if !status.is_success() {
            return Err(status_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|error| UpstreamError::BadAnswer(error.to_string()))
    }
}

/// The whole body, before `deadline`.
pub async fn read_body(body: Incoming, deadline: Instant) -> Result<Bytes, UpstreamError> {
    match timeout_at(deadline, body.collect()).await {
        Err(_) => Err(UpstreamError::Timeout),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) => Err(UpstreamError::Broken(chain(&error))),
    }
}

/// A [`UpstreamError::Status`] quoting the start of the body.
pub fn status_error(status: StatusCode, body: &[u8]) -> UpstreamError {
    let text = String::from_utf8_lossy(body);
    UpstreamError::Status {
        status,
        body: text.chars().take(QUOTED_BODY_CHARS).collect(),
    }
}

/// An error and its sources, `outer: inner: ...`, since hyper's own messages are terse.
pub fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
