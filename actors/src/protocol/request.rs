//! Requests: the typed form of each op's frame, and their decoding with errors that name the
//! field at fault.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, ProtoError};
use crate::keys::NamespaceFields;

/// The only protocol version this node speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// `hello`: opens a conversation and checks the versions (docs/protocol.md "Versions").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloRequest {
    pub client: String,
    /// The client's package version, e.g. `"0.1.0"`; clients older than the handshake send
    /// none, and are then checked by protocol (`v`) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// The engine's KV memory as the connector describes it: a POSIX shared-memory name (engines
/// without a GPU) or a CUDA IPC memory handle (GPU engines); exactly one of the two.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm: Option<String>,
    /// `cudaIpcMemHandle_t` of the allocation holding the KV tensors (64 bytes).
    #[serde(
        default,
        with = "super::bin::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub cuda_ipc: Option<Vec<u8>>,
    /// Where the KV buffer starts inside the IPC allocation.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// The GPU the region belongs to, by UUID (`GPU-...`, as `nvidia-smi -L` prints it): required
    /// with `cuda_ipc`; with `shm`, a GPU of the node's `topology.gpus` or none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    pub bytes: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// `register`: one engine's KV region and layout on this connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    pub namespace: NamespaceFields,
    pub region: RegionSpec,
    pub num_blocks: u32,
    pub segment_bytes: u64,
    /// Per layer, its segments as `(offset, block_stride)` in bytes.
    pub layers: Vec<Vec<(u64, u64)>>,
    /// GPU engines, optional: interprocess event handles (64 bytes each) of a ring of events the
    /// engine created once; a `save`'s `after_events` name slots of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub engine_events: Vec<super::bin::Bin>,
    /// GPU engines, optional: the shared-memory name of the engine's load progress board (one
    /// 8-byte word per `layer_events` slot), so loads are answered before their layers are
    /// enqueued (docs/protocol.md "Load progress").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_progress: Option<String>,
}

/// `lookup`: how long a prefix of these keys the node holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupRequest {
    #[serde(with = "super::bin")]
    pub keys: Vec<u8>,
    #[serde(default)]
    pub lease: bool,
}

/// `save` and `load`: keys paired with the engine's block ids.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlocksRequest {
    pub engine: u32,
    #[serde(with = "super::bin")]
    pub keys: Vec<u8>,
    pub block_ids: Vec<u32>,
    /// `save` only, optional: reply once the blocks are durable on SSD (ignored by `load`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub persist: bool,
    /// `save` only, optional: per layer, the slot of the register's `engine_events` the engine
    /// recorded after writing that layer; the node's copy of layer `L` waits on it GPU-side.
    /// Empty: the engine's writes are complete already (ignored by `load`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after_events: Vec<u32>,
    /// `save` only, optional: answer once the copies are queued, with the event slot each layer
    /// ends with, instead of once they are done, so the engine's host thread never waits for
    /// them (its stream waits on the last slot before the blocks are written again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub answer_when_queued: bool,
}

/// `release`: ends a lookup lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    pub lease: u64,
}

/// `stats`: no fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRequest {}

/// One decoded request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello(HelloRequest),
    Register(RegisterRequest),
    Lookup(LookupRequest),
    Save(BlocksRequest),
    Load(BlocksRequest),
    Release(ReleaseRequest),
    Stats(StatsRequest),
}

impl Request {
    /// The wire name of the op, used in logs and metric labels.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello(_) => "hello",
            Request::Register(_) => "register",
            Request::Lookup(_) => "lookup",
            Request::Save(_) => "save",
            Request::Load(_) => "load",
            Request::Release(_) => "release",
            Request::Stats(_) => "stats",
        }
    }
}

/// The fields every request carries; decoded first so an error reply can echo `id`.
#[derive(Deserialize)]
struct Header {
    v: Option<u64>,
    id: Option<u64>,
    op: Option<String>,
}

/// A request that could not be decoded, with the `id` to echo when it was readable.
#[derive(Debug)]
pub struct RejectedRequest {
    pub id: Option<u64>,
    pub error: ProtoError,
}

/// Just the `id`, for echoing it when another header field is malformed.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<u64>,
}

/// Decodes one frame payload into `(id, request)`.
pub fn decode_request(payload: &[u8]) -> Result<(u64, Request), RejectedRequest> {
    let header: Header = decode_map(payload).map_err(|error| RejectedRequest {
        // A `v` or `op` of the wrong type fails the header; the id may still be readable.
        id: decode_map::<IdOnly>(payload).ok().and_then(|only| only.id),
        error,
    })?;
    let reject = |error: ProtoError| RejectedRequest {
        id: header.id,
        error,
    };
    let id = header
        .id
        .ok_or_else(|| reject(ProtoError::new(ErrorCode::BadField, "missing field `id`")))?;
    match header.v {
        Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
        Some(v) => return Err(reject(super::handshake::unsupported_protocol(v))),
        None => {
            return Err(reject(ProtoError::new(
                ErrorCode::BadField,
                "missing field `v`",
            )))
        }
    }
    let op = header
        .op
        .as_deref()
        .ok_or_else(|| reject(ProtoError::new(ErrorCode::BadField, "missing field `op`")))?;
    let request = match op {
        "hello" => decode_map(payload).map(Request::Hello),
        "register" => decode_map(payload).map(Request::Register),
        "lookup" => decode_map(payload).map(Request::Lookup),
        "save" => decode_map(payload).map(Request::Save),
        "load" => decode_map(payload).map(Request::Load),
        "release" => decode_map(payload).map(Request::Release),
        "stats" => decode_map(payload).map(Request::Stats),
        other => Err(ProtoError::new(
            ErrorCode::UnknownOp,
            format!("field `op`: unknown op {other:?}; expected one of hello, register, lookup, save, load, release, stats"),
        )),
    };
    request.map(|request| (id, request)).map_err(reject)
}

/// Decodes a whole payload as one map into `T`, naming the field path on a type error and
/// refusing trailing bytes.
pub(crate) fn decode_map<T: DeserializeOwned>(payload: &[u8]) -> Result<T, ProtoError> {
    // Structs also decode from msgpack arrays (positionally); the wire only allows maps.
    if !matches!(payload.first(), Some(0x80..=0x8f | 0xde | 0xdf)) {
        return Err(ProtoError::new(
            ErrorCode::BadFrame,
            "payload is not a msgpack map",
        ));
    }
    let mut deserializer = rmp_serde::Deserializer::new(std::io::Cursor::new(payload));
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        match inner {
            rmp_serde::decode::Error::InvalidMarkerRead(_)
            | rmp_serde::decode::Error::InvalidDataRead(_) => ProtoError::new(
                ErrorCode::BadFrame,
                format!("payload is not a complete msgpack map: {inner}"),
            ),
            // 0xc1 is never used by msgpack: a corrupt stream, not a field of the wrong type.
            rmp_serde::decode::Error::TypeMismatch(marker) if marker.to_u8() == 0xc1 => {
                ProtoError::new(
                    ErrorCode::BadFrame,
                    format!("payload is not msgpack: the never-used marker 0xc1 at `{path}`"),
                )
            }
            _ if path == "." => {
                let code = if inner.to_string().contains("missing field") {
                    ErrorCode::BadField
                } else {
                    ErrorCode::BadFrame
                };
                let what = if code == ErrorCode::BadFrame {
                    "payload is not a msgpack map: "
                } else {
                    ""
                };
                ProtoError::new(code, format!("{what}{inner}"))
            }
            _ => ProtoError::new(ErrorCode::BadField, format!("field `{path}`: {inner}")),
        }
    })?;
    let trailing = payload.len() as u64 - deserializer.position();
    if trailing != 0 {
        return Err(ProtoError::new(
            ErrorCode::BadFrame,
            format!("{trailing} trailing bytes after the msgpack map"),
        ));
    }
    Ok(value)
}

#[derive(Serialize)]
struct RequestEnvelope<'a, T> {
    v: u32,
    id: u64,
    op: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

/// Encodes a request payload (without the length prefix), as clients send it.
pub fn encode_request(id: u64, request: &Request) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    fn envelope<T: Serialize>(
        id: u64,
        op: &'static str,
        body: &T,
    ) -> Result<Vec<u8>, rmp_serde::encode::Error> {
        super::reply::to_map_bytes(&RequestEnvelope {
            v: PROTOCOL_VERSION,
            id,
            op,
            body,
        })
    }
    let op = request.op();
    match request {
        Request::Hello(body) => envelope(id, op, body),
        Request::Register(body) => envelope(id, op, body),
        Request::Lookup(body) => envelope(id, op, body),
        Request::Save(body) | Request::Load(body) => envelope(id, op, body),
        Request::Release(body) => envelope(id, op, body),
        Request::Stats(body) => envelope(id, op, body),
    }
}
