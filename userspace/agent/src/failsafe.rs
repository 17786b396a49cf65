//! Failsafe ports: whatever policy says, a host endpoint always accepts the inbound ports and
//! reaches the outbound ports that keep the node manageable (ssh, BGP, etcd, the API server),
//! so no policy can lock the host out. Expressed as a first tier whose rules allow those ports
//! and which passes everything else on to the real tiers.

use calico_model::{
    spec::{Action, EntityRule, Rule, TierDefaultAction},
    Port, Protocol,
};
use calico_policy::{Direction, PolicyProgram, ProgramPolicy, ProgramTier};

use crate::config::{Failsafe, FelixSettings};

pub const FAILSAFE_TIER: &str = "failsafe";

/// `program` of a host endpoint with the failsafe tier in front.
pub fn with_failsafe(
    program: &PolicyProgram,
    direction: Direction,
    settings: &FelixSettings,
) -> PolicyProgram {
    let ports: &[Failsafe] = match direction {
        Direction::Ingress => &settings.failsafe_inbound,
        Direction::Egress => &settings.failsafe_outbound,
    };
    let rules = ports
        .iter()
        .map(|f| Rule {
            protocol: Some(Protocol::Number(i64::from(f.protocol))),
            destination: EntityRule {
                ports: vec![Port::Number(i64::from(f.port))],
                ..Default::default()
            },
            ..Rule::new(Action::Allow)
        })
        .collect();
    let mut out = program.clone();
    out.tiers.insert(
        0,
        ProgramTier {
            name: FAILSAFE_TIER.into(),
            default_action: TierDefaultAction::Pass,
            policies: vec![ProgramPolicy {
                name: FAILSAFE_TIER.into(),
                namespace: None,
                rules,
            }],
        },
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use calico_policy::{CompiledProgram, Packet, Verdict, World};

    fn packet(protocol: u8, dst_port: u16, ingress: bool) -> Packet {
        let (host, peer) = (
            "192.0.2.10".parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
        );
        let (src, dst) = if ingress { (peer, host) } else { (host, peer) };
        Packet {
            src,
            dst,
            protocol,
            src_port: 40000,
            dst_port,
            icmp: None,
        }
    }

    /// A deny-everything policy still lets ssh in and etcd out; other traffic is denied.
    #[test]
    fn failsafe_ports_survive_a_deny_all_policy() {
        let deny_all = PolicyProgram {
            tiers: vec![ProgramTier {
                name: "default".into(),
                default_action: TierDefaultAction::Deny,
                policies: vec![ProgramPolicy {
                    name: "deny-all".into(),
                    namespace: None,
                    rules: vec![Rule::new(Action::Deny)],
                }],
            }],
            profiles: vec![],
        };
        let settings = FelixSettings::default();
        let host = ["192.0.2.10".parse().unwrap()];
        let world = World::default();
        for (direction, ingress) in [(Direction::Ingress, true), (Direction::Egress, false)] {
            let program = with_failsafe(&deny_all, direction, &settings);
            let c = CompiledProgram::compile(&world, &program, &host, direction).unwrap();
            let allowed = |p: Packet| matches!(c.lookup(&p), Some(Verdict::Allow(_)));
            let open: &[(u8, u16)] = if ingress {
                &[(6, 22), (17, 68), (6, 179), (6, 2379), (6, 6443)]
            } else {
                &[(17, 53), (6, 2379), (6, 179)]
            };
            for &(proto, port) in open {
                assert!(
                    allowed(packet(proto, port, ingress)),
                    "{direction:?} {proto}/{port} must stay open"
                );
            }
            for (proto, port) in [(6, 80), (17, 22), (6, 2381)] {
                assert!(
                    !allowed(packet(proto, port, ingress)),
                    "{direction:?} {proto}/{port} must be denied"
                );
            }
        }
        // Without the failsafe tier, ssh is denied: the tier is what opens it.
        let c = CompiledProgram::compile(&world, &deny_all, &host, Direction::Ingress).unwrap();
        assert!(matches!(
            c.lookup(&packet(6, 22, true)),
            Some(Verdict::Deny(_))
        ));
    }

    /// Configured ports replace the defaults.
    #[test]
    fn configured_ports_replace_defaults() {
        let spec = calico_model::spec::FelixConfigurationSpec {
            failsafe_inbound_host_ports: Some(vec![calico_model::spec::ProtoPort {
                protocol: "TCP".into(),
                port: 2222,
                net: None,
            }]),
            ..Default::default()
        };
        let s = FelixSettings::resolve(Some(&spec), None).unwrap();
        assert_eq!(
            s.failsafe_inbound,
            vec![Failsafe {
                protocol: 6,
                port: 2222
            }]
        );
        assert_eq!(
            s.failsafe_outbound,
            crate::config::default_failsafe_outbound()
        );
        let bad = calico_model::spec::FelixConfigurationSpec {
            failsafe_outbound_host_ports: Some(vec![calico_model::spec::ProtoPort {
                protocol: "icmp".into(),
                port: 1,
                net: None,
            }]),
            ..Default::default()
        };
        let err = FelixSettings::resolve(None, Some(&bad)).unwrap_err();
        assert!(
            err.contains("spec.failsafeOutboundHostPorts[0].protocol"),
            "{err}"
        );
    }
}
