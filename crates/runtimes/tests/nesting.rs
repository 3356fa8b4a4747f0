//! The Python and Node shims hold a block's output and backpack to `MAX_JSON_DEPTH`
//! exactly as the host measures it (brackets inside strings, escapes and wide values
//! included), as an ordinary error of that invocation, and keep serving afterwards.

mod common;

use common::{start, Running, TestResult};
use refinery_domain::json_depth::json_depth;
use refinery_domain::limits::MAX_JSON_DEPTH;
use refinery_domain::Language;
use serde_json::json;

/// Both handlers return `{"k<s>": v}` where v wraps the string `s` in `n - 1` arrays of
/// two (so the output is `n` levels deep), or `width` such objects side by side (one level
/// more) — or put that value in the backpack.
const PYTHON: &str = r#"
def build(i):
    v = i["s"]
    for _ in range(i["n"] - 1):
        v = [v, i["s"]]
    out = {"k" + i["s"]: v}
    if i.get("width"):
        out = [out] * i["width"]
    return out

def main(i, backpack):
    if i.get("backpack"):
        backpack["deep"] = build(i)
        return "ok"
    return build(i)
"#;

const NODE: &str = r#"
function build(i) {
  let v = i.s;
  for (let k = 0; k < i.n - 1; k++) v = [v, i.s];
  let out = { ['k' + i.s]: v };
  if (i.width) out = Array(i.width).fill(out);
  return out;
}
exports.main = (i, backpack) => {
  if (i.backpack) {
    backpack.deep = build(i);
    return 'ok';
  }
  return build(i);
};
"#;

/// Strings that would fool a bracket count that ignored strings or escapes.
const TRICKY: [&str; 4] = ["plain", "]]]]}}}}", "[[{{\\\"[", "\\\\\"]]\\"];

async fn check(language: Language, mut p: Running) -> TestResult {
    p.channel.ready().await?;
    for s in TRICKY {
        for (n, width) in [(MAX_JSON_DEPTH, 0), (MAX_JSON_DEPTH - 1, 100), (3, 500)] {
            let input = json!({ "n": n, "s": s, "width": width });
            let reply = p.channel.invoke(&input, &json!({})).await?;
            let output = reply
                .outcome
                .map_err(|e| format!("{language:?} {s:?} {n}: {e:?}"))?
                .output;
            let text = serde_json::to_string(&output)?;
            assert!(json_depth(text.as_bytes()) <= MAX_JSON_DEPTH, "{text}");
        }
        for n in [MAX_JSON_DEPTH + 1, 127, 128, 200] {
            for width in [0, 3] {
                let depth = n + usize::from(width > 0);
                let input = json!({ "n": n, "s": s, "width": width });
                let reply = p.channel.invoke(&input, &json!({})).await?;
                let error = reply.outcome.expect_err("too deep");
                assert_eq!(error.kind, "OutputTooDeep", "{language:?}: {error:?}");
                assert!(
                    error.message == format!("the output is nested {depth} levels deep; the limit is {MAX_JSON_DEPTH} levels of nested arrays and objects: return a flatter value"),
                    "{language:?} {s:?}: {error:?}"
                );
            }
        }
        let reply = p
            .channel
            .invoke(
                &json!({ "n": MAX_JSON_DEPTH, "s": s, "backpack": true }),
                &json!({}),
            )
            .await?;
        let error = reply.outcome.expect_err("backpack too deep");
        assert_eq!(error.kind, "OutputTooDeep");
        assert!(
            error.message.starts_with(&format!(
                "the backpack is nested {} levels deep",
                MAX_JSON_DEPTH + 1
            )),
            "{error:?}"
        );
    }
    // Still serving, same process.
    let reply = p
        .channel
        .invoke(&json!({ "n": 1, "s": "x" }), &json!({}))
        .await?;
    assert_eq!(
        reply.outcome.map_err(|e| format!("{e:?}"))?.output,
        json!({ "kx": "x" })
    );
    assert_eq!(p.child.try_wait()?, None, "the shim is still running");
    Ok(())
}

#[tokio::test]
async fn python_holds_output_and_backpack_to_the_limit() -> TestResult {
    check(
        Language::Python,
        start(Language::Python, "deep.py", PYTHON, &[])?,
    )
    .await
}

#[tokio::test]
async fn node_holds_output_and_backpack_to_the_limit() -> TestResult {
    check(Language::Node, start(Language::Node, "deep.js", NODE, &[])?).await
}

#[tokio::test]
async fn output_too_deep_for_the_encoder_is_the_same_error() -> TestResult {
    for (language, name, code) in [
        (Language::Python, "deep.py", PYTHON),
        (Language::Node, "deep.js", NODE),
    ] {
        let mut p = start(language, name, code, &[])?;
        let reply = p
            .channel
            .invoke(&json!({ "n": 100_000, "s": "x" }), &json!({}))
            .await?;
        let error = reply.outcome.expect_err("far too deep");
        assert_eq!(error.kind, "OutputTooDeep", "{language:?}: {error:?}");
        assert!(
            error
                .message
                .starts_with("the output is nested too deeply to encode; the limit is 64"),
            "{error:?}"
        );
        let reply = p
            .channel
            .invoke(&json!({ "n": 2, "s": "x" }), &json!({}))
            .await?;
        assert_eq!(
            reply.outcome.map_err(|e| format!("{e:?}"))?.output,
            json!({ "kx": ["x", "x"] })
        );
    }
    Ok(())
}
