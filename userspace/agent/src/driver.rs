//! The dataplane driver: turns the calculation's per-endpoint policy into attached classifiers
//! and map contents, follows interfaces as they come and go, and keeps routes in step.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use calico_calc::{Calculator, Change, EndpointPolicy};
use calico_dataplane::{ConntrackTimeouts, Hook, PolicyDataplane};
use calico_policy::{CompiledProgram, Direction, EndpointId, PolicyProgram};
use ipnet::IpNet;
use tokio::sync::watch;

use crate::{
    config::FelixSettings,
    failsafe::with_failsafe,
    flowlogs::{self, FlowKey, FlowLog},
    metrics::Metrics,
    netlink::{LinkEvent, OwnedRoute},
    routes::DesiredRoutes,
};

/// A host endpoint's `interfaceName` for every host interface.
pub const WILDCARD: &str = "*";

/// Where a local endpoint lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPlace {
    pub interface: String,
    /// A HostEndpoint (policy for the host itself, with failsafe ports) rather than a
    /// workload's veth.
    pub host: bool,
}

pub struct Driver {
    dataplane: PolicyDataplane,
    metrics: Arc<Metrics>,
    settings: FelixSettings,
    interface_prefix: String,
    /// Every interface: name → index.
    interfaces: BTreeMap<String, u32>,
    places: BTreeMap<EndpointId, EndpointPlace>,
    policies: BTreeMap<EndpointId, EndpointPolicy>,
    /// Interfaces this run attached to and programmed, with their endpoint.
    programmed: BTreeMap<u32, EndpointId>,
    /// This node's IPAM blocks (blackholed).
    blocks: BTreeSet<IpNet>,
    /// Interfaces this run attached the classifiers to.
    attached: BTreeSet<u32>,
    /// Endpoints whose last install failed (they drop that direction): retried every tick.
    failed: BTreeSet<EndpointId>,
    /// The route task's input (see `routes`).
    routes: watch::Sender<DesiredRoutes>,
    routes_complete: bool,
    /// Something routes depend on changed since they were last published.
    routes_dirty: bool,
    /// Conntrack expiry runs on its own thread (see `expire_conntrack_elsewhere`).
    conntrack_elsewhere: bool,
    /// Debug logging of the programs when FelixConfiguration does not say (the flag).
    default_bpf_debug: bool,
    /// Flow records being aggregated, and when they were last written.
    flow_log: FlowLog,
    last_flow_flush: std::time::Instant,
    /// Each rule counter's value when last read, by (program, verdict index): /metrics gets
    /// the increments.
    rule_seen: std::collections::HashMap<(u32, u32), (u64, u64)>,
    /// The program each endpoint and direction would have with the staged policies
    /// committed; None when they change nothing there. Valid for `pending_revision`.
    pending_programs: std::collections::HashMap<(EndpointId, Direction), Option<PolicyProgram>>,
    pending_revision: Option<u64>,
    /// GlobalNetworkPolicies with host-endpoint-only settings (see `compile_endpoint`).
    host_only: BTreeMap<String, HostOnlyPolicy>,
}

/// A GlobalNetworkPolicy's settings that matter for host endpoints only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostOnlyPolicy {
    pub apply_on_forward: bool,
    pub pre_dnat: bool,
    pub do_not_track: bool,
}

/// A preDNAT or doNotTrack policy in a host endpoint's program, as the compile error that
/// makes the endpoint drop that direction: this dataplane judges host endpoint traffic after
/// DNAT and tracks every allowed flow, so such a policy cannot mean here what it says.
fn unsupported_on_host(
    program: &PolicyProgram,
    host_only: &BTreeMap<String, HostOnlyPolicy>,
) -> Option<calico_policy::CompileError> {
    program
        .tiers
        .iter()
        .flat_map(|t| &t.policies)
        .find_map(|p| {
            let flags = host_only.get(&p.name)?;
            let field = if flags.pre_dnat {
                "preDNAT"
            } else if flags.do_not_track {
                "doNotTrack"
            } else {
                return None;
            };
            Some(calico_policy::CompileError {
                policy: p.name.clone(),
                index: 0,
                field: field.to_owned(),
                reason: format!("{field} policies are not supported by this dataplane (host endpoint policy applies after DNAT, to tracked flows)"),
            })
        })
}

/// An endpoint's two programs, compiled; a program that cannot be enforced is replaced by the
/// empty program (which drops) and comes with its error.
struct CompiledEndpoint {
    directions: Vec<(
        Direction,
        CompiledProgram,
        Option<calico_policy::CompileError>,
    )>,
}

/// Compiles both directions of an endpoint's policy (pure: runs on any thread).
fn compile_endpoint(
    policy: &EndpointPolicy,
    host: bool,
    settings: &FelixSettings,
    host_only: &BTreeMap<String, HostOnlyPolicy>,
) -> CompiledEndpoint {
    let directions = [Direction::Ingress, Direction::Egress]
        .into_iter()
        .map(|direction| {
            let program: PolicyProgram = if host {
                with_failsafe(policy.program(direction), direction, settings)
            } else {
                policy.program(direction).clone()
            };
            let unsupported = host
                .then(|| unsupported_on_host(&program, host_only))
                .flatten();
            let compiled_or_error = match unsupported {
                Some(e) => Err(e),
                None => {
                    CompiledProgram::compile_with(policy, &program, &policy.addresses, direction)
                }
            };
            let (mut compiled, error) = match compiled_or_error {
                Ok(c) => (c, None),
                Err(e) => {
                    // Nothing but a host's failsafe ports: the direction drops, the host stays
                    // reachable for its operators.
                    let nothing = if host {
                        with_failsafe(&PolicyProgram::default(), direction, settings)
                    } else {
                        PolicyProgram::default()
                    };
                    let empty = CompiledProgram::compile_with(
                        policy,
                        &nothing,
                        &policy.addresses,
                        direction,
                    )
                    .expect("a program of failsafe ports compiles");
                    (empty, Some(e))
                }
            };
            // A host endpoint's policy judges traffic to and from the host; what the host
            // forwards through its interfaces passes (upstream's semantics) unless an
            // applyOnForward policy applies to it: this dataplane does not judge forwarded
            // traffic by policy, so then it is dropped rather than let through unjudged.
            let forward_judged = policy
                .program(direction)
                .tiers
                .iter()
                .flat_map(|t| &t.policies)
                .any(|p| host_only.get(&p.name).is_some_and(|f| f.apply_on_forward));
            compiled.forwarded_passes = host && !forward_judged;
            compiled.host = host;
            (direction, compiled, error)
        })
        .collect();
    CompiledEndpoint { directions }
}

impl Driver {
    pub fn new(
        dataplane: PolicyDataplane,
        metrics: Arc<Metrics>,
        interface_prefix: String,
        routes: watch::Sender<DesiredRoutes>,
    ) -> Self {
        Self {
            dataplane,
            metrics,
            settings: FelixSettings::default(),
            interface_prefix,
            interfaces: BTreeMap::new(),
            places: BTreeMap::new(),
            policies: BTreeMap::new(),
            programmed: BTreeMap::new(),
            blocks: BTreeSet::new(),
            attached: BTreeSet::new(),
            failed: BTreeSet::new(),
            routes,
            routes_complete: false,
            routes_dirty: false,
            conntrack_elsewhere: false,
            default_bpf_debug: false,
            flow_log: FlowLog::default(),
            last_flow_flush: std::time::Instant::now(),
            rule_seen: Default::default(),
            pending_programs: Default::default(),
            pending_revision: None,
            host_only: BTreeMap::new(),
        }
    }

    /// Records (or forgets) where a local endpoint lives.
    pub fn set_place(&mut self, id: &EndpointId, place: Option<EndpointPlace>) {
        match place {
            Some(p) => {
                self.places.insert(id.clone(), p);
            }
            None => {
                self.places.remove(id);
            }
        }
    }

    pub fn clear_places(&mut self) {
        self.places.clear();
    }

    pub fn set_default_bpf_debug(&mut self, on: bool) {
        self.default_bpf_debug = on;
    }

    /// New failsafe settings reprogram every host endpoint; the log switch follows
    /// `bpfLogLevel`.
    pub async fn set_settings(&mut self, settings: FelixSettings) {
        if settings == self.settings {
            return;
        }
        let on = settings.bpf_debug.unwrap_or(self.default_bpf_debug);
        if on != self.settings.bpf_debug.unwrap_or(self.default_bpf_debug) {
            match self.dataplane.set_debug_logging(on) {
                Ok(()) => tracing::info!(on, "eBPF debug logging switched"),
                Err(e) => tracing::warn!(error = %e, "switching eBPF debug logging"),
            }
        }
        self.settings = settings;
        self.reprogram_host_endpoints().await;
    }

    /// The GlobalNetworkPolicies with host-endpoint-only settings; host endpoints are
    /// programmed again when they change.
    pub async fn set_host_only_policies(&mut self, policies: BTreeMap<String, HostOnlyPolicy>) {
        if policies == self.host_only {
            return;
        }
        self.host_only = policies;
        self.reprogram_host_endpoints().await;
    }

    /// Programs every host endpoint again (what their programs are built from changed).
    async fn reprogram_host_endpoints(&mut self) {
        let hosts: Vec<EndpointId> = self
            .places
            .iter()
            .filter(|(_, p)| p.host)
            .map(|(id, _)| id.clone())
            .collect();
        for id in hosts {
            self.program(&id).await;
        }
    }

    pub fn set_interfaces(&mut self, interfaces: BTreeMap<String, u32>) {
        self.interfaces = interfaces;
    }

    /// Applies the calculation's changes. The endpoints the batch sets are compiled first, in
    /// parallel across cores (compiling is the slow, pure part); the maps are then written in
    /// the batch's order.
    pub async fn apply(&mut self, changes: Vec<Change>, calc: &Calculator) {
        let mut steps = Vec::with_capacity(changes.len());
        for change in changes {
            match change {
                Change::Set(id, policy) => {
                    let addresses = policy.addresses.clone();
                    let old = self.policies.insert(id.clone(), *policy);
                    if old.is_none_or(|o| o.addresses != addresses) {
                        self.routes_dirty = true;
                    }
                    steps.push((id, true));
                }
                Change::Removed(id) => {
                    self.policies.remove(&id);
                    steps.push((id, false));
                }
            }
        }
        let compiling = std::time::Instant::now();
        let mut compiled = self.compile_all(steps.iter().filter(|(_, set)| *set).map(|(id, _)| id));
        tracing::debug!(
            endpoints = compiled.len(),
            us = compiling.elapsed().as_micros() as u64,
            "compiled"
        );
        for (id, set) in steps {
            // A cold start programs thousands of endpoints in one batch: each one is progress,
            // so liveness holds while it lasts.
            self.metrics.turned();
            if set {
                let precompiled = compiled.remove(&id);
                self.program_with(&id, precompiled).await;
            } else {
                self.unprogram(&id).await;
            }
        }
        // What the batch replaced goes once all of it is enforced (the events it left are
        // read first, while its rules are still known).
        self.collect_flows(calc);
        self.dataplane.release_retired();
        self.publish_routes();
    }

    /// Compiles the endpoints among `ids` that can be programmed now (policy, place and
    /// interface known), on up to one thread per core.
    fn compile_all<'a>(
        &self,
        ids: impl Iterator<Item = &'a EndpointId>,
    ) -> BTreeMap<EndpointId, CompiledEndpoint> {
        let work: Vec<(&EndpointId, &EndpointPolicy, bool)> = ids
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter_map(|id| {
                let place = self.places.get(id)?;
                self.interfaces.get(&place.interface)?;
                Some((id, self.policies.get(id)?, place.host))
            })
            .collect();
        let settings = &self.settings;
        let forward = &self.host_only;
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(work.len());
        if threads <= 1 {
            return work
                .into_iter()
                .map(|(id, policy, host)| {
                    (
                        id.clone(),
                        compile_endpoint(policy, host, settings, forward),
                    )
                })
                .collect();
        }
        let chunk = work.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let workers: Vec<_> = work
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|(id, policy, host)| {
                                (
                                    (*id).clone(),
                                    compile_endpoint(policy, *host, settings, forward),
                                )
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().expect("compiling does not panic"))
                .collect()
        })
    }

    pub async fn on_link(&mut self, event: LinkEvent) {
        self.routes_dirty = true;
        match event {
            LinkEvent::Present { name, index } => {
                let known = self.interfaces.get(&name) == Some(&index);
                self.interfaces.insert(name.clone(), index);
                if known && self.programmed.contains_key(&index) {
                    return;
                }
                let wildcard = self.wildcard_covers(&name);
                let owner: Vec<EndpointId> = self
                    .places
                    .iter()
                    .filter(|(_, p)| {
                        p.interface == name || (wildcard && p.host && p.interface == WILDCARD)
                    })
                    .map(|(id, _)| id.clone())
                    .collect();
                if owner.is_empty() {
                    self.guard_unknown_workload(&name, index);
                }
                for id in owner {
                    self.program(&id).await;
                }
            }
            LinkEvent::Gone { name, index } => {
                if self.interfaces.get(&name) == Some(&index) {
                    self.interfaces.remove(&name);
                }
                self.attached.remove(&index);
                if self.programmed.remove(&index).is_some() {
                    self.metrics.endpoints.set(self.programmed.len() as i64);
                    tracing::info!(interface = %name, index, "interface gone; its programs and policy go with it");
                }
                if let Err(e) = self.dataplane.forget_interface(index) {
                    tracing::warn!(interface = %name, error = %e, "cleaning up after a removed interface");
                }
            }
        }
    }

    /// Guards every workload interface that has no endpoint (at the first complete sync).
    pub fn guard_unknown_workloads(&mut self) {
        let owned: BTreeSet<&str> = self.places.values().map(|p| p.interface.as_str()).collect();
        let unknown: Vec<(String, u32)> = self
            .interfaces
            .iter()
            .filter(|(name, _)| !owned.contains(name.as_str()))
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        for (name, index) in unknown {
            self.guard_unknown_workload(&name, index);
        }
    }

    /// A workload interface (by its prefix) with no endpoint known yet, as when the CNI plugin
    /// has made the veth but its WorkloadEndpoint has not arrived: the classifiers go on at once
    /// with no program installed, so it drops IP traffic until its policy is in (upstream drops
    /// traffic of unknown workload interfaces too).
    fn guard_unknown_workload(&mut self, name: &str, index: u32) {
        if !name.starts_with(&self.interface_prefix) || self.attached.contains(&index) {
            return;
        }
        match self.dataplane.attach(name) {
            Ok(_) => {
                tracing::debug!(interface = %name, "workload interface without an endpoint: dropping its traffic until one arrives");
                self.attached.insert(index);
            }
            Err(e) => {
                tracing::warn!(interface = %name, error = %e, "attaching to a workload interface without an endpoint")
            }
        }
    }

    /// Attaches to and programs `id`'s interface, if both the policy and the interface exist.
    async fn program(&mut self, id: &EndpointId) {
        self.program_with(id, None).await;
    }

    /// The interfaces an endpoint's programs go on: its own; for a host endpoint with
    /// `interfaceName: "*"` every host interface no other host endpoint names (not loopback,
    /// the workloads' veths or the overlay's device), as upstream's wildcard.
    fn interfaces_of(&self, id: &EndpointId) -> Vec<(String, u32)> {
        let Some(place) = self.places.get(id) else {
            return Vec::new();
        };
        if !(place.host && place.interface == WILDCARD) {
            return self
                .interfaces
                .get(&place.interface)
                .map(|i| vec![(place.interface.clone(), *i)])
                .unwrap_or_default();
        }
        self.interfaces
            .iter()
            .filter(|(name, _)| self.wildcard_covers(name))
            .map(|(n, i)| (n.clone(), *i))
            .collect()
    }

    /// Whether a `*` host endpoint covers interface `name`.
    fn wildcard_covers(&self, name: &str) -> bool {
        name != "lo"
            && name != crate::vxlan::DEVICE
            && !name.starts_with(&self.interface_prefix)
            && !self.places.values().any(|p| p.host && p.interface == name)
    }

    /// As [`Driver::program`], with the endpoint's programs compiled already (or compiled
    /// here when `None`).
    async fn program_with(&mut self, id: &EndpointId, compiled: Option<CompiledEndpoint>) {
        let (Some(place), Some(policy)) = (self.places.get(id), self.policies.get(id)) else {
            return;
        };
        let targets = self.interfaces_of(id);
        if targets.is_empty() {
            tracing::debug!(endpoint = ?id, interface = %place.interface, "interface not there yet");
            return;
        }
        let place = place.clone();
        let compiled = compiled.unwrap_or_else(|| {
            compile_endpoint(policy, place.host, &self.settings, &self.host_only)
        });
        if place.host
            && compiled
                .directions
                .iter()
                .any(|(_, c, _)| !c.forwarded_passes)
        {
            tracing::warn!(endpoint = ?id, "an applyOnForward policy applies to this host endpoint; this dataplane does not judge forwarded traffic by policy, so traffic the host forwards through it is dropped");
        }
        for (interface, ifindex) in targets {
            self.install_on(id, &place, &interface, ifindex, &compiled);
        }
        self.metrics.endpoints.set(self.programmed.len() as i64);
    }

    /// Attaches to and installs `compiled` on one of `id`'s interfaces.
    fn install_on(
        &mut self,
        id: &EndpointId,
        place: &EndpointPlace,
        interface: &str,
        ifindex: u32,
        compiled: &CompiledEndpoint,
    ) {
        let t0 = std::time::Instant::now();
        if self.programmed.get(&ifindex) != Some(id) {
            if !self.attached.contains(&ifindex) {
                let attached = if place.host {
                    self.dataplane.attach_host(interface)
                } else {
                    self.dataplane.attach(interface)
                };
                if let Err(e) = attached {
                    tracing::error!(endpoint = ?id, %interface, error = %e, "attaching the policy programs failed");
                    return;
                }
                self.attached.insert(ifindex);
            }
            if !place.host {
                if let Err(e) = calico_hostlink::configure_host_end(interface, false) {
                    tracing::warn!(%interface, error = %e, "interface sysctls");
                }
            }
        }
        let t1 = std::time::Instant::now();
        let mut failed = false;
        for (direction, compiled, error) in &compiled.directions {
            if let Some(e) = error {
                // Never silently allowed: the endpoint drops in this direction until the
                // policy is fixed.
                self.metrics.compile_errors.inc();
                tracing::error!(endpoint = ?id, ?direction, error = %e, "policy cannot be enforced; the endpoint drops this direction's traffic");
            }
            if let Err(e) =
                self.dataplane
                    .install(ifindex, Hook::for_direction(*direction), compiled)
            {
                // The dataplane leaves the hook without a program: it drops until a retry
                // succeeds (never the previous policy, never open).
                self.metrics.install_errors.inc();
                tracing::error!(endpoint = ?id, ?direction, error = %e, "writing the policy maps failed; the endpoint drops this direction's traffic until a retry succeeds");
                failed = true;
            }
        }
        if failed {
            self.failed.insert(id.clone());
        } else {
            self.failed.remove(id);
        }
        if self.programmed.insert(ifindex, id.clone()).as_ref() != Some(id) {
            self.routes_dirty = true;
        }
        tracing::debug!(
            endpoint = ?id,
            %interface,
            attach_us = (t1 - t0).as_micros() as u64,
            install_us = t1.elapsed().as_micros() as u64,
            "programmed"
        );
    }

    /// Takes an endpoint's programs and its own routes away (just those: a batch removing many
    /// endpoints must not dump the routing table once per endpoint).
    async fn unprogram(&mut self, id: &EndpointId) {
        let ifindexes: Vec<u32> = self
            .programmed
            .iter()
            .filter(|(_, e)| *e == id)
            .map(|(i, _)| *i)
            .collect();
        if ifindexes.is_empty() {
            return;
        }
        self.failed.remove(id);
        for ifindex in ifindexes {
            self.programmed.remove(&ifindex);
            // A workload interface that outlives its endpoint (deleted before the CNI DEL)
            // keeps its classifiers with no program, so it drops; anything else is released.
            let still_a_workload = self
                .interfaces
                .iter()
                .any(|(name, i)| *i == ifindex && name.starts_with(&self.interface_prefix));
            let released = if still_a_workload {
                [Hook::Ingress, Hook::Egress]
                    .into_iter()
                    .try_for_each(|h| self.dataplane.remove(ifindex, h))
            } else {
                self.attached.remove(&ifindex);
                self.dataplane.forget_interface(ifindex)
            };
            if let Err(e) = released {
                tracing::warn!(endpoint = ?id, error = %e, "removing the endpoint's programs");
            }
        }
        self.metrics.endpoints.set(self.programmed.len() as i64);
        self.routes_dirty = true;
        // A `*` host endpoint takes the host interfaces a named one left.
        let wildcards: Vec<EndpointId> = self
            .places
            .iter()
            .filter(|(w, p)| p.host && p.interface == WILDCARD && *w != id)
            .map(|(w, _)| w.clone())
            .collect();
        for w in wildcards {
            self.program(&w).await;
        }
    }

    /// Sets this node's blocks (from its block affinities).
    pub async fn set_blocks(&mut self, blocks: BTreeSet<IpNet>) {
        if blocks != self.blocks {
            self.blocks = blocks;
            self.routes_dirty = true;
            self.publish_routes();
        }
    }

    /// Publishes the routes this state wants to the route task (see `routes`), which brings
    /// the kernel to them off this loop.
    pub fn publish_routes(&mut self) {
        // Only when something routes depend on changed: a policy update touches none of it,
        // and this walk is O(endpoints).
        if !std::mem::take(&mut self.routes_dirty) {
            return;
        }
        let mut routes: BTreeSet<OwnedRoute> = self
            .blocks
            .iter()
            .map(|b| OwnedRoute::Blackhole { dest: *b })
            .collect();
        for (ifindex, id) in &self.programmed {
            let host = self.places.get(id).is_none_or(|p| p.host);
            if let (false, Some(policy)) = (host, self.policies.get(id)) {
                routes.extend(policy.addresses.iter().map(|a| OwnedRoute::Workload {
                    dest: IpNet::from(*a),
                    ifindex: *ifindex,
                }));
            }
        }
        let workload_interfaces: BTreeSet<u32> = self
            .interfaces
            .iter()
            .filter(|(n, _)| n.starts_with(&self.interface_prefix))
            .map(|(_, i)| *i)
            .collect();
        let desired = DesiredRoutes {
            routes,
            workload_interfaces,
            complete: self.routes_complete,
        };
        crate::publish(&self.routes, desired);
    }

    /// From now on the published routes are all there should be (stale ones may go).
    pub fn routes_complete(&mut self) {
        self.routes_complete = true;
        self.routes_dirty = true;
        self.publish_routes();
    }

    /// After the first complete sync: what a previous run left for interfaces or endpoints
    /// that no longer exist goes.
    pub fn sweep_leftovers(&mut self) {
        let mut stale: BTreeSet<u32> = self.dataplane.pinned_interfaces();
        match self.dataplane.programmed_interfaces() {
            Ok(p) => stale.extend(p),
            Err(e) => tracing::warn!(error = %e, "reading the endpoint map"),
        }
        for ifindex in stale {
            if !self.programmed.contains_key(&ifindex) && !self.attached.contains(&ifindex) {
                tracing::info!(
                    ifindex,
                    "releasing a previous run's attachment with no endpoint now"
                );
                if let Err(e) = self.dataplane.forget_interface(ifindex) {
                    tracing::warn!(ifindex, error = %e, "releasing");
                }
            }
        }
        match self.dataplane.sweep() {
            Ok(n) => tracing::info!(
                entries = n,
                "removed map entries of programs no endpoint uses"
            ),
            Err(e) => tracing::warn!(error = %e, "sweeping the policy maps"),
        }
    }

    /// Installs again what failed to install (a map that was full may have room now).
    pub async fn retry_failed(&mut self) {
        let failed: Vec<EndpointId> = self.failed.iter().cloned().collect();
        for id in failed {
            if self.places.contains_key(&id) && self.policies.contains_key(&id) {
                // Forces the whole programming path again, not just the tables.
                self.programmed.retain(|_, e| *e != id);
                self.program(&id).await;
            } else {
                self.failed.remove(&id);
            }
        }
        self.publish_routes();
    }

    /// Periodic housekeeping: replaced programs, conntrack expiry and the numbers /metrics
    /// shows.
    pub fn housekeeping(&mut self, calc: &Calculator) {
        self.collect_flows(calc);
        self.dataplane.release_retired();
        self.count_rules();
        release_freed_memory();
        if !self.conntrack_elsewhere {
            log_expiry(
                self.dataplane
                    .expire_conntrack(&ConntrackTimeouts::default()),
            );
        }
        self.refresh_counters(calc);
        // Walking every map is not cheap with large tables: only here, not per update.
        self.metrics.set_occupancy(self.dataplane.occupancy());
        self.metrics.set_capacity(self.dataplane.capacities());
    }

    /// Moves conntrack expiry to a thread of its own, every `every` (a walk over a large table
    /// must not hold up policy updates). Without pinned maps it stays in `housekeeping`.
    pub fn expire_conntrack_elsewhere(&mut self, every: std::time::Duration) {
        let mut expirer = match self.dataplane.conntrack_expirer() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "conntrack expiry stays on the main loop");
                return;
            }
        };
        let spawned = std::thread::Builder::new()
            .name("conntrack-expiry".into())
            .spawn(move || loop {
                // A periodic pass, not a wait for something to happen.
                std::thread::sleep(every);
                log_expiry(expirer.expire(&ConntrackTimeouts::default()));
            });
        match spawned {
            Ok(_) => self.conntrack_elsewhere = true,
            Err(e) => tracing::warn!(error = %e, "conntrack expiry stays on the main loop"),
        }
    }

    /// Reads the classifiers' verdict events into the flow log (always: a ring nobody
    /// drains only counts losses), and writes the flow log when its interval is up. Where
    /// staged policies would change an endpoint's policy, each new record also gets the
    /// verdict they would give (the reference evaluator over the pending program), and
    /// every judged packet there is counted under it on /metrics.
    fn collect_flows(&mut self, calc: &Calculator) {
        let now = std::time::SystemTime::now();
        let events = self.dataplane.drain_events(100_000);
        let Some(settings) = self.settings.flow_logs.clone() else {
            return;
        };
        if self.pending_revision != Some(calc.revision()) {
            self.pending_programs.clear();
            self.pending_revision = Some(calc.revision());
        }
        let world = calc.world();
        let staged = world.has_staged();
        for e in events {
            let key = self.flow_key(&e);
            let pending = if staged && !self.flow_log.contains(&key) {
                self.pending_verdict(world, &e, &key)
            } else {
                None
            };
            let bytes = u64::from(e.len);
            if let Some(labels) = self.flow_log.add(key, bytes, now, pending) {
                self.metrics.add_pending_rule_counts(labels, 1, bytes);
            }
        }
        Metrics::set_total(&self.metrics.flow_records_dropped, self.flow_log.dropped);
        if self.last_flow_flush.elapsed() >= settings.flush_interval {
            self.last_flow_flush = std::time::Instant::now();
            let lines = self.flow_log.take_lines();
            if let Err(e) = flowlogs::append(&settings.directory, &lines) {
                tracing::warn!(directory = %settings.directory.display(), error = %e, records = lines.len(), "writing flow logs");
            }
        }
    }

    /// What the staged policies would decide for the packet of `e`, when they change its
    /// endpoint's policy in that direction (None: as enforced).
    fn pending_verdict(
        &mut self,
        world: &calico_policy::World,
        e: &calico_bpf_common::VerdictEvent,
        key: &FlowKey,
    ) -> Option<flowlogs::RuleLabels> {
        let id = self.programmed.get(&e.ifindex)?.clone();
        let host = self.places.get(&id).is_some_and(|p| p.host);
        let direction = if key.reporter == "src" {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        let (policies, settings) = (&self.policies, &self.settings);
        let program = self
            .pending_programs
            .entry((id.clone(), direction))
            .or_insert_with(|| {
                let pending = world.pending_program(&id, direction);
                let enforced = policies.get(&id).map(|p| p.program(direction));
                if enforced == Some(&pending) {
                    return None;
                }
                Some(if host {
                    with_failsafe(&pending, direction, settings)
                } else {
                    pending
                })
            })
            .as_ref()?;
        let icmp = matches!(key.proto, 1 | 58);
        let packet = calico_policy::Packet {
            src: key.source_ip,
            dst: key.dest_ip,
            protocol: key.proto,
            src_port: if icmp { 0 } else { key.source_port },
            dst_port: if icmp { 0 } else { key.dest_port },
            icmp: icmp.then_some(((key.dest_port >> 8) as u8, (key.dest_port & 0xff) as u8)),
        };
        Some(flowlogs::rule_labels(&calico_policy::evaluate(
            world, program, &packet,
        )))
    }

    /// The flow record an event belongs to.
    fn flow_key(&self, e: &calico_bpf_common::VerdictEvent) -> FlowKey {
        let id = self.programmed.get(&e.ifindex);
        let host = id
            .and_then(|id| self.places.get(id))
            .is_some_and(|p| p.host);
        // On a workload's veth tc ingress sees what the workload sends; on a host interface
        // the other way round.
        let sent = (e.hook == calico_bpf_common::TC_INGRESS) != host;
        let policy = if e.verdict == u32::MAX {
            "incomplete-program|deny".to_owned()
        } else {
            self.dataplane.verdict_of(e.program, e.verdict).map_or_else(
                || "unknown".to_owned(),
                |v| flowlogs::policy_field(&flowlogs::rule_labels(v)),
            )
        };
        FlowKey {
            endpoint: id.map_or_else(
                || format!("ifindex {}", e.ifindex),
                |id| format!("{}/{}", id.namespace.as_deref().unwrap_or(""), id.name),
            ),
            reporter: if sent { "src" } else { "dst" },
            source_ip: unmapped(e.src),
            dest_ip: unmapped(e.dst),
            proto: e.protocol as u8,
            source_port: e.src_port,
            dest_port: e.dst_port,
            action: if e.action == calico_bpf_common::ACTION_ALLOW {
                "allow"
            } else {
                "deny"
            },
            policy,
        }
    }

    /// Per-rule counters for /metrics: what each rule counted since it was last read,
    /// including the last counts of programs replaced since.
    fn count_rules(&mut self) {
        let current = match self.dataplane.rule_counters() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reading the rule counters");
                Vec::new()
            }
        };
        let released = self.dataplane.take_released_counters();
        for (c, gone) in current
            .into_iter()
            .map(|c| (c, false))
            .chain(released.into_iter().map(|c| (c, true)))
        {
            let key = (c.program, c.index);
            let (packets, bytes) = self.rule_seen.get(&key).copied().unwrap_or_default();
            let (dp, db) = (
                c.packets.saturating_sub(packets),
                c.bytes.saturating_sub(bytes),
            );
            if dp > 0 || db > 0 {
                self.metrics
                    .add_rule_counts(flowlogs::rule_labels(&c.verdict), dp, db);
            }
            if gone {
                self.rule_seen.remove(&key);
            } else {
                self.rule_seen.insert(key, (c.packets, c.bytes));
            }
        }
    }

    /// Packet counters for /metrics (cheap: one per-CPU array).
    pub fn refresh_counters(&mut self, calc: &Calculator) {
        self.collect_flows(calc);
        if let Ok(c) = self.dataplane.counters() {
            Metrics::set_total(&self.metrics.allowed, c.allowed);
            Metrics::set_total(&self.metrics.denied, c.denied);
            Metrics::set_total(&self.metrics.tracked, c.tracked);
            Metrics::set_total(&self.metrics.forwarded, c.forwarded);
            Metrics::set_total(&self.metrics.no_policy, c.no_policy);
            Metrics::set_total(&self.metrics.conntrack_lost, c.conntrack_lost);
            Metrics::set_total(&self.metrics.events_lost, c.events_lost);
            Metrics::set_total(&self.metrics.counters_lost, c.counters_lost);
            Metrics::set_total(&self.metrics.conntrack_over_limit, c.conntrack_over_limit);
            Metrics::set_total(&self.metrics.host_forwarded, c.host_forwarded);
        }
    }
}

/// Gives memory the allocator holds freed back to the system now rather than on its next
/// busy moment: after a large batch (a 10,000-rule program replaced) the agent's resident
/// size otherwise stays tens of MB above what it uses until allocation picks up again.
/// (calico-node's allocator is mimalloc; elsewhere this only tidies mimalloc's own empty
/// heaps.)
fn release_freed_memory() {
    // SAFETY: no preconditions; forces mimalloc to purge freed memory of its arenas.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// An address as the classifiers write it (IPv4 v4-mapped).
fn unmapped(a: [u8; 16]) -> std::net::IpAddr {
    let v6 = std::net::Ipv6Addr::from(a);
    v6.to_ipv4_mapped()
        .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4)
}

fn log_expiry(result: Result<usize, calico_dataplane::DataplaneError>) {
    match result {
        Ok(0) => {}
        Ok(n) => tracing::debug!(flows = n, "expired idle tracked flows"),
        Err(e) => tracing::warn!(error = %e, "conntrack expiry"),
    }
}
