//! The server's log sink: standard error, where a failed write never fails anything else.
//!
//! `tracing-subscriber` reports a failed write with `eprintln!`, which panics when standard
//! error itself cannot be written: with the server's stderr redirected to a file on a full
//! disk, every request that logged a line panicked in its handler task and its connection
//! was dropped without an answer. [`LossyStderr`] writes each line to stderr and, if that
//! fails (`ENOSPC`, `EIO`, a closed pipe), drops the line and counts it
//! ([`dropped_log_lines`], reported by `/v1/health`) instead of returning the error.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because stderr could not be written, since the process started.
pub fn dropped_log_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// A writer to stderr that never fails: pass `LossyStderr::new` as the log writer
/// (`tracing_subscriber::fmt().with_writer(LossyStderr::new)`; it writes each event with
/// one `write_all`).
#[derive(Debug, Default, Clone, Copy)]
pub struct LossyStderr;

impl LossyStderr {
    pub fn new() -> LossyStderr {
        LossyStderr
    }
}

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if io::stderr().lock().write_all(buf).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        // Stderr is unbuffered; a failure here would have been a dropped line already.
        let _ = io::stderr().flush();
        Ok(())
    }
}
