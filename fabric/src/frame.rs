//! The link's wire format.
//!
//! A frame is `u32 LE length` followed by that many bytes: a bincode 2 encoded [`Message`]
//! header, then, for [`Message::Page`] only, the page's raw bytes up to the end of the frame.
//! Pages travel outside bincode so the sender writes them straight from its leased pool pages
//! and the receiver hands them on as one [`Bytes`] without another copy.
//!
//! Limits: a length prefix over the reader's `max_frame` is refused before any body byte is
//! read or allocated ([`FrameError::TooLarge`]); a stream that ends inside a frame is
//! [`FrameError::Truncated`]; a header that does not decode is [`FrameError::Malformed`]. Every
//! page carries the crc32c its holder computed at save time, checked by [`verify_page`] on
//! receipt, so a page corrupted in memory or on the wire is never stored.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::FrameError;
use crate::BlockKey;

/// Largest header bincode may decode: a fetch of 16k keys. Bounds what a header can make the
/// decoder allocate independently of `max_frame`.
pub const MAX_HEADER: usize = 1 << 20;

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
    let (message, used): (Message, usize) = bincode::decode_from_slice(&body, config())
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    let payload = body.freeze().slice(used..);
    if !matches!(message, Message::Page { .. }) && !payload.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after a non-page header",
            payload.len()
        )));
    }
    Ok(Some((message, payload)))
}

/// Checks a received page against the crc32c its sender stored with it.
pub fn verify_page(index: u32, data: &[u8], want: u32) -> Result<(), FrameError> {
    let got = crc32c::crc32c(data);
    if got != want {
        return Err(FrameError::Checksum { index, got, want });
    }
    Ok(())
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
        verify_page(1, &payload, crc32c).expect("intact");
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
        let wire = encode(
            &Message::Page {
                request: 1,
                index: 0,
                crc32c: 0,
            },
            &[1; 100],
        )
        .await;
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
        let err = verify_page(4, &page, crc).expect_err("corrupt");
        assert!(
            matches!(err, FrameError::Checksum { index: 4, .. }),
            "{err}"
        );
    }
}
