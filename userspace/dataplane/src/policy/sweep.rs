//! Removing table entries no endpoint refers to (what a previous run left behind).

use std::collections::BTreeSet;

use aya::maps::lpm_trie::Key;
use calico_bpf_common::{
    LocalKey, PeerKeyData, PortKeyData, ProtoKey, RuleStatKey, VerdictKeyData,
};

use super::PolicyDataplane;
use crate::DataplaneError;

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
        let mut removed = 0;
        let peers: Vec<Key<PeerKeyData>> = self
            .peers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(u32::from_be_bytes(k.data().program)))
            .collect();
        for k in &peers {
            removed += usize::from(self.peers.remove(k).is_ok());
        }
        let locals: Vec<LocalKey> = self
            .locals
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(k.program))
            .collect();
        for k in &locals {
            removed += usize::from(self.locals.remove(k).is_ok());
        }
        let protos: Vec<ProtoKey> = self
            .protos
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(k.program))
            .collect();
        for k in &protos {
            removed += usize::from(self.protos.remove(k).is_ok());
        }
        let sports: Vec<Key<PortKeyData>> = self
            .sports
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(u32::from_be_bytes(k.data().program)))
            .collect();
        for k in &sports {
            removed += usize::from(self.sports.remove(k).is_ok());
        }
        let verdicts: Vec<Key<VerdictKeyData>> = self
            .verdicts
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                let b = k.data().bytes;
                dead(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            })
            .collect();
        for k in &verdicts {
            removed += usize::from(self.verdicts.remove(k).is_ok());
        }
        let stats: Vec<RuleStatKey> = self
            .rule_stats
            .keys()
            .filter_map(Result::ok)
            .filter(|k| dead(k.program))
            .collect();
        for k in &stats {
            removed += usize::from(self.rule_stats.remove(k).is_ok());
        }
        Ok(removed)
    }
}
