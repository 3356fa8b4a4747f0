//! The benchmark suite: one run measures every figure of docs/BENCHMARKS.md against a real
//! server (and others started with `--standby 0` and `--no-zygotes`), with the baselines measured in the
//! same run. Each phase returns plain figures; `report` turns them into Markdown.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::baseline::{self, Baseline};
use crate::machine::{self, Load, Machine};
use crate::memory;
use crate::server::{self, Api, Server};
use crate::stats::{summary, Summary};

/// Sample counts and sizes (flags of `refinery-bench`).
#[derive(Debug, Clone)]
pub struct SuiteConfig {
    pub refinery: PathBuf,
    pub cold: usize,
    pub warm: usize,
    pub concurrency: usize,
    pub burst: usize,
    pub burst_hold_s: f64,
    pub idle_many: usize,
    pub baseline: usize,
    pub azure_trace: Option<PathBuf>,
}

const NOOP_PY: &str = "def main(block_input, backpack):\n    return block_input\n";
const SLEEP_PY: &str =
    "import time\ndef main(block_input, backpack):\n    time.sleep(block_input or 0)\n    return None\n";

fn block(name: &str, language: &str, code: &str, extra: &str) -> String {
    format!(
        "[[blocks]]\nname = \"{name}\"\nlanguage = \"{language}\"\nmemory_mb = 128\n{extra}\ncode = '''\n{code}'''\n"
    )
}

fn manifest(project: &str, blocks: &[String]) -> String {
    format!("name = \"{project}\"\n{}", blocks.join("\n"))
}

pub struct ColdRow {
    pub label: String,
    pub language: &'static str,
    pub http: Summary,
    pub init: Summary,
}

pub struct WarmRow {
    pub concurrency: usize,
    pub latency: Summary,
    pub per_second: f64,
    pub instances: usize,
    pub cold_seen: usize,
    /// CPU µs per invocation: the server process, the instances, this load generator.
    pub server_cpu_us: f64,
    pub instances_cpu_us: f64,
    pub client_cpu_us: f64,
}

pub struct IdleRow {
    pub requested: usize,
    pub measured: usize,
    /// Per instance, MiB.
    pub pss: Summary,
    pub total_mib: f64,
    pub zygote_mib: f64,
    /// The waiting standby sandboxes (every language): how many, and their PSS together.
    pub standbys: usize,
    pub standby_mib: f64,
}

pub struct Burst {
    pub invocations: usize,
    pub hold_s: f64,
    pub all_answered_ms: f64,
    pub first_answered_ms: f64,
    pub http_statuses: BTreeMap<u16, usize>,
    pub client_errors: usize,
    pub records: usize,
    pub record_statuses: BTreeMap<String, usize>,
    pub distinct_instances: usize,
    pub cold_records: usize,
    pub init: Summary,
    pub instances_peak_mib: Option<f64>,
    pub server_peak_mib: f64,
    pub zygote_peak_mib: f64,
    pub sampled_total_peak_mib: f64,
    /// After the burst, all its instances frozen: PSS summed over every process of them, and
    /// of the zygote and the server (MiB), and how many instances were counted.
    pub after_instances_pss_mib: f64,
    pub after_instances: usize,
    pub after_server_zygote_pss_mib: f64,
    pub health_quiet: Summary,
    pub health_during: Summary,
    pub warm_quiet: Summary,
    pub warm_during: Summary,
    pub warm_during_failed: usize,
}

pub struct Results {
    pub machine: Machine,
    pub load_before: Load,
    pub load_after: Load,
    pub elapsed: Duration,
    pub baselines: Vec<Baseline>,
    pub bwrap_unavailable: Option<String>,
    pub cold: Vec<ColdRow>,
    pub warm: Vec<WarmRow>,
    pub idle: Vec<IdleRow>,
    pub burst: Burst,
    pub keep_alive: String,
    pub config: SuiteConfig,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn invoke_path(project: &str, block: &str) -> String {
    format!("/v1/projects/{project}/blocks/{block}/invoke")
}

/// One invocation that must succeed; its HTTP round trip in ms and the execution.
async fn invoke(api: &Api, key: &str, path: &str, input: &Value) -> Result<(f64, Value)> {
    let started = Instant::now();
    let reply = api.post(key, path, input).await?;
    let ms = ms_since(started);
    if reply["status"] != "ok" {
        bail!("{path}: the invocation did not succeed: {reply}");
    }
    Ok((ms, reply))
}

pub async fn run(config: SuiteConfig) -> Result<Results> {
    let started = Instant::now();
    let machine = machine::describe();
    let load_before = machine::load();
    eprintln!("bench: baselines ({} samples each)", config.baseline);
    let bwrap = baseline::bwrap();
    let bwrap_unavailable = bwrap.as_ref().err().cloned();
    let samples = config.baseline;
    let bwrap_path = bwrap.ok();
    let baselines =
        tokio::task::spawn_blocking(move || baseline::measure(samples, bwrap_path.as_deref()))
            .await??;

    let (mut cold, warm, idle, burst) = {
        let server = server::start(&config.refinery, &[])?;
        let api = Api::new(&server)?;
        let key = api.account(&server.operator_key, "bench").await?;
        api.deploy(
            &key,
            &manifest(
                "bench",
                &[block("noop", "python", NOOP_PY, "max_concurrency = 64")],
            ),
        )
        .await?;
        eprintln!("bench: cold starts ({} per language)", config.cold);
        let mut cold = cold_starts(
            &api,
            &key,
            ColdRun {
                rounds: config.cold,
                gap: Duration::ZERO,
            },
            &["python", "node", "shell"],
            "",
        )
        .await?;
        // As cold starts mostly come in real use: one at a time, the machine otherwise idle
        // (standby sandboxes replaced in between).
        cold.extend(
            cold_starts(
                &api,
                &key,
                ColdRun {
                    rounds: (config.cold / 2).max(5),
                    gap: SPACED_GAP,
                },
                &["python", "node"],
                " (0.3 s apart)",
            )
            .await?,
        );
        eprintln!("bench: warm invocations");
        let warm = vec![
            warm_run(&api, &server, &key, 1, config.warm).await?,
            warm_run(&api, &server, &key, config.concurrency, config.warm * 2).await?,
        ];
        eprintln!("bench: idle memory (1 and {} instances)", config.idle_many);
        let idle = idle_memory(&api, &server, &key, config.idle_many).await?;
        eprintln!("bench: burst of {}", config.burst);
        let burst = burst(&api, &server, &key, config.burst, config.burst_hold_s).await?;
        eprintln!("bench: stopping the server");
        (cold, warm, idle, burst)
    };
    eprintln!("bench: cold starts without standby sandboxes");
    cold.extend(
        cold_starts_on(
            &config,
            &["--standby", "0"],
            &["python"],
            " (--standby 0: zygote fork)",
        )
        .await?,
    );
    eprintln!("bench: cold starts without pre-initialised runtimes");
    cold.extend(
        cold_starts_on(
            &config,
            &["--no-zygotes"],
            &["python", "node"],
            " (--no-zygotes: exec)",
        )
        .await?,
    );
    let keep_alive = crate::keep_alive_sim::render(config.azure_trace.as_deref())?;
    Ok(Results {
        machine,
        load_before,
        load_after: machine::load(),
        elapsed: started.elapsed(),
        baselines,
        bwrap_unavailable,
        cold,
        warm,
        idle,
        burst,
        keep_alive,
        config,
    })
}

/// [`cold_starts`] on a server of its own, started with `flags`.
async fn cold_starts_on(
    config: &SuiteConfig,
    flags: &[&str],
    languages: &[&'static str],
    suffix: &str,
) -> Result<Vec<ColdRow>> {
    let server = server::start(&config.refinery, flags)?;
    let api = Api::new(&server)?;
    let key = api.account(&server.operator_key, "bench").await?;
    let run = ColdRun {
        rounds: config.cold,
        gap: Duration::ZERO,
    };
    cold_starts(&api, &key, run, languages, suffix).await
}

/// The pause before each cold start of the spaced rows.
const SPACED_GAP: Duration = Duration::from_millis(300);

/// How many rounds of cold starts, and the pause before each one (zero: back to back).
struct ColdRun {
    rounds: usize,
    gap: Duration,
}

/// Cold starts: the project is redeployed before each round, which retires the previous
/// deployment's instances, so each block's next invocation starts a fresh instance.
async fn cold_starts(
    api: &Api,
    key: &str,
    run: ColdRun,
    languages: &[&'static str],
    suffix: &str,
) -> Result<Vec<ColdRow>> {
    let blocks: Vec<String> = languages
        .iter()
        .map(|language| {
            let code = match *language {
                "python" => baseline::PYTHON_HANDLER,
                "node" => baseline::NODE_HANDLER,
                _ => baseline::SHELL_HANDLER,
            };
            block(language, language, code, "")
        })
        .collect();
    let manifest = manifest("cold", &blocks);
    let mut http = vec![Vec::new(); languages.len()];
    let mut init = vec![Vec::new(); languages.len()];
    for round in 0..run.rounds {
        api.deploy(key, &manifest).await?;
        // Rotate the order so no language always goes first after a deploy.
        for offset in 0..languages.len() {
            tokio::time::sleep(run.gap).await;
            let index = (round + offset) % languages.len();
            let (ms, reply) = invoke(
                api,
                key,
                &invoke_path("cold", languages[index]),
                &json!("x"),
            )
            .await?;
            if reply["cold"] != true {
                bail!("expected a cold start: {reply}");
            }
            http[index].push(ms);
            init[index].push(reply["init_ms"].as_f64().unwrap_or(f64::NAN));
        }
    }
    Ok(languages
        .iter()
        .enumerate()
        .map(|(index, language)| ColdRow {
            label: format!("{language}{suffix}"),
            language,
            http: summary(&http[index]),
            init: summary(&init[index]),
        })
        .collect())
}

/// `concurrency` clients invoking the no-op block back to back, `total` invocations in all,
/// after a warm-up that starts the instances they need.
async fn warm_run(
    api: &Api,
    server: &Server,
    key: &str,
    concurrency: usize,
    total: usize,
) -> Result<WarmRow> {
    let path = invoke_path("bench", "noop");
    let client = |n: usize| {
        let (api, key, path) = (api.clone(), key.to_string(), path.clone());
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(invoke(&api, &key, &path, &json!(null)).await?);
            }
            anyhow::Ok(out)
        })
    };
    let warmup: Vec<_> = (0..concurrency).map(|_| client(50)).collect();
    for task in warmup {
        task.await??;
    }
    let per_client = total.div_ceil(concurrency);
    let instance_pids: Vec<u32> = instances_of(api, server, "bench")
        .await?
        .iter()
        .filter(|i| i["block"] == "noop")
        .flat_map(|i| {
            cgroups_of(i)
                .first()
                .map(|dir| memory::cgroup_pids(dir))
                .unwrap_or_default()
        })
        .collect();
    let cpu_before = (
        crate::cpu::seconds(server.pid()).unwrap_or(f64::NAN),
        crate::cpu::seconds_of(&instance_pids),
        crate::cpu::seconds(std::process::id()).unwrap_or(f64::NAN),
    );
    // The measured phase uses the cheap generator (crate::load), not reqwest: on 2 cores the
    // client shares the CPU with the server, and its own cost is printed beside the server's.
    let addr: std::net::SocketAddr = server
        .url
        .trim_start_matches("http://")
        .parse()
        .with_context(|| format!("the server's address in {}", server.url))?;
    let request = crate::load::post_request(&addr.to_string(), &path, key, "null");
    let started = Instant::now();
    let replies = tokio::task::spawn_blocking(move || {
        crate::load::run(addr, &request, concurrency, per_client)
    })
    .await??;
    let mut samples = Vec::with_capacity(replies.len());
    let mut instances = HashSet::new();
    let mut cold_seen = 0;
    for reply in replies {
        if !reply.ok {
            bail!("{path}: an invocation of the warm run did not succeed");
        }
        samples.push(reply.ms);
        cold_seen += usize::from(reply.cold);
        instances.extend(reply.instance_id);
    }
    let secs = started.elapsed().as_secs_f64();
    let n = samples.len().max(1) as f64;
    let per_invocation_us = |after: f64, before: f64| (after - before) * 1e6 / n;
    let server_cpu_us = per_invocation_us(
        crate::cpu::seconds(server.pid()).unwrap_or(f64::NAN),
        cpu_before.0,
    );
    let instances_cpu_us = per_invocation_us(crate::cpu::seconds_of(&instance_pids), cpu_before.1);
    let client_cpu_us = per_invocation_us(
        crate::cpu::seconds(std::process::id()).unwrap_or(f64::NAN),
        cpu_before.2,
    );
    Ok(WarmRow {
        server_cpu_us,
        instances_cpu_us,
        client_cpu_us,
        concurrency,
        per_second: samples.len() as f64 / secs,
        latency: summary(&samples),
        instances: instances.len(),
        cold_seen,
    })
}

/// The operator's view of the live instances of one project.
async fn instances_of(api: &Api, server: &Server, project: &str) -> Result<Vec<Value>> {
    let list = api.get(&server.operator_key, "/v1/instances").await?;
    Ok(list["instances"]
        .as_array()
        .context("/v1/instances has no list")?
        .iter()
        .filter(|i| i["project"] == project)
        .cloned()
        .collect())
}

fn cgroups_of(instance: &Value) -> Vec<PathBuf> {
    instance["cgroups"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default()
}

fn zygote_mib(server: &Server) -> f64 {
    memory::zygotes(server.pid())
        .into_iter()
        .filter_map(memory::pss_kib)
        .sum::<u64>() as f64
        / 1024.0
}

/// Starts `n` instances of the project's `idle` block at once (each holds long enough that
/// none is reused), waits until they are frozen, and sums each one's PSS.
async fn idle_row(api: &Api, server: &Server, key: &str, n: usize) -> Result<IdleRow> {
    let path = invoke_path("idle", "idle");
    let hold = if n > 1 { json!(2.0) } else { json!(0) };
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (api, key, path, hold) = (api.clone(), key.to_string(), path.clone(), hold.clone());
            tokio::spawn(async move { invoke(&api, &key, &path, &hold).await })
        })
        .collect();
    for call in calls {
        call.await??;
    }
    // Frozen after the reply: give the pool a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let frozen = loop {
        let frozen: Vec<Value> = instances_of(api, server, "idle")
            .await?
            .into_iter()
            .filter(|i| i["state"] == "frozen")
            .collect();
        if frozen.len() >= n || Instant::now() > deadline {
            break frozen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pss: Vec<f64> = frozen
        .iter()
        .filter_map(|i| memory::instance_pss_kib(&cgroups_of(i)))
        .map(|kib| kib as f64 / 1024.0)
        .collect();
    let standby_processes = memory::standby_processes(server.pid());
    Ok(IdleRow {
        requested: n,
        measured: pss.len(),
        total_mib: pss.iter().sum(),
        pss: summary(&pss),
        zygote_mib: zygote_mib(server),
        // Each standby is two processes: its reaper and its runtime.
        standbys: standby_processes.len() / 2,
        standby_mib: standby_processes
            .into_iter()
            .filter_map(memory::pss_kib)
            .sum::<u64>() as f64
            / 1024.0,
    })
}

/// Waits (bounded) until no instance of `project` other than the live deployment's is left;
/// `live: None` waits for none at all.
async fn drained(api: &Api, server: &Server, project: &str, live: Option<i64>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let old = instances_of(api, server, project)
            .await?
            .iter()
            .filter(|i| live.is_none() || i["deployment"].as_i64() != live)
            .count();
        if old == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{old} retired instances of `{project}` still live after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn idle_memory(api: &Api, server: &Server, key: &str, many: usize) -> Result<Vec<IdleRow>> {
    let idle = manifest(
        "idle",
        &[block("idle", "python", SLEEP_PY, "max_concurrency = 1000")],
    );
    let mut rows = Vec::new();
    for n in [1, many] {
        let deployed = api.deploy(key, &idle).await?;
        drained(api, server, "idle", deployed["deployment"].as_i64()).await?;
        rows.push(idle_row(api, server, key, n).await?);
    }
    // Retire them before the burst.
    let deployed = api.deploy(key, &idle).await?;
    drained(api, server, "idle", deployed["deployment"].as_i64()).await?;
    Ok(rows)
}

/// Peaks seen by the memory sampler during the burst.
#[derive(Default)]
struct Peaks {
    server_kib: u64,
    zygote_kib: u64,
    total_bytes: u64,
}

/// Samples every 50 ms until `stop`: the server's PSS, its zygotes' RSS and the charge of
/// the server's whole instance cgroup tree. The zygotes count by RSS: a page a forked
/// instance still shares with its zygote stays charged to the cgroup that first touched it
/// (the zygote's, outside the instances' tree), so RSS is what counts those pages once.
fn sample_memory(server_pid: u32, root: Option<PathBuf>, stop: Arc<AtomicBool>) -> Peaks {
    let mut peaks = Peaks::default();
    let zygotes = memory::zygotes(server_pid);
    while !stop.load(Ordering::Relaxed) {
        let server = memory::pss_kib(server_pid).unwrap_or(0);
        let zygote: u64 = zygotes.iter().filter_map(|p| memory::rss_kib(*p)).sum();
        let instances = root
            .as_deref()
            .and_then(memory::cgroup_usage_bytes)
            .unwrap_or(0);
        peaks.server_kib = peaks.server_kib.max(server);
        peaks.zygote_kib = peaks.zygote_kib.max(zygote);
        peaks.total_bytes = peaks.total_bytes.max(instances + (server + zygote) * 1024);
        std::thread::sleep(Duration::from_millis(50));
    }
    peaks
}

/// Health checks and warm invocations of another block, back to back, until `stop`.
async fn probe(api: Api, key: String, stop: Arc<AtomicBool>) -> (Vec<f64>, Vec<f64>, usize) {
    let (mut health, mut warm, mut failed) = (Vec::new(), Vec::new(), 0);
    let path = invoke_path("bench", "noop");
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        if api.get(&key, "/v1/health").await.is_ok() {
            health.push(ms_since(t));
        }
        match invoke(&api, &key, &path, &json!(null)).await {
            Ok((ms, _)) => warm.push(ms),
            Err(_) => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (health, warm, failed)
}

async fn burst(
    api: &Api,
    server: &Server,
    bench_key: &str,
    n: usize,
    hold_s: f64,
) -> Result<Burst> {
    let key = api.account(&server.operator_key, "burst").await?;
    api.deploy(
        &key,
        &manifest(
            "burst",
            &[block(
                "burst",
                "python",
                SLEEP_PY,
                &format!("max_concurrency = {n}"),
            )],
        ),
    )
    .await?;
    // The server's instance cgroup root: two levels above any instance's memory cgroup.
    let root = instances_of(api, server, "bench")
        .await?
        .iter()
        .find_map(|i| memory::memory_cgroup(&cgroups_of(i)))
        .and_then(|p| p.parent()?.parent().map(Path::to_path_buf));

    // Responsiveness while quiet, for comparison.
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = tokio::spawn(probe(api.clone(), bench_key.to_string(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let (health_quiet, warm_quiet, _) = quiet.await?;

    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (pid, stop) = (server.pid(), stop.clone());
        std::thread::spawn(move || sample_memory(pid, root, stop))
    };
    let prober = tokio::spawn(probe(api.clone(), bench_key.to_string(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;

    let path = invoke_path("burst", "burst");
    let started = Instant::now();
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (api, key, path) = (api.clone(), key.clone(), path.clone());
            tokio::spawn(async move {
                let result = api.post_raw(&key, &path, &json!(hold_s)).await;
                (result, ms_since(started))
            })
        })
        .collect();
    let mut statuses = BTreeMap::new();
    let mut client_errors = 0;
    let mut answered = Vec::new();
    for call in calls {
        let (result, ms) = call.await?;
        match result {
            Ok((status, _)) => *statuses.entry(status).or_insert(0) += 1,
            Err(e) => {
                client_errors += 1;
                eprintln!("bench: burst request failed: {e:#}");
            }
        }
        answered.push(ms);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let (health_during, warm_during, warm_during_failed) = prober.await?;
    let peaks = sampler
        .join()
        .map_err(|_| anyhow::anyhow!("the memory sampler panicked"))?;

    // The execution records: statuses and which instance served each.
    let records = api
        .get(&key, "/v1/projects/burst/executions?block=burst&limit=1000")
        .await?;
    let records = records["executions"]
        .as_array()
        .context("no executions list")?
        .clone();
    let mut record_statuses = BTreeMap::new();
    let mut instances = HashSet::new();
    let mut init = Vec::new();
    for record in &records {
        *record_statuses
            .entry(record["status"].as_str().unwrap_or("?").to_string())
            .or_insert(0) += 1;
        if let Some(id) = record["instance_id"].as_str() {
            instances.insert(id.to_string());
        }
        if record["cold"] == true {
            init.push(record["init_ms"].as_f64().unwrap_or(f64::NAN));
        }
    }
    // The account's group cgroup holds exactly the burst's instances: its watermark.
    let instances_peak_mib = instances_of(api, server, "burst")
        .await?
        .iter()
        .find_map(|i| memory::memory_cgroup(&cgroups_of(i)))
        .and_then(|p| memory::cgroup_peak_bytes(p.parent()?))
        .map(|b| b as f64 / 1024.0 / 1024.0);
    let burst_instances = instances_of(api, server, "burst").await?;
    let after: Vec<u64> = burst_instances
        .iter()
        .filter_map(|i| memory::instance_pss_kib(&cgroups_of(i)))
        .collect();
    let server_zygote_kib: u64 = memory::pss_kib(server.pid()).unwrap_or(0)
        + memory::zygotes(server.pid())
            .into_iter()
            .filter_map(memory::pss_kib)
            .sum::<u64>();
    let answered_summary = summary(&answered);
    Ok(Burst {
        invocations: n,
        hold_s,
        all_answered_ms: answered_summary.max,
        first_answered_ms: answered.iter().copied().fold(f64::INFINITY, f64::min),
        http_statuses: statuses,
        client_errors,
        records: records.len(),
        record_statuses,
        distinct_instances: instances.len(),
        cold_records: init.len(),
        init: summary(&init),
        instances_peak_mib,
        server_peak_mib: peaks.server_kib as f64 / 1024.0,
        zygote_peak_mib: peaks.zygote_kib as f64 / 1024.0,
        sampled_total_peak_mib: peaks.total_bytes as f64 / 1024.0 / 1024.0,
        after_instances_pss_mib: after.iter().sum::<u64>() as f64 / 1024.0,
        after_instances: after.len(),
        after_server_zygote_pss_mib: server_zygote_kib as f64 / 1024.0,
        health_quiet: summary(&health_quiet),
        health_during: summary(&health_during),
        warm_quiet: summary(&warm_quiet),
        warm_during: summary(&warm_during),
        warm_during_failed,
    })
}
