//! Lifecycle spans: `sandbox.create` (with the path it took: pool, snapshot, boot snapshot
//! or cold), `sandbox.wake`, `sandbox.hibernate` and `sandbox.fork`, opened by the same
//! wrappers that time the operations for the metrics; the runtime (`runsc.*`) and agent
//! (`agent.*`) spans below them come from `sandpit-runtime-gvisor` and [`crate::agent`].
//!
//! They are `tracing` spans at debug level, exported only when the binary installs an
//! OpenTelemetry layer (`sandpit serve --otlp-endpoint`); otherwise they are disabled where
//! they are made.
//!
//! **Invariant:** span attributes are store-issued ids (`sandbox.id`, `sandbox.template_id`)
//! and fixed words, never a tenant's bytes (file contents or paths, environment values,
//! tokens, command lines) and never an error message, which may quote them.

/// Mark `span` failed when `result` is an error. The span must declare `otel.status_code`.
pub fn outcome<T, E>(span: &tracing::Span, result: &Result<T, E>) {
    if result.is_err() {
        span.record("otel.status_code", "ERROR");
    }
}
