//! Logs and traces of `sandpit serve` / `sandpit node`: the log lines on stderr (`RUST_LOG`,
//! `--log-json`) and, with `--otlp-endpoint`, the server's spans (HTTP requests, lifecycle
//! operations, runsc, agent calls: see `sandpit_server::trace` and
//! `sandpit_control::trace`) exported over OTLP/HTTP (protobuf) to a collector, with the W3C
//! `traceparent` of incoming requests honoured.
//!
//! Export is off the request path: an ended span is handed to a bounded queue
//! ([`QUEUE_SPANS`]) and a task sends batches. When the collector is slow or unreachable the
//! queue fills and further spans are dropped, counted, and reported in a warning at most once
//! a minute, like failed exports; a request never waits for the collector. [`Telemetry::
//! shutdown`] sends what is queued before the process exits. Without an endpoint no
//! OpenTelemetry layer is installed: the spans (debug level) are disabled where they are made.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use tokio::sync::mpsc;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// Most ended spans waiting for export; past it spans are dropped.
const QUEUE_SPANS: usize = 4096;
/// Most spans in one export request.
const BATCH_SPANS: usize = 512;
/// How long an ended span waits at most before it is sent.
const BATCH_DELAY: Duration = Duration::from_secs(1);
/// How long one export may take (the collector's answer included).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// At most one warning about dropped spans or failed exports per this.
const WARN_EVERY: Duration = Duration::from_secs(60);
/// How long shutdown waits for the last spans to be sent.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The installed logging and, when exporting, the tracer provider to flush at exit.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Send the spans still queued (at most [`SHUTDOWN_TIMEOUT`]) and stop exporting.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else {
            return;
        };
        // The processor's shutdown blocks until its task has sent the queue: off the
        // runtime's worker threads, so that task can run.
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "traces: sending the last spans");
        }
    }
}

/// Install the global subscriber: log lines on stderr and, with `otlp_endpoint` (the
/// collector's base URL, `/v1/traces` appended unless given), the span export. Must be
/// called inside the Tokio runtime.
pub fn init(log_json: bool, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = if log_json {
        fmt.json().boxed()
    } else {
        fmt.boxed()
    };
    let provider = otlp_endpoint.map(provider).transpose()?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("sandpit"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            // Only this code's spans: not its log events (which may quote what a tenant
            // sent), nor other crates' spans.
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                meta.is_span() && meta.target().starts_with("sandpit")
            }))
    });
    tracing_subscriber::registry()
        .with(otel)
        .with(fmt.with_filter(filter))
        .init();
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
    }
    Ok(Telemetry { provider })
}

/// The OTLP/HTTP endpoint for traces: `base` as the OpenTelemetry exporters read
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, `/v1/traces` appended unless it is there.
pub fn traces_url(base: &str) -> anyhow::Result<String> {
    let uri: http::Uri = base
        .parse()
        .with_context(|| format!("--otlp-endpoint {base:?}"))?;
    anyhow::ensure!(
        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some(),
        "--otlp-endpoint {base:?}: give http(s)://host:port"
    );
    let base = base.trim_end_matches('/');
    Ok(if base.ends_with("/v1/traces") {
        base.to_string()
    } else {
        format!("{base}/v1/traces")
    })
}

fn provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let url = traces_url(endpoint)?;
    let http = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .build()
        .context("traces: building the HTTP client")?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .with_http_client(ReqwestClient(http))
        .build()
        .context("traces: building the OTLP exporter")?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "sandpit".into());
    let resource = Resource::builder().with_service_name(service).build();
    tracing::debug!(endpoint = %url, "traces: exporting over OTLP/HTTP");
    Ok(SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(Batcher::spawn(exporter, url))
        .build())
}

/// The exporter's HTTP client: the workspace's reqwest (rustls), on the Tokio runtime the
/// batch task runs on.
#[derive(Debug)]
struct ReqwestClient(reqwest::Client);

/// Largest collector answer read (an OTLP answer is a few bytes; a partial-success message
/// a few hundred).
const MAX_ANSWER: usize = 64 * 1024;

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ReqwestClient {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let mut resp = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let mut answer = http::Response::builder().status(resp.status());
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await? {
            let room = MAX_ANSWER.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if let Some(headers) = answer.headers_mut() {
            *headers = std::mem::take(resp.headers_mut());
        }
        Ok(answer.body(bytes::Bytes::from(body))?)
    }
}

/// What the batch task is asked besides spans.
enum Control {
    /// Send what is queued, then answer.
    Flush(std::sync::mpsc::SyncSender<OTelSdkResult>),
    /// Send what is queued, shut the exporter down, answer and end.
    Shutdown(std::sync::mpsc::SyncSender<OTelSdkResult>),
    /// The provider's resource, for the exporter.
    Resource(Resource),
}

/// The span processor: a bounded queue in front of a Tokio task that exports in batches
/// (the SDK's own batch processor runs the exporter on a thread of its own with a blocking
/// executor, where the async HTTP client has no runtime).
#[derive(Debug)]
struct Batcher {
    spans: mpsc::Sender<SpanData>,
    control: mpsc::UnboundedSender<Control>,
    /// Spans dropped because the queue was full, reported by the task.
    dropped: Arc<AtomicU64>,
}

impl Batcher {
    /// Start the batch task (on the current Tokio runtime). It ends at shutdown, or when the
    /// processor is dropped.
    fn spawn<E: SpanExporter + 'static>(exporter: E, endpoint: String) -> Batcher {
        let (spans, rx) = mpsc::channel(QUEUE_SPANS);
        let (control, control_rx) = mpsc::unbounded_channel();
        let dropped = Arc::new(AtomicU64::new(0));
        let task = BatchTask {
            exporter,
            endpoint,
            spans: rx,
            control: control_rx,
            dropped: dropped.clone(),
            batch: Vec::with_capacity(BATCH_SPANS),
            warned: None,
            failed: 0,
            reported_drops: 0,
        };
        tokio::spawn(task.run());
        Batcher {
            spans,
            control,
            dropped,
        }
    }

    /// Ask the task for `what` and wait for its answer (at most `timeout`).
    fn ask(
        &self,
        what: fn(std::sync::mpsc::SyncSender<OTelSdkResult>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.control
            .send(what(tx))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        match rx.recv_timeout(timeout) {
            Ok(answer) => answer,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(OTelSdkError::AlreadyShutdown)
            }
        }
    }
}

impl SpanProcessor for Batcher {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    /// Never blocks: a full queue drops the span (counted; the task warns).
    fn on_end(&self, span: SpanData) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.spans.try_send(span) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(Control::Flush, EXPORT_TIMEOUT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.ask(Control::Shutdown, timeout.min(SHUTDOWN_TIMEOUT))
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.control.send(Control::Resource(resource.clone()));
    }
}

/// The export task of a [`Batcher`].
struct BatchTask<E> {
    exporter: E,
    endpoint: String,
    spans: mpsc::Receiver<SpanData>,
    control: mpsc::UnboundedReceiver<Control>,
    dropped: Arc<AtomicU64>,
    batch: Vec<SpanData>,
    /// When the last warning was given.
    warned: Option<Instant>,
    /// Exports failed since the last warning.
    failed: u64,
    /// `dropped` at the last warning.
    reported_drops: u64,
}

impl<E: SpanExporter> BatchTask<E> {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(BATCH_DELAY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                control = self.control.recv() => match control {
                    Some(Control::Resource(r)) => self.exporter.set_resource(&r),
                    Some(Control::Flush(answer)) => {
                        let sent = self.drain().await;
                        let _ = answer.send(sent);
                    }
                    Some(Control::Shutdown(answer)) => {
                        let sent = self.drain().await;
                        let _ = self.exporter.shutdown();
                        let _ = answer.send(sent);
                        return;
                    }
                    // The processor is gone (dropped without shutdown).
                    None => {
                        let _ = self.drain().await;
                        return;
                    }
                },
                span = self.spans.recv() => match span {
                    Some(span) => {
                        self.batch.push(span);
                        if self.batch.len() >= BATCH_SPANS {
                            let _ = self.export().await;
                        }
                    }
                    None => {
                        let _ = self.drain().await;
                        return;
                    }
                },
                _ = tick.tick() => {
                    if !self.batch.is_empty() {
                        let _ = self.export().await;
                    }
                    self.warn_if_due(false);
                }
            }
        }
    }

    /// Send everything queued now.
    async fn drain(&mut self) -> OTelSdkResult {
        let mut result = Ok(());
        loop {
            while self.batch.len() < BATCH_SPANS {
                match self.spans.try_recv() {
                    Ok(span) => self.batch.push(span),
                    Err(_) => break,
                }
            }
            if self.batch.is_empty() {
                break;
            }
            if let Err(e) = self.export().await {
                result = Err(e);
            }
        }
        self.warn_if_due(true);
        result
    }

    /// Send the current batch (gone either way).
    async fn export(&mut self) -> OTelSdkResult {
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(BATCH_SPANS));
        let n = batch.len();
        let result = match tokio::time::timeout(EXPORT_TIMEOUT, self.exporter.export(batch)).await {
            Ok(result) => result,
            Err(_) => Err(OTelSdkError::Timeout(EXPORT_TIMEOUT)),
        };
        if let Err(e) = &result {
            self.failed += 1;
            if self.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                tracing::warn!(
                    endpoint = %self.endpoint,
                    error = %e,
                    spans = n,
                    failed_exports = self.failed,
                    "traces: export to the collector failed; its spans are dropped (next warning in a minute at the earliest)"
                );
                self.warned = Some(Instant::now());
                self.failed = 0;
            }
        }
        result
    }

    /// Warn about spans dropped on a full queue since the last such warning, at most once
    /// per [`WARN_EVERY`] (or now, when `now`: at shutdown).
    fn warn_if_due(&mut self, now: bool) {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped == self.reported_drops
            || !(now || self.warned.is_none_or(|t| t.elapsed() >= WARN_EVERY))
        {
            return;
        }
        tracing::warn!(
            endpoint = %self.endpoint,
            dropped = dropped - self.reported_drops,
            "traces: the export queue was full (the collector is slow or unreachable); spans were dropped"
        );
        self.reported_drops = dropped;
        self.warned = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{Tracer as _, TracerProvider as _};

    use super::*;

    /// An exporter that keeps what it is sent, or (`stuck`) never answers.
    #[derive(Debug, Clone, Default)]
    struct Recording {
        got: Arc<std::sync::Mutex<Vec<String>>>,
        stuck: bool,
    }

    impl SpanExporter for Recording {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            if self.stuck {
                std::future::pending::<()>().await;
            }
            let mut got = self.got.lock().unwrap();
            got.extend(batch.into_iter().map(|s| s.name.into_owned()));
            Ok(())
        }
    }

    fn provider_over(exporter: Recording) -> SdkTracerProvider {
        SdkTracerProvider::builder()
            .with_span_processor(Batcher::spawn(exporter, "test".into()))
            .build()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_sends_what_is_queued() {
        let exporter = Recording::default();
        let provider = provider_over(exporter.clone());
        let tracer = provider.tracer("t");
        for i in 0..(BATCH_SPANS + 10) {
            tracer.in_span(format!("s{i}"), |_| {});
        }
        let telemetry = Telemetry {
            provider: Some(provider),
        };
        telemetry.shutdown().await;
        let got = exporter.got.lock().unwrap();
        assert_eq!(got.len(), BATCH_SPANS + 10);
        assert_eq!(got[0], "s0");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stuck_collector_drops_spans_and_never_blocks() {
        let exporter = Recording {
            stuck: true,
            ..Default::default()
        };
        let processor = Batcher::spawn(exporter.clone(), "test".into());
        let dropped = processor.dropped.clone();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .build();
        let tracer = provider.tracer("t");
        // One batch goes to the stuck export; the queue fills behind it.
        let started = Instant::now();
        let n = QUEUE_SPANS + 2 * BATCH_SPANS;
        for i in 0..n {
            tracer.in_span(format!("s{i}"), |_| {});
            if i == BATCH_SPANS {
                // Let the task take the first batch into the stuck export.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "ending spans waited"
        );
        let dropped = dropped.load(Ordering::Relaxed);
        assert!(
            dropped > 0 && dropped < n as u64,
            "dropped {dropped} of {n}"
        );
        assert!(exporter.got.lock().unwrap().is_empty());
        // Shutdown gives up on the stuck export after its timeout.
        let _ = provider.shutdown_with_timeout(Duration::from_millis(100));
    }

    #[test]
    fn traces_urls() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example:4318/").unwrap(),
            "https://otel.example:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/prefix").unwrap(),
            "http://c:4318/prefix/v1/traces"
        );
        for bad in ["", "c:4318", "ftp://c/", "not a url"] {
            assert!(traces_url(bad).is_err(), "{bad}");
        }
    }
}
