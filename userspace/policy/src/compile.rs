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
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use calico_model::{
    spec::{EntityRule, Rule},
    Port,
};
use ipnet::IpNet;

use crate::{
    eval::{entity_address_matches, entity_selectors, has_ports, is_icmp, parse_nets},
    evaluate, Direction, Packet, PolicyProgram, Verdict, World,
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
    /// Longest prefix wins; every family has a /0 entry.
    pub peer_prefixes: Vec<(IpNet, u32)>,
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

/// Rejects what cannot be compiled, naming the rule and field.
fn check_supported(policy: &str, index: usize, rule: &Rule) -> Result<(), CompileError> {
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
                "service account matching is not supported yet",
            ));
        }
        for (field, ports) in [("ports", &e.ports), ("notPorts", &e.not_ports)] {
            if ports.iter().any(|p| matches!(p, Port::Named(_))) {
                return Err(err(
                    &format!("{side}.{field}"),
                    "named ports are not supported yet",
                ));
            }
        }
    }
    Ok(())
}

/// Every rule of the program with the namespace its selectors are scoped to.
fn all_rules(program: &PolicyProgram) -> Vec<(&str, Option<&str>, usize, &Rule)> {
    let mut out = Vec::new();
    for tier in &program.tiers {
        for p in &tier.policies {
            for (i, r) in p.rules.iter().enumerate() {
                out.push((p.name.as_str(), p.namespace.as_deref(), i, r));
            }
        }
    }
    for (name, rules) in &program.profiles {
        for (i, r) in rules.iter().enumerate() {
            out.push((name.as_str(), None, i, r));
        }
    }
    out
}

/// Prefixes an entity's address matchers mention (nets, notNets, and what selectors select).
fn entity_prefixes(world: &World, e: &EntityRule, ns: Option<&str>, out: &mut BTreeSet<IpNet>) {
    out.extend(parse_nets(&e.nets).iter().map(IpNet::trunc));
    out.extend(parse_nets(&e.not_nets).iter().map(IpNet::trunc));
    let (selector, namespace_selector, not_selector) = entity_selectors(e);
    if selector.is_some() || namespace_selector.is_some() {
        out.extend(world.selected_prefixes(selector.as_ref(), namespace_selector.as_ref(), ns));
    }
    if let Some(not) = not_selector {
        out.extend(world.selected_prefixes(Some(&not), namespace_selector.as_ref(), ns));
    }
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

fn from_u128(v: u128, like: &IpNet) -> IpAddr {
    match like {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

/// The lowest address of `net` that no more specific prefix of `all` covers, if any: an
/// address whose longest match is `net`.
fn representative(net: &IpNet, all: &BTreeSet<IpNet>) -> Option<IpAddr> {
    let children: Vec<&IpNet> = all
        .iter()
        .filter(|c| {
            c.prefix_len() > net.prefix_len()
                && net.contains(*c)
                && c.addr().is_ipv4() == net.addr().is_ipv4()
        })
        .collect();
    let end = last_address(net);
    let mut candidate = as_u128(net.network());
    loop {
        let ip = from_u128(candidate, net);
        let covering = children
            .iter()
            .filter(|c| c.contains(&ip))
            .map(|c| last_address(c))
            .max();
        match covering {
            None => return Some(ip),
            Some(last) if last >= end => return None,
            Some(last) => candidate = last + 1,
        }
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

/// A signature → class numbering.
struct Classes<S: Ord> {
    ids: BTreeMap<S, u32>,
}

impl<S: Ord> Classes<S> {
    fn new() -> Self {
        Self {
            ids: BTreeMap::new(),
        }
    }
    fn id(&mut self, signature: S) -> u32 {
        let next = self.ids.len() as u32;
        *self.ids.entry(signature).or_insert(next)
    }
}

impl CompiledProgram {
    /// Compiles `program` for an endpoint with `addresses`, in `direction`.
    pub fn compile(
        world: &World,
        program: &PolicyProgram,
        addresses: &[IpAddr],
        direction: Direction,
    ) -> Result<Self, CompileError> {
        let rules = all_rules(program);
        for (policy, _, index, rule) in &rules {
            check_supported(policy, *index, rule)?;
        }
        let peer_side = |r: &Rule| -> EntityRule { peer_entity(r, direction).clone() };
        let local_side = |r: &Rule| -> EntityRule { local_entity(r, direction).clone() };

        // Peer addresses: regions of the prefix partition, grouped by how every rule's peer
        // matchers see them.
        let mut prefixes: BTreeSet<IpNet> = BTreeSet::new();
        prefixes.insert("0.0.0.0/0".parse().expect("constant"));
        prefixes.insert("::/0".parse().expect("constant"));
        for (_, ns, _, r) in &rules {
            entity_prefixes(world, &peer_side(r), *ns, &mut prefixes);
        }
        let mut peer_classes = Classes::new();
        let mut peer_reps: BTreeMap<u32, IpAddr> = BTreeMap::new();
        let mut peer_prefixes = Vec::new();
        for net in &prefixes {
            let Some(rep) = representative(net, &prefixes) else {
                continue;
            };
            let signature: (bool, Vec<bool>) = (
                rep.is_ipv4(),
                rules
                    .iter()
                    .map(|(_, ns, _, r)| entity_address_matches(world, &peer_side(r), *ns, rep))
                    .collect(),
            );
            let class = peer_classes.id(signature);
            peer_reps.entry(class).or_insert(rep);
            peer_prefixes.push((*net, class));
        }

        // Local addresses: the endpoint's own.
        let mut local_classes = Classes::new();
        let mut local_reps: BTreeMap<u32, IpAddr> = BTreeMap::new();
        let mut local_addresses = Vec::new();
        for ip in addresses {
            let signature: (bool, Vec<bool>) = (
                ip.is_ipv4(),
                rules
                    .iter()
                    .map(|(_, ns, _, r)| entity_address_matches(world, &local_side(r), *ns, *ip))
                    .collect(),
            );
            let class = local_classes.id(signature);
            local_reps.entry(class).or_insert(*ip);
            local_addresses.push((*ip, class));
        }

        // Protocols some rule names, and one class for all the others.
        let named: BTreeSet<u8> = rules
            .iter()
            .flat_map(|(_, _, _, r)| [r.protocol.as_ref(), r.not_protocol.as_ref()])
            .flatten()
            .filter_map(|p| p.number())
            .collect();
        let other = (0..=255u8)
            .rev()
            .find(|p| !named.contains(p) && !has_ports(*p) && !is_icmp(*p))
            .unwrap_or(253);
        let mut protocol_classes = Classes::new();
        let mut protocol_reps: BTreeMap<u32, u8> = BTreeMap::new();
        let mut protocols = Vec::new();
        let mut protocol_class_of = |p: u8| {
            // Protocols differ by what rules say of them and by which port dimension they use.
            let signature = (
                has_ports(p),
                is_icmp(p),
                rules
                    .iter()
                    .map(|(_, _, _, r)| {
                        (
                            r.protocol.as_ref().map(|x| x.number() == Some(p)),
                            r.not_protocol.as_ref().map(|x| x.number() == Some(p)),
                        )
                    })
                    .collect::<Vec<_>>(),
            );
            let c = protocol_classes.id(signature);
            protocol_reps.entry(c).or_insert(p);
            c
        };
        for p in &named {
            protocols.push((*p, protocol_class_of(*p)));
        }
        let other_protocol = protocol_class_of(other);

        // Source ports.
        let mut sport_cuts = BTreeSet::new();
        for (_, _, _, r) in &rules {
            port_cuts(&r.source.ports, &mut sport_cuts);
            port_cuts(&r.source.not_ports, &mut sport_cuts);
        }
        let mut sport_classes = Classes::new();
        let mut sport_reps: BTreeMap<u32, u16> = BTreeMap::new();
        let mut source_ports = Vec::new();
        for (lo, hi) in ranges(&sport_cuts) {
            let signature: Vec<(bool, bool)> = rules
                .iter()
                .map(|(_, _, _, r)| {
                    (
                        port_listed(&r.source.ports, lo),
                        port_listed(&r.source.not_ports, lo),
                    )
                })
                .collect();
            let c = sport_classes.id(signature);
            sport_reps.entry(c).or_insert(lo);
            source_ports.push((lo, hi, c));
        }

        // Destination ports and ICMP type/code.
        let mut dport_cuts = BTreeSet::new();
        let mut icmp_cuts = BTreeSet::new();
        for (_, _, _, r) in &rules {
            port_cuts(&r.destination.ports, &mut dport_cuts);
            port_cuts(&r.destination.not_ports, &mut dport_cuts);
            for icmp in [&r.icmp, &r.not_icmp].into_iter().flatten() {
                if let Some(t) = icmp.icmp_type {
                    let t = t.clamp(0, 255) as u32;
                    match icmp.code {
                        Some(c) => {
                            icmp_cuts.insert((t << 8) | c.clamp(0, 255) as u32);
                            icmp_cuts.insert(((t << 8) | c.clamp(0, 255) as u32) + 1);
                        }
                        None => {
                            icmp_cuts.insert(t << 8);
                            icmp_cuts.insert((t + 1) << 8);
                        }
                    }
                }
            }
        }
        let dport_ranges = ranges(&dport_cuts);
        let icmp_ranges = ranges(&icmp_cuts);

        // Every cell, evaluated on a representative packet per range.
        let mut verdict_ids: BTreeMap<Verdict, u32> = BTreeMap::new();
        let mut verdicts = Vec::new();
        let mut cells = BTreeMap::new();
        for (&peer, &peer_ip) in &peer_reps {
            for (&local, &local_ip) in &local_reps {
                if peer_ip.is_ipv4() != local_ip.is_ipv4() {
                    continue;
                }
                for (&protocol, &proto) in &protocol_reps {
                    for (&source_port, &sport) in &sport_reps {
                        let dims: &[(u16, u16)] = if is_icmp(proto) {
                            &icmp_ranges
                        } else if has_ports(proto) {
                            &dport_ranges
                        } else {
                            &[(0, 65535)]
                        };
                        let mut entries: Vec<(u16, u16, u32)> = Vec::new();
                        for &(lo, hi) in dims {
                            let (src, dst) = match direction {
                                Direction::Ingress => (peer_ip, local_ip),
                                Direction::Egress => (local_ip, peer_ip),
                            };
                            let packet = Packet {
                                src,
                                dst,
                                protocol: proto,
                                src_port: if has_ports(proto) { sport } else { 0 },
                                dst_port: if has_ports(proto) { lo } else { 0 },
                                icmp: is_icmp(proto)
                                    .then_some(((lo >> 8) as u8, (lo & 0xff) as u8)),
                            };
                            let verdict = evaluate(world, program, &packet);
                            let next = verdicts.len() as u32;
                            let id = *verdict_ids.entry(verdict.clone()).or_insert_with(|| {
                                verdicts.push(verdict);
                                next
                            });
                            match entries.last_mut() {
                                Some(last)
                                    if last.2 == id && u32::from(last.1) + 1 == u32::from(lo) =>
                                {
                                    last.1 = hi
                                }
                                _ => entries.push((lo, hi, id)),
                            }
                        }
                        cells.insert(
                            Cell {
                                peer,
                                local,
                                protocol,
                                source_port,
                            },
                            entries,
                        );
                    }
                }
            }
        }
        Ok(CompiledProgram {
            direction: Some(direction),
            peer_prefixes,
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
        let peer = self
            .peer_prefixes
            .iter()
            .filter(|(n, _)| n.contains(&peer_ip))
            .max_by_key(|(n, _)| n.prefix_len())?
            .1;
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
fn peer_entity(r: &Rule, direction: Direction) -> &EntityRule {
    match direction {
        Direction::Ingress => &r.source,
        Direction::Egress => &r.destination,
    }
}

/// The side of a rule that describes the endpoint itself.
fn local_entity(r: &Rule, direction: Direction) -> &EntityRule {
    match direction {
        Direction::Ingress => &r.destination,
        Direction::Egress => &r.source,
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
    fn representatives_avoid_more_specific_prefixes() {
        let all: BTreeSet<IpNet> = ["10.0.0.0/8", "10.0.0.0/24", "10.0.1.0/24", "10.0.2.5/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let rep = |s: &str| representative(&s.parse().unwrap(), &all).map(|a| a.to_string());
        assert_eq!(rep("10.0.0.0/8").as_deref(), Some("10.0.2.0"));
        assert_eq!(rep("10.0.0.0/24").as_deref(), Some("10.0.0.0"));
        assert_eq!(rep("10.0.2.5/32").as_deref(), Some("10.0.2.5"));
        let full: BTreeSet<IpNet> = ["10.0.0.0/31", "10.0.0.0/32", "10.0.0.1/32"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(representative(&"10.0.0.0/31".parse().unwrap(), &full), None);
    }
}
