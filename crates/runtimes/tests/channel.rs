//! The host side against a fake shim that writes raw frames.

mod common;

use std::fs::File;
use std::io::Write;

use common::{pipes, TestResult};
use refinery_runtimes::protocol::MAX_FRAME_BYTES;
use refinery_runtimes::{ChannelError, InstanceChannel};
use serde_json::json;

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(body.len())
        .unwrap_or(u32::MAX)
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(body);
    out
}

/// A channel whose shim side has already written `bytes` and closed.
fn channel_after(bytes: &[u8]) -> Result<InstanceChannel, Box<dyn std::error::Error>> {
    let ((req_w, _req_r), (resp_w, resp_r)) = pipes()?;
    let bytes = bytes.to_vec();
    // A thread: more than a pipe's capacity blocks until the channel reads it.
    std::thread::spawn(move || {
        let _ = File::from(resp_w).write_all(&bytes);
    });
    Ok(InstanceChannel::new(req_w, resp_r)?)
}

#[tokio::test]
async fn oversized_frame_is_rejected() -> TestResult {
    let header = u32::try_from(MAX_FRAME_BYTES + 1)?.to_be_bytes();
    let mut channel = channel_after(&header)?;
    match channel.ready().await {
        Err(ChannelError::Protocol(msg)) => assert!(msg.contains("exceeds"), "{msg}"),
        other => return Err(format!("expected Protocol, got {other:?}").into()),
    }
    // The stream position is lost: later calls refuse rather than misread.
    assert!(matches!(
        channel.invoke(&json!({}), &json!({})).await,
        Err(ChannelError::Protocol(_))
    ));
    Ok(())
}

#[tokio::test]
async fn malformed_json_is_a_protocol_error() -> TestResult {
    let mut channel = channel_after(&frame(b"{not json"))?;
    assert!(matches!(
        channel.ready().await,
        Err(ChannelError::Protocol(_))
    ));
    Ok(())
}

#[tokio::test]
async fn unexpected_first_frame_is_a_protocol_error() -> TestResult {
    let body = br#"{"type":"result","id":1,"output":1,"backpack":{},"logs":""}"#;
    let mut channel = channel_after(&frame(body))?;
    assert!(matches!(
        channel.ready().await,
        Err(ChannelError::Protocol(_))
    ));
    Ok(())
}

#[tokio::test]
async fn eof_before_ready_is_closed() -> TestResult {
    let mut channel = channel_after(b"")?;
    assert!(matches!(channel.ready().await, Err(ChannelError::Closed)));
    let mut channel = channel_after(&[0, 0])?;
    assert!(matches!(channel.ready().await, Err(ChannelError::Closed)));
    Ok(())
}

#[tokio::test]
async fn host_caps_logs_even_if_the_shim_does_not() -> TestResult {
    let logs = "é".repeat(refinery_domain::limits::RECORDED_LOG_BYTES);
    let result = json!({"type": "result", "id": 1, "output": 1, "backpack": {}, "logs": logs});
    let mut bytes = frame(br#"{"type":"ready","init_ms":1.5}"#);
    bytes.extend(frame(serde_json::to_string(&result)?.as_bytes()));
    let mut channel = channel_after(&bytes)?;
    assert_eq!(channel.ready().await?.init_ms, 1.5);
    let reply = channel.invoke(&json!({}), &json!({})).await;
    // The request pipe's reader was dropped: the write may fail with EPIPE first.
    match reply {
        Ok(reply) => {
            assert!(reply.logs_truncated);
            assert!(reply.logs.len() <= refinery_domain::limits::RECORDED_LOG_BYTES);
        }
        Err(ChannelError::Closed) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}
