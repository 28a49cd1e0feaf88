//! One client request through prefill, handoff and decode (docs/pd.md):
//!
//! 1. **Prefill** on the prefill engine whose node holds the longest prefix of the prompt
//!    ([`crate::prefix`]), or else the least loaded one, with `max_tokens` 1, not streamed, and
//!    `kv_transfer_params: {"pegaflow_handoff": true}`; a failure (refused, reset, 5xx,
//!    timeout) is retried on another prefill engine.
//! 2. **Handoff**: the answer names the keys of the prompt blocks the engine saved; the router
//!    asks the node until it holds them all ([`crate::handoff`]).
//! 3. **Decode**: the client's own body, unchanged, on the least loaded decode engine, whose
//!    connector then loads the prompt's blocks from the node; a failure before anything was
//!    sent to the client is retried on another decode engine.
//!
//! When the prefill fails everywhere, its answer has no handoff, or the node does not confirm
//! in time, the request still goes to a decode engine, which computes what it does not find
//! (a *fallback*, counted by reason). Each phase has its own timeout; the request deadline
//! bounds them all, enforced once around the whole flow, and by the stream once it streams.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, HeaderValue, Response};
use axum::response::IntoResponse;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::time::{timeout_at, Instant};

use crate::backend::{Backends, InFlight, Role};
use crate::config::{Args, BaseUrl};
use crate::error::RouterError;
use crate::handoff::{self, HANDOFF_KEY};
use crate::metrics::Metrics;
use crate::prefix::PrefixChoice;
use crate::stream::{self, RelayLimits};
use crate::upstream::{read_body, status_error, Upstream, UpstreamError};

/// Response header: the prefill engine that answered (absent when none did).
pub const PREFILL_HEADER: HeaderName = HeaderName::from_static("x-pegaflow-prefill");
/// Response header: the decode engine that answered.
pub const DECODE_HEADER: HeaderName = HeaderName::from_static("x-pegaflow-decode");
/// Response header: `confirmed`, or the [`Fallback`] reason the decode ran without a handoff.
pub const HANDOFF_HEADER: HeaderName = HeaderName::from_static("x-pegaflow-handoff");

/// The OpenAI-compatible endpoints the router serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    ChatCompletions,
}

impl Endpoint {
    /// Every endpoint, for metric series that exist from start.
    pub const ALL: [Endpoint; 2] = [Endpoint::Completions, Endpoint::ChatCompletions];

    /// The path, the same on the router and on the engines.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::ChatCompletions => "/v1/chat/completions",
        }
    }

    /// The `endpoint` label of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::ChatCompletions => "chat_completions",
        }
    }
}

/// Why a request was decoded without a confirmed handoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Every prefill attempt failed (refused, reset, 5xx, timeout).
    PrefillFailed,
    /// A prefill engine refused the request (4xx); the decode engine gives the real answer.
    PrefillRejected,
    /// The prefill answer named no blocks (no PegaKVConnector, or an older one).
    NoParams,
    /// The node answered but did not hold every block by the handoff timeout.
    Unconfirmed,
    /// The node could not be asked until the handoff timeout.
    NodeError,
}

impl Fallback {
    /// Every reason, for metric series that exist from start.
    pub const ALL: [Fallback; 5] = [
        Fallback::PrefillFailed,
        Fallback::PrefillRejected,
        Fallback::NoParams,
        Fallback::Unconfirmed,
        Fallback::NodeError,
    ];

    /// The `reason` label, also sent in the `x-pegaflow-handoff` header.
    pub fn label(self) -> &'static str {
        match self {
            Fallback::PrefillFailed => "prefill_failed",
            Fallback::PrefillRejected => "prefill_rejected",
            Fallback::NoParams => "no_params",
            Fallback::Unconfirmed => "unconfirmed",
            Fallback::NodeError => "node_error",
        }
    }
}

/// How a client request ended, for `pegaflow_router_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A decode engine's 2xx answer, streamed to its end.
    Ok,
    /// A 4xx: the router's (bad body) or a decode engine's, passed through.
    Rejected,
    /// No decode engine answered.
    Error,
    /// The request deadline passed.
    Timeout,
    /// A stream broke after part of it was sent.
    StreamError,
}

impl Outcome {
    /// Every outcome, for metric series that exist from start.
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::Rejected,
        Outcome::Error,
        Outcome::Timeout,
        Outcome::StreamError,
    ];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::StreamError => "stream_error",
        }
    }
}

/// A decode engine's answer, ready for the client.
pub struct Decoded {
    /// The response to send.
    pub response: Response<axum::body::Body>,
    /// How it ended; None for a stream, which counts itself when it ends.
    pub outcome: Option<Outcome>,
}

/// The client's request: the raw body the decode engine gets, and what the router reads of it.
struct ClientRequest {
    raw: Bytes,
    fields: Map<String, Value>,
    stream: bool,
}

impl ClientRequest {
    fn parse(raw: Bytes) -> Result<Self, RouterError> {
        let fields = match serde_json::from_slice(&raw) {
            Ok(Value::Object(fields)) => fields,
            Ok(_) => return Err(RouterError::BadRequest("expected a JSON object".into())),
            Err(error) => return Err(RouterError::BadRequest(error.to_string())),
        };
        let stream = match fields.get("stream") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(stream)) => *stream,
            Some(other) => {
                return Err(RouterError::BadRequest(format!(
                    "field `stream`: expected true or false, got {other}"
                )))
            }
        };
        Ok(Self {
            raw,
            fields,
            stream,
        })
    }

    /// The prefill engine's body: the prompt computed once, nothing generated beyond one token
    /// (vLLM must sample one), one choice, not streamed, the handoff asked for.
    fn prefill_body(&self) -> Bytes {
        let mut fields = self.fields.clone();
        for generation_only in [
            "max_completion_tokens",
            "min_tokens",
            "n",
            "best_of",
            "stream_options",
        ] {
            fields.remove(generation_only);
        }
        fields.insert("max_tokens".into(), json!(1));
        fields.insert("stream".into(), json!(false));
        fields.insert("kv_transfer_params".into(), json!({ HANDOFF_KEY: true }));
        Bytes::from(Value::Object(fields).to_string())
    }
}

/// The prefill phase's result: who answered, and whether the handoff was confirmed.
struct Prefilled {
    prefill: Option<String>,
    handoff: Result<(), Fallback>,
}

/// Why every attempt of a phase failed.
#[derive(Debug, thiserror::Error)]
enum Exhausted {
    /// A backend refused the request itself (4xx): no other was tried.
    #[error("{0}")]
    Rejected(String),
    /// Each backend tried failed; one `url: error` per attempt.
    #[error("{0}")]
    Failed(String),
}

/// The router: its backends, the node, deadlines and metrics.
pub struct PdRouter {
    prefill: Backends,
    decode: Backends,
    node: BaseUrl,
    /// None when there is no choice by prefix to make (one prefill engine, or none names its
    /// node).
    prefix: Option<PrefixChoice>,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    request_timeout: Duration,
    prefill_timeout: Duration,
    handoff_timeout: Duration,
    decode_timeout: Duration,
    retries: usize,
}

impl PdRouter {
    /// A router for the backends and deadlines of `args`.
    pub fn new(args: &Args) -> Result<Self, prometheus::Error> {
        let metrics = Arc::new(Metrics::new()?);
        Ok(Self {
            prefill: Backends::new(Role::Prefill, &args.prefill, args.cooldown_s, &metrics),
            decode: Backends::new(Role::Decode, &args.decode, args.cooldown_s, &metrics),
            node: args.node_http.clone(),
            prefix: PrefixChoice::new(args),
            upstream: Upstream::default(),
            metrics,
            request_timeout: args.request_timeout_s,
            prefill_timeout: args.prefill_timeout_s,
            handoff_timeout: args.handoff_timeout_s,
            decode_timeout: args.decode_timeout_s,
            retries: args.retries,
        })
    }

    /// The metrics, for `/metrics`.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Answers one client request on `endpoint`; never waits past the request deadline.
    pub async fn serve(&self, endpoint: Endpoint, raw: Bytes) -> Response<axum::body::Body> {
        let deadline = Instant::now() + self.request_timeout;
        let result = match ClientRequest::parse(raw) {
            Ok(request) => timeout_at(deadline, self.run(endpoint, &request, deadline))
                .await
                .unwrap_or(Err(RouterError::Deadline(self.request_timeout))),
            Err(error) => Err(error),
        };
        let (response, outcome) = match result {
            Ok(decoded) => (decoded.response, decoded.outcome),
            Err(error) => {
                tracing::warn!(endpoint = endpoint.path(), %error, "request failed");
                let outcome = error.outcome();
                (error.into_response(), Some(outcome))
            }
        };
        if let Some(outcome) = outcome {
            self.count(endpoint, outcome);
        }
        response
    }

    /// Counts a request that ended (a stream counts itself when it ends).
    fn count(&self, endpoint: Endpoint, outcome: Outcome) {
        self.metrics
            .requests_total
            .with_label_values(&[endpoint.label(), outcome.label()])
            .inc();
    }

    /// Prefill, handoff and decode; the answer's headers name the engines and the handoff.
    async fn run(
        &self,
        endpoint: Endpoint,
        request: &ClientRequest,
        deadline: Instant,
    ) -> Result<Decoded, RouterError> {
        let prefilled = self.prefill_and_hand_off(endpoint, request).await;
        let (mut decoded, decode_url) = self.decode(endpoint, request, deadline).await?;
        let headers = decoded.response.headers_mut();
        let handoff = match prefilled.handoff {
            Ok(()) => "confirmed",
            Err(reason) => reason.label(),
        };
        headers.insert(HANDOFF_HEADER, HeaderValue::from_static(handoff));
        for (name, url) in [
            (PREFILL_HEADER, prefilled.prefill),
            (DECODE_HEADER, Some(decode_url)),
        ] {
            if let Some(value) = url.and_then(|url| HeaderValue::from_str(&url).ok()) {
                headers.insert(name, value);
            }
        }
        Ok(decoded)
    }

    /// Prefill, then wait for the node to hold the prompt's blocks; a failure of either is a
    /// fallback (counted), never an error: the decode engine can always compute the prompt.
    async fn prefill_and_hand_off(&self, endpoint: Endpoint, request: &ClientRequest) -> Prefilled {
        let started = Instant::now();
        let answer = self.prefill(endpoint, request).await;
        self.metrics
            .prefill_seconds
            .observe(started.elapsed().as_secs_f64());
        let (prefill, handoff) = match answer {
            Err(reason) => (None, Err(reason)),
            Ok((url, answer)) => (Some(url), self.hand_off(&answer).await),
        };
        if let Err(reason) = handoff {
            self.metrics
                .fallbacks_total
                .with_label_values(&[reason.label()])
                .inc();
        }
        Prefilled { prefill, handoff }
    }

    /// The prefill engine's URL and JSON answer; the engine chosen by prefix goes first.
    async fn prefill(
        &self,
        endpoint: Endpoint,
        request: &ClientRequest,
    ) -> Result<(String, Value), Fallback> {
        let preferred = self.preferred_prefill(endpoint, request).await;
        let body = request.prefill_body();
        let attempt = |in_flight: InFlight| {
            let body = body.clone();
            async move {
                let url = &in_flight.backend.url;
                let until = Instant::now() + self.prefill_timeout;
                let answer: Value = self
                    .upstream
                    .post_json(url, endpoint.path(), body, until)
                    .await?;
                Ok((url.to_string(), answer))
            }
        };
        self.attempts(&self.prefill, preferred, attempt)
            .await
            .map_err(|exhausted| match exhausted {
                Exhausted::Rejected(_) => Fallback::PrefillRejected,
                Exhausted::Failed(_) => Fallback::PrefillFailed,
            })
    }

    /// The prefill engine to try first, when the prefix-aware choice is on and could choose.
    async fn preferred_prefill(
        &self,
        endpoint: Endpoint,
        request: &ClientRequest,
    ) -> Option<usize> {
        let prefix = self.prefix.as_ref()?;
        prefix
            .choose(
                &self.upstream,
                &self.prefill,
                endpoint,
                &request.fields,
                &self.metrics,
            )
            .await
    }

    /// Waits for the node to hold the blocks the prefill answer names (and learns from them
    /// what the prefix-aware choice needs).
    async fn hand_off(&self, answer: &Value) -> Result<(), Fallback> {
        let handoff = handoff::from_answer(answer).map_err(|why| {
            tracing::info!(%why, "no handoff in the prefill answer");
            Fallback::NoParams
        })?;
        if let Some(prefix) = &self.prefix {
            prefix.learn(&handoff);
        }
        let started = Instant::now();
        let until = started + self.handoff_timeout;
        handoff::confirm(&self.upstream, &self.node, &handoff, until).await?;
        self.metrics
            .handoff_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The decode engine's answer and its URL; 4xx answers pass through, failures are retried.
    async fn decode(
        &self,
        endpoint: Endpoint,
        request: &ClientRequest,
        deadline: Instant,
    ) -> Result<(Decoded, String), RouterError> {
        let attempt = |in_flight: InFlight| async move {
            let url = in_flight.backend.url.to_string();
            let decoded = self
                .decode_attempt(endpoint, request, in_flight, deadline)
                .await?;
            Ok((decoded, url))
        };
        self.attempts(&self.decode, None, attempt)
            .await
            .map_err(|exhausted| RouterError::DecodeFailed(exhausted.to_string()))
    }

    /// One decode engine's answer: read whole, or its stream once the first events arrived;
    /// a 5xx, a broken connection or silence past the decode timeout is an error to retry.
    async fn decode_attempt(
        &self,
        endpoint: Endpoint,
        request: &ClientRequest,
        in_flight: InFlight,
        deadline: Instant,
    ) -> Result<Decoded, UpstreamError> {
        let until = Instant::now() + self.decode_timeout;
        let url = &in_flight.backend.url;
        let response = self
            .upstream
            .post(url, endpoint.path(), request.raw.clone(), until)
            .await?;
        let status = response.status();
        if status.is_server_error() {
            let body = read_body(response.into_body(), until)
                .await
                .unwrap_or_default();
            return Err(status_error(status, &body));
        }
        if request.stream && status.is_success() {
            let limits = RelayLimits {
                metrics: self.metrics.clone(),
                endpoint,
                idle: self.decode_timeout,
                deadline,
            };
            return stream::relay(response, in_flight, until, limits).await;
        }
        let content_type = response.headers().get(CONTENT_TYPE).cloned();
        let body = read_body(response.into_body(), until).await?;
        let mut answer = Response::new(axum::body::Body::from(body));
        *answer.status_mut() = status;
        if let Some(content_type) = content_type {
            answer.headers_mut().insert(CONTENT_TYPE, content_type);
        }
        let outcome = if status.is_success() {
            Outcome::Ok
        } else {
            Outcome::Rejected
        };
        Ok(Decoded {
            response: answer,
            outcome: Some(outcome),
        })
    }

    /// Runs `attempt` on `preferred` first when given, then on the least loaded untried backend
    /// of `backends`, up to `1 + retries` times; a 4xx stops at once (another backend would
    /// refuse the same request).
    async fn attempts<T, F, Fut>(
        &self,
        backends: &Backends,
        preferred: Option<usize>,
        mut attempt: F,
    ) -> Result<T, Exhausted>
    where
        F: FnMut(InFlight) -> Fut,
        Fut: Future<Output = Result<T, UpstreamError>>,
    {
        let role = backends.role.label();
        let mut tried = Vec::new();
        let mut failures = Vec::new();
        while tried.len() <= self.retries {
            let Some((index, in_flight)) = backends.choose(&tried, preferred) else {
                break;
            };
            if !tried.is_empty() {
                self.metrics.retries_total.with_label_values(&[role]).inc();
            }
            tried.push(index);
            let backend = in_flight.backend.clone();
            match attempt(in_flight).await {
                Ok(value) => return Ok(value),
                Err(error) => {
                    tracing::warn!(role, backend = %backend.url, %error, "attempt failed");
                    let failure = format!("{role} {}: {error}", backend.url);
                    if error.is_client_error() {
                        return Err(Exhausted::Rejected(failure));
                    }
                    backend.failed();
                    failures.push(failure);
                }
            }
        }
        Err(Exhausted::Failed(failures.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefill_body_asks_for_one_token_and_the_handoff() {
        let raw = Bytes::from_static(
            br#"{"model":"m","prompt":[1,2],"max_tokens":64,"max_completion_tokens":64,
                "min_tokens":8,"n":2,"stream":true,"stream_options":{"include_usage":true},
                "temperature":0}"#,
        );
        let request = ClientRequest::parse(raw).expect("valid");
        assert!(request.stream);
        let body: Value = serde_json::from_slice(&request.prefill_body()).expect("json");
        assert_eq!(
            body,
            json!({"model": "m", "prompt": [1, 2], "max_tokens": 1, "stream": false,
                   "temperature": 0, "kv_transfer_params": {"pegaflow_handoff": true}})
        );
    }

    #[test]
    fn a_body_the_router_cannot_read_is_a_bad_request_naming_the_field() {
        for (raw, expected) in [
            (&b"[1, 2]"[..], "expected a JSON object"),
            (b"{\"stream\": \"yes\"}", "field `stream`"),
            (b"{", "EOF"),
        ] {
            match ClientRequest::parse(Bytes::copy_from_slice(raw)) {
                Err(RouterError::BadRequest(message)) => {
                    assert!(message.contains(expected), "{message}")
                }
                Err(other) => panic!("{other}"),
                Ok(_) => panic!("accepted {raw:?}"),
            }
        }
    }
}
