//! What the classifiers report: packet counters, per-rule counters, verdict events, the debug
//! log switch, and single runs under BPF_PROG_TEST_RUN.

use calico_bpf_common::{
    PolicyStat, RuleStatValue, VerdictEvent, POLICY_EGRESS_PROG, POLICY_INGRESS_PROG,
    POLICY_LOG_MAP, POLICY_RULE_STATS_MAP, POLICY_STATS_MAP, TC_INGRESS,
};
use calico_policy::Verdict;

use super::{map_err, Hook, PolicyDataplane};
use crate::{object::classifier, DataplaneError};

/// What one rule decided on one interface and hook.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleCounter {
    /// The program (its id) and the index of the verdict in it.
    pub program: u32,
    pub index: u32,
    pub ifindex: u32,
    pub hook: Hook,
    /// The verdict, naming the deciding rule (or the end of a tier / no policy).
    pub verdict: Verdict,
    pub packets: u64,
    pub bytes: u64,
}

/// Policy counters summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PolicyCounters {
    pub allowed: u64,
    pub denied: u64,
    /// IP packets dropped on an attached interface with no program for the hook.
    pub no_policy: u64,
    pub malformed: u64,
    /// Packets of tracked flows, passed without a verdict.
    pub tracked: u64,
    /// Packets sent straight to another local endpoint's interface.
    pub forwarded: u64,
    /// Allowed flows whose conntrack entry could not be written.
    pub conntrack_lost: u64,
    /// Verdict events dropped on a full ring buffer.
    pub events_lost: u64,
    /// Per-rule counters that could not be created.
    pub counters_lost: u64,
    /// Allowed flows left untracked: their interface held its share of the table.
    pub conntrack_over_limit: u64,
    /// Packets host endpoints' interfaces carried for traffic the host forwards (unjudged).
    pub host_forwarded: u64,
}

/// A rule counter's packets and bytes summed over CPUs.
pub(super) fn summed(values: &aya::maps::PerCpuValues<RuleStatValue>) -> (u64, u64) {
    values
        .iter()
        .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes))
}

impl PolicyDataplane {
    /// Turns the classifiers' debug log lines (why a packet was denied) on or off while they
    /// run. Lines only appear when the object was loaded with a log level (a logger exists).
    pub fn set_debug_logging(&mut self, on: bool) -> Result<(), DataplaneError> {
        self.log_switch
            .set(0, u32::from(on), 0)
            .map_err(map_err(POLICY_LOG_MAP, "write"))
    }

    /// Packets and bytes each rule of each installed program decided, summed over CPUs
    /// (counted when policy decides: a flow's first packet, and every denied packet).
    /// (A walk over the counters that exist: rules that decided something, not every rule.)
    pub fn rule_counters(&self) -> Result<Vec<RuleCounter>, DataplaneError> {
        let slots: std::collections::HashMap<u32, (u32, u32)> = self
            .installed
            .iter()
            .map(|(slot, (program, _))| (*program, *slot))
            .collect();
        let mut out = Vec::new();
        for entry in self.rule_stats.iter() {
            let (key, values) = match entry {
                Ok(e) => e,
                // An entry deleted during the walk.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(source) => return Err(map_err(POLICY_RULE_STATS_MAP, "read")(source)),
            };
            let (Some(&(ifindex, hook)), Some(verdict)) = (
                slots.get(&key.program),
                self.verdict_of(key.program, key.verdict),
            ) else {
                continue;
            };
            let (packets, bytes) = summed(&values);
            out.push(RuleCounter {
                program: key.program,
                index: key.verdict,
                ifindex,
                hook: if hook == TC_INGRESS {
                    Hook::Ingress
                } else {
                    Hook::Egress
                },
                verdict: verdict.clone(),
                packets,
                bytes,
            });
        }
        out.sort_by_key(|c| (c.ifindex, c.hook, c.index));
        Ok(out)
    }

    /// What verdict `index` of installed (or replaced, not yet released) program `program`
    /// stands for.
    pub fn verdict_of(&self, program: u32, index: u32) -> Option<&Verdict> {
        self.verdicts_of.get(&program)?.get(index as usize)
    }

    /// The last counts of the rules of programs released since the last call (what they
    /// counted after the last [`PolicyDataplane::rule_counters`] would be lost otherwise).
    pub fn take_released_counters(&mut self) -> Vec<RuleCounter> {
        std::mem::take(&mut self.released_counters)
    }

    /// Verdict events the classifiers wrote since the last call (at most `max`).
    pub fn drain_events(&mut self, max: usize) -> Vec<VerdictEvent> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(item) = self.events.next() else {
                break;
            };
            if item.len() >= std::mem::size_of::<VerdictEvent>() {
                // SAFETY: the classifier writes a whole VerdictEvent (repr(C), plain data)
                // into each record; read_unaligned makes no alignment assumption.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const VerdictEvent) });
            }
        }
        out
    }

    /// Runs the classifier of `hook` once on `frame` (an Ethernet frame) with
    /// BPF_PROG_TEST_RUN, as if it arrived on the loopback interface (ifindex 1); returns the
    /// program's return code (`TC_ACT_PIPE` 3 passes, `TC_ACT_SHOT` 2 drops).
    pub fn test_run(&mut self, hook: Hook, frame: &[u8]) -> Result<i32, DataplaneError> {
        self.test_run_times(hook, frame, 1)
    }

    /// As [`PolicyDataplane::test_run`], the program run `times` times on the frame in one
    /// call (the return code is the last run's).
    pub fn test_run_times(
        &mut self,
        hook: Hook,
        frame: &[u8],
        times: u32,
    ) -> Result<i32, DataplaneError> {
        use aya::programs::{TestRun, TestRunOptions};
        let name = match hook {
            Hook::Ingress => POLICY_INGRESS_PROG,
            Hook::Egress => POLICY_EGRESS_PROG,
        };
        let options = TestRunOptions {
            data_in: Some(frame),
            repeat: times,
            ..TestRunOptions::new()
        };
        let result = classifier(&mut self.ebpf, name)?
            .test_run(options)
            .map_err(|source| DataplaneError::Program {
                program: name,
                action: "test run",
                source,
            })?;
        Ok(result.return_value as i32)
    }

    pub fn counters(&self) -> Result<PolicyCounters, DataplaneError> {
        let sum = |stat: PolicyStat| -> Result<u64, DataplaneError> {
            let v = self
                .stats
                .get(&(stat as u32), 0)
                .map_err(map_err(POLICY_STATS_MAP, "read"))?;
            Ok(v.iter().sum())
        };
        Ok(PolicyCounters {
            allowed: sum(PolicyStat::Allowed)?,
            denied: sum(PolicyStat::Denied)?,
            no_policy: sum(PolicyStat::NoPolicy)?,
            malformed: sum(PolicyStat::Malformed)?,
            tracked: sum(PolicyStat::Tracked)?,
            forwarded: sum(PolicyStat::Forwarded)?,
            conntrack_lost: sum(PolicyStat::ConntrackLost)?,
            events_lost: sum(PolicyStat::EventsLost)?,
            counters_lost: sum(PolicyStat::CountersLost)?,
            conntrack_over_limit: sum(PolicyStat::ConntrackOverLimit)?,
            host_forwarded: sum(PolicyStat::HostForwarded)?,
        })
    }
}
