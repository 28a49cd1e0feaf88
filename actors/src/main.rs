//! `pegaflow-node`: parse the config, start the node, wait for SIGTERM/SIGINT, drain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use pegaflow_config::ConfigArgs;
use tokio::signal::unix::{signal, Signal, SignalKind};

/// PegaFlow KV-cache node: one per host, shared by every inference engine on it.
#[derive(Parser, Debug)]
#[command(name = "pegaflow-node", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print the effective configuration, with where each value came from, and exit.
    #[arg(long)]
    print_config: bool,
    /// Print the host's NUMA nodes and GPUs as the node would serve them (the driver's GPUs
    /// plus `topology` from the config), and exit.
    #[arg(long)]
    print_topology: bool,
    /// Verify every page of the SSD tier in DIR offline (the node must not be using it), print
    /// a summary, and exit: 0 when clean, 1 when corrupt pages were found, 2 when DIR is unreadable.
    #[arg(long, value_name = "DIR")]
    check_ssd: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(dir) = &cli.check_ssd {
        return check_ssd(dir);
    }
    let loaded = match pegaflow_config::load(&cli.config) {
        Ok(loaded) => loaded,
        Err(error) => {
            eprintln!("pegaflow-node: {error}");
            return ExitCode::from(2);
        }
    };
    if cli.print_config {
        print!("{}", loaded.render());
        return ExitCode::SUCCESS;
    }
    if cli.print_topology {
        let topology = pegaflow_actors::topology::HostTopology::discover(&loaded.config.topology);
        print!("{}", topology.render());
        return ExitCode::SUCCESS;
    }
    if let Err(error) = pegaflow_config::check_pool_fits_memory(&loaded) {
        eprintln!("pegaflow-node: {error}");
        return ExitCode::from(2);
    }
    let config = loaded.config;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log.level))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A closed stderr must not stop the node: tracing-subscriber would report the failed
        // write with `eprintln!`, which panics and skips the shutdown that removes the socket.
        .log_internal_errors(false)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("pegaflow-node: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        // Listening before the socket exists makes a SIGTERM that arrives while the node starts
        // a drain that removes the socket, not the default action that kills and leaves it.
        let mut signals = match StopSignals::listen() {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("pegaflow-node: cannot listen for SIGTERM and SIGINT: {error}");
                return ExitCode::FAILURE;
            }
        };
        let node = match pegaflow_actors::node::start(&config).await {
            Ok(node) => node,
            Err(error) => {
                eprintln!("pegaflow-node: {error}");
                return ExitCode::FAILURE;
            }
        };
        signals.recv().await;
        node.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn check_ssd(dir: &Path) -> ExitCode {
    match pegaflow_actors::ssd::check::check(dir) {
        Ok(report) => {
            print!("{}", report.render());
            if report.is_clean() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!("pegaflow-node: cannot check {}: {error}", dir.display());
            ExitCode::from(2)
        }
    }
}

/// SIGTERM and SIGINT, the two ways to ask the node to drain and stop.
struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Takes over both signals from their default action (termination).
    fn listen() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for either, including one that arrived since `listen`.
    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM: draining"),
            _ = self.int.recv() => tracing::info!("SIGINT: draining"),
        }
    }
}
