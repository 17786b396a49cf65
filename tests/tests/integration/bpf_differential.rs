//! Differential test of the loaded eBPF program: thousands of random (policy set, packet)
//! cases run through the policy classifier with BPF_PROG_TEST_RUN and through the reference
//! evaluator; every verdict must agree.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use calico_dataplane::{Hook, LoadOptions, PolicyDataplane};
use calico_policy::{
    evaluate,
    testing::{make_packet, packet, world},
    CompiledProgram, Direction, Packet,
};
use harness::{require, Requirement};
use proptest::{prelude::*, test_runner::TestRunner};

/// Random packets judged by the reference per world, and at most how many go to the kernel.
const CANDIDATES: usize = 600;
const PER_WORLD: usize = 30;
/// Denied packets sent even from a world that allows nothing.
const MIN_DENIED: usize = 1;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_PIPE: i32 = 3;
/// BPF_PROG_TEST_RUN delivers packets as if from loopback.
pub(crate) const LOOPBACK: u32 = 1;

/// An Ethernet frame carrying `p` (checksums are not looked at by the program).
pub(crate) fn frame(p: &Packet) -> Vec<u8> {
    let mut l4 = Vec::new();
    match p.protocol {
        6 => {
            l4.extend(p.src_port.to_be_bytes());
            l4.extend(p.dst_port.to_be_bytes());
            l4.extend([0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
        }
        17 => {
            l4.extend(p.src_port.to_be_bytes());
            l4.extend(p.dst_port.to_be_bytes());
            l4.extend([0, 8, 0, 0]);
        }
        1 | 58 => {
            let (t, c) = p.icmp.unwrap_or((0, 0));
            l4.extend([t, c, 0, 0, 0x12, 0x34, 0, 1]);
        }
        _ => l4.extend([0, 0, 0x08, 0]),
    }
    let mut f = vec![0u8; 12];
    match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend([0x08, 0x00]);
            let total = (20 + l4.len()) as u16;
            f.extend([0x45, 0]);
            f.extend(total.to_be_bytes());
            f.extend([0, 0, 0, 0, 64, p.protocol, 0, 0]);
            f.extend(s.octets());
            f.extend(d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend([0x86, 0xdd]);
            f.extend([0x60, 0, 0, 0]);
            f.extend((l4.len() as u16).to_be_bytes());
            f.extend([p.protocol, 64]);
            f.extend(s.octets());
            f.extend(d.octets());
        }
        _ => unreachable!("make_packet keeps one family"),
    }
    f.extend(l4);
    f
}

#[test]
fn loaded_program_agrees_with_the_reference() -> anyhow::Result<()> {
    if !require(
        "loaded_program_agrees_with_the_reference",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let cases = AtomicUsize::new(0);
    let allowed = AtomicUsize::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 1_400,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let strategy = (
        world(),
        0usize..4,
        any::<bool>(),
        prop::collection::vec(packet(), CANDIDATES),
    );
    let dp = std::cell::RefCell::new(&mut dp);
    let result = runner.run(&strategy, |(w, endpoint, ingress, candidates)| {
        let mut dp = dp.borrow_mut();
        let id = w.endpoints.keys().nth(endpoint).unwrap().clone();
        let addresses = w.endpoints[&id].addresses.clone();
        let direction = if ingress {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        let hook = Hook::for_direction(direction);
        let program = w.program(&id, direction);
        let compiled = CompiledProgram::compile(&w, &program, &addresses, direction)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        dp.install(LOOPBACK, hook, &compiled)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        // Random packets are mostly denied (few match an Allow rule), which would leave the
        // allow paths of the program barely tested. The reference is cheap, so judge many
        // candidates with it and send the kernel a balanced sample: every allowed one (up to
        // half the batch) and as many denied ones.
        let judged: Vec<(Packet, bool)> = candidates
            .into_iter()
            .filter_map(|numbers| make_packet(&addresses, ingress, numbers))
            .map(|p| {
                let allowed = evaluate(&w, &program, &p).allowed();
                (p, allowed)
            })
            .collect();
        let allowed_sample: Vec<&Packet> = judged
            .iter()
            .filter(|(_, a)| *a)
            .map(|(p, _)| p)
            .take(PER_WORLD / 2)
            .collect();
        let denied_sample = judged
            .iter()
            .filter(|(_, a)| !*a)
            .map(|(p, _)| p)
            .take(allowed_sample.len().max(MIN_DENIED));
        for p in allowed_sample.iter().copied().chain(denied_sample) {
            // ICMPv6 neighbour discovery is always passed by design; the generator avoids it.
            dp.clear_conntrack()
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let code = dp
                .test_run(hook, &frame(p))
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let reference = evaluate(&w, &program, p);
            let expected = if reference.allowed() {
                TC_ACT_PIPE
            } else {
                TC_ACT_SHOT
            };
            prop_assert_eq!(code, expected, "packet {:?}: reference {:?}", p, reference);
            cases.fetch_add(1, Ordering::Relaxed);
            if reference.allowed() {
                allowed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (n, a) = (
        cases.load(Ordering::Relaxed),
        allowed.load(Ordering::Relaxed),
    );
    assert!(n > 3_000, "too few cases ran: {n} ({a} allowed)");
    assert!(
        3 * a >= n && a < n,
        "at least a third of the cases must be allowed, and some denied: {a} allowed of {n}"
    );
    println!("eBPF differential: {n} cases through BPF_PROG_TEST_RUN ({a} allowed, {} denied), 0 disagreements", n - a);
    Ok(())
}

#[test]
fn fifty_thousand_rules_load_and_decide_correctly() -> anyhow::Result<()> {
    if !require(
        "fifty_thousand_rules_load_and_decide_correctly",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let w = calico_policy::testing::deny_rules_then_allow(50_000);
    let id = calico_policy::EndpointId {
        namespace: Some("default".into()),
        name: "server".into(),
    };
    let program = w.program(&id, Direction::Ingress);
    let start = std::time::Instant::now();
    let compiled =
        CompiledProgram::compile(&w, &program, &["10.0.0.1".parse()?], Direction::Ingress)?;
    let compiled_in = start.elapsed();
    let start = std::time::Instant::now();
    dp.install(LOOPBACK, Hook::Egress, &compiled)?;
    let installed_in = start.elapsed();
    let tcp = |src: &str, port: u16| Packet {
        src: src.parse().unwrap(),
        dst: "10.0.0.1".parse().unwrap(),
        protocol: 6,
        src_port: 40_000,
        dst_port: port,
        icmp: None,
    };
    for (p, allowed) in [
        (tcp("192.0.2.1", 80), true),
        (tcp("10.100.0.5", 10_005), false),
        (tcp("10.100.0.5", 10_006), true),
        (tcp("10.100.195.79", 59_999), false),
    ] {
        assert_eq!(
            evaluate(&w, &program, &p).allowed(),
            allowed,
            "reference for {p:?}"
        );
        dp.clear_conntrack()?;
        let code = dp.test_run(Hook::Egress, &frame(&p))?;
        assert_eq!(
            code,
            if allowed { TC_ACT_PIPE } else { TC_ACT_SHOT },
            "{p:?}"
        );
    }
    println!(
        "50,000 rules: compiled in {compiled_in:?} to {} ranges, written to the maps in {installed_in:?}",
        compiled.entry_count()
    );
    Ok(())
}

/// Programs with the same rule nets read one shared nets table (and the same classes one
/// class table): installing the same program for a second endpoint writes no entries there, removing one endpoint keeps the other deciding
/// correctly, and the last one out takes the table with it.
#[test]
fn identical_nets_tables_are_stored_once() -> anyhow::Result<()> {
    if !require(
        "identical_nets_tables_are_stored_once",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    const OTHER_ENDPOINT: u32 = 999_999;
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let w = calico_policy::testing::deny_rules_then_allow(100);
    let id = w.endpoints.keys().next().unwrap().clone();
    let program = w.program(&id, Direction::Ingress);
    let compiled =
        CompiledProgram::compile(&w, &program, &["10.0.0.1".parse()?], Direction::Ingress)?;
    let peers = |dp: &PolicyDataplane| entries(dp, calico_bpf_common::POLICY_NETS_MAP);
    dp.install(LOOPBACK, Hook::Egress, &compiled)?;
    let one = peers(&dp);
    assert_eq!(one, compiled.peer_nets.len());
    assert!(one > 100, "{one}");
    let classes = entries(&dp, calico_bpf_common::POLICY_PEER_CLASSES_MAP);
    assert_eq!(classes, compiled.peer_classes.len());
    dp.install(OTHER_ENDPOINT, Hook::Egress, &compiled)?;
    assert_eq!(peers(&dp), one, "the second endpoint copied the nets table");
    assert_eq!(
        entries(&dp, calico_bpf_common::POLICY_PEER_CLASSES_MAP),
        classes,
        "the second endpoint copied the class table"
    );

    dp.remove(OTHER_ENDPOINT, Hook::Egress)?;
    assert_eq!(
        peers(&dp),
        one,
        "removing one endpoint took the shared table"
    );
    let packet = |src: &str| Packet {
        src: src.parse().unwrap(),
        dst: "10.0.0.1".parse().unwrap(),
        protocol: 6,
        src_port: 40000,
        dst_port: 10_005,
        icmp: None,
    };
    // 10.100.0.5 → 10,005 is denied by rule 5; 192.0.2.1 falls to the final allow.
    dp.clear_conntrack()?;
    assert_eq!(
        dp.test_run(Hook::Egress, &frame(&packet("10.100.0.5")))?,
        TC_ACT_SHOT
    );
    dp.clear_conntrack()?;
    assert_eq!(
        dp.test_run(Hook::Egress, &frame(&packet("192.0.2.1")))?,
        TC_ACT_PIPE
    );

    dp.remove(LOOPBACK, Hook::Egress)?;
    assert_eq!(peers(&dp), 0, "the last user left the table behind");
    Ok(())
}

/// A remote pod joining and leaving an IP set changes one set entry in place: the program
/// (and every other table) stays, and the decisions follow at once.
#[test]
fn an_ip_set_member_change_updates_the_set_in_place() -> anyhow::Result<()> {
    if !require(
        "an_ip_set_member_change_updates_the_set_in_place",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let world = |trusted: &[&str]| -> anyhow::Result<calico_policy::World> {
        let mut text = String::from("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  selector: app == 'server'\n  types: [Ingress]\n  ingress:\n  - {action: Allow, protocol: TCP, source: {selector: trust == 'yes'}}\n---\napiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: server, namespace: shop, labels: {app: server}}\nspec: {node: n, ipNetworks: ['10.0.0.1/32']}\n");
        for i in 2..=9 {
            let trust = if trusted.contains(&format!("10.0.0.{i}").as_str()) {
                "yes"
            } else {
                "no"
            };
            text.push_str(&format!("---\napiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: c{i}, namespace: shop, labels: {{trust: '{trust}'}}}}\nspec: {{node: other, ipNetworks: ['10.0.0.{i}/32']}}\n"));
        }
        calico_policy::World::from_resources(&calico_model::parse_documents(&text)?)
            .map_err(anyhow::Error::msg)
    };
    let server = calico_policy::EndpointId {
        namespace: Some("shop".into()),
        name: "server".into(),
    };
    let install = |dp: &mut PolicyDataplane, w: &calico_policy::World| -> anyhow::Result<u32> {
        let program = w.program(&server, Direction::Ingress);
        let compiled =
            CompiledProgram::compile(w, &program, &["10.0.0.1".parse()?], Direction::Ingress)?;
        Ok(dp.install(LOOPBACK, Hook::Egress, &compiled)?)
    };
    let peers = |dp: &PolicyDataplane| entries(dp, calico_bpf_common::POLICY_IP_SETS_MAP);
    let verdict = |dp: &mut PolicyDataplane, src: &str| -> anyhow::Result<i32> {
        dp.clear_conntrack()?;
        Ok(dp.test_run(
            Hook::Egress,
            &frame(&Packet {
                src: src.parse()?,
                dst: "10.0.0.1".parse()?,
                protocol: 6,
                src_port: 40000,
                dst_port: 80,
                icmp: None,
            }),
        )?)
    };
    let first = install(&mut dp, &world(&["10.0.0.2"])?)?;
    let before = peers(&dp);
    assert_eq!(
        verdict(&mut dp, "10.0.0.2")?,
        TC_ACT_PIPE,
        "trusted pod allowed"
    );
    assert_eq!(
        verdict(&mut dp, "10.0.0.3")?,
        TC_ACT_SHOT,
        "untrusted pod denied"
    );

    // 10.0.0.3 joins the set: same program, one entry more, allowed at once.
    let joined = install(&mut dp, &world(&["10.0.0.2", "10.0.0.3"])?)?;
    assert_eq!(joined, first, "a member change wrote a whole new program");
    assert_eq!(peers(&dp), before + 1);
    assert_eq!(
        verdict(&mut dp, "10.0.0.3")?,
        TC_ACT_PIPE,
        "the new member is allowed"
    );
    assert_eq!(
        verdict(&mut dp, "10.0.0.4")?,
        TC_ACT_SHOT,
        "others still denied"
    );

    // And leaves again.
    let left = install(&mut dp, &world(&["10.0.0.2"])?)?;
    assert_eq!(left, first);
    assert_eq!(peers(&dp), before);
    assert_eq!(
        verdict(&mut dp, "10.0.0.3")?,
        TC_ACT_SHOT,
        "the member that left is denied"
    );
    assert_eq!(
        verdict(&mut dp, "10.0.0.2")?,
        TC_ACT_PIPE,
        "the remaining member still allowed"
    );

    // A change that is more than membership (a new rule) takes the full path.
    dp.remove(LOOPBACK, Hook::Egress)?;
    assert_eq!(peers(&dp), 0);
    Ok(())
}

/// A replaced program's entries stay (unreachable) until `release_retired`, which the agent
/// runs once a batch of updates is in: the batch's switches wait for no deletes. Then they go,
/// counters included.
#[test]
fn replaced_programs_are_deleted_after_the_batch() -> anyhow::Result<()> {
    if !require(
        "replaced_programs_are_deleted_after_the_batch",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let compiled = |rules: usize| -> anyhow::Result<CompiledProgram> {
        let w = calico_policy::testing::deny_rules_then_allow(rules);
        let id = w.endpoints.keys().next().unwrap().clone();
        Ok(CompiledProgram::compile(
            &w,
            &w.program(&id, Direction::Ingress),
            &["10.0.0.1".parse()?],
            Direction::Ingress,
        )?)
    };
    let verdicts = |dp: &PolicyDataplane| entries(dp, calico_bpf_common::POLICY_VERDICTS_MAP);
    let packet = Packet {
        src: "192.0.2.1".parse()?,
        dst: "10.0.0.1".parse()?,
        protocol: 6,
        src_port: 40000,
        dst_port: 80,
        icmp: None,
    };
    let first = compiled(100)?;
    dp.install(LOOPBACK, Hook::Egress, &first)?;
    dp.test_run(Hook::Egress, &frame(&packet))?;
    let counted = |dp: &PolicyDataplane| -> anyhow::Result<u64> {
        Ok(dp.rule_counters()?.iter().map(|c| c.packets).sum())
    };
    assert_eq!(counted(&dp)?, 1, "the first program counted the packet");
    let one = verdicts(&dp);
    let second = compiled(50)?;
    dp.install(LOOPBACK, Hook::Egress, &second)?;
    assert!(
        verdicts(&dp) > one,
        "the replaced program's entries went before the batch ended"
    );
    dp.clear_conntrack()?;
    assert_eq!(
        dp.test_run(Hook::Egress, &frame(&packet))?,
        TC_ACT_PIPE,
        "the new program decides at once"
    );
    assert_eq!(dp.release_retired(), 1);
    let mut only_second = PolicyDataplane::load(&LoadOptions::default())?.0;
    only_second.install(LOOPBACK, Hook::Egress, &second)?;
    assert_eq!(
        verdicts(&dp),
        verdicts(&only_second),
        "the replaced program's entries stayed"
    );
    assert_eq!(counted(&dp)?, 1, "only the new program's counter is left");
    assert_eq!(dp.release_retired(), 0);
    Ok(())
}

/// Entries the dataplane holds in `map`.
fn entries(dp: &PolicyDataplane, map: &str) -> usize {
    dp.occupancy()
        .into_iter()
        .find(|(m, _)| *m == map)
        .map_or(0, |(_, n)| n)
}

/// An IP set is stored once however many programs consult it: two endpoints whose programs
/// differ (their own addresses, their other rules) but name the same selector share its
/// members; each decides by it; a member change written for one is seen by both; the set goes
/// with its last user.
#[test]
fn an_ip_set_is_stored_once_for_every_program_that_names_it() -> anyhow::Result<()> {
    if !require(
        "an_ip_set_is_stored_once_for_every_program_that_names_it",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    const SECOND: u32 = 999_998;
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    // Two servers in different namespaces; each namespace's policy allows TCP from the
    // cross-namespace set `role == 'client'` (one scope), the second also UDP from anyone.
    let world = |clients: usize| -> anyhow::Result<calico_policy::World> {
        let mut text = String::new();
        for (ns, extra) in [("a", ""), ("b", "\n  - {action: Allow, protocol: UDP}")] {
            text.push_str(&format!("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: {ns}}}\nspec:\n  selector: app == 'server'\n  types: [Ingress]\n  ingress:\n  - {{action: Allow, protocol: TCP, source: {{namespaceSelector: all(), selector: role == 'client'}}}}{extra}\n---\napiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: server, namespace: {ns}, labels: {{app: server}}}}\nspec: {{node: n, ipNetworks: ['10.0.{}.1/32']}}\n---\n", ns.len()));
        }
        for i in 0..clients {
            text.push_str(&format!("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: c{i}, namespace: c, labels: {{role: client}}}}\nspec: {{node: other, ipNetworks: ['10.9.{}.{}/32']}}\n---\n", i / 200, i % 200 + 1));
        }
        text.push_str("apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: stranger, namespace: c}\nspec: {node: other, ipNetworks: ['10.8.0.1/32']}\n");
        calico_policy::World::from_resources(&calico_model::parse_documents(&text)?)
            .map_err(anyhow::Error::msg)
    };
    let server = |ns: &str| calico_policy::EndpointId {
        namespace: Some(ns.into()),
        name: "server".into(),
    };
    let compile = |w: &calico_policy::World, ns: &str| -> anyhow::Result<CompiledProgram> {
        let id = server(ns);
        let addresses = w.endpoints[&id].addresses.clone();
        Ok(CompiledProgram::compile(
            w,
            &w.program(&id, Direction::Ingress),
            &addresses,
            Direction::Ingress,
        )?)
    };
    let verdict = |dp: &mut PolicyDataplane,
                   ifindex_hook: Hook,
                   src: &str,
                   dst: &str,
                   protocol: u8|
     -> anyhow::Result<i32> {
        dp.clear_conntrack()?;
        Ok(dp.test_run(
            ifindex_hook,
            &frame(&Packet {
                src: src.parse()?,
                dst: dst.parse()?,
                protocol,
                src_port: 40000,
                dst_port: 80,
                icmp: None,
            }),
        )?)
    };
    let sets = |dp: &PolicyDataplane| entries(dp, calico_bpf_common::POLICY_IP_SETS_MAP);

    let w = world(300)?;
    let (a, b) = (compile(&w, "a")?, compile(&w, "b")?);
    assert_ne!(a.verdicts, b.verdicts, "the two programs differ");
    assert_eq!(a.peer_sets, b.peer_sets, "one scope, one set");
    dp.install(LOOPBACK, Hook::Egress, &a)?;
    assert_eq!(sets(&dp), 300);
    dp.install(SECOND, Hook::Egress, &b)?;
    assert_eq!(sets(&dp), 300, "the second program copied the set");
    // The first program decides by the shared set (test runs use the loopback interface).
    assert_eq!(
        verdict(&mut dp, Hook::Egress, "10.9.0.7", "10.0.1.1", 6)?,
        TC_ACT_PIPE,
        "a client is allowed"
    );
    assert_eq!(
        verdict(&mut dp, Hook::Egress, "10.8.0.1", "10.0.1.1", 6)?,
        TC_ACT_SHOT,
        "a stranger is denied"
    );

    // The set shrinks through the second endpoint's install; the first reads the new members.
    let w = world(100)?;
    dp.install(SECOND, Hook::Egress, &compile(&w, "b")?)?;
    assert_eq!(sets(&dp), 100);
    assert_eq!(
        verdict(&mut dp, Hook::Egress, "10.9.0.7", "10.0.1.1", 6)?,
        TC_ACT_PIPE,
        "still a client"
    );
    assert_eq!(
        verdict(&mut dp, Hook::Egress, "10.9.1.7", "10.0.1.1", 6)?,
        TC_ACT_SHOT,
        "no longer a client: denied"
    );

    dp.remove(LOOPBACK, Hook::Egress)?;
    assert_eq!(
        sets(&dp),
        100,
        "the set went while the second endpoint still reads it"
    );
    dp.remove(SECOND, Hook::Egress)?;
    assert_eq!(sets(&dp), 0, "the last user left the set behind");
    Ok(())
}

/// IPv6 neighbour discovery passes only as far as a workload and its host need it: from the
/// workload router solicitations and neighbour solicitations/advertisements, to it router and
/// neighbour advertisements and neighbour solicitations. A router advertisement or redirect a
/// workload sends is dropped (and counted as denied); no policy is needed for the rest, which
/// pass on the same hook beside it.
#[test]
fn neighbour_discovery_passes_only_what_the_host_needs() -> anyhow::Result<()> {
    if !require(
        "neighbour_discovery_passes_only_what_the_host_needs",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let nd = |icmp_type: u8| Packet {
        src: "fe80::1".parse().unwrap(),
        dst: "ff02::1".parse().unwrap(),
        protocol: 58,
        src_port: 0,
        dst_port: 0,
        icmp: Some((icmp_type, 0)),
    };
    // (hook, ICMPv6 type, passes): Ingress sees what the workload sends.
    for (hook, icmp_type, passes) in [
        (Hook::Ingress, 133, true),
        (Hook::Ingress, 134, false),
        (Hook::Ingress, 135, true),
        (Hook::Ingress, 136, true),
        (Hook::Ingress, 137, false),
        (Hook::Egress, 133, false),
        (Hook::Egress, 134, true),
        (Hook::Egress, 135, true),
        (Hook::Egress, 136, true),
        (Hook::Egress, 137, false),
    ] {
        let denied = dp.counters()?.denied;
        let code = dp.test_run(hook, &frame(&nd(icmp_type)))?;
        assert_eq!(
            code,
            if passes { TC_ACT_PIPE } else { TC_ACT_SHOT },
            "ICMPv6 type {icmp_type} at {hook:?}"
        );
        assert_eq!(
            dp.counters()?.denied - denied,
            u64::from(!passes),
            "denied counter for ICMPv6 type {icmp_type} at {hook:?}"
        );
    }
    Ok(())
}

/// The compiled ingress policy of the one endpoint among `docs`.
fn ingress_of_the_endpoint(docs: &[calico_model::Resource]) -> anyhow::Result<CompiledProgram> {
    let w = calico_policy::World::from_resources(docs).map_err(anyhow::Error::msg)?;
    let id = w.endpoints.keys().next().expect("one endpoint").clone();
    let addresses = w.endpoints[&id].addresses.clone();
    let program = w.program(&id, Direction::Ingress);
    Ok(CompiledProgram::compile(
        &w,
        &program,
        &addresses,
        Direction::Ingress,
    )?)
}

/// A fragmented datagram (IPv4 and IPv6): its later fragments carry no ports, and follow the
/// verdict its first fragment got at the same hook. A datagram to an allowed port passes
/// whole; one to a denied port is dropped whole; a later fragment whose first was never seen
/// is dropped (fail closed).
#[test]
fn later_fragments_follow_their_first_fragment() -> anyhow::Result<()> {
    if !require(
        "later_fragments_follow_their_first_fragment",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let docs = calico_model::parse_documents(
        "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: dns, namespace: default, labels: {app: dns}}
spec: {node: n1, ipNetworks: [10.0.0.1/32, 'fd00::1/128']}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: dns-only}
spec:
  selector: app == 'dns'
  ingress: [{action: Allow, protocol: UDP, destination: {ports: [53]}}]
",
    )?;
    dp.install(LOOPBACK, Hook::Egress, &ingress_of_the_endpoint(&docs)?)?;

    let udp = |src: &str, dst: &str, port: u16| Packet {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol: 17,
        src_port: 40_000,
        dst_port: port,
        icmp: None,
    };
    // A fragment of `p`'s datagram `id`: the first (with the UDP header) or a later one.
    let fragment = |p: &Packet, id: u32, first: bool| -> Vec<u8> {
        let mut f = frame(p);
        match p.src {
            IpAddr::V4(_) => {
                f[18..20].copy_from_slice(&(id as u16).to_be_bytes());
                let flags: u16 = if first { 0x2000 } else { 185 };
                f[20..22].copy_from_slice(&flags.to_be_bytes());
            }
            IpAddr::V6(_) => {
                let len = u16::from_be_bytes([f[18], f[19]]) + 8;
                f[18..20].copy_from_slice(&len.to_be_bytes());
                f[20] = 44;
                let offset: u16 = if first { 1 } else { 185 << 3 };
                let mut header = vec![17, 0];
                header.extend(offset.to_be_bytes());
                header.extend(id.to_be_bytes());
                f.splice(54..54, header);
            }
        }
        f
    };
    for (src, dst) in [("192.0.2.7", "10.0.0.1"), ("2001:db8::7", "fd00::1")] {
        dp.clear_conntrack()?;
        let allowed = udp(src, dst, 53);
        let denied = udp(src, dst, 54);
        let cases = [
            (
                fragment(&allowed, 0x1234, true),
                TC_ACT_PIPE,
                "first fragment to 53",
            ),
            (
                fragment(&allowed, 0x1234, false),
                TC_ACT_PIPE,
                "its later fragment",
            ),
            (
                fragment(&allowed, 0x7777, false),
                TC_ACT_SHOT,
                "a later fragment never begun",
            ),
            (
                fragment(&denied, 0x5555, true),
                TC_ACT_SHOT,
                "first fragment to 54",
            ),
            (
                fragment(&denied, 0x5555, false),
                TC_ACT_SHOT,
                "its later fragment",
            ),
        ];
        for (frame, expected, what) in cases {
            assert_eq!(
                dp.test_run(Hook::Egress, &frame)?,
                expected,
                "{src}: {what}"
            );
        }
    }
    Ok(())
}

/// A SYN is judged by policy even when conntrack has an entry for its ports: after a policy
/// change that denies the flow, the established connection's packets still pass (tracked)
/// but a new SYN on the same ports is dropped; while policy allows, a SYN passes.
#[test]
fn a_syn_on_a_tracked_flow_is_judged_by_policy() -> anyhow::Result<()> {
    if !require(
        "a_syn_on_a_tracked_flow_is_judged_by_policy",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let policy = |action: &str| -> anyhow::Result<CompiledProgram> {
        let docs = calico_model::parse_documents(&format!(
            "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {{name: web, namespace: default, labels: {{app: web}}}}
spec: {{node: n1, ipNetworks: [10.0.0.1/32]}}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {{name: web}}
spec:
  selector: app == 'web'
  ingress: [{{action: {action}, protocol: TCP, destination: {{ports: [80]}}}}]
"
        ))?;
        ingress_of_the_endpoint(&docs)
    };
    let p = Packet {
        src: "192.0.2.1".parse().unwrap(),
        dst: "10.0.0.1".parse().unwrap(),
        protocol: 6,
        src_port: 40_000,
        dst_port: 80,
        icmp: None,
    };
    let syn = frame(&p);
    let mut ack = syn.clone();
    ack[14 + 20 + 13] = 0x10;
    dp.clear_conntrack()?;
    dp.install(LOOPBACK, Hook::Egress, &policy("Allow")?)?;
    assert_eq!(dp.test_run(Hook::Egress, &syn)?, TC_ACT_PIPE, "allowed SYN");
    assert_eq!(
        dp.test_run(Hook::Egress, &syn)?,
        TC_ACT_PIPE,
        "its retransmission"
    );
    dp.install(LOOPBACK, Hook::Egress, &policy("Deny")?)?;
    let tracked = dp.counters()?.tracked;
    assert_eq!(
        dp.test_run(Hook::Egress, &ack)?,
        TC_ACT_PIPE,
        "the established flow goes on"
    );
    assert!(dp.counters()?.tracked > tracked, "…as a tracked flow");
    let denied = dp.counters()?.denied;
    assert_eq!(
        dp.test_run(Hook::Egress, &syn)?,
        TC_ACT_SHOT,
        "a new SYN on the same ports"
    );
    assert!(dp.counters()?.denied > denied, "…denied by policy");
    assert_eq!(
        dp.test_run(Hook::Egress, &ack)?,
        TC_ACT_PIPE,
        "and the flow it did not start goes on"
    );
    Ok(())
}

/// Conntrack follows TCP: an allowed SYN opens a flow in the SYN-sent state, the other side's
/// answer makes it established, a reset marks it (its later packets still pass as the flow's)
/// and expiry then applies the reset timeout to it alone; an established flow beside it stays.
#[test]
fn conntrack_follows_tcp_states() -> anyhow::Result<()> {
    if !require(
        "conntrack_follows_tcp_states",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let docs = calico_model::parse_documents(
        "apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: web, namespace: default, labels: {app: web}}
spec: {node: n1, ipNetworks: [10.0.0.1/32]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: web}
spec:
  selector: app == 'web'
  types: [Ingress, Egress]
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]
",
    )?;
    let w = calico_policy::World::from_resources(&docs).map_err(anyhow::Error::msg)?;
    let id = w.endpoints.keys().next().unwrap().clone();
    for direction in [Direction::Ingress, Direction::Egress] {
        let hook = Hook::for_direction(direction);
        let compiled = CompiledProgram::compile(
            &w,
            &w.program(&id, direction),
            &["10.0.0.1".parse()?],
            direction,
        )?;
        dp.install(LOOPBACK, hook, &compiled)?;
    }
    dp.clear_conntrack()?;
    let tcp = |client_port: u16, flags: u8, reply: bool| {
        let p = Packet {
            src: "192.0.2.1".parse().unwrap(),
            dst: "10.0.0.1".parse().unwrap(),
            protocol: 6,
            src_port: client_port,
            dst_port: 80,
            icmp: None,
        };
        let p = if reply {
            Packet {
                src: p.dst,
                dst: p.src,
                src_port: p.dst_port,
                dst_port: p.src_port,
                ..p
            }
        } else {
            p
        };
        let mut f = frame(&p);
        f[14 + 20 + 13] = flags;
        f
    };
    let flow = |dp: &PolicyDataplane, port: u16| -> anyhow::Result<calico_dataplane::TrackedFlow> {
        dp.tracked_flows()?
            .into_iter()
            .find(|f| f.ports.0 == port || f.ports.1 == port)
            .ok_or_else(|| anyhow::anyhow!("no flow for client port {port}"))
    };
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    const RST: u8 = 0x04;
    // Two connections: 40001 gets reset, 40002 stays established.
    for port in [40_001, 40_002] {
        assert_eq!(
            dp.test_run(Hook::Egress, &tcp(port, SYN, false))?,
            TC_ACT_PIPE
        );
        let opened = flow(&dp, port)?;
        assert!(!opened.answered && !opened.reset, "{opened:?}");
        // The SYN-ACK comes back from the workload (its egress hook: no rule allows it, the
        // flow does).
        assert_eq!(
            dp.test_run(Hook::Ingress, &tcp(port, SYN | ACK, true))?,
            TC_ACT_PIPE,
            "the answer passes as the flow's"
        );
        assert!(flow(&dp, port)?.answered, "the answer was not noted");
    }
    assert_eq!(
        dp.test_run(Hook::Egress, &tcp(40_001, RST | ACK, false))?,
        TC_ACT_PIPE
    );
    let reset = flow(&dp, 40_001)?;
    assert!(reset.reset && reset.answered, "{reset:?}");
    let tracked = dp.counters()?.tracked;
    assert_eq!(
        dp.test_run(Hook::Ingress, &tcp(40_001, ACK, true))?,
        TC_ACT_PIPE,
        "a packet after the reset still belongs to the flow"
    );
    assert!(dp.counters()?.tracked > tracked);
    // A reply with no flow at all is judged by the workload's egress policy: denied.
    assert_eq!(
        dp.test_run(Hook::Ingress, &tcp(40_003, ACK, true))?,
        TC_ACT_SHOT,
        "an answer to nothing"
    );
    let long = std::time::Duration::from_secs(3600);
    let timeouts = calico_dataplane::ConntrackTimeouts {
        tcp_reset: std::time::Duration::ZERO,
        tcp_syn_sent: long,
        tcp_established: long,
        tcp_fins_seen: long,
        udp: long,
        icmp: long,
        other: long,
    };
    // The reset flow idles past a zero timeout as soon as the clock moves on.
    let before = std::time::Instant::now();
    while before.elapsed() < std::time::Duration::from_millis(2) {
        std::hint::spin_loop();
    }
    assert_eq!(dp.expire_conntrack(&timeouts)?, 1);
    assert!(flow(&dp, 40_001).is_err(), "the reset flow stayed");
    assert!(flow(&dp, 40_002)?.answered, "the established flow went");
    Ok(())
}

/// Verdict events nobody drains in time are counted as lost, not dropped silently: first a
/// few, all delivered and none lost; then more than the ring holds.
#[test]
fn lost_verdict_events_are_counted() -> anyhow::Result<()> {
    if !require(
        "lost_verdict_events_are_counted",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let (mut dp, _logger) = PolicyDataplane::load(&LoadOptions::default())?;
    let w = calico_policy::testing::deny_rules_then_allow(0);
    // An empty program: every packet is denied by policy, each one an event.
    let compiled = CompiledProgram::compile(
        &w,
        &calico_policy::PolicyProgram::default(),
        &["10.0.0.1".parse()?],
        Direction::Ingress,
    )?;
    dp.install(LOOPBACK, Hook::Egress, &compiled)?;
    let denied = frame(&Packet {
        src: "192.0.2.1".parse()?,
        dst: "10.0.0.1".parse()?,
        protocol: 17,
        src_port: 5000,
        dst_port: 53,
        icmp: None,
    });
    let _ = dp.drain_events(usize::MAX);
    assert_eq!(dp.test_run_times(Hook::Egress, &denied, 100)?, TC_ACT_SHOT);
    assert_eq!(dp.drain_events(usize::MAX).len(), 100);
    assert_eq!(dp.counters()?.events_lost, 0);
    // The ring holds 1 MiB: 20,000 events of 64 bytes (plus headers) do not fit.
    dp.test_run_times(Hook::Egress, &denied, 20_000)?;
    let lost = dp.counters()?.events_lost;
    let kept = dp.drain_events(usize::MAX).len() as u64;
    assert!(lost > 0, "nothing counted as lost ({kept} kept)");
    assert_eq!(kept + lost, 20_000, "events neither kept nor counted");
    Ok(())
}
