//! The SSD tier below the pool (docs/design.md §5): blocks evicted from memory spill to append-only
//! segment files, come back (promoted) when a load needs them, and survive node restarts.
//!
//! One concept per module: [`format`] (records, footers), [`segment`] (segment files: direct
//! I/O, sealing, scanning), [`manifest`] (the list of sealed segments), [`catalog`] (key ->
//! location, space use, which segments to drop), [`recover`] (rebuilding the catalog at start),
//! [`writer`] (the thread that writes), [`reader`] (promotion), [`admission`] (what is worth
//! writing), [`check`] (the offline verifier behind `pegaflow-node --check-ssd`).
//!
//! [`SsdTier`] is the pool actor's handle. The actor never touches the disk: it copies an
//! evicted page into a staging buffer (bounded in bytes) and queues it for the writer thread;
//! promotions read on blocking threads. The catalog is shared with those threads behind a
//! mutex held only for map updates, never across I/O.

pub mod admission;
pub mod catalog;
pub mod check;
pub mod format;
pub mod manifest;
pub mod reader;
pub mod recover;
pub mod segment;
pub mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use pegaflow_config::SsdConfig;
use pegaflow_gpu_dma::Arena;
use ractor::RpcReplyPort;

use crate::events::{EventSink, Medium};
use crate::keys::BlockKey;
use crate::metrics::Metrics;
use crate::pool::PageEntry;
use admission::Admission;
use catalog::{Catalog, Location};
use reader::Promotion;
use writer::{StagedRecord, WriteJob, Writer};

/// Why the SSD tier could not start; each names `ssd.dir`.
#[derive(Debug, thiserror::Error)]
pub enum SsdError {
    #[error("ssd.dir {dir} is not a writable directory: {source}")]
    Unwritable {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("ssd.dir {dir}: cannot read the existing segments: {source}")]
    Recovery {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("ssd.dir {dir}: cannot start the SSD writer thread: {source}")]
    Thread {
        dir: PathBuf,
        source: std::io::Error,
    },
}

/// What the pool actor, the writer thread and promotion threads share.
pub struct Shared {
    pub dir: PathBuf,
    /// Whether segment files are opened with `O_DIRECT`.
    pub direct: bool,
    catalog: Mutex<Catalog>,
    /// Bytes queued for the writer and not yet written.
    pub staged_bytes: AtomicU64,
    /// Set after a write error (disk full, I/O error): spills stop, reads go on.
    pub failed: AtomicBool,
    pub metrics: Arc<Metrics>,
    /// Told every block entering or leaving the tier (KV events, medium `STORAGE`).
    pub events: EventSink,
}

impl Shared {
    /// The catalog; a panic elsewhere while it was held leaves plain map data, still usable.
    pub fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Publishes occupancy gauges.
    pub fn publish(&self) {
        let (used, pages, segments) = {
            let catalog = self.catalog();
            (catalog.used_bytes(), catalog.pages(), catalog.segments())
        };
        self.metrics.ssd_used_bytes.set(used as i64);
        self.metrics.ssd_pages.set(pages as i64);
        self.metrics.ssd_segments.set(segments as i64);
    }
}

/// The pool actor's handle on the tier. Dropping it (the pool stopping) closes the writer's
/// queue and waits for the writer to drain it and seal the open segment, so a graceful
/// shutdown leaves only sealed segments.
pub struct SsdTier {
    shared: Arc<Shared>,
    jobs: Sender<WriteJob>,
    writer: Option<JoinHandle<()>>,
    queue_limit: u64,
    admission: Admission,
    arena: Arc<Arena>,
}

impl SsdTier {
    /// Opens the tier configured by `config` (`None` when `ssd.dir` is unset): checks the
    /// directory is writable, rebuilds the catalog from what is on disk (announcing every
    /// recovered block to `events`), starts the writer.
    pub fn open(
        config: &SsdConfig,
        arena: Arc<Arena>,
        metrics: Arc<Metrics>,
        events: EventSink,
    ) -> Result<Option<SsdTier>, SsdError> {
        let Some(dir) = config.dir.clone() else {
            return Ok(None);
        };
        let unwritable = |source| SsdError::Unwritable {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(unwritable)?;
        let direct = segment::probe_direct(&dir).map_err(unwritable)?;
        if !direct {
            tracing::warn!(ssd_dir = %dir.display(), "the filesystem of ssd.dir refuses O_DIRECT (tmpfs?); using buffered I/O with fdatasync");
        }
        let started = Instant::now();
        let recovered = recover::recover(&dir).map_err(|source| SsdError::Recovery {
            dir: dir.clone(),
            source,
        })?;
        tracing::info!(
            ssd_dir = %dir.display(),
            direct,
            pages = recovered.catalog.pages(),
            segments = recovered.catalog.segments(),
            used_bytes = recovered.catalog.used_bytes(),
            cap_bytes = config.size.0,
            admission = ?config.admission,
            recovery_ms = started.elapsed().as_millis() as u64,
            "SSD tier ready"
        );
        events.stored(Medium::Ssd, &recovered.catalog.keys());
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            direct,
            catalog: Mutex::new(recovered.catalog),
            staged_bytes: AtomicU64::new(0),
            failed: AtomicBool::new(false),
            metrics,
            events,
        });
        shared.metrics.ssd_capacity_bytes.set(config.size.0 as i64);
        shared.metrics.ssd_healthy.set(1);
        shared
            .metrics
            .ssd_checksum_failures_total
            .inc_by(recovered.damaged_records + recovered.damaged_footers);
        shared.publish();
        let writer = Writer::new(
            shared.clone(),
            config.size.0,
            recovered.manifest,
            recovered.next_segment,
        );
        let (jobs, queue) = mpsc::channel();
        let writer = std::thread::Builder::new()
            .name("pegaflow-ssd-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|source| SsdError::Thread { dir, source })?;
        Ok(Some(SsdTier {
            shared,
            jobs,
            writer: Some(writer),
            queue_limit: config.queue_size.0,
            admission: Admission::new(config.admission),
            arena,
        }))
    }

    /// Whether `key` is on SSD.
    pub fn contains(&self, key: &BlockKey) -> bool {
        self.shared.catalog().contains(key)
    }

    /// Where `key` is on SSD.
    pub fn location(&self, key: &BlockKey) -> Option<Location> {
        self.shared.catalog().get(key)
    }

    /// Whether a newly stored key was refused admission before (a second sighting).
    pub fn seen_before(&mut self, key: &BlockKey) -> bool {
        self.admission.seen_before(key)
    }

    /// Offers a page being evicted: if admitted, not on SSD yet, and the staging queue has
    /// room, its bytes are copied out now (the extent is freed right after) and queued.
    pub fn spill(&mut self, key: &BlockKey, entry: &PageEntry, was_hit: bool) {
        let metrics = &self.shared.metrics;
        if self.contains(key) {
            return;
        }
        if !self.admission.admit(key, was_hit) {
            metrics.ssd_admission_rejected_total.inc();
            return;
        }
        let bytes = format::record_bytes(entry.bytes);
        let staged = &self.shared.staged_bytes;
        if self.shared.failed.load(Ordering::SeqCst)
            || staged.load(Ordering::SeqCst) + bytes > self.queue_limit
        {
            metrics.ssd_spills_dropped_total.inc();
            return;
        }
        let Some(record) = self.stage(key, entry) else {
            metrics.ssd_spills_dropped_total.inc();
            return;
        };
        staged.fetch_add(bytes, Ordering::SeqCst);
        if self.jobs.send(WriteJob::Spill(record)).is_err() {
            staged.fetch_sub(bytes, Ordering::SeqCst);
            metrics.ssd_spills_dropped_total.inc();
        }
    }

    /// Writes `pages` (in memory, not on SSD) durably, then replies `durable` plus the pages
    /// written. Unlike spills these are never dropped for a full queue: the save waits.
    pub fn persist(
        &mut self,
        pages: Vec<(BlockKey, PageEntry)>,
        durable: u32,
        reply: RpcReplyPort<u32>,
    ) {
        if pages.is_empty() || self.shared.failed.load(Ordering::SeqCst) {
            let _ = reply.send(durable);
            return;
        }
        let records: Vec<StagedRecord> = pages
            .iter()
            .filter_map(|(key, entry)| self.stage(key, entry))
            .collect();
        let bytes = records.iter().map(|r| r.buf.len() as u64).sum();
        self.shared.staged_bytes.fetch_add(bytes, Ordering::SeqCst);
        let job = WriteJob::Persist {
            records,
            durable,
            reply,
        };
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            self.shared.staged_bytes.fetch_sub(bytes, Ordering::SeqCst);
            if let WriteJob::Persist { reply, .. } = job {
                let _ = reply.send(durable);
            }
        }
    }

    /// Reads `promotions` into their arena extents concurrently, off the caller's thread.
    pub fn promote(
        &self,
        promotions: Vec<Promotion>,
    ) -> impl std::future::Future<Output = Vec<bool>> + Send + 'static {
        reader::promote(self.shared.clone(), self.arena.clone(), promotions)
    }

    /// Counts lookup hits served by this tier.
    pub fn count_hits(&self, hits: u32) {
        self.shared
            .metrics
            .ssd_lookup_hit_blocks_total
            .inc_by(u64::from(hits));
    }

    /// Copies a committed page out of the arena into an aligned record buffer.
    fn stage(&self, key: &BlockKey, entry: &PageEntry) -> Option<StagedRecord> {
        match self.arena.read(entry.extent.offset, entry.bytes) {
            Ok(data) => Some(StagedRecord {
                key: *key,
                len: entry.bytes,
                crc32c: entry.crc32c,
                buf: format::encode_record(key, data, entry.crc32c),
            }),
            Err(error) => {
                tracing::error!(%error, "cannot stage a page for the SSD");
                None
            }
        }
    }
}

impl Drop for SsdTier {
    fn drop(&mut self) {
        // Replacing the only sender closes the queue: the writer finishes what is queued,
        // seals the open segment and returns.
        drop(std::mem::replace(&mut self.jobs, mpsc::channel().0));
        if let Some(writer) = self.writer.take() {
            if writer.join().is_err() {
                tracing::error!("the SSD writer thread panicked; the next start scans its segment");
            }
        }
    }
}
