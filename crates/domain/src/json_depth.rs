//! How deeply a JSON text nests arrays and objects, measured on the raw bytes in one pass
//! (no parsing, no allocation), so the edge and the runtimes can hold payloads to
//! [`MAX_JSON_DEPTH`](crate::limits::MAX_JSON_DEPTH) before any parser recurses into them.

/// The deepest nesting of arrays and objects in `text`: 0 for a scalar, 1 for `[]` or
/// `{}`, 2 for `{"a": [1]}`. Brackets inside strings (escapes included) do not count.
/// Exact for valid JSON; for anything else it is the bracket depth outside strings, which
/// is what a parser would have to recurse through before it found the error.
pub fn json_depth(text: &[u8]) -> usize {
    let mut depth = 0usize;
    let mut deepest = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in text {
        if in_string {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                in_string = false;
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// The error type a runtime reports when a block's output or backpack nests deeper than
/// [`MAX_JSON_DEPTH`](crate::limits::MAX_JSON_DEPTH) (an ordinary user error: the instance
/// stays warm).
pub const OUTPUT_TOO_DEEP: &str = "OutputTooDeep";

/// The message of an [`OUTPUT_TOO_DEEP`] error; `what` is "the output" or "the backpack".
/// The Python and Node shims word it identically.
pub fn too_deep_message(what: &str, depth: usize) -> String {
    format!(
        "{what} is nested {depth} levels deep; the limit is {} levels of nested arrays and objects: return a flatter value",
        crate::limits::MAX_JSON_DEPTH
    )
}

/// A JSON text `depth` levels deep: `depth` nested arrays around `0` (for tests and
/// examples).
pub fn nested_array(depth: usize) -> String {
    format!("{}0{}", "[".repeat(depth), "]".repeat(depth))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_arrays_and_objects_not_strings() {
        assert_eq!(json_depth(b"1"), 0);
        assert_eq!(json_depth(b"\"[[[\""), 0);
        assert_eq!(json_depth(b"[]"), 1);
        assert_eq!(json_depth(br#"{"a": [1]}"#), 2);
        assert_eq!(json_depth(br#"[{"a": "]]}}[[{{\"[["}, [[2]]]"#), 3);
        assert_eq!(json_depth(br#"["\\", [1]]"#), 2);
        assert_eq!(json_depth(br#"[[1], [2], [[3]]]"#), 3);
        assert_eq!(json_depth(nested_array(200).as_bytes()), 200);
    }

    #[test]
    fn agrees_with_serde_json_on_valid_json() {
        for text in [
            r#"{"k": [1, {"x": null}], "s": "{[", "e": "\"}"}"#,
            r#"[[], {}, [[[]]], "]]]"]"#,
        ] {
            let value: serde_json::Value = serde_json::from_str(text).expect("valid");
            let reencoded = serde_json::to_string(&value).expect("encode");
            assert_eq!(
                json_depth(text.as_bytes()),
                json_depth(reencoded.as_bytes())
            );
        }
    }
}
