//! `refinery timers PROJECT`: the live deployment's timers, their schedule, next fire time
//! and last fire (UTC).

use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use crate::client::Client;
use crate::commands::path_segment;
use crate::output::{print, table, text};

#[derive(Debug, Args)]
pub struct TimersArgs {
    /// The project whose timers to show.
    pub project: String,
    /// Also list each timer's most recent fires (slot, run, lateness), up to 100.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub fires: u32,
}

pub(crate) async fn timers(client: &Client, json: bool, args: TimersArgs) -> Result<ExitCode> {
    let reply = client
        .get(&format!(
            "/v1/projects/{}/timers?fires={}",
            path_segment(&args.project),
            args.fires
        ))
        .await?;
    print(json, &reply, || {
        let mut out = table(
            &reply["timers"],
            [
                "TIMER",
                "SCHEDULE",
                "NEXT FIRE (UTC)",
                "LAST FIRED (UTC)",
                "LAST RUN",
            ],
            |t| {
                [
                    text(&t["name"]),
                    text(&t["schedule"]),
                    text(&t["next_fire_at"]),
                    text(&t["last_fired_at"]),
                    text(&t["last_run_id"]),
                ]
            },
        );
        for t in reply["timers"].as_array().into_iter().flatten() {
            if let Some(error) = t["last_error"].as_str() {
                out.push_str(&format!("\n{}: {error}", text(&t["name"])));
            }
            if t["fires"].as_array().is_some_and(|f| !f.is_empty()) {
                out.push_str(&format!("\n\nFires of {}:\n", text(&t["name"])));
                out.push_str(&table(
                    &t["fires"],
                    ["SLOT", "RUN", "FIRED AT", "LATE"],
                    |f| {
                        [
                            text(&f["slot"]),
                            text(&f["run_id"]),
                            text(&f["fired_at"]),
                            format!("{} ms", text(&f["late_ms"])),
                        ]
                    },
                ));
            }
        }
        out
    })?;
    Ok(ExitCode::SUCCESS)
}
