//! Removing table entries no endpoint refers to (what a previous run left behind).

use std::collections::BTreeSet;

use aya::maps::{lpm_trie::Key, HashMap, LpmTrie, MapData, PerCpuHashMap};
use aya::Pod;

use super::PolicyDataplane;
use crate::DataplaneError;

/// A table whose keys can be listed and removed one by one.
trait SweptTable<K> {
    fn listed(&self) -> Vec<K>;
    fn removed(&mut self, key: &K) -> bool;
}

impl<K: Pod, V: Pod> SweptTable<K> for HashMap<MapData, K, V> {
    fn listed(&self) -> Vec<K> {
        self.keys().filter_map(Result::ok).collect()
    }
    fn removed(&mut self, key: &K) -> bool {
        self.remove(key).is_ok()
    }
}

impl<K: Pod, V: Pod> SweptTable<K> for PerCpuHashMap<MapData, K, V> {
    fn listed(&self) -> Vec<K> {
        self.keys().filter_map(Result::ok).collect()
    }
    fn removed(&mut self, key: &K) -> bool {
        self.remove(key).is_ok()
    }
}

impl<K: Pod, V: Pod> SweptTable<Key<K>> for LpmTrie<MapData, K, V> {
    fn listed(&self) -> Vec<Key<K>> {
        self.keys().filter_map(Result::ok).collect()
    }
    fn removed(&mut self, key: &Key<K>) -> bool {
        self.remove(key).is_ok()
    }
}

/// Removes the keys of `table` whose program `dead` says is gone; returns how many went.
fn sweep_table<K>(
    table: &mut impl SweptTable<K>,
    program_of: impl Fn(&K) -> u32,
    dead: &impl Fn(u32) -> bool,
) -> usize {
    let doomed: Vec<K> = table
        .listed()
        .into_iter()
        .filter(|k| dead(program_of(k)))
        .collect();
    doomed.iter().filter(|k| table.removed(k)).count()
}

impl PolicyDataplane {
    /// Deletes table entries of programs no endpoint refers to: what a previous run left
    /// behind once this run has installed its own. Returns how many entries went.
    pub fn sweep(&mut self) -> Result<usize, DataplaneError> {
        let live: BTreeSet<u32> = self
            .endpoint_programs()?
            .values()
            .map(|r| r.program)
            .collect();
        let dead = |program: u32| !live.contains(&program);
        let live_tables: BTreeSet<u32> =
            self.endpoint_programs()?.values().map(|r| r.nets).collect();
        let dead_table = |table: u32| !live_tables.contains(&table);
        let live_classes: BTreeSet<u32> = self
            .endpoint_programs()?
            .values()
            .map(|r| r.classes)
            .collect();
        let dead_classes = |table: u32| !live_classes.contains(&table);
        // Sets live while a live program's list names them.
        let live_sets: BTreeSet<u32> = self
            .set_lists
            .iter()
            .filter_map(Result::ok)
            .filter(|(program, _)| live.contains(program))
            .flat_map(|(_, list)| list.ids)
            .filter(|id| *id != 0)
            .collect();
        let dead_set = |set: u32| !live_sets.contains(&set);
        let be = |b: [u8; 4]| u32::from_be_bytes(b);
        Ok(
            sweep_table(&mut self.nets, |k| be(k.data().table), &dead_table)
                + sweep_table(&mut self.ip_set_members, |k| be(k.data().table), &dead_set)
                + sweep_table(&mut self.set_lists, |k| *k, &dead)
                + sweep_table(&mut self.peer_classes, |k| k.table, &dead_classes)
                + sweep_table(&mut self.locals, |k| k.program, &dead)
                + sweep_table(&mut self.protos, |k| k.program, &dead)
                + sweep_table(&mut self.sports, |k| be(k.data().program), &dead)
                + sweep_table(
                    &mut self.verdicts,
                    |k| {
                        let b = k.data().bytes;
                        be([b[0], b[1], b[2], b[3]])
                    },
                    &dead,
                )
                + sweep_table(&mut self.rule_stats, |k| k.program, &dead),
        )
    }
}
