//! `load`: copies held pages back into the engine's blocks, layer by layer. Blocks on SSD are
//! promoted into the pool first (all at once), and with the fabric on, blocks after the local
//! prefix are fetched from peers into the pool; then all are copied like any other page.

use pegaflow_gpu_dma::Direction;

use super::queued::{copy_then, Answered};
use super::BlocksJob;
use crate::context::NodeContext;
use crate::keys::BlockKey;
use crate::pool::{PageEntry, TransferLease};
use crate::protocol::{LoadReply, ProtoError, ReplyBody};
use crate::transfer::{CopyJob, QueuedCopy};

/// Pins the leading held pages (promoting SSD-resident ones, fetching peers' ones), copies
/// them in, and unpins them.
pub async fn run(job: BlocksJob) -> Result<ReplyBody, ProtoError> {
    let ctx = &job.ctx;
    let page_bytes = job.engine.layout.page_bytes();
    let near = job.engine.transfer.numa_node;
    let (pages, leases) = pin_pages(ctx, near, &job.keys, page_bytes).await?;
    let blocks: Vec<(u32, u64)> = job
        .block_ids
        .iter()
        .zip(&pages)
        .map(|(&block, page)| (block, page.extent.offset))
        .collect();
    let queued = if blocks.is_empty() {
        QueuedCopy::default()
    } else {
        let copy = CopyJob {
            region: job.engine.region,
            direction: Direction::Load,
            layers: job.engine.layout.plan(&blocks),
            checksum_pages: Vec::new(),
            wait_events: Vec::new(),
        };
        let transfer = job.engine.transfer.actor()?;
        // The pages stay pinned by `leases` until the copies are done, answered early or not.
        let copied = copy_then(&transfer, copy, true, "load", |_| async move {
            drop(leases);
            Ok(())
        });
        match copied.await? {
            Answered::Queued(queued) => queued,
            Answered::Done(()) => QueuedCopy::default(),
        }
    };
    let loaded = blocks.len() as u64;
    ctx.metrics.loaded_blocks_total.inc_by(loaded);
    Ok(ReplyBody::Load(LoadReply {
        loaded: loaded as u32,
        event_slots: queued.event_slots,
        ticket: queued.ticket,
    }))
}

/// Pins the longest prefix of `keys` held in the host's pools (nearest `numa_node` first); with
/// the fabric on, fetches the rest that peers hold into the pool and pins that too. The pins end
/// when the returned guards drop.
async fn pin_pages(
    ctx: &NodeContext,
    numa_node: u32,
    keys: &[BlockKey],
    page_bytes: u64,
) -> Result<(Vec<PageEntry>, Vec<TransferLease>), ProtoError> {
    let (mut pages, mut leases) = ctx.pools.acquire_load(numa_node, keys, page_bytes).await?;
    let missed = &keys[pages.len().min(keys.len())..];
    let Some(peers) = ctx.peers.as_ref().filter(|_| !missed.is_empty()) else {
        return Ok((pages, leases));
    };
    let fetched = peers.fetch_into_pool(missed, page_bytes).await?;
    if fetched.stored > 0 {
        let fetched = &missed[..fetched.stored as usize];
        let (remote, pins) = ctx
            .pools
            .acquire_load(numa_node, fetched, page_bytes)
            .await?;
        pages.extend(remote);
        leases.extend(pins);
    }
    Ok((pages, leases))
}
