//! What one invocation produced.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// How an execution ended. User code failing is an ordinary outcome, not a platform error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExecutionStatus {
    /// The handler returned; `output` holds its value.
    Ok,
    /// The handler raised or threw; `error` says what.
    Error,
    /// The block's code failed to load (syntax error, failed import, missing `main`).
    InitError,
    /// The handler ran past the block's `timeout_s`; the instance was killed.
    Timeout,
    /// The instance went over its `memory_mb` and was killed by the kernel.
    Oom,
    /// The instance died for another reason (exit, signal, protocol violation).
    Crashed,
}

impl ExecutionStatus {
    pub const ALL: [ExecutionStatus; 6] = [
        ExecutionStatus::Ok,
        ExecutionStatus::Error,
        ExecutionStatus::InitError,
        ExecutionStatus::Timeout,
        ExecutionStatus::Oom,
        ExecutionStatus::Crashed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionStatus::Ok => "ok",
            ExecutionStatus::Error => "error",
            ExecutionStatus::InitError => "init_error",
            ExecutionStatus::Timeout => "timeout",
            ExecutionStatus::Oom => "oom",
            ExecutionStatus::Crashed => "crashed",
        }
    }

    pub fn is_ok(self) -> bool {
        self == ExecutionStatus::Ok
    }
}

impl fmt::Display for ExecutionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExecutionStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ExecutionStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown execution status `{s}`"))
    }
}

/// An error raised by (or on behalf of) user code, as shown to the block's author.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserError {
    /// Exception class or error kind, e.g. `ValueError`, `TypeError`, `Timeout`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub traceback: Option<String>,
}

impl UserError {
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        UserError {
            kind: kind.into(),
            message: message.into(),
            traceback: None,
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary; returns whether it cut.
pub fn truncate_utf8(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncates_on_char_boundary() {
        let mut s = "héllo".to_string();
        assert!(truncate_utf8(&mut s, 2));
        assert_eq!(s, "h");
        let mut t = "abc".to_string();
        assert!(!truncate_utf8(&mut t, 3));
    }

    #[test]
    fn status_round_trips() {
        for s in ExecutionStatus::ALL {
            assert_eq!(s.as_str().parse::<ExecutionStatus>(), Ok(s));
        }
    }
}

/// One execution as recorded: what ran, where, how it ended. Payloads are stored as JSON
/// text cut at [`crate::limits::RECORDED_PAYLOAD_BYTES`] (the `*_truncated` flags say so).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionRecord {
    pub id: String,
    pub account_id: String,
    pub project: String,
    /// Deployment number within the project (1, 2, ...).
    pub deployment: i64,
    pub block: String,
    pub instance_id: String,
    pub cold: bool,
    /// Start time, milliseconds since the Unix epoch (UTC).
    pub started_at_ms: i64,
    pub duration_ms: f64,
    /// Time the instance spent loading the block's code; only on cold starts.
    pub init_ms: Option<f64>,
    pub status: ExecutionStatus,
    pub input: String,
    pub input_truncated: bool,
    pub output: Option<String>,
    pub output_truncated: bool,
    pub error: Option<UserError>,
    pub logs: String,
    pub logs_truncated: bool,
}
