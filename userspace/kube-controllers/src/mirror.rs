//! Controllers where each Kubernetes object stands for one Calico object: Namespaces,
//! ServiceAccounts and NetworkPolicies. One generic loop: list (then remove what the API no
//! longer has, write what differs), then follow the watch.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    sync::Arc,
};

use calico_datastore::Datastore;
use calico_model::{
    k8s::{self, ConvertError},
    Kind, Resource,
};
use futures::StreamExt;
use k8s_openapi::api::{
    core::v1::{Namespace, ServiceAccount},
    networking::v1::NetworkPolicy,
};
use kube::{
    runtime::{watcher, watcher::Event, WatchStreamExt},
    Api, Client, ResourceExt,
};
use serde::de::DeserializeOwned;

use crate::{
    metrics::Metrics,
    writes::{ensure, remove, retrying, same},
};

/// A Calico object's identity: (namespace, name).
pub type Id = (Option<String>, String);

/// A Kubernetes kind mirrored as one Calico object per Kubernetes object.
pub trait Mirrored:
    kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static
{
    /// The controller's name, as upstream's `ENABLED_CONTROLLERS` spells it.
    const CONTROLLER: &'static str;
    /// The kind of the Calico objects it writes.
    const KIND: Kind;
    /// Whether a stored Calico object of [`Self::KIND`] is one this controller writes.
    fn owns(name: &str) -> bool;
    /// The Calico object's identity for this Kubernetes object.
    fn calico_id(&self) -> Id;
    /// The Calico object for this Kubernetes object.
    fn to_calico(&self) -> Result<Resource, ConvertError>;
}

impl Mirrored for Namespace {
    const CONTROLLER: &'static str = "namespace";
    const KIND: Kind = Kind::Profile;
    fn owns(name: &str) -> bool {
        name.starts_with(k8s::NAMESPACE_PROFILE_PREFIX)
    }
    fn calico_id(&self) -> Id {
        (
            None,
            format!("{}{}", k8s::NAMESPACE_PROFILE_PREFIX, self.name_any()),
        )
    }
    fn to_calico(&self) -> Result<Resource, ConvertError> {
        Ok(k8s::namespace_profile(&self.name_any(), self.labels()))
    }
}

impl Mirrored for ServiceAccount {
    const CONTROLLER: &'static str = "serviceaccount";
    const KIND: Kind = Kind::Profile;
    fn owns(name: &str) -> bool {
        name.starts_with(k8s::SERVICE_ACCOUNT_PROFILE_PREFIX)
    }
    fn calico_id(&self) -> Id {
        (
            None,
            format!(
                "{}{}.{}",
                k8s::SERVICE_ACCOUNT_PROFILE_PREFIX,
                self.namespace().unwrap_or_default(),
                self.name_any()
            ),
        )
    }
    fn to_calico(&self) -> Result<Resource, ConvertError> {
        Ok(k8s::service_account_profile(
            &self.namespace().unwrap_or_default(),
            &self.name_any(),
            self.labels(),
        ))
    }
}

impl Mirrored for NetworkPolicy {
    const CONTROLLER: &'static str = "policy";
    const KIND: Kind = Kind::NetworkPolicy;
    fn owns(name: &str) -> bool {
        name.starts_with(k8s::NETWORK_POLICY_PREFIX)
    }
    fn calico_id(&self) -> Id {
        (
            self.namespace(),
            format!("{}{}", k8s::NETWORK_POLICY_PREFIX, self.name_any()),
        )
    }
    fn to_calico(&self) -> Result<Resource, ConvertError> {
        let value = serde_json::to_value(self).map_err(|e| ConvertError(e.to_string()))?;
        k8s::network_policy(value)
    }
}

/// The stored objects this controller owns that no listed Kubernetes object accounts for.
pub fn stale<'a>(listed: &BTreeSet<Id>, stored: impl IntoIterator<Item = &'a Id>) -> Vec<Id> {
    stored
        .into_iter()
        .filter(|id| !listed.contains(*id))
        .cloned()
        .collect()
}

/// Runs the controller for `K` until the process ends.
pub async fn run<K: Mirrored>(client: Client, store: Datastore, metrics: Arc<Metrics>) {
    let api: Api<K> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    // During a (re)list: every listed object's identity, with its Calico object when it
    // converts (one that does not keeps what is stored: nothing is widened or dropped).
    let mut listed: BTreeMap<Id, Option<Resource>> = BTreeMap::new();
    while let Some(event) = events.next().await {
        match event {
            Err(e) => {
                tracing::warn!(controller = K::CONTROLLER, error = %e, "Kubernetes watch failed; retrying");
                metrics.error(K::CONTROLLER);
            }
            Ok(Event::Init) => listed.clear(),
            Ok(Event::InitApply(object)) => {
                listed.insert(object.calico_id(), convert(&object, &metrics));
            }
            Ok(Event::InitDone) => {
                resync::<K>(&store, &metrics, std::mem::take(&mut listed)).await;
                metrics.set_synced(K::CONTROLLER);
                tracing::info!(
                    controller = K::CONTROLLER,
                    "in sync with the Kubernetes API"
                );
            }
            Ok(Event::Apply(object)) => {
                if let Some(resource) = convert(&object, &metrics) {
                    let what = format!("{} {}", K::KIND, resource.name());
                    retrying(K::CONTROLLER, &what, &metrics, || ensure(&store, &resource)).await;
                }
            }
            Ok(Event::Delete(object)) => {
                let (namespace, name) = object.calico_id();
                let what = format!("{} {name}", K::KIND);
                retrying(K::CONTROLLER, &what, &metrics, || {
                    remove(&store, K::KIND, namespace.as_deref(), &name)
                })
                .await;
            }
        }
    }
}

fn convert<K: Mirrored>(object: &K, metrics: &Metrics) -> Option<Resource> {
    match object.to_calico() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(
                controller = K::CONTROLLER,
                object = %object.name_any(),
                namespace = ?object.namespace(),
                error = %e,
                "cannot convert; the stored Calico object (if any) stays as it was"
            );
            metrics.error(K::CONTROLLER);
            None
        }
    }
}

/// After a list: remove the owned objects nothing listed accounts for, write the listed ones
/// that differ from what is stored.
async fn resync<K: Mirrored>(
    store: &Datastore,
    metrics: &Metrics,
    listed: BTreeMap<Id, Option<Resource>>,
) {
    let stored: BTreeMap<Id, Resource> = loop {
        match store.list(K::KIND, None).await {
            Ok((all, _)) => {
                break all
                    .into_iter()
                    .filter(|r| K::owns(r.name()))
                    .map(|r| ((r.namespace().map(str::to_owned), r.name().to_owned()), r))
                    .collect()
            }
            Err(e) => {
                tracing::warn!(controller = K::CONTROLLER, error = %e, "cannot list the datastore; retrying");
                metrics.error(K::CONTROLLER);
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    };
    let ids: BTreeSet<Id> = listed.keys().cloned().collect();
    for (namespace, name) in stale(&ids, stored.keys()) {
        let what = format!("{} {name} (no Kubernetes object)", K::KIND);
        retrying(K::CONTROLLER, &what, metrics, || {
            remove(store, K::KIND, namespace.as_deref(), &name)
        })
        .await;
    }
    for (id, resource) in listed {
        let Some(resource) = resource else { continue };
        if stored.get(&id).is_some_and(|s| same(s, &resource)) {
            continue;
        }
        let what = format!("{} {}", K::KIND, resource.name());
        retrying(K::CONTROLLER, &what, metrics, || ensure(store, &resource)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn namespace(name: &str, labels: &[(&str, &str)]) -> Namespace {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(name.to_owned());
        ns.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        );
        ns
    }

    #[test]
    fn a_namespace_becomes_its_kns_profile_with_prefixed_labels() {
        let profile = namespace("shop", &[("team", "red")]).to_calico().unwrap();
        assert_eq!(profile.name(), "kns.shop");
        let Resource::Profile(p) = profile else {
            panic!("a profile")
        };
        assert_eq!(
            p.spec.labels_to_apply,
            BTreeMap::from([
                ("pcns.projectcalico.org/name".to_owned(), "shop".to_owned()),
                ("pcns.team".to_owned(), "red".to_owned()),
            ])
        );
        assert_eq!(p.spec.ingress.len(), 1);
        assert_eq!(p.spec.egress.len(), 1);
    }

    #[test]
    fn a_service_account_becomes_its_ksa_profile_without_rules() {
        let mut sa = ServiceAccount::default();
        sa.metadata.name = Some("api".to_owned());
        sa.metadata.namespace = Some("shop".to_owned());
        sa.metadata.labels = Some([("role".to_owned(), "db".to_owned())].into());
        assert_eq!(sa.calico_id(), (None, "ksa.shop.api".to_owned()));
        let Resource::Profile(p) = sa.to_calico().unwrap() else {
            panic!("a profile")
        };
        assert_eq!(p.spec.labels_to_apply["pcsa.role"], "db");
        assert_eq!(p.spec.labels_to_apply["pcsa.projectcalico.org/name"], "api");
        assert!(p.spec.ingress.is_empty() && p.spec.egress.is_empty());
    }

    #[test]
    fn a_network_policy_from_the_api_converts_as_calicoctl_does() {
        let np: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "web", "namespace": "shop", "uid": "u", "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl", "operation": "Update"}]},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": 80}]}]}
        }))
        .unwrap();
        assert_eq!(
            np.calico_id(),
            (Some("shop".to_owned()), "knp.default.web".to_owned())
        );
        let converted = np.to_calico().unwrap();
        let from_text = k8s::network_policies_from_text(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress: [{from: [{namespaceSelector: {}}], ports: [{port: 80}]}]\n",
        )
        .unwrap();
        assert_eq!(converted, from_text[0]);
    }

    #[test]
    fn only_owned_objects_without_a_listed_source_are_stale() {
        let listed: BTreeSet<Id> = [(None, "kns.a".to_owned())].into();
        let stored = [(None, "kns.a".to_owned()), (None, "kns.gone".to_owned())];
        assert_eq!(stale(&listed, &stored), vec![(None, "kns.gone".to_owned())]);
        assert!(stale(&listed, &stored[..1]).is_empty());
    }
}
