//! `pegaflow-scenario`: runs scenario files and writes their reports.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use pegaflow_scenarios::report::html;
use pegaflow_scenarios::{run, Options, Scenario};

/// Replays a scenario (cluster, workload, faults) against real pegaflow-node processes.
#[derive(Parser, Debug)]
#[command(name = "pegaflow-scenario", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a scenario and write `<name>.json` and `<name>.html` into the output directory.
    Run {
        /// The scenario file (TOML).
        scenario: PathBuf,
        /// Where the reports go.
        #[arg(long, default_value = "scenario-reports")]
        out: PathBuf,
        /// Replay only the first N requests of the workload.
        #[arg(long)]
        requests: Option<usize>,
        /// The pegaflow-node binary (default: $PEGAFLOW_NODE_BIN, else next to this binary).
        #[arg(long)]
        node_bin: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Parse and validate scenario files without running them.
    Check { scenarios: Vec<PathBuf> },
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("pegaflow-scenario: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Command::Check { scenarios } => {
            for path in scenarios {
                let scenario = Scenario::load(&path)?;
                println!("{}: ok ({})", path.display(), scenario.name);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            scenario,
            out,
            requests,
            node_bin,
            quiet,
        } => {
            let scenario = Scenario::load(&scenario)?;
            let options = Options {
                limit: requests,
                node_binary: node_bin,
                quiet,
            };
            let runtime = tokio::runtime::Runtime::new().context("start the async runtime")?;
            let report = runtime.block_on(run(&scenario, &options))?;
            std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
            let json = out.join(format!("{}.json", scenario.name));
            let page = out.join(format!("{}.html", scenario.name));
            report.write_json(&json)?;
            html::write(&report, &page)?;
            for r in &report.runs {
                println!(
                    "{}: pool {} MiB/node, {} nodes x {} engines, {} requests: block hit {:.2}% ({} blocks from peers), token hit {:.2}%, TTFT mean {:.0} ms (cold {:.0} ms, {:.2}x), corrupt loads {}, leaked pages {}, faults {} ok / {} failed / {} n.a., wall {:.1} s",
                    report.scenario,
                    r.pool_bytes >> 20,
                    r.nodes,
                    r.engines / r.nodes.max(1),
                    r.requests,
                    r.block_hit_ratio * 100.0,
                    r.blocks.remote_loaded,
                    r.token_hit_ratio * 100.0,
                    r.ttft.mean_ms,
                    r.ttft.cold_mean_ms,
                    r.ttft.speedup,
                    r.checks.corrupt_loads,
                    r.checks.leaked_pages,
                    r.checks.faults_recovered,
                    r.checks.faults_failed,
                    r.checks.faults_skipped,
                    r.wall_s
                );
            }
            println!("reports: {} {}", json.display(), page.display());
            let must_pass = scenario.report.assert_checks;
            if must_pass && !report.passed {
                eprintln!("pegaflow-scenario: checks failed (see the report)");
                return Ok(ExitCode::from(1));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
