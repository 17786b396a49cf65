//! The policy classifiers on real traffic: workloads behind a host namespace, a policy compiled
//! by calico-policy and installed into the maps, ICMP and TCP allowed and denied as it says,
//! and a new version switched in as one update.

use std::{net::IpAddr, time::Duration};

use calico_dataplane::{Hook, LoadOptions, PolicyCounters, PolicyDataplane};
use calico_model::parse_documents;
use calico_policy::{CompiledProgram, Direction, EndpointId, World};
use harness::{require, NetNs, Requirement, Veth};

const NEEDS: &[Requirement] = &[Requirement::Root, Requirement::NetNs, Requirement::Bpf];

struct Workload {
    ns: NetNs,
    ip: IpAddr,
    host_if: String,
    _veth: Veth,
}

fn workload(host: &NetNs, index: u8) -> anyhow::Result<Workload> {
    let ns = NetNs::new("pw")?;
    let veth = Veth::between(host, &ns)?;
    let base = 4 * index;
    host.add_address(&veth.a_name, &format!("198.18.60.{}/30", base + 1))?;
    ns.add_address(&veth.b_name, &format!("198.18.60.{}/30", base + 2))?;
    ns.exec_ok(
        "ip",
        &[
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.60.{}", base + 1),
        ],
    )?;
    Ok(Workload {
        ip: format!("198.18.60.{}", base + 2).parse()?,
        host_if: veth.a_name.clone(),
        ns,
        _veth: veth,
    })
}

/// A routing host namespace with workloads 1 (a), 2 (b) and 3 (s, the server).
fn three_workloads(prefix: &str) -> anyhow::Result<(NetNs, Workload, Workload, Workload)> {
    let host = NetNs::new(prefix)?;
    host.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    let (a, b, s) = (
        workload(&host, 1)?,
        workload(&host, 2)?,
        workload(&host, 3)?,
    );
    Ok((host, a, b, s))
}

/// The policy dataplane loaded and attached to the server's host-side veth, with its ifindex.
fn policy_dataplane_on(host: &NetNs, s: &Workload) -> anyhow::Result<(PolicyDataplane, u32)> {
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let host_if = s.host_if.clone();
    host.run(|| dp.attach(&host_if))??;
    let ifindex = host.ifindex(&s.host_if)?;
    Ok((dp, ifindex))
}

fn tcp_connects(from: &NetNs, to: IpAddr, port: u16) -> anyhow::Result<bool> {
    from.tcp_connects(to, port, Duration::from_secs(2))
}

/// A denial proven by the program, not by a timeout: the attempt fails *and* the program's
/// denied counter grew meanwhile (a probe lost for any other reason fails the test).
fn denied_by_program(
    dp: &PolicyDataplane,
    what: &str,
    attempt: impl FnOnce() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    dropped_as(dp, what, |c| c.denied, attempt)
}

/// The same for packets dropped because the hook has no program at all (fail closed).
fn dropped_for_lack_of_policy(
    dp: &PolicyDataplane,
    what: &str,
    attempt: impl FnOnce() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    dropped_as(dp, what, |c| c.no_policy, attempt)
}

fn dropped_as(
    dp: &PolicyDataplane,
    what: &str,
    counter: impl Fn(&PolicyCounters) -> u64,
    attempt: impl FnOnce() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let before = counter(&dp.counters()?);
    assert!(!attempt()?, "{what}: got through");
    let after = counter(&dp.counters()?);
    assert!(
        after > before,
        "{what}: failed, but the program counted no drop of that kind (lost elsewhere?)"
    );
    Ok(())
}

fn world(policy: &str, server: IpAddr, a: IpAddr, b: IpAddr) -> World {
    let text = format!(
        "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: server, namespace: default, labels: {{app: server}}}}\nspec: {{node: n, ipNetworks: ['{server}/32']}}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: client-a, namespace: default, labels: {{app: a}}}}\nspec: {{node: n, ipNetworks: ['{a}/32']}}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: client-b, namespace: default, labels: {{app: b}}}}\nspec: {{node: n, ipNetworks: ['{b}/32']}}\n---\n{policy}"
    );
    World::from_resources(&parse_documents(&text).expect("test documents")).expect("world")
}

fn install(
    dp: &mut PolicyDataplane,
    w: &World,
    ifindex: u32,
    server: IpAddr,
) -> anyhow::Result<()> {
    install_endpoint(dp, w, ifindex, "server", server)
}

#[test]
fn compiled_policy_allows_and_denies_real_traffic() -> anyhow::Result<()> {
    if !require("compiled_policy_allows_and_denies_real_traffic", NEEDS) {
        return Ok(());
    }
    let (host, a, b, s) = three_workloads("ph")?;
    let _listener = s.ns.tcp_server(8080)?;
    assert!(
        a.ns.ping(s.ip)? && b.ns.ping(s.ip)?,
        "no connectivity before policy"
    );
    assert!(tcp_connects(&a.ns, s.ip, 8080)?, "no TCP before policy");

    let (mut dp, ifindex) = policy_dataplane_on(&host, &s)?;

    let policy = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\nspec:\n  selector: app == 'server'\n  types: [Ingress, Egress]\n  ingress:\n    - {action: Allow, protocol: ICMP, source: {selector: app == 'a'}}\n    - {action: Allow, protocol: TCP, source: {selector: app == 'b'}, destination: {ports: [8080]}}\n  egress:\n    - {action: Allow}\n";
    install(&mut dp, &world(policy, s.ip, a.ip, b.ip), ifindex, s.ip)?;

    assert!(a.ns.ping(s.ip)?, "ICMP from a is allowed");
    denied_by_program(&dp, "ICMP from b", || b.ns.ping(s.ip))?;
    assert!(
        tcp_connects(&b.ns, s.ip, 8080)?,
        "TCP 8080 from b is allowed"
    );
    denied_by_program(&dp, "TCP from a", || tcp_connects(&a.ns, s.ip, 8080))?;
    let counters = dp.counters()?;
    assert!(counters.allowed > 0 && counters.denied > 0, "{counters:?}");

    // A new version (deny everything in) replaces the old one in one update.
    let deny_all = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\nspec:\n  selector: app == 'server'\n  types: [Ingress, Egress]\n  ingress: [{action: Deny}]\n  egress: [{action: Allow}]\n";
    install(&mut dp, &world(deny_all, s.ip, a.ip, b.ip), ifindex, s.ip)?;
    denied_by_program(&dp, "ICMP from a under the new version", || a.ns.ping(s.ip))?;
    denied_by_program(&dp, "TCP from b under the new version", || {
        tcp_connects(&b.ns, s.ip, 8080)
    })?;

    // Removing the policy while the classifiers stay attached leaves the interface closed,
    // not open; detaching them (an interface no longer managed) lets traffic pass again.
    dp.remove(ifindex, Hook::Egress)?;
    dp.remove(ifindex, Hook::Ingress)?;
    dropped_for_lack_of_policy(&dp, "ICMP after the policy was removed", || a.ns.ping(s.ip))?;
    host.run(move || dp.forget_interface(ifindex))??;
    assert!(
        a.ns.ping(s.ip)?,
        "traffic blocked after the interface was released"
    );
    println!(
        "policy classifier: allowed {} denied {}",
        counters.allowed, counters.denied
    );
    Ok(())
}

#[test]
fn replies_and_established_flows_pass_through_conntrack() -> anyhow::Result<()> {
    if !require(
        "replies_and_established_flows_pass_through_conntrack",
        NEEDS,
    ) {
        return Ok(());
    }
    let (host, a, b, s) = three_workloads("ch")?;
    let _listener = s.ns.tcp_server(8080)?;
    let _listener_b = b.ns.tcp_server(9090)?;
    let (mut dp, ifindex) = policy_dataplane_on(&host, &s)?;
    // In: TCP 8080 from b and ICMP from a. Out: nothing at all, so every reply the server
    // sends must be recognised as part of a flow allowed in.
    let policy = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\nspec:\n  selector: app == 'server'\n  types: [Ingress, Egress]\n  ingress:\n    - {action: Allow, protocol: TCP, source: {selector: app == 'b'}, destination: {ports: [8080]}}\n    - {action: Allow, protocol: ICMP, source: {selector: app == 'a'}}\n";
    install(&mut dp, &world(policy, s.ip, a.ip, b.ip), ifindex, s.ip)?;

    assert!(
        tcp_connects(&b.ns, s.ip, 8080)?,
        "the reply to an allowed TCP connection was dropped"
    );
    assert!(a.ns.ping(s.ip)?, "the reply to an allowed ping was dropped");
    // What the server starts itself is still judged by its (empty) egress policy.
    denied_by_program(&dp, "the server's own connection to b:9090", || {
        tcp_connects(&s.ns, b.ip, 9090)
    })?;
    denied_by_program(&dp, "the server's own ping to a", || s.ns.ping(a.ip))?;
    // Positive control: b:9090 does answer a connection that does not leave the server.
    assert!(
        tcp_connects(&a.ns, b.ip, 9090)?,
        "b:9090 is not reachable at all"
    );

    // Per-rule counters: the TCP allow rule and a deny both counted, on this interface.
    let rules = dp.rule_counters()?;
    assert!(
        rules.iter().any(|r| r.ifindex == ifindex
            && r.packets >= 1
            && r.bytes > 0
            && matches!(
                &r.verdict,
                calico_policy::Verdict::Allow(calico_policy::RuleRef::Rule { index: 0, .. })
            )),
        "the TCP allow rule was not counted: {rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r.packets >= 1 && matches!(r.verdict, calico_policy::Verdict::Deny(_))),
        "no deny was counted: {rules:?}"
    );
    // Verdict events: the allowed TCP connection to 8080 and the server's denied attempt.
    let events = dp.drain_events(10_000);
    let v4 = |ip: std::net::IpAddr| match ip {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(a) => a.octets(),
    };
    assert!(
        events.iter().any(|e| e.ifindex == ifindex
            && e.protocol == 6
            && e.dst_port == 8080
            && e.src == v4(b.ip)
            && e.dst == v4(s.ip)
            && e.action == calico_bpf_common::ACTION_ALLOW),
        "no allow event for b → s:8080 in {} events",
        events.len()
    );
    assert!(
        events
            .iter()
            .any(|e| e.dst_port == 9090 && e.action == calico_bpf_common::ACTION_DENY),
        "no deny event for s → b:9090"
    );
    println!(
        "per-rule counters: {} rules with hits; {} verdict events",
        rules.len(),
        events.len()
    );

    let counters = dp.counters()?;
    assert!(
        counters.tracked > 0,
        "no packet went through conntrack: {counters:?}"
    );
    let flows = dp.tracked_flows()?;
    assert!(
        flows
            .iter()
            .any(|f| f.protocol == 6 && f.ifindex == ifindex && f.ports.0.min(f.ports.1) == 8080),
        "no TCP flow to 8080 tracked: {flows:?}"
    );
    assert!(
        flows.iter().any(|f| f.protocol == 1),
        "no ICMP echo flow tracked: {flows:?}"
    );
    // The probe and the server both close the connection: both FINs seen.
    assert!(
        flows.iter().any(|f| f.protocol == 6 && f.closed),
        "closed TCP flow not marked: {flows:?}"
    );

    // Expiry: with zero timeouts everything idle goes.
    std::thread::sleep(Duration::from_millis(20));
    let zero = calico_dataplane::ConntrackTimeouts {
        tcp_syn_sent: Duration::ZERO,
        tcp_established: Duration::ZERO,
        tcp_fins_seen: Duration::ZERO,
        tcp_reset: Duration::ZERO,
        udp: Duration::ZERO,
        icmp: Duration::ZERO,
        other: Duration::ZERO,
    };
    let removed = dp.expire_conntrack(&zero)?;
    assert!(
        removed >= 2,
        "expected the idle flows to expire, removed {removed}"
    );
    assert!(dp.tracked_flows()?.is_empty());
    println!(
        "conntrack: {} packets passed as tracked, {removed} idle flows expired",
        counters.tracked
    );
    Ok(())
}

/// UDP: an allowed datagram gets its reply back through conntrack (the server's egress policy
/// allows nothing), later datagrams of the flow pass as tracked, and other sources or ports are
/// dropped.
#[test]
fn udp_allow_deny_established_and_reply() -> anyhow::Result<()> {
    use std::net::{SocketAddr, UdpSocket};
    if !require("udp_allow_deny_established_and_reply", NEEDS) {
        return Ok(());
    }
    let (host, a, b, s) = three_workloads("uh")?;
    // An echo server on 5353 and a sink on 5354 in the server's namespace.
    let echo = s.ns.run(|| UdpSocket::bind((s.ip, 5353)))??;
    let sink = s.ns.run(|| UdpSocket::bind((s.ip, 5354)))??;
    sink.set_read_timeout(Some(Duration::from_millis(500)))?;
    echo.set_read_timeout(Some(Duration::from_millis(200)))?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    let echoer = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        }
    });
    let (mut dp, ifindex) = policy_dataplane_on(&host, &s)?;
    let policy = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\nspec:\n  selector: app == 'server'\n  types: [Ingress, Egress]\n  ingress:\n    - {action: Allow, protocol: UDP, source: {selector: app == 'b'}, destination: {ports: [5353]}}\n    - {action: Allow, protocol: UDP, source: {selector: app == 'b'}, destination: {ports: [5355]}}\n";
    install(&mut dp, &world(policy, s.ip, a.ip, b.ip), ifindex, s.ip)?;

    let client = |ns: &NetNs| -> anyhow::Result<UdpSocket> {
        let sock = ns.run(|| UdpSocket::bind("0.0.0.0:0"))??;
        sock.set_read_timeout(Some(Duration::from_millis(700)))?;
        Ok(sock)
    };
    let echoed = |sock: &UdpSocket, payload: &[u8]| -> anyhow::Result<bool> {
        sock.send_to(payload, SocketAddr::new(s.ip, 5353))?;
        let mut buf = [0u8; 64];
        Ok(matches!(sock.recv_from(&mut buf), Ok((n, _)) if &buf[..n] == payload))
    };
    let from_b = client(&b.ns)?;
    assert!(echoed(&from_b, b"one")?, "allowed UDP and its reply");
    let tracked_before = dp.counters()?.tracked;
    assert!(echoed(&from_b, b"two")?, "the established flow goes on");
    assert!(
        dp.counters()?.tracked > tracked_before,
        "later datagrams pass as tracked"
    );
    let from_a = client(&a.ns)?;
    denied_by_program(&dp, "UDP from a", || echoed(&from_a, b"from a"))?;
    let mut buf = [0u8; 64];
    denied_by_program(&dp, "UDP to 5354", || {
        from_b.send_to(b"other port", SocketAddr::new(s.ip, 5354))?;
        Ok(sink.recv_from(&mut buf).is_ok())
    })?;
    // The same denied sources and port still work where policy allows: b to 5353 again.
    assert!(
        echoed(&from_b, b"three")?,
        "b's flow stopped after the denials"
    );
    // A datagram larger than the path MTU goes in fragments; the later ones carry no ports and
    // follow their first fragment's verdict: delivered whole where policy allows it (b), and
    // not at all where it does not (a).
    const BIG: usize = 4000;
    let big_sink = s.ns.run(|| UdpSocket::bind((s.ip, 5355)))??;
    big_sink.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut big = vec![0u8; BIG + 1];
    from_b.send_to(&[5u8; BIG], SocketAddr::new(s.ip, 5355))?;
    let (n, _) = big_sink
        .recv_from(&mut big)
        .map_err(|e| anyhow::anyhow!("the fragmented datagram from b never arrived: {e}"))?;
    assert_eq!(n, BIG, "fragmented datagram delivered whole");
    big_sink.set_read_timeout(Some(Duration::from_millis(500)))?;
    denied_by_program(&dp, "fragmented UDP from a", || {
        from_a.send_to(&[6u8; BIG], SocketAddr::new(s.ip, 5355))?;
        Ok(big_sink.recv_from(&mut big).is_ok())
    })?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = echoer.join();
    Ok(())
}

/// Fail closed at the seams: an attached interface with nothing installed drops (and a
/// program installed afterwards lets its traffic through: the positive control on the same
/// path).
#[test]
fn nothing_passes_between_attach_and_install() -> anyhow::Result<()> {
    if !require("nothing_passes_between_attach_and_install", NEEDS) {
        return Ok(());
    }
    let (host, a, b, s) = three_workloads("nh")?;
    let _listener = s.ns.tcp_server(8080)?;
    assert!(a.ns.ping(s.ip)?, "no connectivity before attaching");
    let (mut dp, ifindex) = policy_dataplane_on(&host, &s)?;
    dropped_for_lack_of_policy(&dp, "ICMP before any install", || a.ns.ping(s.ip))?;
    dropped_for_lack_of_policy(&dp, "TCP before any install", || {
        tcp_connects(&a.ns, s.ip, 8080)
    })?;
    let allow_all = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\nspec:\n  selector: app == 'server'\n  types: [Ingress, Egress]\n  ingress: [{action: Allow}]\n  egress: [{action: Allow}]\n";
    install(&mut dp, &world(allow_all, s.ip, a.ip, b.ip), ifindex, s.ip)?;
    assert!(a.ns.ping(s.ip)?, "ICMP once the policy is installed");
    assert!(
        tcp_connects(&a.ns, s.ip, 8080)?,
        "TCP once the policy is installed"
    );
    Ok(())
}

/// A map too small for a new program: the install fails and the endpoint drops, rather than
/// keeping its previous policy (which may allow what the new one denies) or passing traffic.
#[test]
fn a_full_map_leaves_the_endpoint_denying() -> anyhow::Result<()> {
    if !require("a_full_map_leaves_the_endpoint_denying", NEEDS) {
        return Ok(());
    }
    const VERDICT_ENTRIES: u32 = 64;
    let (host, a, b, s) = three_workloads("fh")?;
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions {
        map_sizes: vec![(calico_bpf_common::POLICY_VERDICTS_MAP, VERDICT_ENTRIES)],
        ..Default::default()
    })?;
    let host_if = s.host_if.clone();
    host.run(|| dp.attach(&host_if))??;
    let ifindex = host.ifindex(&s.host_if)?;

    let allow_all = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\nspec:\n  selector: app == 'server'\n  types: [Ingress, Egress]\n  ingress: [{action: Allow}]\n  egress: [{action: Allow}]\n";
    install(&mut dp, &world(allow_all, s.ip, a.ip, b.ip), ifindex, s.ip)?;
    assert!(a.ns.ping(s.ip)?, "the small program allows ICMP");

    // Every odd port from 1001 is its own verdict range: far more entries than the map holds.
    let ports: Vec<String> = (0..VERDICT_ENTRIES)
        .map(|i| (1001 + 2 * i).to_string())
        .collect();
    let too_big = format!(
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: default}}\nspec:\n  selector: app == 'server'\n  types: [Ingress, Egress]\n  ingress:\n    - {{action: Allow, protocol: ICMP}}\n    - {{action: Allow, protocol: TCP, destination: {{ports: [{}]}}}}\n  egress: [{{action: Allow}}]\n",
        ports.join(", ")
    );
    let failed = install(&mut dp, &world(&too_big, s.ip, a.ip, b.ip), ifindex, s.ip);
    let error = format!(
        "{:#}",
        failed.expect_err("the oversized program was installed")
    );
    assert!(error.contains("POLICY_VERDICTS has no room"), "{error}");
    // The new program would allow ICMP, the old one did: neither is in force.
    dropped_for_lack_of_policy(&dp, "ICMP after the failed install", || a.ns.ping(s.ip))?;

    // Room again (the small program fits): traffic flows on the same path.
    install(&mut dp, &world(allow_all, s.ip, a.ip, b.ip), ifindex, s.ip)?;
    assert!(a.ns.ping(s.ip)?, "ICMP once a program fits again");
    Ok(())
}

/// One workload's flood cannot take the conntrack table: each interface holds at most its
/// share (here 64 of 256). The server gets 2,000 new UDP flows from a while b's flow to it is
/// tracked: a holds less than its share, the rest of its flows are counted and judged one by
/// one, and b's flow stays (after policy stops allowing b, b's next datagram still passes as
/// its flow's, while a new flow from b is denied). The control: the same flood with no limit
/// holds more than that share of the table (and churns it, which is what evicts others).
#[test]
fn a_flood_from_one_workload_leaves_another_workloads_flow_alive() -> anyhow::Result<()> {
    use std::net::{SocketAddr, UdpSocket};
    if !require(
        "a_flood_from_one_workload_leaves_another_workloads_flow_alive",
        NEEDS,
    ) {
        return Ok(());
    }
    for limit in [0u32, 64] {
        let (host, a, b, s) = three_workloads("fl")?;
        let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions {
            map_sizes: vec![(calico_bpf_common::CONNTRACK_MAP, 256)],
            conntrack_per_interface: Some(limit),
            ..Default::default()
        })?;
        let host_if = s.host_if.clone();
        host.run(|| dp.attach(&host_if))??;
        let ifindex = host.ifindex(&s.host_if)?;
        let sink = s.ns.run(|| UdpSocket::bind((s.ip, 7000)))??;
        sink.set_read_timeout(Some(Duration::from_millis(700)))?;
        let server = SocketAddr::new(s.ip, 7000);
        let allow = |from: &str| {
            format!("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: server, namespace: default}}\nspec:\n  selector: app == 'server'\n  types: [Ingress]\n  ingress:\n    - {{action: Allow, protocol: UDP, source: {{selector: \"{from}\"}}, destination: {{ports: [7000]}}}}\n")
        };
        // Whether `payload` reaches the sink (other datagrams read past).
        let delivered = |sock: &UdpSocket, payload: &[u8]| -> anyhow::Result<bool> {
            sock.send_to(payload, server)?;
            let mut buf = [0u8; 64];
            while let Ok((n, _)) = sink.recv_from(&mut buf) {
                if &buf[..n] == payload {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        install(
            &mut dp,
            &world(&allow("all()"), s.ip, a.ip, b.ip),
            ifindex,
            s.ip,
        )?;
        let from_b = b.ns.run(|| UdpSocket::bind("0.0.0.0:0"))??;
        assert!(
            delivered(&from_b, b"b one")?,
            "b's first datagram (allowed)"
        );

        let flood = a.ns.run(move || -> std::io::Result<()> {
            for _ in 0..2_000 {
                UdpSocket::bind("0.0.0.0:0")?.send_to(b"flood", server)?;
            }
            Ok(())
        })?;
        flood?;
        // What the flood left in the sink's queue goes first (a full socket buffer would
        // drop b's next datagram whatever the dataplane does).
        sink.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut buf = [0u8; 64];
        while sink.recv_from(&mut buf).is_ok() {}
        sink.set_read_timeout(Some(Duration::from_millis(700)))?;
        let flows = dp.tracked_flows()?;
        let of_a = flows
            .iter()
            .filter(|f| f.addresses.0 == a.ip || f.addresses.1 == a.ip)
            .count();
        let b_tracked = flows
            .iter()
            .any(|f| f.addresses.0 == b.ip || f.addresses.1 == b.ip);
        let over = dp.counters()?.conntrack_over_limit;
        if limit == 0 {
            // The control: without a limit the flood takes (and churns) the whole table.
            assert!(of_a > 64, "control: the flood holds only {of_a} entries");
            assert_eq!(over, 0);
            continue;
        }
        assert!(of_a < 64, "a holds {of_a} entries, past its share");
        assert!(over > 1_000, "the flood's flows were not held back: {over}");
        assert!(b_tracked, "a's flood evicted b's tracked flow");
        // Policy stops allowing b: its flow goes on as tracked; a is still served, flow by
        // flow (untracked past its share).
        install(
            &mut dp,
            &world(&allow("app == 'a'"), s.ip, a.ip, b.ip),
            ifindex,
            s.ip,
        )?;
        let tracked = dp.counters()?.tracked;
        assert!(delivered(&from_b, b"b two")?, "b's tracked flow stopped");
        assert!(dp.counters()?.tracked > tracked, "…not as a tracked flow");
        let from_a = a.ns.run(|| UdpSocket::bind("0.0.0.0:0"))??;
        assert!(delivered(&from_a, b"a after")?, "a's own traffic stopped");
        // Positive control of the deny: a new flow from b is judged by the new policy.
        let new_b = b.ns.run(|| UdpSocket::bind("0.0.0.0:0"))??;
        denied_by_program(&dp, "a new flow from b", || delivered(&new_b, b"b new"))?;
    }
    Ok(())
}

/// Installs the compiled policy of endpoint `name` (address `ip`) on `ifindex`.
fn install_endpoint(
    dp: &mut PolicyDataplane,
    w: &World,
    ifindex: u32,
    name: &str,
    ip: IpAddr,
) -> anyhow::Result<()> {
    let id = EndpointId {
        namespace: Some("default".into()),
        name: name.into(),
    };
    for direction in [Direction::Ingress, Direction::Egress] {
        let hook = Hook::for_direction(direction);
        let compiled = CompiledProgram::compile(w, &w.program(&id, direction), &[ip], direction)?;
        dp.install(ifindex, hook, &compiled)?;
    }
    Ok(())
}

#[test]
fn traffic_forwarded_in_bpf_is_judged_by_the_receivers_policy() -> anyhow::Result<()> {
    if !require(
        "traffic_forwarded_in_bpf_is_judged_by_the_receivers_policy",
        NEEDS,
    ) {
        return Ok(());
    }
    let (host, a, b, s) = three_workloads("fh")?;
    let _listener = s.ns.tcp_server(8080)?;
    // Every workload is an endpoint, so traffic between them is forwarded veth to veth in
    // BPF (into the receiver's namespace, past its veth's own classifier): the receiver's
    // policy must still decide.
    let (mut dp, s_index) = policy_dataplane_on(&host, &s)?;
    let (a_if, b_if) = (a.host_if.clone(), b.host_if.clone());
    host.run(|| dp.attach(&a_if))??;
    host.run(|| dp.attach(&b_if))??;
    let (a_index, b_index) = (host.ifindex(&a.host_if)?, host.ifindex(&b.host_if)?);
    let policies = "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\nspec:\n  selector: app == 'server'\n  types: [Ingress, Egress]\n  ingress:\n    - {action: Allow, protocol: TCP, source: {selector: app == 'b'}, destination: {ports: [8080]}}\n  egress:\n    - {action: Allow}\n---\napiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: clients, namespace: default}\nspec:\n  selector: \"app in {'a', 'b'}\"\n  types: [Ingress, Egress]\n  ingress: [{action: Allow}]\n  egress: [{action: Allow}]\n";
    let w = world(policies, s.ip, a.ip, b.ip);
    install_endpoint(&mut dp, &w, s_index, "server", s.ip)?;
    install_endpoint(&mut dp, &w, a_index, "client-a", a.ip)?;
    install_endpoint(&mut dp, &w, b_index, "client-b", b.ip)?;

    let forwarded_before = dp.counters()?.forwarded;
    assert!(
        tcp_connects(&b.ns, s.ip, 8080)?,
        "TCP 8080 from b is allowed by the server's policy"
    );
    assert!(
        dp.counters()?.forwarded > forwarded_before,
        "b's connection was not forwarded in BPF"
    );
    // a's own policy allows everything out: only the server's can stop it.
    let forwarded_before = dp.counters()?.forwarded;
    denied_by_program(&dp, "TCP 8080 from a", || tcp_connects(&a.ns, s.ip, 8080))?;
    assert!(
        dp.counters()?.forwarded > forwarded_before,
        "a's SYN did not reach the receiver's policy by the BPF path"
    );
    // And the receiver's policy changes take effect on that path too.
    let open = policies.replace(
        "{selector: app == 'b'}",
        "{selector: \"app in {'a', 'b'}\"}",
    );
    install_endpoint(
        &mut dp,
        &world(&open, s.ip, a.ip, b.ip),
        s_index,
        "server",
        s.ip,
    )?;
    assert!(
        tcp_connects(&a.ns, s.ip, 8080)?,
        "TCP 8080 from a is allowed once the server's policy says so"
    );
    Ok(())
}
