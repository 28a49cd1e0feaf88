//! Sends one request's reply, counting it in the metrics.

use std::time::Instant;

use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Mutex;

use super::SessionState;
use crate::context::NodeContext;
use crate::protocol::{encode_frame, encode_reply, ProtoError, ReplyBody};
use std::sync::Arc;

/// The socket's write half, shared by the session and the ops it runs; each frame is written
/// whole under the lock. Writing in place, rather than through a writer task, saves a task
/// wake-up per reply, which is most of a lookup's latency. Dropping the last handle shuts the
/// socket's write side, so a client sees every reply and then the end of the stream.
#[derive(Clone)]
pub struct ReplySink(Arc<Mutex<OwnedWriteHalf>>);

impl ReplySink {
    /// Shares `writer` between the session's replies.
    pub fn new(writer: OwnedWriteHalf) -> Self {
        Self(Arc::new(Mutex::new(writer)))
    }

    /// Writes one encoded frame; a broken connection just drops it (its reader ends the session).
    pub async fn write(&self, frame: &[u8]) {
        let _ = self.0.lock().await.write_all(frame).await;
    }
}

/// Owed reply to one request; consumed by [`Responder::send`].
pub struct Responder {
    id: Option<u64>,
    op: &'static str,
    arrived: Instant,
    replies: ReplySink,
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

    /// Encodes and writes the reply; a closed connection just drops it.
    pub async fn send(self, result: Result<ReplyBody, ProtoError>) {
        self.ctx
            .metrics
            .request_done(self.op, self.arrived.elapsed(), &result);
        if let Err(error) = &result {
            tracing::debug!(op = self.op, code = error.code.as_str(), message = %error.message, "error reply");
        }
        if let Ok(frame) = encode_frame(&encode_reply(self.id, &result)) {
            self.replies.write(&frame).await;
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
