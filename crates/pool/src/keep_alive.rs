//! How long an idle instance is kept warm, and when one is started ahead of traffic: the
//! keep-alive policy, pure (no clock, no I/O) so that the pool and the keep-alive simulation
//! in `refinery-bench` run exactly the same code.
//!
//! Two policies:
//! - **fixed**: every idle instance is kept for the same time (`serve --keep-alive`, or the
//!   block's own `keep_alive_s`, which always forces fixed for that block);
//! - **adaptive**, after Shahrad et al., "Serverless in the Wild" (USENIX ATC 2020): a
//!   histogram of the block's idle times (from the end of one invocation to the next
//!   arrival) decides a *pre-warm window* (its head percentile, less a margin) and a
//!   *keep-alive window* (its tail percentile, plus a margin, counted from the pre-warm).
//!   When the head is above zero, an instance is not kept after its invocation at all: a
//!   fresh one is started when the pre-warm window ends and kept for the keep-alive window.
//!   A histogram that is not representative yet — too few samples, or too many idle times
//!   beyond its range — falls back to the fixed keep-alive.
//!
//! Times are [`Duration`]s since an origin the caller chooses (the pool's start, or the
//! start of a simulated trace).

use std::time::Duration;

/// Which keep-alive policy a block follows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KeepAlivePolicy {
    /// Keep every idle instance for this long.
    Fixed(Duration),
    /// Decide from the block's idle-time histogram.
    Adaptive(AdaptiveConfig),
}

impl KeepAlivePolicy {
    /// The policy for a block: its own `keep_alive_s` forces fixed, otherwise the operator's.
    pub fn for_block(operator: &KeepAlivePolicy, keep_alive_s: Option<u32>) -> KeepAlivePolicy {
        match keep_alive_s {
            Some(s) => KeepAlivePolicy::Fixed(Duration::from_secs(u64::from(s))),
            None => *operator,
        }
    }
}

/// The adaptive policy's parameters (defaults: the paper's).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveConfig {
    /// Width of one histogram bin (the paper: one minute).
    pub bin: Duration,
    /// Number of bins; idle times beyond `bin * bins` are out of range (the paper: 4 hours).
    pub bins: usize,
    /// Percentile of idle times that sets the pre-warm window (the paper: 5th).
    pub head_percentile: f64,
    /// Percentile of idle times that sets the end of the keep-alive window (the paper: 99th).
    pub tail_percentile: f64,
    /// Safety margin: the pre-warm window shrinks and the keep-alive end grows by it.
    pub margin: f64,
    /// Fewer idle times than this: not representative, use `fallback`.
    pub min_samples: u32,
    /// More than this fraction of idle times out of range: not representative.
    pub max_out_of_range: f64,
    /// The fixed keep-alive used while the histogram is not representative.
    pub fallback: Duration,
}

impl AdaptiveConfig {
    /// The paper's parameters, falling back to `fallback` (the operator's fixed keep-alive).
    pub fn paper(fallback: Duration) -> AdaptiveConfig {
        AdaptiveConfig {
            bin: Duration::from_secs(60),
            bins: 240,
            head_percentile: 5.0,
            tail_percentile: 99.0,
            margin: 0.10,
            min_samples: 10,
            max_out_of_range: 0.5,
            fallback,
        }
    }
}

/// Counts of idle times per bin, plus those beyond the last bin.
#[derive(Debug, Clone, PartialEq)]
pub struct IdleHistogram {
    bin: Duration,
    counts: Vec<u32>,
    in_range: u32,
    out_of_range: u32,
}

impl IdleHistogram {
    pub fn new(bin: Duration, bins: usize) -> IdleHistogram {
        IdleHistogram {
            bin: bin.max(Duration::from_millis(1)),
            counts: vec![0; bins.max(1)],
            in_range: 0,
            out_of_range: 0,
        }
    }

    pub fn record(&mut self, idle: Duration) {
        // Truncation intended: the bin index of a non-negative ratio.
        let index = (idle.as_secs_f64() / self.bin.as_secs_f64()) as usize;
        match self.counts.get_mut(index) {
            Some(count) => {
                *count = count.saturating_add(1);
                self.in_range = self.in_range.saturating_add(1);
            }
            None => self.out_of_range = self.out_of_range.saturating_add(1),
        }
    }

    pub fn samples(&self) -> u32 {
        self.in_range.saturating_add(self.out_of_range)
    }

    pub fn out_of_range(&self) -> u32 {
        self.out_of_range
    }

    /// The bin holding the `p`-th percentile of the in-range idle times.
    fn percentile_bin(&self, p: f64) -> Option<usize> {
        if self.in_range == 0 {
            return None;
        }
        let wanted = (f64::from(self.in_range) * p / 100.0).ceil().max(1.0);
        let mut seen = 0u64;
        for (index, count) in self.counts.iter().enumerate() {
            seen += u64::from(*count);
            // u64 → f64 is exact for any count a u32 total can reach.
            #[allow(clippy::cast_precision_loss)]
            if seen as f64 >= wanted {
                return Some(index);
            }
        }
        Some(self.counts.len() - 1)
    }
}

/// What to do with a block's instance that just went idle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Zero: keep the idle instance for `keep_alive`. Above zero: let it go now, start a
    /// fresh one after `prewarm` and keep that one for `keep_alive`.
    pub prewarm: Duration,
    pub keep_alive: Duration,
    /// Whether the histogram decided (false: the fixed keep-alive or the fallback).
    pub adaptive: bool,
}

/// A block's invocation history as the policy needs it.
#[derive(Debug, Clone)]
pub struct BlockHistory {
    histogram: IdleHistogram,
    in_flight: u32,
    last_end: Option<Duration>,
}

impl BlockHistory {
    pub fn new(policy: &KeepAlivePolicy) -> BlockHistory {
        let histogram = match policy {
            KeepAlivePolicy::Adaptive(config) => IdleHistogram::new(config.bin, config.bins),
            // Not consulted; one bin keeps it small.
            KeepAlivePolicy::Fixed(_) => IdleHistogram::new(Duration::from_secs(60), 1),
        };
        BlockHistory {
            histogram,
            in_flight: 0,
            last_end: None,
        }
    }

    /// An invocation arrived at `now`: its idle time is since the last one ended, or zero
    /// if one was still running (the block was not idle at all).
    pub fn arrival(&mut self, now: Duration) {
        if self.in_flight > 0 {
            self.histogram.record(Duration::ZERO);
        } else if let Some(end) = self.last_end {
            self.histogram.record(now.saturating_sub(end));
        }
        self.in_flight = self.in_flight.saturating_add(1);
    }

    /// An invocation ended at `now`.
    pub fn end(&mut self, now: Duration) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.last_end = Some(self.last_end.map_or(now, |e| e.max(now)));
    }

    pub fn histogram(&self) -> &IdleHistogram {
        &self.histogram
    }

    /// The window for an instance going idle now.
    pub fn window(&self, policy: &KeepAlivePolicy) -> Window {
        match policy {
            KeepAlivePolicy::Fixed(keep_alive) => Window {
                prewarm: Duration::ZERO,
                keep_alive: *keep_alive,
                adaptive: false,
            },
            KeepAlivePolicy::Adaptive(config) => decide(&self.histogram, config),
        }
    }
}

/// The adaptive decision for one histogram.
pub fn decide(histogram: &IdleHistogram, config: &AdaptiveConfig) -> Window {
    let fallback = Window {
        prewarm: Duration::ZERO,
        keep_alive: config.fallback,
        adaptive: false,
    };
    let samples = histogram.samples();
    if samples < config.min_samples.max(1) {
        return fallback;
    }
    if f64::from(histogram.out_of_range()) > config.max_out_of_range * f64::from(samples) {
        return fallback;
    }
    let (Some(head), Some(tail)) = (
        histogram.percentile_bin(config.head_percentile),
        histogram.percentile_bin(config.tail_percentile),
    ) else {
        return fallback;
    };
    let bin = histogram.bin.as_secs_f64();
    let margin = config.margin.clamp(0.0, 1.0);
    // The head bin's lower edge, less the margin; the tail bin's upper edge, plus it.
    #[allow(clippy::cast_precision_loss)]
    let prewarm = head as f64 * bin * (1.0 - margin);
    #[allow(clippy::cast_precision_loss)]
    let end = (tail + 1) as f64 * bin * (1.0 + margin);
    Window {
        prewarm: Duration::from_secs_f64(prewarm),
        keep_alive: Duration::from_secs_f64((end - prewarm).max(bin)),
        adaptive: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn adaptive() -> KeepAlivePolicy {
        KeepAlivePolicy::Adaptive(AdaptiveConfig::paper(Duration::from_secs(600)))
    }

    fn close(d: Duration, seconds: f64) -> bool {
        (d.as_secs_f64() - seconds).abs() < 0.001
    }

    /// Arrivals at `times` (seconds), each running one second.
    fn history(policy: &KeepAlivePolicy, times: &[u64]) -> BlockHistory {
        let mut history = BlockHistory::new(policy);
        for t in times {
            history.arrival(Duration::from_secs(*t));
            history.end(Duration::from_secs(*t + 1));
        }
        history
    }

    #[test]
    fn fixed_keeps_every_instance_for_the_same_time() {
        let policy = KeepAlivePolicy::Fixed(Duration::from_secs(300));
        let window = history(&policy, &[0, 1000, 5000]).window(&policy);
        assert_eq!(window.prewarm, Duration::ZERO);
        assert_eq!(window.keep_alive, Duration::from_secs(300));
        assert!(!window.adaptive);
    }

    #[test]
    fn a_blocks_own_keep_alive_forces_fixed() {
        let policy = KeepAlivePolicy::for_block(&adaptive(), Some(42));
        assert_eq!(policy, KeepAlivePolicy::Fixed(Duration::from_secs(42)));
        assert_eq!(KeepAlivePolicy::for_block(&adaptive(), None), adaptive());
    }

    #[test]
    fn too_few_samples_fall_back_to_the_fixed_keep_alive() {
        let policy = adaptive();
        let times: Vec<u64> = (0..5).map(|i| i * 600).collect();
        let window = history(&policy, &times).window(&policy);
        assert!(!window.adaptive);
        assert_eq!(window.keep_alive, Duration::from_secs(600));
    }

    #[test]
    fn a_periodic_block_is_prewarmed_just_before_its_next_arrival() {
        let policy = adaptive();
        // Every 10 minutes: idle 599 s each time (bin 9).
        let times: Vec<u64> = (0..50).map(|i| i * 600).collect();
        let window = history(&policy, &times).window(&policy);
        assert!(window.adaptive);
        // Head at 9 minutes less 10 %; ends at 10 minutes plus 10 %.
        let end = window.prewarm + window.keep_alive;
        assert!(close(window.prewarm, 486.0), "{window:?}");
        assert!(close(end, 660.0), "{window:?}");
        // The next arrival (599 s after the last end) falls inside the window.
        assert!(window.prewarm < Duration::from_secs(599) && end > Duration::from_secs(599));
    }

    #[test]
    fn a_busy_block_is_kept_warm_without_prewarming() {
        let policy = adaptive();
        // Arrivals every 20 s: idle time 19 s, bin 0.
        let times: Vec<u64> = (0..100).map(|i| i * 20).collect();
        let window = history(&policy, &times).window(&policy);
        assert!(window.adaptive);
        assert_eq!(window.prewarm, Duration::ZERO);
        assert!(close(window.keep_alive, 66.0), "{window:?}");
    }

    #[test]
    fn overlapping_invocations_count_as_zero_idle_time() {
        let policy = adaptive();
        let mut history = BlockHistory::new(&policy);
        for i in 0..20 {
            history.arrival(Duration::from_secs(i));
        }
        assert_eq!(history.histogram().samples(), 19);
        assert_eq!(history.histogram().percentile_bin(99.0), Some(0));
    }

    #[test]
    fn too_many_out_of_range_idle_times_fall_back() {
        let policy = adaptive();
        // Every 5 hours: beyond the 4-hour range every time.
        let times: Vec<u64> = (0..20).map(|i| i * 5 * 3600).collect();
        let h = history(&policy, &times);
        assert_eq!(h.histogram().out_of_range(), 19);
        assert!(!h.window(&policy).adaptive);
    }

    #[test]
    fn a_few_out_of_range_gaps_leave_the_in_range_decision() {
        let policy = adaptive();
        // Bursts of 20 calls 10 s apart, the bursts 6 hours apart.
        let mut times = Vec::new();
        for burst in 0..3u64 {
            for i in 0..20u64 {
                times.push(burst * 6 * 3600 + i * 10);
            }
        }
        let window = history(&policy, &times).window(&policy);
        assert!(window.adaptive);
        assert_eq!(window.prewarm, Duration::ZERO);
        assert!(window.keep_alive <= 2 * MIN, "{window:?}");
    }

    #[test]
    fn percentiles_follow_the_counts() {
        let mut histogram = IdleHistogram::new(MIN, 10);
        for _ in 0..95 {
            histogram.record(Duration::from_secs(30));
        }
        for _ in 0..5 {
            histogram.record(Duration::from_secs(7 * 60 + 1));
        }
        histogram.record(Duration::from_secs(3600));
        assert_eq!(histogram.samples(), 101);
        assert_eq!(histogram.out_of_range(), 1);
        assert_eq!(histogram.percentile_bin(5.0), Some(0));
        assert_eq!(histogram.percentile_bin(95.0), Some(0));
        assert_eq!(histogram.percentile_bin(99.0), Some(7));
    }
}
