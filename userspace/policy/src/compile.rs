//! Compiling a policy program into lookup tables whose per-packet cost does not depend on the
//! number of rules: the packet's peer address, local address, protocol and source port each
//! map to a class (a longest-prefix or exact lookup), and the classes with the destination port
//! (or ICMP type and code) select a precomputed verdict. The eBPF dataplane holds these tables
//! in maps; [`CompiledProgram::lookup`] performs the same lookups in Rust.
//!
//! Classes are found by partitioning each dimension at every boundary a rule mentions, so all
//! values in a class behave identically for every rule; each cell's verdict is then the
//! reference evaluator's verdict on a representative packet of the cell. Correct by
//! construction as long as the partitions are exact, which the differential tests check.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use calico_model::{
    spec::{EntityRule, Rule},
    Port,
};
use calico_selector::Selector;
use ipnet::IpNet;

use calico_model::spec::{Action, TierDefaultAction};

use crate::{
    eval::{has_ports, is_icmp, parse_nets},
    Direction, IpSetSource, Packet, PolicyProgram, RuleRef, SelectorScope, Verdict, World,
};

/// A rule the dataplane cannot enforce.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{policy} rule {index}: {field}: {reason}")]
pub struct CompileError {
    pub policy: String,
    pub index: usize,
    pub field: String,
    pub reason: String,
}

/// One cell of the verdict table: all dimensions but the port fixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cell {
    pub peer: u32,
    pub local: u32,
    pub protocol: u32,
    pub source_port: u32,
}

/// The tables of one endpoint and direction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CompiledProgram {
    pub direction: Option<Direction>,
    /// A host endpoint's program: traffic whose local address is not the endpoint's is traffic
    /// the host forwards, which passes unjudged (upstream's semantics). A workload's program
    /// drops it (a spoofed address).
    pub forwarded_passes: bool,
    /// A host endpoint's program (not a workload's): traffic forwarded to its interface is
    /// judged there, not handed straight to a veth's peer.
    pub host: bool,
    /// The rules' own nets and notNets → net class; longest prefix wins; every family has a
    /// /0 entry.
    pub peer_nets: Vec<(IpNet, u32)>,
    /// The IP sets the rules' selectors stand for (at most [`MAX_PEER_SETS`]): bit `i` of a
    /// peer's membership mask is `peer_sets[i]`.
    pub peer_sets: Vec<PeerSet>,
    /// (net class, membership mask) → peer class, for every combination an address can have
    /// with these sets; any other combination has no class (fail closed).
    pub peer_classes: Vec<(u32, u64, u32)>,
    /// The endpoint's own addresses; anything else does not belong to it.
    pub local_addresses: Vec<(IpAddr, u32)>,
    /// Protocols some rule names; all others are `other_protocol`.
    pub protocols: Vec<(u8, u32)>,
    pub other_protocol: u32,
    /// Disjoint ranges covering 0..=65535.
    pub source_ports: Vec<(u16, u16, u32)>,
    /// Per cell, disjoint ranges covering 0..=65535 of the destination port (or, for ICMP,
    /// `type << 8 | code`), each with an index into `verdicts`.
    pub cells: BTreeMap<Cell, Vec<(u16, u16, u32)>>,
    pub verdicts: Vec<Verdict>,
}

/// Most distinct peer selectors (IP sets) one endpoint's policy in one direction may name: the
/// bits of the dataplane's membership mask.
pub const MAX_PEER_SETS: usize = 64;

/// An IP set a program consults: its identity (the rule selector with its namespace) and
/// members, sorted. The dataplane stores each scope once, shared by every program naming it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    pub scope: SelectorScope,
    pub members: std::sync::Arc<Vec<IpNet>>,
}

/// Rejects what cannot be compiled, naming the rule and field.
fn check_supported(
    policy: &str,
    index: usize,
    rule: &Rule,
    direction: Direction,
) -> Result<(), CompileError> {
    let err = |field: &str, reason: &str| CompileError {
        policy: policy.to_owned(),
        index,
        field: field.to_owned(),
        reason: reason.to_owned(),
    };
    if rule.http.is_some() {
        return Err(err(
            "http",
            "HTTP matches need an L7 proxy; the eBPF dataplane enforces L3/L4",
        ));
    }
    for (side, e) in [("source", &rule.source), ("destination", &rule.destination)] {
        if e.services.is_some() {
            return Err(err(
                &format!("{side}.services"),
                "Kubernetes Service matching is not supported yet",
            ));
        }
        if e.service_accounts.is_some() {
            return Err(err(
                &format!("{side}.serviceAccounts"),
                "serviceAccounts must be folded into the selector first (Item::from_resource does)",
            ));
        }
        // A selector that does not parse refuses the rule (and so the program): read any other
        // way it would match everyone or no one, and either can widen what is allowed.
        for (field, selector) in [
            ("selector", &e.selector),
            ("notSelector", &e.not_selector),
            ("namespaceSelector", &e.namespace_selector),
        ] {
            if let Some(Err(parse_error)) = selector.as_deref().map(Selector::parse) {
                return Err(err(
                    &format!("{side}.{field}"),
                    &format!("selector does not parse: {parse_error}"),
                ));
            }
        }
        // Named ports on the endpoint's own side were resolved with its program (a name it
        // does not have matches no port); the peers' named `ports` expand per port number
        // (see `expand_named_peer_ports`); named `notPorts` of the peers would need the
        // complement of (address, port) pairs.
        let peer_side = std::ptr::eq(e, peer_entity(rule, direction));
        if peer_side && e.not_ports.iter().any(|p| matches!(p, Port::Named(_))) {
            return Err(err(
                &format!("{side}.notPorts"),
                "named notPorts of the peers are not supported (named ports and the endpoint's own named notPorts are)",
            ));
        }
    }
    Ok(())
}

fn last_address(net: &IpNet) -> u128 {
    match net.broadcast() {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn as_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// Splits 0..=65535 at `cuts` (each cut starts a new range); returns the ranges.
fn ranges(cuts: &BTreeSet<u32>) -> Vec<(u16, u16)> {
    let mut starts: Vec<u32> = cuts.iter().copied().filter(|c| *c <= 65535).collect();
    if starts.first() != Some(&0) {
        starts.insert(0, 0);
    }
    starts.dedup();
    starts
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let end = starts.get(i + 1).map_or(65535, |n| n - 1);
            (*s as u16, end as u16)
        })
        .collect()
}

fn port_cuts(ports: &[Port], cuts: &mut BTreeSet<u32>) {
    for p in ports {
        let (lo, hi) = match p {
            Port::Number(n) => (*n, *n),
            Port::Range(a, b) => (*a, *b),
            Port::Named(_) => continue,
        };
        cuts.insert(lo.clamp(0, 65535) as u32);
        cuts.insert((hi.clamp(0, 65535) + 1) as u32);
    }
}

/// What rules say of one protocol: (has ports, is ICMP, per rule (protocol matches,
/// notProtocol matches)).
type ProtocolSignature = (bool, bool, Vec<(Option<bool>, Option<bool>)>);

/// One rule of the program, with where it sits.
struct FlatRule<'a> {
    /// The rule as written, or one of the rules a peer-side named port expands it into.
    rule: std::borrow::Cow<'a, Rule>,
    namespace: Option<&'a str>,
    /// Index of its tier (or profile) in evaluation order.
    group: usize,
    at: RuleRef,
}

/// A tier or a profile, in evaluation order.
struct Group {
    /// Some for a tier: what happens when its policies decide nothing.
    tier_default: Option<(TierDefaultAction, String)>,
}

/// The peer-address part of a rule: what an address must be inside (any of the nets; a
/// member of the selected set) and must not be inside (any of the notNets; a member of the
/// excluded set).
struct PeerPredicate {
    nets: Option<Vec<IpNet>>,
    not_nets: Vec<IpNet>,
    selected: Option<usize>,
    excluded: Option<usize>,
}

/// A region's marks merged per rule, sorted by rule.
fn merged(marks: &[(u32, u8)]) -> Vec<(u32, u8)> {
    let mut bits: BTreeMap<u32, u8> = BTreeMap::new();
    for (r, b) in marks {
        *bits.entry(*r).or_default() |= b;
    }
    bits.into_iter().collect()
}

impl PeerPredicate {
    fn is_wildcard(&self) -> bool {
        self.nets.is_none() && self.selected.is_none()
    }
}

/// Listed prefixes sorted by family, network address, then length, for range queries.
struct PrefixIndex {
    sorted: Vec<IpNet>,
}

fn family_key(n: &IpNet) -> (bool, u128, u8) {
    (n.addr().is_ipv6(), as_u128(n.network()), n.prefix_len())
}

impl PrefixIndex {
    fn new(prefixes: BTreeSet<IpNet>) -> Self {
        let mut sorted: Vec<IpNet> = prefixes.into_iter().collect();
        sorted.sort_by_key(family_key);
        Self { sorted }
    }

    /// Marks `rule` with `bit` on every region inside `q`.
    fn mark(&self, q: &IpNet, marks: &mut [Vec<(u32, u8)>], rule: u32, bit: u8) {
        for i in self.inside(q) {
            if self.sorted[i].prefix_len() >= q.prefix_len() {
                marks[i].push((rule, bit));
            }
        }
    }

    /// Indices of the listed prefixes inside `q` (including `q` itself when listed).
    fn inside(&self, q: &IpNet) -> std::ops::Range<usize> {
        let v6 = q.addr().is_ipv6();
        let (lo, hi) = (as_u128(q.network()), last_address(q));
        let start = self
            .sorted
            .partition_point(|n| (n.addr().is_ipv6(), as_u128(n.network())) < (v6, lo));
        let end = self
            .sorted
            .partition_point(|n| (n.addr().is_ipv6(), as_u128(n.network())) <= (v6, hi));
        start..end
    }

    /// Whether `p`'s own region (p minus the listed prefixes inside it) is empty.
    fn region_empty(&self, i: usize) -> bool {
        let p = &self.sorted[i];
        let mut next = as_u128(p.network());
        let end = last_address(p);
        for c in &self.sorted[self.inside(p)] {
            if c.prefix_len() <= p.prefix_len() {
                continue;
            }
            if as_u128(c.network()) > next {
                return false;
            }
            next = next.max(last_address(c).saturating_add(1));
            if next > end {
                return true;
            }
        }
        next > end
    }
}

/// "Next still-open slot" with path compression: each slot is closed at most once.
struct Open {
    next: Vec<usize>,
}

impl Open {
    fn new(n: usize, open: impl Fn(usize) -> bool) -> Self {
        let mut next: Vec<usize> = (0..=n).collect();
        for i in (0..n).rev() {
            if !open(i) {
                next[i] = next[i + 1];
            }
        }
        Self { next }
    }
    fn find(&mut self, i: usize) -> usize {
        let mut r = i;
        while self.next[r] != r {
            r = self.next[r];
        }
        let mut j = i;
        while self.next[j] != r {
            let n = self.next[j];
            self.next[j] = r;
            j = n;
        }
        r
    }
    fn close(&mut self, i: usize) {
        self.next[i] = i + 1;
    }
}

impl CompiledProgram {
    /// Compiles `program` for an endpoint with `addresses`, in `direction`, resolving rule
    /// selectors against `world`.
    pub fn compile(
        world: &World,
        program: &PolicyProgram,
        addresses: &[IpAddr],
        direction: Direction,
    ) -> Result<Self, CompileError> {
        Self::compile_with(world, program, addresses, direction)
    }

    /// As [`CompiledProgram::compile`], with rule selectors resolved by `ipsets` (the agent's
    /// incrementally maintained IP sets).
    pub fn compile_with(
        ipsets: &dyn IpSetSource,
        program: &PolicyProgram,
        addresses: &[IpAddr],
        direction: Direction,
    ) -> Result<Self, CompileError> {
        // Rules in evaluation order, with their groups.
        let mut groups = Vec::new();
        let mut rules: Vec<FlatRule<'_>> = Vec::new();
        for tier in &program.tiers {
            let g = groups.len();
            groups.push(Group {
                tier_default: Some((tier.default_action, tier.name.clone())),
            });
            for p in &tier.policies {
                for (i, r) in p.rules.iter().enumerate() {
                    check_supported(&p.name, i, r, direction)?;
                    for rule in
                        expand_named_peer_ports(ipsets, r, p.namespace.as_deref(), direction)
                    {
                        rules.push(FlatRule {
                            rule,
                            namespace: p.namespace.as_deref(),
                            group: g,
                            at: RuleRef::Rule {
                                tier: Some(tier.name.clone()),
                                policy: p.name.clone(),
                                index: i,
                            },
                        });
                    }
                }
            }
        }
        for (name, profile_rules) in &program.profiles {
            let g = groups.len();
            groups.push(Group { tier_default: None });
            for (i, r) in profile_rules.iter().enumerate() {
                check_supported(name, i, r, direction)?;
                for rule in expand_named_peer_ports(ipsets, r, None, direction) {
                    rules.push(FlatRule {
                        rule,
                        namespace: None,
                        group: g,
                        at: RuleRef::Rule {
                            tier: None,
                            policy: name.clone(),
                            index: i,
                        },
                    });
                }
            }
        }

        // Selector results for the endpoint's own side (its addresses are matched against them).
        let mut cache: BTreeMap<SelectorScope, Vec<IpNet>> = BTreeMap::new();
        let mut selected =
            |sel: Option<&str>, ns_sel: Option<&str>, ns: Option<&str>| -> Vec<IpNet> {
                let scope = SelectorScope::new(sel, ns_sel, ns);
                if let Some(hit) = cache.get(&scope) {
                    return hit.clone();
                }
                let prefixes = ipsets.prefixes(&scope);
                cache.insert(scope, prefixes.clone());
                prefixes
            };
        // What each rule asks of the peer's address. Selectors stand for IP sets, each
        // distinct scope once (bit `i` of a peer's membership mask is `peer_sets[i]`); the
        // rules' own nets go into the nets partition.
        let mut set_index: BTreeMap<SelectorScope, usize> = BTreeMap::new();
        let mut peer_sets: Vec<PeerSet> = Vec::new();
        let mut set_of = |f: &FlatRule<'_>,
                          sel: Option<&str>,
                          ns_sel: Option<&str>|
         -> Result<usize, CompileError> {
            let scope = SelectorScope::new(sel, ns_sel, f.namespace);
            if let Some(&i) = set_index.get(&scope) {
                return Ok(i);
            }
            if peer_sets.len() == MAX_PEER_SETS {
                let (policy, index) = match &f.at {
                    RuleRef::Rule { policy, index, .. } => (policy.clone(), *index),
                    _ => (String::new(), 0),
                };
                return Err(CompileError {
                    policy,
                    index,
                    field: "selector".into(),
                    reason: format!(
                        "the endpoint's policy names more than {MAX_PEER_SETS} distinct peer selectors"
                    ),
                });
            }
            let mut members = ipsets.prefixes(&scope);
            members.sort_unstable();
            members.dedup();
            set_index.insert(scope.clone(), peer_sets.len());
            peer_sets.push(PeerSet {
                scope,
                members: std::sync::Arc::new(members),
            });
            Ok(peer_sets.len() - 1)
        };
        let mut peers: Vec<PeerPredicate> = Vec::with_capacity(rules.len());
        for f in &rules {
            let e = peer_entity(&f.rule, direction);
            let nets = (!e.nets.is_empty())
                .then(|| parse_nets(&e.nets).iter().map(IpNet::trunc).collect());
            let has_sel = e.selector.is_some() || e.namespace_selector.is_some();
            let selected_set = if has_sel {
                Some(set_of(
                    f,
                    e.selector.as_deref(),
                    e.namespace_selector.as_deref(),
                )?)
            } else {
                None
            };
            let excluded_set = match &e.not_selector {
                Some(not) => Some(set_of(f, Some(not), e.namespace_selector.as_deref())?),
                None => None,
            };
            peers.push(PeerPredicate {
                nets,
                not_nets: parse_nets(&e.not_nets).iter().map(IpNet::trunc).collect(),
                selected: selected_set,
                excluded: excluded_set,
            });
        }
        // Which rules each set bit speaks for: (rule, 2) selected by it, (rule, 4) excluded.
        let mut set_users: Vec<Vec<(u32, u8)>> = vec![Vec::new(); peer_sets.len()];
        for (r, p) in peers.iter().enumerate() {
            if let Some(s) = p.selected {
                set_users[s].push((r as u32, 2));
            }
            if let Some(s) = p.excluded {
                set_users[s].push((r as u32, 4));
            }
        }

        // The nets partition: the rules' own prefixes alone, each region a net class named
        // by which rules' nets (1) and notNets (4) hold it.
        let mut literal: BTreeSet<IpNet> = BTreeSet::new();
        literal.insert("0.0.0.0/0".parse().expect("constant"));
        literal.insert("::/0".parse().expect("constant"));
        for p in &peers {
            literal.extend(p.nets.iter().flatten());
            literal.extend(p.not_nets.iter());
        }
        let mark_literal = |index: &PrefixIndex, marks: &mut Vec<Vec<(u32, u8)>>| {
            for (r, p) in peers.iter().enumerate() {
                for q in p.nets.iter().flatten() {
                    index.mark(q, marks, r as u32, 1);
                }
                for q in &p.not_nets {
                    index.mark(q, marks, r as u32, 4);
                }
            }
        };
        let literal_index = PrefixIndex::new(literal.clone());
        let mut literal_marks = vec![Vec::new(); literal_index.sorted.len()];
        mark_literal(&literal_index, &mut literal_marks);
        let mut net_classes: BTreeMap<(bool, Vec<(u32, u8)>), u32> = BTreeMap::new();
        let mut peer_nets = Vec::new();
        for (i, net) in literal_index.sorted.iter().enumerate() {
            if literal_index.region_empty(i) {
                continue;
            }
            let key = (net.addr().is_ipv4(), merged(&literal_marks[i]));
            let next = net_classes.len() as u32;
            let class = *net_classes.entry(key).or_insert(next);
            peer_nets.push((*net, class));
        }

        // The full partition: nets and set members together. Each region's net class and
        // set mask together decide which rules its addresses satisfy: its peer class.
        let mut listed = literal;
        for set in &peer_sets {
            listed.extend(set.members.iter());
        }
        let index = PrefixIndex::new(listed);
        let mut marks: Vec<Vec<(u32, u8)>> = vec![Vec::new(); index.sorted.len()];
        mark_literal(&index, &mut marks);
        let mut masks = vec![0u64; index.sorted.len()];
        for (s, set) in peer_sets.iter().enumerate() {
            for q in set.members.iter() {
                for i in index.inside(q) {
                    if index.sorted[i].prefix_len() >= q.prefix_len() {
                        masks[i] |= 1 << s;
                    }
                }
            }
        }
        let wildcards: Vec<u32> = peers
            .iter()
            .enumerate()
            .filter(|(_, p)| p.is_wildcard())
            .map(|(r, _)| r as u32)
            .collect();
        let mut peer_classes: BTreeMap<(bool, Vec<u32>, Vec<u32>), u32> = BTreeMap::new();
        let mut peer_rule_sets: Vec<(bool, Vec<u32>)> = Vec::new();
        let mut combos: BTreeMap<(u32, u64), u32> = BTreeMap::new();
        for (i, net) in index.sorted.iter().enumerate() {
            if index.region_empty(i) {
                continue;
            }
            let v4 = net.addr().is_ipv4();
            let literal_bits = merged(&marks[i]);
            let net_class = net_classes[&(v4, literal_bits.clone())];
            let mask = masks[i];
            if combos.contains_key(&(net_class, mask)) {
                continue;
            }
            let mut bits: BTreeMap<u32, u8> = literal_bits.into_iter().collect();
            for (s, users) in set_users.iter().enumerate() {
                if mask & (1 << s) != 0 {
                    for (r, b) in users {
                        *bits.entry(*r).or_default() |= b;
                    }
                }
            }
            let mut specific = Vec::new();
            let mut excluded_wild = Vec::new();
            for (r, b) in &bits {
                let p = &peers[*r as usize];
                if b & 4 != 0 {
                    if p.is_wildcard() {
                        excluded_wild.push(*r);
                    }
                    continue;
                }
                if p.is_wildcard() {
                    continue;
                }
                let nets_ok = p.nets.is_none() || b & 1 != 0;
                let sel_ok = p.selected.is_none() || b & 2 != 0;
                if nets_ok && sel_ok {
                    specific.push(*r);
                }
            }
            let key = (v4, specific, excluded_wild);
            let next = peer_classes.len() as u32;
            let class = *peer_classes.entry(key.clone()).or_insert_with(|| {
                // The rules satisfied in this class: its specific ones and the wildcards it
                // does not exclude, in program order.
                let mut all: Vec<u32> = key.1.clone();
                all.extend(wildcards.iter().filter(|w| key.2.binary_search(w).is_err()));
                all.sort_unstable();
                peer_rule_sets.push((v4, all));
                next
            });
            combos.insert((net_class, mask), class);
        }
        // Classes numbered by what they mean (their key's rank), not by where their first
        // address sorts: a member joining or leaving a class that exists then changes the
        // sets and combinations alone, and the dataplane can update them in place.
        let rank: Vec<u32> = {
            let mut by_first_seen = vec![0u32; peer_classes.len()];
            for (rank, first_seen) in peer_classes.values().enumerate() {
                by_first_seen[*first_seen as usize] = rank as u32;
            }
            by_first_seen
        };
        let peer_classes_out: Vec<(u32, u64, u32)> = combos
            .into_iter()
            .map(|((net_class, mask), class)| (net_class, mask, rank[class as usize]))
            .collect();
        let mut ranked: Vec<(u32, (bool, Vec<u32>))> = peer_rule_sets
            .into_iter()
            .enumerate()
            .map(|(first_seen, set)| (rank[first_seen], set))
            .collect();
        ranked.sort_by_key(|(rank, _)| *rank);
        let peer_sets_by_class: Vec<(bool, Vec<u32>)> =
            ranked.into_iter().map(|(_, set)| set).collect();

        // Local addresses: the endpoint's own.
        let mut local_classes: BTreeMap<(bool, Vec<bool>), u32> = BTreeMap::new();
        let mut local_sets: Vec<(bool, Vec<bool>)> = Vec::new();
        let mut local_addresses = Vec::new();
        for ip in addresses {
            let sig: Vec<bool> = rules
                .iter()
                .map(|f| {
                    local_matches(
                        local_entity(&f.rule, direction),
                        f.namespace,
                        *ip,
                        &mut selected,
                    )
                })
                .collect();
            let key = (ip.is_ipv4(), sig);
            let next = local_classes.len() as u32;
            let class = *local_classes.entry(key.clone()).or_insert_with(|| {
                local_sets.push(key);
                next
            });
            local_addresses.push((*ip, class));
        }

        // Protocols some rule names, and one class for all the others.
        let named: BTreeSet<u8> = rules
            .iter()
            .flat_map(|f| [f.rule.protocol.as_ref(), f.rule.not_protocol.as_ref()])
            .flatten()
            .filter_map(|p| p.number())
            .collect();
        let other = (0..=255u8)
            .rev()
            .find(|p| !named.contains(p) && !has_ports(*p) && !is_icmp(*p))
            .unwrap_or(253);
        let mut protocol_classes: BTreeMap<ProtocolSignature, u32> = BTreeMap::new();
        let mut protocol_reps: Vec<u8> = Vec::new();
        let mut protocols = Vec::new();
        let mut protocol_class_of = |p: u8| {
            let sig = (
                has_ports(p),
                is_icmp(p),
                rules
                    .iter()
                    .map(|f| {
                        (
                            f.rule.protocol.as_ref().map(|x| x.number() == Some(p)),
                            f.rule.not_protocol.as_ref().map(|x| x.number() == Some(p)),
                        )
                    })
                    .collect::<Vec<_>>(),
            );
            let next = protocol_classes.len() as u32;
            *protocol_classes.entry(sig).or_insert_with(|| {
                protocol_reps.push(p);
                next
            })
        };
        for p in &named {
            protocols.push((*p, protocol_class_of(*p)));
        }
        let other_protocol = protocol_class_of(other);

        // Source ports.
        let mut sport_cuts = BTreeSet::new();
        for f in &rules {
            port_cuts(&f.rule.source.ports, &mut sport_cuts);
            port_cuts(&f.rule.source.not_ports, &mut sport_cuts);
        }
        let mut sport_classes: BTreeMap<Vec<(bool, bool)>, u32> = BTreeMap::new();
        let mut sport_reps: Vec<u16> = Vec::new();
        let mut source_ports = Vec::new();
        for (lo, hi) in ranges(&sport_cuts) {
            let sig: Vec<(bool, bool)> = rules
                .iter()
                .filter(|f| !f.rule.source.ports.is_empty() || !f.rule.source.not_ports.is_empty())
                .map(|f| {
                    (
                        port_listed(&f.rule.source.ports, lo),
                        port_listed(&f.rule.source.not_ports, lo),
                    )
                })
                .collect();
            let next = sport_classes.len() as u32;
            let c = *sport_classes.entry(sig).or_insert_with(|| {
                sport_reps.push(lo);
                next
            });
            source_ports.push((lo, hi, c));
        }

        // Every cell: the rules that apply in it, then their verdicts along the port dimension.
        let mut verdict_ids: BTreeMap<Verdict, u32> = BTreeMap::new();
        let mut verdicts = Vec::new();
        let mut cells = BTreeMap::new();
        for (peer, (peer_v4, peer_rules)) in peer_sets_by_class.iter().enumerate() {
            for (local, (local_v4, local_sig)) in local_sets.iter().enumerate() {
                if peer_v4 != local_v4 {
                    continue;
                }
                for (protocol, &proto) in protocol_reps.iter().enumerate() {
                    for (source_port, &sport) in sport_reps.iter().enumerate() {
                        let applicable: Vec<usize> = peer_rules
                            .iter()
                            .map(|r| *r as usize)
                            .filter(|&r| {
                                let rule = &rules[r].rule;
                                local_sig[r]
                                    && rule.ip_version.is_none_or(|v| (v == 4) == *peer_v4)
                                    && rule
                                        .protocol
                                        .as_ref()
                                        .is_none_or(|p| p.number() == Some(proto))
                                    && rule
                                        .not_protocol
                                        .as_ref()
                                        .is_none_or(|p| p.number() != Some(proto))
                                    && source_port_matches(&rule.source, sport, proto)
                                    && (rule.icmp.is_none() || is_icmp(proto))
                            })
                            .collect();
                        let entries =
                            paint(&rules, &groups, &applicable, proto, &mut |v: Verdict| {
                                let next = verdicts.len() as u32;
                                *verdict_ids.entry(v.clone()).or_insert_with(|| {
                                    verdicts.push(v);
                                    next
                                })
                            });
                        cells.insert(
                            Cell {
                                peer: peer as u32,
                                local: local as u32,
                                protocol: protocol as u32,
                                source_port: source_port as u32,
                            },
                            entries,
                        );
                    }
                }
            }
        }
        Ok(CompiledProgram {
            direction: Some(direction),
            peer_nets,
            peer_sets,
            peer_classes: peer_classes_out,
            forwarded_passes: false,
            host: false,
            local_addresses,
            protocols,
            other_protocol,
            source_ports,
            cells,
            verdicts,
        })
    }

    /// The verdict for `packet`, found the way the dataplane finds it. A packet whose local
    /// address is not the endpoint's is denied.
    pub fn lookup(&self, packet: &Packet) -> Option<&Verdict> {
        let direction = self.direction?;
        let (peer_ip, local_ip) = match direction {
            Direction::Ingress => (packet.src, packet.dst),
            Direction::Egress => (packet.dst, packet.src),
        };
        let net_class = self
            .peer_nets
            .iter()
            .filter(|(n, _)| n.contains(&peer_ip))
            .max_by_key(|(n, _)| n.prefix_len())?
            .1;
        let mask = self
            .peer_sets
            .iter()
            .enumerate()
            .filter(|(_, s)| s.members.iter().any(|n| n.contains(&peer_ip)))
            .fold(0u64, |m, (i, _)| m | 1 << i);
        let peer = self
            .peer_classes
            .iter()
            .find(|(n, m, _)| *n == net_class && *m == mask)?
            .2;
        let local = self.local_addresses.iter().find(|(a, _)| *a == local_ip)?.1;
        let protocol = self
            .protocols
            .iter()
            .find(|(p, _)| *p == packet.protocol)
            .map_or(self.other_protocol, |(_, c)| *c);
        let sport = if has_ports(packet.protocol) {
            packet.src_port
        } else {
            0
        };
        let source_port = self
            .source_ports
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&sport))?
            .2;
        let dim = if let Some((t, c)) = packet.icmp.filter(|_| is_icmp(packet.protocol)) {
            (u16::from(t) << 8) | u16::from(c)
        } else if has_ports(packet.protocol) {
            packet.dst_port
        } else {
            0
        };
        let cell = self.cells.get(&Cell {
            peer,
            local,
            protocol,
            source_port,
        })?;
        let id = cell
            .iter()
            .find(|(lo, hi, _)| (*lo..=*hi).contains(&dim))?
            .2;
        self.verdicts.get(id as usize)
    }

    /// Number of port-range entries over all cells (what the dataplane's final map holds).
    pub fn entry_count(&self) -> usize {
        self.cells.values().map(Vec::len).sum()
    }
}

/// The source-port half of a rule's source match (ports only count for protocols with ports).
fn source_port_matches(e: &EntityRule, port: u16, protocol: u8) -> bool {
    let listed = has_ports(protocol) && port_listed(&e.ports, port);
    if !e.ports.is_empty() && !listed {
        return false;
    }
    !(has_ports(protocol) && port_listed(&e.not_ports, port))
}

/// The destination-port (or ICMP type/code) values a rule matches, as inclusive ranges, for a
/// packet of `protocol`; None when it matches every value.
fn dim_ranges(rule: &Rule, protocol: u8) -> Option<Vec<(u32, u32)>> {
    let mut allowed: Option<Vec<(u32, u32)>> = None;
    let mut denied: Vec<(u32, u32)> = Vec::new();
    let to_ranges = |ports: &[Port]| -> Vec<(u32, u32)> {
        ports
            .iter()
            .filter_map(|p| match p {
                Port::Number(n) => Some((*n as u32, *n as u32)),
                Port::Range(a, b) => Some((*a as u32, *b as u32)),
                Port::Named(_) => None,
            })
            .collect()
    };
    let icmp_range = |f: &calico_model::spec::IcmpFields| -> (u32, u32) {
        match (f.icmp_type, f.code) {
            (Some(t), Some(c)) => ((t as u32) << 8 | c as u32, (t as u32) << 8 | c as u32),
            (Some(t), None) => ((t as u32) << 8, (t as u32) << 8 | 255),
            _ => (0, 65535),
        }
    };
    if has_ports(protocol) {
        if !rule.destination.ports.is_empty() {
            allowed = Some(to_ranges(&rule.destination.ports));
        }
        denied.extend(to_ranges(&rule.destination.not_ports));
    } else if !rule.destination.ports.is_empty() {
        return Some(Vec::new());
    }
    if is_icmp(protocol) {
        if let Some(f) = &rule.icmp {
            let r = icmp_range(f);
            allowed = Some(match allowed {
                Some(a) => a
                    .into_iter()
                    .filter_map(|(lo, hi)| {
                        let (l, h) = (lo.max(r.0), hi.min(r.1));
                        (l <= h).then_some((l, h))
                    })
                    .collect(),
                None => vec![r],
            });
        }
        if let Some(f) = &rule.not_icmp {
            denied.push(icmp_range(f));
        }
    } else if rule.icmp.is_some() {
        return Some(Vec::new());
    }
    if denied.is_empty() {
        return allowed;
    }
    // allowed minus denied.
    let mut out = allowed.unwrap_or_else(|| vec![(0, 65535)]);
    for (dlo, dhi) in denied {
        out = out
            .into_iter()
            .flat_map(|(lo, hi)| {
                let mut parts = Vec::new();
                if dhi < lo || dlo > hi {
                    parts.push((lo, hi));
                } else {
                    if lo < dlo {
                        parts.push((lo, dlo - 1));
                    }
                    if hi > dhi {
                        parts.push((dhi + 1, hi));
                    }
                }
                parts
            })
            .collect();
    }
    Some(out)
}

/// Verdicts along the port dimension of one cell: walks the applicable rules in program order
/// and decides each still-open stretch of ports once (tier semantics included).
fn paint(
    rules: &[FlatRule<'_>],
    groups: &[Group],
    applicable: &[usize],
    protocol: u8,
    intern: &mut dyn FnMut(Verdict) -> u32,
) -> Vec<(u16, u16, u32)> {
    let dims: Vec<Option<Vec<(u32, u32)>>> = applicable
        .iter()
        .map(|&r| dim_ranges(&rules[r].rule, protocol))
        .collect();
    // Interval boundaries from the applicable rules only.
    let mut cuts: BTreeSet<u32> = BTreeSet::new();
    if has_ports(protocol) || is_icmp(protocol) {
        for ranges in dims.iter().flatten() {
            for (lo, hi) in ranges {
                cuts.insert(*lo);
                cuts.insert(hi + 1);
            }
        }
    }
    let intervals = ranges(&cuts);
    let n = intervals.len();
    let mut decided: Vec<Option<u32>> = vec![None; n];
    let mut next_rule = 0;
    for (g, group) in groups.iter().enumerate() {
        let mut open = Open::new(n, |i| decided[i].is_none());
        while next_rule < applicable.len() && rules[applicable[next_rule]].group == g {
            let k = next_rule;
            next_rule += 1;
            let f = &rules[applicable[k]];
            let spans: Vec<(usize, usize)> = match &dims[k] {
                None => vec![(0, n - 1)],
                Some(rs) => rs
                    .iter()
                    .filter_map(|(lo, hi)| {
                        let a = intervals.partition_point(|(_, ihi)| u32::from(*ihi) < *lo);
                        let b = intervals.partition_point(|(ilo, _)| u32::from(*ilo) <= *hi);
                        (a < b).then(|| (a, b - 1))
                    })
                    .collect(),
            };
            for (a, b) in spans {
                let mut i = open.find(a);
                while i <= b && i < n {
                    match f.rule.action {
                        Action::Allow => decided[i] = Some(intern(Verdict::Allow(f.at.clone()))),
                        Action::Deny => decided[i] = Some(intern(Verdict::Deny(f.at.clone()))),
                        // Passed: out of this tier (or profile) for these ports.
                        Action::Pass => {}
                        Action::Log => {
                            i = open.find(i + 1);
                            continue;
                        }
                    }
                    open.close(i);
                    i = open.find(i + 1);
                }
            }
        }
        if let Some((default, name)) = &group.tier_default {
            if *default == TierDefaultAction::Deny {
                // Still open here: nothing in the tier decided and nothing passed.
                for (i, slot) in decided.iter_mut().enumerate() {
                    if slot.is_none() && open.find(i) == i {
                        *slot = Some(intern(Verdict::Deny(RuleRef::EndOfTier(name.clone()))));
                    }
                }
            }
        }
    }
    let mut out: Vec<(u16, u16, u32)> = Vec::new();
    for (i, (lo, hi)) in intervals.iter().enumerate() {
        let id = decided[i].unwrap_or_else(|| intern(Verdict::Deny(RuleRef::NoMatch)));
        match out.last_mut() {
            Some(last) if last.2 == id => last.1 = *hi,
            _ => out.push((*lo, *hi, id)),
        }
    }
    out
}

fn port_listed(ports: &[Port], port: u16) -> bool {
    ports.iter().any(|p| match p {
        Port::Number(n) => *n == i64::from(port),
        Port::Range(a, b) => (*a..=*b).contains(&i64::from(port)),
        Port::Named(_) => false,
    })
}

/// Splits an inclusive port range into the fewest prefix-aligned blocks, as `(value,
/// prefix_len)` pairs for a 16-bit longest-prefix-match key.
pub fn range_to_prefixes(lo: u16, hi: u16) -> Vec<(u16, u8)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u32::from(lo), u32::from(hi));
    while lo <= hi {
        let mut size = if lo == 0 {
            1 << 16
        } else {
            1 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

/// The side of a rule that describes the other end of the connection.
/// A rule whose peer side names ports by name, as the rules it stands for: one with its
/// numeric ports (if any), then per named port and per number it resolves to, one matching
/// that number at the addresses of the peers having it (inside the rule's own nets, if it
/// has any). All keep the rule's place, so the first that matches decides as it would. A
/// name no peer has adds nothing: it matches no packet. Other rules pass through as they are.
fn expand_named_peer_ports<'a>(
    ipsets: &dyn IpSetSource,
    rule: &'a Rule,
    policy_namespace: Option<&str>,
    direction: Direction,
) -> Vec<std::borrow::Cow<'a, Rule>> {
    let peer = peer_entity(rule, direction);
    if !peer.ports.iter().any(|p| matches!(p, Port::Named(_))) {
        return vec![std::borrow::Cow::Borrowed(rule)];
    }
    let source_is_peer = direction == Direction::Ingress;
    let with_peer = |ports: Vec<Port>, nets: Option<Vec<String>>| {
        let mut r = rule.clone();
        let e = if source_is_peer {
            &mut r.source
        } else {
            &mut r.destination
        };
        e.ports = ports;
        if let Some(nets) = nets {
            e.nets = nets;
        }
        std::borrow::Cow::Owned(r)
    };
    let mut out = Vec::new();
    let numeric: Vec<Port> = peer
        .ports
        .iter()
        .filter(|p| !matches!(p, Port::Named(_)))
        .cloned()
        .collect();
    if !numeric.is_empty() {
        out.push(with_peer(numeric, None));
    }
    let own_nets = crate::eval::parse_nets(&peer.nets);
    let protocol = rule.protocol.as_ref().and_then(|p| p.number());
    for name in peer.ports.iter().filter_map(|p| match p {
        Port::Named(n) => Some(n),
        _ => None,
    }) {
        let key = (
            crate::world::named_port_scope(peer, policy_namespace),
            name.clone(),
            protocol,
        );
        for (port, addresses) in ipsets.named_ports(&key) {
            let nets: Vec<String> = addresses
                .iter()
                .filter(|a| own_nets.is_empty() || own_nets.iter().any(|n| n.contains(&a.addr())))
                .map(|a| a.to_string())
                .collect();
            if !nets.is_empty() {
                out.push(with_peer(vec![Port::Number(i64::from(port))], Some(nets)));
            }
        }
    }
    out
}

fn peer_entity(r: &Rule, direction: Direction) -> &EntityRule {
    match direction {
        Direction::Ingress => &r.source,
        Direction::Egress => &r.destination,
    }
}

/// Resolves (selector, namespaceSelector, policy namespace) to prefixes.
type SelectorLookup<'a> = dyn FnMut(Option<&str>, Option<&str>, Option<&str>) -> Vec<IpNet> + 'a;

/// Whether the endpoint's own address `ip` satisfies the address half of entity `e` (the
/// local side of a rule): the same test as the reference evaluator's, over resolved sets.
fn local_matches(
    e: &EntityRule,
    policy_namespace: Option<&str>,
    ip: IpAddr,
    selected: &mut SelectorLookup<'_>,
) -> bool {
    if !e.nets.is_empty() && !parse_nets(&e.nets).iter().any(|n| n.contains(&ip)) {
        return false;
    }
    if parse_nets(&e.not_nets).iter().any(|n| n.contains(&ip)) {
        return false;
    }
    let ns_sel = e.namespace_selector.as_deref();
    if (e.selector.is_some() || ns_sel.is_some())
        && !selected(e.selector.as_deref(), ns_sel, policy_namespace)
            .iter()
            .any(|n| n.contains(&ip))
    {
        return false;
    }
    if let Some(not) = e.not_selector.as_deref() {
        if selected(Some(not), ns_sel, policy_namespace)
            .iter()
            .any(|n| n.contains(&ip))
        {
            return false;
        }
    }
    true
}

/// The side of a rule that describes the endpoint itself.
pub(crate) fn local_entity(r: &Rule, direction: Direction) -> &EntityRule {
    match direction {
        Direction::Ingress => &r.destination,
        Direction::Egress => &r.source,
    }
}

/// [`local_entity`], to change (the endpoint's own named ports resolved with its program).
pub(crate) fn local_entity_mut(r: &mut Rule, direction: Direction) -> &mut EntityRule {
    match direction {
        Direction::Ingress => &mut r.destination,
        Direction::Egress => &mut r.source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_become_covering_prefixes() {
        assert_eq!(range_to_prefixes(0, 65535), [(0, 0)]);
        assert_eq!(range_to_prefixes(80, 80), [(80, 16)]);
        assert_eq!(range_to_prefixes(8000, 8007), [(8000, 13)]);
        for (lo, hi) in [
            (1, 1023),
            (1024, 65535),
            (7, 9),
            (80, 90),
            (65535, 65535),
            (0, 0),
            (3, 65534),
        ] {
            let prefixes = range_to_prefixes(lo, hi);
            let covered: u32 = prefixes
                .iter()
                .map(|(_, len)| 1u32 << (16 - u32::from(*len)))
                .sum();
            assert_eq!(covered, u32::from(hi) - u32::from(lo) + 1, "{lo}-{hi}");
            for (value, len) in &prefixes {
                let size = 1u32 << (16 - u32::from(*len));
                assert_eq!(u32::from(*value) % size, 0, "unaligned block {value}/{len}");
                assert!(
                    u32::from(*value) >= u32::from(lo)
                        && u32::from(*value) + size - 1 <= u32::from(hi)
                );
            }
            assert!(prefixes.len() <= 30);
        }
    }

    #[test]
    fn regions_covered_by_more_specific_prefixes_are_empty() {
        let index =
            |list: &[&str]| PrefixIndex::new(list.iter().map(|s| s.parse().unwrap()).collect());
        let full = index(&["10.0.0.0/31", "10.0.0.0/32", "10.0.0.1/32"]);
        assert!(
            full.region_empty(0),
            "10.0.0.0/31 is covered by its two /32s"
        );
        assert!(!full.region_empty(1));
        let partial = index(&["10.0.0.0/8", "10.0.0.0/24", "10.0.1.0/24", "10.0.2.5/32"]);
        assert!((0..partial.sorted.len()).all(|i| !partial.region_empty(i)));
        let nested = index(&["10.0.0.0/30", "10.0.0.0/31", "10.0.0.0/32", "10.0.0.2/31"]);
        let slash30 = nested
            .sorted
            .iter()
            .position(|n| n.prefix_len() == 30)
            .unwrap();
        assert!(nested.region_empty(slash30));
    }

    #[test]
    fn a_rule_selector_that_does_not_parse_refuses_the_rule() {
        use calico_model::spec::{EntityRule, Rule};
        let good = Rule {
            source: EntityRule {
                selector: Some("role == 'db'".into()),
                ..Default::default()
            },
            ..Rule::new(Action::Allow)
        };
        assert_eq!(check_supported("p", 0, &good, Direction::Ingress), Ok(()));
        for (side, field) in [
            ("source", "selector"),
            ("source", "notSelector"),
            ("destination", "namespaceSelector"),
        ] {
            let mut bad = good.clone();
            let entity = if side == "source" {
                &mut bad.source
            } else {
                &mut bad.destination
            };
            let broken = Some("role == ".to_owned());
            match field {
                "selector" => entity.selector = broken,
                "notSelector" => entity.not_selector = broken,
                _ => entity.namespace_selector = broken,
            }
            let e = check_supported("p", 3, &bad, Direction::Ingress).unwrap_err();
            assert_eq!(
                (e.index, e.field.as_str()),
                (3, format!("{side}.{field}").as_str())
            );
            assert!(e.reason.contains("does not parse"), "{e}");
        }
    }
}
