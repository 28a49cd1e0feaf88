//! Mutual challenge-response on the cluster secret, run once per link connection.
//!
//! ```text
//! client                                   server
//!   Hello{version, cluster, node, Nc}  ──▶
//!                                      ◀──  Challenge{Ns, HMAC(secret, "server"|cluster|Nc|Ns)}
//!   (checks the server knows the secret)
//!   Auth{HMAC(secret, "client"|cluster|Nc|Ns)} ──▶
//!                                      ◀──  Welcome{node}   or   Refused{reason}, close
//! ```
//! Both sides contribute a fresh 32-byte nonce, so no proof can be replayed, and the two proofs
//! use different labels, so a server's proof is never a valid client proof. The secret itself
//! never crosses the wire. Proofs are compared in constant time. Traffic after the handshake is
//! authenticated by the connection only (no per-frame MAC): the fabric runs inside a trusted
//! network, the handshake keeps out nodes of other clusters and misconfigured peers.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::error::HandshakeError;
use crate::frame::{read_frame, write_frame, Message};

/// Link protocol version; peers must match exactly.
pub const LINK_VERSION: u16 = 1;
/// Handshake frames are tiny; anything bigger is an attack or a confused peer.
const HANDSHAKE_MAX_FRAME: u32 = 4096;
const SERVER_LABEL: &[u8] = b"pegaflow-link-server-v1";
const CLIENT_LABEL: &[u8] = b"pegaflow-link-client-v1";

/// Who this node is on links, and the secret it proves.
#[derive(Clone)]
pub struct Credentials {
    pub cluster_id: String,
    pub node_id: String,
    secret: Arc<[u8]>,
}

impl Credentials {
    pub fn new(cluster_id: impl Into<String>, node_id: impl Into<String>, secret: &str) -> Self {
        Credentials {
            cluster_id: cluster_id.into(),
            node_id: node_id.into(),
            secret: secret.as_bytes().into(),
        }
    }

    fn mac(
        &self,
        label: &[u8],
        client: &[u8; 32],
        server: &[u8; 32],
    ) -> Result<Hmac<Sha256>, HandshakeError> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret)
            .map_err(|_| HandshakeError::Unexpected("unusable secret"))?;
        mac.update(label);
        mac.update(&(self.cluster_id.len() as u32).to_le_bytes());
        mac.update(self.cluster_id.as_bytes());
        mac.update(client);
        mac.update(server);
        Ok(mac)
    }

    fn proof(
        &self,
        label: &[u8],
        client: &[u8; 32],
        server: &[u8; 32],
    ) -> Result<[u8; 32], HandshakeError> {
        Ok(self
            .mac(label, client, server)?
            .finalize()
            .into_bytes()
            .into())
    }

    fn verify(
        &self,
        label: &[u8],
        client: &[u8; 32],
        server: &[u8; 32],
        proof: &[u8; 32],
    ) -> Result<(), HandshakeError> {
        self.mac(label, client, server)?
            .verify_slice(proof)
            .map_err(|_| HandshakeError::WrongSecret)
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// What a successful client handshake learned.
#[derive(Clone, Debug)]
pub struct Accepted {
    /// The server's node id.
    pub peer: String,
    /// Hello → Challenge: one network round trip.
    pub rtt: Duration,
}

/// Runs the client side on a fresh connection.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    creds: &Credentials,
    timeout: Duration,
) -> Result<Accepted, HandshakeError> {
    tokio::time::timeout(timeout, client_steps(stream, creds))
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

async fn client_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    creds: &Credentials,
) -> Result<Accepted, HandshakeError> {
    let client_nonce: [u8; 32] = rand::random();
    let hello = Message::Hello {
        version: LINK_VERSION,
        cluster_id: creds.cluster_id.clone(),
        node_id: creds.node_id.clone(),
        nonce: client_nonce,
    };
    let start = Instant::now();
    send(stream, &hello).await?;
    let (server_nonce, proof) = match receive(stream).await? {
        Message::Challenge { nonce, proof } => (nonce, proof),
        Message::Refused { reason } => return Err(HandshakeError::Refused(reason)),
        _ => return Err(HandshakeError::Unexpected("expected Challenge")),
    };
    let rtt = start.elapsed();
    if creds
        .verify(SERVER_LABEL, &client_nonce, &server_nonce, &proof)
        .is_err()
    {
        let _ = send(
            stream,
            &Message::Refused {
                reason: "server failed to prove the cluster secret".into(),
            },
        )
        .await;
        return Err(HandshakeError::WrongSecret);
    }
    let auth = creds.proof(CLIENT_LABEL, &client_nonce, &server_nonce)?;
    send(stream, &Message::Auth { proof: auth }).await?;
    match receive(stream).await? {
        Message::Welcome { node_id } => Ok(Accepted { peer: node_id, rtt }),
        Message::Refused { reason } => Err(HandshakeError::Refused(reason)),
        _ => Err(HandshakeError::Unexpected("expected Welcome")),
    }
}

/// Runs the server side on an accepted connection; on failure the peer has been told why.
/// Returns the client's node id.
pub async fn server<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    creds: &Credentials,
    timeout: Duration,
) -> Result<String, HandshakeError> {
    tokio::time::timeout(timeout, server_steps(stream, creds))
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

async fn server_steps<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    creds: &Credentials,
) -> Result<String, HandshakeError> {
    let (client_nonce, peer) = match receive(stream).await? {
        Message::Hello {
            version,
            cluster_id,
            node_id,
            nonce,
        } => {
            if version != LINK_VERSION {
                refuse(stream, "link protocol version mismatch").await;
                return Err(HandshakeError::Version {
                    ours: LINK_VERSION,
                    theirs: version,
                });
            }
            if cluster_id != creds.cluster_id {
                refuse(stream, "wrong cluster id").await;
                return Err(HandshakeError::WrongCluster {
                    ours: creds.cluster_id.clone(),
                    theirs: cluster_id,
                });
            }
            (nonce, node_id)
        }
        _ => return Err(HandshakeError::Unexpected("expected Hello")),
    };
    let server_nonce: [u8; 32] = rand::random();
    let proof = creds.proof(SERVER_LABEL, &client_nonce, &server_nonce)?;
    send(
        stream,
        &Message::Challenge {
            nonce: server_nonce,
            proof,
        },
    )
    .await?;
    match receive(stream).await? {
        Message::Auth { proof } => {
            if let Err(e) = creds.verify(CLIENT_LABEL, &client_nonce, &server_nonce, &proof) {
                refuse(stream, "wrong cluster secret").await;
                return Err(e);
            }
        }
        Message::Refused { reason } => return Err(HandshakeError::Refused(reason)),
        _ => return Err(HandshakeError::Unexpected("expected Auth")),
    }
    send(
        stream,
        &Message::Welcome {
            node_id: creds.node_id.clone(),
        },
    )
    .await?;
    Ok(peer)
}

async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    message: &Message,
) -> Result<(), HandshakeError> {
    write_frame(stream, message, &[], HANDSHAKE_MAX_FRAME).await?;
    stream
        .flush()
        .await
        .map_err(|e| HandshakeError::Frame(e.into()))
}

async fn receive<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Message, HandshakeError> {
    match read_frame(stream, HANDSHAKE_MAX_FRAME).await? {
        Some((message, _)) => Ok(message),
        None => Err(HandshakeError::Unexpected(
            "connection closed during handshake",
        )),
    }
}

async fn refuse<S: AsyncWrite + Unpin>(stream: &mut S, reason: &str) {
    // Best effort: the peer may already be gone.
    let _ = send(
        stream,
        &Message::Refused {
            reason: reason.to_owned(),
        },
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn run(
        client_secret: &str,
        server_secret: &str,
        client_cluster: &str,
    ) -> (
        Result<Accepted, HandshakeError>,
        Result<String, HandshakeError>,
    ) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let c = Credentials::new(client_cluster, "client", client_secret);
        let s = Credentials::new("c1", "server", server_secret);
        let t = Duration::from_secs(2);
        tokio::join!(client(&mut a, &c, t), server(&mut b, &s, t))
    }

    #[tokio::test]
    async fn same_secret_is_accepted_both_ways() {
        let (c, s) = run("k", "k", "c1").await;
        assert_eq!(c.expect("client accepted").peer, "server");
        assert_eq!(s.expect("server accepted"), "client");
    }

    #[tokio::test]
    async fn wrong_secret_is_refused() {
        let (c, s) = run("wrong", "k", "c1").await;
        // The client notices first: the server cannot prove a secret the client does not share.
        assert!(matches!(c, Err(HandshakeError::WrongSecret)), "{c:?}");
        assert!(s.is_err(), "server must not accept: {s:?}");
    }

    #[tokio::test]
    async fn server_refuses_a_client_with_a_forged_proof() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let s = Credentials::new("c1", "server", "k");
        let server = tokio::spawn(async move { server(&mut b, &s, Duration::from_secs(2)).await });
        send(
            &mut a,
            &Message::Hello {
                version: LINK_VERSION,
                cluster_id: "c1".into(),
                node_id: "evil".into(),
                nonce: [0; 32],
            },
        )
        .await
        .expect("hello");
        let Message::Challenge { .. } = receive(&mut a).await.expect("challenge") else {
            panic!("no challenge")
        };
        send(&mut a, &Message::Auth { proof: [9; 32] })
            .await
            .expect("auth");
        let reply = receive(&mut a).await.expect("reply");
        assert_eq!(
            reply,
            Message::Refused {
                reason: "wrong cluster secret".into()
            }
        );
        assert!(matches!(
            server.await.expect("join"),
            Err(HandshakeError::WrongSecret)
        ));
    }

    #[tokio::test]
    async fn other_cluster_is_refused() {
        let (c, s) = run("k", "k", "c2").await;
        assert!(matches!(c, Err(HandshakeError::Refused(_))), "{c:?}");
        assert!(
            matches!(s, Err(HandshakeError::WrongCluster { .. })),
            "{s:?}"
        );
    }

    #[tokio::test]
    async fn silent_peer_times_out() {
        let (mut a, _b) = tokio::io::duplex(4096);
        let c = Credentials::new("c1", "client", "k");
        let err = client(&mut a, &c, Duration::from_millis(50))
            .await
            .expect_err("timeout");
        assert!(matches!(err, HandshakeError::Timeout(_)));
    }
}
