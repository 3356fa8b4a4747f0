mod common;

use common::{start, Running, TestResult};
use refinery_domain::Language;
use refinery_runtimes::ChannelError;
use serde_json::{json, Value};

fn node(source_name: &str, code: &str) -> Result<Running, Box<dyn std::error::Error>> {
    start(Language::Node, source_name, code, &[])
}

async fn output_of(p: &mut Running, input: Value) -> Result<Value, Box<dyn std::error::Error>> {
    let reply = p.channel.invoke(&input, &json!({})).await?;
    Ok(reply.outcome.map_err(|e| format!("{e:?}"))?.output)
}

#[tokio::test]
async fn commonjs_export_styles() -> TestResult {
    for (name, code) in [
        ("a.js", "module.exports.main = (i) => ({ got: i });"),
        (
            "b.js",
            "exports.main = function (i) { return { got: i }; };",
        ),
        ("c.cjs", "module.exports = (i, b) => ({ got: i });"),
        (
            "d.js",
            "module.exports = { main: async (i) => ({ got: i }) };",
        ),
    ] {
        let mut p = node(name, code)?;
        p.channel.ready().await?;
        assert_eq!(
            output_of(&mut p, json!(5)).await?,
            json!({"got": 5}),
            "{name}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn esm_export_styles() -> TestResult {
    for (name, code) in [
        ("a.mjs", "export function main(i) { return { got: i }; }"),
        (
            "b.js",
            "import os from 'node:os';\nexport async function main(i) { return { got: i }; }",
        ),
        (
            "c.mjs",
            "export default function (i) { return { got: i }; }",
        ),
        ("d.mjs", "export default { main: (i) => ({ got: i }) };"),
    ] {
        let mut p = node(name, code)?;
        assert_eq!(
            output_of(&mut p, json!("x")).await?,
            json!({"got": "x"}),
            "{name}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn async_handler_backpack_and_state() -> TestResult {
    let mut p = node(
        "h.js",
        "let count = 0;\nexports.main = async (input, backpack) => {\n  await new Promise((r) => setTimeout(r, 10));\n  backpack.seen = (backpack.seen || 0) + 1;\n  count += 1;\n  return { count, doubled: input.n * 2 };\n};",
    )?;
    for expected in 1..=2 {
        let reply = p
            .channel
            .invoke(&json!({"n": 4}), &json!({"seen": 10, "k": [1]}))
            .await?;
        let out = reply.outcome.map_err(|e| format!("{e:?}"))?;
        assert_eq!(out.output, json!({"count": expected, "doubled": 8}));
        assert_eq!(out.backpack, json!({"seen": 11, "k": [1]}));
    }
    Ok(())
}

#[tokio::test]
async fn console_output_is_captured() -> TestResult {
    let mut p = node(
        "h.mjs",
        "console.log('at load');\nexport function main() {\n  console.log('hello', { a: 1 });\n  console.error('oops');\n  process.stdout.write('raw\\n');\n  return null;\n}",
    )?;
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    assert_eq!(
        reply.outcome.map_err(|e| format!("{e:?}"))?.output,
        json!(null)
    );
    assert_eq!(reply.logs, "hello { a: 1 }\noops\nraw\n");
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    assert_eq!(reply.logs.matches("hello").count(), 1);
    Ok(())
}

#[tokio::test]
async fn thrown_errors() -> TestResult {
    let mut p = node(
        "h.js",
        "class BadInput extends Error { constructor(m) { super(m); this.name = 'BadInput'; } }\nexports.main = async (i) => {\n  console.log('before');\n  if (i === 1) throw new TypeError('wrong type');\n  if (i === 2) throw new BadInput('no good');\n  throw 'a string';\n};",
    )?;
    let reply = p.channel.invoke(&json!(1), &json!({})).await?;
    assert_eq!(reply.logs, "before\n");
    let err = reply.outcome.err().ok_or("expected an error")?;
    assert_eq!(err.kind, "TypeError");
    assert_eq!(err.message, "wrong type");
    let tb = err.traceback.ok_or("no stack")?;
    assert!(tb.contains("h.js:4"), "{tb}");
    assert!(!tb.contains("node_shim"), "{tb}");

    let reply = p.channel.invoke(&json!(2), &json!({})).await?;
    let err = reply.outcome.err().ok_or("expected an error")?;
    assert_eq!(
        (err.kind.as_str(), err.message.as_str()),
        ("BadInput", "no good")
    );

    let reply = p.channel.invoke(&json!(3), &json!({})).await?;
    let err = reply.outcome.err().ok_or("expected an error")?;
    assert_eq!(
        (err.kind.as_str(), err.message.as_str()),
        ("Error", "a string")
    );
    Ok(())
}

#[tokio::test]
async fn non_serialisable_output_is_a_type_error() -> TestResult {
    let mut p = node("h.js", "exports.main = () => ({ big: 10n });")?;
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    let err = reply.outcome.err().ok_or("expected an error")?;
    assert_eq!(err.kind, "TypeError");
    assert!(
        err.message.contains("not JSON-serialisable"),
        "{}",
        err.message
    );
    // undefined is null.
    let mut p = node("u.js", "exports.main = () => undefined;")?;
    assert_eq!(output_of(&mut p, json!({})).await?, json!(null));
    Ok(())
}

#[tokio::test]
async fn missing_main_is_handler_not_found() -> TestResult {
    let mut p = node("h.js", "exports.handler = () => 1;")?;
    match p.channel.ready().await {
        Err(ChannelError::InitFailed(err)) => {
            assert_eq!(err.kind, "HandlerNotFound");
            assert!(
                err.message.contains("main(blockInput, backpack)"),
                "{}",
                err.message
            );
        }
        other => return Err(format!("expected InitFailed, got {other:?}").into()),
    }
    assert!(!p.child.wait()?.success());
    Ok(())
}

#[tokio::test]
async fn syntax_error_is_init_failed() -> TestResult {
    for name in ["h.js", "h.mjs"] {
        let mut p = node(name, "export function main( {\n  return 1;\n}\n")?;
        match p.channel.ready().await {
            Err(ChannelError::InitFailed(err)) => {
                assert_eq!(err.kind, "SyntaxError", "{name}");
                assert!(err.message.contains(name), "{name}: {}", err.message);
            }
            other => return Err(format!("{name}: expected InitFailed, got {other:?}").into()),
        }
    }
    Ok(())
}

#[tokio::test]
async fn throwing_at_load_is_init_failed() -> TestResult {
    let mut p = node(
        "h.cjs",
        "require('no-such-package');\nexports.main = () => 1;",
    )?;
    match p.channel.ready().await {
        Err(ChannelError::InitFailed(err)) => {
            assert_eq!(err.kind, "Error");
            assert!(err.message.contains("no-such-package"), "{}", err.message);
        }
        other => return Err(format!("expected InitFailed, got {other:?}").into()),
    }
    Ok(())
}
