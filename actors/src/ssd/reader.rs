//! Promotion: reading SSD-resident blocks back into freshly reserved arena extents, on blocking
//! threads, verifying each record's checksum before its bytes may be served.
//!
//! A load starts the promotions of all its SSD-resident blocks at once (spread over a few
//! threads), so their reads overlap each other instead of trickling in one by one.

use std::collections::HashMap;
use std::fs::File;
use std::sync::Arc;
use std::time::Instant;

use pegaflow_gpu_dma::Arena;

use super::catalog::Location;
use super::segment::{self, SegmentId};
use super::Shared;
use crate::events::Medium;
use crate::keys::BlockKey;

/// Threads one load's promotions are spread over.
const PARALLEL_READS: usize = 8;

/// One block to bring back: from `location` on SSD into the arena at `arena_offset`, which the
/// pool reserved for it (nobody else reads or writes that extent until the promotion ends).
#[derive(Clone, Copy, Debug)]
pub struct Promotion {
    pub key: BlockKey,
    pub location: Location,
    pub arena_offset: u64,
}

/// Runs `promotions` concurrently; one success flag per promotion, in order.
pub async fn promote(
    shared: Arc<Shared>,
    arena: Arc<Arena>,
    promotions: Vec<Promotion>,
) -> Vec<bool> {
    let chunk = promotions.len().div_ceil(PARALLEL_READS).max(1);
    let tasks: Vec<_> = promotions
        .chunks(chunk)
        .map(|part| {
            let part = part.to_vec();
            let (shared, arena) = (shared.clone(), arena.clone());
            let len = part.len();
            (
                len,
                tokio::task::spawn_blocking(move || promote_chunk(&shared, &arena, &part)),
            )
        })
        .collect();
    let mut done = Vec::with_capacity(promotions.len());
    for (len, task) in tasks {
        match task.await {
            Ok(flags) => done.extend(flags),
            Err(error) => {
                tracing::error!(%error, "SSD promotion task failed");
                done.extend(std::iter::repeat_n(false, len));
            }
        }
    }
    done
}

fn promote_chunk(shared: &Shared, arena: &Arena, promotions: &[Promotion]) -> Vec<bool> {
    let mut files: HashMap<SegmentId, Option<File>> = HashMap::new();
    promotions
        .iter()
        .map(|promotion| {
            let id = promotion.location.segment;
            let file = files.entry(id).or_insert_with(|| {
                segment::open_read(&shared.dir, id, shared.direct)
                    .map_err(|error| {
                        tracing::warn!(segment = %segment::segment_path(&shared.dir, id).display(), %error, "cannot open SSD segment (dropped meanwhile?); its blocks are misses");
                    })
                    .ok()
            });
            file.as_ref()
                .is_some_and(|file| promote_one(shared, arena, file, promotion))
        })
        .collect()
}

fn promote_one(shared: &Shared, arena: &Arena, file: &File, promotion: &Promotion) -> bool {
    let metrics = &shared.metrics;
    let entry = &promotion.location.entry;
    let path = segment::segment_path(&shared.dir, promotion.location.segment);
    let started = Instant::now();
    let record = match segment::read_record(file, entry) {
        Ok(Ok(record)) => record,
        Ok(Err(error)) => {
            metrics.ssd_checksum_failures_total.inc();
            shared.catalog().remove_key(&promotion.key);
            shared.events.removed(Medium::Ssd, &[promotion.key]);
            shared.publish();
            tracing::error!(
                segment = %path.display(),
                offset = entry.offset,
                key = %hex::encode(promotion.key),
                %error,
                "corrupt SSD page: checksum failed; the block is a miss, the rest of the segment is still served"
            );
            return false;
        }
        Err(error) => {
            metrics.ssd_read_errors_total.inc();
            tracing::warn!(segment = %path.display(), offset = entry.offset, %error, "SSD read failed; the block is a miss");
            return false;
        }
    };
    if let Err(error) = arena.write(
        promotion.arena_offset,
        segment::record_data(&record, entry.len),
    ) {
        tracing::error!(%error, "cannot copy a promoted page into the arena");
        return false;
    }
    metrics.ssd_reads_total.inc();
    metrics.ssd_read_bytes_total.inc_by(entry.len);
    metrics
        .ssd_read_seconds_total
        .inc_by(started.elapsed().as_secs_f64());
    true
}
