//! Billing subcommands: `pricing set|show`, `usage`, `bills list|show|close`, and
//! `accounts set-billing|billing`. Each prints a summary, or the API's JSON with
//! `--json`; `bills ... --csv` prints the server's CSV export.

use std::fs;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use refinery_billing::PriceList;
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::Client;
use crate::commands::path_segment;
use crate::output::{out_raw, plural, print, quantity, table, text as s};

#[derive(Debug, Subcommand)]
pub enum PricingCommand {
    /// Put a price list in force (operator key): a TOML (or .json) file, see docs/BILLING.md.
    Set { file: PathBuf },
    /// Show the price list in force.
    Show,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The month, YYYY-MM (default: the current one, to date).
    #[arg(long, value_name = "YYYY-MM")]
    pub month: Option<String>,
    /// The account (name or id); the operator sees every account when left out.
    #[arg(long)]
    pub account: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum BillsCommand {
    /// List closed bills (the operator: every account's).
    List {
        #[arg(long, value_name = "YYYY-MM")]
        month: Option<String>,
        #[arg(long)]
        account: Option<String>,
        /// Print CSV (one row per bill) instead of a summary.
        #[arg(long)]
        csv: bool,
    },
    /// Show a month's bill (month to date if it is not closed).
    Show {
        #[arg(value_name = "YYYY-MM")]
        month: String,
        #[arg(long)]
        account: Option<String>,
        #[arg(long)]
        csv: bool,
    },
    /// Close a month that is over into immutable bills (operator key); the current month
    /// cannot be closed. Closing twice returns the same bills.
    Close {
        #[arg(value_name = "YYYY-MM")]
        month: String,
    },
}

/// `accounts set-billing`: the operator sets markup, minimum fee and cap; an account
/// its own cap.
#[derive(Debug, Args)]
pub struct SetBillingArgs {
    /// The account's name or id.
    pub account: String,
    /// Markup on the cost, in percent (e.g. 37.5).
    #[arg(long, value_name = "PERCENT")]
    pub markup_percent: Option<String>,
    /// Monthly minimum fee (total after markup), in the price list's currency.
    #[arg(long, value_name = "AMOUNT")]
    pub minimum_fee: Option<String>,
    /// Monthly spending cap (usage at cost plus markup); invocations are refused past it.
    #[arg(long, value_name = "AMOUNT")]
    pub spending_cap: Option<String>,
    /// Remove the spending cap.
    #[arg(long, conflicts_with = "spending_cap")]
    pub no_cap: bool,
    /// Return markup and minimum fee to the price list's defaults.
    #[arg(long, conflicts_with_all = ["markup_percent", "minimum_fee"])]
    pub defaults: bool,
}

pub async fn pricing(client: &Client, json: bool, command: PricingCommand) -> Result<ExitCode> {
    let reply = match command {
        PricingCommand::Set { file } => {
            let text = fs::read_to_string(&file)
                .with_context(|| format!("reading the price list {}", file.display()))?;
            let shown = file.display().to_string();
            let list = if file.extension().is_some_and(|e| e == "json") {
                let value: Value = serde_json::from_str(&text)
                    .with_context(|| format!("{shown} is not valid JSON"))?;
                PriceList::from_json(value).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?
            } else {
                PriceList::from_toml(&text, &shown).map_err(anyhow::Error::msg)?
            };
            client
                .send(
                    Method::PUT,
                    "/v1/pricing",
                    Some(&serde_json::to_value(&list)?),
                    &[],
                )
                .await?
        }
        PricingCommand::Show => client.get("/v1/pricing").await?,
    };
    print(json, &reply, || pricing_text(&reply))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn usage(client: &Client, json: bool, args: UsageArgs) -> Result<ExitCode> {
    let reply = client
        .get(&format!(
            "/v1/usage{}",
            query(&args.month, &args.account, false)
        ))
        .await?;
    print(json, &reply, || match reply["usage"].as_array() {
        Some(all) => all.iter().map(usage_text).collect::<Vec<_>>().join("\n\n"),
        None => usage_text(&reply),
    })?;
    Ok(ExitCode::SUCCESS)
}

pub async fn bills(client: &Client, json: bool, command: BillsCommand) -> Result<ExitCode> {
    match command {
        BillsCommand::List {
            month,
            account,
            csv,
        } => {
            let reply = client
                .get(&format!("/v1/bills{}", query(&month, &account, csv)))
                .await?;
            if csv {
                return print_csv(&reply);
            }
            print(json, &reply, || {
                table(
                    &reply["bills"],
                    ["MONTH", "ACCOUNT", "STATUS", "TOTAL"],
                    |b| {
                        [
                            s(&b["period"]),
                            s(&b["account"]),
                            s(&b["status"]),
                            format!("{} {}", s(&b["bill"]["total"]), s(&b["bill"]["currency"])),
                        ]
                    },
                )
            })?;
        }
        BillsCommand::Show {
            month,
            account,
            csv,
        } => {
            let reply = client
                .get(&format!(
                    "/v1/bills/{}{}",
                    path_segment(&month),
                    query(&None, &account, csv)
                ))
                .await?;
            if csv {
                return print_csv(&reply);
            }
            print(json, &reply, || match reply["bills"].as_array() {
                Some(all) => all.iter().map(bill_text).collect::<Vec<_>>().join("\n\n"),
                None => bill_text(&reply),
            })?;
        }
        BillsCommand::Close { month } => {
            let reply = client
                .post(
                    &format!("/v1/bills/{}/close", path_segment(&month)),
                    &json!({}),
                )
                .await?;
            print(json, &reply, || {
                let mut text = format!(
                    "{} closed at {}: {}.\n",
                    reply["period"].as_str().unwrap_or_default(),
                    reply["closed_at"].as_str().unwrap_or_default(),
                    plural(
                        &reply["bills"].as_array().map_or(0, Vec::len).into(),
                        "bill"
                    )
                );
                text.push_str(&table(&reply["bills"], ["ACCOUNT", "TOTAL"], |b| {
                    [
                        s(&b["account"]),
                        format!("{} {}", s(&b["bill"]["total"]), s(&b["bill"]["currency"])),
                    ]
                }));
                text
            })?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn set_billing(client: &Client, json: bool, args: SetBillingArgs) -> Result<ExitCode> {
    let mut body = serde_json::Map::new();
    if let Some(v) = args.markup_percent {
        body.insert("markup_percent".into(), Value::String(v));
    }
    if let Some(v) = args.minimum_fee {
        body.insert("minimum_fee".into(), Value::String(v));
    }
    if let Some(v) = args.spending_cap {
        body.insert("spending_cap".into(), Value::String(v));
    }
    if args.no_cap {
        body.insert("spending_cap".into(), Value::Null);
    }
    if args.defaults {
        body.insert("markup_percent".into(), Value::Null);
        body.insert("minimum_fee".into(), Value::Null);
    }
    if body.is_empty() {
        bail!("nothing to change: give --markup-percent, --minimum-fee, --spending-cap, --no-cap or --defaults");
    }
    let reply = client
        .send(
            Method::PUT,
            &format!("/v1/accounts/{}/billing", path_segment(&args.account)),
            Some(&Value::Object(body)),
            &[],
        )
        .await?;
    print(json, &reply, || billing_text(&reply))?;
    Ok(ExitCode::SUCCESS)
}

pub async fn show_billing(client: &Client, json: bool, account: &str) -> Result<ExitCode> {
    let reply = client
        .get(&format!("/v1/accounts/{}/billing", path_segment(account)))
        .await?;
    print(json, &reply, || billing_text(&reply))?;
    Ok(ExitCode::SUCCESS)
}

/// `?month=&account=&format=csv`, only the parts given.
fn query(month: &Option<String>, account: &Option<String>, csv: bool) -> String {
    let mut parts = Vec::new();
    if let Some(m) = month {
        parts.push(format!("month={}", path_segment(m)));
    }
    if let Some(a) = account {
        parts.push(format!("account={}", path_segment(a)));
    }
    if csv {
        parts.push("format=csv".to_string());
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn print_csv(reply: &Value) -> Result<ExitCode> {
    match reply.as_str() {
        Some(text) => {
            out_raw(text)?;
            Ok(ExitCode::SUCCESS)
        }
        None => bail!("the server did not return CSV: {reply}"),
    }
}

fn pricing_text(reply: &Value) -> String {
    let p = &reply["price_list"];
    let free = &p["free_tier"];
    format!(
        "Price list ({}), currency {}\n  compute   {} per GB-second  (granularity {} ms, init {})\n  requests  {} per million\n  egress    {} per GB\n  storage   {} per GB-month\n  free each month: {} GB-s, {} requests, {} GB egress, {} GB-months\n  defaults: markup {}%, minimum fee {}",
        if reply["default"] == true { "built-in default".to_string() } else { format!("set {}", s(&reply["set_at"])) },
        s(&p["currency"]),
        s(&p["per_gb_second"]),
        s(&p["granularity_ms"]),
        if p["bill_init"] == true { "billed" } else { "not billed" },
        s(&p["per_million_requests"]),
        s(&p["per_gb_egress"]),
        s(&p["per_gb_month_storage"]),
        s(&free["gb_seconds"]),
        s(&free["requests"]),
        s(&free["egress_gb"]),
        s(&free["storage_gb_months"]),
        s(&p["default_markup_percent"]),
        s(&p["default_minimum_fee"]),
    )
}

fn usage_text(u: &Value) -> String {
    let t = &u["totals"];
    let c = &u["cost"];
    let mut text = format!(
        "{} ({})  {}  {} as of {}\n  requests  {}\n  compute   {} GB-s (init {} GB-s)\n  egress    {} bytes\n  storage   {} GB-months\n",
        s(&u["account"]),
        s(&u["account_id"]),
        s(&u["period"]),
        s(&u["status"]),
        s(&u["as_of"]),
        s(&t["requests"]),
        quantity(&t["gb_seconds"]),
        quantity(&t["init_gb_seconds"]),
        s(&t["egress_bytes"]),
        quantity(&t["storage_gb_months"]),
    );
    for b in u["blocks"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "    {}/{}  {}  {} GB-s  {} bytes\n",
            s(&b["project"]),
            s(&b["block"]),
            plural(&b["requests"], "request"),
            quantity(&b["gb_seconds"]),
            s(&b["egress_bytes"]),
        ));
    }
    text.push_str(&format!(
        "  cost {} + markup {}% {} = {} {}",
        s(&c["subtotal"]),
        s(&c["markup_percent"]),
        s(&c["markup"]),
        s(&c["spent"]),
        s(&u["currency"]),
    ));
    text
}

fn bill_text(b: &Value) -> String {
    let bill = &b["bill"];
    let mut text = format!(
        "Bill {} ({}) for {}: {}{}\n",
        s(&b["account"]),
        s(&b["account_id"]),
        s(&b["period"]),
        s(&b["status"]),
        if b["status"] == "closed" {
            format!(" at {}", s(&b["closed_at"]))
        } else {
            format!(", to date ({})", s(&b["as_of"]))
        },
    );
    for l in bill["lines"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            "  {:<9} {} {} (free {}) × {} = {}\n",
            s(&l["item"]),
            quantity(&l["quantity"]),
            s(&l["unit"]),
            quantity(&l["free"]),
            s(&l["unit_price"]),
            s(&l["amount"]),
        ));
    }
    text.push_str(&format!(
        "  subtotal  {}\n  markup    {}% = {}\n  minimum   {} (adjustment {})\n  total     {} {}",
        s(&bill["subtotal"]),
        s(&bill["markup_percent"]),
        s(&bill["markup"]),
        s(&bill["minimum_fee"]),
        s(&bill["minimum_fee_adjustment"]),
        s(&bill["total"]),
        s(&bill["currency"]),
    ));
    text
}

fn billing_text(r: &Value) -> String {
    let spending = &r["spending"];
    format!(
        "{} ({})\n  markup       {}%\n  minimum fee  {} {}\n  spending cap {}{}",
        s(&r["account"]),
        s(&r["account_id"]),
        s(&r["markup_percent"]),
        s(&r["minimum_fee"]),
        s(&r["currency"]),
        if r["spending_cap"].is_null() {
            "none".to_string()
        } else {
            format!("{} {}", s(&r["spending_cap"]), s(&r["currency"]))
        },
        if spending.is_null() {
            String::new()
        } else {
            format!(
                "\n  spent in {}: {} {}{}",
                s(&spending["period"]),
                s(&spending["spent"]),
                s(&r["currency"]),
                if spending["reached"] == true {
                    " (cap reached: invocations refused)"
                } else {
                    ""
                }
            )
        },
    )
}
