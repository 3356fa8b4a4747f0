//! `refinery-bench queues`: queue throughput against a real server (issue 13).
//!
//! For each batch size (1 and 10): a project with queue `jobs` (`batch_size` = the size,
//! `visibility_timeout_s = 60`) consumed by a no-op Python block (`return None`,
//! `max_concurrency` = `--concurrency`). After a warm-up batch of messages, N messages are
//! sent in requests of 1,000 and the clock runs from the first send until the queue shows
//! nothing visible or in flight. None lost: every message then must have been deleted by
//! a succeeded consumer step (the only way a message leaves the queue but the dead-letter
//! list), so `dead_letter` must be 0 and the deliveries counted by the server
//! (`refinery_queue_messages_delivered`) at least N.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::{json, Value};

use crate::machine::{self, Load, Machine};
use crate::server::{self, Api};

/// Sizes of a `queues` run (flags of `refinery-bench queues`).
#[derive(Debug, Clone)]
pub struct QueuesConfig {
    pub refinery: std::path::PathBuf,
    pub messages: usize,
    pub concurrency: usize,
}

/// Messages per send request.
const SEND_CHUNK: usize = 1000;
/// The target of issue 13.
const TARGET_PER_S: f64 = 2000.0;

fn manifest(batch: usize, concurrency: usize) -> String {
    format!(
        r#"name = "q{batch}"

[[blocks]]
name = "noop"
language = "python"
memory_mb = 128
max_concurrency = {concurrency}
code = '''
def main(batch, backpack):
    return None
'''

[[queues]]
name = "jobs"
batch_size = {batch}
visibility_timeout_s = 60
max_receive_count = 5

[[transitions]]
from = "jobs"
to = "noop"
type = "then"
"#
    )
}

/// One batch size's figures.
#[derive(Debug, Clone)]
pub struct QueueRow {
    pub batch: usize,
    pub messages: usize,
    /// From the first send to the last send's reply.
    pub send_s: f64,
    /// From the first send to the queue drained.
    pub drain_s: f64,
    pub dead_letter: u64,
    pub delivered: u64,
    pub left: u64,
}

pub struct QueuesResults {
    pub machine: Machine,
    pub load_before: Load,
    pub load_after: Load,
    pub elapsed: Duration,
    pub config: QueuesConfig,
    pub rows: Vec<QueueRow>,
}

async fn queue(api: &Api, key: &str, project: &str) -> Result<Value> {
    api.get(key, &format!("/v1/projects/{project}/queues/jobs"))
        .await
}

async fn send(api: &Api, key: &str, project: &str, from: usize, n: usize) -> Result<()> {
    let messages: Vec<Value> = (from..from + n).map(|i| json!({"n": i})).collect();
    api.post(
        key,
        &format!("/v1/projects/{project}/queues/jobs/messages"),
        &json!({ "messages": messages }),
    )
    .await?;
    Ok(())
}

/// Waits until nothing is visible or in flight (at most `timeout`); the queue then.
async fn drained(api: &Api, key: &str, project: &str, timeout: Duration) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let q = queue(api, key, project).await?;
        if (q["visible"] == 0 && q["in_flight"] == 0) || Instant::now() > deadline {
            return Ok(q);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `refinery_queue_messages_delivered` from `/metrics`.
async fn delivered(api: &Api, operator_key: &str) -> Result<u64> {
    let text = api
        .http
        .get(format!("{}/metrics", api.url))
        .bearer_auth(operator_key)
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("refinery_queue_messages_delivered_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64))
}

async fn row(
    api: &Api,
    operator_key: &str,
    key: &str,
    batch: usize,
    config: &QueuesConfig,
) -> Result<QueueRow> {
    let project = format!("q{batch}");
    api.deploy(key, &manifest(batch, config.concurrency))
        .await?;
    // Warm-up: instances started, the pump running.
    let warm = (config.concurrency * batch).max(100);
    send(api, key, &project, 0, warm).await?;
    let q = drained(api, key, &project, Duration::from_secs(120)).await?;
    if q["visible"] != 0 || q["in_flight"] != 0 {
        bail!("the warm-up of batch {batch} did not drain in 120 s: {q}");
    }
    let before = delivered(api, operator_key).await?;
    let start = Instant::now();
    let mut sent = 0;
    while sent < config.messages {
        let n = SEND_CHUNK.min(config.messages - sent);
        send(api, key, &project, warm + sent, n).await?;
        sent += n;
    }
    let send_s = start.elapsed().as_secs_f64();
    let q = drained(api, key, &project, Duration::from_secs(600)).await?;
    let drain_s = start.elapsed().as_secs_f64();
    let after = delivered(api, operator_key).await?;
    Ok(QueueRow {
        batch,
        messages: config.messages,
        send_s,
        drain_s,
        dead_letter: q["dead_letter"].as_u64().unwrap_or(u64::MAX),
        delivered: after.saturating_sub(before),
        left: q["visible"].as_u64().unwrap_or(0) + q["in_flight"].as_u64().unwrap_or(0),
    })
}

pub async fn run(config: QueuesConfig) -> Result<QueuesResults> {
    let started = Instant::now();
    let machine = machine::describe();
    let load_before = machine::load();
    let server = server::start(&config.refinery, &[])?;
    let api = Api::new(&server)?;
    let key = api.account(&server.operator_key, "bench").await?;
    let mut rows = Vec::new();
    for batch in [1, 10] {
        eprintln!(
            "bench queues: {} messages, batch {batch}, consumer max_concurrency {}",
            config.messages, config.concurrency
        );
        rows.push(row(&api, &server.operator_key, &key, batch, &config).await?);
    }
    drop(server);
    Ok(QueuesResults {
        machine,
        load_before,
        load_after: machine::load(),
        elapsed: started.elapsed(),
        config,
        rows,
    })
}

/// The command that reproduces this run.
pub fn command(c: &QueuesConfig) -> String {
    format!(
        "target/release/refinery-bench queues --messages {} --concurrency {}",
        c.messages, c.concurrency
    )
}

/// The Markdown of one run.
pub fn report(r: &QueuesResults) -> String {
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
    let _ = writeln!(
        o,
        "{} messages sent in requests of {SEND_CHUNK} to queue `jobs`, consumed by a no-op Python \
         block (`return None`, `max_concurrency = {}`), warm; the clock runs from the first send \
         to the queue showing nothing visible or in flight (polled every 50 ms). Every message is a durable row \
         (SQLite, WAL); each batch is one run: the claim, the run's creation, its step and the \
         settlement (delete) in the step's commit are store transactions.\n",
        c.messages, c.concurrency
    );
    let _ = writeln!(
        o,
        "| batch_size | messages | sent in | all processed in | messages/s | target (issue 13) | dead letters | deliveries | left | none lost |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    for row in &r.rows {
        let rate = row.messages as f64 / row.drain_s;
        let lost = row.left > 0 || row.dead_letter > 0 || row.delivered < row.messages as u64;
        let _ = writeln!(
            o,
            "| {} | {} | {:.2} s | {:.2} s | {:.0} | ≥ {TARGET_PER_S:.0}/s on 2 cores: {} | {} | {} | {} | {} |",
            row.batch,
            row.messages,
            row.send_s,
            row.drain_s,
            rate,
            if rate >= TARGET_PER_S { "**met**" } else { "**not met**" },
            row.dead_letter,
            row.delivered,
            row.left,
            if lost { "**no**" } else { "yes" }
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifest_declares_the_queue_and_its_consumer() {
        let m = manifest(10, 8);
        assert!(m.contains("batch_size = 10"));
        assert!(m.contains("max_concurrency = 8"));
        assert!(m.contains("from = \"jobs\"\nto = \"noop\""));
    }
}
