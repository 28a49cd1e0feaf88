//! OTLP export through the real gRPC protocol: a small collector built from opentelemetry-proto
//! receives what a node with `otlp.endpoint` set exports during a save / lookup / load.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use opentelemetry_proto::tonic::metrics::v1::number_data_point;
use opentelemetry_proto::tonic::trace::v1::Span;
use pegaflow_actors::client::Client;
use pegaflow_actors::keys::chain_keys;
use pegaflow_actors::node::start;
use pegaflow_config::{NodeConfig, Size};
use support::ShmRegion;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};

/// Everything the collector received, in arrival order.
#[derive(Clone, Default)]
struct Received {
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    spans: Arc<Mutex<Vec<Span>>>,
}

#[tonic::async_trait]
impl MetricsService for Received {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans = request
            .into_inner()
            .resource_spans
            .into_iter()
            .flat_map(|r| r.scope_spans)
            .flat_map(|s| s.spans);
        self.spans.lock().unwrap().extend(spans);
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Received {
    /// `read` applied to the latest export of metric `name`.
    fn latest<T>(&self, name: &str, read: impl FnOnce(&Data) -> Option<T>) -> Option<T> {
        let batches = self.metrics.lock().unwrap();
        let metric = batches
            .iter()
            .rev()
            .flat_map(|b| &b.resource_metrics)
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .find(|m| m.name == name)?;
        read(metric.data.as_ref()?)
    }

    /// The latest exported value of sum or gauge `name` (first data point).
    fn number(&self, name: &str) -> Option<f64> {
        let point = self.latest(name, |data| match data {
            Data::Sum(sum) => sum.data_points.first().cloned(),
            Data::Gauge(gauge) => gauge.data_points.first().cloned(),
            _ => None,
        })?;
        match point.value? {
            number_data_point::Value::AsDouble(v) => Some(v),
            number_data_point::Value::AsInt(v) => Some(v as f64),
        }
    }

    /// Total count of histogram `name` over its data points, from the latest export of it.
    fn histogram_count(&self, name: &str) -> Option<u64> {
        self.latest(name, |data| match data {
            Data::Histogram(h) => Some(h.data_points.iter().map(|p| p.count).sum()),
            _ => None,
        })
    }

    fn span(&self, name: &str) -> Option<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| s.name == name)
            .cloned()
    }
}

fn int_attribute(span: &Span, key: &str) -> Option<i64> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            Value::IntValue(v) => Some(*v),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_receives_the_nodes_metrics_and_spans() {
    let received = Received::default();
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).expect("bind collector");
    let collector_addr = incoming.local_addr().expect("collector addr");
    let collector = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(received.clone()))
            .add_service(TraceServiceServer::new(received.clone()))
            .serve_with_incoming(incoming),
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = NodeConfig::default();
    config.socket.path = dir.path().join("node.sock");
    config.http.addr = "127.0.0.1:0".parse().unwrap();
    config.pool.size = Size::mib(64);
    config.pool.max_page_size = Size::mib(64);
    config.otlp.endpoint = Some(format!("http://{collector_addr}"));
    config.otlp.interval_ms = 200;
    let node = start(&config).await.expect("node starts");

    let region = ShmRegion::new("otlp", "vllm_lbnhc", 3, 8);
    let mut client = Client::connect(node.socket_path()).await.expect("connect");
    let engine = client
        .register(region.register_request())
        .await
        .expect("register");
    let ns: [u8; 32] = engine.namespace.clone().try_into().expect("32 bytes");
    let keys = chain_keys(&ns, &(0..16 * 5).collect::<Vec<u32>>(), 16);
    let saved = client
        .save(engine.engine, &keys, &[0, 1, 2, 3, 4])
        .await
        .expect("save");
    assert_eq!(saved.stored, 5);
    assert_eq!(client.lookup(&keys, false).await.expect("lookup").hits, 5);
    let loaded = client
        .load(engine.engine, &keys, &[5, 6, 7, 0, 1])
        .await
        .expect("load");
    assert_eq!(loaded.loaded, 5);

    // Periodic exports carry the counters; the shutdown flushes the last spans.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while received.number("pegaflow_loaded_blocks_total") != Some(5.0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no export with pegaflow_loaded_blocks_total = 5 within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(client);
    node.shutdown().await;
    collector.abort();

    assert_eq!(received.number("pegaflow_saved_blocks_total"), Some(5.0));
    assert_eq!(received.number("pegaflow_pool_pages"), Some(5.0));
    assert_eq!(
        received.number("pegaflow_pool_capacity_bytes"),
        Some((64u64 << 20) as f64)
    );
    assert!(
        received
            .histogram_count("pegaflow_request_duration_seconds")
            .is_some_and(|n| n >= 4),
        "request latency histogram exported"
    );
    assert_eq!(
        received.histogram_count("pegaflow_transfer_duration_seconds"),
        Some(2),
        "one save and one load copy job"
    );
    assert_eq!(
        received.histogram_count("pegaflow_transfer_layer_duration_seconds"),
        Some(3 * 2),
        "one observation per layer (3) of each copy job (a save and a load)"
    );
    let lookup = received.span("pegaflow.lookup").expect("lookup span");
    assert_eq!(int_attribute(&lookup, "hit_blocks"), Some(5));
    assert!(lookup.end_time_unix_nano >= lookup.start_time_unix_nano);
    let save = received.span("pegaflow.save").expect("save span");
    assert_eq!(int_attribute(&save, "stored_blocks"), Some(5));
    let load = received.span("pegaflow.load").expect("load span");
    assert_eq!(int_attribute(&load, "loaded_blocks"), Some(5));
}
