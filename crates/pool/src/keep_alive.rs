//! How long an idle instance is kept warm, and when one is started ahead of traffic: the
//! keep-alive policy, pure (no clock, no I/O) so that the pool and the keep-alive simulation
//! in `refinery-bench` run exactly the same code.
//!
//! Two policies:
//! - **fixed**: every idle instance is kept for the same time (`serve --keep-alive`, or the
//!   block's own `keep_alive_s`, which always forces fixed for that block);
//! - **adaptive**, after Shahrad et al., "Serverless in the Wild" (USENIX ATC 2020): a
//!   histogram of idle times decides a *pre-warm window* (its head percentile, less a
//!   margin) and a *keep-alive window* (its tail percentile, plus a margin, counted from the
//!   pre-warm). When the head is above zero, an instance is not kept after its invocation
//!   at all: a fresh one is started when the pre-warm window ends and kept for the
//!   keep-alive window. A histogram that is not representative yet — too few samples, or
//!   too many idle times beyond its range — falls back to the fixed keep-alive.
//!
//! # One histogram per concurrency level
//!
//! The paper's functions run one instance at a time; a block here may run many. Its warm
//! instances are reused last-in first-out, so while `c` invocations are in flight the idle
//! instance on top of the stack is the block's `(c+1)`-th, the next one its `(c+2)`-th, and
//! so on: the `k`-th instance is needed again exactly when the block's concurrency next
//! rises to `k`. So the history keeps one histogram per **level** `k`: the idle time of
//! level `k` runs from the moment the concurrency fell below `k` to the moment it reached
//! `k` again. Level 1 is the paper's idle time (from the end of the block's last invocation
//! to its next arrival). An instance going idle at level `k` (the concurrency falls from
//! `k` to `k-1`) gets the window of level `k`'s histogram: a busy block keeps as many
//! instances warm, for as long, as its recent concurrency envelope says it needs, instead
//! of treating the short gaps between overlapping calls as the idle time of every instance.
//! Levels above [`MAX_LEVELS`] share the last level's histogram.
//!
//! Times are [`Duration`]s since an origin the caller chooses (the pool's start, or the
//! start of a simulated trace).

use std::time::Duration;

/// Concurrency levels with a histogram of their own; higher levels share the last one.
pub const MAX_LEVELS: usize = 64;

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

/// One concurrency level's idle times, and since when it is idle (if it is).
#[derive(Debug, Clone)]
struct Level {
    histogram: IdleHistogram,
    idle_since: Option<Duration>,
}

/// A block's invocation history as the policy needs it: the concurrency now, and one
/// idle-time histogram per concurrency level (none for the fixed policy, which does not
/// consult them).
#[derive(Debug, Clone)]
pub struct BlockHistory {
    /// Level `k` at index `k - 1`, added as the block first reaches it.
    levels: Vec<Level>,
    /// `(bin, bins)` of every level's histogram; `None`: the fixed policy, nothing recorded.
    shape: Option<(Duration, usize)>,
    in_flight: u32,
}

fn level_index(level: u32) -> usize {
    usize::try_from(level.max(1) - 1)
        .unwrap_or(usize::MAX)
        .min(MAX_LEVELS - 1)
}

impl BlockHistory {
    pub fn new(policy: &KeepAlivePolicy) -> BlockHistory {
        let shape = match policy {
            KeepAlivePolicy::Adaptive(config) => Some((config.bin, config.bins)),
            KeepAlivePolicy::Fixed(_) => None,
        };
        BlockHistory {
            levels: Vec::new(),
            shape,
            in_flight: 0,
        }
    }

    /// An invocation arrived at `now`: the concurrency rises to the level returned, whose
    /// idle time (since the concurrency last fell below it) is recorded.
    pub fn arrival(&mut self, now: Duration) -> u32 {
        self.in_flight = self.in_flight.saturating_add(1);
        let level = self.in_flight;
        if let Some((bin, bins)) = self.shape {
            let index = level_index(level);
            while self.levels.len() <= index {
                self.levels.push(Level {
                    histogram: IdleHistogram::new(bin, bins),
                    idle_since: None,
                });
            }
            let entry = &mut self.levels[index];
            if let Some(since) = entry.idle_since.take() {
                entry.histogram.record(now.saturating_sub(since));
            }
        }
        level
    }

    /// An invocation ended at `now`: the concurrency falls below the level returned, which
    /// is idle from now on (the instance that just went idle is that level's).
    pub fn end(&mut self, now: Duration) -> u32 {
        let level = self.in_flight.max(1);
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(entry) = self.levels.get_mut(level_index(level)) {
            entry.idle_since = Some(now);
        }
        level
    }

    /// Invocations in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// The idle-time histogram of concurrency level `level` (1 = the block's first
    /// instance), if the block reached it under the adaptive policy.
    pub fn histogram(&self, level: u32) -> Option<&IdleHistogram> {
        self.levels.get(level_index(level)).map(|l| &l.histogram)
    }

    /// The window for the instance of level `level` going idle now.
    pub fn window(&self, policy: &KeepAlivePolicy, level: u32) -> Window {
        match policy {
            KeepAlivePolicy::Fixed(keep_alive) => Window {
                prewarm: Duration::ZERO,
                keep_alive: *keep_alive,
                adaptive: false,
            },
            KeepAlivePolicy::Adaptive(config) => match self.histogram(level) {
                Some(histogram) => decide(histogram, config),
                None => Window {
                    prewarm: Duration::ZERO,
                    keep_alive: config.fallback,
                    adaptive: false,
                },
            },
        }
    }
}

/// The pre-warms a block has pending: at most one per concurrency level, each with the
/// time its level's instance was let go, a time to start a fresh one and a time to keep it
/// until. Generic over the time type (the pool's [`std::time::Instant`], the simulation's
/// [`Duration`]).
///
/// An instance is let go for a pre-warm only when it is the block's last idle one (the
/// caller checks): the instances under it in the stack would otherwise serve its level
/// first, and letting the top one go would only shift the cold start up a level.
#[derive(Debug, Clone)]
pub struct Prewarms<T> {
    pending: Vec<Prewarm<T>>,
}

/// One pending pre-warm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prewarm<T> {
    pub level: u32,
    /// When the level's instance was let go (the pre-warmed instance counts as idle since
    /// then when the account's idle instances are evicted least recently used first).
    pub let_go: T,
    pub at: T,
    pub until: T,
}

impl<T> Default for Prewarms<T> {
    fn default() -> Self {
        Prewarms {
            pending: Vec::new(),
        }
    }
}

impl<T: Copy + Ord> Prewarms<T> {
    /// Schedules a pre-warm (replacing a pending one of the same level).
    pub fn schedule(&mut self, prewarm: Prewarm<T>) {
        self.pending.retain(|p| p.level != prewarm.level);
        self.pending.push(prewarm);
    }

    /// The concurrency reached `level`: the pre-warms of that level and below are moot
    /// (those levels have their instances; their next releases plan again).
    pub fn arrival(&mut self, level: u32) {
        self.pending.retain(|p| p.level > level);
    }

    /// The pre-warms due at `now` that are still worth starting, lowest level first;
    /// `covered` is how many instances the block has (in flight, idle, or being started):
    /// a level at or below it needs none. Due ones are removed, started or not.
    pub fn due(&mut self, now: T, covered: u32) -> Vec<Prewarm<T>> {
        let mut due: Vec<Prewarm<T>> = Vec::new();
        self.pending.retain(|p| {
            if p.at <= now {
                due.push(*p);
                false
            } else {
                true
            }
        });
        due.sort_by_key(|p| p.level);
        let mut have = covered;
        let mut start = Vec::new();
        for prewarm in due {
            if prewarm.level > have && now < prewarm.until {
                start.push(prewarm);
                have += 1;
            }
        }
        start
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// When the next pending pre-warm is due.
    pub fn next_at(&self) -> Option<T> {
        self.pending.iter().map(|p| p.at).min()
    }

    /// The pending pre-warms.
    pub fn pending(&self) -> &[Prewarm<T>] {
        &self.pending
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
        let window = history(&policy, &[0, 1000, 5000]).window(&policy, 1);
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
        let window = history(&policy, &times).window(&policy, 1);
        assert!(!window.adaptive);
        assert_eq!(window.keep_alive, Duration::from_secs(600));
    }

    #[test]
    fn a_periodic_block_is_prewarmed_just_before_its_next_arrival() {
        let policy = adaptive();
        // Every 10 minutes: idle 599 s each time (bin 9).
        let times: Vec<u64> = (0..50).map(|i| i * 600).collect();
        let window = history(&policy, &times).window(&policy, 1);
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
        let window = history(&policy, &times).window(&policy, 1);
        assert!(window.adaptive);
        assert_eq!(window.prewarm, Duration::ZERO);
        assert!(close(window.keep_alive, 66.0), "{window:?}");
    }

    #[test]
    fn overlapping_invocations_are_levels_not_zero_idle_times() {
        let policy = adaptive();
        let mut history = BlockHistory::new(&policy);
        // Twenty calls at once: levels 1 to 20, none idle before, so nothing recorded.
        for i in 0..20u32 {
            assert_eq!(history.arrival(Duration::from_secs(u64::from(i))), i + 1);
        }
        assert_eq!(history.in_flight(), 20);
        for level in 1..=20 {
            assert_eq!(
                history.histogram(level).map(IdleHistogram::samples),
                Some(0)
            );
        }
        // They end one by one: the last to end is level 1, the first level 20.
        assert_eq!(history.end(Duration::from_secs(30)), 20);
        assert_eq!(history.end(Duration::from_secs(31)), 19);
        // Back up to 19 at 100 s: level 19 was idle 69 s (bin 1); level 20 is still idle.
        assert_eq!(history.arrival(Duration::from_secs(100)), 19);
        let level19 = history.histogram(19).expect("level 19");
        assert_eq!(level19.samples(), 1);
        assert_eq!(level19.percentile_bin(50.0), Some(1));
        assert_eq!(history.histogram(20).map(IdleHistogram::samples), Some(0));
    }

    /// A busy block: three calls always in flight, a fourth every minute for a few
    /// seconds, a fifth once an hour. The old single histogram saw only the short gaps
    /// between overlapping calls; per level, the fourth instance is kept for about a
    /// minute and the fifth falls back to the fixed keep-alive (too few samples).
    #[test]
    fn a_busy_block_keeps_each_instance_for_its_own_levels_idle_times() {
        let policy = adaptive();
        let mut history = BlockHistory::new(&policy);
        for _ in 0..3 {
            history.arrival(Duration::ZERO);
        }
        for minute in 0..180u64 {
            let t = Duration::from_secs(minute * 60);
            assert_eq!(history.arrival(t), 4);
            if minute % 60 == 30 {
                assert_eq!(history.arrival(t), 5);
                assert_eq!(history.end(t + Duration::from_secs(2)), 5);
            }
            assert_eq!(history.end(t + Duration::from_secs(5)), 4);
        }
        let fourth = history.window(&policy, 4);
        assert!(fourth.adaptive, "{fourth:?}");
        assert_eq!(fourth.prewarm, Duration::ZERO, "{fourth:?}");
        // Idle 55 s each time: bin 0, kept 66 s.
        assert!(close(fourth.keep_alive, 66.0), "{fourth:?}");
        let fifth = history.window(&policy, 5);
        assert!(!fifth.adaptive, "{fifth:?}");
        assert_eq!(fifth.keep_alive, Duration::from_secs(600));
        // The first three never went idle: no history, the fallback.
        assert!(!history.window(&policy, 1).adaptive);
    }

    #[test]
    fn levels_beyond_the_last_share_its_histogram() {
        let policy = adaptive();
        let mut history = BlockHistory::new(&policy);
        let top = u32::try_from(MAX_LEVELS).expect("small") + 10;
        for i in 0..top {
            history.arrival(Duration::from_secs(u64::from(i)));
        }
        assert_eq!(history.in_flight(), top);
        assert!(history.histogram(top).is_some());
        assert!(std::ptr::eq(
            history.histogram(top).expect("shared"),
            history
                .histogram(u32::try_from(MAX_LEVELS).expect("small"))
                .expect("last")
        ));
    }

    #[test]
    fn the_fixed_policy_records_nothing() {
        let policy = KeepAlivePolicy::Fixed(Duration::from_secs(300));
        let history = history(&policy, &[0, 10, 20]);
        assert!(history.histogram(1).is_none());
        assert_eq!(history.in_flight(), 0);
    }

    fn prewarm(level: u32, at: u64, until: u64) -> Prewarm<u64> {
        Prewarm {
            level,
            let_go: 0,
            at,
            until,
        }
    }

    #[test]
    fn a_prewarm_is_due_once_and_only_for_an_uncovered_level() {
        let mut prewarms: Prewarms<u64> = Prewarms::default();
        prewarms.schedule(prewarm(1, 100, 200));
        prewarms.schedule(prewarm(3, 100, 200));
        assert!(prewarms.due(50, 0).is_empty(), "not due yet");
        // Two instances already (in flight, idle or starting): level 1 needs none.
        assert_eq!(prewarms.due(100, 2), vec![prewarm(3, 100, 200)]);
        assert!(prewarms.is_empty(), "both taken, started or not");

        // Past its window it is pointless.
        prewarms.schedule(prewarm(1, 100, 200));
        assert!(prewarms.due(200, 0).is_empty());

        // A level reached cancels its pre-warm and those below, not those above; a new
        // schedule of a level replaces the old one.
        prewarms.schedule(prewarm(1, 100, 200));
        prewarms.schedule(prewarm(2, 100, 200));
        prewarms.schedule(prewarm(4, 100, 200));
        prewarms.schedule(prewarm(4, 150, 300));
        prewarms.arrival(2);
        assert_eq!(prewarms.pending(), &[prewarm(4, 150, 300)]);
        assert_eq!(prewarms.due(150, 0), vec![prewarm(4, 150, 300)]);
    }

    #[test]
    fn too_many_out_of_range_idle_times_fall_back() {
        let policy = adaptive();
        // Every 5 hours: beyond the 4-hour range every time.
        let times: Vec<u64> = (0..20).map(|i| i * 5 * 3600).collect();
        let h = history(&policy, &times);
        assert_eq!(h.histogram(1).expect("level 1").out_of_range(), 19);
        assert!(!h.window(&policy, 1).adaptive);
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
        let window = history(&policy, &times).window(&policy, 1);
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
