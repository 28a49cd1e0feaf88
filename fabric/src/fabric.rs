//! The fabric as the node uses it: membership, the link server, reused link clients, and the
//! nearest-holder fetch with fall-through.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::error::{FabricError, LinkError};
use crate::handshake::Credentials;
use crate::link::client::{FetchedPage, Links};
use crate::link::server::LinkServer;
use crate::member::NodeId;
use crate::options::FabricOptions;
use crate::source::PageSource;
use crate::BlockKey;

/// A running fabric instance; dropping it stops gossip and closes every link it serves.
pub struct Fabric {
    cluster: Cluster,
    links: Links,
    server: LinkServer,
}

/// What [`Fabric::fetch_prefix`] got.
#[derive(Debug, Default)]
pub struct FetchOutcome {
    /// Verified pages of the leading keys, in order; empty means recompute.
    pub pages: Vec<FetchedPage>,
    pub report: FetchReport,
}

/// How a fetch went, apart from the pages themselves.
#[derive(Debug, Default)]
pub struct FetchReport {
    /// Pages handed to the sink: the leading keys fetched, in order.
    pub delivered: usize,
    /// Candidates whose digest claimed the next key but that did not hold it.
    pub false_positives: u32,
    /// Candidates that failed (dead, refused, corrupt page, deadline), in the order tried.
    pub failures: Vec<(NodeId, LinkError)>,
}

impl Fabric {
    /// Binds the link listener, then joins the gossip advertising it.
    pub async fn start<S: PageSource>(
        options: FabricOptions,
        source: Arc<S>,
    ) -> Result<Fabric, FabricError> {
        let creds = Credentials::new(
            options.cluster_id.clone(),
            options.node_id.clone(),
            &options.secret,
        );
        let server = LinkServer::bind(
            options.link_listen,
            creds.clone(),
            source,
            options.link.clone(),
        )
        .await?;
        let link_addr = options
            .link_advertise
            .map(|a| {
                SocketAddr::new(
                    a.ip(),
                    if a.port() == 0 {
                        server.local_addr().port()
                    } else {
                        a.port()
                    },
                )
            })
            .unwrap_or_else(|| {
                SocketAddr::new(options.gossip_advertise.ip(), server.local_addr().port())
            });
        let cluster = Cluster::join(&options, link_addr).await?;
        Ok(Fabric {
            cluster,
            links: Links::new(creds, options.link.clone()),
            server,
        })
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    pub fn links(&self) -> &Links {
        &self.links
    }

    /// Where this node's link listener is bound.
    pub fn link_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    /// Fetches as long a prefix of `keys` as peers hold, collected in memory (tests, tools).
    pub async fn fetch_prefix(
        &self,
        keys: &[BlockKey],
        page_bytes: u64,
        deadline: Instant,
    ) -> FetchOutcome {
        let mut pages = Vec::new();
        let report = self
            .fetch_prefix_into(keys, page_bytes, deadline, |page| pages.push(page))
            .await;
        FetchOutcome { pages, report }
    }

    /// Fetches as long a prefix of `keys` as peers hold, each page `page_bytes` long, before
    /// `deadline`, handing each verified page to `sink` as it arrives (the node copies it
    /// straight into its pool), in key order.
    ///
    /// A candidate that serves fewer pages than its digest claimed was a false positive; one
    /// that fails (dead, refused, corrupt page) is recorded. Either way the next candidate is
    /// asked for the keys still missing, so a dying peer costs the pages it did not send, not
    /// the ones it did. With no candidate left the caller recomputes the rest.
    pub async fn fetch_prefix_into(
        &self,
        keys: &[BlockKey],
        page_bytes: u64,
        deadline: Instant,
        mut sink: impl FnMut(FetchedPage),
    ) -> FetchReport {
        let mut report = FetchReport::default();
        let mut tried: Vec<NodeId> = Vec::new();
        while report.delivered < keys.len() && Instant::now() < deadline {
            let rest = &keys[report.delivered..];
            let next = self
                .cluster
                .candidates(rest)
                .into_iter()
                .find(|c| !tried.contains(&c.member.node_id));
            let Some(candidate) = next else { break };
            let node = candidate.member.node_id.clone();
            tried.push(node.clone());
            let (client, fresh) = match self.links.get(candidate.member.link_addr).await {
                Ok(link) => link,
                Err(e) => {
                    tracing::warn!(peer = %node, error = %e, "cannot reach peer; trying the next holder");
                    report.failures.push((node, e));
                    continue;
                }
            };
            if fresh {
                self.cluster.observe_rtt(&node, client.handshake_rtt());
            }
            let claimed = candidate.claimed.min(rest.len());
            let mut stream = client.fetch(&rest[..claimed], page_bytes, deadline);
            let before = report.delivered;
            let mut error = None;
            while let Some(item) = stream.next().await {
                match item {
                    Ok(page) => {
                        report.delivered += 1;
                        sink(page);
                    }
                    Err(e) => error = Some(e),
                }
            }
            if report.delivered == before && error.is_none() {
                report.false_positives += 1;
                tracing::debug!(peer = %node, "digest false positive; trying the next holder");
            }
            if let Some(e) = error {
                tracing::warn!(peer = %node, error = %e, got = report.delivered, "fetch from peer failed; trying the next holder");
                if client.is_closed() {
                    self.links.forget(client.addr());
                }
                report.failures.push((node, e));
            }
        }
        report
    }

    /// Leaves the gossip, so peers stop ranking this node, but keeps serving links until
    /// dropped (a node draining on shutdown).
    pub async fn leave(&self) {
        self.cluster.leave().await;
    }

    /// Leaves the gossip and stops serving.
    pub async fn shutdown(self) {
        let Fabric {
            cluster,
            links: _,
            server,
        } = self;
        drop(server);
        cluster.leave().await;
    }
}
