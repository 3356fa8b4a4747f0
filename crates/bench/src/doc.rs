//! Writing figures into docs/BENCHMARKS.md: each generated part sits between a pair of
//! marker comments, and only what is between them is replaced, so the hand-written text
//! around them stays as it is.

use anyhow::{bail, Result};

pub fn begin_marker(name: &str) -> String {
    format!("<!-- refinery-bench: begin {name} (generated; edits here are overwritten) -->")
}

pub fn end_marker(name: &str) -> String {
    format!("<!-- refinery-bench: end {name} -->")
}

/// `doc` with the text between the `name` markers replaced by `content`.
pub fn replace_region(doc: &str, name: &str, content: &str) -> Result<String> {
    let (begin, end) = (begin_marker(name), end_marker(name));
    let Some(start) = doc.find(&begin) else {
        bail!("no `{begin}` line: add it, and `{end}` below it, where the `{name}` figures go");
    };
    let after_begin = start + begin.len();
    let Some(stop) = doc[after_begin..].find(&end).map(|i| i + after_begin) else {
        bail!("`{begin}` has no `{end}` after it: add it where the `{name}` figures end");
    };
    if doc[stop + end.len()..].contains(&begin) {
        bail!("the `{name}` markers appear twice: keep one pair");
    }
    Ok(format!(
        "{}\n{}\n{}",
        &doc[..after_begin],
        content.trim_matches('\n'),
        &doc[stop..]
    ))
}

/// Replaces every region of `regions` in the file at `path`.
pub fn write_regions(path: &std::path::Path, regions: &[(&str, &str)]) -> Result<()> {
    let mut doc = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    for (name, content) in regions {
        doc = replace_region(&doc, name, content)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    }
    std::fs::write(path, doc).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(inner: &str) -> String {
        format!(
            "# Title\nhand text\n{}\n{inner}\n{}\nmore hand text\n",
            begin_marker("suite"),
            end_marker("suite")
        )
    }

    #[test]
    fn replaces_only_between_the_markers() {
        let out = replace_region(&doc("old figures"), "suite", "new figures\n").unwrap_or_default();
        assert_eq!(out, doc("new figures"));
        // Idempotent: a second run with the same figures changes nothing.
        let again = replace_region(&out, "suite", "new figures").unwrap_or_default();
        assert_eq!(again, out);
    }

    #[test]
    fn a_missing_marker_is_an_error_naming_it() {
        let error = replace_region("# no markers\n", "suite", "x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("refinery-bench: begin suite"), "{error}");
        let only_begin = format!("{}\n", begin_marker("suite"));
        let error = replace_region(&only_begin, "suite", "x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(error.contains("refinery-bench: end suite"), "{error}");
    }

    #[test]
    fn other_regions_are_left_alone() {
        let text = format!(
            "{}\na\n{}\n{}\nb\n{}\n",
            begin_marker("one"),
            end_marker("one"),
            begin_marker("two"),
            end_marker("two")
        );
        let out = replace_region(&text, "two", "c").unwrap_or_default();
        assert!(out.contains("\na\n"));
        assert!(out.contains("\nc\n"));
        assert!(!out.contains("\nb\n"));
    }
}
