//! Passing a decode engine's server-sent events through to the client.
//!
//! The router waits for the first complete event before it answers, so a decode engine that
//! fails before streaming anything is retried on another. After that the client has a `200` and
//! part of an answer, so a failure (reset, silence past the decode timeout, the request
//! deadline) ends the stream with an OpenAI-style error event, then `data: [DONE]`, as vLLM
//! ends a failed stream. Only whole events are forwarded, so that error event never lands in
//! the middle of a half-sent one.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Response, StatusCode};
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{timeout_at, Instant};

use crate::backend::InFlight;
use crate::error::error_json;
use crate::metrics::Metrics;
use crate::pd::{Decoded, Endpoint, Outcome};
use crate::upstream::{chain, UpstreamError};

/// The complete events of a body, one run at a time.
pub struct Events {
    body: Incoming,
    pending: BytesMut,
}

impl Events {
    /// Reads events from a decode engine's streaming body.
    pub fn new(body: Incoming) -> Self {
        Self {
            body,
            pending: BytesMut::new(),
        }
    }

    /// The next run of complete events (each ending in a blank line); None at a clean end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            if let Some(end) = events_end(&self.pending) {
                return Ok(Some(self.pending.split_to(end).freeze()));
            }
            match self.body.frame().await {
                None if self.pending.is_empty() => return Ok(None),
                None => {
                    return Err(UpstreamError::Broken(
                        "the stream ended inside an event".into(),
                    ))
                }
                Some(Err(error)) => return Err(UpstreamError::Broken(chain(&error))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.pending.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Just past the last blank line (`\n\n` or `\r\n\r\n`) of `bytes`: where its complete events end.
fn events_end(bytes: &[u8]) -> Option<usize> {
    let last = |pattern: &[u8]| {
        bytes
            .windows(pattern.len())
            .rposition(|window| window == pattern)
            .map(|at| at + pattern.len())
    };
    last(b"\n\n").max(last(b"\r\n\r\n"))
}

/// What the relay needs to keep streaming and to count how the stream ended.
pub struct RelayLimits {
    /// Counts the outcome when the stream ends.
    pub metrics: Arc<Metrics>,
    /// The `endpoint` label.
    pub endpoint: Endpoint,
    /// The longest silence between two runs of events (the decode timeout).
    pub idle: Duration,
    /// The request's overall deadline.
    pub deadline: Instant,
}

/// Waits (until `first_deadline`) for the decode engine's first events, then answers `200`
/// with them and streams the rest. An error before the first events lets the caller retry.
pub async fn relay(
    response: Response<Incoming>,
    in_flight: InFlight,
    first_deadline: Instant,
    limits: RelayLimits,
) -> Result<Decoded, UpstreamError> {
    let content_type = response
        .headers()
        .get(CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("text/event-stream"));
    let mut events = Events::new(response.into_body());
    let first = match timeout_at(first_deadline, events.next()).await {
        Err(_) => return Err(UpstreamError::Timeout),
        Ok(Err(error)) => return Err(error),
        Ok(Ok(None)) => return Err(UpstreamError::Broken("the stream ended empty".into())),
        Ok(Ok(Some(first))) => first,
    };
    let relay = Relay {
        events,
        in_flight,
        limits,
        first: Some(first),
        done: false,
    };
    let body = Body::from_stream(futures_util::stream::unfold(
        relay,
        |mut relay| async move {
            let chunk = relay.next_chunk().await?;
            Some((Ok::<_, Infallible>(chunk), relay))
        },
    ));
    let mut response = Response::new(body);
    response.headers_mut().insert(CONTENT_TYPE, content_type);
    Ok(Decoded {
        response,
        outcome: None,
    })
}

/// The stream's state; holds the decode backend in flight until the stream ends or is dropped.
struct Relay {
    events: Events,
    in_flight: InFlight,
    limits: RelayLimits,
    first: Option<Bytes>,
    done: bool,
}

impl Relay {
    /// The next bytes for the client: events, or the error event that ends the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.done {
            return None;
        }
        let wait_until = self.limits.deadline.min(Instant::now() + self.limits.idle);
        let error = match timeout_at(wait_until, self.events.next()).await {
            Ok(Ok(Some(events))) => return Some(events),
            Ok(Ok(None)) => {
                self.finish(Outcome::Ok);
                return None;
            }
            Ok(Err(error)) => error,
            Err(_) => UpstreamError::Timeout,
        };
        Some(self.fail(error))
    }

    /// Ends the stream after a failure: counted, logged, and told to the client.
    fn fail(&mut self, error: UpstreamError) -> Bytes {
        let backend = &self.in_flight.backend;
        let deadline_passed = Instant::now() >= self.limits.deadline;
        let (status, message, outcome) = if deadline_passed {
            let message = format!(
                "the request deadline passed while {} was streaming (--request-timeout-s)",
                backend.url
            );
            (StatusCode::GATEWAY_TIMEOUT, message, Outcome::Timeout)
        } else {
            backend.failed();
            let message = format!("decode backend {} failed mid-stream: {error}", backend.url);
            (StatusCode::BAD_GATEWAY, message, Outcome::StreamError)
        };
        tracing::warn!(backend = %backend.url, %error, "stream ended by a failure");
        self.finish(outcome);
        error_event(status, &message)
    }

    fn finish(&mut self, outcome: Outcome) {
        self.done = true;
        self.limits
            .metrics
            .requests_total
            .with_label_values(&[self.limits.endpoint.label(), outcome.label()])
            .inc();
    }
}

/// The event that ends a failed stream: the error, then `[DONE]`.
fn error_event(status: StatusCode, message: &str) -> Bytes {
    Bytes::from(format!(
        "data: {}\n\ndata: [DONE]\n\n",
        error_json(status, message)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_events_end_at_the_last_blank_line() {
        assert_eq!(events_end(b"data: 1\n\ndata: 2\n\ndata: 3"), Some(18));
        assert_eq!(events_end(b"data: 1\r\n\r\ndata"), Some(11));
        assert_eq!(events_end(b"data: partial"), None);
        assert_eq!(events_end(b""), None);
    }

    #[test]
    fn the_error_event_is_one_json_event_then_done() {
        let event = error_event(StatusCode::BAD_GATEWAY, "decode backend x failed");
        let text = std::str::from_utf8(&event).expect("utf-8");
        let (first, rest) = text.split_once("\n\n").expect("two events");
        let json: serde_json::Value =
            serde_json::from_str(first.trim_start_matches("data: ")).expect("json");
        assert_eq!(json["error"]["code"], 502);
        assert_eq!(json["error"]["message"], "decode backend x failed");
        assert_eq!(rest, "data: [DONE]\n\n");
    }
}
