//! Random worlds, policies and packets for differential tests (feature `testing`): the pure
//! compiler against the reference here, the eBPF program against the reference in the
//! integration tests.

use std::{collections::BTreeMap, net::IpAddr};

use calico_model::{
    spec::{Action, EntityRule, IcmpFields, PolicyType, ProfileSpec, Rule, TierDefaultAction},
    Order, Port, Protocol,
};
use calico_selector::Selector;
use proptest::prelude::*;

use crate::{EndpointId, EndpointInfo, NetworkSetInfo, Packet, PolicyInfo, World};

const SELECTORS: &[&str] = &[
    "all()",
    "app == 'web'",
    "has(tier)",
    "app in {'db', 'cache'}",
    "!has(app)",
    "tier == 'a' || app == 'cache'",
];
const NAMESPACE_SELECTORS: &[&str] = &["all()", "team == 'a'", "global()"];
const NETS: &[&str] = &[
    "10.0.0.0/25",
    "10.0.1.0/24",
    "192.0.2.0/24",
    "10.0.0.0/16",
    "10.0.0.7/32",
    "fd00::/64",
    "fd00::2/128",
];
pub const ADDRESSES: &[&str] = &[
    "10.0.0.1",
    "10.0.0.2",
    "10.0.0.7",
    "10.0.0.200",
    "10.0.1.1",
    "10.0.1.9",
    "192.0.2.9",
    "10.9.9.9",
    "172.16.0.1",
    "fd00::1",
    "fd00::2",
    "fd00::99",
    "fd01::1",
];
const PORTS: &[u16] = &[0, 22, 79, 80, 81, 443, 999, 1000, 1500, 2000, 2001, 65535];

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    prop::sample::select(items)
}

pub fn entity(allow_ports: bool) -> impl Strategy<Value = EntityRule> {
    (
        prop::option::weighted(0.3, prop::collection::vec(pick(NETS), 1..3)),
        prop::option::weighted(0.2, prop::collection::vec(pick(NETS), 1..2)),
        prop::option::weighted(0.35, pick(SELECTORS)),
        prop::option::weighted(0.15, pick(SELECTORS)),
        prop::option::weighted(0.2, pick(NAMESPACE_SELECTORS)),
        prop::option::weighted(
            0.5,
            prop::collection::vec(pick(&[0usize, 1, 2, 3][..]), 1..3),
        ),
        prop::option::weighted(0.2, pick(&[0usize, 1, 2, 3][..])),
    )
        .prop_map(
            move |(nets, not_nets, selector, not_selector, ns, ports, not_port)| {
                // Ports only go with protocols that have them (validation insists).
                let (ports, not_port) = if allow_ports {
                    (ports, not_port)
                } else {
                    (None, None)
                };
                let port = |i: usize| match i {
                    0 => Port::Number(80),
                    1 => Port::Number(443),
                    2 => Port::Range(1000, 2000),
                    _ => Port::Range(0, 79),
                };
                EntityRule {
                    nets: nets
                        .unwrap_or_default()
                        .into_iter()
                        .map(String::from)
                        .collect(),
                    not_nets: not_nets
                        .unwrap_or_default()
                        .into_iter()
                        .map(String::from)
                        .collect(),
                    selector: selector.map(String::from),
                    not_selector: not_selector.map(String::from),
                    namespace_selector: ns.map(String::from),
                    ports: ports.unwrap_or_default().into_iter().map(port).collect(),
                    not_ports: not_port.into_iter().map(port).collect(),
                    ..Default::default()
                }
            },
        )
}

pub fn rule() -> impl Strategy<Value = Rule> {
    let action = prop_oneof![
        Just(Action::Allow),
        Just(Action::Deny),
        Just(Action::Pass),
        Just(Action::Log)
    ];
    // protocol: None, TCP, UDP, ICMP, ICMPv6, 47 (GRE, no ports).
    let protocol = prop::option::weighted(0.7, pick(&[6u8, 17, 1, 58, 47][..]));
    (
        action,
        protocol,
        prop::option::weighted(0.15, pick(&[6u8, 17, 1][..])),
        any::<bool>(),
        pick(&[0u8, 3, 8, 128][..]),
        prop::option::of(pick(&[0u8, 1][..])),
    )
        .prop_flat_map(
            |(action, protocol, not_protocol, use_icmp, icmp_type, icmp_code)| {
                let ports = protocol.is_some_and(|p| matches!(p, 6 | 17));
                (entity(ports), entity(ports)).prop_map(move |(source, destination)| {
                    let icmp = protocol
                        .filter(|p| matches!(p, 1 | 58))
                        .filter(|_| use_icmp)
                        .map(|_| IcmpFields {
                            icmp_type: Some(i64::from(icmp_type)),
                            code: icmp_code.map(i64::from),
                        });
                    Rule {
                        action,
                        ip_version: match protocol {
                            Some(1) => Some(4),
                            Some(58) => Some(6),
                            _ => None,
                        },
                        protocol: protocol.map(|p| Protocol::Number(i64::from(p))),
                        not_protocol: not_protocol
                            .filter(|n| Some(*n) != protocol)
                            .map(|p| Protocol::Number(i64::from(p))),
                        icmp,
                        ..Rule::new(action)
                    }
                    .with_entities(source, destination)
                })
            },
        )
}

trait WithEntities {
    fn with_entities(self, source: EntityRule, destination: EntityRule) -> Self;
}

impl WithEntities for Rule {
    fn with_entities(mut self, source: EntityRule, destination: EntityRule) -> Self {
        self.source = source;
        self.destination = destination;
        self
    }
}

pub fn policy(index: usize) -> impl Strategy<Value = PolicyInfo> {
    (
        any::<bool>(),
        prop::option::of(pick(&["shop", "blog"][..])),
        prop::option::of(pick(&[1.0f64, 5.0, 10.0][..])),
        pick(SELECTORS),
        prop::option::weighted(0.2, pick(&["team == 'a'", "all()"][..])),
        prop::collection::vec(rule(), 0..4),
        prop::collection::vec(rule(), 0..3),
        pick(&[0usize, 1, 2, 3][..]),
    )
        .prop_map(
            move |(in_t1, namespace, order, selector, ns_sel, ingress, egress, types)| PolicyInfo {
                name: format!("p{index}"),
                namespace: namespace.map(String::from),
                tier: if in_t1 { "t1".into() } else { "default".into() },
                order: order.map(Order),
                selector: Selector::parse(selector).unwrap(),
                namespace_selector: if namespace.is_none() {
                    ns_sel.map(|s| Selector::parse(s).unwrap())
                } else {
                    None
                },
                types: match types {
                    0 => vec![],
                    1 => vec![PolicyType::Ingress],
                    2 => vec![PolicyType::Egress],
                    _ => vec![PolicyType::Ingress, PolicyType::Egress],
                },
                ingress: ingress.into(),
                egress: egress.into(),
            },
        )
}

pub fn world() -> impl Strategy<Value = World> {
    (
        prop::collection::vec(
            prop::collection::vec(
                pick(&["app=web", "app=db", "app=cache", "tier=a", "tier=b"][..]),
                0..3,
            ),
            4,
        ),
        prop::collection::vec(
            (any::<bool>(), prop::collection::vec(pick(NETS), 1..3)),
            0..3,
        ),
        pick(&[TierDefaultAction::Deny, TierDefaultAction::Pass][..]),
        (0usize..5).prop_flat_map(|n| (0..n).map(policy).collect::<Vec<_>>()),
        prop::collection::vec(rule(), 0..3),
    )
        .prop_map(|(labels, sets, t1_default, policies, profile_rules)| {
            let mut w = World::default();
            let homes = [
                ("shop", "a", vec!["10.0.0.1", "fd00::1"]),
                ("shop", "b", vec!["10.0.0.2"]),
                ("blog", "c", vec!["10.0.1.1", "fd00::2"]),
                ("blog", "d", vec!["10.0.0.7"]),
            ];
            for ((ns, name, addrs), labels) in homes.iter().zip(labels) {
                let labels: BTreeMap<String, String> = labels
                    .iter()
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').unwrap();
                        (k.to_owned(), v.to_owned())
                    })
                    .collect();
                w.endpoints.insert(
                    EndpointId {
                        namespace: Some((*ns).into()),
                        name: (*name).into(),
                    },
                    EndpointInfo {
                        labels: labels.into(),
                        profiles: vec!["prof".into()],
                        addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
                        ports: Vec::new(),
                    },
                );
            }
            for (i, (global, nets)) in sets.into_iter().enumerate() {
                w.network_sets.push(NetworkSetInfo {
                    name: format!("set{i}"),
                    namespace: if global { None } else { Some("shop".into()) },
                    labels: [("app".to_owned(), "cache".to_owned())].into(),
                    nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
                });
            }
            w.namespaces
                .insert("shop".into(), [("team".to_owned(), "a".to_owned())].into());
            w.namespaces
                .insert("blog".into(), [("team".to_owned(), "b".to_owned())].into());
            w.tiers.insert("t1".into(), (Some(Order(10.0)), t1_default));
            w.policies = policies.into_iter().map(|p| (p.key(), p)).collect();
            w.profiles.insert(
                "prof".into(),
                ProfileSpec {
                    ingress: profile_rules.clone(),
                    egress: profile_rules,
                    ..Default::default()
                },
            );
            w
        })
}

pub fn packet() -> impl Strategy<Value = (usize, usize, u8, u16, u16, u8, u8)> {
    (
        0..ADDRESSES.len(),
        0usize..4,
        pick(&[6u8, 17, 1, 58, 47][..]),
        pick(PORTS),
        pick(PORTS),
        pick(&[0u8, 3, 8, 128, 129][..]),
        pick(&[0u8, 1][..]),
    )
}

/// A concrete packet from [`packet`]'s numbers for an endpoint with `addresses`, in the
/// family of the peer; `None` when the endpoint has no address of that family.
pub fn make_packet(
    addresses: &[IpAddr],
    ingress: bool,
    (peer, local, protocol, sport, dport, t, c): (usize, usize, u8, u16, u16, u8, u8),
) -> Option<Packet> {
    let peer: IpAddr = ADDRESSES[peer].parse().expect("constant address");
    let local = addresses
        .iter()
        .copied()
        .filter(|a| a.is_ipv4() == peer.is_ipv4())
        .nth(local % 2)?;
    let protocol = match (protocol, peer.is_ipv4()) {
        (1, false) => 58,
        (58, true) => 1,
        (p, _) => p,
    };
    let (src, dst) = if ingress {
        (peer, local)
    } else {
        (local, peer)
    };
    Some(Packet {
        src,
        dst,
        protocol,
        src_port: if matches!(protocol, 6 | 17) { sport } else { 0 },
        dst_port: if matches!(protocol, 6 | 17) { dport } else { 0 },
        icmp: matches!(protocol, 1 | 58).then_some((t, c)),
    })
}

/// `n` rules that deny TCP from one /32 each to one port each (none matching the test
/// traffic), then a final allow.
pub fn deny_rules_then_allow(n: usize) -> World {
    let mut w = World::default();
    w.endpoints.insert(
        EndpointId {
            namespace: Some("default".into()),
            name: "server".into(),
        },
        EndpointInfo {
            addresses: vec!["10.0.0.1".parse().unwrap()],
            ports: Vec::new(),
            ..Default::default()
        },
    );
    let mut ingress: Vec<Rule> = (0..n)
        .map(|i| Rule {
            protocol: Some(Protocol::Name("TCP".into())),
            source: EntityRule {
                nets: vec![format!(
                    "10.{}.{}.{}/32",
                    100 + i / 65536,
                    (i / 256) % 256,
                    i % 256
                )],
                ..Default::default()
            },
            destination: EntityRule {
                ports: vec![Port::Number(10_000 + (i % 50_000) as i64)],
                ..Default::default()
            },
            ..Rule::new(Action::Deny)
        })
        .collect();
    ingress.push(Rule::new(Action::Allow));
    w.put_policy(PolicyInfo {
        name: "many".into(),
        namespace: None,
        tier: "default".into(),
        order: None,
        selector: Selector::all(),
        namespace_selector: None,
        types: vec![],
        ingress: ingress.into(),
        egress: Default::default(),
    });
    w
}
