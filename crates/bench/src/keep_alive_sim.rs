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
use refinery_pool::keep_alive::{AdaptiveConfig, BlockHistory, KeepAlivePolicy};

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
    busy_until: Duration,
    /// When it last went idle (or was pre-warmed).
    idle_since: Duration,
    expires: Duration,
    busy: bool,
}

/// Replays one function under one policy.
pub fn simulate(function: &Function, policy: &KeepAlivePolicy) -> Outcome {
    let mut history = BlockHistory::new(policy);
    let mut instances: Vec<SimInstance> = Vec::new();
    let mut ends: BinaryHeap<Reverse<(Duration, usize)>> = BinaryHeap::new();
    let mut prewarm: Option<(Duration, Duration)> = None;
    let mut idle_s = 0.0f64;
    let mut cold = 0u64;

    // Idle time of instances that expired by `now`; they are dropped.
    let expire = |instances: &mut Vec<SimInstance>, idle_s: &mut f64, now: Duration| {
        instances.retain(|i| {
            if !i.busy && i.expires <= now {
                *idle_s += i.expires.saturating_sub(i.idle_since).as_secs_f64();
                false
            } else {
                true
            }
        });
    };

    for &arrival in &function.arrivals {
        // Invocations that ended before this arrival, in order.
        while let Some(Reverse((end, index))) = ends.peek().copied() {
            if end > arrival {
                break;
            }
            ends.pop();
            history.end(end);
            let window = history.window(policy);
            let instance = &mut instances[index];
            instance.busy = false;
            instance.idle_since = end;
            if window.prewarm.is_zero() {
                instance.expires = end + window.keep_alive;
            } else {
                // Let go at once; a fresh one is loaded for the window.
                instance.expires = end;
                prewarm = Some((
                    end + window.prewarm,
                    end + window.prewarm + window.keep_alive,
                ));
            }
        }
        // A due pre-warm was started before this arrival, unless an instance was idle
        // then; one not yet due is cancelled by this arrival (as in the pool).
        if let Some((at, until)) = prewarm.take() {
            if at <= arrival && !instances.iter().any(|i| !i.busy && i.expires > at) {
                instances.push(SimInstance {
                    busy_until: at,
                    idle_since: at,
                    expires: until,
                    busy: false,
                });
            }
        }
        expire(&mut instances, &mut idle_s, arrival);
        // Indices in `ends` must stay valid: rebuild them after removals.
        ends = instances
            .iter()
            .enumerate()
            .filter(|(_, i)| i.busy)
            .map(|(index, i)| Reverse((i.busy_until, index)))
            .collect();
        history.arrival(arrival);
        let warm = instances
            .iter_mut()
            .enumerate()
            .filter(|(_, i)| !i.busy && i.expires > arrival)
            .max_by_key(|(_, i)| i.idle_since);
        let index = match warm {
            Some((index, instance)) => {
                idle_s += arrival.saturating_sub(instance.idle_since).as_secs_f64();
                instance.busy = true;
                instance.busy_until = arrival + function.run;
                index
            }
            None => {
                cold += 1;
                instances.push(SimInstance {
                    busy_until: arrival + function.run,
                    idle_since: arrival,
                    expires: arrival,
                    busy: true,
                });
                instances.len() - 1
            }
        };
        ends.push(Reverse((instances[index].busy_until, index)));
    }
    // The tail: every kept instance is idle until it expires.
    while let Some(Reverse((end, index))) = ends.pop() {
        history.end(end);
        let window = history.window(policy);
        let instance = &mut instances[index];
        instance.busy = false;
        instance.idle_since = end;
        if window.prewarm.is_zero() {
            instance.expires = end + window.keep_alive;
        } else {
            instance.expires = end;
            prewarm = Some((
                end + window.prewarm,
                end + window.prewarm + window.keep_alive,
            ));
        }
    }
    expire(&mut instances, &mut idle_s, Duration::MAX);
    if let Some((at, until)) = prewarm {
        idle_s += until.saturating_sub(at).as_secs_f64();
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

fn report(out: &mut String, title: &str, functions: &[Function], per_function: bool) {
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
    for (name, policy) in policies() {
        let mut total = Outcome::default();
        let mut each = Vec::new();
        for function in functions {
            let outcome = simulate(function, &policy);
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
        true,
    );
    if let Some(dir) = azure_dir {
        let functions = azure(dir)?;
        report(
            &mut out,
            "Azure Functions 2019, 200-function sample, one day",
            &functions,
            false,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let outcome = simulate(&periodic(600, 100), &adaptive);
        let fixed = simulate(
            &periodic(600, 100),
            &KeepAlivePolicy::Fixed(Duration::from_secs(700)),
        );
        // Cold until the histogram has its 10 samples, warm afterwards.
        assert!(outcome.cold <= 12, "{outcome:?}");
        assert!(
            outcome.idle_gb_s < fixed.idle_gb_s / 3.0,
            "{outcome:?} vs {fixed:?}"
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
        let outcome = simulate(&function, &KeepAlivePolicy::Fixed(Duration::from_secs(60)));
        assert_eq!(outcome.cold, 2);
    }
}
