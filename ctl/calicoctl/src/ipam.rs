//! `calicoctl ipam show|check|release`, over the IPAM objects in the datastore.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    process::ExitCode,
};

use anyhow::{anyhow, bail, Result};
use calico_datastore::{Datastore, DatastoreError};
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
    /// Look for leaked addresses and inconsistent IPAM data; exits 1 unless clean.
    #[command(after_help = "Examples:\n  calicoctl ipam check")]
    Check,
    /// Release an address back to its pool.
    #[command(after_help = "Examples:\n  calicoctl ipam release --ip=10.244.0.5")]
    Release {
        #[arg(long)]
        ip: IpAddr,
    },
}

pub async fn run(config: Option<&Path>, cmd: IpamCommand) -> Result<ExitCode> {
    let store = connect(config).await?;
    match cmd {
        IpamCommand::Show { show_blocks, ip } => show(&store, show_blocks, ip).await,
        IpamCommand::Check => check(&store).await,
        IpamCommand::Release { ip } => release(&store, ip).await,
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
    let bits = if net.addr().is_ipv4() { 32 } else { 128 };
    1u128 << (bits - u32::from(net.prefix_len())).min(127)
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
        let ordinal = ordinal(cidr, ip);
        match spec.allocations.get(ordinal).copied().flatten() {
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

fn ordinal(block: &IpNet, ip: IpAddr) -> usize {
    let offset = match (block.network(), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => u128::from(u32::from(a) - u32::from(n)),
        (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) - u128::from(n),
        _ => u128::MAX,
    };
    usize::try_from(offset).unwrap_or(usize::MAX)
}

/// The address at `ordinal` in `block`.
fn address(block: &IpNet, ordinal: usize) -> IpAddr {
    match block.network() {
        IpAddr::V4(n) => IpAddr::V4((u32::from(n) + ordinal as u32).into()),
        IpAddr::V6(n) => IpAddr::V6((u128::from(n) + ordinal as u128).into()),
    }
}

async fn check(store: &Datastore) -> Result<ExitCode> {
    let (block_objects, _) = store.list(Kind::IPAMBlock, None).await?;
    let (handles, _) = store.list(Kind::IPAMHandle, None).await?;
    let (endpoints, _) = store.list(Kind::WorkloadEndpoint, None).await?;
    let blocks = blocks(&block_objects);
    let endpoint_ips: BTreeSet<IpAddr> = endpoints
        .iter()
        .filter_map(|r| match r {
            Resource::WorkloadEndpoint(w) => Some(&w.spec.ip_networks),
            _ => None,
        })
        .flatten()
        .filter_map(|n| n.parse::<IpNet>().ok().map(|n| n.addr()))
        .collect();
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
            let ip = address(cidr, ordinal);
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
    println!(
        "Checked {} block(s), {allocations} allocation(s), {} handle(s), {} workload endpoint address(es)",
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

async fn release(store: &Datastore, ip: IpAddr) -> Result<ExitCode> {
    // The block write is a compare-and-swap; retry when another writer got in first.
    for _ in 0..8 {
        let (block_objects, _) = store.list(Kind::IPAMBlock, None).await?;
        let Some((cidr, _, resource)) = blocks(&block_objects)
            .into_iter()
            .find(|(c, _, _)| c.contains(&ip))
        else {
            bail!("IP {ip} is not in any IPAM block");
        };
        let mut resource = resource.clone();
        let Resource::IPAMBlock(block) = &mut resource else {
            unreachable!("blocks() only yields IPAM blocks")
        };
        let ordinal = ordinal(&cidr, ip);
        let Some(attr_index) = block.spec.allocations.get(ordinal).copied().flatten() else {
            bail!("IP {ip} is not assigned");
        };
        let handle = block
            .spec
            .attributes
            .get(attr_index)
            .and_then(|a| a.handle_id.clone());
        block.spec.allocations[ordinal] = None;
        block.spec.unallocated.push(ordinal);
        // Drop the attribute when nothing refers to it any more, renumbering the rest.
        if !block.spec.allocations.contains(&Some(attr_index)) {
            block.spec.attributes.remove(attr_index);
            for slot in block.spec.allocations.iter_mut().flatten() {
                if *slot > attr_index {
                    *slot -= 1;
                }
            }
        }
        match store.update(resource).await {
            Err(DatastoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        if let Some(handle) = handle {
            release_from_handle(store, &handle, &cidr.to_string()).await?;
        }
        println!("Successfully released IP {ip}");
        return Ok(ExitCode::SUCCESS);
    }
    Err(anyhow!("IP {ip}: the block kept changing; try again"))
}

async fn release_from_handle(store: &Datastore, handle: &str, block: &str) -> Result<()> {
    for _ in 0..8 {
        let mut resource = match store.get(Kind::IPAMHandle, None, handle).await {
            Ok(r) => r,
            Err(DatastoreError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let Resource::IPAMHandle(h) = &mut resource else {
            unreachable!("asked for a handle")
        };
        if let Some(n) = h.spec.block.get_mut(block) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                h.spec.block.remove(block);
            }
        }
        let result = if h.spec.block.is_empty() {
            let rv = resource.metadata().resource_version.clone();
            store
                .delete(Kind::IPAMHandle, None, handle, rv.as_deref())
                .await
                .map(drop)
        } else {
            store.update(resource).await.map(drop)
        };
        match result {
            Err(DatastoreError::Conflict { .. }) => continue,
            other => return other.map_err(Into::into),
        }
    }
    bail!("handle `{handle}` kept changing; try again")
}
