//! The fabric as the node uses it: membership, the link server, reused link clients, and the
//! nearest-holder fetch with fall-through.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::error::SinkError;
use crate::error::{FabricError, LinkError};
use crate::handshake::Credentials;
use crate::link::client::{FetchInto, FetchedPage, Landed, Links};
use crate::link::server::LinkServer;
use crate::link::sink::{PageBuffers, PageSink};
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
    /// Pages landed in the sink: the leading keys fetched, in order.
    pub delivered: usize,
    /// Candidates whose digest claimed the next key but that did not hold it.
    pub false_positives: u32,
    /// Candidates that failed (dead, refused, corrupt page, deadline), in the order tried.
    pub failures: Vec<(NodeId, LinkError)>,
    /// Pages each holder delivered, in the order asked (for per-peer traffic accounting).
    pub delivered_by: Vec<(NodeId, usize)>,
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
        let mut landed = Vec::new();
        let sink = PageBuffers::new(page_bytes);
        let (mut buffers, report) = self
            .fetch_prefix_into(keys, page_bytes, deadline, sink, |page| landed.push(page))
            .await;
        let pages = landed
            .into_iter()
            .map_while(|page| buffers.take(page))
            .collect();
        FetchOutcome { pages, report }
    }

    /// Fetches as long a prefix of `keys` as peers hold, each page `page_bytes` long, before
    /// `deadline`, into `sink` (the node's writes into the pool extents it reserved), and calls
    /// `landed` for each page that arrived whole and matched its checksum, in key order. Pages
    /// written but not landed must not be kept. Returns the sink, which the link no longer
    /// touches.
    ///
    /// A candidate that serves fewer pages than its digest claimed was a false positive; one
    /// that fails (dead, refused, corrupt page) is recorded. Either way the next candidate is
    /// asked for the keys still missing, so a dying peer costs the pages it did not send, not
    /// the ones it did. With no candidate left the caller recomputes the rest. A sink that
    /// refuses a page ends the fetch: the next holder would meet the same refusal.
    pub async fn fetch_prefix_into<S: PageSink>(
        &self,
        keys: &[BlockKey],
        page_bytes: u64,
        deadline: Instant,
        mut sink: S,
        mut landed: impl FnMut(Landed),
    ) -> (S, FetchReport) {
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
            // Dialing has its own connect and handshake timeouts; the fetch's deadline bounds it too.
            let dial =
                tokio::time::timeout_at(deadline, self.links.get(candidate.member.link_addr));
            let dialed = dial.await.unwrap_or(Err(LinkError::Deadline { pages: 0 }));
            let (client, fresh) = match dialed {
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
            let first = report.delivered;
            let shifted = Shifted { sink, by: first };
            let fetch = client.fetch_into(&rest[..claimed], page_bytes, deadline, shifted);
            let (back, pages, error) = land_all(fetch, first, &mut landed).await;
            sink = back;
            report.delivered += pages;
            if pages > 0 {
                report.delivered_by.push((node.clone(), pages));
            }
            if pages == 0 && error.is_none() {
                report.false_positives += 1;
                tracing::debug!(peer = %node, "digest false positive; trying the next holder");
            }
            if let Some(e) = error {
                if client.is_closed() {
                    self.links.forget(client.addr());
                }
                let local = matches!(e, LinkError::Sink(_));
                if local {
                    tracing::error!(peer = %node, error = %e, got = report.delivered, "the fetch's sink refused a page; not asking other holders");
                } else {
                    tracing::warn!(peer = %node, error = %e, got = report.delivered, "fetch from peer failed; trying the next holder");
                }
                report.failures.push((node, e));
                if local {
                    break;
                }
            }
        }
        (sink, report)
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

/// Runs one holder's fetch to its end, passing each landed page on to `landed` under the
/// caller's page index (the holder's page 0 is the caller's `first`); returns the sink, the
/// pages landed, and the error that ended the fetch, if any.
async fn land_all<S: PageSink>(
    mut fetch: FetchInto<Shifted<S>>,
    first: usize,
    landed: &mut impl FnMut(Landed),
) -> (S, usize, Option<LinkError>) {
    let mut error = None;
    while let Some(item) = fetch.next().await {
        match item {
            Ok(page) => landed(Landed {
                index: first + page.index,
                ..page
            }),
            Err(e) => error = Some(e),
        }
    }
    let pages = fetch.delivered();
    (fetch.into_sink().sink, pages, error)
}

/// One holder's view of the caller's sink: the holder is asked for the keys still missing, so
/// its page 0 is the caller's page `by`.
struct Shifted<S> {
    sink: S,
    by: usize,
}

impl<S: PageSink> PageSink for Shifted<S> {
    fn write(&mut self, index: usize, offset: usize, bytes: &[u8]) -> Result<(), SinkError> {
        self.sink.write(self.by + index, offset, bytes)
    }
}
