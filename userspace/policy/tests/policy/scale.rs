//! Large rule counts compile into tables whose lookups still agree with the reference, and the
//! tables (what the kernel maps hold) grow about linearly with the rules.
//!
//! What this does not show: per-packet cost. The dataplane's lookup is a fixed chain of five
//! map lookups whatever the rule count (ARCHITECTURE.md, "Policy compilation"); its cost in the
//! kernel is measured, not asserted, by `cargo xtask bench dataplane` (0 to 50,000 rules).

use std::{net::IpAddr, time::Instant};

use calico_policy::{
    evaluate, testing::deny_rules_then_allow, CompiledProgram, Direction, EndpointId, Packet, World,
};

fn tcp(src: &str, port: u16) -> Packet {
    Packet {
        src: src.parse().unwrap(),
        dst: "10.0.0.1".parse().unwrap(),
        protocol: 6,
        src_port: 40000,
        dst_port: port,
        icmp: None,
    }
}

#[test]
fn fifty_thousand_rules_compile_and_agree() {
    let server = EndpointId {
        namespace: Some("default".into()),
        name: "server".into(),
    };
    let local: IpAddr = "10.0.0.1".parse().unwrap();
    let mut table = Vec::new();
    for n in [0usize, 100, 1_000, 10_000, 50_000] {
        let w = deny_rules_then_allow(n);
        let program = w.program(&server, Direction::Ingress);
        let start = Instant::now();
        let compiled =
            CompiledProgram::compile(&w, &program, &[local], Direction::Ingress).expect("compiles");
        let took = start.elapsed();
        // Traffic that no deny rule matches is allowed by the final rule, and a denied
        // source/port pair is denied, exactly as the reference says.
        for p in [
            tcp("192.0.2.1", 80),
            tcp("10.100.0.5", 80),
            tcp("10.100.0.5", 10_005),
            tcp("10.100.0.6", 10_005),
        ] {
            assert_eq!(
                compiled.lookup(&p),
                Some(&evaluate(&w, &program, &p)),
                "{n} rules, {p:?}"
            );
        }
        if n > 5 {
            assert!(!evaluate(&w, &program, &tcp("10.100.0.5", 10_005)).allowed());
        }
        table.push((n, compiled.peer_nets.len(), compiled.entry_count(), took));
    }
    println!("| rules | peer nets | verdict ranges | compile time (this build) |");
    for (n, prefixes, entries, took) in &table {
        println!("| {n} | {prefixes} | {entries} | {took:?} |");
    }
    // Table size grows about linearly with the rules, not with their product.
    let (_, _, e10k, _) = table[3];
    let (_, _, e50k, _) = table[4];
    assert!(
        e50k < e10k * 8,
        "entries grew superlinearly: {e10k} → {e50k}"
    );
}

/// The endpoints one "allow from the same namespace" policy selects compile to the same IP set
/// (scope and members) and the same classes, which is what lets the dataplane store the set
/// once for all of them (instead of one per endpoint: 300 pods would otherwise write 300 × 300
/// entries); a cross-namespace rule names one set whatever namespace its policy is in.
#[test]
fn endpoints_a_namespace_policy_selects_alike_share_one_ip_set() {
    use calico_model::parse_documents;
    let mut text = String::from("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: same-ns, namespace: shop}\nspec:\n  selector: all()\n  types: [Ingress]\n  ingress: [{action: Allow, source: {selector: all()}}]\n");
    for i in 0..300 {
        text.push_str(&format!(
            "---\napiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: pod{i}, namespace: shop, labels: {{app: web}}}}\nspec: {{node: n, ipNetworks: ['10.1.{}.{}/32']}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let w = World::from_resources(&parse_documents(&text).unwrap()).unwrap();
    let compiled: Vec<CompiledProgram> = w
        .endpoints
        .iter()
        .take(20)
        .map(|(id, info)| {
            CompiledProgram::compile(
                &w,
                &w.program(id, Direction::Ingress),
                &info.addresses,
                Direction::Ingress,
            )
            .unwrap()
        })
        .collect();
    assert_eq!(compiled[0].peer_sets.len(), 1);
    assert_eq!(compiled[0].peer_sets[0].members.len(), 300);
    for c in &compiled[1..] {
        assert_eq!(c.peer_sets, compiled[0].peer_sets);
        assert_eq!(c.peer_nets, compiled[0].peer_nets);
        assert_eq!(c.peer_classes, compiled[0].peer_classes);
    }
    // The peer classes: members of the set, and everyone else (one of each family).
    assert_eq!(
        compiled[0].peer_classes.len(),
        3,
        "{:?}",
        compiled[0].peer_classes
    );

    // The same cross-namespace rule in two namespaces' policies: one scope.
    let cross = |ns: &str| {
        format!("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: cross, namespace: {ns}}}\nspec:\n  selector: all()\n  types: [Ingress]\n  ingress: [{{action: Allow, source: {{namespaceSelector: all(), selector: app == 'web'}}}}]\n---\napiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {{name: p, namespace: {ns}, labels: {{app: web}}}}\nspec: {{node: n, ipNetworks: ['10.2.0.{}/32']}}\n", ns.len())
    };
    let w = World::from_resources(
        &parse_documents(&format!("{}---\n{}", cross("a"), cross("bb"))).unwrap(),
    )
    .unwrap();
    let sets: Vec<_> = w
        .endpoints
        .iter()
        .map(|(id, info)| {
            CompiledProgram::compile(
                &w,
                &w.program(id, Direction::Ingress),
                &info.addresses,
                Direction::Ingress,
            )
            .unwrap()
            .peer_sets
        })
        .collect();
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0], sets[1]);
    assert_eq!(sets[0][0].members.len(), 2);
}

/// One program consults at most `MAX_PEER_SETS` distinct peer selectors (the bits of the
/// dataplane's membership mask): one more is refused whole, naming the rule, never widened.
#[test]
fn more_distinct_peer_selectors_than_the_mask_holds_are_refused() {
    use calico_model::parse_documents;
    use calico_policy::MAX_PEER_SETS;
    let program_with = |selectors: usize| {
        let mut text = String::from("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: many, namespace: shop}\nspec:\n  selector: all()\n  types: [Ingress]\n  ingress:\n");
        for i in 0..selectors {
            text.push_str(&format!(
                "  - {{action: Allow, source: {{selector: k == 'v{i}'}}}}\n"
            ));
        }
        text.push_str("---\napiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: server, namespace: shop}\nspec: {node: n, ipNetworks: ['10.1.0.1/32']}\n");
        let w = World::from_resources(&parse_documents(&text).unwrap()).unwrap();
        let (id, info) = w.endpoints.iter().next().unwrap();
        CompiledProgram::compile(
            &w,
            &w.program(id, Direction::Ingress),
            &info.addresses,
            Direction::Ingress,
        )
    };
    let fits = program_with(MAX_PEER_SETS).expect("as many selectors as the mask has bits");
    assert_eq!(fits.peer_sets.len(), MAX_PEER_SETS);
    let e = program_with(MAX_PEER_SETS + 1).unwrap_err();
    assert_eq!(
        (e.policy.as_str(), e.index),
        ("shop/many", MAX_PEER_SETS),
        "{e}"
    );
    assert!(e.to_string().contains("distinct peer selectors"), "{e}");
}
