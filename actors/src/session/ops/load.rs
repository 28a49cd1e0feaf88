//! `load`: copies held pages back into the engine's blocks, layer by layer. Blocks on SSD are
//! promoted into the pool first (all at once), and with the fabric on, blocks after the local
//! prefix are fetched from peers into the pool; then all are copied like any other page.

use pegaflow_gpu_dma::Direction;
use ractor::ActorRef;
use tokio::sync::oneshot;

use super::BlocksJob;
use crate::context::{ask, NodeContext};
use crate::keys::BlockKey;
use crate::pool::{LoadGrant, PageEntry, PoolMsg, TransferLease};
use crate::protocol::{ErrorCode, LoadReply, ProtoError, ReplyBody};
use crate::transfer::{CopyJob, QueuedLoad, TransferMsg};

/// Pins the leading held pages (promoting SSD-resident ones, fetching peers' ones), copies
/// them in, and unpins them.
pub async fn run(job: BlocksJob) -> Result<ReplyBody, ProtoError> {
    let ctx = &job.ctx;
    let page_bytes = job.engine.layout.page_bytes();
    let (pages, leases) = pin_pages(ctx, &job.keys, page_bytes).await?;
    let blocks: Vec<(u32, u64)> = job
        .block_ids
        .iter()
        .zip(&pages)
        .map(|(&block, page)| (block, page.extent.offset))
        .collect();
    let queued = if blocks.is_empty() {
        QueuedLoad::default()
    } else {
        let copy = CopyJob {
            region: job.engine.region,
            direction: Direction::Load,
            layers: job.engine.layout.plan(&blocks),
            checksum_pages: Vec::new(),
            wait_events: Vec::new(),
        };
        copy_in(ctx.transfer.clone(), copy, leases).await?
    };
    let loaded = blocks.len() as u64;
    ctx.metrics.loaded_blocks_total.inc_by(loaded);
    Ok(ReplyBody::Load(LoadReply {
        loaded: loaded as u32,
        event_slots: queued.event_slots,
        ticket: queued.ticket,
    }))
}

/// Pins the longest prefix of `keys` held here; with the fabric on, fetches the rest that peers
/// hold into the pool and pins that too. The pins end when the returned guards drop.
async fn pin_pages(
    ctx: &NodeContext,
    keys: &[BlockKey],
    page_bytes: u64,
) -> Result<(Vec<PageEntry>, Vec<TransferLease>), ProtoError> {
    let local = acquire(ctx, keys, page_bytes).await?;
    let mut pages = local.pages;
    let mut leases = vec![TransferLease::new(ctx.pool.clone(), local.lease)];
    let missed = &keys[pages.len().min(keys.len())..];
    let Some(peers) = ctx.peers.as_ref().filter(|_| !missed.is_empty()) else {
        return Ok((pages, leases));
    };
    let fetched = peers.fetch_into_pool(missed, page_bytes).await?;
    if fetched.stored > 0 {
        let remote = acquire(ctx, &missed[..fetched.stored as usize], page_bytes).await?;
        pages.extend(remote.pages);
        leases.push(TransferLease::new(ctx.pool.clone(), remote.lease));
    }
    Ok((pages, leases))
}

async fn acquire(
    ctx: &NodeContext,
    keys: &[BlockKey],
    page_bytes: u64,
) -> Result<LoadGrant, ProtoError> {
    let keys = keys.to_vec();
    ask(&ctx.pool, "pool", |reply| PoolMsg::AcquireLoad {
        keys,
        page_bytes,
        reply,
    })
    .await
}

/// Runs the copy and returns as early as is safe: at once with a ticket (GPU engines with a
/// progress board; the engine waits for the board, then its stream on each layer's event), once
/// every layer is enqueued with its event (GPU engines without a board), or once the copies are
/// done (no events). The pages stay pinned by `leases` until the copies are done either way.
async fn copy_in(
    transfer: ActorRef<TransferMsg>,
    copy: CopyJob,
    leases: Vec<TransferLease>,
) -> Result<QueuedLoad, ProtoError> {
    let (queued, enqueued) = oneshot::channel();
    let done = tokio::spawn(async move {
        let result = ask(&transfer, "transfer", |reply| TransferMsg::Copy {
            job: copy,
            queued: Some(queued),
            reply,
        })
        .await;
        drop(leases);
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(ProtoError::new(
                ErrorCode::Internal,
                format!("load copy failed: {e}"),
            )),
            Err(e) => Err(e),
        }
    });
    match enqueued.await {
        Ok(queued) => {
            tokio::spawn(async move {
                if let Ok(Err(error)) = done.await {
                    tracing::error!(message = %error.message, "load failed after its layer events were handed out");
                }
            });
            Ok(queued)
        }
        Err(_) => match done.await {
            Ok(result) => result.map(|()| QueuedLoad::default()),
            Err(e) => Err(ProtoError::new(
                ErrorCode::Internal,
                format!("load task failed: {e}"),
            )),
        },
    }
}
