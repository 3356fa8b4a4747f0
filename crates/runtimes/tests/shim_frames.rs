//! The interpreted shims refuse oversized request frames: they exit instead of allocating.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{spawn_raw, TestResult};
use refinery_domain::Language;
use refinery_runtimes::protocol::MAX_FRAME_BYTES;

#[test]
fn shims_exit_on_an_oversized_request_frame() -> TestResult {
    for (language, name, code) in [
        (
            Language::Python,
            "main.py",
            "def main(i, b):\n    return 1\n",
        ),
        (Language::Node, "main.mjs", "export const main = () => 1;\n"),
    ] {
        let mut raw = spawn_raw(language, name, code, &[])?;
        let mut responses = File::from(raw.responses);
        let mut header = [0u8; 4];
        responses.read_exact(&mut header)?;
        let mut ready = vec![0u8; u32::from_be_bytes(header) as usize];
        responses.read_exact(&mut ready)?;
        assert!(
            String::from_utf8_lossy(&ready).contains("\"ready\""),
            "{name}"
        );

        let mut requests = File::from(raw.requests);
        requests.write_all(&u32::try_from(MAX_FRAME_BYTES + 1)?.to_be_bytes())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = raw.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = raw.child.kill();
                return Err(format!("{name}: shim kept running").into());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(1), "{name}");
        // Nothing else was sent.
        let mut rest = Vec::new();
        responses.read_to_end(&mut rest)?;
        assert!(rest.is_empty(), "{name}");
    }
    Ok(())
}
