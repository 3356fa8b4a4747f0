//! The egress policy of a network instance, as data: what it may never reach ([`DENY`]),
//! the operator's exceptions (`refinery serve --network-allow`), and the nftables ruleset both
//! become ([`ruleset`]).
//!
//! The ruleset is loaded into the instance's own network namespace before its code runs. The
//! instance has no capabilities (and no CAP_NET_ADMIN in that namespace, whose owner is the
//! host's user namespace), and seccomp refuses raw and packet sockets, so it can neither change
//! the rules nor send around them.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// The address the instance's `/etc/resolv.conf` names: pasta forwards UDP port 53 sent to it to
/// the host's first resolver (`--dns-forward`). It is link-local, so nothing else at that address
/// is ever reachable (the rest of 169.254.0.0/16 stays denied).
pub const DNS_FORWARD: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 53);

/// One denied destination range and why.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DenyRange {
    pub cidr: &'static str,
    pub why: &'static str,
}

const fn deny(cidr: &'static str, why: &'static str) -> DenyRange {
    DenyRange { cidr, why }
}

/// Destinations a network instance can never reach (besides the host's own addresses, added
/// at spawn time). Everything else goes out through pasta.
pub(crate) const DENY: &[DenyRange] = &[
    deny("0.0.0.0/8", "\"this\" network: 0.0.0.0 reaches the host's own services"),
    deny("10.0.0.0/8", "RFC 1918 private network"),
    deny("100.64.0.0/10", "RFC 6598 shared (CGNAT) address space"),
    deny("127.0.0.0/8", "loopback: pasta would connect to the host's loopback (the platform's API, every local service)"),
    deny("169.254.0.0/16", "link-local, including the cloud metadata service 169.254.169.254"),
    deny("172.16.0.0/12", "RFC 1918 private network"),
    deny("192.0.0.0/24", "IETF protocol assignments"),
    deny("192.168.0.0/16", "RFC 1918 private network"),
    deny("198.18.0.0/15", "benchmarking networks (often internal)"),
    deny("224.0.0.0/4", "multicast"),
    deny("240.0.0.0/4", "reserved, and the limited broadcast address"),
    deny("::/128", "unspecified: reaches the host's own services"),
    deny("::1/128", "loopback"),
    deny("::ffff:0:0/96", "IPv4-mapped: would carry IPv4 destinations past the IPv4 rules"),
    deny("64:ff9b::/96", "NAT64: would carry private IPv4 destinations through a translator"),
    deny("64:ff9b:1::/48", "local-use NAT64"),
    deny("fc00::/7", "unique local addresses (private IPv6 networks)"),
    deny("fe80::/10", "link-local"),
    deny("ff00::/8", "multicast"),
];

/// An address range, `addr/prefix` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// One address.
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` lies in this range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `192.0.2.0/24`, `2001:db8::/32` or a bare address. Host bits must be zero, so a typo
    /// like `10.1.2.3/8` does not silently allow more than the operator meant.
    fn from_str(s: &str) -> Result<Cidr, String> {
        let usage =
            "expected an address range such as 203.0.113.0/24, 2001:db8::/32 or 198.51.100.7";
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address range: {usage}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => {
                    return Err(format!(
                        "`{s}`: the prefix length must be a number from 0 to {max}"
                    ))
                }
            },
        };
        let cidr = Cidr { addr, prefix };
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(
                u32::from(a) & u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0),
            )),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(
                u128::from(a) & u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0),
            )),
        };
        if network != addr {
            return Err(format!(
                "`{s}` has host bits set: did you mean {network}/{prefix}?"
            ));
        }
        Ok(cidr)
    }
}

/// The static deny ranges, parsed.
pub(crate) fn deny_ranges() -> Vec<Cidr> {
    DENY.iter()
        .map(|d| {
            d.cidr
                .parse()
                .unwrap_or_else(|e| panic!("DENY row {}: {e}", d.cidr))
        })
        .collect()
}

/// The nftables ruleset (input of `nft -f -`) for one instance: ICMP "destination
/// unreachable" errors pass (only the kernel sends them here: raw sockets are refused by
/// seccomp, ping sockets send echo requests only; without this rule the kernel's own answer to
/// a rejected connect, addressed to the instance's loopback or own address, would be dropped and
/// the connect would hang instead of failing), then DNS to [`DNS_FORWARD`],
/// then the operator's `allow` ranges, then [`DENY`] and `host_addrs` (the host's own addresses,
/// those not already inside a deny range) are rejected — at once, so a refused connect fails
/// fast instead of timing out. Everything else is accepted and leaves through pasta.
pub(crate) fn ruleset(allow: &[Cidr], host_addrs: &[IpAddr]) -> String {
    let deny = deny_ranges();
    let mut deny4 = Vec::new();
    let mut deny6 = Vec::new();
    for c in &deny {
        match c.addr() {
            IpAddr::V4(_) => deny4.push(c.to_string()),
            IpAddr::V6(_) => deny6.push(c.to_string()),
        }
    }
    for &ip in host_addrs {
        if deny.iter().any(|c| c.contains(ip)) {
            continue;
        }
        let host = Cidr::host(ip).to_string();
        let list = if ip.is_ipv4() { &mut deny4 } else { &mut deny6 };
        if !list.contains(&host) {
            list.push(host);
        }
    }
    let (allow4, allow6): (Vec<_>, Vec<_>) = allow.iter().partition(|c| c.addr().is_ipv4());
    let set = |name: &str, kind: &str, elements: &[String]| {
        let elements = if elements.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", elements.join(", "))
        };
        format!("  set {name} {{ type {kind}; flags interval; auto-merge;{elements} }}\n")
    };
    let strings = |v: &[&Cidr]| v.iter().map(|c| c.to_string()).collect::<Vec<_>>();
    let mut out = String::from("table inet refinery {\n");
    out += &set("allow4", "ipv4_addr", &strings(&allow4));
    out += &set("allow6", "ipv6_addr", &strings(&allow6));
    out += &set("deny4", "ipv4_addr", &deny4);
    out += &set("deny6", "ipv6_addr", &deny6);
    out += &format!(
        "  chain egress {{\n\
         \x20   type filter hook output priority 0; policy accept;\n\
         \x20   icmp type destination-unreachable accept\n\
         \x20   icmpv6 type destination-unreachable accept\n\
         \x20   ip daddr {DNS_FORWARD} udp dport 53 accept\n\
         \x20   ip daddr @allow4 accept\n\
         \x20   ip6 daddr @allow6 accept\n\
         \x20   ip daddr @deny4 reject with icmpx type admin-prohibited\n\
         \x20   ip6 daddr @deny6 reject with icmpx type admin-prohibited\n\
         \x20 }}\n"
    );
    out += "}\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("valid")
    }

    #[test]
    fn every_deny_row_parses_and_covers_what_it_names() {
        let ranges = deny_ranges();
        assert_eq!(ranges.len(), DENY.len());
        for must in [
            "127.0.0.1",
            "127.255.0.9",
            "169.254.169.254",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.251",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::2",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(
                ranges.iter().any(|c| c.contains(ip(must))),
                "{must} is not denied"
            );
        }
        for public in ["1.1.1.1", "8.8.8.8", "198.51.100.7", "2606:4700::1111"] {
            assert!(
                !ranges.iter().any(|c| c.contains(ip(public))),
                "{public} is denied"
            );
        }
    }

    #[test]
    fn cidr_parsing_accepts_ranges_and_addresses_and_explains_mistakes() {
        assert_eq!(
            "203.0.113.0/24".parse::<Cidr>().expect("valid").to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            "198.51.100.7".parse::<Cidr>().expect("valid").to_string(),
            "198.51.100.7/32"
        );
        assert_eq!(
            "2001:db8::/32".parse::<Cidr>().expect("valid").to_string(),
            "2001:db8::/32"
        );
        let e = "10.1.2.3/8".parse::<Cidr>().expect_err("invalid");
        assert!(e.contains("did you mean 10.0.0.0/8"), "{e}");
        let e = "10.0.0.0/33".parse::<Cidr>().expect_err("invalid");
        assert!(e.contains("0 to 32"), "{e}");
        let e = "example.com".parse::<Cidr>().expect_err("invalid");
        assert!(e.contains("not an IP address range"), "{e}");
        let all = "0.0.0.0/0".parse::<Cidr>().expect("valid");
        assert!(all.contains(ip("127.0.0.1")) && !all.contains(ip("::1")));
    }

    #[test]
    fn ruleset_orders_dns_then_allow_then_deny_and_adds_host_addresses() {
        let allow = [
            "198.51.100.7/32".parse().expect("valid"),
            "2001:db8::/32".parse().expect("valid"),
        ];
        let text = ruleset(
            &allow,
            &[ip("192.0.2.2"), ip("10.0.0.5"), ip("2001:db8::5")],
        );
        let pos = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} missing from\n{text}"))
        };
        assert!(pos("udp dport 53 accept") < pos("@allow4 accept"));
        assert!(pos("@allow4 accept") < pos("@deny4 reject"));
        assert!(pos("@allow6 accept") < pos("@deny6 reject"));
        assert!(text.contains("elements = { 198.51.100.7/32 }"), "{text}");
        assert!(text.contains("elements = { 2001:db8::/32 }"), "{text}");
        // A public host address is denied; one inside a deny range is not listed twice.
        assert!(text.contains("192.0.2.2/32"), "{text}");
        assert!(!text.contains("10.0.0.5"), "{text}");
        assert!(text.contains("2001:db8::5/128"), "{text}");
        assert!(text.contains("127.0.0.0/8") && text.contains("169.254.0.0/16"));
        assert!(text.contains(&format!("ip daddr {DNS_FORWARD} udp dport 53 accept")));
    }

    #[test]
    fn ruleset_without_exceptions_has_empty_allow_sets() {
        let text = ruleset(&[], &[]);
        assert!(
            text.contains("set allow4 { type ipv4_addr; flags interval; auto-merge; }"),
            "{text}"
        );
        assert!(text.contains("policy accept"));
    }
}
