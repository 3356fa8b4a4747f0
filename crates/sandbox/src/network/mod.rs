//! Opt-in outbound network for an instance (`network = true`).
//!
//! Every instance is cloned into its own, empty network namespace. For a network instance the
//! host then, *after* the namespace exists and *before* the setup frame lets the init run the
//! block's code ([`NetworkHost::attach`], the one hook in `SandboxHost::spawn`):
//! 1. loads the egress ruleset ([`egress`]) into that namespace with `nft` ([`nft`]), so no
//!    packet leaves before the filter is in place;
//! 2. starts one `pasta` on it ([`pasta`]): a tap interface with the host's addresses and
//!    routes, and a user-mode stack that turns the instance's connections into sockets of the
//!    host, without inbound forwarding and without mapping anything to the host's loopback.
//!
//! The instance also gets an `/etc/resolv.conf` naming [`egress::DNS_FORWARD`] and DNS in its
//! `nsswitch.conf` ([`adjust_mounts`]). Instances without `network` are untouched: no pasta, no
//! nft, an empty namespace, no extra cost.

pub(crate) mod egress;
mod nft;
mod pasta;

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use egress::{Cidr, DNS_FORWARD};

use crate::mounts::MountOp;

/// Where the binaries are looked up besides `$PATH` (nft lives in /usr/sbin, which a non-root
/// PATH often lacks).
const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// What a host needs to give instances outbound network; see the module docs.
#[derive(Clone, Debug)]
pub(crate) struct NetworkHost {
    pasta: PathBuf,
    nft: PathBuf,
    allow: Vec<Cidr>,
}

/// What keeps a network instance connected; dropping it kills its pasta.
#[derive(Debug)]
pub(crate) struct Attachment {
    pasta: pasta::Pasta,
}

impl Attachment {
    pub(crate) fn pasta_pid(&self) -> u32 {
        self.pasta.pid()
    }
}

fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// (what is wrong, how to fix it) for a missing binary.
fn missing(bin: &str, package: &str) -> (String, String) {
    (
        format!(
            "`{bin}` was not found on PATH or in {} (needed for blocks with network = true)",
            FALLBACK_DIRS.join(", ")
        ),
        format!("install it: apt-get install {package} (or the equivalent for this distribution)"),
    )
}

impl NetworkHost {
    /// Finds `pasta` and `nft`; `allow` are the operator's exceptions to the deny list.
    /// The error says which package is missing.
    pub(crate) fn detect(allow: Vec<Cidr>) -> Result<NetworkHost, (String, String)> {
        let pasta = find_binary("pasta").ok_or_else(|| missing("pasta", "passt"))?;
        let nft = find_binary("nft").ok_or_else(|| missing("nft", "nftables"))?;
        Ok(NetworkHost { pasta, nft, allow })
    }

    /// THE HOOK: connects the network namespace of the freshly cloned init `init_pid` (which is
    /// still waiting for its setup frame, so none of the block's code has run). Must be called
    /// after the namespace exists and before the setup frame is sent.
    pub(crate) fn attach(&self, init_pid: libc::pid_t) -> Result<Attachment, String> {
        let started = Instant::now();
        let netns = open_netns(init_pid)?;
        let ruleset = egress::ruleset(&self.allow, &host_addresses()?);
        nft::load(&self.nft, &netns, &ruleset)?;
        let filtered = started.elapsed();
        let pasta = pasta::start(&self.pasta, &netns)?;
        tracing::debug!(
            init_pid,
            pasta_pid = pasta.pid(),
            filter_ms = filtered.as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "network instance connected"
        );
        Ok(Attachment { pasta })
    }
}

fn open_netns(pid: libc::pid_t) -> Result<OwnedFd, String> {
    let path = format!("/proc/{pid}/ns/net");
    std::fs::File::open(&path)
        .map(OwnedFd::from)
        .map_err(|e| format!("opening {path}: {e}"))
}

/// Every address of the host (all interfaces), and their broadcast addresses: connections to
/// them would reach the host's own services (or its whole subnet) through pasta, so the
/// ruleset denies them. An error fails the start (never a
/// ruleset without them).
fn host_addresses() -> Result<Vec<IpAddr>, String> {
    let addrs = nix::ifaddrs::getifaddrs()
        .map_err(|e| format!("listing the host's addresses (getifaddrs): {e}"))?;
    let mut out: Vec<IpAddr> = Vec::new();
    for a in addrs {
        for sa in [a.address, a.broadcast].into_iter().flatten() {
            let ip = if let Some(v4) = sa.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = sa.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            if !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    Ok(out)
}

/// The mount-table changes of a network instance: a resolver, and DNS in the lookup order.
pub(crate) fn adjust_mounts(ops: &mut Vec<MountOp>) {
    for op in ops.iter_mut() {
        if let MountOp::File { dst, contents, .. } = op {
            if dst == "/etc/nsswitch.conf" {
                *contents = "passwd: files\ngroup: files\nhosts: files dns\n".into();
            }
        }
    }
    let at = ops
        .iter()
        .position(|op| matches!(op, MountOp::File { dst, .. } if dst == "/etc/nsswitch.conf"))
        .map_or(ops.len(), |i| i + 1);
    ops.insert(
        at,
        MountOp::File {
            dst: "/etc/resolv.conf".into(),
            contents: format!("nameserver {DNS_FORWARD}\noptions timeout:2 attempts:2\n"),
            mode: 0o644,
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pasta_never_forwards_or_maps_anything_to_the_host() {
        let args = pasta::args(7, 8);
        let pair = |flag: &str| {
            let i = args
                .iter()
                .position(|a| a == flag)
                .unwrap_or_else(|| panic!("{flag} missing: {args:?}"));
            args[i + 1].clone()
        };
        for flag in ["-t", "-u", "-T", "-U"] {
            assert_eq!(pair(flag), "none", "{flag}");
        }
        assert!(args.iter().any(|a| a == "--no-map-gw"));
        assert_eq!(pair("--netns"), "/proc/self/fd/7");
        assert_eq!(pair("--pid"), "/proc/self/fd/8");
        assert_eq!(pair("--dns-forward"), DNS_FORWARD.to_string());
    }

    #[test]
    fn a_missing_binary_names_its_package() {
        assert_eq!(find_binary("refinery-no-such-tool"), None);
        let (what, fix) = missing("pasta", "passt");
        assert!(what.contains("`pasta` was not found"), "{what}");
        assert!(fix.contains("apt-get install passt"), "{fix}");
    }

    #[test]
    fn network_instances_get_a_resolver() {
        let mut ops = vec![MountOp::File {
            dst: "/etc/nsswitch.conf".into(),
            contents: "hosts: files\n".into(),
            mode: 0o644,
        }];
        adjust_mounts(&mut ops);
        assert!(
            matches!(&ops[0], MountOp::File { contents, .. } if contents.contains("hosts: files dns"))
        );
        assert!(matches!(&ops[1], MountOp::File { dst, contents, .. }
            if dst == "/etc/resolv.conf" && contents.contains(&format!("nameserver {DNS_FORWARD}"))));
    }
}
