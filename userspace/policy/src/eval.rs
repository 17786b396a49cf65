//! The reference evaluator: one packet, one endpoint, one direction, Calico's semantics.

use std::net::IpAddr;

use calico_model::{
    spec::{Action, EntityRule, IcmpFields, Rule, TierDefaultAction},
    Port,
};
use calico_selector::Selector;
use ipnet::IpNet;

use crate::{PolicyProgram, World};

/// Relative to the endpoint: Ingress is traffic to it, Egress traffic from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

/// The parts of a packet policy looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// Ports for TCP, UDP, SCTP and UDPLite; 0 otherwise.
    pub src_port: u16,
    pub dst_port: u16,
    /// Type and code for ICMP and ICMPv6.
    pub icmp: Option<(u8, u8)>,
}

/// What decided.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleRef {
    /// Rule `index` of `policy` in `tier` (tier None: a profile).
    Rule {
        tier: Option<String>,
        policy: String,
        index: usize,
    },
    /// Policies in the tier selected the endpoint but none decided.
    EndOfTier(String),
    /// No tier decided and no profile rule matched (or nothing applies at all).
    NoMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    Allow(RuleRef),
    Deny(RuleRef),
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        matches!(self, Verdict::Allow(_))
    }
}

/// The verdict of `program` (for an endpoint and direction) on `packet`.
pub fn evaluate(world: &World, program: &PolicyProgram, packet: &Packet) -> Verdict {
    'tiers: for tier in &program.tiers {
        for policy in &tier.policies {
            for (index, rule) in policy.rules.iter().enumerate() {
                if !rule_matches(world, rule, policy.namespace.as_deref(), packet) {
                    continue;
                }
                let at = || RuleRef::Rule {
                    tier: Some(tier.name.clone()),
                    policy: policy.name.clone(),
                    index,
                };
                match rule.action {
                    Action::Allow => return Verdict::Allow(at()),
                    Action::Deny => return Verdict::Deny(at()),
                    Action::Pass => continue 'tiers,
                    Action::Log => {}
                }
            }
        }
        match tier.default_action {
            TierDefaultAction::Deny => return Verdict::Deny(RuleRef::EndOfTier(tier.name.clone())),
            TierDefaultAction::Pass => continue 'tiers,
        }
    }
    for (name, rules) in &program.profiles {
        for (index, rule) in rules.iter().enumerate() {
            if !rule_matches(world, rule, None, packet) {
                continue;
            }
            let at = || RuleRef::Rule {
                tier: None,
                policy: name.clone(),
                index,
            };
            match rule.action {
                Action::Allow => return Verdict::Allow(at()),
                Action::Deny => return Verdict::Deny(at()),
                // Pass in a profile ends that profile; Log continues.
                Action::Pass => break,
                Action::Log => {}
            }
        }
    }
    Verdict::Deny(RuleRef::NoMatch)
}

pub(crate) fn is_icmp(protocol: u8) -> bool {
    protocol == 1 || protocol == 58
}

pub(crate) fn has_ports(protocol: u8) -> bool {
    matches!(protocol, 6 | 17 | 132 | 136)
}

fn icmp_matches(fields: &IcmpFields, packet: &Packet) -> bool {
    let Some((t, c)) = packet.icmp.filter(|_| is_icmp(packet.protocol)) else {
        return false;
    };
    fields.icmp_type.is_none_or(|ft| ft == i64::from(t))
        && fields.code.is_none_or(|fc| fc == i64::from(c))
}

/// Whether every criterion of `rule` holds for `packet`. Criteria the dataplane cannot
/// enforce (named ports, service accounts, services, HTTP) never match here; the compiler
/// refuses rules that use them.
pub fn rule_matches(
    world: &World,
    rule: &Rule,
    policy_namespace: Option<&str>,
    packet: &Packet,
) -> bool {
    if let Some(v) = rule.ip_version {
        if (v == 4) != packet.src.is_ipv4() {
            return false;
        }
    }
    if let Some(p) = &rule.protocol {
        if p.number() != Some(packet.protocol) {
            return false;
        }
    }
    if let Some(p) = &rule.not_protocol {
        if p.number() == Some(packet.protocol) {
            return false;
        }
    }
    if let Some(icmp) = &rule.icmp {
        if !icmp_matches(icmp, packet) {
            return false;
        }
    }
    if let Some(icmp) = &rule.not_icmp {
        if icmp_matches(icmp, packet) {
            return false;
        }
    }
    if rule.http.is_some() {
        return false;
    }
    entity_matches(
        world,
        &rule.source,
        policy_namespace,
        packet.src,
        packet.src_port,
        packet.protocol,
    ) && entity_matches(
        world,
        &rule.destination,
        policy_namespace,
        packet.dst,
        packet.dst_port,
        packet.protocol,
    )
}

/// Whether `port` is among `ports`; a name matches through `named` (the peer holding the
/// address has a port by that name with that number).
fn port_in(ports: &[Port], port: u16, named: &dyn Fn(&str) -> bool) -> bool {
    ports.iter().any(|p| match p {
        Port::Number(n) => *n == i64::from(port),
        Port::Range(a, b) => (*a..=*b).contains(&i64::from(port)),
        Port::Named(name) => named(name),
    })
}

pub(crate) fn parse_nets(nets: &[String]) -> Vec<IpNet> {
    nets.iter()
        .filter_map(|n| {
            n.parse::<IpNet>()
                .ok()
                .or_else(|| n.parse::<IpAddr>().ok().map(IpNet::from))
        })
        .collect()
}

fn entity_matches(
    world: &World,
    e: &EntityRule,
    policy_namespace: Option<&str>,
    ip: IpAddr,
    port: u16,
    protocol: u8,
) -> bool {
    // A name still here is the peer's (the endpoint's own were resolved with its program,
    // and a name it lacks is not found below either).
    let scope = crate::world::named_port_scope(e, policy_namespace);
    let named = |name: &str| world.has_named_port(&scope, ip, name, protocol, port);
    entity_address_matches(world, e, policy_namespace, ip)
        && entity_ports_match(e, port, protocol, &named)
}

/// The address half of an entity match: nets, notNets, selector, notSelector,
/// namespaceSelector (and never for the matchers the dataplane cannot enforce).
pub(crate) fn entity_address_matches(
    world: &World,
    e: &EntityRule,
    policy_namespace: Option<&str>,
    ip: IpAddr,
) -> bool {
    if e.services.is_some() || e.service_accounts.is_some() {
        return false;
    }
    if !e.nets.is_empty() && !parse_nets(&e.nets).iter().any(|n| n.contains(&ip)) {
        return false;
    }
    if parse_nets(&e.not_nets).iter().any(|n| n.contains(&ip)) {
        return false;
    }
    let (selector, namespace_selector, not_selector) = entity_selectors(e);
    if (selector.is_some() || namespace_selector.is_some())
        && !world.selects_address(
            selector.as_ref(),
            namespace_selector.as_ref(),
            policy_namespace,
            ip,
        )
    {
        return false;
    }
    if let Some(not) = not_selector {
        if world.selects_address(
            Some(&not),
            namespace_selector.as_ref(),
            policy_namespace,
            ip,
        ) {
            return false;
        }
    }
    true
}

/// (selector, namespaceSelector, notSelector) of an entity, parsed (validation has checked
/// them; an unparsable one would match everything, never nothing).
pub(crate) fn entity_selectors(
    e: &EntityRule,
) -> (Option<Selector>, Option<Selector>, Option<Selector>) {
    let parse = |s: &Option<String>| {
        s.as_deref()
            .map(|t| Selector::parse(t).unwrap_or_else(|_| Selector::all()))
    };
    (
        parse(&e.selector),
        parse(&e.namespace_selector),
        parse(&e.not_selector),
    )
}

/// The port half of an entity match.
pub(crate) fn entity_ports_match(
    e: &EntityRule,
    port: u16,
    protocol: u8,
    named: &dyn Fn(&str) -> bool,
) -> bool {
    let in_ports = has_ports(protocol) && port_in(&e.ports, port, named);
    if !e.ports.is_empty() && !in_ports {
        return false;
    }
    if !e.not_ports.is_empty() && has_ports(protocol) && port_in(&e.not_ports, port, named) {
        return false;
    }
    true
}
