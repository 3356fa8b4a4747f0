//! `refinery-bench`: Refinery's benchmark suite. It starts a real `refinery serve` (release
//! build) on a loopback port and measures over HTTP what the brief promises: warm invocation
//! latency and throughput at concurrency 1 and 2×cores, cold start per language (Python with
//! and without the pre-initialised zygote), a burst of simultaneous invocations (time to all
//! answered, instances, statuses, peak memory, responsiveness), idle frozen instance memory
//! (PSS) at 1 and many instances, and the keep-alive policy simulation. Baselines — the same
//! handler started as a bare interpreter process and under `bwrap` — are measured in the same
//! run and printed as ratios. `--write docs/BENCHMARKS.md` puts the Markdown between the
//! document's marker comments; `scripts/bench` is the documented way to run it all.
//!
//! Other modes: `--keep-alive-sim` (only the simulation), `--neighbour` (noisy-neighbour
//! isolation between two accounts) and the `services` subcommand (the services engine: chains
//! as runs against client-driven calls, the cost of a step, a fan-out, runs per second) and
//! the `timers` subcommand (timer slot accuracy: how late each slot fires) and
//! the `queues` subcommand (queue throughput with a no-op consumer at batch 1 and 10) and
//! the `deps` subcommand (cold starts of blocks with a dependency layer against without).

mod baseline;
mod cpu;
mod deps;
mod doc;
mod endpoints;
mod keep_alive_sim;
mod load;
mod machine;
mod memory;
mod neighbour;
mod queues;
mod report;
mod server;
mod services;
mod stats;
mod suite;
mod timers;

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Refinery's benchmark suite: a real server measured over HTTP, with baselines")]
struct Args {
    /// The refinery binary to benchmark (default: the sibling of this executable).
    #[arg(long)]
    refinery: Option<PathBuf>,
    /// Cold starts to measure per language (and for Python without zygotes).
    #[arg(long, default_value_t = 40)]
    cold: usize,
    /// Warm invocations at concurrency 1 (twice as many at --concurrency).
    #[arg(long, default_value_t = 2000)]
    warm: usize,
    /// Concurrent clients of the second warm figure (default: 2 × cores).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Simultaneous invocations of one block in the burst.
    #[arg(long, default_value_t = 500)]
    burst: usize,
    /// How long (s) each burst invocation's handler sleeps, so that they overlap.
    #[arg(long, default_value_t = 2.0)]
    burst_hold: f64,
    /// The larger idle-memory figure: this many frozen instances.
    #[arg(long, default_value_t = 200)]
    idle_many: usize,
    /// Samples of each baseline (bare and bwrap, per language).
    #[arg(long, default_value_t = 40)]
    baseline: usize,
    /// Write the figures into this Markdown file, between its marker comments.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
    /// Only measure noisy-neighbour isolation.
    #[arg(long)]
    neighbour: bool,
    /// With --neighbour: account B's warm invocations alone, and again during A's flood.
    #[arg(long, default_value_t = 1000)]
    neighbour_samples: usize,
    /// With --neighbour: account A's concurrent clients during the flood.
    #[arg(long, default_value_t = 32)]
    flood_clients: usize,
    /// Only simulate keep-alive policies (no server): see keep_alive_sim.rs.
    #[arg(long)]
    keep_alive_sim: bool,
    /// Also replay the Azure 2019 sample in this directory in the keep-alive simulation.
    #[arg(long, value_name = "DIR")]
    azure_trace: Option<PathBuf>,
    #[command(subcommand)]
    mode: Option<Mode>,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// Measure the services engine: a 3-block chain as a run vs the client calling the blocks,
    /// the cost of a `then` step, a fan-out + fan-in, runs per second.
    Services(ServicesArgs),
    /// Measure HTTP endpoints: an endpoint call against a direct invoke of the same block.
    Endpoints(EndpointsArgs),
    /// Measure timer slot accuracy: how late each `rate(1 second)` slot fires, with 1 timer
    /// and with N timers sharing every slot, and that each slot fires once.
    Timers(TimersArgs),
    /// Measure queue throughput: N messages through a no-op consumer at batch 1 and 10.
    Queues(QueuesArgs),
    /// Measure cold starts with a dependency layer (a PyPI and an npm package) against the
    /// same blocks without one, and the layers' first build and cached redeploy.
    Deps(DepsArgs),
}

#[derive(Debug, clap::Args)]
struct DepsArgs {
    /// Rounds: one cold start of each block per round.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
}

#[derive(Debug, clap::Args)]
struct EndpointsArgs {
    /// Samples of each mode.
    #[arg(long, default_value_t = 500)]
    samples: usize,
}

#[derive(Debug, clap::Args)]
struct TimersArgs {
    /// Timers (one project each) of the second phase.
    #[arg(long, default_value_t = 20)]
    timers: usize,
    /// How long (s) each phase lasts (5–45).
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Write the figures into this Markdown file, between its `timers` marker comments.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct QueuesArgs {
    /// Messages sent per batch size.
    #[arg(long, default_value_t = 10_000)]
    messages: usize,
    /// `max_concurrency` of the consumer: its runs in flight at once (default: 8 × cores).
    #[arg(long)]
    concurrency: Option<usize>,
    /// Write the figures into this Markdown file, between its `queues` marker comments.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct ServicesArgs {
    /// Samples of each chain row (1, 2, 3, 10 blocks as runs; 3 blocks called by the client).
    #[arg(long, default_value_t = 300)]
    runs: usize,
    /// Items of the fan-out.
    #[arg(long, default_value_t = 1000)]
    fan_out: usize,
    /// `max_concurrency` of the fan-out's no-op block (default: 8 × cores).
    #[arg(long)]
    fan_concurrency: Option<usize>,
    /// Concurrent clients of the runs-per-second figure (default: 2 × cores).
    #[arg(long)]
    clients: Option<usize>,
    /// How long (s) the runs-per-second clients run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Write the figures into this Markdown file, between its `services` marker comments.
    #[arg(long, value_name = "FILE")]
    write: Option<PathBuf>,
}

/// The burst holds hundreds of connections and instance pipes: raise the open-file limit
/// (inherited by the server) to its hard limit.
fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit on a local struct; no memory is shared.
    unsafe {
        let mut limit = std::mem::zeroed::<libc::rlimit>();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.keep_alive_sim {
        println!("## Keep-alive policy simulation (refinery-bench --keep-alive-sim)");
        print!("{}", keep_alive_sim::render(args.azure_trace.as_deref())?);
        return Ok(());
    }
    raise_open_files();
    let binary = match args.refinery.clone() {
        Some(path) => path,
        None => std::env::current_exe()?.with_file_name("refinery"),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match &args.mode {
        Some(Mode::Services(services)) => return run_services(binary, services, cores).await,
        Some(Mode::Endpoints(endpoints)) => {
            let results = endpoints::run(&binary, endpoints.samples.max(1)).await?;
            println!("{}", endpoints::report(&results));
            return Ok(());
        }
        Some(Mode::Timers(timers)) => return run_timers(binary, timers).await,
        Some(Mode::Queues(queues)) => return run_queues(binary, queues, cores).await,
        Some(Mode::Deps(deps)) => {
            let results = deps::run(&binary, deps.rounds.max(1)).await?;
            println!("{}", deps::report(&results));
            return Ok(());
        }
        None => {}
    }
    if args.neighbour {
        let server = server::start(&binary, &[])?;
        let api = server::Api::new(&server)?;
        return neighbour::run(&api, &server, args.neighbour_samples, args.flood_clients).await;
    }
    if let Some(path) = &args.write {
        // Fail before a five-minute run, not after it.
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        for name in ["suite", "keep-alive"] {
            doc::replace_region(&text, name, "")
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
    }
    let config = suite::SuiteConfig {
        refinery: binary,
        cold: args.cold.max(1),
        warm: args.warm.max(1),
        concurrency: args.concurrency.unwrap_or(2 * cores).max(1),
        burst: args.burst.max(1),
        burst_hold_s: args.burst_hold,
        idle_many: args.idle_many.max(1),
        baseline: args.baseline.max(1),
        azure_trace: args.azure_trace.clone(),
    };
    let results = suite::run(config).await?;
    let markdown = report::suite(&results);
    println!("{markdown}");
    println!("{}", results.keep_alive);
    if let Some(path) = &args.write {
        doc::write_regions(
            path,
            &[("suite", &markdown), ("keep-alive", &results.keep_alive)],
        )?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

async fn run_services(binary: PathBuf, args: &ServicesArgs, cores: usize) -> Result<()> {
    if let Some(path) = &args.write {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        doc::replace_region(&text, "services", "")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    if !(args.seconds.is_finite() && args.seconds > 0.0) {
        anyhow::bail!(
            "--seconds {} is not a positive number of seconds: use e.g. --seconds 10",
            args.seconds
        );
    }
    let config = services::ServicesConfig {
        refinery: binary,
        runs: args.runs.max(1),
        fan_out: args.fan_out.max(1),
        fan_concurrency: args.fan_concurrency.unwrap_or(8 * cores).max(1),
        clients: args.clients.unwrap_or(2 * cores).max(1),
        seconds: args.seconds,
    };
    let results = services::run(config).await?;
    let markdown = services::report(&results);
    println!("{markdown}");
    if let Some(path) = &args.write {
        doc::write_regions(path, &[("services", &markdown)])?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

async fn run_timers(binary: PathBuf, args: &TimersArgs) -> Result<()> {
    if let Some(path) = &args.write {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        doc::replace_region(&text, "timers", "")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let config = timers::TimersConfig {
        refinery: binary,
        timers: args.timers.max(1),
        seconds: args.seconds,
    };
    let results = timers::run(config).await?;
    let markdown = timers::report(&results);
    println!("{markdown}");
    if let Some(path) = &args.write {
        doc::write_regions(path, &[("timers", &markdown)])?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

async fn run_queues(binary: PathBuf, args: &QueuesArgs, cores: usize) -> Result<()> {
    if let Some(path) = &args.write {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        doc::replace_region(&text, "queues", "")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    let config = queues::QueuesConfig {
        refinery: binary,
        messages: args.messages.max(1),
        concurrency: args.concurrency.unwrap_or(8 * cores).max(1),
    };
    let results = queues::run(config).await?;
    let markdown = queues::report(&results);
    println!("{markdown}");
    if let Some(path) = &args.write {
        doc::write_regions(path, &[("queues", &markdown)])?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}
