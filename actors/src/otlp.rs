//! OTLP export (gRPC) of the node's metrics and of one trace span per socket request, when
//! `otlp.endpoint` is set (docs/design.md §8). Off by default; when off nothing here runs and the only
//! cost on a request is one empty `OnceLock` read in [`Metrics`].
//!
//! Metrics are not defined twice: every counter and gauge of the Prometheus registry is
//! bridged as an observable instrument of the same name, read at each export. Histograms
//! cannot be observed after the fact (OTLP wants the raw observations), so the latency
//! histograms are also recorded, with the same buckets, through [`OtlpHooks`] as they happen.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::metrics::{Histogram, Meter, MeterProvider as _};
use opentelemetry::trace::{Span as _, SpanKind, Status, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use pegaflow_config::OtlpConfig;
use prometheus::proto::{MetricFamily, MetricType};
use prometheus::Registry;

use crate::metrics::{Metrics, LAYER_BUCKETS, REQUEST_BUCKETS, TRANSFER_BUCKETS};
use crate::protocol::{ProtoError, ReplyBody};

/// Why OTLP export could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot export OTLP to otlp.endpoint {endpoint}: {reason}")]
pub struct OtlpError {
    endpoint: String,
    reason: String,
}

/// What request handling and copies feed to OTLP as they happen.
pub struct OtlpHooks {
    tracer: SdkTracer,
    request_seconds: Histogram<f64>,
    transfer_seconds: Histogram<f64>,
    layer_seconds: Histogram<f64>,
}

impl OtlpHooks {
    /// One span per request (`pegaflow.<op>`), timed from arrival to reply, plus its latency.
    pub fn request_done(
        &self,
        op: &'static str,
        elapsed: Duration,
        result: &Result<ReplyBody, ProtoError>,
    ) {
        let op_attr = KeyValue::new("op", op);
        self.request_seconds
            .record(elapsed.as_secs_f64(), std::slice::from_ref(&op_attr));
        let end = SystemTime::now();
        let mut attributes = vec![op_attr];
        attributes.extend(reply_attributes(result));
        let mut span = self
            .tracer
            .span_builder(format!("pegaflow.{op}"))
            .with_kind(SpanKind::Server)
            .with_start_time(end.checked_sub(elapsed).unwrap_or(end))
            .with_attributes(attributes)
            .start(&self.tracer);
        if let Err(error) = result {
            span.set_status(Status::error(error.code.as_str()));
        }
        span.end_with_timestamp(end);
    }

    /// The latency of one copy job; `labels` are `[device, direction]`.
    pub fn transfer_done(&self, labels: &[&str; 2], took: Duration) {
        self.transfer_seconds.record(
            took.as_secs_f64(),
            &[
                KeyValue::new("device", labels[0].to_string()),
                KeyValue::new("direction", labels[1].to_string()),
            ],
        );
    }

    /// The latency of one layer of a copy job; `direction` is `save` or `load`.
    pub fn layer_done(&self, direction: &'static str, took: Duration) {
        self.layer_seconds
            .record(took.as_secs_f64(), &[KeyValue::new("direction", direction)]);
    }
}

/// What a reply says about the work done, as span attributes.
fn reply_attributes(result: &Result<ReplyBody, ProtoError>) -> Vec<KeyValue> {
    let count = |name: &'static str, n: u32| KeyValue::new(name, i64::from(n));
    match result {
        Ok(ReplyBody::Lookup(r)) => {
            vec![count("hit_blocks", r.hits), count("ssd_blocks", r.ssd_hits)]
        }
        Ok(ReplyBody::Save(r)) => vec![
            count("stored_blocks", r.stored),
            count("present_blocks", r.present),
            count("dropped_blocks", r.dropped),
        ],
        Ok(ReplyBody::Load(r)) => vec![count("loaded_blocks", r.loaded)],
        Ok(_) => Vec::new(),
        Err(error) => vec![KeyValue::new("error.code", error.code.as_str())],
    }
}

/// A running exporter; [`Exporter::shutdown`] flushes what is still queued.
pub struct Exporter {
    meters: SdkMeterProvider,
    tracers: SdkTracerProvider,
}

impl Exporter {
    /// Starts export when `otlp.endpoint` is set; `None` (and no work at all) otherwise.
    /// Must run inside the node's tokio runtime: the gRPC client lives on it.
    pub fn start(config: &OtlpConfig, metrics: &Arc<Metrics>) -> Result<Option<Self>, OtlpError> {
        let Some(endpoint) = config.endpoint.clone() else {
            return Ok(None);
        };
        let fail = |reason: String| OtlpError {
            endpoint: endpoint.clone(),
            reason,
        };
        let interval = Duration::from_millis(config.interval_ms.max(1));
        let resource = Resource::builder()
            .with_service_name("pegaflow-node")
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        let metric_exporter = opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let meters = SdkMeterProvider::builder()
            .with_reader(
                PeriodicReader::builder(metric_exporter)
                    .with_interval(interval)
                    .build(),
            )
            .with_resource(resource.clone())
            .build();
        let span_exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let spans = BatchSpanProcessor::builder(span_exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(interval)
                    .build(),
            )
            .build();
        let tracers = SdkTracerProvider::builder()
            .with_span_processor(spans)
            .with_resource(resource)
            .build();
        let meter = meters.meter("pegaflow-node");
        bridge_registry(&meter, metrics.registry());
        metrics.set_otlp(OtlpHooks {
            tracer: tracers.tracer("pegaflow-node"),
            request_seconds: seconds_histogram(
                &meter,
                metrics,
                "pegaflow_request_duration_seconds",
                &REQUEST_BUCKETS,
            ),
            transfer_seconds: seconds_histogram(
                &meter,
                metrics,
                "pegaflow_transfer_duration_seconds",
                &TRANSFER_BUCKETS,
            ),
            layer_seconds: seconds_histogram(
                &meter,
                metrics,
                "pegaflow_transfer_layer_duration_seconds",
                &LAYER_BUCKETS,
            ),
        });
        tracing::info!(%endpoint, interval_ms = config.interval_ms, "exporting metrics and traces over OTLP");
        Ok(Some(Self { meters, tracers }))
    }

    /// Exports what is pending and stops. Blocks while flushing, so it runs on a blocking
    /// thread, leaving the runtime free to drive the gRPC calls.
    pub async fn shutdown(self) {
        let flushed = tokio::task::spawn_blocking(move || {
            let spans = self.tracers.shutdown();
            let metrics = self.meters.shutdown();
            spans.and(metrics)
        })
        .await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "OTLP export did not flush"),
            Err(error) => tracing::warn!(%error, "OTLP shutdown task failed"),
        }
    }
}

/// A histogram instrument mirroring the Prometheus histogram `name` (help and buckets).
fn seconds_histogram(
    meter: &Meter,
    metrics: &Metrics,
    name: &'static str,
    buckets: &[f64],
) -> Histogram<f64> {
    meter
        .f64_histogram(name)
        .with_description(help_of(metrics.registry(), name))
        .with_unit("s")
        .with_boundaries(buckets.to_vec())
        .build()
}

fn help_of(registry: &Registry, name: &str) -> String {
    registry
        .gather()
        .iter()
        .find(|family| family.name() == name)
        .map(|family| family.help().to_string())
        .unwrap_or_default()
}

/// Registers one observable instrument per counter and gauge family of `registry`, each
/// reading its family at export time.
fn bridge_registry(meter: &Meter, registry: &Registry) {
    for family in registry.gather() {
        let name: Cow<'static, str> = family.name().to_string().into();
        let help = family.help().to_string();
        let source = registry.clone();
        let wanted = name.to_string();
        let read = move || {
            source
                .gather()
                .into_iter()
                .find(|family| family.name() == wanted)
        };
        match family.get_field_type() {
            MetricType::COUNTER => {
                meter
                    .f64_observable_counter(name)
                    .with_description(help)
                    .with_callback(move |observer| {
                        for (value, attributes) in read().iter().flat_map(samples) {
                            observer.observe(value, &attributes);
                        }
                    })
                    .build();
            }
            MetricType::GAUGE => {
                meter
                    .f64_observable_gauge(name)
                    .with_description(help)
                    .with_callback(move |observer| {
                        for (value, attributes) in read().iter().flat_map(samples) {
                            observer.observe(value, &attributes);
                        }
                    })
                    .build();
            }
            // Histograms are recorded as they happen (OtlpHooks); the node has no summaries.
            _ => {}
        }
    }
}

/// Each series of a counter or gauge family: its value and its labels as attributes.
fn samples(family: &MetricFamily) -> Vec<(f64, Vec<KeyValue>)> {
    family
        .get_metric()
        .iter()
        .map(|metric| {
            let value = match family.get_field_type() {
                MetricType::COUNTER => metric.get_counter().get_value(),
                _ => metric.get_gauge().get_value(),
            };
            let attributes = metric
                .get_label()
                .iter()
                .map(|label| KeyValue::new(label.name().to_string(), label.value().to_string()))
                .collect();
            (value, attributes)
        })
        .collect()
}
