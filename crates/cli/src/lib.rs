//! Refinery's command-line client: every subcommand but `serve` talks to a running
//! server over its HTTP API (`REFINERY_URL`, `REFINERY_API_KEY`), prints a human
//! summary (lists as tables with a header row) or, with `--json`, the API's JSON. It holds
//! no platform logic of its own beyond reading the manifest and its source files (and a
//! block's `--input`) from disk or stdin.

mod billing;
mod client;
mod commands;
mod output;

pub use commands::{run, ClientArgs, ClientCommand};
