//! Why the engine refused a request. A step failing is not an error here: it is part of
//! the run (its status and error), as a block failing is part of an execution.

use refinery_invocation::InvocationError;
use refinery_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The account has no project of that name (or it has no live deployment).
    #[error("no project `{project}` in this account: deploy it first with `refinery deploy`")]
    ProjectNotFound { project: String },
    /// The run was asked to start at something the project does not have.
    #[error("project `{project}` (live deployment {deployment}) has no block `{start}` to start a run at; its blocks are: {}", blocks.join(", "))]
    StartNotFound {
        project: String,
        deployment: i64,
        start: String,
        blocks: Vec<String>,
    },
    /// No endpoint of the project has that path.
    #[error("project `{project}` has no endpoint for `{method} {path}`: its endpoints are the `[[endpoints]]` of its manifest (method and path)")]
    NoEndpoint {
        project: String,
        method: String,
        path: String,
    },
    /// The project has no topic of that name.
    #[error("project `{project}` has no topic `{topic}`: its topics are the `[[topics]]` of its manifest")]
    NoTopic { project: String, topic: String },
    /// Endpoints have that path, none that method.
    #[error("project `{project}` has no `{method}` endpoint at `{path}`; that path answers {}", allow.join(", "))]
    EndpointMethod {
        project: String,
        method: String,
        path: String,
        allow: Vec<String>,
    },
    /// The account has as many runs running as it may.
    #[error("account {account} has {limit} runs running, the most it may have at once; wait for some to end (or cancel them: refinery runs cancel RUN_ID), or ask the operator to raise the limit (refinery serve --max-runs-per-account N)")]
    TooManyRuns { account: String, limit: usize },
    /// The account has no run of that id.
    #[error("no run `{0}` in this account; list the project's runs with `refinery runs PROJECT`")]
    RunNotFound(String),
    /// The project's live deployment declares no such queue.
    #[error("project `{project}` has no queue `{queue}` in its live deployment; its queues are: {}", if queues.is_empty() { "none (declare one with [[queues]] in refinery.toml)".to_string() } else { queues.join(", ") })]
    QueueNotFound {
        project: String,
        queue: String,
        queues: Vec<String>,
    },
    /// A message over the size limit; nothing was enqueued.
    #[error("message {index} is {size} bytes of JSON; a queue message may be at most {limit} bytes (send a reference to the data instead, or ask the operator to raise the limit: refinery serve --max-message-bytes BYTES)")]
    MessageTooLarge {
        index: usize,
        size: usize,
        limit: usize,
    },
    /// The account's queues hold as many messages as they may; nothing was enqueued.
    #[error("the account's queues hold {stored} messages (visible, in flight and dead letters); adding {adding} would pass the limit of {limit}: wait for the consumers to catch up, purge dead letters (refinery queues dlq PROJECT QUEUE purge), or ask the operator to raise the limit (refinery serve --max-queued-messages N)")]
    QueueFull {
        stored: u64,
        adding: u64,
        limit: u64,
    },
    /// The request itself is wrong (the message says how).
    #[error("{0}")]
    Invalid(String),
    /// A timer's slot fired already (by an earlier start of the server, or a later slot
    /// did): no second run for it.
    #[error("slot {slot_ms} (ms since the epoch) of timer `{timer}` has fired already; a slot fires once")]
    SlotFired { timer: String, slot_ms: i64 },
    /// The server is stopping: it starts no new runs.
    #[error("the server is shutting down and starts no new runs")]
    ShuttingDown,
    /// A store problem.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// Anything else (a host problem).
    #[error("{0}")]
    Internal(String),
}

impl From<InvocationError> for EngineError {
    fn from(e: InvocationError) -> Self {
        match e {
            InvocationError::ProjectNotFound { project } => {
                EngineError::ProjectNotFound { project }
            }
            other => EngineError::Internal(other.to_string()),
        }
    }
}
