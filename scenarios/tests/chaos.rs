//! The checked-in chaos scenarios pass: faults under load, zero corrupt loads, zero leaked
//! pages, every fault recovered, nothing acknowledged lost.

use std::path::Path;

use pegaflow_scenarios::{run, Options, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_scenario_keeps_every_invariant() {
    check_chaos("chaos.toml").await;
}

/// A flipped byte in the open segment before a kill -9 costs that record only, never the
/// acknowledged records written after it (a regression the harness found).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_in_the_open_segment_loses_nothing_acknowledged() {
    check_chaos("chaos-unsealed-corruption.toml").await;
}

async fn check_chaos(file: &str) {
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
    assert_eq!(run.checks.leaked_bytes, 0, "{faults:#?}");
    assert_eq!(run.checks.acked_lost, 0, "{faults:#?}");
    assert_eq!(run.checks.faults_failed, 0, "{faults:#?}");
    assert_eq!(run.faults.len(), scenario.faults.len(), "{faults:#?}");
    assert!(
        run.checks.acked_checked > 0,
        "the faults must check acknowledged blocks"
    );
    assert!(
        run.tiers.ssd_checksum_failures > 0,
        "corruption must have been detected"
    );
    assert!(report.passed);
}
