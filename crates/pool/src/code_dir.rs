//! Lays a block's code out on disk once per (deployment, block), for instances to mount
//! read-only at `/code` (a directory source's files at their relative paths, subdirectories
//! included; the code dir holds nothing else, leaving room beside it for a read-only
//! dependency layer), lays out the project shared directories a block lists (for
//! `/shared`, [`materialize_shared`]), and removes a deployment's code once it is pruned or
//! deleted.

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
    let files = refinery_runtimes::block_code_files(block);
    let written = write_files(
        &staging,
        files
            .iter()
            .map(|(name, contents)| (name.as_str(), contents.as_slice())),
    );
    place(written, &staging, &dir)
}

/// Lays out the shared directories `block` lists, for instances to mount read-only at
/// `/shared`: each directory's files once per deployment under
/// `root/<deployment_id>/.shared/<name>`, and the block's view of them,
/// `root/<deployment_id>/.views/<block>/<name>`, made of hard links to those files (so a
/// block sees exactly the directories it lists, and their bytes are on disk once).
/// Returns the view, or `None` when the block lists none. Each step is written to a
/// temporary sibling and renamed, as [`materialize`] does. (Names starting with `.` are
/// never block names, so neither collides with a block's code dir.)
pub fn materialize_shared(
    root: &Path,
    deployment_id: i64,
    block: &BlockSpec,
) -> io::Result<Option<PathBuf>> {
    if block.shared.is_empty() {
        return Ok(None);
    }
    let deployment = root.join(deployment_id.to_string());
    let view = deployment.join(".views").join(&block.name);
    if view.is_dir() {
        return Ok(Some(view));
    }
    let shared_root = deployment.join(".shared");
    for parent in [&deployment, &shared_root, &deployment.join(".views")] {
        fs::create_dir_all(parent)?;
        fs::set_permissions(parent, fs::Permissions::from_mode(0o755))?;
    }
    for dir in &block.shared {
        let target = shared_root.join(&dir.name);
        if target.is_dir() {
            continue;
        }
        let staging = staging_dir(&shared_root, &dir.name)?;
        let written = write_files(
            &staging,
            dir.files.iter().map(|(p, b)| (p.as_str(), b.as_slice())),
        );
        place(written, &staging, &target)?;
    }
    let staging = staging_dir(&deployment.join(".views"), &block.name)?;
    let linked = block.shared.iter().try_for_each(|dir| {
        let into = staging.join(&dir.name);
        fs::create_dir(&into)?;
        fs::set_permissions(&into, fs::Permissions::from_mode(0o755))?;
        link_tree(&shared_root.join(&dir.name), &into)
    });
    place(linked, &staging, &view).map(Some)
}

/// A new empty staging directory in `parent` for `name`, world-readable.
fn staging_dir(parent: &Path, name: &str) -> io::Result<PathBuf> {
    let staging = parent.join(format!(
        ".{name}.{}.{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    fs::create_dir(&staging)?;
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o755))?;
    Ok(staging)
}

/// Hard-links every file under `from` into `to` at the same relative path (directories
/// made as needed); copies where a link cannot be made.
fn link_tree(from: &Path, to: &Path) -> io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            fs::create_dir(&target)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
            link_tree(&entry.path(), &target)?;
        } else if fs::hard_link(entry.path(), &target).is_err() {
            fs::copy(entry.path(), &target)?;
            fs::set_permissions(&target, fs::Permissions::from_mode(0o644))?;
        }
    }
    Ok(())
}

/// Writes `files` (paths relative to `staging`, checked at deploy: relative, no `..`, no
/// hidden part) under `staging`, directories 0755, files 0644 (instances run as
/// unprivileged uids and must read them).
fn write_files<'a>(
    staging: &Path,
    files: impl Iterator<Item = (&'a str, &'a [u8])>,
) -> io::Result<()> {
    for (name, contents) in files {
        let path = staging.join(name);
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
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644))?;
    }
    Ok(())
}

/// Renames a written `staging` to `dir` (or removes it if writing failed, or if another
/// task placed an identical `dir` first).
fn place(written: io::Result<()>, staging: &Path, dir: &Path) -> io::Result<PathBuf> {
    if let Err(e) = written {
        // E.g. a full disk: leave no half-written copy behind to hold the space.
        let _ = fs::remove_dir_all(staging);
        return Err(e);
    }
    match fs::rename(staging, dir) {
        Ok(()) => Ok(dir.to_path_buf()),
        // Another task laid it out first: theirs is identical.
        Err(_) if dir.is_dir() => {
            let _ = fs::remove_dir_all(staging);
            Ok(dir.to_path_buf())
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
