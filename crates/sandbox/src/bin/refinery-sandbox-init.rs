//! Test helper: the in-sandbox init as a standalone binary (`refinery` embeds the same call).
//!
//! Builtins for tests: `echo ARGS...` writes the arguments and the uid to fd 4 and returns 0;
//! anything else returns 2.

use std::io::Write;
use std::os::fd::FromRawFd;

fn builtin(name: &str, args: &[String]) -> i32 {
    if name != "echo" {
        return 2;
    }
    // SAFETY: fd 4 is the responses pipe the sandbox hands every instance. ManuallyDrop keeps it
    // open until the process exits, so the host's EOF means "exited".
    let mut out = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(4) });
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let home = std::env::var("HOME").unwrap_or_default();
    match writeln!(*out, "{} uid={uid} home={home}", args.join(" ")) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("__sandbox-init") {
        std::process::exit(refinery_sandbox::init_main(builtin));
    }
    eprintln!("usage: refinery-sandbox-init __sandbox-init (started by refinery-sandbox only)");
    std::process::exit(2);
}
