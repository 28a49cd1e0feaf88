//! A short slice of a checked-in scenario end to end: four engines, a capacity sweep, the
//! JSON and HTML reports written and read back.

use std::path::Path;

use pegaflow_config::Size;
use pegaflow_scenarios::report::html;
use pegaflow_scenarios::{run, Options, Report, Scenario};

/// Replays the first `requests` of `scenario`, writes its JSON and HTML reports, and reads them
/// back: what a user of the reports would see.
async fn replay_and_reread(scenario: &Scenario, requests: usize) -> (Report, String) {
    let options = Options {
        limit: Some(requests),
        quiet: true,
        ..Options::default()
    };
    let report = run(scenario, &options).await.expect("replay");
    let out = tempfile::tempdir().expect("tempdir");
    let json = out.path().join("r.json");
    let page = out.path().join("r.html");
    report.write_json(&json).expect("json");
    html::write(&report, &page).expect("html");
    let back = serde_json::from_str(&std::fs::read_to_string(&json).expect("read")).expect("parse");
    (back, std::fs::read_to_string(&page).expect("read html"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_conversation_replay_writes_checked_reports() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conversation-1node.toml");
    let mut scenario = Scenario::load(&path).expect("conversation-1node.toml");
    scenario.report.capacity_sweep = vec![Size::mib(16), Size::mib(64)];
    let (back, html) = replay_and_reread(&scenario, 80).await;
    assert_eq!(back.scenario, "conversation-1node");
    assert_eq!(
        back.scenario_toml,
        std::fs::read_to_string(&path).expect("toml")
    );
    assert_eq!(back.version.harness, env!("CARGO_PKG_VERSION"));
    assert_eq!(back.runs.len(), 2);
    for r in &back.runs {
        assert_eq!(r.requests, 80);
        assert_eq!(r.engines, 4);
        assert!(
            r.block_hit_ratio > 0.0 && r.block_hit_ratio < 1.0,
            "{}",
            r.block_hit_ratio
        );
        assert_eq!(r.blocks.corrupt, 0);
        assert!(r.ttft.mean_ms > 0.0 && r.ttft.mean_ms <= r.ttft.cold_mean_ms);
        assert!(!r.timeline.is_empty());
        assert!(r.checks.passed);
    }
    assert!(
        back.runs[1].block_hit_ratio >= back.runs[0].block_hit_ratio,
        "more capacity never hits less on this slice"
    );
    for needle in [
        "<svg",
        "Hit ratio over time",
        "Hit ratio vs capacity",
        "TTFT model",
        "Bytes moved per tier",
        "name = &quot;conversation-1node&quot;",
    ] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
    assert!(!html.contains("<script"), "self-contained, no scripts");
}

/// A slice of the shared-cache scenario on a real four-node fabric: blocks saved on one node
/// are claimed by the others' lookups, fetched through the fabric, loaded byte-exact, and the
/// reports record the remote tier. The first 200 requests (72 s of trace) include 7
/// conversations coming back (the first at request 133), each 15 s or more after its last turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_fabric_replay_records_remote_hits() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conversation-4nodes-shared.toml");
    let mut scenario = Scenario::load(&path).expect("conversation-4nodes-shared.toml");
    scenario.cluster.pool = Size::mib(64);
    let (back, html) = replay_and_reread(&scenario, 200).await;
    let r = &back.runs[0];
    assert_eq!((r.nodes, r.requests), (4, 200));
    assert!(r.checks.passed, "{:?}", r.checks);
    assert!(r.blocks.remote_hit > 0, "lookups claimed peers' blocks");
    assert!(
        r.blocks.remote_loaded > 0 && r.blocks.remote_loaded <= r.blocks.loaded,
        "{:?}",
        r.blocks
    );
    let fetched_pages = r.tiers.remote_fetched_bytes / r.page_bytes;
    assert!(
        fetched_pages >= r.blocks.remote_loaded,
        "every block loaded from peers was a page fetched: {:?} {:?}",
        r.blocks,
        r.tiers
    );
    assert!(
        r.tiers.remote_served_pages >= fetched_pages,
        "every page fetched was served by a peer: {:?}",
        r.tiers
    );
    assert!(r.tiers.modeled_remote_bytes > 0);
    let lifetimes_with_fabric = r
        .nodes_detail
        .iter()
        .flat_map(|n| &n.lifetimes)
        .filter(|life| life.fabric.is_some())
        .count();
    assert_eq!(lifetimes_with_fabric, 4, "every node ran the fabric");
    for needle in [
        "Hits per tier",
        "loaded: remote",
        "remote: fetched from peers",
    ] {
        assert!(html.contains(needle), "report lacks {needle}");
    }
}
