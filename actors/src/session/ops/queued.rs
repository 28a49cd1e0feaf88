//! A copy job that may be answered before its copies are done: a GPU engine's stream can wait on
//! the job's layer events, so the request is answered once they are queued (a load with a
//! progress board: at once) while the copies, and what the node does after them, run on.

use std::future::Future;

use tokio::sync::oneshot;

use ractor::ActorRef;

use crate::context::ask;
use crate::protocol::{ErrorCode, ProtoError};
use crate::transfer::{CopyJob, QueuedCopy, TransferError, TransferMsg};

/// How far a copy job had got when its request could be answered.
pub enum Answered<T> {
    /// The copies are queued: the engine waits on these event slots before it uses the blocks.
    /// The copies and their follow-up run on, and a failure of either is only logged.
    Queued(QueuedCopy),
    /// The copies and their follow-up are done, with the follow-up's result.
    Done(T),
}

/// The engine's region failing under a copy (its file shrunk) is the engine's doing, not the
/// node's: `region_unavailable`, else `internal`.
fn copy_error_code(error: &TransferError) -> ErrorCode {
    match error {
        TransferError::Dma(dma) if dma.is_region_fault() => ErrorCode::RegionUnavailable,
        _ => ErrorCode::Internal,
    }
}

/// Runs `copy` on `transfer` and then `after` with its checksums, in a task of its own,
/// and returns once the copies are queued with event slots to wait on (when `early` and the
/// engine has layer events), else once `after` is done. `what` names the op in errors and logs.
pub async fn copy_then<T, F, Fut>(
    transfer: &ActorRef<TransferMsg>,
    copy: CopyJob,
    early: bool,
    what: &'static str,
    after: F,
) -> Result<Answered<T>, ProtoError>
where
    T: Send + 'static,
    F: FnOnce(Vec<u32>) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, ProtoError>> + Send,
{
    let (queued, enqueued) = oneshot::channel();
    let queued = early.then_some(queued);
    let transfer = transfer.clone();
    let done = tokio::spawn(async move {
        let crcs = ask(&transfer, "transfer", |reply| TransferMsg::Copy {
            job: copy,
            queued,
            reply,
        })
        .await?
        .map_err(|e| ProtoError::new(copy_error_code(&e), format!("{what} copy failed: {e}")))?;
        after(crcs).await
    });
    if let Ok(queued) = enqueued.await {
        tokio::spawn(async move {
            match done.await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::error!(message = %error.message, "{what} failed after it was answered");
                }
                Err(error) => tracing::error!(%error, "{what} task failed after it was answered"),
            }
        });
        return Ok(Answered::Queued(queued));
    }
    match done.await {
        Ok(result) => result.map(Answered::Done),
        Err(e) => Err(ProtoError::new(
            ErrorCode::Internal,
            format!("{what} task failed: {e}"),
        )),
    }
}
