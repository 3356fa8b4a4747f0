//! `refinery-bench --neighbour`: noisy-neighbour isolation. Account B's warm latency alone,
//! then while account A (quota: 4 instances, 50 invocations/s) floods well past its limits.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use crate::server::{Api, Server};
use crate::stats::summary;

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

/// Prints a Markdown table: B alone, and B during A's flood with `flood_clients` clients.
pub async fn run(api: &Api, server: &Server, samples: usize, flood_clients: usize) -> Result<()> {
    let mut keys = Vec::new();
    for name in ["neighbour-a", "neighbour-b"] {
        let key = api.account(&server.operator_key, name).await?;
        api.deploy(&key, NOOP).await?;
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
    let alone = warm_samples(api, &key_b, samples).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, throttled, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut clients = Vec::new();
    for client in 0..flood_clients {
        let api = api.clone();
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
                match api.post_raw(&key, path, &input).await {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    Ok((429, _)) => throttled.fetch_add(1, Ordering::Relaxed),
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
    let during = warm_samples(api, &key_b, samples).await;
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

    let (alone, during) = (summary(&alone), summary(&during));
    println!("| figure | p50 | p99 | notes |");
    println!("|---|---|---|---|");
    println!(
        "| B warm invocation, alone | {:.3} ms | {:.3} ms | {samples} sequential |",
        alone.p50, alone.p99
    );
    println!(
        "| B warm invocation, while A floods past its quota | {:.3} ms | {:.3} ms | A: {flood_clients} clients, {:.0} req/s, {:.0} admitted/s, {:.1}% refused (429); {} other errors |",
        during.p50,
        during.p99,
        (a_ok + a_throttled) as f64 / flood_secs,
        a_ok as f64 / flood_secs,
        100.0 * a_throttled as f64 / (a_ok + a_throttled).max(1) as f64,
        other.load(Ordering::Relaxed)
    );
    Ok(())
}
