//! The framed protocol between the host and a shim: message shapes, the frame bound, and
//! blocking frame I/O (used by the in-sandbox shell runtime; the host side is async, in
//! `client.rs`).
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. Both
//! sides refuse a frame longer than [`MAX_FRAME_BYTES`] *before* allocating for it, so a
//! confused or hostile peer cannot make the other side allocate gigabytes.
//!
//! Payloads in frames nest at most `MAX_JSON_DEPTH` levels (the edge refuses deeper input
//! and backpacks, the shims report deeper output as `OutputTooDeep`), so every frame stays
//! well within serde_json's recursion limit and decodes.

use std::borrow::Cow;
use std::io::{self, Read, Write};

use refinery_domain::limits::{MAX_PAYLOAD_BYTES, RECORDED_LOG_BYTES};
use refinery_domain::UserError;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Largest frame either side accepts: a maximal payload plus room for the backpack, the
/// captured logs and the JSON envelope (16 MiB).
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;

/// Captured logs returned per invocation; the shims cut there and say so.
pub const LOG_CAP_BYTES: usize = RECORDED_LOG_BYTES;

// A maximal payload, its backpack and the logs must all fit in one frame.
const _: () = assert!(MAX_FRAME_BYTES >= 2 * MAX_PAYLOAD_BYTES + LOG_CAP_BYTES + 64 * 1024);

/// Which run, step and attempt an invocation is, when the block runs as a step of a service
/// run (steps run at least once: after a crash a step may run again, and the block can use
/// these to be idempotent). The shims give them to the handler as the environment variables
/// [`RUN_ID_VAR`], [`STEP_ID_VAR`] and [`ATTEMPT_VAR`], for that invocation only.
///
/// None of the strings may contain a NUL byte (an environment variable cannot hold one):
/// [`InstanceChannel::invoke_in`](crate::InstanceChannel::invoke_in) refuses such a context.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RunContext {
    /// The service run's id.
    pub run_id: String,
    /// The step's id within the run.
    pub step_id: String,
    /// Which attempt at the step this is, 1 for the first.
    pub attempt: u32,
}

/// The variable holding [`RunContext::run_id`].
pub const RUN_ID_VAR: &str = "REFINERY_RUN_ID";
/// The variable holding [`RunContext::step_id`].
pub const STEP_ID_VAR: &str = "REFINERY_STEP_ID";
/// The variable holding [`RunContext::attempt`] (decimal).
pub const ATTEMPT_VAR: &str = "REFINERY_ATTEMPT";

impl RunContext {
    /// The environment variables of this context, as the handler sees them.
    pub fn vars(&self) -> [(&'static str, Cow<'_, str>); 3] {
        [
            (RUN_ID_VAR, Cow::Borrowed(self.run_id.as_str())),
            (STEP_ID_VAR, Cow::Borrowed(self.step_id.as_str())),
            (ATTEMPT_VAR, Cow::Owned(self.attempt.to_string())),
        ]
    }

    /// `Err(message)` if a value cannot be an environment variable's (it holds a NUL byte).
    pub fn check(&self) -> Result<(), String> {
        for (name, field, value) in [
            (RUN_ID_VAR, "run_id", &self.run_id),
            (STEP_ID_VAR, "step_id", &self.step_id),
        ] {
            if value.contains('\0') {
                return Err(format!(
                    "the run context's {field} {value:?} contains a NUL byte, which the environment variable {name} cannot hold; run and step ids must be NUL-free"
                ));
            }
        }
        Ok(())
    }
}

/// Host → shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HostMessage<'a> {
    Invoke {
        /// Echoed in the reply, so a reply can never be taken for another invocation's
        /// (a block could write frames on its own fd 4).
        id: u64,
        input: Cow<'a, Value>,
        backpack: Cow<'a, Value>,
        /// Set when the invocation is a step of a service run; omitted from the frame
        /// otherwise (so frames without it still parse).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        context: Option<Cow<'a, RunContext>>,
    },
}

/// Shim → host.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ShimMessage {
    /// The block's code loaded; `init_ms` is how long that took inside the shim.
    Ready { init_ms: f64 },
    /// The block's code could not be loaded; the shim exits right after sending this.
    InitError { error: UserError },
    /// The handler returned.
    Result {
        id: u64,
        output: Value,
        backpack: Value,
        #[serde(default)]
        logs: String,
        #[serde(default)]
        logs_truncated: bool,
    },
    /// The handler raised (or its output could not be encoded).
    Error {
        id: u64,
        error: UserError,
        #[serde(default)]
        logs: String,
        #[serde(default)]
        logs_truncated: bool,
    },
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed its end (cleanly between frames, or mid-frame).
    #[error("peer closed the pipe")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads the length header's 4 bytes into a length, refusing oversized frames.
pub fn frame_len(header: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Encodes a message as a complete frame (header included), refusing oversized ones.
pub fn encode<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let mut frame = vec![0u8; 4];
    serde_json::to_writer(&mut frame, message).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = frame.len() - 4;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    // Cannot fail: MAX_FRAME_BYTES fits in a u32.
    let header = u32::try_from(len).map_err(|_| FrameError::TooLarge(len))?;
    frame[..4].copy_from_slice(&header.to_be_bytes());
    Ok(frame)
}

/// Parses a frame body.
pub fn decode<'de, T: Deserialize<'de>>(body: &'de [u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Blocking read of one frame body. `Ok(None)` on a clean EOF between frames.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Vec<u8>>, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        match reader.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Closed),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(header)?;
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(body))
}

/// Blocking write of one message as a frame.
pub fn write_message<T: Serialize>(writer: &mut impl Write, message: &T) -> Result<(), FrameError> {
    let frame = encode(message)?;
    writer.write_all(&frame).map_err(|e| match e.kind() {
        io::ErrorKind::BrokenPipe => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    writer.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_frame() -> Result<(), FrameError> {
        let input = serde_json::json!({"a": 1});
        let backpack = serde_json::json!({});
        let msg = HostMessage::Invoke {
            id: 1,
            input: Cow::Borrowed(&input),
            backpack: Cow::Borrowed(&backpack),
            context: None,
        };
        let mut buf = Vec::new();
        write_message(&mut buf, &msg)?;
        let body = read_frame(&mut buf.as_slice())?.ok_or(FrameError::Closed)?;
        let HostMessage::Invoke { input: got, .. } = decode(&body)?;
        assert_eq!(*got, input);
        Ok(())
    }

    #[test]
    fn the_run_context_is_optional_in_the_frame() -> Result<(), FrameError> {
        let value = serde_json::json!({});
        let plain = HostMessage::Invoke {
            id: 7,
            input: Cow::Borrowed(&value),
            backpack: Cow::Borrowed(&value),
            context: None,
        };
        let text = String::from_utf8(encode(&plain)?[4..].to_vec())
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
        assert!(!text.contains("context"), "{text}");

        // A frame of before the context (no key at all) still parses.
        let old = br#"{"type":"invoke","id":1,"input":null,"backpack":{}}"#;
        let HostMessage::Invoke { context, .. } = decode(old)?;
        assert_eq!(context, None);

        let run = RunContext {
            run_id: "run_1".into(),
            step_id: "step_2".into(),
            attempt: 3,
        };
        let with = HostMessage::Invoke {
            id: 8,
            input: Cow::Borrowed(&value),
            backpack: Cow::Borrowed(&value),
            context: Some(Cow::Borrowed(&run)),
        };
        let frame = encode(&with)?;
        let HostMessage::Invoke { context, .. } = decode(&frame[4..])?;
        assert_eq!(context.as_deref(), Some(&run));
        Ok(())
    }

    #[test]
    fn a_context_with_a_nul_byte_is_refused_by_name() {
        let good = RunContext {
            run_id: "run_1".into(),
            step_id: "s".into(),
            attempt: 1,
        };
        assert_eq!(good.check(), Ok(()));
        let bad = RunContext {
            step_id: "a\0b".into(),
            ..good
        };
        let message = bad.check().expect_err("NUL refused");
        assert!(message.contains("step_id"), "{message}");
        assert!(message.contains("REFINERY_STEP_ID"), "{message}");
    }

    #[test]
    fn refuses_oversized_header_before_allocating() {
        let header = u32::MAX.to_be_bytes();
        let mut reader: &[u8] = &header;
        assert!(matches!(
            read_frame(&mut reader),
            Err(FrameError::TooLarge(_))
        ));
    }

    #[test]
    fn eof_mid_frame_is_closed_and_between_frames_is_none() {
        let mut empty: &[u8] = &[];
        assert!(matches!(read_frame(&mut empty), Ok(None)));
        let mut partial: &[u8] = &[0, 0, 0, 10, b'{'];
        assert!(matches!(read_frame(&mut partial), Err(FrameError::Closed)));
    }
}
