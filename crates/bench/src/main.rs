//! `refinery-bench`: starts a real `refinery serve` (release build) on a loopback port
//! and measures, over HTTP, what the brief promises: cold start and warm invocation
//! latency of a no-op Python block (p50, p99) and the memory (PSS) of idle frozen
//! instances, and noisy-neighbour isolation: account B's warm latency alone and while
//! account A floods past its quota. Prints a Markdown table; numbers go to
//! docs/BENCHMARKS.md by hand.

mod keep_alive_sim;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "Benchmark a real Refinery server over HTTP")]
struct Args {
    /// The refinery binary to benchmark (default: the sibling of this executable).
    #[arg(long)]
    refinery: Option<PathBuf>,
    /// Cold starts to measure.
    #[arg(long, default_value_t = 50)]
    cold: usize,
    /// Warm invocations to measure.
    #[arg(long, default_value_t = 2000)]
    warm: usize,
    /// Idle frozen instances whose memory is measured.
    #[arg(long, default_value_t = 20)]
    idle: usize,
    /// Measure only noisy-neighbour isolation (otherwise it runs after the rest).
    #[arg(long)]
    neighbour: bool,
    /// Account B's warm invocations measured alone, and again during A's flood.
    #[arg(long, default_value_t = 1000)]
    neighbour_samples: usize,
    /// Account A's concurrent clients during the flood.
    #[arg(long, default_value_t = 32)]
    flood_clients: usize,
    /// Only simulate keep-alive policies (no server): see keep_alive_sim.rs.
    #[arg(long)]
    keep_alive_sim: bool,
    /// With --keep-alive-sim: also replay the Azure 2019 sample in this directory.
    #[arg(long, value_name = "DIR")]
    azure_trace: Option<PathBuf>,
}

const NOOP: &str = r#"
name = "bench"
[[blocks]]
name = "noop"
language = "python"
code = """
def main(block_input, backpack):
    return block_input
"""
[[blocks]]
name = "hold"
language = "python"
code = """
import time
def main(block_input, backpack):
    time.sleep(block_input)
    return None
"""
"#;

struct Server {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
    operator_key: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn start_server(binary: &Path) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut child = Command::new(binary)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--keep-alive",
            "10m",
            // The latency figures measure the platform, not the default quotas.
            "--quota-rate",
            "1000000",
            "--quota-burst",
            "1000000",
            "--quota-instances",
            "1000",
            "--quota-memory-mb",
            "1000000",
            "--data-dir",
        ])
        .arg(&data)
        .env("REFINERY_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut url = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(rest) = line.strip_prefix("Refinery listening on ") {
            url = Some(rest.trim().to_string());
            break;
        }
    }
    let url = url.context("the server exited before listening")?;
    let operator_key = std::fs::read_to_string(data.join("operator.key"))?
        .trim()
        .to_string();
    Ok(Server {
        child,
        url,
        _dir: dir,
        operator_key,
    })
}

struct Api {
    http: reqwest::Client,
    url: String,
}

impl Api {
    async fn post(&self, key: &str, path: &str, body: &Value) -> Result<Value> {
        self.send_json(reqwest::Method::POST, key, path, body).await
    }

    async fn put(&self, key: &str, path: &str, body: &Value) -> Result<Value> {
        self.send_json(reqwest::Method::PUT, key, path, body).await
    }

    /// Sends `body` as JSON; any non-2xx answer is an error carrying the server's reply.
    async fn send_json(
        &self,
        method: reqwest::Method,
        key: &str,
        path: &str,
        body: &Value,
    ) -> Result<Value> {
        let response = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await?;
        let status = response.status();
        let value: Value = response.json().await?;
        if !status.is_success() {
            bail!("{path}: HTTP {status}: {value}");
        }
        Ok(value)
    }

    /// POSTs and returns only the status (the flood counts refusals, it does not fail on them).
    async fn post_status(&self, key: &str, path: &str, body: &Value) -> Result<u16> {
        let response = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await?;
        let status = response.status().as_u16();
        response.bytes().await?;
        Ok(status)
    }

    async fn get(&self, key: &str, path: &str) -> Result<Value> {
        Ok(self
            .http
            .get(format!("{}{path}", self.url))
            .bearer_auth(key)
            .send()
            .await?
            .json()
            .await?)
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    (percentile(&samples, 50.0), percentile(&samples, 99.0), mean)
}

/// Proportional set size of every process in an instance's cgroup, in KiB.
fn instance_pss_kib(cgroups: &[Value]) -> Option<u64> {
    let dir = cgroups.iter().filter_map(Value::as_str).next()?;
    let procs = std::fs::read_to_string(Path::new(dir).join("cgroup.procs")).ok()?;
    let mut total = 0;
    for pid in procs.split_whitespace() {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
        total += rollup
            .lines()
            .find(|l| l.starts_with("Pss:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())?;
    }
    Some(total)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.keep_alive_sim {
        return keep_alive_sim::run(args.azure_trace.as_deref());
    }
    let binary = match args.refinery.clone() {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("refinery"),
    };
    let server = start_server(&binary)?;
    let api = Api {
        http: reqwest::Client::new(),
        url: server.url.clone(),
    };
    if args.neighbour {
        println!("| figure | p50 | p99 | notes |");
        println!("|---|---|---|---|");
        return neighbour(&api, &server, &args).await;
    }
    let account = api
        .post(
            &server.operator_key,
            "/v1/accounts",
            &json!({ "name": "bench" }),
        )
        .await?;
    let key = account["api_key"].as_str().context("api key")?.to_string();
    let deploy = json!({ "manifest": NOOP, "files": {} });
    let invoke = "/v1/projects/bench/blocks/noop/invoke";

    // Cold: every deploy retires the previous deployment's instances, so the next
    // invocation starts a fresh one.
    let mut cold_http = Vec::new();
    let mut cold_init = Vec::new();
    for _ in 0..args.cold {
        api.post(&key, "/v1/deployments", &deploy).await?;
        let started = Instant::now();
        let reply = api.post(&key, invoke, &json!(null)).await?;
        cold_http.push(started.elapsed().as_secs_f64() * 1000.0);
        if reply["cold"] != true {
            bail!("expected a cold start: {reply}");
        }
        cold_init.push(reply["init_ms"].as_f64().unwrap_or(f64::NAN));
    }

    // Warm: sequential invocations of one instance.
    for _ in 0..50 {
        api.post(&key, invoke, &json!(null)).await?;
    }
    let mut warm_http = Vec::with_capacity(args.warm);
    let warm_started = Instant::now();
    for _ in 0..args.warm {
        let started = Instant::now();
        let reply = api.post(&key, invoke, &json!(null)).await?;
        warm_http.push(started.elapsed().as_secs_f64() * 1000.0);
        if reply["cold"] != false {
            bail!("expected a warm start: {reply}");
        }
    }
    let warm_rate = args.warm as f64 / warm_started.elapsed().as_secs_f64();

    // Idle memory: `idle` instances started at once, then left frozen.
    let hold = "/v1/projects/bench/blocks/hold/invoke";
    let hold_for = json!(0.5);
    let calls = (0..args.idle).map(|_| api.post(&key, hold, &hold_for));
    for result in futures::future::join_all(calls).await {
        result?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let instances = api.get(&server.operator_key, "/v1/instances").await?;
    let pss: Vec<f64> = instances["instances"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter(|i| i["block"] == "hold" && i["state"] == "frozen")
                .filter_map(|i| instance_pss_kib(i["cgroups"].as_array()?))
                .map(|kib| kib as f64 / 1024.0)
                .collect()
        })
        .unwrap_or_default();

    let (cold_p50, cold_p99, _) = summary(cold_http);
    let (init_p50, init_p99, _) = summary(cold_init);
    let (warm_p50, warm_p99, _) = summary(warm_http);
    let (pss_p50, pss_max, pss_mean) = {
        let (p50, _, mean) = summary(pss.clone());
        (p50, pss.iter().copied().fold(0.0, f64::max), mean)
    };
    println!("| figure | p50 | p99 | notes |");
    println!("|---|---|---|---|");
    println!("| cold start, no-op Python, HTTP round trip | {cold_p50:.2} ms | {cold_p99:.2} ms | {} samples |", args.cold);
    println!("| cold start, init only (sandbox + interpreter + code load) | {init_p50:.2} ms | {init_p99:.2} ms | reported `init_ms` |");
    println!("| warm invocation, no-op Python, HTTP round trip | {warm_p50:.3} ms | {warm_p99:.3} ms | {} sequential, {warm_rate:.0} inv/s at concurrency 1 |", args.warm);
    println!(
        "| idle frozen Python instance, PSS | {pss_p50:.2} MiB | max {pss_max:.2} MiB | mean {pss_mean:.2} MiB over {} instances |",
        pss.len()
    );
    neighbour(&api, &server, &args).await
}

/// Sequential warm invocations of `noop`; their HTTP round trips in ms.
async fn warm_samples(api: &Api, key: &str, n: usize) -> Result<Vec<f64>> {
    let invoke = "/v1/projects/bench/blocks/noop/invoke";
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let reply = api.post(key, invoke, &json!(null)).await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        if reply["status"] != "ok" {
            bail!("account B's invocation failed: {reply}");
        }
    }
    Ok(samples)
}

/// Account B's warm latency alone, then while account A (quota: 4 instances, 50
/// invocations/s) floods with `flood_clients` concurrent clients well past its limits.
async fn neighbour(api: &Api, server: &Server, args: &Args) -> Result<()> {
    let mut keys = Vec::new();
    for name in ["neighbour-a", "neighbour-b"] {
        let account = api
            .post(
                &server.operator_key,
                "/v1/accounts",
                &json!({ "name": name }),
            )
            .await?;
        let key = account["api_key"].as_str().context("api key")?.to_string();
        api.post(
            &key,
            "/v1/deployments",
            &json!({ "manifest": NOOP, "files": {} }),
        )
        .await?;
        keys.push(key);
    }
    let (key_a, key_b) = (keys[0].clone(), keys[1].clone());
    api.put(
        &server.operator_key,
        "/v1/accounts/neighbour-a/quota",
        &json!({ "instances": 4, "memory_mb": 512, "rate": 50, "burst": 50 }),
    )
    .await?;

    warm_samples(api, &key_b, 50).await?;
    let alone = warm_samples(api, &key_b, args.neighbour_samples).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, throttled, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut clients = Vec::new();
    for client in 0..args.flood_clients {
        let api = Api {
            http: api.http.clone(),
            url: api.url.clone(),
        };
        let (key, stop) = (key_a.clone(), stop.clone());
        let (ok, throttled, other) = (ok.clone(), throttled.clone(), other.clone());
        clients.push(tokio::spawn(async move {
            // Half the clients hold instances (0.2 s), half hammer the no-op.
            let (path, input) = if client % 2 == 0 {
                ("/v1/projects/bench/blocks/hold/invoke", json!(0.2))
            } else {
                ("/v1/projects/bench/blocks/noop/invoke", json!(null))
            };
            while !stop.load(Ordering::Relaxed) {
                match api.post_status(&key, path, &input).await {
                    Ok(200) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(429) => throttled.fetch_add(1, Ordering::Relaxed),
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flood_started = Instant::now();
    let (a_ok0, a_throttled0) = (
        ok.load(Ordering::Relaxed),
        throttled.load(Ordering::Relaxed),
    );
    let during = warm_samples(api, &key_b, args.neighbour_samples).await;
    let flood_secs = flood_started.elapsed().as_secs_f64();
    let (a_ok, a_throttled) = (
        ok.load(Ordering::Relaxed) - a_ok0,
        throttled.load(Ordering::Relaxed) - a_throttled0,
    );
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.await;
    }
    let during = during?;

    let (alone_p50, alone_p99, _) = summary(alone);
    let (during_p50, during_p99, _) = summary(during);
    println!(
        "| B warm invocation, alone | {alone_p50:.3} ms | {alone_p99:.3} ms | {} sequential |",
        args.neighbour_samples
    );
    println!(
        "| B warm invocation, while A floods past its quota | {during_p50:.3} ms | {during_p99:.3} ms | A: {} clients, {:.0} req/s, {:.0} admitted/s, {:.1}% refused (429); {} other errors |",
        args.flood_clients,
        (a_ok + a_throttled) as f64 / flood_secs,
        a_ok as f64 / flood_secs,
        100.0 * a_throttled as f64 / (a_ok + a_throttled).max(1) as f64,
        other.load(Ordering::Relaxed)
    );
    Ok(())
}
