//! `calicoctl convert`: Kubernetes NetworkPolicy (networking.k8s.io/v1) to Calico NetworkPolicy,
//! with upstream's naming (`knp.default.<name>`, order 1000) and semantics.

use std::collections::BTreeMap;

use anyhow::{anyhow, bail, Result};
use calico_model::{validate, Kind, Resource, API_VERSION};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct K8sPolicy {
    api_version: String,
    kind: String,
    metadata: K8sMeta,
    #[serde(default)]
    spec: K8sSpec,
}

#[derive(Deserialize)]
struct K8sMeta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct K8sSpec {
    #[serde(default)]
    pod_selector: LabelSelector,
    #[serde(default)]
    policy_types: Vec<String>,
    #[serde(default)]
    ingress: Vec<K8sIngress>,
    #[serde(default)]
    egress: Vec<K8sEgress>,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LabelSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
    #[serde(default)]
    match_expressions: Vec<Requirement>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Requirement {
    key: String,
    operator: String,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sIngress {
    #[serde(default)]
    from: Vec<Peer>,
    #[serde(default)]
    ports: Vec<K8sPort>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct K8sEgress {
    #[serde(default)]
    to: Vec<Peer>,
    #[serde(default)]
    ports: Vec<K8sPort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Peer {
    pod_selector: Option<LabelSelector>,
    namespace_selector: Option<LabelSelector>,
    ip_block: Option<IpBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IpBlock {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct K8sPort {
    protocol: Option<String>,
    port: Option<Value>,
    end_port: Option<i64>,
}

const K8S_ORCHESTRATOR: &str = "projectcalico.org/orchestrator == 'k8s'";

/// Converts every Kubernetes NetworkPolicy in `text` (YAML or JSON, one or many documents).
pub fn k8s_to_calico(text: &str) -> Result<Vec<Resource>> {
    let mut out = Vec::new();
    for (index, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml_ng::Value::deserialize(doc).map_err(|e| {
            let at = e
                .location()
                .map(|l| format!("line {}, column {}: ", l.line(), l.column()));
            anyhow!("{}{e}", at.unwrap_or_default())
        })?;
        if value.is_null() {
            continue;
        }
        let policy: K8sPolicy =
            serde_path_to_error_free(value).map_err(|e| anyhow!("document {}: {e}", index + 1))?;
        if policy.kind != "NetworkPolicy" || policy.api_version != "networking.k8s.io/v1" {
            bail!(
                "document {}: expected apiVersion networking.k8s.io/v1 kind NetworkPolicy, got {} {}",
                index + 1,
                policy.api_version,
                policy.kind
            );
        }
        out.push(convert_one(policy)?);
    }
    Ok(out)
}

fn serde_path_to_error_free(value: serde_yaml_ng::Value) -> Result<K8sPolicy> {
    let mut track = serde_path_to_error::Track::new();
    K8sPolicy::deserialize(serde_path_to_error::Deserializer::new(value, &mut track))
        .map_err(|e| anyhow!("{}: {e}", track.path()))
}

fn convert_one(p: K8sPolicy) -> Result<Resource> {
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
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .flatten()
        .collect();
    let egress: Vec<Value> = p
        .spec
        .egress
        .iter()
        .map(|r| rules(&r.to, &r.ports, "destination"))
        .collect::<Result<Vec<_>>>()?
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
        "metadata": { "name": format!("knp.default.{}", p.metadata.name), "namespace": namespace },
        "spec": spec,
    });
    let resource = Resource::deserialize_as(Kind::NetworkPolicy, value)
        .map_err(|e| anyhow!("{}: {}", e.path(), e.inner()))?;
    validate(&resource).map_err(|e| anyhow!("converted policy is invalid: {e}"))?;
    Ok(resource)
}

/// One Calico rule per (peer, port) pair, as upstream expands them.
fn rules(peers: &[Peer], ports: &[K8sPort], side: &str) -> Result<Vec<Value>> {
    let port_matches: Vec<(Option<String>, Option<Value>)> = if ports.is_empty() {
        vec![(None, None)]
    } else {
        ports.iter().map(port_match).collect::<Result<_>>()?
    };
    let peer_matches: Vec<Value> = if peers.is_empty() {
        vec![json!({})]
    } else {
        peers.iter().map(peer_match).collect::<Result<_>>()?
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

fn port_match(port: &K8sPort) -> Result<(Option<String>, Option<Value>)> {
    let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".to_owned());
    let value = match (&port.port, port.end_port) {
        (None, _) => None,
        (Some(Value::Number(n)), Some(end)) => Some(json!(format!("{n}:{end}"))),
        (Some(v @ (Value::Number(_) | Value::String(_))), None) => Some(v.clone()),
        (Some(other), _) => bail!("port `{other}` must be a number or a port name"),
    };
    Ok((Some(protocol), value))
}

fn peer_match(peer: &Peer) -> Result<Value> {
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
        (None, None) => bail!("a peer needs podSelector, namespaceSelector or ipBlock"),
    }
    Ok(m)
}

fn pod_selector(sel: &LabelSelector) -> Result<String> {
    let mut parts = vec![K8S_ORCHESTRATOR.to_owned()];
    parts.extend(requirements(sel)?);
    Ok(parts.join(" && "))
}

fn namespace_selector(sel: &LabelSelector) -> Result<String> {
    let parts = requirements(sel)?;
    Ok(if parts.is_empty() {
        "all()".to_owned()
    } else {
        parts.join(" && ")
    })
}

fn requirements(sel: &LabelSelector) -> Result<Vec<String>> {
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
            other => bail!(
                "matchExpressions operator `{other}` is not In, NotIn, Exists or DoesNotExist"
            ),
        });
    }
    Ok(parts)
}
