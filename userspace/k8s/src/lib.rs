//! What calico-kube-controllers and the CNI plugin read from the Kubernetes API, in one place:
//! a client from a kubeconfig, what of a pod its workload endpoint carries, and the
//! `cni.projectcalico.org/*` IPAM annotations of pods and namespaces (upstream's names).

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use calico_model::{spec::WorkloadEndpointPort, Protocol};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

pub use k8s_openapi;
pub use kube;

/// Errors reading from the Kubernetes API or its configuration.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("annotation {annotation} on {object}: {message}")]
    Annotation {
        annotation: &'static str,
        object: String,
        message: String,
    },
}

/// A client for the cluster `kubeconfig` names; without one, the in-cluster service account
/// (or `~/.kube/config`), as client-go infers it.
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, K8sError> {
    let config = match kubeconfig {
        Some(path) => {
            let fail = |message: String| K8sError::Kubeconfig {
                path: path.display().to_string(),
                message,
            };
            let file =
                kube::config::Kubeconfig::read_from(path).map_err(|e| fail(e.to_string()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| fail(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| K8sError::Kubeconfig {
                path: "(inferred)".to_owned(),
                message: e.to_string(),
            })?,
    };
    Ok(kube::Client::try_from(config)?)
}

/// What of a pod its workload endpoint carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodInfo {
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    /// The containers' named ports (what rules' named ports resolve to), as upstream's CNI
    /// plugin records them.
    pub ports: Vec<WorkloadEndpointPort>,
}

impl PodInfo {
    pub fn of(pod: &Pod) -> Self {
        let spec = pod.spec.as_ref();
        Self {
            labels: pod.labels().clone(),
            service_account: spec
                .and_then(|s| s.service_account_name.clone())
                .filter(|s| !s.is_empty()),
            ports: spec
                .into_iter()
                .flat_map(|s| &s.containers)
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| {
                    Some(WorkloadEndpointPort {
                        name: p.name.clone().filter(|n| !n.is_empty())?,
                        protocol: Protocol::Name(
                            p.protocol.clone().unwrap_or_else(|| "TCP".to_owned()),
                        ),
                        port: i64::from(p.container_port),
                        host_port: None,
                        host_ip: None,
                    })
                })
                .collect(),
        }
    }
}

pub const IP_ADDRS_ANNOTATION: &str = "cni.projectcalico.org/ipAddrs";
pub const IPV4_POOLS_ANNOTATION: &str = "cni.projectcalico.org/ipv4pools";
pub const IPV6_POOLS_ANNOTATION: &str = "cni.projectcalico.org/ipv6pools";

/// What the annotations ask of IPAM for one pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IpamAnnotations {
    /// Exactly these addresses (`ipAddrs`); empty: assign from pools.
    pub ip_addrs: Vec<IpAddr>,
    /// Pools (names or CIDRs) to assign from; `None`: as the network configuration says.
    pub ipv4_pools: Option<Vec<String>>,
    pub ipv6_pools: Option<Vec<String>>,
}

/// Reads the IPAM annotations: the pod's win over its namespace's (pools only: `ipAddrs` is
/// per pod), as upstream.
pub fn ipam_annotations(
    pod_name: &str,
    pod: &BTreeMap<String, String>,
    namespace_name: &str,
    namespace: &BTreeMap<String, String>,
) -> Result<IpamAnnotations, K8sError> {
    let list = |annotations: &BTreeMap<String, String>,
                key: &'static str,
                object: &str|
     -> Result<Option<Vec<String>>, K8sError> {
        annotations
            .get(key)
            .map(|text| {
                serde_json::from_str::<Vec<String>>(text).map_err(|e| K8sError::Annotation {
                    annotation: key,
                    object: object.to_owned(),
                    message: format!("`{text}` is not a JSON list of strings: {e}"),
                })
            })
            .transpose()
    };
    let pod_object = format!("pod {pod_name}");
    let ns_object = format!("namespace {namespace_name}");
    let ip_addrs = list(pod, IP_ADDRS_ANNOTATION, &pod_object)?
        .unwrap_or_default()
        .iter()
        .map(|a| {
            a.parse::<IpAddr>().map_err(|_| K8sError::Annotation {
                annotation: IP_ADDRS_ANNOTATION,
                object: pod_object.clone(),
                message: format!("`{a}` is not an IP address"),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pools = |key| -> Result<Option<Vec<String>>, K8sError> {
        Ok(match list(pod, key, &pod_object)? {
            Some(p) => Some(p),
            None => list(namespace, key, &ns_object)?,
        })
    };
    let annotations = IpamAnnotations {
        ipv4_pools: pools(IPV4_POOLS_ANNOTATION)?,
        ipv6_pools: pools(IPV6_POOLS_ANNOTATION)?,
        ip_addrs,
    };
    if !annotations.ip_addrs.is_empty()
        && (pod.contains_key(IPV4_POOLS_ANNOTATION) || pod.contains_key(IPV6_POOLS_ANNOTATION))
    {
        return Err(K8sError::Annotation {
            annotation: IP_ADDRS_ANNOTATION,
            object: pod_object,
            message: "cannot be used together with the ipv4pools/ipv6pools annotations".to_owned(),
        });
    }
    Ok(annotations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn pod_pools_win_over_the_namespace_s() {
        let got = ipam_annotations(
            "p",
            &map(&[(IPV4_POOLS_ANNOTATION, r#"["blue"]"#)]),
            "ns",
            &map(&[
                (IPV4_POOLS_ANNOTATION, r#"["red"]"#),
                (IPV6_POOLS_ANNOTATION, r#"["fd00::/64"]"#),
            ]),
        )
        .unwrap();
        assert_eq!(got.ipv4_pools, Some(vec!["blue".to_owned()]));
        assert_eq!(got.ipv6_pools, Some(vec!["fd00::/64".to_owned()]));
        assert!(got.ip_addrs.is_empty());
        let none = ipam_annotations("p", &map(&[]), "ns", &map(&[])).unwrap();
        assert_eq!(none, IpamAnnotations::default());
    }

    #[test]
    fn ip_addrs_are_parsed_and_bad_ones_named() {
        let got = ipam_annotations(
            "p",
            &map(&[(IP_ADDRS_ANNOTATION, r#"["10.0.0.7", "fd00::7"]"#)]),
            "ns",
            &map(&[]),
        )
        .unwrap();
        assert_eq!(got.ip_addrs.len(), 2);
        let err = ipam_annotations(
            "p",
            &map(&[(IP_ADDRS_ANNOTATION, r#"["10.0.0.300"]"#)]),
            "ns",
            &map(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cni.projectcalico.org/ipAddrs on pod p") && err.contains("10.0.0.300"),
            "{err}"
        );
        let err = ipam_annotations(
            "p",
            &map(&[(IPV4_POOLS_ANNOTATION, "blue")]),
            "ns",
            &map(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not a JSON list"), "{err}");
        let err = ipam_annotations(
            "p",
            &map(&[
                (IP_ADDRS_ANNOTATION, r#"["10.0.0.7"]"#),
                (IPV4_POOLS_ANNOTATION, r#"["x"]"#),
            ]),
            "ns",
            &map(&[]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("together"), "{err}");
    }

    #[test]
    fn named_container_ports_are_collected() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "api", "containers": [
                {"name": "a", "ports": [{"name": "http", "containerPort": 80}, {"containerPort": 9}]},
                {"name": "b", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]}
            ]}
        }))
        .unwrap();
        let info = PodInfo::of(&pod);
        assert_eq!(info.labels["app"], "web");
        assert_eq!(info.service_account.as_deref(), Some("api"));
        let names: Vec<(&str, i64)> = info
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect();
        assert_eq!(names, vec![("http", 80), ("dns", 53)]);
        assert_eq!(info.ports[1].protocol, Protocol::Name("UDP".into()));
    }
}
