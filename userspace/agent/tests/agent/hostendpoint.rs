//! A HostEndpoint on a host interface: policy applies to traffic to and from the host itself,
//! and the failsafe ports stay open whatever the policy says.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use harness::{require, unique_name, AgentProcess, Etcd, Forward, NetNs, Requirement, Store, Veth};

/// Whether `from` can open a TCP connection to `to` (a listener is there, so a failure is a
/// drop: it times out rather than being refused).
fn connects(from: &NetNs, to_ns: &NetNs, to: SocketAddr) -> Result<bool> {
    let listener = to_ns.run(move || TcpListener::bind(to))??;
    let outcome = from.run(move || TcpStream::connect_timeout(&to, Duration::from_millis(700)))?;
    drop(listener);
    match outcome {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(false),
        Err(e) => bail!("connect to {to}: {e}"),
    }
}

#[test]
fn failsafe_ports_survive_a_deny_all_host_policy() -> Result<()> {
    let _load = harness::beside_others();
    if !require(
        "failsafe_ports_survive_a_deny_all_host_policy",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Bpf,
            Requirement::Etcd,
        ],
    ) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let host = NetNs::new("hh")?;
    let peer = NetNs::new("hp")?;
    let link = Veth::between(&host, &peer)?;
    host.add_address(&link.a_name, "192.0.2.1/24")?;
    peer.add_address(&link.b_name, "192.0.2.2/24")?;
    let _forward = Forward::loopback(&host, etcd.port())?;
    let store = Store::connect(&etcd)?;
    let node = unique_name("hepn");
    let apply = |yaml: String| store.apply(&yaml);
    let host_addr = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
    let peer_addr = |port: u16| SocketAddr::from(([192, 0, 2, 2], port));
    // Before any host endpoint, the host is not policed.
    assert!(connects(&peer, &host, host_addr(8080))?);

    let mut agent = AgentProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_calico-node")),
        &host,
        &etcd.endpoint(),
        &node,
    )?;
    agent.wait_ready(&host, true, Duration::from_secs(30))?;
    apply(format!(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: {node}-uplink\n  labels: {{role: host}}\nspec:\n  node: {node}\n  interfaceName: {}\n  expectedIPs: [192.0.2.1]\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: lock-down\nspec:\n  selector: role == 'host'\n  types: [Ingress, Egress]\n  ingress: [{{action: Deny}}]\n  egress: [{{action: Deny}}]\n",
        link.a_name
    ))?;
    // The policy takes hold: ordinary ports in and out are dropped.
    let deadline = Instant::now() + Duration::from_secs(15);
    while connects(&peer, &host, host_addr(8080))? {
        if Instant::now() > deadline {
            bail!("the host policy never applied; log:\n{}", agent.log());
        }
    }
    assert!(
        !connects(&host, &peer, peer_addr(8080))?,
        "outbound 8080 denied"
    );
    // Failsafe: ssh and the API server in, etcd and BGP out.
    assert!(
        connects(&peer, &host, host_addr(22))?,
        "inbound ssh stays open"
    );
    assert!(
        connects(&peer, &host, host_addr(6443))?,
        "inbound 6443 stays open"
    );
    assert!(
        connects(&host, &peer, peer_addr(2379))?,
        "outbound etcd stays open"
    );
    assert!(
        connects(&host, &peer, peer_addr(179))?,
        "outbound BGP stays open"
    );

    // FelixConfiguration replaces the inbound list: 2222 open, 22 no longer.
    apply(
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata:\n  name: default\nspec:\n  failsafeInboundHostPorts: [{protocol: TCP, port: 2222}]\n"
            .into(),
    )?;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !connects(&peer, &host, host_addr(2222))? {
        if Instant::now() > deadline {
            bail!(
                "the configured failsafe port never opened; log:\n{}",
                agent.log()
            );
        }
    }
    assert!(
        !connects(&peer, &host, host_addr(22))?,
        "22 is no longer failsafe"
    );
    Ok(())
}

/// `interfaceName: "*"`: one host endpoint's policy on every host interface (failsafe ports
/// open), a named host endpoint taking its own interface over, and traffic the host only
/// forwards between two networks passing unjudged (host endpoint policy is for traffic to and
/// from the host), as upstream's.
#[test]
fn a_wildcard_host_endpoint_covers_every_host_interface() -> Result<()> {
    let _load = harness::beside_others();
    if !require(
        "a_wildcard_host_endpoint_covers_every_host_interface",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Bpf,
            Requirement::Etcd,
        ],
    ) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let host = NetNs::new("wh")?;
    let (a, b) = (NetNs::new("wa")?, NetNs::new("wb")?);
    let link_a = Veth::between(&host, &a)?;
    let link_b = Veth::between(&host, &b)?;
    host.add_address(&link_a.a_name, "192.0.2.1/24")?;
    a.add_address(&link_a.b_name, "192.0.2.2/24")?;
    host.add_address(&link_b.a_name, "198.51.100.1/24")?;
    b.add_address(&link_b.b_name, "198.51.100.2/24")?;
    a.exec_ok("ip", &["route", "add", "default", "via", "192.0.2.1"])?;
    b.exec_ok("ip", &["route", "add", "default", "via", "198.51.100.1"])?;
    let _forward = Forward::loopback(&host, etcd.port())?;
    let store = Store::connect(&etcd)?;
    let node = unique_name("whn");
    let via_a = |port: u16| SocketAddr::from(([192, 0, 2, 1], port));
    let via_b = |port: u16| SocketAddr::from(([198, 51, 100, 1], port));
    let mut agent = AgentProcess::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_calico-node")),
        &host,
        &etcd.endpoint(),
        &node,
    )?;
    agent.wait_ready(&host, true, Duration::from_secs(30))?;
    // The host allows in only 8080; the wildcard endpoint holds both of its addresses.
    store.apply(&format!(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: {node}-all\n  labels: {{role: host}}\nspec:\n  node: {node}\n  interfaceName: '*'\n  expectedIPs: [192.0.2.1, 198.51.100.1]\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: host-8080\nspec:\n  selector: role == 'host'\n  types: [Ingress, Egress]\n  ingress: [{{action: Allow, protocol: TCP, destination: {{ports: [8080]}}}}]\n  egress: [{{action: Allow}}]\n"
    ))?;
    let wait = |what: &str, ok: &dyn Fn() -> Result<bool>| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !ok()? {
            if Instant::now() > deadline {
                bail!("{what}: not within 15 s; log:\n{}", agent.log());
            }
        }
        Ok(())
    };
    // Both interfaces: 9090 dropped, 8080 and the failsafe ssh open.
    wait("9090 dropped through interface a", &|| {
        Ok(!connects(&a, &host, via_a(9090))?)
    })?;
    wait("9090 dropped through interface b", &|| {
        Ok(!connects(&b, &host, via_b(9090))?)
    })?;
    for (from, to) in [
        (&a, via_a(8080)),
        (&b, via_b(8080)),
        (&a, via_a(22)),
        (&b, via_b(22)),
    ] {
        assert!(connects(from, &host, to)?, "{to} stays open");
    }
    // Forwarded between the two networks: not the host's traffic, so not its policy's.
    let to_b = SocketAddr::from(([198, 51, 100, 2], 9090));
    assert!(connects(&a, &b, to_b)?, "a → b:9090 through the host");
    assert!(
        agent.metric(&host, "felix_bpf_packets_host_forwarded_total")? > 0.0,
        "forwarded packets are counted"
    );

    // A named host endpoint on b takes that interface over with its own policy (9090 only).
    store.apply(&format!(
        "apiVersion: projectcalico.org/v3\nkind: HostEndpoint\nmetadata:\n  name: {node}-b\n  labels: {{role: edge}}\nspec:\n  node: {node}\n  interfaceName: {}\n  expectedIPs: [198.51.100.1]\n---\napiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: edge-9090\nspec:\n  selector: role == 'edge'\n  types: [Ingress, Egress]\n  ingress: [{{action: Allow, protocol: TCP, destination: {{ports: [9090]}}}}]\n  egress: [{{action: Allow}}]\n",
        link_b.a_name
    ))?;
    wait("9090 open through b", &|| connects(&b, &host, via_b(9090)))?;
    assert!(
        !connects(&b, &host, via_b(8080))?,
        "b follows its own endpoint now"
    );
    assert!(connects(&a, &host, via_a(8080))?, "a stays the wildcard's");
    assert!(!connects(&a, &host, via_a(9090))?, "a stays the wildcard's");
    // The named one gone, the wildcard takes b back.
    store.delete(calico_model::Kind::HostEndpoint, None, &format!("{node}-b"))?;
    wait("b back under the wildcard", &|| {
        Ok(!connects(&b, &host, via_b(9090))?)
    })?;
    assert!(connects(&b, &host, via_b(8080))?);

    // A preDNAT policy cannot be applied here: the endpoints it selects drop that direction
    // (never let through unjudged), failsafe ports still open.
    store.apply(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: pre-dnat\nspec:\n  selector: role == 'host'\n  preDNAT: true\n  applyOnForward: true\n  types: [Ingress]\n  ingress: [{action: Allow}]\n",
    )?;
    wait("8080 dropped under a preDNAT policy", &|| {
        Ok(!connects(&a, &host, via_a(8080))?)
    })?;
    assert!(connects(&a, &host, via_a(22))?, "failsafe ssh stays open");
    assert!(agent
        .log()
        .contains("preDNAT policies are not supported by this dataplane"));
    store.delete(calico_model::Kind::GlobalNetworkPolicy, None, "pre-dnat")?;
    wait("8080 back", &|| connects(&a, &host, via_a(8080)))?;
    // An applyOnForward policy on the host endpoint: forwarded traffic is not judged by
    // policy here, so it is dropped rather than passed unjudged.
    store.apply(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: forward\nspec:\n  selector: role == 'host'\n  applyOnForward: true\n  types: [Ingress]\n  ingress: [{action: Allow}]\n",
    )?;
    wait("forwarded traffic dropped", &|| {
        Ok(!connects(&a, &b, to_b)?)
    })?;
    assert!(
        connects(&a, &host, via_a(9090))?,
        "the host's own traffic: allowed by the policy"
    );
    store.delete(calico_model::Kind::GlobalNetworkPolicy, None, "forward")?;
    wait("forwarded traffic passes again", &|| connects(&a, &b, to_b))?;
    Ok(())
}
