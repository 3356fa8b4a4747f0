//! Lays a block's code out on disk once per (deployment, block), for instances to mount
//! read-only at `/code` (a directory source's files at their relative paths, subdirectories
//! included; the code dir holds nothing else, leaving room beside it for a read-only
//! dependency layer), and removes a deployment's code once it is pruned or deleted.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use refinery_domain::BlockSpec;

/// Writes the block's files under `root/<deployment_id>/<block>` unless already there and
/// returns that directory. Written to a temporary sibling first and renamed, so a crash
/// never leaves a half-written code dir that later instances would trust.
pub fn materialize(root: &Path, deployment_id: i64, block: &BlockSpec) -> io::Result<PathBuf> {
    let dir = root.join(deployment_id.to_string()).join(&block.name);
    if dir.is_dir() {
        return Ok(dir);
    }
    let parent = root.join(deployment_id.to_string());
    fs::create_dir_all(&parent)?;
    fs::set_permissions(&parent, fs::Permissions::from_mode(0o755))?;
    // Unique per call: concurrent first invocations of one block each lay out their own
    // copy and the first rename wins (a shared staging name let one remove another's).
    let staging = parent.join(format!(
        ".{}.{}.{}",
        block.name,
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    fs::create_dir(&staging)?;
    // World-readable: instances run as unprivileged uids and must read their own code.
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o755))?;
    let written = refinery_runtimes::block_code_files(block)
        .into_iter()
        .try_for_each(|(name, contents)| {
            // A directory source's paths were checked at deploy (relative, no `..`, no
            // hidden part): they stay inside `staging`.
            let path = staging.join(&name);
            if let Some(parent) = path.parent().filter(|p| *p != staging) {
                fs::create_dir_all(parent)?;
                let mut dir = parent;
                while dir != staging {
                    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
                    match dir.parent() {
                        Some(up) => dir = up,
                        None => break,
                    }
                }
            }
            fs::write(&path, contents)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
        });
    if let Err(e) = written {
        // E.g. a full disk: leave no half-written copy behind to hold the space.
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    match fs::rename(&staging, &dir) {
        Ok(()) => Ok(dir),
        // Another task laid it out first: theirs is identical.
        Err(_) if dir.is_dir() => {
            let _ = fs::remove_dir_all(&staging);
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

/// Removes `root/<deployment_id>` (every block's code of that deployment); a missing one is
/// not an error.
pub fn remove(root: &Path, deployment_id: i64) -> io::Result<()> {
    match fs::remove_dir_all(root.join(deployment_id.to_string())) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The deployment ids that have a directory under `root` (other entries are ignored).
pub fn laid_out(root: &Path) -> io::Result<Vec<i64>> {
    let entries = match fs::read_dir(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other?,
    };
    let mut ids = Vec::new();
    for entry in entries {
        if let Some(id) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) {
            ids.push(id);
        }
    }
    Ok(ids)
}
