//! Refinery's command-line client: every subcommand but `serve` talks to a running
//! server over its HTTP API (`REFINERY_URL`, `REFINERY_API_KEY`), prints a human
//! summary (lists as tables with a header row, a service run as its step tree) or, with
//! `--json`, the API's JSON. It holds no platform logic of its own beyond reading the
//! manifest and its source files (and a block's or run's `--input`) from disk or stdin.

mod billing;
mod client;
mod commands;
mod output;
mod queues;
mod run_tree;
mod runs;
mod timers;

pub use commands::{run, ClientArgs, ClientCommand};
