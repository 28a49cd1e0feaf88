//! Segment files: naming, opening with `O_DIRECT` where the filesystem allows it, aligned reads,
//! sealing with a footer, and reading a segment's records back (from its footer, or by scanning
//! an unsealed one up to its first torn record).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::format::{
    self, decode_entries, decode_record, decode_trailer, encode_footer, record_bytes, AlignedBuf,
    RecordEntry, ALIGN, HEADER_BYTES, TRAILER_BYTES,
};

/// Identifies a segment; ids grow, so a lower id is an older segment.
pub type SegmentId = u64;

/// The file of segment `id` under `dir`.
pub fn segment_path(dir: &Path, id: SegmentId) -> PathBuf {
    dir.join(format!("seg-{id:010}.pfs"))
}

/// The id in a segment file name, `None` for any other file.
pub fn parse_segment_name(name: &str) -> Option<SegmentId> {
    name.strip_prefix("seg-")?
        .strip_suffix(".pfs")?
        .parse()
        .ok()
}

/// Every segment file under `dir`, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<SegmentId>> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        if let Some(id) = entry?.file_name().to_str().and_then(parse_segment_name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn direct_flag(direct: bool) -> i32 {
    if direct {
        rustix::fs::OFlags::DIRECT.bits() as i32
    } else {
        0
    }
}

/// Whether files under `dir` accept `O_DIRECT`, found by writing one aligned block to a probe
/// file. tmpfs and some network filesystems refuse it (EINVAL); they get buffered I/O plus
/// `fdatasync`. Any other failure means the directory is unusable and is returned.
pub fn probe_direct(dir: &Path) -> io::Result<bool> {
    let probe = dir.join(".pegaflow-probe");
    let attempt = |direct: bool| -> io::Result<()> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(direct_flag(direct))
            .open(&probe)?;
        file.write_all_at(AlignedBuf::zeroed(ALIGN as usize).as_slice(), 0)?;
        file.sync_data()
    };
    let direct = match attempt(true) {
        Ok(()) => true,
        Err(error) if error.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
            attempt(false)?;
            false
        }
        Err(error) => return Err(error),
    };
    std::fs::remove_file(&probe)?;
    Ok(direct)
}

/// Opens segment `id` for reading.
pub fn open_read(dir: &Path, id: SegmentId, direct: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(direct_flag(direct))
        .open(segment_path(dir, id))
}

/// Creates segment `id` for appending (readable too, so a segment can be checked in place).
pub fn create(dir: &Path, id: SegmentId, direct: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(direct_flag(direct))
        .open(segment_path(dir, id))
}

/// Reads `len` bytes at `offset` (both aligned) into an aligned buffer; a short file is an
/// `UnexpectedEof` error.
pub fn read_aligned(file: &File, offset: u64, len: u64) -> io::Result<AlignedBuf> {
    let mut buf = AlignedBuf::zeroed(len as usize);
    file.read_exact_at(buf.as_mut_slice(), offset)?;
    Ok(buf)
}

/// Writes the footer of `entries` at `at` and syncs; returns the sealed segment's length.
pub fn seal(file: &File, entries: &[RecordEntry], at: u64) -> io::Result<u64> {
    let footer = encode_footer(entries, at);
    file.write_all_at(footer.as_slice(), at)?;
    file.sync_data()?;
    Ok(at + footer.len() as u64)
}

/// The records of a segment as its footer lists them; `None` when it has no valid footer.
pub fn read_footer(file: &File, file_len: u64) -> io::Result<Option<Vec<RecordEntry>>> {
    if file_len < TRAILER_BYTES || !file_len.is_multiple_of(ALIGN) {
        return Ok(None);
    }
    let tail = read_aligned(file, file_len - ALIGN, ALIGN)?;
    let trailer_bytes = &tail.as_slice()[(ALIGN - TRAILER_BYTES) as usize..];
    let Some(trailer) = decode_trailer(trailer_bytes, file_len) else {
        return Ok(None);
    };
    if trailer.entries_at % ALIGN != 0 {
        return Ok(None);
    }
    let want = trailer.count * format::ENTRY_BYTES;
    let raw = read_aligned(file, trailer.entries_at, format::align_up(want))?;
    let bytes = &raw.as_slice()[..want as usize];
    Ok(decode_entries(bytes, &trailer).ok())
}

/// What a segment holds: the records its footer lists, or, unsealed, what a scan found.
#[derive(Debug, PartialEq, Eq)]
pub enum Contents {
    Sealed(Vec<RecordEntry>),
    Unsealed(Scan),
}

/// Reads a segment's record list from its footer, scanning it when it has none.
pub fn contents(file: &File, file_len: u64) -> io::Result<Contents> {
    match read_footer(file, file_len)? {
        Some(entries) => Ok(Contents::Sealed(entries)),
        None => Ok(Contents::Unsealed(scan(file, file_len)?)),
    }
}

/// The result of scanning an unsealed segment.
#[derive(Debug, PartialEq, Eq)]
pub struct Scan {
    /// Whole, checksummed records, in file order.
    pub entries: Vec<RecordEntry>,
    /// Where the last valid record ends; what follows is torn or never written.
    pub valid_end: u64,
    /// Records skipped on the way, with their offsets: a bad data checksum under an intact
    /// header (corruption, or a write torn by a crash), or a header that does not decode.
    pub skipped: Vec<(u64, format::FormatError)>,
    /// Why the scan ended before the end of the file: a record running past it (a torn tail).
    pub stopped: Option<(u64, format::FormatError)>,
    /// Where a footer that failed its checksums starts: the unreadable bytes after the last
    /// record, up to the end of the file. One damaged footer, not one damaged record per block.
    pub damaged_footer: Option<u64>,
}

/// Reads every record of a segment that has no footer. Each record is self-checking (header
/// checksum, data checksum), so one that fails is skipped and the scan goes on: a flipped byte
/// in one record must not cost the acknowledged records after it. Where a header cannot be
/// read the next record can only start at a later alignment boundary, so the scan steps on by
/// one alignment unit; a record that runs past the end of the file ends the scan. Unreadable
/// blocks that follow each other are one damaged stretch, reported once (a record whose header
/// is damaged spans as many blocks as its data), and a damaged stretch that runs from after the
/// last record to the end of the file is the footer of a sealed segment whose footer failed its
/// checksums.
pub fn scan(file: &File, file_len: u64) -> io::Result<Scan> {
    let mut scan = Scan {
        entries: Vec::new(),
        valid_end: 0,
        skipped: Vec::new(),
        stopped: None,
        damaged_footer: None,
    };
    let mut at = 0;
    // Where the last damaged stretch ends; a damaged block there continues it.
    let mut damage_end = None;
    while at + ALIGN <= file_len {
        let first = read_aligned(file, at, ALIGN)?;
        let header = match format::decode_header(first.as_slice()) {
            Ok(header) => header,
            Err(error) => {
                if !is_blank(first.as_slice()) {
                    if damage_end != Some(at) {
                        scan.skipped.push((at, error));
                    }
                    damage_end = Some(at + ALIGN);
                }
                at += ALIGN;
                continue;
            }
        };
        let bytes = record_bytes(header.len);
        if at + bytes > file_len {
            scan.stopped = Some((at, format::FormatError::Length(header.len)));
            break;
        }
        let record = if bytes == ALIGN {
            first
        } else {
            read_aligned(file, at, bytes)?
        };
        match decode_record(record.as_slice()) {
            Ok(_) => {
                scan.entries.push(RecordEntry {
                    key: header.key,
                    offset: at,
                    len: header.len,
                    crc32c: header.crc32c,
                });
                scan.valid_end = at + bytes;
            }
            Err(error) => {
                scan.skipped.push((at, error));
                damage_end = Some(at + bytes);
            }
        }
        at += bytes;
    }
    let trailing = scan.skipped.last().filter(|(start, error)| {
        *start >= scan.valid_end
            && *error == format::FormatError::Magic
            && damage_end == Some(file_len)
    });
    if let Some(&(start, _)) = trailing {
        let last = read_aligned(file, file_len - ALIGN, ALIGN)?;
        if format::is_trailer(&last.as_slice()[(ALIGN - TRAILER_BYTES) as usize..]) {
            scan.skipped.pop();
            scan.damaged_footer = Some(start);
        }
    }
    Ok(scan)
}

/// Space preallocated or never written reads as zeros: not a record, and not damage either.
fn is_blank(block: &[u8]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Reads one record and checks it against what the index expects of it.
pub fn read_record(
    file: &File,
    entry: &RecordEntry,
) -> io::Result<Result<AlignedBuf, format::FormatError>> {
    let buf = read_aligned(file, entry.offset, record_bytes(entry.len))?;
    let checked = match decode_record(buf.as_slice()) {
        Ok((header, _)) if header.key != entry.key => Err(format::FormatError::WrongKey {
            found: hex::encode(header.key),
            expected: hex::encode(entry.key),
        }),
        Ok((header, _)) if header.len != entry.len || header.crc32c != entry.crc32c => {
            Err(format::FormatError::DataChecksum {
                stored: entry.crc32c,
                computed: header.crc32c,
            })
        }
        Ok(_) => Ok(()),
        Err(error) => Err(error),
    };
    Ok(checked.map(|()| buf))
}

/// The data bytes of a record buffer returned by [`read_record`].
pub fn record_data(buf: &AlignedBuf, len: u64) -> &[u8] {
    &buf.as_slice()[HEADER_BYTES as usize..(HEADER_BYTES + len) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ssd::format::encode_record;

    fn write_records(file: &File, count: u8) -> Vec<RecordEntry> {
        let mut at = 0;
        (0..count)
            .map(|i| {
                let data = vec![i; 3000 + usize::from(i) * 1000];
                let crc = crc32c::crc32c(&data);
                let record = encode_record(&[i; 32], &data, crc);
                file.write_all_at(record.as_slice(), at).expect("write");
                let entry = RecordEntry {
                    key: [i; 32],
                    offset: at,
                    len: data.len() as u64,
                    crc32c: crc,
                };
                at += record.len() as u64;
                entry
            })
            .collect()
    }

    #[test]
    fn scan_skips_damaged_records_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = create(dir.path(), 1, false).expect("create");
        let entries = write_records(&file, 5);
        let end = entries[4].offset + record_bytes(entries[4].len);
        let whole = scan(&file, end).expect("scan");
        assert_eq!(whole.entries, entries);
        assert_eq!((whole.valid_end, whole.stopped), (end, None));

        // Damage record 3's data: it is skipped, the records after it still count.
        let torn_at = entries[3].offset + HEADER_BYTES + 100;
        file.write_all_at(&[0xff; 50], torn_at).expect("tear");
        let torn = scan(&file, end).expect("scan");
        assert_eq!(torn.entries, [&entries[..3], &entries[4..]].concat());
        assert_eq!((torn.valid_end, &torn.stopped), (end, &None));
        assert!(matches!(
            torn.skipped.as_slice(),
            [(at, format::FormatError::DataChecksum { .. })] if *at == entries[3].offset
        ));

        // Damage record 1's header: the scan steps over it and finds the rest.
        file.write_all_at(&[0xff; 8], entries[1].offset)
            .expect("smash header");
        let smashed = scan(&file, end).expect("scan");
        assert_eq!(
            smashed.entries,
            [&entries[..1], &entries[2..3], &entries[4..]].concat()
        );

        // A file cut inside a record: the tail is torn, what precedes it stays.
        let cut = scan(&file, entries[2].offset + ALIGN).expect("scan");
        assert_eq!(cut.entries, entries[..1]);
        assert_eq!(
            cut.valid_end,
            entries[0].offset + record_bytes(entries[0].len)
        );
        assert!(cut.stopped.is_some());
    }

    /// One flipped byte in a footer used to be counted as one damaged record per footer block.
    #[test]
    fn a_damaged_footer_is_one_damaged_footer_and_its_records_are_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = create(dir.path(), 3, false).expect("create");
        let mut entries = write_records(&file, 4);
        let end = entries[3].offset + record_bytes(entries[3].len);
        // Enough entries for a footer of several blocks (each entry points at a real record).
        let many: Vec<RecordEntry> = (0..400).map(|i| entries[i % 4]).collect();
        let sealed_len = seal(&file, &many, end).expect("seal");
        assert!(sealed_len - end > 4 * ALIGN, "a multi-block footer");
        for flip in [end + 100, sealed_len - 40] {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, flip).expect("read");
            file.write_all_at(&[byte[0] ^ 0x10], flip).expect("flip");
            match contents(&file, sealed_len).expect("contents") {
                Contents::Unsealed(scan) => {
                    assert_eq!(scan.entries, entries, "flip at {flip}");
                    assert_eq!(scan.damaged_footer, Some(end), "flip at {flip}");
                    assert!(scan.skipped.is_empty(), "{:?}", scan.skipped);
                }
                other => panic!("flip at {flip}: {other:?}"),
            }
            file.write_all_at(&byte, flip).expect("restore");
        }
        // A damaged header of the last record of a segment without a footer is one damaged
        // record, however many blocks its data spans, and no footer.
        file.write_all_at(&[0xff; 8], entries[3].offset)
            .expect("smash header");
        let scan = scan(&file, end).expect("scan");
        entries.pop();
        assert_eq!(scan.entries, entries);
        assert_eq!(scan.skipped.len(), 1, "{:?}", scan.skipped);
        assert_eq!(scan.damaged_footer, None);
    }

    #[test]
    fn sealed_segments_list_their_records_in_the_footer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = create(dir.path(), 7, false).expect("create");
        let entries = write_records(&file, 4);
        let end = entries[3].offset + record_bytes(entries[3].len);
        assert_eq!(read_footer(&file, end).expect("read"), None, "unsealed");
        let sealed_len = seal(&file, &entries, end).expect("seal");
        assert_eq!(
            read_footer(&file, sealed_len).expect("read"),
            Some(entries.clone())
        );
        let record = read_record(&file, &entries[2]).expect("io").expect("valid");
        assert_eq!(record_data(&record, entries[2].len), &vec![2u8; 5000][..]);
        let wrong = RecordEntry {
            key: [9; 32],
            ..entries[2]
        };
        assert!(matches!(
            read_record(&file, &wrong).expect("io"),
            Err(format::FormatError::WrongKey { .. })
        ));
        assert_eq!(list_segments(dir.path()).expect("list"), vec![7]);
    }
}
