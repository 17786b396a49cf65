//! Kubernetes objects in Calico's model, as upstream's Kubernetes integration writes them:
//! NetworkPolicy → `knp.default.<name>` NetworkPolicy (order 1000), Namespace → Profile
//! `kns.<namespace>`, ServiceAccount → Profile `ksa.<namespace>.<name>`. One piece of code for
//! `calicoctl convert` and calico-kube-controllers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{validate, Kind, Resource, API_VERSION};

/// Name prefix of the Calico policy written for a Kubernetes NetworkPolicy.
pub const NETWORK_POLICY_PREFIX: &str = "knp.default.";
/// Name prefix of the profile written for each namespace; its `labelsToApply` carries the
/// namespace's labels as `pcns.<key>`, which `namespaceSelector` matches.
pub const NAMESPACE_PROFILE_PREFIX: &str = "kns.";
pub const NAMESPACE_LABEL_PREFIX: &str = "pcns.";
/// Name prefix of the profile written for each service account (`ksa.<namespace>.<name>`);
/// its labels are `pcsa.<key>`, which `serviceAccountSelector` matches.
pub const SERVICE_ACCOUNT_PROFILE_PREFIX: &str = "ksa.";
pub const SERVICE_ACCOUNT_LABEL_PREFIX: &str = "pcsa.";
/// The label naming an object itself among its prefixed labels (`pcns.projectcalico.org/name`).
pub const NAME_LABEL: &str = "projectcalico.org/name";
/// Labels upstream puts on every Kubernetes workload endpoint.
pub const NAMESPACE_LABEL: &str = "projectcalico.org/namespace";
pub const ORCHESTRATOR_LABEL: &str = "projectcalico.org/orchestrator";
pub const SERVICE_ACCOUNT_LABEL: &str = "projectcalico.org/serviceaccount";
pub const K8S_ORCHESTRATOR_NAME: &str = "k8s";

/// Why a Kubernetes object could not be converted (with the field path or document).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConvertError(pub String);

/// The profile for namespace `namespace` with its `labels`: allow in and out (namespaces do not
/// isolate by themselves) and the labels to apply, as upstream's namespace controller writes it.
pub fn namespace_profile(namespace: &str, labels: &BTreeMap<String, String>) -> Resource {
    profile(
        format!("{NAMESPACE_PROFILE_PREFIX}{namespace}"),
        NAMESPACE_LABEL_PREFIX,
        namespace,
        labels,
        json!([{ "action": "Allow" }]),
    )
}

/// The profile for service account `name` in `namespace`: labels only, no rules.
pub fn service_account_profile(
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Resource {
    profile(
        format!("{SERVICE_ACCOUNT_PROFILE_PREFIX}{namespace}.{name}"),
        SERVICE_ACCOUNT_LABEL_PREFIX,
        name,
        labels,
        Value::Null,
    )
}

fn profile(
    profile_name: String,
    prefix: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    rules: Value,
) -> Resource {
    let mut apply: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v.clone()))
        .collect();
    apply.insert(format!("{prefix}{NAME_LABEL}"), name.to_owned());
    let mut spec = json!({ "labelsToApply": apply });
    if !rules.is_null() {
        spec["ingress"] = rules.clone();
        spec["egress"] = rules;
    }
    Resource::deserialize_as(
        Kind::Profile,
        json!({
            "apiVersion": API_VERSION,
            "kind": "Profile",
            "metadata": { "name": profile_name },
            "spec": spec,
        }),
    )
    .expect("a profile built from strings always deserializes")
}

/// The labels upstream puts on a Kubernetes pod's workload endpoint: the pod's own, its
/// namespace, orchestrator and (when it has one) service account.
pub fn pod_endpoint_labels(
    namespace: &str,
    pod_labels: &BTreeMap<String, String>,
    service_account: Option<&str>,
) -> BTreeMap<String, String> {
    let mut labels = pod_labels.clone();
    labels.insert(NAMESPACE_LABEL.to_owned(), namespace.to_owned());
    labels.insert(
        ORCHESTRATOR_LABEL.to_owned(),
        K8S_ORCHESTRATOR_NAME.to_owned(),
    );
    if let Some(sa) = service_account.filter(|s| !s.is_empty()) {
        labels.insert(SERVICE_ACCOUNT_LABEL.to_owned(), sa.to_owned());
    }
    labels
}

/// The profiles of a Kubernetes pod's workload endpoint: its namespace's and (when it has one)
/// its service account's.
pub fn pod_endpoint_profiles(namespace: &str, service_account: Option<&str>) -> Vec<String> {
    let mut profiles = vec![format!("{NAMESPACE_PROFILE_PREFIX}{namespace}")];
    if let Some(sa) = service_account.filter(|s| !s.is_empty()) {
        profiles.push(format!("{SERVICE_ACCOUNT_PROFILE_PREFIX}{namespace}.{sa}"));
    }
    profiles
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sPolicy {
    api_version: String,
    kind: String,
    metadata: K8sMeta,
    #[serde(default)]
    spec: KubernetesNetworkPolicySpec,
}

#[derive(Deserialize)]
struct K8sMeta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

/// A Kubernetes NetworkPolicy's spec (networking.k8s.io/v1), as a StagedKubernetesNetworkPolicy
/// carries it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubernetesNetworkPolicySpec {
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress: Vec<K8sIngress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<K8sEgress>,
}

/// A Kubernetes label selector.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sIngress {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<K8sPort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct K8sEgress {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Peer>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<K8sPort>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub except: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct K8sPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

const K8S_ORCHESTRATOR: &str = "projectcalico.org/orchestrator == 'k8s'";

/// Converts every Kubernetes NetworkPolicy in `text` (YAML or JSON, one or many documents), as
/// `calicoctl convert` reads files.
pub fn network_policies_from_text(text: &str) -> Result<Vec<Resource>, ConvertError> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("line {}, column {}: ", l.line(), l.column()));
            ConvertError(format!("{}{e}", at.unwrap_or_default()))
        })?;
        if value.is_null() {
            continue;
        }
        let value = serde_json::to_value(value)
            .map_err(|e| ConvertError(format!("document {}: {e}", index + 1)))?;
        out.push(
            network_policy(value)
                .map_err(|e| ConvertError(format!("document {}: {}", index + 1, e.0)))?,
        );
    }
    Ok(out)
}

/// Converts one Kubernetes NetworkPolicy object (as the API serves it, or as a file holds it)
/// to the Calico NetworkPolicy upstream writes for it.
pub fn network_policy(value: serde_json::Value) -> Result<Resource, ConvertError> {
    let mut track = serde_path_to_error::Track::new();
    let policy = K8sPolicy::deserialize(serde_path_to_error::Deserializer::new(value, &mut track))
        .map_err(|e| ConvertError(format!("{}: {e}", track.path())))?;
    if policy.kind != "NetworkPolicy" || policy.api_version != "networking.k8s.io/v1" {
        return Err(ConvertError(format!(
            "expected apiVersion networking.k8s.io/v1 kind NetworkPolicy, got {} {}",
            policy.api_version, policy.kind
        )));
    }
    convert_one(policy)
}

/// The Calico policy a Kubernetes NetworkPolicy spec stands for, named as upstream names it
/// (`knp.default.<name>` in `namespace`): what a StagedKubernetesNetworkPolicy would enforce.
pub fn network_policy_from_spec(
    name: &str,
    namespace: &str,
    spec: &KubernetesNetworkPolicySpec,
) -> Result<Resource, ConvertError> {
    convert_one(K8sPolicy {
        api_version: "networking.k8s.io/v1".to_owned(),
        kind: "NetworkPolicy".to_owned(),
        metadata: K8sMeta {
            name: name.to_owned(),
            namespace: Some(namespace.to_owned()),
        },
        spec: spec.clone(),
    })
}

fn convert_one(p: K8sPolicy) -> Result<Resource, ConvertError> {
    let namespace = p.metadata.namespace.unwrap_or_else(|| "default".to_owned());
    let types: Vec<String> = if p.spec.policy_types.is_empty() {
        let mut t = vec!["Ingress".to_owned()];
        if !p.spec.egress.is_empty() {
            t.push("Egress".to_owned());
        }
        t
    } else {
        p.spec.policy_types.clone()
    };
    let ingress: Vec<Value> = p
        .spec
        .ingress
        .iter()
        .map(|r| rules(&r.from, &r.ports, "source"))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let egress: Vec<Value> = p
        .spec
        .egress
        .iter()
        .map(|r| rules(&r.to, &r.ports, "destination"))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .flatten()
        .collect();
    let mut spec = json!({
        "order": 1000,
        "selector": pod_selector(&p.spec.pod_selector)?,
        "types": types,
    });
    if !ingress.is_empty() {
        spec["ingress"] = Value::Array(ingress);
    }
    if !egress.is_empty() {
        spec["egress"] = Value::Array(egress);
    }
    let value = json!({
        "apiVersion": API_VERSION,
        "kind": "NetworkPolicy",
        "metadata": { "name": format!("{NETWORK_POLICY_PREFIX}{}", p.metadata.name), "namespace": namespace },
        "spec": spec,
    });
    let resource = Resource::deserialize_as(Kind::NetworkPolicy, value)
        .map_err(|e| ConvertError(format!("{}: {}", e.path(), e.inner())))?;
    validate(&resource).map_err(|e| ConvertError(format!("converted policy is invalid: {e}")))?;
    Ok(resource)
}

/// One Calico rule per (peer, port) pair, as upstream expands them.
fn rules(peers: &[Peer], ports: &[K8sPort], side: &str) -> Result<Vec<Value>, ConvertError> {
    let port_matches: Vec<(Option<String>, Option<Value>)> = if ports.is_empty() {
        vec![(None, None)]
    } else {
        ports.iter().map(port_match).collect::<Result<_, _>>()?
    };
    let peer_matches: Vec<Value> = if peers.is_empty() {
        vec![json!({})]
    } else {
        peers.iter().map(peer_match).collect::<Result<_, _>>()?
    };
    let mut out = Vec::new();
    for (protocol, port) in &port_matches {
        for peer in &peer_matches {
            let mut rule = json!({ "action": "Allow" });
            if let Some(protocol) = protocol {
                rule["protocol"] = json!(protocol);
            }
            let mut entity = peer.clone();
            let mut dst_ports = None;
            if let Some(port) = port {
                dst_ports = Some(json!([port]));
            }
            if side == "source" {
                if !entity.as_object().is_some_and(|o| o.is_empty()) {
                    rule["source"] = entity;
                }
                if let Some(ports) = dst_ports {
                    rule["destination"] = json!({ "ports": ports });
                }
            } else {
                if let Some(ports) = dst_ports {
                    entity["ports"] = ports;
                }
                if !entity.as_object().is_some_and(|o| o.is_empty()) {
                    rule["destination"] = entity;
                }
            }
            out.push(rule);
        }
    }
    Ok(out)
}

fn port_match(port: &K8sPort) -> Result<(Option<String>, Option<Value>), ConvertError> {
    let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
    let value = match (&port.port, port.end_port) {
        (None, _) => None,
        (Some(Value::Number(n)), Some(end)) => Some(json!(format!("{n}:{end}"))),
        (Some(v @ (Value::Number(_) | Value::String(_))), None) => Some(v.clone()),
        (Some(other), _) => {
            return Err(ConvertError(format!(
                "port `{other}` must be a number or a port name"
            )))
        }
    };
    Ok((Some(protocol), value))
}

fn peer_match(peer: &Peer) -> Result<Value, ConvertError> {
    let mut m = json!({});
    if let Some(block) = &peer.ip_block {
        m["nets"] = json!([block.cidr]);
        if !block.except.is_empty() {
            m["notNets"] = json!(block.except);
        }
        return Ok(m);
    }
    match (&peer.pod_selector, &peer.namespace_selector) {
        (Some(pods), ns) => {
            m["selector"] = json!(pod_selector(pods)?);
            if let Some(ns) = ns {
                m["namespaceSelector"] = json!(namespace_selector(ns)?);
            }
        }
        (None, Some(ns)) => {
            m["selector"] = json!(K8S_ORCHESTRATOR);
            m["namespaceSelector"] = json!(namespace_selector(ns)?);
        }
        (None, None) => {
            return Err(ConvertError(
                "a peer needs podSelector, namespaceSelector or ipBlock".to_owned(),
            ))
        }
    }
    Ok(m)
}

fn pod_selector(sel: &LabelSelector) -> Result<String, ConvertError> {
    let mut parts = vec![K8S_ORCHESTRATOR.to_owned()];
    parts.extend(requirements(sel)?);
    Ok(parts.join(" && "))
}

fn namespace_selector(sel: &LabelSelector) -> Result<String, ConvertError> {
    let parts = requirements(sel)?;
    Ok(if parts.is_empty() {
        "all()".to_owned()
    } else {
        parts.join(" && ")
    })
}

fn requirements(sel: &LabelSelector) -> Result<Vec<String>, ConvertError> {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .map(|(k, v)| format!("{k} == '{v}'"))
        .collect();
    for r in &sel.match_expressions {
        let set = || {
            r.values
                .iter()
                .map(|v| format!("'{v}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        parts.push(match r.operator.as_str() {
            "In" => format!("{} in {{ {} }}", r.key, set()),
            "NotIn" => format!("{} not in {{ {} }}", r.key, set()),
            "Exists" => format!("has({})", r.key),
            "DoesNotExist" => format!("! has({})", r.key),
            other => {
                return Err(ConvertError(format!(
                    "matchExpressions operator `{other}` is not In, NotIn, Exists or DoesNotExist"
                )))
            }
        });
    }
    Ok(parts)
}
