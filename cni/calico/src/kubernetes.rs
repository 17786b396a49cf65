//! Kubernetes mode: with `kubernetes.kubeconfig` in the network configuration and a pod's
//! `K8S_POD_*` args, both plugins read the pod (and its namespace) from the API, as upstream:
//! `calico` puts the pod's labels, service account and named ports on the endpoint at ADD,
//! `calico-ipam` honours the `cni.projectcalico.org/ipAddrs`, `ipv4pools` and `ipv6pools`
//! annotations (the pod's, else its namespace's pools).

use calico_k8s::{
    ipam_annotations,
    k8s_openapi::api::core::v1::{Namespace, Pod},
    kube::{Api, ResourceExt},
    IpamAnnotations, PodInfo, IPV4_POOLS_ANNOTATION, IPV6_POOLS_ANNOTATION, IP_ADDRS_ANNOTATION,
};

use crate::{
    identity::Workload,
    netconf::NetConf,
    protocol::{code, CniError},
};

/// The pod this call is for, read from the API with a client for the configured cluster;
/// `None` outside Kubernetes mode (no kubeconfig configured, or not a pod).
async fn read_pod(
    conf: &NetConf,
    workload: &Workload,
) -> Result<Option<(calico_k8s::kube::Client, Pod)>, CniError> {
    let (Some(kubeconfig), Some(pod_name)) = (conf.kubeconfig(), workload.pod.as_deref()) else {
        return Ok(None);
    };
    let client = calico_k8s::client(Some(&kubeconfig))
        .await
        .map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))?;
    let namespace = workload.namespace.as_str();
    let pod = Api::<Pod>::namespaced(client.clone(), namespace)
        .get(pod_name)
        .await
        .map_err(|e| unreadable(format!("pod {namespace}/{pod_name}"), e))?;
    Ok(Some((client, pod)))
}

fn unreadable(what: String, e: calico_k8s::kube::Error) -> CniError {
    CniError::new(
        code::TRY_AGAIN_LATER,
        format!("cannot read {what} from the Kubernetes API"),
    )
    .with_details(e.to_string())
}

/// What of the pod its endpoint carries (`calico`).
pub async fn pod_info(conf: &NetConf, workload: &Workload) -> Result<Option<PodInfo>, CniError> {
    Ok(read_pod(conf, workload)
        .await?
        .map(|(_, pod)| PodInfo::of(&pod)))
}

/// What the pod's annotations, and its namespace's, ask of IPAM (`calico-ipam`). The namespace
/// is read only when the pod's own annotations leave its pools open.
pub async fn ipam_request(
    conf: &NetConf,
    workload: &Workload,
) -> Result<IpamAnnotations, CniError> {
    let Some((client, pod)) = read_pod(conf, workload).await? else {
        return Ok(IpamAnnotations::default());
    };
    let namespace = workload.namespace.as_str();
    let own = pod.annotations();
    let settled = own.contains_key(IP_ADDRS_ANNOTATION)
        || (own.contains_key(IPV4_POOLS_ANNOTATION) && own.contains_key(IPV6_POOLS_ANNOTATION));
    let namespace_annotations = if settled {
        Default::default()
    } else {
        Api::<Namespace>::all(client)
            .get(namespace)
            .await
            .map_err(|e| unreadable(format!("namespace {namespace}"), e))?
            .annotations()
            .clone()
    };
    ipam_annotations(&pod.name_any(), own, namespace, &namespace_annotations)
        .map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))
}
