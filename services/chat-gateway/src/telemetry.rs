//! Logs (tracing, text or JSON) and the Prometheus recorder behind `/metrics`.

use crate::config::LogFormat;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// Installs the log subscriber once; `RUST_LOG` overrides the default level.
pub fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // These crates log statement parameters, frames or commands at debug/trace: message
    // bodies, password hashes and tokens. Never below info, whatever RUST_LOG says.
    for quiet in QUIET_CRATES {
        if let Ok(directive) = format!("{quiet}=info").parse() {
            filter = filter.add_directive(directive);
        }
    }
    // Colour codes only for a terminal: in a file or a log collector they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Dependencies capped at `info` in the logs (see `init_logs`).
const QUIET_CRATES: [&str; 8] = [
    "tokio_postgres",
    "deadpool_postgres",
    "rusqlite",
    "redis",
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "axum",
];

/// Latency buckets from 100 µs to 10 s: chat fan-out is sub-millisecond when healthy.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Messages per group commit, 1 to the largest sensible CHAT_DB_COMMIT_BATCH.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Renders `/metrics`: the recorder's series plus the process's own (CPU, memory, fds) and
/// the store's pool gauges, read at scrape time.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    process: std::sync::Arc<metrics_process::Collector>,
}

impl Exporter {
    pub fn new() -> Self {
        // The recorder first: descriptions given before it exists are lost, and `/metrics`
        // would have no HELP lines.
        let handle = metrics_handle();
        let process = metrics_process::Collector::default();
        process.describe();
        describe();
        Exporter {
            handle,
            process: std::sync::Arc::new(process),
        }
    }

    pub fn render(&self, store: &dyn crate::store::Store) -> String {
        self.process.collect();
        store.record_pool_metrics();
        self.handle.render()
    }
}

impl Default for Exporter {
    fn default() -> Self {
        Self::new()
    }
}

/// Creates every series at zero, so dashboards and alerts see a replica's counters before
/// their first event (a series that does not exist reads as "no data", not 0).
pub fn register_series(gateway: &str) {
    let counters = [
        "chat_connections_opened_total",
        "chat_connections_refused_total",
        "chat_frames_written_total",
        "chat_messages_committed_total",
        "chat_messages_delivered_total",
        "chat_rate_limited_total",
        "chat_slow_consumers_total",
        "chat_redis_reconnects_total",
        "chat_resyncs_total",
        "chat_gaps_detected_total",
        "chat_gap_fills_total",
        "chat_room_queue_overflows_total",
        "chat_publish_failures_total",
        "chat_bus_events_unreadable_total",
        "chat_store_errors_total",
        "chat_store_connections_discarded_total",
        "chat_store_resend_batches_total",
    ];
    for name in counters {
        metrics::counter!(name).absolute(0);
    }
    for code in chat_protocol::ErrorCode::ALL {
        metrics::counter!("chat_errors_sent_total", "code" => code.as_str()).absolute(0);
    }
    for reason in crate::ws::close_reasons() {
        metrics::counter!("chat_connections_closed_total", "reason" => reason).absolute(0);
    }
    for kind in chat_protocol::frames::CLIENT_FRAME_TYPES
        .into_iter()
        .chain(OTHER_FRAME_TYPES)
    {
        metrics::counter!("chat_frames_received_total", "type" => kind).absolute(0);
    }
    for gauge in [
        "chat_connections_open",
        "chat_rooms_active",
        "chat_draining",
        "chat_presence_repairs_pending",
    ] {
        metrics::gauge!(gauge).set(0.0);
    }
    metrics::gauge!("chat_build_info", "gateway" => gateway.to_string(), "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The `type` labels of `chat_frames_received_total` besides the client frame types.
pub const OTHER_FRAME_TYPES: [&str; 2] = ["invalid", "binary"];

/// HELP texts and units of the gateway's series (docs/metrics.md says more).
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        "chat_build_info",
        "1, labelled with this replica's gateway id and version"
    );
    describe_gauge!("chat_connections_open", "WebSocket connections open now");
    describe_counter!(
        "chat_connections_opened_total",
        "WebSocket connections accepted"
    );
    describe_counter!(
        "chat_connections_closed_total",
        "WebSocket connections closed, by reason"
    );
    describe_counter!(
        "chat_connections_refused_total",
        "upgrades refused at the connection limit"
    );
    describe_counter!(
        "chat_frames_received_total",
        "client frames received, by type"
    );
    describe_counter!("chat_frames_written_total", "frames written to sockets");
    describe_counter!(
        "chat_messages_committed_total",
        "messages committed by this replica"
    );
    describe_counter!(
        "chat_messages_delivered_total",
        "messages handed to local sockets"
    );
    describe_histogram!(
        "chat_fanout_latency_seconds",
        Unit::Seconds,
        "commit to queued for every local socket, per message"
    );
    describe_histogram!(
        "chat_send_ack_seconds",
        Unit::Seconds,
        "send received to sent written to the queue"
    );
    describe_counter!("chat_errors_sent_total", "error frames sent, by code");
    describe_counter!("chat_http_errors_total", "HTTP error responses, by code");
    describe_counter!(
        "chat_rate_limited_total",
        "frames refused by the rate limit"
    );
    describe_counter!(
        "chat_slow_consumers_total",
        "connections closed because their queue overflowed"
    );
    describe_gauge!(
        "chat_rooms_active",
        "rooms with local sessions (a room task each)"
    );
    describe_gauge!("chat_subscribed_rooms", "room channels subscribed on Redis");
    describe_gauge!(
        "chat_presence_repairs_pending",
        "presence entries waiting to be written to the bus again"
    );
    describe_gauge!(
        "chat_redis_connected",
        "1 while the Redis subscription is up"
    );
    describe_counter!(
        "chat_redis_reconnects_total",
        "Redis subscription connections replaced"
    );
    describe_counter!(
        "chat_resyncs_total",
        "resubscriptions after which every room re-read the store"
    );
    describe_counter!(
        "chat_gaps_detected_total",
        "messages that arrived ahead of a missing seq"
    );
    describe_counter!(
        "chat_gap_fills_total",
        "reads of missing messages from the store"
    );
    describe_counter!(
        "chat_room_queue_overflows_total",
        "bus events dropped for a busy room (re-read from the store)"
    );
    describe_counter!(
        "chat_publish_failures_total",
        "publishes that failed after retries"
    );
    describe_counter!(
        "chat_bus_events_unreadable_total",
        "bus events this version could not read"
    );
    describe_histogram!(
        "chat_store_query_duration_seconds",
        Unit::Seconds,
        "store call latency"
    );
    describe_histogram!(
        "chat_store_commit_batch_messages",
        "messages committed per Postgres transaction (group commit)"
    );
    describe_counter!(
        "chat_store_errors_total",
        "store calls that failed or timed out"
    );
    describe_counter!(
        "chat_store_connections_discarded_total",
        "pooled connections dropped after a deadline"
    );
    describe_counter!(
        "chat_store_resend_batches_total",
        "append batches committed again because they held a resend"
    );
    describe_gauge!("chat_db_pool_max_connections", "Postgres pool size limit");
    describe_gauge!("chat_db_pool_connections", "Postgres connections open");
    describe_gauge!(
        "chat_db_pool_idle_connections",
        "Postgres connections idle in the pool"
    );
    describe_gauge!(
        "chat_db_pool_waiting",
        "calls waiting for a Postgres connection"
    );
    describe_gauge!("chat_draining", "1 while this replica drains");
    describe_gauge!(
        "chat_ready",
        "1 if the last readiness check (/readyz) passed, 0 if it failed or the replica drains"
    );
}

/// The process-wide recorder (the `metrics` facade has one global recorder).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("chat_store_commit_batch_messages".into()),
                        BATCH_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            match builder.install_recorder() {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's): render an empty one.
                Err(_) => PrometheusBuilder::new().build_recorder().handle(),
            }
        })
        .clone()
}

/// Handles of the metrics recorded for every frame or message, looked up once. The `counter!`
/// and `histogram!` macros find their key in the registry (hashing it, allocating for labels)
/// on every call: one such lookup per flush was 1.4 % of the gateway's CPU in the fanout
/// benchmark, and a published message made six. Each handle is made on first use, after
/// `metrics_handle` has installed the recorder, so it is never bound to the no-op one.
pub(crate) mod hot {
    use chat_protocol::frames::CLIENT_FRAME_TYPES;
    use metrics::{Counter, Histogram};
    use std::sync::LazyLock;

    fn counter(name: &'static str) -> Counter {
        super::metrics_handle();
        metrics::counter!(name)
    }

    fn histogram(name: &'static str) -> Histogram {
        super::metrics_handle();
        metrics::histogram!(name)
    }

    pub static FRAMES_WRITTEN: LazyLock<Counter> =
        LazyLock::new(|| counter("chat_frames_written_total"));
    pub static MESSAGES_COMMITTED: LazyLock<Counter> =
        LazyLock::new(|| counter("chat_messages_committed_total"));
    pub static MESSAGES_DELIVERED: LazyLock<Counter> =
        LazyLock::new(|| counter("chat_messages_delivered_total"));
    pub static SEND_ACK_SECONDS: LazyLock<Histogram> =
        LazyLock::new(|| histogram("chat_send_ack_seconds"));
    pub static FANOUT_LATENCY_SECONDS: LazyLock<Histogram> =
        LazyLock::new(|| histogram("chat_fanout_latency_seconds"));
    pub static STORE_QUERY_SECONDS: LazyLock<Histogram> =
        LazyLock::new(|| histogram("chat_store_query_duration_seconds"));
    pub static COMMIT_BATCH_MESSAGES: LazyLock<Histogram> =
        LazyLock::new(|| histogram("chat_store_commit_batch_messages"));

    static FRAMES_RECEIVED: LazyLock<[Counter; CLIENT_FRAME_TYPES.len()]> = LazyLock::new(|| {
        super::metrics_handle();
        CLIENT_FRAME_TYPES
            .map(|kind| metrics::counter!("chat_frames_received_total", "type" => kind))
    });

    /// `chat_frames_received_total` for a valid client frame of this `type`.
    pub fn frame_received(kind: &str) {
        if let Some(i) = CLIENT_FRAME_TYPES.iter().position(|k| *k == kind) {
            FRAMES_RECEIVED[i].increment(1);
        }
    }
}
