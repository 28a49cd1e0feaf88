//! A short slice of a checked-in scenario end to end: four engines, a capacity sweep, the
//! JSON and HTML reports written and read back.

use std::path::Path;

use pegaflow_config::Size;
use pegaflow_scenarios::report::html;
use pegaflow_scenarios::{run, Options, Report, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_conversation_replay_writes_checked_reports() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conversation-1node.toml");
    let mut scenario = Scenario::load(&path).expect("conversation-1node.toml");
    scenario.report.capacity_sweep = vec![Size::mib(16), Size::mib(64)];
    let options = Options {
        limit: Some(80),
        quiet: true,
        ..Options::default()
    };
    let report = run(&scenario, &options).await.expect("replay");
    let out = tempfile::tempdir().expect("tempdir");
    let json = out.path().join("r.json");
    let page = out.path().join("r.html");
    report.write_json(&json).expect("json");
    html::write(&report, &page).expect("html");

    let back: Report =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("read")).expect("parse");
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
    let html = std::fs::read_to_string(&page).expect("read html");
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
