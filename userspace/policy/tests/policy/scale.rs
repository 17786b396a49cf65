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
        table.push((
            n,
            compiled.peer_prefixes.len(),
            compiled.entry_count(),
            took,
        ));
    }
    println!("| rules | peer prefixes | verdict ranges | compile time (this build) |");
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

/// The endpoints one "allow from the same namespace" policy selects compile to the same peer
/// prefixes and classes, which is what lets the dataplane store one peer table for all of them
/// (instead of one per endpoint: 300 pods would otherwise write 300 × 300 entries).
#[test]
fn endpoints_a_namespace_policy_selects_alike_share_peer_prefixes() {
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
    assert!(compiled[0].peer_prefixes.len() >= 300);
    for c in &compiled[1..] {
        assert_eq!(c.peer_prefixes, compiled[0].peer_prefixes);
    }
}
