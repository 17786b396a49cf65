//! What the controllers export on /metrics, and readiness: every enabled controller has listed
//! its objects and reconciled the datastore against them.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
};

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::writes::Outcome;

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabels {
    controller: String,
    op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    writes: Family<WriteLabels, Counter>,
    errors: Family<ControllerLabels, Counter>,
    synced: Family<ControllerLabels, Gauge>,
    ipam_released: Counter,
    nodes_cleaned: Counter,
    enabled: BTreeSet<&'static str>,
    synced_set: Mutex<BTreeSet<&'static str>>,
    leader: AtomicBool,
}

impl Metrics {
    pub fn new(enabled: impl IntoIterator<Item = &'static str>) -> Self {
        let m = Self {
            registry: Mutex::new(Registry::default()),
            writes: Family::default(),
            errors: Family::default(),
            synced: Family::default(),
            ipam_released: Counter::default(),
            nodes_cleaned: Counter::default(),
            enabled: enabled.into_iter().collect(),
            synced_set: Mutex::new(BTreeSet::new()),
            leader: AtomicBool::new(false),
        };
        {
            let mut r = m.registry.lock().expect("fresh lock");
            r.register(
                "kube_controllers_datastore_writes",
                "Datastore writes by controller and operation",
                m.writes.clone(),
            );
            r.register(
                "kube_controllers_errors",
                "Errors (datastore, conversion, API watch) by controller",
                m.errors.clone(),
            );
            r.register(
                "kube_controllers_synced",
                "1 once the controller has listed its objects and reconciled the datastore",
                m.synced.clone(),
            );
            r.register(
                "ipam_allocations_gc_reclaimed",
                "Addresses released because their pod no longer exists (after the grace period)",
                m.ipam_released.clone(),
            );
            r.register(
                "kube_controllers_nodes_cleaned",
                "Deleted nodes whose addresses, blocks and endpoints were released",
                m.nodes_cleaned.clone(),
            );
        }
        m
    }

    pub fn write(&self, controller: &str, outcome: Outcome) {
        self.writes
            .get_or_create(&WriteLabels {
                controller: controller.to_owned(),
                op: outcome.as_str().to_owned(),
            })
            .inc();
    }

    pub fn error(&self, controller: &str) {
        self.errors
            .get_or_create(&ControllerLabels {
                controller: controller.to_owned(),
            })
            .inc();
    }

    pub fn set_synced(&self, controller: &'static str) {
        self.synced
            .get_or_create(&ControllerLabels {
                controller: controller.to_owned(),
            })
            .set(1);
        self.synced_set
            .lock()
            .expect("not poisoned")
            .insert(controller);
    }

    pub fn ipam_released(&self, n: u64) {
        self.ipam_released.inc_by(n);
    }

    pub fn node_cleaned(&self) {
        self.nodes_cleaned.inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Leading, and every enabled controller synced.
    pub fn ready(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
            && self
                .enabled
                .is_subset(&self.synced_set.lock().expect("not poisoned"))
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("not poisoned");
        encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}
