//! BIRD 2 configuration for one node, rendered from Calico's resources as stored: the node's
//! own address and AS, the full iBGP mesh (unless BGPConfiguration turns it off), BGPPeers
//! (global, per node, by node selector, to an address or to the nodes a peer selector picks),
//! route reflection (`routeReflectorClusterID`), and export of this node's IPAM blocks that lie
//! in enabled pools (as blackhole statics) plus, on route reflectors, learned pool routes.
//! Learned BGP routes go into the kernel; the node's blocks are blackholed by the agent.
//!
//! Pure: the same inputs give byte-identical output, so the caller rewrites the file and
//! reloads BIRD only when something changed.

use std::{collections::BTreeMap, fmt::Write, net::IpAddr};

use calico_model::{
    spec::{BgpConfigurationSpec, BgpPeerSpec, NodeSpec},
    Object, Resource,
};
use calico_selector::Selector;
use ipnet::IpNet;

/// Upstream's default AS number.
pub const DEFAULT_AS: u32 = 64512;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BgpError {
    #[error(
        "node {node} has no spec.bgp.ipv4Address: BIRD needs it as router id and session source"
    )]
    NoAddress { node: String },
    #[error("{what}: `{value}` is not {expected}")]
    Invalid {
        what: String,
        value: String,
        expected: &'static str,
    },
}

/// One node as BGP sees it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ipv4: Option<IpAddr>,
    /// The subnet of the node's address, when given (`192.0.2.10/24`).
    pub subnet: Option<IpNet>,
    /// `spec.bgp.ipv6Address`: the node's IPv6 sessions go from and to it.
    pub ipv6: Option<IpAddr>,
    pub subnet6: Option<IpNet>,
    pub asn: Option<u32>,
    pub rr_cluster_id: Option<String>,
}

/// Everything rendering looks at.
#[derive(Debug, Clone, Default)]
pub struct BgpInputs {
    pub nodes: Vec<NodeInfo>,
    /// The `default` BGPConfiguration.
    pub config: BgpConfigurationSpec,
    pub peers: Vec<(String, BgpPeerSpec)>,
    /// (CIDR, disabled, disableBGPExport).
    pub pools: Vec<(IpNet, bool, bool)>,
    /// This node's IPAM blocks.
    pub blocks: Vec<IpNet>,
    /// Contents of the password files BGPPeers name (read by the caller).
    pub passwords: BTreeMap<String, String>,
}

impl BgpInputs {
    /// Collects the inputs from resources (other kinds are ignored).
    pub fn from_resources(resources: &[Resource], blocks: Vec<IpNet>) -> Result<Self, BgpError> {
        let mut out = BgpInputs {
            blocks,
            ..Default::default()
        };
        for r in resources {
            match r {
                Resource::Node(n) => out.nodes.push(node_info(n)?),
                Resource::BGPConfiguration(c) if c.metadata.name == "default" => {
                    out.config = c.spec.clone()
                }
                Resource::BGPPeer(p) => out.peers.push((p.metadata.name.clone(), p.spec.clone())),
                Resource::IPPool(p) => {
                    let cidr: IpNet = p.spec.cidr.parse().map_err(|_| BgpError::Invalid {
                        what: format!("IPPool {} spec.cidr", p.metadata.name),
                        value: p.spec.cidr.clone(),
                        expected: "a CIDR",
                    })?;
                    out.pools.push((
                        cidr.trunc(),
                        p.spec.disabled.unwrap_or(false),
                        p.spec.disable_bgp_export.unwrap_or(false),
                    ));
                }
                _ => {}
            }
        }
        out.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        out.peers.sort_by(|a, b| a.0.cmp(&b.0));
        out.pools.sort();
        out.blocks.sort();
        Ok(out)
    }
}

fn node_info(n: &Object<NodeSpec, calico_model::spec::NodeStatus>) -> Result<NodeInfo, BgpError> {
    let bgp = n.spec.bgp.clone().unwrap_or_default();
    let address = |field: &str, value: &Option<String>, expected: &'static str| match value {
        None => Ok((None, None)),
        Some(a) => match a.parse::<IpNet>() {
            Ok(net) => Ok((Some(net.addr()), Some(net.trunc()))),
            Err(_) => Ok((
                Some(a.parse::<IpAddr>().map_err(|_| BgpError::Invalid {
                    what: format!("Node {} spec.bgp.{field}", n.metadata.name),
                    value: a.clone(),
                    expected,
                })?),
                None,
            )),
        },
    };
    let (ipv4, subnet) = address(
        "ipv4Address",
        &bgp.ipv4_address,
        "an IPv4 address or address/prefix",
    )?;
    let (ipv6, subnet6) = address(
        "ipv6Address",
        &bgp.ipv6_address,
        "an IPv6 address or address/prefix",
    )?;
    Ok(NodeInfo {
        name: n.metadata.name.clone(),
        labels: n.metadata.labels.clone(),
        ipv4,
        subnet,
        ipv6,
        subnet6,
        asn: bgp.as_number.map(|a| a.0),
        rr_cluster_id: bgp.route_reflector_cluster_id,
    })
}

/// A BGP session this node should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// `Mesh_…`, `Node_…` or `Global_…` (what `calicoctl node status` shows).
    pub name: String,
    pub address: IpAddr,
    pub port: Option<u16>,
    pub asn: u32,
    pub password_file: Option<String>,
    /// This node reflects routes to that peer.
    pub rr_client: bool,
}

fn ident(ip: &IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "_")
}

fn selects(
    selector: &Option<String>,
    labels: &BTreeMap<String, String>,
    what: &str,
) -> Result<bool, BgpError> {
    match selector {
        None => Ok(true),
        Some(s) => Selector::parse(s)
            .map(|sel| sel.matches(labels))
            .map_err(|e| BgpError::Invalid {
                what: what.to_owned(),
                value: format!("{s} ({e})"),
                expected: "a selector",
            }),
    }
}

/// The sessions of node `me`, in a stable order, one per peer address.
pub fn sessions(inputs: &BgpInputs, me: &NodeInfo) -> Result<Vec<Session>, BgpError> {
    let default_as = inputs.config.as_number.map_or(DEFAULT_AS, |a| a.0);
    let node_as = |n: &NodeInfo| n.asn.unwrap_or(default_as);
    // Reflection is for iBGP only: a client has our AS and is not in our cluster.
    let rr_client = |peer: &NodeInfo| {
        me.rr_cluster_id.is_some()
            && peer.rr_cluster_id != me.rr_cluster_id
            && node_as(peer) == node_as(me)
    };
    let mut out: Vec<Session> = Vec::new();
    let mut add = |s: Session| {
        // An IPv6 session needs an IPv6 address of this node to go from.
        let own = if s.address.is_ipv4() {
            me.ipv4
        } else {
            me.ipv6
        };
        if own.is_some() && Some(s.address) != own && !out.iter().any(|o| o.address == s.address) {
            out.push(s);
        }
    };
    if inputs.config.node_to_node_mesh_enabled.unwrap_or(true) {
        for n in inputs.nodes.iter().filter(|n| n.name != me.name) {
            // One session per address family both nodes have.
            for ip in [n.ipv4, n.ipv6].into_iter().flatten() {
                add(Session {
                    name: format!("Mesh_{}", ident(&ip)),
                    address: ip,
                    port: None,
                    asn: node_as(n),
                    password_file: None,
                    rr_client: rr_client(n),
                });
            }
        }
    }
    for (name, p) in &inputs.peers {
        let applies = match (&p.node, &p.node_selector) {
            (Some(node), _) => *node == me.name,
            (None, sel) => selects(
                sel,
                &me.labels,
                &format!("BGPPeer {name} spec.nodeSelector"),
            )?,
        };
        if !applies {
            continue;
        }
        let kind = if p.node.is_some() || p.node_selector.is_some() {
            "Node"
        } else {
            "Global"
        };
        let password_file = p.password.as_ref().and_then(|pw| pw.file.clone());
        if let Some(peer_ip) = &p.peer_ip {
            let (ip, port) = parse_peer_ip(peer_ip).ok_or_else(|| BgpError::Invalid {
                what: format!("BGPPeer {name} spec.peerIP"),
                value: peer_ip.clone(),
                expected: "an IP address (optionally with :port)",
            })?;
            add(Session {
                name: format!("{kind}_{}", ident(&ip)),
                address: ip,
                port,
                asn: p.as_number.map_or(default_as, |a| a.0),
                password_file: password_file.clone(),
                rr_client: false,
            });
        }
        if p.peer_selector.is_some() {
            for n in inputs.nodes.iter().filter(|n| n.name != me.name) {
                if !selects(
                    &p.peer_selector,
                    &n.labels,
                    &format!("BGPPeer {name} spec.peerSelector"),
                )? {
                    continue;
                }
                for ip in [n.ipv4, n.ipv6].into_iter().flatten() {
                    add(Session {
                        name: format!("Node_{}", ident(&ip)),
                        address: ip,
                        port: None,
                        asn: node_as(n),
                        password_file: password_file.clone(),
                        rr_client: rr_client(n),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// `10.0.0.1`, `10.0.0.1:1790`, `fd00::1`, `[fd00::1]:1790`.
fn parse_peer_ip(s: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(ip) = s.parse() {
        return Some((ip, None));
    }
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host.parse().ok()?, Some(port.parse().ok()?)))
}

fn log_classes(severity: Option<&str>) -> &'static str {
    match severity.map(str::to_ascii_lowercase).as_deref() {
        Some("debug") => "all",
        Some("warning") => "{ warning, error, fatal, bug }",
        Some("error") | Some("fatal") => "{ error, fatal, bug }",
        Some("none") => "{ fatal, bug }",
        _ => "{ info, remote, warning, error, auth, fatal, bug }",
    }
}

/// The whole BIRD 2 configuration of node `node`.
pub fn render(inputs: &BgpInputs, node: &str) -> Result<String, BgpError> {
    let me = inputs
        .nodes
        .iter()
        .find(|n| n.name == node)
        .ok_or_else(|| BgpError::NoAddress {
            node: node.to_owned(),
        })?;
    let Some(IpAddr::V4(router_id)) = me.ipv4 else {
        return Err(BgpError::NoAddress {
            node: node.to_owned(),
        });
    };
    let default_as = inputs.config.as_number.map_or(DEFAULT_AS, |a| a.0);
    let my_as = me.asn.unwrap_or(default_as);
    // IPv6: only with an IPv6 address of this node to hold sessions from.
    let v6 = me.ipv6.is_some();
    // Per family: the enabled pools exporting their blocks, and this node's blocks in them.
    let enabled_of = |ipv4: bool| -> Vec<IpNet> {
        inputs
            .pools
            .iter()
            .filter(|(c, disabled, no_export)| {
                !disabled && !no_export && c.addr().is_ipv4() == ipv4 && (ipv4 || v6)
            })
            .map(|(c, _, _)| *c)
            .collect()
    };
    let (enabled, enabled6) = (enabled_of(true), enabled_of(false));
    let exported_of = |pools: &[IpNet]| -> Vec<IpNet> {
        inputs
            .blocks
            .iter()
            .filter(|b| pools.iter().any(|p| p.contains(*b)))
            .copied()
            .collect()
    };
    // Service ranges every node advertises (BGPConfiguration serviceClusterIPs and
    // serviceExternalIPs), so traffic for services reaches some node.
    let services = inputs
        .config
        .service_cluster_ips
        .iter()
        .chain(&inputs.config.service_external_ips)
        .map(|block| {
            block
                .cidr
                .parse::<IpNet>()
                .map(|n| n.trunc())
                .map_err(|_| BgpError::Invalid {
                    what: "BGPConfiguration default spec.serviceClusterIPs/serviceExternalIPs"
                        .into(),
                    value: block.cidr.clone(),
                    expected: "a CIDR",
                })
        })
        .collect::<Result<Vec<IpNet>, _>>()?;

    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Generated by calico-node for node {node} from the datastore; edits are overwritten."
    );
    let _ = writeln!(
        c,
        "log stderr {};",
        log_classes(inputs.config.log_severity_screen.as_deref())
    );
    let _ = writeln!(c, "router id {router_id};");
    let _ = writeln!(c, "protocol device {{ scan time 10; }}");
    // Connected routes (not the workloads' veths) resolve next hops of multihop sessions.
    let _ = writeln!(
        c,
        "protocol direct {{ ipv4;{} interface -\"cali*\", \"*\"; }}",
        if v6 { " ipv6;" } else { "" }
    );
    // Per family: learned BGP routes into the kernel, and this node's blocks and the service
    // ranges as blackhole statics for export.
    let families = [("", "ipv4", &enabled), ("6", "ipv6", &enabled6)];
    let families = &families[..if v6 { 2 } else { 1 }];
    for (suffix, channel, _) in families {
        let name = if suffix.is_empty() {
            String::new()
        } else {
            format!(" kernel{suffix}")
        };
        let _ = writeln!(c, "protocol kernel{name} {{\n  {channel} {{ import none; export where source = RTS_BGP; }};\n  scan time 10;\n  graceful restart;\n}}");
    }
    for (suffix, channel, pools) in families {
        let ipv4 = suffix.is_empty();
        let _ = writeln!(c, "protocol static calico_blocks{suffix} {{\n  {channel};");
        let routes = exported_of(pools).into_iter().chain(
            services
                .iter()
                .copied()
                .filter(|n| n.addr().is_ipv4() == ipv4),
        );
        for route in routes {
            let _ = writeln!(c, "  route {route} blackhole;");
        }
        let _ = writeln!(c, "}}");
    }
    // What goes out: this node's blocks, and on route reflectors the pool routes learned.
    let _ = write!(
        c,
        "filter calico_export {{\n  if proto = \"calico_blocks\"{} then accept;\n",
        if v6 {
            " || proto = \"calico_blocks6\""
        } else {
            ""
        }
    );
    for pools in [&enabled, &enabled6] {
        if me.rr_cluster_id.is_some() && !pools.is_empty() {
            let set: Vec<String> = pools.iter().map(|p| format!("{p}+")).collect();
            let _ = writeln!(
                c,
                "  if source = RTS_BGP && net ~ [ {} ] then accept;",
                set.join(", ")
            );
        }
    }
    let _ = writeln!(c, "  reject;\n}}");
    let listen = inputs
        .config
        .listen_port
        .map(|p| format!(" port {p}"))
        .unwrap_or_default();
    for s in sessions(inputs, me)? {
        let (local, subnet, family) = match (s.address, me.ipv6) {
            (IpAddr::V6(_), Some(own)) => (own, me.subnet6, "ipv6"),
            _ => (IpAddr::V4(router_id), me.subnet, "ipv4"),
        };
        let _ = writeln!(c, "protocol bgp {} {{", s.name);
        let _ = writeln!(c, "  local {local}{listen} as {my_as};");
        let port = s.port.map(|p| format!(" port {p}")).unwrap_or_default();
        let _ = writeln!(c, "  neighbor {}{port} as {};", s.address, s.asn);
        let same_subnet = subnet.is_some_and(|n| n.contains(&s.address));
        let _ = writeln!(c, "  {};", if same_subnet { "direct" } else { "multihop" });
        if s.rr_client {
            let _ = writeln!(
                c,
                "  rr client;\n  rr cluster id {};",
                me.rr_cluster_id.as_deref().unwrap_or_default()
            );
        }
        if let Some(f) = &s.password_file {
            let password = inputs.passwords.get(f).ok_or_else(|| BgpError::Invalid {
                what: format!("the password of BGP session {}", s.name),
                value: f.clone(),
                expected: "a readable file",
            })?;
            let password = password.trim_end_matches('\n');
            if password.contains(['"', '\n', '\\']) {
                return Err(BgpError::Invalid {
                    what: format!("the password of BGP session {} (file {f})", s.name),
                    value: "(not shown)".into(),
                    expected: "one line without quotes or backslashes (BIRD cannot read those)",
                });
            }
            let escaped = password;
            let _ = writeln!(c, "  password \"{escaped}\";");
        }
        let _ = writeln!(
            c,
            "  graceful restart;\n  connect retry time 5;\n  error wait time 5, 30;"
        );
        let _ = writeln!(
            c,
            "  {family} {{ import all; export filter calico_export; next hop self; }};\n}}"
        );
    }
    Ok(c)
}
