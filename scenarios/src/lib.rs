//! `pegaflow-scenarios`: the scenario replay harness (docs/design.md §3). A scenario file names a
//! cluster of real `pegaflow-node` processes on loopback, a workload (a Mooncake-format trace
//! or a seeded generator), a fault schedule and what to report. Simulated engines replay the
//! workload through the real socket protocol, faults hit the real processes and files, and the
//! run ends in a JSON and an HTML report. It answers "what would PegaFlow do for my workload?"
//! and proves the node survives faults.
//!
//! One concept per module: [`scenario`] (the file), [`workload`] (traces, generators, tokens and
//! keys), [`engine`] with [`region`] and [`content`] (the simulated engine), [`router`],
//! [`cluster`] (node processes, their fabric) with [`http`] and [`proxy`] (the link proxy
//! link faults switch), [`faults`], [`replay`] (the event loop), [`report`] (JSON and HTML)
//! and [`progress`].

pub mod cluster;
pub mod content;
pub mod engine;
pub mod error;
mod faults;
pub mod http;
pub mod progress;
pub mod proxy;
pub mod region;
pub mod replay;
pub mod report;
pub mod router;
pub mod scenario;
pub mod workload;

pub use error::ScenarioError;
pub use replay::{run, Options};
pub use report::json::Report;
pub use scenario::Scenario;
