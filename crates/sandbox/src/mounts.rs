//! The sandbox's filesystem: the mount table (data, built on the host by [`layout`]) and the
//! code that performs it inside the new mount namespace ([`build_root`], [`pivot_into`]).
//!
//! Everything an instance can see is listed in [`layout`]; nothing else of the host is mounted.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Per-mount flags.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flag {
    ReadOnly,
    NoSuid,
    NoDev,
    NoExec,
}

use Flag::{NoDev, NoExec, NoSuid, ReadOnly};

/// One step of building the sandbox root. Paths (`dst`) are absolute inside the sandbox.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) enum MountOp {
    /// Bind-mount a host file or directory (not recursive), then apply `flags`.
    Bind {
        src: PathBuf,
        dst: String,
        flags: Vec<Flag>,
    },
    /// A fresh tmpfs with the given `size=`/`mode=` options.
    Tmpfs {
        dst: String,
        options: String,
        flags: Vec<Flag>,
    },
    /// A procfs of the instance's pid namespace.
    Proc {
        dst: String,
        flags: Vec<Flag>,
    },
    Symlink {
        target: String,
        dst: String,
    },
    /// A synthetic file in the root tmpfs.
    File {
        dst: String,
        contents: String,
        mode: u32,
    },
    /// Re-apply flags to an existing mount (e.g. make it read-only once populated).
    Remount {
        dst: String,
        flags: Vec<Flag>,
    },
    /// Hide a file of the sandbox's /proc behind the host's /dev/null (reads empty, writes go
    /// nowhere); skipped when this kernel has no such file.
    MaskFile {
        dst: String,
    },
    /// Hide a directory of the sandbox's /proc behind an empty read-only tmpfs; skipped when
    /// absent.
    MaskDir {
        dst: String,
    },
    /// Bind a path of the sandbox's /proc onto itself read-only; skipped when absent.
    ReadOnly {
        dst: String,
    },
}

/// Options of the tmpfs that becomes the sandbox's `/`.
pub(crate) const ROOT_TMPFS_OPTIONS: &str = "size=1m,nr_inodes=512,mode=0755";

/// Host top-level entries mirrored into the sandbox (symlinks on merged-/usr hosts).
const HOST_TOP_LEVEL: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Host files under /etc a runtime needs; bound read-only when present on the host.
const HOST_ETC: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/etc/ssl/certs",
    "/etc/alternatives",
];
/// How a /proc path is hidden ([`PROC_MASKS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mask {
    /// /dev/null over a file.
    File,
    /// An empty read-only tmpfs over a directory.
    Dir,
    /// Read-only bind onto itself.
    ReadOnly,
}

/// What of the instance's own procfs is hidden or frozen, as container runtimes do: kernel
/// memory and symbol addresses, kernel keyrings, timers and scheduler internals (side channels
/// on other tenants), the kernel configuration, host hardware, and every writable kernel knob.
/// Paths this kernel lacks are skipped at mount time.
#[rustfmt::skip]
pub(crate) const PROC_MASKS: &[(&str, Mask)] = &[
    ("/proc/kcore",         Mask::File),
    ("/proc/kallsyms",      Mask::File),
    ("/proc/keys",          Mask::File),
    ("/proc/key-users",     Mask::File),
    ("/proc/timer_list",    Mask::File),
    ("/proc/timer_stats",   Mask::File),
    ("/proc/sched_debug",   Mask::File),
    ("/proc/latency_stats", Mask::File),
    ("/proc/sysrq-trigger", Mask::File),
    ("/proc/config.gz",     Mask::File),
    ("/proc/kpagecount",    Mask::File),
    ("/proc/kpageflags",    Mask::File),
    ("/proc/kpagecgroup",   Mask::File),
    ("/proc/acpi",          Mask::Dir),
    ("/proc/scsi",          Mask::Dir),
    ("/proc/asound",        Mask::Dir),
    ("/proc/sys",           Mask::ReadOnly),
    ("/proc/bus",           Mask::ReadOnly),
    ("/proc/fs",            Mask::ReadOnly),
    ("/proc/irq",           Mask::ReadOnly),
];

/// Device nodes bound from the host's /dev.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// What [`layout`] needs to know about the host; probed once by [`HostRootfs::probe`].
#[derive(Clone, Debug)]
pub(crate) struct HostRootfs {
    /// (name, Some(symlink target)) or (name, None) = a real directory to bind.
    top_level: Vec<(String, Option<String>)>,
    etc: Vec<String>,
}

impl HostRootfs {
    pub(crate) fn probe() -> HostRootfs {
        let mut top_level = Vec::new();
        for name in HOST_TOP_LEVEL {
            let p = Path::new("/").join(name);
            let Ok(meta) = fs::symlink_metadata(&p) else {
                continue;
            };
            if meta.file_type().is_symlink() {
                if let Ok(t) = fs::read_link(&p) {
                    top_level.push((name.to_string(), Some(t.to_string_lossy().into_owned())));
                }
            } else if meta.is_dir() {
                top_level.push((name.to_string(), None));
            }
        }
        let etc = HOST_ETC
            .iter()
            .filter(|p| Path::new(p).exists())
            .map(|p| p.to_string())
            .collect();
        HostRootfs { top_level, etc }
    }
}

/// Per-instance inputs of the mount table.
pub(crate) struct InstanceFs<'a> {
    pub code_dir: &'a Path,
    /// Bound at /shared (read-only, noexec) when the block lists shared directories.
    pub shared_dir: Option<&'a Path>,
    pub runtime_dir: &'a Path,
    pub tmp_mb: u32,
    pub uid: u32,
    pub gid: u32,
    pub hostname: &'a str,
    /// Validated by `SandboxHost::validate` (allowed destinations only).
    pub extra: &'a [crate::ExtraMount],
}

/// THE mount table of a sandbox, in order. Applied on top of a fresh read-only tmpfs root.
pub(crate) fn layout(host: &HostRootfs, inst: &InstanceFs<'_>) -> Vec<MountOp> {
    let ro = || vec![ReadOnly, NoSuid, NoDev];
    let mut ops = vec![MountOp::Bind {
        src: "/usr".into(),
        dst: "/usr".into(),
        flags: ro(),
    }];
    for (name, target) in &host.top_level {
        ops.push(match target {
            Some(target) => MountOp::Symlink {
                target: target.clone(),
                dst: format!("/{name}"),
            },
            None => MountOp::Bind {
                src: Path::new("/").join(name),
                dst: format!("/{name}"),
                flags: ro(),
            },
        });
    }
    for path in &host.etc {
        ops.push(MountOp::Bind {
            src: path.into(),
            dst: path.clone(),
            flags: ro(),
        });
    }
    let (uid, gid) = (inst.uid, inst.gid);
    ops.extend([
        MountOp::File {
            dst: "/etc/passwd".into(),
            contents: format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                 sandbox:x:{uid}:{gid}:Refinery sandbox:/tmp:/usr/sbin/nologin\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
            mode: 0o644,
        },
        MountOp::File {
            dst: "/etc/group".into(),
            contents: format!("root:x:0:\nsandbox:x:{gid}:\nnogroup:x:65534:\n"),
            mode: 0o644,
        },
        MountOp::File {
            dst: "/etc/hostname".into(),
            contents: format!("{}\n", inst.hostname),
            mode: 0o644,
        },
        MountOp::File {
            dst: "/etc/hosts".into(),
            contents: format!(
                "127.0.0.1\tlocalhost {0}\n::1\tlocalhost {0}\n",
                inst.hostname
            ),
            mode: 0o644,
        },
        MountOp::File {
            dst: "/etc/nsswitch.conf".into(),
            contents: "passwd: files\ngroup: files\nhosts: files\n".into(),
            mode: 0o644,
        },
        MountOp::Bind {
            src: inst.code_dir.into(),
            dst: "/code".into(),
            flags: ro(),
        },
        MountOp::Bind {
            src: inst.runtime_dir.into(),
            dst: "/runtime".into(),
            flags: ro(),
        },
    ]);
    if let Some(shared) = inst.shared_dir {
        ops.push(MountOp::Bind {
            src: shared.into(),
            dst: "/shared".into(),
            flags: vec![ReadOnly, NoSuid, NoDev, NoExec],
        });
    }
    // Dependency layers (read-only), a build's scratch dir (writable, still nosuid/nodev), a
    // package manager's configuration file.
    ops.extend(inst.extra.iter().map(|m| MountOp::Bind {
        src: m.src.clone(),
        dst: m.dst.clone(),
        flags: if m.writable {
            vec![NoSuid, NoDev]
        } else {
            ro()
        },
    }));
    ops.extend([
        MountOp::Tmpfs {
            dst: "/tmp".into(),
            options: format!("size={}m,mode=1777", inst.tmp_mb),
            flags: vec![NoSuid, NoDev],
        },
        MountOp::Proc {
            dst: "/proc".into(),
            flags: vec![NoSuid, NoDev, NoExec],
        },
    ]);
    ops.extend(PROC_MASKS.iter().map(|(path, mask)| {
        let dst = path.to_string();
        match mask {
            Mask::File => MountOp::MaskFile { dst },
            Mask::Dir => MountOp::MaskDir { dst },
            Mask::ReadOnly => MountOp::ReadOnly { dst },
        }
    }));
    ops.extend([MountOp::Tmpfs {
        dst: "/dev".into(),
        options: "size=64k,nr_inodes=64,mode=0755".into(),
        flags: vec![NoSuid, NoExec],
    }]);
    for dev in DEVICES {
        ops.push(MountOp::Bind {
            src: Path::new("/dev").join(dev),
            dst: format!("/dev/{dev}"),
            flags: vec![NoSuid, NoExec],
        });
    }
    ops.extend([
        MountOp::Symlink {
            target: "/proc/self/fd".into(),
            dst: "/dev/fd".into(),
        },
        MountOp::Symlink {
            target: "/proc/self/fd/0".into(),
            dst: "/dev/stdin".into(),
        },
        MountOp::Symlink {
            target: "/proc/self/fd/1".into(),
            dst: "/dev/stdout".into(),
        },
        MountOp::Symlink {
            target: "/proc/self/fd/2".into(),
            dst: "/dev/stderr".into(),
        },
        MountOp::Remount {
            dst: "/dev".into(),
            flags: vec![ReadOnly, NoSuid, NoExec],
        },
        MountOp::Remount {
            dst: "/".into(),
            flags: vec![ReadOnly, NoSuid, NoDev],
        },
    ]);
    ops
}

// ---------------------------------------------------------------------------------------------
// Inside the sandbox (called by the init, single-threaded, as root in the new mount namespace).

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn ms_flags(flags: &[Flag]) -> libc::c_ulong {
    flags.iter().fold(0, |acc, f| {
        acc | match f {
            ReadOnly => libc::MS_RDONLY,
            NoSuid => libc::MS_NOSUID,
            NoDev => libc::MS_NODEV,
            NoExec => libc::MS_NOEXEC,
        }
    })
}

/// mount(2) with optional source/fstype/data.
fn mount(
    src: Option<&Path>,
    dst: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = src.map(cstr).transpose()?;
    let dst_c = cstr(dst)?;
    let fstype = fstype.map(|s| CString::new(s).unwrap_or_default());
    let data = data.map(|s| CString::new(s).unwrap_or_default());
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&src),
            dst_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("mount on {}: {e}", dst.display()),
        ))
    }
}

fn ensure_dir(p: &Path) -> io::Result<()> {
    fs::create_dir_all(p)
}

fn ensure_file(p: &Path) -> io::Result<()> {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(p)
        .map(drop)
}

/// Does `p` exist (without following a final symlink)?
fn exists(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok()
}

fn inside(root: &Path, dst: &str) -> PathBuf {
    root.join(dst.trim_start_matches('/'))
}

fn ctx(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Make every mount private, mount the root tmpfs at `root` and apply `ops` under it.
pub(crate) fn build_root(root: &Path, ops: &[MountOp]) -> io::Result<()> {
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(ctx("making / rprivate".into()))?;
    mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(ROOT_TMPFS_OPTIONS),
    )
    .map_err(ctx(format!(
        "mounting the root tmpfs at {}",
        root.display()
    )))?;
    for op in ops {
        apply(root, op).map_err(ctx(format!("{op:?}")))?;
    }
    Ok(())
}

fn apply(root: &Path, op: &MountOp) -> io::Result<()> {
    match op {
        MountOp::Bind { src, dst, flags } => {
            let target = inside(root, dst);
            if fs::metadata(src)?.is_dir() {
                ensure_dir(&target)?;
            } else {
                ensure_file(&target)?;
            }
            mount(Some(src), &target, None, libc::MS_BIND, None)?;
            if !flags.is_empty() {
                mount(
                    None,
                    &target,
                    None,
                    libc::MS_BIND | libc::MS_REMOUNT | ms_flags(flags),
                    None,
                )?;
            }
            Ok(())
        }
        MountOp::Tmpfs {
            dst,
            options,
            flags,
        } => {
            let target = inside(root, dst);
            ensure_dir(&target)?;
            mount(
                Some(Path::new("tmpfs")),
                &target,
                Some("tmpfs"),
                ms_flags(flags),
                Some(options),
            )
        }
        MountOp::Proc { dst, flags } => {
            let target = inside(root, dst);
            ensure_dir(&target)?;
            mount(
                Some(Path::new("proc")),
                &target,
                Some("proc"),
                ms_flags(flags),
                None,
            )
        }
        MountOp::Symlink { target, dst } => {
            let link = inside(root, dst);
            if let Some(parent) = link.parent() {
                ensure_dir(parent)?;
            }
            std::os::unix::fs::symlink(target, &link)
        }
        MountOp::File {
            dst,
            contents,
            mode,
        } => {
            let path = inside(root, dst);
            if let Some(parent) = path.parent() {
                ensure_dir(parent)?;
            }
            fs::write(&path, contents)?;
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
        }
        MountOp::Remount { dst, flags } => mount(
            None,
            &inside(root, dst),
            None,
            libc::MS_BIND | libc::MS_REMOUNT | ms_flags(flags),
            None,
        ),
        MountOp::MaskFile { dst } => {
            let target = inside(root, dst);
            if !exists(&target) {
                return Ok(());
            }
            let null = Path::new("/dev/null");
            mount(Some(null), &target, None, libc::MS_BIND, None)?;
            mount(
                None,
                &target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | ms_flags(&[ReadOnly, NoSuid, NoExec]),
                None,
            )
        }
        MountOp::MaskDir { dst } => {
            let target = inside(root, dst);
            if !exists(&target) {
                return Ok(());
            }
            mount(
                Some(Path::new("tmpfs")),
                &target,
                Some("tmpfs"),
                ms_flags(&[ReadOnly, NoSuid, NoDev, NoExec]),
                Some("size=4k,nr_inodes=2,mode=0555"),
            )
        }
        MountOp::ReadOnly { dst } => {
            let target = inside(root, dst);
            if !exists(&target) {
                return Ok(());
            }
            mount(
                Some(&target),
                &target,
                None,
                libc::MS_BIND | libc::MS_REC,
                None,
            )?;
            mount(
                None,
                &target,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | ms_flags(&[ReadOnly, NoSuid, NoDev, NoExec]),
                None,
            )
        }
    }
}

/// pivot_root into `root`, detach the host's root and chdir to `workdir`.
pub(crate) fn pivot_into(root: &Path, workdir: &Path) -> io::Result<()> {
    std::env::set_current_dir(root).map_err(ctx(format!("chdir {}", root.display())))?;
    let dot = c".";
    // SAFETY: pivot_root takes two NUL-terminated paths that outlive the call.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if rc != 0 {
        return Err(ctx("pivot_root".into())(io::Error::last_os_error()));
    }
    // SAFETY: umount2 takes a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(ctx("detaching the old root".into())(
            io::Error::last_os_error(),
        ));
    }
    std::env::set_current_dir(workdir).map_err(ctx(format!("chdir {}", workdir.display())))
}
