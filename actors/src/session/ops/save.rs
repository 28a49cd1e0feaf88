//! `save`: copies blocks out of the engine's region into newly reserved pool pages, and with
//! `persist` waits until they are durable on SSD.

use pegaflow_gpu_dma::Direction;

use super::BlocksJob;
use crate::context::ask;
use crate::pool::{PoolMsg, SaveSlot, TransferLease};
use crate::protocol::{ErrorCode, ProtoError, ReplyBody, SaveReply};
use crate::transfer::{CopyJob, TransferMsg};

/// Reserves pages, copies every layer of each new block, then publishes them.
pub async fn run(job: BlocksJob) -> Result<ReplyBody, ProtoError> {
    let ctx = &job.ctx;
    let page_bytes = job.engine.layout.page_bytes();
    let persist_keys = job.persist.then(|| job.keys.clone());
    let keys = job.keys;
    let reservation = ask(&ctx.pool, "pool", |reply| PoolMsg::ReserveSave {
        keys,
        page_bytes,
        reply,
    })
    .await?;
    let lease = TransferLease::new(ctx.pool.clone(), reservation.lease);
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
        let crcs = ask(&ctx.transfer, "transfer", |reply| TransferMsg::Copy {
            job: copy,
            queued: None,
            reply,
        })
        .await?
        .map_err(|e| ProtoError::new(ErrorCode::Internal, format!("save copy failed: {e}")))?;
        let lease_id = lease.id();
        let stored = ask(&ctx.pool, "pool", |reply| PoolMsg::CommitSave {
            lease: lease_id,
            crcs,
            reply,
        })
        .await?;
        let written = blocks.len() as u32;
        counts.stored = stored;
        counts.present += written - stored;
        ctx.metrics.saved_blocks_total.inc_by(u64::from(stored));
    }
    ctx.metrics
        .save_dropped_blocks_total
        .inc_by(u64::from(counts.dropped));
    if let Some(keys) = persist_keys {
        // Waits until the held pages are written and synced to SSD.
        counts.persisted =
            Some(ask(&ctx.pool, "pool", |reply| PoolMsg::Persist { keys, reply }).await?);
    }
    Ok(ReplyBody::Save(counts))
}
