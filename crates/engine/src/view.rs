//! Runs as the API shows them (BRIEF §7b): `GET /v1/runs/{id}` and the project's list.

use refinery_store::{RunRecord, StepRecord};
use serde::Serialize;
use serde_json::Value;

/// A run with its steps, in creation order (parents before children).
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub run_id: String,
    pub project: String,
    pub deployment: i64,
    pub start: String,
    pub status: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub duration_ms: Option<i64>,
    /// Why it failed: `{"type","message"}`, and `steps` naming the failed steps.
    pub error: Option<Value>,
    /// For a run started by an HTTP endpoint: the output its response node replied with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<Value>,
    pub steps: Vec<StepView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepView {
    pub step_id: String,
    pub name: String,
    pub status: String,
    /// Payloads: `null` when the project's log level did not keep them.
    pub input: Option<Value>,
    pub output: Option<Value>,
    pub error: Option<Value>,
    pub backpack: Option<Value>,
    pub attempt: i64,
    pub execution_id: Option<String>,
    pub parents: Vec<String>,
    /// How it was reached: `start`, a transition type, or `retry`.
    pub transition: String,
    /// Its index in the fan-out that started it (and in its fan-in's input).
    pub item: Option<i64>,
    pub started_at: Option<String>,
    pub duration_ms: Option<f64>,
}

/// A run in a listing.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummaryView {
    pub run_id: String,
    pub project: String,
    pub deployment: i64,
    pub start: String,
    pub status: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub steps: i64,
    pub error: Option<Value>,
}

impl RunView {
    pub fn new(run: RunRecord, steps: Vec<StepRecord>) -> RunView {
        RunView {
            duration_ms: run.ended_at_ms.map(|e| e - run.started_at_ms),
            run_id: run.id,
            project: run.project,
            deployment: run.deployment,
            start: run.start,
            status: run.status,
            started_at: rfc3339(run.started_at_ms),
            ended_at: run.ended_at_ms.map(rfc3339),
            error: run.error.as_deref().map(parse),
            response: run.response.as_deref().map(parse),
            steps: steps.into_iter().map(StepView::new).collect(),
        }
    }
}

impl StepView {
    fn new(step: StepRecord) -> StepView {
        StepView {
            step_id: step.id,
            name: step.name,
            status: step.status,
            input: step.input.as_deref().map(parse),
            output: step.output.as_deref().map(parse),
            error: step.error.as_deref().map(parse),
            backpack: step
                .backpack
                .as_deref()
                .or(step.backpack_in.as_deref())
                .map(parse),
            attempt: step.attempt,
            execution_id: step.execution_id,
            parents: step.parents,
            transition: step.transition,
            item: step.item,
            started_at: step.started_at_ms.map(rfc3339),
            duration_ms: step.duration_ms,
        }
    }
}

impl RunSummaryView {
    pub fn new(run: RunRecord) -> RunSummaryView {
        RunSummaryView {
            run_id: run.id,
            project: run.project,
            deployment: run.deployment,
            start: run.start,
            status: run.status,
            started_at: rfc3339(run.started_at_ms),
            ended_at: run.ended_at_ms.map(rfc3339),
            steps: run.steps,
            error: run.error.as_deref().map(parse),
        }
    }
}

fn parse(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

pub(crate) fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}
