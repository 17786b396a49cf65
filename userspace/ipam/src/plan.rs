//! Choosing pools and blocks (pure).

use std::collections::{BTreeMap, BTreeSet};

use calico_model::{
    spec::{IpPoolAllowedUse, IpPoolSpec},
    Resource,
};
use calico_selector::Selector;
use ipnet::IpNet;

/// IP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// A pool usable for workload addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub name: String,
    pub cidr: IpNet,
    pub block_size: u8,
}

/// The enabled pools of `family` for workloads on a node with `node_labels`, in name order.
/// `only` restricts to pools named or with that CIDR (as the CNI `ipv4_pools` option does).
pub fn usable_pools(
    pools: &[Resource],
    family: Family,
    node_labels: &BTreeMap<String, String>,
    only: &[String],
) -> Vec<Pool> {
    let mut out: Vec<Pool> = pools
        .iter()
        .filter_map(|r| match r {
            Resource::IPPool(p) => Some((p.metadata.name.clone(), &p.spec)),
            _ => None,
        })
        .filter_map(|(name, spec)| usable(&name, spec, family, node_labels, only))
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn usable(
    name: &str,
    spec: &IpPoolSpec,
    family: Family,
    node_labels: &BTreeMap<String, String>,
    only: &[String],
) -> Option<Pool> {
    let cidr: IpNet = spec.cidr.parse().ok()?;
    if Family::of(&cidr) != family || spec.is_disabled() {
        return None;
    }
    let for_workloads =
        spec.allowed_uses.is_empty() || spec.allowed_uses.contains(&IpPoolAllowedUse::Workload);
    if !for_workloads {
        return None;
    }
    if !only.is_empty() && !only.iter().any(|o| o == name || o == &spec.cidr) {
        return None;
    }
    let selected = match &spec.node_selector {
        Some(text) => Selector::parse(text).is_ok_and(|s| s.matches(node_labels)),
        None => true,
    };
    if !selected {
        return None;
    }
    let block_size = u8::try_from(spec.block_size_or_default()).ok()?;
    Some(Pool {
        name: name.to_owned(),
        cidr: cidr.trunc(),
        block_size,
    })
}

/// The first block of `pool` that no existing block occupies, in address order.
pub fn next_free_block(pool: &Pool, existing: &BTreeSet<IpNet>) -> Option<IpNet> {
    let mut blocks = pool.cidr.subnets(pool.block_size).ok()?;
    blocks.find(|candidate| !existing.contains(candidate))
}

#[cfg(test)]
mod tests {
    use calico_model::parse_documents;

    use super::*;

    fn pools(text: &str) -> Vec<Resource> {
        parse_documents(text).unwrap()
    }

    const POOLS: &str = "\
apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: b-pool}\nspec: {cidr: 10.2.0.0/16}\n---
apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: a-pool}\nspec: {cidr: 10.1.0.0/16, blockSize: 28}\n---
apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: off}\nspec: {cidr: 10.3.0.0/16, disabled: true}\n---
apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: rack2}\nspec: {cidr: 10.4.0.0/16, nodeSelector: \"rack == '2'\"}\n---
apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: tunnels}\nspec: {cidr: 10.5.0.0/16, allowedUses: [Tunnel]}\n---
apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: v6}\nspec: {cidr: 'fd00:1::/64'}\n";

    #[test]
    fn picks_enabled_selected_workload_pools_of_the_family() {
        let all = pools(POOLS);
        let rack1 = BTreeMap::from([("rack".to_owned(), "1".to_owned())]);
        let rack2 = BTreeMap::from([("rack".to_owned(), "2".to_owned())]);
        let names = |ps: Vec<Pool>| ps.into_iter().map(|p| p.name).collect::<Vec<_>>();
        assert_eq!(
            names(usable_pools(&all, Family::V4, &rack1, &[])),
            ["a-pool", "b-pool"]
        );
        assert_eq!(
            names(usable_pools(&all, Family::V4, &rack2, &[])),
            ["a-pool", "b-pool", "rack2"]
        );
        assert_eq!(names(usable_pools(&all, Family::V6, &rack1, &[])), ["v6"]);
        assert_eq!(
            names(usable_pools(
                &all,
                Family::V4,
                &rack2,
                &["10.2.0.0/16".into()]
            )),
            ["b-pool"]
        );
        let v6 = &usable_pools(&all, Family::V6, &rack1, &[])[0];
        assert_eq!(v6.block_size, 122);
    }

    #[test]
    fn next_free_block_skips_claimed_ones() {
        let pool = Pool {
            name: "p".into(),
            cidr: "10.0.0.0/24".parse().unwrap(),
            block_size: 26,
        };
        let mut existing = BTreeSet::new();
        assert_eq!(
            next_free_block(&pool, &existing),
            Some("10.0.0.0/26".parse().unwrap())
        );
        existing.insert("10.0.0.0/26".parse().unwrap());
        existing.insert("10.0.0.128/26".parse().unwrap());
        assert_eq!(
            next_free_block(&pool, &existing),
            Some("10.0.0.64/26".parse().unwrap())
        );
        existing.insert("10.0.0.64/26".parse().unwrap());
        existing.insert("10.0.0.192/26".parse().unwrap());
        assert_eq!(next_free_block(&pool, &existing), None);
    }
}
