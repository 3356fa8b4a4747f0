//! The `refinery.toml` project manifest: parsing, defaults and validation.
//!
//! Every error names the file, the line and column, the field and what was expected, so
//! an author can fix the manifest without guessing. The same parser runs in the CLI
//! (before upload) and in the server (on what was uploaded).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use crate::block::{BlockSpec, Language};
use crate::limits;
use crate::names::{is_valid_name, NAME_RULE};

/// A parsed, validated manifest: a project and its blocks with their sources resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub blocks: Vec<BlockSpec>,
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

/// Where a block's `source = "..."` file comes from: the disk beside the manifest (CLI) or
/// the files uploaded with it (server). Returns the file's text or a reason.
pub trait SourceResolver {
    fn read_source(&self, path: &str) -> Result<String, String>;
}

impl<F: Fn(&str) -> Result<String, String>> SourceResolver for F {
    fn read_source(&self, path: &str) -> Result<String, String> {
        self(path)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: Spanned<String>,
    #[serde(default)]
    blocks: Vec<Spanned<RawBlock>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlock {
    name: Spanned<String>,
    language: Spanned<String>,
    source: Option<Spanned<String>>,
    code: Option<Spanned<String>>,
    memory_mb: Option<Spanned<i64>>,
    timeout_s: Option<Spanned<i64>>,
    max_concurrency: Option<Spanned<i64>>,
    keep_alive_s: Option<Spanned<i64>>,
    min_warm: Option<Spanned<i64>>,
    tmp_mb: Option<Spanned<i64>>,
    #[serde(default)]
    env: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    network: Option<Spanned<bool>>,
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

        let mut seen = BTreeSet::new();
        let mut blocks = Vec::with_capacity(raw.blocks.len());
        for (index, raw_block) in raw.blocks.iter().enumerate() {
            let block = ctx.block(index, raw_block, sources)?;
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
        Ok(Manifest {
            name: name.clone(),
            blocks,
        })
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
            .collect()
    }
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

        let (source_name, code) = match (&block.source, &block.code) {
            (Some(_), Some(code)) => {
                return Err(self.error(
                    Some(code.span()),
                    field("code"),
                    "both `source` and `code` are set: give the code inline or as a file, not both".into(),
                ))
            }
            (None, None) => {
                return Err(self.error(
                    Some(raw.span()),
                    field("source"),
                    "missing: set `source = \"file\"` (a file beside the manifest) or `code = \"\"\"...\"\"\"` (inline)".into(),
                ))
            }
            (Some(source), None) => {
                let path = source.get_ref();
                let source_name = source_file_name(path).map_err(|message| {
                    self.error(Some(source.span()), field("source"), message)
                })?;
                let code = sources.read_source(path).map_err(|reason| {
                    self.error(
                        Some(source.span()),
                        field("source"),
                        format!("cannot read `{path}`: {reason}"),
                    )
                })?;
                (source_name, code)
            }
            (None, Some(code)) => {
                let extension = match language {
                    Language::Python => "py",
                    Language::Node => "js",
                    Language::Shell => "sh",
                };
                (format!("{name}.{extension}"), code.get_ref().clone())
            }
        };
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

        let env = match &block.env {
            None => BTreeMap::new(),
            Some(env) => self.env(index, env)?,
        };

        Ok(BlockSpec {
            name,
            language,
            source_name,
            code,
            memory_mb,
            timeout_s,
            max_concurrency,
            keep_alive_s,
            min_warm,
            tmp_mb,
            env,
            network: block.network.as_ref().is_some_and(|n| *n.get_ref()),
        })
    }
}

impl Context<'_> {
    /// A block's `env` table: valid names, no reserved ones, no NUL byte, and at most
    /// [`limits::MAX_ENV_BYTES`] of names and values together — anything else would deploy
    /// and then fail every start of the block's instances.
    fn env(
        &self,
        index: usize,
        env: &Spanned<BTreeMap<Spanned<String>, Spanned<String>>>,
    ) -> Result<BTreeMap<String, String>, ManifestError> {
        let field = |key: &str| Some(format!("blocks[{index}].env.{key}"));
        let mut total = 0usize;
        let mut largest: Option<(&Spanned<String>, usize)> = None;
        for (key, value) in env.get_ref() {
            let name = key.get_ref();
            if let Err(message) = check_env_name(name) {
                return Err(self.error(Some(key.span()), field(&printable(name)), message));
            }
            if let Some(at) = value.get_ref().find('\0') {
                return Err(self.error(
                    Some(value.span()),
                    field(name),
                    format!(
                        "the value holds a NUL byte (\\u0000) at byte {at}: an environment variable cannot contain one; remove it"
                    ),
                ));
            }
            let size = name.len() + value.get_ref().len();
            total += size;
            if largest.is_none_or(|(_, most)| size > most) {
                largest = Some((key, size));
            }
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
        Ok(env
            .get_ref()
            .iter()
            .map(|(k, v)| (k.get_ref().clone(), v.get_ref().clone()))
            .collect())
    }
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
}
