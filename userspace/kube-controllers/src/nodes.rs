//! Nodes: when a Kubernetes Node is deleted, what Calico held for it is released: its
//! WorkloadEndpoints, every address allocated for it, its block affinities and blocks, and its
//! Calico Node. At start, the same for every Kubernetes node Calico still knows of that the
//! API no longer has (deleted while this controller was down).

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use calico_datastore::Datastore;
use calico_ipam::Ipam;
use calico_model::{k8s, Kind, Resource};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    runtime::{watcher, watcher::Event, WatchStreamExt},
    Api, Client, ResourceExt,
};

use crate::{
    metrics::Metrics,
    writes::{remove, retrying, Outcome},
};

pub const CONTROLLER: &str = "node";

/// Nodes Calico's datastore knows as Kubernetes nodes: named by a Kubernetes workload
/// endpoint, by an address allocated for a pod, or by a Calico Node's `k8s` orchestrator
/// reference. (A Docker or plain-CNI host sharing the datastore is none of these, so it is
/// never taken for a deleted Kubernetes node.)
pub fn kubernetes_nodes_in(resources: &[Resource]) -> BTreeSet<String> {
    let mut nodes = BTreeSet::new();
    for r in resources {
        match r {
            Resource::WorkloadEndpoint(w) if w.spec.orchestrator == k8s::K8S_ORCHESTRATOR_NAME => {
                nodes.insert(w.spec.node.clone());
            }
            Resource::IPAMBlock(b) => {
                for attr in &b.spec.attributes {
                    if attr.secondary.contains_key("pod") {
                        if let Some(node) = attr.secondary.get("node") {
                            nodes.insert(node.clone());
                        }
                    }
                }
            }
            Resource::Node(n)
                if n.spec
                    .orch_refs
                    .iter()
                    .any(|o| o.orchestrator == k8s::K8S_ORCHESTRATOR_NAME) =>
            {
                nodes.insert(n.metadata.name.clone());
            }
            _ => {}
        }
    }
    nodes.remove("");
    nodes
}

/// Where the labels last copied from the Kubernetes node are recorded on the Calico Node (as
/// upstream records them), so a label removed in Kubernetes is removed here and labels set on
/// the Calico Node by hand stay.
pub const KUBE_LABELS_ANNOTATION: &str = "projectcalico.org/kube-labels";

/// The Calico Node's labels and annotation after copying `kube` (the Kubernetes node's labels)
/// onto `labels`, given what was copied last time (`previous`). `None` when nothing changes.
pub fn synced_labels(
    labels: &BTreeMap<String, String>,
    previous: &BTreeMap<String, String>,
    kube: &BTreeMap<String, String>,
) -> Option<BTreeMap<String, String>> {
    let mut next = labels.clone();
    for key in previous.keys() {
        if !kube.contains_key(key) {
            next.remove(key);
        }
    }
    next.extend(kube.iter().map(|(k, v)| (k.clone(), v.clone())));
    (next != *labels || previous != kube).then_some(next)
}

/// Copies a Kubernetes node's labels onto the Calico Node of the same name, when there is one
/// (calico-node registers it).
async fn sync_labels(store: &Datastore, metrics: &Metrics, node: &Node) {
    let name = node.name_any();
    let what = format!("Node {name} (labels)");
    retrying(CONTROLLER, &what, metrics, || async {
        let mut calico = match store.get(Kind::Node, None, &name).await {
            Ok(r) => r,
            Err(calico_datastore::DatastoreError::NotFound { .. }) => {
                return Ok(Outcome::Unchanged)
            }
            Err(e) => return Err(e),
        };
        let meta = calico.metadata_mut();
        let previous: BTreeMap<String, String> = meta
            .annotations
            .get(KUBE_LABELS_ANNOTATION)
            .and_then(|a| serde_json::from_str(a).ok())
            .unwrap_or_default();
        let Some(labels) = synced_labels(&meta.labels, &previous, node.labels()) else {
            return Ok(Outcome::Unchanged);
        };
        meta.labels = labels;
        meta.annotations.insert(
            KUBE_LABELS_ANNOTATION.to_owned(),
            serde_json::to_string(node.labels()).expect("labels serialize"),
        );
        match store.update(calico).await {
            Ok(_) => Ok(Outcome::Updated),
            // Someone else wrote in between: the next event (or relist) syncs again.
            Err(calico_datastore::DatastoreError::Conflict { .. }) => Ok(Outcome::Unchanged),
            Err(e) => Err(e),
        }
    })
    .await;
}

/// Runs until the process ends.
pub async fn run(client: Client, store: Datastore, metrics: Arc<Metrics>, copy_labels: bool) {
    let api: Api<Node> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listed: BTreeSet<String> = BTreeSet::new();
    while let Some(event) = events.next().await {
        match event {
            Err(e) => {
                tracing::warn!(controller = CONTROLLER, error = %e, "node watch failed; retrying");
                metrics.error(CONTROLLER);
            }
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(node)) => {
                listed.insert(node.name_any());
                if copy_labels {
                    sync_labels(&store, &metrics, &node).await;
                }
            }
            Ok(Event::InitDone) => {
                match known_nodes(&store).await {
                    Ok(known) => {
                        for gone in known.difference(&listed) {
                            release(&store, &metrics, gone).await;
                        }
                        metrics.set_synced(CONTROLLER);
                        tracing::info!(
                            controller = CONTROLLER,
                            nodes = listed.len(),
                            "in sync with the Kubernetes API"
                        );
                    }
                    Err(e) => {
                        // Not synced: readiness stays false, and the next relist tries again.
                        tracing::error!(controller = CONTROLLER, error = %e, "cannot read the datastore's nodes");
                        metrics.error(CONTROLLER);
                    }
                }
            }
            Ok(Event::Apply(node)) => {
                if copy_labels {
                    sync_labels(&store, &metrics, &node).await;
                }
            }
            Ok(Event::Delete(node)) => release(&store, &metrics, &node.name_any()).await,
        }
    }
}

async fn known_nodes(
    store: &Datastore,
) -> Result<BTreeSet<String>, calico_datastore::DatastoreError> {
    let mut all = Vec::new();
    for kind in [Kind::WorkloadEndpoint, Kind::IPAMBlock, Kind::Node] {
        all.extend(store.list(kind, None).await?.0);
    }
    Ok(kubernetes_nodes_in(&all))
}

/// Releases everything Calico holds for `node`. Endpoints first, so no endpoint ever names an
/// address another pod may be given.
async fn release(store: &Datastore, metrics: &Metrics, node: &str) {
    tracing::info!(
        controller = CONTROLLER,
        node,
        "node deleted in Kubernetes; releasing what it held"
    );
    let endpoints = loop {
        match store.list(Kind::WorkloadEndpoint, None).await {
            Ok((all, _)) => break all,
            Err(e) => {
                tracing::warn!(controller = CONTROLLER, error = %e, "cannot list endpoints; retrying");
                metrics.error(CONTROLLER);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    };
    for endpoint in endpoints {
        let Resource::WorkloadEndpoint(w) = &endpoint else {
            continue;
        };
        if w.spec.node != node {
            continue;
        }
        let namespace = w.metadata.namespace.clone();
        let what = format!(
            "WorkloadEndpoint {}/{} (node {node} deleted)",
            namespace.as_deref().unwrap_or_default(),
            w.metadata.name
        );
        retrying(CONTROLLER, &what, metrics, || {
            remove(
                store,
                Kind::WorkloadEndpoint,
                namespace.as_deref(),
                &w.metadata.name,
            )
        })
        .await;
    }
    let ipam = Ipam::new(store.clone(), node);
    loop {
        match ipam.release_node(node).await {
            Ok(released) => {
                tracing::info!(
                    controller = CONTROLLER,
                    node,
                    ?released,
                    "released the node's addresses and blocks"
                );
                metrics.ipam_released(released.len() as u64);
                break;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(controller = CONTROLLER, node, error = %e, "releasing the node's addresses; retrying");
                metrics.error(CONTROLLER);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(e) => {
                tracing::error!(controller = CONTROLLER, node, error = %e, "cannot release the node's addresses");
                metrics.error(CONTROLLER);
                return;
            }
        }
    }
    let what = format!("Node {node}");
    retrying(CONTROLLER, &what, metrics, || {
        remove(store, Kind::Node, None, node)
    })
    .await;
    metrics.node_cleaned();
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
    fn kubernetes_labels_are_copied_and_removed_and_hand_set_ones_kept() {
        // First sync: the Kubernetes labels join the hand-set one.
        let calico = map(&[("rack", "r1")]);
        let kube = map(&[("zone", "a"), ("kubernetes.io/os", "linux")]);
        let next = synced_labels(&calico, &BTreeMap::new(), &kube).unwrap();
        assert_eq!(
            next,
            map(&[("rack", "r1"), ("zone", "a"), ("kubernetes.io/os", "linux")])
        );
        // Nothing changed since: nothing to write.
        assert_eq!(synced_labels(&next, &kube, &kube), None);
        // A label removed in Kubernetes goes; one changed follows; the hand-set one stays.
        let kube2 = map(&[("zone", "b")]);
        let next2 = synced_labels(&next, &kube, &kube2).unwrap();
        assert_eq!(next2, map(&[("rack", "r1"), ("zone", "b")]));
    }

    #[test]
    fn kubernetes_nodes_are_found_by_endpoint_allocation_or_orchestrator_reference() {
        let docs = calico_model::parse_documents(
            "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: n1-k8s-a-eth0, namespace: x}\nspec: {orchestrator: k8s, node: n1, pod: a, endpoint: eth0, interfaceName: cali1, ipNetworks: [10.0.0.1/32]}\n---\napiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: d1-cni-c-eth0, namespace: default}\nspec: {orchestrator: cni, node: docker1, workload: c, endpoint: eth0, interfaceName: cali2, ipNetworks: [10.0.0.2/32]}\n---\napiVersion: projectcalico.org/v3\nkind: IPAMBlock\nmetadata: {name: 10-0-1-0-26}\nspec: {cidr: 10.0.1.0/26, allocations: [0], unallocated: [], attributes: [{handle_id: h, secondary: {node: n2, pod: b, namespace: x}}]}\n---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: n3}\nspec: {orchRefs: [{orchestrator: k8s, nodeName: n3}]}\n---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {name: docker1}\nspec: {}\n",
        )
        .unwrap();
        assert_eq!(
            kubernetes_nodes_in(&docs),
            ["n1", "n2", "n3"].map(str::to_owned).into()
        );
    }
}
