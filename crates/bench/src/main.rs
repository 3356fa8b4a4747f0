//! `refinery-bench`: starts a real `refinery serve` (release build) on a loopback port
//! and measures, over HTTP, what the brief promises: cold start and warm invocation
//! latency of a no-op Python block (p50, p99) and the memory (PSS) of idle frozen
//! instances. Prints a Markdown table; numbers go to docs/BENCHMARKS.md by hand.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        let response = self
            .http
            .post(format!("{}{path}", self.url))
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
    let binary = match args.refinery {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("refinery"),
    };
    let server = start_server(&binary)?;
    let api = Api {
        http: reqwest::Client::new(),
        url: server.url.clone(),
    };
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
    Ok(())
}
