//! `calicoctl policy trace`: for one packet, the tiers and policies that apply to an endpoint in
//! order and what decides, read from the datastore and judged by the reference evaluator (the
//! one the dataplane's compiled tables are differentially tested against).

use std::{net::IpAddr, path::Path, process::ExitCode};

use anyhow::{anyhow, bail, Context, Result};
use calico_model::{Kind, Protocol};
use calico_policy::{evaluate, Direction, EndpointId, Packet, RuleRef, Verdict, World};
use clap::{Subcommand, ValueEnum};

use crate::resources::connect;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Show which policies apply to an endpoint for one packet, in order, and what decides.
    #[command(
        after_help = "Examples:\n  calicoctl policy trace shop/db-1 10.0.0.11 tcp/5432\n  calicoctl policy trace db-1 -n shop shop/web-1 tcp/5432\n  calicoctl policy trace shop/web-1 192.0.2.7 udp/53 --direction egress\n  calicoctl policy trace shop/web-1 10.0.0.2 icmp/8"
    )]
    Trace {
        /// The endpoint whose policy is traced: `namespace/name` or `name` of a
        /// WorkloadEndpoint (see -n), or the name of a HostEndpoint.
        endpoint: String,
        /// The other side: an address, or an endpoint (`namespace/name`, `name`).
        peer: String,
        /// `tcp/PORT`, `udp/PORT`, `sctp/PORT`, `icmp[/TYPE[/CODE]]`, `icmpv6[/TYPE[/CODE]]`, or
        /// a protocol number.
        traffic: String,
        /// `ingress`: the packet goes from the peer to the endpoint; `egress`: the other way.
        #[arg(long, value_enum, default_value = "ingress")]
        direction: TraceDirection,
        /// Namespace of endpoints named without one.
        #[arg(short = 'n', long)]
        namespace: Option<String>,
        /// The packet's source port (TCP, UDP, SCTP).
        #[arg(long, default_value_t = 40000)]
        source_port: u16,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TraceDirection {
    Ingress,
    Egress,
}

pub async fn run(config: Option<&Path>, cmd: PolicyCommand) -> Result<ExitCode> {
    let PolicyCommand::Trace {
        endpoint,
        peer,
        traffic,
        direction,
        namespace,
        source_port,
    } = cmd;
    let store = connect(config).await?;
    let mut resources = Vec::new();
    for kind in [
        Kind::WorkloadEndpoint,
        Kind::HostEndpoint,
        Kind::NetworkSet,
        Kind::GlobalNetworkSet,
        Kind::Tier,
        Kind::Profile,
        Kind::NetworkPolicy,
        Kind::GlobalNetworkPolicy,
    ] {
        resources.extend(store.list(kind, None).await?.0);
    }
    let world = World::from_resources(&resources).map_err(|e| anyhow!("{e}"))?;
    let traffic = Traffic::parse(&traffic)?;
    let (id, local) = find_endpoint(&world, &endpoint, namespace.as_deref())?;
    let peer_ip: Option<IpAddr> = peer.parse().ok();
    let (local_ip, peer_ip) = match peer_ip {
        Some(ip) => (address_of(&world, &id, ip.is_ipv4())?, ip),
        None => {
            let (peer_id, _) = find_endpoint(&world, &peer, namespace.as_deref())?;
            let local_v4 = world.endpoints[&id].addresses.iter().find(|a| a.is_ipv4());
            let v4 = local_v4.is_some()
                && world.endpoints[&peer_id]
                    .addresses
                    .iter()
                    .any(IpAddr::is_ipv4);
            (
                address_of(&world, &id, v4)?,
                address_of(&world, &peer_id, v4)?,
            )
        }
    };
    let (direction, src, dst) = match direction {
        TraceDirection::Ingress => (Direction::Ingress, peer_ip, local_ip),
        TraceDirection::Egress => (Direction::Egress, local_ip, peer_ip),
    };
    let packet = traffic.packet(src, dst, source_port)?;
    let program = world.program(&id, direction);
    let verdict = evaluate(&world, &program, &packet);

    println!(
        "{} {} ({local_ip}), {}: {}",
        local,
        shown(&id),
        match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        },
        traffic.describe(&packet)
    );
    let decided_by = match &verdict {
        Verdict::Allow(r) | Verdict::Deny(r) => r.clone(),
    };
    if program.tiers.is_empty() && program.profiles.is_empty() {
        println!("no policy or profile applies");
    }
    for tier in &program.tiers {
        println!(
            "tier {} (default action {:?} when its policies select but do not decide)",
            tier.name, tier.default_action
        );
        for (i, policy) in tier.policies.iter().enumerate() {
            let mark = match &decided_by {
                RuleRef::Rule {
                    tier: Some(t),
                    policy: p,
                    index,
                } if *t == tier.name && *p == policy.name => format!("  ← rule {index} decides"),
                _ => String::new(),
            };
            println!(
                "  {}. {} ({} rule(s)){mark}",
                i + 1,
                policy.name,
                policy.rules.len()
            );
        }
    }
    if !program.profiles.is_empty() {
        println!("profiles (when no tier decides):");
        for (name, rules) in &program.profiles {
            let mark = match &decided_by {
                RuleRef::Rule {
                    tier: None,
                    policy,
                    index,
                } if policy == name => format!("  ← rule {index} decides"),
                _ => String::new(),
            };
            println!("  {name} ({} rule(s)){mark}", rules.len());
        }
    }
    let (word, why) = match &verdict {
        Verdict::Allow(r) => ("ALLOW", r),
        Verdict::Deny(r) => ("DENY", r),
    };
    let because = match why {
        RuleRef::Rule {
            tier: Some(tier),
            policy,
            index,
        } => format!("rule {index} of policy {policy} in tier {tier}"),
        RuleRef::Rule {
            tier: None,
            policy,
            index,
        } => format!("rule {index} of profile {policy}"),
        RuleRef::EndOfTier(tier) => {
            format!("end of tier {tier}: its policies select the endpoint but none decides")
        }
        RuleRef::NoMatch => "no rule matches (nothing applies, or no profile rule matches)".into(),
    };
    println!("verdict: {word} by {because}");
    Ok(ExitCode::SUCCESS)
}

fn shown(id: &EndpointId) -> String {
    match &id.namespace {
        Some(ns) => format!("{ns}/{}", id.name),
        None => id.name.clone(),
    }
}

/// The endpoint called `text` (`namespace/name`, or `name` in `namespace`, or a HostEndpoint's
/// name), and what it is.
fn find_endpoint(
    world: &World,
    text: &str,
    namespace: Option<&str>,
) -> Result<(EndpointId, &'static str)> {
    let (ns, name) = match text.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (namespace, text),
    };
    let found: Vec<&EndpointId> = world
        .endpoints
        .keys()
        .filter(|id| id.name == name && ns.is_none_or(|ns| id.namespace.as_deref() == Some(ns)))
        .collect();
    match found.as_slice() {
        [one] => {
            let what = if one.namespace.is_some() {
                "WorkloadEndpoint"
            } else {
                "HostEndpoint"
            };
            Ok(((*one).clone(), what))
        }
        [] => {
            bail!("no endpoint `{text}` in the datastore (WorkloadEndpoints are `namespace/name`)")
        }
        many => bail!(
            "`{text}` names {} endpoints ({}); give its namespace",
            many.len(),
            many.iter()
                .map(|id| shown(id))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// An address of endpoint `id` of the family asked for.
fn address_of(world: &World, id: &EndpointId, v4: bool) -> Result<IpAddr> {
    world.endpoints[id]
        .addresses
        .iter()
        .copied()
        .find(|a| a.is_ipv4() == v4)
        .with_context(|| {
            format!(
                "endpoint {} has no IPv{} address",
                shown(id),
                if v4 { 4 } else { 6 }
            )
        })
}

/// The protocol part of a trace: `tcp/80`, `icmp/8/0`, `47`.
struct Traffic {
    /// As written (for messages).
    name: String,
    /// Resolved by the model's protocol names, as policy rules resolve theirs.
    protocol: Protocol,
    port: u16,
    icmp: Option<(u8, u8)>,
}

impl Traffic {
    fn parse(text: &str) -> Result<Self> {
        let mut parts = text.split('/');
        let name = parts.next().unwrap_or_default().to_owned();
        let rest: Vec<&str> = parts.collect();
        let number = |what: &str, s: &str| -> Result<u16> {
            s.parse()
                .map_err(|_| anyhow!("`{text}`: {what} `{s}` is not a number"))
        };
        let byte = |what: &str, s: &str| -> Result<u8> {
            s.parse()
                .map_err(|_| anyhow!("`{text}`: {what} `{s}` is not 0-255"))
        };
        let protocol = match name.parse::<i64>() {
            Ok(n) => Protocol::Number(n),
            Err(_) => Protocol::Name(name.clone()),
        };
        let Some(number_of) = protocol.number() else {
            bail!(
                "`{text}`: `{name}` is not a protocol name ({}) or number 1-255",
                Protocol::NAMES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let mut traffic = Traffic {
            name,
            protocol,
            port: 0,
            icmp: None,
        };
        match rest.as_slice() {
            [port] if traffic.protocol.has_ports() => traffic.port = number("port", port)?,
            _ if traffic.protocol.has_ports() => {
                bail!(
                    "`{text}`: give the destination port, e.g. {}/80",
                    traffic.name
                )
            }
            [] if traffic.protocol.is_icmp() => {
                traffic.icmp = Some((if number_of == 1 { 8 } else { 128 }, 0))
            }
            [t] if traffic.protocol.is_icmp() => traffic.icmp = Some((byte("type", t)?, 0)),
            [t, c] if traffic.protocol.is_icmp() => {
                traffic.icmp = Some((byte("type", t)?, byte("code", c)?))
            }
            [] => {}
            _ => bail!("`{text}` is not PROTOCOL/PORT, icmp[/TYPE[/CODE]] or a protocol number"),
        }
        Ok(traffic)
    }

    fn packet(&self, src: IpAddr, dst: IpAddr, source_port: u16) -> Result<Packet> {
        let protocol = self.protocol.number().expect("checked when parsed");
        if (protocol == 1 && !src.is_ipv4()) || (protocol == 58 && src.is_ipv4()) {
            bail!(
                "{} does not go between IPv{} addresses",
                self.name,
                if src.is_ipv4() { 4 } else { 6 }
            );
        }
        let ports = self.protocol.has_ports();
        Ok(Packet {
            src,
            dst,
            protocol,
            src_port: if ports { source_port } else { 0 },
            dst_port: if ports { self.port } else { 0 },
            icmp: self.icmp,
        })
    }

    fn describe(&self, p: &Packet) -> String {
        match p.icmp {
            Some((t, c)) => format!(
                "{} type {t} code {c} {} → {}",
                self.name.to_uppercase(),
                p.src,
                p.dst
            ),
            None if p.dst_port != 0 => format!(
                "{} {}:{} → {}:{}",
                self.name.to_uppercase(),
                p.src,
                p.src_port,
                p.dst,
                p.dst_port
            ),
            None => format!("protocol {} {} → {}", p.protocol, p.src, p.dst),
        }
    }
}
