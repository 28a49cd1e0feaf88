//! `load`: copies held pages back into the engine's blocks, layer by layer.

use pegaflow_gpu_dma::Direction;

use super::BlocksJob;
use crate::context::ask;
use crate::pool::{PoolMsg, TransferLease};
use crate::protocol::{ErrorCode, LoadReply, ProtoError, ReplyBody};
use crate::transfer::{CopyJob, TransferMsg};

/// Pins the leading held pages, copies them in, and unpins them.
pub async fn run(job: BlocksJob) -> Result<ReplyBody, ProtoError> {
    let ctx = &job.ctx;
    let page_bytes = job.engine.layout.page_bytes();
    let keys = job.keys;
    let grant = ask(&ctx.pool, "pool", |reply| PoolMsg::AcquireLoad {
        keys,
        page_bytes,
        reply,
    })
    .await?;
    let _lease = TransferLease::new(ctx.pool.clone(), grant.lease);
    let blocks: Vec<(u32, u64)> = job
        .block_ids
        .iter()
        .zip(&grant.pages)
        .map(|(&block, page)| (block, page.extent.offset))
        .collect();
    if !blocks.is_empty() {
        let copy = CopyJob {
            region: job.engine.region,
            direction: Direction::Load,
            layers: job.engine.layout.plan(&blocks),
            checksum_pages: Vec::new(),
        };
        ask(&ctx.transfer, "transfer", |reply| TransferMsg::Copy {
            job: copy,
            reply,
        })
        .await?
        .map_err(|e| ProtoError::new(ErrorCode::Internal, format!("load copy failed: {e}")))?;
    }
    let loaded = blocks.len() as u64;
    ctx.metrics.loaded_blocks_total.inc_by(loaded);
    ctx.metrics.load_bytes_total.inc_by(loaded * page_bytes);
    Ok(ReplyBody::Load(LoadReply {
        loaded: loaded as u32,
    }))
}
