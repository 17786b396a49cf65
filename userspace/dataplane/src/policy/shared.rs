//! The tables programs share, each stored once and counted by its users: nets tables (the
//! rules' own prefixes, by content), peer class tables ((net class, mask) → class, by content)
//! and IP sets (the members a selector stands for, by scope, as upstream's `cali_v4_ip_sets`). Kernel memory grows with distinct sets and their members,
//! not with the number of endpoints that consult them.

use std::{collections::HashMap, sync::Arc};

use aya::maps::lpm_trie::Key;
use calico_bpf_common::{
    PeerClassKey, PeerKeyData, POLICY_IP_SETS_MAP, POLICY_NETS_MAP, POLICY_PEER_CLASSES_MAP,
};
use calico_policy::{PeerSet, SelectorScope};
use ipnet::IpNet;

use super::{map_err, mapped, PolicyDataplane};
use crate::DataplaneError;

/// A program's nets with their net classes: the identity of a shared nets table.
pub(super) type NetPrefixes = Arc<Vec<(IpNet, u32)>>;

/// One nets table in `POLICY_NETS`: its id, its keys, and how many installed programs read it.
pub(super) struct NetsTable {
    pub id: u32,
    pub keys: Vec<Key<PeerKeyData>>,
    pub users: usize,
}

/// A program's (net class, mask, class) entries: the identity of a shared peer class table.
pub(super) type ClassEntries = Arc<Vec<(u32, u64, u32)>>;

/// One peer class table in `POLICY_PEER_CLASSES`: its id and how many programs read it.
pub(super) struct ClassTable {
    pub id: u32,
    pub users: usize,
}

/// The `POLICY_PEER_CLASSES` key of one entry of table `table`.
pub(super) fn class_key(table: u32, (net_class, mask, _): &(u32, u64, u32)) -> PeerClassKey {
    PeerClassKey {
        table,
        net_class: *net_class,
        mask: *mask,
    }
}

/// One IP set in `POLICY_IP_SETS`: its id, members, and how many installed programs read it.
pub(super) struct IpSet {
    pub id: u32,
    pub members: Arc<Vec<IpNet>>,
    pub users: usize,
}

/// The LPM key of `net` under table or set `id`.
pub(super) fn addr_key(id: u32, net: &IpNet) -> Key<PeerKeyData> {
    let len = match net {
        IpNet::V4(n) => 32 + 96 + u32::from(n.prefix_len()),
        IpNet::V6(n) => 32 + u32::from(n.prefix_len()),
    };
    Key::new(
        len,
        PeerKeyData {
            table: id.to_be_bytes(),
            addr: mapped(net.network()),
        },
    )
}

/// What `new` adds to and takes from `old` (both sorted).
fn diff<'a>(old: &'a [IpNet], new: &'a [IpNet]) -> (Vec<&'a IpNet>, Vec<&'a IpNet>) {
    let (mut added, mut removed) = (Vec::new(), Vec::new());
    let (mut i, mut j) = (0, 0);
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                removed.push(a);
                i += 1;
            }
            (Some(a), None) => {
                removed.push(a);
                i += 1;
            }
            (_, Some(b)) => {
                added.push(b);
                j += 1;
            }
            (None, None) => unreachable!(),
        }
    }
    (added, removed)
}

impl PolicyDataplane {
    /// Entries `sets` would add to `POLICY_IP_SETS` (new sets whole, changed sets' new
    /// members).
    pub(super) fn ip_set_growth(&self, sets: &[PeerSet]) -> usize {
        sets.iter()
            .map(|s| match self.ip_sets.get(&s.scope) {
                None => s.members.len(),
                Some(held) if held.members == s.members => 0,
                Some(held) => diff(&held.members, &s.members).0.len(),
            })
            .sum()
    }

    /// Entries in `POLICY_IP_SETS`, from this run's bookkeeping.
    pub(super) fn ip_set_entries(&self) -> usize {
        self.ip_sets.values().map(|s| s.members.len()).sum()
    }

    /// Takes a use of each of `sets`, writing new ones and bringing changed ones to their new
    /// members in place (new members first, then the ones that left: each address switches
    /// atomically, as upstream's IP set updates do; every program reading the set sees it).
    /// Returns their ids in order; on failure the uses taken are given back.
    pub(super) fn acquire_sets(&mut self, sets: &[PeerSet]) -> Result<Vec<u32>, DataplaneError> {
        let mut ids = Vec::with_capacity(sets.len());
        for (n, set) in sets.iter().enumerate() {
            match self.acquire_set(set) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for taken in &sets[..n] {
                        self.release_set(&taken.scope);
                    }
                    return Err(e);
                }
            }
        }
        Ok(ids)
    }

    fn acquire_set(&mut self, set: &PeerSet) -> Result<u32, DataplaneError> {
        if let Some(held) = self.ip_sets.get(&set.scope) {
            let id = held.id;
            if held.members != set.members {
                self.update_set(&set.scope, &set.members)?;
            }
            if let Some(held) = self.ip_sets.get_mut(&set.scope) {
                held.users += 1;
            }
            return Ok(id);
        }
        let id = self.next_ip_set;
        self.next_ip_set = self.next_ip_set.wrapping_add(1).max(1);
        for (n, net) in set.members.iter().enumerate() {
            if let Err(source) = self.ip_set_members.insert(&addr_key(id, net), 1, 0) {
                for written in &set.members[..n] {
                    let _ = self.ip_set_members.remove(&addr_key(id, written));
                }
                return Err(map_err(POLICY_IP_SETS_MAP, "insert")(source));
            }
        }
        self.ip_sets.insert(
            set.scope.clone(),
            IpSet {
                id,
                members: set.members.clone(),
                users: 1,
            },
        );
        Ok(id)
    }

    /// Brings a held set to `members`. On failure the set keeps what it had (members added
    /// so far are taken out again).
    pub(super) fn update_set(
        &mut self,
        scope: &SelectorScope,
        members: &Arc<Vec<IpNet>>,
    ) -> Result<(), DataplaneError> {
        let Some(held) = self.ip_sets.get(scope) else {
            return Ok(());
        };
        let id = held.id;
        let old = held.members.clone();
        let (added, removed) = diff(&old, members);
        for (n, net) in added.iter().enumerate() {
            if let Err(source) = self.ip_set_members.insert(&addr_key(id, net), 1, 0) {
                for written in &added[..n] {
                    let _ = self.ip_set_members.remove(&addr_key(id, written));
                }
                return Err(map_err(POLICY_IP_SETS_MAP, "insert")(source));
            }
        }
        for net in removed {
            let _ = self.ip_set_members.remove(&addr_key(id, net));
        }
        if let Some(held) = self.ip_sets.get_mut(scope) {
            held.members = members.clone();
        }
        Ok(())
    }

    /// A program stops reading a set; the last one out deletes it.
    pub(super) fn release_set(&mut self, scope: &SelectorScope) {
        let Some(held) = self.ip_sets.get_mut(scope) else {
            return;
        };
        held.users -= 1;
        if held.users == 0 {
            if let Some(set) = self.ip_sets.remove(scope) {
                for net in set.members.iter() {
                    let _ = self.ip_set_members.remove(&addr_key(set.id, net));
                }
            }
        }
    }

    /// The nets table holding `prefixes`: an existing one gains a user, or a new one is
    /// written. Returns its id.
    pub(super) fn acquire_nets(&mut self, prefixes: &NetPrefixes) -> Result<u32, DataplaneError> {
        if let Some(table) = self.nets_tables.get_mut(prefixes) {
            table.users += 1;
            return Ok(table.id);
        }
        let id = self.next_nets_table;
        self.next_nets_table = self.next_nets_table.wrapping_add(1).max(1);
        let mut table = NetsTable {
            id,
            keys: Vec::with_capacity(prefixes.len()),
            users: 1,
        };
        for (net, class) in prefixes.iter() {
            let key = addr_key(id, net);
            if let Err(source) = self.nets.insert(&key, class, 0) {
                for k in &table.keys {
                    let _ = self.nets.remove(k);
                }
                return Err(map_err(POLICY_NETS_MAP, "insert")(source));
            }
            table.keys.push(key);
        }
        self.nets_tables.insert(prefixes.clone(), table);
        Ok(id)
    }

    /// A program stops reading a nets table; the last one out deletes it.
    pub(super) fn release_nets(&mut self, prefixes: &NetPrefixes) {
        let Some(table) = self.nets_tables.get_mut(prefixes) else {
            return;
        };
        table.users -= 1;
        if table.users == 0 {
            if let Some(table) = self.nets_tables.remove(prefixes) {
                for k in &table.keys {
                    let _ = self.nets.remove(k);
                }
            }
        }
    }
}

impl PolicyDataplane {
    /// Entries in `POLICY_PEER_CLASSES`.
    pub(super) fn class_entries(&self) -> usize {
        self.class_tables.keys().map(|c| c.len()).sum()
    }

    /// The class table holding `entries`: an existing one gains a user, or a new one is
    /// written. Returns its id.
    pub(super) fn acquire_classes(
        &mut self,
        entries: &ClassEntries,
    ) -> Result<u32, DataplaneError> {
        if let Some(table) = self.class_tables.get_mut(entries) {
            table.users += 1;
            return Ok(table.id);
        }
        let id = self.next_class_table;
        self.next_class_table = self.next_class_table.wrapping_add(1).max(1);
        for (n, entry) in entries.iter().enumerate() {
            if let Err(source) = self.peer_classes.insert(class_key(id, entry), entry.2, 0) {
                for written in &entries[..n] {
                    let _ = self.peer_classes.remove(&class_key(id, written));
                }
                return Err(map_err(POLICY_PEER_CLASSES_MAP, "insert")(source));
            }
        }
        self.class_tables
            .insert(entries.clone(), ClassTable { id, users: 1 });
        Ok(id)
    }

    /// A program stops reading a class table; the last one out deletes it.
    pub(super) fn release_classes(&mut self, entries: &ClassEntries) {
        let Some(table) = self.class_tables.get_mut(entries) else {
            return;
        };
        table.users -= 1;
        if table.users == 0 {
            if let Some(table) = self.class_tables.remove(entries) {
                for entry in entries.iter() {
                    let _ = self.peer_classes.remove(&class_key(table.id, entry));
                }
            }
        }
    }

    /// First half of bringing the class table holding `old`, read by one program alone, to
    /// `new` in place: the new combinations go in (existing ones keep their class: the classes
    /// are the same). `false` (nothing changed) when an entry cannot be written.
    pub(super) fn add_classes_in_place(&mut self, old: &ClassEntries, new: &ClassEntries) -> bool {
        let Some(table) = self.class_tables.get(old) else {
            return false;
        };
        let id = table.id;
        let before: std::collections::HashSet<PeerClassKey> =
            old.iter().map(|e| class_key(id, e)).collect();
        let mut added = Vec::new();
        for entry in new.iter() {
            let key = class_key(id, entry);
            if before.contains(&key) {
                continue;
            }
            if self.peer_classes.insert(key, entry.2, 0).is_err() {
                for k in &added {
                    let _ = self.peer_classes.remove(k);
                }
                return false;
            }
            added.push(key);
        }
        true
    }

    /// Second half, once the sets have their new members: the combinations that can no
    /// longer occur go, and the table is known by its new content.
    pub(super) fn drop_stale_classes(&mut self, old: &ClassEntries, new: &ClassEntries) {
        let Some(table) = self.class_tables.remove(old) else {
            return;
        };
        let after: std::collections::HashSet<PeerClassKey> =
            new.iter().map(|e| class_key(table.id, e)).collect();
        for entry in old.iter() {
            let key = class_key(table.id, entry);
            if !after.contains(&key) {
                let _ = self.peer_classes.remove(&key);
            }
        }
        self.class_tables.insert(new.clone(), table);
    }
}

/// Held sets by scope.
pub(super) type IpSets = HashMap<SelectorScope, IpSet>;

#[cfg(test)]
mod tests {
    use super::diff;
    use ipnet::IpNet;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn diff_finds_added_and_removed_members() {
        let old = nets(&["10.0.0.1/32", "10.0.0.2/32", "10.0.0.4/32"]);
        let new = nets(&["10.0.0.2/32", "10.0.0.3/32", "10.0.0.5/32"]);
        let (added, removed) = diff(&old, &new);
        assert_eq!(
            added,
            nets(&["10.0.0.3/32", "10.0.0.5/32"])
                .iter()
                .collect::<Vec<_>>()
        );
        assert_eq!(
            removed,
            nets(&["10.0.0.1/32", "10.0.0.4/32"])
                .iter()
                .collect::<Vec<_>>()
        );
        assert_eq!(diff(&old, &old), (vec![], vec![]));
        assert_eq!(diff(&[], &old).0.len(), 3);
        assert_eq!(diff(&old, &[]).1.len(), 3);
    }
}
