//! The engine's Prometheus series: runs started and ended (by status), steps ended (by
//! status), and the transition latency (a step ready → its block invoked). No account or
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
        EngineMetrics {
            registry,
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
