//! Operations on one block's allocation state (pure).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use calico_model::spec::{AllocationAttribute, IpamBlockSpec};
use ipnet::IpNet;

/// Number of addresses in `cidr` (saturating for huge prefixes, which are never blocks).
pub fn size(cidr: &IpNet) -> usize {
    let bits = u32::from(cidr.max_prefix_len() - cidr.prefix_len());
    1usize.checked_shl(bits).unwrap_or(usize::MAX)
}

/// Offset of `ip` in `block`, if it lies there.
pub fn ordinal(block: &IpNet, ip: IpAddr) -> Option<usize> {
    if !block.contains(&ip) {
        return None;
    }
    let offset = match (block.network(), ip) {
        (IpAddr::V4(n), IpAddr::V4(a)) => u128::from(u32::from(a) - u32::from(n)),
        (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) - u128::from(n),
        _ => return None,
    };
    usize::try_from(offset).ok()
}

/// The address at `ordinal` in `block`.
pub fn address(block: &IpNet, ordinal: usize) -> IpAddr {
    match block.network() {
        IpAddr::V4(n) => IpAddr::V4((u32::from(n).wrapping_add(ordinal as u32)).into()),
        IpAddr::V6(n) => IpAddr::V6((u128::from(n).wrapping_add(ordinal as u128)).into()),
    }
}

/// A fresh, empty block, affine to `node` when given.
pub fn new_block(cidr: &IpNet, node: Option<&str>) -> IpamBlockSpec {
    let n = size(cidr);
    IpamBlockSpec {
        cidr: cidr.to_string(),
        affinity: node.map(|n| format!("host:{n}")),
        allocations: vec![None; n],
        unallocated: (0..n).collect(),
        ..Default::default()
    }
}

/// Addresses still free, not counting those `reserved` covers.
pub fn free(spec: &IpamBlockSpec, cidr: &IpNet, reserved: &[IpNet]) -> usize {
    spec.unallocated
        .iter()
        .filter(|o| !is_reserved(&address(cidr, **o), reserved))
        .count()
}

fn is_reserved(ip: &IpAddr, reserved: &[IpNet]) -> bool {
    reserved.iter().any(|r| r.contains(ip))
}

fn attribute_index(
    spec: &mut IpamBlockSpec,
    handle: &str,
    attrs: &BTreeMap<String, String>,
) -> usize {
    let wanted = AllocationAttribute {
        handle_id: Some(handle.to_owned()),
        secondary: attrs.clone(),
    };
    match spec.attributes.iter().position(|a| a == &wanted) {
        Some(i) => i,
        None => {
            spec.attributes.push(wanted);
            spec.attributes.len() - 1
        }
    }
}

/// Takes up to `count` free addresses in the block's hand-out order, skipping reserved ones,
/// and records them for `handle`. Returns the addresses taken (fewer when the block runs out).
pub fn assign(
    spec: &mut IpamBlockSpec,
    cidr: &IpNet,
    count: usize,
    handle: &str,
    attrs: &BTreeMap<String, String>,
    reserved: &[IpNet],
) -> Vec<IpAddr> {
    let chosen: Vec<usize> = spec
        .unallocated
        .iter()
        .copied()
        .filter(|o| !is_reserved(&address(cidr, *o), reserved))
        .take(count)
        .collect();
    if chosen.is_empty() {
        return Vec::new();
    }
    let attr = attribute_index(spec, handle, attrs);
    spec.unallocated.retain(|o| !chosen.contains(o));
    for &o in &chosen {
        spec.allocations[o] = Some(attr);
    }
    spec.sequence_number = Some(spec.sequence_number.unwrap_or(0) + 1);
    chosen.into_iter().map(|o| address(cidr, o)).collect()
}

/// Assigns exactly `ip` to `handle`; `false` when it is already taken or not in the block.
pub fn assign_ip(
    spec: &mut IpamBlockSpec,
    cidr: &IpNet,
    ip: IpAddr,
    handle: &str,
    attrs: &BTreeMap<String, String>,
) -> bool {
    let Some(o) = ordinal(cidr, ip) else {
        return false;
    };
    if spec.allocations.get(o).copied().flatten().is_some() {
        return false;
    }
    let attr = attribute_index(spec, handle, attrs);
    spec.allocations[o] = Some(attr);
    spec.unallocated.retain(|u| *u != o);
    spec.sequence_number = Some(spec.sequence_number.unwrap_or(0) + 1);
    true
}

/// Releases `ips` that are allocated in this block. Returns, per handle, how many were
/// released, and the addresses that were not allocated here.
pub fn release(
    spec: &mut IpamBlockSpec,
    cidr: &IpNet,
    ips: &[IpAddr],
) -> (BTreeMap<String, usize>, Vec<IpAddr>) {
    let mut per_handle = BTreeMap::new();
    let mut not_allocated = Vec::new();
    for ip in ips {
        let slot = ordinal(cidr, *ip).and_then(|o| spec.allocations[o].map(|a| (o, a)));
        let Some((o, attr)) = slot else {
            not_allocated.push(*ip);
            continue;
        };
        let handle = spec.attributes[attr].handle_id.clone().unwrap_or_default();
        *per_handle.entry(handle).or_default() += 1;
        spec.allocations[o] = None;
        spec.unallocated.push(o);
    }
    compact_attributes(spec);
    (per_handle, not_allocated)
}

/// Releases every address `handle` holds here; returns them.
pub fn release_handle(spec: &mut IpamBlockSpec, cidr: &IpNet, handle: &str) -> Vec<IpAddr> {
    let held = held_by(spec, cidr, handle);
    release(spec, cidr, &held);
    held
}

/// Addresses held by `handle` in this block.
pub fn held_by(spec: &IpamBlockSpec, cidr: &IpNet, handle: &str) -> Vec<IpAddr> {
    spec.allocations
        .iter()
        .enumerate()
        .filter_map(|(o, a)| {
            let attr = (*a)?;
            (spec.attributes.get(attr)?.handle_id.as_deref() == Some(handle))
                .then(|| address(cidr, o))
        })
        .collect()
}

/// Handles of the allocations made for `node` (the `node` attribute the CNI plugin records).
pub fn handles_of_node(spec: &IpamBlockSpec, node: &str) -> BTreeSet<String> {
    spec.allocations
        .iter()
        .flatten()
        .filter_map(|a| spec.attributes.get(*a))
        .filter(|attr| attr.secondary.get("node").is_some_and(|n| n == node))
        .filter_map(|attr| attr.handle_id.clone())
        .collect()
}

/// Whether nothing is allocated.
pub fn is_empty(spec: &IpamBlockSpec) -> bool {
    spec.allocations.iter().all(Option::is_none)
}

/// Drops attributes no allocation refers to, renumbering the rest.
fn compact_attributes(spec: &mut IpamBlockSpec) {
    let mut used = vec![false; spec.attributes.len()];
    for a in spec.allocations.iter().flatten() {
        if let Some(u) = used.get_mut(*a) {
            *u = true;
        }
    }
    let mut remap = Vec::with_capacity(used.len());
    let mut next = 0;
    for u in &used {
        remap.push(next);
        if *u {
            next += 1;
        }
    }
    let mut i = 0;
    spec.attributes.retain(|_| {
        let keep = used[i];
        i += 1;
        keep
    });
    for a in spec.allocations.iter_mut().flatten() {
        *a = remap[*a];
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_come_out_in_order_and_go_back() {
        let cidr = net("10.0.0.0/30");
        let mut b = new_block(&cidr, Some("n1"));
        let attrs = BTreeMap::from([("pod".to_owned(), "a".to_owned())]);
        let got = assign(&mut b, &cidr, 3, "h1", &attrs, &[]);
        assert_eq!(
            got,
            ["10.0.0.0", "10.0.0.1", "10.0.0.2"].map(|s| s.parse::<IpAddr>().unwrap())
        );
        assert_eq!(free(&b, &cidr, &[]), 1);
        assert_eq!(b.attributes.len(), 1, "one handle, one attribute");
        let more = assign(&mut b, &cidr, 5, "h2", &BTreeMap::new(), &[]);
        assert_eq!(more.len(), 1, "only one address left");
        assert!(assign(&mut b, &cidr, 1, "h3", &BTreeMap::new(), &[]).is_empty());

        let released = release_handle(&mut b, &cidr, "h1");
        assert_eq!(released.len(), 3);
        assert_eq!(b.attributes.len(), 1, "h1's attribute is dropped");
        assert_eq!(
            held_by(&b, &cidr, "h2"),
            ["10.0.0.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(free(&b, &cidr, &[]), 3);
    }

    #[test]
    fn reserved_addresses_are_never_handed_out() {
        let cidr = net("10.0.0.0/29");
        let mut b = new_block(&cidr, None);
        let reserved = [net("10.0.0.0/31"), net("10.0.0.5/32")];
        let got = assign(&mut b, &cidr, 8, "h", &BTreeMap::new(), &reserved);
        let got: Vec<String> = got.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.6", "10.0.0.7"]
        );
    }

    #[test]
    fn assign_ip_refuses_taken_and_foreign_addresses() {
        let cidr = net("fd00::/126");
        let mut b = new_block(&cidr, None);
        let ip: IpAddr = "fd00::2".parse().unwrap();
        assert!(assign_ip(&mut b, &cidr, ip, "h", &BTreeMap::new()));
        assert!(!assign_ip(&mut b, &cidr, ip, "h2", &BTreeMap::new()));
        assert!(!assign_ip(
            &mut b,
            &cidr,
            "fd01::1".parse().unwrap(),
            "h",
            &BTreeMap::new()
        ));
        let (per_handle, missing) = release(&mut b, &cidr, &[ip, "fd00::1".parse().unwrap()]);
        assert_eq!(per_handle, BTreeMap::from([("h".to_owned(), 1)]));
        assert_eq!(missing, ["fd00::1".parse::<IpAddr>().unwrap()]);
    }

    proptest! {
        /// Any sequence of assigns and releases keeps the block consistent: every address is
        /// either allocated or unallocated, never both, never handed out twice.
        #[test]
        fn block_state_stays_consistent(ops in prop::collection::vec((0u8..3, 0usize..5, 0usize..4), 1..60)) {
            let cidr = net("10.1.0.0/28");
            let mut b = new_block(&cidr, Some("n"));
            let mut held: BTreeMap<String, BTreeSet<IpAddr>> = BTreeMap::new();
            for (op, n, h) in ops {
                let handle = format!("h{h}");
                match op {
                    0 => {
                        let got = assign(&mut b, &cidr, n, &handle, &BTreeMap::new(), &[]);
                        for ip in got {
                            let fresh = held.values().all(|s| !s.contains(&ip));
                            prop_assert!(fresh, "{} handed out twice", ip);
                            held.entry(handle.clone()).or_default().insert(ip);
                        }
                    }
                    1 => {
                        let got = release_handle(&mut b, &cidr, &handle);
                        let expected = held.remove(&handle).unwrap_or_default();
                        prop_assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), expected);
                    }
                    _ => {
                        let ip = address(&cidr, n);
                        let (per_handle, _) = release(&mut b, &cidr, &[ip]);
                        for (h, count) in per_handle {
                            prop_assert_eq!(count, 1);
                            prop_assert!(held.get_mut(&h).unwrap().remove(&ip));
                        }
                    }
                }
                let allocated = b.allocations.iter().filter(|a| a.is_some()).count();
                prop_assert_eq!(allocated + b.unallocated.len(), size(&cidr));
                let total: usize = held.values().map(BTreeSet::len).sum();
                prop_assert_eq!(allocated, total);
                for a in b.allocations.iter().flatten() {
                    prop_assert!(*a < b.attributes.len());
                }
            }
        }
    }
}
