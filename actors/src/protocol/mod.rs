//! The connector <-> node socket protocol (docs/protocol.md): framing, typed requests and
//! replies, and error codes. Nothing here touches actors, so clients and tests reuse it.

pub mod bin;
mod codec;
mod error;
pub mod handshake;
mod reply;
mod request;

pub use codec::{encode_frame, read_frame, FrameError};
pub use error::{ErrorCode, ProtoError};
pub use reply::{
    decode_reply, encode_reply, HelloReply, LoadReply, LookupReply, RegisterReply, ReleaseReply,
    ReplyBody, SaveReply, StatsReply,
};
pub use request::{
    decode_request, encode_request, BlocksRequest, HelloRequest, LookupRequest, RegionSpec,
    RegisterRequest, RejectedRequest, ReleaseRequest, Request, StatsRequest, PROTOCOL_VERSION,
};

#[cfg(test)]
mod golden_tests;
