mod common;

use common::{start, TestResult};
use refinery_domain::Language;
use refinery_runtimes::ChannelError;
use serde_json::json;

fn python(code: &str) -> Result<common::Running, Box<dyn std::error::Error>> {
    start(Language::Python, "main.py", code, &[])
}

#[tokio::test]
async fn sync_handler_round_trips_input_and_mutated_backpack() -> TestResult {
    let mut p = python(
        "def main(block_input, backpack):\n    backpack['n'] = backpack.get('n', 0) + 1\n    return {'y': block_input['x'] * 2}\n",
    )?;
    let ready = p.channel.ready().await?;
    assert!(ready.init_ms >= 0.0);
    let reply = p
        .channel
        .invoke(&json!({"x": 21}), &json!({"n": 1, "keep": "me"}))
        .await?;
    let out = reply.outcome.map_err(|e| format!("{e:?}"))?;
    assert_eq!(out.output, json!({"y": 42}));
    assert_eq!(out.backpack, json!({"n": 2, "keep": "me"}));
    assert!(!reply.logs_truncated);
    Ok(())
}

#[tokio::test]
async fn async_handler_runs_on_one_loop() -> TestResult {
    let mut p = python(
        "import asyncio\nloops = set()\nasync def main(block_input, backpack):\n    await asyncio.sleep(0.01)\n    loops.add(id(asyncio.get_running_loop()))\n    return {'got': block_input, 'loops': len(loops)}\n",
    )?;
    for _ in 0..2 {
        let reply = p.channel.invoke(&json!([1, "a"]), &json!({})).await?;
        let out = reply.outcome.map_err(|e| format!("{e:?}"))?;
        assert_eq!(out.output, json!({"got": [1, "a"], "loops": 1}));
    }
    Ok(())
}

#[tokio::test]
async fn state_persists_between_invocations() -> TestResult {
    let mut p =
        python("count = 0\ndef main(i, b):\n    global count\n    count += 1\n    return count\n")?;
    p.channel.ready().await?;
    for expected in 1..=3 {
        let reply = p.channel.invoke(&json!(null), &json!({})).await?;
        assert_eq!(
            reply.outcome.map_err(|e| format!("{e:?}"))?.output,
            json!(expected)
        );
    }
    Ok(())
}

#[tokio::test]
async fn print_stderr_and_subprocess_output_are_captured_in_order() -> TestResult {
    let mut p = python(
        "import os, sys\nprint('init output goes elsewhere')\ndef main(i, b):\n    print('hello from print')\n    sys.stderr.write('to stderr\\n')\n    os.system('echo from a subprocess')\n    print('after')\n    return 1\n",
    )?;
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    assert!(reply.outcome.is_ok());
    assert_eq!(
        reply.logs,
        "hello from print\nto stderr\nfrom a subprocess\nafter\n"
    );
    // The next invocation starts with empty logs.
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    assert!(reply.logs.starts_with("hello from print\n"));
    assert_eq!(reply.logs.matches("hello").count(), 1);
    Ok(())
}

#[tokio::test]
async fn huge_logs_are_cut_and_marked() -> TestResult {
    let mut p = python("def main(i, b):\n    print('x' * 1_000_000)\n    return 'ok'\n")?;
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    assert_eq!(
        reply.outcome.map_err(|e| format!("{e:?}"))?.output,
        json!("ok")
    );
    assert!(reply.logs_truncated);
    assert_eq!(
        reply.logs.len(),
        refinery_domain::limits::RECORDED_LOG_BYTES
    );
    Ok(())
}

#[tokio::test]
async fn raised_exception_is_an_error_with_a_clean_traceback() -> TestResult {
    let mut p = python(
        "def helper(x):\n    raise ValueError(f'bad value {x}')\n\ndef main(i, b):\n    print('before')\n    helper(i)\n",
    )?;
    let reply = p.channel.invoke(&json!(7), &json!({})).await?;
    let err = reply.outcome.err().ok_or("expected an error")?;
    assert_eq!(err.kind, "ValueError");
    assert_eq!(err.message, "bad value 7");
    let tb = err.traceback.ok_or("no traceback")?;
    assert!(tb.contains("main.py\", line 6, in main"), "{tb}");
    assert!(tb.contains("in helper"), "{tb}");
    assert!(tb.contains("ValueError: bad value 7"), "{tb}");
    assert!(!tb.contains("python_shim"), "{tb}");
    assert_eq!(reply.logs, "before\n");
    // The instance survives a user error.
    let reply = p.channel.invoke(&json!(8), &json!({})).await?;
    assert_eq!(
        reply.outcome.err().ok_or("expected an error")?.message,
        "bad value 8"
    );
    Ok(())
}

#[tokio::test]
async fn async_exception_traceback_hides_asyncio() -> TestResult {
    let mut p = python("async def main(i, b):\n    raise KeyError('k')\n")?;
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    let err = reply.outcome.err().ok_or("expected an error")?;
    assert_eq!(err.kind, "KeyError");
    let tb = err.traceback.ok_or("no traceback")?;
    assert!(!tb.contains("asyncio"), "{tb}");
    assert!(!tb.contains("python_shim"), "{tb}");
    assert!(tb.contains("main.py"), "{tb}");
    Ok(())
}

#[tokio::test]
async fn sys_exit_in_the_handler_is_a_user_error() -> TestResult {
    let mut p = python("import sys\ndef main(i, b):\n    sys.exit(4)\n")?;
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    assert_eq!(
        reply.outcome.err().ok_or("expected an error")?.kind,
        "SystemExit"
    );
    assert!(p.channel.invoke(&json!({}), &json!({})).await.is_ok());
    Ok(())
}

#[tokio::test]
async fn non_serialisable_output_is_a_type_error() -> TestResult {
    let mut p = python("def main(i, b):\n    return {'s': {1, 2}}\n")?;
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    let err = reply.outcome.err().ok_or("expected an error")?;
    assert_eq!(err.kind, "TypeError");
    assert!(
        err.message.contains("not JSON-serialisable"),
        "{}",
        err.message
    );
    let mut p = python("def main(i, b):\n    return float('nan')\n")?;
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    assert_eq!(
        reply.outcome.err().ok_or("expected an error")?.kind,
        "TypeError"
    );
    Ok(())
}

#[tokio::test]
async fn syntax_error_is_init_failed_with_file_and_line() -> TestResult {
    let mut p = python("def main(i, b):\n    return (\n\nx = = 1\n")?;
    match p.channel.ready().await {
        Err(ChannelError::InitFailed(err)) => {
            assert_eq!(err.kind, "SyntaxError");
            assert!(err.message.contains("main.py"), "{}", err.message);
            assert!(err.message.contains("line"), "{}", err.message);
            assert!(!err.traceback.unwrap_or_default().contains("importlib"));
        }
        other => return Err(format!("expected InitFailed, got {other:?}").into()),
    }
    // The shim exits after reporting; the channel keeps saying why.
    let status = p.child.wait()?;
    assert!(!status.success());
    assert!(matches!(
        p.channel.invoke(&json!({}), &json!({})).await,
        Err(ChannelError::InitFailed(_))
    ));
    Ok(())
}

#[tokio::test]
async fn missing_main_is_handler_not_found() -> TestResult {
    let mut p = python("def handler(i, b):\n    return 1\n")?;
    match p.channel.ready().await {
        Err(ChannelError::InitFailed(err)) => {
            assert_eq!(err.kind, "HandlerNotFound");
            assert!(
                err.message.contains("main(block_input, backpack)"),
                "{}",
                err.message
            );
        }
        other => return Err(format!("expected InitFailed, got {other:?}").into()),
    }
    let mut p = python("main = 3\n")?;
    match p.channel.ready().await {
        Err(ChannelError::InitFailed(err)) => assert_eq!(err.kind, "HandlerNotFound"),
        other => return Err(format!("expected InitFailed, got {other:?}").into()),
    }
    Ok(())
}

#[tokio::test]
async fn failed_import_is_init_failed() -> TestResult {
    let mut p = python("import no_such_module_here\ndef main(i, b):\n    return 1\n")?;
    match p.channel.ready().await {
        Err(ChannelError::InitFailed(err)) => {
            assert_eq!(err.kind, "ModuleNotFoundError");
            assert!(err.traceback.unwrap_or_default().contains("main.py"));
        }
        other => return Err(format!("expected InitFailed, got {other:?}").into()),
    }
    Ok(())
}

#[tokio::test]
async fn sibling_modules_import_and_stdlib_names_are_not_shadowed() -> TestResult {
    let mut p = start(
        Language::Python,
        "json.py",
        "import helper\nimport json as j\ndef main(i, b):\n    return [helper.VALUE, j.dumps(1)]\n",
        &[("helper.py", "VALUE = 'sibling'\n")],
    )?;
    let reply = p.channel.invoke(&json!({}), &json!({})).await?;
    let out = reply.outcome.map_err(|e| format!("{e:?}"))?;
    assert_eq!(out.output, json!(["sibling", "1"]));
    Ok(())
}

#[tokio::test]
async fn oversized_request_is_refused_before_sending() -> TestResult {
    let mut p = python("def main(i, b):\n    return len(i)\n")?;
    let huge = json!("x".repeat(refinery_runtimes::protocol::MAX_FRAME_BYTES + 1));
    match p.channel.invoke(&huge, &json!({})).await {
        Err(ChannelError::Protocol(_)) => {}
        other => return Err(format!("expected Protocol, got {other:?}").into()),
    }
    // Nothing was sent, so the instance is still usable.
    let reply = p.channel.invoke(&json!("abc"), &json!({})).await?;
    assert_eq!(
        reply.outcome.map_err(|e| format!("{e:?}"))?.output,
        json!(3)
    );
    Ok(())
}

#[tokio::test]
async fn dead_instance_is_closed() -> TestResult {
    let mut p = python("import os\ndef main(i, b):\n    os._exit(0)\n")?;
    p.channel.ready().await?;
    assert!(matches!(
        p.channel.invoke(&json!({}), &json!({})).await,
        Err(ChannelError::Closed)
    ));
    assert!(matches!(
        p.channel.invoke(&json!({}), &json!({})).await,
        Err(ChannelError::Closed)
    ));
    Ok(())
}
