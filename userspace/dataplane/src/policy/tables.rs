//! Writing a compiled program's tables beside the one in use, switching the endpoint to it in
//! one update, and deleting what it replaced.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::lpm_trie::Key;
use calico_bpf_common::{
    EndpointKey, LocalKey, PeerKeyData, PortKeyData, ProgramRef, ProtoKey, RuleStatKey,
    VerdictKeyData, VerdictValue, ACTION_ALLOW, ACTION_DENY, CONNTRACK_MAP, POLICY_ENDPOINTS_MAP,
    POLICY_LOCALS_MAP, POLICY_PEERS_MAP, POLICY_PROTOS_MAP, POLICY_SPORTS_MAP, POLICY_VERDICTS_MAP,
    VERDICT_FIXED_BITS,
};
use calico_policy::{range_to_prefixes, CompiledProgram, Verdict};
use ipnet::IpNet;

use super::{map_err, mapped, Hook, PeerPrefixes, PeerTable, PolicyDataplane, Written};
use crate::{object::key_missing, DataplaneError};

/// The `POLICY_PEERS` key of `net` in peer table `table`.
fn peer_key(table: u32, net: &IpNet) -> Key<PeerKeyData> {
    let len = match net {
        IpNet::V4(n) => 32 + 96 + u32::from(n.prefix_len()),
        IpNet::V6(n) => 32 + u32::from(n.prefix_len()),
    };
    Key::new(
        len,
        PeerKeyData {
            table: table.to_be_bytes(),
            addr: mapped(net.network()),
        },
    )
}

/// Whether two compiled programs differ in their peer prefixes at most.
fn same_but_peers(a: &CompiledProgram, b: &CompiledProgram) -> bool {
    a.direction == b.direction
        && a.local_addresses == b.local_addresses
        && a.protocols == b.protocols
        && a.other_protocol == b.other_protocol
        && a.source_ports == b.source_ports
        && a.cells == b.cells
        && a.verdicts == b.verdicts
}

fn class16(what: &'static str, class: u32) -> Result<u16, DataplaneError> {
    u16::try_from(class).map_err(|_| DataplaneError::TooLarge { what, value: class })
}

impl PolicyDataplane {
    /// Interfaces with a policy in the endpoint map, by index (this run's or a previous
    /// one's, when the maps are pinned).
    pub fn programmed_interfaces(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        Ok(self
            .endpoint_programs()?
            .keys()
            .map(|(ifindex, _)| *ifindex)
            .collect())
    }

    /// Entries in each policy table, from this run's bookkeeping (walking large LPM tries
    /// on every scrape would stall the caller); conntrack as counted by the last
    /// [`PolicyDataplane::expire_conntrack`].
    pub fn occupancy(&self) -> Vec<(&'static str, usize)> {
        let sum = |f: fn(&Written) -> usize| self.installed.values().map(|(_, w)| f(w)).sum();
        vec![
            (POLICY_ENDPOINTS_MAP, self.installed.len()),
            (
                POLICY_PEERS_MAP,
                self.peer_tables.values().map(|t| t.keys.len()).sum(),
            ),
            (POLICY_LOCALS_MAP, sum(|w| w.locals.len())),
            (POLICY_PROTOS_MAP, sum(|w| w.protos.len())),
            (POLICY_SPORTS_MAP, sum(|w| w.sports.len())),
            (POLICY_VERDICTS_MAP, sum(|w| w.verdicts.len())),
            (
                CONNTRACK_MAP,
                self.tracked_flows_seen
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
        ]
    }

    /// Each table's capacity (max entries), for /metrics beside [`PolicyDataplane::occupancy`].
    pub fn capacities(&self) -> Vec<(&'static str, u32)> {
        self.capacity.iter().map(|(m, c)| (*m, *c)).collect()
    }

    /// Refuses a program the tables have no room for (beside the one it replaces, which stays
    /// until the switch), naming the map: checked before anything is written.
    fn check_room(
        &self,
        compiled: &CompiledProgram,
        prefixes: &PeerPrefixes,
    ) -> Result<(), DataplaneError> {
        let port_prefixes = |ranges: &mut dyn Iterator<Item = (u16, u16)>| -> usize {
            ranges.map(|(lo, hi)| range_to_prefixes(lo, hi).len()).sum()
        };
        let needed = [
            (POLICY_ENDPOINTS_MAP, 1),
            // A shared table that exists already costs nothing more.
            (
                POLICY_PEERS_MAP,
                if self.peer_tables.contains_key(prefixes) {
                    0
                } else {
                    prefixes.len()
                },
            ),
            (POLICY_LOCALS_MAP, compiled.local_addresses.len()),
            (POLICY_PROTOS_MAP, compiled.protocols.len()),
            (
                POLICY_SPORTS_MAP,
                port_prefixes(&mut compiled.source_ports.iter().map(|(lo, hi, _)| (*lo, *hi))),
            ),
            (
                POLICY_VERDICTS_MAP,
                port_prefixes(
                    &mut compiled
                        .cells
                        .values()
                        .flatten()
                        .map(|(lo, hi, _)| (*lo, *hi)),
                ),
            ),
        ];
        let used: BTreeMap<&str, usize> = self.occupancy().into_iter().collect();
        for (map, need) in needed {
            let Some(&capacity) = self.capacity.get(map) else {
                continue;
            };
            let in_use = used.get(map).copied().unwrap_or(0);
            if in_use + need > capacity as usize {
                return Err(DataplaneError::MapFull {
                    map,
                    needed: need,
                    in_use,
                    capacity,
                });
            }
        }
        Ok(())
    }

    /// Installs `compiled` as the policy of interface `ifindex` at `hook`, replacing what was
    /// there in one step. On failure (a full map, say) the hook is left with no program, which
    /// drops its traffic: never the old policy, which may allow what the new one denies.
    pub fn install(
        &mut self,
        ifindex: u32,
        hook: Hook,
        compiled: &CompiledProgram,
    ) -> Result<u32, DataplaneError> {
        let program = self.next_program;
        self.next_program = self.next_program.wrapping_add(1).max(1);
        let mut written = Written::default();
        let key = EndpointKey {
            ifindex,
            hook: hook.code(),
        };
        if let Some(program) = self.update_peers_in_place((key.ifindex, key.hook), compiled) {
            return Ok(program);
        }
        written.shape = Some(Box::new(CompiledProgram {
            peer_prefixes: Vec::new(),
            ..compiled.clone()
        }));
        let prefixes: PeerPrefixes = std::sync::Arc::new(compiled.peer_prefixes.clone());
        let switched = self
            .check_room(compiled, &prefixes)
            .and_then(|()| self.acquire_peers(&prefixes, &mut written))
            .and_then(|peers| {
                self.write(program, compiled, &mut written)?;
                self.endpoints
                    .insert(
                        key,
                        ProgramRef {
                            program,
                            other_protocol: compiled.other_protocol,
                            peers,
                        },
                        0,
                    )
                    .map_err(map_err(POLICY_ENDPOINTS_MAP, "insert"))
            });
        if let Err(e) = switched {
            // Nothing points at a half-written program; take back what was written, and
            // leave the hook denying rather than on its previous policy.
            self.delete(written);
            self.remove(ifindex, hook)?;
            return Err(e);
        }
        self.verdicts_of.insert(program, compiled.verdicts.clone());
        if let Some((old_program, old)) = self
            .installed
            .insert((key.ifindex, key.hook), (program, written))
        {
            self.delete(old);
            self.forget_program(old_program);
        }
        Ok(program)
    }

    /// Removes the policy of `ifindex` at `hook`: while the classifier stays attached its IP
    /// traffic is then dropped ([`PolicyDataplane::forget_interface`] detaches it too).
    pub fn remove(&mut self, ifindex: u32, hook: Hook) -> Result<(), DataplaneError> {
        let key = EndpointKey {
            ifindex,
            hook: hook.code(),
        };
        match self.endpoints.remove(&key) {
            Ok(()) => {}
            Err(e) if key_missing(&e) => {}
            Err(source) => return Err(map_err(POLICY_ENDPOINTS_MAP, "remove")(source)),
        }
        if let Some((old_program, old)) = self.installed.remove(&(key.ifindex, key.hook)) {
            self.delete(old);
            self.forget_program(old_program);
        }
        Ok(())
    }

    /// When `compiled` differs from what `slot` runs only in its peer prefixes (a member
    /// joined or left an IP set, and no new class arose) and that peer table is this program's
    /// alone: the table is brought to the new prefixes in place, entry by entry (each address
    /// switches atomically, as upstream's IP set updates do), and the program stays. O(changed
    /// members) instead of a whole new set of tables. `None` when the full path is needed
    /// (also when an entry cannot be written: the full path then replaces the table).
    fn update_peers_in_place(
        &mut self,
        slot: (u32, u32),
        compiled: &CompiledProgram,
    ) -> Option<u32> {
        let (program, written) = self.installed.get(&slot)?;
        let (program, old) = (*program, written.peers.clone()?);
        if !written
            .shape
            .as_deref()
            .is_some_and(|s| same_but_peers(s, compiled))
        {
            return None;
        }
        if *old == compiled.peer_prefixes {
            return Some(program);
        }
        let new: PeerPrefixes = std::sync::Arc::new(compiled.peer_prefixes.clone());
        let table = self.peer_tables.get(&old)?;
        if table.users != 1 || self.peer_tables.contains_key(&new) {
            return None;
        }
        let id = table.id;
        let before: std::collections::HashMap<IpNet, u32> = old.iter().copied().collect();
        let after: std::collections::HashMap<IpNet, u32> = new.iter().copied().collect();
        let grows = new.iter().filter(|(n, _)| !before.contains_key(n)).count();
        let capacity = self
            .capacity
            .get(POLICY_PEERS_MAP)
            .copied()
            .unwrap_or(u32::MAX) as usize;
        let in_use: usize = self.peer_tables.values().map(|t| t.keys.len()).sum();
        if in_use + grows > capacity {
            return None;
        }
        for (net, class) in new.iter() {
            if before.get(net) != Some(class)
                && self.peers.insert(&peer_key(id, net), class, 0).is_err()
            {
                return None;
            }
        }
        for (net, _) in old.iter() {
            if !after.contains_key(net) {
                let _ = self.peers.remove(&peer_key(id, net));
            }
        }
        let mut table = self.peer_tables.remove(&old)?;
        table.keys = new.iter().map(|(net, _)| peer_key(id, net)).collect();
        self.peer_tables.insert(new.clone(), table);
        if let Some((_, written)) = self.installed.get_mut(&slot) {
            written.peers = Some(new);
        }
        Some(program)
    }

    /// The peer table holding `prefixes`: an existing one gains a user, or a new one is
    /// written. Returns its id.
    fn acquire_peers(
        &mut self,
        prefixes: &PeerPrefixes,
        w: &mut Written,
    ) -> Result<u32, DataplaneError> {
        if let Some(table) = self.peer_tables.get_mut(prefixes) {
            table.users += 1;
            w.peers = Some(prefixes.clone());
            return Ok(table.id);
        }
        let id = self.next_peer_table;
        self.next_peer_table = self.next_peer_table.wrapping_add(1).max(1);
        let mut table = PeerTable {
            id,
            keys: Vec::with_capacity(prefixes.len()),
            users: 1,
        };
        for (net, class) in prefixes.iter() {
            let key = peer_key(id, net);
            if let Err(source) = self.peers.insert(&key, class, 0) {
                for k in &table.keys {
                    let _ = self.peers.remove(k);
                }
                return Err(map_err(POLICY_PEERS_MAP, "insert")(source));
            }
            table.keys.push(key);
        }
        self.peer_tables.insert(prefixes.clone(), table);
        w.peers = Some(prefixes.clone());
        Ok(id)
    }

    /// A program stops reading a peer table; the last one out deletes it.
    fn release_peers(&mut self, prefixes: &PeerPrefixes) {
        let Some(table) = self.peer_tables.get_mut(prefixes) else {
            return;
        };
        table.users -= 1;
        if table.users == 0 {
            if let Some(table) = self.peer_tables.remove(prefixes) {
                for k in &table.keys {
                    let _ = self.peers.remove(k);
                }
            }
        }
    }

    fn write(
        &mut self,
        program: u32,
        c: &CompiledProgram,
        w: &mut Written,
    ) -> Result<(), DataplaneError> {
        let id = program.to_be_bytes();
        for (addr, class) in &c.local_addresses {
            let key = LocalKey {
                program,
                addr: mapped(*addr),
            };
            self.locals
                .insert(key, class, 0)
                .map_err(map_err(POLICY_LOCALS_MAP, "insert"))?;
            w.locals.push(key);
        }
        for (protocol, class) in &c.protocols {
            let key = ProtoKey {
                program,
                protocol: u32::from(*protocol),
            };
            self.protos
                .insert(key, class, 0)
                .map_err(map_err(POLICY_PROTOS_MAP, "insert"))?;
            w.protos.push(key);
        }
        for (lo, hi, class) in &c.source_ports {
            for (value, len) in range_to_prefixes(*lo, *hi) {
                let key = Key::new(
                    32 + u32::from(len),
                    PortKeyData {
                        program: id,
                        port: value.to_be_bytes(),
                    },
                );
                self.sports
                    .insert(&key, class, 0)
                    .map_err(map_err(POLICY_SPORTS_MAP, "insert"))?;
                w.sports.push(key);
            }
        }
        for (cell, ranges) in &c.cells {
            let mut bytes = [0u8; 16];
            bytes[0..4].copy_from_slice(&id);
            bytes[4..8].copy_from_slice(&cell.peer.to_be_bytes());
            bytes[8..10].copy_from_slice(&class16("local class", cell.local)?.to_be_bytes());
            bytes[10..12].copy_from_slice(&class16("protocol class", cell.protocol)?.to_be_bytes());
            bytes[12..14]
                .copy_from_slice(&class16("source port class", cell.source_port)?.to_be_bytes());
            for (lo, hi, verdict) in ranges {
                let value = VerdictValue {
                    action: match &c.verdicts[*verdict as usize] {
                        Verdict::Allow(_) => ACTION_ALLOW,
                        Verdict::Deny(_) => ACTION_DENY,
                    },
                    rule: *verdict,
                };
                for (port, len) in range_to_prefixes(*lo, *hi) {
                    bytes[14..16].copy_from_slice(&port.to_be_bytes());
                    let key = Key::new(
                        VERDICT_FIXED_BITS + u32::from(len),
                        VerdictKeyData { bytes },
                    );
                    self.verdicts
                        .insert(&key, value, 0)
                        .map_err(map_err(POLICY_VERDICTS_MAP, "insert"))?;
                    w.verdicts.push(key);
                }
            }
        }
        Ok(())
    }

    /// Deletes a program's entries (best effort: they are unreachable once switched away).
    fn delete(&mut self, w: Written) {
        if let Some(prefixes) = &w.peers {
            self.release_peers(prefixes);
        }
        for k in &w.locals {
            let _ = self.locals.remove(k);
        }
        for k in &w.protos {
            let _ = self.protos.remove(k);
        }
        for k in &w.sports {
            let _ = self.sports.remove(k);
        }
        for k in &w.verdicts {
            let _ = self.verdicts.remove(k);
        }
    }

    /// Drops a replaced program's rule counters.
    fn forget_program(&mut self, program: u32) {
        self.verdicts_of.remove(&program);
        let keys: Vec<RuleStatKey> = self
            .rule_stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.program == program)
            .collect();
        for k in &keys {
            let _ = self.rule_stats.remove(k);
        }
    }
}
