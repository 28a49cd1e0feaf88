//! The engines of one role and the load-aware choice between them.
//!
//! Each request goes to the backend with the fewest requests this router has in flight there,
//! skipping those already tried for the same request; a backend that failed within the
//! cooldown is chosen only when no other is left, so a dead engine costs one failed attempt
//! per cooldown instead of one per request. Ties go to the earliest listed backend, so list
//! order is a preference. A choice made elsewhere (by prefix, [`crate::prefix`]) reads the same
//! loads and names the backend to try first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::{IntCounter, IntGauge};

use crate::config::{BaseUrl, Engine};
use crate::metrics::Metrics;

/// What a backend does for the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Computes the prompt (`max_tokens` 1) and saves its blocks to the node.
    Prefill,
    /// Generates the answer, loading the prompt's blocks from the node.
    Decode,
}

impl Role {
    /// The `role` label of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }
}

/// One engine: its URL, the router's load on it, and when it last failed.
pub struct Backend {
    /// Base URL of the engine's OpenAI-compatible server.
    pub url: BaseUrl,
    /// The fabric node id of the pegaflow-node on its host, when configured (`NODE=URL`).
    pub node: Option<String>,
    in_flight: AtomicUsize,
    last_failure: Mutex<Option<Instant>>,
    gauge: IntGauge,
    failures: IntCounter,
}

impl Backend {
    /// Requests the router has in flight on this backend.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Records a failed attempt: counted, and the backend is chosen last for a cooldown.
    pub fn failed(&self) {
        self.failures.inc();
        *self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    }

    fn load(&self, now: Instant, cooldown: Duration) -> Load {
        let cooling = self
            .last_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|failed| now.duration_since(failed) < cooldown);
        Load {
            cooling,
            in_flight: self.in_flight(),
        }
    }
}

/// A backend's load as a choice sees it; ordered as the load-only choice prefers (not cooling
/// down first, then fewer in flight).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Load {
    /// It failed within the cooldown.
    pub cooling: bool,
    /// Requests the router has in flight there.
    pub in_flight: usize,
}

/// Counts one request in flight on a backend until dropped (a streamed answer holds it until
/// its stream ends or the client goes away).
pub struct InFlight {
    /// The backend this request is on.
    pub backend: Arc<Backend>,
}

impl InFlight {
    fn start(backend: Arc<Backend>) -> Self {
        backend.in_flight.fetch_add(1, Ordering::SeqCst);
        backend.gauge.inc();
        Self { backend }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.backend.gauge.dec();
    }
}

/// The backends of one role, in the order they were listed.
pub struct Backends {
    /// Prefill or decode.
    pub role: Role,
    list: Vec<Arc<Backend>>,
    cooldown: Duration,
}

impl Backends {
    /// The backends of `engines`, exporting their load and failures in `metrics` (series that
    /// exist from start at 0).
    pub fn new(role: Role, engines: &[Engine], cooldown: Duration, metrics: &Metrics) -> Self {
        let list = engines
            .iter()
            .map(|engine| {
                let labels = [role.label(), &engine.url.to_string()];
                Arc::new(Backend {
                    url: engine.url.clone(),
                    node: engine.node.clone(),
                    in_flight: AtomicUsize::new(0),
                    last_failure: Mutex::new(None),
                    gauge: metrics.backend_in_flight.with_label_values(&labels),
                    failures: metrics.backend_failures_total.with_label_values(&labels),
                })
            })
            .collect();
        Self {
            role,
            list,
            cooldown,
        }
    }

    /// `preferred` when given and not in `tried`, else the least loaded backend whose index is
    /// not in `tried`; counted in flight at once. None when every backend was tried.
    pub fn choose(&self, tried: &[usize], preferred: Option<usize>) -> Option<(usize, InFlight)> {
        let preferred = preferred
            .filter(|index| !tried.contains(index))
            .and_then(|index| Some((index, self.list.get(index)?)));
        let (index, backend) = preferred.or_else(|| self.least_loaded(tried))?;
        Some((index, InFlight::start(backend.clone())))
    }

    /// The least loaded backend whose index is not in `tried`, not counted in flight.
    pub fn least_loaded(&self, tried: &[usize]) -> Option<(usize, &Arc<Backend>)> {
        let now = Instant::now();
        self.list
            .iter()
            .enumerate()
            .filter(|(index, _)| !tried.contains(index))
            .min_by_key(|(index, backend)| (backend.load(now, self.cooldown), *index))
    }

    /// Each backend's load now, in list order.
    pub fn loads(&self) -> Vec<Load> {
        let now = Instant::now();
        self.list
            .iter()
            .map(|backend| backend.load(now, self.cooldown))
            .collect()
    }

    /// Each backend's node id (`NODE=URL`), in list order.
    pub fn nodes(&self) -> impl Iterator<Item = Option<&str>> {
        self.list.iter().map(|backend| backend.node.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16, cooldown: Duration) -> (Backends, Metrics) {
        let engines: Vec<Engine> = (0..n)
            .map(|i| Engine::parse(&format!("http://127.0.0.1:{}", 9000 + i)).expect("url"))
            .collect();
        let metrics = Metrics::new().expect("metrics");
        (
            Backends::new(Role::Decode, &engines, cooldown, &metrics),
            metrics,
        )
    }

    #[test]
    fn the_least_loaded_untried_backend_wins_and_ties_go_to_the_first() {
        let (backends, _metrics) = backends(3, Duration::from_secs(60));
        let (first, held_first) = backends.choose(&[], None).expect("a backend");
        assert_eq!(first, 0);
        let (second, held_second) = backends.choose(&[], None).expect("a backend");
        assert_eq!(second, 1);
        assert_eq!(backends.choose(&[], None).expect("a backend").0, 2);
        drop(held_second);
        assert_eq!(backends.choose(&[], None).expect("a backend").0, 1);
        assert_eq!(backends.choose(&[1], None).expect("a backend").0, 2);
        assert!(backends.choose(&[0, 1, 2], None).is_none());
        drop(held_first);
    }

    #[test]
    fn a_preferred_untried_backend_goes_first_whatever_its_load() {
        let (backends, _metrics) = backends(3, Duration::from_secs(60));
        let (_, _held) = backends.choose(&[], Some(2)).expect("a backend");
        assert_eq!(
            backends.loads(),
            [0, 0, 1].map(|in_flight| Load {
                cooling: false,
                in_flight
            })
        );
        assert_eq!(backends.choose(&[], Some(2)).expect("preferred").0, 2);
        assert_eq!(backends.choose(&[2], Some(2)).expect("tried").0, 0);
        assert_eq!(backends.choose(&[], Some(9)).expect("unknown").0, 0);
    }

    #[test]
    fn in_flight_counts_until_the_guard_drops_and_shows_in_the_gauge() {
        let (backends, metrics) = backends(1, Duration::from_secs(60));
        let (_, guard) = backends.choose(&[], None).expect("a backend");
        assert_eq!(guard.backend.in_flight(), 1);
        assert!(metrics.render().contains(
            r#"pegaflow_router_backend_in_flight{backend="http://127.0.0.1:9000",role="decode"} 1"#
        ));
        let backend = guard.backend.clone();
        drop(guard);
        assert_eq!(backend.in_flight(), 0);
    }

    #[test]
    fn a_failed_backend_is_chosen_last_during_its_cooldown() {
        let (backends, _metrics) = backends(2, Duration::from_secs(60));
        let (_, guard) = backends.choose(&[], None).expect("a backend");
        guard.backend.failed();
        drop(guard);
        assert_eq!(backends.choose(&[], None).expect("a backend").0, 1);
        assert_eq!(
            backends.choose(&[1], None).expect("the failed one, last").0,
            0
        );

        let (backends, _metrics) = self::backends(2, Duration::ZERO);
        let (_, guard) = backends.choose(&[], None).expect("a backend");
        guard.backend.failed();
        drop(guard);
        assert_eq!(backends.choose(&[], None).expect("cooled down").0, 0);
    }
}
