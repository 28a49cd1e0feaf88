//! A forwarding proxy in front of one node's fabric port, so link faults are real: the node
//! listens on one port and advertises the proxy's (`fabric.advertise`), so every peer's link
//! connections (TCP) and gossip datagrams (UDP) to it pass through here. The fault schedule
//! switches the proxy between passing traffic, dropping it (connections closed and refused,
//! datagrams discarded) and delaying it (a fixed latency added to each direction).
//!
//! What it cannot cut: the node's own outgoing traffic (its gossip rounds and its fetches from
//! peers) goes straight to the peers, so peers keep the node as a live member with its digest
//! while its link is down: the case where a fetch must fall through to another holder.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Largest chunk forwarded at once (TCP), and the largest datagram (gossip stays below 64 KiB).
const CHUNK: usize = 64 << 10;
/// Chunks queued per direction of a delayed connection before the reader waits.
const QUEUE: usize = 256;

/// What the proxy does with traffic now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LinkMode {
    /// Forward everything as it comes.
    #[default]
    Pass,
    /// Close open connections, accept and close new ones, discard datagrams.
    Drop,
    /// Forward everything, each byte `Duration` later than it arrived, in both directions.
    Delay(Duration),
}

impl LinkMode {
    fn delay(self) -> Duration {
        match self {
            LinkMode::Delay(delay) => delay,
            LinkMode::Pass | LinkMode::Drop => Duration::ZERO,
        }
    }
}

/// A running proxy; every task it started ends when it is dropped.
pub struct LinkProxy {
    public: SocketAddr,
    mode: watch::Sender<LinkMode>,
    dropped: Arc<Dropped>,
}

/// What the proxy refused while dropping, so a fault can show it really cut the link.
#[derive(Debug, Default)]
pub struct Dropped {
    pub connections: AtomicU64,
    pub datagrams: AtomicU64,
}

impl LinkProxy {
    /// Binds TCP and UDP on one free loopback port and forwards both to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let (listener, datagrams) = bind_pair()?;
        listener.set_nonblocking(true)?;
        datagrams.set_nonblocking(true)?;
        let (listener, datagrams) = (
            TcpListener::from_std(listener)?,
            UdpSocket::from_std(datagrams)?,
        );
        let public = listener.local_addr()?;
        let (mode, watcher) = watch::channel(LinkMode::Pass);
        let dropped = Arc::new(Dropped::default());
        tokio::spawn(accept_loop(
            listener,
            upstream,
            watcher.clone(),
            dropped.clone(),
        ));
        tokio::spawn(relay_datagrams(
            Arc::new(datagrams),
            upstream,
            watcher,
            dropped.clone(),
        ));
        Ok(Self {
            public,
            mode,
            dropped,
        })
    }

    /// The address peers dial: what the node advertises.
    pub fn public_addr(&self) -> SocketAddr {
        self.public
    }

    /// Switches the mode; open connections are closed at once when it becomes `Drop`.
    pub fn set(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }

    /// Connections and datagrams refused so far: `(connections, datagrams)`.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.dropped.connections.load(Ordering::Relaxed),
            self.dropped.datagrams.load(Ordering::Relaxed),
        )
    }
}

/// A TCP listener and a UDP socket bound on the same free loopback port: what a fabric
/// address needs (gossip over UDP and the link over TCP share one port number).
pub fn bind_pair() -> io::Result<(std::net::TcpListener, std::net::UdpSocket)> {
    let mut last = None;
    for _ in 0..64 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        match std::net::UdpSocket::bind(listener.local_addr()?) {
            Ok(socket) => return Ok((listener, socket)),
            Err(error) => last = Some(error),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no port free for both TCP and UDP")))
}

/// Resolves when the proxy is dropped.
async fn closed(mode: &mut watch::Receiver<LinkMode>) {
    while mode.changed().await.is_ok() {}
}

/// Resolves when the proxy is dropped or starts dropping traffic.
async fn cut(mode: &mut watch::Receiver<LinkMode>) {
    while mode.changed().await.is_ok() {
        if *mode.borrow() == LinkMode::Drop {
            return;
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mut mode: watch::Receiver<LinkMode>,
    dropped: Arc<Dropped>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = closed(&mut mode) => return,
        };
        // A failed accept (the peer gave up) leaves nothing to forward.
        let Ok((client, _)) = accepted else { continue };
        if *mode.borrow() == LinkMode::Drop {
            dropped.connections.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        tokio::spawn(forward_connection(client, upstream, mode.clone()));
    }
}

/// Forwards one connection both ways until either side closes or the link is cut.
async fn forward_connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<LinkMode>,
) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    // Latency is what the faults add; Nagle must not add its own.
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, mode.clone()) => {}
        () = pump(server_read, client_write, mode.clone()) => {}
        () = cut(&mut mode) => {}
    }
}

/// Copies one direction, each chunk released `delay` after it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: watch::Receiver<LinkMode>,
) {
    let (queue, mut due) = mpsc::channel::<(Instant, Vec<u8>)>(QUEUE);
    let reader = async move {
        let mut buffer = vec![0u8; CHUNK];
        loop {
            let n = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let at = Instant::now() + mode.borrow().delay();
            if queue.send((at, buffer[..n].to_vec())).await.is_err() {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    // Either half ending ends the connection: a closed side closes the other.
    tokio::select! {
        () = reader => {}
        () = writer => {}
    }
}

/// Relays datagrams: one upstream socket per client address, so the node's replies (sent to
/// the address a datagram came from) find their way back through the proxy.
async fn relay_datagrams(
    public: Arc<UdpSocket>,
    upstream: SocketAddr,
    mut mode: watch::Receiver<LinkMode>,
    dropped: Arc<Dropped>,
) {
    let mut clients: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let received = tokio::select! {
            received = public.recv_from(&mut buffer) => received,
            () = closed(&mut mode) => return,
        };
        // Errors here are ICMP reports about earlier sends; the socket keeps working.
        let Ok((n, client)) = received else { continue };
        let current = *mode.borrow();
        if current == LinkMode::Drop {
            dropped.datagrams.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let socket = match clients.get(&client) {
            Some(socket) => socket.clone(),
            None => match client_socket(&public, client, upstream, &mode).await {
                Ok(socket) => clients.entry(client).or_insert(socket).clone(),
                Err(_) => continue,
            },
        };
        send_later(socket, None, buffer[..n].to_vec(), current.delay());
    }
}

/// The upstream socket for `client`, with a task relaying the node's replies back to it.
async fn client_socket(
    public: &Arc<UdpSocket>,
    client: SocketAddr,
    upstream: SocketAddr,
    mode: &watch::Receiver<LinkMode>,
) -> io::Result<Arc<UdpSocket>> {
    let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    socket.connect(upstream).await?;
    tokio::spawn(relay_replies(
        socket.clone(),
        public.clone(),
        client,
        mode.clone(),
    ));
    Ok(socket)
}

async fn relay_replies(
    upstream: Arc<UdpSocket>,
    public: Arc<UdpSocket>,
    client: SocketAddr,
    mut mode: watch::Receiver<LinkMode>,
) {
    let mut buffer = vec![0u8; CHUNK];
    loop {
        let received = tokio::select! {
            received = upstream.recv(&mut buffer) => received,
            () = closed(&mut mode) => return,
        };
        // A refused send while the node restarts reports here; later datagrams still flow.
        let Ok(n) = received else { continue };
        let current = *mode.borrow();
        if current != LinkMode::Drop {
            send_later(
                public.clone(),
                Some(client),
                buffer[..n].to_vec(),
                current.delay(),
            );
        }
    }
}

/// Sends a datagram now, or from a task `delay` from now (gossip tolerates reordering).
fn send_later(socket: Arc<UdpSocket>, to: Option<SocketAddr>, bytes: Vec<u8>, delay: Duration) {
    let send = async move {
        tokio::time::sleep(delay).await;
        // UDP: a lost datagram is the protocol's to handle.
        let _ = match to {
            Some(to) => socket.send_to(&bytes, to).await,
            None => socket.send(&bytes).await,
        };
    };
    tokio::spawn(send);
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    async fn serve_echo(listener: TcpListener) {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 || stream.write_all(&buffer[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    }

    async fn round_trip(stream: &mut TcpStream, text: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(text).await?;
        let mut back = vec![0u8; text.len()];
        stream.read_exact(&mut back).await?;
        Ok(back)
    }

    #[tokio::test]
    async fn passes_delays_and_drops_tcp() {
        let (listener, upstream) = echo_server().await;
        tokio::spawn(serve_echo(listener));
        let proxy = LinkProxy::start(upstream).await.expect("proxy");
        let mut stream = TcpStream::connect(proxy.public_addr())
            .await
            .expect("connect");
        assert_eq!(
            round_trip(&mut stream, b"hello").await.expect("echo"),
            b"hello"
        );

        proxy.set(LinkMode::Delay(Duration::from_millis(100)));
        let started = Instant::now();
        assert_eq!(
            round_trip(&mut stream, b"late").await.expect("echo"),
            b"late"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "both directions are delayed"
        );

        proxy.set(LinkMode::Drop);
        let mut byte = [0u8; 1];
        assert!(
            matches!(stream.read(&mut byte).await, Ok(0) | Err(_)),
            "an open connection is closed"
        );
        let mut fresh = TcpStream::connect(proxy.public_addr())
            .await
            .expect("accepted");
        assert!(
            round_trip(&mut fresh, b"x").await.is_err(),
            "a new connection is closed at once"
        );
        assert_eq!(proxy.dropped().0, 1);

        proxy.set(LinkMode::Pass);
        let mut again = TcpStream::connect(proxy.public_addr())
            .await
            .expect("connect");
        assert_eq!(
            round_trip(&mut again, b"back").await.expect("echo"),
            b"back"
        );
    }

    #[tokio::test]
    async fn relays_datagrams_and_replies_unless_dropping() {
        let server = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let upstream = server.local_addr().expect("addr");
        let proxy = LinkProxy::start(upstream).await.expect("proxy");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        client.connect(proxy.public_addr()).await.expect("connect");
        let mut buffer = [0u8; 16];

        client.send(b"syn").await.expect("send");
        let (n, from) = server.recv_from(&mut buffer).await.expect("relayed");
        assert_eq!(&buffer[..n], b"syn");
        server.send_to(b"ack", from).await.expect("reply");
        let n = client.recv(&mut buffer).await.expect("reply relayed");
        assert_eq!(&buffer[..n], b"ack");

        proxy.set(LinkMode::Drop);
        client.send(b"lost").await.expect("send");
        while proxy.dropped().1 == 0 {
            tokio::task::yield_now().await;
        }
        proxy.set(LinkMode::Pass);
        client.send(b"kept").await.expect("send");
        let (n, _) = server.recv_from(&mut buffer).await.expect("relayed");
        assert_eq!(
            &buffer[..n],
            b"kept",
            "the datagram sent while dropping is gone"
        );
    }
}
