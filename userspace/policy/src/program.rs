//! Which policies apply to an endpoint, in what order (the "policy program").

use std::cmp::Ordering;

use calico_model::{
    spec::{PolicyType, Rule, TierDefaultAction},
    Order, Port,
};

use crate::{
    compile::{local_entity, local_entity_mut},
    world::{NamedPort, PolicyKey},
    Direction, EndpointId, World,
};

/// One policy's rules for one direction.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgramPolicy {
    /// `namespace/name` for a NetworkPolicy, `name` for a GlobalNetworkPolicy.
    pub name: String,
    pub namespace: Option<String>,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProgramTier {
    pub name: String,
    pub default_action: TierDefaultAction,
    pub policies: Vec<ProgramPolicy>,
}

/// The ordered policy for one endpoint and direction: tiers (only those with at least one
/// policy selecting the endpoint), then profiles.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PolicyProgram {
    pub tiers: Vec<ProgramTier>,
    pub profiles: Vec<(String, Vec<Rule>)>,
}

/// `None` orders last, as upstream treats a missing order as infinite.
fn by_order(a: Option<Order>, b: Option<Order>) -> Ordering {
    match (a, b) {
        (Some(a), Some(b)) => a.0.partial_cmp(&b.0).unwrap_or(Ordering::Equal),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    }
}

/// The entries of a map keyed by [`PolicyKey`] that can apply to an endpoint in `namespace`:
/// the global ones, then those of its own namespace (the map is keyed by namespace first).
fn in_scope<'a, V>(
    map: &'a std::collections::BTreeMap<PolicyKey, V>,
    namespace: Option<&'a String>,
) -> impl Iterator<Item = (&'a PolicyKey, &'a V)> {
    let global = map.range::<PolicyKey, _>(..(Some(String::new()), String::new()));
    let own = namespace.into_iter().flat_map(move |ns| {
        map.range::<PolicyKey, _>((Some(ns.clone()), String::new())..)
            .take_while(move |((n, _), _)| n.as_ref() == Some(ns))
    });
    global.chain(own)
}

impl World {
    /// The policy program of `endpoint` for `direction`.
    pub fn program(&self, endpoint: &EndpointId, direction: Direction) -> PolicyProgram {
        let policies = in_scope(&self.policies, endpoint.namespace.as_ref()).map(|(_, p)| p);
        self.program_of(endpoint, direction, policies)
    }

    /// Whether any staged policy would change what is enforced (Learn and Ignore do not).
    pub fn has_staged(&self) -> bool {
        self.staged.values().any(|s| s.changes_enforcement())
    }

    /// The program `endpoint` would have for `direction` were every staged policy committed:
    /// a staged `Set` takes the place of the enforced policy with its key (or is added), a
    /// staged `Delete` removes it. The staged policies keep their flow-log names
    /// (`<tier>.staged:<name>`), so a verdict shows which of them decided.
    pub fn pending_program(&self, endpoint: &EndpointId, direction: Direction) -> PolicyProgram {
        let namespace = endpoint.namespace.as_ref();
        let staged = &self.staged;
        let enforced = in_scope(&self.policies, namespace)
            .filter(|(key, _)| !staged.get(*key).is_some_and(|s| s.changes_enforcement()))
            .map(|(_, p)| p);
        let set = in_scope(staged, namespace).filter_map(|(_, s)| s.policy.as_ref());
        self.program_of(endpoint, direction, enforced.chain(set))
    }

    /// The program of `endpoint` for `direction` from the candidate `policies` (those whose
    /// scope can include it).
    fn program_of<'a>(
        &'a self,
        endpoint: &EndpointId,
        direction: Direction,
        policies: impl Iterator<Item = &'a crate::PolicyInfo>,
    ) -> PolicyProgram {
        let Some(info) = self.endpoints.get(endpoint) else {
            return PolicyProgram::default();
        };
        let labels = self.endpoint_labels(endpoint, info);
        let wanted = match direction {
            Direction::Ingress => PolicyType::Ingress,
            Direction::Egress => PolicyType::Egress,
        };
        let mut applicable: Vec<_> = policies
            .filter(|p| p.effective_types().contains(&wanted))
            .filter(|p| {
                p.selector.matches(&labels)
                    && p.namespace_selector.as_ref().is_none_or(|sel| {
                        endpoint
                            .namespace
                            .as_deref()
                            .is_some_and(|ns| sel.matches(&self.namespace_view(ns)))
                    })
            })
            .collect();
        let display = |p: &crate::PolicyInfo| match &p.namespace {
            Some(ns) => format!("{ns}/{}", p.name),
            None => p.name.clone(),
        };
        applicable.sort_by(|a, b| {
            let (ta, tb) = (self.tier(&a.tier), self.tier(&b.tier));
            by_order(ta.0, tb.0)
                .then_with(|| a.tier.cmp(&b.tier))
                .then_with(|| by_order(a.order, b.order))
                .then_with(|| display(a).cmp(&display(b)))
        });
        let mut tiers: Vec<ProgramTier> = Vec::new();
        for p in applicable {
            let rules = match direction {
                Direction::Ingress => &p.ingress,
                Direction::Egress => &p.egress,
            };
            let rules = with_local_ports(rules, direction, &info.ports);
            let policy = ProgramPolicy {
                name: display(p),
                namespace: p.namespace.clone(),
                rules,
            };
            match tiers.last_mut() {
                Some(t) if t.name == p.tier => t.policies.push(policy),
                _ => tiers.push(ProgramTier {
                    name: p.tier.clone(),
                    default_action: self.tier(&p.tier).1,
                    policies: vec![policy],
                }),
            }
        }
        let profiles = info
            .profiles
            .iter()
            .filter_map(|name| {
                self.profiles.get(name).map(|spec| {
                    let rules = match direction {
                        Direction::Ingress => &spec.ingress,
                        Direction::Egress => &spec.egress,
                    };
                    (
                        name.clone(),
                        with_local_ports(rules, direction, &info.ports),
                    )
                })
            })
            .collect();
        PolicyProgram { tiers, profiles }
    }
}

/// `rules` with the named ports on the endpoint's own side (the destination of an ingress
/// rule, the source of an egress rule) resolved to the endpoint's port numbers of that name
/// and the rule's protocol, as upstream resolves them. A name the endpoint does not have stays
/// as it is, and matches no port. (Named ports on the peer side are refused at compile time.)
fn with_local_ports(rules: &[Rule], direction: Direction, ports: &[NamedPort]) -> Vec<Rule> {
    rules
        .iter()
        .map(|rule| {
            let named = |list: &[Port]| list.iter().any(|p| matches!(p, Port::Named(_)));
            let local = local_entity(rule, direction);
            if ports.is_empty() || !(named(&local.ports) || named(&local.not_ports)) {
                return rule.clone();
            }
            let mut rule = rule.clone();
            let protocol = rule.protocol.as_ref().and_then(|p| p.number());
            let local = local_entity_mut(&mut rule, direction);
            for list in [&mut local.ports, &mut local.not_ports] {
                *list = list
                    .drain(..)
                    .flat_map(|p| match p {
                        Port::Named(name) => {
                            let found: Vec<Port> = ports
                                .iter()
                                .filter(|np| {
                                    np.name == name
                                        && (protocol.is_none() || np.protocol == protocol)
                                })
                                .map(|np| Port::Number(i64::from(np.port)))
                                .collect();
                            if found.is_empty() {
                                vec![Port::Named(name)]
                            } else {
                                found
                            }
                        }
                        other => vec![other],
                    })
                    .collect();
            }
            rule
        })
        .collect()
}

impl PolicyProgram {
    /// Every rule of the program with the namespace it is read in (its policy's; None for
    /// global policies and profiles).
    fn rules(&self) -> impl Iterator<Item = (&Rule, Option<&str>)> {
        self.tiers
            .iter()
            .flat_map(|t| &t.policies)
            .flat_map(|p| p.rules.iter().map(move |r| (r, p.namespace.as_deref())))
            .chain(
                self.profiles
                    .iter()
                    .flat_map(|(_, rules)| rules.iter().map(|r| (r, None))),
            )
    }

    /// Every named port on the peer side of this program's rules (the source of an ingress
    /// rule, the destination of an egress rule): what compiling it resolves through
    /// [`crate::IpSetSource::named_ports`]. Named `notPorts` there are refused at compile.
    pub fn named_peer_ports(
        &self,
        direction: Direction,
    ) -> std::collections::BTreeSet<crate::NamedPortKey> {
        let source_is_peer = direction == Direction::Ingress;
        let rules = self.rules();
        let mut out = std::collections::BTreeSet::new();
        for (rule, namespace) in rules {
            let peer = if source_is_peer {
                &rule.source
            } else {
                &rule.destination
            };
            for port in &peer.ports {
                if let Port::Named(name) = port {
                    out.insert((
                        crate::world::named_port_scope(peer, namespace),
                        name.clone(),
                        rule.protocol.as_ref().and_then(|p| p.number()),
                    ));
                }
            }
        }
        out
    }

    /// Every selector scope compiling this program consults (both sides of every rule,
    /// selector and notSelector): the IP sets it depends on.
    pub fn scopes(&self) -> std::collections::BTreeSet<crate::SelectorScope> {
        let mut out = std::collections::BTreeSet::new();
        let rules = self.rules();
        for (rule, namespace) in rules {
            for e in [&rule.source, &rule.destination] {
                let ns_sel = e.namespace_selector.as_deref();
                if e.selector.is_some() || ns_sel.is_some() {
                    out.insert(crate::SelectorScope::new(
                        e.selector.as_deref(),
                        ns_sel,
                        namespace,
                    ));
                }
                if let Some(not) = e.not_selector.as_deref() {
                    out.insert(crate::SelectorScope::new(Some(not), ns_sel, namespace));
                }
            }
        }
        out
    }
}
