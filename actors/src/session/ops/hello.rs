//! `hello`: who the node is and what it accepts.

use crate::context::NodeContext;
use crate::protocol::handshake::{check_client_version, PACKAGE_VERSION};
use crate::protocol::{HelloReply, HelloRequest, ProtoError, ReplyBody, PROTOCOL_VERSION};

/// Answers `hello`, or refuses a client whose package version cannot work with this node (the
/// protocol version was checked when the frame was decoded).
pub fn handle(ctx: &NodeContext, req: &HelloRequest) -> Result<ReplyBody, ProtoError> {
    if let Some(version) = &req.version {
        if let Err(error) = check_client_version(version) {
            tracing::warn!(client = %loggable(&req.client), "hello refused: {}", error.message);
            return Err(error);
        }
    }
    tracing::info!(client = %loggable(&req.client), version = req.version.as_deref(), "hello");
    Ok(ReplyBody::Hello(HelloReply {
        protocol: PROTOCOL_VERSION,
        node: format!("pegaflow-node {PACKAGE_VERSION}"),
        version: PACKAGE_VERSION.to_string(),
        dma: ctx.dma().to_string(),
        pool_bytes: ctx.metrics.pool_capacity_bytes.get().max(0) as u64,
        max_frame_bytes: ctx.max_frame_bytes,
    }))
}

/// Most characters of a client's free text that go into a log line.
const LOGGED_CHARS: usize = 128;

/// A client's free text as it may appear in a log: control characters (a newline would forge a
/// log line) escaped, and cut to [`LOGGED_CHARS`] with the full length noted.
fn loggable(text: &str) -> String {
    let mut shown: String = text
        .chars()
        .take(LOGGED_CHARS)
        .flat_map(char::escape_debug)
        .collect();
    let chars = text.chars().count();
    if chars > LOGGED_CHARS {
        shown.push_str(&format!("... ({chars} characters)"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_text_is_escaped_and_cut_for_logs() {
        assert_eq!(loggable("vllm 0.26"), "vllm 0.26");
        let forged = loggable("x\nINFO pegaflow: forged line\u{1b}[31m");
        assert!(
            !forged.contains('\n') && !forged.contains('\u{1b}'),
            "{forged}"
        );
        assert!(forged.starts_with("x\\nINFO"), "{forged}");
        let long = loggable(&"é".repeat(100_000));
        assert!(
            long.ends_with("... (100000 characters)"),
            "{}",
            &long[long.len() - 40..]
        );
        assert!(long.chars().count() < 200, "{}", long.len());
    }
}
