//! Wiring a workload into the host over netlink: a veth pair (host end `cali…` in the root
//! namespace, container end `CNI_IFNAME` inside the workload's namespace), /32 and /128
//! addresses, the default route via 169.254.1.1 (fe80::ecee:eeff:feee:eeee for IPv6) with
//! permanent neighbour entries, proxy ARP on the host end, and host routes to the workload.
//!
//! Netlink sockets talk to the namespace of the thread that opens them, so everything done
//! inside the workload's namespace runs on a dedicated thread that has switched into it.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use calico_hostlink::{HostLinkError, Peer};
use futures::TryStreamExt;
use ipnet::IpNet;
use nix::sched::{setns, CloneFlags};
use rtnetlink::{
    new_connection,
    packet_route::{neighbour::NeighbourState, route::RouteScope},
    Handle, LinkUnspec, RouteMessageBuilder,
};

pub use calico_hostlink::{GATEWAY_V4, GATEWAY_V6, HOST_MAC};

#[derive(Debug, thiserror::Error)]
#[error("{action}: {message}")]
pub struct WiringError {
    pub action: String,
    pub message: String,
}

fn fail(action: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> WiringError {
    let action = action.into();
    move |e| WiringError {
        action,
        message: e.to_string(),
    }
}

impl From<HostLinkError> for WiringError {
    fn from(e: HostLinkError) -> Self {
        match e {
            HostLinkError::Netlink { action, source } => WiringError {
                action,
                message: source.to_string(),
            },
            vanished => WiringError {
                action: "creating the veth".into(),
                message: vanished.to_string(),
            },
        }
    }
}

fn io_fail(action: impl Into<String>) -> impl FnOnce(std::io::Error) -> WiringError {
    let action = action.into();
    move |e| WiringError {
        action,
        message: e.to_string(),
    }
}

/// What to wire.
#[derive(Debug, Clone)]
pub struct Plan {
    pub host_veth: String,
    pub netns: PathBuf,
    pub ifname: String,
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
}

/// What was wired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wired {
    pub host_mac: String,
    pub container_mac: String,
}

/// Runs `f` with a netlink handle on a fresh thread, in `netns` when given (else in the
/// calling process's namespace).
fn with_netlink<R: Send>(
    netns: Option<&Path>,
    f: impl for<'h> FnOnce(
            &'h Handle,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<R, WiringError>> + 'h>,
        > + Send,
) -> Result<R, WiringError> {
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                if let Some(path) = netns {
                    let file = File::open(path)
                        .map_err(io_fail(format!("opening netns {}", path.display())))?;
                    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| WiringError {
                        action: format!("entering netns {}", path.display()),
                        message: e.to_string(),
                    })?;
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(io_fail("starting a netlink runtime"))?;
                runtime.block_on(async {
                    let (connection, handle, _) =
                        new_connection().map_err(io_fail("opening netlink"))?;
                    let task = tokio::spawn(connection);
                    let result = f(&handle).await;
                    task.abort();
                    result
                })
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

async fn link_index(handle: &Handle, name: &str) -> Result<Option<(u32, String)>, WiringError> {
    Ok(calico_hostlink::link_by_name(handle, name)
        .await?
        .map(|l| (l.index, l.mac)))
}

fn write_sysctl(path: &str, value: &str) -> Result<(), WiringError> {
    calico_hostlink::sysctl(path, value).map_err(io_fail(format!("setting {path}")))
}

/// Creates the veth pair and configures both ends. On failure nothing this call made is left
/// behind, and nothing it did not make is touched (an interface already in the workload under
/// `ifname` is why such an ADD fails, and it is not ours to delete).
pub fn wire(plan: &Plan) -> Result<Wired, WiringError> {
    let mut created = false;
    match wire_inner(plan, &mut created) {
        Ok(w) => Ok(w),
        Err(e) => {
            if created {
                if let Err(cleanup) = unwire(&plan.host_veth, Some(&plan.netns), &plan.ifname) {
                    tracing::error!(error = %cleanup, "cleanup after a failed ADD failed");
                }
            }
            Err(e)
        }
    }
}

fn wire_inner(plan: &Plan, created: &mut bool) -> Result<Wired, WiringError> {
    let netns = File::open(&plan.netns)
        .map_err(io_fail(format!("opening netns {}", plan.netns.display())))?;
    let netns_fd = netns.as_raw_fd();
    let v4: Vec<IpNet> = plan
        .addresses
        .iter()
        .filter(|a| a.addr().is_ipv4())
        .copied()
        .collect();
    let v6: Vec<IpNet> = plan
        .addresses
        .iter()
        .filter(|a| a.addr().is_ipv6())
        .copied()
        .collect();

    // Host side, in our own namespace: the pair, with the peer created directly inside the
    // workload's namespace under its final name.
    let host_veth = plan.host_veth.clone();
    let ifname = plan.ifname.clone();
    let mtu = plan.mtu;
    let host_index = with_netlink(None, move |h| {
        Box::pin(async move {
            // A leftover from an earlier attempt goes first (create_workload_veth does that).
            let peer = Peer {
                name: ifname,
                netns_fd: Some(netns_fd),
                mtu: Some(mtu),
            };
            Ok(calico_hostlink::create_workload_veth(h, &host_veth, &peer).await?)
        })
    })?;
    // From here on both ends are ours: a failure removes them.
    *created = true;
    calico_hostlink::configure_host_end(&plan.host_veth, !v6.is_empty())
        .map_err(io_fail(format!("configuring {}", plan.host_veth)))?;

    // Workload side, from a thread inside its namespace.
    let ifname = plan.ifname.clone();
    let addresses = plan.addresses.clone();
    let has_v4 = !v4.is_empty();
    let has_v6 = !v6.is_empty();
    let container_mac = with_netlink(Some(&plan.netns), move |h| {
        Box::pin(async move {
            let (index, mac) = link_index(h, &ifname).await?.ok_or_else(|| WiringError {
                action: format!("finding {ifname} in the workload"),
                message: "not there after creating the veth".into(),
            })?;
            if has_v6 {
                // Addresses are usable at once; the host end is the only neighbour.
                write_sysctl(&format!("/proc/sys/net/ipv6/conf/{ifname}/accept_dad"), "0")?;
            }
            if let Some((lo, _)) = link_index(h, "lo").await? {
                h.link()
                    .set(LinkUnspec::new_with_index(lo).up().build())
                    .execute()
                    .await
                    .map_err(fail("bringing lo up"))?;
            }
            h.link()
                .set(LinkUnspec::new_with_index(index).up().build())
                .execute()
                .await
                .map_err(fail(format!("bringing {ifname} up")))?;
            for a in &addresses {
                h.address()
                    .add(index, a.addr(), a.prefix_len())
                    .replace()
                    .execute()
                    .await
                    .map_err(fail(format!("adding {a} to {ifname}")))?;
            }
            if has_v4 {
                let gw = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(GATEWAY_V4, 32)
                    .output_interface(index)
                    .scope(RouteScope::Link)
                    .build();
                add_route(h, gw, "the route to 169.254.1.1").await?;
                let default = RouteMessageBuilder::<Ipv4Addr>::new()
                    .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
                    .gateway(GATEWAY_V4)
                    .output_interface(index)
                    .build();
                add_route(h, default, "the IPv4 default route").await?;
                permanent_neighbour(h, index, IpAddr::V4(GATEWAY_V4)).await?;
            }
            if has_v6 {
                permanent_neighbour(h, index, IpAddr::V6(GATEWAY_V6)).await?;
                let default = RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
                    .gateway(GATEWAY_V6)
                    .output_interface(index)
                    .build();
                add_route(h, default, "the IPv6 default route").await?;
            }
            Ok(mac)
        })
    })?;

    // Host end up, and routes to the workload's addresses through it.
    let host_veth = plan.host_veth.clone();
    let addresses = plan.addresses.clone();
    with_netlink(None, move |h| {
        Box::pin(async move {
            h.link()
                .set(LinkUnspec::new_with_index(host_index).up().build())
                .execute()
                .await
                .map_err(fail(format!("bringing {host_veth} up")))?;
            for a in &addresses {
                let route = match a {
                    IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
                        .destination_prefix(n.addr(), 32)
                        .output_interface(host_index)
                        .scope(RouteScope::Link)
                        .build(),
                    IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
                        .destination_prefix(n.addr(), 128)
                        .output_interface(host_index)
                        .build(),
                };
                h.route()
                    .add(route)
                    .replace()
                    .execute()
                    .await
                    .map_err(fail(format!(
                        "adding the host route to {a} via {host_veth}"
                    )))?;
            }
            Ok(())
        })
    })?;
    Ok(Wired {
        host_mac: calico_hostlink::mac_string(&HOST_MAC),
        container_mac,
    })
}

async fn add_route(
    h: &Handle,
    route: rtnetlink::packet_route::route::RouteMessage,
    what: &str,
) -> Result<(), WiringError> {
    h.route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(fail(format!("adding {what}")))
}

/// The gateway's neighbour entry: the host end's MAC, permanent, so no ARP/ND is needed.
async fn permanent_neighbour(h: &Handle, index: u32, ip: IpAddr) -> Result<(), WiringError> {
    h.neighbours()
        .add(index, ip)
        .link_layer_address(&HOST_MAC)
        .state(NeighbourState::Permanent)
        .replace()
        .execute()
        .await
        .map_err(fail(format!("adding the {ip} neighbour")))
}

/// Deletes link `name` if it exists; says whether it did.
async fn delete_link(h: &Handle, name: &str) -> Result<bool, WiringError> {
    Ok(calico_hostlink::delete_link(h, name).await?)
}

/// Deletes the veth (from the host end, or from inside the workload when the host end is
/// gone). Deleting what is already gone succeeds.
pub fn unwire(host_veth: &str, netns: Option<&Path>, ifname: &str) -> Result<(), WiringError> {
    let host = host_veth.to_owned();
    let deleted = with_netlink(None, move |h| {
        Box::pin(async move { delete_link(h, &host).await })
    })?;
    if deleted {
        return Ok(());
    }
    let Some(netns) = netns.filter(|p| p.exists()) else {
        return Ok(());
    };
    let ifname = ifname.to_owned();
    with_netlink(Some(netns), move |h| {
        Box::pin(async move { delete_link(h, &ifname).await.map(drop) })
    })
}

/// Whether the host end exists.
pub fn host_link_exists(host_veth: &str) -> Result<bool, WiringError> {
    let host = host_veth.to_owned();
    with_netlink(None, move |h| {
        Box::pin(async move { Ok(link_index(h, &host).await?.is_some()) })
    })
}

/// CHECK: the workload interface exists in `netns` with `addresses`, its default routes point
/// at the gateway, and the host end exists with a route to each address. Returns what is wrong.
pub fn check(plan: &Plan) -> Result<Vec<String>, WiringError> {
    let mut problems = Vec::new();
    let host = plan.host_veth.clone();
    let addresses = plan.addresses.clone();
    let host_problems = with_netlink(None, move |h| {
        Box::pin(async move {
            let mut problems = Vec::new();
            let Some((index, _)) = link_index(h, &host).await? else {
                return Ok(vec![format!("host interface {host} does not exist")]);
            };
            for a in &addresses {
                let found = routes_via(h, a, index).await?;
                if !found {
                    problems.push(format!("no host route to {a} via {host}"));
                }
            }
            Ok(problems)
        })
    })?;
    problems.extend(host_problems);
    let ifname = plan.ifname.clone();
    let addresses = plan.addresses.clone();
    let inside = with_netlink(Some(&plan.netns), move |h| {
        Box::pin(async move {
            let mut problems = Vec::new();
            let Some((index, _)) = link_index(h, &ifname).await? else {
                return Ok(vec![format!(
                    "interface {ifname} does not exist in the workload"
                )]);
            };
            let mut have = Vec::new();
            let mut stream = h.address().get().set_link_index_filter(index).execute();
            while let Some(msg) = stream.try_next().await.map_err(fail("listing addresses"))? {
                for attr in msg.attributes {
                    if let rtnetlink::packet_route::address::AddressAttribute::Address(ip) = attr {
                        have.push(IpNet::new(ip, msg.header.prefix_len).expect("kernel prefix"));
                    }
                }
            }
            for a in &addresses {
                if !have.contains(a) {
                    problems.push(format!("{ifname} lacks address {a} (has {have:?})"));
                }
            }
            for (family_default, v4) in [("0.0.0.0/0", true), ("::/0", false)] {
                if !addresses.iter().any(|a| a.addr().is_ipv4() == v4) {
                    continue;
                }
                let dst: IpNet = family_default.parse().expect("constant");
                if !routes_via(h, &dst, index).await? {
                    problems.push(format!("{ifname} has no default route {family_default}"));
                }
            }
            Ok(problems)
        })
    })?;
    problems.extend(inside);
    Ok(problems)
}

/// Whether a route to exactly `dst` leaves through interface `index`.
async fn routes_via(h: &Handle, dst: &IpNet, index: u32) -> Result<bool, WiringError> {
    use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
    let query = match dst {
        IpNet::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        IpNet::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    let mut routes = h.route().get(query).execute();
    while let Some(route) = routes.try_next().await.map_err(fail("listing routes"))? {
        if route.header.destination_prefix_length != dst.prefix_len() {
            continue;
        }
        let mut matches_dst = dst.prefix_len() == 0;
        let mut matches_if = false;
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                    matches_dst = IpAddr::V4(*a) == dst.addr()
                }
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                    matches_dst = IpAddr::V6(*a) == dst.addr()
                }
                RouteAttribute::Oif(i) => matches_if = *i == index,
                _ => {}
            }
        }
        if matches_dst && matches_if {
            return Ok(true);
        }
    }
    Ok(false)
}
