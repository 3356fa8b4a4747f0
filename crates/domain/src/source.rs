//! Where a block's code comes from (BRIEF §7c): one file beside the manifest, or a
//! directory of files uploaded whole, with a `handler` naming the function to call.
//!
//! - `source = "greet.py"`: one file; its `main` is the handler (or the function `handler`
//!   names, whose module/file part must be that file's).
//! - `source = "fetch/"`: a directory (the trailing `/` is optional). Every file in it is
//!   uploaded under `fetch/<path>` and laid out in the instance's read-only `/code` as
//!   `<path>`; `handler = "module.function"` (Python, default `main.main`: the file
//!   `main.py`, a dotted module `pkg.app` is `pkg/app.py`) or `"file.function"` (Node,
//!   default `index.main`: `index.js`, else `index.mjs` or `index.cjs`) names the file and
//!   the function in it. Neighbouring files import as usual (`import helper`,
//!   `require("./helper")`). Shell blocks are one file.
//! - Paths inside a directory are `/`-separated, relative, each part made of letters,
//!   digits, `.`, `-` and `_` and not starting with `.`; the CLI skips hidden entries,
//!   `__pycache__` and `node_modules` (dependencies are built at deploy, not uploaded) and
//!   refuses anything else it cannot send (a symlink out of the project, a symlinked
//!   directory, a socket or device).
//! - A directory's files may be any bytes (a PNG, a model file, a data blob): those that are
//!   not UTF-8 text travel apart ([`SourceResolver::binary_files`], the deploy request's
//!   `binary_files`, base64) and are laid out byte for byte. The handler's own file is
//!   source text.
//! - At most [`limits::MAX_DEPLOY_FILES`] files and [`limits::MAX_DEPLOY_FILES_BYTES`]
//!   bytes per block (and per deploy), each file at most [`limits::MAX_SOURCE_BYTES`].

use std::collections::BTreeMap;

use crate::limits;

/// A block's code as a resolver found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// One file's text.
    File(String),
    /// A directory's files: path relative to the directory → text.
    Directory(BTreeMap<String, String>),
    /// Not read again: the manifest of a deployment whose code is already stored with its
    /// blocks (see [`Deployed`]).
    Deployed,
}

/// Where a block's `source = "..."` comes from: the disk beside the manifest (CLI), the
/// files uploaded with it (server, [`Uploaded`]), or nowhere ([`Deployed`]). Returns the
/// source or a reason it cannot be read.
pub trait SourceResolver {
    fn resolve(&self, path: &str) -> Result<Source, String>;

    /// The files of the directory `path` (as resolved by [`SourceResolver::resolve`]) that
    /// are not UTF-8 text: path relative to the directory → bytes. Resolvers that carry
    /// text only have none.
    fn binary_files(&self, _path: &str) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::new()
    }
}

/// A closure returning one file's text: single-file sources only.
impl<F: Fn(&str) -> Result<String, String>> SourceResolver for F {
    fn resolve(&self, path: &str) -> Result<Source, String> {
        self(path).map(Source::File)
    }
}

/// The files uploaded with a deploy, keyed by their path beside the manifest: a `source`
/// that is one of the keys is that file; otherwise the keys under `source/` are its
/// directory.
pub struct Uploaded<'a>(pub &'a BTreeMap<String, String>);

impl SourceResolver for Uploaded<'_> {
    fn resolve(&self, path: &str) -> Result<Source, String> {
        if !path.ends_with('/') {
            if let Some(text) = self.0.get(path) {
                return Ok(Source::File(text.clone()));
            }
        }
        let prefix = format!("{}/", directory_key(path));
        let files: BTreeMap<String, String> = self
            .0
            .range(prefix.clone()..)
            .take_while(|(key, _)| key.starts_with(&prefix))
            .map(|(key, text)| (key[prefix.len()..].to_string(), text.clone()))
            .collect();
        if files.is_empty() {
            return Err(
                "it was not uploaded with the manifest (neither as a file nor as a directory \
                 of files)"
                    .to_string(),
            );
        }
        Ok(Source::Directory(files))
    }
}

/// The files uploaded with a deploy, text and binary (`binary_files` of the deploy request,
/// decoded): a directory is every key under `source/` in either map. A `source` naming one
/// binary file is refused (a block's single file is source text).
pub struct UploadedFiles<'a> {
    pub text: &'a BTreeMap<String, String>,
    pub binary: &'a BTreeMap<String, Vec<u8>>,
}

impl SourceResolver for UploadedFiles<'_> {
    fn resolve(&self, path: &str) -> Result<Source, String> {
        if !path.ends_with('/') && self.binary.contains_key(path) {
            return Err(
                "it is not UTF-8 text: a block's single source file is source code; put binary \
                 files in a directory source or a shared directory"
                    .to_string(),
            );
        }
        match Uploaded(self.text).resolve(path) {
            Ok(source) => Ok(source),
            Err(_) if !self.binary_files(path).is_empty() => Ok(Source::Directory(BTreeMap::new())),
            Err(e) => Err(e),
        }
    }

    fn binary_files(&self, path: &str) -> BTreeMap<String, Vec<u8>> {
        under(self.binary, path)
    }
}

/// The entries of `files` under the directory `path` (`path/…`), keyed relative to it.
fn under<T: Clone>(files: &BTreeMap<String, T>, path: &str) -> BTreeMap<String, T> {
    let prefix = format!("{}/", directory_key(path));
    files
        .range(prefix.clone()..)
        .take_while(|(key, _)| key.starts_with(&prefix))
        .map(|(key, value)| (key[prefix.len()..].to_string(), value.clone()))
        .collect()
}

/// Resolves every source to [`Source::Deployed`]: for reading a deployed manifest again
/// (its graph, its triggers) when its blocks' code is already stored.
pub struct Deployed;

impl SourceResolver for Deployed {
    fn resolve(&self, _path: &str) -> Result<Source, String> {
        Ok(Source::Deployed)
    }
}

/// The key a directory `source` is uploaded under: the path without its trailing `/`
/// (its files are `<key>/<path>`).
pub fn directory_key(source: &str) -> &str {
    source.trim_end_matches('/')
}

/// Checks one path inside a directory source, naming what is wrong.
pub fn check_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.starts_with('/') {
        return Err(format!(
            "`{path}` must be a relative path inside the block's directory"
        ));
    }
    for part in path.split('/') {
        let valid_chars = part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
        if part.is_empty() || part.starts_with('.') || !valid_chars {
            return Err(format!(
                "`{}`: each part of a path may hold only letters, digits, '.', '-' and '_', \
                 and may not be empty or start with '.'; rename it",
                path.escape_debug()
            ));
        }
    }
    Ok(())
}

/// Checks a directory source's files against the limits and the path rules.
pub fn check_directory(files: &BTreeMap<String, String>) -> Result<(), String> {
    check_directory_files(files, &BTreeMap::new())
}

/// Checks a directory's text and binary files together against the limits (counted in
/// bytes) and the path rules.
pub fn check_directory_files(
    files: &BTreeMap<String, String>,
    binary: &BTreeMap<String, Vec<u8>>,
) -> Result<(), String> {
    let count = files.len() + binary.len();
    if count > limits::MAX_DEPLOY_FILES {
        return Err(format!(
            "the directory holds {count} files; the limit is {} files per block (and per deploy): \
             remove files the block does not need",
            limits::MAX_DEPLOY_FILES
        ));
    }
    let mut total = 0usize;
    let all = files
        .iter()
        .map(|(p, t)| (p, t.len()))
        .chain(binary.iter().map(|(p, b)| (p, b.len())));
    for (path, len) in all {
        check_relative_path(path)?;
        if len > limits::MAX_SOURCE_BYTES {
            return Err(format!(
                "file `{path}` is {len} bytes; the limit is {} bytes (5 MiB) per file",
                limits::MAX_SOURCE_BYTES
            ));
        }
        total += len;
    }
    if total > limits::MAX_DEPLOY_FILES_BYTES {
        return Err(format!(
            "the directory's files total {total} bytes; the limit is {} bytes (16 MiB) per \
             block (and per deploy): remove files the block does not need",
            limits::MAX_DEPLOY_FILES_BYTES
        ));
    }
    Ok(())
}

/// A `handler = "..."` split into the file it names (relative to the block's directory)
/// candidates, in order of preference, and the function.
pub(crate) struct Handler {
    pub files: Vec<String>,
    pub function: String,
    /// The module (Python) or file (Node) part, as written.
    pub module: String,
}

/// Parses `handler` for `language` (`python`: `module.function`, `node`: `file.function`).
pub(crate) fn parse_handler(language: crate::Language, handler: &str) -> Result<Handler, String> {
    let descriptor = language.descriptor();
    let Some(expected) = descriptor.handler_syntax else {
        return Err(format!(
            "a {} block runs its one file: remove `handler`",
            descriptor.name
        ));
    };
    let Some((module, function)) = handler.rsplit_once('.') else {
        return Err(format!("`{handler}`: expected {expected}"));
    };
    let mut chars = function.chars();
    let identifier = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && (descriptor.dollar_in_identifiers || !function.contains('$'));
    if module.is_empty() || !identifier {
        return Err(format!(
            "`{handler}`: expected {expected} (the function an identifier)"
        ));
    }
    let files = if descriptor.dotted_modules {
        if module.split('.').any(|p| p.is_empty() || p.contains('/')) {
            return Err(format!("`{handler}`: expected {expected}"));
        }
        let path = module.replace('.', "/");
        descriptor
            .handler_extensions
            .iter()
            .map(|e| format!("{path}.{e}"))
            .collect()
    } else if descriptor
        .handler_extensions
        .iter()
        .any(|e| module.ends_with(&format!(".{e}")))
    {
        vec![module.to_string()]
    } else {
        descriptor
            .handler_extensions
            .iter()
            .map(|e| format!("{module}.{e}"))
            .collect()
    };
    for file in &files {
        check_relative_path(file).map_err(|m| format!("handler `{handler}`: {m}"))?;
    }
    Ok(Handler {
        files,
        function: function.to_string(),
        module: module.to_string(),
    })
}

/// The handler a directory source of `language` uses when the manifest names none.
pub(crate) fn default_handler(language: crate::Language) -> &'static str {
    language.descriptor().default_handler
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Language;

    #[test]
    fn uploaded_files_resolve_as_a_file_or_a_directory() {
        let files: BTreeMap<String, String> = [
            ("a.py", "x"),
            ("fetch/main.py", "m"),
            ("fetch/lib/h.py", "h"),
            ("fetchy/other.py", "o"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let up = Uploaded(&files);
        assert_eq!(up.resolve("a.py"), Ok(Source::File("x".into())));
        let Ok(Source::Directory(dir)) = up.resolve("fetch/") else {
            panic!("expected a directory");
        };
        assert_eq!(dir.keys().collect::<Vec<_>>(), vec!["lib/h.py", "main.py"]);
        assert_eq!(up.resolve("fetch"), up.resolve("fetch/"));
        assert!(up.resolve("missing/").is_err());
    }

    #[test]
    fn paths_and_handlers_are_checked() {
        assert!(check_relative_path("lib/helper.py").is_ok());
        for bad in ["", "/x", "a//b", "../x", ".env", "a/.git/x", "a b"] {
            assert!(check_relative_path(bad).is_err(), "{bad}");
        }
        let h = parse_handler(Language::Python, "pkg.app.handle").expect("python");
        assert_eq!(h.files, vec!["pkg/app.py"]);
        assert_eq!(h.function, "handle");
        let h = parse_handler(Language::Node, "lib/app.run").expect("node");
        assert_eq!(h.files, vec!["lib/app.js", "lib/app.mjs", "lib/app.cjs"]);
        for bad in ["main", "main.", ".main", "a..b", "main.1x"] {
            assert!(parse_handler(Language::Python, bad).is_err(), "{bad}");
        }
        assert!(parse_handler(Language::Shell, "a.b").is_err());
    }
}
