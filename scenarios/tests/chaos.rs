//! The checked-in chaos scenarios pass: faults under load, zero corrupt loads, zero leaked
//! pages, every fault recovered, nothing acknowledged lost.

use std::path::Path;

use pegaflow_scenarios::{run, Options, Report, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_scenario_keeps_every_invariant() {
    let report = check_chaos("chaos.toml").await;
    assert!(
        report.runs[0].tiers.ssd_checksum_failures > 0,
        "corruption must have been detected"
    );
}

/// A flipped byte in the open segment before a kill -9 costs that record only, never the
/// acknowledged records written after it (a regression the harness found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_in_the_open_segment_loses_nothing_acknowledged() {
    let report = check_chaos("chaos-unsealed-corruption.toml").await;
    assert!(
        report.runs[0].tiers.ssd_checksum_failures > 0,
        "corruption must have been detected"
    );
}

/// Dropped and delayed fabric links (a proxy in front of a node's fabric port) and holders
/// killed mid-traffic: peers' fetches fall through, nothing loaded is corrupt, no page stays
/// pinned or reserved, every link serves again and every restarted node rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fabric_link_faults_keep_every_invariant() {
    let report = check_chaos("chaos-fabric.toml").await;
    let run = &report.runs[0];
    for kind in ["drop_link", "delay_link"] {
        assert!(
            run.faults.iter().any(|f| f.kind == kind),
            "{kind} was injected"
        );
    }
    assert!(run.blocks.remote_loaded > 0, "blocks crossed the fabric");
    assert!(
        run.tiers.remote_fetch_failures > 0,
        "the dropped link made fetches fail over: {:?}",
        run.tiers
    );
}

/// Runs a checked-in chaos scenario and checks what every one of them must keep.
async fn check_chaos(file: &str) -> Report {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
    let scenario = Scenario::load(&path).expect("scenario file");
    let report = run(
        &scenario,
        &Options {
            quiet: true,
            ..Options::default()
        },
    )
    .await
    .expect("replay");
    let run = &report.runs[0];
    let faults: Vec<String> = run
        .faults
        .iter()
        .map(|f| format!("{} {}: {} [{:?}]", f.kind, f.target, f.effect, f.recovered))
        .collect();
    assert_eq!(run.checks.corrupt_loads, 0, "{faults:#?}");
    assert_eq!(run.checks.leaked_pages, 0, "{faults:#?}");
    assert_eq!(run.checks.acked_lost, 0, "{faults:#?}");
    assert_eq!(run.checks.faults_failed, 0, "{faults:#?}");
    assert_eq!(run.faults.len(), scenario.faults.len(), "{faults:#?}");
    assert!(
        run.checks.acked_checked > 0,
        "the faults must check acknowledged blocks"
    );
    assert!(report.passed);
    report
}
