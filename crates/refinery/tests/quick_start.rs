//! The README's quick start, as written: `cargo run --release -- serve` at the workspace root
//! must know which binary to run. (Building the release profile here would take minutes; what
//! decides the command is the workspace's default members and their binaries, read from cargo
//! itself.)

use std::path::Path;
use std::process::Command;

#[test]
fn cargo_run_at_the_root_runs_the_refinery_binary() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata JSON");
    let defaults: Vec<&str> = metadata["workspace_default_members"]
        .as_array()
        .expect("workspace_default_members")
        .iter()
        .filter_map(|id| id.as_str())
        .collect();
    let binaries: Vec<String> = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter(|p| defaults.contains(&p["id"].as_str().unwrap_or_default()))
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter(|t| {
            t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"))
        })
        .filter_map(|t| t["name"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        binaries,
        ["refinery"],
        "`cargo run` at the root must find exactly one binary, refinery (default members: {defaults:?})"
    );
}
