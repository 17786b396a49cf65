//! The host end of a workload interface, as every writer of one needs it (the CNI plugin, the
//! Docker driver) and as the agent keeps it: a `cali*` veth whose host end has upstream's MAC
//! `ee:ee:ee:ee:ee:ee`, answering for the gateway 169.254.1.1 by proxy ARP (and for
//! fe80::ecee:eeff:feee:eeee, the link-local address that MAC gives), with forwarding on.
//!
//! Netlink requests go to the namespace of the handle's socket; sysctls to the namespace of
//! the calling thread. Callers pick the namespace (see the CNI plugin's per-thread setns).

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::RawFd,
};

use futures::TryStreamExt;
use nix::errno::Errno;
use rtnetlink::{
    packet_route::link::{InfoData, InfoKind, InfoVeth, LinkAttribute},
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth,
};

/// The gateway every workload routes through (answered by proxy ARP on the host end).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The IPv6 gateway: the link-local address the host end derives from its MAC.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);
/// The host end's MAC, as upstream sets it.
pub const HOST_MAC: [u8; 6] = [0xee; 6];

/// A netlink request that failed, with what it was for.
#[derive(Debug, thiserror::Error)]
pub enum HostLinkError {
    #[error("{action}: {source}")]
    Netlink {
        action: String,
        source: rtnetlink::Error,
    },
    #[error("{0} vanished right after its creation")]
    Vanished(String),
}

fn failed(action: impl std::fmt::Display) -> impl FnOnce(rtnetlink::Error) -> HostLinkError {
    let action = action.to_string();
    move |source| HostLinkError::Netlink { action, source }
}

/// A link found by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    /// `aa:bb:…`, empty for links without a hardware address.
    pub mac: String,
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_string(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The link called `name` in the handle's namespace, or `None` when there is none.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, HostLinkError> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => {
            let mac = link
                .attributes
                .iter()
                .find_map(|a| match a {
                    LinkAttribute::Address(bytes) => Some(mac_string(bytes)),
                    _ => None,
                })
                .unwrap_or_default();
            Ok(Some(Link {
                index: link.header.index,
                mac,
            }))
        }
        Ok(None) => Ok(None),
        Err(rtnetlink::Error::NetlinkError(e))
            if Errno::from_raw(e.raw_code().abs()) == Errno::ENODEV =>
        {
            Ok(None)
        }
        Err(e) => Err(failed(format!("looking up {name}"))(e)),
    }
}

/// Names of the veths in the handle's namespace whose name starts with `prefix` (the host
/// ends of workload interfaces, and any a crashed writer left behind).
pub async fn veth_names(handle: &Handle, prefix: &str) -> Result<Vec<String>, HostLinkError> {
    let mut links = handle.link().get().execute();
    let mut names = Vec::new();
    while let Some(link) = links.try_next().await.map_err(failed("listing links"))? {
        let mut name = None;
        let mut veth = false;
        for attribute in &link.attributes {
            match attribute {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::LinkInfo(infos) => {
                    veth |= infos.iter().any(|i| {
                        matches!(
                            i,
                            rtnetlink::packet_route::link::LinkInfo::Kind(InfoKind::Veth)
                        )
                    });
                }
                _ => {}
            }
        }
        if let Some(name) = name.filter(|n| veth && n.starts_with(prefix)) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Deletes link `name` if it exists; says whether it did.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, HostLinkError> {
    match link_by_name(handle, name).await? {
        Some(link) => {
            handle
                .link()
                .del(link.index)
                .execute()
                .await
                .map_err(failed(format!("deleting {name}")))?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// The workload's end of a veth: its name, and where it goes.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    /// The workload's network namespace (an open fd), or `None` to leave it beside the host
    /// end (Docker moves it itself).
    pub netns_fd: Option<RawFd>,
    pub mtu: Option<u32>,
}

/// Creates the veth `host_name` ↔ `peer` (replacing a leftover `host_name`), the host end with
/// [`HOST_MAC`], and returns the host end's index. The host end is left down: bringing it up
/// is [`set_up`].
pub async fn create_workload_veth(
    handle: &Handle,
    host_name: &str,
    peer: &Peer,
) -> Result<u32, HostLinkError> {
    delete_link(handle, host_name).await?;
    let mut peer_message = LinkMessageBuilder::<LinkUnspec>::default().name(peer.name.clone());
    if let Some(mtu) = peer.mtu {
        peer_message = peer_message.mtu(mtu);
    }
    if let Some(fd) = peer.netns_fd {
        peer_message = peer_message.setns_by_fd(fd);
    }
    let mut veth = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host_name.to_owned())
        .address(HOST_MAC.to_vec())
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message.build())));
    if let Some(mtu) = peer.mtu {
        veth = veth.mtu(mtu);
    }
    handle
        .link()
        .add(veth.build())
        .execute()
        .await
        .map_err(failed(format!(
            "creating veth {host_name} <-> {}",
            peer.name
        )))?;
    link_by_name(handle, host_name)
        .await?
        .map(|l| l.index)
        .ok_or_else(|| HostLinkError::Vanished(host_name.to_owned()))
}

/// Brings link `index` up.
pub async fn set_up(handle: &Handle, index: u32) -> Result<(), HostLinkError> {
    handle
        .link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(failed(format!("bringing link {index} up")))
}

/// Writes `value` to a sysctl file unless it already holds it, naming the file on failure.
pub fn sysctl(path: &str, value: &str) -> Result<(), std::io::Error> {
    match std::fs::read_to_string(path) {
        Ok(v) if v.trim() == value => Ok(()),
        _ => std::fs::write(path, value)
            .map_err(|e| std::io::Error::new(e.kind(), format!("writing {value} to {path}: {e}"))),
    }
}

/// Forwarding on the host: the workloads' traffic is routed. IPv6 may be disabled on the host,
/// which is not an error for IPv4-only clusters.
pub fn enable_forwarding() -> Result<(), std::io::Error> {
    sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
    let _ = sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "1");
    Ok(())
}

/// What a workload veth's host end needs: proxy ARP answering for the gateway without delay,
/// forwarding, and for IPv6 forwarding, proxy NDP and no router advertisements taken from the
/// workload. IPv6 settings are best effort unless `ipv6` says the workload has IPv6 addresses.
pub fn configure_host_end(name: &str, ipv6: bool) -> Result<(), std::io::Error> {
    sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/proxy_arp"), "1")?;
    sysctl(&format!("/proc/sys/net/ipv4/neigh/{name}/proxy_delay"), "0")?;
    sysctl(&format!("/proc/sys/net/ipv4/conf/{name}/forwarding"), "1")?;
    for (setting, value) in [("accept_ra", "0"), ("forwarding", "1"), ("proxy_ndp", "1")] {
        let result = sysctl(&format!("/proc/sys/net/ipv6/conf/{name}/{setting}"), value);
        if ipv6 {
            result?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_v6_is_the_host_macs_link_local_address() {
        // EUI-64: flip the universal/local bit of the first byte, insert ff:fe in the middle.
        let m = HOST_MAC;
        let eui = [m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]];
        let o = GATEWAY_V6.octets();
        assert_eq!(&o[..8], &[0xfe, 0x80, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&o[8..], &eui);
        assert_eq!(mac_string(&HOST_MAC), "ee:ee:ee:ee:ee:ee");
    }
}
