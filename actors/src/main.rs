//! `pegaflow-node`: parse the config, start the node, wait for SIGTERM/SIGINT, drain.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use pegaflow_config::ConfigArgs;
use tokio::signal::unix::{signal, SignalKind};

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
        let node = match pegaflow_actors::node::start(&config).await {
            Ok(node) => node,
            Err(error) => {
                eprintln!("pegaflow-node: {error}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(error) = wait_for_signal().await {
            tracing::error!(%error, "cannot listen for signals; shutting down");
        }
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

async fn wait_for_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    Ok(())
}
