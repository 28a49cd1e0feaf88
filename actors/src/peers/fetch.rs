//! Fetching a missed prefix from peers into the pool, so a load can copy it to the engine like
//! any local page.
//!
//! Pages are reserved first (a save reservation: the extents are this fetch's alone until it
//! commits). The link streams each page's bytes from the socket into its extent as they
//! arrive ([`Placement`] is the fetch's `PageSink`), checksumming them on the way, and reports
//! the pages that landed whole and verified; those are committed with the checksums their
//! holder stored. Whatever did not land (a corrupt page, one a dying peer left half written,
//! the rest after a deadline) is freed by the reservation's guard, so no page is leaked and no
//! half-written extent is ever published.

use std::sync::Arc;
use std::time::Instant;

use pegaflow_fabric::{PageSink, SinkError};
use pegaflow_gpu_dma::Arena;

use super::Peers;
use crate::context::ask;
use crate::keys::BlockKey;
use crate::pool::{Extent, PoolMsg, SaveSlot, TransferLease};
use crate::protocol::ProtoError;

/// What one fetch did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FetchSummary {
    /// Pages now in the pool, from the first key on.
    pub stored: u32,
    pub bytes: u64,
    pub false_positives: u32,
    pub failures: u32,
}

impl Peers {
    /// Fetches the longest prefix of `keys` that peers hold (pages of `page_bytes`) into the
    /// pool, within the configured fetch timeout.
    pub async fn fetch_into_pool(
        &self,
        keys: &[BlockKey],
        page_bytes: u64,
    ) -> Result<FetchSummary, ProtoError> {
        let claimed = self.remote_hits(keys) as usize;
        if claimed == 0 {
            return Ok(FetchSummary::default());
        }
        let wanted = keys[..claimed].to_vec();
        let reservation = ask(&self.pool, "pool", |reply| PoolMsg::ReserveSave {
            keys: wanted,
            page_bytes,
            reply,
        })
        .await?;
        let guard = TransferLease::new(self.pool.clone(), reservation.lease);
        let extents = leading_writes(&reservation.slots);
        if extents.is_empty() {
            return Ok(FetchSummary::default());
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.fetch_timeout;
        let wanted = &keys[..extents.len()];
        let placement = Placement {
            arena: self.arena.clone(),
            extents,
        };
        let mut crcs = Vec::with_capacity(wanted.len());
        let (_, report) = self
            .fabric
            .fetch_prefix_into(wanted, page_bytes, deadline, placement, |page| {
                crcs.push(page.crc32c)
            })
            .await;
        let lease = guard.id();
        let fetched = crcs.len();
        let stored = ask(&self.pool, "pool", |reply| PoolMsg::CommitSave {
            lease,
            crcs,
            reply,
        })
        .await?;
        let took = started.elapsed().as_secs_f64();
        tracing::debug!(
            asked = keys.len(),
            claimed,
            fetched,
            stored,
            false_positives = report.false_positives,
            failures = report.failures.len(),
            took_ms = took * 1e3,
            "fetched from peers"
        );
        let summary = FetchSummary {
            stored,
            bytes: fetched as u64 * page_bytes,
            false_positives: report.false_positives,
            failures: report.failures.len() as u32,
        };
        self.metrics.fetch_done(&summary, took);
        for (peer, pages) in &report.delivered_by {
            self.metrics
                .received_from(&peer.to_string(), *pages as u64 * page_bytes);
        }
        self.publish_rtts();
        Ok(summary)
    }
}

/// Where a fetch's pages go: page `i` into the `i`-th extent the reservation gave it.
struct Placement {
    arena: Arc<Arena>,
    extents: Vec<Extent>,
}

impl PageSink for Placement {
    fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<(), SinkError> {
        let extent = self
            .extents
            .get(index)
            .ok_or_else(|| SinkError(format!("no extent reserved for page {index}")))?;
        // The link checked each page's length against the page size asked for, which the
        // extent holds; this guards the pool against a bug elsewhere.
        let end = offset as u64 + bytes.len() as u64;
        if end > extent.len {
            return Err(SinkError(format!(
                "page {index}: {end} bytes do not fit its {}-byte extent",
                extent.len
            )));
        }
        self.arena
            .write(extent.offset + offset as u64, bytes)
            .map_err(|e| SinkError(e.to_string()))
    }
}

/// The extents of the leading keys the reservation gave this fetch to write; it stops at the
/// first key stored meanwhile or with no room, so what is fetched stays a prefix.
fn leading_writes(slots: &[SaveSlot]) -> Vec<Extent> {
    slots
        .iter()
        .map_while(|slot| match slot {
            SaveSlot::Write(extent) => Some(*extent),
            SaveSlot::Present | SaveSlot::Dropped => None,
        })
        .collect()
}
