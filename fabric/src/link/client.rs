//! Fetching side of the link: one authenticated connection per peer, reused by every fetch
//! and shared by concurrent ones.
//!
//! A [`LinkClient`] owns the connection's write half (behind an async lock, one frame at a
//! time) and a reader task that demultiplexes response frames to the fetch that asked, by
//! request id. A fetch ([`FetchStream`]) splits its keys into chunks and keeps several chunk
//! requests outstanding (pipelining), each only once it holds in-flight budget for the chunk's
//! bytes: the per-link budget ([`LinkOptions::max_inflight_bytes`]) bounds how many page
//! bytes can be on the wire or queued for a slow consumer. Every page is checked against its
//! crc32c before it is handed out, and every wait is bounded by the fetch's deadline.
//!
//! A connection that fails (peer died, frame error) is closed for good: pending fetches get
//! [`LinkError::Closed`] at once, and [`Links`] dials a fresh one next time.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{FrameError, LinkError};
use crate::frame::{read_frame, verify_page, write_frame, Message};
use crate::handshake::{self, Credentials};
use crate::BlockKey;

const IO_BUFFER: usize = 64 * 1024;
/// Most keys in one chunk request, so one request never monopolises the link.
const MAX_CHUNK_KEYS: usize = 256;
/// Chunks a fetch keeps in flight at most: enough to hide the round trip between chunks.
const CHUNKS_IN_FLIGHT: u64 = 4;

/// Link tuning.
#[derive(Clone, Debug)]
pub struct LinkOptions {
    /// Largest frame accepted or sent: a page plus its header.
    pub max_frame: u32,
    /// Page bytes one link may have requested but not yet handed to consumers.
    pub max_inflight_bytes: u32,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
}

impl Default for LinkOptions {
    fn default() -> Self {
        LinkOptions {
            // The pool's largest page (64 MiB by default) plus room for the header.
            max_frame: (64 << 20) + 4096,
            max_inflight_bytes: 256 << 20,
            connect_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(2),
        }
    }
}

/// One verified page from a peer.
#[derive(Clone, Debug)]
pub struct FetchedPage {
    pub key: BlockKey,
    pub data: Bytes,
    /// The crc32c the holder stored and the bytes were checked against; the pool stores it.
    pub crc32c: u32,
}

/// What the reader task hands to a waiting request.
enum Event {
    Page {
        index: u32,
        crc32c: u32,
        data: Bytes,
    },
    Done {
        served: u32,
    },
    Failed(String),
    Pong,
    Closed(String),
}

type Pending = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>>;

/// An authenticated connection to one peer; cheap to clone, shared by concurrent fetches.
#[derive(Clone)]
pub struct LinkClient {
    inner: Arc<ClientInner>,
}

struct ClientInner {
    addr: SocketAddr,
    peer: String,
    handshake_rtt: Duration,
    writer: tokio::sync::Mutex<BufWriter<OwnedWriteHalf>>,
    pending: Pending,
    /// Set when the connection failed; a closed client is never used again.
    closed: Arc<Mutex<Option<String>>>,
    next_request: AtomicU64,
    budget: Arc<Semaphore>,
    max_inflight: u32,
    max_frame: u32,
    reader: JoinHandle<()>,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl LinkClient {
    /// Dials `addr` and authenticates.
    pub async fn connect(
        addr: SocketAddr,
        creds: &Credentials,
        options: &LinkOptions,
    ) -> Result<LinkClient, LinkError> {
        let mut stream = tokio::time::timeout(options.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| LinkError::Connect {
                addr,
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
            })?
            .map_err(|source| LinkError::Connect { addr, source })?;
        let _ = stream.set_nodelay(true);
        let accepted = handshake::client(&mut stream, creds, options.handshake_timeout)
            .await
            .map_err(|source| {
                tracing::warn!(peer = %addr, error = %source, "link handshake failed");
                LinkError::Handshake { addr, source }
            })?;
        let (read, write) = stream.into_split();
        let pending: Pending = Arc::default();
        let closed = Arc::new(Mutex::new(None));
        let reader = tokio::spawn(read_loop(
            BufReader::with_capacity(IO_BUFFER, read),
            addr,
            Arc::clone(&pending),
            Arc::clone(&closed),
            options.max_frame,
        ));
        let max_inflight = options.max_inflight_bytes.max(1);
        tracing::debug!(peer = %addr, peer_node = accepted.peer, rtt_us = accepted.rtt.as_micros() as u64, "link connected");
        Ok(LinkClient {
            inner: Arc::new(ClientInner {
                addr,
                peer: accepted.peer,
                handshake_rtt: accepted.rtt,
                writer: tokio::sync::Mutex::new(BufWriter::with_capacity(IO_BUFFER, write)),
                pending,
                closed,
                next_request: AtomicU64::new(1),
                budget: Arc::new(Semaphore::new(max_inflight as usize)),
                max_inflight,
                max_frame: options.max_frame,
                reader,
            }),
        })
    }

    /// The peer's node id, as it proved in the handshake.
    pub fn peer(&self) -> &str {
        &self.inner.peer
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// The round trip measured during the handshake.
    pub fn handshake_rtt(&self) -> Duration {
        self.inner.handshake_rtt
    }

    /// Whether the connection has failed (the client must be replaced).
    pub fn is_closed(&self) -> bool {
        self.closed_reason().is_some()
    }

    /// Measures one round trip, for the ranking.
    pub async fn ping(&self, deadline: Instant) -> Result<Duration, LinkError> {
        let (request, mut events) = self.register();
        let start = Instant::now();
        self.send(&Message::Ping { nonce: request }).await?;
        let event = tokio::time::timeout_at(deadline, events.recv()).await;
        self.unregister(request);
        match event {
            Ok(Some(Event::Pong)) => Ok(start.elapsed()),
            Ok(Some(Event::Closed(reason))) | Ok(Some(Event::Failed(reason))) => {
                Err(self.closed_error(reason))
            }
            Ok(Some(_)) => Err(self.protocol("unexpected reply to ping")),
            Ok(None) => Err(self.closed_error("link closed".into())),
            Err(_) => Err(LinkError::Deadline { pages: 0 }),
        }
    }

    /// Starts fetching the longest prefix of `keys` the peer holds, each page `page_bytes`
    /// long, all of it before `deadline`.
    pub fn fetch(&self, keys: &[BlockKey], page_bytes: u64, deadline: Instant) -> FetchStream {
        let page_bytes = page_bytes.max(1);
        let per_chunk = (self.inner.max_inflight as u64 / CHUNKS_IN_FLIGHT / page_bytes).max(1);
        FetchStream {
            client: self.clone(),
            keys: keys.to_vec(),
            page_bytes,
            chunk_keys: (per_chunk as usize).min(MAX_CHUNK_KEYS),
            deadline,
            sent: 0,
            delivered: 0,
            chunks: VecDeque::new(),
            ended: false,
        }
    }

    fn register(&self) -> (u64, mpsc::UnboundedReceiver<Event>) {
        let request = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.inner.pending).insert(request, tx);
        (request, rx)
    }

    fn unregister(&self, request: u64) {
        lock(&self.inner.pending).remove(&request);
    }

    async fn send(&self, message: &Message) -> Result<(), LinkError> {
        if let Some(reason) = self.closed_reason() {
            return Err(self.closed_error(reason));
        }
        let mut writer = self.inner.writer.lock().await;
        let result = async {
            write_frame(&mut *writer, message, &[], self.inner.max_frame).await?;
            writer.flush().await.map_err(FrameError::from)
        }
        .await;
        result.map_err(|e| self.closed_error(format!("write failed: {e}")))
    }

    fn closed_reason(&self) -> Option<String> {
        lock(&self.inner.closed).clone()
    }

    fn closed_error(&self, reason: String) -> LinkError {
        LinkError::Closed {
            addr: self.inner.addr,
            reason,
        }
    }

    fn protocol(&self, reason: &str) -> LinkError {
        LinkError::Protocol {
            addr: self.inner.addr,
            reason: reason.to_owned(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps and flags: a panic elsewhere cannot leave them half-updated.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Demultiplexes response frames until the connection fails, then fails every waiter.
async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    addr: SocketAddr,
    pending: Pending,
    closed: Arc<Mutex<Option<String>>>,
    max_frame: u32,
) {
    let reason = loop {
        let (message, payload) = match read_frame(&mut reader, max_frame).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break "peer closed the connection".to_owned(),
            Err(e) => {
                if let FrameError::TooLarge { len, max } = e {
                    tracing::warn!(peer = %addr, len, max, "link frame over the size limit refused; closing the connection");
                } else {
                    tracing::warn!(peer = %addr, error = %e, "bad link frame; closing the connection");
                }
                break e.to_string();
            }
        };
        let (request, event) = match message {
            Message::Page {
                request,
                index,
                crc32c,
            } => (
                request,
                Event::Page {
                    index,
                    crc32c,
                    data: payload,
                },
            ),
            Message::Done { request, served } => (request, Event::Done { served }),
            Message::Failed { request, reason } => (request, Event::Failed(reason)),
            Message::Pong { nonce } => (nonce, Event::Pong),
            other => {
                tracing::warn!(peer = %addr, message = ?other, "unexpected link message; closing the connection");
                break "unexpected message".to_owned();
            }
        };
        // A request nobody waits for any more (its fetch was dropped) is simply discarded.
        if let Some(tx) = lock(&pending).get(&request) {
            let _ = tx.send(event);
        }
    };
    *lock(&closed) = Some(reason.clone());
    for (_, tx) in lock(&pending).drain() {
        let _ = tx.send(Event::Closed(reason.clone()));
    }
}

/// One chunk request in flight.
struct Chunk {
    request: u64,
    /// Index of its first key in the fetch.
    start: usize,
    len: usize,
    received: usize,
    events: mpsc::UnboundedReceiver<Event>,
    /// In-flight budget for the pages not yet delivered.
    budget: OwnedSemaphorePermit,
}

/// A fetch in progress: yields verified pages in key order, ends at the end of the peer's
/// prefix. Dropping it abandons the rest.
pub struct FetchStream {
    client: LinkClient,
    keys: Vec<BlockKey>,
    page_bytes: u64,
    chunk_keys: usize,
    deadline: Instant,
    sent: usize,
    delivered: usize,
    chunks: VecDeque<Chunk>,
    ended: bool,
}

impl Drop for FetchStream {
    fn drop(&mut self) {
        for chunk in &self.chunks {
            self.client.unregister(chunk.request);
        }
    }
}

impl FetchStream {
    /// Pages delivered so far.
    pub fn delivered(&self) -> usize {
        self.delivered
    }

    /// The next page; `None` when the peer's prefix (or the key list) is exhausted. An error
    /// ends the stream; pages delivered before it remain valid.
    pub async fn next(&mut self) -> Option<Result<FetchedPage, LinkError>> {
        if self.ended {
            return None;
        }
        let result = self.step().await;
        match result {
            Ok(Some(page)) => Some(Ok(page)),
            Ok(None) => {
                self.finish();
                None
            }
            Err(e) => {
                self.finish();
                Some(Err(e))
            }
        }
    }

    /// Collects every remaining page; on error, returns the pages delivered before it too.
    pub async fn collect(mut self) -> (Vec<FetchedPage>, Option<LinkError>) {
        let mut pages = Vec::new();
        while let Some(item) = self.next().await {
            match item {
                Ok(page) => pages.push(page),
                Err(e) => return (pages, Some(e)),
            }
        }
        (pages, None)
    }

    fn finish(&mut self) {
        self.ended = true;
        for chunk in self.chunks.drain(..) {
            self.client.unregister(chunk.request);
        }
    }

    async fn step(&mut self) -> Result<Option<FetchedPage>, LinkError> {
        loop {
            self.send_chunks().await?;
            let Some(chunk) = self.chunks.front_mut() else {
                return Ok(None);
            };
            let event = tokio::time::timeout_at(self.deadline, chunk.events.recv())
                .await
                .map_err(|_| LinkError::Deadline {
                    pages: self.delivered,
                })?;
            match event {
                Some(Event::Page {
                    index,
                    crc32c,
                    data,
                }) => {
                    if index as usize != chunk.received || chunk.received >= chunk.len {
                        return Err(self.client.protocol("page out of order"));
                    }
                    if data.len() as u64 != self.page_bytes {
                        return Err(self.client.protocol(&format!(
                            "page of {} bytes, expected {}",
                            data.len(),
                            self.page_bytes
                        )));
                    }
                    verify_page(index, &data, crc32c).inspect_err(|e| {
                        tracing::warn!(peer = %self.client.addr(), error = %e, "corrupt page from peer; fetch abandoned");
                    })?;
                    let key = self.keys[chunk.start + chunk.received];
                    chunk.received += 1;
                    // Hand this page's budget back: it now belongs to the consumer.
                    let share = permits_for(self.page_bytes, self.client.inner.max_inflight);
                    if chunk.budget.num_permits() > share as usize {
                        drop(chunk.budget.split(share as usize));
                    }
                    self.delivered += 1;
                    return Ok(Some(FetchedPage { key, data, crc32c }));
                }
                Some(Event::Done { served }) => {
                    let short = (served as usize) < chunk.len || chunk.received < chunk.len;
                    if let Some(done) = self.chunks.pop_front() {
                        self.client.unregister(done.request);
                    }
                    if short {
                        // The peer's prefix ends here; later chunks cannot continue it.
                        return Ok(None);
                    }
                }
                Some(Event::Failed(reason)) => return Err(LinkError::Remote(reason)),
                Some(Event::Pong) => return Err(self.client.protocol("pong for a fetch")),
                Some(Event::Closed(reason)) => return Err(self.client.closed_error(reason)),
                None => return Err(self.client.closed_error("link closed".into())),
            }
        }
    }

    /// Sends chunk requests while budget allows; waits for budget only when nothing is in
    /// flight, so a fetch always makes progress and never exceeds the link's budget.
    async fn send_chunks(&mut self) -> Result<(), LinkError> {
        while self.sent < self.keys.len() && (self.chunks.len() as u64) < CHUNKS_IN_FLIGHT {
            let len = self.chunk_keys.min(self.keys.len() - self.sent);
            let permits = permits_for(self.page_bytes * len as u64, self.client.inner.max_inflight);
            let budget = Arc::clone(&self.client.inner.budget);
            let permit = if self.chunks.is_empty() {
                tokio::time::timeout_at(self.deadline, budget.acquire_many_owned(permits))
                    .await
                    .map_err(|_| LinkError::Deadline {
                        pages: self.delivered,
                    })?
                    .map_err(|_| self.client.closed_error("link budget closed".into()))?
            } else {
                match budget.try_acquire_many_owned(permits) {
                    Ok(permit) => permit,
                    Err(_) => return Ok(()),
                }
            };
            let (request, events) = self.client.register();
            let keys = self.keys[self.sent..self.sent + len].to_vec();
            self.chunks.push_back(Chunk {
                request,
                start: self.sent,
                len,
                received: 0,
                events,
                budget: permit,
            });
            self.sent += len;
            self.client.send(&Message::Fetch { request, keys }).await?;
        }
        Ok(())
    }
}

/// Budget permits (bytes) for `bytes`, capped so one oversized chunk can still run alone.
fn permits_for(bytes: u64, max_inflight: u32) -> u32 {
    bytes.min(max_inflight as u64) as u32
}

/// Reused links, one per peer address.
#[derive(Clone)]
pub struct Links {
    creds: Credentials,
    options: LinkOptions,
    clients: Arc<Mutex<HashMap<SocketAddr, LinkClient>>>,
    /// Serialises dials per address so concurrent fetches share one new connection.
    dialing: Arc<Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Links {
    pub fn new(creds: Credentials, options: LinkOptions) -> Links {
        Links {
            creds,
            options,
            clients: Arc::default(),
            dialing: Arc::default(),
        }
    }

    /// A live link to `addr`, dialling one if there is none; the flag says it is new.
    pub async fn get(&self, addr: SocketAddr) -> Result<(LinkClient, bool), LinkError> {
        if let Some(client) = self.cached(addr) {
            return Ok((client, false));
        }
        let gate = Arc::clone(lock(&self.dialing).entry(addr).or_default());
        let _dialing = gate.lock().await;
        if let Some(client) = self.cached(addr) {
            return Ok((client, false));
        }
        let client = LinkClient::connect(addr, &self.creds, &self.options).await?;
        lock(&self.clients).insert(addr, client.clone());
        Ok((client, true))
    }

    /// Drops the link to `addr` (its peer left); in-flight fetches keep their clone.
    pub fn forget(&self, addr: SocketAddr) {
        lock(&self.clients).remove(&addr);
    }

    fn cached(&self, addr: SocketAddr) -> Option<LinkClient> {
        let mut clients = lock(&self.clients);
        match clients.get(&addr) {
            Some(c) if !c.is_closed() => Some(c.clone()),
            Some(_) => {
                clients.remove(&addr);
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_capped_by_the_budget() {
        assert_eq!(permits_for(10, 100), 10);
        assert_eq!(permits_for(1 << 40, 100), 100);
    }
}
