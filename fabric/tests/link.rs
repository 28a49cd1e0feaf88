//! The link against misbehaving peers: oversize frames, truncated pages, pipelining limits.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{key, page};
use pegaflow_fabric::frame::{read_frame, write_frame, Message};
use pegaflow_fabric::handshake::{self, Credentials};
use pegaflow_fabric::{LinkClient, LinkError, LinkOptions, LinkServer, MemorySource};
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
