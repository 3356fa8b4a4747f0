//! The host side of the protocol: drives one instance's shim over its two pipes.
//!
//! One [`InstanceChannel`] per instance, used by one task at a time (`&mut self`). It is not
//! cancel-safe: if an `invoke()` future is dropped half-way (the pool's timeout), the
//! channel no longer knows where the frame boundaries are, so every later call fails with
//! [`ChannelError::Protocol`] and the instance must be discarded — which is what the pool
//! does anyway.

use std::borrow::Cow;
use std::io;
use std::os::fd::OwnedFd;

use refinery_domain::execution::truncate_utf8;
use refinery_domain::UserError;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;

use crate::protocol::{self, FrameError, HostMessage, RunContext, ShimMessage, LOG_CAP_BYTES};

/// Why talking to an instance failed. Anything but a per-invocation user error (which is
/// in [`Reply::outcome`]) means the instance should be discarded.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The instance closed its pipes (it exited or was killed).
    #[error("instance closed its pipes")]
    Closed,
    /// The block's code failed to load; the shim has exited.
    #[error("block failed to initialise: {}: {}", .0.kind, .0.message)]
    InitFailed(UserError),
    /// The shim sent something that is not a valid frame at this point, or an earlier call
    /// was cancelled half-way and the stream position is unknown.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("instance pipe I/O failed: {0}")]
    Io(#[from] io::Error),
}

/// The shim loaded the block's code.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ready {
    /// Milliseconds the shim spent loading the block's code (the user-visible init time).
    pub init_ms: f64,
}

/// The result of one invocation that reached user code.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// What the handler returned, or the error it raised.
    pub outcome: Result<Output, UserError>,
    /// What the invocation wrote to stdout and stderr, at most `RECORDED_LOG_BYTES`.
    pub logs: String,
    /// Whether `logs` was cut (by the shim or here).
    pub logs_truncated: bool,
}

/// A handler's successful return.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    pub output: Value,
    /// The backpack as the handler left it.
    pub backpack: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The shim's first frame has not been read yet.
    Starting,
    /// Between invocations: the next frame boundary is known.
    Idle,
    /// A call is in flight, or one was dropped or failed mid-frame: position unknown.
    Broken,
    /// The shim is gone (EOF, or it reported an init error and exited).
    Closed,
}

/// The host ends of one instance's request and response pipes.
#[derive(Debug)]
pub struct InstanceChannel {
    requests: pipe::Sender,
    responses: pipe::Receiver,
    state: State,
    init_error: Option<UserError>,
    /// Id of the last invocation sent; replies must echo it.
    last_id: u64,
}

impl InstanceChannel {
    /// Wraps the host ends of the pipes: `requests` is the write end of the pipe the shim
    /// reads as fd 3, `responses` the read end of the one it writes as fd 4. Sets them
    /// non-blocking. Must be called inside a Tokio runtime (the pipes register with its
    /// reactor).
    pub fn new(requests: OwnedFd, responses: OwnedFd) -> Result<InstanceChannel, ChannelError> {
        Ok(InstanceChannel {
            requests: pipe::Sender::from_owned_fd(requests)?,
            responses: pipe::Receiver::from_owned_fd(responses)?,
            state: State::Starting,
            init_error: None,
            last_id: 0,
        })
    }

    /// Waits for the shim's first frame: `Ready`, or `InitFailed` with the user's load
    /// error (the shim then exits), or `Closed` if it died first. Call it once;
    /// [`invoke`](Self::invoke) calls it itself if nobody has.
    pub async fn ready(&mut self) -> Result<Ready, ChannelError> {
        match self.state {
            State::Starting => {}
            State::Idle => {
                return Err(ChannelError::Protocol(
                    "ready() called twice on one instance".into(),
                ))
            }
            State::Broken => return Err(broken()),
            State::Closed => return Err(self.closed_error()),
        }
        self.state = State::Broken;
        let message = self.read_message().await?;
        match message {
            ShimMessage::Ready { init_ms } => {
                self.state = State::Idle;
                Ok(Ready { init_ms })
            }
            ShimMessage::InitError { mut error } => {
                crate::hints::add_hint(&mut error);
                self.state = State::Closed;
                self.init_error = Some(error.clone());
                Err(ChannelError::InitFailed(error))
            }
            other => Err(ChannelError::Protocol(format!(
                "expected ready or init_error first, got {}",
                kind_of(&other)
            ))),
        }
    }

    /// Runs one invocation and waits for its reply. A handler error is `Ok(Reply)` with
    /// `outcome: Err(..)`; `Err(..)` means the instance itself is unusable.
    pub async fn invoke(&mut self, input: &Value, backpack: &Value) -> Result<Reply, ChannelError> {
        self.invoke_in(input, backpack, None).await
    }

    /// [`invoke`](Self::invoke) as a step of a service run when `context` is set: the
    /// handler sees the context's variables ([`RunContext::vars`]) for this invocation only.
    /// A context that no environment variable can hold ([`RunContext::check`]) is this
    /// invocation's `InvalidRunContext` error, sent to no shim; the channel stays usable.
    pub async fn invoke_in(
        &mut self,
        input: &Value,
        backpack: &Value,
        context: Option<&RunContext>,
    ) -> Result<Reply, ChannelError> {
        if let Some(Err(message)) = context.map(RunContext::check) {
            return Ok(reply(
                Err(UserError::new("InvalidRunContext", message)),
                String::new(),
                false,
            ));
        }
        if self.state == State::Starting {
            self.ready().await?;
        }
        match self.state {
            State::Idle => {}
            State::Starting | State::Broken => return Err(broken()),
            State::Closed => return Err(self.closed_error()),
        }
        self.last_id += 1;
        let id = self.last_id;
        let frame = protocol::encode(&HostMessage::Invoke {
            id,
            input: Cow::Borrowed(input),
            backpack: Cow::Borrowed(backpack),
            context: context.map(Cow::Borrowed),
        })
        // Nothing was sent: the channel stays usable.
        .map_err(|e| ChannelError::Protocol(format!("cannot send invocation: {e}")))?;
        self.state = State::Broken;
        if let Err(e) = self.requests.write_all(&frame).await {
            return Err(self.io_failure(e));
        }
        let message = self.read_message().await?;
        let reply = match message {
            ShimMessage::Result { id: got, .. } | ShimMessage::Error { id: got, .. }
                if got != id =>
            {
                return Err(ChannelError::Protocol(format!(
                    "reply for invocation {got} while waiting for invocation {id}"
                )))
            }
            ShimMessage::Result {
                output,
                backpack,
                logs,
                logs_truncated,
                ..
            } => reply(Ok(Output { output, backpack }), logs, logs_truncated),
            ShimMessage::Error {
                mut error,
                logs,
                logs_truncated,
                ..
            } => {
                crate::hints::add_hint(&mut error);
                reply(Err(error), logs, logs_truncated)
            }
            other => {
                return Err(ChannelError::Protocol(format!(
                    "expected result or error, got {}",
                    kind_of(&other)
                )))
            }
        };
        self.state = State::Idle;
        Ok(reply)
    }

    /// Reads and parses one frame; on any failure the state stays `Broken` (or `Closed`).
    async fn read_message(&mut self) -> Result<ShimMessage, ChannelError> {
        let mut header = [0u8; 4];
        if let Err(e) = self.responses.read_exact(&mut header).await {
            return Err(self.io_failure(e));
        }
        let len = protocol::frame_len(header).map_err(frame_error)?;
        let mut body = vec![0u8; len];
        if let Err(e) = self.responses.read_exact(&mut body).await {
            return Err(self.io_failure(e));
        }
        protocol::decode(&body).map_err(frame_error)
    }

    /// Maps a pipe error: EOF or EPIPE mean the instance is gone.
    fn io_failure(&mut self, e: io::Error) -> ChannelError {
        match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::BrokenPipe => {
                self.state = State::Closed;
                ChannelError::Closed
            }
            _ => ChannelError::Io(e),
        }
    }

    fn closed_error(&self) -> ChannelError {
        match &self.init_error {
            Some(error) => ChannelError::InitFailed(error.clone()),
            None => ChannelError::Closed,
        }
    }
}

fn reply(outcome: Result<Output, UserError>, mut logs: String, logs_truncated: bool) -> Reply {
    // The shim already caps; this is the host's own guarantee of the bound.
    let cut = truncate_utf8(&mut logs, LOG_CAP_BYTES);
    Reply {
        outcome,
        logs,
        logs_truncated: logs_truncated || cut,
    }
}

fn broken() -> ChannelError {
    ChannelError::Protocol(
        "channel position unknown after a cancelled or failed call; discard the instance".into(),
    )
}

fn frame_error(e: FrameError) -> ChannelError {
    match e {
        FrameError::Closed => ChannelError::Closed,
        FrameError::Io(e) => ChannelError::Io(e),
        other => ChannelError::Protocol(other.to_string()),
    }
}

fn kind_of(message: &ShimMessage) -> &'static str {
    match message {
        ShimMessage::Ready { .. } => "ready",
        ShimMessage::InitError { .. } => "init_error",
        ShimMessage::Result { .. } => "result",
        ShimMessage::Error { .. } => "error",
    }
}
