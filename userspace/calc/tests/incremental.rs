//! The incremental calculation against the calculation from scratch: after any sequence of
//! updates, what a caller holds (every reported change applied) equals `from_scratch` for every
//! local endpoint, and nothing is held for endpoints that are not local.

use std::collections::BTreeMap;

use calico_calc::{from_scratch, Calculator, Change, EndpointPolicy, Update};
use calico_model::spec::{ProfileSpec, TierDefaultAction};
use calico_policy::{testing, EndpointId, EndpointInfo, NetworkSetInfo, PolicyInfo, World};
use proptest::prelude::*;

const LABELS: &[&str] = &["app=web", "app=db", "app=cache", "tier=a", "tier=b"];

/// Named ports endpoints may have: (name, protocol, number).
const NAMED_PORTS: &[(&str, u8, u16)] = &[("http", 6, 80), ("http", 6, 8080), ("dns", 17, 53)];

fn labels(kvs: &[&str]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

fn endpoint_id(i: usize) -> EndpointId {
    let (ns, name) = [
        ("shop", "a"),
        ("shop", "b"),
        ("blog", "c"),
        ("blog", "d"),
        ("shop", "e"),
    ][i];
    EndpointId {
        namespace: Some(ns.into()),
        name: name.into(),
    }
}

/// An endpoint's labels, address indexes, whether it is local, named port indexes.
type EndpointOp = (Vec<&'static str>, Vec<usize>, bool, Vec<usize>);

#[derive(Debug, Clone)]
enum Op {
    Endpoint(usize, Option<EndpointOp>),
    /// Profile rules naming ports on the peer side (with or without a selector).
    NamedPortProfile(bool),
    Policy(usize, Option<Box<PolicyInfo>>),
    ProfileLabels(Vec<&'static str>),
    ProfileRules(Vec<calico_model::spec::Rule>),
    NetworkSet(usize, Option<(bool, Vec<&'static str>, &'static str)>),
    Namespace(&'static str, Vec<&'static str>),
    Tier(Option<bool>),
}

fn op() -> impl Strategy<Value = Op> {
    let pick = |v: &'static [&'static str]| prop::sample::select(v);
    prop_oneof![
        4 => (0usize..5, prop::option::weighted(0.8, (
            prop::collection::vec(pick(LABELS), 0..3),
            prop::collection::vec(0..testing::ADDRESSES.len(), 0..3),
            prop::bool::weighted(0.7),
            prop::collection::vec(0..NAMED_PORTS.len(), 0..3),
        ))).prop_map(|(i, e)| Op::Endpoint(i, e)),
        1 => any::<bool>().prop_map(Op::NamedPortProfile),
        3 => (0usize..5).prop_flat_map(|i| (Just(i), prop::option::weighted(0.75, testing::policy(i))))
            .prop_map(|(i, p)| Op::Policy(i, p.map(Box::new))),
        1 => prop::collection::vec(pick(LABELS), 0..2).prop_map(Op::ProfileLabels),
        1 => prop::collection::vec(testing::rule(), 0..3).prop_map(Op::ProfileRules),
        2 => (0usize..3, prop::option::weighted(0.7, (
            any::<bool>(),
            prop::collection::vec(pick(&["10.0.0.0/25", "10.0.1.0/24", "192.0.2.0/24", "fd00::/64", "10.9.9.9/32"]), 1..3),
            pick(&["app=cache", "app=web", "tier=a"]),
        ))).prop_map(|(i, s)| Op::NetworkSet(i, s)),
        1 => (pick(&["shop", "blog"]), prop::collection::vec(pick(&["team=a", "team=b", "env=prod"]), 0..2))
            .prop_map(|(n, l)| Op::Namespace(n, l)),
        1 => prop::option::of(any::<bool>()).prop_map(Op::Tier),
    ]
}

/// Applies `op` to the reference world directly and returns the same change as an update.
fn step(world: &mut World, locals: &mut Vec<EndpointId>, op: &Op) -> Update {
    match op {
        Op::Endpoint(i, e) => {
            let id = endpoint_id(*i);
            locals.retain(|l| *l != id);
            match e {
                Some((l, addrs, local, ports)) => {
                    let info = EndpointInfo {
                        labels: labels(l).into(),
                        profiles: vec!["prof".into()],
                        addresses: addrs
                            .iter()
                            .map(|a| testing::ADDRESSES[*a].parse().unwrap())
                            .collect(),
                        ports: ports
                            .iter()
                            .map(|p| {
                                let (name, protocol, port) = NAMED_PORTS[*p];
                                calico_policy::NamedPort {
                                    name: name.into(),
                                    protocol: Some(protocol),
                                    port,
                                }
                            })
                            .collect(),
                    };
                    world.endpoints.insert(id.clone(), info.clone());
                    if *local {
                        locals.push(id.clone());
                    }
                    Update::Endpoint {
                        id,
                        endpoint: Some(info),
                        local: *local,
                    }
                }
                None => {
                    world.endpoints.remove(&id);
                    Update::Endpoint {
                        id,
                        endpoint: None,
                        local: false,
                    }
                }
            }
        }
        Op::Policy(i, p) => {
            let name = format!("p{i}");
            // testing::policy(i) is named p{i}; its namespace varies, so delete both forms.
            let namespace = p.as_ref().and_then(|p| p.namespace.clone());
            world.policies.remove(&(namespace.clone(), name.clone()));
            if let Some(p) = p {
                world.put_policy((**p).clone());
            }
            Update::Policy {
                namespace,
                name,
                policy: p.as_deref().cloned(),
            }
        }
        Op::NamedPortProfile(with_selector) => {
            let selector = if *with_selector {
                "selector: app == 'web', "
            } else {
                ""
            };
            let rules = calico_model::parse_documents(&format!(
                "apiVersion: projectcalico.org/v3\nkind: Profile\nmetadata: {{name: x}}\nspec:\n  ingress: [{{action: Allow, protocol: TCP, destination: {{{selector}ports: [http]}}}}, {{action: Allow, protocol: UDP, source: {{ports: [dns]}}}}]\n"
            ))
            .map(|r| match &r[0] {
                calico_model::Resource::Profile(p) => p.spec.ingress.clone(),
                _ => unreachable!(),
            })
            .unwrap();
            let spec = ProfileSpec {
                ingress: rules.clone(),
                egress: rules,
                labels_to_apply: world
                    .profiles
                    .get("prof")
                    .map(|p| p.labels_to_apply.clone())
                    .unwrap_or_default(),
            };
            world.profiles.insert("prof".into(), spec.clone());
            Update::Profile {
                name: "prof".into(),
                profile: Some(spec),
            }
        }
        Op::ProfileLabels(l) => {
            let mut spec = world.profiles.get("prof").cloned().unwrap_or_default();
            spec.labels_to_apply = labels(l);
            world.profiles.insert("prof".into(), spec.clone());
            Update::Profile {
                name: "prof".into(),
                profile: Some(spec),
            }
        }
        Op::ProfileRules(rules) => {
            let spec = ProfileSpec {
                ingress: rules.clone(),
                egress: rules.clone(),
                labels_to_apply: world
                    .profiles
                    .get("prof")
                    .map(|p| p.labels_to_apply.clone())
                    .unwrap_or_default(),
            };
            world.profiles.insert("prof".into(), spec.clone());
            Update::Profile {
                name: "prof".into(),
                profile: Some(spec),
            }
        }
        Op::NetworkSet(i, s) => {
            let name = format!("set{i}");
            let namespace = s
                .as_ref()
                .and_then(|(global, _, _)| (!global).then(|| "shop".to_owned()));
            world
                .network_sets
                .retain(|x| !(x.name == name && x.namespace == namespace));
            let set = s.as_ref().map(|(_, nets, l)| NetworkSetInfo {
                name: name.clone(),
                namespace: namespace.clone(),
                labels: labels(&[l]),
                nets: nets.iter().map(|n| n.parse().unwrap()).collect(),
            });
            if let Some(set) = &set {
                world.network_sets.push(set.clone());
            }
            Update::NetworkSet {
                namespace,
                name,
                set,
            }
        }
        Op::Namespace(n, l) => {
            world.namespaces.insert((*n).into(), labels(l));
            Update::Namespace {
                name: (*n).into(),
                labels: Some(labels(l)),
            }
        }
        Op::Tier(t) => {
            let tier = t.map(|pass| {
                (
                    Some(calico_model::Order(10.0)),
                    if pass {
                        TierDefaultAction::Pass
                    } else {
                        TierDefaultAction::Deny
                    },
                )
            });
            match tier {
                Some(t) => world.tiers.insert("t1".into(), t),
                None => world.tiers.remove("t1"),
            };
            Update::Tier {
                name: "t1".into(),
                tier,
            }
        }
    }
}

fn check(
    world: &World,
    locals: &[EndpointId],
    held: &BTreeMap<EndpointId, EndpointPolicy>,
) -> Result<(), TestCaseError> {
    for id in locals {
        let expected = from_scratch(world, id).expect("local endpoints exist");
        prop_assert_eq!(held.get(id), Some(&expected), "endpoint {:?}", id);
    }
    for id in held.keys() {
        prop_assert!(
            locals.contains(id),
            "held policy for non-local endpoint {:?}",
            id
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_from_scratch(initial in prop::collection::vec(op(), 0..8), ops in prop::collection::vec(op(), 1..25)) {
        let mut world = World::default();
        let mut locals = Vec::new();
        let mut calc = Calculator::new();
        let mut held: BTreeMap<EndpointId, EndpointPolicy> = BTreeMap::new();
        let hold = |changes: Vec<Change>, held: &mut BTreeMap<_, _>| {
            for c in changes {
                match c {
                    Change::Set(id, p) => { held.insert(id, *p); }
                    Change::Removed(id) => { held.remove(&id); }
                }
            }
        };
        // A batch first (as a snapshot arrives), then one flush per update.
        for op in &initial {
            calc.apply(step(&mut world, &mut locals, op));
        }
        hold(calc.flush(), &mut held);
        check(&world, &locals, &held)?;
        for op in &ops {
            calc.apply(step(&mut world, &mut locals, op));
            hold(calc.flush(), &mut held);
            check(&world, &locals, &held)?;
        }
        // A resync replays everything and reports only what differs.
        calc.reset();
        for (id, info) in &world.endpoints {
            calc.apply(Update::Endpoint { id: id.clone(), endpoint: Some(info.clone()), local: locals.contains(id) });
        }
        for p in world.policies.values() {
            calc.apply(Update::Policy { namespace: p.namespace.clone(), name: p.name.clone(), policy: Some(p.clone()) });
        }
        for (name, spec) in &world.profiles {
            calc.apply(Update::Profile { name: name.clone(), profile: Some(spec.clone()) });
        }
        for s in &world.network_sets {
            calc.apply(Update::NetworkSet { namespace: s.namespace.clone(), name: s.name.clone(), set: Some(s.clone()) });
        }
        for (n, l) in &world.namespaces {
            calc.apply(Update::Namespace { name: n.clone(), labels: Some(l.clone()) });
        }
        for (n, t) in &world.tiers {
            calc.apply(Update::Tier { name: n.clone(), tier: Some(*t) });
        }
        let changes = calc.flush();
        prop_assert!(changes.is_empty(), "a resync of the same state reported {} changes", changes.len());
        check(&world, &locals, &held)?;
    }
}

/// One label change on one endpoint recomputes that endpoint and the users of the sets it
/// joined or left, not every endpoint.
#[test]
fn label_change_recomputes_only_what_it_touches() {
    let mut calc = Calculator::new();
    for i in 0..100 {
        calc.apply(Update::Endpoint {
            id: EndpointId {
                namespace: Some("ns".into()),
                name: format!("w{i}"),
            },
            endpoint: Some(EndpointInfo {
                labels: labels(&[if i < 50 { "app=web" } else { "app=db" }]).into(),
                profiles: vec![],
                addresses: vec![format!("10.0.{}.{}", i / 200, i % 200 + 1).parse().unwrap()],
                ports: Vec::new(),
            }),
            local: true,
        });
    }
    // db endpoints accept from web endpoints; web endpoints have no policy.
    let policy: PolicyInfo = PolicyInfo {
        name: "db".into(),
        namespace: Some("ns".into()),
        tier: "default".into(),
        order: None,
        selector: calico_selector::Selector::parse("app == 'db'").unwrap(),
        namespace_selector: None,
        types: vec![],
        ingress: vec![calico_model::spec::Rule {
            source: calico_model::spec::EntityRule {
                selector: Some("app == 'web'".into()),
                ..Default::default()
            },
            ..calico_model::spec::Rule::new(calico_model::spec::Action::Allow)
        }]
        .into(),
        egress: Default::default(),
    };
    calc.apply(Update::Policy {
        namespace: Some("ns".into()),
        name: "db".into(),
        policy: Some(policy),
    });
    assert_eq!(calc.flush().len(), 100);
    let before = calc.stats().endpoints_recomputed;

    // A label change on a web endpoint that keeps it web: only it is recomputed.
    calc.apply(Update::Endpoint {
        id: EndpointId {
            namespace: Some("ns".into()),
            name: "w3".into(),
        },
        endpoint: Some(EndpointInfo {
            labels: labels(&["app=web", "tier=a"]).into(),
            profiles: vec![],
            addresses: vec!["10.0.0.4".parse().unwrap()],
            ports: Vec::new(),
        }),
        local: true,
    });
    let changes = calc.flush();
    assert_eq!(calc.stats().endpoints_recomputed - before, 1);
    assert!(changes.is_empty(), "nothing it feeds changed: {changes:?}");

    // Turning it into a db endpoint changes the web set: the 50 db endpoints plus itself.
    let before = calc.stats().endpoints_recomputed;
    calc.apply(Update::Endpoint {
        id: EndpointId {
            namespace: Some("ns".into()),
            name: "w3".into(),
        },
        endpoint: Some(EndpointInfo {
            labels: labels(&["app=db"]).into(),
            profiles: vec![],
            addresses: vec!["10.0.0.4".parse().unwrap()],
            ports: Vec::new(),
        }),
        local: true,
    });
    let changes = calc.flush();
    assert_eq!(calc.stats().endpoints_recomputed - before, 51);
    assert_eq!(changes.len(), 51);
}
