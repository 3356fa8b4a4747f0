//! Service runs: `run` (start one, optionally wait for its end), `runs PROJECT` / `runs
//! list PROJECT` (a table), `runs show RUN_ID` (the step tree, see `run_tree`) and `runs
//! cancel RUN_ID`.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::Client;
use crate::commands::{path_segment, read_input};
use crate::output::{err_out, print, table, text};
use crate::run_tree;

/// Exit code of `run --wait-s N` when the run is still running after N seconds (a failed
/// or cancelled run exits with 1, clap's usage errors with 2).
pub const STILL_RUNNING: u8 = 3;

/// Seconds one `POST .../runs?wait=` (or the wait before polling) asks the server to hold
/// the request; a longer `--wait` then polls `GET /v1/runs/{id}`.
const WAIT_PER_REQUEST_S: u64 = 30;

/// Polling `GET /v1/runs/{id}`: the first pause, growing by half each time up to the last.
const POLL_FIRST: Duration = Duration::from_millis(100);
const POLL_MAX: Duration = Duration::from_secs(1);

#[derive(Debug, Args)]
pub struct RunArgs {
    pub project: String,
    /// The block (or trigger) the run starts at.
    pub start: String,
    /// The run's input: JSON text, `-` to read it from stdin, or `@FILE` to read it from a
    /// file.
    #[arg(long, default_value = "null", value_name = "JSON|-|@FILE")]
    pub input: String,
    /// The initial backpack, a JSON object.
    #[arg(long, value_name = "JSON")]
    pub backpack: Option<String>,
    /// Wait for the run to end, print it as `runs show` does, and exit non-zero if it
    /// failed or was cancelled (Ctrl-C stops the waiting, not the run).
    #[arg(long)]
    pub wait: bool,
    /// Wait at most this long (implies --wait); a run still running then exits with 3.
    #[arg(long, value_name = "SECONDS")]
    pub wait_s: Option<u64>,
    /// With --wait: every item of every fan-out (by default the first 20 under a parent).
    #[arg(long)]
    pub all: bool,
}

// Not a doc comment: it would replace the `runs` command's about text.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct RunsArgs {
    #[command(subcommand)]
    pub command: Option<RunsCommand>,
    /// The project whose runs to list (`runs list PROJECT` says the same, and reaches a
    /// project named `list`, `show` or `cancel`).
    #[arg(required = true)]
    pub project: Option<String>,
    /// Runs listed, newest first (1–1000).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub limit: u32,
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// List a project's runs, newest first (the same as `runs PROJECT`).
    List {
        project: String,
        /// Runs listed (1–1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Show a run: its step tree (status, attempt, fan-out item, duration and transition
    /// of each step), then its status, error and totals.
    Show {
        run_id: String,
        /// Every item of every fan-out (by default the first 20 under a parent).
        #[arg(long)]
        all: bool,
    },
    /// Cancel a run: steps running finish, nothing new starts.
    Cancel { run_id: String },
}

/// `refinery run`: starts a run; without --wait prints its id.
pub(crate) async fn start(client: &Client, json: bool, args: RunArgs) -> Result<ExitCode> {
    let mut body = json!({ "start": args.start, "input": read_input(&args.input)? });
    if let Some(backpack) = &args.backpack {
        let parsed: Value = serde_json::from_str(backpack)
            .with_context(|| format!("--backpack is not valid JSON: {backpack}"))?;
        body["backpack"] = parsed;
    }
    let path = format!("/v1/projects/{}/runs", path_segment(&args.project));
    if !args.wait && args.wait_s.is_none() {
        let reply = client.post(&path, &body).await?;
        print(json, &reply, || text(&reply["run_id"]))?;
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = args.wait_s.map(|s| Instant::now() + Duration::from_secs(s));
    let first_wait = args
        .wait_s
        .map_or(WAIT_PER_REQUEST_S, |s| s.min(WAIT_PER_REQUEST_S));
    let reply = client
        .post(&format!("{path}?wait={first_wait}"), &body)
        .await?;
    let run = if has_ended(&reply) {
        reply
    } else {
        let run_id = reply["run_id"]
            .as_str()
            .ok_or_else(|| anyhow!("the server's reply names no run_id: {reply}"))?
            .to_string();
        if !json {
            err_out(&format!(
                "{run_id} is running; waiting for it to end (Ctrl-C stops the waiting, not the run)\n"
            ));
        }
        wait_for(client, &run_id, deadline).await.with_context(|| {
            format!("waiting for {run_id}, which goes on on the server (`refinery runs show {run_id}` shows it)")
        })?
    };
    print(json, &run, || {
        run_tree::render(&run, args.all, chrono::Utc::now())
    })?;
    let run_id = text(&run["run_id"]);
    Ok(match run["status"].as_str() {
        Some("succeeded") => ExitCode::SUCCESS,
        Some("running") => {
            err_out(&format!(
                "{run_id} is still running after --wait-s {}: `refinery runs show {run_id}` shows it, `refinery runs cancel {run_id}` stops it\n",
                args.wait_s.unwrap_or_default()
            ));
            ExitCode::from(STILL_RUNNING)
        }
        _ => ExitCode::FAILURE,
    })
}

/// Whether a reply is a whole run that has ended (`?wait=` answers one once it ended, or
/// only `{run_id, status: "running"}`).
fn has_ended(reply: &Value) -> bool {
    reply["steps"].is_array() && reply["status"].as_str().is_some_and(|s| s != "running")
}

/// Polls `GET /v1/runs/{id}` until the run ended or `deadline` passed; the last reply.
async fn wait_for(client: &Client, run_id: &str, deadline: Option<Instant>) -> Result<Value> {
    let path = format!("/v1/runs/{}", path_segment(run_id));
    let mut pause = POLL_FIRST;
    loop {
        let run = client.get(&path).await?;
        let now = Instant::now();
        if has_ended(&run) || deadline.is_some_and(|d| now >= d) {
            return Ok(run);
        }
        let sleep = deadline.map_or(pause, |d| pause.min(d - now));
        tokio::time::sleep(sleep).await;
        pause = (pause + pause / 2).min(POLL_MAX);
    }
}

/// `refinery runs ...`.
pub(crate) async fn runs(client: &Client, json: bool, args: RunsArgs) -> Result<ExitCode> {
    match args.command {
        Some(RunsCommand::List { project, limit }) => list(client, json, &project, limit).await,
        None => {
            // clap requires PROJECT when no subcommand is given.
            let project = args
                .project
                .ok_or_else(|| anyhow!("give a project: `refinery runs PROJECT`"))?;
            list(client, json, &project, args.limit).await
        }
        Some(RunsCommand::Show { run_id, all }) => {
            let run = client
                .get(&format!("/v1/runs/{}", path_segment(&run_id)))
                .await?;
            print(json, &run, || {
                run_tree::render(&run, all, chrono::Utc::now())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Some(RunsCommand::Cancel { run_id }) => {
            let reply = client
                .post(
                    &format!("/v1/runs/{}/cancel", path_segment(&run_id)),
                    &json!({}),
                )
                .await?;
            print(json, &reply, || {
                let id = text(&reply["run_id"]);
                match reply["status"].as_str() {
                    Some("running") => format!(
                        "Cancelling {id}: steps running finish, nothing new starts (`refinery runs show {id}` shows it)."
                    ),
                    Some("cancelled") => format!("{id} is cancelled."),
                    _ => format!("{id} had already ended: {}.", text(&reply["status"])),
                }
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn list(client: &Client, json: bool, project: &str, limit: u32) -> Result<ExitCode> {
    let reply = client
        .get(&format!(
            "/v1/projects/{}/runs?limit={limit}",
            path_segment(project)
        ))
        .await?;
    let now = chrono::Utc::now();
    print(json, &reply, || {
        table(
            &reply["runs"],
            [
                "RUN",
                "STARTED",
                "STATUS",
                "START",
                "STEPS",
                "DURATION",
                "DEPLOYMENT",
            ],
            |r| {
                [
                    text(&r["run_id"]),
                    text(&r["started_at"]),
                    text(&r["status"]),
                    text(&r["start"]),
                    text(&r["steps"]),
                    match run_tree::run_duration_ms(r, now) {
                        Some(ms) if r["status"] == "running" => {
                            format!("{} so far", run_tree::duration(ms))
                        }
                        Some(ms) => run_tree::duration(ms),
                        None => "-".to_string(),
                    },
                    text(&r["deployment"]),
                ]
            },
        )
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::{Args, CommandFactory, FromArgMatches, Parser};
    use serde_json::json;

    use super::*;
    use crate::{ClientArgs, ClientCommand};

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: ClientCommand,
    }

    /// Parses as the binary does: the client options added to every command.
    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        let mut command = Cli::command();
        let names: Vec<String> = command
            .get_subcommands()
            .map(|c| c.get_name().to_string())
            .collect();
        for name in names {
            command = command.mut_subcommand(name, ClientArgs::augment_args);
        }
        let matches = command
            .try_get_matches_from(std::iter::once("refinery").chain(args.iter().copied()))?;
        Cli::from_arg_matches(&matches).map(|cli| cli.command)
    }

    fn runs(args: &[&str]) -> RunsArgs {
        match parse(args) {
            Ok(ClientCommand::Runs(runs)) => runs,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn runs_takes_a_project_or_a_subcommand() {
        let listed = runs(&["runs", "orders", "--limit", "5", "--json"]);
        assert_eq!(listed.project.as_deref(), Some("orders"));
        assert_eq!(listed.limit, 5);
        assert!(listed.command.is_none());

        let shown = runs(&["runs", "show", "run_1", "--all", "--json"]);
        assert!(
            matches!(shown.command, Some(RunsCommand::Show { ref run_id, all: true }) if run_id == "run_1"),
            "{shown:?}"
        );
        let cancelled = runs(&["runs", "cancel", "run_1"]);
        assert!(
            matches!(cancelled.command, Some(RunsCommand::Cancel { ref run_id }) if run_id == "run_1"),
            "{cancelled:?}"
        );
        // A project named like a subcommand: `runs list NAME`, or after `--`.
        for args in [&["runs", "list", "show"][..], &["runs", "--", "show"]] {
            let named_show = runs(args);
            let project = match &named_show.command {
                Some(RunsCommand::List { project, limit: 20 }) => Some(project.as_str()),
                None => named_show.project.as_deref(),
                _ => None,
            };
            assert_eq!(project, Some("show"), "{args:?}: {named_show:?}");
        }
    }

    #[test]
    fn bad_runs_arguments_are_usage_errors() {
        for args in [
            &["runs"][..],
            &["runs", "show"],
            &["runs", "orders", "--limit", "0"],
            &["runs", "orders", "--limit", "1001"],
            &["runs", "show", "run_1", "--limit", "3"],
            &["run", "orders"],
        ] {
            let error = parse(args).err();
            assert!(error.is_some(), "{args:?} was accepted");
        }
    }

    #[test]
    fn run_takes_its_input_backpack_and_wait() {
        let Ok(ClientCommand::Run(run)) = parse(&[
            "run",
            "orders",
            "validate",
            "--input",
            "@in.json",
            "--backpack",
            r#"{"user": 1}"#,
            "--wait-s",
            "30",
        ]) else {
            panic!("not parsed as run");
        };
        assert_eq!(
            (run.project.as_str(), run.start.as_str()),
            ("orders", "validate")
        );
        assert_eq!(run.input, "@in.json");
        assert_eq!(run.wait_s, Some(30));
        assert!(!run.wait && !run.all);
        let Ok(ClientCommand::Run(run)) = parse(&["run", "orders", "validate"]) else {
            panic!("not parsed as run");
        };
        assert_eq!(run.input, "null");
        assert!(run.backpack.is_none() && run.wait_s.is_none());
    }

    #[test]
    fn only_a_whole_ended_run_stops_the_waiting() {
        assert!(!has_ended(
            &json!({ "run_id": "run_1", "status": "running" })
        ));
        assert!(!has_ended(
            &json!({ "run_id": "run_1", "status": "running", "steps": [] })
        ));
        // A reply without the steps is not the run to print: fetch it.
        assert!(!has_ended(
            &json!({ "run_id": "run_1", "status": "succeeded" })
        ));
        assert!(has_ended(
            &json!({ "run_id": "run_1", "status": "failed", "steps": [] })
        ));
    }
}
