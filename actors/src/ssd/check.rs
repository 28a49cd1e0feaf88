//! The offline verifier behind `pegaflow-node --check-ssd DIR`: reads every record of every
//! segment and checks it against its checksums, without changing anything on disk.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use super::manifest::Manifest;
use super::segment::{self, Contents};

/// What the check found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub segments: u64,
    /// Segments without a footer (open when the node stopped); the next start seals them.
    pub unsealed: u64,
    pub pages: u64,
    pub bytes: u64,
    /// One line per record that fails its checksums: segment, offset, reason.
    pub corrupt: Vec<String>,
    /// One line per unsealed segment whose tail is torn: dropped at the next start, not corrupt.
    pub torn: Vec<String>,
    /// One line per segment whose footer fails its checksums: its records were checked by a
    /// scan instead, and the next start writes a new footer.
    pub damaged_footers: Vec<String>,
}

impl CheckReport {
    /// No record and no footer fails its checksums.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty() && self.damaged_footers.is_empty()
    }

    /// A human-readable summary, one finding per line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for line in self
            .corrupt
            .iter()
            .chain(&self.damaged_footers)
            .chain(&self.torn)
        {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(
            out,
            "{} segments ({} unsealed), {} pages ok, {} bytes, {} corrupt pages, \
             {} damaged footers, {} torn tails",
            self.segments,
            self.unsealed,
            self.pages,
            self.bytes,
            self.corrupt.len(),
            self.damaged_footers.len(),
            self.torn.len()
        );
        out
    }
}

/// Verifies every page under `dir`.
pub fn check(dir: &Path) -> io::Result<CheckReport> {
    Manifest::load(dir)?;
    let mut report = CheckReport::default();
    for id in segment::list_segments(dir)? {
        let path = segment::segment_path(dir, id);
        let file = segment::open_read(dir, id, false)?;
        let len = file.metadata()?.len();
        report.segments += 1;
        let entries = match segment::contents(&file, len)? {
            Contents::Sealed(entries) => entries,
            Contents::Unsealed(scan) => {
                if let Some(offset) = scan.damaged_footer {
                    report.damaged_footers.push(format!(
                        "{}: damaged footer at offset {offset} (records checked by a scan); \
                         rewritten at the next start",
                        path.display()
                    ));
                } else {
                    report.unsealed += 1;
                }
                for (offset, error) in &scan.skipped {
                    report.corrupt.push(format!(
                        "{}: corrupt record at offset {offset} ({error}); dropped at the next start",
                        path.display()
                    ));
                }
                if let Some((offset, error)) = scan.stopped {
                    report.torn.push(format!(
                        "{}: torn tail at offset {offset} ({error}); dropped at the next start",
                        path.display()
                    ));
                }
                scan.entries
            }
        };
        for entry in &entries {
            match segment::read_record(&file, entry) {
                Ok(Ok(_)) => {
                    report.pages += 1;
                    report.bytes += entry.len;
                }
                Ok(Err(error)) => report.corrupt.push(format!(
                    "{}: corrupt page at offset {} (key {}): {error}",
                    path.display(),
                    entry.offset,
                    hex::encode(entry.key)
                )),
                Err(error) => report.corrupt.push(format!(
                    "{}: unreadable page at offset {}: {error}",
                    path.display(),
                    entry.offset
                )),
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::ssd::format::{encode_record, record_bytes, RecordEntry, HEADER_BYTES};

    #[test]
    fn finds_the_flipped_byte_and_counts_the_rest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = segment::create(dir.path(), 1, false).expect("create");
        let entries: Vec<RecordEntry> = (0..4u8)
            .map(|k| {
                let data = vec![k; 9000];
                let crc = crc32c::crc32c(&data);
                let offset = u64::from(k) * record_bytes(9000);
                file.write_all_at(encode_record(&[k; 32], &data, crc).as_slice(), offset)
                    .expect("write");
                RecordEntry {
                    key: [k; 32],
                    offset,
                    len: 9000,
                    crc32c: crc,
                }
            })
            .collect();
        segment::seal(&file, &entries, 4 * record_bytes(9000)).expect("seal");
        let clean = check(dir.path()).expect("check");
        assert!(clean.is_clean());
        assert_eq!((clean.segments, clean.pages), (1, 4));

        file.write_all_at(&[0xaa], entries[2].offset + HEADER_BYTES + 77)
            .expect("flip");
        let report = check(dir.path()).expect("check");
        assert!(!report.is_clean());
        assert_eq!(report.pages, 3);
        assert!(report.corrupt[0].contains(&format!("offset {}", entries[2].offset)));
        assert!(report.render().contains("1 corrupt pages"));
    }

    #[test]
    fn a_flipped_footer_byte_is_one_damaged_footer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = segment::create(dir.path(), 1, false).expect("create");
        let entries: Vec<RecordEntry> = (0..200u8)
            .map(|k| {
                let data = vec![k; 100];
                let crc = crc32c::crc32c(&data);
                let offset = u64::from(k) * record_bytes(100);
                file.write_all_at(encode_record(&[k; 32], &data, crc).as_slice(), offset)
                    .expect("write");
                RecordEntry {
                    key: [k; 32],
                    offset,
                    len: 100,
                    crc32c: crc,
                }
            })
            .collect();
        let end = 200 * record_bytes(100);
        segment::seal(&file, &entries, end).expect("seal");
        file.write_all_at(&[0x77], end + 4096 + 1).expect("flip");
        let report = check(dir.path()).expect("check");
        assert!(!report.is_clean());
        assert_eq!(report.pages, 200);
        assert!(report.corrupt.is_empty(), "{:?}", report.corrupt);
        assert_eq!(report.damaged_footers.len(), 1);
        assert!(
            report
                .render()
                .contains("0 corrupt pages, 1 damaged footers"),
            "{}",
            report.render()
        );
    }
}
