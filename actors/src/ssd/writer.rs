//! The SSD writer: one thread that appends staged records to the open segment, seals full
//! segments, drops the oldest sealed segments when the tier is over its cap, and answers
//! `persist` waiters once their records are on disk.
//!
//! Jobs queue in FIFO order; the writer takes whatever has queued up (up to [`BATCH_BYTES`])
//! and writes it with one `pwritev` per contiguous run plus one `fdatasync`, so a burst of
//! evictions costs one sync, not one per page. A record is in the catalog (visible to lookups)
//! only after its sync returned, so anything the catalog names is durable.

use std::fs::File;
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use ractor::RpcReplyPort;

use super::format::{footer_bytes, AlignedBuf, RecordEntry, ALIGN};
use super::manifest::{Manifest, SealedSegment};
use super::segment::{self, SegmentId};
use super::Shared;
use crate::events::Medium;
use crate::keys::BlockKey;

/// Most bytes one batch writes before syncing.
const BATCH_BYTES: u64 = 32 << 20;
/// Most buffers one `pwritev` takes (Linux `IOV_MAX`).
const IOV_MAX: usize = 1024;

/// A page copied out of the arena, already encoded as a record.
pub struct StagedRecord {
    pub key: BlockKey,
    pub len: u64,
    pub crc32c: u32,
    pub buf: AlignedBuf,
}

/// Work for the writer.
pub enum WriteJob {
    /// An evicted page; dropped silently if it cannot be written.
    Spill(StagedRecord),
    /// A `persist` save's pages; `reply` gets `durable` plus the records written.
    Persist {
        records: Vec<StagedRecord>,
        durable: u32,
        reply: RpcReplyPort<u32>,
    },
}

impl WriteJob {
    fn bytes(&self) -> u64 {
        match self {
            WriteJob::Spill(record) => record.buf.len() as u64,
            WriteJob::Persist { records, .. } => records.iter().map(|r| r.buf.len() as u64).sum(),
        }
    }
}

struct OpenSegment {
    id: SegmentId,
    file: File,
    len: u64,
    entries: Vec<RecordEntry>,
}

/// The writer thread's state.
pub struct Writer {
    shared: Arc<Shared>,
    cap: u64,
    segment_target: u64,
    manifest: Manifest,
    next_segment: SegmentId,
    open: Option<OpenSegment>,
}

impl Writer {
    /// A writer for a tier of `cap` bytes whose recovered state is `manifest`.
    pub fn new(shared: Arc<Shared>, cap: u64, manifest: Manifest, next_segment: SegmentId) -> Self {
        Self {
            shared,
            cap,
            segment_target: segment_target(cap),
            manifest,
            next_segment,
            open: None,
        }
    }

    /// Runs until every sender is gone, then seals the open segment.
    pub fn run(mut self, jobs: Receiver<WriteJob>) {
        while let Ok(first) = jobs.recv() {
            let mut bytes = first.bytes();
            let mut batch = vec![first];
            while bytes < BATCH_BYTES {
                match jobs.try_recv() {
                    Ok(job) => {
                        bytes += job.bytes();
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.write_batch(batch, bytes);
        }
        if let Err(error) = self.seal_open() {
            tracing::warn!(%error, "cannot seal the open SSD segment at shutdown; the next start scans it");
        }
    }

    fn write_batch(&mut self, batch: Vec<WriteJob>, staged: u64) {
        let mut records = Vec::new();
        let mut waiters = Vec::new();
        for job in batch {
            match job {
                WriteJob::Spill(record) => records.push(record),
                WriteJob::Persist {
                    records: persist,
                    durable,
                    reply,
                } => {
                    let start = records.len();
                    records.extend(persist);
                    waiters.push((reply, durable, start..records.len()));
                }
            }
        }
        let written = if self.shared.failed.load(Ordering::SeqCst) {
            vec![false; records.len()]
        } else {
            self.append(&records).unwrap_or_else(|error| {
                self.fail(&error);
                vec![false; records.len()]
            })
        };
        self.shared.staged_bytes.fetch_sub(staged, Ordering::SeqCst);
        for (reply, durable, range) in waiters {
            let count = written[range].iter().filter(|w| **w).count() as u32;
            // A save whose caller went away still wrote its pages; nobody to tell.
            let _ = reply.send(durable + count);
        }
        self.shared.publish();
    }

    /// Places every record, writing contiguous runs; returns which records are durable.
    fn append(&mut self, records: &[StagedRecord]) -> io::Result<Vec<bool>> {
        let mut written = vec![false; records.len()];
        let mut run: Vec<usize> = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let size = record.buf.len() as u64;
            if !self.fits_open(&run, records, size) {
                self.flush(&mut run, records, &mut written)?;
                self.roll()?;
            }
            if !self.fits_cap(&run, records, size) {
                self.flush(&mut run, records, &mut written)?;
                if !self.make_room(size)? {
                    tracing::warn!(
                        bytes = size,
                        cap = self.cap,
                        "a page does not fit in ssd.size; not written"
                    );
                    continue;
                }
            }
            run.push(index);
        }
        self.flush(&mut run, records, &mut written)?;
        Ok(written)
    }

    fn run_bytes(run: &[usize], records: &[StagedRecord]) -> u64 {
        run.iter().map(|&i| records[i].buf.len() as u64).sum()
    }

    /// Whether the open segment takes `size` more bytes (and its footer) within the target;
    /// an empty segment takes any record, so a page larger than the target gets its own.
    fn fits_open(&self, run: &[usize], records: &[StagedRecord], size: u64) -> bool {
        let Some(open) = &self.open else {
            return false;
        };
        if open.entries.is_empty() && run.is_empty() {
            return true;
        }
        let count = (open.entries.len() + run.len() + 1) as u64;
        open.len + Self::run_bytes(run, records) + size + footer_bytes(count) <= self.segment_target
    }

    fn fits_cap(&self, run: &[usize], records: &[StagedRecord], size: u64) -> bool {
        let footer = self.open.as_ref().map_or(ALIGN, |o| {
            footer_bytes((o.entries.len() + run.len() + 1) as u64)
        });
        self.shared.catalog().used_bytes() + Self::run_bytes(run, records) + size + footer
            <= self.cap
    }

    /// Drops the oldest sealed segments until `size` more bytes fit; false when they cannot.
    fn make_room(&mut self, size: u64) -> io::Result<bool> {
        let footer = self
            .open
            .as_ref()
            .map_or(ALIGN, |o| footer_bytes(o.entries.len() as u64 + 1));
        let drops = self.shared.catalog().choose_drops(self.cap, size + footer);
        for id in drops {
            self.drop_segment(id)?;
        }
        Ok(self.shared.catalog().used_bytes() + size + footer <= self.cap)
    }

    fn drop_segment(&mut self, id: SegmentId) -> io::Result<()> {
        let dropped = self.shared.catalog().drop_segment(id);
        self.shared.events.removed(Medium::Ssd, &dropped);
        self.manifest.sealed.remove(&id);
        self.manifest.store(&self.shared.dir)?;
        let path = segment::segment_path(&self.shared.dir, id);
        if let Err(error) = std::fs::remove_file(&path) {
            tracing::warn!(segment = %path.display(), %error, "cannot remove a dropped segment");
        }
        self.shared.metrics.ssd_segments_dropped_total.inc();
        tracing::info!(segment = %path.display(), "dropped the oldest SSD segment to stay under ssd.size");
        Ok(())
    }

    /// Writes the run at the end of the open segment, syncs, and publishes its records.
    fn flush(
        &mut self,
        run: &mut Vec<usize>,
        records: &[StagedRecord],
        written: &mut [bool],
    ) -> io::Result<()> {
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        if run.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let bufs: Vec<&[u8]> = run.iter().map(|&i| records[i].buf.as_slice()).collect();
        write_all_vectored_at(&open.file, &bufs, open.len)?;
        open.file.sync_data()?;
        let mut entries = Vec::with_capacity(run.len());
        let mut bytes = 0;
        for &i in run.iter() {
            let record = &records[i];
            entries.push(RecordEntry {
                key: record.key,
                offset: open.len + bytes,
                len: record.len,
                crc32c: record.crc32c,
            });
            bytes += record.buf.len() as u64;
            written[i] = true;
        }
        open.len += bytes;
        self.shared
            .catalog()
            .add_records(open.id, &entries, open.len);
        let keys: Vec<BlockKey> = entries.iter().map(|entry| entry.key).collect();
        self.shared.events.stored(Medium::Ssd, &keys);
        open.entries.extend(entries);
        let metrics = &self.shared.metrics;
        metrics.ssd_writes_total.inc_by(run.len() as u64);
        metrics.ssd_write_bytes_total.inc_by(bytes);
        metrics
            .ssd_write_seconds_total
            .inc_by(started.elapsed().as_secs_f64());
        run.clear();
        Ok(())
    }

    /// Seals the open segment (if any) and opens a new one.
    fn roll(&mut self) -> io::Result<()> {
        self.seal_open()?;
        let id = self.next_segment;
        self.next_segment += 1;
        let file = segment::create(&self.shared.dir, id, self.shared.direct)?;
        self.shared.catalog().add_segment(id, 0, false);
        self.open = Some(OpenSegment {
            id,
            file,
            len: 0,
            entries: Vec::new(),
        });
        Ok(())
    }

    fn seal_open(&mut self) -> io::Result<()> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        if open.entries.is_empty() {
            self.shared.catalog().drop_segment(open.id);
            drop(open.file);
            return std::fs::remove_file(segment::segment_path(&self.shared.dir, open.id));
        }
        let len = segment::seal(&open.file, &open.entries, open.len)?;
        self.shared.catalog().seal(open.id, len);
        self.manifest.sealed.insert(
            open.id,
            SealedSegment {
                bytes: len,
                records: open.entries.len() as u64,
            },
        );
        self.manifest.store(&self.shared.dir)
    }

    fn fail(&mut self, error: &io::Error) {
        self.shared.failed.store(true, Ordering::SeqCst);
        self.shared.metrics.ssd_write_errors_total.inc();
        self.shared.metrics.ssd_healthy.set(0);
        // The open segment may end in a partial record; the next start scans and cuts it.
        self.open = None;
        let dir = self.shared.dir.display();
        if error.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            tracing::error!(ssd_dir = %dir, %error, "ssd.dir is full (ENOSPC): SSD spills stop; the node keeps serving from memory");
        } else {
            tracing::error!(ssd_dir = %dir, %error, "SSD write failed: SSD spills stop; the node keeps serving from memory");
        }
    }
}

/// Segment size: an eighth of the cap, so dropping the oldest frees a useful amount without
/// throwing away too much, within 1 MiB and 256 MiB.
fn segment_target(cap: u64) -> u64 {
    (cap / 8).clamp(1 << 20, 256 << 20) / ALIGN * ALIGN
}

/// `pwritev` until every buffer is written, resuming after short writes.
fn write_all_vectored_at(file: &File, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
    let mut pending: Vec<&[u8]> = bufs.to_vec();
    let mut first = 0;
    while first < pending.len() {
        let iov: Vec<IoSlice<'_>> = pending[first..]
            .iter()
            .take(IOV_MAX)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut done = match rustix::io::pwritev(file, &iov, offset) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(done) => done,
            Err(rustix::io::Errno::INTR) => continue,
            Err(errno) => return Err(errno.into()),
        };
        offset += done as u64;
        while done > 0 {
            let head = pending[first];
            if done >= head.len() {
                done -= head.len();
                first += 1;
            } else {
                pending[first] = &head[done..];
                done = 0;
            }
        }
    }
    Ok(())
}
