//! The pool's Prometheus metrics: what happened to invocations and instances, labelled by
//! account, project and block.
//!
//! Cardinality is bounded: at most `max_label_sets` distinct (account, project, block)
//! triples get their own series; every later one is counted under
//! `account="_other",project="_other",block="_other"` (and
//! `refinery_metrics_label_sets_overflowed_total` counts how often that happened). A
//! triple keeps its own series for the life of the process once admitted.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::instance::{InstanceInfo, InstanceState};

/// The label value every series beyond the cap is counted under.
pub const OVERFLOW_LABEL: &str = "_other";

/// Label sets per metric before overflow, unless the operator sets another.
pub const DEFAULT_MAX_LABEL_SETS: usize = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BlockLabels {
    pub account: String,
    pub project: String,
    pub block: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StatusLabels {
    account: String,
    project: String,
    block: String,
    status: String,
}

/// Why an invocation was refused before it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ThrottleReason {
    rate,
    concurrency,
    instances,
    memory,
    scale_up,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ThrottleLabels {
    account: String,
    project: String,
    block: String,
    reason: ThrottleReason,
}

/// Why an instance was started with no invocation waiting for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum AheadReason {
    /// The block's `min_warm`.
    provisioned,
    /// The adaptive keep-alive policy's pre-warm.
    prewarm,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AheadLabels {
    account: String,
    project: String,
    block: String,
    reason: AheadReason,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RuntimeLabels {
    runtime: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabels {
    account: String,
    project: String,
    block: String,
    state: String,
}

fn duration_histogram() -> Histogram {
    // 0.5 ms … ~65 s: warm runs, cold starts and long handlers alike.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0005, 2.0, 18,
    ))
}

type HistogramFamily = Family<BlockLabels, Histogram, fn() -> Histogram>;

pub struct PoolMetrics {
    registry: Registry,
    max_label_sets: usize,
    admitted: Mutex<HashSet<BlockLabels>>,
    overflowed: Counter,
    invocations: Family<StatusLabels, Counter>,
    cold_starts: Family<BlockLabels, Counter>,
    warm_starts: Family<BlockLabels, Counter>,
    init_seconds: HistogramFamily,
    run_seconds: HistogramFamily,
    instances: Family<StateLabels, Gauge>,
    standby: Family<RuntimeLabels, Gauge>,
    throttles: Family<ThrottleLabels, Counter>,
    oom_kills: Family<BlockLabels, Counter>,
    timeouts: Family<BlockLabels, Counter>,
    reaps: Family<BlockLabels, Counter>,
    ahead: Family<AheadLabels, Counter>,
    refused_syscalls: Family<BlockLabels, Counter>,
    refused_unattributed: Counter,
    audit_suppressed: Counter,
    /// Serialises scrapes: the instance gauges are rebuilt from the registry on each.
    render: Mutex<()>,
}

impl PoolMetrics {
    pub fn new(max_label_sets: usize) -> PoolMetrics {
        let mut registry = Registry::with_prefix("refinery");
        let invocations = Family::<StatusLabels, Counter>::default();
        let cold_starts = Family::<BlockLabels, Counter>::default();
        let warm_starts = Family::<BlockLabels, Counter>::default();
        let init_seconds: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let run_seconds: HistogramFamily = Family::new_with_constructor(duration_histogram);
        let instances = Family::<StateLabels, Gauge>::default();
        let standby = Family::<RuntimeLabels, Gauge>::default();
        let throttles = Family::<ThrottleLabels, Counter>::default();
        let oom_kills = Family::<BlockLabels, Counter>::default();
        let timeouts = Family::<BlockLabels, Counter>::default();
        let reaps = Family::<BlockLabels, Counter>::default();
        let ahead = Family::<AheadLabels, Counter>::default();
        let overflowed = Counter::default();
        let refused_syscalls = Family::<BlockLabels, Counter>::default();
        let refused_unattributed = Counter::default();
        let audit_suppressed = Counter::default();
        registry.register(
            "invocations",
            "Invocations by outcome: ok, error, timeout, oom, crashed, init_error, throttled, unavailable, failed (the platform could not start an instance)",
            invocations.clone(),
        );
        registry.register(
            "cold_starts",
            "Invocations served by a freshly started instance",
            cold_starts.clone(),
        );
        registry.register(
            "warm_starts",
            "Invocations served by a warm (frozen) instance",
            warm_starts.clone(),
        );
        registry.register(
            "init_duration_seconds",
            "Cold starts: from asking the sandbox for an instance to the block's code loaded",
            init_seconds.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "Handler run time (request sent to reply received)",
            run_seconds.clone(),
        );
        registry.register(
            "instances",
            "Live instances by state: starting, busy, frozen",
            instances.clone(),
        );
        registry.register(
            "standby_sandboxes",
            "Sandboxes started ahead of time, shim loaded, waiting for a cold start of their runtime (python, node, shell) to adopt them; at 0, that runtime's cold starts fork from the zygote (Python) or start by exec",
            standby.clone(),
        );
        registry.register(
            "throttles",
            "Invocations refused before running, by the limit that refused them: rate (account), concurrency (block max_concurrency), instances and memory (account quota), scale_up (block cold-start rate)",
            throttles.clone(),
        );
        registry.register(
            "oom_kills",
            "Instances killed for using more than their memory_mb",
            oom_kills.clone(),
        );
        registry.register(
            "timeouts",
            "Invocations (or code loads) killed at their timeout_s",
            timeouts.clone(),
        );
        registry.register(
            "reaps",
            "Idle instances destroyed at the end of their keep-alive",
            reaps.clone(),
        );
        registry.register(
            "instances_started_ahead",
            "Instances started before any invocation asked for them: provisioned (min_warm) or prewarm (adaptive keep-alive)",
            ahead.clone(),
        );
        registry.register(
            "refused_syscalls",
            "Syscalls an instance's seccomp filter refused, as read back from the kernel's audit records (which the kernel rate-limits)",
            refused_syscalls.clone(),
        );
        registry.register(
            "refused_syscalls_unattributed",
            "Refused-syscall audit records whose uid matched no instance this server knew (already gone)",
            refused_unattributed.clone(),
        );
        registry.register(
            "audit_records_suppressed",
            "Kernel audit records the kernel dropped by its printk rate limit (`kauditd_printk_skb: N callbacks suppressed`), refused syscalls among them",
            audit_suppressed.clone(),
        );
        registry.register(
            "metrics_label_sets_overflowed",
            "Samples counted under the _other label set because the label-set cap was reached",
            overflowed.clone(),
        );
        PoolMetrics {
            registry,
            max_label_sets,
            admitted: Mutex::new(HashSet::new()),
            overflowed,
            invocations,
            cold_starts,
            warm_starts,
            init_seconds,
            run_seconds,
            instances,
            standby,
            throttles,
            oom_kills,
            timeouts,
            reaps,
            ahead,
            refused_syscalls,
            refused_unattributed,
            audit_suppressed,
            render: Mutex::new(()),
        }
    }

    /// The labels for a block: its own while under the cap, the overflow set beyond it.
    pub fn labels(&self, account: &str, project: &str, block: &str) -> BlockLabels {
        self.admit(account, project, block, true)
    }

    /// `count_overflow`: scrapes look labels up too, and are not samples to count.
    fn admit(
        &self,
        account: &str,
        project: &str,
        block: &str,
        count_overflow: bool,
    ) -> BlockLabels {
        let labels = BlockLabels {
            account: account.to_string(),
            project: project.to_string(),
            block: block.to_string(),
        };
        let mut admitted = crate::pool::lock(&self.admitted);
        if admitted.contains(&labels) {
            return labels;
        }
        if admitted.len() < self.max_label_sets {
            admitted.insert(labels.clone());
            return labels;
        }
        if count_overflow {
            self.overflowed.inc();
        }
        BlockLabels {
            account: OVERFLOW_LABEL.into(),
            project: OVERFLOW_LABEL.into(),
            block: OVERFLOW_LABEL.into(),
        }
    }

    pub fn invocation(&self, labels: &BlockLabels, status: &str) {
        self.invocations
            .get_or_create(&StatusLabels {
                account: labels.account.clone(),
                project: labels.project.clone(),
                block: labels.block.clone(),
                status: status.to_string(),
            })
            .inc();
    }

    pub fn start(&self, labels: &BlockLabels, cold: bool, init: Option<Duration>) {
        if cold {
            self.cold_starts.get_or_create(labels).inc();
        } else {
            self.warm_starts.get_or_create(labels).inc();
        }
        if let Some(init) = init {
            self.init_seconds
                .get_or_create(labels)
                .observe(init.as_secs_f64());
        }
    }

    pub fn run(&self, labels: &BlockLabels, run: Duration) {
        self.run_seconds
            .get_or_create(labels)
            .observe(run.as_secs_f64());
    }

    pub fn throttle(&self, labels: &BlockLabels, reason: ThrottleReason) {
        self.throttles
            .get_or_create(&ThrottleLabels {
                account: labels.account.clone(),
                project: labels.project.clone(),
                block: labels.block.clone(),
                reason,
            })
            .inc();
    }

    pub fn oom_kill(&self, labels: &BlockLabels) {
        self.oom_kills.get_or_create(labels).inc();
    }

    pub fn timeout(&self, labels: &BlockLabels) {
        self.timeouts.get_or_create(labels).inc();
    }

    pub fn reap(&self, labels: &BlockLabels) {
        self.reaps.get_or_create(labels).inc();
    }

    pub fn started_ahead(&self, labels: &BlockLabels, reason: AheadReason) {
        self.ahead
            .get_or_create(&AheadLabels {
                account: labels.account.clone(),
                project: labels.project.clone(),
                block: labels.block.clone(),
                reason,
            })
            .inc();
    }

    pub fn refused_syscall(&self, labels: &BlockLabels) {
        self.refused_syscalls.get_or_create(labels).inc();
    }

    pub fn refused_syscall_unattributed(&self) {
        self.refused_unattributed.inc();
    }

    pub fn audit_records_suppressed(&self, count: u64) {
        self.audit_suppressed.inc_by(count);
    }

    /// The text exposition, with the instance gauges taken from `instances` now and the
    /// standby gauge from `standby` (waiting sandboxes by runtime).
    pub fn render(&self, instances: &[InstanceInfo], standby: &[(String, usize)]) -> String {
        let _one_at_a_time = crate::pool::lock(&self.render);
        for (runtime, waiting) in standby {
            self.standby
                .get_or_create(&RuntimeLabels {
                    runtime: runtime.clone(),
                })
                .set(i64::try_from(*waiting).unwrap_or(i64::MAX));
        }
        self.instances.clear();
        for info in instances {
            let labels = self.admit(&info.account_id, &info.project, &info.block, false);
            let state = match info.state {
                InstanceState::Starting => "starting",
                InstanceState::Busy => "busy",
                InstanceState::Frozen => "frozen",
            };
            self.instances
                .get_or_create(&StateLabels {
                    account: labels.account,
                    project: labels.project,
                    block: labels.block,
                    state: state.to_string(),
                })
                .inc();
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_sets_beyond_the_cap_go_to_the_overflow_set() {
        let metrics = PoolMetrics::new(2);
        let a = metrics.labels("acc1", "p", "a");
        let b = metrics.labels("acc1", "p", "b");
        let c = metrics.labels("acc1", "p", "c");
        assert_eq!(a.block, "a");
        assert_eq!(b.block, "b");
        assert_eq!(c.block, OVERFLOW_LABEL);
        // Admitted ones keep their series.
        assert_eq!(metrics.labels("acc1", "p", "a").block, "a");
        metrics.invocation(&c, "ok");
        let text = metrics.render(&[], &[]);
        assert!(text.contains("refinery_invocations_total{account=\"_other\",project=\"_other\",block=\"_other\",status=\"ok\"} 1"), "{text}");
        assert!(
            text.contains("refinery_metrics_label_sets_overflowed_total 1"),
            "{text}"
        );
    }

    #[test]
    fn refused_syscalls_are_counted_per_block_and_unattributed() {
        let metrics = PoolMetrics::new(10);
        let labels = metrics.labels("acc1", "p", "a");
        metrics.refused_syscall(&labels);
        metrics.refused_syscall(&labels);
        metrics.refused_syscall_unattributed();
        metrics.audit_records_suppressed(7);
        let text = metrics.render(&[], &[]);
        assert!(
            text.contains(
                "refinery_refused_syscalls_total{account=\"acc1\",project=\"p\",block=\"a\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("refinery_refused_syscalls_unattributed_total 1"),
            "{text}"
        );
        assert!(
            text.contains("refinery_audit_records_suppressed_total 7"),
            "{text}"
        );
    }
}
