//! The link against misbehaving peers: oversize frames, truncated pages, pipelining limits;
//! and pages streamed in place into a caller's sink, landed only when whole and verified.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{key, page};
use pegaflow_fabric::frame::{read_frame, write_frame, Message};
use pegaflow_fabric::handshake::{self, Credentials};
use pegaflow_fabric::{
    BlockKey, FetchInto, FrameError, Landed, LinkClient, LinkError, LinkOptions, LinkServer,
    MemorySource, PageSink, SinkError,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn creds(node: &str) -> Credentials {
    Credentials::new("test", node, "secret")
}

async fn server(source: &MemorySource) -> LinkServer {
    LinkServer::bind(
        "127.0.0.1:0".parse().expect("addr"),
        creds("a"),
        Arc::new(source.clone()),
        LinkOptions::default(),
    )
    .await
    .expect("bind")
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[tokio::test]
async fn pipelined_fetch_under_a_small_budget_is_byte_exact() {
    let source = MemorySource::new();
    let keys: Vec<_> = (0..40).map(key).collect();
    for (i, k) in keys.iter().enumerate() {
        source.insert(*k, page(i as u64, 64 * 1024));
    }
    let server = server(&source).await;
    // Budget of three pages: many chunk requests, never more than three pages in flight.
    let options = LinkOptions {
        max_inflight_bytes: 3 * 64 * 1024,
        ..LinkOptions::default()
    };
    let client = LinkClient::connect(server.local_addr(), &creds("c"), &options)
        .await
        .expect("connect");
    let (pages, error) = client.fetch(&keys, 64 * 1024, soon()).collect().await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(pages.len(), 40);
    assert!(pages
        .iter()
        .enumerate()
        .all(|(i, p)| p.data == page(i as u64, 64 * 1024)));
    // The connection is reused: a second fetch and a ping on the same client.
    let (again, _) = client.fetch(&keys[..2], 64 * 1024, soon()).collect().await;
    assert_eq!(again.len(), 2);
    client.ping(soon()).await.expect("ping");
    assert_eq!(source.active_leases(), 0);
}

#[tokio::test]
async fn page_over_the_frame_limit_is_refused_and_the_link_closed() {
    let source = MemorySource::new();
    source.insert(key(0), page(0, 256 * 1024));
    let server = server(&source).await;
    let options = LinkOptions {
        max_frame: 64 * 1024,
        ..LinkOptions::default()
    };
    let client = LinkClient::connect(server.local_addr(), &creds("c"), &options)
        .await
        .expect("connect");
    let (pages, error) = client.fetch(&[key(0)], 256 * 1024, soon()).collect().await;
    assert!(pages.is_empty());
    let error = error.expect("oversize frame is an error");
    assert!(error.to_string().contains("exceeds"), "{error}");
    assert!(client.is_closed());
}

#[tokio::test]
async fn oversize_request_frame_closes_the_server_side() {
    let source = MemorySource::new();
    let server = server(&source).await;
    let mut stream = TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    handshake::client(&mut stream, &creds("c"), Duration::from_secs(2))
        .await
        .expect("handshake");
    // A length prefix of 1 GiB: refused before the body is read.
    stream
        .write_all(&(1u32 << 30).to_le_bytes())
        .await
        .expect("write");
    let reply = read_frame(&mut stream, 1 << 20).await.expect("reply frame");
    assert!(
        matches!(reply, Some((Message::Failed { ref reason, .. }, _)) if reason.contains("exceeds")),
        "{reply:?}"
    );
    let end = read_frame(&mut stream, 1 << 20).await.expect("clean close");
    assert!(end.is_none(), "the server closed the connection");
}

/// A fake holder that authenticates, then sends half of the page it announced and hangs up.
async fn truncating_peer() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else {
            return;
        };
        if handshake::server(&mut stream, &creds("liar"), Duration::from_secs(2))
            .await
            .is_err()
        {
            return;
        }
        let Ok(Some((Message::Fetch { request, .. }, _))) = read_frame(&mut stream, 1 << 20).await
        else {
            return;
        };
        let data = page(0, 4096);
        let mut wire = Vec::new();
        let header = Message::Page {
            request,
            index: 0,
            crc32c: crc32c::crc32c(&data),
        };
        write_frame(&mut wire, &header, &data, 1 << 20)
            .await
            .expect("encode");
        let _ = stream.write_all(&wire[..wire.len() / 2]).await;
    });
    addr
}

#[tokio::test]
async fn truncated_page_is_an_error_and_nothing_is_delivered() {
    let addr = truncating_peer().await;
    let client = LinkClient::connect(addr, &creds("c"), &LinkOptions::default())
        .await
        .expect("connect");
    let (pages, error) = client.fetch(&[key(0)], 4096, soon()).collect().await;
    assert!(pages.is_empty(), "a truncated page is never handed out");
    let error = error.expect("truncation is an error");
    assert!(
        matches!(error, LinkError::Closed { ref reason, .. } if reason.contains("inside a frame")),
        "{error}"
    );
}

#[tokio::test]
async fn silent_peer_hits_the_deadline() {
    let source = MemorySource::new();
    source.insert(key(0), page(0, 1024));
    source.set_delay(Duration::from_secs(30));
    let server = server(&source).await;
    let client = LinkClient::connect(server.local_addr(), &creds("c"), &LinkOptions::default())
        .await
        .expect("connect");
    let start = Instant::now();
    let (_, error) = client
        .fetch(&[key(0)], 1024, start + Duration::from_millis(200))
        .collect()
        .await;
    assert!(
        matches!(error, Some(LinkError::Deadline { pages: 0 })),
        "{error:?}"
    );
    assert!(start.elapsed() < Duration::from_millis(500));
}

/// A sink standing in for the node's pool: page `i` in the `i`-th slot of one buffer, with a
/// count of the bytes written that outlives the sink, to watch the link after a fetch ends.
struct Slots {
    bytes: Vec<u8>,
    page_bytes: usize,
    written: Arc<AtomicUsize>,
    /// Time each write takes, to keep the reader inside a page for a while.
    slow: Duration,
}

impl Slots {
    fn new(pages: usize, page_bytes: usize) -> Slots {
        Slots {
            bytes: vec![0; pages * page_bytes],
            page_bytes,
            written: Arc::default(),
            slow: Duration::ZERO,
        }
    }

    fn slot(&self, index: usize) -> &[u8] {
        &self.bytes[index * self.page_bytes..(index + 1) * self.page_bytes]
    }
}

impl PageSink for Slots {
    fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<(), SinkError> {
        std::thread::sleep(self.slow);
        let start = index * self.page_bytes + offset;
        self.bytes
            .get_mut(start..start + bytes.len())
            .ok_or_else(|| SinkError(format!("page {index} outside the slots")))?
            .copy_from_slice(bytes);
        self.written.fetch_add(bytes.len(), Ordering::SeqCst);
        Ok(())
    }
}

/// Runs `fetch` to its end: the pages that landed and the error that ended it, if any.
async fn land_all(fetch: &mut FetchInto<Slots>) -> (Vec<Landed>, Option<LinkError>) {
    let mut landed = Vec::new();
    while let Some(item) = fetch.next().await {
        match item {
            Ok(page) => landed.push(page),
            Err(e) => return (landed, Some(e)),
        }
    }
    (landed, None)
}

fn source_of(keys: &[BlockKey], page_bytes: usize) -> MemorySource {
    let source = MemorySource::new();
    for (i, k) in keys.iter().enumerate() {
        source.insert(*k, page(i as u64, page_bytes));
    }
    source
}

#[tokio::test]
async fn pages_are_streamed_in_place_into_the_sink() {
    // Pages over one staging buffer long, under a budget of three pages.
    const PAGE: usize = 100 * 1024;
    let keys: Vec<_> = (0..24).map(key).collect();
    let source = source_of(&keys, PAGE);
    let server = server(&source).await;
    let options = LinkOptions {
        max_inflight_bytes: 3 * PAGE as u32,
        ..LinkOptions::default()
    };
    let client = LinkClient::connect(server.local_addr(), &creds("c"), &options)
        .await
        .expect("connect");
    let slots = Slots::new(keys.len(), PAGE);
    let mut fetch = client.fetch_into(&keys, PAGE as u64, soon(), slots);
    let (landed, error) = land_all(&mut fetch).await;
    assert!(error.is_none(), "{error:?}");
    let slots = fetch.into_sink();
    assert_eq!(landed.len(), keys.len());
    for (i, page_landed) in landed.iter().enumerate() {
        let want = page(i as u64, PAGE);
        assert_eq!(page_landed.index, i);
        assert_eq!(page_landed.key, keys[i]);
        assert_eq!(page_landed.crc32c, crc32c::crc32c(&want));
        assert_eq!(slots.slot(i), &want[..], "page {i} in its slot");
    }
    assert_eq!(source.active_leases(), 0);
}

#[tokio::test]
async fn a_corrupt_page_is_written_in_place_but_never_landed() {
    const PAGE: usize = 8192;
    let keys: Vec<_> = (0..4).map(key).collect();
    let source = source_of(&keys, PAGE);
    let corrupt = page(2, PAGE);
    source.insert_with_crc(keys[2], corrupt.clone(), crc32c::crc32c(&corrupt) ^ 1);
    let server = server(&source).await;
    let client = LinkClient::connect(server.local_addr(), &creds("c"), &LinkOptions::default())
        .await
        .expect("connect");
    let mut fetch = client.fetch_into(&keys, PAGE as u64, soon(), Slots::new(4, PAGE));
    let (landed, error) = land_all(&mut fetch).await;
    let slots = fetch.into_sink();
    assert_eq!(
        landed.iter().map(|p| p.index).collect::<Vec<_>>(),
        vec![0, 1],
        "the pages before the corrupt one"
    );
    assert!(
        matches!(
            error,
            Some(LinkError::Frame(FrameError::Checksum { index: 2, .. }))
        ),
        "{error:?}"
    );
    assert_eq!(
        slots.slot(2),
        &corrupt[..],
        "its bytes went to its slot before the checksum failed"
    );
    // The frame was read to its end: the connection is still in step.
    assert!(!client.is_closed());
    client
        .ping(soon())
        .await
        .expect("ping after a corrupt page");
}

#[tokio::test]
async fn a_page_the_peer_died_inside_is_never_landed() {
    let addr = truncating_peer().await;
    let client = LinkClient::connect(addr, &creds("c"), &LinkOptions::default())
        .await
        .expect("connect");
    let slots = Slots::new(1, 4096);
    let written = Arc::clone(&slots.written);
    let mut fetch = client.fetch_into(&[key(0)], 4096, soon(), slots);
    let (landed, error) = land_all(&mut fetch).await;
    assert!(landed.is_empty(), "a half-written page never lands");
    assert!(
        (1..4096).contains(&written.load(Ordering::SeqCst)),
        "the part that arrived was written"
    );
    assert!(
        matches!(error, Some(LinkError::Closed { ref reason, .. }) if reason.contains("inside a frame")),
        "{error:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_link_never_writes_into_a_sink_its_fetch_gave_back() {
    const PAGE: usize = 256 * 1024;
    let keys: Vec<_> = (0..16).map(key).collect();
    let source = source_of(&keys, PAGE);
    let server = server(&source).await;
    let client = LinkClient::connect(server.local_addr(), &creds("c"), &LinkOptions::default())
        .await
        .expect("connect");
    // Given back with `into_sink` after the first page, and dropped after the first page.
    for give_back in [true, false] {
        let mut slots = Slots::new(keys.len(), PAGE);
        slots.slow = Duration::from_millis(2);
        let written = Arc::clone(&slots.written);
        let mut fetch = client.fetch_into(&keys, PAGE as u64, soon(), slots);
        let first = fetch.next().await.expect("a page").expect("lands");
        assert_eq!(first.index, 0);
        if give_back {
            drop(fetch.into_sink());
        } else {
            drop(fetch);
        }
        let at_end = written.load(Ordering::SeqCst);
        // The server answers in order: the pong comes after every page it was asked for.
        client.ping(soon()).await.expect("ping");
        assert_eq!(
            written.load(Ordering::SeqCst),
            at_end,
            "no write after the fetch ended"
        );
        assert!(at_end < keys.len() * PAGE, "the fetch was cut short");
    }
}
