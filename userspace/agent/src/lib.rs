//! The calico-node agent in the felix role. Data flows one way:
//!
//! ```text
//! etcd ──syncer──▶ calculation (calico-calc) ──changes──▶ driver ──▶ eBPF maps, attachments,
//!  (list+watch)      which policies, IP sets              routes, sysctls
//!                                       netlink link events ──▶ driver
//! ```
//!
//! One task owns the calculation and the driver, so there are no locks on the way; the syncer,
//! the link watcher and the HTTP endpoints run beside it and talk to it over channels or the
//! shared [`metrics::Metrics`].

pub mod admission;
pub mod allocator;
pub mod bird;
pub mod config;
pub mod driver;
pub mod failsafe;
pub mod flowlogs;
pub mod health;
pub mod metrics;
pub mod nat;
pub mod netlink;
pub mod routes;
pub mod syncer;
pub mod vxlan;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use calico_calc::{Calculator, Update};
use calico_dataplane::{LoadOptions, PolicyDataplane};
use calico_datastore::{EtcdConfig, WatchEvent};
use calico_model::{spec::FelixConfigurationSpec, Kind, Resource};
use calico_policy::{EndpointId, Item};
use tokio::sync::mpsc;

use crate::{
    admission::Admitted,
    config::{FelixSettings, Flags},
    driver::{Driver, EndpointPlace},
    metrics::Metrics,
    netlink::Netlink,
    syncer::{NodeRegistration, SyncEvent},
};

/// What the main loop knows beyond the calculation.
/// `bpfMapSize*` from FelixConfiguration `default` and `node.<name>`, if etcd answers within a
/// few seconds; none otherwise (and then pinned maps keep their sizes).
async fn configured_map_sizes(etcd: &EtcdConfig, node: &str) -> Vec<(&'static str, u32)> {
    let read = async {
        let store = calico_datastore::Datastore::connect(etcd).await?;
        let get = |name: String| {
            let store = store.clone();
            async move {
                match store.get(Kind::FelixConfiguration, None, &name).await {
                    Ok(Resource::FelixConfiguration(f)) => Ok(Some(f.spec)),
                    Ok(_) | Err(calico_datastore::DatastoreError::NotFound { .. }) => Ok(None),
                    Err(e) => Err(e),
                }
            }
        };
        let global = get("default".to_owned()).await?;
        let ours = get(format!("node.{node}")).await?;
        Ok::<_, calico_datastore::DatastoreError>((global, ours))
    };
    match tokio::time::timeout(Duration::from_secs(3), read).await {
        Ok(Ok((global, ours))) => match FelixSettings::resolve(global.as_ref(), ours.as_ref()) {
            Ok(settings) => settings.map_sizes,
            Err(e) => {
                tracing::error!(error = %e, "FelixConfiguration refused; map sizes unchanged");
                Vec::new()
            }
        },
        _ => {
            tracing::warn!("FelixConfiguration not readable at start; map sizes unchanged");
            Vec::new()
        }
    }
}

struct Agent {
    node: String,
    bird: Option<bird::Bird>,
    calc: Calculator,
    driver: Driver,
    metrics: Arc<Metrics>,
    felix_global: Option<FelixConfigurationSpec>,
    felix_node: Option<FelixConfigurationSpec>,
    admission: admission::Admission,
    synced: bool,
    /// IP pools by name, as natOutgoing and the overlay see them.
    pools: std::collections::BTreeMap<String, calico_model::spec::IpPoolSpec>,
    /// The natOutgoing task's input.
    nat: tokio::sync::watch::Sender<nat::DesiredNat>,
    nat_address: Option<std::net::Ipv4Addr>,
    /// Every node's overlay fields, and the overlay task's input.
    nodes: std::collections::BTreeMap<String, vxlan::NodeTunnel>,
    vxlan: tokio::sync::watch::Sender<vxlan::VxlanInputs>,
    vxlan_mtu: Option<u32>,
    /// Pools, nodes or their settings changed since natOutgoing and the overlay were last
    /// told: only then are their inputs rebuilt (a policy batch touches none of them).
    networking_dirty: bool,
    /// GlobalNetworkPolicies with host-endpoint-only settings (applyOnForward, preDNAT,
    /// doNotTrack).
    host_only: std::collections::BTreeMap<String, driver::HostOnlyPolicy>,
}

pub async fn run(flags: Flags) -> anyhow::Result<()> {
    let node = match &flags.nodename {
        Some(n) if !n.is_empty() => n.clone(),
        _ => nix::unistd::gethostname()
            .context("reading the hostname for the node name")?
            .to_string_lossy()
            .into_owned(),
    };
    let etcd = EtcdConfig::from_env().context("datastore configuration")?;
    if flags.libnetwork {
        let config = calico_libnetwork::DriverConfig {
            plugin_dir: flags.libnetwork_plugin_dir.clone(),
            node: node.clone(),
            etcd: etcd.clone(),
            interface_prefix: flags.interface_prefix.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = calico_libnetwork::serve(config).await {
                tracing::error!("docker driver stopped: {e:#}");
            }
        });
    }
    let metrics = Arc::new(Metrics::default());
    metrics.turned();

    for port in [flags.health_port, flags.metrics_port] {
        if port == 0 {
            continue;
        }
        let addr = format!("{}:{port}", flags.health_host);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening for health/metrics on {addr}"))?;
        tokio::spawn(health::serve(listener, metrics.clone()));
    }

    raise_fd_limit();
    calico_hostlink::enable_forwarding().context("enabling forwarding")?;
    let log_level = match flags.bpf_log_level.to_ascii_lowercase().as_str() {
        "off" | "" => None,
        "debug" => Some(aya_log::Level::Debug),
        "info" => Some(aya_log::Level::Info),
        other => anyhow::bail!(
            "--bpf-log-level / FELIX_BPFLOGLEVEL: `{other}` is not off, info or debug"
        ),
    };
    // Map sizes are fixed when the maps are made: read them from FelixConfiguration first,
    // briefly (without an answer the pinned maps keep the sizes they have).
    let map_sizes = configured_map_sizes(&etcd, &node).await;
    // Always loaded with a logger, so debug lines can be switched on at run time
    // (FelixConfiguration bpfLogLevel) without reloading anything.
    let (mut dataplane, logger) = PolicyDataplane::load(&LoadOptions {
        log_level: Some(aya_log::Level::Debug),
        pin_path: Some(flags.bpf_pin_path.clone()),
        map_sizes,
        conntrack_per_interface: None,
    })
    .with_context(|| {
        format!(
            "loading the eBPF dataplane (pinned under {})",
            flags.bpf_pin_path.display()
        )
    })?;
    dataplane
        .set_debug_logging(log_level.is_some())
        .context("the eBPF log switch")?;
    let _pump = match logger {
        Some(l) => Some(calico_dataplane::spawn_log_pump(l).context("eBPF log pump")?),
        None => None,
    };

    // Subscribe to link changes before the dump, so nothing falls between them.
    let refresh = Duration::from_secs(flags.refresh_interval.max(1));
    let (link_tx, mut link_rx) = mpsc::unbounded_channel();
    Netlink::watch_links(link_tx, refresh)?;
    let netlink = Netlink::connect()?;
    let interfaces = netlink.links().await?;
    let routes = routes::spawn(netlink, refresh);
    let mut driver = Driver::new(
        dataplane,
        metrics.clone(),
        flags.interface_prefix.clone(),
        routes,
    );
    driver.set_interfaces(interfaces);
    driver.expire_conntrack_elsewhere(refresh);

    let (sync_tx, mut sync_rx) = mpsc::channel(4096);
    let (etcd_for_overlay, agent_node) = (etcd.clone(), node.clone());
    syncer::spawn(
        etcd,
        NodeRegistration {
            name: node.clone(),
            ipv4_address: flags.ip.clone(),
            ipv6_address: flags.ip6.clone(),
            as_number: flags.as_number,
        },
        sync_tx,
        metrics.clone(),
    );
    tracing::info!(%node, pin_path = %flags.bpf_pin_path.display(), "calico-node started");

    let bird = match flags.networking_backend.as_str() {
        "bird" => Some(bird::Bird::new(
            flags.bird_dir.clone(),
            node.clone(),
            metrics.clone(),
        )),
        "none" => None,
        other => anyhow::bail!(
            "--networking-backend / CALICO_NETWORKING_BACKEND: `{other}` is not bird or none"
        ),
    };
    let mut agent = Agent {
        bird,
        node,
        calc: Calculator::new(),
        driver,
        metrics: metrics.clone(),
        felix_global: None,
        felix_node: None,
        admission: admission::Admission::default(),
        synced: false,
        pools: Default::default(),
        nat: nat::spawn(refresh),
        nat_address: None,
        nodes: Default::default(),
        vxlan: vxlan::spawn(
            etcd_for_overlay,
            agent_node,
            flags.mtu_file.clone(),
            refresh,
        ),
        vxlan_mtu: None,
        networking_dirty: true,
        host_only: Default::default(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_refresh = Instant::now();
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            event = sync_rx.recv() => {
                let Some(event) = event else { anyhow::bail!("the datastore syncer stopped") };
                // Take everything already queued as one batch: one flush, one programming pass.
                let mut batch = vec![event];
                while let Ok(e) = sync_rx.try_recv() {
                    batch.push(e);
                    if batch.len() >= 4096 { break; }
                }
                agent.handle(batch).await;
            }
            Some(event) = link_rx.recv() => {
                agent.driver.on_link(event).await;
                agent.driver.publish_routes();
            }
            _ = tick.tick() => {
                agent.driver.retry_failed().await;
                if agent.synced && last_refresh.elapsed() >= refresh {
                    last_refresh = Instant::now();
                    agent.driver.housekeeping(&agent.calc);
                    tracing::debug!(total_us = last_refresh.elapsed().as_micros() as u64, "periodic refresh");
                } else {
                    agent.driver.refresh_counters(&agent.calc);
                }
                if let Some(b) = agent.bird.as_mut() {
                    b.supervise();
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
        metrics.turned();
    }
    // Pinned programs and maps stay: the dataplane keeps enforcing until the next run.
    tracing::info!("calico-node stopping; the dataplane stays programmed");
    Ok(())
}

/// Hands `value` to a task's watch channel, waking it only when it differs from what it has.
pub(crate) fn publish<T: PartialEq>(tx: &tokio::sync::watch::Sender<T>, value: T) {
    tx.send_if_modified(|current| {
        let changed = *current != value;
        if changed {
            *current = value;
        }
        changed
    });
}

/// Many endpoints mean many map and link operations; lift the soft open-file limit to the hard
/// one, as daemons do.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, "raising the open-file limit");
            }
        }
    }
}

impl Agent {
    async fn handle(&mut self, batch: Vec<SyncEvent>) {
        let started = batch
            .iter()
            .filter_map(|e| match e {
                SyncEvent::Watch(_, at) => Some(*at),
                SyncEvent::Blocks(_) => None,
            })
            .min();
        let revision = batch
            .iter()
            .filter_map(|e| match e {
                SyncEvent::Watch(w, _) => Some(w.revision()),
                SyncEvent::Blocks(_) => None,
            })
            .max();
        let mut snapshot_seen = false;
        for event in batch {
            match event {
                SyncEvent::Blocks(blocks) => {
                    if let Some(b) = self.bird.as_mut() {
                        b.set_blocks(blocks.iter().copied().collect());
                    }
                    self.driver.set_blocks(blocks).await
                }
                SyncEvent::Watch(
                    WatchEvent::Snapshot {
                        resources,
                        revision,
                    },
                    _,
                ) => {
                    tracing::info!(resources = resources.len(), revision, "datastore snapshot");
                    if self.synced {
                        self.metrics.resyncs.inc();
                    }
                    self.calc.reset();
                    self.driver.clear_places();
                    self.pools.clear();
                    self.networking_dirty = true;
                    self.nodes.clear();
                    self.host_only.clear();
                    if let Some(b) = self.bird.as_mut() {
                        b.clear();
                    }
                    self.felix_global = None;
                    self.felix_node = None;
                    self.admission.retain(&resources.keys().collect());
                    // Decoded one by one as they are applied (see `SnapshotObjects`).
                    for r in resources {
                        self.put(&r);
                    }
                    snapshot_seen = true;
                }
                SyncEvent::Watch(WatchEvent::Put { resource, .. }, _) => self.put(&resource),
                SyncEvent::Watch(
                    WatchEvent::Deleted {
                        kind,
                        namespace,
                        name,
                        ..
                    },
                    _,
                ) => self.delete(kind, namespace, name),
                SyncEvent::Watch(WatchEvent::Unreadable { error, revision }, _) => {
                    self.metrics.resources_refused.inc();
                    tracing::error!(revision, %error, "a datastore value cannot be read; it is left out until fixed");
                }
            }
        }
        match FelixSettings::resolve(self.felix_global.as_ref(), self.felix_node.as_ref()) {
            Ok(s) => {
                if (self.nat_address, self.vxlan_mtu) != (s.nat_outgoing_address, s.vxlan_mtu) {
                    self.nat_address = s.nat_outgoing_address;
                    self.vxlan_mtu = s.vxlan_mtu;
                    self.networking_dirty = true;
                }
                self.driver.set_settings(s).await
            }
            Err(e) => {
                tracing::error!(error = %e, "FelixConfiguration refused; previous settings stay")
            }
        }
        self.driver
            .set_host_only_policies(self.host_only.clone())
            .await;
        let calc_started = Instant::now();
        let changes = self.calc.flush();
        let n = changes.len();
        let calculated = calc_started.elapsed();
        self.driver.apply(changes, &self.calc).await;
        if let Some(revision) = revision {
            self.metrics.applied_revision.set(revision);
        }
        tracing::debug!(
            changes = n,
            queued_us = started.map_or(0, |t| (calc_started - t).as_micros() as u64),
            calc_us = calculated.as_micros() as u64,
            dataplane_us = (calc_started.elapsed() - calculated).as_micros() as u64,
            "batch applied"
        );
        if let Some(at) = started {
            if n > 0 {
                self.metrics.observe_update(at.elapsed());
            }
        }
        if let Some(b) = self.bird.as_mut() {
            b.sync().await;
        }
        if snapshot_seen {
            if !self.synced {
                self.synced = true;
                self.networking_dirty = true;
                // Workload interfaces with no endpoint get guarded before the sweep, which
                // then keeps their (possibly adopted) attachments.
                self.driver.guard_unknown_workloads();
                self.driver.sweep_leftovers();
                self.driver.routes_complete();
                self.driver.housekeeping(&self.calc);
                tracing::info!(
                    endpoints = self.calc.endpoints().count(),
                    "in sync: dataplane programmed from a complete snapshot"
                );
            }
            self.metrics.in_sync.set(1);
        }
        if std::mem::take(&mut self.networking_dirty) {
            self.publish_nat();
            self.publish_vxlan();
        }
        self.driver.refresh_counters(&self.calc);
    }

    /// What the overlay should be now, to its task.
    fn publish_vxlan(&self) {
        let desired = vxlan::VxlanInputs {
            pools: self
                .pools
                .iter()
                .filter(|(_, p)| !p.is_disabled())
                .filter_map(|(name, p)| {
                    Some(vxlan::OverlayPool {
                        name: name.clone(),
                        cidr: p.cidr.parse().ok()?,
                        mode: p
                            .vxlan_mode
                            .unwrap_or(calico_model::spec::EncapsulationMode::Never),
                    })
                })
                .collect(),
            nodes: self.nodes.clone(),
            mtu: self.vxlan_mtu,
            complete: self.synced,
        };
        crate::publish(&self.vxlan, desired);
    }

    /// What natOutgoing should do now, to its task (which applies it off this loop).
    fn publish_nat(&self) {
        let desired = nat::DesiredNat {
            masquerade: self
                .pools
                .values()
                .filter(|p| p.nat_outgoing == Some(true))
                .filter_map(|p| p.cidr.parse().ok())
                .collect(),
            pools: self
                .pools
                .values()
                .filter_map(|p| p.cidr.parse().ok())
                .collect(),
            address: self.nat_address,
            complete: self.synced,
        };
        crate::publish(&self.nat, desired);
    }

    fn put(&mut self, resource: &Resource) {
        let (kind, name) = (resource.kind().as_str(), &resource.metadata().name);
        let last_valid;
        let resource = match self.admission.admit(resource) {
            Admitted::Valid(r) => r,
            Admitted::LastValid(r, why) => {
                self.metrics.resources_refused.inc();
                tracing::error!(kind, %name, error = %why, "invalid resource refused; its last valid version stays in force");
                last_valid = *r;
                &last_valid
            }
            Admitted::Unvalidated(r, why) => {
                self.metrics.resources_refused.inc();
                tracing::error!(kind, %name, error = %why, "invalid policy with no valid version yet: what the dataplane cannot enforce makes the endpoints it selects drop");
                r
            }
            Admitted::Refused(why) => {
                self.metrics.resources_refused.inc();
                tracing::error!(kind, %name, error = %why, "invalid resource refused; left out until fixed");
                return;
            }
        };
        if let Some(b) = self.bird.as_mut() {
            b.put(resource);
        }
        match resource {
            Resource::FelixConfiguration(f) => {
                let name = f.metadata.name.as_str();
                if name == "default" {
                    self.felix_global = Some(f.spec.clone());
                } else if name == format!("node.{}", self.node) {
                    self.felix_node = Some(f.spec.clone());
                }
                return;
            }
            Resource::IPPool(p) => {
                self.pools.insert(p.metadata.name.clone(), p.spec.clone());
                self.networking_dirty = true;
            }
            Resource::GlobalNetworkPolicy(p) => {
                let flags = driver::HostOnlyPolicy {
                    apply_on_forward: p.spec.apply_on_forward == Some(true),
                    pre_dnat: p.spec.pre_dnat == Some(true),
                    do_not_track: p.spec.do_not_track == Some(true),
                };
                if flags == driver::HostOnlyPolicy::default() {
                    self.host_only.remove(&p.metadata.name);
                } else {
                    self.host_only.insert(p.metadata.name.clone(), flags);
                }
            }
            Resource::Node(n) => {
                let tunnel = vxlan::node_tunnel(&n.spec);
                if self.nodes.get(&n.metadata.name) != Some(&tunnel) {
                    self.nodes.insert(n.metadata.name.clone(), tunnel);
                    self.networking_dirty = true;
                }
            }
            Resource::WorkloadEndpoint(w) => {
                let id = EndpointId {
                    namespace: w.metadata.namespace.clone(),
                    name: w.metadata.name.clone(),
                };
                let local = w.spec.node == self.node;
                self.driver.set_place(
                    &id,
                    local.then(|| EndpointPlace {
                        interface: w.spec.interface_name.clone(),
                        host: false,
                    }),
                );
            }
            Resource::HostEndpoint(h) => {
                let id = EndpointId {
                    namespace: None,
                    name: h.metadata.name.clone(),
                };
                let local = h.spec.node == self.node && !h.spec.interface_name.is_empty();
                if h.spec.node == self.node && h.spec.interface_name.is_empty() {
                    tracing::error!(hostendpoint = %h.metadata.name, "HostEndpoints without interfaceName (all interfaces) are not supported by this dataplane yet; it is not enforced");
                }
                self.driver.set_place(
                    &id,
                    local.then(|| EndpointPlace {
                        interface: h.spec.interface_name.clone(),
                        host: true,
                    }),
                );
            }
            _ => {}
        }
        let local = match resource {
            Resource::WorkloadEndpoint(w) => w.spec.node == self.node,
            Resource::HostEndpoint(h) => {
                h.spec.node == self.node && !h.spec.interface_name.is_empty()
            }
            _ => false,
        };
        if let Resource::Profile(p) = resource {
            if let Some((namespace, labels)) =
                calico_policy::namespace_of_profile(&p.metadata.name, &p.spec.labels_to_apply)
            {
                self.calc.apply(Update::Namespace {
                    name: namespace,
                    labels: Some(labels),
                });
            }
        }
        match Item::from_resource(resource) {
            Ok(Some(item)) => self.calc.apply(Update::upsert(item, local)),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(kind = %resource.kind().as_str(), name = %resource.metadata().name, error = %e, "resource refused; it is left out until fixed")
            }
        }
    }

    fn delete(&mut self, kind: Kind, namespace: Option<String>, name: String) {
        self.admission
            .forget(&(kind, namespace.clone(), name.clone()));
        if let Some(b) = self.bird.as_mut() {
            b.delete(kind, &name);
        }
        let update = match kind {
            Kind::WorkloadEndpoint | Kind::HostEndpoint => {
                let id = EndpointId { namespace, name };
                self.driver.set_place(&id, None);
                Update::Endpoint {
                    id,
                    endpoint: None,
                    local: false,
                }
            }
            Kind::NetworkPolicy | Kind::GlobalNetworkPolicy => {
                if kind == Kind::GlobalNetworkPolicy {
                    self.host_only.remove(&name);
                }
                Update::Policy {
                    namespace,
                    name,
                    policy: None,
                }
            }
            Kind::StagedNetworkPolicy | Kind::StagedGlobalNetworkPolicy => Update::Staged {
                key: (namespace, name),
                staged: None,
            },
            Kind::StagedKubernetesNetworkPolicy => Update::Staged {
                key: (
                    namespace,
                    format!("{}{name}", calico_model::k8s::NETWORK_POLICY_PREFIX),
                ),
                staged: None,
            },
            Kind::Profile => {
                if let Some(namespace) = name.strip_prefix(calico_policy::NAMESPACE_PROFILE_PREFIX)
                {
                    self.calc.apply(Update::Namespace {
                        name: namespace.to_owned(),
                        labels: None,
                    });
                }
                Update::Profile {
                    name,
                    profile: None,
                }
            }
            Kind::NetworkSet | Kind::GlobalNetworkSet => Update::NetworkSet {
                namespace,
                name,
                set: None,
            },
            Kind::Tier => Update::Tier { name, tier: None },
            Kind::IPPool => {
                self.pools.remove(&name);
                self.networking_dirty = true;
                return;
            }
            Kind::Node => {
                self.nodes.remove(&name);
                self.networking_dirty = true;
                return;
            }
            Kind::FelixConfiguration => {
                if name == "default" {
                    self.felix_global = None;
                } else if name == format!("node.{}", self.node) {
                    self.felix_node = None;
                }
                return;
            }
            _ => return,
        };
        self.calc.apply(update);
    }
}
