//! The inputs of the calculation, already read from the datastore.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use calico_model::{
    spec::{PolicyType, ProfileSpec, Rule, TierDefaultAction, DEFAULT_TIER},
    Order,
};
use calico_selector::Selector;
use ipnet::IpNet;

/// A workload or host endpoint: namespace (None for host endpoints) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EndpointId {
    pub namespace: Option<String>,
    pub name: String,
}

#[derive(Debug, Clone, Default)]
pub struct EndpointInfo {
    pub labels: LabelSet,
    pub profiles: Vec<String>,
    pub addresses: Vec<IpAddr>,
    /// Its named ports (`spec.ports`), which rules' named ports on its own side resolve to.
    pub ports: Vec<NamedPort>,
}

/// One of an endpoint's named ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    /// The protocol number (TCP 6, UDP 17, SCTP 132, UDPLite 136).
    pub protocol: Option<u8>,
    pub port: u16,
}

/// An endpoint's own labels, compact: sorted `(key, value)` pairs in one allocation of boxed
/// strings. A cluster's every endpoint is held, and a `BTreeMap` costs ~700 bytes for three
/// labels where this costs ~250.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LabelSet(Box<[(Box<str>, Box<str>)]>);

impl LabelSet {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<BTreeMap<String, String>> for LabelSet {
    fn from(map: BTreeMap<String, String>) -> Self {
        // A BTreeMap iterates in key order: the slice is sorted.
        Self(
            map.into_iter()
                .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
                .collect(),
        )
    }
}

impl<const N: usize> From<[(String, String); N]> for LabelSet {
    fn from(pairs: [(String, String); N]) -> Self {
        BTreeMap::from(pairs).into()
    }
}

impl calico_selector::Labels for LabelSet {
    fn get(&self, key: &str) -> Option<&str> {
        LabelSet::get(self, key)
    }
}

#[derive(Debug, Clone, Default)]
pub struct NetworkSetInfo {
    pub name: String,
    /// None for a GlobalNetworkSet.
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub nets: Vec<IpNet>,
}

/// A NetworkPolicy (namespaced) or GlobalNetworkPolicy, reduced to what evaluation needs.
#[derive(Debug, Clone)]
pub struct PolicyInfo {
    pub name: String,
    /// Some for a NetworkPolicy.
    pub namespace: Option<String>,
    pub tier: String,
    pub order: Option<Order>,
    pub selector: Selector,
    /// GlobalNetworkPolicy only: restricts by the endpoint's namespace labels.
    pub namespace_selector: Option<Selector>,
    pub types: Vec<PolicyType>,
    /// Shared: policies with the same rules (a template applied in every namespace, whose
    /// selectors read relative to each) hold one copy (see [`World::put_policy`]).
    pub ingress: Rules,
    pub egress: Rules,
}

/// A policy's rules for one direction, shared between policies that have the same ones.
pub type Rules = std::sync::Arc<Vec<Rule>>;

impl PolicyInfo {
    /// Upstream's default when `types` is empty: Ingress, plus Egress when there are egress
    /// rules (Egress alone when there are egress rules and no ingress rules).
    pub fn effective_types(&self) -> Vec<PolicyType> {
        if !self.types.is_empty() {
            return self.types.clone();
        }
        match (self.ingress.is_empty(), self.egress.is_empty()) {
            (_, true) => vec![PolicyType::Ingress],
            (true, false) => vec![PolicyType::Egress],
            (false, false) => vec![PolicyType::Ingress, PolicyType::Egress],
        }
    }
}

/// A policy's identity: namespace (None for a GlobalNetworkPolicy) and name.
pub type PolicyKey = (Option<String>, String);

/// A StagedNetworkPolicy, StagedGlobalNetworkPolicy or StagedKubernetesNetworkPolicy: what
/// committing it would do to the enforced policy with its key (upstream's preview).
#[derive(Debug, Clone)]
pub struct StagedPolicy {
    /// The enforced policy's key (`knp.default.<name>` for a staged Kubernetes policy).
    pub key: PolicyKey,
    pub action: calico_model::spec::StagedAction,
    /// The policy a `Set` would enforce, named as flow records name a staged policy
    /// (`<tier>.staged:<name>`, or `staged:<name>`); None for the other actions.
    pub policy: Option<PolicyInfo>,
}

impl StagedPolicy {
    /// Learn and Ignore preview nothing.
    pub fn changes_enforcement(&self) -> bool {
        use calico_model::spec::StagedAction;
        matches!(self.action, StagedAction::Set | StagedAction::Delete)
    }
}

/// How upstream names a staged policy in flow logs: `staged:` before the policy's own part
/// of the name (`default.staged:allow-web`, `staged:knp.default.web`).
pub fn staged_name(name: &str, tier: &str) -> String {
    match name
        .strip_prefix(tier)
        .and_then(|rest| rest.strip_prefix('.'))
    {
        Some(own) if !name.starts_with("knp.") => format!("{tier}.staged:{own}"),
        _ => format!("staged:{name}"),
    }
}

/// Everything the calculation looks at.
#[derive(Debug, Clone, Default)]
pub struct World {
    pub endpoints: BTreeMap<EndpointId, EndpointInfo>,
    /// Namespace labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    pub network_sets: Vec<NetworkSetInfo>,
    /// Tier name → (order, default action). The default tier exists implicitly.
    pub tiers: BTreeMap<String, (Option<Order>, TierDefaultAction)>,
    /// By (namespace, name): replacing or deleting one of 10,000 policies is a lookup.
    pub policies: BTreeMap<PolicyKey, PolicyInfo>,
    pub profiles: BTreeMap<String, ProfileSpec>,
    /// Staged policies by the key of the enforced policy they would set or delete: evaluated
    /// for flow records, never enforced (see [`World::pending_program`]).
    pub staged: BTreeMap<PolicyKey, StagedPolicy>,
    /// Rule lists by a hash of their JSON (the JSON itself would hold a copy as large as the
    /// rules), so that equal ones are stored once; entries whose lists are gone are swept as
    /// the map grows.
    shared_rules: std::collections::HashMap<u64, Vec<std::sync::Weak<Vec<Rule>>>>,
}

impl PolicyInfo {
    pub fn key(&self) -> PolicyKey {
        (self.namespace.clone(), self.name.clone())
    }
}

/// An endpoint's labels as selectors see them, without copying any: its own, then those its
/// profiles apply (in order), then the implicit `projectcalico.org/namespace`.
pub struct EndpointLabels<'a> {
    world: &'a World,
    own: &'a LabelSet,
    profiles: &'a [String],
    namespace: Option<&'a str>,
}

impl calico_selector::Labels for EndpointLabels<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.own
            .get(key)
            .or_else(|| {
                self.profiles.iter().find_map(|p| {
                    self.world
                        .profiles
                        .get(p)
                        .and_then(|p| BTreeMap::get(&p.labels_to_apply, key))
                        .map(String::as_str)
                })
            })
            .or_else(|| {
                (key == "projectcalico.org/namespace")
                    .then_some(self.namespace)
                    .flatten()
            })
    }
}

/// A namespace's labels as a `namespaceSelector` sees them, without copying: its own plus
/// the implicit `projectcalico.org/name`.
pub struct NamespaceLabels<'a> {
    own: Option<&'a BTreeMap<String, String>>,
    name: &'a str,
}

impl calico_selector::Labels for NamespaceLabels<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        if key == "projectcalico.org/name" {
            return Some(self.name);
        }
        self.own
            .and_then(|l| BTreeMap::get(l, key))
            .map(String::as_str)
    }
}

/// The smallest namespace name after `ns`: where the next namespace's endpoints start in a
/// map ordered by namespace first.
fn after(ns: &str) -> EndpointId {
    EndpointId {
        namespace: Some(format!("{ns}\0")),
        name: String::new(),
    }
}

fn first_of(ns: &str) -> EndpointId {
    EndpointId {
        namespace: Some(ns.to_owned()),
        name: String::new(),
    }
}

impl World {
    /// Adds or replaces a policy. Its rule lists are shared with any equal ones already held:
    /// 10,000 policies from a few templates keep a few lists, not 100,000 rules.
    pub fn put_policy(&mut self, mut policy: PolicyInfo) {
        policy.ingress = self.share(policy.ingress);
        policy.egress = self.share(policy.egress);
        self.policies.insert(policy.key(), policy);
    }

    fn share(&mut self, rules: Rules) -> Rules {
        use std::hash::{Hash, Hasher};
        if rules.is_empty() {
            return rules;
        }
        let Ok(json) = serde_json::to_vec(&*rules) else {
            return rules;
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        json.hash(&mut hasher);
        drop(json);
        let key = hasher.finish();
        // Equal hashes are compared whole: a collision never shares unequal rules.
        if let Some(held) = self.shared_rules.get(&key).and_then(|list| {
            list.iter()
                .filter_map(std::sync::Weak::upgrade)
                .find(|held| **held == *rules)
        }) {
            return held;
        }
        if self.shared_rules.len() >= 64 + 2 * self.policies.len() {
            self.shared_rules.retain(|_, list| {
                list.retain(|w| w.strong_count() > 0);
                !list.is_empty()
            });
        }
        self.shared_rules
            .entry(key)
            .or_default()
            .push(std::sync::Arc::downgrade(&rules));
        rules
    }

    /// The labels of endpoint `ep` (with id `id`) as a selector sees them; see
    /// [`World::effective_labels`] for an owned copy.
    pub fn endpoint_labels<'a>(
        &'a self,
        id: &'a EndpointId,
        ep: &'a EndpointInfo,
    ) -> EndpointLabels<'a> {
        EndpointLabels {
            world: self,
            own: &ep.labels,
            profiles: &ep.profiles,
            namespace: id.namespace.as_deref(),
        }
    }

    /// Namespace `ns`'s labels as a `namespaceSelector` sees them.
    pub fn namespace_view<'a>(&'a self, ns: &'a str) -> NamespaceLabels<'a> {
        NamespaceLabels {
            own: self.namespaces.get(ns),
            name: ns,
        }
    }

    /// The endpoints a selector with `namespace_selector` in a policy of `policy_namespace`
    /// can see (exactly those [`World::in_scope`] admits), found by namespace: the policy's own
    /// namespace is one range of the map (ordered by namespace first), a namespace selector
    /// is evaluated once per namespace and the matching namespaces' ranges taken whole.
    fn endpoints_visible(
        &self,
        namespace_selector: Option<&Selector>,
        policy_namespace: Option<&str>,
    ) -> Vec<(&EndpointId, &EndpointInfo)> {
        fn namespace_of<'w>(
            endpoints: &'w BTreeMap<EndpointId, EndpointInfo>,
            ns: &str,
        ) -> impl Iterator<Item = (&'w EndpointId, &'w EndpointInfo)> {
            let first = first_of(ns);
            let ns = first.namespace.clone();
            endpoints
                .range(first..)
                .take_while(move |(id, _)| id.namespace == ns)
        }
        match (namespace_selector, policy_namespace) {
            (Some(sel), _) if matches!(sel.expr(), calico_selector::Expr::Global) => self
                .endpoints
                .iter()
                .take_while(|(id, _)| id.namespace.is_none())
                .collect(),
            (Some(sel), _) => {
                let mut out = Vec::new();
                let mut next = self.endpoints.range(first_of("")..).next();
                while let Some((id, _)) = next {
                    let ns = id.namespace.as_deref().unwrap_or_default();
                    if sel.matches(&self.namespace_view(ns)) {
                        out.extend(namespace_of(&self.endpoints, ns));
                    }
                    next = self.endpoints.range(after(ns)..).next();
                }
                out
            }
            (None, Some(ns)) => namespace_of(&self.endpoints, ns).collect(),
            (None, None) => self.endpoints.iter().collect(),
        }
    }

    /// An endpoint's labels with those it inherits from its profiles, plus the implicit
    /// `projectcalico.org/namespace` label, as selectors see them.
    pub fn effective_labels(&self, id: &EndpointId) -> BTreeMap<String, String> {
        let Some(ep) = self.endpoints.get(id) else {
            return BTreeMap::new();
        };
        // The keys any source has, each read through the one view selectors use (own labels
        // first, then profiles in order, then the implicit namespace label).
        let view = self.endpoint_labels(id, ep);
        let mut keys: BTreeSet<&str> = ep.labels.iter().map(|(k, _)| k).collect();
        for p in ep.profiles.iter().filter_map(|p| self.profiles.get(p)) {
            keys.extend(p.labels_to_apply.keys().map(String::as_str));
        }
        if id.namespace.is_some() {
            keys.insert("projectcalico.org/namespace");
        }
        keys.into_iter()
            .filter_map(|k| {
                calico_selector::Labels::get(&view, k).map(|v| (k.to_owned(), v.to_owned()))
            })
            .collect()
    }

    /// Tier order and default action; the default tier sorts last unless given an order.
    pub(crate) fn tier(&self, name: &str) -> (Option<Order>, TierDefaultAction) {
        self.tiers
            .get(name)
            .copied()
            .unwrap_or(if name == DEFAULT_TIER {
                (Some(Order(1_000_000.0)), TierDefaultAction::Deny)
            } else {
                (None, TierDefaultAction::Deny)
            })
    }

    /// Whether a rule's `selector`/`namespaceSelector` pair (from a policy in
    /// `policy_namespace`, None for global policies and profiles) selects address `ip`:
    /// through an endpoint holding it or a network set containing it.
    pub fn selects_address(
        &self,
        selector: Option<&Selector>,
        namespace_selector: Option<&Selector>,
        policy_namespace: Option<&str>,
        ip: IpAddr,
    ) -> bool {
        let in_scope = |namespace: Option<&str>| {
            self.in_scope(namespace, namespace_selector, policy_namespace)
        };
        let all = Selector::all();
        let selector = selector.unwrap_or(&all);
        // Every endpoint, not the namespace walk `selected_prefixes` takes: this is the
        // reference the compiled programs are checked against.
        let by_endpoint = self.endpoints.iter().any(|(id, ep)| {
            ep.addresses.contains(&ip)
                && in_scope(id.namespace.as_deref())
                && selector.matches(&self.endpoint_labels(id, ep))
        });
        by_endpoint
            || self.network_sets.iter().any(|set| {
                set.nets.iter().any(|n| n.contains(&ip))
                    && in_scope(set.namespace.as_deref())
                    && selector.matches(&set.labels)
            })
    }

    /// Every prefix a selector pair selects: the addresses of selected endpoints (as host
    /// prefixes) and the nets of selected network sets. An address is selected (see
    /// [`World::selects_address`]) exactly when one of these prefixes contains it.
    pub fn selected_prefixes(
        &self,
        selector: Option<&Selector>,
        namespace_selector: Option<&Selector>,
        policy_namespace: Option<&str>,
    ) -> Vec<IpNet> {
        let all = Selector::all();
        let sel = selector.unwrap_or(&all);
        let mut out: Vec<IpNet> = Vec::new();
        for (id, ep) in self.endpoints_visible(namespace_selector, policy_namespace) {
            if !ep.addresses.is_empty() && sel.matches(&self.endpoint_labels(id, ep)) {
                out.extend(ep.addresses.iter().map(|a| IpNet::from(*a)));
            }
        }
        for set in &self.network_sets {
            if self.network_set_selected(set, selector, namespace_selector, policy_namespace) {
                out.extend(set.nets.iter().map(IpNet::trunc));
            }
        }
        out.sort();
        out.dedup();
        out
    }

    fn network_set_selected(
        &self,
        set: &NetworkSetInfo,
        selector: Option<&Selector>,
        namespace_selector: Option<&Selector>,
        policy_namespace: Option<&str>,
    ) -> bool {
        let all = Selector::all();
        let selector = selector.unwrap_or(&all);
        self.in_scope(
            set.namespace.as_deref(),
            namespace_selector,
            policy_namespace,
        ) && selector.matches(&set.labels)
    }

    /// Whether something in `namespace` (None: global) is visible to a selector with
    /// `namespace_selector` in a policy of `policy_namespace`.
    pub fn in_scope(
        &self,
        namespace: Option<&str>,
        namespace_selector: Option<&Selector>,
        policy_namespace: Option<&str>,
    ) -> bool {
        match namespace_selector {
            Some(ns_sel) if matches!(ns_sel.expr(), calico_selector::Expr::Global) => {
                namespace.is_none()
            }
            Some(ns_sel) => namespace.is_some_and(|ns| ns_sel.matches(&self.namespace_view(ns))),
            None => match policy_namespace {
                Some(own) => namespace == Some(own),
                None => true,
            },
        }
    }
}

/// A rule's selector pair with the namespace it is evaluated in (the policy's, None for
/// global policies and profiles): the key of an IP set. With a `namespaceSelector` the
/// policy's namespace plays no part (the rule looks across namespaces), so it is left out and
/// the same rule in every namespace names one set.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SelectorScope {
    pub selector: Option<String>,
    pub namespace_selector: Option<String>,
    pub namespace: Option<String>,
}

impl SelectorScope {
    pub fn new(
        selector: Option<&str>,
        namespace_selector: Option<&str>,
        namespace: Option<&str>,
    ) -> Self {
        Self {
            selector: selector.map(str::to_owned),
            namespace_selector: namespace_selector.map(str::to_owned),
            namespace: namespace
                .filter(|_| namespace_selector.is_none())
                .map(str::to_owned),
        }
    }
}

/// Where compiled programs get the prefixes a rule selector stands for.
pub trait IpSetSource {
    fn prefixes(&self, scope: &SelectorScope) -> Vec<IpNet>;
    /// The endpoints a peer-side named port resolves to, by port number: for each number,
    /// the addresses of the endpoints in the key's scope that have the port by that name and
    /// protocol with that number.
    fn named_ports(&self, key: &NamedPortKey) -> NamedPortMembers;
}

/// A named port on a rule's peer side: the peers' scope, the port name, the rule's protocol.
pub type NamedPortKey = (SelectorScope, String, Option<u8>);

/// What a [`NamedPortKey`] resolves to: (port number, the addresses having it), sorted.
pub type NamedPortMembers = Vec<(u16, Vec<IpNet>)>;

/// The scope of a rule side's named ports (`policy_namespace` is the policy's): its selector
/// pair as for IP sets, or every endpoint in the cluster when the side names no selector
/// (a Kubernetes `to: []` with a named port reaches pods in any namespace).
pub fn named_port_scope(
    e: &calico_model::spec::EntityRule,
    policy_namespace: Option<&str>,
) -> SelectorScope {
    if e.selector.is_none() && e.namespace_selector.is_none() {
        SelectorScope::new(None, None, None)
    } else {
        SelectorScope::new(
            e.selector.as_deref(),
            e.namespace_selector.as_deref(),
            policy_namespace,
        )
    }
}

impl World {
    /// Whether an endpoint holding `ip` in `scope` has port `name` for `protocol` numbered
    /// `port`: a peer-side named port's match, as the reference evaluator reads it.
    pub fn has_named_port(
        &self,
        scope: &SelectorScope,
        ip: IpAddr,
        name: &str,
        protocol: u8,
        port: u16,
    ) -> bool {
        self.named_port_members(&(scope.clone(), name.to_owned(), Some(protocol)))
            .iter()
            .any(|(p, nets)| *p == port && nets.iter().any(|n| n.contains(&ip)))
    }

    /// What a peer-side named port resolves to, from scratch (see [`IpSetSource::named_ports`]).
    pub fn named_port_members(&self, (scope, name, protocol): &NamedPortKey) -> NamedPortMembers {
        let parse = |t: &Option<String>| {
            t.as_deref()
                .map(|t| Selector::parse(t).unwrap_or_else(|_| Selector::all()))
        };
        let (selector, namespace_selector) =
            (parse(&scope.selector), parse(&scope.namespace_selector));
        let all = Selector::all();
        let selector = selector.as_ref().unwrap_or(&all);
        let mut by_port: BTreeMap<u16, BTreeSet<IpNet>> = BTreeMap::new();
        for (id, ep) in
            self.endpoints_visible(namespace_selector.as_ref(), scope.namespace.as_deref())
        {
            let ports: Vec<u16> = ep
                .ports
                .iter()
                .filter(|p| &p.name == name && (protocol.is_none() || p.protocol == *protocol))
                .map(|p| p.port)
                .collect();
            if ports.is_empty()
                || ep.addresses.is_empty()
                || !selector.matches(&self.endpoint_labels(id, ep))
            {
                continue;
            }
            for port in ports {
                by_port
                    .entry(port)
                    .or_default()
                    .extend(ep.addresses.iter().map(|a| IpNet::from(*a)));
            }
        }
        by_port
            .into_iter()
            .map(|(p, nets)| (p, nets.into_iter().collect()))
            .collect()
    }
}

impl IpSetSource for World {
    /// Computed from scratch over every endpoint and network set.
    fn prefixes(&self, scope: &SelectorScope) -> Vec<IpNet> {
        // Selectors were validated on the way in; one that is not still parses as all() so
        // that a bad value can never widen into "nothing matches" silently in one place only.
        let parse = |t: &Option<String>| {
            t.as_deref()
                .map(|t| Selector::parse(t).unwrap_or_else(|_| Selector::all()))
        };
        self.selected_prefixes(
            parse(&scope.selector).as_ref(),
            parse(&scope.namespace_selector).as_ref(),
            scope.namespace.as_deref(),
        )
    }

    fn named_ports(&self, key: &NamedPortKey) -> NamedPortMembers {
        self.named_port_members(key)
    }
}

/// One resource as the calculation sees it.
#[derive(Debug, Clone)]
pub enum Item {
    Endpoint(EndpointId, EndpointInfo),
    NetworkSet(NetworkSetInfo),
    Tier(String, (Option<Order>, TierDefaultAction)),
    Profile(String, ProfileSpec),
    Policy(PolicyInfo),
    Staged(StagedPolicy),
}

/// The profile calico-kube-controllers writes for each Kubernetes namespace, `kns.<name>`,
/// carries the namespace's labels as `pcns.<key>` in `labelsToApply`: what `namespaceSelector`
/// matches, as upstream resolves it.
pub use calico_model::k8s::{NAMESPACE_LABEL_PREFIX, NAMESPACE_PROFILE_PREFIX};

/// The namespace a profile describes and its labels, for a `kns.<namespace>` profile.
pub fn namespace_of_profile(
    name: &str,
    labels_to_apply: &BTreeMap<String, String>,
) -> Option<(String, BTreeMap<String, String>)> {
    let namespace = name.strip_prefix(NAMESPACE_PROFILE_PREFIX)?;
    let labels = labels_to_apply
        .iter()
        .filter_map(|(k, v)| {
            Some((
                k.strip_prefix(NAMESPACE_LABEL_PREFIX)?.to_owned(),
                v.clone(),
            ))
        })
        .collect();
    Some((namespace.to_owned(), labels))
}

fn named_port(name: &str, protocol: &calico_model::Protocol, port: i64) -> Option<NamedPort> {
    if name.is_empty() {
        return None;
    }
    Some(NamedPort {
        name: name.to_owned(),
        protocol: protocol.number(),
        port: u16::try_from(port).ok()?,
    })
}

/// The label upstream puts on a Kubernetes endpoint naming its service account, and the prefix
/// of the labels endpoints inherit from their service account's `ksa.*` profile.
pub use calico_model::k8s::{
    SERVICE_ACCOUNT_LABEL, SERVICE_ACCOUNT_LABEL_PREFIX as SERVICE_ACCOUNT_PREFIX,
};

/// A `serviceAccounts` match as the selector upstream turns it into: the account's labels
/// (prefixed) and its name among `names`.
fn service_account_expr(
    m: &calico_model::spec::ServiceAccountMatch,
) -> Result<calico_selector::Expr, String> {
    let mut expr = calico_selector::Expr::All;
    if let Some(selector) = &m.selector {
        let parsed =
            Selector::parse(selector).map_err(|e| format!("serviceAccounts.selector: {e}"))?;
        expr = expr.and(parsed.expr().clone().with_prefix(SERVICE_ACCOUNT_PREFIX));
    }
    if !m.names.is_empty() {
        expr = expr.and(calico_selector::Expr::In(
            SERVICE_ACCOUNT_LABEL.to_owned(),
            m.names.iter().cloned().collect(),
        ));
    }
    Ok(expr)
}

/// Rules with their `serviceAccounts` matches folded into `selector` (ANDed), as upstream
/// converts them, so everything after reads one selector.
fn fold_service_accounts(rules: &[Rule]) -> Result<Vec<Rule>, String> {
    rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let mut rule = rule.clone();
            for (side, e) in [
                ("source", &mut rule.source),
                ("destination", &mut rule.destination),
            ] {
                let Some(m) = e.service_accounts.take() else {
                    continue;
                };
                let accounts =
                    service_account_expr(&m).map_err(|err| format!("rule {i} {side}.{err}"))?;
                if accounts == calico_selector::Expr::All {
                    continue;
                }
                let own = match &e.selector {
                    Some(text) => Selector::parse(text)
                        .map_err(|err| format!("rule {i} {side}.selector: {err}"))?
                        .expr()
                        .clone(),
                    None => calico_selector::Expr::All,
                };
                e.selector = Some(Selector::from_expr(own.and(accounts)).to_string());
            }
            Ok(rule)
        })
        .collect()
}

/// A policy's `selector` with its `serviceAccountSelector` ANDed in (prefixed), as upstream.
fn policy_selector(
    what: &str,
    selector: &Option<String>,
    service_account_selector: &Option<String>,
) -> Result<Selector, String> {
    let parse =
        |field: &str, s: &str| Selector::parse(s).map_err(|e| format!("{what}: {field}: {e}"));
    let own = match selector {
        Some(s) => parse("selector", s)?,
        None => Selector::all(),
    };
    Ok(match service_account_selector {
        Some(s) => Selector::from_expr(
            own.expr().clone().and(
                parse("serviceAccountSelector", s)?
                    .expr()
                    .clone()
                    .with_prefix(SERVICE_ACCOUNT_PREFIX),
            ),
        ),
        None => own,
    })
}

impl Item {
    /// What the calculation needs of `resource`; `None` for kinds it does not look at.
    /// Policies without a selector select everything; without a tier they belong to
    /// `default`.
    pub fn from_resource(resource: &calico_model::Resource) -> Result<Option<Item>, String> {
        use calico_model::Resource;
        let parse = |what: &str, s: &Option<String>| -> Result<Option<Selector>, String> {
            s.as_deref()
                .map(|t| Selector::parse(t).map_err(|e| format!("{what}: {e}")))
                .transpose()
        };
        let addresses = |nets: &[String]| -> Vec<IpAddr> {
            nets.iter()
                .filter_map(|n| {
                    n.parse::<IpNet>()
                        .ok()
                        .map(|n| n.addr())
                        .or_else(|| n.parse().ok())
                })
                .collect()
        };
        let tier = |t: &Option<String>| t.clone().unwrap_or_else(|| DEFAULT_TIER.to_owned());
        Ok(Some(match resource {
            Resource::WorkloadEndpoint(w) => Item::Endpoint(
                EndpointId {
                    namespace: w.metadata.namespace.clone(),
                    name: w.metadata.name.clone(),
                },
                EndpointInfo {
                    labels: w.metadata.labels.clone().into(),
                    profiles: w.spec.profiles.clone(),
                    addresses: addresses(&w.spec.ip_networks),
                    ports: w
                        .spec
                        .ports
                        .iter()
                        .filter_map(|p| named_port(&p.name, &p.protocol, p.port))
                        .collect(),
                },
            ),
            Resource::HostEndpoint(h) => Item::Endpoint(
                EndpointId {
                    namespace: None,
                    name: h.metadata.name.clone(),
                },
                EndpointInfo {
                    labels: h.metadata.labels.clone().into(),
                    profiles: h.spec.profiles.clone(),
                    addresses: addresses(&h.spec.expected_ips),
                    ports: h
                        .spec
                        .ports
                        .iter()
                        .filter_map(|p| named_port(&p.name, &p.protocol, p.port))
                        .collect(),
                },
            ),
            Resource::NetworkSet(s) | Resource::GlobalNetworkSet(s) => {
                Item::NetworkSet(NetworkSetInfo {
                    name: s.metadata.name.clone(),
                    namespace: s.metadata.namespace.clone(),
                    labels: s.metadata.labels.clone(),
                    nets: s
                        .spec
                        .nets
                        .iter()
                        .filter_map(|n| {
                            n.parse::<IpNet>()
                                .ok()
                                .or_else(|| n.parse::<IpAddr>().ok().map(IpNet::from))
                        })
                        .collect(),
                })
            }
            Resource::Tier(t) => Item::Tier(
                t.metadata.name.clone(),
                (
                    t.spec.order,
                    t.spec.default_action.unwrap_or(TierDefaultAction::Deny),
                ),
            ),
            Resource::Profile(p) => Item::Profile(p.metadata.name.clone(), p.spec.clone()),
            Resource::NetworkPolicy(p) => {
                let what = format!("NetworkPolicy {}", p.metadata.name);
                let rules = |r: &[Rule]| {
                    fold_service_accounts(r)
                        .map(Rules::new)
                        .map_err(|e| format!("{what}: {e}"))
                };
                Item::Policy(PolicyInfo {
                    name: p.metadata.name.clone(),
                    namespace: p.metadata.namespace.clone(),
                    tier: tier(&p.spec.tier),
                    order: p.spec.order,
                    selector: policy_selector(
                        &what,
                        &p.spec.selector,
                        &p.spec.service_account_selector,
                    )?,
                    namespace_selector: None,
                    types: p.spec.types.clone(),
                    ingress: rules(&p.spec.ingress)?,
                    egress: rules(&p.spec.egress)?,
                })
            }
            Resource::GlobalNetworkPolicy(p) => {
                let what = format!("GlobalNetworkPolicy {}", p.metadata.name);
                let rules = |r: &[Rule]| {
                    fold_service_accounts(r)
                        .map(Rules::new)
                        .map_err(|e| format!("{what}: {e}"))
                };
                Item::Policy(PolicyInfo {
                    name: p.metadata.name.clone(),
                    namespace: None,
                    tier: tier(&p.spec.tier),
                    order: p.spec.order,
                    selector: policy_selector(
                        &what,
                        &p.spec.selector,
                        &p.spec.service_account_selector,
                    )?,
                    namespace_selector: parse(&what, &p.spec.namespace_selector)?,
                    types: p.spec.types.clone(),
                    ingress: rules(&p.spec.ingress)?,
                    egress: rules(&p.spec.egress)?,
                })
            }
            Resource::StagedNetworkPolicy(p) => {
                let enforced = calico_model::Resource::NetworkPolicy(calico_model::Object {
                    api_version: p.api_version.clone(),
                    kind: calico_model::Kind::NetworkPolicy.as_str().to_owned(),
                    metadata: p.metadata.clone(),
                    spec: p.spec.policy.clone(),
                    status: None,
                });
                Item::Staged(staged_item(&enforced, p.spec.action())?)
            }
            Resource::StagedGlobalNetworkPolicy(p) => {
                let enforced = calico_model::Resource::GlobalNetworkPolicy(calico_model::Object {
                    api_version: p.api_version.clone(),
                    kind: calico_model::Kind::GlobalNetworkPolicy.as_str().to_owned(),
                    metadata: p.metadata.clone(),
                    spec: p.spec.policy.clone(),
                    status: None,
                });
                Item::Staged(staged_item(&enforced, p.spec.action())?)
            }
            Resource::StagedKubernetesNetworkPolicy(p) => {
                let namespace = p.metadata.namespace.as_deref().unwrap_or("default");
                let enforced = calico_model::k8s::network_policy_from_spec(
                    &p.metadata.name,
                    namespace,
                    &p.spec.policy,
                )
                .map_err(|e| format!("StagedKubernetesNetworkPolicy {}: {e}", p.metadata.name))?;
                Item::Staged(staged_item(&enforced, p.spec.action())?)
            }
            _ => return Ok(None),
        }))
    }
}

/// The staged form of `enforced` (the policy the staged resource stands for).
fn staged_item(
    enforced: &calico_model::Resource,
    action: calico_model::spec::StagedAction,
) -> Result<StagedPolicy, String> {
    let Some(Item::Policy(mut policy)) = Item::from_resource(enforced)? else {
        unreachable!("a policy resource reads as a policy")
    };
    let key = policy.key();
    let policy = (action == calico_model::spec::StagedAction::Set).then(|| {
        policy.name = staged_name(&policy.name, &policy.tier);
        policy
    });
    Ok(StagedPolicy {
        key,
        action,
        policy,
    })
}

impl World {
    /// Adds `item`, replacing what had its identity.
    pub fn insert(&mut self, item: Item) {
        match item {
            Item::Endpoint(id, info) => {
                self.endpoints.insert(id, info);
            }
            Item::NetworkSet(set) => {
                self.network_sets
                    .retain(|s| (&s.namespace, &s.name) != (&set.namespace, &set.name));
                self.network_sets.push(set);
            }
            Item::Tier(name, tier) => {
                self.tiers.insert(name, tier);
            }
            Item::Profile(name, spec) => {
                self.profiles.insert(name, spec);
            }
            Item::Policy(policy) => self.put_policy(policy),
            Item::Staged(staged) => {
                self.staged.insert(staged.key.clone(), staged);
            }
        }
    }

    /// Builds the calculation's inputs from resources as stored (see [`Item::from_resource`];
    /// other kinds are ignored).
    pub fn from_resources(resources: &[calico_model::Resource]) -> Result<World, String> {
        let mut world = World::default();
        for r in resources {
            if let calico_model::Resource::Profile(p) = r {
                if let Some((namespace, labels)) =
                    namespace_of_profile(&p.metadata.name, &p.spec.labels_to_apply)
                {
                    world.namespaces.insert(namespace, labels);
                }
            }
            if let Some(item) = Item::from_resource(r)? {
                world.insert(item);
            }
        }
        Ok(world)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_labels_are_the_pcns_keys_of_a_kns_profile() {
        // As calico-kube-controllers writes them for namespace `shop` labelled team=a.
        let applied = BTreeMap::from([
            ("pcns.projectcalico.org/name".to_owned(), "shop".to_owned()),
            ("pcns.team".to_owned(), "a".to_owned()),
            ("app".to_owned(), "not a namespace label".to_owned()),
        ]);
        assert_eq!(
            namespace_of_profile("kns.shop", &applied),
            Some((
                "shop".to_owned(),
                BTreeMap::from([
                    ("projectcalico.org/name".to_owned(), "shop".to_owned()),
                    ("team".to_owned(), "a".to_owned()),
                ])
            ))
        );
        assert_eq!(namespace_of_profile("ksa.shop.default", &applied), None);
    }

    fn policy(namespace: &str, port: i64) -> PolicyInfo {
        let text = format!(
            "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: same-namespace, namespace: {namespace}}}\nspec:\n  selector: all()\n  ingress:\n  - {{action: Allow, protocol: TCP, source: {{selector: app == 'web'}}, destination: {{ports: [{port}]}}}}\n"
        );
        let resource = calico_model::parse_documents(&text)
            .expect("test policy")
            .remove(0);
        match Item::from_resource(&resource) {
            Ok(Some(Item::Policy(p))) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn equal_rule_lists_are_held_once() {
        let mut world = World::default();
        for ns in ["a", "b", "c"] {
            world.put_policy(policy(ns, 80));
        }
        world.put_policy(policy("d", 443));
        let ingress = |world: &World, ns: &str| {
            world.policies[&(Some(ns.to_owned()), "same-namespace".to_owned())]
                .ingress
                .clone()
        };
        assert!(std::sync::Arc::ptr_eq(
            &ingress(&world, "a"),
            &ingress(&world, "b")
        ));
        assert!(std::sync::Arc::ptr_eq(
            &ingress(&world, "a"),
            &ingress(&world, "c")
        ));
        assert!(!std::sync::Arc::ptr_eq(
            &ingress(&world, "a"),
            &ingress(&world, "d")
        ));
        assert_eq!(ingress(&world, "d")[0].destination.ports.len(), 1);
        // Held by three policies and this test's copy.
        assert_eq!(std::sync::Arc::strong_count(&ingress(&world, "a")), 4);

        // Replaced with other rules, a policy stops sharing; the others keep theirs.
        world.put_policy(policy("b", 443));
        assert!(std::sync::Arc::ptr_eq(
            &ingress(&world, "b"),
            &ingress(&world, "d")
        ));
        assert!(std::sync::Arc::ptr_eq(
            &ingress(&world, "a"),
            &ingress(&world, "c")
        ));
    }
}
