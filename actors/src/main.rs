//! `pegaflow-node`: parse the config, start the node, wait for SIGTERM/SIGINT, drain.

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let config = loaded.config;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(&config.log.level))
        .with_writer(std::io::stderr)
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
                tracing::error!(%error, "cannot start");
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

async fn wait_for_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
    Ok(())
}
