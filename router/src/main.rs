//! `pegaflow-router`: parse flags, serve until SIGTERM or SIGINT (docs/pd.md).

use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use pegaflow_router::config::Args;
use pegaflow_router::http::app;
use pegaflow_router::pd::PdRouter;
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_new(&args.log_level)
        .with_context(|| format!("--log-level `{}`", args.log_level))?;
    tracing_subscriber::fmt().with_env_filter(filter).init();
    let router = Arc::new(PdRouter::new(&args).context("registering metrics")?);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot bind", args.listen))?;
    let prefill: Vec<String> = args.prefill.iter().map(ToString::to_string).collect();
    let decode: Vec<String> = args.decode.iter().map(ToString::to_string).collect();
    tracing::info!(listen = %args.listen, ?prefill, ?decode, node = %args.node_http,
                   "pegaflow-router serving");
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    axum::serve(listener, app(router))
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        })
        .await
        .context("serving")
}
