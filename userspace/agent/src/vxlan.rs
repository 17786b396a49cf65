//! The VXLAN overlay, for hosts that cannot peer over BGP (IPPool `vxlanMode: Always` or
//! `CrossSubnet`), as upstream's felix builds it: a `vxlan.calico` device (VNI 4096, UDP
//! 4789, learning off) holding this node's tunnel address, and for each remote node's block in
//! a VXLAN pool a route through the device to that node's tunnel address (on-link), with a
//! permanent ARP entry (tunnel address → the remote device's MAC) and a forwarding entry (that
//! MAC → the remote node's underlay address). Nothing is learnt on the wire and no BGP runs:
//! everything comes from the datastore. With `CrossSubnet` a node in this node's own subnet
//! is reached directly through the underlay, unencapsulated.
//!
//! This node's tunnel address comes from IPAM (handle `vxlan-tunnel-addr-<node>`, upstream's)
//! out of a VXLAN pool, and is recorded with the device's MAC on its Node
//! (`ipv4VXLANTunnelAddr`, `vxlanTunnelMACAddr`), where the other nodes read them.
//!
//! Remote blocks come from a watch on every node's block affinities, started only once a
//! VXLAN pool exists (a BGP-only cluster keeps watching just its own). The task runs off the
//! loop that applies policy, on every change and every refresh.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::Duration,
};

use calico_datastore::{keys, Datastore, EtcdConfig};
use calico_model::{spec::EncapsulationMode, Kind, Resource};
use ipnet::{IpNet, Ipv4Net};
use tokio::sync::watch;

use crate::netlink::{Netlink, RemoteRoute, VxlanDevice};

pub const DEVICE: &str = "vxlan.calico";
pub const VNI: u32 = 4096;
pub const PORT: u16 = 4789;
/// What VXLAN over IPv4 adds to a packet: outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14.
pub const OVERHEAD: u32 = 50;

/// A node as the overlay sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeTunnel {
    /// Its underlay address and subnet (the Node's `bgp.ipv4Address`).
    pub underlay: Option<Ipv4Net>,
    pub tunnel: Option<Ipv4Addr>,
    pub mac: Option<[u8; 6]>,
}

/// A pool as the overlay sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverlayPool {
    pub name: String,
    pub cidr: IpNet,
    pub mode: EncapsulationMode,
}

/// What the agent tells the overlay task.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VxlanInputs {
    /// Enabled pools, with their VXLAN mode.
    pub pools: Vec<OverlayPool>,
    pub nodes: BTreeMap<String, NodeTunnel>,
    /// FelixConfiguration `vxlanMTU`; else the underlay's MTU less [`OVERHEAD`].
    pub mtu: Option<u32>,
    /// Nothing is changed before the first complete snapshot.
    pub complete: bool,
}

impl VxlanInputs {
    /// Whether any (IPv4) pool asks for the overlay.
    pub fn enabled(&self) -> bool {
        self.pools
            .iter()
            .any(|p| p.mode != EncapsulationMode::Never && matches!(p.cidr, IpNet::V4(_)))
    }
}

/// How one remote block is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemotePath {
    /// Encapsulated to the remote node's tunnel address.
    Tunnel {
        tunnel: Ipv4Addr,
        mac: [u8; 6],
        underlay: Ipv4Addr,
    },
    /// Straight to the remote node (CrossSubnet, same subnet).
    Direct { via: Ipv4Addr },
}

/// Where each remote block in a VXLAN pool goes from node `me` (pure). Blocks of nodes whose
/// tunnel address, MAC or underlay address is not known yet are left out (they have no route
/// until the node has registered them); blocks in pools without VXLAN are BGP's.
pub fn plan(
    me: &str,
    inputs: &VxlanInputs,
    blocks: &BTreeMap<String, BTreeSet<IpNet>>,
) -> BTreeMap<IpNet, RemotePath> {
    let own_subnet = inputs
        .nodes
        .get(me)
        .and_then(|n| n.underlay)
        .map(|u| u.trunc());
    let mut out = BTreeMap::new();
    for (node, node_blocks) in blocks.iter().filter(|(n, _)| n.as_str() != me) {
        let Some(remote) = inputs.nodes.get(node) else {
            continue;
        };
        let Some(underlay) = remote.underlay else {
            continue;
        };
        for block in node_blocks {
            let Some(pool) = inputs
                .pools
                .iter()
                .find(|p| p.cidr.contains(&block.network()))
            else {
                continue;
            };
            let same_subnet = own_subnet.is_some_and(|s| s.contains(&underlay.addr()));
            let path = match pool.mode {
                EncapsulationMode::Never => continue,
                EncapsulationMode::CrossSubnet if same_subnet => RemotePath::Direct {
                    via: underlay.addr(),
                },
                _ => match (remote.tunnel, remote.mac) {
                    (Some(tunnel), Some(mac)) => RemotePath::Tunnel {
                        tunnel,
                        mac,
                        underlay: underlay.addr(),
                    },
                    _ => continue,
                },
            };
            out.insert(*block, path);
        }
    }
    out
}

/// The MAC of this node's VXLAN device, derived from its name (locally administered,
/// unicast), so that registering the node again gives the same one.
pub fn mac_for(node: &str) -> [u8; 6] {
    // FNV-1a: stable across releases, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let parts: Vec<u8> = text
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .ok()?;
    parts.try_into().ok()
}

/// The node's tunnel fields as the Node resource holds them.
pub fn node_tunnel(spec: &calico_model::spec::NodeSpec) -> NodeTunnel {
    NodeTunnel {
        underlay: spec
            .bgp
            .as_ref()
            .and_then(|b| b.ipv4_address.as_deref())
            .and_then(|a| {
                a.parse::<Ipv4Net>()
                    .ok()
                    .or_else(|| a.parse::<Ipv4Addr>().ok().map(Ipv4Net::from))
            }),
        tunnel: spec
            .ipv4_vxlan_tunnel_addr
            .as_deref()
            .and_then(|a| a.parse().ok()),
        mac: spec.vxlan_tunnel_mac_addr.as_deref().and_then(parse_mac),
    }
}

/// Starts the overlay task; it ends when the sender is dropped.
pub fn spawn(
    etcd: EtcdConfig,
    me: String,
    mtu_file: std::path::PathBuf,
    refresh: Duration,
) -> watch::Sender<VxlanInputs> {
    let (tx, mut rx) = watch::channel(VxlanInputs::default());
    tokio::spawn(async move {
        let netlink = match Netlink::connect() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "the VXLAN overlay cannot reach netlink; it is not programmed");
                return;
            }
        };
        let mut tick = tokio::time::interval(refresh);
        let mut store: Option<Datastore> = None;
        let mut blocks_rx: Option<watch::Receiver<BTreeMap<String, BTreeSet<IpNet>>>> = None;
        let mut programmed = false;
        loop {
            let blocks_changed = async {
                match blocks_rx.as_mut() {
                    Some(b) => b.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
                _ = blocks_changed => {}
            }
            let inputs = rx.borrow_and_update().clone();
            if !inputs.complete {
                continue;
            }
            if !inputs.enabled() {
                if programmed || netlink.link_index(DEVICE).await.ok().flatten().is_some() {
                    remove(&netlink).await;
                    // Workloads made from now on get the full MTU again.
                    let _ = std::fs::remove_file(&mtu_file);
                    programmed = false;
                }
                continue;
            }
            if store.is_none() {
                match Datastore::connect(&etcd).await {
                    Ok(s) => {
                        let (btx, brx) = watch::channel(BTreeMap::new());
                        let (watched, prefix) =
                            (s.clone(), keys::prefix_for(Kind::BlockAffinity, None));
                        tokio::spawn(async move {
                            crate::syncer::watch_confirmed_blocks(&watched, prefix, btx).await
                        });
                        blocks_rx = Some(brx);
                        store = Some(s);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "the VXLAN overlay cannot reach the datastore yet");
                        continue;
                    }
                }
            }
            let own = inputs.nodes.get(&me).cloned().unwrap_or_default();
            let (Some(underlay), Some(tunnel), Some(mac)) = (own.underlay, own.tunnel, own.mac)
            else {
                if own.underlay.is_none() {
                    tracing::error!(node = %me, "VXLAN needs this node's IPv4 address (--ip / IP); the overlay is not programmed");
                    continue;
                }
                if let Some(store) = &store {
                    if let Err(e) = register_tunnel(store, &me, &inputs).await {
                        tracing::warn!(node = %me, error = %e, "allocating this node's VXLAN tunnel address");
                    }
                }
                continue;
            };
            let blocks = blocks_rx
                .as_mut()
                .map(|b| b.borrow_and_update().clone())
                .unwrap_or_default();
            match program(
                &netlink,
                &me,
                &inputs,
                &blocks,
                underlay.addr(),
                tunnel,
                mac,
            )
            .await
            {
                Ok((routes, mtu)) => {
                    if !programmed {
                        tracing::info!(%tunnel, mac = %format_mac(&mac), routes, mtu, "VXLAN overlay programmed");
                    }
                    if let Err(e) = write_mtu(&mtu_file, mtu) {
                        tracing::warn!(path = %mtu_file.display(), error = %e, "writing the workloads' MTU");
                    }
                    programmed = true;
                }
                Err(e) => tracing::error!(error = %e, "programming the VXLAN overlay"),
            }
        }
    });
    tx
}

/// Writes `mtu` to `path` (whole, through a rename) unless it holds it already.
fn write_mtu(path: &std::path::Path, mtu: u32) -> std::io::Result<()> {
    let text = format!("{mtu}\n");
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(tmp, path)
}

/// Brings the device, ARP and forwarding entries and routes to what the inputs say; returns
/// the number of remote routes and the device's MTU.
async fn program(
    netlink: &Netlink,
    me: &str,
    inputs: &VxlanInputs,
    blocks: &BTreeMap<String, BTreeSet<IpNet>>,
    local: Ipv4Addr,
    tunnel: Ipv4Addr,
    mac: [u8; 6],
) -> Result<(usize, u32), crate::netlink::NetlinkError> {
    let mtu = match inputs.mtu {
        Some(m) => m,
        None => netlink
            .mtu_of_address(local.into())
            .await?
            .unwrap_or(1500)
            .saturating_sub(OVERHEAD),
    };
    let index = netlink
        .ensure_vxlan(&VxlanDevice {
            name: DEVICE.to_owned(),
            vni: VNI,
            port: PORT,
            local,
            mac,
            mtu,
            address: tunnel,
        })
        .await?;
    let paths = plan(me, inputs, blocks);
    let mut neighbours = BTreeMap::new();
    let mut fdb = BTreeMap::new();
    let mut wanted = BTreeSet::new();
    for (block, path) in &paths {
        match path {
            RemotePath::Tunnel {
                tunnel,
                mac,
                underlay,
            } => {
                neighbours.insert(*tunnel, *mac);
                fdb.insert(*mac, *underlay);
                wanted.insert(RemoteRoute {
                    dest: *block,
                    gateway: *tunnel,
                    onlink_via: Some(index),
                });
            }
            RemotePath::Direct { via } => {
                wanted.insert(RemoteRoute {
                    dest: *block,
                    gateway: *via,
                    onlink_via: None,
                });
            }
        }
    }
    // Forwarding entries before ARP entries before routes: nothing is routed to a tunnel
    // address the device cannot reach yet.
    netlink.set_fdb(index, &fdb).await?;
    netlink.set_neighbours(index, &neighbours).await?;
    let actual: BTreeSet<RemoteRoute> = netlink.remote_routes().await?.into_iter().collect();
    for stale in actual.difference(&wanted) {
        netlink.delete_remote(stale).await?;
    }
    for route in wanted.difference(&actual) {
        netlink.replace_remote(route).await?;
    }
    Ok((wanted.len(), mtu))
}

/// No VXLAN pool any more: the device (with its ARP and forwarding entries and on-link
/// routes) and the direct routes go.
async fn remove(netlink: &Netlink) {
    if let Err(e) = netlink.delete_link(DEVICE).await {
        tracing::warn!(error = %e, "removing the VXLAN device");
    }
    match netlink.remote_routes().await {
        Ok(routes) => {
            for r in routes {
                if let Err(e) = netlink.delete_remote(&r).await {
                    tracing::warn!(error = %e, "removing an overlay route");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing overlay routes"),
    }
    tracing::info!("VXLAN overlay removed (no VXLAN pool)");
}

/// Allocates this node's tunnel address from a VXLAN pool (or finds the one it holds) and
/// records it with the device's MAC on the Node.
async fn register_tunnel(store: &Datastore, me: &str, inputs: &VxlanInputs) -> Result<(), String> {
    let handle = format!("vxlan-tunnel-addr-{me}");
    let ipam = calico_ipam::Ipam::new(store.clone(), me);
    let held = ipam
        .ips_by_handle(&handle)
        .await
        .map_err(|e| e.to_string())?;
    let address = match held.into_iter().find(|a| a.is_ipv4()) {
        Some(a) => a,
        None => {
            let pools = inputs
                .pools
                .iter()
                .filter(|p| p.mode != EncapsulationMode::Never && matches!(p.cidr, IpNet::V4(_)))
                .map(|p| p.name.clone())
                .collect();
            let assigned = ipam
                .auto_assign(&calico_ipam::AssignRequest {
                    handle: handle.clone(),
                    attrs: [
                        ("type".to_owned(), "vxlanTunnelAddress".to_owned()),
                        ("node".to_owned(), me.to_owned()),
                    ]
                    .into(),
                    num_v4: 1,
                    ipv4_pools: pools,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            assigned.first().ok_or("IPAM assigned nothing")?.addr()
        }
    };
    let mut node = store
        .get(Kind::Node, None, me)
        .await
        .map_err(|e| e.to_string())?;
    let Resource::Node(n) = &mut node else {
        return Err("not a Node".into());
    };
    n.spec.ipv4_vxlan_tunnel_addr = Some(address.to_string());
    if n.spec.vxlan_tunnel_mac_addr.is_none() {
        n.spec.vxlan_tunnel_mac_addr = Some(format_mac(&mac_for(me)));
    }
    store.update(node).await.map_err(|e| e.to_string())?;
    tracing::info!(node = %me, %address, "VXLAN tunnel address allocated and recorded on the Node");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(underlay: &str, tunnel: &str, mac: u8) -> NodeTunnel {
        NodeTunnel {
            underlay: Some(underlay.parse().unwrap()),
            tunnel: Some(tunnel.parse().unwrap()),
            mac: Some([2, 0, 0, 0, 0, mac]),
        }
    }

    fn inputs(mode: EncapsulationMode) -> VxlanInputs {
        VxlanInputs {
            pools: vec![
                OverlayPool {
                    name: "vx".into(),
                    cidr: "10.65.0.0/16".parse().unwrap(),
                    mode,
                },
                OverlayPool {
                    name: "bgp".into(),
                    cidr: "10.70.0.0/16".parse().unwrap(),
                    mode: EncapsulationMode::Never,
                },
            ],
            nodes: [
                ("a".to_owned(), node("10.98.1.1/24", "10.65.0.1", 1)),
                ("b".to_owned(), node("10.98.2.1/24", "10.65.1.1", 2)),
                ("c".to_owned(), node("10.98.1.3/24", "10.65.2.1", 3)),
                (
                    "d".to_owned(),
                    NodeTunnel {
                        underlay: Some("10.98.2.4/24".parse().unwrap()),
                        ..Default::default()
                    },
                ),
            ]
            .into(),
            mtu: None,
            complete: true,
        }
    }

    fn blocks() -> BTreeMap<String, BTreeSet<IpNet>> {
        [
            ("a", vec!["10.65.0.0/26"]),
            ("b", vec!["10.65.1.0/26", "10.70.0.0/26"]),
            ("c", vec!["10.65.2.0/26"]),
            ("d", vec!["10.65.3.0/26"]),
        ]
        .into_iter()
        .map(|(n, b)| (n.to_owned(), b.iter().map(|b| b.parse().unwrap()).collect()))
        .collect()
    }

    #[test]
    fn always_encapsulates_every_remote_block_of_a_vxlan_pool() {
        let plan = plan("a", &inputs(EncapsulationMode::Always), &blocks());
        let block = |b: &str| plan.get(&b.parse().unwrap()).cloned();
        assert_eq!(
            block("10.65.1.0/26"),
            Some(RemotePath::Tunnel {
                tunnel: "10.65.1.1".parse().unwrap(),
                mac: [2, 0, 0, 0, 0, 2],
                underlay: "10.98.2.1".parse().unwrap()
            })
        );
        assert!(matches!(
            block("10.65.2.0/26"),
            Some(RemotePath::Tunnel { .. })
        ));
        assert_eq!(block("10.70.0.0/26"), None, "a BGP pool's block is BGP's");
        assert_eq!(block("10.65.0.0/26"), None, "own block");
        assert_eq!(block("10.65.3.0/26"), None, "d has no tunnel address yet");
        assert_eq!(plan.len(), 2);
    }

    #[test]
    fn cross_subnet_goes_direct_inside_the_subnet_only() {
        let plan = plan("a", &inputs(EncapsulationMode::CrossSubnet), &blocks());
        assert_eq!(
            plan.get(&"10.65.2.0/26".parse().unwrap()),
            Some(&RemotePath::Direct {
                via: "10.98.1.3".parse().unwrap()
            })
        );
        assert!(matches!(
            plan.get(&"10.65.1.0/26".parse().unwrap()),
            Some(RemotePath::Tunnel { .. })
        ));
        assert!(!inputs(EncapsulationMode::Never).enabled());
        assert!(inputs(EncapsulationMode::CrossSubnet).enabled());
    }

    #[test]
    fn macs_are_stable_local_unicast_and_read_back() {
        let mac = mac_for("node-1");
        assert_eq!(mac, mac_for("node-1"));
        assert_ne!(mac, mac_for("node-2"));
        assert_eq!(mac[0] & 0x03, 0x02, "locally administered, unicast");
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
        assert_eq!(parse_mac("zz:00:00:00:00:00"), None);
    }
}
