//! How the client prints: the API's JSON or a human summary, tables with a header row,
//! plurals, rounded quantities, block errors — and a closed stdout (`refinery ... | head`)
//! ends the output quietly instead of panicking.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use comfy_table::{presets, ContentArrangement, Table};
use refinery_billing::Decimal;
use serde_json::Value;

/// Set once stdout's reader has gone away: nothing more is written there, and the command
/// ends with its own exit status (a closed pipe is not an error of the command).
static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);

/// Writes `text` and a newline to stdout.
pub(crate) fn out(text: &str) -> Result<()> {
    write_to(&mut io::stdout().lock(), text, "\n")
}

/// Writes `text` as it is (no newline added) to stdout.
pub(crate) fn out_raw(text: &str) -> Result<()> {
    write_to(&mut io::stdout().lock(), text, "")
}

fn write_to(stdout: &mut impl Write, text: &str, end: &str) -> Result<()> {
    if STDOUT_CLOSED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let written = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.write_all(end.as_bytes()))
        .and_then(|()| stdout.flush());
    match written {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
            Ok(())
        }
        other => other.context("writing to stdout"),
    }
}

/// Writes to stderr; a closed stderr is ignored (there is nowhere left to tell).
pub(crate) fn err_out(text: &str) {
    let mut stderr = io::stderr().lock();
    let _ = stderr
        .write_all(text.as_bytes())
        .and_then(|()| stderr.flush());
}

/// The API's JSON (`--json`, pretty) or the human summary.
pub(crate) fn print(json: bool, reply: &Value, human: impl FnOnce() -> String) -> Result<()> {
    if json {
        out(&pretty(reply))
    } else {
        out(human().trim_end())
    }
}

pub(crate) fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

/// A list as a table: a header row, then one row per item; `(none)` for an empty list.
pub(crate) fn table<const N: usize>(
    list: &Value,
    headers: [&str; N],
    row: impl Fn(&Value) -> [String; N],
) -> String {
    let items = match list.as_array() {
        Some(items) if !items.is_empty() => items,
        _ => return "(none)".to_string(),
    };
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers);
    for item in items {
        table.add_row(row(item));
    }
    // comfy-table pads every cell on both sides: drop the margin and trailing blanks.
    table
        .lines()
        .map(|line| {
            line.strip_prefix(' ')
                .unwrap_or(&line)
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `1 invocation`, `2 invocations` (`word` is the singular; `-s` for the plural).
pub(crate) fn plural(count: &Value, word: &str) -> String {
    let n = count
        .as_i64()
        .map(|n| n.to_string())
        .unwrap_or_else(|| text(count));
    if n == "1" {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// A JSON value as display text: strings bare, `null` as `-`.
pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Decimal places a metered quantity (GB-seconds, GB-months) is shown with. Only the
/// display is rounded: bills are computed from the exact values (docs/BILLING.md).
const QUANTITY_PLACES: u32 = 6;

/// A quantity (a decimal string or number) rounded for display to at most 6 decimal
/// places, trailing zeros dropped; a value that is not a number is shown as it is.
pub(crate) fn quantity(v: &Value) -> String {
    let raw = text(v);
    match raw.parse::<Decimal>() {
        Ok(d) => d.round_dp(QUANTITY_PLACES).normalize().to_string(),
        Err(_) => raw,
    }
}

/// A block's error (`{type, message, traceback}`) as `invoke` and `logs` print it:
/// `Type: message`, then the traceback as it was written.
pub(crate) fn user_error_text(error: &Value) -> String {
    let mut text = format!(
        "{}: {}",
        error["type"].as_str().unwrap_or("Error"),
        error["message"].as_str().unwrap_or_default()
    );
    if let Some(traceback) = error["traceback"].as_str().filter(|t| !t.is_empty()) {
        text.push('\n');
        text.push_str(traceback.trim_end());
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn plurals() {
        assert_eq!(plural(&json!(1), "invocation"), "1 invocation");
        assert_eq!(plural(&json!(0), "invocation"), "0 invocations");
        assert_eq!(plural(&json!(2), "bill"), "2 bills");
    }

    #[test]
    fn quantities_are_rounded_for_display_only() {
        assert_eq!(quantity(&json!("0.0000000372529029846191406250")), "0");
        assert_eq!(
            quantity(&json!("0.0001220703125000000000000000")),
            "0.000122"
        );
        assert_eq!(quantity(&json!("1.2345678")), "1.234568");
        assert_eq!(quantity(&json!("2.50")), "2.5");
        assert_eq!(quantity(&json!(3)), "3");
        assert_eq!(quantity(&json!(null)), "-");
    }

    #[test]
    fn tables_have_a_header_row() {
        let list = json!([{ "a": "x", "b": 1 }, { "a": "longer", "b": 22 }]);
        let shown = table(&list, ["A", "B"], |v| [text(&v["a"]), text(&v["b"])]);
        let rows: Vec<&str> = shown.lines().collect();
        assert_eq!(rows.len(), 3, "{shown}");
        assert!(rows[0].starts_with('A') && rows[0].contains('B'), "{shown}");
        assert!(rows[2].starts_with("longer"), "{shown}");
        assert_eq!(table(&json!([]), ["A"], |_| [String::new()]), "(none)");
    }

    #[test]
    fn block_errors_print_readably() {
        let error = json!({ "type": "KeyError", "message": "'name'", "traceback": "Traceback...\n  line 3\n" });
        assert_eq!(
            user_error_text(&error),
            "KeyError: 'name'\nTraceback...\n  line 3"
        );
    }
}
