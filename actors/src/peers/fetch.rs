//! Fetching a missed prefix from peers into the pool, so a load can copy it to the engine like
//! any local page.
//!
//! Pages are reserved first (a save reservation: the extents are this fetch's alone until it
//! commits), each verified page is copied into its extent as it arrives, and the pages that
//! arrived are committed with the checksums their holder stored. Whatever did not arrive is
//! freed by the reservation's guard, so a dying peer or a deadline never leaks a page.

use std::time::Instant;

use pegaflow_fabric::FetchedPage;
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
        let mut placement = Placement {
            arena: &self.arena,
            extents: &extents,
            crcs: Vec::with_capacity(extents.len()),
            broken: false,
        };
        let report = self
            .fabric
            .fetch_prefix_into(&keys[..extents.len()], page_bytes, deadline, |page| {
                placement.take(&page)
            })
            .await;
        let lease = guard.id();
        let crcs = placement.crcs;
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
        for peer in self.view() {
            if let Some(ms) = peer.rtt_ms {
                self.metrics
                    .peer_rtt(&peer.node_id, std::time::Duration::from_secs_f64(ms / 1e3));
            }
        }
        Ok(summary)
    }
}

/// Fetched pages being copied into their reserved extents, in key order.
struct Placement<'a> {
    arena: &'a Arena,
    extents: &'a [Extent],
    /// Checksums of the pages placed so far, one per leading extent.
    crcs: Vec<u32>,
    broken: bool,
}

impl Placement<'_> {
    /// Copies the next page into its extent. After a page that cannot be placed, every later
    /// page is ignored, so the committed pages stay a prefix.
    fn take(&mut self, page: &FetchedPage) {
        if self.broken {
            return;
        }
        let Some(extent) = self.extents.get(self.crcs.len()) else {
            self.broken = true;
            return;
        };
        // The link checked the length against the page size asked for; the extent holds at
        // least that, so this only guards the arena against a bug elsewhere.
        let fits = page.data.len() as u64 <= extent.len;
        match fits.then(|| self.arena.write(extent.offset, &page.data)) {
            Some(Ok(())) => self.crcs.push(page.crc32c),
            Some(Err(_)) | None => {
                tracing::error!(
                    bytes = page.data.len(),
                    extent = extent.len,
                    "cannot place a fetched page in the pool; keeping the pages before it"
                );
                self.broken = true;
            }
        }
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
