//! Opt-in outbound network (`network = true`): real servers, real pasta, real nftables, hostile
//! blocks. The destinations live on a virtual interface of this host with TEST-NET addresses
//! (this machine may have no Internet), served by tiny TCP servers in the test process.

mod common;

use std::io::Write;
use std::net::{IpAddr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{eventually, host_addresses, process_alive, Server};
use serde_json::{json, Value};

const PRELUDE: &str = r#"
import errno, json, os, socket, struct, subprocess

def ename(e):
    return errno.errorcode.get(e, str(e))

def attempt(f, *a, **k):
    try:
        r = f(*a, **k)
        return "ok" if r is None else r
    except OSError as e:
        return ename(e.errno) if e.errno else type(e).__name__
    except Exception as e:
        return type(e).__name__

def fetch(host, port):
    """Connects and returns what the server says (or the errno name)."""
    def go():
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect((host, port))
            return "got " + s.recv(100).decode()
    return attempt(go)
"#;

/// A virtual interface (ifb: this kernel may lack the dummy driver) with the given addresses,
/// removed on drop.
struct Dummy {
    name: String,
}

impl Dummy {
    fn new(tag: &str, addrs: &[&str]) -> Dummy {
        let name = format!("rf{tag}{}", std::process::id() % 100_000);
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("run ip");
            assert!(status.success(), "ip {args:?}");
        };
        let _ = Command::new("ip").args(["link", "del", &name]).status();
        ip(&["link", "add", &name, "type", "ifb"]);
        let dummy = Dummy { name };
        for a in addrs {
            ip(&["addr", "add", &format!("{a}/32"), "dev", &dummy.name]);
        }
        ip(&["link", "set", &dummy.name, "up"]);
        dummy
    }
}

impl Drop for Dummy {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// A TCP server that greets every connection with `token` and counts them.
struct Greeter {
    port: u16,
    hits: Arc<AtomicUsize>,
}

fn greeter(addr: &str, token: &str) -> Greeter {
    let listener = TcpListener::bind((addr.parse::<IpAddr>().expect("ip"), 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let hits = Arc::new(AtomicUsize::new(0));
    let (count, token) = (hits.clone(), token.to_string());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            count.fetch_add(1, Ordering::SeqCst);
            let _ = stream.write_all(token.as_bytes());
        }
    });
    Greeter { port, hits }
}

/// Whether the first resolver of this host's /etc/resolv.conf answers a query from here.
fn host_resolver_answers() -> bool {
    let Some(server) = std::fs::read_to_string("/etc/resolv.conf")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("nameserver").map(|a| a.trim().to_string()))
        })
    else {
        return false;
    };
    let Ok(ip) = server.parse::<IpAddr>() else {
        return false;
    };
    let Ok(sock) = std::net::UdpSocket::bind(if ip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })
    else {
        return false;
    };
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    query.extend_from_slice(b"\x07example\x03com\x00\x00\x01\x00\x01");
    let _ = sock.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 512];
    sock.send_to(&query, (ip, 53)).is_ok()
        && sock
            .recv(&mut buf)
            .is_ok_and(|n| n >= 2 && buf[..2] == [0x12, 0x34])
}

fn api_port(server: &Server) -> u16 {
    server
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

async fn deploy(server: &Server, key: &str, project: &str, blocks: &[(&str, &str, bool)]) -> Value {
    let mut manifest = format!("name = \"{project}\"\n");
    let mut files = Vec::new();
    for (name, body, network) in blocks {
        manifest.push_str(&format!(
            "\n[[blocks]]\nname = \"{name}\"\nlanguage = \"python\"\nsource = \"{name}.py\"\nnetwork = {network}\n"
        ));
        files.push((format!("{name}.py"), format!("{PRELUDE}\n{body}")));
    }
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(f, c)| (f.as_str(), c.as_str()))
        .collect();
    let (status, body) = server.deploy(key, &manifest, &files).await;
    assert_eq!(status, 201, "deploy {project}: {body}");
    body
}

async fn run(server: &Server, key: &str, project: &str, block: &str, input: Value) -> Value {
    let reply = server.invoke_ok(key, project, block, input).await;
    assert_eq!(reply["status"], "ok", "{project}/{block}: {reply}");
    reply["output"].clone()
}

/// Host pids of the pasta processes the server `server_pid` started.
fn pasta_children(server_pid: u32) -> Vec<i64> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i64>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some((comm, rest)) = stat.split_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if (comm.contains("pasta") || comm.contains("passt"))
            && fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(server_pid)
            && fields.first() != Some(&"Z")
        {
            out.push(pid);
        }
    }
    out
}

/// A process that is gone or a zombie (dead, waiting for its new parent to reap it).
fn dead(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .split_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

const EGRESS: &str = r#"
def dns(server):
    """One DNS query over UDP; "reply <id>" if any answer came back."""
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x07example\x03com\x00" + struct.pack(">HH", 1, 1)
    def go():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(q, (server, 53))
            return "reply " + s.recv(512)[:2].hex()
    return attempt(go)

def main(block_input, backpack):
    return {
        "fetch": fetch(block_input["host"], block_input["port"]),
        "dns": dns("169.254.0.53"),
        "resolv": attempt(lambda: open("/etc/resolv.conf").read()),
        "ifaces": sorted(l.split(":")[0].strip() for l in open("/proc/net/dev").read().splitlines()[2:]),
    }
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_network_block_reaches_an_allowed_destination_and_a_plain_block_does_not() {
    let dest = "198.51.100.73";
    let _dummy = Dummy::new("eg", &[dest]);
    let target = greeter(dest, "hello-from-outside");
    let allow = format!("{dest}/32");
    let server = Server::start_with(&["--network-allow", &allow]).await;
    let (_, key) = server.account("netty").await;
    let deployed = deploy(
        &server,
        &key,
        "egress",
        &[("on", EGRESS, true), ("off", EGRESS, false)],
    )
    .await;
    assert_eq!(deployed["blocks"][0]["network"], true, "{deployed}");
    assert_eq!(deployed["blocks"][1]["network"], false, "{deployed}");
    let input = json!({ "host": dest, "port": target.port });

    let on = run(&server, &key, "egress", "on", input.clone()).await;
    assert_eq!(on["fetch"], "got hello-from-outside", "{on}");
    assert_eq!(target.hits.load(Ordering::SeqCst), 1);
    let resolv = on["resolv"].as_str().unwrap_or_default();
    assert!(resolv.contains("nameserver 169.254.0.53"), "{on}");
    assert!(
        on["ifaces"].as_array().is_some_and(|i| i.len() == 2),
        "lo and the tap: {on}"
    );
    // DNS goes through pasta's forwarder to the host's resolver; whether that resolver answers
    // depends on the machine, so compare with what the test process itself gets.
    if host_resolver_answers() {
        assert_eq!(on["dns"], "reply 1234", "{on}");
    } else {
        assert!(
            ["reply 1234", "TimeoutError"].contains(&on["dns"].as_str().unwrap_or("")),
            "{on}"
        );
    }
    // Warm: the same instance is still connected.
    let again = run(&server, &key, "egress", "on", input.clone()).await;
    assert_eq!(again["fetch"], "got hello-from-outside", "{again}");

    let off = run(&server, &key, "egress", "off", input).await;
    assert_eq!(off["fetch"], "ENETUNREACH", "{off}");
    assert_eq!(off["resolv"], "ENOENT", "{off}");
    assert_eq!(off["dns"], "ENETUNREACH", "{off}");
    assert_eq!(off["ifaces"], json!(["lo"]), "{off}");
    assert_eq!(
        target.hits.load(Ordering::SeqCst),
        2,
        "only the network block got through"
    );
    server.assert_still_serving().await;
}

const ATTACKS: &str = r#"
def main(block_input, backpack):
    tcp = {}
    for host, port in block_input["targets"]:
        tcp["%s:%d" % (host, port)] = fetch(host, port)
    udp = {}
    for host, port in block_input["udp"]:
        def send(host=host, port=port):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.sendto(b"leak", (host, port))
        udp["%s:%d" % (host, port)] = attempt(send)
    other = {}
    other["nft flush ruleset"] = attempt(lambda: subprocess.run(
        ["/usr/sbin/nft", "flush", "ruleset"], capture_output=True, timeout=20).returncode)
    other["nft list ruleset"] = attempt(lambda: subprocess.run(
        ["/usr/sbin/nft", "list", "ruleset"], capture_output=True, timeout=20).returncode)
    other["netlink netfilter"] = attempt(socket.socket, socket.AF_NETLINK, socket.SOCK_RAW, 12)
    other["ip link set down"] = attempt(lambda: subprocess.run(
        ["/usr/sbin/ip", "link", "set", "lo", "down"], capture_output=True, timeout=20).returncode)
    # After the tampering: still filtered.
    retry = {"%s:%d" % (h, p): fetch(h, p) for h, p in block_input["targets"][:2]}
    return {"tcp": tcp, "udp": udp, "other": other, "retry": retry}
"#;

const LISTEN: &str = r#"
held = []
def main(block_input, backpack):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::", block_input["port"]))
    s.listen(16)
    held.append(s)
    return "listening"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_network_block_cannot_reach_the_host_its_api_metadata_or_other_instances() {
    let metadata = "169.254.169.254";
    let host_only = "203.0.113.74";
    let _dummy = Dummy::new("dn", &[metadata, host_only]);
    let meta = greeter(metadata, "metadata-secrets");
    let private = greeter(host_only, "host-service");
    let loopback = greeter("127.0.0.1", "loopback-service");
    let udp_sinks: Vec<std::net::UdpSocket> = ["127.0.0.1", metadata, host_only]
        .iter()
        .map(|a| std::net::UdpSocket::bind((*a, 0)).expect("bind udp"))
        .collect();
    let udp_targets: Vec<(String, u16)> = udp_sinks
        .iter()
        .map(|s| {
            let a = s.local_addr().expect("udp addr");
            (a.ip().to_string(), a.port())
        })
        .collect();
    let server = Server::start().await;
    let api = api_port(&server);
    let (_, key) = server.account("mallory").await;
    let (_, other_key) = server.account("victim").await;
    deploy(&server, &other_key, "svc", &[("listen", LISTEN, true)]).await;
    let instance_port: u16 = 47_123;
    assert_eq!(
        run(
            &server,
            &other_key,
            "svc",
            "listen",
            json!({ "port": instance_port })
        )
        .await,
        "listening"
    );
    deploy(&server, &key, "attack", &[("a", ATTACKS, true)]).await;

    let mut targets: Vec<(String, u16)> = vec![
        ("127.0.0.1".into(), loopback.port),
        ("127.0.0.1".into(), api),
        ("::1".into(), api),
        (metadata.into(), meta.port),
        (metadata.into(), 80),
        (host_only.into(), private.port),
        ("10.255.255.53".into(), 53),
        ("0.0.0.0".into(), api),
        ("127.0.0.1".into(), instance_port),
    ];
    for addr in host_addresses() {
        targets.push((addr.clone(), api));
        targets.push((addr, instance_port));
    }
    let r = run(
        &server,
        &key,
        "attack",
        "a",
        json!({ "targets": targets, "udp": udp_targets }),
    )
    .await;
    let refused = [
        "EHOSTUNREACH",
        "ECONNREFUSED",
        "ENETUNREACH",
        "EACCES",
        "EPERM",
        "EADDRNOTAVAIL",
    ];
    for (target, result) in r["tcp"]
        .as_object()
        .expect("tcp")
        .iter()
        .chain(r["retry"].as_object().expect("retry").iter())
    {
        assert!(
            refused.contains(&result.as_str().unwrap_or("ok")),
            "{target} = {result}: {r}"
        );
    }
    for (what, result) in r["other"].as_object().expect("other") {
        // A tool that ran must have failed (nonzero exit); a socket must be refused.
        assert!(
            result.as_i64().is_some_and(|code| code != 0)
                || ["EPERM", "EACCES", "ENOENT"].contains(&result.as_str().unwrap_or("ok")),
            "{what} = {result}: {r}"
        );
    }
    for (target, result) in r["udp"].as_object().expect("udp") {
        assert!(
            ["EPERM", "EHOSTUNREACH", "EACCES"].contains(&result.as_str().unwrap_or("ok")),
            "udp {target} = {result}: {r}"
        );
    }
    for sink in &udp_sinks {
        sink.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 16];
        assert!(
            sink.recv(&mut buf).is_err(),
            "{:?} received a datagram",
            sink.local_addr()
        );
    }
    assert_eq!(meta.hits.load(Ordering::SeqCst), 0);
    assert_eq!(private.hits.load(Ordering::SeqCst), 0);
    assert_eq!(loopback.hits.load(Ordering::SeqCst), 0);
    server.assert_still_serving().await;
}

const SLEEPY: &str = r#"
def main(block_input, backpack):
    return fetch(block_input["host"], block_input["port"])
"#;

#[tokio::test(flavor = "multi_thread")]
async fn pasta_dies_with_its_instance_and_with_the_server() {
    let dest = "198.51.100.75";
    let _dummy = Dummy::new("lt", &[dest]);
    let target = greeter(dest, "up");
    let allow = format!("{dest}/32");
    let mut server = Server::start_with(&["--network-allow", &allow, "--keep-alive", "1s"]).await;
    let (_, key) = server.account("lifetimes").await;
    deploy(
        &server,
        &key,
        "life",
        &[("n", SLEEPY, true), ("plain", SLEEPY, false)],
    )
    .await;
    let input = json!({ "host": dest, "port": target.port });

    // A plain block starts no pasta.
    run(&server, &key, "life", "plain", input.clone()).await;
    assert!(pasta_children(server.pid()).is_empty());

    for round in 0..2 {
        assert_eq!(
            run(&server, &key, "life", "n", input.clone()).await,
            "got up"
        );
        let pastas = pasta_children(server.pid());
        assert_eq!(
            pastas.len(),
            1,
            "round {round}: one pasta per network instance: {pastas:?}"
        );
        // Reaped after keep-alive: the instance and its pasta are gone.
        assert!(
            eventually(Duration::from_secs(30), || pastas.iter().all(|&p| dead(p))).await,
            "round {round}: pasta {pastas:?} outlived its reaped instance"
        );
        assert!(pasta_children(server.pid()).is_empty());
    }

    // The server dies without cleaning up (SIGKILL): pasta dies with it (parent-death signal).
    assert_eq!(run(&server, &key, "life", "n", input).await, "got up");
    let pastas = pasta_children(server.pid());
    assert_eq!(pastas.len(), 1, "{pastas:?}");
    let pid = server.pid();
    // SAFETY: kill(2) on the server process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(
        eventually(Duration::from_secs(30), || pastas.iter().all(|&p| dead(p))).await,
        "pasta {pastas:?} outlived the server"
    );
    let _ = server.stop();
    assert!(pastas.iter().all(|&p| !process_alive(p) || dead(p)));
}
