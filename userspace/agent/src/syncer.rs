//! The agent's link to the datastore: connects (retrying with backoff), registers this node,
//! then lists and watches every v3 resource from a revision, watches this node's block
//! affinities, and reports the watch's health for readiness. etcd outages are ridden out by
//! the watch (which resumes where it left off, or resyncs with a snapshot after a compaction);
//! the dataplane keeps its last state meanwhile.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use calico_datastore::{
    keys::{self, RESOURCES_PREFIX},
    Backoff, Datastore, DatastoreError, EtcdConfig, WatchEvent,
};
use calico_model::{Kind, Resource};
use ipnet::IpNet;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

pub enum SyncEvent {
    /// A datastore change, with when it was received.
    Watch(WatchEvent, Instant),
    /// This node's blocks, when they change.
    Blocks(BTreeSet<IpNet>),
}

/// What the agent registers about its node.
#[derive(Debug, Clone)]
pub struct NodeRegistration {
    pub name: String,
    pub ipv4_address: Option<String>,
    pub ipv6_address: Option<String>,
    pub as_number: Option<u32>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);

pub fn spawn(
    config: EtcdConfig,
    node: NodeRegistration,
    tx: mpsc::Sender<SyncEvent>,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(100), MAX_BACKOFF);
        let store = loop {
            match Datastore::connect(&config).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(endpoints = %config.endpoints_display(), error = %e, "datastore unreachable; retrying");
                    backoff.wait().await;
                }
            }
        };
        metrics.set_datastore_connected(true);
        loop {
            match register(&store, &node).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(node = %node.name, error = %e, "registering the node failed; retrying");
                    backoff.wait().await;
                }
            }
        }
        tokio::spawn(affinities(store.clone(), node.name.clone(), tx.clone()));
        let mut watch = store.watch(RESOURCES_PREFIX, None);
        tokio::spawn(follow_liveness(watch.live(), metrics));
        while let Some(event) = watch.next().await {
            if tx
                .send(SyncEvent::Watch(event, Instant::now()))
                .await
                .is_err()
            {
                return;
            }
        }
    });
}

/// Creates this node's Node resource, or fills in the BGP fields given on an existing one.
async fn register(store: &Datastore, node: &NodeRegistration) -> Result<(), DatastoreError> {
    let existing = match store.get(Kind::Node, None, &node.name).await {
        Ok(r) => Some(r),
        Err(DatastoreError::NotFound { .. }) => None,
        Err(e) => return Err(e),
    };
    let mut resource = match existing.clone() {
        Some(r) => r,
        None => Resource::Node(calico_model::Object {
            api_version: calico_model::API_VERSION.into(),
            kind: Kind::Node.as_str().into(),
            metadata: calico_model::ObjectMeta {
                name: node.name.clone(),
                ..Default::default()
            },
            spec: Default::default(),
            status: None,
        }),
    };
    if let Resource::Node(n) = &mut resource {
        let bgp = n.spec.bgp.get_or_insert_with(Default::default);
        if node.ipv4_address.is_some() {
            bgp.ipv4_address = node.ipv4_address.clone();
        }
        if node.ipv6_address.is_some() {
            bgp.ipv6_address = node.ipv6_address.clone();
        }
        if let Some(asn) = node.as_number {
            bgp.as_number = Some(calico_model::AsNumber(asn));
        }
        if n.spec
            .bgp
            .as_ref()
            .is_some_and(|b| *b == Default::default())
        {
            n.spec.bgp = None;
        }
    }
    match existing {
        Some(old) if old == resource => Ok(()),
        Some(_) => store.update(resource).await.map(|_| ()),
        None => match store.create(resource).await {
            Ok(_) | Err(DatastoreError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e),
        },
    }
    .inspect(|()| tracing::info!(node = %node.name, "node registered"))
}

/// Readiness follows the resource watch itself (established, and answering the connection's
/// keepalive pings): an idle node makes no etcd request beyond its watches.
async fn follow_liveness(mut live: tokio::sync::watch::Receiver<bool>, metrics: Arc<Metrics>) {
    loop {
        let up = *live.borrow_and_update();
        if metrics.set_datastore_connected(up) {
            if up {
                tracing::info!("datastore watch established");
            } else {
                tracing::warn!("datastore watch lost; the dataplane keeps its last state");
            }
        }
        if live.changed().await.is_err() {
            return;
        }
    }
}

/// This node's confirmed block affinities, from a watch on its own affinity keys: the load on
/// etcd does not grow with the number of nodes (listing everyone's every few seconds did).
async fn affinities(store: Datastore, node: String, tx: mpsc::Sender<SyncEvent>) {
    let (by_node_tx, mut by_node) = tokio::sync::watch::channel(BTreeMap::new());
    let prefix = keys::node_affinities_prefix(&node);
    tokio::spawn(async move { watch_confirmed_blocks(&store, prefix, by_node_tx).await });
    let mut last: Option<BTreeSet<IpNet>> = None;
    while by_node.changed().await.is_ok() {
        let blocks = by_node
            .borrow_and_update()
            .get(&node)
            .cloned()
            .unwrap_or_default();
        if last.as_ref() != Some(&blocks) {
            last = Some(blocks.clone());
            if tx.send(SyncEvent::Blocks(blocks)).await.is_err() {
                return;
            }
        }
    }
}

/// Follows the confirmed block affinities under `prefix` (one node's, or every node's) into
/// `out` (each node's blocks), until nobody reads it any more.
pub async fn watch_confirmed_blocks(
    store: &Datastore,
    prefix: String,
    out: tokio::sync::watch::Sender<BTreeMap<String, BTreeSet<IpNet>>>,
) {
    // Affinity name → (node, block), for deletions (which carry only the name).
    let mut confirmed: BTreeMap<String, (String, IpNet)> = BTreeMap::new();
    let mut watch = store.watch(prefix, None);
    let put = |confirmed: &mut BTreeMap<String, (String, IpNet)>, r: &Resource| {
        if let Resource::BlockAffinity(a) = r {
            match a.spec.cidr.parse() {
                Ok(cidr) if a.spec.state == "confirmed" => {
                    confirmed.insert(a.metadata.name.clone(), (a.spec.node.clone(), cidr));
                }
                _ => {
                    confirmed.remove(&a.metadata.name);
                }
            }
        }
    };
    while let Some(event) = watch.next().await {
        match event {
            WatchEvent::Snapshot { resources, .. } => {
                confirmed.clear();
                for r in resources {
                    put(&mut confirmed, &r);
                }
            }
            WatchEvent::Put { resource, .. } => put(&mut confirmed, &resource),
            WatchEvent::Deleted { name, .. } => {
                confirmed.remove(&name);
            }
            WatchEvent::Unreadable { error, .. } => {
                tracing::error!(%error, "a block affinity cannot be read");
            }
        }
        let mut by_node: BTreeMap<String, BTreeSet<IpNet>> = BTreeMap::new();
        for (node, block) in confirmed.values() {
            by_node.entry(node.clone()).or_default().insert(*block);
        }
        crate::publish(&out, by_node);
        if out.is_closed() {
            return;
        }
    }
}
