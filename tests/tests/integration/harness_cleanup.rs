//! Harness objects clean up after themselves, also when the test that owns them panics.

use std::process::Command;

use harness::{require, unique_name, Etcd, NetNs, Requirement, Veth};

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn namespaces_and_veths_are_removed_when_a_test_panics() {
    if !require(
        "namespaces_and_veths_are_removed_when_a_test_panics",
        &[Requirement::Root, Requirement::NetNs],
    ) {
        return;
    }
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let a = NetNs::new("pa").expect("netns a");
        let b = NetNs::new("pb").expect("netns b");
        let veth = Veth::between(&a, &b).expect("veth");
        names.push(a.name().to_owned());
        names.push(b.name().to_owned());
        assert!(netns_exists(a.name()), "netns not created");
        a.exec_ok("ip", &["link", "show", &veth.a_name])
            .expect("veth end missing in its namespace");
        panic!("simulated test failure");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 2);
    for name in names {
        assert!(!netns_exists(&name), "netns {name} survived the panic");
    }
}

#[test]
fn unique_names_fit_an_interface_name_and_do_not_repeat() {
    let names: std::collections::HashSet<String> = (0..1000).map(|_| unique_name("cali")).collect();
    assert_eq!(names.len(), 1000);
    assert!(
        names.iter().all(|n| n.len() <= 15),
        "a name is longer than IFNAMSIZ-1"
    );
}

#[test]
fn etcd_process_is_stopped_when_a_test_panics() {
    if !require(
        "etcd_process_is_stopped_when_a_test_panics",
        &[Requirement::Etcd],
    ) {
        return;
    }
    let mut endpoint = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let etcd = Etcd::start().expect("etcd start");
        endpoint = etcd.endpoint();
        assert!(etcd.is_healthy());
        panic!("simulated test failure");
    }));
    assert!(result.is_err());
    let addr = endpoint.trim_start_matches("http://");
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "etcd at {addr} still listening after the panic"
    );
}
