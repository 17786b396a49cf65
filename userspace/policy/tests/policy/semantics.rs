//! Calico's policy semantics, case by case: (resources, endpoint, direction, packet) → verdict.

use std::net::IpAddr;

use calico_model::parse_documents;
use calico_policy::{evaluate, Direction, EndpointId, Packet, RuleRef, Verdict, World};

const ENDPOINTS: &str = "
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {node: n1, ipNetworks: [10.0.0.1/32], profiles: [net1]}
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {node: n1, ipNetworks: [10.0.0.2/32, 'fd00::2/128'], profiles: [net1]}
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: web-2, namespace: blog, labels: {app: web}}
spec: {node: n1, ipNetworks: [10.0.1.1/32]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkSet
metadata: {name: office, labels: {zone: office}}
spec: {nets: [192.0.2.0/24]}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: net1}
spec:
  labelsToApply: {net1: ''}
  ingress: [{action: Allow, source: {selector: has(net1)}}]
  egress: [{action: Allow}]
";

fn world(extra: &str) -> World {
    let mut all = parse_documents(ENDPOINTS).unwrap();
    all.extend(parse_documents(extra).unwrap());
    let mut w = World::from_resources(&all).unwrap();
    w.namespaces
        .insert("shop".into(), [("team".to_owned(), "a".to_owned())].into());
    w.namespaces
        .insert("blog".into(), [("team".to_owned(), "b".to_owned())].into());
    w
}

fn ep(ns: &str, name: &str) -> EndpointId {
    EndpointId {
        namespace: Some(ns.into()),
        name: name.into(),
    }
}

fn tcp(src: &str, dst: &str, dport: u16) -> Packet {
    Packet {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol: 6,
        src_port: 40000,
        dst_port: dport,
        icmp: None,
    }
}

fn icmp(src: &str, dst: &str, t: u8, c: u8) -> Packet {
    let proto = if src.contains(':') { 58 } else { 1 };
    Packet {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol: proto,
        src_port: 0,
        dst_port: 0,
        icmp: Some((t, c)),
    }
}

fn verdict(w: &World, e: &EndpointId, d: Direction, p: Packet) -> Verdict {
    evaluate(w, &w.program(e, d), &p)
}

fn rule(tier: Option<&str>, policy: &str, index: usize) -> RuleRef {
    RuleRef::Rule {
        tier: tier.map(String::from),
        policy: policy.into(),
        index,
    }
}

#[test]
fn profiles_apply_when_no_policy_does() {
    let w = world("");
    let db = ep("shop", "db-1");
    // web-1 carries the net1 profile's label: allowed by the profile.
    assert_eq!(
        verdict(
            &w,
            &db,
            Direction::Ingress,
            tcp("10.0.0.1", "10.0.0.2", 5432)
        ),
        Verdict::Allow(rule(None, "net1", 0))
    );
    // web-2 has no profile, so no net1 label: no profile rule matches → drop.
    assert_eq!(
        verdict(
            &w,
            &db,
            Direction::Ingress,
            tcp("10.0.1.1", "10.0.0.2", 5432)
        ),
        Verdict::Deny(RuleRef::NoMatch)
    );
    // An endpoint with nothing applied at all drops.
    assert_eq!(
        verdict(
            &w,
            &ep("blog", "web-2"),
            Direction::Egress,
            tcp("10.0.1.1", "10.0.0.2", 80)
        ),
        Verdict::Deny(RuleRef::NoMatch)
    );
}

#[test]
fn a_tier_that_selects_but_does_not_decide_drops() {
    let w = world("
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: app == 'db'
  ingress: [{action: Allow, protocol: TCP, source: {selector: app == 'web'}, destination: {ports: [5432]}}]
");
    let db = ep("shop", "db-1");
    assert_eq!(
        verdict(
            &w,
            &db,
            Direction::Ingress,
            tcp("10.0.0.1", "10.0.0.2", 5432)
        ),
        Verdict::Allow(rule(Some("default"), "shop/db-from-web", 0))
    );
    // Same source, other port: end of tier, even though the profile would allow.
    assert_eq!(
        verdict(&w, &db, Direction::Ingress, tcp("10.0.0.1", "10.0.0.2", 22)),
        Verdict::Deny(RuleRef::EndOfTier("default".into()))
    );
    // The policy has only ingress rules, so it does not apply to egress: the profile decides.
    assert!(verdict(&w, &db, Direction::Egress, tcp("10.0.0.2", "10.0.0.1", 80)).allowed());
    // A NetworkPolicy's selectors stay in its namespace: web-2 (blog) is not `app == 'web'` here.
    assert_eq!(
        verdict(
            &w,
            &db,
            Direction::Ingress,
            tcp("10.0.1.1", "10.0.0.2", 5432)
        ),
        Verdict::Deny(RuleRef::EndOfTier("default".into()))
    );
}

#[test]
fn tiers_run_in_order_and_pass_moves_on() {
    let w = world(
        "
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: platform}
spec: {order: 200, defaultAction: Pass}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.quarantine}
spec:
  tier: security
  selector: all()
  types: [Ingress]
  ingress:
    - {action: Deny, source: {nets: [10.0.1.0/24]}}
    - {action: Log}
    - {action: Pass}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: platform.ssh}
spec:
  tier: platform
  selector: all()
  types: [Ingress]
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [22]}}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: default-web}
spec:
  selector: all()
  types: [Ingress]
  ingress: [{action: Allow, protocol: TCP, destination: {ports: ['80:90']}}]
",
    );
    let db = ep("shop", "db-1");
    assert_eq!(
        verdict(&w, &db, Direction::Ingress, tcp("10.0.1.1", "10.0.0.2", 22)),
        Verdict::Deny(rule(Some("security"), "security.quarantine", 0))
    );
    assert_eq!(
        verdict(&w, &db, Direction::Ingress, tcp("10.0.0.1", "10.0.0.2", 22)),
        Verdict::Allow(rule(Some("platform"), "platform.ssh", 0))
    );
    // platform decides nothing for port 85 and passes by default; the default tier allows.
    assert_eq!(
        verdict(&w, &db, Direction::Ingress, tcp("10.0.0.1", "10.0.0.2", 85)),
        Verdict::Allow(rule(Some("default"), "default-web", 0))
    );
    assert_eq!(
        verdict(&w, &db, Direction::Ingress, tcp("10.0.0.1", "10.0.0.2", 91)),
        Verdict::Deny(RuleRef::EndOfTier("default".into()))
    );
}

#[test]
fn policies_run_by_order_then_name() {
    let w = world(
        "
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: b-allow}
spec: {order: 10, selector: all(), ingress: [{action: Allow}]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: a-deny}
spec: {order: 10, selector: all(), ingress: [{action: Deny}]}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: z-first}
spec: {order: 1, selector: app == 'web', ingress: [{action: Allow, protocol: UDP}]}
",
    );
    let db = ep("shop", "db-1");
    assert_eq!(
        verdict(&w, &db, Direction::Ingress, tcp("10.0.0.1", "10.0.0.2", 1)),
        Verdict::Deny(rule(Some("default"), "a-deny", 0))
    );
    let web = ep("shop", "web-1");
    let mut udp = tcp("10.0.0.2", "10.0.0.1", 53);
    udp.protocol = 17;
    assert_eq!(
        verdict(&w, &web, Direction::Ingress, udp),
        Verdict::Allow(rule(Some("default"), "z-first", 0))
    );
}

#[test]
fn matchers() {
    let w = world("
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: m}
spec:
  selector: app == 'db'
  ingress:
    - {action: Allow, ipVersion: 6, protocol: ICMPv6, icmp: {type: 128}}
    - {action: Deny, protocol: ICMP, notICMP: {type: 8}}
    - {action: Allow, protocol: ICMP}
    - {action: Allow, protocol: TCP, source: {selector: zone == 'office'}, destination: {notPorts: [22]}}
    - {action: Allow, notProtocol: TCP, source: {namespaceSelector: team == 'b'}}
    - {action: Allow, protocol: TCP, source: {nets: [10.0.0.0/16], notNets: [10.0.1.0/24], notSelector: app == 'cache'}}
");
    let db = ep("shop", "db-1");
    let allowed = |p| verdict(&w, &db, Direction::Ingress, p).allowed();
    assert!(allowed(icmp("fd00::9", "fd00::2", 128, 0)));
    assert!(!allowed(icmp("fd00::9", "fd00::2", 129, 0)));
    assert!(
        allowed(icmp("10.9.9.9", "10.0.0.2", 8, 0)),
        "echo request passes the notICMP deny"
    );
    assert!(
        !allowed(icmp("10.9.9.9", "10.0.0.2", 0, 0)),
        "other ICMP is denied"
    );
    assert!(
        allowed(tcp("192.0.2.7", "10.0.0.2", 443)),
        "office network set, not port 22"
    );
    assert!(!allowed(tcp("192.0.2.7", "10.0.0.2", 22)));
    let mut udp = tcp("10.0.1.1", "10.0.0.2", 53);
    udp.protocol = 17;
    assert!(
        allowed(udp),
        "namespaceSelector team == 'b' selects blog's web-2"
    );
    assert!(
        allowed(tcp("10.0.0.1", "10.0.0.2", 5432)),
        "inside 10.0.0.0/16"
    );
    assert!(
        !allowed(tcp("10.0.1.1", "10.0.0.2", 5432)),
        "excluded by notNets"
    );
    let unrelated: IpAddr = "10.0.5.5".parse().unwrap();
    assert!(allowed(tcp(&unrelated.to_string(), "10.0.0.2", 5432)));
}

/// Service accounts, as upstream resolves them: an endpoint's account is its
/// `projectcalico.org/serviceaccount` label, the account's labels are the `pcsa.*` labels its
/// `ksa.<namespace>.<name>` profile applies. `serviceAccountSelector` narrows which endpoints a
/// policy applies to; a rule's `serviceAccounts` (names and/or selector) narrows its peers.
#[test]
fn service_accounts_select_endpoints_and_peers() {
    let w = world(
        "
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: ksa.shop.frontend}
spec:
  labelsToApply: {pcsa.projectcalico.org/name: frontend, pcsa.role: edge}
---
apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: ksa.shop.batch}
spec:
  labelsToApply: {pcsa.projectcalico.org/name: batch, pcsa.role: worker}
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: fe-1, namespace: shop, labels: {app: fe, projectcalico.org/serviceaccount: frontend}}
spec: {node: n1, ipNetworks: [10.0.0.11/32], profiles: [ksa.shop.frontend]}
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: job-1, namespace: shop, labels: {app: job, projectcalico.org/serviceaccount: batch}}
spec: {node: n1, ipNetworks: [10.0.0.12/32], profiles: [ksa.shop.batch]}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db-from-edge, namespace: shop}
spec:
  selector: app == 'db'
  ingress:
  - action: Allow
    source: {serviceAccounts: {selector: role == 'edge'}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: by-name, namespace: shop}
spec:
  selector: app == 'db'
  ingress:
  - action: Allow
    protocol: TCP
    destination: {ports: [6000]}
    source: {serviceAccounts: {names: [batch]}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: workers-only, namespace: shop}
spec:
  selector: all()
  serviceAccountSelector: role == 'worker'
  types: [Egress]
  egress:
  - action: Deny
",
    );
    let db = ep("shop", "db-1");
    // By the account's labels: the frontend (role edge) in, the batch job (worker) not.
    assert_eq!(
        verdict(
            &w,
            &db,
            Direction::Ingress,
            tcp("10.0.0.11", "10.0.0.2", 5432)
        ),
        Verdict::Allow(rule(Some("default"), "shop/db-from-edge", 0))
    );
    assert!(matches!(
        verdict(
            &w,
            &db,
            Direction::Ingress,
            tcp("10.0.0.12", "10.0.0.2", 5432)
        ),
        Verdict::Deny(_)
    ));
    // By name: the batch account on its port, and not the frontend's by that rule.
    assert_eq!(
        verdict(
            &w,
            &db,
            Direction::Ingress,
            tcp("10.0.0.12", "10.0.0.2", 6000)
        ),
        Verdict::Allow(rule(Some("default"), "shop/by-name", 0))
    );
    assert_eq!(
        verdict(
            &w,
            &db,
            Direction::Ingress,
            tcp("10.0.0.11", "10.0.0.2", 6000)
        ),
        Verdict::Allow(rule(Some("default"), "shop/db-from-edge", 0))
    );
    // serviceAccountSelector: the policy applies to the worker's endpoint alone.
    let job = ep("shop", "job-1");
    let fe = ep("shop", "fe-1");
    assert_eq!(
        verdict(
            &w,
            &job,
            Direction::Egress,
            tcp("10.0.0.12", "10.0.0.2", 5432)
        ),
        Verdict::Deny(rule(Some("default"), "shop/workers-only", 0))
    );
    assert!(
        !matches!(
            verdict(&w, &fe, Direction::Egress, tcp("10.0.0.11", "10.0.0.2", 5432)),
            Verdict::Deny(RuleRef::Rule { ref policy, .. }) if policy == "shop/workers-only"
        ),
        "workers-only applies to the frontend"
    );
}

/// Named ports on the endpoint's own side (the destination of an ingress rule, the source of
/// an egress rule) resolve to its `spec.ports` of that name and the rule's protocol; a name it
/// does not have matches no port. The compiled tables agree with the reference evaluator, and
/// a named port on the peers' side is still refused by the compiler, naming the field.
#[test]
fn named_ports_of_the_endpoint_itself() {
    use calico_policy::CompiledProgram;
    let w = world(
        "
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: api-1, namespace: shop, labels: {app: api}}
spec:
  node: n1
  ipNetworks: [10.0.0.9/32]
  ports:
  - {name: http, protocol: TCP, port: 8080}
  - {name: metrics, protocol: UDP, port: 9100}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: api, namespace: shop}
spec:
  selector: app == 'api'
  types: [Ingress]
  ingress:
  - {action: Allow, protocol: TCP, destination: {ports: [http, 443]}}
  - {action: Allow, protocol: TCP, destination: {ports: [metrics]}}
  - {action: Allow, protocol: UDP, destination: {ports: [nosuch]}}
",
    );
    let api = ep("shop", "api-1");
    let udp = |dport| Packet {
        protocol: 17,
        ..tcp("10.0.0.1", "10.0.0.9", dport)
    };
    let cases = [
        (tcp("10.0.0.1", "10.0.0.9", 8080), true),
        (tcp("10.0.0.1", "10.0.0.9", 443), true),
        (tcp("10.0.0.1", "10.0.0.9", 80), false),
        // `metrics` is a UDP port: a TCP rule naming it matches nothing.
        (tcp("10.0.0.1", "10.0.0.9", 9100), false),
        // A name the endpoint does not have matches nothing (never "any port").
        (udp(9100), false),
        (udp(53), false),
    ];
    let program = w.program(&api, Direction::Ingress);
    let compiled = CompiledProgram::compile(
        &w,
        &program,
        &["10.0.0.9".parse().unwrap()],
        Direction::Ingress,
    )
    .expect("the endpoint's own named ports compile");
    for (packet, allowed) in cases {
        let reference = evaluate(&w, &program, &packet);
        assert_eq!(reference.allowed(), allowed, "{packet:?}: {reference:?}");
        assert_eq!(
            compiled.lookup(&packet).map(Verdict::allowed),
            Some(allowed),
            "compiled tables for {packet:?}"
        );
    }
}

/// The peers' named ports (an egress rule's destination, an ingress rule's source) match
/// each peer's own number for the name and the rule's protocol, beside numeric ports, inside
/// the rule's nets; a name no selected peer has matches nothing. Reference and compiled
/// tables agree on every combination; named notPorts of the peers are refused by name.
#[test]
fn named_ports_of_the_peers() {
    use calico_policy::CompiledProgram;
    let peers = "
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: api-1, namespace: shop, labels: {app: api}}
spec:
  node: n1
  ipNetworks: [10.0.0.9/32]
  ports: [{name: http, protocol: TCP, port: 8080}, {name: dns, protocol: UDP, port: 53}]
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: api-2, namespace: shop, labels: {app: api}}
spec:
  node: n1
  ipNetworks: [10.0.0.10/32]
  ports: [{name: http, protocol: TCP, port: 9090}]
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: api-3, namespace: blog, labels: {app: api}}
spec:
  node: n1
  ipNetworks: [10.0.1.9/32]
  ports: [{name: http, protocol: TCP, port: 7070}]
";
    let w = world(&format!(
        "{peers}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: out, namespace: shop}}
spec:
  selector: app == 'web'
  types: [Egress, Ingress]
  egress:
  - {{action: Allow, protocol: TCP, destination: {{selector: app == 'api', ports: [http, 443]}}}}
  - {{action: Allow, protocol: UDP, destination: {{ports: [dns]}}}}
  - {{action: Allow, protocol: TCP, destination: {{nets: [10.0.1.0/24], ports: [http]}}}}
  - {{action: Allow, protocol: TCP, destination: {{ports: [nosuch]}}}}
  ingress:
  - {{action: Allow, protocol: TCP, source: {{selector: app == 'api', ports: [http]}}}}
"
    ));
    let web = ep("shop", "web-1");
    let mut checked = 0;
    for direction in [Direction::Egress, Direction::Ingress] {
        let program = w.program(&web, direction);
        let compiled =
            CompiledProgram::compile(&w, &program, &["10.0.0.1".parse().unwrap()], direction)
                .expect("the peers' named ports compile");
        for peer in ["10.0.0.9", "10.0.0.10", "10.0.1.9", "10.0.0.2", "192.0.2.1"] {
            for protocol in [6u8, 17] {
                for port in [53u16, 443, 7070, 8080, 9090, 1] {
                    let mut packet = match direction {
                        Direction::Egress => tcp("10.0.0.1", peer, port),
                        Direction::Ingress => Packet {
                            src_port: port,
                            dst_port: 40000,
                            ..tcp(peer, "10.0.0.1", 0)
                        },
                    };
                    packet.protocol = protocol;
                    let reference = evaluate(&w, &program, &packet);
                    assert_eq!(
                        compiled.lookup(&packet),
                        Some(&reference),
                        "{direction:?} {packet:?}"
                    );
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 120);
    let allowed = |d, p: Packet| evaluate(&w, &w.program(&web, d), &p).allowed();
    // Each peer's own number for `http`, in the selector's namespace (api-3 is in blog).
    assert!(allowed(
        Direction::Egress,
        tcp("10.0.0.1", "10.0.0.9", 8080)
    ));
    assert!(allowed(
        Direction::Egress,
        tcp("10.0.0.1", "10.0.0.10", 9090)
    ));
    assert!(
        !allowed(Direction::Egress, tcp("10.0.0.1", "10.0.0.9", 9090)),
        "api-2's number is not api-1's"
    );
    assert!(
        allowed(Direction::Egress, tcp("10.0.0.1", "10.0.0.9", 443)),
        "numeric ports stay"
    );
    // No selector: any endpoint with the name, in any namespace, inside the rule's nets.
    assert!(allowed(
        Direction::Egress,
        tcp("10.0.0.1", "10.0.1.9", 7070)
    ));
    assert!(allowed(
        Direction::Egress,
        Packet {
            protocol: 17,
            ..tcp("10.0.0.1", "10.0.0.9", 53)
        }
    ));
    assert!(
        !allowed(Direction::Egress, tcp("10.0.0.1", "10.0.0.2", 8080)),
        "db-1 has no http port"
    );
    // Ingress: the peer's source port.
    assert!(allowed(
        Direction::Ingress,
        Packet {
            src_port: 8080,
            dst_port: 1,
            ..tcp("10.0.0.9", "10.0.0.1", 0)
        }
    ));
    assert!(!allowed(
        Direction::Ingress,
        Packet {
            src_port: 9090,
            dst_port: 1,
            ..tcp("10.0.0.9", "10.0.0.1", 0)
        }
    ));

    let refused = world(&format!(
        "{peers}---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {{name: out, namespace: shop}}
spec:
  selector: app == 'web'
  types: [Egress]
  egress:
  - {{action: Allow, protocol: TCP, destination: {{notPorts: [http]}}}}
"
    ));
    let program = refused.program(&web, Direction::Egress);
    let err = CompiledProgram::compile(
        &refused,
        &program,
        &["10.0.0.1".parse().unwrap()],
        Direction::Egress,
    )
    .expect_err("named notPorts of the peers");
    assert_eq!(err.field, "destination.notPorts", "{err}");
}

/// Staged policies change the pending program only: a staged Set takes its enforced
/// namesake's place (or joins its tier), a staged Delete removes the policy it names, Learn
/// and Ignore preview nothing; the enforced program is the same with or without them.
#[test]
fn staged_policies_change_the_pending_program_only() {
    const ENFORCED: &str = "
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: default.allow-web, namespace: shop}
spec:
  selector: app == 'db'
  ingress: [{action: Allow, protocol: TCP, source: {selector: app == 'web'}, destination: {ports: [5432]}}]
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: default.office}
spec:
  order: 500
  selector: all()
  ingress: [{action: Allow, source: {nets: [192.0.2.0/24]}}]
";
    let web_to_db = tcp("10.0.0.1", "10.0.0.2", 5432);
    let office_to_db = tcp("192.0.2.7", "10.0.0.2", 22);
    let db = ep("shop", "db-1");
    let enforced = world(ENFORCED);
    let allowed_by_web_rule = Verdict::Allow(rule(Some("default"), "shop/default.allow-web", 0));
    assert_eq!(
        verdict(&enforced, &db, Direction::Ingress, web_to_db),
        allowed_by_web_rule
    );
    assert!(!enforced.has_staged());

    let staged = world(&format!(
        "{ENFORCED}---
apiVersion: projectcalico.org/v3
kind: StagedNetworkPolicy
metadata: {{name: default.allow-web, namespace: shop}}
spec:
  selector: app == 'db'
  ingress: [{{action: Deny, protocol: TCP, destination: {{ports: [5432]}}}}]
---
apiVersion: projectcalico.org/v3
kind: StagedGlobalNetworkPolicy
metadata: {{name: default.office}}
spec: {{stagedAction: Delete}}
---
apiVersion: projectcalico.org/v3
kind: StagedGlobalNetworkPolicy
metadata: {{name: default.ignored}}
spec: {{stagedAction: Ignore, selector: all(), ingress: [{{action: Deny}}]}}
"
    ));
    assert!(staged.has_staged());
    // Enforcement is untouched.
    assert_eq!(
        staged.program(&db, Direction::Ingress),
        enforced.program(&db, Direction::Ingress)
    );
    assert_eq!(
        verdict(&staged, &db, Direction::Ingress, web_to_db),
        allowed_by_web_rule
    );
    // The pending program: the staged rule decides in its place, named as staged.
    let pending = staged.pending_program(&db, Direction::Ingress);
    assert_eq!(
        evaluate(&staged, &pending, &web_to_db),
        Verdict::Deny(rule(Some("default"), "shop/default.staged:allow-web", 0))
    );
    // The office policy's deletion leaves the office's SSH to the end of the tier.
    assert_eq!(
        verdict(&enforced, &db, Direction::Ingress, office_to_db),
        Verdict::Allow(rule(Some("default"), "default.office", 0))
    );
    assert_eq!(
        evaluate(&staged, &pending, &office_to_db),
        Verdict::Deny(RuleRef::EndOfTier("default".into()))
    );
    // An endpoint no staged policy touches has the same pending program.
    let web = ep("blog", "web-2");
    assert_ne!(pending, staged.program(&db, Direction::Ingress));
    let web_pending = staged.pending_program(&web, Direction::Ingress);
    assert_ne!(
        web_pending,
        staged.program(&web, Direction::Ingress),
        "the office deletion reaches every endpoint"
    );

    // A staged Kubernetes policy previews the knp.default. policy it would write, for the
    // Kubernetes pods it selects.
    let k8s = world(&format!(
        "{ENFORCED}---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {{name: db-k8s, namespace: shop, labels: {{app: db, projectcalico.org/orchestrator: k8s}}}}
spec: {{node: n1, ipNetworks: [10.0.0.9/32]}}
---
apiVersion: projectcalico.org/v3
kind: StagedKubernetesNetworkPolicy
metadata: {{name: isolate, namespace: shop}}
spec:
  podSelector: {{matchLabels: {{app: db}}}}
  policyTypes: [Ingress]
"
    ));
    let staged_k8s = &k8s.staged[&(Some("shop".to_owned()), "knp.default.isolate".to_owned())];
    assert_eq!(
        staged_k8s.policy.as_ref().map(|p| p.name.as_str()),
        Some("staged:knp.default.isolate")
    );
    let names = |w: &World, e: &EndpointId, pending: bool| -> Vec<String> {
        let program = if pending {
            w.pending_program(e, Direction::Ingress)
        } else {
            w.program(e, Direction::Ingress)
        };
        program
            .tiers
            .iter()
            .flat_map(|t| &t.policies)
            .map(|p| p.name.clone())
            .collect()
    };
    let db_k8s = ep("shop", "db-k8s");
    assert_eq!(
        names(&k8s, &db_k8s, true),
        // By order: office 500, the Kubernetes policy 1000, allow-web none (last).
        [
            "default.office",
            "shop/staged:knp.default.isolate",
            "shop/default.allow-web"
        ]
    );
    assert_eq!(
        names(&k8s, &db_k8s, false),
        ["default.office", "shop/default.allow-web"]
    );
}
