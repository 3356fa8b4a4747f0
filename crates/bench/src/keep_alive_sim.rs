//! `refinery-bench --keep-alive-sim`: replays invocation traces through the pool's own
//! keep-alive policy code (`refinery_pool::keep_alive`) and compares fixed keep-alive
//! (5 and 10 minutes) with the adaptive policy on cold starts and idle memory.
//!
//! The model follows the pool: each invocation takes the most recently idle live instance
//! of its block (warm) or starts a new one (cold); when it ends, the policy's window says
//! how long the instance stays (fixed / adaptive without pre-warm) or lets it go and
//! schedules a pre-warmed one (adaptive with pre-warm; an arrival cancels a pending
//! pre-warm, as in the pool). Idle memory is the block's memory for every second an
//! instance is loaded but not running. Simplifications: instances start instantly (cold
//! start latency is not simulated) and a pre-warm happens exactly at its time (the pool's
//! reaper acts within its interval, at most 5 s late).
//!
//! Traces: a synthetic day of periodic (timer) and bursty blocks, and optionally the
//! 200-function sample of the Azure Functions 2019 trace (one day, per-minute counts
//! spread evenly over each minute; mean run time and memory per function).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use refinery_pool::keep_alive::{AdaptiveConfig, BlockHistory, KeepAlivePolicy, Prewarm, Prewarms};

/// One block's invocations.
pub struct Function {
    pub name: String,
    pub memory_mb: f64,
    pub run: Duration,
    /// Arrival times since the trace start, sorted.
    pub arrivals: Vec<Duration>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub invocations: u64,
    pub cold: u64,
    pub idle_gb_s: f64,
}

impl Outcome {
    fn add(&mut self, other: Outcome) {
        self.invocations += other.invocations;
        self.cold += other.cold;
        self.idle_gb_s += other.idle_gb_s;
    }
}

struct SimInstance {
    id: u64,
    busy: bool,
    /// When it last went idle (or was pre-warmed).
    idle_since: Duration,
    expires: Duration,
    /// Push order onto the idle stack (the highest is on top, reused first).
    order: u64,
}

/// The first multiple of `tick` at or after `t`.
fn align(t: Duration, tick: Duration) -> Duration {
    let tick_ns = tick.as_nanos().max(1);
    let n = t.as_nanos().div_ceil(tick_ns);
    Duration::from_nanos(u64::try_from(n * tick_ns).unwrap_or(u64::MAX))
}

/// Replays one function under one policy; the reaper runs every `tick` (expiries happen on
/// its rounds, as in the pool); pre-warms start on time (the pool sets a timer for each).
pub fn simulate(function: &Function, policy: &KeepAlivePolicy, tick: Duration) -> Outcome {
    let tick = tick.max(Duration::from_millis(1));
    let mut history = BlockHistory::new(policy);
    let mut prewarms: Prewarms<Duration> = Prewarms::default();
    let mut instances: Vec<SimInstance> = Vec::new();
    let mut ends: BinaryHeap<Reverse<(Duration, u64)>> = BinaryHeap::new();
    let (mut next_id, mut next_order) = (0u64, 0u64);
    let mut next_tick = tick;
    let mut idle_s = 0.0f64;
    let mut cold = 0u64;

    // An invocation of instance `id` ended at `t`: the pool's `release`.
    let end = |instances: &mut Vec<SimInstance>,
               prewarms: &mut Prewarms<Duration>,
               history: &mut BlockHistory,
               next_order: &mut u64,
               id: u64,
               t: Duration| {
        let level = history.end(t);
        let window = history.window(policy, level);
        let idle_exists = instances.iter().any(|i| !i.busy);
        let Some(index) = instances.iter().position(|i| i.id == id) else {
            return;
        };
        if !window.prewarm.is_zero() && !idle_exists {
            // Let go at once; a fresh one is loaded for the window.
            instances.swap_remove(index);
            let at = t + window.prewarm;
            prewarms.schedule(Prewarm {
                level,
                let_go: t,
                at,
                until: at + window.keep_alive,
            });
        } else {
            let instance = &mut instances[index];
            instance.busy = false;
            instance.idle_since = t;
            instance.expires = t + window.prewarm + window.keep_alive;
            instance.order = *next_order;
            *next_order += 1;
        }
    };
    // A reaper round at `t`: expired idle instances go.
    let reap = |instances: &mut Vec<SimInstance>, idle_s: &mut f64, t: Duration| {
        instances.retain(|i| {
            if !i.busy && i.expires <= t {
                *idle_s += t.saturating_sub(i.idle_since).as_secs_f64();
                false
            } else {
                true
            }
        });
    };
    // A pre-warm's timer at `t`: due pre-warms of uncovered levels start.
    let start_due = |instances: &mut Vec<SimInstance>,
                     prewarms: &mut Prewarms<Duration>,
                     history: &BlockHistory,
                     next_id: &mut u64,
                     next_order: &mut u64,
                     t: Duration| {
        let idle = u32::try_from(instances.iter().filter(|i| !i.busy).count()).unwrap_or(0);
        for prewarm in prewarms.due(t, history.in_flight() + idle) {
            instances.push(SimInstance {
                id: *next_id,
                busy: false,
                idle_since: t,
                expires: prewarm.until,
                order: *next_order,
            });
            *next_id += 1;
            *next_order += 1;
        }
    };

    let mut arrivals = function.arrivals.iter().copied().peekable();
    loop {
        let next_arrival = arrivals.peek().copied();
        let next_end = ends.peek().map(|Reverse((t, _))| *t);
        let next_prewarm = prewarms.next_at();
        if !instances.iter().any(|i| !i.busy) {
            // Nothing for the reaper to do until the next event: skip its rounds.
            let Some(next) = [next_arrival, next_end, next_prewarm]
                .into_iter()
                .flatten()
                .min()
            else {
                break;
            };
            next_tick = next_tick.max(align(next, tick));
        }
        // Ends first, then a reaper round, then a pre-warm, then an arrival, at equal times.
        let candidates = [
            next_end.map(|t| (t, 0)),
            Some((next_tick, 1)),
            next_prewarm.map(|t| (t, 2)),
            next_arrival.map(|t| (t, 3)),
        ];
        let Some((t, kind)) = candidates.into_iter().flatten().min() else {
            break;
        };
        match kind {
            0 => {
                if let Some(Reverse((t, id))) = ends.pop() {
                    end(
                        &mut instances,
                        &mut prewarms,
                        &mut history,
                        &mut next_order,
                        id,
                        t,
                    );
                }
            }
            1 => {
                reap(&mut instances, &mut idle_s, t);
                next_tick = t + tick;
            }
            2 => start_due(
                &mut instances,
                &mut prewarms,
                &history,
                &mut next_id,
                &mut next_order,
                t,
            ),
            _ => {
                arrivals.next();
                let level = history.arrival(t);
                prewarms.arrival(level);
                let warm = instances
                    .iter_mut()
                    .filter(|i| !i.busy)
                    .max_by_key(|i| i.order);
                let id = match warm {
                    Some(instance) => {
                        idle_s += t.saturating_sub(instance.idle_since).as_secs_f64();
                        instance.busy = true;
                        instance.id
                    }
                    None => {
                        cold += 1;
                        instances.push(SimInstance {
                            id: next_id,
                            busy: true,
                            idle_since: t,
                            expires: t,
                            order: 0,
                        });
                        next_id += 1;
                        next_id - 1
                    }
                };
                ends.push(Reverse((t + function.run, id)));
            }
        }
    }
    Outcome {
        invocations: function.arrivals.len() as u64,
        cold,
        idle_gb_s: idle_s * function.memory_mb / 1024.0,
    }
}

/// A small deterministic generator (xorshift64*), so every run replays the same trace.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.next()).ln()
    }
}

const DAY_S: f64 = 24.0 * 3600.0;

/// One synthetic day: timer-driven blocks (a fixed period with a little jitter) and
/// bursty blocks (bursts of closely spaced calls, with long, irregular silences between).
pub fn synthetic() -> Vec<Function> {
    let mut rng = Rng(0x5EED_CAFE_F00D_1234);
    let mut functions = Vec::new();
    for (minutes, memory_mb) in [
        (2.0, 128.0),
        (7.0, 256.0),
        (15.0, 128.0),
        (30.0, 512.0),
        (60.0, 256.0),
    ] {
        let period = minutes * 60.0;
        let mut t = rng.next() * period;
        let mut arrivals = Vec::new();
        while t < DAY_S {
            arrivals.push(Duration::from_secs_f64(t + rng.next() * 2.0));
            t += period;
        }
        functions.push(Function {
            name: format!("periodic-{minutes}m"),
            memory_mb,
            run: Duration::from_millis(300),
            arrivals,
        });
    }
    // (mean silence between bursts in minutes, calls per burst, memory)
    for (silence_min, calls, memory_mb) in
        [(20.0, 30, 256.0), (90.0, 50, 512.0), (360.0, 20, 256.0)]
    {
        let mut t = rng.exponential(silence_min * 60.0);
        let mut arrivals = Vec::new();
        while t < DAY_S {
            for _ in 0..calls {
                arrivals.push(Duration::from_secs_f64(t));
                t += rng.exponential(3.0);
            }
            t += rng.exponential(silence_min * 60.0);
        }
        functions.push(Function {
            name: format!("bursty-{silence_min}m"),
            memory_mb,
            run: Duration::from_millis(200),
            arrivals,
        });
    }
    functions
}

/// The Azure Functions 2019 sample in `dir` (`200_inv.csv`, `200_run.csv`, `200_mem.csv`).
pub fn azure(dir: &Path) -> Result<Vec<Function>> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let runs: HashMap<String, f64> = read("200_run.csv")?
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split(',').collect();
            Some((cols.get(2)?.to_string(), cols.get(3)?.parse().ok()?))
        })
        .collect();
    let memory: HashMap<String, f64> = read("200_mem.csv")?
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split(',').collect();
            Some((cols.get(1)?.to_string(), cols.get(3)?.parse().ok()?))
        })
        .collect();
    let mut functions = Vec::new();
    for line in read("200_inv.csv")?.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').collect();
        if cols.len() < 4 {
            continue;
        }
        let mut arrivals = Vec::new();
        for (minute, count) in cols[3..].iter().enumerate() {
            let count: u32 = count.trim().parse().unwrap_or(0);
            for i in 0..count {
                let offset = (f64::from(i) + 0.5) / f64::from(count) * 60.0;
                arrivals.push(Duration::from_secs_f64(minute as f64 * 60.0 + offset));
            }
        }
        if arrivals.is_empty() {
            continue;
        }
        functions.push(Function {
            name: cols[0].chars().take(8).collect(),
            memory_mb: memory.get(cols[2]).copied().unwrap_or(128.0).max(1.0),
            run: Duration::from_secs_f64(
                runs.get(cols[0]).copied().unwrap_or(100.0).max(1.0) / 1000.0,
            ),
            arrivals,
        });
    }
    Ok(functions)
}

/// The pool's reaper interval at the defaults (`--keep-alive 5m`, one-minute bins): 5 s.
const DAY_TICK: Duration = Duration::from_secs(5);

/// The slice `replay_trace.py` sends through a running server (`--functions 100
/// --minutes 180`), built as that tool builds it: the first `functions` rows of
/// `200_inv.csv`, their first `minutes` minutes, each call at a uniformly random instant
/// of its minute (this generator's, not Python's), the run time the 50th percentile of
/// `200_run.csv`, the memory the tool's (`200_mem.csv` looked up by the row's second
/// column, rounded up to 64 MB, 128 to 3008 MB). Times are trace times.
pub fn azure_replay_slice(dir: &Path, functions: usize, minutes: usize) -> Result<Vec<Function>> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    };
    let column = |text: &str, key: usize, value: usize| -> HashMap<String, f64> {
        text.lines()
            .skip(1)
            .filter_map(|line| {
                let cols: Vec<&str> = line.split(',').collect();
                Some((cols.get(key)?.to_string(), cols.get(value)?.parse().ok()?))
            })
            .collect()
    };
    let runs = column(&read("200_run.csv")?, 2, 10);
    let memory = column(&read("200_mem.csv")?, 1, 3);
    let mut rng = Rng(0x0005_EED0_F00D_0001);
    let mut out = Vec::new();
    for line in read("200_inv.csv")?.lines().skip(1).take(functions) {
        let cols: Vec<&str> = line.split(',').collect();
        if cols.len() < 4 {
            continue;
        }
        let mut arrivals = Vec::new();
        for (minute, count) in cols[3..].iter().take(minutes).enumerate() {
            let count: u32 = count.trim().parse().unwrap_or(0);
            for _ in 0..count {
                arrivals.push(Duration::from_secs_f64((minute as f64 + rng.next()) * 60.0));
            }
        }
        arrivals.sort();
        if arrivals.is_empty() {
            continue;
        }
        let mb = memory.get(cols[1]).copied().unwrap_or(128.0);
        out.push(Function {
            name: cols[0].chars().take(8).collect(),
            memory_mb: ((mb / 64.0).ceil() * 64.0).clamp(128.0, 3008.0),
            run: Duration::from_secs_f64(
                runs.get(cols[0]).copied().unwrap_or(10.0).max(0.0) / 1000.0,
            ),
            arrivals,
        });
    }
    Ok(out)
}

/// The replay's reaper interval: 0.1 s (`--keep-alive 10s`, `--adaptive-bin 1s`) at 60×.
const REPLAY_TICK: Duration = Duration::from_secs(6);

/// What the replay compares: `--keep-alive 10s` and the adaptive policy over it, at 60×.
fn replay_policies() -> Vec<(&'static str, KeepAlivePolicy)> {
    let ten = Duration::from_secs(600);
    vec![
        ("fixed 10 min", KeepAlivePolicy::Fixed(ten)),
        (
            "adaptive (fallback 10 min)",
            KeepAlivePolicy::Adaptive(AdaptiveConfig::paper(ten)),
        ),
    ]
}

fn policies() -> Vec<(&'static str, KeepAlivePolicy)> {
    let five = Duration::from_secs(300);
    vec![
        ("fixed 5 min", KeepAlivePolicy::Fixed(five)),
        (
            "fixed 10 min",
            KeepAlivePolicy::Fixed(Duration::from_secs(600)),
        ),
        // What `serve --keep-alive-policy adaptive` runs (with the default --keep-alive 5m).
        (
            "adaptive, head 5th / tail 99th (the pool's)",
            KeepAlivePolicy::Adaptive(AdaptiveConfig::paper(five)),
        ),
        // For comparison only: a tighter tail lets bursty blocks go between bursts.
        (
            "adaptive, head 5th / tail 95th",
            KeepAlivePolicy::Adaptive(AdaptiveConfig {
                tail_percentile: 95.0,
                ..AdaptiveConfig::paper(five)
            }),
        ),
    ]
}

fn report(
    out: &mut String,
    title: &str,
    functions: &[Function],
    policies: &[(&'static str, KeepAlivePolicy)],
    tick: Duration,
    per_function: bool,
) {
    let _ = writeln!(out, "\n### {title}\n");
    let invocations: usize = functions.iter().map(|f| f.arrivals.len()).sum();
    let _ = writeln!(
        out,
        "{} blocks, {invocations} invocations.\n",
        functions.len()
    );
    let _ = writeln!(out, "| policy | cold starts | cold % | idle GB-s | cold starts per idle GB-s | warm starts per idle GB-s |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut rows = Vec::new();
    for (name, policy) in policies.iter().copied() {
        let mut total = Outcome::default();
        let mut each = Vec::new();
        for function in functions {
            let outcome = simulate(function, &policy, tick);
            total.add(outcome);
            each.push(outcome);
        }
        let warm = total.invocations - total.cold;
        let _ = writeln!(
            out,
            "| {name} | {} | {:.2} % | {:.0} | {:.4} | {:.3} |",
            total.cold,
            100.0 * total.cold as f64 / total.invocations.max(1) as f64,
            total.idle_gb_s,
            total.cold as f64 / total.idle_gb_s.max(f64::MIN_POSITIVE),
            warm as f64 / total.idle_gb_s.max(f64::MIN_POSITIVE),
        );
        rows.push((name, each));
    }
    if per_function {
        let _ = writeln!(out, "\nPer block (cold starts / idle GB-s):\n");
        let header: Vec<&str> = rows.iter().map(|r| r.0).collect();
        let _ = writeln!(out, "| block | invocations | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|---|{}", "---|".repeat(header.len()));
        for (index, function) in functions.iter().enumerate() {
            let cells: Vec<String> = rows
                .iter()
                .map(|(_, each)| format!("{} / {:.0}", each[index].cold, each[index].idle_gb_s))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                function.name,
                function.arrivals.len(),
                cells.join(" | ")
            );
        }
    }
}

/// Runs the comparison; Markdown subsections (`###`), one per trace.
pub fn render(azure_dir: Option<&Path>) -> Result<String> {
    let mut out = String::new();
    report(
        &mut out,
        "Synthetic day: 5 periodic + 3 bursty blocks",
        &synthetic(),
        &policies(),
        DAY_TICK,
        true,
    );
    if let Some(dir) = azure_dir {
        let functions = azure(dir)?;
        report(
            &mut out,
            "Azure Functions 2019, 200-function sample, one day",
            &functions,
            &policies(),
            DAY_TICK,
            false,
        );
        let slice = azure_replay_slice(dir, 100, 180)?;
        report(
            &mut out,
            "The platform replay's slice: first 100 functions, first 180 minutes (trace time)",
            &slice,
            &replay_policies(),
            REPLAY_TICK,
            false,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-second reaper: the tests' times are whole seconds, so expiries are exact.
    const TICK: Duration = Duration::from_secs(1);

    fn periodic(period_s: u64, n: u64) -> Function {
        Function {
            name: "p".into(),
            memory_mb: 1024.0,
            run: Duration::from_secs(1),
            arrivals: (0..n).map(|i| Duration::from_secs(i * period_s)).collect(),
        }
    }

    #[test]
    fn fixed_keep_alive_shorter_than_the_period_is_always_cold() {
        let outcome = simulate(
            &periodic(600, 10),
            &KeepAlivePolicy::Fixed(Duration::from_secs(300)),
            TICK,
        );
        assert_eq!(outcome.cold, 10);
        // Each of the 10 instances idles its full 300 s at 1 GB.
        assert!((outcome.idle_gb_s - 3000.0).abs() < 1e-6, "{outcome:?}");
    }

    #[test]
    fn fixed_keep_alive_longer_than_the_period_is_warm_after_the_first() {
        let outcome = simulate(
            &periodic(600, 10),
            &KeepAlivePolicy::Fixed(Duration::from_secs(700)),
            TICK,
        );
        assert_eq!(outcome.cold, 1);
        // 9 gaps of 599 s, then the last 700 s.
        assert!(
            (outcome.idle_gb_s - (9.0 * 599.0 + 700.0)).abs() < 1e-6,
            "{outcome:?}"
        );
    }

    #[test]
    fn adaptive_prewarms_a_periodic_block_with_little_idle_memory() {
        let adaptive = KeepAlivePolicy::Adaptive(AdaptiveConfig::paper(Duration::from_secs(300)));
        let outcome = simulate(&periodic(600, 100), &adaptive, TICK);
        let fixed = simulate(
            &periodic(600, 100),
            &KeepAlivePolicy::Fixed(Duration::from_secs(700)),
            TICK,
        );
        // Cold until the histogram has its 10 samples, warm afterwards.
        assert!(outcome.cold <= 12, "{outcome:?}");
        assert!(
            outcome.idle_gb_s < fixed.idle_gb_s / 3.0,
            "{outcome:?} vs {fixed:?}"
        );
    }

    /// Two calls always in flight (100 s runs every 50 s) and, every 5 minutes, three more
    /// at once: levels 3 to 5 are idle about 200 s each time. Per level, the adaptive policy
    /// keeps the peak's instances to about 4.4 minutes (their 99th percentile plus the
    /// margin), not 10, and they are warm at every peak, as with fixed 10 min. (A single
    /// block-wide histogram saw mostly the short gaps between the overlapping calls.)
    #[test]
    fn adaptive_keeps_a_busy_blocks_peak_instances_between_peaks() {
        let mut arrivals = Vec::new();
        for i in 0..600u64 {
            arrivals.push(Duration::from_secs(i * 50));
            if i % 6 == 0 {
                for _ in 0..3 {
                    arrivals.push(Duration::from_secs(i * 50 + 10));
                }
            }
        }
        arrivals.sort();
        let function = Function {
            name: "busy".into(),
            memory_mb: 1024.0,
            run: Duration::from_secs(100),
            arrivals,
        };
        let ten = Duration::from_secs(600);
        let fixed = simulate(&function, &KeepAlivePolicy::Fixed(ten), TICK);
        let adaptive = simulate(
            &function,
            &KeepAlivePolicy::Adaptive(AdaptiveConfig::paper(ten)),
            TICK,
        );
        // Fixed: the first two and the first peak's three; nothing after.
        assert_eq!(fixed.cold, 5, "{fixed:?}");
        // Adaptive: the same cold starts, and less idle memory (the tail after the last
        // peak is shorter).
        assert_eq!(adaptive.cold, 5, "{adaptive:?}");
        assert!(
            adaptive.idle_gb_s < fixed.idle_gb_s,
            "{adaptive:?} vs {fixed:?}"
        );
    }

    #[test]
    fn concurrent_arrivals_start_separate_instances() {
        let function = Function {
            name: "c".into(),
            memory_mb: 1024.0,
            run: Duration::from_secs(10),
            arrivals: vec![
                Duration::ZERO,
                Duration::from_secs(1),
                Duration::from_secs(20),
            ],
        };
        let outcome = simulate(
            &function,
            &KeepAlivePolicy::Fixed(Duration::from_secs(60)),
            TICK,
        );
        assert_eq!(outcome.cold, 2);
    }
}
