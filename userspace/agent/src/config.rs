//! The agent's configuration: flags and environment (upstream's variable names) first, then
//! the FelixConfiguration resources (`default`, then `node.<name>`) for what they set.

use std::path::PathBuf;

use calico_model::spec::{FelixConfigurationSpec, ProtoPort};

/// Flags and environment.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "calico-node",
    version,
    about = "The calico node agent: watches the datastore and programs this host's eBPF dataplane and routes.",
    after_help = "The datastore is configured as for calicoctl: ETCD_ENDPOINTS, ETCD_CA_CERT_FILE, \
ETCD_CERT_FILE, ETCD_KEY_FILE, ETCD_USERNAME, ETCD_PASSWORD.\n\nExample:\n  \
ETCD_ENDPOINTS=http://127.0.0.1:2379 NODENAME=node1 calico-node --ip 192.0.2.10/24"
)]
pub struct Flags {
    /// This node's name (upstream: NODENAME, or FELIX_FELIXHOSTNAME; default: the hostname).
    #[arg(long, env = "NODENAME")]
    pub nodename: Option<String>,
    /// The node's IPv4 address (and subnet) registered in its Node resource for BGP.
    #[arg(long, env = "IP")]
    pub ip: Option<String>,
    /// The node's IPv6 address (and subnet), registered for BGP (`spec.bgp.ipv6Address`): its
    /// IPv6 sessions go from it.
    #[arg(long, env = "IP6")]
    pub ip6: Option<String>,
    /// The node's AS number registered in its Node resource.
    #[arg(long, env = "AS")]
    pub as_number: Option<u32>,
    /// Log level: trace, debug, info, warning, error.
    #[arg(long, env = "FELIX_LOGSEVERITYSCREEN", default_value = "info")]
    pub log_level: String,
    /// bpffs directory for pinned maps and attachments.
    #[arg(long, env = "FELIX_BPFPINPATH", default_value = "/sys/fs/bpf/calico")]
    pub bpf_pin_path: PathBuf,
    /// eBPF program logging: off or debug (program log lines reach this agent's log).
    #[arg(long, env = "FELIX_BPFLOGLEVEL", default_value = "off")]
    pub bpf_log_level: String,
    /// Address the health and metrics endpoints listen on.
    #[arg(long, env = "FELIX_HEALTHHOST", default_value = "127.0.0.1")]
    pub health_host: String,
    /// Port of /liveness, /readiness (and /metrics).
    #[arg(long, env = "FELIX_HEALTHPORT", default_value_t = 9099)]
    pub health_port: u16,
    /// Port of Prometheus /metrics (0: only on the health port).
    #[arg(long, env = "FELIX_PROMETHEUSMETRICSPORT", default_value_t = 9091)]
    pub metrics_port: u16,
    /// Interface name prefix of workload veths.
    #[arg(long, env = "FELIX_INTERFACEPREFIX", default_value = "cali")]
    pub interface_prefix: String,
    /// Routing between hosts: `bird` (BIRD 2, driven from the datastore) or `none`.
    #[arg(long, env = "CALICO_NETWORKING_BACKEND", default_value = "bird")]
    pub networking_backend: String,
    /// Where BIRD's configuration (bird.cfg), control socket (bird.ctl) and pid file live.
    #[arg(long, env = "CALICO_BIRD_DIR", default_value = "/var/run/calico")]
    pub bird_dir: PathBuf,
    /// Where the MTU workloads should use is written (the overlay device's, when VXLAN is on):
    /// the CNI plugin reads it when its configuration sets no `mtu`, as upstream's does.
    #[arg(long, env = "FELIX_MTUFILEPATH", default_value = "/var/lib/calico/mtu")]
    pub mtu_file: PathBuf,
    /// Also serve Docker's remote network and IPAM driver (as `calico-libnetwork` does).
    #[arg(long, env = "CALICO_LIBNETWORK_ENABLED")]
    pub libnetwork: bool,
    /// Docker's plugin directory, for --libnetwork.
    #[arg(
        long,
        env = "CALICO_LIBNETWORK_PLUGIN_DIR",
        default_value = "/run/docker/plugins"
    )]
    pub libnetwork_plugin_dir: PathBuf,
    /// How often routes, blackholes and conntrack are reconciled in full, in seconds.
    #[arg(long, env = "FELIX_ROUTEREFRESHINTERVAL", default_value_t = 10)]
    pub refresh_interval: u64,
}

/// A protocol and port the host must always accept (inbound) or reach (outbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Failsafe {
    pub protocol: u8,
    pub port: u16,
}

fn failsafes(list: &[(u8, u16)]) -> Vec<Failsafe> {
    list.iter()
        .map(|&(protocol, port)| Failsafe { protocol, port })
        .collect()
}

/// Upstream Felix's defaults (6 = TCP, 17 = UDP).
pub fn default_failsafe_inbound() -> Vec<Failsafe> {
    failsafes(&[
        (6, 22),
        (17, 68),
        (6, 179),
        (6, 2379),
        (6, 2380),
        (6, 5473),
        (6, 6443),
        (6, 6666),
        (6, 6667),
    ])
}

pub fn default_failsafe_outbound() -> Vec<Failsafe> {
    failsafes(&[
        (17, 53),
        (17, 67),
        (6, 179),
        (6, 2379),
        (6, 2380),
        (6, 5473),
        (6, 6443),
        (6, 6666),
        (6, 6667),
    ])
}

/// The largest map the settings may ask for (16 Mi entries).
const MAX_MAP_SIZE: u32 = 1 << 24;

/// What the FelixConfiguration resources decide at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FelixSettings {
    pub failsafe_inbound: Vec<Failsafe>,
    pub failsafe_outbound: Vec<Failsafe>,
    /// `bpfLogLevel: Debug` turns the programs' debug lines on; `None`: the flag decides.
    pub bpf_debug: Option<bool>,
    /// Map capacities set by `bpfMapSizeConntrack` and `bpfMapSizeIPSets` (the prefix map the
    /// selectors' IP sets go into); they take effect when the dataplane is loaded.
    pub map_sizes: Vec<(&'static str, u32)>,
    /// Flow logs, when `flowLogsFileEnabled`.
    pub flow_logs: Option<crate::flowlogs::FlowLogSettings>,
    /// `natOutgoingAddress`: what natOutgoing SNATs to instead of the interface's address.
    pub nat_outgoing_address: Option<std::net::Ipv4Addr>,
    /// `vxlanMTU`: the VXLAN device's MTU (else the underlay's less the overhead).
    pub vxlan_mtu: Option<u32>,
}

impl Default for FelixSettings {
    fn default() -> Self {
        Self {
            failsafe_inbound: default_failsafe_inbound(),
            failsafe_outbound: default_failsafe_outbound(),
            bpf_debug: None,
            map_sizes: Vec::new(),
            flow_logs: None,
            nat_outgoing_address: None,
            vxlan_mtu: None,
        }
    }
}

fn failsafe(list: &[ProtoPort], field: &str) -> Result<Vec<Failsafe>, String> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let protocol = match p.protocol.to_ascii_lowercase().as_str() {
                "tcp" => 6,
                "udp" => 17,
                "sctp" => 132,
                other => {
                    return Err(format!(
                        "{field}[{i}].protocol: `{other}` is not tcp, udp or sctp"
                    ))
                }
            };
            let port = u16::try_from(p.port)
                .map_err(|_| format!("{field}[{i}].port: {} is not a port", p.port))?;
            Ok(Failsafe { protocol, port })
        })
        .collect()
}

impl FelixSettings {
    /// Settings from the cluster-wide (`default`) and this node's (`node.<name>`)
    /// FelixConfiguration; the node's fields win where set.
    pub fn resolve(
        global: Option<&FelixConfigurationSpec>,
        node: Option<&FelixConfigurationSpec>,
    ) -> Result<Self, String> {
        let mut out = Self::default();
        let (mut flow_logs, mut flush, mut directory) = (None, None, None);
        for spec in [global, node].into_iter().flatten() {
            flow_logs = spec.flow_logs_file_enabled.or(flow_logs);
            if let Some(interval) = &spec.flow_logs_flush_interval {
                flush = Some(
                    calico_model::parse_go_duration(interval)
                        .map_err(|e| format!("spec.flowLogsFlushInterval: {e}"))?,
                );
            }
            directory = spec.flow_logs_file_directory.clone().or(directory);
            if let Some(mtu) = spec.vxlan_mtu {
                out.vxlan_mtu = Some(
                    u32::try_from(mtu)
                        .ok()
                        .filter(|m| (68..=65535).contains(m))
                        .ok_or_else(|| format!("spec.vxlanMTU: {mtu} is not an MTU"))?,
                );
            }
            if let Some(a) = spec
                .nat_outgoing_address
                .as_deref()
                .filter(|a| !a.is_empty())
            {
                out.nat_outgoing_address = Some(a.parse().map_err(|_| {
                    format!("spec.natOutgoingAddress: `{a}` is not an IPv4 address")
                })?);
            }
            if let Some(l) = &spec.failsafe_inbound_host_ports {
                out.failsafe_inbound = failsafe(l, "spec.failsafeInboundHostPorts")?;
            }
            if let Some(l) = &spec.failsafe_outbound_host_ports {
                out.failsafe_outbound = failsafe(l, "spec.failsafeOutboundHostPorts")?;
            }
            for (field, value, map) in [
                (
                    "spec.bpfMapSizeConntrack",
                    spec.bpf_map_size_conntrack,
                    calico_bpf_common::CONNTRACK_MAP,
                ),
                (
                    "spec.bpfMapSizeIPSets",
                    spec.bpf_map_size_ip_sets,
                    calico_bpf_common::POLICY_IP_SETS_MAP,
                ),
            ] {
                let Some(value) = value else { continue };
                let size = u32::try_from(value)
                    .ok()
                    .filter(|s| (1..=MAX_MAP_SIZE).contains(s))
                    .ok_or_else(|| {
                        format!("{field}: {value} is not between 1 and {MAX_MAP_SIZE}")
                    })?;
                out.map_sizes.retain(|(m, _)| *m != map);
                out.map_sizes.push((map, size));
            }
            if let Some(level) = &spec.bpf_log_level {
                out.bpf_debug = match level.to_ascii_lowercase().as_str() {
                    "debug" => Some(true),
                    "off" | "info" | "" => Some(false),
                    other => {
                        return Err(format!(
                            "spec.bpfLogLevel: `{other}` is not Off, Info or Debug"
                        ))
                    }
                };
            }
        }
        if flow_logs == Some(true) {
            out.flow_logs = Some(crate::flowlogs::FlowLogSettings {
                directory: directory
                    .unwrap_or_else(|| crate::flowlogs::DEFAULT_DIRECTORY.into())
                    .into(),
                flush_interval: flush
                    .filter(|d| !d.is_zero())
                    .unwrap_or(crate::flowlogs::DEFAULT_FLUSH_INTERVAL),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use calico_bpf_common::{CONNTRACK_MAP, POLICY_IP_SETS_MAP};

    use super::*;

    #[test]
    fn map_sizes_follow_felix_configuration() {
        let global = FelixConfigurationSpec {
            bpf_map_size_conntrack: Some(1_048_576),
            bpf_map_size_ip_sets: Some(500_000),
            ..Default::default()
        };
        let node = FelixConfigurationSpec {
            bpf_map_size_conntrack: Some(2_000_000),
            ..Default::default()
        };
        let s = FelixSettings::resolve(Some(&global), Some(&node)).unwrap();
        assert_eq!(
            s.map_sizes,
            [(POLICY_IP_SETS_MAP, 500_000), (CONNTRACK_MAP, 2_000_000)]
        );
        for bad in [0, 99_999_999_999] {
            let spec = FelixConfigurationSpec {
                bpf_map_size_conntrack: Some(bad),
                ..Default::default()
            };
            let e = FelixSettings::resolve(Some(&spec), None).unwrap_err();
            assert!(e.contains("spec.bpfMapSizeConntrack"), "{bad}: {e}");
        }
    }

    #[test]
    fn flow_logs_follow_felix_configuration() {
        let on = FelixConfigurationSpec {
            flow_logs_file_enabled: Some(true),
            flow_logs_flush_interval: Some("15s".into()),
            ..Default::default()
        };
        let s = FelixSettings::resolve(Some(&on), None).unwrap();
        let f = s.flow_logs.expect("enabled");
        assert_eq!(f.flush_interval, std::time::Duration::from_secs(15));
        assert_eq!(
            f.directory,
            std::path::Path::new("/var/log/calico/flowlogs")
        );
        // The node's resource turns them off again, and a bad interval names the field.
        let off = FelixConfigurationSpec {
            flow_logs_file_enabled: Some(false),
            ..Default::default()
        };
        assert_eq!(
            FelixSettings::resolve(Some(&on), Some(&off))
                .unwrap()
                .flow_logs,
            None
        );
        assert_eq!(FelixSettings::resolve(None, None).unwrap().flow_logs, None);
        let bad = FelixConfigurationSpec {
            flow_logs_flush_interval: Some("soon".into()),
            ..Default::default()
        };
        let e = FelixSettings::resolve(Some(&bad), None).unwrap_err();
        assert!(e.contains("spec.flowLogsFlushInterval"), "{e}");
    }
}
