//! `refinery-bench endpoints`: an HTTP endpoint call against a direct invoke of the same
//! block (issue 13's target: ≤ 0.3 ms p50 added), and a 1-block run started by the runs API
//! for reference — one server, samples interleaved one of each in turn, instances warm.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::json;

use crate::machine::{self, Load, Machine};
use crate::server::{self, Api};
use crate::stats::{summary, Summary};

const MANIFEST: &str = r#"name = "ep"

[[blocks]]
name = "hit"
language = "python"
memory_mb = 128
code = '''
def main(event, backpack):
    return {"statusCode": 200, "body": "ok"}
'''

[[endpoints]]
name = "call"
method = "GET"
path = "/hit"

[[responses]]
name = "reply"

[[transitions]]
from = "call"
to = "hit"
type = "then"

[[transitions]]
from = "hit"
to = "reply"
type = "then"
"#;

/// The modes sampled, in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Invoke,
    Endpoint,
    Run,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Invoke, Mode::Endpoint, Mode::Run];

    fn label(self) -> &'static str {
        match self {
            Mode::Invoke => "direct invoke of the block (`POST /v1/projects/ep/blocks/hit/invoke`)",
            Mode::Endpoint => "endpoint call (`GET /http/bench/ep/hit` → hit → response)",
            Mode::Run => "1-block run by the API (`POST /v1/projects/ep/runs?wait=30`)",
        }
    }
}

pub struct EndpointsResults {
    machine: Machine,
    load_before: Load,
    load_after: Load,
    elapsed: Duration,
    samples: usize,
    rows: Vec<(Mode, Summary)>,
}

async fn sample(api: &Api, key: &str, mode: Mode) -> Result<f64> {
    let started = Instant::now();
    match mode {
        Mode::Invoke => {
            let reply = api
                .post(key, "/v1/projects/ep/blocks/hit/invoke", &json!({}))
                .await?;
            if reply["status"] != "ok" {
                bail!("the invocation failed: {reply}");
            }
        }
        Mode::Endpoint => {
            let response = api
                .http
                .get(format!("{}/http/bench/ep/hit", api.url))
                .send()
                .await?;
            let status = response.status();
            let body = response.text().await?;
            if status != 200 || body != "ok" {
                bail!("the endpoint answered {status}: {body}");
            }
        }
        Mode::Run => {
            let (status, run) = api
                .post_raw(
                    key,
                    "/v1/projects/ep/runs?wait=30",
                    &json!({"start": "hit", "input": {}}),
                )
                .await?;
            if status != 200 || run["status"] != "succeeded" {
                bail!("the run did not succeed (HTTP {status}): {run}");
            }
        }
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

pub async fn run(refinery: &std::path::Path, samples: usize) -> Result<EndpointsResults> {
    let started = Instant::now();
    let machine = machine::describe();
    let load_before = machine::load();
    let server = server::start(refinery, &[])?;
    let api = Api::new(&server)?;
    let key = api.account(&server.operator_key, "bench").await?;
    api.deploy(&key, MANIFEST).await?;
    eprintln!("bench endpoints: {samples} samples of each mode, interleaved");
    for mode in Mode::ALL {
        for _ in 0..20 {
            sample(&api, &key, mode).await?;
        }
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(samples); Mode::ALL.len()];
    for _ in 0..samples {
        for (i, mode) in Mode::ALL.into_iter().enumerate() {
            times[i].push(sample(&api, &key, mode).await?);
        }
    }
    drop(server);
    Ok(EndpointsResults {
        machine,
        load_before,
        load_after: machine::load(),
        elapsed: started.elapsed(),
        samples,
        rows: Mode::ALL
            .into_iter()
            .zip(times.iter().map(|t| summary(t)))
            .collect(),
    })
}

pub fn report(r: &EndpointsResults) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "Measured {} at commit `{}` by:\n", m.date_utc, m.commit);
    let _ = writeln!(
        o,
        "```sh\ntarget/release/refinery-bench endpoints --samples {}\n```\n",
        r.samples
    );
    let _ = writeln!(
        o,
        "Machine: {} × {}, {:.1} GiB, Linux {}; {}. Release build, client on the same machine, one \
         keep-alive connection per mode. Load average (1 min) {:.2} before, {:.2} after; {} / {} \
         compiler processes running at start / end. The run took {:.0} s.\n",
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.python,
        r.load_before.load1,
        r.load_after.load1,
        r.load_before.compilers,
        r.load_after.compilers,
        r.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "| mode | p50 | p90 | p99 | mean |\n|---|---|---|---|---|"
    );
    for (mode, s) in &r.rows {
        let _ = writeln!(
            o,
            "| {} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms |",
            mode.label(),
            s.p50,
            s.p90,
            s.p99,
            s.mean
        );
    }
    let p50 = |mode: Mode| {
        r.rows
            .iter()
            .find(|(m, _)| *m == mode)
            .map_or(f64::NAN, |(_, s)| s.p50)
    };
    let added = p50(Mode::Endpoint) - p50(Mode::Invoke);
    let _ = writeln!(
        o,
        "\n| figure | target | measured | verdict |\n|---|---|---|---|\n| endpoint call − direct invoke, p50 | ≤ 0.3 ms | {added:.2} ms | {} |",
        if added <= 0.3 { "**met**" } else { "**not met**" }
    );
    o
}
