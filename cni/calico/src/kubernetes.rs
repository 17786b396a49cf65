//! Kubernetes mode: with `kubernetes.kubeconfig` in the network configuration and a pod's
//! `K8S_POD_*` args, both plugins read the pod (and its namespace) from the API, as upstream:
//! `calico` puts the pod's labels, service account and named ports on the endpoint at ADD,
//! `calico-ipam` honours the `cni.projectcalico.org/ipAddrs`, `ipv4pools` and `ipv6pools`
//! annotations (the pod's, else its namespace's pools).

use calico_k8s::{
    ipam_annotations,
    k8s_openapi::api::core::v1::{Namespace, Pod},
    kube::{Api, ResourceExt},
    IpamAnnotations, PodInfo,
};

use crate::{
    identity::Workload,
    netconf::NetConf,
    protocol::{code, CniError},
};

/// What the API says of the pod this call is for.
pub struct PodFacts {
    pub info: PodInfo,
    pub ipam: IpamAnnotations,
}

/// Reads the pod and its namespace; `None` outside Kubernetes mode (no kubeconfig configured,
/// or not a pod).
pub async fn pod_facts(conf: &NetConf, workload: &Workload) -> Result<Option<PodFacts>, CniError> {
    let (Some(kubeconfig), Some(pod_name)) = (conf.kubeconfig(), workload.pod.as_deref()) else {
        return Ok(None);
    };
    let namespace = workload.namespace.as_str();
    let fail = |what: String, e: String| {
        CniError::new(
            code::TRY_AGAIN_LATER,
            format!("cannot read {what} from the Kubernetes API"),
        )
        .with_details(e)
    };
    let client = calico_k8s::client(Some(&kubeconfig))
        .await
        .map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))?;
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(pod_name)
        .await
        .map_err(|e| fail(format!("pod {namespace}/{pod_name}"), e.to_string()))?;
    let ns = Api::<Namespace>::all(client)
        .get(namespace)
        .await
        .map_err(|e| fail(format!("namespace {namespace}"), e.to_string()))?;
    let ipam = ipam_annotations(pod_name, pod.annotations(), namespace, ns.annotations())
        .map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))?;
    Ok(Some(PodFacts {
        info: PodInfo::of(&pod),
        ipam,
    }))
}
