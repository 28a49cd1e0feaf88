//! Rebuilding the catalog when the node starts: sealed segments are read through their footers,
//! the segment that was open when the node stopped (gracefully or not) is scanned record by
//! record (a damaged record is dropped, the ones after it kept), cut after its last valid record
//! and sealed, so every run starts with only sealed segments.

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

use super::catalog::Catalog;
use super::manifest::{Manifest, SealedSegment};
use super::segment::{self, Contents, SegmentId};

/// What recovery found.
pub struct Recovered {
    pub catalog: Catalog,
    pub manifest: Manifest,
    /// Id for the next segment to create.
    pub next_segment: SegmentId,
    /// Records dropped because they failed their checksums (not counting a torn tail).
    pub damaged_records: u64,
    /// Sealed segments whose footer failed its checksums: their records were scanned instead
    /// and a new footer written.
    pub damaged_footers: u64,
}

/// Rebuilds the catalog of `dir`, sealing a segment left open and updating the manifest.
pub fn recover(dir: &Path) -> io::Result<Recovered> {
    let mut manifest = Manifest::load(dir)?;
    let ids = segment::list_segments(dir)?;
    manifest.sealed.retain(|id, _| ids.contains(id));
    let mut catalog = Catalog::default();
    let mut damaged_records = 0;
    let mut damaged_footers = 0;
    for &id in &ids {
        let path = segment::segment_path(dir, id);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let mut len = file.metadata()?.len();
        let entries = match segment::contents(&file, len)? {
            Contents::Sealed(entries) => entries,
            Contents::Unsealed(scan) => {
                if manifest.sealed.contains_key(&id) {
                    tracing::warn!(segment = %path.display(), "sealed segment has no readable footer; scanned its records");
                }
                damaged_records += scan.skipped.len() as u64;
                for (offset, error) in &scan.skipped {
                    tracing::warn!(segment = %path.display(), offset, %error, "dropped a damaged record");
                }
                if let Some(offset) = scan.damaged_footer {
                    damaged_footers += 1;
                    tracing::warn!(segment = %path.display(), offset, "footer failed its checksums; rebuilt from the records");
                }
                if let Some((offset, error)) = &scan.stopped {
                    tracing::warn!(segment = %path.display(), offset, %error, "dropped a torn tail");
                }
                if scan.entries.is_empty() {
                    std::fs::remove_file(&path)?;
                    manifest.sealed.remove(&id);
                    continue;
                }
                file.set_len(scan.valid_end)?;
                len = segment::seal(&file, &scan.entries, scan.valid_end)?;
                scan.entries
            }
        };
        catalog.add_segment(id, 0, false);
        catalog.add_records(id, &entries, len);
        catalog.seal(id, len);
        manifest.sealed.insert(
            id,
            SealedSegment {
                bytes: len,
                records: entries.len() as u64,
            },
        );
    }
    manifest.store(dir)?;
    Ok(Recovered {
        catalog,
        manifest,
        next_segment: ids.last().map_or(1, |id| id + 1),
        damaged_records,
        damaged_footers,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::ssd::format::{encode_record, record_bytes, RecordEntry, HEADER_BYTES};

    fn append(file: &std::fs::File, at: &mut u64, key: u8) -> RecordEntry {
        let data = vec![key; 6000];
        let crc = crc32c::crc32c(&data);
        let record = encode_record(&[key; 32], &data, crc);
        file.write_all_at(record.as_slice(), *at).expect("write");
        let entry = RecordEntry {
            key: [key; 32],
            offset: *at,
            len: 6000,
            crc32c: crc,
        };
        *at += record_bytes(6000);
        entry
    }

    #[test]
    fn rebuilds_from_footers_and_seals_the_open_segment_without_its_damaged_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sealed = segment::create(dir.path(), 1, false).expect("create");
        let mut at = 0;
        let first: Vec<_> = (0..3).map(|k| append(&sealed, &mut at, k)).collect();
        let sealed_len = segment::seal(&sealed, &first, at).expect("seal");
        let mut manifest = Manifest::default();
        manifest.sealed.insert(
            1,
            SealedSegment {
                bytes: sealed_len,
                records: 3,
            },
        );
        manifest.store(dir.path()).expect("manifest");

        let open = segment::create(dir.path(), 2, false).expect("create");
        let mut at = 0;
        let second: Vec<_> = (10..14).map(|k| append(&open, &mut at, k)).collect();
        open.write_all_at(&[0; 8], second[2].offset + HEADER_BYTES)
            .expect("tear record 12");

        let recovered = recover(dir.path()).expect("recover");
        let catalog = &recovered.catalog;
        assert_eq!(recovered.next_segment, 3);
        for key in [0u8, 1, 2, 10, 11, 13] {
            assert!(catalog.contains(&[key; 32]), "key {key}");
        }
        assert!(!catalog.contains(&[12; 32]), "damaged record dropped");
        assert_eq!(recovered.damaged_records, 1);
        assert_eq!(recovered.manifest.sealed.len(), 2);

        // The open segment is sealed now: a second recovery reads its footer.
        let again = recover(dir.path()).expect("recover");
        assert_eq!(again.catalog.pages(), 6);
        assert_eq!(again.catalog.used_bytes(), catalog.used_bytes());
        let file = segment::open_read(dir.path(), 2, false).expect("open");
        let len = file.metadata().expect("len").len();
        assert!(matches!(
            segment::contents(&file, len).expect("read"),
            Contents::Sealed(entries) if entries == [&second[..2], &second[3..]].concat()
        ));
    }

    #[test]
    fn an_empty_open_segment_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = segment::create(dir.path(), 5, false).expect("create");
        file.write_all_at(&[0xee; 4096], 0).expect("garbage");
        let recovered = recover(dir.path()).expect("recover");
        assert_eq!(recovered.catalog.segments(), 0);
        assert_eq!(recovered.next_segment, 6);
        assert!(segment::list_segments(dir.path()).expect("list").is_empty());
    }

    /// One flipped byte in a sealed segment's footer is one damaged footer: every record is
    /// kept, none is counted damaged, and the rewritten footer reads clean afterwards.
    #[test]
    fn a_damaged_footer_is_rebuilt_and_counted_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = segment::create(dir.path(), 1, false).expect("create");
        let mut at = 0;
        let records: Vec<_> = (0..200).map(|k| append(&file, &mut at, k)).collect();
        let sealed_len = segment::seal(&file, &records, at).expect("seal");
        assert!(sealed_len - at > 2 * 4096, "a footer of several blocks");
        file.write_all_at(&[0x5a], at + 4096 + 7).expect("flip");

        let recovered = recover(dir.path()).expect("recover");
        assert_eq!(
            (recovered.damaged_footers, recovered.damaged_records),
            (1, 0)
        );
        assert_eq!(recovered.catalog.pages(), 200);
        let again = recover(dir.path()).expect("recover");
        assert_eq!((again.damaged_footers, again.damaged_records), (0, 0));
        assert_eq!(again.catalog.pages(), 200);
    }
}
