//! Parsing the manifest's triggers: `[[endpoints]]`, `[[responses]]`, `[[timers]]`,
//! `[[queues]]` and `[[topics]]` (BRIEF §7b), with located errors.

use serde::Deserialize;
use toml::Spanned;

use super::Context;
use crate::manifest::ManifestError;
use crate::names::{is_valid_name, NAME_RULE};
use crate::trigger::{
    endpoint_limits, queue_limits, Cors, Endpoint, EndpointAuth, HttpMethod, PathTemplate, Queue,
    Response, Schedule, Timer, Topic,
};

/// The largest timer `input`, serialised as JSON.
pub const MAX_TIMER_INPUT_BYTES: usize = 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEndpoint {
    pub(super) name: Spanned<String>,
    pub(super) method: Spanned<String>,
    pub(super) path: Spanned<String>,
    pub(super) auth: Option<Spanned<String>>,
    pub(super) timeout_s: Option<Spanned<i64>>,
    /// `true` (any origin), or a table: checked by hand for clear messages.
    pub(super) cors: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNamed {
    pub(super) name: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimer {
    pub(super) name: Spanned<String>,
    pub(super) schedule: Spanned<String>,
    pub(super) input: Option<Spanned<toml::Value>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) name: Spanned<String>,
    pub(super) batch_size: Option<Spanned<i64>>,
    pub(super) visibility_timeout_s: Option<Spanned<i64>>,
    pub(super) max_receive_count: Option<Spanned<i64>>,
}

impl Context<'_> {
    /// A trigger's `name`: valid, and checked for uniqueness by the caller.
    fn trigger_name(
        &self,
        table: &str,
        index: usize,
        name: &Spanned<String>,
    ) -> Result<String, ManifestError> {
        let value = name.get_ref();
        if !is_valid_name(value) {
            return Err(self.error(
                Some(name.span()),
                Some(format!("{table}[{index}].name")),
                format!("invalid name `{value}`: expected {NAME_RULE}"),
            ));
        }
        Ok(value.clone())
    }

    fn bounded(
        &self,
        value: &Option<Spanned<i64>>,
        field: String,
        min: u32,
        max: u32,
        default: u32,
    ) -> Result<u32, ManifestError> {
        match value {
            None => Ok(default),
            Some(v) => u32::try_from(*v.get_ref())
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| {
                    self.error(
                        Some(v.span()),
                        Some(field),
                        format!(
                            "expected an integer from {min} to {max}, got {}",
                            v.get_ref()
                        ),
                    )
                }),
        }
    }

    pub(super) fn endpoint(
        &self,
        index: usize,
        raw: &RawEndpoint,
    ) -> Result<Endpoint, ManifestError> {
        let field = |name: &str| Some(format!("endpoints[{index}].{name}"));
        let name = self.trigger_name("endpoints", index, &raw.name)?;
        let method: HttpMethod = raw
            .method
            .get_ref()
            .parse()
            .map_err(|message| self.error(Some(raw.method.span()), field("method"), message))?;
        let path = PathTemplate::parse(raw.path.get_ref()).map_err(|message| {
            self.error(
                Some(raw.path.span()),
                field("path"),
                format!("invalid path: {message}"),
            )
        })?;
        let auth = match &raw.auth {
            None => EndpointAuth::default(),
            Some(auth) => match auth.get_ref().as_str() {
                "none" => EndpointAuth::None,
                "key" => EndpointAuth::Key,
                other => {
                    return Err(self.error(
                        Some(auth.span()),
                        field("auth"),
                        format!("unknown auth `{other}`: expected none (public, the default) or key (callers send one of the account's API keys)"),
                    ))
                }
            },
        };
        let timeout_s = self.bounded(
            &raw.timeout_s,
            format!("endpoints[{index}].timeout_s"),
            1,
            endpoint_limits::MAX_TIMEOUT_S,
            endpoint_limits::DEFAULT_TIMEOUT_S,
        )?;
        let cors = match &raw.cors {
            None => None,
            Some(cors) => self.cors(index, cors)?,
        };
        Ok(Endpoint {
            name,
            method,
            path,
            auth,
            timeout_s,
            cors,
        })
    }

    fn cors(
        &self,
        index: usize,
        raw: &Spanned<toml::Value>,
    ) -> Result<Option<Cors>, ManifestError> {
        let field = Some(format!("endpoints[{index}].cors"));
        let usage = "expected `cors = true` (any origin) or `cors = { allow_origins = [\"https://app.example.com\"], allow_headers = [\"content-type\"], max_age_s = 600 }`";
        let error = |message: String| self.error(Some(raw.span()), field.clone(), message);
        let default_headers = || vec!["content-type".to_string(), "authorization".to_string()];
        let table = match raw.get_ref() {
            toml::Value::Boolean(false) => return Ok(None),
            toml::Value::Boolean(true) => {
                return Ok(Some(Cors {
                    allow_origins: vec!["*".into()],
                    allow_headers: default_headers(),
                    max_age_s: endpoint_limits::DEFAULT_CORS_MAX_AGE_S,
                }))
            }
            toml::Value::Table(table) => table,
            other => return Err(error(format!("{usage}; found {}", other.type_str()))),
        };
        let strings = |key: &str| -> Result<Option<Vec<String>>, ManifestError> {
            let Some(value) = table.get(key) else {
                return Ok(None);
            };
            let toml::Value::Array(items) = value else {
                return Err(error(format!("`{key}` must be a list of strings")));
            };
            items
                .iter()
                .map(|item| match item {
                    toml::Value::String(s)
                        if !s.is_empty() && s.is_ascii() && !s.contains(['\r', '\n']) =>
                    {
                        Ok(s.clone())
                    }
                    other => Err(error(format!(
                        "`{key}` must be a list of non-empty ASCII strings, found {other}"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some)
        };
        if let Some(unknown) = table
            .keys()
            .find(|k| !["allow_origins", "allow_headers", "max_age_s"].contains(&k.as_str()))
        {
            return Err(error(format!("unknown key `{unknown}`: {usage}")));
        }
        let allow_origins = strings("allow_origins")?
            .filter(|o| !o.is_empty())
            .ok_or_else(|| error(format!("`allow_origins` is missing or empty: {usage}")))?;
        let allow_headers = strings("allow_headers")?.unwrap_or_else(default_headers);
        let max_age_s = match table.get("max_age_s") {
            None => endpoint_limits::DEFAULT_CORS_MAX_AGE_S,
            Some(toml::Value::Integer(n)) => u32::try_from(*n)
                .ok()
                .filter(|n| *n <= endpoint_limits::MAX_CORS_MAX_AGE_S)
                .ok_or_else(|| {
                    error(format!(
                        "`max_age_s` must be from 0 to {}, got {n}",
                        endpoint_limits::MAX_CORS_MAX_AGE_S
                    ))
                })?,
            Some(other) => {
                return Err(error(format!(
                    "`max_age_s` must be an integer, found {}",
                    other.type_str()
                )))
            }
        };
        Ok(Some(Cors {
            allow_origins,
            allow_headers,
            max_age_s,
        }))
    }

    pub(super) fn response(&self, index: usize, raw: &RawNamed) -> Result<Response, ManifestError> {
        Ok(Response {
            name: self.trigger_name("responses", index, &raw.name)?,
        })
    }

    pub(super) fn topic(&self, index: usize, raw: &RawNamed) -> Result<Topic, ManifestError> {
        Ok(Topic {
            name: self.trigger_name("topics", index, &raw.name)?,
        })
    }

    pub(super) fn timer(&self, index: usize, raw: &RawTimer) -> Result<Timer, ManifestError> {
        let field = |name: &str| Some(format!("timers[{index}].{name}"));
        let name = self.trigger_name("timers", index, &raw.name)?;
        let schedule = Schedule::parse(raw.schedule.get_ref())
            .map_err(|message| self.error(Some(raw.schedule.span()), field("schedule"), message))?;
        let input = match &raw.input {
            None => serde_json::json!({}),
            Some(input) => {
                let json = serde_json::to_value(input.get_ref()).map_err(|e| {
                    self.error(
                        Some(input.span()),
                        field("input"),
                        format!("cannot be JSON: {e}"),
                    )
                })?;
                let size = json.to_string().len();
                if size > MAX_TIMER_INPUT_BYTES {
                    return Err(self.error(
                        Some(input.span()),
                        field("input"),
                        format!("the input is {size} bytes as JSON; the limit is {MAX_TIMER_INPUT_BYTES}"),
                    ));
                }
                json
            }
        };
        Ok(Timer {
            name,
            schedule,
            input,
        })
    }

    pub(super) fn queue(&self, index: usize, raw: &RawQueue) -> Result<Queue, ManifestError> {
        let field = |name: &str| format!("queues[{index}].{name}");
        Ok(Queue {
            name: self.trigger_name("queues", index, &raw.name)?,
            batch_size: self.bounded(
                &raw.batch_size,
                field("batch_size"),
                1,
                queue_limits::MAX_BATCH_SIZE,
                queue_limits::DEFAULT_BATCH_SIZE,
            )?,
            visibility_timeout_s: self.bounded(
                &raw.visibility_timeout_s,
                field("visibility_timeout_s"),
                1,
                queue_limits::MAX_VISIBILITY_TIMEOUT_S,
                queue_limits::DEFAULT_VISIBILITY_TIMEOUT_S,
            )?,
            max_receive_count: self.bounded(
                &raw.max_receive_count,
                field("max_receive_count"),
                1,
                queue_limits::MAX_MAX_RECEIVE_COUNT,
                queue_limits::DEFAULT_MAX_RECEIVE_COUNT,
            )?,
        })
    }
}
