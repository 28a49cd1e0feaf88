//! Error replies: a stable machine-readable code plus a message naming what was wrong.

use serde::{Deserialize, Serialize};

/// Stable error codes of the socket protocol (docs/protocol.md, "Error codes").
///
/// Clients branch on the code, humans read the message; keeping the set closed and
/// snake_case on the wire lets Python compare plain strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadFrame,
    FrameTooLarge,
    UnsupportedVersion,
    IncompatibleVersion,
    UnknownOp,
    BadField,
    BadKey,
    NotRegistered,
    OutOfRange,
    LayoutMismatch,
    RegionUnavailable,
    PageTooLarge,
    UnknownLease,
    LimitExceeded,
    ShuttingDown,
    Internal,
}

impl ErrorCode {
    /// The wire name, also used as the `code` label of the error metric.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::IncompatibleVersion => "incompatible_version",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::BadField => "bad_field",
            ErrorCode::BadKey => "bad_key",
            ErrorCode::NotRegistered => "not_registered",
            ErrorCode::OutOfRange => "out_of_range",
            ErrorCode::LayoutMismatch => "layout_mismatch",
            ErrorCode::RegionUnavailable => "region_unavailable",
            ErrorCode::PageTooLarge => "page_too_large",
            ErrorCode::UnknownLease => "unknown_lease",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A request that failed: becomes an `{ok: false, code, message}` reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ProtoError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtoError {
    /// Builds an error; `message` should name the field or value at fault.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
