//! The renderer's decisions, and real BIRD 2 accepting what it writes.

use std::net::IpAddr;

use calico_bgp::{render, sessions, BgpError, BgpInputs};
use calico_model::parse_documents;

const NODES: &str = "
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node1, labels: {rack: a}}
spec: {bgp: {ipv4Address: 10.99.0.1/24}}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node2, labels: {rack: a}}
spec: {bgp: {ipv4Address: 10.99.0.2/24, asNumber: 64513}}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: node3, labels: {rack: b, route-reflector: 'true'}}
spec: {bgp: {ipv4Address: 10.99.0.3/24, routeReflectorClusterID: 224.0.0.1}}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pool}
spec: {cidr: 10.65.0.0/16}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: off}
spec: {cidr: 10.66.0.0/16, disabled: true}
";

fn inputs(extra: &str) -> BgpInputs {
    let resources = parse_documents(&format!("{NODES}---\n{extra}")).unwrap();
    BgpInputs::from_resources(
        &resources,
        vec![
            "10.65.1.0/26".parse().unwrap(),
            "10.66.0.0/26".parse().unwrap(),
        ],
    )
    .unwrap()
}

fn names(i: &BgpInputs, node: &str) -> Vec<String> {
    let me = i.nodes.iter().find(|n| n.name == node).unwrap();
    sessions(i, me)
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect()
}

#[test]
fn full_mesh_by_default() {
    let i = inputs("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {}\n");
    assert_eq!(names(&i, "node1"), ["Mesh_10_99_0_2", "Mesh_10_99_0_3"]);
    let config = render(&i, "node1").unwrap();
    assert!(config.contains("router id 10.99.0.1;"));
    assert!(config.contains("local 10.99.0.1 as 64512;"));
    assert!(
        config.contains("neighbor 10.99.0.2 as 64513;"),
        "the peer's own AS:\n{config}"
    );
    // Blocks of enabled pools only.
    assert!(config.contains("route 10.65.1.0/26 blackhole;"));
    assert!(
        !config.contains("10.66.0.0/26"),
        "a disabled pool's block is never exported:\n{config}"
    );
    assert_eq!(render(&i, "node1").unwrap(), config, "deterministic");
}

#[test]
fn service_ranges_are_advertised() {
    let i = inputs("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {serviceClusterIPs: [{cidr: 10.96.0.0/12}], serviceExternalIPs: [{cidr: 198.51.100.0/24}]}\n");
    let config = render(&i, "node2").unwrap();
    assert!(
        config.contains("route 10.96.0.0/12 blackhole;")
            && config.contains("route 198.51.100.0/24 blackhole;"),
        "{config}"
    );
}

#[test]
fn peers_by_node_selector_peer_selector_and_address() {
    let i = inputs(
        "apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata: {name: default}
spec: {nodeToNodeMeshEnabled: false, asNumber: 65000, listenPort: 1790}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: to-rr}
spec: {nodeSelector: \"!has(route-reflector)\", peerSelector: \"has(route-reflector)\"}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: rr-to-clients}
spec: {nodeSelector: \"has(route-reflector)\", peerSelector: \"!has(route-reflector)\"}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: tor}
spec: {peerIP: '192.0.2.254', asNumber: 64999}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: only-node2}
spec: {node: node2, peerIP: '192.0.2.100:1791', asNumber: 64998}
",
    );
    assert_eq!(names(&i, "node1"), ["Node_10_99_0_3", "Global_192_0_2_254"]);
    assert_eq!(
        names(&i, "node2"),
        ["Node_192_0_2_100", "Node_10_99_0_3", "Global_192_0_2_254"]
    );
    assert_eq!(
        names(&i, "node3"),
        ["Node_10_99_0_1", "Node_10_99_0_2", "Global_192_0_2_254"]
    );
    let rr = render(&i, "node3").unwrap();
    assert!(
        rr.contains("rr client;") && rr.contains("rr cluster id 224.0.0.1;"),
        "{rr}"
    );
    assert!(
        rr.contains("net ~ [ 10.65.0.0/16+ ]"),
        "the reflector passes pool routes on:\n{rr}"
    );
    assert!(rr.contains("local 10.99.0.3 port 1790 as 65000;"), "{rr}");
    let client = render(&i, "node1").unwrap();
    assert!(!client.contains("rr client"), "{client}");
    let n2 = render(&i, "node2").unwrap();
    assert!(
        n2.contains("neighbor 192.0.2.100 port 1791 as 64998;"),
        "{n2}"
    );
    assert!(
        n2.contains("multihop;"),
        "a peer outside the node's subnet is multihop:\n{n2}"
    );
}

#[test]
fn bad_inputs_are_named() {
    let bad_peer = parse_documents(&format!(
        "{NODES}---\napiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {{name: broken}}\nspec: {{peerIP: 'not-an-ip', asNumber: 64999}}\n"
    ));
    // Validation refuses it already; rendering from a hand-written datastore value says where.
    if let Ok(resources) = bad_peer {
        let i = BgpInputs::from_resources(&resources, vec![]).unwrap();
        let err = render(&i, "node1").unwrap_err();
        assert!(matches!(err, BgpError::Invalid { .. }), "{err}");
        assert!(
            err.to_string().contains("BGPPeer broken spec.peerIP"),
            "{err}"
        );
    }
    let i = inputs("");
    assert_eq!(
        render(&i, "nosuchnode").unwrap_err(),
        BgpError::NoAddress {
            node: "nosuchnode".into()
        }
    );
}

#[test]
fn validation_refuses_bad_bgp_resources() {
    for (doc, field) in [
        (
            "kind: BGPPeer\nmetadata: {name: p}\nspec: {peerIP: '10.0.0.300', asNumber: 64999}",
            "spec.peerIP",
        ),
        (
            "kind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 4294967296}",
            "asNumber",
        ),
    ] {
        let text = format!("apiVersion: projectcalico.org/v3\n{doc}\n");
        let refused = match parse_documents(&text) {
            Err(e) => e.to_string(),
            Ok(rs) => rs
                .iter()
                .map(|r| {
                    calico_model::validate(r)
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                })
                .collect::<String>(),
        };
        assert!(refused.contains(field), "{doc}: {refused}");
    }
}

/// BIRD 2 itself parses every configuration above (`bird -p`).
#[test]
fn bird_accepts_the_output() {
    if !harness::require("bird_accepts_the_output", &[harness::Requirement::Bird]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("secret");
    std::fs::write(&password, "s3cr3t-pw\n").unwrap();
    let mut i = inputs(&format!(
        "apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata: {{name: default}}
spec: {{nodeToNodeMeshEnabled: true, logSeverityScreen: Debug, listenPort: 1790}}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {{name: tor}}
spec: {{peerIP: '192.0.2.254', asNumber: 64999, password: {{file: {}}}}}
",
        password.display()
    ));
    i.passwords.insert(
        password.display().to_string(),
        std::fs::read_to_string(&password).unwrap(),
    );
    // A password BIRD could not read is refused with the session named.
    let mut quoted = i.clone();
    quoted
        .passwords
        .insert(password.display().to_string(), "a\"b".into());
    let err = render(&quoted, "node1").unwrap_err().to_string();
    assert!(
        err.contains("Global_192_0_2_254") && err.contains("without quotes"),
        "{err}"
    );
    for node in ["node1", "node2", "node3"] {
        let config = render(&i, node).unwrap();
        let file = dir.path().join(format!("{node}.conf"));
        std::fs::write(&file, &config).unwrap();
        let out = std::process::Command::new("bird")
            .arg("-p")
            .arg("-c")
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "bird rejected the config of {node}: {}\n{config}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _: IpAddr = "10.99.0.1".parse().unwrap();
}

/// Dual stack: nodes with an IPv6 address hold IPv6 sessions between those addresses (an
/// `ipv6` channel), export their IPv6 blocks and program learned IPv6 routes; a node without
/// one keeps its IPv4 sessions only. BIRD parses the result.
#[test]
fn dual_stack_nodes_mesh_over_both_families() {
    let resources = parse_documents(
        "apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: a}
spec: {bgp: {ipv4Address: 10.99.0.1/24, ipv6Address: 'fd99::1/64'}}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: b}
spec: {bgp: {ipv4Address: 10.99.0.2/24, ipv6Address: 'fd99::2/64'}}
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: c}
spec: {bgp: {ipv4Address: 10.99.0.3/24}}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: v4}
spec: {cidr: 10.65.0.0/16}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: v6}
spec: {cidr: 'fd65::/48', blockSize: 122}
",
    )
    .unwrap();
    let i = BgpInputs::from_resources(
        &resources,
        vec![
            "10.65.0.0/26".parse().unwrap(),
            "fd65::/122".parse().unwrap(),
        ],
    )
    .unwrap();
    assert_eq!(
        names(&i, "a"),
        ["Mesh_10_99_0_2", "Mesh_fd99__2", "Mesh_10_99_0_3"]
    );
    assert_eq!(
        names(&i, "c"),
        ["Mesh_10_99_0_1", "Mesh_10_99_0_2"],
        "no IPv6 of its own"
    );
    let config = render(&i, "a").unwrap();
    for line in [
        "protocol direct { ipv4; ipv6; interface",
        "protocol kernel kernel6 {",
        "route fd65::/122 blackhole;",
        "if proto = \"calico_blocks\" || proto = \"calico_blocks6\" then accept;",
        "local fd99::1 as 64512;",
        "neighbor fd99::2 as 64512;",
        "ipv6 { import all; export filter calico_export; next hop self; };",
    ] {
        assert!(config.contains(line), "{line} missing:\n{config}");
    }
    let v4_only = render(&i, "c").unwrap();
    assert!(!v4_only.contains("ipv6"), "{v4_only}");
    if !harness::require(
        "dual_stack_nodes_mesh_over_both_families",
        &[harness::Requirement::Bird],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a.conf");
    std::fs::write(&file, &config).unwrap();
    let out = std::process::Command::new("bird")
        .arg("-p")
        .arg("-c")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bird rejected it: {}\n{config}",
        String::from_utf8_lossy(&out.stderr)
    );
}
