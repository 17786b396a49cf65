//! The agent's calculation layer: from datastore updates to what each local endpoint's
//! dataplane programs need, pure and incremental.
//!
//! [`Calculator::apply`] takes one change (an endpoint, policy, profile, network set,
//! namespace or tier appearing, changing or going) and works out which local endpoints it can
//! affect; [`Calculator::flush`] recomputes only those and reports the ones whose
//! [`EndpointPolicy`] actually changed. What a caller holds after applying every reported
//! change equals [`from_scratch`] over the same inputs; the property tests check exactly that.
//!
//! Dependencies tracked:
//! * endpoint labels/profiles → the policies that select it (its own programs) and every IP
//!   set whose selector matches it before or after;
//! * policy → the local endpoints it selected before or selects now;
//! * IP set contents → the local endpoints whose programs consult that set;
//! * profile → endpoints listing it (rules, and inherited labels as above);
//! * namespace labels → endpoints in it and every set with a namespace selector;
//! * tier → endpoints with policies in it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use calico_model::{
    spec::{ProfileSpec, TierDefaultAction},
    Order,
};
use calico_policy::{
    Direction, EndpointId, EndpointInfo, IpSetSource, Item, NamedPortKey, NamedPortMembers,
    NetworkSetInfo, PolicyInfo, PolicyKey, PolicyProgram, SelectorScope, StagedPolicy, World,
};
use calico_selector::Selector;
use ipnet::IpNet;

/// One change to the calculation's inputs; `None` means deleted.
#[derive(Debug, Clone)]
pub enum Update {
    /// `local`: the endpoint lives on this node, so its programs are computed.
    Endpoint {
        id: EndpointId,
        endpoint: Option<EndpointInfo>,
        local: bool,
    },
    Policy {
        namespace: Option<String>,
        name: String,
        policy: Option<PolicyInfo>,
    },
    Profile {
        name: String,
        profile: Option<ProfileSpec>,
    },
    NetworkSet {
        namespace: Option<String>,
        name: String,
        set: Option<NetworkSetInfo>,
    },
    Namespace {
        name: String,
        labels: Option<BTreeMap<String, String>>,
    },
    Tier {
        name: String,
        tier: Option<(Option<Order>, TierDefaultAction)>,
    },
    /// A staged policy, by the key of the enforced policy it previews: it changes no
    /// endpoint's enforced programs, only what flow records say would happen.
    Staged {
        key: PolicyKey,
        staged: Option<StagedPolicy>,
    },
}

impl Update {
    /// The update `item` makes; `local` says whether an endpoint item is on this node.
    pub fn upsert(item: Item, local: bool) -> Update {
        match item {
            Item::Endpoint(id, info) => Update::Endpoint {
                id,
                endpoint: Some(info),
                local,
            },
            Item::NetworkSet(set) => Update::NetworkSet {
                namespace: set.namespace.clone(),
                name: set.name.clone(),
                set: Some(set),
            },
            Item::Tier(name, tier) => Update::Tier {
                name,
                tier: Some(tier),
            },
            Item::Profile(name, spec) => Update::Profile {
                name,
                profile: Some(spec),
            },
            Item::Policy(p) => Update::Policy {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                policy: Some(p),
            },
            Item::Staged(staged) => Update::Staged {
                key: staged.key.clone(),
                staged: Some(staged),
            },
        }
    }
}

/// Everything one local endpoint's dataplane programs are built from.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointPolicy {
    pub addresses: Vec<IpAddr>,
    pub ingress: PolicyProgram,
    pub egress: PolicyProgram,
    /// Every IP set the two programs consult, resolved.
    pub ipsets: BTreeMap<SelectorScope, Vec<IpNet>>,
    /// Every named port on the programs' peer side, resolved.
    pub named_ports: BTreeMap<NamedPortKey, NamedPortMembers>,
}

impl EndpointPolicy {
    pub fn program(&self, direction: Direction) -> &PolicyProgram {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

impl IpSetSource for EndpointPolicy {
    fn prefixes(&self, scope: &SelectorScope) -> Vec<IpNet> {
        // Every scope the programs consult was resolved with them.
        self.ipsets.get(scope).cloned().unwrap_or_default()
    }

    fn named_ports(&self, key: &NamedPortKey) -> NamedPortMembers {
        self.named_ports.get(key).cloned().unwrap_or_default()
    }
}

/// The peer-side named ports of both of an endpoint's programs.
fn named_peer_ports(ingress: &PolicyProgram, egress: &PolicyProgram) -> BTreeSet<NamedPortKey> {
    let mut keys = ingress.named_peer_ports(Direction::Ingress);
    keys.extend(egress.named_peer_ports(Direction::Egress));
    keys
}

/// A local endpoint whose policy changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Set(EndpointId, Box<EndpointPolicy>),
    Removed(EndpointId),
}

/// The policy of endpoint `id` computed from `world` alone: the reference the incremental
/// calculation must agree with.
pub fn from_scratch(world: &World, id: &EndpointId) -> Option<EndpointPolicy> {
    let info = world.endpoints.get(id)?;
    let ingress = world.program(id, Direction::Ingress);
    let egress = world.program(id, Direction::Egress);
    let ipsets = ingress
        .scopes()
        .into_iter()
        .chain(egress.scopes())
        .map(|s| {
            let p = world.prefixes(&s);
            (s, p)
        })
        .collect();
    let named_ports = named_peer_ports(&ingress, &egress)
        .into_iter()
        .map(|k| {
            let m = world.named_port_members(&k);
            (k, m)
        })
        .collect();
    Some(EndpointPolicy {
        addresses: info.addresses.clone(),
        ingress,
        egress,
        ipsets,
        named_ports,
    })
}

/// A scope's selectors, parsed once.
struct ParsedScope {
    selector: Selector,
    namespace_selector: Option<Selector>,
}

impl ParsedScope {
    fn new(scope: &SelectorScope) -> Self {
        let parse = |t: &Option<String>| {
            t.as_deref()
                .map(|t| Selector::parse(t).unwrap_or_else(|_| Selector::all()))
        };
        Self {
            selector: parse(&scope.selector).unwrap_or_else(Selector::all),
            namespace_selector: parse(&scope.namespace_selector),
        }
    }
}

/// How much work the last flushes did (for metrics and the tests of incrementality).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CalcStats {
    /// Local endpoints whose programs were recomputed.
    pub endpoints_recomputed: u64,
    /// IP sets resolved from scratch.
    pub ipsets_resolved: u64,
}

/// The incremental calculation.
#[derive(Default)]
pub struct Calculator {
    world: World,
    local: BTreeSet<EndpointId>,
    /// The last policy reported per local endpoint.
    current: BTreeMap<EndpointId, EndpointPolicy>,
    /// Every IP set some local endpoint's programs consult, resolved, with its parsed form.
    ipsets: BTreeMap<SelectorScope, (ParsedScope, Vec<IpNet>)>,
    /// Which local endpoints consult each IP set.
    users: BTreeMap<SelectorScope, BTreeSet<EndpointId>>,
    /// Which local endpoints each policy (`ns/name` or `name`) applies to, either direction.
    members: BTreeMap<String, BTreeSet<EndpointId>>,
    dirty: BTreeSet<EndpointId>,
    /// Which local endpoints' programs resolve each peer-side named port (with its parsed
    /// scope): a peer in that scope changing its ports, labels or addresses changes them.
    named_users: BTreeMap<NamedPortKey, (ParsedScope, BTreeSet<EndpointId>)>,
    stats: CalcStats,
    /// Counts the updates taken: anything derived from [`Calculator::world`] is stale once
    /// it moves.
    revision: u64,
}

fn policy_key(namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

impl Calculator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves with every update taken (and at a reset).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The inputs as they stand.
    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn stats(&self) -> CalcStats {
        self.stats
    }

    /// The policy last reported for a local endpoint.
    pub fn endpoint(&self, id: &EndpointId) -> Option<&EndpointPolicy> {
        self.current.get(id)
    }

    /// Local endpoints with their last reported policy.
    pub fn endpoints(&self) -> impl Iterator<Item = (&EndpointId, &EndpointPolicy)> {
        self.current.iter()
    }

    /// Forgets everything (before replaying a snapshot); the next flush reports every local
    /// endpoint that is gone as removed and every one that remains as set.
    pub fn reset(&mut self) {
        let old = std::mem::take(&mut self.current);
        let (stats, revision) = (self.stats, self.revision);
        *self = Self::default();
        self.stats = stats;
        self.revision = revision + 1;
        // Keep what was reported so the flush after the replay reports only differences.
        self.current = old;
        self.dirty = self.current.keys().cloned().collect();
    }

    /// Takes one change; nothing is recomputed until [`Calculator::flush`].
    pub fn apply(&mut self, update: Update) {
        self.revision += 1;
        match update {
            Update::Staged { key, staged } => match staged {
                Some(s) => {
                    self.world.staged.insert(key, s);
                }
                None => {
                    self.world.staged.remove(&key);
                }
            },
            Update::Endpoint {
                id,
                endpoint,
                local,
            } => self.apply_endpoint(id, endpoint, local),
            Update::Policy {
                namespace,
                name,
                policy,
            } => {
                let key = policy_key(namespace.as_deref(), &name);
                if let Some(old) = self.members.get(&key) {
                    self.dirty.extend(old.iter().cloned());
                }
                self.world
                    .policies
                    .remove(&(namespace.clone(), name.clone()));
                if let Some(p) = policy {
                    for id in &self.local {
                        if self.policy_may_select(&p, id) {
                            self.dirty.insert(id.clone());
                        }
                    }
                    self.world.put_policy(p);
                }
            }
            Update::Profile { name, profile } => {
                let holders: Vec<EndpointId> = self
                    .world
                    .endpoints
                    .iter()
                    .filter(|(_, e)| e.profiles.contains(&name))
                    .map(|(id, _)| id.clone())
                    .collect();
                let before: Vec<_> = holders
                    .iter()
                    .map(|id| self.world.effective_labels(id))
                    .collect();
                match profile {
                    Some(p) => {
                        self.world.profiles.insert(name, p);
                    }
                    None => {
                        self.world.profiles.remove(&name);
                    }
                }
                for (id, before) in holders.iter().zip(before) {
                    if self.local.contains(id) {
                        self.dirty.insert(id.clone());
                    }
                    let after = self.world.effective_labels(id);
                    self.named_port_peer_changed(id, &before, &after, false);
                    if before != after {
                        let addresses = self.world.endpoints[id].addresses.clone();
                        self.endpoint_sets_changed(id, &before, &addresses, &after, &addresses);
                    }
                }
            }
            Update::NetworkSet {
                namespace,
                name,
                set,
            } => {
                let old = self
                    .world
                    .network_sets
                    .iter()
                    .position(|s| {
                        (s.namespace.as_deref(), s.name.as_str())
                            == (namespace.as_deref(), name.as_str())
                    })
                    .map(|i| self.world.network_sets.swap_remove(i));
                let touched: Vec<SelectorScope> = self
                    .ipsets
                    .iter()
                    .filter(|(_, (parsed, _))| {
                        old.iter()
                            .chain(set.iter())
                            .any(|s| parsed.selector.matches(&s.labels))
                    })
                    .map(|(s, _)| s.clone())
                    .collect();
                if let Some(set) = set {
                    self.world.network_sets.push(set);
                }
                for scope in touched {
                    self.refresh_ipset(&scope);
                }
            }
            Update::Namespace { name, labels } => {
                match labels {
                    Some(l) => {
                        self.world.namespaces.insert(name.clone(), l);
                    }
                    None => {
                        self.world.namespaces.remove(&name);
                    }
                }
                for id in &self.local {
                    if id.namespace.as_deref() == Some(name.as_str()) {
                        self.dirty.insert(id.clone());
                    }
                }
                let named: Vec<EndpointId> = self
                    .named_users
                    .iter()
                    .filter(|((scope, _, _), _)| scope.namespace_selector.is_some())
                    .flat_map(|(_, (_, users))| users.iter().cloned())
                    .collect();
                self.dirty.extend(named);
                let scoped: Vec<SelectorScope> = self
                    .ipsets
                    .keys()
                    .filter(|s| s.namespace_selector.is_some())
                    .cloned()
                    .collect();
                for scope in scoped {
                    self.refresh_ipset(&scope);
                }
            }
            Update::Tier { name, tier } => {
                for p in self.world.policies.values().filter(|p| p.tier == name) {
                    if let Some(m) = self
                        .members
                        .get(&policy_key(p.namespace.as_deref(), &p.name))
                    {
                        self.dirty.extend(m.iter().cloned());
                    }
                }
                match tier {
                    Some(t) => {
                        self.world.tiers.insert(name, t);
                    }
                    None => {
                        self.world.tiers.remove(&name);
                    }
                }
            }
        }
    }

    fn apply_endpoint(&mut self, id: EndpointId, endpoint: Option<EndpointInfo>, local: bool) {
        let before_labels = self.world.effective_labels(&id);
        let (before_addresses, before_ports) = self
            .world
            .endpoints
            .get(&id)
            .map(|e| (e.addresses.clone(), e.ports.clone()))
            .unwrap_or_default();
        let exists = endpoint.is_some();
        match endpoint {
            Some(e) => {
                self.world.endpoints.insert(id.clone(), e);
            }
            None => {
                self.world.endpoints.remove(&id);
            }
        }
        let after_labels = self.world.effective_labels(&id);
        let (after_addresses, after_ports) = self
            .world
            .endpoints
            .get(&id)
            .map(|e| (e.addresses.clone(), e.ports.clone()))
            .unwrap_or_default();
        self.named_port_peer_changed(
            &id,
            &before_labels,
            &after_labels,
            before_addresses != after_addresses || before_ports != after_ports,
        );
        if self.local.contains(&id) || (local && exists) {
            self.dirty.insert(id.clone());
        }
        if local && exists {
            self.local.insert(id.clone());
        } else {
            self.local.remove(&id);
        }
        self.endpoint_sets_changed(
            &id,
            &before_labels,
            &before_addresses,
            &after_labels,
            &after_addresses,
        );
    }

    /// Refreshes every IP set that endpoint `id` was or is a member of, when its membership
    /// or addresses changed.
    /// A peer in the scope of some named port (before or after the change) changed: the
    /// programs resolving that named port are recomputed. `other_change`: its addresses or
    /// ports changed (labels are compared here).
    fn named_port_peer_changed(
        &mut self,
        id: &EndpointId,
        before_labels: &BTreeMap<String, String>,
        after_labels: &BTreeMap<String, String>,
        other_change: bool,
    ) {
        let ns = id.namespace.as_deref();
        let mut touched = Vec::new();
        for ((scope, _, _), (parsed, users)) in &self.named_users {
            if users.is_empty()
                || !self.world.in_scope(
                    ns,
                    parsed.namespace_selector.as_ref(),
                    scope.namespace.as_deref(),
                )
            {
                continue;
            }
            let (was, is) = (
                parsed.selector.matches(before_labels),
                parsed.selector.matches(after_labels),
            );
            if (was || is) && (was != is || other_change) {
                touched.extend(users.iter().cloned());
            }
        }
        self.dirty.extend(touched);
    }

    fn endpoint_sets_changed(
        &mut self,
        id: &EndpointId,
        before_labels: &BTreeMap<String, String>,
        before_addresses: &[IpAddr],
        after_labels: &BTreeMap<String, String>,
        after_addresses: &[IpAddr],
    ) {
        let ns = id.namespace.as_deref();
        let touched: Vec<SelectorScope> = self
            .ipsets
            .iter()
            .filter(|(scope, (parsed, _))| {
                let visible = self.world.in_scope(
                    ns,
                    parsed.namespace_selector.as_ref(),
                    scope.namespace.as_deref(),
                );
                if !visible {
                    return false;
                }
                let was = !before_addresses.is_empty() && parsed.selector.matches(before_labels);
                let is = !after_addresses.is_empty() && parsed.selector.matches(after_labels);
                (was || is) && (was != is || before_addresses != after_addresses)
            })
            .map(|(s, _)| s.clone())
            .collect();
        for scope in touched {
            self.refresh_ipset(&scope);
        }
    }

    /// Resolves `scope` again; when its contents changed, its users are recomputed.
    fn refresh_ipset(&mut self, scope: &SelectorScope) {
        let fresh = self.world.prefixes(scope);
        self.stats.ipsets_resolved += 1;
        if let Some((_, old)) = self.ipsets.get_mut(scope) {
            if *old != fresh {
                *old = fresh;
                if let Some(users) = self.users.get(scope) {
                    self.dirty.extend(users.iter().cloned());
                }
            }
        }
    }

    /// Whether policy `p` can apply to local endpoint `id` (a superset test is fine: a
    /// false positive only costs a recomputation).
    fn policy_may_select(&self, p: &PolicyInfo, id: &EndpointId) -> bool {
        if p.namespace.is_some() && p.namespace != id.namespace {
            return false;
        }
        self.world
            .endpoints
            .get(id)
            .is_some_and(|ep| p.selector.matches(&self.world.endpoint_labels(id, ep)))
    }

    /// Recomputes the dirty local endpoints; returns those whose policy changed.
    pub fn flush(&mut self) -> Vec<Change> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut changes = Vec::new();
        for id in dirty {
            self.forget_dependencies(&id);
            let fresh = if self.local.contains(&id) {
                self.compute(&id)
            } else {
                None
            };
            match fresh {
                Some(fresh) => {
                    if self.current.get(&id) != Some(&fresh) {
                        self.current.insert(id.clone(), fresh.clone());
                        changes.push(Change::Set(id, Box::new(fresh)));
                    }
                }
                None => {
                    if self.current.remove(&id).is_some() {
                        changes.push(Change::Removed(id));
                    }
                }
            }
        }
        // IP sets nobody consults any more.
        let unused: Vec<SelectorScope> = self
            .ipsets
            .keys()
            .filter(|s| self.users.get(*s).is_none_or(BTreeSet::is_empty))
            .cloned()
            .collect();
        for s in unused {
            self.ipsets.remove(&s);
            self.users.remove(&s);
        }
        changes
    }

    fn forget_dependencies(&mut self, id: &EndpointId) {
        if let Some(old) = self.current.get(id) {
            for key in old.named_ports.keys() {
                if let Some((_, u)) = self.named_users.get_mut(key) {
                    u.remove(id);
                }
            }
            for scope in old.ipsets.keys() {
                if let Some(u) = self.users.get_mut(scope) {
                    u.remove(id);
                }
            }
            for p in old
                .ingress
                .tiers
                .iter()
                .chain(&old.egress.tiers)
                .flat_map(|t| &t.policies)
            {
                if let Some(m) = self.members.get_mut(&p.name) {
                    m.remove(id);
                }
            }
        }
    }

    fn compute(&mut self, id: &EndpointId) -> Option<EndpointPolicy> {
        self.stats.endpoints_recomputed += 1;
        let info = self.world.endpoints.get(id)?;
        let addresses = info.addresses.clone();
        let ingress = self.world.program(id, Direction::Ingress);
        let egress = self.world.program(id, Direction::Egress);
        let mut ipsets = BTreeMap::new();
        for scope in ingress.scopes().into_iter().chain(egress.scopes()) {
            if !self.ipsets.contains_key(&scope) {
                let prefixes = self.world.prefixes(&scope);
                self.stats.ipsets_resolved += 1;
                self.ipsets
                    .insert(scope.clone(), (ParsedScope::new(&scope), prefixes));
            }
            self.users
                .entry(scope.clone())
                .or_default()
                .insert(id.clone());
            ipsets.insert(scope.clone(), self.ipsets[&scope].1.clone());
        }
        for p in ingress
            .tiers
            .iter()
            .chain(&egress.tiers)
            .flat_map(|t| &t.policies)
        {
            self.members
                .entry(p.name.clone())
                .or_default()
                .insert(id.clone());
        }
        let mut named_ports = BTreeMap::new();
        for key in named_peer_ports(&ingress, &egress) {
            let members = self.world.named_port_members(&key);
            self.named_users
                .entry(key.clone())
                .or_insert_with(|| (ParsedScope::new(&key.0), BTreeSet::new()))
                .1
                .insert(id.clone());
            named_ports.insert(key, members);
        }
        Some(EndpointPolicy {
            addresses,
            ingress,
            egress,
            ipsets,
            named_ports,
        })
    }
}
