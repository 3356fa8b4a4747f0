//! Hints added to a block's error when the cause is the platform's rules rather than the
//! block's code. The one place their wording lives: when blocks can bring dependencies,
//! this is what changes.

use refinery_domain::UserError;

/// How dependencies are provided today, for a Python `ModuleNotFoundError`.
pub const PYTHON_DEPENDENCIES_HINT: &str =
    "hint: third-party packages are not installed. A block is a single file that can import \
     Python's standard library only; copy the code you need into the block";

/// How dependencies are provided today, for Node's `Cannot find module` / `Cannot find
/// package` of a package name (not of a relative or absolute path).
pub const NODE_DEPENDENCIES_HINT: &str = "hint: third-party packages are not installed. A block is a single file that can require \
     Node's built-in modules only (node:fs, node:crypto, ...); copy the code you need into the block";

/// Appends the hint that applies to `error`, if any, to its message on a line of its own
/// (the original message stays first, unchanged).
pub fn add_hint(error: &mut UserError) {
    if let Some(hint) = hint_for(error) {
        error.message.push('\n');
        error.message.push_str(hint);
    }
}

fn hint_for(error: &UserError) -> Option<&'static str> {
    if error.kind == "ModuleNotFoundError" {
        return Some(PYTHON_DEPENDENCIES_HINT);
    }
    let first_line = error.message.lines().next().unwrap_or("");
    let specifier = ["Cannot find module '", "Cannot find package '"]
        .iter()
        .find_map(|prefix| first_line.strip_prefix(prefix))?;
    let bare = !specifier.starts_with(['.', '/']) && !specifier.starts_with("file:");
    bare.then_some(NODE_DEPENDENCIES_HINT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hinted(kind: &str, message: &str) -> String {
        let mut error = UserError::new(kind, message);
        add_hint(&mut error);
        error.message
    }

    #[test]
    fn module_not_found_gets_the_dependencies_hint() {
        let python = hinted("ModuleNotFoundError", "No module named 'requests'");
        assert_eq!(
            python,
            format!("No module named 'requests'\n{PYTHON_DEPENDENCIES_HINT}")
        );
        let node = hinted(
            "Error",
            "Cannot find module 'lodash'\nRequire stack:\n- /code/a.js",
        );
        assert!(node.starts_with("Cannot find module 'lodash'\nRequire stack:"));
        assert!(node.ends_with(NODE_DEPENDENCIES_HINT), "{node}");
        let esm = hinted(
            "Error",
            "Cannot find package 'lodash' imported from /code/a.mjs",
        );
        assert!(esm.ends_with(NODE_DEPENDENCIES_HINT), "{esm}");
    }

    #[test]
    fn other_errors_and_paths_get_none() {
        for (kind, message) in [
            ("ValueError", "No module named 'x'"),
            ("Error", "Cannot find module './helper'"),
            ("Error", "Cannot find module '/code/other.js'"),
            ("Error", "something else"),
        ] {
            assert_eq!(hinted(kind, message), message, "{kind}: {message}");
        }
    }
}
