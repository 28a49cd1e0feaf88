//! Fetching side of the link: one authenticated connection per peer, reused by every fetch
//! and shared by concurrent ones.
//!
//! A [`LinkClient`] owns the connection's write half (behind an async lock, one frame at a
//! time) and a reader task that demultiplexes response frames to the fetch that asked, by
//! request id. A fetch ([`FetchInto`]) splits its keys into chunks and keeps several chunk
//! requests outstanding (pipelining), each only once it holds in-flight budget for the chunk's
//! bytes: the per-link budget ([`LinkOptions::max_inflight_bytes`]) bounds how many page
//! bytes can be on the wire or queued for a slow consumer. Every wait is bounded by the fetch's
//! deadline.
//!
//! Page bytes go where the fetch's [`PageSink`] says (the node's: its reserved pool extents):
//! the reader streams them from the socket through one small reused buffer into the sink,
//! computing the page's crc32c on the way, and only a page that arrived whole and matched its
//! checksum is reported landed. [`FetchStream`] wraps a fetch into per-page [`Bytes`].
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

use crate::error::{FrameError, LinkError, SinkError};
use crate::frame::{read_head, read_payload, write_frame, Message, PageCrc};
use crate::handshake::{self, Credentials};
use crate::link::sink::{PageBuffers, PageSink, SinkSlot, SinkWriter};
use crate::BlockKey;

const IO_BUFFER: usize = 64 * 1024;
/// Bytes of a page the reader moves at a time: small enough to stay in the core's cache from
/// the socket copy through the checksum to the sink's copy. On the 2-core dev VM, 64 and
/// 128 KiB fetched fastest; 32, 256 KiB and 1 MiB were slower (docs/fabric.md, Benchmark).
const STAGING: usize = 64 * 1024;
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

/// A page of a fetch that is in its sink, whole, and matched its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landed {
    /// Its position in the fetch's keys.
    pub index: usize,
    pub key: BlockKey,
    /// The crc32c the holder stored and the bytes were checked against; the pool stores it.
    pub crc32c: u32,
}

/// What the reader task hands to a waiting request.
enum Event {
    /// The chunk's next page is in the sink, whole and verified.
    Page {
        crc32c: u32,
    },
    /// The chunk's next page was not landed; the connection is still in step.
    Refused(Refusal),
    Done {
        served: u32,
    },
    Failed(String),
    Pong,
    Closed(String),
}

/// Why the reader did not land a page.
enum Refusal {
    /// Not the page the chunk expects next, or a page for a request that asked for none.
    OutOfOrder,
    Size {
        got: usize,
        want: u64,
    },
    Corrupt(FrameError),
    Sink(SinkError),
}

/// Who waits for a request's frames.
struct Waiter {
    events: mpsc::UnboundedSender<Event>,
    /// Where a fetch chunk's pages go; `None` for a ping.
    pages: Option<ChunkPages>,
}

/// A fetch chunk's pages, as the reader routes them.
struct ChunkPages {
    sink: Arc<dyn SinkWriter>,
    /// Fetch index of the chunk's first page.
    start: usize,
    len: usize,
    /// Pages of the chunk the reader has begun to receive.
    begun: usize,
    page_bytes: u64,
}

impl ChunkPages {
    /// Where the page the peer announced as the chunk's page `index`, `len` bytes long, goes:
    /// the sink and its fetch index, or why it is refused.
    fn claim(&mut self, index: u32, len: usize) -> Result<(Arc<dyn SinkWriter>, usize), Refusal> {
        if index as usize != self.begun || self.begun >= self.len {
            return Err(Refusal::OutOfOrder);
        }
        if len as u64 != self.page_bytes {
            return Err(Refusal::Size {
                got: len,
                want: self.page_bytes,
            });
        }
        self.begun += 1;
        Ok((Arc::clone(&self.sink), self.start + index as usize))
    }
}

type Pending = Arc<Mutex<HashMap<u64, Waiter>>>;

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
        let (request, mut events) = self.register(None);
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
    /// long, all of it before `deadline`, into `sink`.
    pub fn fetch_into<S: PageSink>(
        &self,
        keys: &[BlockKey],
        page_bytes: u64,
        deadline: Instant,
        sink: S,
    ) -> FetchInto<S> {
        let page_bytes = page_bytes.max(1);
        let per_chunk = (self.inner.max_inflight as u64 / CHUNKS_IN_FLIGHT / page_bytes).max(1);
        FetchInto {
            client: self.clone(),
            keys: keys.to_vec(),
            page_bytes,
            chunk_keys: (per_chunk as usize).min(MAX_CHUNK_KEYS),
            deadline,
            sent: 0,
            delivered: 0,
            chunks: VecDeque::new(),
            ended: false,
            sink: Arc::new(Mutex::new(Some(sink))),
        }
    }

    /// Like [`LinkClient::fetch_into`], each page in a buffer of its own (tests, tools).
    pub fn fetch(&self, keys: &[BlockKey], page_bytes: u64, deadline: Instant) -> FetchStream {
        FetchStream {
            fetch: self.fetch_into(keys, page_bytes, deadline, PageBuffers::new(page_bytes)),
        }
    }

    fn register(&self, pages: Option<ChunkPages>) -> (u64, mpsc::UnboundedReceiver<Event>) {
        let request = self.inner.next_request.fetch_add(1, Ordering::Relaxed);
        let (events, rx) = mpsc::unbounded_channel();
        lock(&self.inner.pending).insert(request, Waiter { events, pages });
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Plain maps, flags and sinks written piece by piece: a panic elsewhere cannot leave them
    // half-updated in a way that matters (a sink's unlanded page is never kept).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Demultiplexes response frames until the connection fails, then fails every waiter. Page
/// bytes are streamed into their fetch's sink through one reused staging buffer.
async fn read_loop(
    mut reader: BufReader<OwnedReadHalf>,
    addr: SocketAddr,
    pending: Pending,
    closed: Arc<Mutex<Option<String>>>,
    max_frame: u32,
) {
    let mut staging = vec![0u8; STAGING];
    let reason = loop {
        let head = match read_head(&mut reader, max_frame).await {
            Ok(Some(head)) => head,
            Ok(None) => break "peer closed the connection".to_owned(),
            Err(e) => break frame_failed(addr, e),
        };
        let (request, event) = match head.message {
            Message::Page {
                request,
                index,
                crc32c,
            } => {
                let page = PageCrc::new(index, crc32c);
                let received = receive_page(
                    &mut reader,
                    &mut staging,
                    &pending,
                    request,
                    page,
                    head.payload,
                );
                match received.await {
                    Ok(()) => continue,
                    Err(e) => break frame_failed(addr, e),
                }
            }
            Message::Done { request, served } => (request, Event::Done { served }),
            Message::Failed { request, reason } => (request, Event::Failed(reason)),
            Message::Pong { nonce } => (nonce, Event::Pong),
            other => {
                tracing::warn!(peer = %addr, message = ?other, "unexpected link message; closing the connection");
                break "unexpected message".to_owned();
            }
        };
        // A request nobody waits for any more (its fetch was dropped) is simply discarded.
        if let Some(waiter) = lock(&pending).get(&request) {
            let _ = waiter.events.send(event);
        }
    };
    *lock(&closed) = Some(reason.clone());
    for (_, waiter) in lock(&pending).drain() {
        let _ = waiter.events.send(Event::Closed(reason.clone()));
    }
}

/// Logs a frame error that ends the connection and returns the reason waiters get.
fn frame_failed(addr: SocketAddr, e: FrameError) -> String {
    if let FrameError::TooLarge { len, max } = e {
        tracing::warn!(peer = %addr, len, max, "link frame over the size limit refused; closing the connection");
    } else {
        tracing::warn!(peer = %addr, error = %e, "bad link frame; closing the connection");
    }
    e.to_string()
}

/// Streams the `len` bytes of one page from the socket into the sink of the fetch chunk that
/// asked for it, checking `page`'s crc32c on the way, and tells the fetch whether it landed.
/// A page nobody waits for (its fetch ended) or one that is refused is still read to its end,
/// so the connection stays in step; an error here (the peer died inside the page) closes it,
/// and the half-written page is never reported landed.
async fn receive_page(
    reader: &mut BufReader<OwnedReadHalf>,
    staging: &mut [u8],
    pending: &Pending,
    request: u64,
    page: PageCrc,
    len: usize,
) -> Result<(), FrameError> {
    let claimed = lock(pending).get_mut(&request).map(|waiter| {
        let target = match waiter.pages.as_mut() {
            Some(pages) => pages.claim(page.index(), len),
            None => Err(Refusal::OutOfOrder),
        };
        (waiter.events.clone(), target)
    });
    let Some((events, target)) = claimed else {
        return read_payload(reader, len, staging, |_| {}).await;
    };
    let mut landing = Landing {
        target,
        offset: 0,
        crc: page,
    };
    read_payload(reader, len, staging, |piece| landing.piece(piece)).await?;
    let _ = events.send(landing.finish());
    Ok(())
}

/// One page on its way from the socket into its sink.
struct Landing {
    /// The sink and the page's fetch index, until the page is refused.
    target: Result<(Arc<dyn SinkWriter>, usize), Refusal>,
    /// Bytes of the page written so far.
    offset: usize,
    crc: PageCrc,
}

impl Landing {
    /// Checksums the page's next bytes while they are cache-hot and writes them to the sink.
    fn piece(&mut self, bytes: &[u8]) {
        let Ok((sink, index)) = &self.target else {
            return;
        };
        self.crc.update(bytes);
        if let Err(e) = sink.write(*index, self.offset, bytes) {
            self.target = Err(Refusal::Sink(e));
        }
        self.offset += bytes.len();
    }

    /// What the fetch hears once the whole page was read.
    fn finish(self) -> Event {
        let checked = self
            .target
            .and_then(|_| self.crc.finish().map_err(Refusal::Corrupt));
        match checked {
            Ok(crc32c) => Event::Page { crc32c },
            Err(refusal) => Event::Refused(refusal),
        }
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

/// A fetch in progress into a [`PageSink`]: yields each page that landed, in key order, and
/// ends at the end of the peer's prefix. Dropping it abandons the rest; once it is dropped or
/// [`FetchInto::into_sink`] returned, the link never writes into the sink again.
pub struct FetchInto<S: PageSink> {
    client: LinkClient,
    keys: Vec<BlockKey>,
    page_bytes: u64,
    chunk_keys: usize,
    deadline: Instant,
    sent: usize,
    delivered: usize,
    chunks: VecDeque<Chunk>,
    ended: bool,
    /// Shared with the reader task, which writes pages into it; emptied when the fetch ends.
    sink: Arc<SinkSlot<S>>,
}

impl<S: PageSink> Drop for FetchInto<S> {
    fn drop(&mut self) {
        self.finish();
        // Taken under the lock the reader writes under, so no write is in progress or follows.
        drop(lock(&self.sink).take());
    }
}

impl<S: PageSink> FetchInto<S> {
    /// Pages landed so far.
    pub fn delivered(&self) -> usize {
        self.delivered
    }

    /// The next page that landed; `None` when the peer's prefix (or the key list) is
    /// exhausted. An error ends the fetch; pages landed before it remain valid, the page it
    /// was receiving does not.
    pub async fn next(&mut self) -> Option<Result<Landed, LinkError>> {
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

    /// Ends the fetch and gives its sink back; the link will not write into it again.
    pub fn into_sink(mut self) -> S {
        self.finish();
        lock(&self.sink)
            .take()
            .expect("the sink leaves its slot only here or when the fetch is dropped")
    }

    fn finish(&mut self) {
        self.ended = true;
        for chunk in self.chunks.drain(..) {
            self.client.unregister(chunk.request);
        }
    }

    async fn step(&mut self) -> Result<Option<Landed>, LinkError> {
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
                Some(Event::Page { crc32c }) => {
                    let index = chunk.start + chunk.received;
                    chunk.received += 1;
                    // Hand this page's budget back: it now belongs to the consumer.
                    let share = permits_for(self.page_bytes, self.client.inner.max_inflight);
                    if chunk.budget.num_permits() > share as usize {
                        drop(chunk.budget.split(share as usize));
                    }
                    self.delivered += 1;
                    return Ok(Some(Landed {
                        index,
                        key: self.keys[index],
                        crc32c,
                    }));
                }
                Some(Event::Refused(refusal)) => return Err(self.refused(refusal)),
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

    fn refused(&self, refusal: Refusal) -> LinkError {
        match refusal {
            Refusal::OutOfOrder => self.client.protocol("page out of order"),
            Refusal::Size { got, want } => self
                .client
                .protocol(&format!("page of {got} bytes, expected {want}")),
            Refusal::Corrupt(e) => {
                tracing::warn!(peer = %self.client.addr(), error = %e, "corrupt page from peer; fetch abandoned");
                LinkError::Frame(e)
            }
            Refusal::Sink(e) => LinkError::Sink(e),
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
            let pages = ChunkPages {
                sink: Arc::clone(&self.sink) as Arc<dyn SinkWriter>,
                start: self.sent,
                len,
                begun: 0,
                page_bytes: self.page_bytes,
            };
            let (request, events) = self.client.register(Some(pages));
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

/// A fetch whose pages are handed out as [`FetchedPage`]s, each in a buffer of its own.
pub struct FetchStream {
    fetch: FetchInto<PageBuffers>,
}

impl FetchStream {
    /// Pages delivered so far.
    pub fn delivered(&self) -> usize {
        self.fetch.delivered()
    }

    /// The next page; `None` when the peer's prefix (or the key list) is exhausted. An error
    /// ends the stream; pages delivered before it remain valid.
    pub async fn next(&mut self) -> Option<Result<FetchedPage, LinkError>> {
        let landed = match self.fetch.next().await? {
            Ok(landed) => landed,
            Err(e) => return Some(Err(e)),
        };
        let page = lock(&self.fetch.sink)
            .as_mut()
            .and_then(|buffers| buffers.take(landed));
        let missing = || SinkError(format!("landed page {} was not kept", landed.index));
        Some(page.ok_or_else(|| missing().into()))
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
