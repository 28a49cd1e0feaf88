//! The on-disk format of a segment file: records, the footer that indexes them, and the
//! aligned buffers direct I/O needs.
//!
//! ```text
//! segment = record* footer?
//! record  = header (64 B) | data (len B) | zero padding to a 4 KiB boundary
//! header  = magic "PFSSDRC1" | key (32 B) | len u64 LE | crc32c(data) u32 LE
//!         | crc32c(header bytes 0..52) u32 LE | 8 zero bytes
//! footer  = entry* | zero padding | trailer (last 64 B of the file), 4 KiB aligned in all
//! entry   = key (32 B) | record offset u64 LE | len u64 LE | crc32c(data) u32 LE
//! trailer = magic "PFSSDFT1" | entries offset u64 | count u64 | crc32c(entries) u32
//!         | crc32c(trailer bytes 0..28) u32 | zero padding
//! ```
//!
//! Every record starts and ends on a 4 KiB boundary so it can be written and read with
//! `O_DIRECT`; the header carries its own checksum so a scan of a segment that was being written
//! when the node died can tell a torn record from a whole one.

use crate::keys::{BlockKey, KEY_BYTES};

/// Alignment of every record, footer and direct-I/O buffer.
pub const ALIGN: u64 = 4096;
/// Bytes of a record header; the data follows it.
pub const HEADER_BYTES: u64 = 64;
/// Bytes of the footer trailer at the very end of a sealed segment.
pub const TRAILER_BYTES: u64 = 64;
/// Bytes of one footer entry.
pub const ENTRY_BYTES: u64 = 52;

const RECORD_MAGIC: &[u8; 8] = b"PFSSDRC1";
const FOOTER_MAGIC: &[u8; 8] = b"PFSSDFT1";

/// Rounds `bytes` up to the next multiple of [`ALIGN`].
pub fn align_up(bytes: u64) -> u64 {
    bytes.div_ceil(ALIGN) * ALIGN
}

/// Bytes a record of `len` data bytes occupies on disk.
pub fn record_bytes(len: u64) -> u64 {
    align_up(HEADER_BYTES + len)
}

/// Bytes the footer of `count` records occupies on disk.
pub fn footer_bytes(count: u64) -> u64 {
    align_up(count * ENTRY_BYTES + TRAILER_BYTES)
}

/// A zeroed byte buffer whose start is [`ALIGN`]-aligned, as `O_DIRECT` requires, built from a
/// slightly larger `Vec` so no unsafe allocation code is needed.
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// `len` zero bytes starting on an aligned address.
    pub fn zeroed(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN as usize];
        // `align_offset` of a byte pointer is always below the alignment on real targets; an
        // unaligned start would only make `O_DIRECT` fail with EINVAL, an I/O error we report.
        let start = raw
            .as_ptr()
            .align_offset(ALIGN as usize)
            .min(ALIGN as usize);
        Self { raw, start, len }
    }

    /// The buffer's bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    /// The buffer's bytes, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// What a record header says about its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub key: BlockKey,
    pub len: u64,
    pub crc32c: u32,
}

/// Where one record of a segment is and what it must contain: a footer entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordEntry {
    pub key: BlockKey,
    /// Offset of the record's header in its segment.
    pub offset: u64,
    pub len: u64,
    pub crc32c: u32,
}

/// Why bytes read from a segment are not a valid record or footer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("bad magic (not a record, or a torn write)")]
    Magic,
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("data checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    DataChecksum { stored: u32, computed: u32 },
    #[error("record claims {0} data bytes, more than the segment holds")]
    Length(u64),
    #[error("record holds key {found}, the index expected {expected}")]
    WrongKey { found: String, expected: String },
    #[error("footer entries checksum mismatch")]
    FooterChecksum,
}

/// Builds a whole record (header, data, padding) in an aligned buffer, ready to write.
pub fn encode_record(key: &BlockKey, data: &[u8], crc32c: u32) -> AlignedBuf {
    let len = data.len() as u64;
    let mut buf = AlignedBuf::zeroed(record_bytes(len) as usize);
    let bytes = buf.as_mut_slice();
    bytes[..HEADER_BYTES as usize].copy_from_slice(&encode_header(&RecordHeader {
        key: *key,
        len,
        crc32c,
    }));
    bytes[HEADER_BYTES as usize..HEADER_BYTES as usize + data.len()].copy_from_slice(data);
    buf
}

fn encode_header(header: &RecordHeader) -> [u8; HEADER_BYTES as usize] {
    let mut out = [0u8; HEADER_BYTES as usize];
    out[..8].copy_from_slice(RECORD_MAGIC);
    out[8..40].copy_from_slice(&header.key);
    out[40..48].copy_from_slice(&header.len.to_le_bytes());
    out[48..52].copy_from_slice(&header.crc32c.to_le_bytes());
    let crc = crc32c::crc32c(&out[..52]);
    out[52..56].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Parses and checks a record header (the first [`HEADER_BYTES`] of `bytes`).
pub fn decode_header(bytes: &[u8]) -> Result<RecordHeader, FormatError> {
    let header = bytes
        .get(..HEADER_BYTES as usize)
        .ok_or(FormatError::Magic)?;
    if &header[..8] != RECORD_MAGIC {
        return Err(FormatError::Magic);
    }
    if crc32c::crc32c(&header[..52]) != u32_at(header, 52) {
        return Err(FormatError::HeaderChecksum);
    }
    let mut key = [0u8; KEY_BYTES];
    key.copy_from_slice(&header[8..40]);
    Ok(RecordHeader {
        key,
        len: u64_at(header, 40),
        crc32c: u32_at(header, 48),
    })
}

/// Checks a whole record buffer (as read from disk) and returns its header and data.
pub fn decode_record(bytes: &[u8]) -> Result<(RecordHeader, &[u8]), FormatError> {
    let header = decode_header(bytes)?;
    let data = usize::try_from(header.len)
        .ok()
        .and_then(|len| bytes.get(HEADER_BYTES as usize..HEADER_BYTES as usize + len))
        .ok_or(FormatError::Length(header.len))?;
    let computed = crc32c::crc32c(data);
    if computed != header.crc32c {
        return Err(FormatError::DataChecksum {
            stored: header.crc32c,
            computed,
        });
    }
    Ok((header, data))
}

/// Builds the footer of a segment whose records are `entries`: the entries, padding, and the
/// trailer in the last [`TRAILER_BYTES`]. `at` is the offset the footer will be written at.
pub fn encode_footer(entries: &[RecordEntry], at: u64) -> AlignedBuf {
    let count = entries.len() as u64;
    let mut buf = AlignedBuf::zeroed(footer_bytes(count) as usize);
    let bytes = buf.as_mut_slice();
    for (i, entry) in entries.iter().enumerate() {
        let slot = &mut bytes[i * ENTRY_BYTES as usize..(i + 1) * ENTRY_BYTES as usize];
        slot[..32].copy_from_slice(&entry.key);
        slot[32..40].copy_from_slice(&entry.offset.to_le_bytes());
        slot[40..48].copy_from_slice(&entry.len.to_le_bytes());
        slot[48..52].copy_from_slice(&entry.crc32c.to_le_bytes());
    }
    let entries_crc = crc32c::crc32c(&bytes[..(count * ENTRY_BYTES) as usize]);
    let trailer_at = bytes.len() - TRAILER_BYTES as usize;
    let trailer = &mut bytes[trailer_at..];
    trailer[..8].copy_from_slice(FOOTER_MAGIC);
    trailer[8..16].copy_from_slice(&at.to_le_bytes());
    trailer[16..24].copy_from_slice(&count.to_le_bytes());
    trailer[24..28].copy_from_slice(&entries_crc.to_le_bytes());
    let crc = crc32c::crc32c(&trailer[..28]);
    trailer[28..32].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// What a trailer says: where the footer entries start and how many there are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub entries_at: u64,
    pub count: u64,
    entries_crc: u32,
}

/// Parses the last [`TRAILER_BYTES`] of a segment; `None` when the segment was never sealed
/// (or its footer write was torn).
pub fn decode_trailer(bytes: &[u8], file_len: u64) -> Option<Trailer> {
    if bytes.len() != TRAILER_BYTES as usize || &bytes[..8] != FOOTER_MAGIC {
        return None;
    }
    if crc32c::crc32c(&bytes[..28]) != u32_at(bytes, 28) {
        return None;
    }
    let trailer = Trailer {
        entries_at: u64_at(bytes, 8),
        count: u64_at(bytes, 16),
        entries_crc: u32_at(bytes, 24),
    };
    let fits = trailer
        .count
        .checked_mul(ENTRY_BYTES)
        .and_then(|b| b.checked_add(trailer.entries_at))
        .is_some_and(|end| end + TRAILER_BYTES <= file_len);
    fits.then_some(trailer)
}

/// Whether `bytes` (the last [`TRAILER_BYTES`] of a segment) begin like a trailer, checksums
/// aside: the segment was sealed, so damage before it is its footer's.
pub fn is_trailer(bytes: &[u8]) -> bool {
    bytes.starts_with(FOOTER_MAGIC)
}

/// Parses the footer entries a trailer points at.
pub fn decode_entries(bytes: &[u8], trailer: &Trailer) -> Result<Vec<RecordEntry>, FormatError> {
    if crc32c::crc32c(bytes) != trailer.entries_crc {
        return Err(FormatError::FooterChecksum);
    }
    Ok(bytes
        .chunks_exact(ENTRY_BYTES as usize)
        .map(|slot| {
            let mut key = [0u8; KEY_BYTES];
            key.copy_from_slice(&slot[..32]);
            RecordEntry {
                key,
                offset: u64_at(slot, 32),
                len: u64_at(slot, 40),
                crc32c: u32_at(slot, 48),
            }
        })
        .collect())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    let mut word = [0u8; 4];
    word.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_aligned() {
        let data = vec![7u8; 5000];
        let crc = crc32c::crc32c(&data);
        let record = encode_record(&[3; 32], &data, crc);
        assert_eq!(record.len() as u64, 8192);
        assert_eq!(record.as_slice().as_ptr() as usize % ALIGN as usize, 0);
        let (header, back) = decode_record(record.as_slice()).expect("valid");
        assert_eq!(
            (header.key, header.len, header.crc32c),
            ([3; 32], 5000, crc)
        );
        assert_eq!(back, &data[..]);
    }

    #[test]
    fn corruption_is_named() {
        let data = vec![1u8; 100];
        let record = encode_record(&[1; 32], &data, crc32c::crc32c(&data));
        let mut bytes = record.as_slice().to_vec();
        bytes[HEADER_BYTES as usize + 10] ^= 0x40;
        assert!(matches!(
            decode_record(&bytes),
            Err(FormatError::DataChecksum { .. })
        ));
        bytes[20] ^= 1;
        assert_eq!(decode_header(&bytes), Err(FormatError::HeaderChecksum));
        assert_eq!(decode_header(&[0u8; 64]), Err(FormatError::Magic));
    }

    #[test]
    fn footers_round_trip() {
        let entries: Vec<RecordEntry> = (0..100u8)
            .map(|i| RecordEntry {
                key: [i; 32],
                offset: u64::from(i) * 8192,
                len: 5000,
                crc32c: u32::from(i),
            })
            .collect();
        let at = 100 * 8192;
        let footer = encode_footer(&entries, at);
        let file_len = at + footer.len() as u64;
        let tail = &footer.as_slice()[footer.len() - TRAILER_BYTES as usize..];
        let trailer = decode_trailer(tail, file_len).expect("trailer");
        assert_eq!((trailer.entries_at, trailer.count), (at, 100));
        let raw = &footer.as_slice()[..100 * ENTRY_BYTES as usize];
        assert_eq!(decode_entries(raw, &trailer).expect("entries"), entries);
        let mut broken = raw.to_vec();
        broken[7] ^= 1;
        assert_eq!(
            decode_entries(&broken, &trailer),
            Err(FormatError::FooterChecksum)
        );
        assert!(decode_trailer(tail, at).is_none(), "trailer past the file");
    }
}
