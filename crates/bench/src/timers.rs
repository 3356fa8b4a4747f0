//! `refinery-bench timers`: timer slot accuracy against a real server (issue 13) — how late
//! each slot fires, and that each fires once.
//!
//! 1. one project with one `rate(1 second)` timer, for T s;
//! 2. then N − 1 more projects, each with one `rate(1 second)` timer (N timers sharing every
//!    slot), for T s more.
//!
//! Each timer starts a no-op Python block. A slot's lateness is the server's own record of
//! it (`GET /v1/projects/{p}/timers?fires=100`: `fired_at − slot`, whole milliseconds): from
//! the slot to the claim, in the transaction that creates its run (before its commit). Slots
//! missing between a timer's first and last fire of a phase, and slots fired twice, are
//! counted.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::machine::{self, Load, Machine};
use crate::server::{self, Api};
use crate::stats::{summary, Summary};

/// Sizes of a `timers` run (flags of `refinery-bench timers`).
#[derive(Debug, Clone)]
pub struct TimersConfig {
    pub refinery: std::path::PathBuf,
    pub timers: usize,
    pub seconds: u64,
}

/// The server keeps each timer's 100 most recent fires; both phases must fit.
pub const MAX_SECONDS: u64 = 45;

const PERIOD_MS: i64 = 1000;

fn manifest(project: &str) -> String {
    format!(
        r#"name = "{project}"

[[blocks]]
name = "noop"
language = "python"
memory_mb = 128
code = '''
def main(block_input, backpack):
    return block_input
'''

[[timers]]
name = "tick"
schedule = "rate(1 second)"
input = {{ project = "{project}" }}

[[transitions]]
from = "tick"
to = "noop"
type = "then"
"#
    )
}

/// One phase's figures.
#[derive(Debug, Clone)]
pub struct PhaseRow {
    pub label: String,
    pub fires: usize,
    /// Slots between a timer's first and last fire that did not fire.
    pub missed: usize,
    /// Slots that fired more than once (must be 0).
    pub doubled: usize,
    /// Lateness of every fire, ms.
    pub late: Summary,
    /// Per slot, the lateness of its last timer to fire, ms.
    pub last_of_slot: Summary,
}

pub struct TimersResults {
    pub machine: Machine,
    pub load_before: Load,
    pub load_after: Load,
    pub elapsed: Duration,
    pub config: TimersConfig,
    pub phases: Vec<PhaseRow>,
}

/// (slot ms, fired-at ms) of every fire of `project`'s timer `tick` listed by the server.
async fn fires(api: &Api, key: &str, project: &str) -> Result<Vec<(i64, i64)>> {
    let reply = api
        .get(key, &format!("/v1/projects/{project}/timers?fires=100"))
        .await?;
    let timer = reply["timers"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["name"] == "tick"))
        .with_context(|| format!("project {project} lists no timer `tick`: {reply}"))?;
    let time = |f: &Value, field: &str| -> Result<i64> {
        let text = f[field]
            .as_str()
            .with_context(|| format!("a fire without `{field}`: {f}"))?;
        Ok(chrono::DateTime::parse_from_rfc3339(text)
            .with_context(|| format!("`{text}` is not an RFC 3339 time"))?
            .timestamp_millis())
    };
    timer["fires"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| Ok((time(f, "slot")?, time(f, "fired_at")?)))
        .collect()
}

/// The figures of the fires of `projects` whose slots lie in `[from_ms, to_ms)`.
async fn phase(
    api: &Api,
    key: &str,
    label: &str,
    projects: &[String],
    from_ms: i64,
    to_ms: i64,
) -> Result<PhaseRow> {
    let mut late = Vec::new();
    let mut by_slot: BTreeMap<i64, f64> = BTreeMap::new();
    let (mut missed, mut doubled, mut count) = (0, 0, 0);
    for project in projects {
        let mut slots: Vec<(i64, i64)> = fires(api, key, project)
            .await?
            .into_iter()
            .filter(|(slot, _)| (from_ms..to_ms).contains(slot))
            .collect();
        slots.sort_unstable();
        for pair in slots.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            if gap == 0 {
                doubled += 1;
            } else {
                missed += usize::try_from(gap / PERIOD_MS - 1).unwrap_or(0);
            }
        }
        for (slot, fired_at) in &slots {
            let ms = (fired_at - slot) as f64;
            late.push(ms);
            let last = by_slot.entry(*slot).or_insert(ms);
            *last = last.max(ms);
        }
        count += slots.len();
    }
    let last_of_slot: Vec<f64> = by_slot.into_values().collect();
    Ok(PhaseRow {
        label: label.to_string(),
        fires: count,
        missed,
        doubled,
        late: summary(&late),
        last_of_slot: summary(&last_of_slot),
    })
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub async fn run(config: TimersConfig) -> Result<TimersResults> {
    if config.seconds < 5 || config.seconds > MAX_SECONDS {
        bail!(
            "--seconds {} is out of range: each phase lasts 5 to {MAX_SECONDS} s (the server lists a timer's 100 most recent fires)",
            config.seconds
        );
    }
    let started = Instant::now();
    let machine = machine::describe();
    let load_before = machine::load();
    // N projects are deployed back to back.
    let server = server::start(&config.refinery, &[])?;
    let api = Api::new(&server)?;
    let key = api.account(&server.operator_key, "bench").await?;
    let span = Duration::from_secs(config.seconds);

    eprintln!(
        "bench timers: 1 timer, rate(1 second), {} s",
        config.seconds
    );
    let first = vec!["t1".to_string()];
    api.deploy(&key, &manifest("t1")).await?;
    // The first slot after the deploy (a new timer waits for its next slot) and the next
    // one are left out: the block's first instance starts meanwhile.
    let from = now_ms() + 2 * PERIOD_MS;
    tokio::time::sleep(span + Duration::from_secs(2)).await;
    let to = now_ms();
    let one = phase(&api, &key, "1 timer", &first, from, to).await?;

    eprintln!(
        "bench timers: {} timers, each rate(1 second), sharing every slot, {} s",
        config.timers, config.seconds
    );
    let mut all = first.clone();
    for i in 2..=config.timers {
        let project = format!("t{i}");
        api.deploy(&key, &manifest(&project)).await?;
        all.push(project);
    }
    let from = now_ms() + 3 * PERIOD_MS;
    tokio::time::sleep(span + Duration::from_secs(3)).await;
    let to = now_ms();
    let many = phase(
        &api,
        &key,
        &format!("{} timers", config.timers),
        &all,
        from,
        to,
    )
    .await?;
    drop(server);
    Ok(TimersResults {
        machine,
        load_before,
        load_after: machine::load(),
        elapsed: started.elapsed(),
        config,
        phases: vec![one, many],
    })
}

fn ms(v: f64) -> String {
    if v.is_nan() {
        "—".into()
    } else {
        format!("{v:.0} ms")
    }
}

/// The command that reproduces this run.
pub fn command(c: &TimersConfig) -> String {
    format!(
        "target/release/refinery-bench timers --timers {} --seconds {}",
        c.timers, c.seconds
    )
}

/// The Markdown of one run.
pub fn report(r: &TimersResults) -> String {
    let mut o = String::new();
    let m = &r.machine;
    let _ = writeln!(o, "Measured {} at commit `{}` by:\n", m.date_utc, m.commit);
    let _ = writeln!(o, "```sh\n{}\n```\n", command(&r.config));
    let _ = writeln!(
        o,
        "Machine: {} × {}, {:.1} GiB, Linux {}, {}. Release build. Load average (1 min) {:.2} \
         before the run, {:.2} after it; {} / {} compiler processes of other work running at \
         start / end. The run took {:.0} s.\n",
        m.cpus,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        m.os,
        r.load_before.load1,
        r.load_after.load1,
        r.load_before.compilers,
        r.load_after.compilers,
        r.elapsed.as_secs_f64()
    );
    let _ = writeln!(
        o,
        "Lateness = the server's record of each fire (`fired_at − slot`, whole ms): from the \
         slot to its claim, in the transaction that creates its run.\n"
    );
    let _ = writeln!(
        o,
        "| timers (`rate(1 second)`, one per project) | fires | slots missed | slots fired twice | late p50 | p90 | p99 | max | last timer of a slot: p50 | p99 | max |\n|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for p in &r.phases {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.label,
            p.fires,
            p.missed,
            p.doubled,
            ms(p.late.p50),
            ms(p.late.p90),
            ms(p.late.p99),
            ms(p.late.max),
            ms(p.last_of_slot.p50),
            ms(p.last_of_slot.p99),
            ms(p.last_of_slot.max),
        );
    }
    o
}
