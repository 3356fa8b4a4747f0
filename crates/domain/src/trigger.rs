//! Triggers: what starts a service's runs, as the manifest declares them (BRIEF §7b).
//!
//! - [`Endpoint`]: a public HTTP route `{METHOD} /http/{account}/{project}{path}` with a
//!   [`PathTemplate`] (`/orders/{id}`), an [`EndpointAuth`], a reply timeout and optional
//!   [`Cors`].
//! - [`Response`]: ends an endpoint's pipeline; a `then` into it is the HTTP reply.
//! - [`Timer`]: a [`Schedule`] (`rate(...)` or `cron(...)`, EventBridge syntax, UTC) and the
//!   input of the runs it starts.
//! - [`Queue`]: a durable queue with one consumer block, consumed in batches.
//! - [`Topic`]: publish/subscribe; each subscriber block gets its own run.
//!
//! Parsing with located errors is in [`crate::manifest`]; this module holds the validated
//! types and their pure logic (route matching, schedule arithmetic). No I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use serde_json::Value as Json;

/// What kind of thing a manifest name is (every name is unique within a project).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NodeKind {
    Block,
    Endpoint,
    Response,
    Timer,
    Queue,
    Topic,
}

impl NodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeKind::Block => "block",
            NodeKind::Endpoint => "endpoint",
            NodeKind::Response => "response",
            NodeKind::Timer => "timer",
            NodeKind::Queue => "queue",
            NodeKind::Topic => "topic",
        }
    }

    /// Whether a run can start here (a block, or a trigger's `then` targets).
    pub fn is_trigger(self) -> bool {
        matches!(
            self,
            NodeKind::Endpoint | NodeKind::Timer | NodeKind::Queue | NodeKind::Topic
        )
    }
}

impl fmt::Display for NodeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An endpoint's `method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HttpMethod {
    Get,
    Post,
    Put,
    Patch,
    Delete,
    /// Every method (but a CORS preflight `OPTIONS` of an endpoint with `cors`).
    Any,
}

impl HttpMethod {
    pub const ALL: [HttpMethod; 6] = [
        HttpMethod::Get,
        HttpMethod::Post,
        HttpMethod::Put,
        HttpMethod::Patch,
        HttpMethod::Delete,
        HttpMethod::Any,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Any => "ANY",
        }
    }

    /// Whether a request with `method` (upper case, e.g. `GET`) is for this endpoint.
    /// `HEAD` is served by `GET` endpoints.
    pub fn accepts(self, method: &str) -> bool {
        match self {
            HttpMethod::Any => method != "OPTIONS",
            HttpMethod::Get => method == "GET" || method == "HEAD",
            other => other.as_str() == method,
        }
    }
}

impl FromStr for HttpMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        HttpMethod::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown method `{s}`: expected one of {} (upper case)",
                    HttpMethod::ALL.map(HttpMethod::as_str).join(" | ")
                )
            })
    }
}

/// The longest endpoint `path` accepted, in bytes.
pub const MAX_PATH_BYTES: usize = 512;

/// One segment of a [`PathTemplate`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Literal(String),
    Param(String),
}

/// An endpoint's `path`: `/` followed by segments, each a literal (`orders`) or a parameter
/// (`{id}`, matching one non-empty segment). A trailing `/` in a request is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathTemplate {
    source: String,
    segments: Vec<Segment>,
}

impl PathTemplate {
    pub fn parse(path: &str) -> Result<PathTemplate, String> {
        if !path.starts_with('/') {
            return Err(format!(
                "`{path}` does not start with `/`: write it like `/orders/{{id}}`"
            ));
        }
        if path.len() > MAX_PATH_BYTES {
            return Err(format!(
                "the path is {} bytes; the limit is {MAX_PATH_BYTES}",
                path.len()
            ));
        }
        let mut segments = Vec::new();
        let trimmed = path.trim_end_matches('/');
        for (index, segment) in trimmed.split('/').enumerate().skip(1) {
            if segment.is_empty() {
                return Err(format!(
                    "segment {index} of `{path}` is empty (`//`): remove the extra `/`"
                ));
            }
            if let Some(inner) = segment.strip_prefix('{') {
                let Some(name) = inner.strip_suffix('}') else {
                    return Err(format!(
                        "segment `{segment}` of `{path}` opens `{{` without closing it: a parameter is a whole segment, like `{{id}}`"
                    ));
                };
                let valid = name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    return Err(format!(
                        "parameter `{{{name}}}` of `{path}`: a parameter name is letters, digits and `_`, starting with a letter or `_`"
                    ));
                }
                if segments
                    .iter()
                    .any(|s| matches!(s, Segment::Param(p) if p == name))
                {
                    return Err(format!(
                        "parameter `{{{name}}}` appears twice in `{path}`: give each one its own name"
                    ));
                }
                segments.push(Segment::Param(name.to_string()));
            } else {
                if segment.contains(['{', '}']) {
                    return Err(format!(
                        "segment `{segment}` of `{path}` mixes text and a parameter: a parameter is a whole segment, like `/orders/{{id}}`"
                    ));
                }
                if let Some(bad) = segment
                    .chars()
                    .find(|c| !(c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@%".contains(*c)))
                {
                    return Err(format!(
                        "segment `{segment}` of `{path}` has `{}`, which a URL path cannot hold unescaped",
                        bad.escape_default()
                    ));
                }
                segments.push(Segment::Literal(segment.to_string()));
            }
        }
        Ok(PathTemplate {
            source: path.to_string(),
            segments,
        })
    }

    /// The path as the manifest wrote it.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The parameters' values if `path` (a request's path below the project, decoded
    /// segment by segment by the caller or not) matches, else `None`.
    pub fn matches(&self, path: &str) -> Option<BTreeMap<String, String>> {
        let trimmed = path.trim_end_matches('/');
        let mut parts = trimmed.split('/');
        if parts.next() != Some("") {
            return None;
        }
        let mut params = BTreeMap::new();
        let mut count = 0;
        for part in parts {
            let segment = self.segments.get(count)?;
            count += 1;
            match segment {
                Segment::Literal(l) if l == part => {}
                Segment::Literal(_) => return None,
                Segment::Param(_) if part.is_empty() => return None,
                Segment::Param(name) => {
                    params.insert(name.clone(), part.to_string());
                }
            }
        }
        (count == self.segments.len()).then_some(params)
    }

    /// How specific the template is, for choosing between templates that both match: more
    /// literal segments first, compared left to right (`/orders/new` before `/orders/{id}`).
    pub fn specificity(&self) -> Vec<bool> {
        self.segments
            .iter()
            .map(|s| matches!(s, Segment::Literal(_)))
            .collect()
    }

    /// The template with parameter names erased: two endpoints with the same shape and
    /// method would be ambiguous.
    pub fn shape(&self) -> String {
        let mut shape = String::new();
        for segment in &self.segments {
            shape.push('/');
            match segment {
                Segment::Literal(l) => shape.push_str(l),
                Segment::Param(_) => shape.push_str("{}"),
            }
        }
        if shape.is_empty() {
            shape.push('/');
        }
        shape
    }
}

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum EndpointAuth {
    /// Anyone (webhooks, browsers). The default.
    #[default]
    None,
    /// Callers sending one of the account's API keys (`Authorization: Bearer ...`).
    Key,
}

impl EndpointAuth {
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointAuth::None => "none",
            EndpointAuth::Key => "key",
        }
    }
}

/// Bounds and defaults of an endpoint.
pub mod endpoint_limits {
    /// `timeout_s`: how long a caller waits for the response, 1 to 900 s (default 29, as
    /// API Gateway).
    pub const DEFAULT_TIMEOUT_S: u32 = 29;
    pub const MAX_TIMEOUT_S: u32 = 900;
    /// `cors.max_age_s`: how long a browser may cache a preflight (default 600 s).
    pub const DEFAULT_CORS_MAX_AGE_S: u32 = 600;
    pub const MAX_CORS_MAX_AGE_S: u32 = 86_400;
}

/// An endpoint's `cors = { allow_origins = [...], allow_headers = [...], max_age_s = N }`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Cors {
    /// Origins allowed (`https://app.example.com`), or `*` for any.
    pub allow_origins: Vec<String>,
    /// Request headers a browser may send (default: `content-type`, `authorization`).
    pub allow_headers: Vec<String>,
    pub max_age_s: u32,
}

impl Cors {
    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if allowed.
    pub fn allow_origin(&self, origin: &str) -> Option<String> {
        if self.allow_origins.iter().any(|o| o == "*") {
            return Some("*".into());
        }
        self.allow_origins
            .iter()
            .find(|o| o.eq_ignore_ascii_case(origin))
            .map(|_| origin.to_string())
    }
}

/// One `[[endpoints]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub name: String,
    pub method: HttpMethod,
    pub path: PathTemplate,
    pub auth: EndpointAuth,
    pub timeout_s: u32,
    pub cors: Option<Cors>,
}

/// One `[[responses]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub name: String,
}

/// A timer's `schedule`: `rate(N unit)` or `cron(min hour day-of-month month day-of-week
/// year)`, EventBridge syntax, in UTC.
#[derive(Debug, Clone)]
pub struct Schedule {
    source: String,
    kind: ScheduleKind,
}

#[derive(Debug, Clone)]
enum ScheduleKind {
    /// Every `period_s` seconds, slots aligned on multiples of the period since the Unix
    /// epoch (so they are the same across restarts and redeploys).
    Rate {
        period_s: u64,
    },
    Cron(Box<croner::Cron>),
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Schedule {}

/// The shortest rate accepted (`rate(1 second)`: Refinery also takes seconds, which
/// EventBridge does not).
pub const MIN_RATE_S: u64 = 1;
/// The longest (`rate(365 days)`).
pub const MAX_RATE_S: u64 = 365 * 86_400;

impl Schedule {
    pub fn parse(source: &str) -> Result<Schedule, String> {
        let trimmed = source.trim();
        if let Some(inner) = trimmed
            .strip_prefix("rate(")
            .and_then(|s| s.strip_suffix(')'))
        {
            return Self::rate(source, inner);
        }
        if let Some(inner) = trimmed
            .strip_prefix("cron(")
            .and_then(|s| s.strip_suffix(')'))
        {
            return Self::cron(source, inner);
        }
        Err(format!(
            "`{source}` is not a schedule: write `rate(5 minutes)` (a value and minute(s), hour(s), day(s) or second(s)) or `cron(0 2 * * ? *)` (minutes hours day-of-month month day-of-week year, UTC)"
        ))
    }

    fn rate(source: &str, inner: &str) -> Result<Schedule, String> {
        let mut parts = inner.split_whitespace();
        let (Some(value), Some(unit), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(format!(
                "`{source}`: a rate is a value and a unit, like `rate(5 minutes)` or `rate(1 hour)`"
            ));
        };
        let value: u64 = value.parse().ok().filter(|v| *v > 0).ok_or_else(|| {
            format!("`{source}`: the value `{value}` is not a positive whole number")
        })?;
        let unit_s = match unit {
            "second" | "seconds" => 1,
            "minute" | "minutes" => 60,
            "hour" | "hours" => 3600,
            "day" | "days" => 86_400,
            other => {
                return Err(format!(
                    "`{source}`: unknown unit `{other}`: expected minute(s), hour(s), day(s) or second(s)"
                ))
            }
        };
        let period_s = value.saturating_mul(unit_s);
        if !(MIN_RATE_S..=MAX_RATE_S).contains(&period_s) {
            return Err(format!(
                "`{source}`: the period must be between {MIN_RATE_S} second and 365 days"
            ));
        }
        Ok(Schedule {
            source: source.to_string(),
            kind: ScheduleKind::Rate { period_s },
        })
    }

    fn cron(source: &str, inner: &str) -> Result<Schedule, String> {
        let fields: Vec<&str> = inner.split_whitespace().collect();
        if fields.len() != 6 {
            return Err(format!(
                "`{source}` has {} fields; an EventBridge cron has 6: minutes hours day-of-month month day-of-week year, e.g. `cron(0 2 * * ? *)`",
                fields.len()
            ));
        }
        let (dom, dow) = (fields[2], fields[4]);
        if dom != "?" && dow != "?" {
            return Err(format!(
                "`{source}`: one of day-of-month (`{dom}`) and day-of-week (`{dow}`) must be `?`, as in EventBridge, e.g. `cron(0 2 * * ? *)` (every day) or `cron(0 2 ? * MON-FRI *)`"
            ));
        }
        // Seconds first (always 0), then EventBridge's six fields; weekdays 1-7 are SUN-SAT.
        let pattern = format!("0 {}", fields.join(" "));
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Required)
            .year(croner::parser::Year::Required)
            .alternative_weekdays(true)
            .build()
            .parse(&pattern)
            .map_err(|e| format!("`{source}`: {e}"))?;
        Ok(Schedule {
            source: source.to_string(),
            kind: ScheduleKind::Cron(Box::new(cron)),
        })
    }

    /// The schedule as the manifest wrote it.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// The first slot strictly after `after`, if the schedule has one.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            ScheduleKind::Rate { period_s } => {
                let period = i64::try_from(*period_s).ok()?;
                let next = (after.timestamp().div_euclid(period) + 1).checked_mul(period)?;
                Utc.timestamp_opt(next, 0).single()
            }
            ScheduleKind::Cron(cron) => cron
                .find_next_occurrence(&after, false)
                .ok()
                .filter(|t| t.year() <= 9999),
        }
    }

    /// The latest slot at or before `at`, if any.
    pub fn latest_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            ScheduleKind::Rate { period_s } => {
                let period = i64::try_from(*period_s).ok()?;
                let slot = at.timestamp().div_euclid(period).checked_mul(period)?;
                Utc.timestamp_opt(slot, 0).single()
            }
            ScheduleKind::Cron(cron) => cron.find_previous_occurrence(&at, true).ok(),
        }
    }
}

/// One `[[timers]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timer {
    pub name: String,
    pub schedule: Schedule,
    /// The input of the runs it starts (`{}` when not given).
    pub input: Json,
}

/// Bounds and defaults of a queue.
pub mod queue_limits {
    /// `batch_size`: messages per consumer run, 1 to 10 (default 10).
    pub const MAX_BATCH_SIZE: u32 = 10;
    pub const DEFAULT_BATCH_SIZE: u32 = 10;
    /// `visibility_timeout_s`: how long a batch in flight stays invisible, 1 s to 12 h
    /// (default 30 s, as SQS).
    pub const DEFAULT_VISIBILITY_TIMEOUT_S: u32 = 30;
    pub const MAX_VISIBILITY_TIMEOUT_S: u32 = 43_200;
    /// `max_receive_count`: receipts before a message is dead-lettered, 1 to 1000
    /// (default 5).
    pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 5;
    pub const MAX_MAX_RECEIVE_COUNT: u32 = 1000;
}

/// One `[[queues]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    pub name: String,
    pub batch_size: u32,
    pub visibility_timeout_s: u32,
    pub max_receive_count: u32,
}

/// One `[[topics]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic {
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("a valid time")
            .with_timezone(&Utc)
    }

    #[test]
    fn path_templates_match_and_extract_parameters() {
        let t = PathTemplate::parse("/orders/{id}/items/{item}").expect("valid");
        let params = t.matches("/orders/42/items/x-1").expect("matches");
        assert_eq!(params["id"], "42");
        assert_eq!(params["item"], "x-1");
        assert!(t.matches("/orders/42/items/x-1/").is_some());
        assert!(t.matches("/orders/42/items").is_none());
        assert!(t.matches("/orders//items/x").is_none());
        assert!(t.matches("/orders/42/items/x/y").is_none());
        let root = PathTemplate::parse("/").expect("valid");
        assert!(root.matches("/").is_some());
        assert!(root.matches("").is_some());
        assert!(root.matches("/x").is_none());
        assert_eq!(t.shape(), "/orders/{}/items/{}");
        assert!(
            PathTemplate::parse("/orders/new")
                .expect("valid")
                .specificity()
                > PathTemplate::parse("/orders/{id}")
                    .expect("valid")
                    .specificity()
        );
    }

    #[test]
    fn bad_path_templates_say_why() {
        for (path, needle) in [
            ("orders", "start with `/`"),
            ("/a//b", "empty"),
            ("/a/{id", "without closing"),
            ("/a/x{id}", "mixes text"),
            ("/a/{1x}", "parameter name"),
            ("/a/{id}/{id}", "twice"),
            ("/a b", "cannot hold"),
        ] {
            let error = PathTemplate::parse(path).expect_err(path);
            assert!(error.contains(needle), "{path}: {error}");
        }
    }

    #[test]
    fn methods_accept_their_requests() {
        assert!(HttpMethod::Any.accepts("PATCH"));
        assert!(!HttpMethod::Any.accepts("OPTIONS"));
        assert!(HttpMethod::Get.accepts("HEAD"));
        assert!(!HttpMethod::Post.accepts("GET"));
        assert!("get".parse::<HttpMethod>().is_err());
    }

    #[test]
    fn rates_are_aligned_on_the_epoch() {
        let s = Schedule::parse("rate(5 minutes)").expect("valid");
        assert_eq!(
            s.next_after(at("2026-01-01T00:03:10Z")),
            Some(at("2026-01-01T00:05:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-01-01T00:05:00Z")),
            Some(at("2026-01-01T00:10:00Z"))
        );
        assert_eq!(
            s.latest_at_or_before(at("2026-01-01T00:09:59Z")),
            Some(at("2026-01-01T00:05:00Z"))
        );
        assert!(Schedule::parse("rate(1 minute)").is_ok());
        assert!(Schedule::parse("rate(2 seconds)").is_ok());
        for bad in [
            "rate(0 minutes)",
            "rate(5 fortnights)",
            "rate(5)",
            "rate(-1 hours)",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn crons_follow_eventbridge() {
        let nightly = Schedule::parse("cron(0 2 * * ? *)").expect("valid");
        assert_eq!(
            nightly.next_after(at("2026-03-04T02:00:00Z")),
            Some(at("2026-03-05T02:00:00Z"))
        );
        assert_eq!(
            nightly.latest_at_or_before(at("2026-03-04T02:00:00Z")),
            Some(at("2026-03-04T02:00:00Z"))
        );
        // 2026-03-04 is a Wednesday; day-of-week 2 is Monday in EventBridge (1 = Sunday).
        let monday = Schedule::parse("cron(30 9 ? * 2 *)").expect("valid");
        assert_eq!(
            monday.next_after(at("2026-03-04T00:00:00Z")),
            Some(at("2026-03-09T09:30:00Z"))
        );
        let weekdays = Schedule::parse("cron(0 8 ? * MON-FRI *)").expect("valid");
        assert_eq!(
            weekdays.next_after(at("2026-03-06T09:00:00Z")),
            Some(at("2026-03-09T08:00:00Z"))
        );
        let once = Schedule::parse("cron(0 0 1 1 ? 2030)").expect("valid");
        assert_eq!(
            once.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2030-01-01T00:00:00Z"))
        );
        assert_eq!(once.next_after(at("2030-01-01T00:00:00Z")), None);
        for (bad, needle) in [
            ("cron(0 2 * * *)", "6"),
            ("cron(0 2 * * 1 *)", "must be `?`"),
            ("cron(61 2 * * ? *)", "cron("),
            ("every day", "not a schedule"),
        ] {
            let error = Schedule::parse(bad).expect_err(bad);
            assert!(error.contains(needle), "{bad}: {error}");
        }
    }
}
