//! Landlock: the second filesystem layer, under the mount table. Even where a mount would allow
//! it (e.g. the proc files an instance owns), an instance may only
//! do what [`RULES`] grants, by path. Applied by the init after `no_new_privs`, inherited by
//! everything the instance starts.
//!
//! Best effort: the ruleset asks for everything the newest ABI this crate knows can restrict
//! and the kernel downgrades it to what it supports; on a kernel without Landlock the instance
//! still starts (the host reports it: [`crate::SandboxHost::landlock_abi`]).

use std::path::Path;

use landlock::{
    Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, RestrictionStatus,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, ABI,
};

/// The newest ABI the rules are written for; older kernels get the subset they support.
const TARGET_ABI: ABI = ABI::V10;

/// What a path grants (to everything beneath it).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Grant {
    /// List the directory (and those beneath it) only: no file contents.
    ListOnly,
    /// Read files, list directories.
    Read,
    /// Read files, list directories, execute files.
    ReadExec,
    /// A device node: read, write, truncate (`> /dev/null` opens with O_TRUNC), ioctl.
    Device,
    /// Everything but executing: create, write, remove, rename, sockets, fifos.
    ReadWriteCreate,
}

/// THE Landlock rules: paths inside the sandbox (after pivot_root). Anything not beneath one of
/// them is denied every handled access. Missing paths (e.g. /lib32) are skipped.
#[rustfmt::skip]
pub(crate) const RULES: &[(&str, Grant)] = &[
    ("/",            Grant::ListOnly),   // `ls /`; the root tmpfs holds mount points only
    ("/usr",         Grant::ReadExec),
    ("/bin",         Grant::ReadExec),
    ("/sbin",        Grant::ReadExec),
    ("/lib",         Grant::ReadExec),
    ("/lib32",       Grant::ReadExec),
    ("/lib64",       Grant::ReadExec),
    ("/libx32",      Grant::ReadExec),
    ("/etc",         Grant::Read),
    ("/code",        Grant::ReadExec),
    ("/shared",      Grant::Read),       // project shared directories: data and source (mounted noexec)
    ("/runtime",     Grant::ReadExec),
    ("/deps",        Grant::ReadExec),   // a Python block's dependency layer, when it has one
    ("/node_modules", Grant::ReadExec),  // a Node block's dependency layer, when it has one
    ("/build",       Grant::ReadWriteCreate), // a dependency build's scratch dir (builds only)
    ("/proc",        Grant::Read),       // no writes, not even to the instance's own files
    ("/dev/null",    Grant::Device),
    ("/dev/zero",    Grant::Device),
    ("/dev/full",    Grant::Device),
    ("/dev/random",  Grant::Device),
    ("/dev/urandom", Grant::Device),
    ("/tmp",         Grant::ReadWriteCreate), // incl. execute: blocks may run tools they unpack, as on Lambda (nosuid + no_new_privs: no privilege from it)
];

fn access(grant: Grant) -> BitFlags<AccessFs> {
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    match grant {
        Grant::ListOnly => AccessFs::ReadDir.into(),
        Grant::Read => read,
        Grant::ReadExec => read | AccessFs::Execute,
        Grant::Device => {
            AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev
        }
        Grant::ReadWriteCreate => AccessFs::from_all(TARGET_ABI),
    }
}

/// Restrict the calling process (and everything it starts). Returns whether the kernel
/// enforces the rules fully, partially or not at all.
pub(crate) fn restrict() -> Result<RulesetStatus, RulesetError> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(TARGET_ABI))?
        // Signals and abstract UNIX sockets stay inside the instance (both are namespaced
        // already; this is a second wall).
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?;
    for (path, grant) in RULES {
        // Skip what this host lacks; O_PATH opens follow symlinks (/bin -> usr/bin), which is
        // what Landlock wants: rules attach to the inode.
        let Ok(fd) = PathFd::new(Path::new(path)) else {
            continue;
        };
        ruleset = ruleset.add_rule(PathBeneath::new(fd, access(*grant)))?;
    }
    let RestrictionStatus { ruleset, .. } = ruleset.restrict_self()?;
    Ok(ruleset)
}

/// The Landlock ABI the running kernel offers, None if it has no (enabled) Landlock.
pub(crate) fn kernel_abi() -> Option<u32> {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: landlock_create_ruleset with a null attr, size 0 and the VERSION flag only
    // returns a number (or -1/errno); it touches no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}

/// [`RULES`] as the raw masks `landlock_create_ruleset`/`landlock_add_rule` take, for the kernel's
/// ABI: what a zygote-forked instance applies without this crate (see `zygote_python.py`).
#[derive(serde::Serialize, Debug, Clone, PartialEq, Eq)]
pub(crate) struct LandlockPlan {
    /// `landlock_ruleset_attr.handled_access_fs`.
    pub handled_fs: u64,
    /// `landlock_ruleset_attr.scoped` (0 before ABI 6).
    pub scoped: u64,
    /// Size of the `landlock_ruleset_attr` this ABI knows (8, 16 or 24 bytes).
    pub attr_size: usize,
    /// (path, allowed access) pairs, each a subset of `handled_fs`.
    pub rules: Vec<(String, u64)>,
}

/// The same policy as [`restrict`], downgraded to `kernel_abi` as the crate's best-effort mode
/// does. None when the kernel has no Landlock.
pub(crate) fn plan(kernel_abi: Option<u32>) -> Option<LandlockPlan> {
    let abi = ABI::from(i32::try_from(kernel_abi?).ok()?).min(TARGET_ABI);
    if abi == ABI::Unsupported {
        return None;
    }
    let handled = AccessFs::from_all(abi);
    let version = kernel_abi?;
    let attr_size = match version {
        1..=3 => 8,
        4 | 5 => 16,
        _ => 24,
    };
    Some(LandlockPlan {
        handled_fs: handled.bits(),
        scoped: if attr_size == 24 {
            Scope::from_all(abi).bits()
        } else {
            0
        },
        attr_size,
        rules: RULES
            .iter()
            .map(|(path, grant)| (path.to_string(), (access(*grant) & handled).bits()))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_masks_every_rule_within_what_is_handled() {
        for abi in 1..=7 {
            let plan = plan(Some(abi)).expect("a plan");
            assert!(plan.handled_fs != 0);
            assert_eq!(plan.rules.len(), RULES.len());
            for (path, access) in &plan.rules {
                assert_eq!(access & !plan.handled_fs, 0, "{path} at ABI {abi}");
            }
            assert_eq!(plan.scoped != 0, abi >= 6, "scopes exist from ABI 6");
        }
        assert!(plan(None).is_none());
        assert!(plan(Some(0)).is_none());
    }
}
