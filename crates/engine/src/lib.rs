//! The services engine: durable runs of a project's Code Blocks connected by transitions.
//!
//! # What it owns
//!
//! - **Runs and their steps**, from the start of a run to its end: which steps a finished
//!   step starts (`then`, `if`/`else`, `exception`, `fan-out`, `fan-in`, `merge`, retries),
//!   the step limit, cancellation and failure. The definitions it follows are the
//!   domain's ([`refinery_domain::ServiceGraph`], re-read from the deployment's manifest);
//!   the state is the store's ([`refinery_store::runs`]); the backpack travels in the steps.
//! - **Dispatch**: which ready step runs next. Steps wait in one queue per (account,
//!   deployment, block), served round-robin, held to the block's `max_concurrency`, the
//!   account's instance quota and a server-wide cap — back-pressure, never an error: one
//!   account's 10,000-item fan-out cannot starve another account.
//!
//! - **Queues** (`queues.rs`): durable messages consumed in batches by a
//!   queue's consumer block, at least once, with dead letters.
//!
//! Every step runs through [`refinery_invocation::InvocationService`], like any invoke:
//! admitted, metered, billed and recorded as an execution.
//!
//! # Durability
//!
//! A step's result, the steps it starts, the join bookkeeping it moves and (when it is the
//! last) the run's end are one store transaction ([`advance`]). So after `kill -9` at any
//! moment a transition has fired exactly once or not at all, and a fan-in or merge runs
//! once. A step whose result was not committed runs again after the restart (at least
//! once: blocks get `REFINERY_RUN_ID`, `REFINERY_STEP_ID` and `REFINERY_ATTEMPT` to be
//! idempotent with). [`Engine::start`] resumes every run still running.
//!
//! # Timers
//!
//! [`Engine::start`] also starts the timers' loop (`timers.rs`): each slot of a live
//! deployment's `[[timers]]` starts one run, claimed in the run's creation transaction, so
//! a slot fires exactly once across restarts, redeploys and rollbacks.

mod advance;
mod engine;
mod error;
mod metrics;
mod queues;
mod scheduler;
mod timers;
mod triggers;
mod view;

pub use engine::{Engine, EngineConfig, RunStarted};
pub use error::EngineError;
pub use queues::{MessageView, QueueSettings, QueueView};
pub use timers::{TimerFireView, TimerView, MAX_FIRES_LISTED};
pub use triggers::EndpointRoute;
pub use view::{RunSummaryView, RunView, StepView};
