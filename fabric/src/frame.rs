//! The link's wire format.
//!
//! A frame is `u32 LE length` followed by that many bytes: a bincode 2 encoded [`Message`]
//! header, then, for [`Message::Page`] only, the page's raw bytes up to the end of the frame.
//! Pages travel outside bincode so the sender writes them straight from its leased pool pages
//! and the receiver can stream them where they belong: [`read_head`] decodes a header and
//! leaves the page bytes on the stream, [`read_payload`] then passes them on piece by piece
//! through one small reused buffer. [`read_frame`] reads a whole frame at once (handshake,
//! requests, tests).
//!
//! Limits: a length prefix over the reader's `max_frame` is refused before any body byte is
//! read or allocated ([`FrameError::TooLarge`]); a stream that ends inside a frame is
//! [`FrameError::Truncated`]; a header that does not decode is [`FrameError::Malformed`]. Every
//! page carries the crc32c its holder computed at save time, checked with a [`PageCrc`] as the
//! bytes arrive, so a page corrupted in memory or on the wire is never stored.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bincode::error::DecodeError;
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt,
};

use crate::error::FrameError;
use crate::BlockKey;

/// Largest header bincode may decode: a fetch of 16k keys. Bounds what a header can make the
/// decoder allocate independently of `max_frame`.
pub const MAX_HEADER: usize = 1 << 20;

/// Bytes [`read_head`] first tries to decode a header from: a whole page header (at most 20
/// bytes), without copying much of the page after it.
const HEAD_PROBE: usize = 64;

type Config = Configuration<LittleEndian, Varint, Limit<MAX_HEADER>>;

fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_HEADER>()
}

/// Link message headers, in both directions.
#[derive(Clone, Debug, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub enum Message {
    /// Client → server, first frame: who I am, and a fresh nonce the server must prove on.
    Hello {
        version: u16,
        cluster_id: String,
        node_id: String,
        nonce: [u8; 32],
    },
    /// Server → client: its own nonce and its proof of the secret over both nonces.
    Challenge { nonce: [u8; 32], proof: [u8; 32] },
    /// Client → server: the client's proof over both nonces.
    Auth { proof: [u8; 32] },
    /// Server → client: authenticated.
    Welcome { node_id: String },
    /// Either side, then it closes: why the link is refused.
    Refused { reason: String },
    /// Client → server: send the pages of the longest held prefix of `keys`.
    Fetch { request: u64, keys: Vec<BlockKey> },
    /// Server → client: page `index` of request `request`; its bytes follow this header.
    Page {
        request: u64,
        index: u32,
        crc32c: u32,
    },
    /// Server → client: request finished after `served` pages (fewer than asked: the rest is
    /// not held here).
    Done { request: u64, served: u32 },
    /// Server → client: the request could not be served at all.
    Failed { request: u64, reason: String },
    /// Client → server: round-trip probe.
    Ping { nonce: u64 },
    /// Server → client: answer to [`Message::Ping`].
    Pong { nonce: u64 },
}

/// Writes one frame: `message`, then `payload` (empty except for pages).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &Message,
    payload: &[u8],
    max_frame: u32,
) -> Result<(), FrameError> {
    let header = bincode::encode_to_vec(message, config())
        .map_err(|e| FrameError::Malformed(format!("encode: {e}")))?;
    let len = header.len() as u64 + payload.len() as u64;
    if len > max_frame as u64 {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame as u64,
        });
    }
    let mut head = Vec::with_capacity(4 + header.len());
    head.extend_from_slice(&(len as u32).to_le_bytes());
    head.extend_from_slice(&header);
    writer.write_all(&head).await?;
    if !payload.is_empty() {
        writer.write_all(payload).await?;
    }
    Ok(())
}

/// Reads one frame; `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame: u32,
) -> Result<Option<(Message, Bytes)>, FrameError> {
    let Some(len) = read_len(reader, max_frame).await? else {
        return Ok(None);
    };
    let mut body = BytesMut::with_capacity(len);
    while body.len() < len {
        let want = len - body.len();
        let n = reader.read_buf(&mut (&mut body).limit(want)).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                got: body.len(),
                want: len,
            });
        }
    }
    let Some((message, used)) = decode(&body)? else {
        return Err(header_overruns_frame());
    };
    let payload = body.freeze().slice(used..);
    check_payload(&message, payload.len())?;
    Ok(Some((message, payload)))
}

/// A frame whose header is decoded and whose payload (a page's bytes) is still on the stream.
#[derive(Debug)]
pub struct FrameHead {
    pub message: Message,
    /// Payload bytes that follow on the stream; zero except for [`Message::Page`].
    pub payload: usize,
}

/// Reads one frame's header and leaves its payload on the stream for [`read_payload`], so a
/// page can be streamed to its destination instead of landing in a buffer of its own.
/// `Ok(None)` on a clean end of stream between frames.
///
/// The header has no length of its own: it is decoded from what `reader` has buffered, taking
/// [`HEAD_PROBE`] bytes first and twice as many each time the decoder needs more, and only the
/// header's bytes are consumed.
pub async fn read_head<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_frame: u32,
) -> Result<Option<FrameHead>, FrameError> {
    let Some(len) = read_len(reader, max_frame).await? else {
        return Ok(None);
    };
    let mut header = Vec::new();
    loop {
        if header.len() == len {
            return Err(header_overruns_frame());
        }
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Err(FrameError::Truncated {
                got: header.len(),
                want: len,
            });
        }
        let before = header.len();
        let take = available
            .len()
            .min(len - before)
            .min(before.max(HEAD_PROBE));
        header.extend_from_slice(&available[..take]);
        match decode(&header)? {
            Some((message, used)) => {
                // The previous attempt needed more than `before` bytes, so `used > before`.
                let rest = used.checked_sub(before).ok_or_else(header_overruns_frame)?;
                reader.consume(rest);
                let payload = len - used;
                check_payload(&message, payload)?;
                return Ok(Some(FrameHead { message, payload }));
            }
            None => reader.consume(take),
        }
    }
}

/// Reads the `len` payload bytes of the frame [`read_head`] just read, through `staging`, and
/// hands each piece to `land` as it arrives, in order. Reusing one `staging` buffer keeps the
/// bytes cache-hot between the socket copy and whatever `land` does with them, and costs no
/// allocation or page fault per page.
pub async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    len: usize,
    staging: &mut [u8],
    mut land: impl FnMut(&[u8]),
) -> Result<(), FrameError> {
    let mut got = 0;
    while got < len {
        let want = (len - got).min(staging.len());
        let n = reader.read(&mut staging[..want]).await?;
        if n == 0 {
            return Err(FrameError::Truncated { got, want: len });
        }
        land(&staging[..n]);
        got += n;
    }
    Ok(())
}

/// Reads a frame's length prefix and checks it against `max_frame`; `Ok(None)` on a clean end
/// of stream before it.
async fn read_len<R: AsyncRead + Unpin>(
    reader: &mut R,
    max_frame: u32,
) -> Result<Option<usize>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < prefix.len() {
        let n = reader.read(&mut prefix[got..]).await?;
        if n == 0 {
            return match got {
                0 => Ok(None),
                _ => Err(FrameError::Truncated { got, want: 4 }),
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(prefix) as usize;
    if len > max_frame as usize {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max: max_frame as u64,
        });
    }
    Ok(Some(len))
}

/// Decodes a header from the start of `bytes`: the message and the bytes it used, or `None`
/// when `bytes` ends inside it.
fn decode(bytes: &[u8]) -> Result<Option<(Message, usize)>, FrameError> {
    match bincode::decode_from_slice(bytes, config()) {
        Ok(decoded) => Ok(Some(decoded)),
        Err(DecodeError::UnexpectedEnd { .. }) => Ok(None),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

fn header_overruns_frame() -> FrameError {
    FrameError::Malformed("the header runs past the end of its frame".into())
}

/// Only a page carries bytes after its header.
fn check_payload(message: &Message, payload: usize) -> Result<(), FrameError> {
    if !matches!(message, Message::Page { .. }) && payload != 0 {
        return Err(FrameError::Malformed(format!(
            "{payload} trailing bytes after a non-page header"
        )));
    }
    Ok(())
}

/// A page's crc32c, computed piece by piece as its bytes arrive and then checked against the
/// one its sender stored with it.
#[derive(Clone, Copy, Debug)]
pub struct PageCrc {
    index: u32,
    want: u32,
    got: u32,
}

impl PageCrc {
    /// Starts checking page `index`, whose sender stored `want`.
    pub fn new(index: u32, want: u32) -> PageCrc {
        PageCrc {
            index,
            want,
            got: 0,
        }
    }

    /// The page's index in its request, as its header gave it.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Adds the page's next bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.got = crc32c::crc32c_append(self.got, bytes);
    }

    /// The verified checksum, or [`FrameError::Checksum`] when the bytes do not match it.
    pub fn finish(self) -> Result<u32, FrameError> {
        if self.got != self.want {
            return Err(FrameError::Checksum {
                index: self.index,
                got: self.got,
                want: self.want,
            });
        }
        Ok(self.want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: u32 = 1 << 16;

    async fn encode(message: &Message, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, message, payload, MAX)
            .await
            .expect("encode");
        out
    }

    /// One page frame of 100 bytes, for the truncation tests.
    async fn page_wire() -> Vec<u8> {
        let header = Message::Page {
            request: 1,
            index: 0,
            crc32c: 0,
        };
        encode(&header, &[1; 100]).await
    }

    #[tokio::test]
    async fn page_round_trips_with_its_payload() {
        let page = vec![7u8; 5000];
        let message = Message::Page {
            request: 3,
            index: 1,
            crc32c: crc32c::crc32c(&page),
        };
        let wire = encode(&message, &page).await;
        let (got, payload) = read_frame(&mut wire.as_slice(), MAX)
            .await
            .expect("decode")
            .expect("one frame");
        assert_eq!(got, message);
        assert_eq!(&payload[..], &page[..]);
        let Message::Page { crc32c, .. } = got else {
            unreachable!()
        };
        let mut crc = PageCrc::new(1, crc32c);
        crc.update(&payload);
        crc.finish().expect("intact");
    }

    /// Reads `wire` one frame head at a time through a reader that buffers `chunk` bytes, so
    /// headers arrive split across refills; returns each message with its streamed payload.
    async fn stream(wire: &[u8], chunk: usize) -> Result<Vec<(Message, Vec<u8>)>, FrameError> {
        let mut reader = tokio::io::BufReader::with_capacity(chunk, wire);
        let mut staging = [0u8; 7];
        let mut frames = Vec::new();
        while let Some(head) = read_head(&mut reader, MAX).await? {
            let mut payload = Vec::new();
            read_payload(&mut reader, head.payload, &mut staging, |piece| {
                payload.extend_from_slice(piece)
            })
            .await?;
            frames.push((head.message, payload));
        }
        Ok(frames)
    }

    #[tokio::test]
    async fn heads_and_streamed_payloads_round_trip_however_the_bytes_arrive() {
        let page = (0..5000u32).map(|i| i as u8).collect::<Vec<_>>();
        let header = Message::Page {
            request: 300,
            index: 70_000,
            crc32c: crc32c::crc32c(&page),
        };
        let done = Message::Done {
            request: 300,
            served: 1,
        };
        // A header far longer than the first probe, decoded in growing steps.
        let failed = Message::Failed {
            request: 301,
            reason: "no such page ".repeat(1000),
        };
        let mut wire = encode(&header, &page).await;
        wire.extend(encode(&done, &[]).await);
        wire.extend(encode(&failed, &[]).await);
        for chunk in [1, 3, 64, 1 << 16] {
            let frames = stream(&wire, chunk).await.expect("decode");
            assert_eq!(
                frames,
                vec![
                    (header.clone(), page.clone()),
                    (done.clone(), Vec::new()),
                    (failed.clone(), Vec::new())
                ],
                "buffer of {chunk} bytes"
            );
        }
    }

    #[tokio::test]
    async fn streamed_frames_refuse_what_whole_frames_refuse() {
        let wire = page_wire().await;
        // Cut in the prefix, in the header, and in the page bytes.
        for cut in [2, 6, wire.len() - 1] {
            let err = stream(&wire[..cut], 3).await.expect_err("truncated");
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
        let err = stream(&(MAX + 1).to_le_bytes(), 3)
            .await
            .expect_err("oversize");
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        let mut trailing = encode(&Message::Ping { nonce: 1 }, &[]).await;
        trailing.push(0);
        let len = (trailing.len() - 4) as u32;
        trailing[..4].copy_from_slice(&len.to_le_bytes());
        let err = stream(&trailing, 3).await.expect_err("trailing");
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
        // A frame too short for the header it starts.
        let mut short = encode(&Message::Ping { nonce: 1 << 40 }, &[]).await;
        short.truncate(6);
        short[..4].copy_from_slice(&2u32.to_le_bytes());
        let err = stream(&short, 3).await.expect_err("header past the frame");
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }

    #[tokio::test]
    async fn clean_eof_is_none() {
        assert!(read_frame(&mut [].as_slice(), MAX)
            .await
            .expect("eof")
            .is_none());
    }

    #[tokio::test]
    async fn oversize_prefix_is_refused_without_reading_the_body() {
        let wire = (MAX + 1).to_le_bytes();
        let err = read_frame(&mut wire.as_slice(), MAX)
            .await
            .expect_err("oversize");
        assert!(
            matches!(err, FrameError::TooLarge { len, .. } if len == MAX as u64 + 1),
            "{err}"
        );
        let big = vec![0u8; MAX as usize];
        let err = write_frame(&mut Vec::new(), &Message::Ping { nonce: 0 }, &big, MAX)
            .await
            .expect_err("writer refuses too");
        assert!(matches!(err, FrameError::TooLarge { .. }));
    }

    #[tokio::test]
    async fn truncated_frames_are_errors() {
        let wire = page_wire().await;
        for cut in [2, 10, wire.len() - 1] {
            let err = read_frame(&mut &wire[..cut], MAX)
                .await
                .expect_err("truncated");
            assert!(
                matches!(err, FrameError::Truncated { .. }),
                "cut at {cut}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn garbage_header_is_malformed() {
        let mut wire = 4u32.to_le_bytes().to_vec();
        wire.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        let err = read_frame(&mut wire.as_slice(), MAX)
            .await
            .expect_err("garbage");
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
        // A non-page message must not carry trailing bytes.
        let mut wire = encode(&Message::Ping { nonce: 1 }, &[]).await;
        wire.push(0);
        let len = (wire.len() - 4) as u32;
        wire[..4].copy_from_slice(&len.to_le_bytes());
        let err = read_frame(&mut wire.as_slice(), MAX)
            .await
            .expect_err("trailing");
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }

    #[test]
    fn corrupt_page_fails_its_checksum() {
        let mut page = vec![1u8; 64];
        let crc = crc32c::crc32c(&page);
        page[10] ^= 1;
        let mut check = PageCrc::new(4, crc);
        // In pieces, as the link computes it while the page arrives.
        for piece in page.chunks(24) {
            check.update(piece);
        }
        let err = check.finish().expect_err("corrupt");
        assert!(
            matches!(err, FrameError::Checksum { index: 4, .. }),
            "{err}"
        );
    }
}
