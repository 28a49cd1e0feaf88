//! `save`: copies blocks out of the engine's region into newly reserved pool pages, and with
//! `persist` waits until they are durable on SSD. With `answer_when_queued` on a GPU engine it
//! answers once the copies are queued; the pages are published when they land, as otherwise.

use std::sync::Arc;

use pegaflow_gpu_dma::Direction;
use ractor::ActorRef;

use super::queued::{copy_then, Answered};
use super::BlocksJob;
use crate::context::{ask, NodeContext};
use crate::pool::{PoolMsg, SaveSlot, TransferLease};
use crate::protocol::{ErrorCode, ProtoError, ReplyBody, SaveReply};
use crate::transfer::CopyJob;

/// Reserves pages in the pool nearest the engine's GPU, copies every layer of each new block,
/// then publishes them.
pub async fn run(job: BlocksJob) -> Result<ReplyBody, ProtoError> {
    if job.persist && job.answer_when_queued {
        return Err(ProtoError::new(
            ErrorCode::BadField,
            "field `answer_when_queued`: cannot be combined with `persist`, which answers only \
             once the blocks are durable",
        ));
    }
    let ctx = &job.ctx;
    let page_bytes = job.engine.layout.page_bytes();
    let persist_keys = job.persist.then(|| job.keys.clone());
    let near = job.engine.transfer.numa_node;
    let (pool, reservation) = ctx.pools.reserve_save(near, job.keys, page_bytes).await?;
    let lease = TransferLease::new(pool.clone(), reservation.lease);
    let mut counts = SaveReply::default();
    let mut blocks = Vec::new();
    for (slot, &block) in reservation.slots.iter().zip(&job.block_ids) {
        match slot {
            SaveSlot::Present => counts.present += 1,
            SaveSlot::Dropped => counts.dropped += 1,
            SaveSlot::Write(extent) => blocks.push((block, extent.offset)),
        }
    }
    if !blocks.is_empty() {
        let copy = CopyJob {
            region: job.engine.region,
            direction: Direction::Save,
            layers: job.engine.layout.plan(&blocks),
            checksum_pages: blocks.iter().map(|&(_, page)| (page, page_bytes)).collect(),
            wait_events: job.after_events,
        };
        let node = ctx.clone();
        let commit = |crcs| async move { publish(&node, &pool, lease, crcs).await };
        let written = blocks.len() as u32;
        match copy_then(
            &job.engine.transfer.actor()?,
            copy,
            job.answer_when_queued,
            "save",
            commit,
        )
        .await?
        {
            Answered::Queued(queued) => {
                counts.stored = written;
                counts.event_slots = queued.event_slots;
            }
            Answered::Done(stored) => {
                counts.stored = stored;
                counts.present += written - stored;
            }
        }
    }
    ctx.metrics
        .save_dropped_blocks_total
        .inc_by(u64::from(counts.dropped));
    if let Some(keys) = persist_keys {
        // Waits until the held pages are written and synced to SSD.
        // With the SSD tier on, the node has one pool.
        let persist = |reply| PoolMsg::Persist { keys, reply };
        counts.persisted = Some(ask(ctx.pools.first(), "pool", persist).await?);
    }
    Ok(ReplyBody::Save(counts))
}

/// Commits the written pages with their checksums; returns how many became new entries (the
/// rest were saved by another request meanwhile). `lease` lives until the commit is answered.
async fn publish(
    ctx: &Arc<NodeContext>,
    pool: &ActorRef<PoolMsg>,
    lease: TransferLease,
    crcs: Vec<u32>,
) -> Result<u32, ProtoError> {
    let lease_id = lease.id();
    let stored = ask(pool, "pool", |reply| PoolMsg::CommitSave {
        lease: lease_id,
        crcs,
        reply,
    })
    .await?;
    ctx.metrics.saved_blocks_total.inc_by(u64::from(stored));
    Ok(stored)
}
