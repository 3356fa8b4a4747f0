//! The client subcommands: arguments, the request each makes, and how each prints.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use refinery_domain::source::Source;
use refinery_domain::Manifest;
use reqwest::Method;
use serde_json::{json, Value};

use crate::billing::{self, BillsCommand, PricingCommand, SetBillingArgs, UsageArgs};
use crate::client::Client;
use crate::output::{err_out, out, plural, pretty, print, table, text, user_error_text};
use crate::queues::{self, QueuesCommand};
use crate::runs::{self, RunArgs, RunsArgs};
use crate::timers::{self, TimersArgs};

// Options shared by every client command (not `serve`): given after the command, e.g.
// `refinery accounts list --json`, or through the environment. (A plain comment: a doc
// comment here would replace the about text of every command these are added to.)
#[derive(Debug, Args)]
#[command(next_help_heading = "Client options")]
pub struct ClientArgs {
    /// The server's URL (`http://` is assumed when no scheme is given).
    #[arg(
        long,
        global = true,
        env = "REFINERY_URL",
        default_value = "http://127.0.0.1:8710"
    )]
    pub url: String,
    /// An account's API key (or, for `accounts`, the operator key).
    #[arg(long, global = true, env = "REFINERY_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Publish a message: one run per subscriber block, each with the message as its input.
    Publish {
        project: String,
        topic: String,
        /// The message: JSON text, `-` to read it from stdin, or `@FILE` to read it from a
        /// file.
        #[arg(long, default_value = "null", value_name = "JSON|-|@FILE")]
        input: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Manage accounts (the operator key, except where a subcommand says otherwise).
    #[command(subcommand)]
    Accounts(AccountsCommand),
    /// Deploy a project from its refinery.toml; the new deployment goes live.
    Deploy {
        /// The manifest, or the directory holding refinery.toml.
        #[arg(default_value = "refinery.toml")]
        path: PathBuf,
    },
    /// List a project's deployments.
    Deployments { project: String },
    /// A project's secrets: `set PROJECT NAME` (the value on stdin), `list PROJECT` (names
    /// only), `delete PROJECT NAME`. Blocks read them with `env = { VAR = { secret = "NAME" } }`.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// Make an earlier deployment of a project live again.
    Rollback { project: String, deployment: i64 },
    /// List the account's projects (`projects delete PROJECT` deletes one).
    Projects {
        #[command(subcommand)]
        command: Option<ProjectsCommand>,
    },
    /// Invoke a block of a project's live deployment.
    Invoke {
        project: String,
        block: String,
        /// The block's input: JSON text, `-` to read it from stdin, or `@FILE` to read it
        /// from a file.
        #[arg(long, default_value = "null", value_name = "JSON|-|@FILE")]
        input: String,
        /// The initial backpack, a JSON object.
        #[arg(long)]
        backpack: Option<String>,
    },
    /// Start a run of a project's service at a block (or trigger); prints its id, or with
    /// --wait the run once it ended.
    Run(RunArgs),
    /// Publish to a project's topic: one run per subscriber block.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// A project's runs (`runs PROJECT`), one run's step tree (`runs show RUN_ID`), or
    /// cancel one (`runs cancel RUN_ID`).
    Runs(RunsArgs),
    /// A project's timers: schedule, next fire time and last fire (UTC); `--fires N` lists
    /// the recent fires too.
    Timers(TimersArgs),
    /// A project's queues: `send` messages, `show` one (its counts and settings), `dlq`
    /// its dead letters (list, redrive, purge).
    #[command(subcommand)]
    Queues(QueuesCommand),
    /// List a project's recent executions.
    Executions {
        project: String,
        #[arg(long)]
        block: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Show one execution with its logs.
    Logs { execution_id: String },
    /// List running and warm instances.
    Instances,
    /// Syscalls the sandbox refused to the account's instances (the operator: everyone's),
    /// newest first.
    Audit {
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Operator only: one account's events.
        #[arg(long)]
        account: Option<String>,
    },
    /// The operator's price list: `set FILE` (operator key) or `show`.
    #[command(subcommand)]
    Pricing(PricingCommand),
    /// Usage and cost so far this month (or --month), per project and block.
    Usage(UsageArgs),
    /// Monthly bills: list, show, close (operator), --csv export.
    #[command(subcommand)]
    Bills(BillsCommand),
}

#[derive(Debug, Subcommand)]
pub enum SecretsCommand {
    /// Set a secret (created, or replaced: instances reading the old value are retired).
    /// The value is read from stdin (one trailing newline is dropped), never from an argument.
    Set { project: String, name: String },
    /// List a project's secrets: names and times, never values.
    List { project: String },
    /// Delete a secret (instances reading it are retired; they fail to start until it is set
    /// again or a deployment without it is live).
    Delete { project: String, name: String },
}

#[derive(Debug, Subcommand)]
pub enum ProjectsCommand {
    /// List the account's projects (the default).
    List,
    /// Delete a project: its deployments, their code and their instances. Its executions
    /// and usage stay (they are billed); deploying the name again starts at deployment 1.
    Delete { project: String },
}

#[derive(Debug, Subcommand)]
pub enum AccountsCommand {
    /// Create an account; prints its API key once.
    Create { name: String },
    /// List accounts, with their state (active or disabled).
    List,
    /// Disable an account (operator key): its keys are refused (403), its instances are
    /// stopped and none of its code runs until it is enabled. Its data stays.
    Disable {
        /// The account's name or id.
        account: String,
    },
    /// Enable a disabled account again (operator key).
    Enable {
        /// The account's name or id.
        account: String,
    },
    /// Replace an account's API key with a new one, printed once; the old key stops
    /// working at once (operator key, or the account's own key).
    RotateKey {
        /// The account's name or id.
        account: String,
    },
    /// Change an account's quota (operator key). Limits not given stay as they are.
    SetQuota {
        /// The account's name or id.
        account: String,
        /// Live instances at once (starting, busy and warm).
        #[arg(long, value_name = "N")]
        instances: Option<u32>,
        /// Total memory_mb of the account's live instances.
        #[arg(long, value_name = "MB")]
        memory_mb: Option<u64>,
        /// Sustained invocations per second.
        #[arg(long, value_name = "PER_SECOND")]
        rate: Option<f64>,
        /// Invocations allowed in a burst.
        #[arg(long, value_name = "N")]
        burst: Option<u32>,
        /// MiB of deployments kept (manifests and code).
        #[arg(long, value_name = "MB")]
        storage_mb: Option<u64>,
        /// Return every limit not given to the server's default first.
        #[arg(long)]
        reset: bool,
    },
    /// Show an account's quota and usage (operator key, or the account's own key).
    Quota {
        /// The account's name or id.
        account: String,
    },
    /// Set an account's markup, minimum fee (operator key) or spending cap (operator, or
    /// the account itself).
    SetBilling(SetBillingArgs),
    /// Show an account's billing terms and spending this month.
    Billing {
        /// The account's name or id.
        account: String,
    },
}

/// Runs one client command; the exit code is non-zero when the server said no, the
/// invoked block failed, or the run waited for failed, was cancelled or is still running.
pub async fn run(args: ClientArgs, command: ClientCommand) -> Result<ExitCode> {
    let key = match (&args.api_key, &command) {
        (Some(key), _) => Some(key.clone()),
        // Quick start: the operator on the server's machine, default data dir.
        (
            None,
            ClientCommand::Accounts(_)
            | ClientCommand::Pricing(_)
            | ClientCommand::Usage(_)
            | ClientCommand::Bills(_),
        ) => fs::read_to_string("refinery-data/operator.key")
            .ok()
            .map(|k| k.trim().to_string()),
        (None, _) => None,
    };
    let client = Client::new(&args.url, key)?;
    let json = args.json;
    match command {
        ClientCommand::Pricing(command) => return billing::pricing(&client, json, command).await,
        ClientCommand::Usage(args) => return billing::usage(&client, json, args).await,
        ClientCommand::Bills(command) => return billing::bills(&client, json, command).await,
        ClientCommand::Run(args) => return runs::start(&client, json, args).await,
        ClientCommand::Topics(TopicsCommand::Publish {
            project,
            topic,
            input,
        }) => {
            let message = read_input(&input)?;
            let reply = client
                .post(
                    &format!(
                        "/v1/projects/{}/topics/{}/publish",
                        path_segment(&project),
                        path_segment(&topic)
                    ),
                    &message,
                )
                .await?;
            print(json, &reply, || {
                let ids: Vec<&str> = reply["run_ids"]
                    .as_array()
                    .map(|ids| ids.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                if ids.is_empty() {
                    format!("Published to {topic}: it has no subscribers, no run started.")
                } else {
                    format!(
                        "Published to {topic}: {} runs started ({}).",
                        ids.len(),
                        ids.join(", ")
                    )
                }
            })?;
        }
        ClientCommand::Runs(args) => return runs::runs(&client, json, args).await,
        ClientCommand::Timers(args) => return timers::timers(&client, json, args).await,
        ClientCommand::Queues(command) => return queues::queues(&client, json, command).await,
        ClientCommand::Accounts(AccountsCommand::SetBilling(args)) => {
            return billing::set_billing(&client, json, args).await
        }
        ClientCommand::Accounts(AccountsCommand::Billing { account }) => {
            return billing::show_billing(&client, json, &account).await
        }
        ClientCommand::Accounts(AccountsCommand::Create { name }) => {
            let reply = client
                .post("/v1/accounts", &json!({ "name": name }))
                .await?;
            print(json, &reply, || {
                format!(
                    "Created account {} ({}).\nAPI key (shown once, keep it safe): {}",
                    reply["name"].as_str().unwrap_or_default(),
                    reply["id"].as_str().unwrap_or_default(),
                    reply["api_key"].as_str().unwrap_or_default()
                )
            })?;
        }
        ClientCommand::Accounts(AccountsCommand::List) => {
            let reply = client.get("/v1/accounts").await?;
            print(json, &reply, || {
                table(
                    &reply["accounts"],
                    ["ID", "NAME", "STATE", "CREATED"],
                    |a| {
                        [
                            text(&a["id"]),
                            text(&a["name"]),
                            match a["disabled_at"].as_str() {
                                Some(at) => format!("disabled since {at}"),
                                None => text(&a["state"]),
                            },
                            text(&a["created_at"]),
                        ]
                    },
                )
            })?;
        }
        ClientCommand::Accounts(AccountsCommand::Disable { account }) => {
            let reply = account_action(&client, &account, "disable").await?;
            print(json, &reply, || {
                format!(
                    "Account {} ({}) is disabled: its keys are refused and its instances stopped. `refinery accounts enable {}` restores it.",
                    text(&reply["name"]),
                    text(&reply["id"]),
                    text(&reply["name"])
                )
            })?;
        }
        ClientCommand::Accounts(AccountsCommand::Enable { account }) => {
            let reply = account_action(&client, &account, "enable").await?;
            print(json, &reply, || {
                format!(
                    "Account {} ({}) is enabled.",
                    text(&reply["name"]),
                    text(&reply["id"])
                )
            })?;
        }
        ClientCommand::Accounts(AccountsCommand::RotateKey { account }) => {
            let reply = account_action(&client, &account, "rotate-key").await?;
            print(json, &reply, || {
                format!(
                    "New API key of account {} ({}); the old one no longer works.\nAPI key (shown once, keep it safe): {}",
                    text(&reply["name"]),
                    text(&reply["id"]),
                    text(&reply["api_key"])
                )
            })?;
        }
        ClientCommand::Accounts(AccountsCommand::SetQuota {
            account,
            instances,
            memory_mb,
            rate,
            burst,
            storage_mb,
            reset,
        }) => {
            let mut body = serde_json::Map::new();
            for (field, value) in [
                ("instances", instances.map(Value::from)),
                ("memory_mb", memory_mb.map(Value::from)),
                ("rate", rate.map(Value::from)),
                ("burst", burst.map(Value::from)),
                ("storage_mb", storage_mb.map(Value::from)),
            ] {
                match value {
                    Some(value) => {
                        body.insert(field.to_string(), value);
                    }
                    None if reset => {
                        body.insert(field.to_string(), Value::Null);
                    }
                    None => {}
                }
            }
            if body.is_empty() {
                bail!(
                    "nothing to change: give --instances, --memory-mb, --rate, --burst, --storage-mb or --reset"
                );
            }
            let reply = client
                .send(
                    Method::PUT,
                    &format!("/v1/accounts/{}/quota", path_segment(&account)),
                    Some(&Value::Object(body)),
                    &[],
                )
                .await?;
            print(json, &reply, || quota_text(&reply))?;
        }
        ClientCommand::Accounts(AccountsCommand::Quota { account }) => {
            let reply = client
                .get(&format!("/v1/accounts/{}/quota", path_segment(&account)))
                .await?;
            print(json, &reply, || quota_text(&reply))?;
        }
        ClientCommand::Deploy { path } => {
            let body = deploy_request(&path)?;
            let reply = client
                .post_streaming("/v1/deployments", &body, |event| {
                    if !json {
                        show_deploy_progress(event);
                    }
                })
                .await?;
            print(json, &reply, || {
                let blocks: Vec<&str> = reply["blocks"]
                    .as_array()
                    .map(|b| b.iter().filter_map(|b| b["name"].as_str()).collect())
                    .unwrap_or_default();
                let mut text = format!(
                    "Deployed {}: deployment {} is live (blocks: {}).",
                    reply["project"].as_str().unwrap_or_default(),
                    reply["deployment"],
                    blocks.join(", ")
                );
                for b in reply["builds"].as_array().into_iter().flatten() {
                    text.push_str(&format!(
                        "\n  dependencies of {}: {}{}",
                        b["block"].as_str().unwrap_or_default(),
                        if b["cached"] == true {
                            "cached layer".to_string()
                        } else {
                            format!(
                                "built in {:.1} s",
                                b["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
                            )
                        },
                        b["bytes"]
                            .as_u64()
                            .map(|n| format!(" ({} files, {n} bytes)", b["files"]))
                            .unwrap_or_default()
                    ));
                }
                for e in reply["endpoints"].as_array().into_iter().flatten() {
                    text.push_str(&format!(
                        "\n  endpoint {}: {} {}{}{}",
                        e["name"].as_str().unwrap_or_default(),
                        e["method"].as_str().unwrap_or_default(),
                        client.base().trim_end_matches('/'),
                        e["url_path"].as_str().unwrap_or_default(),
                        if e["auth"] == "key" {
                            " (needs an API key)"
                        } else {
                            ""
                        }
                    ));
                }
                text
            })?;
        }
        ClientCommand::Secrets(command) => secrets_command(&client, json, command).await?,
        ClientCommand::Deployments { project } => {
            let reply = client
                .get(&format!("/v1/projects/{project}/deployments"))
                .await?;
            print(json, &reply, || {
                table(
                    &reply["deployments"],
                    ["DEPLOYMENT", "CREATED", "BLOCKS", "LIVE"],
                    |d| {
                        [
                            text(&d["deployment"]),
                            text(&d["created_at"]),
                            d["blocks"]
                                .as_array()
                                .map(|b| {
                                    b.iter()
                                        .filter_map(Value::as_str)
                                        .collect::<Vec<_>>()
                                        .join(",")
                                })
                                .unwrap_or_default(),
                            if d["live"].as_bool() == Some(true) {
                                "live".to_string()
                            } else {
                                String::new()
                            },
                        ]
                    },
                )
            })?;
        }
        ClientCommand::Rollback {
            project,
            deployment,
        } => {
            let reply = client
                .post(
                    &format!("/v1/projects/{project}/rollback"),
                    &json!({ "deployment": deployment }),
                )
                .await?;
            print(json, &reply, || {
                format!("{project}: deployment {} is live.", reply["deployment"])
            })?;
        }
        ClientCommand::Projects {
            command: Some(ProjectsCommand::Delete { project }),
        } => {
            let reply = client
                .send(
                    Method::DELETE,
                    &format!("/v1/projects/{}", path_segment(&project)),
                    None,
                    &[],
                )
                .await?;
            print(json, &reply, || {
                format!(
                    "Deleted project {project} ({}, their code and instances); its executions and usage are kept.",
                    plural(&reply["deployments_deleted"], "deployment")
                )
            })?;
        }
        ClientCommand::Projects { command: _ } => {
            let reply = client.get("/v1/projects").await?;
            print(json, &reply, || {
                table(&reply["projects"], ["PROJECT", "LIVE DEPLOYMENT"], |p| {
                    [text(&p["project"]), text(&p["live_deployment"])]
                })
            })?;
        }
        ClientCommand::Invoke {
            project,
            block,
            input,
            backpack,
        } => {
            let input = read_input(&input)?;
            let mut headers = Vec::new();
            if let Some(backpack) = backpack {
                let parsed: Value = serde_json::from_str(&backpack)
                    .with_context(|| format!("--backpack is not valid JSON: {backpack}"))?;
                headers.push(("refinery-backpack", parsed.to_string()));
            }
            let reply = client
                .send(
                    Method::POST,
                    &format!("/v1/projects/{project}/blocks/{block}/invoke"),
                    Some(&input),
                    &headers,
                )
                .await?;
            let ok = reply["status"] == "ok";
            if json {
                out(&pretty(&reply))?;
            } else {
                if let Some(logs) = reply["logs"].as_str().filter(|l| !l.is_empty()) {
                    err_out(logs);
                    if !logs.ends_with('\n') {
                        err_out("\n");
                    }
                }
                if ok {
                    out(&pretty(&reply["output"]))?;
                } else {
                    err_out(&format!(
                        "{} ({}): {}\n",
                        reply["status"].as_str().unwrap_or_default(),
                        reply["execution_id"].as_str().unwrap_or_default(),
                        user_error_text(&reply["error"])
                    ));
                }
            }
            return Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            });
        }
        ClientCommand::Executions {
            project,
            block,
            limit,
        } => {
            let mut path = format!("/v1/projects/{project}/executions?limit={limit}");
            if let Some(block) = block {
                path.push_str(&format!("&block={block}"));
            }
            let reply = client.get(&path).await?;
            print(json, &reply, || {
                table(
                    &reply["executions"],
                    [
                        "EXECUTION",
                        "STARTED",
                        "STATUS",
                        "START",
                        "DURATION",
                        "BLOCK",
                    ],
                    |e| {
                        [
                            text(&e["execution_id"]),
                            text(&e["started_at"]),
                            text(&e["status"]),
                            if e["cold"].as_bool() == Some(true) {
                                "cold".to_string()
                            } else {
                                "warm".to_string()
                            },
                            format!("{:.2} ms", e["duration_ms"].as_f64().unwrap_or_default()),
                            text(&e["block"]),
                        ]
                    },
                )
            })?;
        }
        ClientCommand::Logs { execution_id } => {
            let reply = client
                .get(&format!("/v1/executions/{execution_id}"))
                .await?;
            print(json, &reply, || {
                let mut text = format!(
                    "{} {}/{} deployment {} {} {} in {:.2} ms\n",
                    reply["execution_id"].as_str().unwrap_or_default(),
                    reply["project"].as_str().unwrap_or_default(),
                    reply["block"].as_str().unwrap_or_default(),
                    reply["deployment"],
                    reply["status"].as_str().unwrap_or_default(),
                    if reply["cold"].as_bool() == Some(true) {
                        "cold"
                    } else {
                        "warm"
                    },
                    reply["duration_ms"].as_f64().unwrap_or_default()
                );
                text.push_str(&format!("input:  {}\n", reply["input"]));
                text.push_str(&format!("output: {}\n", reply["output"]));
                if !reply["error"].is_null() {
                    text.push_str(&format!("error:  {}\n", user_error_text(&reply["error"])));
                }
                text.push_str("--- logs ---\n");
                text.push_str(reply["logs"].as_str().unwrap_or_default());
                text
            })?;
        }
        ClientCommand::Instances => {
            let reply = client.get("/v1/instances").await?;
            print(json, &reply, || {
                table(
                    &reply["instances"],
                    ["INSTANCE", "BLOCK", "DEPLOYMENT", "STATE", "INVOCATIONS"],
                    |i| {
                        [
                            text(&i["id"]),
                            format!("{}/{}", text(&i["project"]), text(&i["block"])),
                            text(&i["deployment"]),
                            text(&i["state"]),
                            plural(&i["invocations"], "invocation"),
                        ]
                    },
                )
            })?;
        }
        ClientCommand::Audit { limit, account } => {
            let mut path = format!("/v1/audit?limit={limit}");
            if let Some(account) = account {
                path.push_str(&format!("&account={}", path_segment(&account)));
            }
            let reply = client.get(&path).await?;
            print(json, &reply, || {
                let mut shown = String::new();
                if reply["watching"].as_bool() != Some(true) {
                    shown.push_str("(the server cannot read the kernel log: refused syscalls are not being recorded)\n");
                }
                shown.push_str(&table(
                    &reply["events"],
                    ["AT", "BLOCK", "INSTANCE", "SYSCALL", "ACTION", "PROCESS"],
                    |e| {
                        let or_unknown = |v: &Value| v.as_str().unwrap_or("?").to_string();
                        [
                            text(&e["at"]),
                            format!("{}/{}", or_unknown(&e["project"]), or_unknown(&e["block"])),
                            or_unknown(&e["instance_id"]),
                            text(&e["syscall"]),
                            text(&e["action"]),
                            text(&e["comm"]),
                        ]
                    },
                ));
                shown
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The block's input from `--input`: `-` reads stdin, `@FILE` a file, anything else is
/// the JSON itself. Whatever the source, it must be one JSON value.
pub(crate) fn read_input(input: &str) -> Result<Value> {
    let (text, source) = if input == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the input from stdin (--input -)")?;
        (text, "stdin (--input -)".to_string())
    } else if let Some(path) = input.strip_prefix('@') {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading the input file {path} (--input @{path})"))?;
        (text, format!("the input file {path}"))
    } else {
        return serde_json::from_str(input).with_context(|| {
            format!("--input is not valid JSON: {input}; give JSON, `-` for stdin or @FILE")
        });
    };
    serde_json::from_str(&text).with_context(|| format!("{source} is not valid JSON"))
}

/// One progress event of a deploy, on stderr: a build starting or ending, a line of the
/// package manager's output.
fn show_deploy_progress(event: &Value) {
    let block = event["block"].as_str().unwrap_or_default();
    match (event["type"].as_str(), event["status"].as_str()) {
        (Some("build"), Some("started")) => eprintln!(
            "Building the dependencies of block {block} ({})...",
            event["manager"].as_str().unwrap_or("package manager")
        ),
        (Some("build"), Some("built")) => eprintln!(
            "Built the dependencies of block {block} in {:.1} s.",
            event["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
        ),
        (Some("build"), Some("cached")) => {
            eprintln!("Dependencies of block {block}: unchanged, cached layer reused.")
        }
        (Some("log"), _) => eprintln!("  {block} | {}", event["line"].as_str().unwrap_or_default()),
        _ => {}
    }
}

/// Reads the manifest and the sources it names (files, and directories walked whole),
/// checking it locally first so errors name the real path on disk.
fn deploy_request(path: &Path) -> Result<Value> {
    let manifest_path = if path.is_dir() {
        path.join("refinery.toml")
    } else {
        path.to_path_buf()
    };
    let text = fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading the manifest {}", manifest_path.display()))?;
    let base = manifest_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let project = ProjectFiles::new(&base)?;
    let shown = manifest_path.display().to_string();
    if let Err(error) = Manifest::parse(&text, &shown, &project) {
        bail!("invalid manifest: {error}");
    }
    let mut files = serde_json::Map::new();
    let mut binary_files = serde_json::Map::new();
    for source in Manifest::referenced_sources(&text) {
        let (read, binary) = project.read_all(&source).map_err(anyhow::Error::msg)?;
        match read {
            Source::File(contents) => {
                files.insert(source, Value::String(contents));
            }
            Source::Directory(dir) => {
                use base64::Engine as _;
                let key = refinery_domain::source::directory_key(&source);
                for (path, contents) in dir {
                    files.insert(format!("{key}/{path}"), Value::String(contents));
                }
                for (path, bytes) in binary {
                    binary_files.insert(
                        format!("{key}/{path}"),
                        Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
                    );
                }
            }
            Source::Deployed => {}
        }
    }
    let mut request = json!({ "manifest": text, "manifest_path": shown, "files": files });
    if !binary_files.is_empty() {
        request["binary_files"] = Value::Object(binary_files);
    }
    Ok(request)
}

/// A directory's files that are not UTF-8 text: path relative to it → bytes.
type BinaryFiles = std::collections::BTreeMap<String, Vec<u8>>;

/// What reading one source gave: it and its binary files, or why it cannot be read.
type SourceRead = Result<(Source, BinaryFiles), String>;

/// The project directory (the manifest's) on disk, as the manifest's sources see it.
///
/// Symlinks: one whose target (resolved fully) is inside the project is followed and its
/// target's contents uploaded under the link's name; one pointing outside the project is
/// refused, naming the link and its target (a deploy never uploads a file from elsewhere on
/// the machine); a symlinked directory inside a directory source is refused (it could loop).
/// In a directory source, hidden entries (`.git`, `.env`, ...), `__pycache__` and
/// `node_modules` are skipped. The same rules hold for a `[[shared]]` directory. A
/// directory's files that are not UTF-8 text are read as bytes (sent base64).
struct ProjectFiles {
    /// The project directory, resolved.
    root: PathBuf,
    base: PathBuf,
    /// What each source read gave (the manifest check and the upload read each once).
    read: std::cell::RefCell<std::collections::BTreeMap<String, SourceRead>>,
}

/// Entries a directory source never uploads.
const SKIPPED_NAMES: [&str; 2] = ["__pycache__", "node_modules"];

impl ProjectFiles {
    fn new(base: &Path) -> Result<ProjectFiles> {
        let root = base
            .canonicalize()
            .with_context(|| format!("resolving the project directory {}", base.display()))?;
        Ok(ProjectFiles {
            root,
            base: base.to_path_buf(),
            read: Default::default(),
        })
    }

    /// A source and, for a directory, its files that are not UTF-8 text (read once).
    fn read_all(&self, source: &str) -> SourceRead {
        if let Some(done) = self.read.borrow().get(source) {
            return done.clone();
        }
        let done = self.read_uncached(source);
        self.read
            .borrow_mut()
            .insert(source.to_string(), done.clone());
        done
    }

    /// `path` resolved, if it stays inside the project; else why not.
    fn inside(&self, path: &Path, shown: &str) -> Result<PathBuf, String> {
        let resolved = path.canonicalize().map_err(|e| e.to_string())?;
        if !resolved.starts_with(&self.root) {
            return Err(format!(
                "`{shown}` resolves (through a symlink) to {}, outside the project directory {}: a deploy uploads only files inside the project; copy the file into the project instead of linking to it",
                resolved.display(),
                self.root.display()
            ));
        }
        Ok(resolved)
    }

    fn read_uncached(&self, source: &str) -> SourceRead {
        let path = self.base.join(source);
        let resolved = self.inside(&path, source)?;
        if resolved.is_dir() {
            let mut files = DirFiles::default();
            self.walk(
                &path,
                refinery_domain::source::directory_key(source),
                "",
                &mut files,
            )?;
            if files.text.is_empty() && files.binary.is_empty() {
                return Err(format!("the directory `{source}` holds no files"));
            }
            return Ok((Source::Directory(files.text), files.binary));
        }
        if source.ends_with('/') {
            return Err(format!(
                "`{source}` ends with '/' but is a file: write it without the '/'"
            ));
        }
        read_text(&resolved, source).map(|text| (Source::File(text), BinaryFiles::new()))
    }

    /// Adds the files under `dir` (shown as `shown/`, at relative paths `prefix...`).
    fn walk(
        &self,
        dir: &Path,
        shown: &str,
        prefix: &str,
        files: &mut DirFiles,
    ) -> Result<(), String> {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .map_err(|e| format!("reading `{shown}/{prefix}`: {e}"))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("reading `{shown}/{prefix}`: {e}"))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return Err(format!(
                    "`{shown}/{prefix}{}`: the file name is not UTF-8; rename it",
                    name.to_string_lossy()
                ));
            };
            if name.starts_with('.') || SKIPPED_NAMES.contains(&name) {
                continue;
            }
            let relative = format!("{prefix}{name}");
            let shown_path = format!("{shown}/{relative}");
            refinery_domain::source::check_relative_path(&relative)
                .map_err(|m| format!("in `{shown}/`: {m}"))?;
            let path = entry.path();
            let kind = entry
                .file_type()
                .map_err(|e| format!("reading `{shown_path}`: {e}"))?;
            if kind.is_symlink() {
                let target = self.inside(&path, &shown_path)?;
                if target.is_dir() {
                    return Err(format!(
                        "`{shown_path}` is a symlink to a directory ({}): symlinked directories are not followed; make it a real directory",
                        target.display()
                    ));
                }
                self.add(files, relative, read_bytes(&target, &shown_path)?, shown)?;
            } else if kind.is_dir() {
                self.walk(&path, shown, &format!("{relative}/"), files)?;
            } else if kind.is_file() {
                self.add(files, relative, read_bytes(&path, &shown_path)?, shown)?;
            } else {
                return Err(format!(
                    "`{shown_path}` is not a regular file (a socket, a device or a pipe): remove it from the directory"
                ));
            }
        }
        Ok(())
    }

    /// Adds one file, refusing as soon as the directory is over a limit (so a huge
    /// directory is not read whole first).
    fn add(
        &self,
        files: &mut DirFiles,
        relative: String,
        contents: Vec<u8>,
        shown: &str,
    ) -> Result<(), String> {
        use refinery_domain::limits;
        files.total += contents.len();
        match String::from_utf8(contents) {
            Ok(text) => {
                files.text.insert(relative, text);
            }
            Err(e) => {
                files.binary.insert(relative, e.into_bytes());
            }
        }
        if files.text.len() + files.binary.len() > limits::MAX_DEPLOY_FILES {
            return Err(format!(
                "the directory `{shown}/` holds more than {} files, the limit per block (and per deploy): remove files the block does not need (hidden files, `__pycache__` and `node_modules` are skipped)",
                limits::MAX_DEPLOY_FILES
            ));
        }
        if files.total > limits::MAX_DEPLOY_FILES_BYTES {
            return Err(format!(
                "the files of the directory `{shown}/` total more than {} bytes (16 MiB), the limit per block (and per deploy): remove files the block does not need",
                limits::MAX_DEPLOY_FILES_BYTES
            ));
        }
        Ok(())
    }
}

impl refinery_domain::source::SourceResolver for ProjectFiles {
    fn resolve(&self, path: &str) -> Result<Source, String> {
        self.read_all(path).map(|(source, _)| source)
    }

    fn binary_files(&self, path: &str) -> BinaryFiles {
        self.read_all(path)
            .map(|(_, binary)| binary)
            .unwrap_or_default()
    }
}

/// A directory's files as the walk reads them: UTF-8 text apart from other bytes, and the
/// bytes read so far.
#[derive(Default)]
struct DirFiles {
    text: std::collections::BTreeMap<String, String>,
    binary: BinaryFiles,
    total: usize,
}

/// A file's bytes, within the per-file limit.
fn read_bytes(path: &Path, shown: &str) -> Result<Vec<u8>, String> {
    let meta = fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > refinery_domain::limits::MAX_SOURCE_BYTES as u64 {
        return Err(format!(
            "`{shown}` is {} bytes; the limit is {} bytes (5 MiB) per file",
            meta.len(),
            refinery_domain::limits::MAX_SOURCE_BYTES
        ));
    }
    fs::read(path).map_err(|e| format!("reading `{shown}`: {e}"))
}

/// A file's text; a file that is not UTF-8 is refused (a block's single file is source
/// code; a directory's files may be any bytes, see [`read_bytes`]).
fn read_text(path: &Path, shown: &str) -> Result<String, String> {
    let meta = fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.len() > refinery_domain::limits::MAX_SOURCE_BYTES as u64 {
        return Err(format!(
            "`{shown}` is {} bytes; the limit is {} bytes (5 MiB) per file",
            meta.len(),
            refinery_domain::limits::MAX_SOURCE_BYTES
        ));
    }
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|_| {
        format!("`{shown}` is not UTF-8 text: a block's single source file is source code; put binary files in a directory source (`source = \"dir/\"`) or a `[[shared]]` directory")
    })
}

/// `refinery secrets ...`.
async fn secrets_command(client: &Client, json: bool, command: SecretsCommand) -> Result<()> {
    match command {
        SecretsCommand::Set { project, name } => {
            let mut value = String::new();
            std::io::stdin()
                .read_to_string(&mut value)
                .context("reading the secret's value from stdin (pipe it in: `printf %s \"$VALUE\" | refinery secrets set PROJECT NAME`)")?;
            if value.ends_with('\n') {
                value.pop();
                if value.ends_with('\r') {
                    value.pop();
                }
            }
            let reply = client
                .send(
                    Method::PUT,
                    &format!(
                        "/v1/projects/{}/secrets/{}",
                        path_segment(&project),
                        path_segment(&name)
                    ),
                    Some(&json!({ "value": value })),
                    &[],
                )
                .await?;
            print(json, &reply, || {
                if reply["created"].as_bool() == Some(true) {
                    format!("Secret {name} of {project} set.")
                } else {
                    format!("Secret {name} of {project} replaced; instances reading the old value were retired.")
                }
            })?;
        }
        SecretsCommand::List { project } => {
            let reply = client
                .get(&format!("/v1/projects/{}/secrets", path_segment(&project)))
                .await?;
            print(json, &reply, || {
                table(&reply["secrets"], ["SECRET", "UPDATED"], |s| {
                    [text(&s["name"]), text(&s["updated_at"])]
                })
            })?;
        }
        SecretsCommand::Delete { project, name } => {
            let reply = client
                .send(
                    Method::DELETE,
                    &format!(
                        "/v1/projects/{}/secrets/{}",
                        path_segment(&project),
                        path_segment(&name)
                    ),
                    None,
                    &[],
                )
                .await?;
            print(json, &reply, || {
                format!("Secret {name} of {project} deleted.")
            })?;
        }
    }
    Ok(())
}

/// `POST /v1/accounts/{account}/{action}` with no body (`disable`, `enable`,
/// `rotate-key`): the reply.
async fn account_action(client: &Client, account: &str, action: &str) -> Result<Value> {
    client
        .post(
            &format!("/v1/accounts/{}/{action}", path_segment(account)),
            &json!({}),
        )
        .await
}

/// An account name or id as one URL path segment (names and ids are `[a-z0-9_-]`; anything
/// else is percent-encoded so it cannot change the path).
pub(crate) fn path_segment(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.' {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A quota reply as text: each limit with its usage, and whether it is the default.
fn quota_text(reply: &Value) -> String {
    let (quota, usage, overrides) = (&reply["quota"], &reply["usage"], &reply["overrides"]);
    let origin = |field: &str| {
        if overrides[field].is_null() {
            "default"
        } else {
            "set for this account"
        }
    };
    format!(
        "{} ({})\n  instances  {} of {} live  ({})\n  memory     {} of {} MB  ({})\n  rate       {}/s, burst {}  ({} / {}); {} invocations available now\n  storage    {} of {} MiB kept  ({})",
        reply["account"].as_str().unwrap_or_default(),
        reply["account_id"].as_str().unwrap_or_default(),
        usage["instances"],
        quota["instances"],
        origin("instances"),
        usage["memory_mb"],
        quota["memory_mb"],
        origin("memory_mb"),
        quota["rate"],
        quota["burst"],
        origin("rate"),
        origin("burst"),
        usage["tokens"],
        usage["storage_mb"],
        quota["storage_mb"],
        origin("storage_mb"),
    )
}
