//! The `refinery.toml` project manifest: parsing, defaults and validation.
//!
//! Every error names the file, the line and column, the field and what was expected, so
//! an author can fix the manifest without guessing. The same parser runs in the CLI
//! (before upload) and in the server (on what was uploaded).
//!
//! # Services: connecting blocks (BRIEF §7b)
//!
//! ```toml
//! log_level = "all"      # optional: all (default) | errors | none — what a run's steps keep
//!
//! [[blocks]]
//! # ...
//! retry = { attempts = 3, interval_s = 1, backoff = 2.0 }   # optional; default: no retry
//!
//! [[transitions]]
//! from = "validate"      # a block; for `merge`, a list of two or more blocks
//! to = "charge"          # a block
//! type = "if"            # then | if | else | exception | fan-out | fan-in | merge
//! expression = "output.total > 0"   # `if` only, and required there
//! ```
//!
//! - `retry`: `attempts` counts every try, the first included, 1 to 10 (required in the
//!   table); `interval_s` is the wait before the second try, an integer 0 to 3600 (default
//!   1); `backoff` multiplies each further wait, 1.0 to 10.0 (default 2.0). No single wait
//!   exceeds 3600 s. See [`RetryPolicy::delay_before`].
//! - `expression`: CEL (the standard library; no timestamp, duration, regex or base64
//!   extensions) over `output` (alias `return_data`), `input` and `backpack`. Compiled here:
//!   a syntax error, an unknown variable, more than 1024 bytes or more than 24 levels of
//!   nesting is an error on the line of the `expression`, quoting it. At run time a result
//!   that is not a bool, or an error (a missing field, a type mismatch) is an
//!   [`ExpressionError`](crate::service::ExpressionError): it fails the step.
//! - `from` names a block or a trigger (an endpoint, a timer, a queue, a topic); `to` a
//!   block, a queue, a topic or a response. A trigger starts blocks with `then` only; a
//!   block's output goes to a queue, a topic or a response with `then` only. The error on
//!   an unknown name lists the names there are.
//! - `merge` takes a list of at least two distinct blocks; every other type one block.
//! - `else` only from a block that has an `if` transition.
//! - `fan-in` only downstream of a `fan-out`: accepted when some path of transitions to
//!   its `from` block passes more `fan-out`s than `fan-in`s (any block may start a run;
//!   the engine fails a run that reaches a fan-in with no fan-out open, never hangs).
//! - Two identical transitions (same `from`, `to`, `type` and `expression`) are an error.
//! - Cycles are allowed (a loop through an `if`); the engine bounds a run's steps.
//! - At most 1000 transitions per manifest.
//!
//! # Shared files
//!
//! `[[shared]]` tables (`name`, `source` = a directory) and a block's `shared = [...]`: see
//! [`crate::shared`] for the rules and the messages' cases.
//!
//! # Triggers (BRIEF §7b)
//!
//! ```toml
//! [[endpoints]]
//! name = "api"
//! method = "POST"        # GET | POST | PUT | PATCH | DELETE | ANY (GET also answers HEAD)
//! path = "/orders/{id}"  # literal segments and whole-segment {parameters}
//! auth = "none"          # none (default) | key
//! timeout_s = 29         # 1-900 (default 29): past it the caller gets 504, the run goes on
//! cors = { allow_origins = ["https://app.example.com"], allow_headers = ["content-type"], max_age_s = 600 }
//!                        # or `cors = true` (any origin); default: no CORS headers
//!
//! [[responses]]
//! name = "reply"
//!
//! [[timers]]
//! name = "nightly"
//! schedule = "cron(0 2 * * ? *)"  # or rate(5 minutes); also rate(N seconds) (Refinery's own)
//! input = { full = true }         # optional, at most 64 KiB as JSON; default {}
//!
//! [[queues]]
//! name = "urls"
//! batch_size = 10            # 1-10 (default 10)
//! visibility_timeout_s = 30  # 1-43200 (default 30)
//! max_receive_count = 5      # 1-1000 (default 5)
//!
//! [[topics]]
//! name = "events"
//! ```
//!
//! - Every name (block, endpoint, response, timer, queue, topic) is unique in the project.
//! - An endpoint and a timer start at least one block (`then` transitions from them); a
//!   queue has exactly one consumer block; a topic any number of subscribers.
//! - Two endpoints with the same method and the same path shape (parameter names aside)
//!   are an error; at a request, a literal segment wins over a parameter.
//! - cron: EventBridge's six fields, one of day-of-month and day-of-week `?`, day-of-week
//!   1-7 = SUN-SAT or names, `L`, `W`, `#`; rates are aligned on multiples of the period
//!   since the Unix epoch (UTC).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::block::{BlockSpec, Language};
use crate::limits;
use crate::names::{is_valid_name, NAME_RULE};
use crate::service::{
    retry_limits, with_compile_stack, Expression, LogLevel, RetryPolicy, ServiceGraph, Transition,
    TransitionType, MAX_TRANSITIONS,
};
use crate::shared::{SharedDir, MAX_SHARED_DIRS};
use crate::trigger::{Endpoint, NodeKind, Queue, Response, Timer, Topic};

mod triggers;
pub use triggers::MAX_TIMER_INPUT_BYTES;
use triggers::{RawEndpoint, RawNamed, RawQueue, RawTimer};

/// A parsed, validated manifest: a project and its blocks with their sources resolved,
/// and the service definitions that connect them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub blocks: Vec<BlockSpec>,
    /// `log_level`: what the steps of the project's runs keep.
    pub log_level: LogLevel,
    /// Block name → its `retry` policy, for the blocks that set one.
    pub retry: BTreeMap<String, RetryPolicy>,
    /// `[[transitions]]`, in manifest order (each one's `id` is its index).
    pub transitions: Vec<Transition>,
    /// The triggers and responses, each in manifest order.
    pub endpoints: Vec<Endpoint>,
    pub responses: Vec<Response>,
    pub timers: Vec<Timer>,
    pub queues: Vec<Queue>,
    pub topics: Vec<Topic>,
    /// `[[shared]]` directories, in manifest order (each block's `shared` holds the ones it
    /// lists).
    pub shared: Vec<Arc<SharedDir>>,
}

/// A manifest problem, located.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted path of the offending field, e.g. `blocks[1].memory_mb`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

pub use crate::source::{Deployed, Source, SourceResolver, Uploaded};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: Spanned<String>,
    log_level: Option<Spanned<String>>,
    #[serde(default)]
    blocks: Vec<Spanned<RawBlock>>,
    #[serde(default)]
    transitions: Vec<Spanned<RawTransition>>,
    #[serde(default)]
    endpoints: Vec<Spanned<RawEndpoint>>,
    #[serde(default)]
    responses: Vec<Spanned<RawNamed>>,
    #[serde(default)]
    timers: Vec<Spanned<RawTimer>>,
    #[serde(default)]
    queues: Vec<Spanned<RawQueue>>,
    #[serde(default)]
    topics: Vec<Spanned<RawNamed>>,
    #[serde(default)]
    shared: Vec<Spanned<RawShared>>,
}

/// A `[[shared]]` table (see [`crate::shared`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShared {
    name: Spanned<String>,
    source: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTransition {
    /// A string, or for `merge` a list of strings: checked by hand for clear messages.
    from: Spanned<toml::Value>,
    to: Spanned<String>,
    #[serde(rename = "type")]
    kind: Spanned<String>,
    expression: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Spanned<i64>,
    interval_s: Option<Spanned<i64>>,
    backoff: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlock {
    name: Spanned<String>,
    language: Spanned<String>,
    source: Option<Spanned<String>>,
    code: Option<Spanned<String>>,
    handler: Option<Spanned<String>>,
    memory_mb: Option<Spanned<i64>>,
    timeout_s: Option<Spanned<i64>>,
    max_concurrency: Option<Spanned<i64>>,
    keep_alive_s: Option<Spanned<i64>>,
    min_warm: Option<Spanned<i64>>,
    tmp_mb: Option<Spanned<i64>>,
    #[serde(default)]
    env: Option<Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>>,
    network: Option<Spanned<bool>>,
    retry: Option<Spanned<RawRetry>>,
    shared: Option<Spanned<Vec<Spanned<String>>>>,
}

/// Variables the platform sets itself (the sandbox's base environment; the shell runtime's
/// `REFINERY_BACKPACK` is under the reserved `REFINERY_` prefix); a block may not override
/// them.
pub const RESERVED_ENV: &[&str] = &["PATH", "HOME", "TMPDIR", "LANG"];

/// Prefix of the variables the platform reserves for itself.
pub const RESERVED_ENV_PREFIX: &str = "REFINERY_";

impl Manifest {
    /// Parses and validates `text`, naming `file` in errors; `sources` supplies the files
    /// that blocks reference with `source = "..."`.
    pub fn parse(
        text: &str,
        file: &str,
        sources: &dyn SourceResolver,
    ) -> Result<Manifest, ManifestError> {
        let ctx = Context { text, file };
        let raw: RawManifest = toml::from_str(text).map_err(|e| {
            let message = e.message().trim_end().to_string();
            ctx.error(e.span(), None, message)
        })?;

        let name = raw.name.get_ref();
        if !is_valid_name(name) {
            return Err(ctx.error(
                Some(raw.name.span()),
                Some("name".into()),
                format!("invalid project name `{name}`: expected {NAME_RULE}"),
            ));
        }
        if raw.blocks.is_empty() {
            return Err(ctx.error(
                None,
                Some("blocks".into()),
                "the project declares no blocks: add at least one `[[blocks]]` table".into(),
            ));
        }

        let log_level = match &raw.log_level {
            None => LogLevel::default(),
            Some(level) => LogLevel::ALL
                .into_iter()
                .find(|l| l.as_str() == level.get_ref())
                .ok_or_else(|| {
                    ctx.error(
                        Some(level.span()),
                        Some("log_level".into()),
                        format!(
                            "unknown log level `{}`: expected one of all (every step's input, output, logs and backpack; the default), errors (payloads of failed steps only), none (status and timing only)",
                            level.get_ref()
                        ),
                    )
                })?,
        };

        let shared = ctx.shared(&raw, sources)?;
        let mut seen = BTreeSet::new();
        let mut blocks = Vec::with_capacity(raw.blocks.len());
        let mut retry = BTreeMap::new();
        for (index, raw_block) in raw.blocks.iter().enumerate() {
            let mut block = ctx.block(index, raw_block, sources)?;
            block.shared = ctx.block_shared(index, raw_block.get_ref(), &shared)?;
            if let Some(policy) = &raw_block.get_ref().retry {
                retry.insert(block.name.clone(), ctx.retry(index, policy)?);
            }
            if !seen.insert(block.name.clone()) {
                return Err(ctx.error(
                    Some(raw_block.get_ref().name.span()),
                    Some(format!("blocks[{index}].name")),
                    format!(
                        "duplicate block name `{}`: block names must be unique within a project",
                        block.name
                    ),
                ));
            }
            blocks.push(block);
        }
        let triggers = ctx.triggers(&raw)?;
        let mut kinds: BTreeMap<String, NodeKind> = blocks
            .iter()
            .map(|b| (b.name.clone(), NodeKind::Block))
            .collect();
        for (kind, table, index, name) in &triggers.names {
            if let Some(first) = kinds.insert(name.get_ref().clone(), *kind) {
                return Err(ctx.error(
                    Some(name.span()),
                    Some(format!("{table}[{index}].name")),
                    format!(
                        "`{}` is already the name of a {first}: every name (block, endpoint, response, timer, queue, topic) must be unique within a project",
                        name.get_ref()
                    ),
                ));
            }
        }
        let transitions = if raw
            .transitions
            .iter()
            .any(|t| t.get_ref().expression.is_some())
        {
            // One thread with a stack fit for the CEL parser compiles every expression.
            with_compile_stack(|| ctx.transitions(&raw.transitions, &kinds))
                .map_err(|message| ctx.error(None, Some("transitions".into()), message))??
        } else {
            ctx.transitions(&raw.transitions, &kinds)?
        };
        let manifest = Manifest {
            name: name.clone(),
            blocks,
            log_level,
            retry,
            transitions,
            endpoints: triggers.endpoints,
            responses: triggers.responses,
            timers: triggers.timers,
            queues: triggers.queues,
            topics: triggers.topics,
            shared,
        };
        ctx.check_shared_listed(&raw, &manifest)?;
        ctx.check_wiring(&raw, &manifest)?;
        Ok(manifest)
    }

    /// Whether the manifest connects its blocks (has `[[transitions]]`): a service.
    pub fn is_service(&self) -> bool {
        !self.transitions.is_empty()
    }

    /// The transitions indexed for the engine.
    pub fn graph(&self) -> ServiceGraph {
        ServiceGraph::new(&self.nodes(), &self.transitions)
    }

    /// Every name of the manifest with its kind: blocks first, then the triggers, each in
    /// manifest order.
    pub fn nodes(&self) -> Vec<(String, NodeKind)> {
        let mut nodes: Vec<(String, NodeKind)> = Vec::new();
        nodes.extend(
            self.blocks
                .iter()
                .map(|b| (b.name.clone(), NodeKind::Block)),
        );
        nodes.extend(
            self.endpoints
                .iter()
                .map(|e| (e.name.clone(), NodeKind::Endpoint)),
        );
        nodes.extend(
            self.responses
                .iter()
                .map(|r| (r.name.clone(), NodeKind::Response)),
        );
        nodes.extend(
            self.timers
                .iter()
                .map(|t| (t.name.clone(), NodeKind::Timer)),
        );
        nodes.extend(
            self.queues
                .iter()
                .map(|q| (q.name.clone(), NodeKind::Queue)),
        );
        nodes.extend(
            self.topics
                .iter()
                .map(|t| (t.name.clone(), NodeKind::Topic)),
        );
        nodes
    }

    /// What `name` is in this manifest, if anything.
    pub fn node_kind(&self, name: &str) -> Option<NodeKind> {
        self.nodes()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, kind)| kind)
    }

    /// The queue named `name`.
    pub fn queue(&self, name: &str) -> Option<&Queue> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// The blocks a trigger's `then` transitions start, in manifest order.
    pub fn trigger_targets(&self, trigger: &str) -> Vec<&str> {
        self.transitions
            .iter()
            .filter(|t| t.kind == TransitionType::Then && t.from[0] == trigger)
            .map(|t| t.to.as_str())
            .collect()
    }

    /// The `source = "..."` paths the manifest references, for a client to upload
    /// alongside it. Tolerates an invalid manifest (returns what it can find); parse errors
    /// are reported by [`Manifest::parse`].
    pub fn referenced_sources(text: &str) -> Vec<String> {
        let Ok(raw) = toml::from_str::<RawManifest>(text) else {
            return Vec::new();
        };
        raw.blocks
            .iter()
            .filter_map(|b| b.get_ref().source.as_ref().map(|s| s.get_ref().clone()))
            .chain(
                raw.shared
                    .iter()
                    .map(|s| s.get_ref().source.get_ref().clone()),
            )
            .collect()
    }
}

/// The trigger tables, parsed, and every trigger's name with where it came from.
#[derive(Default)]
struct Triggers<'r> {
    endpoints: Vec<Endpoint>,
    responses: Vec<Response>,
    timers: Vec<Timer>,
    queues: Vec<Queue>,
    topics: Vec<Topic>,
    names: Vec<(NodeKind, &'static str, usize, &'r Spanned<String>)>,
}

struct Context<'a> {
    text: &'a str,
    file: &'a str,
}

impl Context<'_> {
    fn error(
        &self,
        span: Option<Range<usize>>,
        field: Option<String>,
        message: String,
    ) -> ManifestError {
        let (line, column) = match span {
            Some(span) => {
                let (line, column) = line_and_column(self.text, span.start);
                (Some(line), Some(column))
            }
            None => (None, None),
        };
        ManifestError {
            file: self.file.to_string(),
            line,
            column,
            field,
            message,
        }
    }

    fn block(
        &self,
        index: usize,
        raw: &Spanned<RawBlock>,
        sources: &dyn SourceResolver,
    ) -> Result<BlockSpec, ManifestError> {
        let field = |name: &str| Some(format!("blocks[{index}].{name}"));
        let block = raw.get_ref();

        let name = block.name.get_ref().clone();
        if !is_valid_name(&name) {
            return Err(self.error(
                Some(block.name.span()),
                field("name"),
                format!("invalid block name `{name}`: expected {NAME_RULE}"),
            ));
        }

        let language: Language = block.language.get_ref().parse().map_err(|message| {
            self.error(Some(block.language.span()), field("language"), message)
        })?;

        let (source_name, code, files, function, binary_files) =
            self.code(index, raw, language, &name, sources)?;
        if code.len() > limits::MAX_SOURCE_BYTES {
            return Err(self.error(
                Some(block.source.as_ref().map_or(raw.span(), |s| s.span())),
                field("source"),
                format!(
                    "the source is {} bytes; the limit is {} bytes",
                    code.len(),
                    limits::MAX_SOURCE_BYTES
                ),
            ));
        }

        let int =
            |value: &Option<Spanned<i64>>, key: &str, min: i64, max: i64, default: i64| match value
            {
                None => Ok(default),
                Some(v) if (min..=max).contains(v.get_ref()) => Ok(*v.get_ref()),
                Some(v) => Err(self.error(
                    Some(v.span()),
                    field(key),
                    format!(
                        "expected an integer from {min} to {max}, got {}",
                        v.get_ref()
                    ),
                )),
            };
        // The casts below cannot truncate: every bound above fits in u32.
        let memory_mb = int(
            &block.memory_mb,
            "memory_mb",
            limits::MIN_MEMORY_MB.into(),
            limits::MAX_MEMORY_MB.into(),
            limits::DEFAULT_MEMORY_MB.into(),
        )? as u32;
        let timeout_s = int(
            &block.timeout_s,
            "timeout_s",
            1,
            limits::MAX_TIMEOUT_S.into(),
            limits::DEFAULT_TIMEOUT_S.into(),
        )? as u32;
        let max_concurrency = int(
            &block.max_concurrency,
            "max_concurrency",
            1,
            limits::MAX_CONCURRENCY.into(),
            limits::DEFAULT_MAX_CONCURRENCY.into(),
        )? as u32;
        let tmp_mb = int(
            &block.tmp_mb,
            "tmp_mb",
            1,
            limits::MAX_TMP_MB.into(),
            limits::DEFAULT_TMP_MB.into(),
        )? as u32;
        let keep_alive_s = match &block.keep_alive_s {
            None => None,
            Some(_) => Some(int(
                &block.keep_alive_s,
                "keep_alive_s",
                1,
                limits::MAX_KEEP_ALIVE_S.into(),
                0,
            )? as u32),
        };

        let min_warm = int(
            &block.min_warm,
            "min_warm",
            0,
            limits::MAX_CONCURRENCY.into(),
            0,
        )? as u32;
        if min_warm > max_concurrency {
            return Err(self.error(
                block.min_warm.as_ref().map(Spanned::span),
                field("min_warm"),
                format!(
                    "min_warm = {min_warm} is more than max_concurrency = {max_concurrency}: a block cannot keep more instances warm than it may run at once; lower min_warm or raise max_concurrency"
                ),
            ));
        }

        let (env, secret_env) = match &block.env {
            None => (BTreeMap::new(), BTreeMap::new()),
            Some(env) => self.env(index, env)?,
        };

        Ok(BlockSpec {
            name,
            language,
            source_name,
            code,
            files,
            binary_files,
            shared: Vec::new(),
            function,
            secret_env,
            memory_mb,
            timeout_s,
            max_concurrency,
            keep_alive_s,
            min_warm,
            tmp_mb,
            env,
            network: block.network.as_ref().is_some_and(|n| *n.get_ref()),
            deps_layer: None,
        })
    }
}

/// A block's code: the handler's file name and text, a directory source's other files,
/// the handler function, and a directory source's binary files.
type BlockCode = (
    String,
    String,
    BTreeMap<String, String>,
    String,
    BTreeMap<String, Vec<u8>>,
);

impl Context<'_> {
    /// Resolves a block's `source` (a file or a directory) or inline `code`, and its
    /// `handler`.
    fn code(
        &self,
        index: usize,
        raw: &Spanned<RawBlock>,
        language: Language,
        name: &str,
        sources: &dyn SourceResolver,
    ) -> Result<BlockCode, ManifestError> {
        let field = |key: &str| Some(format!("blocks[{index}].{key}"));
        let block = raw.get_ref();
        let handler = match &block.handler {
            None => None,
            Some(h) => Some((
                h,
                crate::source::parse_handler(language, h.get_ref())
                    .map_err(|m| self.error(Some(h.span()), field("handler"), m))?,
            )),
        };
        // A single file's handler must name that file.
        let single = |source_name: String, code: String| -> Result<BlockCode, ManifestError> {
            let function = match &handler {
                None => crate::block::DEFAULT_FUNCTION.to_string(),
                Some((span, h)) if h.files.contains(&source_name) => h.function.clone(),
                Some((span, h)) => {
                    return Err(self.error(
                        Some(span.span()),
                        field("handler"),
                        format!(
                            "`{}` names the file `{}`, but this block's code is the one file `{source_name}`: write `handler = \"{}.{}\"`, or make `source` a directory holding `{}`",
                            span.get_ref(),
                            h.files[0],
                            source_name.rsplit_once('.').map_or(source_name.as_str(), |(stem, _)| stem),
                            h.function,
                            h.files[0]
                        ),
                    ))
                }
            };
            Ok((
                source_name,
                code,
                BTreeMap::new(),
                function,
                BTreeMap::new(),
            ))
        };
        match (&block.source, &block.code) {
            (Some(_), Some(code)) => Err(self.error(
                Some(code.span()),
                field("code"),
                "both `source` and `code` are set: give the code inline or as a file, not both"
                    .into(),
            )),
            (None, None) => Err(self.error(
                Some(raw.span()),
                field("source"),
                "missing: set `source = \"file\"` (a file beside the manifest), `source = \"dir/\"` (a directory, with `handler`) or `code = \"\"\"...\"\"\"` (inline)".into(),
            )),
            (None, Some(code)) => {
                let extension = language.descriptor().inline_extension;
                single(format!("{name}.{extension}"), code.get_ref().clone())
            }
            (Some(source), None) => {
                let path = source.get_ref();
                if path.trim_end_matches('/').is_empty()
                    || path.starts_with('/')
                    || path.split('/').any(|part| part == "..")
                {
                    return Err(self.error(
                        Some(source.span()),
                        field("source"),
                        format!("`{path}` must be a relative path to a file or directory inside the project directory (no `..`, no absolute path)"),
                    ));
                }
                let resolved = sources.resolve(path).map_err(|reason| {
                    self.error(
                        Some(source.span()),
                        field("source"),
                        format!("cannot read `{path}`: {reason}"),
                    )
                })?;
                match resolved {
                    Source::Deployed => Ok((
                        String::new(),
                        String::new(),
                        BTreeMap::new(),
                        handler.map_or_else(
                            || crate::block::DEFAULT_FUNCTION.to_string(),
                            |(_, h)| h.function,
                        ),
                        BTreeMap::new(),
                    )),
                    Source::File(code) => {
                        let source_name = source_file_name(path).map_err(|message| {
                            self.error(Some(source.span()), field("source"), message)
                        })?;
                        single(source_name, code)
                    }
                    Source::Directory(mut files) => {
                        let located = |message: String| {
                            self.error(Some(source.span()), field("source"), message)
                        };
                        if !language.descriptor().directory_sources {
                            return Err(located(format!(
                                "`{path}` is a directory: a {} block's source is one file (`source = \"script.{}\"`)",
                                language.descriptor().name,
                                language.descriptor().inline_extension
                            )));
                        }
                        let binary = sources.binary_files(path);
                        crate::source::check_directory_files(&files, &binary)
                            .map_err(|m| located(format!("`{path}`: {m}")))?;
                        let (written, handler) = match handler {
                            Some((h, parsed)) => (Some(h), parsed),
                            None => (
                                None,
                                crate::source::parse_handler(
                                    language,
                                    crate::source::default_handler(language),
                                )
                                .map_err(located)?,
                            ),
                        };
                        if let Some(entry) = handler.files.iter().find(|f| binary.contains_key(*f)) {
                            return Err(located(format!(
                                "`{path}{}{entry}`, the handler's file, is not UTF-8 text: save it as UTF-8 source",
                                if path.ends_with('/') { "" } else { "/" }
                            )));
                        }
                        let Some(entry) = handler.files.iter().find(|f| files.contains_key(*f))
                        else {
                            let shown: Vec<&str> = files.keys().map(String::as_str).take(10).collect();
                            let message = format!(
                                "the directory `{path}` has no {} for the handler `{}.{}`{}; it holds {}{}: add the file or set `handler = \"{}\"` to name one it holds",
                                handler.files.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(" or "),
                                handler.module,
                                handler.function,
                                if written.is_none() { " (the default)" } else { "" },
                                shown.join(", "),
                                if files.len() > shown.len() { ", ..." } else { "" },
                                if language.descriptor().dotted_modules { "module.function" } else { "file.function" },
                            );
                            return Err(match written {
                                Some(h) => self.error(Some(h.span()), field("handler"), message),
                                None => located(message),
                            });
                        };
                        let entry = entry.clone();
                        let code = files.remove(&entry).unwrap_or_default();
                        Ok((entry, code, files, handler.function, binary))
                    }
                }
            }
        }
    }
}

impl Context<'_> {
    /// `[[shared]]` (see [`crate::shared`]): names valid and unique, each source a directory
    /// of the project, apart from every block's source, within the directory limits.
    fn shared(
        &self,
        raw: &RawManifest,
        sources: &dyn SourceResolver,
    ) -> Result<Vec<Arc<SharedDir>>, ManifestError> {
        if let Some(over) = raw.shared.get(MAX_SHARED_DIRS) {
            return Err(self.error(
                Some(over.span()),
                Some(format!("shared[{MAX_SHARED_DIRS}]")),
                format!(
                    "more than {MAX_SHARED_DIRS} `[[shared]]` directories: the limit is {MAX_SHARED_DIRS} per project; merge some"
                ),
            ));
        }
        let mut dirs: Vec<Arc<SharedDir>> = Vec::with_capacity(raw.shared.len());
        for (index, entry) in raw.shared.iter().enumerate() {
            let field = |key: &str| Some(format!("shared[{index}].{key}"));
            let entry = entry.get_ref();
            let name = entry.name.get_ref();
            if !is_valid_name(name) {
                return Err(self.error(
                    Some(entry.name.span()),
                    field("name"),
                    format!(
                        "invalid shared directory name `{}`: expected {NAME_RULE}",
                        printable(name)
                    ),
                ));
            }
            if dirs.iter().any(|d| &d.name == name) {
                return Err(self.error(
                    Some(entry.name.span()),
                    field("name"),
                    format!("duplicate shared directory name `{name}`: each `[[shared]]` table needs a name of its own"),
                ));
            }
            let path = entry.source.get_ref();
            let located =
                |message: String| self.error(Some(entry.source.span()), field("source"), message);
            if crate::source::directory_key(path).is_empty()
                || path.starts_with('/')
                || path.split('/').any(|part| part == "..")
            {
                return Err(located(format!(
                    "`{path}` must be a relative path to a directory inside the project directory (no `..`, no absolute path)"
                )));
            }
            let key = crate::source::directory_key(path);
            let nested = |other: &str| {
                let other = crate::source::directory_key(other);
                key == other
                    || key.starts_with(&format!("{other}/"))
                    || other.starts_with(&format!("{key}/"))
            };
            if let Some(block) = raw
                .blocks
                .iter()
                .map(Spanned::get_ref)
                .find(|b| b.source.as_ref().is_some_and(|s| nested(s.get_ref())))
            {
                return Err(located(format!(
                    "`{path}` overlaps the source of block `{}` (`{}`): a shared directory and a block's source must not contain one another; move one of them",
                    block.name.get_ref(),
                    block.source.as_ref().map_or("", |s| s.get_ref().as_str())
                )));
            }
            if let Some(other) = raw.shared[..index]
                .iter()
                .map(Spanned::get_ref)
                .find(|o| nested(o.source.get_ref()))
            {
                return Err(located(format!(
                    "`{path}` overlaps the shared directory `{}` (`{}`): shared directories must not contain one another",
                    other.name.get_ref(),
                    other.source.get_ref()
                )));
            }
            let resolved = sources
                .resolve(path)
                .map_err(|reason| located(format!("cannot read `{path}`: {reason}")))?;
            let files = match resolved {
                Source::Deployed => BTreeMap::new(),
                Source::File(_) => {
                    return Err(located(format!(
                        "`{path}` is a file: a shared directory's source is a directory of the project (`source = \"{key}/\"` for a directory of that name)"
                    )))
                }
                Source::Directory(text) => {
                    let binary = sources.binary_files(path);
                    crate::source::check_directory_files(&text, &binary)
                        .map_err(|m| located(format!("`{path}`: {m}")))?;
                    text.into_iter()
                        .map(|(p, t)| (p, t.into_bytes()))
                        .chain(binary)
                        .collect()
                }
            };
            dirs.push(Arc::new(SharedDir {
                name: name.clone(),
                files,
            }));
        }
        Ok(dirs)
    }

    /// A block's `shared = [...]`: declared names, each once.
    fn block_shared(
        &self,
        index: usize,
        block: &RawBlock,
        shared: &[Arc<SharedDir>],
    ) -> Result<Vec<Arc<SharedDir>>, ManifestError> {
        let Some(list) = &block.shared else {
            return Ok(Vec::new());
        };
        let mut listed: Vec<Arc<SharedDir>> = Vec::with_capacity(list.get_ref().len());
        for (i, name) in list.get_ref().iter().enumerate() {
            let error = |message: String| {
                self.error(
                    Some(name.span()),
                    Some(format!("blocks[{index}].shared[{i}]")),
                    message,
                )
            };
            let Some(dir) = shared.iter().find(|d| d.name == *name.get_ref()) else {
                return Err(error(format!(
                    "unknown shared directory `{}`: {}",
                    printable(name.get_ref()),
                    if shared.is_empty() {
                        "the manifest declares none; declare it with a `[[shared]]` table (`name`, `source = \"dir/\"`)".to_string()
                    } else {
                        format!(
                            "the manifest declares {}; declare it with a `[[shared]]` table or fix the name",
                            shared.iter().map(|d| format!("`{}`", d.name)).collect::<Vec<_>>().join(", ")
                        )
                    }
                )));
            };
            if listed.iter().any(|d| d.name == dir.name) {
                return Err(error(format!(
                    "`{}` is listed twice: list each shared directory once",
                    dir.name
                )));
            }
            listed.push(dir.clone());
        }
        Ok(listed)
    }

    /// Every declared shared directory is listed by some block.
    fn check_shared_listed(
        &self,
        raw: &RawManifest,
        manifest: &Manifest,
    ) -> Result<(), ManifestError> {
        for (index, dir) in manifest.shared.iter().enumerate() {
            let listed = manifest
                .blocks
                .iter()
                .any(|b| b.shared.iter().any(|d| d.name == dir.name));
            if !listed {
                return Err(self.error(
                    Some(raw.shared[index].span()),
                    Some(format!("shared[{index}]")),
                    format!(
                        "shared directory `{}` is listed by no block, so no instance would see it: add `shared = [\"{}\"]` to the blocks that use it, or remove the table",
                        dir.name, dir.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Context<'_> {
    /// A block's `env` table: valid names, no reserved ones, no NUL byte, and at most
    /// [`limits::MAX_ENV_BYTES`] of names and values together — anything else would deploy
    /// and then fail every start of the block's instances. A value is a string or `{ secret
    /// = "name" }` (one of the project's secrets, returned apart: variable → secret name;
    /// its value is counted when the instance starts, not here).
    #[allow(clippy::type_complexity)]
    fn env(
        &self,
        index: usize,
        env: &Spanned<BTreeMap<Spanned<String>, Spanned<toml::Value>>>,
    ) -> Result<(BTreeMap<String, String>, BTreeMap<String, String>), ManifestError> {
        let field = |key: &str| Some(format!("blocks[{index}].env.{key}"));
        let mut total = 0usize;
        let mut largest: Option<(&Spanned<String>, usize)> = None;
        let mut plain = BTreeMap::new();
        let mut secrets = BTreeMap::new();
        for (key, value) in env.get_ref() {
            let name = key.get_ref();
            if let Err(message) = check_env_name(name) {
                return Err(self.error(Some(key.span()), field(&printable(name)), message));
            }
            let text = match value.get_ref() {
                toml::Value::String(text) => text,
                toml::Value::Table(table) => {
                    let secret = match (table.get("secret"), table.len()) {
                        (Some(toml::Value::String(secret)), 1) => secret,
                        _ => {
                            return Err(self.error(
                                Some(value.span()),
                                field(name),
                                "expected a string or `{ secret = \"name\" }` (one of the project's secrets; set it with `refinery secrets set PROJECT NAME`)".into(),
                            ))
                        }
                    };
                    if !is_valid_name(secret) {
                        return Err(self.error(
                            Some(value.span()),
                            field(name),
                            format!("invalid secret name `{}`: expected {NAME_RULE}", printable(secret)),
                        ));
                    }
                    secrets.insert(name.clone(), secret.clone());
                    continue;
                }
                other => {
                    return Err(self.error(
                        Some(value.span()),
                        field(name),
                        format!(
                            "expected a string or `{{ secret = \"name\" }}`, got a {}: quote it (`{name} = \"{other}\"`)",
                            other.type_str()
                        ),
                    ))
                }
            };
            if let Some(at) = text.find('\0') {
                return Err(self.error(
                    Some(value.span()),
                    field(name),
                    format!(
                        "the value holds a NUL byte (\\u0000) at byte {at}: an environment variable cannot contain one; remove it"
                    ),
                ));
            }
            let size = name.len() + text.len();
            total += size;
            if largest.is_none_or(|(_, most)| size > most) {
                largest = Some((key, size));
            }
            plain.insert(name.clone(), text.clone());
        }
        if let Some((key, size)) = largest.filter(|_| total > limits::MAX_ENV_BYTES) {
            return Err(self.error(
                Some(key.span()),
                Some(format!("blocks[{index}].env")),
                format!(
                    "the block's variables take {total} bytes (names and values together; the largest, `{}`, {size} bytes); the limit is {} bytes for all of a block's variables together: pass large data as the block's input, or put it in its code",
                    key.get_ref(),
                    limits::MAX_ENV_BYTES
                ),
            ));
        }
        Ok((plain, secrets))
    }
}

impl Context<'_> {
    /// Every trigger table, parsed, with each name located for the uniqueness check.
    fn triggers<'r>(&self, raw: &'r RawManifest) -> Result<Triggers<'r>, ManifestError> {
        let mut t = Triggers::default();
        for (index, e) in raw.endpoints.iter().enumerate() {
            t.endpoints.push(self.endpoint(index, e.get_ref())?);
            t.names
                .push((NodeKind::Endpoint, "endpoints", index, &e.get_ref().name));
        }
        for (index, r) in raw.responses.iter().enumerate() {
            t.responses.push(self.response(index, r.get_ref())?);
            t.names
                .push((NodeKind::Response, "responses", index, &r.get_ref().name));
        }
        for (index, timer) in raw.timers.iter().enumerate() {
            t.timers.push(self.timer(index, timer.get_ref())?);
            t.names
                .push((NodeKind::Timer, "timers", index, &timer.get_ref().name));
        }
        for (index, q) in raw.queues.iter().enumerate() {
            t.queues.push(self.queue(index, q.get_ref())?);
            t.names
                .push((NodeKind::Queue, "queues", index, &q.get_ref().name));
        }
        for (index, topic) in raw.topics.iter().enumerate() {
            t.topics.push(self.topic(index, topic.get_ref())?);
            t.names
                .push((NodeKind::Topic, "topics", index, &topic.get_ref().name));
        }
        // Two endpoints answering the same requests would be ambiguous.
        for (index, e) in t.endpoints.iter().enumerate() {
            if let Some(first) = t.endpoints[..index]
                .iter()
                .position(|o| o.method == e.method && o.path.shape() == e.path.shape())
            {
                return Err(self.error(
                    Some(raw.endpoints[index].get_ref().path.span()),
                    Some(format!("endpoints[{index}].path")),
                    format!(
                        "`{} {}` answers the same requests as endpoint `{}` (`{} {}`): give one another path or method",
                        e.method.as_str(),
                        e.path.as_str(),
                        t.endpoints[first].name,
                        t.endpoints[first].method.as_str(),
                        t.endpoints[first].path.as_str()
                    ),
                ));
            }
        }
        Ok(t)
    }

    /// The rules that tie triggers to transitions: an endpoint and a timer start at least one
    /// block, a queue has exactly one consumer.
    fn check_wiring(&self, raw: &RawManifest, manifest: &Manifest) -> Result<(), ManifestError> {
        let starts = |name: &str| manifest.trigger_targets(name).len();
        for (index, e) in manifest.endpoints.iter().enumerate() {
            if starts(&e.name) == 0 {
                return Err(self.error(
                    Some(raw.endpoints[index].span()),
                    Some(format!("endpoints[{index}]")),
                    format!(
                        "endpoint `{}` starts nothing: add a transition `from = \"{}\"`, `to` a block, `type = \"then\"`",
                        e.name, e.name
                    ),
                ));
            }
        }
        for (index, timer) in manifest.timers.iter().enumerate() {
            if starts(&timer.name) == 0 {
                return Err(self.error(
                    Some(raw.timers[index].span()),
                    Some(format!("timers[{index}]")),
                    format!(
                        "timer `{}` starts nothing: add a transition `from = \"{}\"`, `to` a block, `type = \"then\"`",
                        timer.name, timer.name
                    ),
                ));
            }
        }
        for (index, q) in manifest.queues.iter().enumerate() {
            let consumers = manifest.trigger_targets(&q.name);
            if consumers.len() != 1 {
                return Err(self.error(
                    Some(raw.queues[index].span()),
                    Some(format!("queues[{index}]")),
                    if consumers.is_empty() {
                        format!(
                            "queue `{}` has no consumer: add one transition `from = \"{}\"`, `to` the block that processes its messages, `type = \"then\"`",
                            q.name, q.name
                        )
                    } else {
                        format!(
                            "queue `{}` has {} consumers ({}): a queue has exactly one consumer block; to deliver to several, publish to a topic",
                            q.name,
                            consumers.len(),
                            consumers.join(", ")
                        )
                    },
                ));
            }
        }
        Ok(())
    }

    /// A block's `retry` table.
    fn retry(&self, index: usize, raw: &Spanned<RawRetry>) -> Result<RetryPolicy, ManifestError> {
        let field = |name: &str| Some(format!("blocks[{index}].retry.{name}"));
        let retry = raw.get_ref();
        let attempts = *retry.attempts.get_ref();
        if !(1..=i64::from(retry_limits::MAX_ATTEMPTS)).contains(&attempts) {
            return Err(self.error(
                Some(retry.attempts.span()),
                field("attempts"),
                format!(
                    "expected an integer from 1 to {}, got {attempts}: `attempts` counts every try, the first included (1 = no retry)",
                    retry_limits::MAX_ATTEMPTS
                ),
            ));
        }
        let interval_s = match &retry.interval_s {
            None => retry_limits::DEFAULT_INTERVAL_S,
            Some(v) if (0..=i64::from(retry_limits::MAX_INTERVAL_S)).contains(v.get_ref()) => {
                // In 0..=3600: fits in u32.
                *v.get_ref() as u32
            }
            Some(v) => {
                return Err(self.error(
                    Some(v.span()),
                    field("interval_s"),
                    format!(
                        "expected an integer from 0 to {} (seconds before the second try), got {}",
                        retry_limits::MAX_INTERVAL_S,
                        v.get_ref()
                    ),
                ))
            }
        };
        let backoff = match &retry.backoff {
            None => retry_limits::DEFAULT_BACKOFF,
            Some(v)
                if (retry_limits::MIN_BACKOFF..=retry_limits::MAX_BACKOFF)
                    .contains(v.get_ref()) =>
            {
                *v.get_ref()
            }
            Some(v) => {
                return Err(self.error(
                    Some(v.span()),
                    field("backoff"),
                    format!(
                        "expected a number from {:.1} to {:.1} (each wait is the previous one times this; 1.0 = a fixed interval), got {}",
                        retry_limits::MIN_BACKOFF,
                        retry_limits::MAX_BACKOFF,
                        v.get_ref()
                    ),
                ))
            }
        };
        Ok(RetryPolicy {
            attempts: attempts as u32,
            interval_s,
            backoff,
        })
    }

    /// `[[transitions]]`: each one on its own, then the rules that involve several.
    fn transitions(
        &self,
        raw: &[Spanned<RawTransition>],
        kinds: &BTreeMap<String, NodeKind>,
    ) -> Result<Vec<Transition>, ManifestError> {
        if let Some(over) = raw.get(MAX_TRANSITIONS) {
            return Err(self.error(
                Some(over.span()),
                Some(format!("transitions[{MAX_TRANSITIONS}]")),
                format!(
                    "the project declares {} transitions; the limit is {MAX_TRANSITIONS}: split it into several projects",
                    raw.len()
                ),
            ));
        }
        let names: Vec<&str> = kinds
            .iter()
            .filter(|(_, kind)| **kind == NodeKind::Block)
            .map(|(name, _)| name.as_str())
            .collect();
        let mut transitions: Vec<Transition> = Vec::with_capacity(raw.len());
        for (index, raw_transition) in raw.iter().enumerate() {
            let transition = self.transition(index, raw_transition, kinds)?;
            if let Some(first) = transitions.iter().find(|t| {
                (&t.from, &t.to, t.kind, &t.expression)
                    == (
                        &transition.from,
                        &transition.to,
                        transition.kind,
                        &transition.expression,
                    )
            }) {
                let first_line = line_and_column(self.text, raw[first.id].span().start).0;
                return Err(self.error(
                    Some(raw_transition.span()),
                    Some(format!("transitions[{index}]")),
                    format!(
                        "duplicate transition: the same `from`, `to`, `type` and `expression` as transitions[{}] (line {first_line}); remove one",
                        first.id
                    ),
                ));
            }
            transitions.push(transition);
        }

        for t in transitions
            .iter()
            .filter(|t| t.kind == TransitionType::Else)
        {
            let from = &t.from[0];
            let has_if = transitions
                .iter()
                .any(|o| o.kind == TransitionType::If && o.from[0] == *from);
            if !has_if {
                return Err(self.error(
                    Some(raw[t.id].get_ref().kind.span()),
                    Some(format!("transitions[{}].type", t.id)),
                    format!(
                        "`else` fires when none of its block's `if` transitions held, but `{from}` has no `if` transition: add one from `{from}`, or make this a `then`"
                    ),
                ));
            }
        }

        let open = fan_out_reach(&names, &transitions);
        for t in transitions
            .iter()
            .filter(|t| t.kind == TransitionType::FanIn)
        {
            let from = &t.from[0];
            if !open.contains(from.as_str()) {
                return Err(self.error(
                    Some(raw[t.id].get_ref().kind.span()),
                    Some(format!("transitions[{}].type", t.id)),
                    format!(
                        "a `fan-in` gathers the items of a `fan-out`, but no `fan-out` leads to `{from}`: add a `fan-out` transition upstream of `{from}`, or make this a `then`"
                    ),
                ));
            }
        }
        Ok(transitions)
    }

    fn transition(
        &self,
        index: usize,
        raw: &Spanned<RawTransition>,
        kinds: &BTreeMap<String, NodeKind>,
    ) -> Result<Transition, ManifestError> {
        let field = |name: &str| Some(format!("transitions[{index}].{name}"));
        let t = raw.get_ref();
        let kind: TransitionType = t
            .kind
            .get_ref()
            .parse()
            .map_err(|message| self.error(Some(t.kind.span()), field("type"), message))?;

        let from_error = |message: String| self.error(Some(t.from.span()), field("from"), message);
        let from: Vec<String> = match (t.from.get_ref(), kind) {
            (toml::Value::String(_), TransitionType::Merge) => {
                return Err(from_error(
                    "a `merge` waits for several blocks: give `from` a list of two or more, e.g. `from = [\"a\", \"b\"]`".into(),
                ))
            }
            (toml::Value::String(name), _) => vec![name.clone()],
            (toml::Value::Array(_), kind) if kind != TransitionType::Merge => {
                return Err(from_error(format!(
                    "`from` is a list, which only `merge` takes: a `{kind}` transition has one source block; write `from = \"a\"`, one transition per source"
                )))
            }
            (toml::Value::Array(items), _) => {
                let mut list: Vec<String> = Vec::with_capacity(items.len());
                for item in items {
                    let toml::Value::String(name) = item else {
                        return Err(from_error(format!(
                            "expected block names (strings) in the list, found {}",
                            item.type_str()
                        )));
                    };
                    if list.contains(name) {
                        return Err(from_error(format!(
                            "`{name}` is listed twice: a `merge` waits for each of its blocks once"
                        )));
                    }
                    list.push(name.clone());
                }
                if list.len() < 2 {
                    return Err(from_error(format!(
                        "a `merge` needs at least two blocks in `from`, got {}: list every branch it waits for, or use `then` for one",
                        list.len()
                    )));
                }
                list
            }
            (other, _) => {
                return Err(from_error(format!(
                    "expected a block name (a string), or for `merge` a list of block names; found {}",
                    other.type_str()
                )))
            }
        };
        for name in &from {
            match kinds.get(name) {
                None => return Err(from_error(unknown_name(name, kinds))),
                Some(NodeKind::Block) => {}
                Some(NodeKind::Response) => {
                    return Err(from_error(format!(
                        "`{name}` is a response, which ends a pipeline: a transition starts at a block or a trigger (endpoint, timer, queue, topic)"
                    )))
                }
                Some(trigger) if kind == TransitionType::Then => {
                    if from.len() > 1 {
                        return Err(from_error(format!(
                            "`{name}` is a {trigger}: a `merge` waits for blocks only"
                        )));
                    }
                }
                Some(trigger) => {
                    return Err(from_error(format!(
                        "`{name}` is a {trigger}: a trigger starts blocks with `type = \"then\"` only, and this one is `{kind}`"
                    )))
                }
            }
        }
        let to = t.to.get_ref();
        let to_error = |message: String| self.error(Some(t.to.span()), field("to"), message);
        let source_is_block = kinds.get(&from[0]) == Some(&NodeKind::Block);
        match kinds.get(to) {
            None => return Err(to_error(unknown_name(to, kinds))),
            Some(NodeKind::Block) => {}
            Some(target @ (NodeKind::Endpoint | NodeKind::Timer)) => {
                return Err(to_error(format!(
                    "`{to}` is a {target}, which starts runs and cannot be a transition's target: `to` is a block, a queue, a topic or a response"
                )))
            }
            Some(target) if !source_is_block => {
                return Err(to_error(format!(
                    "`{to}` is a {target}; a trigger's transitions lead to blocks: add a block between them"
                )))
            }
            Some(target) if kind != TransitionType::Then => {
                return Err(to_error(format!(
                    "`{to}` is a {target}: a block's output goes to a {target} with `type = \"then\"` only, and this one is `{kind}`"
                )))
            }
            Some(_) => {}
        }

        let expression = match (&t.expression, kind) {
            (None, TransitionType::If) => {
                return Err(self.error(
                    Some(raw.span()),
                    field("expression"),
                    "missing: an `if` transition needs `expression = \"...\"`, a CEL condition over output (alias return_data), input and backpack, e.g. `expression = \"output.total > 0\"`".into(),
                ))
            }
            (None, _) => None,
            (Some(e), TransitionType::If) => {
                Some(Expression::compile(e.get_ref()).map_err(|message| {
                    self.error(
                        Some(e.span()),
                        field("expression"),
                        format!("invalid CEL expression `{}`: {message}", e.get_ref()),
                    )
                })?)
            }
            (Some(e), kind) => {
                return Err(self.error(
                    Some(e.span()),
                    field("expression"),
                    format!(
                        "only `if` transitions take an expression, and this one is `{kind}`: remove `expression`, or make it `type = \"if\"`"
                    ),
                ))
            }
        };
        Ok(Transition {
            id: index,
            from,
            to: to.clone(),
            kind,
            expression,
        })
    }
}

/// "unknown name `x`: ..." listing the names there are.
fn unknown_name(name: &str, kinds: &BTreeMap<String, NodeKind>) -> String {
    const SHOWN: usize = 20;
    let mut known = kinds
        .iter()
        .take(SHOWN)
        .map(|(n, kind)| format!("`{n}` ({kind})"))
        .collect::<Vec<_>>()
        .join(", ");
    if kinds.len() > SHOWN {
        known.push_str(&format!(" and {} more", kinds.len() - SHOWN));
    }
    format!(
        "unknown name `{}`: a transition connects the blocks and triggers of this manifest ({known})",
        printable(name)
    )
}

/// The blocks that some path of transitions reaches with a `fan-out` still open (more
/// `fan-out`s than `fan-in`s passed), starting anywhere: where a `fan-in` may start.
fn fan_out_reach<'a>(names: &[&'a str], transitions: &'a [Transition]) -> BTreeSet<&'a str> {
    // Depth is bounded by the number of fan-outs: deeper states add nothing.
    let cap = transitions
        .iter()
        .filter(|t| t.kind == TransitionType::FanOut)
        .count();
    if cap == 0 {
        return BTreeSet::new();
    }
    let mut leaving: BTreeMap<&str, Vec<&Transition>> = BTreeMap::new();
    for t in transitions {
        for from in &t.from {
            leaving.entry(from.as_str()).or_default().push(t);
        }
    }
    // Each (block, depth) is visited once: at most (fan-outs + 1) × transitions steps.
    let mut seen: BTreeSet<(&str, usize)> = names.iter().map(|n| (*n, 0)).collect();
    let mut queue: Vec<(&str, usize)> = seen.iter().copied().collect();
    while let Some((block, depth)) = queue.pop() {
        for t in leaving.get(block).into_iter().flatten() {
            let next = match t.kind {
                TransitionType::FanOut => (depth + 1).min(cap),
                TransitionType::FanIn if depth == 0 => continue,
                TransitionType::FanIn => depth - 1,
                _ => depth,
            };
            if seen.insert((t.to.as_str(), next)) {
                queue.push((t.to.as_str(), next));
            }
        }
    }
    seen.into_iter()
        .filter(|(_, depth)| *depth > 0)
        .map(|(block, _)| block)
        .collect()
}

/// A variable name as it can be shown in a field path (control characters escaped).
fn printable(name: &str) -> String {
    name.escape_debug().to_string()
}

/// The file name a `source` path is stored under; the path must stay beside the manifest.
fn source_file_name(path: &str) -> Result<String, String> {
    let invalid = || {
        format!("`{path}` must be a relative path to a file inside the project directory (no `..`, no absolute path)")
    };
    if path.is_empty() || path.starts_with('/') || path.split('/').any(|part| part == "..") {
        return Err(invalid());
    }
    let file_name = path.rsplit('/').next().unwrap_or(path);
    let valid_chars = file_name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if file_name.is_empty() || file_name.starts_with('.') || !valid_chars {
        return Err(format!(
            "`{path}`: the file name may hold only letters, digits, '.', '-' and '_', and may not start with '.'"
        ));
    }
    Ok(file_name.to_string())
}

fn check_env_name(key: &str) -> Result<(), String> {
    let mut chars = key.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "invalid variable name `{}`: expected ASCII letters, digits and '_', not starting with a digit",
            printable(key)
        ));
    }
    if RESERVED_ENV.contains(&key) || key.starts_with(RESERVED_ENV_PREFIX) {
        return Err(format!(
            "`{key}` is set by the platform and cannot be overridden (reserved: {}, {RESERVED_ENV_PREFIX}*)",
            RESERVED_ENV.join(", ")
        ));
    }
    Ok(())
}

/// 1-based line and column of byte `offset` in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trigger::{EndpointAuth, HttpMethod};

    fn no_files(path: &str) -> Result<String, String> {
        Err(format!("no file `{path}`"))
    }

    fn parse(text: &str) -> Result<Manifest, ManifestError> {
        Manifest::parse(text, "refinery.toml", &no_files)
    }

    #[test]
    fn parses_a_full_manifest_with_defaults() {
        let files = |path: &str| match path {
            "src/greet.py" => Ok("def main(i, b):\n    return i\n".to_string()),
            _ => Err("missing".to_string()),
        };
        let text = r#"
name = "hello"

[[blocks]]
name = "greet"
language = "python"
source = "src/greet.py"
memory_mb = 256
timeout_s = 10
max_concurrency = 5
env = { GREETING = "hi" }

[[blocks]]
name = "echo"
language = "shell"
code = "cat"
"#;
        let manifest = Manifest::parse(text, "refinery.toml", &files).expect("valid");
        assert_eq!(manifest.name, "hello");
        let greet = &manifest.blocks[0];
        assert_eq!(greet.source_name, "greet.py");
        assert_eq!(greet.memory_mb, 256);
        assert_eq!(greet.env.get("GREETING").map(String::as_str), Some("hi"));
        let echo = &manifest.blocks[1];
        assert_eq!(echo.source_name, "echo.sh");
        assert_eq!(echo.memory_mb, limits::DEFAULT_MEMORY_MB);
        assert_eq!(echo.timeout_s, limits::DEFAULT_TIMEOUT_S);
        assert_eq!(echo.keep_alive_s, None);
    }

    #[test]
    fn out_of_range_field_is_located() {
        let text = "name = \"p\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\ncode = \"x\"\nmemory_mb = 64\n";
        let err = parse(text).expect_err("memory too small");
        assert_eq!(err.line, Some(6));
        assert_eq!(err.field.as_deref(), Some("blocks[0].memory_mb"));
        let shown = err.to_string();
        assert!(shown.starts_with("refinery.toml:6:"), "{shown}");
        assert!(shown.contains("from 128 to 3008"), "{shown}");
    }

    #[test]
    fn min_warm_defaults_to_zero_and_may_not_exceed_max_concurrency() {
        let base = "name = \"p\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\ncode = \"x\"\nmax_concurrency = 3\n";
        let manifest = parse(base).expect("valid");
        assert_eq!(manifest.blocks[0].min_warm, 0);
        let manifest = parse(&format!("{base}min_warm = 3\n")).expect("valid");
        assert_eq!(manifest.blocks[0].min_warm, 3);
        let err = parse(&format!("{base}min_warm = 4\n")).expect_err("too many");
        assert_eq!(err.line, Some(7));
        assert_eq!(err.field.as_deref(), Some("blocks[0].min_warm"));
        assert!(err.message.contains("max_concurrency = 3"), "{err}");
        let err = parse(&format!("{base}min_warm = -1\n")).expect_err("negative");
        assert!(err.message.contains("from 0"), "{err}");
    }

    #[test]
    fn unknown_language_names_the_choices() {
        let text = "name = \"p\"\n[[blocks]]\nname = \"b\"\nlanguage = \"ruby\"\ncode = \"x\"\n";
        let err = parse(text).expect_err("ruby");
        assert_eq!(err.line, Some(4));
        assert!(err.message.contains("python, node, shell"), "{err}");
    }

    #[test]
    fn unknown_key_is_an_error_with_its_line() {
        let text = "name = \"p\"\n[[blocks]]\nname = \"b\"\nlanguage = \"node\"\ncode = \"x\"\nmemroy_mb = 5\n";
        let err = parse(text).expect_err("typo");
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("memroy_mb"), "{err}");
    }

    #[test]
    fn secret_variables_directories_and_handlers() {
        let block = "name = \"p\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\n";
        let m = parse(&format!(
            "{block}code = \"x\"\nenv = {{ TOKEN = {{ secret = \"api-token\" }}, A = \"1\" }}\n"
        ))
        .expect("secret env");
        assert_eq!(m.blocks[0].secret_env["TOKEN"], "api-token");
        assert_eq!(m.blocks[0].env.get("TOKEN"), None);
        assert_eq!(m.blocks[0].env["A"], "1");
        for bad in [
            "{ secret = 1 }",
            "{ secret = \"a\", other = \"b\" }",
            "{ secret = \"Bad Name\" }",
            "3",
        ] {
            let err =
                parse(&format!("{block}code = \"x\"\nenv = {{ T = {bad} }}\n")).expect_err(bad);
            assert_eq!(
                err.field.as_deref(),
                Some("blocks[0].env.T"),
                "{bad}: {err}"
            );
        }

        let files: BTreeMap<String, String> = [
            ("src/app.py", "def handle(i, b): pass\n"),
            ("src/helper.py", "X = 1\n"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let text = format!("{block}source = \"src/\"\nhandler = \"app.handle\"\n");
        let m = Manifest::parse(&text, "refinery.toml", &Uploaded(&files)).expect("dir");
        let b = &m.blocks[0];
        assert_eq!(
            (b.source_name.as_str(), b.function.as_str()),
            ("app.py", "handle")
        );
        assert_eq!(b.files.keys().collect::<Vec<_>>(), vec!["helper.py"]);
        let text = format!("{block}source = \"src/\"\n");
        let err = Manifest::parse(&text, "refinery.toml", &Uploaded(&files)).expect_err("main");
        assert!(err.message.contains("`main.py`"), "{err}");

        let err = parse(&format!("{block}code = \"x\"\nhandler = \"other.go\"\n"))
            .expect_err("single file handler");
        assert_eq!(err.field.as_deref(), Some("blocks[0].handler"), "{err}");
        let m = parse(&format!("{block}code = \"x\"\nhandler = \"b.go\"\n")).expect("own file");
        assert_eq!(m.blocks[0].function, "go");
    }

    #[test]
    fn toml_syntax_error_is_located() {
        let err = parse("name = \"p\"\n[[blocks]\n").expect_err("syntax");
        assert_eq!(err.line, Some(2));
    }

    #[test]
    fn missing_source_file_and_escaping_paths_are_rejected() {
        let text =
            "name = \"p\"\n[[blocks]]\nname = \"b\"\nlanguage = \"python\"\nsource = \"main.py\"\n";
        let err = parse(text).expect_err("no file");
        assert!(err.message.contains("cannot read `main.py`"), "{err}");
        let text = text.replace("main.py", "../secret.py");
        let err = parse(&text).expect_err("escape");
        assert!(err.message.contains("relative path"), "{err}");
    }

    #[test]
    fn duplicate_blocks_reserved_env_and_empty_projects_are_rejected() {
        let block = "[[blocks]]\nname = \"b\"\nlanguage = \"shell\"\ncode = \"x\"\n";
        let err = parse(&format!("name = \"p\"\n{block}{block}")).expect_err("dup");
        assert!(err.message.contains("duplicate block name"), "{err}");
        let err = parse(&format!("name = \"p\"\n{block}env = {{ PATH = \"/x\" }}\n"))
            .expect_err("reserved");
        assert_eq!(err.field.as_deref(), Some("blocks[0].env.PATH"));
        let err = parse("name = \"p\"\n").expect_err("empty");
        assert!(err.message.contains("no blocks"), "{err}");
        let err = parse(&format!("name = \"Bad Name\"\n{block}")).expect_err("name");
        assert_eq!(err.line, Some(1));
    }

    #[test]
    fn env_names_nul_bytes_and_total_size_are_checked_where_they_are() {
        let block = "name = \"p\"\n[[blocks]]\nname = \"b\"\nlanguage = \"shell\"\ncode = \"x\"\n";
        let err = parse(&format!(
            "{block}env = {{ OK = \"1\", BAD = \"a\\u0000b\" }}\n"
        ))
        .expect_err("nul");
        assert_eq!(err.field.as_deref(), Some("blocks[0].env.BAD"));
        assert_eq!((err.line, err.column), (Some(6), Some(25)), "{err}");
        assert!(err.message.contains("NUL"), "{err}");
        let err = parse(&format!(
            "{block}[blocks.env]\nA = \"x\"\nREFINERY_X = \"y\"\n"
        ))
        .expect_err("reserved");
        assert_eq!(err.field.as_deref(), Some("blocks[0].env.REFINERY_X"));
        assert_eq!(err.line, Some(8), "{err}");
        let err = parse(&format!("{block}env = {{ \"A-B\" = \"x\" }}\n")).expect_err("name");
        assert_eq!(err.field.as_deref(), Some("blocks[0].env.A-B"));
        assert!(err.message.contains("invalid variable name"), "{err}");

        // Names and values together: exactly the limit is accepted, one byte more is not.
        let value = "v".repeat(limits::MAX_ENV_BYTES - "A".len() - "BB".len() - 1);
        let at_limit = format!("{block}env = {{ A = \"{value}\", BB = \"x\" }}\n");
        let manifest = parse(&at_limit).expect("at the limit");
        assert_eq!(manifest.blocks[0].env["A"].len(), value.len());
        let err = parse(&at_limit.replace("\"x\"", "\"xy\"")).expect_err("over");
        assert_eq!(err.field.as_deref(), Some("blocks[0].env"));
        assert_eq!(err.line, Some(6));
        assert!(err.message.contains("4097 bytes"), "{err}");
        assert!(err.message.contains("`A`"), "{err}");
        assert!(err.message.contains("4096 bytes"), "{err}");
    }

    #[test]
    fn network_is_opt_in_and_must_be_a_boolean() {
        let block = "[[blocks]]\nname = \"b\"\nlanguage = \"shell\"\ncode = \"x\"\n";
        let m = parse(&format!("name = \"p\"\n{block}")).expect("valid");
        assert!(!m.blocks[0].network);
        let m = parse(&format!("name = \"p\"\n{block}network = true\n")).expect("valid");
        assert!(m.blocks[0].network);
        let err = parse(&format!("name = \"p\"\n{block}network = \"yes\"\n")).expect_err("type");
        assert_eq!(err.line, Some(6), "{err}");
        assert!(err.message.contains("bool"), "{err}");
    }

    // --- services: log_level, retry, transitions ---

    const TWO_BLOCKS: &str = "name = \"p\"\n[[blocks]]\nname = \"a\"\nlanguage = \"shell\"\ncode = \"x\"\n[[blocks]]\nname = \"b\"\nlanguage = \"shell\"\ncode = \"x\"\n[[blocks]]\nname = \"c\"\nlanguage = \"shell\"\ncode = \"x\"\n";
    /// Lines of TWO_BLOCKS (its transitions start on the next line).
    const BASE_LINES: usize = 13;

    fn with_transitions(transitions: &str) -> Result<Manifest, ManifestError> {
        parse(&format!("{TWO_BLOCKS}{transitions}"))
    }

    fn transition(from: &str, to: &str, kind: &str) -> String {
        format!("[[transitions]]\nfrom = {from}\nto = \"{to}\"\ntype = \"{kind}\"\n")
    }

    #[test]
    fn a_manifest_without_services_keeps_the_defaults() {
        let m = parse(TWO_BLOCKS).expect("valid");
        assert_eq!(m.log_level, LogLevel::All);
        assert!(m.retry.is_empty());
        assert!(m.transitions.is_empty());
        assert!(!m.is_service());
    }

    #[test]
    fn every_transition_type_parses() {
        let text = [
            transition("\"a\"", "b", "then"),
            "[[transitions]]\nfrom = \"a\"\nto = \"c\"\ntype = \"if\"\nexpression = \"output.ok\"\n".into(),
            transition("\"a\"", "b", "else"),
            transition("\"a\"", "c", "exception"),
            transition("\"b\"", "c", "fan-out"),
            transition("\"c\"", "a", "fan-in"),
            transition("[\"b\", \"a\"]", "c", "merge"),
        ]
        .concat();
        let m = with_transitions(&text).expect("valid");
        assert!(m.is_service());
        let kinds: Vec<TransitionType> = m.transitions.iter().map(|t| t.kind).collect();
        assert_eq!(kinds, TransitionType::ALL.to_vec());
        assert_eq!(
            m.transitions[1].expression.as_ref().map(Expression::source),
            Some("output.ok")
        );
        assert!(m
            .transitions
            .iter()
            .filter(|t| t.kind != TransitionType::If)
            .all(|t| t.expression.is_none()));
        assert_eq!(m.transitions[6].from, ["b", "a"]);
        assert_eq!(m.transitions[4].id, 4);
        assert_eq!(m.transitions[3].to, "c");
    }

    #[test]
    fn log_level_parses_and_names_its_choices() {
        for level in LogLevel::ALL {
            let m =
                parse(&format!("log_level = \"{}\"\n{TWO_BLOCKS}", level.as_str())).expect("valid");
            assert_eq!(m.log_level, level);
        }
        let err = parse(&format!("log_level = \"debug\"\n{TWO_BLOCKS}")).expect_err("unknown");
        assert_eq!(
            (err.line, err.field.as_deref()),
            (Some(1), Some("log_level"))
        );
        assert!(err.message.contains("all"), "{err}");
        assert!(err.message.contains("errors"), "{err}");
        assert!(err.message.contains("none"), "{err}");
    }

    #[test]
    fn retry_parses_with_defaults_and_bounds() {
        let block = "name = \"p\"\n[[blocks]]\nname = \"a\"\nlanguage = \"shell\"\ncode = \"x\"\n";
        let m = parse(&format!(
            "{block}retry = {{ attempts = 3, interval_s = 5, backoff = 1.5 }}\n"
        ))
        .expect("valid");
        assert_eq!(
            m.retry["a"],
            RetryPolicy {
                attempts: 3,
                interval_s: 5,
                backoff: 1.5
            }
        );
        let m = parse(&format!("{block}retry = {{ attempts = 2, backoff = 3 }}\n"))
            .expect("integer backoff");
        assert_eq!(
            m.retry["a"],
            RetryPolicy {
                attempts: 2,
                interval_s: 1,
                backoff: 3.0
            }
        );
        for (retry, field, expected) in [
            ("{ attempts = 0 }", "attempts", "from 1 to 10"),
            ("{ attempts = 11 }", "attempts", "from 1 to 10"),
            (
                "{ attempts = 2, interval_s = -1 }",
                "interval_s",
                "from 0 to 3600",
            ),
            (
                "{ attempts = 2, interval_s = 3601 }",
                "interval_s",
                "from 0 to 3600",
            ),
            (
                "{ attempts = 2, backoff = 0.5 }",
                "backoff",
                "from 1.0 to 10.0",
            ),
            (
                "{ attempts = 2, backoff = 11.0 }",
                "backoff",
                "from 1.0 to 10.0",
            ),
            (
                "{ attempts = 2, backoff = nan }",
                "backoff",
                "from 1.0 to 10.0",
            ),
        ] {
            let err = parse(&format!("{block}retry = {retry}\n")).expect_err(retry);
            assert_eq!(err.line, Some(6), "{err}");
            assert_eq!(
                err.field.as_deref(),
                Some(format!("blocks[0].retry.{field}").as_str()),
                "{err}"
            );
            assert!(err.message.contains(expected), "{err}");
        }
        let err =
            parse(&format!("{block}retry = {{ interval_s = 1 }}\n")).expect_err("no attempts");
        assert!(err.message.contains("attempts"), "{err}");
        let err =
            parse(&format!("{block}retry = {{ attempts = 2, tries = 1 }}\n")).expect_err("unknown");
        assert!(err.message.contains("tries"), "{err}");
    }

    /// Parses `transitions` after the three blocks and returns the error's (line, field,
    /// message), the line counted from the first transition line (1).
    fn transition_error(transitions: &str) -> (usize, String, String) {
        let err = with_transitions(transitions).expect_err(transitions);
        assert_eq!(err.file, "refinery.toml");
        let line = err.line.expect("located") - BASE_LINES;
        (line, err.field.clone().unwrap_or_default(), err.message)
    }

    #[test]
    fn unknown_blocks_are_named_with_the_known_ones() {
        let (line, field, message) = transition_error(&transition("\"a\"", "nope", "then"));
        assert_eq!((line, field.as_str()), (3, "transitions[0].to"));
        assert!(message.contains("unknown name `nope`"), "{message}");
        assert!(
            message.contains("`a` (block), `b` (block), `c` (block)"),
            "{message}"
        );
        let (line, field, message) = transition_error(&transition("\"x\"", "a", "then"));
        assert_eq!((line, field.as_str()), (2, "transitions[0].from"));
        assert!(message.contains("unknown name `x`"), "{message}");
        let (line, field, message) = transition_error(&transition("[\"a\", \"zz\"]", "c", "merge"));
        assert_eq!((line, field.as_str()), (2, "transitions[0].from"));
        assert!(message.contains("`zz`"), "{message}");
    }

    #[test]
    fn unknown_types_name_the_choices() {
        let (line, field, message) = transition_error(&transition("\"a\"", "b", "next"));
        assert_eq!((line, field.as_str()), (4, "transitions[0].type"));
        assert!(
            message.contains("then | if | else | exception | fan-out | fan-in | merge"),
            "{message}"
        );
        let err =
            with_transitions("[[transitions]]\nfrom = \"a\"\nto = \"b\"\n").expect_err("no type");
        assert!(err.message.contains("type"), "{err}");
    }

    #[test]
    fn if_needs_an_expression_and_only_if_takes_one() {
        let (line, field, message) = transition_error(&transition("\"a\"", "b", "if"));
        assert_eq!((line, field.as_str()), (1, "transitions[0].expression"));
        assert!(message.contains("needs `expression"), "{message}");
        let (line, field, message) = transition_error(&format!(
            "{}expression = \"output.ok\"\n",
            transition("\"a\"", "b", "then")
        ));
        assert_eq!((line, field.as_str()), (5, "transitions[0].expression"));
        assert!(
            message.contains("only `if` transitions take an expression"),
            "{message}"
        );
        assert!(message.contains("`then`"), "{message}");
    }

    #[test]
    fn a_cel_syntax_error_names_the_line_and_the_expression() {
        let text = format!(
            "{}\nexpression = \"output.total >\"\n",
            transition("\"a\"", "b", "if")
        );
        let err = with_transitions(&text).expect_err("syntax");
        assert_eq!(err.line, Some(BASE_LINES + 6), "{err}");
        assert_eq!(err.field.as_deref(), Some("transitions[0].expression"));
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("refinery.toml:{}:", BASE_LINES + 6)),
            "{shown}"
        );
        assert!(
            shown.contains("invalid CEL expression `output.total >`"),
            "{shown}"
        );
        assert!(shown.contains("at 1:"), "{shown}");
        let text = format!(
            "{}expression = \"outptu.ok\"\n",
            transition("\"a\"", "b", "if")
        );
        let (line, _, message) = transition_error(&text);
        assert_eq!(line, 5);
        assert!(message.contains("unknown variable `outptu`"), "{message}");
    }

    #[test]
    fn merge_needs_a_list_of_two_and_other_types_one_source() {
        let (line, field, message) = transition_error(&transition("\"a\"", "c", "merge"));
        assert_eq!((line, field.as_str()), (2, "transitions[0].from"));
        assert!(message.contains("two or more"), "{message}");
        let (_, _, message) = transition_error(&transition("[\"a\"]", "c", "merge"));
        assert!(
            message.contains("at least two blocks in `from`, got 1"),
            "{message}"
        );
        let (_, _, message) = transition_error(&transition("[\"a\", \"a\"]", "c", "merge"));
        assert!(message.contains("listed twice"), "{message}");
        let (_, _, message) = transition_error(&transition("[\"a\", 3]", "c", "merge"));
        assert!(message.contains("found integer"), "{message}");
        let (line, field, message) = transition_error(&transition("[\"a\", \"b\"]", "c", "then"));
        assert_eq!((line, field.as_str()), (2, "transitions[0].from"));
        assert!(message.contains("only `merge` takes"), "{message}");
        let (_, _, message) = transition_error(&transition("7", "c", "then"));
        assert!(message.contains("expected a block name"), "{message}");
    }

    #[test]
    fn else_needs_an_if_from_the_same_block() {
        let text = [
            "[[transitions]]\nfrom = \"b\"\nto = \"c\"\ntype = \"if\"\nexpression = \"output.ok\"\n".to_string(),
            transition("\"a\"", "c", "else"),
        ]
        .concat();
        let (line, field, message) = transition_error(&text);
        assert_eq!((line, field.as_str()), (9, "transitions[1].type"));
        assert!(message.contains("`a` has no `if` transition"), "{message}");
        with_transitions(&text.replace("from = \"a\"", "from = \"b\"")).expect("else after an if");
    }

    #[test]
    fn fan_in_must_be_downstream_of_a_fan_out() {
        let (line, field, message) = transition_error(
            &[
                transition("\"a\"", "b", "then"),
                transition("\"b\"", "c", "fan-in"),
            ]
            .concat(),
        );
        assert_eq!((line, field.as_str()), (8, "transitions[1].type"));
        assert!(message.contains("no `fan-out` leads to `b`"), "{message}");
        // Directly after the fan-out, and a few steps further down.
        with_transitions(
            &[
                transition("\"a\"", "b", "fan-out"),
                transition("\"b\"", "c", "fan-in"),
            ]
            .concat(),
        )
        .expect("direct");
        with_transitions(
            &[
                transition("\"a\"", "b", "fan-out"),
                transition("\"b\"", "c", "then"),
                transition("\"c\"", "a", "fan-in"),
            ]
            .concat(),
        )
        .expect("downstream");
        // A fan-in closes its fan-out: a second fan-in needs a second fan-out.
        let closed = [
            transition("\"a\"", "b", "fan-out"),
            transition("\"b\"", "c", "fan-in"),
            transition("\"c\"", "a", "fan-in"),
        ]
        .concat();
        let (_, field, _) = transition_error(&closed);
        assert_eq!(field, "transitions[2].type");
        // Nested fan-outs: two fan-ins.
        let text = "name = \"p\"\n".to_string()
            + &["a", "b", "c", "d", "e"]
                .map(|n| {
                    format!("[[blocks]]\nname = \"{n}\"\nlanguage = \"shell\"\ncode = \"x\"\n")
                })
                .concat()
            + &[
                transition("\"a\"", "b", "fan-out"),
                transition("\"b\"", "c", "fan-out"),
                transition("\"c\"", "d", "fan-in"),
                transition("\"d\"", "e", "fan-in"),
            ]
            .concat();
        parse(&text).expect("nested");
    }

    #[test]
    fn identical_transitions_are_refused_and_cycles_allowed() {
        let t = transition("\"a\"", "b", "then");
        let (line, field, message) = transition_error(&format!("{t}{t}"));
        assert_eq!((line, field.as_str()), (5, "transitions[1]"));
        assert!(message.contains("duplicate transition"), "{message}");
        assert!(
            message.contains(&format!("transitions[0] (line {})", BASE_LINES + 1)),
            "{message}"
        );
        // Same edge with another type, or another expression: not a duplicate.
        let if_ok = "[[transitions]]\nfrom = \"a\"\nto = \"b\"\ntype = \"if\"\nexpression = \"output.ok\"\n";
        with_transitions(&format!(
            "{t}{if_ok}{}",
            if_ok.replace("output.ok", "!output.ok")
        ))
        .expect("distinct");
        let (_, field, _) = transition_error(&format!("{if_ok}{if_ok}"));
        assert_eq!(field, "transitions[1]");
        // A loop through an `if`, and a block to itself.
        let m = with_transitions(&format!(
            "{t}{}{}",
            if_ok.replace("from = \"a\"\nto = \"b\"", "from = \"b\"\nto = \"a\""),
            transition("\"c\"", "c", "then")
        ))
        .expect("cycles");
        assert_eq!(m.transitions.len(), 3);
    }

    #[test]
    fn transitions_are_limited_in_number() {
        let t = |i: usize| {
            format!("[[transitions]]\nfrom = \"a\"\nto = \"b\"\ntype = \"if\"\nexpression = \"output == {i}\"\n")
        };
        let at_limit: String = (0..MAX_TRANSITIONS).map(t).collect();
        let m = with_transitions(&at_limit).expect("at the limit");
        assert_eq!(m.transitions.len(), MAX_TRANSITIONS);
        let (line, field, message) = transition_error(&format!("{at_limit}{}", t(MAX_TRANSITIONS)));
        assert_eq!(line, 5 * MAX_TRANSITIONS + 1);
        assert_eq!(field, format!("transitions[{MAX_TRANSITIONS}]"));
        assert!(
            message.contains("declares 1001 transitions; the limit is 1000"),
            "{message}"
        );
    }

    const TRIGGERS: &str = r#"
[[endpoints]]
name = "api"
method = "POST"
path = "/orders/{id}"
cors = { allow_origins = ["https://app.example.com"] }

[[endpoints]]
name = "hook"
method = "ANY"
path = "/hook"
auth = "key"
timeout_s = 5

[[responses]]
name = "reply"

[[timers]]
name = "nightly"
schedule = "cron(0 2 * * ? *)"
input = { full = true, n = 3 }

[[queues]]
name = "urls"
batch_size = 5
visibility_timeout_s = 10

[[topics]]
name = "events"

[[transitions]]
from = "api"
to = "a"
type = "then"

[[transitions]]
from = "hook"
to = "b"
type = "then"

[[transitions]]
from = "a"
to = "reply"
type = "then"

[[transitions]]
from = "nightly"
to = "a"
type = "then"

[[transitions]]
from = "urls"
to = "b"
type = "then"

[[transitions]]
from = "a"
to = "urls"
type = "then"

[[transitions]]
from = "events"
to = "a"
type = "then"

[[transitions]]
from = "b"
to = "events"
type = "then"
"#;

    #[test]
    fn triggers_parse_with_defaults() {
        let m = parse(&format!("{TWO_BLOCKS}{TRIGGERS}")).expect("valid");
        assert_eq!(m.endpoints.len(), 2);
        let api = &m.endpoints[0];
        assert_eq!(
            (api.method, api.path.as_str()),
            (HttpMethod::Post, "/orders/{id}")
        );
        assert_eq!((api.auth, api.timeout_s), (EndpointAuth::None, 29));
        let cors = api.cors.as_ref().expect("cors");
        assert_eq!(cors.allow_origins, ["https://app.example.com"]);
        assert_eq!(cors.allow_headers, ["content-type", "authorization"]);
        assert_eq!(
            (m.endpoints[1].auth, m.endpoints[1].timeout_s),
            (EndpointAuth::Key, 5)
        );
        assert_eq!(m.timers[0].input, serde_json::json!({"full": true, "n": 3}));
        let q = m.queue("urls").expect("queue");
        assert_eq!(
            (q.batch_size, q.visibility_timeout_s, q.max_receive_count),
            (5, 10, 5)
        );
        assert_eq!(m.node_kind("events"), Some(NodeKind::Topic));
        assert_eq!(m.node_kind("reply"), Some(NodeKind::Response));
        assert_eq!(m.trigger_targets("urls"), ["b"]);
        let graph = m.graph();
        assert_eq!(graph.kind("urls"), Some(NodeKind::Queue));
        assert_eq!(graph.kind("a"), Some(NodeKind::Block));
    }

    #[test]
    fn trigger_errors_are_located_and_say_how_to_fix_them() {
        let route = |method: &str, path: &str| {
            format!("[[endpoints]]\nname = \"e\"\nmethod = \"{method}\"\npath = \"{path}\"\n[[transitions]]\nfrom = \"e\"\nto = \"a\"\ntype = \"then\"\n")
        };
        for (extra, field, needle) in [
            (route("FETCH", "/x"), "endpoints[0].method", "unknown method `FETCH`"),
            (route("GET", "x"), "endpoints[0].path", "start with `/`"),
            (
                "[[endpoints]]\nname = \"e\"\nmethod = \"GET\"\npath = \"/x\"\n".into(),
                "endpoints[0]",
                "starts nothing",
            ),
            (
                format!("{}[[endpoints]]\nname = \"f\"\nmethod = \"GET\"\npath = \"/{{other}}\"\n[[transitions]]\nfrom = \"f\"\nto = \"a\"\ntype = \"then\"\n", route("GET", "/{id}")),
                "endpoints[1].path",
                "answers the same requests as endpoint `e`",
            ),
            (
                "[[timers]]\nname = \"t\"\nschedule = \"rate(5 fortnights)\"\n".into(),
                "timers[0].schedule",
                "unknown unit",
            ),
            ("[[queues]]\nname = \"q\"\n".into(), "queues[0]", "has no consumer"),
            (
                "[[queues]]\nname = \"q\"\nbatch_size = 11\n".into(),
                "queues[0].batch_size",
                "from 1 to 10",
            ),
            (
                "[[queues]]\nname = \"q\"\n[[transitions]]\nfrom = \"q\"\nto = \"a\"\ntype = \"then\"\n[[transitions]]\nfrom = \"q\"\nto = \"b\"\ntype = \"then\"\n".into(),
                "queues[0]",
                "has 2 consumers",
            ),
            ("[[topics]]\nname = \"a\"\n".into(), "topics[0].name", "already the name of a block"),
            (
                "[[topics]]\nname = \"t\"\n[[transitions]]\nfrom = \"t\"\nto = \"a\"\ntype = \"fan-out\"\n".into(),
                "transitions[0].from",
                "only, and this one is",
            ),
            (
                "[[responses]]\nname = \"r\"\n[[transitions]]\nfrom = \"r\"\nto = \"a\"\ntype = \"then\"\n".into(),
                "transitions[0].from",
                "ends a pipeline",
            ),
            (
                "[[responses]]\nname = \"r\"\n[[transitions]]\nfrom = \"a\"\nto = \"r\"\ntype = \"exception\"\n".into(),
                "transitions[0].to",
                "only, and this one is",
            ),
            (
                "[[topics]]\nname = \"t\"\n[[queues]]\nname = \"q\"\n[[transitions]]\nfrom = \"t\"\nto = \"q\"\ntype = \"then\"\n".into(),
                "transitions[0].to",
                "lead to blocks",
            ),
            (
                format!("{}[[transitions]]\nfrom = \"a\"\nto = \"e\"\ntype = \"then\"\n", route("GET", "/x")),
                "transitions[1].to",
                "cannot be a transition's target",
            ),
        ] {
            let err = parse(&format!("{TWO_BLOCKS}{extra}")).expect_err(&extra);
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
            assert!(err.line.is_some_and(|l| l > BASE_LINES), "{err}");
            assert!(err.message.contains(needle), "{needle}: {err}");
        }
        let err = parse(&format!("{TWO_BLOCKS}[[widgets]]\nname = \"w\"\n")).expect_err("other");
        assert!(err.message.contains("unknown field `widgets`"), "{err}");
    }

    #[test]
    fn the_graph_answers_what_fires_after_a_block() {
        use serde_json::json;
        let text = [
            transition("\"a\"", "b", "then"),
            "[[transitions]]\nfrom = \"a\"\nto = \"c\"\ntype = \"if\"\nexpression = \"output.n > 1\"\n".into(),
            "[[transitions]]\nfrom = \"a\"\nto = \"b\"\ntype = \"if\"\nexpression = \"backpack.go\"\n".into(),
            transition("\"a\"", "c", "else"),
            transition("\"a\"", "b", "exception"),
            transition("[\"a\", \"b\"]", "c", "merge"),
        ]
        .concat();
        let m = with_transitions(&text).expect("valid");
        let graph = m.graph();
        assert_eq!(graph.starts(), ["a"]);
        let fired = |output, backpack| -> Vec<usize> {
            graph
                .after_success("a", &output, &json!(null), &backpack)
                .expect("evaluates")
                .iter()
                .map(|t| t.id)
                .collect()
        };
        assert_eq!(fired(json!({"n": 2}), json!({"go": true})), [0, 1, 2, 5]);
        assert_eq!(fired(json!({"n": 2}), json!({"go": false})), [0, 1, 5]);
        assert_eq!(
            fired(json!({"n": 0}), json!({"go": false})),
            [0, 3, 5],
            "else when no if held"
        );
        let err = graph
            .after_success("a", &json!({"n": 2}), &json!(null), &json!({}))
            .expect_err("no backpack.go");
        assert_eq!(err.expression, "backpack.go");
        assert_eq!(
            graph
                .on_exception("a")
                .iter()
                .map(|t| t.id)
                .collect::<Vec<_>>(),
            [4]
        );
        assert!(graph.on_exception("b").is_empty());
        assert_eq!(graph.outgoing("b", TransitionType::Merge).len(), 1);
        assert_eq!(
            graph
                .merge_groups()
                .map(|t| t.from.clone())
                .collect::<Vec<_>>(),
            [vec!["a".to_string(), "b".to_string()]]
        );
        assert!(graph
            .after_success("c", &json!(1), &json!(null), &json!({}))
            .expect("no edges")
            .is_empty());
        assert_eq!(
            graph.transition(5).map(|t| t.kind),
            Some(TransitionType::Merge)
        );
    }

    #[test]
    fn shared_directories_are_declared_listed_and_checked() {
        use crate::source::UploadedFiles;
        let text: BTreeMap<String, String> = [
            ("common/util.py", "X = 1\n"),
            ("a.py", "def main(i, b): pass\n"),
            ("b.py", "def main(i, b): pass\n"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let binary: BTreeMap<String, Vec<u8>> = [("common/blob.bin".to_string(), vec![0xff, 0])]
            .into_iter()
            .collect();
        let files = UploadedFiles {
            text: &text,
            binary: &binary,
        };
        let head = "name = \"p\"\n[[shared]]\nname = \"common\"\nsource = \"common/\"\n";
        let blocks = "[[blocks]]\nname = \"a\"\nlanguage = \"python\"\nsource = \"a.py\"\nshared = [\"common\"]\n\
                      [[blocks]]\nname = \"b\"\nlanguage = \"python\"\nsource = \"b.py\"\n";
        let m = Manifest::parse(&format!("{head}{blocks}"), "refinery.toml", &files).expect("ok");
        assert_eq!(m.shared.len(), 1);
        assert_eq!(m.shared[0].files["util.py"], b"X = 1\n");
        assert_eq!(m.shared[0].files["blob.bin"], vec![0xff, 0]);
        assert_eq!(m.blocks[0].shared.len(), 1);
        assert!(m.blocks[1].shared.is_empty());
        assert!(Manifest::referenced_sources(&format!("{head}{blocks}"))
            .contains(&"common/".to_string()));

        let cases = [
            (
                format!("{head}{}", blocks.replace("[\"common\"]", "[\"comon\"]")),
                "blocks[0].shared[0]",
                "unknown shared directory `comon`",
            ),
            (
                format!(
                    "{head}{}",
                    blocks.replace("[\"common\"]", "[\"common\", \"common\"]")
                ),
                "blocks[0].shared[1]",
                "listed twice",
            ),
            (
                format!(
                    "{head}{head_again}{blocks}",
                    head_again = "[[shared]]\nname = \"common\"\nsource = \"other/\"\n"
                ),
                "shared[1].name",
                "duplicate shared directory name",
            ),
            (
                format!("{}{blocks}", head.replace("common/\"", "missing/\"")),
                "shared[0].source",
                "cannot read `missing/`",
            ),
            (
                format!("{}{blocks}", head.replace("common/\"", "a.py\"")),
                "shared[0].source",
                "overlaps the source of block `a`",
            ),
            (
                format!("{}{blocks}", head.replace("common/\"", "../x/\"")),
                "shared[0].source",
                "relative path",
            ),
            (
                format!("{head}{}", blocks.replace("shared = [\"common\"]\n", "")),
                "shared[0]",
                "listed by no block",
            ),
        ];
        for (manifest, field, message) in cases {
            let err = Manifest::parse(&manifest, "refinery.toml", &files).expect_err(field);
            assert_eq!(err.field.as_deref(), Some(field), "{err}");
            assert!(err.message.contains(message), "{err}");
            assert!(err.line.is_some(), "{err}");
        }
    }

    #[test]
    fn directory_sources_carry_binary_files_but_not_a_binary_handler() {
        use crate::source::UploadedFiles;
        let text: BTreeMap<String, String> = [("src/main.py", "def main(i, b): pass\n")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let all_bytes: Vec<u8> = (0..=255).collect();
        let mut binary: BTreeMap<String, Vec<u8>> =
            [("src/data/blob.bin".to_string(), all_bytes.clone())]
                .into_iter()
                .collect();
        let block =
            "name = \"p\"\n[[blocks]]\nname = \"a\"\nlanguage = \"python\"\nsource = \"src/\"\n";
        let files = UploadedFiles {
            text: &text,
            binary: &binary,
        };
        let m = Manifest::parse(block, "refinery.toml", &files).expect("ok");
        assert_eq!(m.blocks[0].binary_files["data/blob.bin"], all_bytes);
        assert_eq!(m.blocks[0].code_bytes(), text["src/main.py"].len() + 256);
        binary.insert("src/app.py".into(), vec![0xff]);
        let files = UploadedFiles {
            text: &text,
            binary: &binary,
        };
        let err = Manifest::parse(
            &format!("{block}handler = \"app.main\"\n"),
            "refinery.toml",
            &files,
        )
        .expect_err("binary handler");
        assert!(err.message.contains("not UTF-8 text"), "{err}");
        binary.insert("src/big.bin".into(), vec![0; limits::MAX_SOURCE_BYTES + 1]);
        let files = UploadedFiles {
            text: &text,
            binary: &binary,
        };
        let err = Manifest::parse(block, "refinery.toml", &files).expect_err("too big");
        assert!(err.message.contains("big.bin"), "{err}");
    }
}
