//! Replies: `{id, ok: true, ...op fields}` or `{id, ok: false, code, message}`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, ProtoError};
use super::request::decode_map;
use crate::stats::NodeStats;

/// `hello`'s answer: who the node is and what it accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol: u32,
    pub node: String,
    /// The node's package version, e.g. `"0.1.0"`; the client checks it against its own.
    pub version: String,
    pub dma: String,
    pub pool_bytes: u64,
    pub max_frame_bytes: u64,
}

/// `register`'s answer: the handle for later ops and the namespace keys chain from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterReply {
    pub engine: u32,
    #[serde(with = "super::bin")]
    pub namespace: Vec<u8>,
    pub page_bytes: u64,
    /// GPU engines: the interprocess event handles a load's `event_slots` index into; the
    /// connector opens each once. Omitted for engines without a GPU.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_events: Vec<super::bin::Bin>,
}

/// `lookup`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupReply {
    pub hits: u32,
    pub lease: Option<u64>,
    /// How many of the `hits` are on the SSD tier only; omitted when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ssd_hits: u32,
    /// How many of the `hits` only peers hold (fabric on); a `load` fetches them first, and
    /// may get fewer. Omitted when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub remote_hits: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `save`'s answer: what happened to each key, counted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaveReply {
    pub stored: u32,
    pub present: u32,
    pub dropped: u32,
    /// Only for a `save` with `persist`: how many of its distinct keys are durable on SSD.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persisted: Option<u32>,
    /// Only for a `save` with `answer_when_queued` on a GPU engine: per layer, the
    /// `layer_events` slot recorded after that layer's copy; the reply then comes once the
    /// copies are queued, and `stored` counts the blocks being written.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_slots: Vec<u32>,
}

/// `load`'s answer: leading blocks copied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReply {
    pub loaded: u32,
    /// GPU engines: per loaded layer, the `layer_events` slot recorded after that layer's copy.
    /// The reply then comes as soon as the copies are enqueued; the engine's stream waits on
    /// each layer's event. Omitted when the copies were already done before the reply.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_slots: Vec<u32>,
    /// Engines with a load progress board: the reply comes before the layers are enqueued, and
    /// slot `event_slots[L]`'s word shows this ticket once layer `L`'s event is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<u64>,
}

/// `release`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseReply {
    pub released: u32,
}

/// `stats`'s answer: the same document as `GET /api/stats`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsReply {
    /// Boxed: the document is large and most replies are not stats.
    pub stats: Box<NodeStats>,
}

/// A successful reply of any op.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ReplyBody {
    Hello(HelloReply),
    Register(RegisterReply),
    Lookup(LookupReply),
    Save(SaveReply),
    Load(LoadReply),
    Release(ReleaseReply),
    Stats(StatsReply),
}

#[derive(Serialize)]
struct OkEnvelope<'a, T> {
    id: u64,
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize, Deserialize)]
struct ErrorEnvelope {
    id: Option<u64>,
    ok: bool,
    code: ErrorCode,
    message: String,
}

#[derive(Deserialize)]
struct ReplyHeader {
    id: Option<u64>,
    ok: bool,
}

/// Encodes a reply payload (without the length prefix).
pub fn encode_reply(id: Option<u64>, reply: &Result<ReplyBody, ProtoError>) -> Vec<u8> {
    let encoded = match (id, reply) {
        (Some(id), Ok(body)) => to_map_bytes(&OkEnvelope { id, ok: true, body }),
        (None, Ok(_)) => to_map_bytes(&error_envelope(
            None,
            &ProtoError::new(ErrorCode::Internal, "reply without a request id"),
        )),
        (_, Err(error)) => to_map_bytes(&error_envelope(id, error)),
    };
    // Serializing these plain structs into a Vec cannot fail; fall back to a fixed frame
    // rather than panic if a future field type ever makes it.
    encoded.unwrap_or_else(|_| {
        rmp_serde::to_vec_named(&error_envelope(
            id,
            &ProtoError::new(ErrorCode::Internal, "reply could not be encoded"),
        ))
        .unwrap_or_default()
    })
}

fn error_envelope(id: Option<u64>, error: &ProtoError) -> ErrorEnvelope {
    ErrorEnvelope {
        id,
        ok: false,
        code: error.code,
        message: error.message.clone(),
    }
}

/// Serializes with string keys (msgpack maps), as the wire requires.
pub(crate) fn to_map_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(value)
}

/// Decodes a reply payload: `(id, Ok(T))` or `(id, Err(node's error))`; a malformed reply is an
/// `Err` of the outer result.
pub fn decode_reply<T: DeserializeOwned>(
    payload: &[u8],
) -> Result<(Option<u64>, Result<T, ProtoError>), ProtoError> {
    let header: ReplyHeader = decode_map(payload)?;
    if header.ok {
        Ok((header.id, Ok(decode_map(payload)?)))
    } else {
        let error: ErrorEnvelope = decode_map(payload)?;
        Ok((header.id, Err(ProtoError::new(error.code, error.message))))
    }
}
