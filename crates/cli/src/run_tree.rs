//! A service run as text, as `refinery runs show` and `refinery run --wait` print it: a
//! header line, the step tree (one line per step, indented under its first parent; a
//! fan-out's items capped at [`ITEMS_SHOWN`] per parent unless `--all`), then the run's
//! status, error and totals. Payloads are not shown (`--json` has them), except a failed
//! step's error message on the line after it.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::output::{plural, text};

/// Items of one fan-out shown under their parent before a `… N more items` line.
pub(crate) const ITEMS_SHOWN: usize = 20;

/// Tree levels drawn as indentation. Deeper steps (a long loop through an `if`) keep the
/// last indentation and say their depth, so that lines stay readable.
const DEPTH_DRAWN: usize = 12;

/// Lines of a failed step's error message shown under it (the rest is in `--json`).
const ERROR_LINES: usize = 5;

/// The tree column is padded to the widest step up to this many characters; wider lines
/// (deep steps) are not padded, so one deep step does not push every other line right.
const TREE_COLUMN_MAX: usize = 64;

/// The whole run: header, tree, status, error and totals. `now` dates a running run.
pub(crate) fn render(run: &Value, all: bool, now: DateTime<Utc>) -> String {
    let mut shown = header(run);
    shown.push_str("\n\n");
    shown.push_str(&tree(run, all));
    shown.push_str("\n\n");
    shown.push_str(&summary(run, now));
    shown
}

/// `run_... project deployment N started ...`.
fn header(run: &Value) -> String {
    format!(
        "{}  project {}  deployment {}  started {}",
        text(&run["run_id"]),
        text(&run["project"]),
        text(&run["deployment"]),
        text(&run["started_at"]),
    )
}

/// The run's steps as an indented tree with a header row; `(no steps)` when there are none.
pub(crate) fn tree(run: &Value, all: bool) -> String {
    let steps: Vec<&Value> = run["steps"]
        .as_array()
        .map(|s| s.iter().collect())
        .unwrap_or_default();
    if steps.is_empty() {
        return "(no steps)".to_string();
    }
    let tree = Tree::new(&steps);
    let rows = tree.rows(all);
    layout(&rows)
}

/// One printed line of the tree (and the error lines under it).
enum Row {
    Step {
        tree: String,
        status: String,
        time: String,
        transition: String,
        execution: String,
        details: Vec<String>,
    },
    /// `… N more items` and anything else printed as it is.
    Note(String),
}

/// What is printed under a parent, in order.
enum Entry {
    Step(usize),
    /// Items of one fan-out left out (without `--all`).
    More(Vec<usize>),
}

struct Tree<'a> {
    steps: &'a [&'a Value],
    children: Vec<Vec<usize>>,
    /// Steps with no parent in the run (the start, or a parent id that is not there).
    roots: Vec<usize>,
}

impl<'a> Tree<'a> {
    fn new(steps: &'a [&'a Value]) -> Tree<'a> {
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, step) in steps.iter().enumerate() {
            if let Some(id) = step["step_id"].as_str() {
                index.entry(id).or_insert(i);
            }
        }
        let mut children = vec![Vec::new(); steps.len()];
        let mut roots = Vec::new();
        for (i, step) in steps.iter().enumerate() {
            let parent = step["parents"][0]
                .as_str()
                .and_then(|p| index.get(p).copied())
                .filter(|&p| p != i);
            match parent {
                Some(p) => children[p].push(i),
                None => roots.push(i),
            }
        }
        Tree {
            steps,
            children,
            roots,
        }
    }

    fn is_item(&self, i: usize) -> bool {
        self.steps[i]["transition"] == "fan-out"
    }

    /// The entries under a parent: its children in creation order, except that the items
    /// of one fan-out (same block) come together, in item order, at most [`ITEMS_SHOWN`]
    /// of them unless `all`, the rest as one [`Entry::More`].
    fn entries(&self, kids: &[usize], all: bool) -> Vec<Entry> {
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::new();
        for &k in kids.iter().filter(|&&k| self.is_item(k)) {
            groups.entry(self.name(k)).or_default().push(k);
        }
        let mut placed = HashSet::new();
        let mut entries = Vec::new();
        for &k in kids {
            if !self.is_item(k) {
                entries.push(Entry::Step(k));
                continue;
            }
            let name = self.name(k);
            if !placed.insert(name) {
                continue;
            }
            let mut members = groups.remove(name).unwrap_or_default();
            members.sort_by_key(|&m| (self.steps[m]["item"].as_u64().unwrap_or(u64::MAX), m));
            let hidden = if all || members.len() <= ITEMS_SHOWN {
                Vec::new()
            } else {
                members.split_off(ITEMS_SHOWN)
            };
            entries.extend(members.into_iter().map(Entry::Step));
            if !hidden.is_empty() {
                entries.push(Entry::More(hidden));
            }
        }
        entries
    }

    fn name(&self, i: usize) -> &str {
        self.steps[i]["name"].as_str().unwrap_or("?")
    }

    /// Every line, depth first (iteratively: a long loop is a deep tree). Steps a broken
    /// reply leaves unreachable (a cycle of parents) are printed as roots at the end.
    fn rows(&self, all: bool) -> Vec<Row> {
        struct Frame {
            entry: Entry,
            /// The prefix of this entry's line, before its connector.
            prefix: String,
            last: bool,
            depth: usize,
        }
        let mut rows = Vec::new();
        let mut visited = vec![false; self.steps.len()];
        let mut pending_roots: Vec<usize> = self.roots.clone();
        let mut next_unvisited = 0;
        loop {
            let root = match pending_roots.first() {
                Some(&r) => {
                    pending_roots.remove(0);
                    r
                }
                None => {
                    while next_unvisited < visited.len() && visited[next_unvisited] {
                        next_unvisited += 1;
                    }
                    if next_unvisited == visited.len() {
                        break;
                    }
                    next_unvisited
                }
            };
            if visited[root] {
                continue;
            }
            let mut stack = vec![Frame {
                entry: Entry::Step(root),
                prefix: String::new(),
                last: true,
                depth: 0,
            }];
            while let Some(frame) = stack.pop() {
                let connector = match (frame.depth, frame.last) {
                    (0, _) => "",
                    (_, true) => "└─ ",
                    (_, false) => "├─ ",
                };
                let step = match frame.entry {
                    Entry::More(hidden) => {
                        // Left out with their subtrees: not orphans to print at the end.
                        let mut left_out = hidden.clone();
                        while let Some(s) = left_out.pop() {
                            visited[s] = true;
                            left_out.extend(&self.children[s]);
                        }
                        rows.push(Row::Note(format!(
                            "{}{connector}{}",
                            frame.prefix,
                            self.more_text(&hidden)
                        )));
                        continue;
                    }
                    Entry::Step(step) => step,
                };
                if visited[step] {
                    continue;
                }
                visited[step] = true;
                let child_prefix = if frame.depth == 0 {
                    String::new()
                } else if frame.depth >= DEPTH_DRAWN {
                    frame.prefix.clone()
                } else {
                    format!("{}{}", frame.prefix, if frame.last { "   " } else { "│  " })
                };
                let entries = self.entries(&self.children[step], all);
                let below = if entries.is_empty() { "   " } else { "│  " };
                let label = self.label(step, frame.depth);
                rows.push(self.step_row(
                    step,
                    format!("{}{connector}{label}", frame.prefix),
                    &format!("{child_prefix}{below}"),
                ));
                let count = entries.len();
                for (n, entry) in entries.into_iter().enumerate().rev() {
                    stack.push(Frame {
                        entry,
                        prefix: child_prefix.clone(),
                        last: n + 1 == count,
                        depth: frame.depth + 1,
                    });
                }
            }
        }
        rows
    }

    /// `name [item 3] (attempt 2) (joins 100 steps)`.
    fn label(&self, i: usize, depth: usize) -> String {
        let step = self.steps[i];
        let mut label = String::new();
        if depth > DEPTH_DRAWN {
            label.push_str(&format!("[depth {depth}] "));
        }
        label.push_str(self.name(i));
        if let Some(item) = step["item"].as_u64() {
            label.push_str(&format!(" [item {item}]"));
        }
        if let Some(attempt) = step["attempt"].as_u64().filter(|&a| a > 1) {
            label.push_str(&format!(" (attempt {attempt})"));
        }
        let parents = step["parents"].as_array().map_or(0, Vec::len);
        if parents > 1 {
            label.push_str(&format!(" (joins {parents} steps)"));
        }
        label
    }

    fn step_row(&self, i: usize, tree: String, detail_prefix: &str) -> Row {
        let step = self.steps[i];
        let mut details = Vec::new();
        if step["status"] == "failed" && step["error"].is_object() {
            let error = error_text(&step["error"]);
            let lines: Vec<&str> = error.lines().collect();
            for line in lines.iter().take(ERROR_LINES) {
                details.push(format!("{detail_prefix}{line}").trim_end().to_string());
            }
            if lines.len() > ERROR_LINES {
                details.push(format!(
                    "{detail_prefix}… {} more lines (--json has the whole error)",
                    lines.len() - ERROR_LINES
                ));
            }
        }
        Row::Step {
            tree,
            status: text(&step["status"]),
            time: step["duration_ms"]
                .as_f64()
                .map_or_else(|| "-".to_string(), duration),
            transition: text(&step["transition"]),
            execution: text(&step["execution_id"]),
            details,
        }
    }

    /// `… 80 more items: 78 succeeded, 2 failed; 80 steps under them (--all shows them)`.
    fn more_text(&self, hidden: &[usize]) -> String {
        let statuses = status_counts(hidden.iter().map(|&h| self.steps[h]));
        let mut under = 0;
        let mut stack: Vec<usize> = hidden.to_vec();
        while let Some(s) = stack.pop() {
            under += self.children[s].len();
            stack.extend(&self.children[s]);
        }
        let mut text = format!(
            "… {} more {}: {statuses}",
            hidden.len(),
            if hidden.len() == 1 { "item" } else { "items" }
        );
        if under > 0 {
            text.push_str(&format!("; {} under them", plural(&under.into(), "step")));
        }
        text.push_str(" (--all shows them)");
        text
    }
}

/// The rows as aligned columns under a header row.
fn layout(rows: &[Row]) -> String {
    let width = |s: &str| s.chars().count();
    let mut widths = [
        width("STEP"),
        width("STATUS"),
        width("TIME"),
        width("TRANSITION"),
    ];
    for row in rows {
        if let Row::Step {
            tree,
            status,
            time,
            transition,
            ..
        } = row
        {
            let tree_width = width(tree);
            if tree_width <= TREE_COLUMN_MAX {
                widths[0] = widths[0].max(tree_width);
            }
            widths[1] = widths[1].max(width(status));
            widths[2] = widths[2].max(width(time));
            widths[3] = widths[3].max(width(transition));
        }
    }
    let pad = |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(width(s))));
    let line = |cells: [&str; 5], right_time: bool| {
        let time = if right_time {
            format!(
                "{}{}",
                " ".repeat(widths[2].saturating_sub(width(cells[2]))),
                cells[2]
            )
        } else {
            pad(cells[2], widths[2])
        };
        format!(
            "{}  {}  {}  {}  {}",
            pad(cells[0], widths[0]),
            pad(cells[1], widths[1]),
            time,
            pad(cells[3], widths[3]),
            cells[4]
        )
        .trim_end()
        .to_string()
    };
    let mut lines = vec![line(
        ["STEP", "STATUS", "TIME", "TRANSITION", "EXECUTION"],
        false,
    )];
    for row in rows {
        match row {
            Row::Step {
                tree,
                status,
                time,
                transition,
                execution,
                details,
            } => {
                lines.push(line([tree, status, time, transition, execution], true));
                lines.extend(details.iter().cloned());
            }
            Row::Note(note) => lines.push(note.clone()),
        }
    }
    lines.join("\n")
}

/// The run's status with its duration, its error, and totals of its steps.
pub(crate) fn summary(run: &Value, now: DateTime<Utc>) -> String {
    let status = text(&run["status"]);
    let mut lines = Vec::new();
    let mut status_line = format!("Status: {status}");
    match (run_duration_ms(run, now), run["status"].as_str()) {
        (Some(ms), Some("running")) => status_line.push_str(&format!(" for {}", duration(ms))),
        (Some(ms), _) => status_line.push_str(&format!(
            " after {} (ended {})",
            duration(ms),
            text(&run["ended_at"])
        )),
        (None, _) => {}
    }
    lines.push(status_line);
    if run["error"].is_object() {
        let error = error_text(&run["error"]);
        let mut error_lines = error.lines();
        lines.push(format!(
            "Error:  {}",
            error_lines.next().unwrap_or_default()
        ));
        lines.extend(error_lines.map(|l| format!("        {l}")));
    }
    let steps: Vec<&Value> = run["steps"]
        .as_array()
        .map(|s| s.iter().collect())
        .unwrap_or_default();
    let mut totals = format!("Steps:  {}", steps.len());
    if !steps.is_empty() {
        totals.push_str(&format!(" ({})", status_counts(steps.iter().copied())));
    }
    let retries = steps
        .iter()
        .filter(|s| s["attempt"].as_u64().is_some_and(|a| a > 1))
        .count();
    if retries > 0 {
        let word = if retries == 1 { "retry" } else { "retries" };
        totals.push_str(&format!(", {retries} {word}"));
    }
    let block_ms: f64 = steps.iter().filter_map(|s| s["duration_ms"].as_f64()).sum();
    if steps.iter().any(|s| s["duration_ms"].is_number()) {
        totals.push_str(&format!(", {} of block time", duration(block_ms)));
    }
    lines.push(totals);
    lines.join("\n")
}

/// `2 succeeded, 1 failed`: counts by status, in a fixed order, statuses with none left out.
fn status_counts<'v>(steps: impl Iterator<Item = &'v Value>) -> String {
    const ORDER: [&str; 5] = ["succeeded", "failed", "cancelled", "running", "pending"];
    let mut counts: Vec<(String, usize)> = ORDER.iter().map(|s| (s.to_string(), 0)).collect();
    for step in steps {
        let status = text(&step["status"]);
        match counts.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => counts.push((status, 1)),
        }
    }
    counts
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `Type: message` of a step's or run's error (no traceback: `--json` has it).
fn error_text(error: &Value) -> String {
    format!(
        "{}: {}",
        error["type"].as_str().unwrap_or("Error"),
        error["message"].as_str().unwrap_or_default()
    )
}

/// A run's duration: `ended_at − started_at`, or `now − started_at` while it runs; `None`
/// when a time is missing or is not RFC 3339.
pub(crate) fn run_duration_ms(run: &Value, now: DateTime<Utc>) -> Option<f64> {
    let time = |v: &Value| {
        v.as_str()
            .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
            .map(|t| t.with_timezone(&Utc))
    };
    let started = time(&run["started_at"])?;
    let ended = match &run["ended_at"] {
        Value::Null => now,
        v => time(v)?,
    };
    Some((ended - started).num_microseconds()? as f64 / 1000.0)
}

/// A duration for people: `0.42 ms`, `12.3 ms`, `1.52 s`, `2m 05s`, `1h 02m`.
pub(crate) fn duration(ms: f64) -> String {
    let ms = ms.max(0.0);
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.1} ms")
    } else if ms < 60_000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        let s = (ms / 1000.0) as u64;
        if s < 3600 {
            format!("{}m {:02}s", s / 60, s % 60)
        } else {
            format!("{}h {:02}m", s / 3600, (s % 3600) / 60)
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use serde_json::{json, Value};

    use super::*;

    /// A succeeded step of `duration_ms` 2.5 (fields as `GET /v1/runs/{id}` gives them).
    fn step(id: &str, name: &str, parents: &[&str], transition: &str) -> Value {
        json!({
            "step_id": id, "name": name, "status": "succeeded",
            "input": null, "output": null, "error": null, "backpack": null,
            "attempt": 1, "execution_id": format!("ex_{id}"),
            "parents": parents, "transition": transition, "item": null,
            "started_at": "2026-12-03T20:00:00.000Z", "duration_ms": 2.5,
        })
    }

    fn failed(mut step: Value, kind: &str, message: &str) -> Value {
        step["status"] = json!("failed");
        step["error"] =
            json!({ "type": kind, "message": message, "traceback": "Traceback ...\n  line 1" });
        step
    }

    fn run(status: &str, steps: Vec<Value>) -> Value {
        json!({
            "run_id": "run_1", "project": "orders", "deployment": 3, "status": status,
            "started_at": "2026-12-03T20:00:00.000Z",
            "ended_at": if status == "running" { Value::Null } else { json!("2026-12-03T20:00:01.500Z") },
            "error": null, "steps": steps,
        })
    }

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 3, 20, 0, 12)
            .single()
            .expect("a time")
    }

    /// A fan-out of `n` items of `work` from `split`, then `collect` (fan-in) → `notify`.
    fn fan_out_fan_in(n: usize) -> Value {
        let mut steps = vec![step("s0", "split", &[], "start")];
        let items: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
        for (i, id) in items.iter().enumerate() {
            let mut item = step(id, "work", &["s0"], "fan-out");
            item["item"] = json!(i);
            steps.push(item);
        }
        let parents: Vec<&str> = items.iter().map(String::as_str).collect();
        steps.push(step("c", "collect", &parents, "fan-in"));
        steps.push(step("n", "notify", &["c"], "then"));
        run("succeeded", steps)
    }

    #[test]
    fn a_chain_is_indented_step_by_step() {
        let run = run(
            "succeeded",
            vec![
                step("s1", "validate", &[], "start"),
                step("s2", "charge", &["s1"], "then"),
                step("s3", "notify", &["s2"], "if"),
            ],
        );
        assert_eq!(
            tree(&run, false),
            "\
STEP          STATUS     TIME     TRANSITION  EXECUTION
validate      succeeded  2.50 ms  start       ex_s1
└─ charge     succeeded  2.50 ms  then        ex_s2
   └─ notify  succeeded  2.50 ms  if          ex_s3"
        );
        let shown = render(&run, false, now());
        assert!(
            shown.starts_with(
                "run_1  project orders  deployment 3  started 2026-12-03T20:00:00.000Z\n\nSTEP"
            ),
            "{shown}"
        );
        assert!(
            shown.ends_with(
                "Status: succeeded after 1.50 s (ended 2026-12-03T20:00:01.500Z)\nSteps:  3 (3 succeeded), 7.50 ms of block time"
            ),
            "{shown}"
        );
    }

    #[test]
    fn a_long_fan_out_shows_its_first_items_and_the_fan_in_once() {
        let run = fan_out_fan_in(100);
        let shown = tree(&run, false);
        let lines: Vec<&str> = shown.lines().collect();
        let items: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.contains("work [item"))
            .collect();
        assert_eq!(items.len(), ITEMS_SHOWN, "{shown}");
        assert!(
            items[0].starts_with("├─ work [item 0]") && items[19].contains("[item 19]"),
            "{shown}"
        );
        assert!(
            lines.contains(&"└─ … 80 more items: 80 succeeded (--all shows them)"),
            "{shown}"
        );
        // The fan-in under its first parent (item 0), saying what it joins; its successor under it.
        assert_eq!(
            lines[2], "├─ work [item 0]                 succeeded  2.50 ms  fan-out     ex_w0",
            "{shown}"
        );
        assert!(
            lines[3].starts_with("│  └─ collect (joins 100 steps)  succeeded"),
            "{shown}"
        );
        assert!(lines[4].starts_with("│     └─ notify  "), "{shown}");
        assert_eq!(lines.iter().filter(|l| l.contains("collect")).count(), 1);
        // Header, split, 20 items, collect, notify, the "more" line.
        assert_eq!(lines.len(), 1 + 1 + 20 + 2 + 1, "{shown}");

        let all = tree(&run, true);
        assert_eq!(
            all.lines().filter(|l| l.contains("work [item")).count(),
            100,
            "{all}"
        );
        assert!(!all.contains("more items"), "{all}");
        assert!(
            all.lines()
                .last()
                .is_some_and(|l| l.starts_with("└─ work [item 99]")),
            "{all}"
        );

        // 20 or fewer: no "more" line.
        let few = tree(&fan_out_fan_in(ITEMS_SHOWN), false);
        assert!(!few.contains("more items"), "{few}");
        assert_eq!(
            few.lines().filter(|l| l.contains("work [item")).count(),
            ITEMS_SHOWN
        );
    }

    #[test]
    fn items_come_in_item_order_and_hidden_ones_are_summed_up() {
        // Items created out of order, one hidden item failed and was retried.
        let mut steps = vec![step("s0", "split", &[], "start")];
        for i in (0..25).rev() {
            let mut item = step(&format!("w{i}"), "work", &["s0"], "fan-out");
            item["item"] = json!(i);
            if i == 22 {
                item = failed(item, "ValueError", "bad item");
            }
            steps.push(item);
        }
        let mut retry = step("r22", "work", &["w22"], "retry");
        retry["item"] = json!(22);
        retry["attempt"] = json!(2);
        steps.push(retry);
        let shown = tree(&run("succeeded", steps), false);
        let items: Vec<&str> = shown.lines().filter(|l| l.contains("[item")).collect();
        assert!(
            items[0].contains("[item 0]") && items[19].contains("[item 19]"),
            "{shown}"
        );
        assert!(
            shown.ends_with(
                "└─ … 5 more items: 4 succeeded, 1 failed; 1 step under them (--all shows them)"
            ),
            "{shown}"
        );
        let all = tree(&run("succeeded", vec![]), true);
        assert_eq!(all, "(no steps)");
    }

    #[test]
    fn a_merge_is_under_its_first_parent_and_names_the_others() {
        let run = run(
            "succeeded",
            vec![
                step("a", "fetch", &[], "start"),
                step("b", "price", &["a"], "then"),
                step("c", "stock", &["a"], "then"),
                step("d", "combine", &["b", "c"], "merge"),
            ],
        );
        assert_eq!(
            tree(&run, false),
            "\
STEP                           STATUS     TIME     TRANSITION  EXECUTION
fetch                          succeeded  2.50 ms  start       ex_a
├─ price                       succeeded  2.50 ms  then        ex_b
│  └─ combine (joins 2 steps)  succeeded  2.50 ms  merge       ex_d
└─ stock                       succeeded  2.50 ms  then        ex_c"
        );
    }

    #[test]
    fn a_retry_shows_its_attempt_under_the_failed_one_with_its_error() {
        let mut second = step("v2", "validate", &["v1"], "retry");
        second["attempt"] = json!(2);
        second["duration_ms"] = json!(1500.0);
        let run = run(
            "succeeded",
            vec![
                failed(
                    step("v1", "validate", &[], "start"),
                    "TimeoutError",
                    "took too long",
                ),
                second,
                step("c", "charge", &["v2"], "then"),
            ],
        );
        let shown = tree(&run, false);
        assert_eq!(
            shown,
            "\
STEP                     STATUS     TIME     TRANSITION  EXECUTION
validate                 failed     2.50 ms  start       ex_v1
│  TimeoutError: took too long
└─ validate (attempt 2)  succeeded   1.50 s  retry       ex_v2
   └─ charge             succeeded  2.50 ms  then        ex_c"
        );
        assert!(
            !shown.contains("Traceback"),
            "payloads and tracebacks stay in --json"
        );
        assert!(
            summary(&run, now())
                .ends_with("Steps:  3 (2 succeeded, 1 failed), 1 retry, 1.50 s of block time"),
            "{}",
            summary(&run, now())
        );
    }

    #[test]
    fn a_failed_step_and_run_print_their_errors() {
        let long = (1..=8)
            .map(|n| format!("line {n}"))
            .collect::<Vec<_>>()
            .join("\n");
        let mut run = run(
            "failed",
            vec![
                step("a", "validate", &[], "start"),
                failed(
                    step("b", "charge", &["a"], "then"),
                    "CardError",
                    "card declined",
                ),
                failed(step("c", "log", &["a"], "then"), "Error", &long),
            ],
        );
        let mut cancelled = step("d", "notify", &["a"], "then");
        cancelled["status"] = json!("cancelled");
        cancelled["duration_ms"] = Value::Null;
        cancelled["execution_id"] = Value::Null;
        run["steps"].as_array_mut().expect("steps").push(cancelled);
        run["error"] = json!({ "type": "StepFailed", "message": "step charge (b) failed" });
        let shown = tree(&run, false);
        let lines: Vec<&str> = shown.lines().collect();
        assert!(
            lines[2].starts_with("├─ charge  ") && lines[2].contains("failed"),
            "{shown}"
        );
        assert_eq!(lines[3], "│     CardError: card declined", "{shown}");
        assert_eq!(lines[5], "│     Error: line 1", "{shown}");
        assert_eq!(lines[9], "│     line 5", "{shown}");
        assert_eq!(
            lines[10], "│     … 3 more lines (--json has the whole error)",
            "{shown}"
        );
        assert_eq!(
            lines[11], "└─ notify  cancelled        -  then        -",
            "no time, no execution: {shown}"
        );
        let summary = summary(&run, now());
        assert_eq!(
            summary,
            "Status: failed after 1.50 s (ended 2026-12-03T20:00:01.500Z)\nError:  StepFailed: step charge (b) failed\nSteps:  4 (1 succeeded, 2 failed, 1 cancelled), 7.50 ms of block time"
        );
    }

    #[test]
    fn a_running_run_says_for_how_long() {
        let mut pending = step("b", "charge", &["a"], "then");
        pending["status"] = json!("running");
        pending["duration_ms"] = Value::Null;
        let run = run(
            "running",
            vec![step("a", "validate", &[], "start"), pending],
        );
        assert_eq!(
            summary(&run, now()),
            "Status: running for 12.00 s\nSteps:  2 (1 succeeded, 1 running), 2.50 ms of block time"
        );
        assert_eq!(run_duration_ms(&run, now()), Some(12_000.0));
        assert_eq!(
            run_duration_ms(&json!({ "started_at": "yesterday" }), now()),
            None
        );
    }

    #[test]
    fn a_deep_loop_stays_readable() {
        let mut steps = vec![step("s0", "loop", &[], "start")];
        for i in 1..200 {
            steps.push(step(
                &format!("s{i}"),
                "loop",
                &[&format!("s{}", i - 1)],
                "if",
            ));
        }
        let shown = tree(&run("failed", steps), false);
        let lines: Vec<&str> = shown.lines().collect();
        assert_eq!(lines.len(), 201, "every step once, plus the header");
        let widest = lines.iter().map(|l| l.chars().count()).max().unwrap_or(0);
        assert!(widest < 120, "{widest}: {}", lines[200]);
        assert!(
            lines[13].starts_with(&format!("{}└─ loop ", "   ".repeat(11))),
            "{shown}"
        );
        assert!(
            lines[14].starts_with(&format!("{}└─ [depth 13] loop ", "   ".repeat(11))),
            "{shown}"
        );
        assert!(lines[200].contains("[depth 199] loop"), "{}", lines[200]);
    }

    #[test]
    fn broken_parents_lose_no_step() {
        // A parent id that is not in the run, and a cycle of first parents.
        let run = run(
            "failed",
            vec![
                step("a", "orphan", &["gone"], "then"),
                step("b", "x", &["c"], "then"),
                step("c", "y", &["b"], "then"),
            ],
        );
        let shown = tree(&run, false);
        for name in ["orphan", "x", "y"] {
            assert_eq!(
                shown
                    .lines()
                    .filter(|l| l.contains(&format!("{name} ")))
                    .count(),
                1,
                "{shown}"
            );
        }
    }

    #[test]
    fn durations_for_people() {
        assert_eq!(duration(0.4213), "0.42 ms");
        assert_eq!(duration(12.34), "12.3 ms");
        assert_eq!(duration(1523.0), "1.52 s");
        assert_eq!(duration(125_000.0), "2m 05s");
        assert_eq!(duration(3_720_000.0), "1h 02m");
        assert_eq!(duration(-1.0), "0.00 ms");
    }
}
