//! Network instances at the sandbox level: the host must enable them, they get a tap
//! interface and a resolver, and their pasta lives exactly as long as the instance.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::time::Duration;

use common::{process_exists, sh, test_host, wait_gone};

#[test]
fn network_instances_need_the_host_to_enable_network() {
    let t = test_host();
    let mut spec = t.spec(sh("echo hi"));
    spec.network = true;
    let err = t.host.spawn(&spec).expect_err("refused");
    assert!(err.to_string().contains("outbound network off"), "{err}");
    assert!(!t.host.network_enabled());
}

#[test]
fn the_allow_list_is_validated() {
    let mut t = test_host();
    let err = std::sync::Arc::get_mut(&mut t.host)
        .expect("not shared yet")
        .enable_network(&["10.1.2.3/8".into()])
        .expect_err("host bits");
    assert!(err.to_string().contains("did you mean 10.0.0.0/8"), "{err}");
    assert!(!t.host.network_enabled());
}

#[test]
fn a_network_instance_is_connected_and_its_pasta_dies_with_it() {
    let mut t = test_host();
    std::sync::Arc::get_mut(&mut t.host)
        .expect("not shared yet")
        .enable_network(&[])
        .expect("pasta (passt) and nft (nftables) are installed");
    let mut spec = t.spec(sh(
        "tail -n +3 /proc/net/dev | cut -d: -f1; cat /etc/resolv.conf; echo END; sleep 1000",
    ));
    spec.network = true;
    let spawned = t.spawn(&spec);
    let pasta = spawned.instance.pasta_pid().expect("a pasta") as i32;
    assert!(process_exists(pasta));
    let mut lines = Vec::new();
    let reader = BufReader::new(File::from(spawned.channels.responses));
    for line in reader.lines() {
        let line = line.expect("read");
        if line == "END" {
            break;
        }
        lines.push(line.trim().to_string());
    }
    let ifaces: Vec<&String> = lines.iter().take_while(|l| !l.contains(' ')).collect();
    assert_eq!(ifaces.len(), 2, "lo and the tap: {lines:?}");
    assert!(
        lines.iter().any(|l| l == "nameserver 169.254.0.53"),
        "{lines:?}"
    );
    spawned.instance.destroy().expect("destroy");
    assert!(
        wait_gone(pasta, Duration::from_secs(5)),
        "pasta {pasta} outlived its instance"
    );

    // A plain instance gets no pasta.
    let plain = t.spawn(&t.spec(sh("sleep 1000")));
    assert_eq!(plain.instance.pasta_pid(), None);
}
