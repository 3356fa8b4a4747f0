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
        EngineMetrics {
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
