//! A project's timers (BRIEF §7b `[[timers]]`): `GET /v1/projects/{p}/timers` lists the
//! live deployment's timers with their next fire time, their last fire and (with
//! `?fires=N`, at most 100) their most recent fires. The engine fires them (`timers.rs`).

use axum::extract::{Path, Query, State};
use axum::Json;
use refinery_engine::MAX_FIRES_LISTED;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::state::SharedState;

#[derive(Deserialize)]
pub struct TimersQuery {
    fires: Option<String>,
}

pub async fn list(
    State(state): State<SharedState>,
    caller: Caller,
    Path(project): Path<String>,
    Query(query): Query<TimersQuery>,
) -> Result<Json<Value>, ApiError> {
    let account = caller.account()?;
    let fires = match query.fires.as_deref() {
        None => 0,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| *n <= MAX_FIRES_LISTED)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "`?fires={text}` is not a number of fires from 0 to {MAX_FIRES_LISTED}; e.g. `?fires=10`"
                ))
            })?,
    };
    let timers = state.engine.timers(&account.id, &project, fires).await?;
    Ok(Json(json!({ "timers": timers })))
}
