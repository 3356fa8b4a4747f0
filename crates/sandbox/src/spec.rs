//! The setup spec the host sends to the in-sandbox init as the first frame on its fd 3:
//! a 4-byte big-endian length followed by this struct as JSON.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::mounts::MountOp;
use crate::Entry;

/// Upper bound of a setup frame; anything larger is a bug or an attack.
pub(crate) const MAX_FRAME: usize = 4 * 1024 * 1024;

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub(crate) enum RlimitKind {
    Core,
    NoFile,
    FSize,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub(crate) struct Rlimit {
    pub kind: RlimitKind,
    /// Soft and hard limit.
    pub limit: u64,
}

/// Everything the init needs to build the sandbox around itself.
#[derive(Serialize, Deserialize, Debug)]
pub(crate) struct InitSpec {
    pub instance_id: String,
    /// `cgroup.procs` files to write "0" into (host paths, before the pivot).
    pub cgroup_procs: Vec<PathBuf>,
    /// Host directory where the new root tmpfs is mounted (private to the mount namespace).
    pub staging_dir: PathBuf,
    pub mounts: Vec<MountOp>,
    pub hostname: String,
    /// Working directory inside the sandbox.
    pub workdir: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub rlimits: Vec<Rlimit>,
    /// The complete environment of the entry.
    pub env: Vec<(String, String)>,
    pub entry: Entry,
}

/// What an adopted standby sandbox reads from its fd 3 (see [`crate::StandbySpec::entry`]):
/// who it now works for is only ever told after it started.
#[derive(Serialize, Debug)]
pub(crate) struct AdoptFrame<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The complete environment, as an exec'd entry would have been given it.
    pub env: &'a [(String, String)],
    /// The entry's arguments (for a shim: the block's source path).
    pub args: &'a [String],
}

/// Encode a spec (or any frame the host sends before the runtime protocol) as one frame.
pub(crate) fn encode(spec: &impl Serialize) -> Result<Vec<u8>, serde_json::Error> {
    let json = serde_json::to_vec(spec)?;
    let mut frame = Vec::with_capacity(json.len() + 4);
    frame.extend_from_slice(&(json.len() as u32).to_be_bytes());
    frame.extend_from_slice(&json);
    Ok(frame)
}
