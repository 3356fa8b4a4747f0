//! The engine's Prometheus series: runs started and ended (by status), steps ended (by
//! status), the transition latency (a step ready → its block invoked), and the timers'
//! fires and lateness (a slot → its run created). No account or
//! project labels: the series stay few whatever the tenants run.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

pub struct EngineMetrics {
    registry: Registry,
    pub runs_started: Counter,
    pub runs_ended: Family<StatusLabels, Counter>,
    pub steps_ended: Family<StatusLabels, Counter>,
    pub transition_seconds: Histogram,
    pub steps_waiting: Gauge,
    pub timer_fires: Counter,
    pub timer_catch_up_fires: Counter,
    pub timer_lateness_seconds: Histogram,
    pub queue_sent: Counter,
    pub queue_delivered: Counter,
    pub queue_dead_lettered: Counter,
}

impl EngineMetrics {
    pub fn new() -> EngineMetrics {
        let mut registry = Registry::with_prefix("refinery");
        let runs_started = Counter::default();
        let runs_ended = Family::<StatusLabels, Counter>::default();
        let steps_ended = Family::<StatusLabels, Counter>::default();
        // 50 µs … ~1.6 s.
        let transition_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        let steps_waiting = Gauge::default();
        registry.register("runs_started", "Service runs started", runs_started.clone());
        registry.register(
            "runs_ended",
            "Service runs ended, by status",
            runs_ended.clone(),
        );
        registry.register(
            "run_steps_ended",
            "Steps of service runs ended, by status",
            steps_ended.clone(),
        );
        registry.register(
            "run_transition_seconds",
            "From a step becoming ready (its predecessor's result committed) to its block being invoked",
            transition_seconds.clone(),
        );
        registry.register(
            "run_steps_waiting",
            "Steps ready or waiting (retry interval, back-pressure), not yet running",
            steps_waiting.clone(),
        );
        let timer_fires = Counter::default();
        let timer_catch_up_fires = Counter::default();
        // 1 ms … ~65 s.
        let timer_lateness_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 17));
        registry.register(
            "timer_fires",
            "Timer slots fired (each started one run)",
            timer_fires.clone(),
        );
        registry.register(
            "timer_catch_up_fires",
            "Timer slots missed while the server was down, fired once after it started",
            timer_catch_up_fires.clone(),
        );
        registry.register(
            "timer_lateness_seconds",
            "From a timer's slot to its run being created (slots due while the server ran)",
            timer_lateness_seconds.clone(),
        );
        let queue_sent = Counter::default();
        let queue_delivered = Counter::default();
        let queue_dead_lettered = Counter::default();
        registry.register(
            "queue_messages_sent",
            "Queue messages sent through the API",
            queue_sent.clone(),
        );
        registry.register(
            "queue_messages_delivered",
            "Queue messages delivered to consumer runs (receipts: a redelivery counts again)",
            queue_delivered.clone(),
        );
        registry.register(
            "queue_messages_dead_lettered_on_receipt",
            "Queue messages dead-lettered when due again after max_receive_count receipts",
            queue_dead_lettered.clone(),
        );
        EngineMetrics {
            queue_sent,
            queue_delivered,
            queue_dead_lettered,
            registry,
            timer_fires,
            timer_catch_up_fires,
            timer_lateness_seconds,
            runs_started,
            runs_ended,
            steps_ended,
            transition_seconds,
            steps_waiting,
        }
    }

    pub fn ended(family: &Family<StatusLabels, Counter>, status: &str) {
        family
            .get_or_create(&StatusLabels {
                status: status.to_string(),
            })
            .inc();
    }

    /// OpenMetrics text, without the closing `# EOF` (the server appends it after the
    /// pool's series).
    pub fn render(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut text, &self.registry).is_err() {
            return String::new();
        }
        text
    }
}

/// The labels of one queue's gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub account: String,
    pub project: String,
    pub queue: String,
}

/// The most queues `/metrics` shows (the series stay bounded whatever the tenants do).
pub const MAX_QUEUE_SERIES: usize = 1000;

/// Per-queue gauges, from the store's counts at `now_ms`: `refinery_queue_visible`,
/// `refinery_queue_in_flight`, `refinery_queue_dead_letter`,
/// `refinery_queue_oldest_age_seconds` (OpenMetrics text, without `# EOF`).
pub fn render_queues(
    stats: &[(refinery_store::QueueRef, refinery_store::QueueStats)],
    now_ms: i64,
) -> String {
    use prometheus_client::metrics::gauge::Gauge as G;
    let mut registry = Registry::with_prefix("refinery_queue");
    let visible = Family::<QueueLabels, G>::default();
    let in_flight = Family::<QueueLabels, G>::default();
    let dead = Family::<QueueLabels, G>::default();
    let oldest = Family::<QueueLabels, G<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register(
        "visible",
        "Messages waiting in the queue, visible to its consumer",
        visible.clone(),
    );
    registry.register(
        "in_flight",
        "Messages received by a consumer run, not yet settled",
        in_flight.clone(),
    );
    registry.register(
        "dead_letter",
        "Messages in the queue's dead-letter list",
        dead.clone(),
    );
    registry.register(
        "oldest_age_seconds",
        "Age of the queue's oldest message not dead-lettered",
        oldest.clone(),
    );
    for (queue, s) in stats.iter().take(MAX_QUEUE_SERIES) {
        let labels = QueueLabels {
            account: queue.account_id.clone(),
            project: queue.project.clone(),
            queue: queue.queue.clone(),
        };
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        visible.get_or_create(&labels).set(n(s.visible));
        in_flight.get_or_create(&labels).set(n(s.in_flight));
        dead.get_or_create(&labels).set(n(s.dead_letter));
        let age = s
            .oldest_enqueued_at_ms
            .map_or(0.0, |t| ((now_ms - t).max(0) as f64) / 1000.0);
        oldest.get_or_create(&labels).set(age);
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode_registry(&mut text, &registry).is_err() {
        return String::new();
    }
    text
}
