//! Queues: `queues send PROJECT QUEUE MESSAGE...` (or `--batch` a JSON list), `queues show
//! PROJECT QUEUE` (its counts and settings), `queues dlq PROJECT QUEUE list|redrive|purge`
//! (its dead-letter list).

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::client::Client;
use crate::commands::{path_segment, read_input};
use crate::output::{print, table, text};

#[derive(Debug, Subcommand)]
pub enum QueuesCommand {
    /// Send messages to a queue of a project's live deployment (all are stored, or none).
    Send(SendArgs),
    /// Show a queue: messages visible, in flight and dead-lettered, the oldest message's
    /// age, and its settings.
    Show { project: String, queue: String },
    /// A queue's dead-letter list: `list` it, `redrive` it (back into the queue) or
    /// `purge` it (delete).
    Dlq {
        project: String,
        queue: String,
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Debug, Args)]
pub struct SendArgs {
    pub project: String,
    pub queue: String,
    /// Messages, one JSON text each (e.g. '{"url": "https://example.com"}').
    #[arg(value_name = "MESSAGE")]
    pub messages: Vec<String>,
    /// Messages as one JSON list: JSON text, `-` to read it from stdin, or `@FILE`.
    #[arg(long, value_name = "JSON|-|@FILE")]
    pub batch: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// List the dead letters, oldest first.
    List {
        /// Messages listed (1–1000).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
    },
    /// Move every dead letter back into the queue (visible now, receive count 0).
    Redrive,
    /// Delete every dead letter.
    Purge,
}

fn queue_path(project: &str, queue: &str) -> String {
    format!(
        "/v1/projects/{}/queues/{}",
        path_segment(project),
        path_segment(queue)
    )
}

/// The messages of a send: the positional ones, then the `--batch` list's.
fn messages(args: &SendArgs) -> Result<Vec<Value>> {
    let mut messages = Vec::new();
    for (i, text) in args.messages.iter().enumerate() {
        let value: Value = serde_json::from_str(text).with_context(|| {
            format!(
                "message {} is not valid JSON: {text} (quote it for the shell, e.g. '{{\"id\": 1}}', or '\"text\"' for a string)",
                i + 1
            )
        })?;
        messages.push(value);
    }
    if let Some(batch) = &args.batch {
        match read_input(batch)? {
            Value::Array(list) => messages.extend(list),
            other => bail!(
                "--batch must be a JSON list of messages, e.g. [{{\"id\": 1}}, {{\"id\": 2}}]; it is {}",
                match other {
                    Value::Object(_) => "an object",
                    Value::String(_) => "a string",
                    _ => "a single value",
                }
            ),
        }
    }
    if messages.is_empty() {
        bail!("nothing to send: give messages as arguments (JSON each) or --batch JSON_LIST");
    }
    Ok(messages)
}

pub(crate) async fn queues(
    client: &Client,
    json: bool,
    command: QueuesCommand,
) -> Result<ExitCode> {
    match command {
        QueuesCommand::Send(args) => {
            let body = json!({ "messages": messages(&args)? });
            let path = format!("{}/messages", queue_path(&args.project, &args.queue));
            let reply = client.post(&path, &body).await?;
            print(json, &reply, || {
                format!(
                    "Enqueued {} into {}/{}.",
                    crate::output::plural(&reply["enqueued"], "message"),
                    args.project,
                    args.queue
                )
            })?;
        }
        QueuesCommand::Show { project, queue } => {
            let reply = client.get(&queue_path(&project, &queue)).await?;
            print(json, &reply, || show_text(&reply))?;
        }
        QueuesCommand::Dlq {
            project,
            queue,
            action,
        } => {
            let base = format!("{}/dead-letters", queue_path(&project, &queue));
            match action {
                DlqAction::List { limit } => {
                    let reply = client.get(&format!("{base}?limit={limit}")).await?;
                    print(json, &reply, || {
                        table(
                            &reply["messages"],
                            ["MESSAGE", "ENQUEUED", "DEAD-LETTERED", "RECEIVES", "BODY"],
                            |m| {
                                [
                                    text(&m["message_id"]),
                                    text(&m["enqueued_at"]),
                                    text(&m["dead_lettered_at"]),
                                    text(&m["receive_count"]),
                                    truncate(&m["body"].to_string(), 60),
                                ]
                            },
                        )
                    })?;
                }
                DlqAction::Redrive => {
                    let reply = client.post(&format!("{base}/redrive"), &json!({})).await?;
                    print(json, &reply, || {
                        format!(
                            "Moved {} back into {project}/{queue}.",
                            crate::output::plural(&reply["redriven"], "dead letter")
                        )
                    })?;
                }
                DlqAction::Purge => {
                    let reply = client.post(&format!("{base}/purge"), &json!({})).await?;
                    print(json, &reply, || {
                        format!(
                            "Deleted {} of {project}/{queue}.",
                            crate::output::plural(&reply["purged"], "dead letter")
                        )
                    })?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn show_text(q: &Value) -> String {
    let s = &q["settings"];
    let oldest = match q["oldest_age_s"].as_f64() {
        Some(age) => format!("{age:.1} s"),
        None => "-".into(),
    };
    format!(
        "Queue {}/{} (consumer `{}`)\n\
         visible      {}\n\
         in flight    {}\n\
         dead letter  {}\n\
         oldest       {}\n\
         settings     batch_size {}, visibility_timeout_s {}, max_receive_count {}, at most {} runs at once",
        text(&q["project"]),
        text(&q["queue"]),
        text(&s["consumer"]),
        text(&q["visible"]),
        text(&q["in_flight"]),
        text(&q["dead_letter"]),
        oldest,
        text(&s["batch_size"]),
        text(&s["visibility_timeout_s"]),
        text(&s["max_receive_count"]),
        text(&s["max_in_flight"]),
    )
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}
