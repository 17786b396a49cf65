//! `calicoctl ipam show|check|release`, over the IPAM objects in the datastore.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    process::ExitCode,
};

use anyhow::{anyhow, bail, Result};
use calico_datastore::Datastore;
use calico_ipam::{block, Ipam};
use calico_model::{spec::IpamBlockSpec, Kind, Resource};
use clap::Subcommand;
use ipnet::IpNet;

use crate::{output::boxed, resources::connect};

#[derive(Subcommand)]
pub enum IpamCommand {
    /// Show how much of each pool is in use (and per block, or one address).
    #[command(
        after_help = "Examples:\n  calicoctl ipam show\n  calicoctl ipam show --show-blocks\n  calicoctl ipam show --ip=10.244.0.5"
    )]
    Show {
        #[arg(long)]
        show_blocks: bool,
        /// Show who holds this address.
        #[arg(long)]
        ip: Option<IpAddr>,
    },
    /// Look for leaked addresses and inconsistent IPAM data, and on this host for workload
    /// interfaces no endpoint uses (and endpoints whose interface is gone); exits 1 unless
    /// clean.
    #[command(
        after_help = "Examples:\n  calicoctl ipam check\n  calicoctl ipam check --node node1 --interface-prefix cali"
    )]
    Check {
        /// The node this host is, whose workload interfaces are checked (default: $NODENAME,
        /// else /var/lib/calico/nodename; with neither, interfaces are not checked).
        #[arg(long)]
        node: Option<String>,
        /// Prefix of workload interface names (FelixConfiguration interfacePrefix).
        #[arg(long, default_value = "cali")]
        interface_prefix: String,
    },
    /// Release an address back to its pool. An address a workload endpoint still uses is
    /// refused: another workload would get it. `--force` releases it anyway.
    #[command(after_help = "Examples:\n  calicoctl ipam release --ip=10.244.0.5")]
    Release {
        #[arg(long)]
        ip: IpAddr,
        /// Release even an address that a workload endpoint uses.
        #[arg(long)]
        force: bool,
    },
}

pub async fn run(config: Option<&Path>, cmd: IpamCommand) -> Result<ExitCode> {
    let store = connect(config).await?;
    match cmd {
        IpamCommand::Show { show_blocks, ip } => show(&store, show_blocks, ip).await,
        IpamCommand::Check {
            node,
            interface_prefix,
        } => {
            check(
                &store,
                node.or_else(this_node).as_deref(),
                &interface_prefix,
            )
            .await
        }
        IpamCommand::Release { ip, force } => release(&store, ip, force).await,
    }
}

fn blocks(resources: &[Resource]) -> Vec<(IpNet, &IpamBlockSpec, &Resource)> {
    resources
        .iter()
        .filter_map(|r| match r {
            Resource::IPAMBlock(b) => b.spec.cidr.parse().ok().map(|c| (c, &b.spec, r)),
            _ => None,
        })
        .collect()
}

fn size(net: &IpNet) -> u128 {
    block::size(net) as u128
}

fn in_use(spec: &IpamBlockSpec) -> u128 {
    spec.allocations.iter().filter(|a| a.is_some()).count() as u128
}

fn percent(part: u128, whole: u128) -> String {
    if whole == 0 {
        return "0%".into();
    }
    format!("{}%", part * 100 / whole)
}

async fn show(store: &Datastore, show_blocks: bool, ip: Option<IpAddr>) -> Result<ExitCode> {
    let (block_objects, _) = store.list(Kind::IPAMBlock, None).await?;
    let blocks = blocks(&block_objects);
    if let Some(ip) = ip {
        let Some((cidr, spec, _)) = blocks.iter().find(|(c, _, _)| c.contains(&ip)) else {
            println!("IP {ip} is not in any IPAM block (not assigned)");
            return Ok(ExitCode::SUCCESS);
        };
        let slot =
            block::ordinal(cidr, ip).and_then(|o| spec.allocations.get(o).copied().flatten());
        match slot {
            Some(attr) => {
                println!("IP {ip} is in use");
                if let Some(a) = spec.attributes.get(attr) {
                    if let Some(h) = &a.handle_id {
                        println!("  handle: {h}");
                    }
                    for (k, v) in &a.secondary {
                        println!("  {k}: {v}");
                    }
                }
            }
            None => println!("IP {ip} is not assigned (block {cidr})"),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let (pools, _) = store.list(Kind::IPPool, None).await?;
    let mut rows = Vec::new();
    for pool in &pools {
        let Resource::IPPool(p) = pool else { continue };
        let Ok(pool_cidr) = p.spec.cidr.parse::<IpNet>() else {
            continue;
        };
        let total = size(&pool_cidr);
        let mine: Vec<_> = blocks
            .iter()
            .filter(|(c, _, _)| pool_cidr.contains(&c.network()))
            .collect();
        let used: u128 = mine.iter().map(|(_, s, _)| in_use(s)).sum();
        rows.push(vec![
            "IP Pool".into(),
            pool_cidr.to_string(),
            total.to_string(),
            format!("{used} ({})", percent(used, total)),
            format!("{} ({})", total - used, percent(total - used, total)),
        ]);
        if show_blocks {
            for (c, s, _) in mine {
                let (t, u) = (size(c), in_use(s));
                rows.push(vec![
                    "Block".into(),
                    c.to_string(),
                    t.to_string(),
                    format!("{u} ({})", percent(u, t)),
                    format!("{} ({})", t - u, percent(t - u, t)),
                ]);
            }
        }
    }
    print!(
        "{}",
        boxed(
            &["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS FREE"],
            &rows
        )
    );
    Ok(ExitCode::SUCCESS)
}

/// The node this host is, when it says so (calico-node's environment or its nodename file).
/// Not the hostname: run from an admin machine, `ipam check` checks the datastore only.
fn this_node() -> Option<String> {
    std::env::var("NODENAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/var/lib/calico/nodename")
                .ok()
                .map(|n| n.trim().to_owned())
                .filter(|n| !n.is_empty())
        })
}

/// Workload interfaces of this host against the endpoints of `node`: a veth no endpoint
/// names is an orphan (a crashed or interrupted ADD, a DEL that never came); an endpoint
/// whose veth is gone is stale.
async fn check_interfaces(
    endpoints: &[Resource],
    node: &str,
    prefix: &str,
    problems: &mut Vec<String>,
) -> Result<usize> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    let task = tokio::spawn(conn);
    let veths = calico_hostlink::veth_names(&handle, prefix).await;
    task.abort();
    let veths: BTreeSet<String> = veths?.into_iter().collect();
    let mut named = BTreeSet::new();
    for r in endpoints {
        let Resource::WorkloadEndpoint(w) = r else {
            continue;
        };
        if w.spec.node != node || w.spec.interface_name.is_empty() {
            continue;
        }
        named.insert(w.spec.interface_name.clone());
        if !veths.contains(&w.spec.interface_name) {
            problems.push(format!(
                "endpoint {}/{}: its interface {} is not on this host (node {node})",
                w.metadata.namespace.as_deref().unwrap_or("default"),
                w.metadata.name,
                w.spec.interface_name
            ));
        }
    }
    for veth in veths.difference(&named) {
        problems.push(format!(
            "interface {veth}: no workload endpoint of node {node} uses it (orphan veth)"
        ));
    }
    Ok(veths.len())
}

async fn check(store: &Datastore, node: Option<&str>, prefix: &str) -> Result<ExitCode> {
    let (block_objects, _) = store.list(Kind::IPAMBlock, None).await?;
    let (handles, _) = store.list(Kind::IPAMHandle, None).await?;
    let (endpoints, _) = store.list(Kind::WorkloadEndpoint, None).await?;
    let blocks = blocks(&block_objects);
    // Address → the endpoints that use it (more than one is a problem).
    let users = endpoint_users(&endpoints);
    let endpoint_ips: BTreeSet<IpAddr> = users.keys().copied().collect();
    let handle_counts: BTreeMap<String, BTreeMap<String, usize>> = handles
        .iter()
        .filter_map(|r| match r {
            Resource::IPAMHandle(h) => Some((h.spec.handle_id.clone(), h.spec.block.clone())),
            _ => None,
        })
        .collect();

    let mut problems = Vec::new();
    let mut allocations = 0;
    let mut seen_per_handle: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (cidr, spec, _) in &blocks {
        for (ordinal, slot) in spec.allocations.iter().enumerate() {
            let Some(attr_index) = slot else { continue };
            allocations += 1;
            let ip = block::address(cidr, ordinal);
            let Some(attr) = spec.attributes.get(*attr_index) else {
                problems.push(format!(
                    "{ip}: allocation points at missing attribute {attr_index} in block {cidr}"
                ));
                continue;
            };
            let handle = attr.handle_id.clone().unwrap_or_default();
            *seen_per_handle
                .entry(handle.clone())
                .or_default()
                .entry(cidr.to_string())
                .or_default() += 1;
            if !handle_counts.contains_key(&handle) {
                problems.push(format!(
                    "{ip}: allocated to handle `{handle}`, which does not exist"
                ));
            }
            let is_tunnel = attr
                .secondary
                .get("type")
                .is_some_and(|t| t.contains("unnel"));
            if !is_tunnel && !endpoint_ips.contains(&ip) {
                problems.push(format!(
                    "{ip}: allocated (handle `{handle}`) but no workload endpoint uses it (leaked)"
                ));
            }
        }
    }
    let allocated: BTreeSet<IpAddr> = blocks
        .iter()
        .flat_map(|(cidr, spec, _)| {
            spec.allocations
                .iter()
                .enumerate()
                .filter(|(_, slot)| slot.is_some())
                .map(move |(ordinal, _)| block::address(cidr, ordinal))
        })
        .collect();
    for (ip, names) in &users {
        if names.len() > 1 {
            problems.push(format!(
                "{ip}: used by {} workload endpoints at once: {}",
                names.len(),
                names.join(", ")
            ));
        }
        if !allocated.contains(ip) {
            problems.push(format!(
                "{ip}: used by workload endpoint {} but not allocated in IPAM (another workload may get it)",
                names.join(", ")
            ));
        }
    }
    for (handle, blocks) in &handle_counts {
        let seen = seen_per_handle.get(handle).cloned().unwrap_or_default();
        if seen.is_empty() {
            problems.push(format!(
                "handle `{handle}` holds no address (leaked handle)"
            ));
        } else if &seen != blocks {
            problems.push(format!(
                "handle `{handle}` records {blocks:?} but the blocks hold {seen:?}"
            ));
        }
    }
    let interfaces = match node {
        Some(node) => {
            let n = check_interfaces(&endpoints, node, prefix, &mut problems).await?;
            format!(", {n} `{prefix}*` interface(s) of node {node}")
        }
        None => String::new(),
    };
    println!(
        "Checked {} block(s), {allocations} allocation(s), {} handle(s), {} workload endpoint address(es){interfaces}",
        blocks.len(),
        handle_counts.len(),
        endpoint_ips.len()
    );
    if problems.is_empty() {
        println!("IPAM is clean: no problems found");
        return Ok(ExitCode::SUCCESS);
    }
    for p in &problems {
        println!("  - {p}");
    }
    println!("Found {} problem(s)", problems.len());
    Ok(ExitCode::FAILURE)
}

/// Every address workload endpoints use, with the endpoints (`namespace/name`) using it.
fn endpoint_users(endpoints: &[Resource]) -> BTreeMap<IpAddr, Vec<String>> {
    let mut users: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
    for r in endpoints {
        let Resource::WorkloadEndpoint(w) = r else {
            continue;
        };
        let name = format!(
            "{}/{}",
            w.metadata.namespace.as_deref().unwrap_or("default"),
            w.metadata.name
        );
        for net in &w.spec.ip_networks {
            if let Ok(net) = net.parse::<IpNet>() {
                users.entry(net.addr()).or_default().push(name.clone());
            }
        }
    }
    users
}

async fn release(store: &Datastore, ip: IpAddr, force: bool) -> Result<ExitCode> {
    if !force {
        let (endpoints, _) = store.list(Kind::WorkloadEndpoint, None).await?;
        if let Some(names) = endpoint_users(&endpoints).get(&ip) {
            bail!(
                "IP {ip} is in use by workload endpoint {}: releasing it would let another \
                 workload get it (use --force if that workload is gone)",
                names.join(", ")
            );
        }
    }
    // The node name only matters for assigning; releasing works on any node's blocks.
    let ipam = Ipam::new(store.clone(), "calicoctl");
    let not_allocated = ipam
        .release_ips(&[ip])
        .await
        .map_err(|e| anyhow!("cannot release {ip}: {e}"))?;
    if not_allocated.contains(&ip) {
        bail!("IP {ip} is not assigned");
    }
    println!("Successfully released IP {ip}");
    Ok(ExitCode::SUCCESS)
}
