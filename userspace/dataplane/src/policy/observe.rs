//! What the classifiers report: packet counters, per-rule counters, verdict events, the debug
//! log switch, and single runs under BPF_PROG_TEST_RUN.

use calico_bpf_common::{
    PolicyStat, RuleStatKey, VerdictEvent, POLICY_EGRESS_PROG, POLICY_INGRESS_PROG, POLICY_LOG_MAP,
    POLICY_RULE_STATS_MAP, POLICY_STATS_MAP, TC_INGRESS,
};
use calico_policy::Verdict;

use super::{map_err, Hook, PolicyDataplane};
use crate::{
    object::{classifier, key_missing},
    DataplaneError,
};

/// What one rule decided on one interface and hook.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleCounter {
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
    pub fn rule_counters(&self) -> Result<Vec<RuleCounter>, DataplaneError> {
        let mut out = Vec::new();
        for (&(ifindex, hook), (program, _)) in &self.installed {
            let Some(verdicts) = self.verdicts_of.get(program) else {
                continue;
            };
            for (index, verdict) in verdicts.iter().enumerate() {
                let key = RuleStatKey {
                    program: *program,
                    verdict: index as u32,
                };
                match self.rule_stats.get(&key, 0) {
                    Ok(values) => {
                        let (packets, bytes) = values
                            .iter()
                            .fold((0, 0), |(p, b), v| (p + v.packets, b + v.bytes));
                        out.push(RuleCounter {
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
                    Err(e) if key_missing(&e) => {}
                    Err(source) => return Err(map_err(POLICY_RULE_STATS_MAP, "read")(source)),
                }
            }
        }
        Ok(out)
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
        })
    }
}
