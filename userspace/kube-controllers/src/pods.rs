//! Pods: each pod's labels and service account onto its WorkloadEndpoints (the CNI plugin
//! writes the endpoint; this keeps it current), and IPAM garbage collection: an address whose
//! pod no longer exists is released, with the pod's endpoints, once the grace period has
//! passed (a DEL the runtime never ran).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use calico_datastore::{keys::prefix_for, Datastore, WatchEvent};
use calico_ipam::{block, Ipam};
use calico_k8s::PodInfo;
use calico_model::{k8s, Kind, Resource};
use futures::StreamExt;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    runtime::{watcher, watcher::Event, WatchStreamExt},
    Api, Client, ResourceExt,
};

use crate::{metrics::Metrics, writes::retrying};

pub const CONTROLLER: &str = "workloadendpoint";
const GC: &str = "ipam-gc";

/// (namespace, pod name).
type PodId = (String, String);

/// The endpoint as it should be for `pod`, or `None` when it already is (labels: the pod's
/// plus upstream's `projectcalico.org/*`; profiles: the namespace's and service account's).
pub fn updated_endpoint(endpoint: &Resource, pod: &PodInfo) -> Option<Resource> {
    let Resource::WorkloadEndpoint(w) = endpoint else {
        return None;
    };
    let namespace = w.metadata.namespace.clone().unwrap_or_default();
    let sa = pod.service_account.as_deref();
    let labels = k8s::pod_endpoint_labels(&namespace, &pod.labels, sa);
    let profiles = k8s::pod_endpoint_profiles(&namespace, sa);
    let account = sa.unwrap_or_default();
    if w.metadata.labels == labels
        && w.spec.profiles == profiles
        && w.spec.service_account_name == account
        && w.spec.ports == pod.ports
    {
        return None;
    }
    let mut next = w.clone();
    next.metadata.labels = labels;
    next.spec.profiles = profiles;
    next.spec.service_account_name = account.to_owned();
    next.spec.ports = pod.ports.clone();
    Some(Resource::WorkloadEndpoint(next))
}

/// The pod a Kubernetes workload endpoint belongs to.
fn pod_of(endpoint: &Resource) -> Option<PodId> {
    match endpoint {
        Resource::WorkloadEndpoint(w)
            if w.spec.orchestrator == k8s::K8S_ORCHESTRATOR_NAME && !w.spec.pod.is_empty() =>
        {
            Some((w.metadata.namespace.clone()?, w.spec.pod.clone()))
        }
        _ => None,
    }
}

/// An allocation made for a Kubernetes pod (the CNI plugin records its namespace and name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAllocation {
    pub address: IpAddr,
    pub handle: String,
    pub pod: PodId,
}

/// The pod allocations of one block.
pub fn pod_allocations(
    cidr: &IpNet,
    spec: &calico_model::spec::IpamBlockSpec,
) -> Vec<PodAllocation> {
    spec.allocations
        .iter()
        .enumerate()
        .filter_map(|(ordinal, slot)| {
            let attr = spec.attributes.get((*slot)?)?;
            Some(PodAllocation {
                address: block::address(cidr, ordinal),
                handle: attr.handle_id.clone()?,
                pod: (
                    attr.secondary.get("namespace")?.clone(),
                    attr.secondary.get("pod")?.clone(),
                ),
            })
        })
        .collect()
}

/// Handles whose pod is missing, and since when: a handle is released only once it has been
/// missing for the whole grace period, seen missing at least twice.
#[derive(Debug, Default)]
pub struct LeakTracker {
    missing_since: HashMap<String, Instant>,
}

impl LeakTracker {
    /// Records one pass over the allocations: `orphaned` are the handles whose pod does not
    /// exist now. Returns the handles to release.
    pub fn observe(
        &mut self,
        now: Instant,
        orphaned: &BTreeSet<String>,
        grace: Duration,
    ) -> Vec<String> {
        self.missing_since.retain(|h, _| orphaned.contains(h));
        let mut due = Vec::new();
        for handle in orphaned {
            let since = *self.missing_since.entry(handle.clone()).or_insert(now);
            if now.duration_since(since) >= grace && since != now {
                due.push(handle.clone());
            }
        }
        for handle in &due {
            self.missing_since.remove(handle);
        }
        due
    }
}

struct State {
    pods: HashMap<PodId, PodInfo>,
    pods_listed: bool,
    endpoints: BTreeMap<(String, String), Resource>,
    by_pod: HashMap<PodId, BTreeSet<String>>,
    endpoints_listed: bool,
    leaks: LeakTracker,
}

impl State {
    fn add_endpoint(&mut self, endpoint: Resource) -> Option<PodId> {
        let pod = pod_of(&endpoint)?;
        let name = endpoint.name().to_owned();
        self.by_pod
            .entry(pod.clone())
            .or_default()
            .insert(name.clone());
        self.endpoints.insert((pod.0.clone(), name), endpoint);
        Some(pod)
    }

    fn remove_endpoint(&mut self, namespace: &str, name: &str) {
        if let Some(endpoint) = self
            .endpoints
            .remove(&(namespace.to_owned(), name.to_owned()))
        {
            if let Some(pod) = pod_of(&endpoint) {
                if let Some(names) = self.by_pod.get_mut(&pod) {
                    names.remove(name);
                    if names.is_empty() {
                        self.by_pod.remove(&pod);
                    }
                }
            }
        }
    }
}

/// Settings of the garbage collection (KubeControllersConfiguration `controllers.node`).
#[derive(Debug, Clone, Copy)]
pub struct GcSettings {
    pub period: Duration,
    pub grace: Duration,
}

/// Runs until the process ends.
pub async fn run(client: Client, store: Datastore, metrics: Arc<Metrics>, gc: GcSettings) {
    let api: Api<Pod> = Api::all(client);
    let mut pods = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut endpoints = store.watch(prefix_for(Kind::WorkloadEndpoint, None), None);
    let mut tick = tokio::time::interval(gc.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = State {
        pods: HashMap::new(),
        pods_listed: false,
        endpoints: BTreeMap::new(),
        by_pod: HashMap::new(),
        endpoints_listed: false,
        leaks: LeakTracker::default(),
    };
    let mut relisting: Option<HashMap<PodId, PodInfo>> = None;
    loop {
        tokio::select! {
            event = pods.next() => {
                let Some(event) = event else { return };
                match event {
                    Err(e) => {
                        tracing::warn!(controller = CONTROLLER, error = %e, "pod watch failed; retrying");
                        metrics.error(CONTROLLER);
                    }
                    Ok(Event::Init) => relisting = Some(HashMap::new()),
                    Ok(Event::InitApply(pod)) => {
                        if let Some(list) = relisting.as_mut() {
                            list.insert(pod_id(&pod), PodInfo::of(&pod));
                        }
                    }
                    Ok(Event::InitDone) => {
                        state.pods = relisting.take().unwrap_or_default();
                        state.pods_listed = true;
                        reconcile_all(&mut state, &store, &metrics).await;
                    }
                    Ok(Event::Apply(pod)) => {
                        let id = pod_id(&pod);
                        state.pods.insert(id.clone(), PodInfo::of(&pod));
                        reconcile(&state, &store, &metrics, &id).await;
                    }
                    Ok(Event::Delete(pod)) => {
                        state.pods.remove(&pod_id(&pod));
                    }
                }
            }
            event = endpoints.next() => {
                let Some(event) = event else { return };
                match event {
                    WatchEvent::Snapshot { resources, .. } => {
                        state.endpoints.clear();
                        state.by_pod.clear();
                        for r in resources {
                            state.add_endpoint(r);
                        }
                        state.endpoints_listed = true;
                        reconcile_all(&mut state, &store, &metrics).await;
                    }
                    WatchEvent::Put { resource, .. } => {
                        let resource = *resource;
                        state.remove_endpoint(resource.namespace().unwrap_or_default(), resource.name());
                        if let Some(pod) = state.add_endpoint(resource) {
                            reconcile(&state, &store, &metrics, &pod).await;
                        }
                    }
                    WatchEvent::Deleted { namespace, name, .. } => {
                        state.remove_endpoint(namespace.as_deref().unwrap_or_default(), &name);
                    }
                    WatchEvent::Unreadable { error, .. } => {
                        tracing::warn!(controller = CONTROLLER, %error, "unreadable endpoint");
                    }
                }
            }
            _ = tick.tick() => collect_leaks(&mut state, &store, &metrics, gc.grace).await,
        }
    }
}

fn pod_id(pod: &Pod) -> PodId {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

async fn reconcile_all(state: &mut State, store: &Datastore, metrics: &Metrics) {
    if !(state.pods_listed && state.endpoints_listed) {
        return;
    }
    let pods: Vec<PodId> = state.by_pod.keys().cloned().collect();
    for pod in &pods {
        reconcile(state, store, metrics, pod).await;
    }
    metrics.set_synced(CONTROLLER);
    tracing::info!(
        controller = CONTROLLER,
        endpoints = state.endpoints.len(),
        "in sync with the Kubernetes API"
    );
}

/// Brings the endpoints of `pod` in line with it. A conflict (the CNI plugin or another writer
/// got in first) is left to the watch: the new version arrives and is reconciled in turn.
async fn reconcile(state: &State, store: &Datastore, metrics: &Metrics, pod: &PodId) {
    if !(state.pods_listed && state.endpoints_listed) {
        return;
    }
    let Some(info) = state.pods.get(pod) else {
        return;
    };
    for name in state.by_pod.get(pod).into_iter().flatten() {
        let Some(endpoint) = state.endpoints.get(&(pod.0.clone(), name.clone())) else {
            continue;
        };
        let Some(next) = updated_endpoint(endpoint, info) else {
            continue;
        };
        let what = format!("WorkloadEndpoint {}/{name}", pod.0);
        retrying(CONTROLLER, &what, metrics, || async {
            match store.update(next.clone()).await {
                Ok(_) => Ok(crate::writes::Outcome::Updated),
                Err(
                    calico_datastore::DatastoreError::Conflict { .. }
                    | calico_datastore::DatastoreError::NotFound { .. },
                ) => Ok(crate::writes::Outcome::Unchanged),
                Err(e) => Err(e),
            }
        })
        .await;
    }
}

/// One garbage-collection pass: allocations whose pod is gone for the grace period are
/// released, with the endpoints of that pod that hold them.
async fn collect_leaks(state: &mut State, store: &Datastore, metrics: &Metrics, grace: Duration) {
    if !state.pods_listed {
        return;
    }
    let blocks = match store.list(Kind::IPAMBlock, None).await {
        Ok((blocks, _)) => blocks,
        Err(e) => {
            tracing::warn!(controller = GC, error = %e, "cannot list IPAM blocks");
            metrics.error(GC);
            return;
        }
    };
    let allocations: Vec<PodAllocation> = blocks
        .iter()
        .filter_map(|r| match r {
            Resource::IPAMBlock(b) => Some((b.spec.cidr.parse::<IpNet>().ok()?, &b.spec)),
            _ => None,
        })
        .flat_map(|(cidr, spec)| pod_allocations(&cidr, spec))
        .collect();
    let orphaned: BTreeSet<String> = allocations
        .iter()
        .filter(|a| !state.pods.contains_key(&a.pod))
        .map(|a| a.handle.clone())
        .collect();
    let due = state.leaks.observe(Instant::now(), &orphaned, grace);
    let ipam = Ipam::new(store.clone(), "calico-kube-controllers");
    for handle in due {
        let addresses: BTreeSet<IpAddr> = allocations
            .iter()
            .filter(|a| a.handle == handle)
            .map(|a| a.address)
            .collect();
        let Some(pod) = allocations
            .iter()
            .find(|a| a.handle == handle)
            .map(|a| a.pod.clone())
        else {
            continue;
        };
        // The endpoints first: an endpoint must never point at an address someone else may get.
        let holders: Vec<String> = state
            .by_pod
            .get(&pod)
            .into_iter()
            .flatten()
            .filter(|name| {
                state.endpoints.get(&(pod.0.clone(), (*name).clone())).is_some_and(|e| {
                    matches!(e, Resource::WorkloadEndpoint(w) if w.spec.ip_networks.iter().any(|n| {
                        n.parse::<IpNet>().is_ok_and(|n| addresses.contains(&n.addr()))
                    }))
                })
            })
            .cloned()
            .collect();
        for name in holders {
            let what = format!("WorkloadEndpoint {}/{name} (pod gone)", pod.0);
            retrying(GC, &what, metrics, || {
                crate::writes::remove(store, Kind::WorkloadEndpoint, Some(&pod.0), &name)
            })
            .await;
        }
        match ipam.release_by_handle(&handle).await {
            Ok(released) => {
                tracing::info!(controller = GC, handle, namespace = %pod.0, pod = %pod.1, ?released, "released the addresses of a pod that no longer exists");
                metrics.ipam_released(released.len() as u64);
            }
            Err(e) => {
                tracing::warn!(controller = GC, handle, error = %e, "cannot release a leaked handle; next pass retries");
                metrics.error(GC);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use calico_model::{spec::WorkloadEndpointPort, Object, ObjectMeta, Protocol};

    fn endpoint(labels: &[(&str, &str)], profiles: &[&str]) -> Resource {
        Resource::WorkloadEndpoint(Object {
            api_version: calico_model::API_VERSION.into(),
            kind: "WorkloadEndpoint".into(),
            metadata: ObjectMeta {
                name: "n1-k8s-a-eth0".into(),
                namespace: Some("x".into()),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
                ..Default::default()
            },
            spec: calico_model::spec::WorkloadEndpointSpec {
                orchestrator: "k8s".into(),
                pod: "a".into(),
                profiles: profiles.iter().map(|p| (*p).into()).collect(),
                ..Default::default()
            },
            status: None,
        })
    }

    #[test]
    fn pod_labels_and_service_account_reach_the_endpoint() {
        let pod = PodInfo {
            labels: [("app".to_owned(), "web".to_owned())].into(),
            service_account: Some("api".into()),
            ports: vec![WorkloadEndpointPort {
                name: "http".into(),
                protocol: Protocol::Name("TCP".into()),
                port: 8080,
                host_port: None,
                host_ip: None,
            }],
        };
        let before = endpoint(
            &[
                ("projectcalico.org/namespace", "x"),
                ("projectcalico.org/orchestrator", "k8s"),
            ],
            &["kns.x"],
        );
        let Some(Resource::WorkloadEndpoint(after)) = updated_endpoint(&before, &pod) else {
            panic!("the endpoint must change")
        };
        assert_eq!(after.metadata.labels["app"], "web");
        assert_eq!(
            after.metadata.labels["projectcalico.org/serviceaccount"],
            "api"
        );
        assert_eq!(after.metadata.labels["projectcalico.org/namespace"], "x");
        assert_eq!(after.spec.profiles, vec!["kns.x", "ksa.x.api"]);
        assert_eq!(after.spec.service_account_name, "api");
        assert_eq!(after.spec.ports[0].name, "http");
        // Applied once, nothing more to do.
        assert_eq!(
            updated_endpoint(&Resource::WorkloadEndpoint(after), &pod),
            None
        );
    }

    #[test]
    fn a_removed_pod_label_leaves_the_endpoint() {
        let pod = PodInfo::default();
        let before = endpoint(
            &[
                ("app", "web"),
                ("projectcalico.org/namespace", "x"),
                ("projectcalico.org/orchestrator", "k8s"),
            ],
            &["kns.x"],
        );
        let Some(after) = updated_endpoint(&before, &pod) else {
            panic!("must change")
        };
        assert!(!after.metadata().labels.contains_key("app"));
    }

    #[test]
    fn a_handle_is_released_only_after_missing_for_the_grace_period() {
        let mut t = LeakTracker::default();
        let grace = Duration::from_secs(10);
        let start = Instant::now();
        let h: BTreeSet<String> = ["k8s-pod-network.c1".to_owned()].into();
        assert!(
            t.observe(start, &h, grace).is_empty(),
            "first sight starts the clock"
        );
        assert!(t
            .observe(start + Duration::from_secs(9), &h, grace)
            .is_empty());
        // The pod came back (or the handle went): the clock restarts.
        assert!(t
            .observe(start + Duration::from_secs(10), &BTreeSet::new(), grace)
            .is_empty());
        assert!(t
            .observe(start + Duration::from_secs(11), &h, grace)
            .is_empty());
        assert_eq!(
            t.observe(start + Duration::from_secs(21), &h, grace),
            vec!["k8s-pod-network.c1".to_owned()]
        );
        // Released: forgotten.
        assert!(t
            .observe(start + Duration::from_secs(22), &BTreeSet::new(), grace)
            .is_empty());
    }

    #[test]
    fn a_zero_grace_still_needs_two_passes() {
        let mut t = LeakTracker::default();
        let h: BTreeSet<String> = ["h".to_owned()].into();
        let now = Instant::now();
        assert!(t.observe(now, &h, Duration::ZERO).is_empty());
        assert_eq!(
            t.observe(now + Duration::from_millis(1), &h, Duration::ZERO),
            vec!["h".to_owned()]
        );
    }
}
