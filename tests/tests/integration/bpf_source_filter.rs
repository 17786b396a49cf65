//! The source filter on real traffic: two namespaces joined by a veth, the program attached to
//! one end's ingress, pings passing and dropped as the deny map changes.

use std::net::IpAddr;

use calico_dataplane::{tcx_programs, AttachMode, Direction, LoadOptions, SourceFilter};
use harness::{require, NetNs, Requirement, Veth};

const NEEDS: &[Requirement] = &[Requirement::Root, Requirement::NetNs, Requirement::Bpf];

struct Pair {
    client: NetNs,
    server: NetNs,
    _veth: Veth,
}

/// Client and server namespaces with one veth between them, addressed in both families.
fn pair() -> anyhow::Result<(Pair, String)> {
    let client = NetNs::new("tcli")?;
    let server = NetNs::new("tsrv")?;
    let veth = Veth::between(&client, &server)?;
    client.add_address(&veth.a_name, "198.18.0.1/30")?;
    client.add_address(&veth.a_name, "fd00:c0:1::1/64")?;
    server.add_address(&veth.b_name, "198.18.0.2/30")?;
    server.add_address(&veth.b_name, "fd00:c0:1::2/64")?;
    let server_if = veth.b_name.clone();
    Ok((
        Pair {
            client,
            server,
            _veth: veth,
        },
        server_if,
    ))
}

/// What the kernel says is attached to `interface` ingress: TCX links by query (bpftool 7.1 does
/// not show them), clsact filters through `bpftool net`.
fn attached_programs(ns: &NetNs, interface: &str, mode: AttachMode) -> anyhow::Result<String> {
    Ok(match mode {
        AttachMode::Tcx => ns
            .run(|| tcx_programs(interface, Direction::Ingress))??
            .join(","),
        AttachMode::Clsact => ns.exec_ok("bpftool", &["net", "show", "dev", interface])?,
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

#[test]
fn drops_ipv4_and_ipv6_sources_in_the_deny_trie() -> anyhow::Result<()> {
    if !require("drops_ipv4_and_ipv6_sources_in_the_deny_trie", NEEDS) {
        return Ok(());
    }
    let (pair, server_if) = pair()?;
    let (v4_server, v6_server) = (ip("198.18.0.2"), ip("fd00:c0:1::2"));

    assert!(
        pair.client.ping(v4_server)?,
        "IPv4 ping fails before any program"
    );
    assert!(
        pair.client.ping(v6_server)?,
        "IPv6 ping fails before any program"
    );

    let (mut filter, _logger) = SourceFilter::load(&LoadOptions::default())?;
    let mode = pair
        .server
        .run(|| filter.attach(&server_if, Direction::Ingress))??;
    println!("source filter attached to {server_if} ingress as {mode:?}");
    let attached = attached_programs(&pair.server, &server_if, mode)?;
    assert!(
        attached.contains("source_filter"),
        "the kernel does not list the program on {server_if}: {attached}"
    );

    // Attached but empty: everything passes, and the program sees it.
    assert!(pair.client.ping(v4_server)?, "empty filter drops IPv4");
    assert!(pair.client.ping(v6_server)?, "empty filter drops IPv6");
    let before = filter.counters()?;
    assert!(before.passed > 0, "program saw no packets: {before:?}");
    assert_eq!(before.dropped, 0);

    // Deny the client's IPv4 /24 (longest-prefix match, not just exact): IPv4 drops, IPv6 not.
    filter.deny("198.18.0.0/24".parse()?, 7)?;
    assert!(
        !pair.client.ping(v4_server)?,
        "denied IPv4 source still reaches the server"
    );
    assert!(
        pair.client.ping(v6_server)?,
        "IPv4 deny entry also dropped IPv6"
    );
    let after_v4 = filter.counters()?;
    assert!(
        after_v4.dropped > before.dropped,
        "no drop counted: {after_v4:?}"
    );

    filter.deny("fd00:c0:1::1/128".parse()?, 8)?;
    assert!(
        !pair.client.ping(v6_server)?,
        "denied IPv6 source still reaches the server"
    );
    assert_eq!(
        filter.lookup(ip("fd00:c0:1::1"))?.map(|e| e.rule_id),
        Some(8)
    );

    // Removing the entries restores traffic.
    filter.allow("198.18.0.0/24".parse()?)?;
    filter.allow("fd00:c0:1::1/128".parse()?)?;
    assert!(
        pair.client.ping(v4_server)?,
        "IPv4 still dropped after removal"
    );
    assert!(
        pair.client.ping(v6_server)?,
        "IPv6 still dropped after removal"
    );

    // Detaching removes the program from the interface.
    pair.server
        .run(|| filter.detach(&server_if, Direction::Ingress))??;
    let detached = attached_programs(&pair.server, &server_if, mode)?;
    assert!(
        !detached.contains("source_filter"),
        "program still attached after detach: {detached}"
    );
    Ok(())
}

#[test]
fn arp_and_other_hosts_are_unaffected_by_a_deny_entry() -> anyhow::Result<()> {
    if !require("arp_and_other_hosts_are_unaffected_by_a_deny_entry", NEEDS) {
        return Ok(());
    }
    let (pair, server_if) = pair()?;
    let (mut filter, _logger) = SourceFilter::load(&LoadOptions::default())?;
    pair.server
        .run(|| filter.attach(&server_if, Direction::Ingress))??;
    // A deny for an address the client does not use must not affect it.
    filter.deny("198.18.0.5/32".parse()?, 1)?;
    pair.client.exec_ok("ip", &["neigh", "flush", "all"])?;
    assert!(
        pair.client.ping(ip("198.18.0.2"))?,
        "ping (with a fresh ARP exchange) fails with an unrelated deny entry"
    );
    Ok(())
}

#[test]
fn clsact_fallback_filters_like_tcx() -> anyhow::Result<()> {
    if !require("clsact_fallback_filters_like_tcx", NEEDS) {
        return Ok(());
    }
    let (pair, server_if) = pair()?;
    let (mut filter, _logger) = SourceFilter::load(&LoadOptions::default())?;
    pair.server
        .run(|| filter.attach_as(&server_if, Direction::Ingress, AttachMode::Clsact))??;
    let shown = attached_programs(&pair.server, &server_if, AttachMode::Clsact)?;
    assert!(
        shown.contains("source_filter"),
        "bpftool net does not show the clsact filter:\n{shown}"
    );
    assert!(
        pair.client.ping(ip("198.18.0.2"))?,
        "empty clsact filter drops"
    );
    filter.deny("198.18.0.1/32".parse()?, 3)?;
    assert!(
        !pair.client.ping(ip("198.18.0.2"))?,
        "clsact filter does not drop"
    );
    filter.allow("198.18.0.1/32".parse()?)?;
    assert!(
        pair.client.ping(ip("198.18.0.2"))?,
        "clsact filter still drops"
    );
    Ok(())
}
