//! Serving side of the link: accepts connections, authenticates them, and answers fetches
//! with pages leased from a [`PageSource`] for exactly as long as they are being written.
//!
//! Requests on one connection are served in order (TCP delivers them in order anyway, and the
//! client pipelines several); different connections are served concurrently. Dropping the
//! [`LinkServer`] aborts the accept loop and every connection task, which closes the sockets,
//! so peers mid-fetch see the link close at once rather than at their deadline.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{FabricError, FrameError, HandshakeError};
use crate::frame::{read_frame, write_frame, Message};
use crate::handshake::{self, Credentials};
use crate::link::client::LinkOptions;
use crate::source::{PageLease, PageSource};

/// Socket buffer for small frames; pages bypass it.
const IO_BUFFER: usize = 64 * 1024;

/// A running link listener.
pub struct LinkServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for LinkServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl LinkServer {
    /// Listens on `addr` (port 0 picks one) and serves `source` to authenticated peers.
    pub async fn bind<S: PageSource>(
        addr: SocketAddr,
        creds: Credentials,
        source: Arc<S>,
        options: LinkOptions,
    ) -> Result<LinkServer, FabricError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| FabricError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| FabricError::Bind { addr, source })?;
        let task = tokio::spawn(accept_loop(listener, Arc::new(creds), source, options));
        Ok(LinkServer { local_addr, task })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

async fn accept_loop<S: PageSource>(
    listener: TcpListener,
    creds: Arc<Credentials>,
    source: Arc<S>,
    options: LinkOptions,
) {
    // Owned here, so aborting this task aborts every connection.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(serve(stream, peer, Arc::clone(&creds), Arc::clone(&source), options.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "link accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve<S: PageSource>(
    mut stream: TcpStream,
    peer: SocketAddr,
    creds: Arc<Credentials>,
    source: Arc<S>,
    options: LinkOptions,
) {
    let _ = stream.set_nodelay(true);
    let node = match handshake::server(&mut stream, &creds, options.handshake_timeout).await {
        Ok(node) => node,
        Err(HandshakeError::WrongSecret) => {
            tracing::warn!(%peer, "link handshake refused: peer does not know the cluster secret");
            return;
        }
        Err(e) => {
            tracing::warn!(%peer, error = %e, "link handshake refused");
            return;
        }
    };
    tracing::debug!(%peer, peer_node = node, "link accepted");
    let (read, write) = stream.into_split();
    let mut reader = BufReader::with_capacity(IO_BUFFER, read);
    let mut writer = BufWriter::with_capacity(IO_BUFFER, write);
    let max = options.max_frame;
    loop {
        let message = match read_frame(&mut reader, max).await {
            Ok(Some((message, _))) => message,
            Ok(None) => return,
            Err(e) => {
                match &e {
                    FrameError::TooLarge { len, max } => tracing::warn!(
                        %peer, peer_node = node, len, max,
                        "link frame over the size limit refused; closing the connection"
                    ),
                    _ => {
                        tracing::warn!(%peer, peer_node = node, error = %e, "bad link frame; closing the connection")
                    }
                }
                let reply = Message::Failed {
                    request: 0,
                    reason: e.to_string(),
                };
                let _ = write_frame(&mut writer, &reply, &[], max).await;
                let _ = writer.flush().await;
                return;
            }
        };
        let result = match message {
            Message::Fetch { request, keys } => {
                send_pages(&mut writer, &*source, &node, request, &keys, max).await
            }
            Message::Ping { nonce } => {
                write_frame(&mut writer, &Message::Pong { nonce }, &[], max).await
            }
            other => {
                tracing::warn!(%peer, peer_node = node, message = ?other, "unexpected link message; closing the connection");
                return;
            }
        };
        if let Err(e) = result.and(writer.flush().await.map_err(FrameError::from)) {
            tracing::debug!(%peer, peer_node = node, error = %e, "link write failed; closing");
            return;
        }
    }
}

/// Leases the held prefix of `keys` and writes one page frame each to `peer`, then `Done`.
async fn send_pages<S: PageSource, W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut W,
    source: &S,
    peer: &str,
    request: u64,
    keys: &[crate::BlockKey],
    max: u32,
) -> Result<(), FrameError> {
    let lease = match source.lease(keys).await {
        Ok(lease) => lease,
        Err(e) => {
            let reply = Message::Failed {
                request,
                reason: e.to_string(),
            };
            return write_frame(writer, &reply, &[], max).await;
        }
    };
    let served = lease.count().min(keys.len());
    let mut served_bytes = 0u64;
    for index in 0..served {
        let (bytes, crc32c) = lease.page(index);
        let header = Message::Page {
            request,
            index: index as u32,
            crc32c,
        };
        write_frame(writer, &header, bytes, max).await?;
        served_bytes += bytes.len() as u64;
    }
    // Pages are on their way (in socket buffers): release the pins before the round trip ends.
    drop(lease);
    source.served(peer, served, served_bytes);
    write_frame(
        writer,
        &Message::Done {
            request,
            served: served as u32,
        },
        &[],
        max,
    )
    .await
}
