//! Writing a compiled program's tables beside the one in use, switching the endpoint to it in
//! one update, and deleting what it replaced.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::lpm_trie::Key;
use calico_bpf_common::{
    EndpointKey, LocalKey, PortKeyData, ProgramRef, ProtoKey, RuleStatKey, SetList, VerdictKeyData,
    VerdictValue, ACTION_ALLOW, ACTION_DENY, CONNTRACK_MAP, POLICY_ENDPOINTS_MAP,
    POLICY_IP_SETS_MAP, POLICY_LOCALS_MAP, POLICY_NETS_MAP, POLICY_PEER_CLASSES_MAP,
    POLICY_PROTOS_MAP, POLICY_SET_LISTS_MAP, POLICY_SPORTS_MAP, POLICY_VERDICTS_MAP,
    VERDICT_FIXED_BITS,
};
use calico_policy::{range_to_prefixes, CompiledProgram, Verdict};

use super::{map_err, mapped, ClassEntries, Hook, NetPrefixes, PolicyDataplane, Written};
use crate::{object::key_missing, DataplaneError};

/// Whether two compiled programs differ at most in their IP sets' members and peer class
/// entries (the sets they name, in the same order, and everything else the same).
fn same_but_set_members(a: &CompiledProgram, b: &CompiledProgram) -> bool {
    a.direction == b.direction
        && a.peer_nets == b.peer_nets
        && a.peer_sets.len() == b.peer_sets.len()
        && a.peer_sets
            .iter()
            .zip(&b.peer_sets)
            .all(|(x, y)| x.scope == y.scope)
        && a.local_addresses == b.local_addresses
        && a.protocols == b.protocols
        && a.other_protocol == b.other_protocol
        && a.source_ports == b.source_ports
        && a.cells == b.cells
        && a.verdicts == b.verdicts
}

/// What an installed program keeps of its compiled form to recognise an update of set
/// members alone: all of it but the members (held once, by the sets) and the class entries.
fn shape_of(c: &CompiledProgram) -> CompiledProgram {
    CompiledProgram {
        peer_sets: c
            .peer_sets
            .iter()
            .map(|s| calico_policy::PeerSet {
                scope: s.scope.clone(),
                members: Default::default(),
            })
            .collect(),
        peer_classes: Vec::new(),
        ..c.clone()
    }
}

/// Replaced programs kept before their entries are deleted regardless of the caller.
const MAX_RETIRED: usize = 256;

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
        // Replaced programs not yet released still hold their entries.
        let written = || {
            self.installed
                .values()
                .map(|(_, w)| w)
                .chain(self.retired.iter().map(|(_, w)| w))
        };
        let sum = |f: fn(&Written) -> usize| written().map(f).sum();
        vec![
            (POLICY_ENDPOINTS_MAP, self.installed.len()),
            (
                POLICY_NETS_MAP,
                self.nets_tables.values().map(|t| t.keys.len()).sum(),
            ),
            (POLICY_IP_SETS_MAP, self.ip_set_entries()),
            (
                POLICY_SET_LISTS_MAP,
                written().filter(|w| w.set_list).count(),
            ),
            (POLICY_PEER_CLASSES_MAP, self.class_entries()),
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
        prefixes: &NetPrefixes,
    ) -> Result<(), DataplaneError> {
        let port_prefixes = |ranges: &mut dyn Iterator<Item = (u16, u16)>| -> usize {
            ranges.map(|(lo, hi)| range_to_prefixes(lo, hi).len()).sum()
        };
        let needed = [
            (POLICY_ENDPOINTS_MAP, 1),
            // A shared table or set that exists already costs nothing more.
            (
                POLICY_NETS_MAP,
                if self.nets_tables.contains_key(prefixes) {
                    0
                } else {
                    prefixes.len()
                },
            ),
            (POLICY_IP_SETS_MAP, self.ip_set_growth(&compiled.peer_sets)),
            (
                POLICY_SET_LISTS_MAP,
                usize::from(!compiled.peer_sets.is_empty()),
            ),
            (
                POLICY_PEER_CLASSES_MAP,
                if self.class_tables.contains_key(&compiled.peer_classes) {
                    0
                } else {
                    compiled.peer_classes.len()
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
        if let Some(program) = self.update_sets_in_place((key.ifindex, key.hook), compiled) {
            return Ok(program);
        }
        written.shape = Some(Box::new(shape_of(compiled)));
        let prefixes: NetPrefixes = std::sync::Arc::new(compiled.peer_nets.clone());
        let mut room = self.check_room(compiled, &prefixes);
        if room.is_err() && !self.retired.is_empty() {
            // What replaced programs still hold may be what is missing.
            self.release_retired();
            room = self.check_room(compiled, &prefixes);
        }
        let switched = room
            .and_then(|()| {
                let nets = self.acquire_nets(&prefixes)?;
                written.nets = Some(prefixes.clone());
                Ok(nets)
            })
            .and_then(|nets| {
                let entries: ClassEntries = std::sync::Arc::new(compiled.peer_classes.clone());
                let classes = self.acquire_classes(&entries)?;
                written.classes = Some(entries);
                Ok((nets, classes))
            })
            .and_then(|(nets, classes)| {
                let ids = self.acquire_sets(&compiled.peer_sets)?;
                written.sets = compiled.peer_sets.iter().map(|s| s.scope.clone()).collect();
                Ok((nets, classes, ids))
            })
            .and_then(|(nets, classes, ids)| {
                self.write(program, compiled, &ids, &mut written)?;
                self.endpoints
                    .insert(
                        key,
                        ProgramRef {
                            program,
                            other_protocol: compiled.other_protocol,
                            nets,
                            sets: ids.len() as u32,
                            classes,
                            flags: program_flags(compiled),
                        },
                        0,
                    )
                    .map_err(map_err(POLICY_ENDPOINTS_MAP, "insert"))
            });
        if let Err(e) = switched {
            // Nothing points at a half-written program; take back what was written, and
            // leave the hook denying rather than on its previous policy.
            self.delete(written, program);
            self.remove(ifindex, hook)?;
            return Err(e);
        }
        self.verdicts_of.insert(program, compiled.verdicts.clone());
        if let Some((old_program, old)) = self
            .installed
            .insert((key.ifindex, key.hook), (program, written))
        {
            // Unreachable from now on; deleted by `release_retired`, after the batch of
            // updates this one belongs to (a packet never sees them again either way). Its
            // verdicts stay known until then, for the events and counters it left.
            self.retired.push((old_program, old));
            if self.retired.len() > MAX_RETIRED {
                self.release_retired();
            }
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
            self.retired.push((old_program, old));
            self.release_retired();
        }
        Ok(())
    }

    /// When `compiled` differs from what `slot` runs only in its IP sets' members (members
    /// joined or left, and no new class arose): the new (net class, mask) combinations go in,
    /// the shared sets are brought to their new members in place, and combinations that can
    /// no longer occur go; the program stays. O(changed members) instead of a whole new set of
    /// tables. `None` when the full path is needed (also when an entry cannot be written: the
    /// full path then replaces the tables).
    fn update_sets_in_place(
        &mut self,
        slot: (u32, u32),
        compiled: &CompiledProgram,
    ) -> Option<u32> {
        let (program, written) = self.installed.get(&slot)?;
        let program = *program;
        if !written
            .shape
            .as_deref()
            .is_some_and(|s| same_but_set_members(s, compiled))
        {
            return None;
        }
        let old = written.classes.clone()?;
        let mut stale = None;
        let nets = self.nets_tables.get(written.nets.as_ref()?)?.id;
        let sets = written.sets.len() as u32;
        let capacity = |map: &str| self.capacity.get(map).copied().unwrap_or(u32::MAX) as usize;
        if self.ip_set_entries() + self.ip_set_growth(&compiled.peer_sets)
            > capacity(POLICY_IP_SETS_MAP)
        {
            return None;
        }
        if *old != compiled.peer_classes {
            let new: ClassEntries = std::sync::Arc::new(compiled.peer_classes.clone());
            let alone = self.class_tables.get(&old).is_some_and(|t| t.users == 1);
            let growth = if self.class_tables.contains_key(&new) {
                0
            } else {
                new.len()
            };
            if self.class_entries() + growth > capacity(POLICY_PEER_CLASSES_MAP) {
                return None;
            }
            if alone && !self.class_tables.contains_key(&new) {
                // New combinations now, the ones that can no longer occur once the sets
                // have their new members (below): no address is ever without its class.
                if !self.add_classes_in_place(&old, &new) {
                    return None;
                }
                stale = Some((old, new.clone()));
            } else {
                // Shared with other programs: this one moves to a table of its own content
                // (one endpoint map update), and leaves the old one to the others.
                let classes = self.acquire_classes(&new).ok()?;
                let moved = self.endpoints.insert(
                    EndpointKey {
                        ifindex: slot.0,
                        hook: slot.1,
                    },
                    ProgramRef {
                        program,
                        other_protocol: compiled.other_protocol,
                        nets,
                        sets,
                        classes,
                        flags: program_flags(compiled),
                    },
                    0,
                );
                if moved.is_err() {
                    self.release_classes(&new);
                    return None;
                }
                self.release_classes(&old);
            }
            if let Some((_, written)) = self.installed.get_mut(&slot) {
                written.classes = Some(new);
            }
        }
        let sets_updated = compiled
            .peer_sets
            .iter()
            .all(|set| self.update_set(&set.scope, &set.members).is_ok());
        if let Some((old, new)) = stale {
            self.drop_stale_classes(&old, &new);
        }
        sets_updated.then_some(program)
    }

    fn write(
        &mut self,
        program: u32,
        c: &CompiledProgram,
        set_ids: &[u32],
        w: &mut Written,
    ) -> Result<(), DataplaneError> {
        let id = program.to_be_bytes();
        if !set_ids.is_empty() {
            let mut list = SetList::default();
            list.ids[..set_ids.len()].copy_from_slice(set_ids);
            self.set_lists
                .insert(program, list, 0)
                .map_err(map_err(POLICY_SET_LISTS_MAP, "insert"))?;
            w.set_list = true;
        }

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
    fn delete(&mut self, w: Written, program: u32) {
        if let Some(prefixes) = &w.nets {
            self.release_nets(prefixes);
        }
        for scope in &w.sets {
            self.release_set(scope);
        }
        if w.set_list {
            let _ = self.set_lists.remove(&program);
        }
        if let Some(entries) = &w.classes {
            self.release_classes(entries);
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

    /// Deletes the entries of programs replaced since the last call, and their rule counters
    /// (one walk of the counters for all of them). Off the update path: the caller runs it
    /// once a batch of updates is in. Returns how many programs went.
    pub fn release_retired(&mut self) -> usize {
        let retired = std::mem::take(&mut self.retired);
        let programs: BTreeSet<u32> = retired.iter().map(|(p, _)| *p).collect();
        for (program, written) in retired {
            self.delete(written, program);
        }
        if !programs.is_empty() {
            // One walk reads the last counts (for `take_released_counters`) and finds the
            // entries to delete.
            let last: Vec<(RuleStatKey, (u64, u64))> = self
                .rule_stats
                .iter()
                .filter_map(Result::ok)
                .filter(|(k, _)| programs.contains(&k.program))
                .map(|(k, values)| (k, super::observe::summed(&values)))
                .collect();
            for (k, (packets, bytes)) in last {
                if let Some(verdict) = self.verdict_of(k.program, k.verdict) {
                    self.released_counters.push(super::RuleCounter {
                        program: k.program,
                        index: k.verdict,
                        // The slot is not kept for a replaced program; metrics do not use it.
                        ifindex: 0,
                        hook: Hook::Ingress,
                        verdict: verdict.clone(),
                        packets,
                        bytes,
                    });
                }
                let _ = self.rule_stats.remove(&k);
            }
            for program in &programs {
                self.verdicts_of.remove(program);
            }
        }
        // Bounded even when nobody takes them.
        if self.released_counters.len() > 100_000 {
            self.released_counters.clear();
        }
        programs.len()
    }
}

/// The `PROGRAM_*` flags of `compiled`'s endpoint entry.
fn program_flags(compiled: &calico_policy::CompiledProgram) -> u32 {
    let mut flags = 0;
    if compiled.forwarded_passes {
        flags |= calico_bpf_common::PROGRAM_FORWARD_PASSES;
    }
    if compiled.host {
        flags |= calico_bpf_common::PROGRAM_HOST;
    }
    flags
}
