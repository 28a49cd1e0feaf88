//! Where fetched pages land: the consumer of a fetch says where each page's bytes go, and the
//! link's reader task writes them there as they come off the socket.
//!
//! The node's sink writes into the pool extents it reserved for the fetch, so after the socket
//! copy a page is copied once more, from the reader's cache-hot staging buffer into its
//! extent, with no buffer of its own; [`PageBuffers`] keeps each page as [`bytes::Bytes`] for
//! tests and tools. A page that was written but never reported landed (its checksum failed,
//! the peer died inside it, the fetch ended) must not be kept: only the fetch's landed pages
//! are whole and verified.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::BytesMut;

use crate::error::SinkError;
use crate::link::client::{lock, FetchedPage, Landed};

/// The destination of one fetch's pages, written by the link's reader task.
///
/// Pages of a fetch are numbered from 0 in the order of its keys. Each page is written in
/// pieces, in order, from offset 0 to its end; the next page may start before the fetch has
/// reported the previous one landed, and a page a failed holder left half written is written
/// again from offset 0 by the next one. An error abandons the fetch.
pub trait PageSink: Send + 'static {
    /// Stores `bytes` at byte `offset` of page `index`.
    fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<(), SinkError>;
}

/// A fetch's sink as the reader task holds it: emptied when the fetch ends, so the reader
/// never writes into a destination its owner has released (a pool extent freed and reused).
pub(crate) type SinkSlot<S> = Mutex<Option<S>>;

/// A [`SinkSlot`] with its sink's type erased, as the reader task's request table holds it.
pub(crate) trait SinkWriter: Send + Sync {
    /// Writes through to the sink while its fetch runs; discards the bytes once it has ended.
    fn write(&self, index: usize, offset: usize, bytes: &[u8]) -> Result<(), SinkError>;
}

impl<S: PageSink> SinkWriter for SinkSlot<S> {
    fn write(&self, index: usize, offset: usize, bytes: &[u8]) -> Result<(), SinkError> {
        match lock(self).as_mut() {
            Some(sink) => sink.write(index, offset, bytes),
            None => Ok(()),
        }
    }
}

/// A sink that keeps every page as its own buffer, for [`crate::Fabric::fetch_prefix`] and
/// [`crate::LinkClient::fetch`] (tests, the simulation, tools).
pub(crate) struct PageBuffers {
    page_bytes: usize,
    /// Pages written so far, by fetch index; landed ones are taken with [`PageBuffers::take`].
    pages: HashMap<usize, BytesMut>,
}

impl PageBuffers {
    pub(crate) fn new(page_bytes: u64) -> PageBuffers {
        PageBuffers {
            page_bytes: page_bytes as usize,
            pages: HashMap::new(),
        }
    }

    /// The page the fetch reported `landed`, with its bytes.
    pub(crate) fn take(&mut self, landed: Landed) -> Option<FetchedPage> {
        let data = self.pages.remove(&landed.index)?.freeze();
        Some(FetchedPage {
            key: landed.key,
            data,
            crc32c: landed.crc32c,
        })
    }
}

impl PageSink for PageBuffers {
    fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<(), SinkError> {
        let page = self
            .pages
            .entry(index)
            .or_insert_with(|| BytesMut::with_capacity(self.page_bytes));
        if offset == 0 {
            page.clear();
        }
        if page.len() != offset {
            return Err(SinkError(format!(
                "page {index}: write at offset {offset}, {} bytes written",
                page.len()
            )));
        }
        page.extend_from_slice(bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_restart_a_rewritten_page_and_refuse_gaps() {
        let mut buffers = PageBuffers::new(4);
        buffers.write(0, 0, b"ab").expect("first piece");
        buffers.write(1, 0, b"zz").expect("next page starts early");
        buffers.write(0, 2, b"cd").expect("second piece");
        assert!(buffers.write(1, 3, b"x").is_err(), "a gap is refused");
        // A new holder writes page 1 again from the start.
        buffers.write(1, 0, b"wxyz").expect("rewrite");
        let landed = |index| Landed {
            index,
            key: [index as u8; 32],
            crc32c: 0,
        };
        let data = |page: Option<FetchedPage>| page.map(|p| p.data);
        assert_eq!(data(buffers.take(landed(0))).as_deref(), Some(&b"abcd"[..]));
        assert_eq!(data(buffers.take(landed(1))).as_deref(), Some(&b"wxyz"[..]));
        assert!(buffers.take(landed(0)).is_none());
    }

    #[test]
    fn an_emptied_slot_discards_writes() {
        let slot: SinkSlot<PageBuffers> = Mutex::new(Some(PageBuffers::new(2)));
        SinkWriter::write(&slot, 0, 0, b"ab").expect("write");
        let sink = slot.lock().expect("lock").take().expect("sink");
        SinkWriter::write(&slot, 1, 0, b"cd").expect("discarded");
        assert_eq!(sink.pages.len(), 1, "page 1 never reached the sink");
        assert_eq!(sink.pages[&0][..], b"ab"[..]);
    }
}
