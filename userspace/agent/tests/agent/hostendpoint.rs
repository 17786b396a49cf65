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
