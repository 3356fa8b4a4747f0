//! Services: a project's blocks connected by transitions, as the manifest defines them.
//!
//! This module owns the definitions the services engine runs — the per-project
//! [`LogLevel`], a block's [`RetryPolicy`], the [`Transition`]s with their compiled `if`
//! [`Expression`]s (CEL), and the [`ServiceGraph`] that answers "what fires after block X
//! with this output". Parsing and the located validation errors are in
//! [`crate::manifest`]; nothing here does I/O or runs anything.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, LazyLock};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value as Json;

use crate::trigger::NodeKind;

/// How much of a run the store keeps (`log_level`, per project).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Every step's input, output, logs and backpack (the default).
    #[default]
    All,
    /// Payloads only for failed steps; status and timing for the rest.
    Errors,
    /// Status and timing only.
    None,
}

impl LogLevel {
    pub const ALL: [LogLevel; 3] = [LogLevel::All, LogLevel::Errors, LogLevel::None];

    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::All => "all",
            LogLevel::Errors => "errors",
            LogLevel::None => "none",
        }
    }
}

/// Bounds of a block's `retry = { attempts, interval_s, backoff }`.
pub mod retry_limits {
    /// `attempts` counts every try, the first included: 1 (no retry) to 10.
    pub const MAX_ATTEMPTS: u32 = 10;
    /// `interval_s`: the wait before the second try, 0 to 3600 s (default 1).
    pub const MAX_INTERVAL_S: u32 = 3600;
    pub const DEFAULT_INTERVAL_S: u32 = 1;
    /// `backoff`: each further wait is the previous one times this, 1.0 to 10.0 (default 2.0).
    pub const MIN_BACKOFF: f64 = 1.0;
    pub const MAX_BACKOFF: f64 = 10.0;
    pub const DEFAULT_BACKOFF: f64 = 2.0;
    /// No single wait is longer than this, whatever the backoff makes of it.
    pub const MAX_DELAY_S: f64 = 3600.0;
}

/// A block's retry policy: how often a failed step is tried again, and how long to wait.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Tries in all, the first included (so `attempts = 3` is up to two retries).
    pub attempts: u32,
    pub interval_s: u32,
    pub backoff: f64,
}

impl RetryPolicy {
    /// The wait before try number `attempt` (1-based; the first try has none):
    /// `interval_s × backoff^(attempt − 2)`, at most [`retry_limits::MAX_DELAY_S`].
    /// `None` when `attempt` is past [`RetryPolicy::attempts`].
    pub fn delay_before(&self, attempt: u32) -> Option<std::time::Duration> {
        if attempt <= 1 {
            return (attempt == 1).then_some(std::time::Duration::ZERO);
        }
        if attempt > self.attempts {
            return None;
        }
        let exponent = i32::try_from(attempt - 2).unwrap_or(i32::MAX);
        let seconds = (f64::from(self.interval_s) * self.backoff.powi(exponent))
            .min(retry_limits::MAX_DELAY_S);
        Some(std::time::Duration::from_secs_f64(seconds))
    }
}

// A policy's backoff is always finite (validated), so equality is total in practice.
impl Eq for RetryPolicy {}

/// The kinds of transition (`type = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransitionType {
    Then,
    If,
    Else,
    Exception,
    FanOut,
    FanIn,
    Merge,
}

impl TransitionType {
    pub const ALL: [TransitionType; 7] = [
        TransitionType::Then,
        TransitionType::If,
        TransitionType::Else,
        TransitionType::Exception,
        TransitionType::FanOut,
        TransitionType::FanIn,
        TransitionType::Merge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransitionType::Then => "then",
            TransitionType::If => "if",
            TransitionType::Else => "else",
            TransitionType::Exception => "exception",
            TransitionType::FanOut => "fan-out",
            TransitionType::FanIn => "fan-in",
            TransitionType::Merge => "merge",
        }
    }

    /// The choices, for error messages: `then | if | ... | merge`.
    pub fn choices() -> String {
        TransitionType::ALL.map(TransitionType::as_str).join(" | ")
    }
}

impl fmt::Display for TransitionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TransitionType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TransitionType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown transition type `{s}`: expected one of {}",
                    TransitionType::choices()
                )
            })
    }
}

/// One `[[transitions]]` entry, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Its position among the manifest's `[[transitions]]` (0-based): a stable id for the
    /// engine's deterministic step ids.
    pub id: usize,
    /// The source block; exactly one, except for `merge` (two or more, in the order the
    /// manifest lists them — the order of the target's input list).
    pub from: Vec<String>,
    pub to: String,
    #[serde(rename = "type")]
    pub kind: TransitionType,
    /// `if` only (and always there for `if`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expression: Option<Expression>,
}

/// How deep fan-outs are followed when looking for the fan-in that closes one.
const MAX_FAN_OUT_NESTING: usize = 64;

/// The most `[[transitions]]` one manifest may declare.
pub const MAX_TRANSITIONS: usize = 1000;

/// The longest `expression` accepted, in bytes.
pub const MAX_EXPRESSION_BYTES: usize = 1024;

/// The deepest an expression may nest: brackets (`(`, `[`, `{`) in its text, and operations
/// inside operations in its syntax tree. CEL's parser and evaluator recurse once per level
/// and a few dozen levels exhaust a thread's stack: deeper expressions are refused at deploy.
pub const MAX_EXPRESSION_DEPTH: usize = 24;

/// The variables an expression can use.
pub const EXPRESSION_VARIABLES: [&str; 4] = ["output", "return_data", "input", "backpack"];

/// CEL's type names, which an expression may use as values (`type(output) == map`).
const CEL_TYPE_NAMES: [&str; 11] = [
    "int",
    "uint",
    "double",
    "bool",
    "string",
    "bytes",
    "list",
    "map",
    "null_type",
    "type",
    "dyn",
];

/// The stack of the thread that parses an expression (reserved, not committed: only the
/// pages the parser touches are used).
const COMPILE_STACK_BYTES: usize = 64 << 20;

thread_local! {
    /// Whether this thread is one [`with_compile_stack`] started.
    static ON_COMPILE_STACK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `work` on a thread with a stack large enough for CEL's parser (which recurses
/// deeply even for short inputs), so that compiling many expressions — a manifest's — costs
/// one thread, not one each: [`Expression::compile`] inside `work` parses in place.
pub fn with_compile_stack<T: Send>(work: impl FnOnce() -> T + Send) -> Result<T, String> {
    if ON_COMPILE_STACK.get() {
        return Ok(work());
    }
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("cel-compile".into())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn_scoped(scope, || {
                ON_COMPILE_STACK.set(true);
                work()
            })
            .map_err(|e| format!("could not start the expression compiler: {e}"))?
            .join()
            .map_err(|_| "the expression compiler failed".to_string())
    })
}

/// The CEL environment every expression is compiled and run in: CEL's standard library
/// (no timestamp, duration, regex or encoder extensions).
static CEL_ENV: LazyLock<Arc<cel::Env>> = LazyLock::new(|| Arc::new(cel::Env::stdlib()));

/// An `if` transition's condition: a CEL expression over `output` (alias `return_data`),
/// `input` and `backpack`, compiled once when the manifest is parsed.
///
/// It serialises as its source text; deserialising compiles it again (a compiled program
/// is not data), so a stored deployment's graph is rebuilt on load.
#[derive(Clone)]
pub struct Expression {
    source: String,
    program: Arc<cel::IdedExpr>,
}

/// An `if` expression that could not be evaluated to a boolean: it fails the step (which
/// then takes its `exception` transitions).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ExpressionError: the `if` expression `{expression}` {reason}")]
pub struct ExpressionError {
    pub expression: String,
    /// What went wrong, e.g. `failed: No such key: total` or `evaluated to a string
    /// ("yes"), not a bool: ...`.
    pub reason: String,
}

impl Expression {
    /// Compiles `source`: at most [`MAX_EXPRESSION_BYTES`], nested at most
    /// [`MAX_EXPRESSION_DEPTH`] deep, using only [`EXPRESSION_VARIABLES`] (and the variables
    /// its own macros bind, as `i` in `output.items.exists(i, i.ok)`). The error says what
    /// is wrong; for a syntax error, where in the expression (`line:column`).
    pub fn compile(source: &str) -> Result<Expression, String> {
        if source.len() > MAX_EXPRESSION_BYTES {
            return Err(format!(
                "the expression is {} bytes; the limit is {MAX_EXPRESSION_BYTES} bytes",
                source.len()
            ));
        }
        if source.trim().is_empty() {
            return Err(
                "the expression is empty: write a condition, e.g. `output.total > 0`".into(),
            );
        }
        let nesting = bracket_depth(source);
        if nesting > MAX_EXPRESSION_DEPTH {
            return Err(too_deep(nesting));
        }
        let program = if ON_COMPILE_STACK.get() {
            compile_checked(source)?
        } else {
            with_compile_stack(|| compile_checked(source))??
        };
        Ok(Expression {
            source: source.to_string(),
            program: Arc::new(program),
        })
    }

    /// The expression as written in the manifest.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Evaluates the expression for one finished step: `output` (also bound as
    /// `return_data`), the step's `input` and the `backpack` after it. Anything but a
    /// boolean result, and any runtime error (a missing field, a type mismatch, ...), is an
    /// [`ExpressionError`].
    pub fn evaluate(
        &self,
        output: &Json,
        input: &Json,
        backpack: &Json,
    ) -> Result<bool, ExpressionError> {
        let fail = |reason: String| ExpressionError {
            expression: self.source.clone(),
            reason,
        };
        let mut context = cel::Context::with_env(Arc::clone(&CEL_ENV));
        let output = to_cel(output);
        context.add_variable_from_value("return_data", output.clone());
        context.add_variable_from_value("output", output);
        context.add_variable_from_value("input", to_cel(input));
        context.add_variable_from_value("backpack", to_cel(backpack));
        match cel::Value::resolve(&self.program, &context) {
            Ok(cel::Value::Bool(holds)) => Ok(holds),
            Ok(other) => Err(fail(format!(
                "evaluated to {}, not a bool: an `if` expression must be true or false (compare \
                 the value, e.g. `output.status == \"ok\"`)",
                describe(&other)
            ))),
            Err(error) => Err(fail(format!("failed: {error}"))),
        }
    }
}

impl fmt::Debug for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Expression {}

impl Serialize for Expression {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Expression {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let source = String::deserialize(deserializer)?;
        Expression::compile(&source).map_err(|message| {
            serde::de::Error::custom(format!("invalid CEL expression `{source}`: {message}"))
        })
    }
}

/// Parses `source` and checks its tree (on the big-stack thread: a tree that is too deep
/// is also dropped there).
fn compile_checked(source: &str) -> Result<cel::IdedExpr, String> {
    const SHOWN_ERRORS: usize = 3;
    let program = CEL_ENV.parser().parse(source).map_err(|errors| {
        let mut shown = errors
            .errors
            .iter()
            .take(SHOWN_ERRORS)
            .map(|e| {
                // The parser counts columns from 0; people count from 1.
                format!("at {}:{}: {}", e.pos.0, e.pos.1 + 1, e.msg)
            })
            .collect::<Vec<_>>()
            .join("; ");
        if errors.errors.len() > SHOWN_ERRORS {
            shown.push_str(&format!(
                " (and {} more)",
                errors.errors.len() - SHOWN_ERRORS
            ));
        }
        shown
    })?;
    let depth = tree_depth(&program);
    if depth > MAX_EXPRESSION_DEPTH {
        return Err(too_deep(depth));
    }
    let mut bound = Vec::new();
    if let Some(name) = unknown_variable(&program, &mut bound) {
        return Err(format!(
            "unknown variable `{name}`: an expression can use {}",
            "output (alias return_data), input and backpack"
        ));
    }
    Ok(program)
}

fn too_deep(depth: usize) -> String {
    format!(
        "the expression nests {depth} levels deep; the limit is {MAX_EXPRESSION_DEPTH}: split \
         it, or compute the value in the block and test its output"
    )
}

/// The deepest nesting of brackets in `source`, outside string literals.
fn bracket_depth(source: &str) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for c in source.chars() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '"' | '\'' => quote = Some(c),
                '(' | '[' | '{' => {
                    depth += 1;
                    deepest = deepest.max(depth);
                }
                ')' | ']' | '}' => depth = depth.saturating_sub(1),
                _ => {}
            },
        }
    }
    deepest
}

/// The children of one node of an expression tree.
fn children(expr: &cel::IdedExpr) -> Vec<&cel::IdedExpr> {
    use cel::common::ast::Expr;
    match &expr.expr {
        Expr::Call(call) => call.target.iter().map(|t| &**t).chain(&call.args).collect(),
        Expr::Comprehension(c) => vec![
            &c.iter_range,
            &c.accu_init,
            &c.loop_cond,
            &c.loop_step,
            &c.result,
        ],
        Expr::List(list) => list.elements.iter().collect(),
        Expr::Map(map) => entry_children(&map.entries),
        Expr::Struct(s) => entry_children(&s.entries),
        Expr::Select(select) => vec![&*select.operand],
        _ => Vec::new(),
    }
}

/// The sub-expressions of a map literal's or a message's entries.
fn entry_children(entries: &[cel::common::ast::IdedEntryExpr]) -> Vec<&cel::IdedExpr> {
    use cel::common::ast::EntryExpr;
    entries
        .iter()
        .flat_map(|e| match &e.expr {
            EntryExpr::StructField(f) => vec![&f.value],
            EntryExpr::MapEntry(m) => vec![&m.key, &m.value],
        })
        .collect()
}

fn tree_depth(expr: &cel::IdedExpr) -> usize {
    1 + children(expr)
        .into_iter()
        .map(tree_depth)
        .max()
        .unwrap_or(0)
}

/// The first variable `expr` uses that is neither an expression variable, a CEL type
/// name, nor bound by an enclosing macro (`bound`).
fn unknown_variable<'e>(expr: &'e cel::IdedExpr, bound: &mut Vec<&'e str>) -> Option<String> {
    use cel::common::ast::Expr;
    match &expr.expr {
        Expr::Ident(name) => {
            let known = name.starts_with('@')
                || EXPRESSION_VARIABLES.contains(&name.as_str())
                || CEL_TYPE_NAMES.contains(&name.as_str())
                || bound.contains(&name.as_str());
            (!known).then(|| name.clone())
        }
        Expr::Comprehension(c) => {
            if let Some(name) = unknown_variable(&c.iter_range, bound) {
                return Some(name);
            }
            let before = bound.len();
            bound.push(&c.accu_var);
            bound.push(&c.iter_var);
            if let Some(second) = &c.iter_var2 {
                bound.push(second);
            }
            let found = [&c.accu_init, &c.loop_cond, &c.loop_step, &c.result]
                .into_iter()
                .find_map(|e| unknown_variable(e, bound));
            bound.truncate(before);
            found
        }
        _ => children(expr)
            .into_iter()
            .find_map(|e| unknown_variable(e, bound)),
    }
}

/// JSON to CEL: integers that fit stay `int` (so `output.total > 0` compares an int with
/// an int), larger positive ones are `uint`, the rest `double`.
fn to_cel(value: &Json) -> cel::Value {
    match value {
        Json::Null => cel::Value::Null,
        Json::Bool(b) => cel::Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => cel::Value::Int(i),
            (None, Some(u), _) => cel::Value::UInt(u),
            (_, _, Some(f)) => cel::Value::Float(f),
            _ => cel::Value::Null,
        },
        Json::String(s) => cel::Value::String(Arc::new(s.clone())),
        Json::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Json::Object(fields) => {
            let map: HashMap<cel::objects::Key, cel::Value> = fields
                .iter()
                .map(|(k, v)| (cel::objects::Key::from(k.as_str()), to_cel(v)))
                .collect();
            cel::Value::Map(cel::objects::Map::from(map))
        }
    }
}

/// A CEL value as an error message names it.
fn describe(value: &cel::Value) -> String {
    let short = |text: String| {
        if text.chars().count() > 60 {
            format!("{}...", text.chars().take(60).collect::<String>())
        } else {
            text
        }
    };
    match value {
        cel::Value::Int(i) => format!("an int ({i})"),
        cel::Value::UInt(u) => format!("a uint ({u})"),
        cel::Value::Float(f) => format!("a double ({f})"),
        cel::Value::String(s) => format!("a string ({})", short(format!("{s:?}"))),
        cel::Value::Null => "null".into(),
        cel::Value::List(l) => format!("a list of {} items", l.len()),
        cel::Value::Map(m) => format!("a map of {} entries", m.map.len()),
        cel::Value::Bytes(b) => format!("bytes ({} bytes)", b.len()),
        other => format!("a {:?}", other.type_of()),
    }
}

/// The transitions of a service, indexed for the engine: per block its outgoing
/// transitions by type, the merge groups, and the starting points. Built once per
/// deployment ([`crate::Manifest::graph`]); every query is a map look-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceGraph {
    transitions: Vec<Transition>,
    outgoing: BTreeMap<String, Outgoing>,
    starts: Vec<String>,
    kinds: BTreeMap<String, NodeKind>,
}

/// One block's outgoing transitions (indices into the graph's transitions), by type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Outgoing {
    by_type: BTreeMap<TransitionType, Vec<usize>>,
}

impl ServiceGraph {
    /// Indexes `transitions` (validated ones: [`crate::Manifest::parse`]) over `nodes`
    /// (every name with its kind, in manifest order: [`crate::Manifest::nodes`]).
    pub fn new(nodes: &[(String, NodeKind)], transitions: &[Transition]) -> ServiceGraph {
        let mut outgoing: BTreeMap<String, Outgoing> = nodes
            .iter()
            .map(|(name, _)| (name.clone(), Outgoing::default()))
            .collect();
        let mut targeted = std::collections::BTreeSet::new();
        for (index, transition) in transitions.iter().enumerate() {
            targeted.insert(transition.to.as_str());
            for from in &transition.from {
                outgoing
                    .entry(from.clone())
                    .or_default()
                    .by_type
                    .entry(transition.kind)
                    .or_default()
                    .push(index);
            }
        }
        let starts = nodes
            .iter()
            .filter(|(name, kind)| *kind == NodeKind::Block && !targeted.contains(name.as_str()))
            .map(|(name, _)| name.clone())
            .collect();
        ServiceGraph {
            transitions: transitions.to_vec(),
            outgoing,
            starts,
            kinds: nodes.iter().cloned().collect(),
        }
    }

    /// What `name` is: a block, a trigger or a response; `None` if the service has no such
    /// name.
    pub fn kind(&self, name: &str) -> Option<NodeKind> {
        self.kinds.get(name).copied()
    }

    /// Every transition, in manifest order (a transition's `id` is its index here).
    pub fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    /// The transition with this id.
    pub fn transition(&self, id: usize) -> Option<&Transition> {
        self.transitions.get(id)
    }

    /// Blocks no transition leads to, in manifest order: where a run naturally starts (a
    /// run may also be started at any other block).
    pub fn starts(&self) -> &[String] {
        &self.starts
    }

    /// `block`'s outgoing transitions of one type, in manifest order (for `merge`: the
    /// groups it is a source of).
    pub fn outgoing(&self, block: &str, kind: TransitionType) -> Vec<&Transition> {
        self.outgoing
            .get(block)
            .and_then(|o| o.by_type.get(&kind))
            .map(|ids| {
                ids.iter()
                    .filter_map(|&i| self.transitions.get(i))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every `merge` transition: each is one group, whose target runs once all its sources
    /// (in `from` order) have finished in a run.
    pub fn merge_groups(&self) -> impl Iterator<Item = &Transition> {
        self.transitions
            .iter()
            .filter(|t| t.kind == TransitionType::Merge)
    }

    /// What fires after `block` succeeded with `output` (its `input`, and the `backpack`
    /// after it), in manifest order: every `then`, `fan-out`, `fan-in` and `merge`
    /// transition, every `if` whose expression holds, and the `else` transitions when the
    /// block has `if`s and none held. An expression that fails is an [`ExpressionError`]:
    /// the step fails and takes [`ServiceGraph::on_exception`] instead.
    pub fn after_success(
        &self,
        block: &str,
        output: &Json,
        input: &Json,
        backpack: &Json,
    ) -> Result<Vec<&Transition>, ExpressionError> {
        let Some(outgoing) = self.outgoing.get(block) else {
            return Ok(Vec::new());
        };
        let mut fired: Vec<usize> = Vec::new();
        let mut any_if = false;
        for (kind, ids) in &outgoing.by_type {
            match kind {
                TransitionType::Exception | TransitionType::Else => {}
                TransitionType::If => {
                    for &id in ids {
                        let Some(t) = self.transitions.get(id) else {
                            continue;
                        };
                        let holds = match &t.expression {
                            Some(e) => e.evaluate(output, input, backpack)?,
                            None => false,
                        };
                        if holds {
                            any_if = true;
                            fired.push(id);
                        }
                    }
                }
                _ => fired.extend(ids),
            }
        }
        if !any_if {
            if let Some(ids) = outgoing.by_type.get(&TransitionType::Else) {
                fired.extend(ids);
            }
        }
        fired.sort_unstable();
        Ok(fired
            .into_iter()
            .filter_map(|i| self.transitions.get(i))
            .collect())
    }

    /// The `fan-in` transitions that close fan-out `fan_out` (a transition id): those its
    /// items reach from its target at the same nesting (a nested fan-out's own fan-in does
    /// not count), in manifest order. An empty fan-out (`[]`) runs their targets with `[]`.
    pub fn fan_ins_closing(&self, fan_out: usize) -> Vec<&Transition> {
        let Some(start) = self.transitions.get(fan_out) else {
            return Vec::new();
        };
        let mut found = std::collections::BTreeSet::new();
        let mut seen = std::collections::BTreeSet::new();
        let mut queue = vec![(start.to.as_str(), 0usize)];
        while let Some((block, depth)) = queue.pop() {
            if depth > MAX_FAN_OUT_NESTING || !seen.insert((block, depth)) {
                continue;
            }
            let Some(outgoing) = self.outgoing.get(block) else {
                continue;
            };
            for (kind, ids) in &outgoing.by_type {
                for &id in ids {
                    let Some(t) = self.transitions.get(id) else {
                        continue;
                    };
                    match kind {
                        TransitionType::FanIn if depth == 0 => {
                            found.insert(id);
                        }
                        TransitionType::FanIn => queue.push((t.to.as_str(), depth - 1)),
                        TransitionType::FanOut => queue.push((t.to.as_str(), depth + 1)),
                        _ => queue.push((t.to.as_str(), depth)),
                    }
                }
            }
        }
        found
            .into_iter()
            .filter_map(|i| self.transitions.get(i))
            .collect()
    }

    /// What fires after `block` failed (an error, a timeout, an OOM, a crash, or an `if`
    /// expression that failed): its `exception` transitions. None: the run fails.
    pub fn on_exception(&self, block: &str) -> Vec<&Transition> {
        self.outgoing(block, TransitionType::Exception)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(source: &str, output: Json) -> Result<bool, ExpressionError> {
        Expression::compile(source).expect("compiles").evaluate(
            &output,
            &json!({"n": 1}),
            &json!({"seen": ["a"]}),
        )
    }

    #[test]
    fn programs_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Expression>();
        send_sync::<ServiceGraph>();
    }

    #[test]
    fn expressions_evaluate_to_true_and_false() {
        assert_eq!(eval("output.total > 0", json!({"total": 5})), Ok(true));
        assert_eq!(eval("output.total > 0", json!({"total": 0})), Ok(false));
        assert_eq!(eval("output.total > 1", json!({"total": 1.5})), Ok(true));
        assert_eq!(eval("output == \"X\"", json!("X")), Ok(true));
        assert_eq!(eval("\"test\" in output", json!(["test"])), Ok(true));
        assert_eq!(eval("size(output) > 2", json!("ab")), Ok(false));
        assert_eq!(
            eval("input.n == 1 && \"a\" in backpack.seen", json!(null)),
            Ok(true)
        );
        assert_eq!(
            eval(
                "output.items.exists(i, i.ok)",
                json!({"items": [{"ok": false}, {"ok": true}]})
            ),
            Ok(true)
        );
        assert_eq!(eval("has(output.total)", json!({})), Ok(false));
    }

    #[test]
    fn return_data_is_an_alias_of_output() {
        assert_eq!(
            eval("return_data.total == 3", json!({"total": 3})),
            Ok(true)
        );
        assert_eq!(
            eval("return_data == output", json!([1, {"a": null}])),
            Ok(true)
        );
    }

    #[test]
    fn a_non_bool_result_is_an_expression_error() {
        let err = eval("output.total", json!({"total": 5})).expect_err("int");
        assert_eq!(err.expression, "output.total");
        assert!(err.reason.contains("an int (5), not a bool"), "{err}");
        assert!(err.to_string().starts_with("ExpressionError: "), "{err}");
        let err = eval("output", json!("yes")).expect_err("string");
        assert!(err.reason.contains("a string (\"yes\")"), "{err}");
    }

    #[test]
    fn runtime_errors_are_expression_errors() {
        let err = eval("output.total > 0", json!({"count": 5})).expect_err("missing field");
        assert!(err.reason.contains("total"), "{err}");
        let err = eval("output.total > 0", json!({"total": "5"})).expect_err("type mismatch");
        assert!(err.reason.starts_with("failed: "), "{err}");
        let err = eval("output.n / 0 == 1", json!({"n": 1})).expect_err("division");
        assert!(err.reason.contains("zero"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_position_and_long_or_empty_expressions_are_refused() {
        let err = Expression::compile("output.total >").expect_err("syntax");
        assert!(err.starts_with("at 1:"), "{err}");
        let err = Expression::compile(&"> ".repeat(100)).expect_err("many errors");
        assert!(err.matches("at 1:").count() <= 3, "{err}");
        assert!(err.len() < 2000, "{err}");
        assert!(Expression::compile("   ")
            .expect_err("empty")
            .contains("empty"));
        let long = format!("output == \"{}\"", "x".repeat(MAX_EXPRESSION_BYTES));
        assert!(Expression::compile(&long)
            .expect_err("long")
            .contains("limit"));
        let err = Expression::compile("outptu.total > 0").expect_err("unknown variable");
        assert!(err.contains("unknown variable `outptu`"), "{err}");
        Expression::compile("output.items.all(i, i.ok) && type(output) == map").expect("bound");
        let err = Expression::compile("output.items.all(i, j.ok)").expect_err("unbound");
        assert!(err.contains("`j`"), "{err}");
    }

    #[test]
    fn deep_expressions_are_refused_before_they_can_exhaust_a_stack() {
        let parens = |n| format!("{}true{}", "(".repeat(n), ")".repeat(n));
        assert!(Expression::compile(&parens(MAX_EXPRESSION_DEPTH)).is_ok());
        let err = Expression::compile(&parens(MAX_EXPRESSION_DEPTH + 1)).expect_err("deep");
        assert!(err.contains("levels deep"), "{err}");
        assert!(Expression::compile(&parens(400)).is_err());
        assert_eq!(bracket_depth("output == \"(((((((\""), 0);
        // Depth in the tree without brackets: a long chain of operators.
        let chain = |n| format!("{}1 > 0", "1 + ".repeat(n));
        let err = Expression::compile(&chain(200)).expect_err("long chain");
        assert!(err.contains("levels deep"), "{err}");
        // The deepest accepted expressions evaluate on an ordinary (2 MiB) thread stack.
        let shapes = [
            parens(MAX_EXPRESSION_DEPTH),
            chain(MAX_EXPRESSION_DEPTH - 3),
            format!(
                "size({}1{}) > 0",
                "[".repeat(MAX_EXPRESSION_DEPTH - 3),
                "]".repeat(MAX_EXPRESSION_DEPTH - 3)
            ),
            format!("{}true", "!".repeat(MAX_EXPRESSION_DEPTH - 1)),
            format!("{}true", "true ? false : ".repeat(MAX_EXPRESSION_DEPTH - 2)),
        ];
        for shape in shapes {
            let e = Expression::compile(&shape).unwrap_or_else(|m| panic!("{shape}: {m}"));
            std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || e.evaluate(&json!(1), &json!(null), &json!({})))
                .expect("thread")
                .join()
                .expect("no overflow")
                .expect("evaluates");
        }
    }

    #[test]
    fn expressions_serialise_as_their_source_and_compile_on_load() {
        let e = Expression::compile("output.ok").expect("compiles");
        let text = serde_json::to_string(&e).expect("serialises");
        assert_eq!(text, "\"output.ok\"");
        let back: Expression = serde_json::from_str(&text).expect("compiles again");
        assert_eq!(back, e);
        assert_eq!(
            back.evaluate(&json!({"ok": true}), &json!(null), &json!({})),
            Ok(true)
        );
        let err = serde_json::from_str::<Expression>("\"output >\"").expect_err("invalid");
        assert!(
            err.to_string()
                .contains("invalid CEL expression `output >`"),
            "{err}"
        );
    }

    #[test]
    fn retry_delays_grow_by_the_backoff_and_stop_after_the_attempts() {
        let policy = RetryPolicy {
            attempts: 4,
            interval_s: 2,
            backoff: 3.0,
        };
        let secs = |a| policy.delay_before(a).map(|d| d.as_secs_f64());
        assert_eq!(secs(1), Some(0.0));
        assert_eq!(secs(2), Some(2.0));
        assert_eq!(secs(3), Some(6.0));
        assert_eq!(secs(4), Some(18.0));
        assert_eq!(secs(5), None);
        let capped = RetryPolicy {
            attempts: 10,
            interval_s: 3600,
            backoff: 10.0,
        };
        assert_eq!(
            capped.delay_before(10).map(|d| d.as_secs_f64()),
            Some(retry_limits::MAX_DELAY_S)
        );
    }
}
