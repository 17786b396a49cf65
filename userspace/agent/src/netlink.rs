//! The kernel side the agent manages besides BPF: interfaces (watched over netlink), routes to
//! local workloads and blackholes for this node's blocks (rtnetlink), and the sysctls that
//! forwarding and proxy ARP need.

use std::{collections::BTreeMap, net::IpAddr};

use futures::{StreamExt, TryStreamExt};
use ipnet::IpNet;
use nix::errno::Errno;
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        link::LinkAttribute,
        route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
        RouteNetlinkMessage,
    },
    Handle, IpVersion, MulticastGroup, RouteMessageBuilder,
};
use tokio::sync::mpsc;

/// The protocol marking the blackhole routes the agent owns (upstream's felix uses 80 too).
pub const BLACKHOLE_PROTOCOL: u8 = 80;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    Present { name: String, index: u32 },
    Gone { name: String, index: u32 },
}

/// What changed between the links known so far and a fresh listing: `Gone` for each known one
/// that is not listed any more or now has another index (a new interface under an old name),
/// then `Present` for each listed one that is new or changed.
pub fn link_changes(
    known: &BTreeMap<String, u32>,
    listed: &BTreeMap<String, u32>,
) -> Vec<LinkEvent> {
    let gone = known
        .iter()
        .filter(|(name, index)| listed.get(*name) != Some(*index))
        .map(|(name, index)| LinkEvent::Gone {
            name: name.clone(),
            index: *index,
        });
    let present = listed
        .iter()
        .filter(|(name, index)| known.get(*name) != Some(*index))
        .map(|(name, index)| LinkEvent::Present {
            name: name.clone(),
            index: *index,
        });
    gone.chain(present).collect()
}

/// A fresh listing's changes against `known` (none when the listing fails: the next one
/// catches up).
async fn relisted(lister: &Netlink, known: &BTreeMap<String, u32>) -> Vec<LinkEvent> {
    match lister.links().await {
        Ok(listed) => link_changes(known, &listed),
        Err(e) => {
            tracing::warn!(error = %e, "listing links");
            Vec::new()
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("netlink: {action}: {source}")]
pub struct NetlinkError {
    action: String,
    #[source]
    source: std::io::Error,
}

fn fail(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let action = action.into();
    move |e| NetlinkError {
        action,
        source: std::io::Error::other(e.to_string()),
    }
}

/// A route the agent owns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OwnedRoute {
    /// A local workload's address through its veth.
    Workload { dest: IpNet, ifindex: u32 },
    /// One of this node's blocks, so traffic for unassigned addresses in it goes nowhere.
    Blackhole { dest: IpNet },
}

pub struct Netlink {
    handle: Handle,
}

fn link_name(attrs: &[LinkAttribute]) -> Option<String> {
    attrs.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

impl Netlink {
    /// Opens a netlink connection in the process's network namespace.
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| NetlinkError {
            action: "opening a connection".into(),
            source,
        })?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Sends interface appearances and disappearances to `tx` until it closes. Subscribes
    /// before returning, so nothing that happens after the caller's next dump is missed. The
    /// task keeps its own view of the links and lists them again (sending what changed) at
    /// once, every `relist`, and whenever events were lost (a netlink buffer overrun): a missed
    /// event never leaves an endpoint unprogrammed for long, and no listing runs on the loop
    /// that applies policy.
    pub fn watch_links(
        tx: mpsc::UnboundedSender<LinkEvent>,
        relist: std::time::Duration,
    ) -> Result<(), NetlinkError> {
        let (conn, _, mut messages) = rtnetlink::new_multicast_connection(&[MulticastGroup::Link])
            .map_err(|source| NetlinkError {
                action: "subscribing to link changes".into(),
                source,
            })?;
        tokio::spawn(conn);
        let lister = Netlink::connect()?;
        tokio::spawn(async move {
            let mut known: BTreeMap<String, u32> = BTreeMap::new();
            let mut tick = tokio::time::interval(relist);
            let mut subscribed = true;
            loop {
                let events = tokio::select! {
                    message = messages.next(), if subscribed => match message {
                        Some((message, _)) => match message.payload {
                            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
                                link_name(&l.attributes)
                                    .map(|name| LinkEvent::Present { name, index: l.header.index })
                                    .into_iter()
                                    .collect()
                            }
                            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => {
                                link_name(&l.attributes)
                                    .map(|name| LinkEvent::Gone { name, index: l.header.index })
                                    .into_iter()
                                    .collect()
                            }
                            // ENOBUFS: the kernel dropped events while the buffer was full.
                            NetlinkPayload::Overrun(_) => {
                                tracing::warn!("link events lost (netlink buffer overrun); listing links again");
                                relisted(&lister, &known).await
                            }
                            _ => Vec::new(),
                        },
                        None => {
                            tracing::error!("link event subscription ended; links are listed periodically");
                            subscribed = false;
                            Vec::new()
                        }
                    },
                    _ = tick.tick() => relisted(&lister, &known).await,
                };
                for event in events {
                    match &event {
                        LinkEvent::Present { name, index } => {
                            known.insert(name.clone(), *index);
                        }
                        LinkEvent::Gone { name, index } => {
                            if known.get(name) == Some(index) {
                                known.remove(name);
                            }
                        }
                    }
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(())
    }

    /// Every interface: name → index.
    pub async fn links(&self) -> Result<BTreeMap<String, u32>, NetlinkError> {
        let mut out = BTreeMap::new();
        let mut stream = self.handle.link().get().execute();
        while let Some(l) = stream.try_next().await.map_err(fail("listing links"))? {
            if let Some(name) = link_name(&l.attributes) {
                out.insert(name, l.header.index);
            }
        }
        Ok(out)
    }

    /// Adds (or takes over) the route `route`.
    pub async fn replace(&self, route: &OwnedRoute) -> Result<(), NetlinkError> {
        let message = build(route);
        self.handle
            .route()
            .add(message)
            .replace()
            .execute()
            .await
            .map_err(fail(format!("adding route {route:?}")))
    }

    pub async fn delete(&self, route: &OwnedRoute) -> Result<(), NetlinkError> {
        match self.handle.route().del(build(route)).execute().await {
            Ok(()) => Ok(()),
            // Already gone (the kernel removes routes of deleted interfaces itself).
            Err(rtnetlink::Error::NetlinkError(e))
                if Errno::from_raw(e.raw_code().abs()) == Errno::ESRCH =>
            {
                Ok(())
            }
            Err(e) => Err(fail(format!("deleting route {route:?}"))(e)),
        }
    }

    /// The routes the agent owns in the main table: host routes through the interfaces for
    /// which `owned_interface` says yes, and blackholes with the agent's protocol.
    pub async fn owned_routes(
        &self,
        owned_interface: impl Fn(u32) -> bool,
    ) -> Result<Vec<OwnedRoute>, NetlinkError> {
        let mut out = Vec::new();
        for version in [IpVersion::V4, IpVersion::V6] {
            let request = match version {
                IpVersion::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
                IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
            };
            let mut stream = self.handle.route().get(request).execute();
            while let Some(r) = stream.try_next().await.map_err(fail("listing routes"))? {
                if r.header.table != 254 {
                    continue;
                }
                let Some(dest) = destination(&r) else {
                    continue;
                };
                let oif = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                });
                if r.header.kind == RouteType::BlackHole
                    && r.header.protocol == RouteProtocol::Other(BLACKHOLE_PROTOCOL)
                {
                    out.push(OwnedRoute::Blackhole { dest });
                } else if let Some(ifindex) = oif.filter(|i| owned_interface(*i)) {
                    let host = dest.prefix_len() == dest.max_prefix_len();
                    if host && r.header.kind == RouteType::Unicast {
                        out.push(OwnedRoute::Workload { dest, ifindex });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// The VXLAN device the overlay uses, as it should be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanDevice {
    pub name: String,
    pub vni: u32,
    pub port: u16,
    /// The node's own underlay address (the tunnel's source).
    pub local: std::net::Ipv4Addr,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// The node's tunnel address, on the device as a /32.
    pub address: std::net::Ipv4Addr,
}

/// A route to a remote node's block, owned by the overlay (protocol 80, unicast): through the
/// VXLAN device to the remote tunnel address (on-link), or straight to the remote node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteRoute {
    pub dest: IpNet,
    pub gateway: std::net::Ipv4Addr,
    /// Some: through this interface, on-link (the VXLAN device).
    pub onlink_via: Option<u32>,
}

impl Netlink {
    /// The index of interface `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self.links().await?.get(name).copied())
    }

    /// Makes `device` exist as specified (created, or its MAC, MTU and state set) with its
    /// address; returns its index.
    pub async fn ensure_vxlan(&self, device: &VxlanDevice) -> Result<u32, NetlinkError> {
        let index = match self.link_index(&device.name).await? {
            Some(i) => i,
            None => {
                let message = rtnetlink::LinkVxlan::new(&device.name, device.vni)
                    .port(device.port)
                    .local(device.local)
                    .learning(false)
                    .mtu(device.mtu)
                    .address(device.mac.to_vec())
                    .up()
                    .build();
                self.handle
                    .link()
                    .add(message)
                    .execute()
                    .await
                    .map_err(fail(format!("creating {}", device.name)))?;
                self.link_index(&device.name)
                    .await?
                    .ok_or_else(|| NetlinkError {
                        action: format!("finding {} after creating it", device.name),
                        source: std::io::Error::other("not listed"),
                    })?
            }
        };
        let message = rtnetlink::LinkUnspec::new_with_index(index)
            .mtu(device.mtu)
            .address(device.mac.to_vec())
            .up()
            .build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(fail(format!("setting up {}", device.name)))?;
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(device.address), 32)
            .replace()
            .execute()
            .await
        {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e))
                if Errno::from_raw(e.raw_code().abs()) == Errno::EEXIST => {}
            Err(e) => return Err(fail(format!("addressing {}", device.name))(e)),
        }
        Ok(index)
    }

    /// The MTU of the interface holding address `ip`, if one does.
    pub async fn mtu_of_address(&self, ip: IpAddr) -> Result<Option<u32>, NetlinkError> {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
        let mut stream = self.handle.address().get().execute();
        let mut index = None;
        while let Some(a) = stream.try_next().await.map_err(fail("listing addresses"))? {
            let a: AddressMessage = a;
            if a.attributes
                .iter()
                .any(|attr| matches!(attr, AddressAttribute::Address(x) if *x == ip))
            {
                index = Some(a.header.index);
            }
        }
        let Some(index) = index else { return Ok(None) };
        let mut links = self.handle.link().get().match_index(index).execute();
        while let Some(l) = links.try_next().await.map_err(fail("reading a link"))? {
            if let Some(mtu) = l.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            }) {
                return Ok(Some(mtu));
            }
        }
        Ok(None)
    }

    /// Removes interface `name` if it exists (its routes and neighbours go with it).
    pub async fn delete_link(&self, name: &str) -> Result<(), NetlinkError> {
        if let Some(index) = self.link_index(name).await? {
            self.handle
                .link()
                .del(index)
                .execute()
                .await
                .map_err(fail(format!("deleting {name}")))?;
        }
        Ok(())
    }

    /// Deletes the entries of `family` (ARP, or the bridge forwarding database) on `ifindex`
    /// that `keep` does not want.
    async fn drop_stale_neighbours(
        &self,
        family: rtnetlink::packet_route::AddressFamily,
        ifindex: u32,
        what: &str,
        keep: impl Fn(&rtnetlink::packet_route::neighbour::NeighbourMessage) -> bool,
    ) -> Result<(), NetlinkError> {
        let mut stream = self
            .handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute();
        let mut stale = Vec::new();
        while let Some(n) = stream
            .try_next()
            .await
            .map_err(fail(format!("listing {what}")))?
        {
            if n.header.ifindex == ifindex && !keep(&n) {
                stale.push(n);
            }
        }
        for n in stale {
            let _ = self.handle.neighbours().del(n).execute().await;
        }
        Ok(())
    }

    /// Makes the permanent ARP entries on `ifindex` exactly `wanted` (tunnel address → MAC).
    pub async fn set_neighbours(
        &self,
        ifindex: u32,
        wanted: &BTreeMap<std::net::Ipv4Addr, [u8; 6]>,
    ) -> Result<(), NetlinkError> {
        use rtnetlink::packet_route::{
            neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
            AddressFamily,
        };
        self.drop_stale_neighbours(AddressFamily::Inet, ifindex, "neighbours", |n| {
            n.attributes.iter().any(|a| {
                matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(ip))
                    if wanted.contains_key(ip))
            })
        })
        .await?;
        for (ip, mac) in wanted {
            self.handle
                .neighbours()
                .add(ifindex, IpAddr::V4(*ip))
                .link_layer_address(mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(fail(format!("neighbour {ip}")))?;
        }
        Ok(())
    }

    /// Makes the forwarding database of the VXLAN device `ifindex` exactly `wanted` (remote
    /// tunnel MAC → the remote node's underlay address).
    pub async fn set_fdb(
        &self,
        ifindex: u32,
        wanted: &BTreeMap<[u8; 6], std::net::Ipv4Addr>,
    ) -> Result<(), NetlinkError> {
        use rtnetlink::packet_route::{
            neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourState},
            AddressFamily,
        };
        self.drop_stale_neighbours(AddressFamily::Bridge, ifindex, "the fdb", |n| {
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(m) => <[u8; 6]>::try_from(m.as_slice()).ok(),
                _ => None,
            });
            // The device's own all-zero default entries are the kernel's.
            mac.is_none_or(|m| m == [0; 6] || wanted.contains_key(&m))
        })
        .await?;
        for (mac, remote) in wanted {
            self.handle
                .neighbours()
                .add_bridge(ifindex, mac)
                .destination(IpAddr::V4(*remote))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(fail(format!("fdb entry for {remote}")))?;
        }
        Ok(())
    }

    /// The overlay's routes (protocol 80, unicast, main table).
    pub async fn remote_routes(&self) -> Result<Vec<RemoteRoute>, NetlinkError> {
        let request = RouteMessageBuilder::<std::net::Ipv4Addr>::new().build();
        let mut stream = self.handle.route().get(request).execute();
        let mut out = Vec::new();
        while let Some(r) = stream.try_next().await.map_err(fail("listing routes"))? {
            if r.header.table != 254
                || r.header.kind != RouteType::Unicast
                || r.header.protocol != RouteProtocol::Other(BLACKHOLE_PROTOCOL)
            {
                continue;
            }
            let (Some(dest), Some(gateway)) = (
                destination(&r),
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Gateway(
                        rtnetlink::packet_route::route::RouteAddress::Inet(g),
                    ) => Some(*g),
                    _ => None,
                }),
            ) else {
                continue;
            };
            let onlink = r
                .header
                .flags
                .contains(rtnetlink::packet_route::route::RouteFlags::Onlink);
            let oif = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
            out.push(RemoteRoute {
                dest,
                gateway,
                onlink_via: oif.filter(|_| onlink),
            });
        }
        Ok(out)
    }

    pub async fn replace_remote(&self, route: &RemoteRoute) -> Result<(), NetlinkError> {
        self.handle
            .route()
            .add(remote_message(route))
            .replace()
            .execute()
            .await
            .map_err(fail(format!("adding route {route:?}")))
    }

    pub async fn delete_remote(&self, route: &RemoteRoute) -> Result<(), NetlinkError> {
        match self
            .handle
            .route()
            .del(remote_message(route))
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(rtnetlink::Error::NetlinkError(e))
                if Errno::from_raw(e.raw_code().abs()) == Errno::ESRCH =>
            {
                Ok(())
            }
            Err(e) => Err(fail(format!("deleting route {route:?}"))(e)),
        }
    }
}

fn remote_message(route: &RemoteRoute) -> RouteMessage {
    let IpNet::V4(dest) = route.dest else {
        unreachable!("the overlay routes IPv4 blocks")
    };
    let mut builder = RouteMessageBuilder::<std::net::Ipv4Addr>::new()
        .destination_prefix(dest.network(), dest.prefix_len())
        .gateway(route.gateway)
        .protocol(RouteProtocol::Other(BLACKHOLE_PROTOCOL));
    if let Some(oif) = route.onlink_via {
        builder = builder.output_interface(oif);
    }
    let mut m = builder.build();
    if route.onlink_via.is_some() {
        m.header.flags |= rtnetlink::packet_route::route::RouteFlags::Onlink;
    }
    m
}

fn destination(r: &RouteMessage) -> Option<IpNet> {
    let len = r.header.destination_prefix_length;
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet(a)) => {
            IpNet::new(IpAddr::V4(*a), len).ok()
        }
        RouteAttribute::Destination(rtnetlink::packet_route::route::RouteAddress::Inet6(a)) => {
            IpNet::new(IpAddr::V6(*a), len).ok()
        }
        _ => None,
    })
}

fn build(route: &OwnedRoute) -> RouteMessage {
    let (dest, builder) = match route {
        OwnedRoute::Workload { dest, ifindex } => (
            dest,
            RouteMessageBuilder::<IpAddr>::new()
                .output_interface(*ifindex)
                .protocol(RouteProtocol::Boot)
                .scope(RouteScope::Link),
        ),
        OwnedRoute::Blackhole { dest } => (
            dest,
            RouteMessageBuilder::<IpAddr>::new()
                .kind(RouteType::BlackHole)
                .protocol(RouteProtocol::Other(BLACKHOLE_PROTOCOL)),
        ),
    };
    let builder = builder
        .destination_prefix(dest.network(), dest.prefix_len())
        .expect("an IpNet's address and prefix length agree");
    let mut m = builder.build();
    if matches!(
        route,
        OwnedRoute::Workload {
            dest: IpNet::V6(_),
            ..
        }
    ) {
        // IPv6 has no link scope for these; universe as `ip -6 route` uses.
        m.header.scope = RouteScope::Universe;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(list: &[(&str, u32)]) -> BTreeMap<String, u32> {
        list.iter().map(|(n, i)| (n.to_string(), *i)).collect()
    }

    #[test]
    fn a_listing_reports_what_the_events_missed() {
        let known = links(&[("lo", 1), ("cali1", 10), ("cali2", 11)]);
        // cali1 went, cali2 was recreated under a new index, cali3 came.
        let listed = links(&[("lo", 1), ("cali2", 12), ("cali3", 13)]);
        let changes = link_changes(&known, &listed);
        let gone: Vec<_> = changes
            .iter()
            .filter_map(|e| match e {
                LinkEvent::Gone { name, index } => Some((name.as_str(), *index)),
                _ => None,
            })
            .collect();
        assert_eq!(gone, [("cali1", 10), ("cali2", 11)]);
        let present: Vec<_> = changes
            .iter()
            .filter_map(|e| match e {
                LinkEvent::Present { name, index } => Some((name.as_str(), *index)),
                _ => None,
            })
            .collect();
        assert_eq!(present, [("cali2", 12), ("cali3", 13)]);
        // Gone comes first, so a recreated name is dropped before it is added again.
        assert!(matches!(changes[0], LinkEvent::Gone { .. }));
        assert!(link_changes(&listed, &listed).is_empty());
    }
}
