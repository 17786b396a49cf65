//! Every kind round-trips YAML → struct → YAML without loss, on fixtures written in the form
//! Calico's documentation uses, and every fixture passes validation.

use std::collections::BTreeSet;

use calico_model::{parse_documents, to_json, to_yaml, validate, Kind, Resource};
use serde::Deserialize;

const FIXTURES: &[(&str, &str)] = &[
    ("policies.yaml", include_str!("../fixtures/policies.yaml")),
    ("endpoints.yaml", include_str!("../fixtures/endpoints.yaml")),
    ("network.yaml", include_str!("../fixtures/network.yaml")),
    ("config.yaml", include_str!("../fixtures/config.yaml")),
    ("ipam.yaml", include_str!("../fixtures/ipam.yaml")),
    (
        "upstream-config.yaml",
        include_str!("../fixtures/upstream-config.yaml"),
    ),
    (
        "upstream-kinds.yaml",
        include_str!("../fixtures/upstream-kinds.yaml"),
    ),
];

/// The documents of a fixture as generic YAML values.
fn raw_documents(text: &str) -> Vec<serde_yaml_ng::Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).expect("fixture is valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

#[test]
fn every_fixture_round_trips_without_loss() {
    let mut kinds_seen = BTreeSet::new();
    for (file, text) in FIXTURES {
        let resources = parse_documents(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let raw = raw_documents(text);
        assert_eq!(resources.len(), raw.len(), "{file}: document count");
        for (resource, original) in resources.iter().zip(&raw) {
            kinds_seen.insert(resource.kind());
            let what = format!("{file}: {} {}", resource.kind(), resource.name());
            validate(resource).unwrap_or_else(|e| panic!("{what} fails validation: {e}"));

            // YAML out, compared as data with what was read in.
            let yaml = to_yaml(std::slice::from_ref(resource));
            let written: serde_yaml_ng::Value = serde_yaml_ng::from_str(&yaml).unwrap();
            assert_eq!(
                &written, original,
                "{what} changed on the way through:\n{yaml}"
            );

            // And back in again, from YAML and from JSON.
            let again = parse_documents(&yaml).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                again,
                std::slice::from_ref(resource),
                "{what}: YAML re-read differs"
            );
            let json = to_json(std::slice::from_ref(resource));
            let from_json = parse_documents(&json).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(
                from_json,
                std::slice::from_ref(resource),
                "{what}: JSON re-read differs"
            );
        }
    }
    let missing: Vec<Kind> = Kind::ALL
        .iter()
        .copied()
        .filter(|k| !kinds_seen.contains(k))
        .collect();
    assert!(missing.is_empty(), "kinds without a fixture: {missing:?}");
}

#[test]
fn lists_expand_to_their_items_and_print_back_as_lists() {
    let resources = parse_documents(include_str!("../fixtures/list.yaml")).unwrap();
    let names: Vec<&str> = resources.iter().map(Resource::name).collect();
    assert_eq!(names, ["pool-a", "pool-b"]);
    assert!(resources.iter().all(|r| r.kind() == Kind::IPPool));
    let yaml = to_yaml(&resources);
    assert!(yaml.contains("kind: IPPoolList"), "{yaml}");
    assert_eq!(parse_documents(&yaml).unwrap(), resources);
}

#[test]
fn kinds_resolve_from_names_plurals_and_aliases() {
    for (name, kind) in [
        ("NetworkPolicy", Kind::NetworkPolicy),
        ("networkpolicies", Kind::NetworkPolicy),
        ("netpol", Kind::NetworkPolicy),
        ("policy", Kind::NetworkPolicy),
        ("gnp", Kind::GlobalNetworkPolicy),
        ("ippool", Kind::IPPool),
        ("IPPools", Kind::IPPool),
        ("hep", Kind::HostEndpoint),
        ("wep", Kind::WorkloadEndpoint),
        ("bgppeer", Kind::BGPPeer),
        ("bgpfilters", Kind::BGPFilter),
        ("felixconfig", Kind::FelixConfiguration),
    ] {
        assert_eq!(Kind::from_name(name), Some(kind), "{name}");
    }
    assert_eq!(Kind::from_name("nosuchkind"), None);
    // Every plural is unique: it is the etcd key segment.
    let plurals: BTreeSet<&str> = Kind::ALL.iter().map(|k| k.plural()).collect();
    assert_eq!(plurals.len(), Kind::ALL.len());
}
