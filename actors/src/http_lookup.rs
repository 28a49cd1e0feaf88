//! `POST /api/lookup`: how many leading keys of a chain the node holds, asked over HTTP.
//!
//! For callers that hold no socket session: the P/D router (`pegaflow-router`, docs/pd.md)
//! asks it whether the blocks a prefill engine saved are stored before it sends the request on
//! to the decode engine, so the decode side's lookup never races the prefill side's save. It
//! asks the pool the same [`PoolMsg::Lookup`] question as the socket's `lookup` op, with two
//! differences: no lease (an HTTP request owns nothing that could release one), and no count in
//! the lookup metrics (a router polling is not an engine looking a prompt up, and must not skew
//! the hit ratio operators read). `/api/holders` ([`crate::http_holders`]) asks the pool through
//! the same helpers.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::context::NodeContext;
use crate::keys::{BlockKey, KEY_BYTES};
use crate::protocol::ProtoError;

/// The request body: a chain of block keys, in order, each as hex.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupBody {
    /// `2 * 32` hex digits per key, the prompt's keys in chain order (docs/protocol.md "Keys").
    pub keys: Vec<String>,
}

/// The answer: the longest prefix of `keys` the node holds (memory or SSD).
#[derive(Debug, Serialize)]
pub struct LookupAnswer {
    /// Leading keys held; equal to the number asked when every block is stored.
    pub hits: u32,
}

/// Answers `POST /api/lookup`: 400 naming the field for a bad body, 503 while the node drains
/// or its pool does not answer.
pub async fn lookup(
    State(ctx): State<Arc<NodeContext>>,
    body: Result<Json<LookupBody>, JsonRejection>,
) -> Result<Json<LookupAnswer>, ApiError> {
    let keys = parse_hex_keys(&json_body(body)?.keys).map_err(ApiError::bad_request)?;
    let hits = pool_hits(&ctx, keys).await?;
    Ok(Json(LookupAnswer { hits }))
}

/// An error answer of the HTTP API: its status and a message naming what was wrong.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// A 400: `message` names the field at fault.
    pub fn bad_request(message: String) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
        }
    }

    /// A 503: the node drains, or its pool does not answer.
    fn unavailable(error: ProtoError) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: error.message,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, self.message).into_response()
    }
}

/// The body of a request, or a 400 quoting serde's message (which names the field at fault).
pub(crate) fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(body)| body)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

/// How many leading `keys` the pool holds (memory or SSD), asked as the socket's `lookup` op
/// does but without a lease and without counting in the lookup metrics.
pub(crate) async fn pool_hits(ctx: &NodeContext, keys: Vec<BlockKey>) -> Result<u32, ApiError> {
    ctx.check_open().map_err(ApiError::unavailable)?;
    let outcome = ctx
        .pools
        .lookup(&keys, None)
        .await
        .map_err(ApiError::unavailable)?;
    Ok(outcome.hits)
}

/// Decodes every key, naming the first one that is not exactly 32 bytes of hex.
fn parse_hex_keys(keys: &[String]) -> Result<Vec<BlockKey>, String> {
    keys.iter()
        .enumerate()
        .map(|(index, text)| parse_hex_key(&format!("keys[{index}]"), text))
        .collect()
}

/// Decodes one key (or namespace digest) from hex, naming `field` when it is not exactly
/// 32 bytes of hex.
pub(crate) fn parse_hex_key(field: &str, text: &str) -> Result<BlockKey, String> {
    let mut key = [0u8; KEY_BYTES];
    hex::decode_to_slice(text, &mut key).map_err(|error| {
        format!(
            "field `{field}`: {error}; expected {} hex digits (one {KEY_BYTES}-byte key)",
            2 * KEY_BYTES
        )
    })?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keys_decode_in_order() {
        let keys = parse_hex_keys(&["00".repeat(32), "ab".repeat(32)]).expect("valid keys");
        assert_eq!(keys, vec![[0u8; 32], [0xab; 32]]);
    }

    #[test]
    fn a_bad_key_is_named_by_its_index() {
        let error = parse_hex_keys(&["00".repeat(32), "abc".into()]).expect_err("odd length");
        assert!(error.starts_with("field `keys[1]`:"), "{error}");
        let error = parse_hex_keys(&["zz".repeat(32)]).expect_err("not hex");
        assert!(error.starts_with("field `keys[0]`:"), "{error}");
        let error = parse_hex_keys(&["00".repeat(31)]).expect_err("short");
        assert!(error.contains("64 hex digits"), "{error}");
    }
}
