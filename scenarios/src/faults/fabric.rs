//! Fabric faults: links into a node dropped or delayed through the proxy in front of its
//! fabric port, each probed from a peer while faulted and after, and the check that a
//! restarted node rejoins the fabric.

use std::time::{Duration, Instant};

use pegaflow_actors::keys::BlockKey;

use crate::proxy::LinkMode;
use crate::replay::{Event, Replay};
use crate::report::json::FaultRecord;

/// How long the harness waits for the fabric to show something (a digest reaching a peer, a
/// restarted node rejoining): far beyond what gossip needs, so only a broken fabric hits it.
fn fabric_patience(replay: &Replay<'_>) -> Duration {
    let spec = replay.fabric.clone().unwrap_or_default();
    Duration::from_millis(5 * spec.failure_timeout_ms + 20 * spec.gossip_interval_ms)
}

/// Waits until a restarted node counts every other running node as a live peer again.
pub(super) async fn rejoin(replay: &Replay<'_>, node: u32) -> Result<f64, String> {
    let n = node as usize;
    let want = (0..replay.nodes.len())
        .filter(|&i| i != n && !replay.down[i] && replay.nodes[i].is_running())
        .count();
    let began = Instant::now();
    let deadline = began + fabric_patience(replay);
    loop {
        // The HTTP endpoint may come up a moment after the socket the start waited for.
        let peers = match replay.nodes[n].stats().await {
            Ok(stats) => Ok(stats.fabric.map_or(0, |f| f.peers.len())),
            Err(error) => Err(error.to_string()),
        };
        if peers.as_ref().is_ok_and(|&peers| peers >= want) {
            return Ok(began.elapsed().as_secs_f64());
        }
        if Instant::now() > deadline {
            let seen = match peers {
                Ok(peers) => format!("{peers} of {want} peers"),
                Err(error) => format!("no stats ({error})"),
            };
            return Err(format!(
                "{seen} after {:.1} s",
                began.elapsed().as_secs_f64()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a link fault saw while it was on, kept until it ends.
pub(crate) struct LinkOutage {
    mode: LinkMode,
    /// A block only the faulted node held, loaded by a peer while the link was cut or slow.
    probe: Result<LinkProbe, String>,
    /// Fabric counters summed over the running nodes, and the proxy's refusals, at the start.
    before: FabricTotals,
    dropped_before: (u64, u64),
}

/// One load, on a peer, of a block only the faulted node holds.
struct LinkProbe {
    peer: u32,
    loaded: u32,
    corrupt: u32,
    took_ms: f64,
}

impl LinkProbe {
    fn describe(&self) -> String {
        format!(
            "node {} loaded {} of 1 block in {:.0} ms ({} corrupt)",
            self.peer, self.loaded, self.took_ms, self.corrupt
        )
    }

    /// Served intact: the link works.
    fn served(&self) -> bool {
        self.loaded == 1 && self.corrupt == 0
    }
}

/// Peers' fetch outcomes, summed over the running nodes.
#[derive(Clone, Copy, Default)]
struct FabricTotals {
    fetched_pages: u64,
    false_positives: u64,
    fetch_failures: u64,
}

async fn fabric_totals(replay: &Replay<'_>) -> FabricTotals {
    let mut totals = FabricTotals::default();
    for node in replay.nodes.iter().filter(|n| n.is_running()) {
        if let Some(fabric) = node.stats().await.ok().and_then(|s| s.fabric) {
            totals.fetched_pages += fabric.fetched_pages;
            totals.false_positives += fabric.false_positives;
            totals.fetch_failures += fabric.fetch_failures;
        }
    }
    totals
}

/// Switches the proxy in front of `node`'s fabric port; `(connections, datagrams)` it refused
/// so far.
fn set_link(replay: &Replay<'_>, node: u32, mode: LinkMode) -> (u64, u64) {
    match &replay.nodes[node as usize].link {
        Some(proxy) => {
            proxy.set(mode);
            proxy.dropped()
        }
        None => (0, 0),
    }
}

/// Cuts or slows every peer's link into `node` until `duration_ms` (virtual) from now, and
/// probes it: a block saved on `node` alone and claimed by a peer's digest is loaded by that
/// peer through the faulted link. A dropped link must fall through (nothing loaded, the engine
/// recomputes); a delayed one may serve late or hit the fetch deadline; nothing is corrupt.
pub(super) async fn cut_link(
    replay: &mut Replay<'_>,
    index: usize,
    node: u32,
    mode: LinkMode,
    duration_ms: u64,
) {
    let before = fabric_totals(replay).await;
    let shared = share_probe_block(replay, node).await;
    let dropped_before = set_link(replay, node, mode);
    let probe = match shared {
        Ok((engine, key)) => probe_load(replay, engine, key).await,
        Err(why) => Err(why),
    };
    replay.link_faults.insert(
        index,
        LinkOutage {
            mode,
            probe,
            before,
            dropped_before,
        },
    );
    replay.push(replay.now_us + duration_ms * 1000, Event::FaultEnd(index));
}

/// Lets the link pass again, probes it with a fresh block, and records the whole fault.
pub(super) async fn restore_link(
    replay: &mut Replay<'_>,
    index: usize,
    node: u32,
    kind: &str,
    action: String,
) -> FaultRecord {
    let at_ms = replay.scenario.faults[index].at_ms;
    let dropped = set_link(replay, node, LinkMode::Pass);
    let mut record =
        FaultRecord::pending(at_ms, kind, format!("node {node}'s fabric port"), action);
    let Some(outage) = replay.link_faults.remove(&index) else {
        record.effect = "the fault never started".into();
        return record;
    };
    let now = fabric_totals(replay).await;
    let after = match share_probe_block(replay, node).await {
        Ok((engine, key)) => probe_load(replay, engine, key).await,
        Err(why) => Err(why),
    };
    let during = match &outage.probe {
        Ok(probe) => probe.describe(),
        Err(why) => format!("no probe: {why}"),
    };
    record.effect = format!(
        "probe while faulted: {during}; while faulted, peers' fetches: {} pages, {} failures, {} false positives; proxy refused {} connections and {} datagrams; probe after restoring: {}",
        now.fetched_pages.saturating_sub(outage.before.fetched_pages),
        now.fetch_failures.saturating_sub(outage.before.fetch_failures),
        now.false_positives.saturating_sub(outage.before.false_positives),
        dropped.0.saturating_sub(outage.dropped_before.0),
        dropped.1.saturating_sub(outage.dropped_before.1),
        match &after {
            Ok(probe) => probe.describe(),
            Err(why) => format!("none: {why}"),
        }
    );
    record.recovered = Some(link_recovered(&outage, after.as_ref().ok()));
    record
}

/// The probe while faulted was not corrupt (and, for a dropped link, fell through: nothing
/// crossed it), and the probe after restoring was served intact.
fn link_recovered(outage: &LinkOutage, after: Option<&LinkProbe>) -> bool {
    let during_ok = outage.probe.as_ref().is_ok_and(|probe| {
        probe.corrupt == 0 && (outage.mode != LinkMode::Drop || probe.loaded == 0)
    });
    during_ok && after.is_some_and(LinkProbe::served)
}

/// Saves a fresh block on `node` and waits until a peer's lookup claims it as a remote hit:
/// `(peer engine, key)`.
async fn share_probe_block(
    replay: &mut Replay<'_>,
    node: u32,
) -> Result<(usize, BlockKey), String> {
    replay.reconnect(node).await;
    let owner = connected_engine(replay, |n| n == node)
        .ok_or_else(|| format!("no engine of node {node} is connected"))?;
    let peer =
        connected_engine(replay, |n| n != node).ok_or("no running peer has a connected engine")?;
    let key: BlockKey = rand::random();
    let saved = replay
        .engine_mut(owner)
        .save(&[key], 0)
        .await
        .map_err(|e| format!("probe save on node {node} failed: {e}"))?;
    if saved.stored != 1 {
        return Err(format!(
            "node {node} did not store the probe block: {saved:?}"
        ));
    }
    let began = Instant::now();
    let deadline = began + fabric_patience(replay);
    loop {
        match replay
            .engine_mut(peer)
            .peek(std::slice::from_ref(&key))
            .await
        {
            Ok(reply) if reply.remote_hits == 1 => return Ok((peer, key)),
            Ok(_) if Instant::now() > deadline => {
                return Err(format!(
                    "the probe block saved on node {node} was not claimed by a peer within {:.1} s",
                    began.elapsed().as_secs_f64()
                ))
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(error) => return Err(format!("probe lookup failed: {error}")),
        }
    }
}

/// The first connected engine on a running node `on` accepts.
fn connected_engine(replay: &mut Replay<'_>, on: impl Fn(u32) -> bool) -> Option<usize> {
    (0..replay.scenario.engines() as usize).find(|&e| {
        let node = replay.engine_mut(e).node;
        on(node) && !replay.down[node as usize] && replay.engine_mut(e).is_connected()
    })
}

/// Loads `key` on `engine` as a request would (lookup, load, release) and checks its bytes.
async fn probe_load(
    replay: &mut Replay<'_>,
    engine: usize,
    key: BlockKey,
) -> Result<LinkProbe, String> {
    let began = Instant::now();
    let peer = replay.engine_mut(engine).node;
    let outcome = match replay.engine_mut(engine).prefill(&[key]).await {
        Ok(outcome) => outcome,
        Err(error) => {
            replay.engine_mut(engine).disconnect();
            return Err(format!("probe load on node {peer} failed: {error}"));
        }
    };
    replay.checks.corrupt_loads += u64::from(outcome.corrupt);
    Ok(LinkProbe {
        peer,
        loaded: outcome.loaded,
        corrupt: outcome.corrupt,
        took_ms: began.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(loaded: u32, corrupt: u32) -> LinkProbe {
        LinkProbe {
            peer: 1,
            loaded,
            corrupt,
            took_ms: 1.0,
        }
    }

    fn outage(mode: LinkMode, during: Result<LinkProbe, String>) -> LinkOutage {
        LinkOutage {
            mode,
            probe: during,
            before: FabricTotals::default(),
            dropped_before: (0, 0),
        }
    }

    #[test]
    fn a_dropped_link_must_fall_through_and_serve_again() {
        let fell_through = outage(LinkMode::Drop, Ok(probe(0, 0)));
        assert!(link_recovered(&fell_through, Some(&probe(1, 0))));
        assert!(
            !link_recovered(&fell_through, Some(&probe(0, 0))),
            "the link must serve again"
        );
        assert!(!link_recovered(&fell_through, None));
        let crossed = outage(LinkMode::Drop, Ok(probe(1, 0)));
        assert!(
            !link_recovered(&crossed, Some(&probe(1, 0))),
            "a page crossed a dropped link: the fault was not real"
        );
        let unprobed = outage(LinkMode::Drop, Err("no peer".into()));
        assert!(!link_recovered(&unprobed, Some(&probe(1, 0))));
    }

    #[test]
    fn a_delayed_link_may_serve_late_or_not_at_all_but_never_corrupt() {
        let delay = LinkMode::Delay(Duration::from_millis(50));
        let after = probe(1, 0);
        assert!(link_recovered(
            &outage(delay, Ok(probe(1, 0))),
            Some(&after)
        ));
        assert!(link_recovered(
            &outage(delay, Ok(probe(0, 0))),
            Some(&after)
        ));
        assert!(!link_recovered(
            &outage(delay, Ok(probe(1, 1))),
            Some(&after)
        ));
        assert!(!link_recovered(
            &outage(delay, Ok(probe(1, 0))),
            Some(&probe(1, 1))
        ));
    }
}
