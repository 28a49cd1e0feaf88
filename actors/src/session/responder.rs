//! Sends one request's reply, counting it in the metrics.

use std::time::Instant;

use tokio::sync::mpsc;

use super::SessionState;
use crate::context::NodeContext;
use crate::protocol::{encode_frame, encode_reply, ProtoError, ReplyBody};
use std::sync::Arc;

/// Owed reply to one request; consumed by [`Responder::send`].
pub struct Responder {
    id: Option<u64>,
    op: &'static str,
    arrived: Instant,
    replies: mpsc::Sender<Vec<u8>>,
    ctx: Arc<NodeContext>,
}

impl Responder {
    /// A reply owed to request `id` of `op`.
    pub fn new(id: Option<u64>, op: &'static str, arrived: Instant, state: &SessionState) -> Self {
        Self {
            id,
            op,
            arrived,
            replies: state.replies.clone(),
            ctx: state.ctx.clone(),
        }
    }

    /// Encodes and queues the reply; a closed connection just drops it.
    pub async fn send(self, result: Result<ReplyBody, ProtoError>) {
        self.ctx
            .metrics
            .request_done(self.op, self.arrived.elapsed(), &result);
        if let Err(error) = &result {
            tracing::debug!(op = self.op, code = error.code.as_str(), message = %error.message, "error reply");
        }
        if let Ok(frame) = encode_frame(&encode_reply(self.id, &result)) {
            let _ = self.replies.send(frame).await;
        }
    }

    /// Waits for a spawned op's result, then sends it.
    pub async fn send_when(
        self,
        op: impl std::future::Future<Output = Result<ReplyBody, ProtoError>>,
    ) {
        self.send(op.await).await
    }
}
