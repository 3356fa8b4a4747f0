//! `refinery`: one binary for the server (`serve`), the client subcommands, and the
//! in-sandbox init every instance starts as. `main` only parses arguments and wires the
//! library crates together.

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use refinery_cli::{ClientArgs, ClientCommand};
use refinery_server::{
    DeployLimits, DeployRate, EngineConfig, FrontDoorConfig, KeepAliveMode, Quota, ScaleUpLimit,
    ServeConfig, DEFAULT_MAX_LABEL_SETS,
};

/// The hidden first argument that turns this process into a sandbox's init.
const SANDBOX_INIT_ARG: &str = "__sandbox-init";

#[derive(Debug, Parser)]
#[command(
    name = "refinery",
    version,
    about = "Refinery: a self-hosted serverless platform"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

impl Cli {
    /// Parses the command line. The client options (`--url`, `--api-key`, `--json`) are
    /// added to every client command (and its subcommands), never to `serve`: they are
    /// given after the command (`refinery accounts list --json`) or through the
    /// environment. Exits with clap's message on bad arguments (and for --help).
    fn parse_with_client_args() -> (Command, ClientArgs) {
        let mut command = Cli::command();
        let client_commands: Vec<String> = command
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .filter(|name| name != "serve")
            .collect();
        for name in client_commands {
            command = command.mut_subcommand(name, ClientArgs::augment_args);
        }
        let matches = command.get_matches();
        let parsed = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        let client = match &parsed.command {
            Command::Serve(_) => None,
            Command::Client(_) => matches
                .subcommand()
                .map(|(_, sub)| ClientArgs::from_arg_matches(sub).unwrap_or_else(|e| e.exit())),
        };
        let client = client.unwrap_or_else(|| ClientArgs {
            url: String::new(),
            api_key: None,
            json: false,
        });
        (parsed.command, client)
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the platform: API server, instance pool and reaper.
    Serve(Box<ServeArgs>),
    #[command(flatten)]
    Client(ClientCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8710")]
    listen: SocketAddr,
    /// Where the database, keys, code and runtimes live.
    #[arg(long, default_value = "./refinery-data")]
    data_dir: PathBuf,
    /// How long an idle warm instance is kept before it is reaped (e.g. 5m, 30s).
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    keep_alive: Duration,
    /// After SIGTERM/SIGINT, how long running invocations may take to finish.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Default per-account quota: live instances at once (starting, busy and warm).
    #[arg(long, default_value_t = Quota::DEFAULT.instances, value_name = "N")]
    quota_instances: u32,
    /// Default per-account quota: total memory_mb of an account's live instances.
    #[arg(long, default_value_t = Quota::DEFAULT.memory_mb, value_name = "MB")]
    quota_memory_mb: u64,
    /// Default per-account quota: sustained invocations per second.
    #[arg(long, default_value_t = Quota::DEFAULT.rate, value_name = "PER_SECOND")]
    quota_rate: f64,
    /// Default per-account quota: invocations allowed in a burst above the rate.
    #[arg(long, default_value_t = Quota::DEFAULT.burst, value_name = "N")]
    quota_burst: u32,
    /// Default per-account quota: MiB of deployments kept (manifests, code as stored, code
    /// laid out for instances); a deploy over it is refused.
    #[arg(long, default_value_t = Quota::DEFAULT.storage_mb, value_name = "MB")]
    quota_storage_mb: u64,
    /// Deployments kept per project (the newest N; the live one always): older ones are
    /// pruned at each deploy, their code removed.
    #[arg(long, default_value_t = DeployLimits::DEFAULT.keep_deployments, value_name = "N")]
    keep_deployments: usize,
    /// Deploys per account: a token bucket of DEPLOYS refilled over DURATION; beyond it 429.
    #[arg(long, default_value_t = DeployLimits::DEFAULT.rate, value_name = "DEPLOYS/DURATION")]
    deploy_rate: DeployRate,
    /// Deploys handled at once (from receiving the body to the reply), server-wide: bounds
    /// the memory their bodies take; others wait up to 5 s, then 429.
    #[arg(long, default_value_t = DeployLimits::DEFAULT.at_once, value_name = "N")]
    deploys_at_once: usize,
    /// Services: the most items one fan-out may start (a longer list fails its step with
    /// `FanOutTooLarge`).
    #[arg(long, default_value_t = EngineConfig::default().max_fan_out_items, value_name = "ITEMS")]
    max_fan_out: usize,
    /// Services: the longest chain of steps one run may make (a loop that never ends
    /// fails with `StepLimit` there).
    #[arg(long, default_value_t = EngineConfig::default().max_steps_per_run, value_name = "N")]
    max_run_steps: i64,
    /// Services: the most runs one account may have running at once (more: 429).
    #[arg(long, default_value_t = EngineConfig::default().max_runs_per_account, value_name = "N")]
    max_runs_per_account: usize,
    /// Queues: the largest message, in bytes of JSON (SQS's 256 KiB by default); a larger
    /// one is refused (413), or fails the run that enqueues it.
    #[arg(long, default_value_t = EngineConfig::default().max_message_bytes, value_name = "BYTES")]
    max_message_bytes: usize,
    /// Queues: the most messages one account's queues may hold (visible, in flight, dead
    /// letters); more are refused (429), or fail the run that enqueues them.
    #[arg(long, default_value_t = EngineConfig::default().max_queued_messages, value_name = "N")]
    max_queued_messages: u64,
    /// Deploys handled at once per account.
    #[arg(long, default_value_t = DeployLimits::DEFAULT.at_once_per_account, value_name = "N")]
    deploys_at_once_per_account: usize,
    /// Start every instance by exec: no pre-initialised runtimes (Python's zygote, the
    /// standby sandboxes). Slower cold starts; for comparison and troubleshooting.
    #[arg(long)]
    no_zygotes: bool,
    /// Sandboxes kept started and waiting, runtime loaded, for cold starts to adopt, per
    /// language (Python, Node, shell; each ≈ the memory of an idle interpreter). 0 = none:
    /// Python instances fork from the zygote, the others start by exec.
    #[arg(long, default_value_t = 2, value_name = "N")]
    standby: usize,
    /// Keep-alive policy for blocks without their own keep_alive_s: `fixed` (every idle
    /// instance kept for --keep-alive) or `adaptive` (per block from its idle-time
    /// histogram, pre-warming periodic blocks; --keep-alive until the histogram is
    /// representative).
    #[arg(long, default_value = "fixed", value_name = "fixed|adaptive")]
    keep_alive_policy: KeepAliveMode,
    /// Bin width of the adaptive policy's idle-time histogram (240 bins, so the range is
    /// 240 × this); the paper uses one minute.
    #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
    adaptive_bin: Duration,
    /// Per-block scale-up limit: new instances (cold starts) per window, a token bucket.
    /// Warm reuse is never limited by it.
    #[arg(long, default_value = "1000/10s", value_name = "COLD_STARTS/DURATION")]
    scale_up_limit: ScaleUpLimit,
    /// How long an invocation may wait for an instance (a block at max_concurrency or at
    /// its scale-up limit) before it is refused with 429.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    queue_timeout: Duration,
    /// Distinct (account, project, block) label sets in /metrics; later ones are counted
    /// under account="_other",project="_other",block="_other".
    #[arg(long, default_value_t = DEFAULT_MAX_LABEL_SETS, value_name = "N")]
    metrics_max_label_sets: usize,
    /// Lets `network = true` blocks reach this address range although the egress deny list
    /// (loopback, link-local, private ranges, the host's own addresses) covers it, e.g. an
    /// internal API at 10.1.2.0/24. Repeatable. Every block with network gets it.
    #[arg(long = "network-allow", value_name = "CIDR")]
    network_allow: Vec<String>,
    /// Free space kept on the data dir's filesystem for the records of running
    /// invocations: below it, new invocations and deploys are refused with 503 (and
    /// /v1/health says "degraded") until space is freed. E.g. 64MB, 1GiB; 0 = no reserve.
    #[arg(long, default_value = "64MB", value_name = "SIZE")]
    disk_reserve: bytesize::ByteSize,
    /// Open client connections at once. At the cap a new connection closes the longest-idle
    /// one; only when all are busy is it refused (503). Default: a quarter of the open-file
    /// limit (raised to its hard limit at start), at most 8192.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Open connections of one client address (IPv6: one /64). Beyond it the address's own
    /// longest-idle connection is closed, or the new one refused (429) when all are busy.
    /// Default: an eighth of --max-connections.
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<usize>,
    /// Time a client has to send a request's headers (from the connection's start, or from
    /// the first byte of a later request); then the connection is closed.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    header_timeout: Duration,
    /// Time a client has to send a request body after its headers (then 408), and to take
    /// a response.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    body_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request before it is closed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
}

fn main() -> ExitCode {
    // Before anything else (no threads, no runtime): a sandbox's init.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == SANDBOX_INIT_ARG)
    {
        let code = refinery_sandbox::init_main(refinery_runtimes::run_builtin);
        return ExitCode::from(u8::try_from(code).unwrap_or(1));
    }
    let (command, client) = Cli::parse_with_client_args();
    match run(command, client) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command, client: ClientArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match command {
        Command::Serve(args) => {
            init_tracing();
            runtime.block_on(serve(*args))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Client(command) => runtime.block_on(refinery_cli::run(client, command)),
    }
}

/// The error and its causes on one line, each said once: many errors already include
/// their cause's text in their own message (`opening the store: <cause>`), and printing
/// the chain as it is would repeat it.
fn error_chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let message = cause.to_string();
        if text.contains(&message) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&message);
    }
    text
}

async fn serve(args: ServeArgs) -> Result<()> {
    let init_exe = std::env::current_exe().context("locating the refinery executable")?;
    let config = ServeConfig {
        listen: args.listen,
        data_dir: args.data_dir,
        keep_alive: args.keep_alive,
        shutdown_grace: args.shutdown_grace,
        init_exe,
        zygotes: !args.no_zygotes,
        standby: args.standby,
        default_quota: Quota {
            instances: args.quota_instances,
            memory_mb: args.quota_memory_mb,
            rate: args.quota_rate,
            burst: args.quota_burst,
            storage_mb: args.quota_storage_mb,
        },
        keep_alive_policy: args.keep_alive_policy,
        scale_up: args.scale_up_limit,
        queue_timeout: args.queue_timeout,
        metrics_max_label_sets: args.metrics_max_label_sets,
        adaptive_bin: args.adaptive_bin,
        network_allow: args.network_allow,
        deploy_limits: DeployLimits {
            keep_deployments: args.keep_deployments,
            rate: args.deploy_rate,
            at_once: args.deploys_at_once,
            at_once_per_account: args.deploys_at_once_per_account,
            ..DeployLimits::DEFAULT
        },
        disk_reserve: args.disk_reserve.as_u64(),
        front_door: FrontDoorConfig {
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            header_timeout: args.header_timeout,
            body_timeout: args.body_timeout,
            idle_timeout: args.idle_timeout,
        },
        engine: EngineConfig {
            max_fan_out_items: args.max_fan_out,
            max_steps_per_run: args.max_run_steps,
            max_runs_per_account: args.max_runs_per_account,
            max_message_bytes: args.max_message_bytes,
            max_queued_messages: args.max_queued_messages,
            ..EngineConfig::default()
        },
    };
    refinery_server::serve(config, shutdown_signal(), |addr| {
        // A stable line scripts and tests wait for.
        // (Not `println!`, which panics when stdout cannot be written: a full disk.)
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "Refinery listening on http://{addr}");
        let _ = stdout.flush();
    })
    .await?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM; stop the server with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("REFINERY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: a log file or journal gets plain text, and
    // NO_COLOR (https://no-color.org) turns it off everywhere.
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(refinery_server::LossyStderr::new)
        .with_ansi(colour)
        .init();
}
