//! `refinery-bench services`: the services engine measured against a real server (issue 12).
//!
//! One run, one server, side by side:
//! 1. a three-block `then` chain started as a run with `?wait=`, against the same three
//!    blocks invoked one after another by this client over HTTP (each output fed to the next);
//! 2. the added cost of a `then` step: runs of 1, 2, 3 and 10 blocks of the same chain
//!    (per-step cost = (p50 of 10 − p50 of 1) / 9), with where a run's time goes read from
//!    the run JSON (each step's `started_at` and `duration_ms`);
//! 3. a fan-out of N items of a no-op Python block and its fan-in, cold (the first run after
//!    the deploy) and warm (the second);
//! 4. runs per second: K clients starting 1-block runs with `?wait=` back to back for T s.
//!
//! Samples of (1) and (2) are interleaved, one of each in turn, so drift of the machine hits
//! every row alike. Every instance is warm before sampling (a warm-up of each row first).

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::machine::{self, Load, Machine};
use crate::server::{self, Api};
use crate::stats::{summary, Summary};

/// Sizes of a `services` run (flags of `refinery-bench services`).
#[derive(Debug, Clone)]
pub struct ServicesConfig {
    pub refinery: std::path::PathBuf,
    pub runs: usize,
    pub fan_out: usize,
    pub fan_concurrency: usize,
    pub clients: usize,
    pub seconds: f64,
}

/// The chain: `s1 → s2 → … → s10`, each `then`; each block adds 1 to its input. A run that
/// starts at `s{11-n}` makes `n` steps.
const CHAIN: usize = 10;
const INC_PY: &str = "def main(block_input, backpack):\n    return (block_input or 0) + 1\n";

fn chain_manifest() -> String {
    let mut m = String::from("name = \"svc\"\n");
    for i in 1..=CHAIN {
        let _ = write!(
            m,
            "\n[[blocks]]\nname = \"s{i}\"\nlanguage = \"python\"\nmemory_mb = 128\nmax_concurrency = 64\ncode = '''\n{INC_PY}'''\n"
        );
    }
    for i in 1..CHAIN {
        let _ = write!(
            m,
            "\n[[transitions]]\nfrom = \"s{i}\"\nto = \"s{}\"\ntype = \"then\"\n",
            i + 1
        );
    }
    m
}

fn fan_manifest(items: usize, concurrency: usize) -> String {
    format!(
        r#"name = "fan"

[[blocks]]
name = "split"
language = "python"
memory_mb = 128
code = '''
def main(block_input, backpack):
    return list(range({items}))
'''

[[blocks]]
name = "noop"
language = "python"
memory_mb = 128
max_concurrency = {concurrency}
code = '''
def main(block_input, backpack):
    return block_input
'''

[[blocks]]
name = "gather"
language = "python"
memory_mb = 128
code = '''
def main(items, backpack):
    return len(items)
'''

[[transitions]]
from = "split"
to = "noop"
type = "fan-out"

[[transitions]]
from = "noop"
to = "gather"
type = "fan-in"
"#
    )
}

/// One measured row of (1)/(2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `n` blocks as one run, `?wait=`.
    Run(usize),
    /// The last three blocks invoked one after another by the client.
    ClientChain,
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::Run(1) => "1-block run (`?wait=`)".into(),
            Mode::Run(n) => format!("{n}-block chain as a run (`?wait=`)"),
            Mode::ClientChain => "3 blocks invoked one after another by the client".into(),
        }
    }
}

const MODES: [Mode; 5] = [
    Mode::ClientChain,
    Mode::Run(3),
    Mode::Run(1),
    Mode::Run(2),
    Mode::Run(CHAIN),
];

/// Where the time of a run went, from its JSON (ms, per run, means over the samples).
#[derive(Debug, Default, Clone, Copy)]
pub struct Breakdown {
    pub samples: usize,
    /// Run created → first step marked running.
    pub before_first: f64,
    /// Sum of the steps' execution `duration_ms`.
    pub executing: f64,
    /// Sum over transitions of (next step started − previous step's end).
    pub between: f64,
    /// Last step's end → the run's end.
    pub after_last: f64,
    /// The client's round trip minus the run's own `duration_ms` (HTTP, `?wait=` wake-up, the
    /// run read back and serialised).
    pub outside: f64,
}

pub struct ChainRow {
    pub label: String,
    pub steps: usize,
    pub latency: Summary,
    pub breakdown: Option<Breakdown>,
}

pub struct FanRow {
    pub label: &'static str,
    pub wall_ms: f64,
    pub run_ms: f64,
    pub status: String,
    pub steps: usize,
    /// First item started, last item started, last item ended, fan-in started (ms after the
    /// run's start, from the run JSON).
    pub first_item_ms: f64,
    pub last_item_start_ms: f64,
    pub last_item_end_ms: f64,
    pub fan_in_start_ms: f64,
    pub item_duration: Summary,
    pub cold_items: usize,
    pub instances: usize,
}

pub struct Throughput {
    pub clients: usize,
    pub seconds: f64,
    pub runs: usize,
    pub failed: usize,
    pub latency: Summary,
}

pub struct ServicesResults {
    pub machine: Machine,
    pub load_before: Load,
    pub load_after: Load,
    pub elapsed: Duration,
    pub config: ServicesConfig,
    pub chain: Vec<ChainRow>,
    pub warm_invoke: Summary,
    pub fan: Vec<FanRow>,
    pub throughput: Throughput,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Milliseconds since the epoch of an RFC 3339 time in the run JSON.
fn epoch_ms(value: &Value) -> Option<f64> {
    let text = value.as_str()?;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_millis() as f64)
}

/// Starts a run and waits for its end (`?wait=`); fails unless it succeeded.
async fn run_waited(
    api: &Api,
    key: &str,
    project: &str,
    start: &str,
    input: Value,
) -> Result<(f64, Value)> {
    let path = format!("/v1/projects/{project}/runs?wait=120");
    let started = Instant::now();
    let (status, run) = api
        .post_raw(key, &path, &json!({"start": start, "input": input}))
        .await?;
    let ms = ms_since(started);
    if status != 200 || run["status"] != "succeeded" {
        bail!("{path}: the run did not succeed within the wait (HTTP {status}): {run}");
    }
    Ok((ms, run))
}

async fn invoke(api: &Api, key: &str, block: &str, input: Value) -> Result<Value> {
    let path = format!("/v1/projects/svc/blocks/{block}/invoke");
    let reply = api.post(key, &path, &input).await?;
    if reply["status"] != "ok" {
        bail!("{path}: the invocation did not succeed: {reply}");
    }
    Ok(reply)
}

/// One sample of a mode: its round trip in ms, and the run (for runs).
async fn sample(api: &Api, key: &str, mode: Mode) -> Result<(f64, Option<Value>)> {
    match mode {
        Mode::Run(n) => {
            let start = format!("s{}", CHAIN + 1 - n);
            let (ms, run) = run_waited(api, key, "svc", &start, json!(0)).await?;
            let steps = run["steps"].as_array().map_or(0, Vec::len);
            let last = run["steps"].as_array().and_then(|s| s.last());
            let output = last.map(|s| s["output"].clone()).unwrap_or(Value::Null);
            if steps != n || output != json!(n) {
                bail!("a {n}-block run made {steps} steps with output {output}: {run}");
            }
            Ok((ms, Some(run)))
        }
        Mode::ClientChain => {
            let started = Instant::now();
            let mut value = json!(0);
            for i in CHAIN - 2..=CHAIN {
                value = invoke(api, key, &format!("s{i}"), value).await?["output"].clone();
            }
            let ms = ms_since(started);
            if value != json!(3) {
                bail!("the client chain ended with {value}, not 3");
            }
            Ok((ms, None))
        }
    }
}

/// Where a finished run's time went (ms); `None` when a timestamp is missing.
fn breakdown(run: &Value, round_trip_ms: f64) -> Option<Breakdown> {
    let start = epoch_ms(&run["started_at"])?;
    let end = epoch_ms(&run["ended_at"])?;
    let steps = run["steps"].as_array()?;
    let mut b = Breakdown {
        samples: 1,
        outside: round_trip_ms - (end - start),
        ..Breakdown::default()
    };
    let mut previous_end = None;
    for step in steps {
        let s = epoch_ms(&step["started_at"])?;
        let d = step["duration_ms"].as_f64()?;
        match previous_end {
            None => b.before_first = s - start,
            Some(e) => b.between += s - e,
        }
        b.executing += d;
        previous_end = Some(s + d);
    }
    b.after_last = end - previous_end?;
    Some(b)
}

fn mean_breakdown(all: &[Breakdown]) -> Option<Breakdown> {
    if all.is_empty() {
        return None;
    }
    let n = all.len() as f64;
    let mean = |f: fn(&Breakdown) -> f64| all.iter().map(f).sum::<f64>() / n;
    Some(Breakdown {
        samples: all.len(),
        before_first: mean(|b| b.before_first),
        executing: mean(|b| b.executing),
        between: mean(|b| b.between),
        after_last: mean(|b| b.after_last),
        outside: mean(|b| b.outside),
    })
}

async fn chains(api: &Api, key: &str, runs: usize) -> Result<(Vec<ChainRow>, Summary)> {
    // Warm up every block (and the client's connections) first.
    for _ in 0..20 {
        for mode in MODES {
            sample(api, key, mode).await?;
        }
    }
    let mut latencies = vec![Vec::with_capacity(runs); MODES.len()];
    let mut breakdowns = vec![Vec::with_capacity(runs); MODES.len()];
    let mut warm_invoke = Vec::with_capacity(runs);
    for round in 0..runs {
        for offset in 0..MODES.len() {
            let index = (round + offset) % MODES.len();
            let (ms, run) = sample(api, key, MODES[index]).await?;
            latencies[index].push(ms);
            if let Some(b) = run.as_ref().and_then(|r| breakdown(r, ms)) {
                breakdowns[index].push(b);
            }
        }
        // A single warm invocation, for comparison with a step.
        let started = Instant::now();
        invoke(api, key, "s10", json!(0)).await?;
        warm_invoke.push(ms_since(started));
    }
    let rows = MODES
        .iter()
        .enumerate()
        .map(|(i, mode)| ChainRow {
            label: mode.label(),
            steps: match mode {
                Mode::Run(n) => *n,
                Mode::ClientChain => 3,
            },
            latency: summary(&latencies[i]),
            breakdown: mean_breakdown(&breakdowns[i]),
        })
        .collect();
    Ok((rows, summary(&warm_invoke)))
}

async fn fan_run(api: &Api, key: &str, label: &'static str, items: usize) -> Result<FanRow> {
    let started = Instant::now();
    let (_, run) = run_waited(api, key, "fan", "split", json!(null)).await?;
    let wall_ms = ms_since(started);
    let steps = run["steps"].as_array().context("the run has no steps")?;
    let gather = steps
        .iter()
        .find(|s| s["name"] == "gather")
        .context("the run has no fan-in step")?;
    if gather["output"] != json!(items) {
        bail!("the fan-in saw {} items, not {items}", gather["output"]);
    }
    let start = epoch_ms(&run["started_at"]).unwrap_or(f64::NAN);
    let items_of: Vec<&Value> = steps.iter().filter(|s| s["name"] == "noop").collect();
    let starts: Vec<f64> = items_of
        .iter()
        .filter_map(|s| epoch_ms(&s["started_at"]))
        .map(|t| t - start)
        .collect();
    let ends: Vec<f64> = items_of
        .iter()
        .filter_map(|s| Some(epoch_ms(&s["started_at"])? + s["duration_ms"].as_f64()? - start))
        .collect();
    let durations: Vec<f64> = items_of
        .iter()
        .filter_map(|s| s["duration_ms"].as_f64())
        .collect();
    let fold = |v: &[f64], f: fn(f64, f64) -> f64, init: f64| v.iter().copied().fold(init, f);
    // Which items ran cold, and on how many instances: the executions behind the steps.
    let listed = api
        .get(key, "/v1/projects/fan/executions?block=noop&limit=1000")
        .await
        .unwrap_or(Value::Null);
    let ids: std::collections::HashSet<&str> = items_of
        .iter()
        .filter_map(|s| s["execution_id"].as_str())
        .collect();
    let mut instances = std::collections::HashSet::new();
    let mut cold_items = 0;
    for e in listed["executions"].as_array().into_iter().flatten() {
        if e["execution_id"]
            .as_str()
            .is_some_and(|id| ids.contains(id))
        {
            if e["cold"] == true {
                cold_items += 1;
            }
            if let Some(i) = e["instance_id"].as_str() {
                instances.insert(i.to_string());
            }
        }
    }
    Ok(FanRow {
        label,
        wall_ms,
        run_ms: run["duration_ms"].as_f64().unwrap_or(f64::NAN),
        status: run["status"].as_str().unwrap_or_default().to_string(),
        steps: steps.len(),
        first_item_ms: fold(&starts, f64::min, f64::INFINITY),
        last_item_start_ms: fold(&starts, f64::max, f64::NEG_INFINITY),
        last_item_end_ms: fold(&ends, f64::max, f64::NEG_INFINITY),
        fan_in_start_ms: epoch_ms(&gather["started_at"]).map_or(f64::NAN, |t| t - start),
        item_duration: summary(&durations),
        cold_items,
        instances: instances.len(),
    })
}

async fn throughput(api: &Api, key: &str, clients: usize, seconds: f64) -> Result<Throughput> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (api, key) = (api.clone(), key.to_string());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failed = 0;
                while Instant::now() < deadline {
                    match run_waited(&api, &key, "svc", &format!("s{CHAIN}"), json!(0)).await {
                        Ok((ms, _)) => latencies.push(ms),
                        Err(_) => failed += 1,
                    }
                }
                (latencies, failed)
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let (latencies, f) = task.await?;
        all.extend(latencies);
        failed += f;
    }
    Ok(Throughput {
        clients,
        seconds: started.elapsed().as_secs_f64(),
        runs: all.len(),
        failed,
        latency: summary(&all),
    })
}

pub async fn run(config: ServicesConfig) -> Result<ServicesResults> {
    let started = Instant::now();
    let machine = machine::describe();
    let load_before = machine::load();
    let server = server::start(&config.refinery, &[])?;
    let api = Api::new(&server)?;
    let key = api.account(&server.operator_key, "bench").await?;
    api.deploy(&key, &chain_manifest()).await?;
    eprintln!(
        "bench services: chains ({} samples of each row, interleaved)",
        config.runs
    );
    let (chain, warm_invoke) = chains(&api, &key, config.runs).await?;
    eprintln!(
        "bench services: fan-out of {} items (max_concurrency {})",
        config.fan_out, config.fan_concurrency
    );
    api.deploy(&key, &fan_manifest(config.fan_out, config.fan_concurrency))
        .await?;
    let fan = vec![
        fan_run(
            &api,
            &key,
            "cold (first run after the deploy)",
            config.fan_out,
        )
        .await?,
        fan_run(&api, &key, "warm (second run)", config.fan_out).await?,
    ];
    eprintln!(
        "bench services: runs per second ({} clients, {} s)",
        config.clients, config.seconds
    );
    let throughput = throughput(&api, &key, config.clients, config.seconds).await?;
    drop(server);
    Ok(ServicesResults {
        machine,
        load_before,
        load_after: machine::load(),
        elapsed: started.elapsed(),
        config,
        chain,
        warm_invoke,
        fan,
        throughput,
    })
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else if v.abs() < 10.0 {
        format!("{v:.2} ms")
    } else {
        format!("{v:.1} ms")
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "**not met**"
    }
}

/// The command that reproduces this run.
pub fn command(c: &ServicesConfig) -> String {
    format!(
        "target/release/refinery-bench services --runs {} --fan-out {} --fan-concurrency {} --clients {} --seconds {}",
        c.runs, c.fan_out, c.fan_concurrency, c.clients, c.seconds
    )
}

/// The Markdown of one run.
pub fn report(r: &ServicesResults) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let c = &r.config;
    let _ = writeln!(o, "Measured {} at commit `{}` by:\n", m.date_utc, m.commit);
    let _ = writeln!(o, "```sh\n{}\n```\n", command(c));
    let _ = writeln!(
        o,
        "Machine: {} × {}, {:.1} GiB, Linux {}, {}; {}. Release build; the load generator runs on \
         the same machine. Load average (1 min) {:.2} before the run, {:.2} after it; {} / {} \
         compiler processes of other work running at start / end. The run took {:.0} s.\n",
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.os,
        m.python,
        r.load_before.load1,
        r.load_after.load1,
        r.load_before.compilers,
        r.load_after.compilers,
        r.elapsed.as_secs_f64()
    );

    let row = |n: usize| r.chain.iter().find(|row| row.label == Mode::Run(n).label());
    let p50 = |n: usize| row(n).map_or(f64::NAN, |row| row.latency.p50);
    let per_step = (p50(CHAIN) - p50(1)) / (CHAIN - 1) as f64;
    let fan_cold = r.fan.first();
    let fan_warm = r.fan.get(1);
    let fan_ms = |f: Option<&FanRow>| f.map_or(f64::NAN, |f| f.wall_ms);
    let _ = writeln!(o, "### Targets (issue 12)\n");
    let _ = writeln!(
        o,
        "| figure | target | measured | verdict |\n|---|---|---|---|"
    );
    let _ = writeln!(
        o,
        "| added cost of a `then` step, warm instances, durably recorded: (p50 of a {CHAIN}-block run − p50 of a 1-block run) / {} | ≤ 1 ms | {} | {} |",
        CHAIN - 1,
        ms(per_step),
        verdict(per_step <= 1.0)
    );
    let _ = writeln!(
        o,
        "| fan-out + fan-in of {} items, no-op Python, `max_concurrency = {}`, end to end, {} cores | ≤ 3 s | cold {}, warm {} | {} |\n",
        c.fan_out,
        c.fan_concurrency,
        m.cpus,
        ms(fan_ms(fan_cold)),
        ms(fan_ms(fan_warm)),
        verdict(fan_ms(fan_cold) <= 3000.0 && fan_ms(fan_warm) <= 3000.0)
    );

    let _ = writeln!(
        o,
        "### Chains: a run against the client calling the blocks ({} samples per row, interleaved)\n",
        c.runs
    );
    let _ = writeln!(
        o,
        "Each block is Python `return (block_input or 0) + 1`, warm. A single warm invocation of one \
         of them over HTTP, in the same rounds: p50 {}, p90 {}.\n",
        ms(r.warm_invoke.p50),
        ms(r.warm_invoke.p90)
    );
    let _ = writeln!(
        o,
        "| how | blocks | p50 | p90 | p99 | vs the client's 3 calls (p50) |\n|---|---|---|---|---|---|"
    );
    let client = r
        .chain
        .iter()
        .find(|row| row.label == Mode::ClientChain.label())
        .map_or(f64::NAN, |row| row.latency.p50);
    for row in &r.chain {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {:.2}× |",
            row.label,
            row.steps,
            ms(row.latency.p50),
            ms(row.latency.p90),
            ms(row.latency.p99),
            row.latency.p50 / client
        );
    }
    let _ = writeln!(
        o,
        "\nAdded cost per `then` step (p50s): 1 → 2 blocks {}, 1 → 3 blocks {} per step, 1 → {CHAIN} \
         blocks {} per step.\n",
        ms(p50(2) - p50(1)),
        ms((p50(3) - p50(1)) / 2.0),
        ms(per_step)
    );
    let _ = writeln!(
        o,
        "Where a run's time goes, from the run JSON (means; step times are whole milliseconds, \
         so each figure is ± 1 ms on one run, less on the mean):\n"
    );
    let _ = writeln!(
        o,
        "| run | samples | run created → first step running | steps executing (sum of `duration_ms`) | between steps (sum) | between steps, per transition | last step's end → run ended | client round trip − run `duration_ms` |\n|---|---|---|---|---|---|---|---|"
    );
    for row in r
        .chain
        .iter()
        .filter(|row| row.label != Mode::ClientChain.label())
    {
        if let Some(b) = row.breakdown {
            let per = if row.steps > 1 {
                ms(b.between / (row.steps - 1) as f64)
            } else {
                "—".into()
            };
            let _ = writeln!(
                o,
                "| {} block{} | {} | {} | {} | {} | {} | {} | {} |",
                row.steps,
                if row.steps == 1 { "" } else { "s" },
                b.samples,
                ms(b.before_first),
                ms(b.executing),
                ms(b.between),
                per,
                ms(b.after_last),
                ms(b.outside)
            );
        }
    }

    let _ = writeln!(
        o,
        "\n### Fan-out + fan-in: {} items of a no-op Python block (`max_concurrency = {}`)\n",
        c.fan_out, c.fan_concurrency
    );
    let _ = writeln!(
        o,
        "`split` returns `list(range({}))`, a `fan-out` to `noop` (`return block_input`), a \
         `fan-in` to `gather` (`return len(items)`). Times after the run's start are from the run \
         JSON.\n",
        c.fan_out
    );
    let _ = writeln!(
        o,
        "| run | end to end (client) | run `duration_ms` | steps | first item started | last item started | last item ended | fan-in started | item `duration_ms` p50 / p99 | items run cold | instances |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for f in &r.fan {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} / {} | {} | {} |",
            f.label,
            ms(f.wall_ms),
            ms(f.run_ms),
            f.steps,
            f.status,
            ms(f.first_item_ms),
            ms(f.last_item_start_ms),
            ms(f.last_item_end_ms),
            ms(f.fan_in_start_ms),
            ms(f.item_duration.p50),
            ms(f.item_duration.p99),
            f.cold_items,
            f.instances
        );
    }

    let t = &r.throughput;
    let _ = writeln!(o, "\n### Runs per second\n");
    let _ = writeln!(
        o,
        "{} clients, each starting 1-block runs (`s{CHAIN}`) with `?wait=` back to back for {:.1} s.\n",
        t.clients, t.seconds
    );
    let _ = writeln!(
        o,
        "| clients | runs succeeded | failed | runs/s | p50 | p90 | p99 |\n|---|---|---|---|---|---|---|"
    );
    let _ = writeln!(
        o,
        "| {} | {} | {} | {:.0} | {} | {} | {} |",
        t.clients,
        t.runs,
        t.failed,
        t.runs as f64 / t.seconds,
        ms(t.latency.p50),
        ms(t.latency.p90),
        ms(t.latency.p99)
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_manifest_connects_ten_blocks_in_order() {
        let m = chain_manifest();
        assert_eq!(m.matches("[[blocks]]").count(), CHAIN);
        assert_eq!(m.matches("type = \"then\"").count(), CHAIN - 1);
        assert!(m.contains("from = \"s9\"\nto = \"s10\""));
    }

    #[test]
    fn a_breakdown_splits_a_run_into_its_parts() {
        let run = json!({
            "started_at": "2026-12-03T21:00:00.000Z",
            "ended_at": "2026-12-03T21:00:00.010Z",
            "steps": [
                {"started_at": "2026-12-03T21:00:00.001Z", "duration_ms": 2.0},
                {"started_at": "2026-12-03T21:00:00.005Z", "duration_ms": 3.0},
            ]
        });
        let b = breakdown(&run, 12.0).expect("timestamps");
        assert_eq!(b.before_first, 1.0);
        assert_eq!(b.executing, 5.0);
        assert_eq!(b.between, 2.0);
        assert_eq!(b.after_last, 2.0);
        assert_eq!(b.outside, 2.0);
    }

    #[test]
    fn a_run_without_timestamps_has_no_breakdown() {
        let run = json!({"started_at": "2026-12-03T21:00:00.000Z", "steps": []});
        assert!(breakdown(&run, 1.0).is_none());
    }
}
