//! Flow logs: the classifiers' verdict events aggregated into flow records (one per endpoint,
//! direction, 5-tuple, action and deciding rule, with packets, bytes, first and last seen),
//! written as JSON lines to `<flowLogsFileDirectory>/flows.log` every `flowLogsFlushInterval`.
//!
//! Events come from packets policy judged: a flow's first packet and every denied packet
//! (tracked packets make none), so an allowed flow's record counts its opening packets.

use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use calico_policy::{RuleRef, Verdict};

/// Upstream's defaults.
pub const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(300);
pub const DEFAULT_DIRECTORY: &str = "/var/log/calico/flowlogs";

/// Where and how often flow records are written (from FelixConfiguration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowLogSettings {
    pub directory: PathBuf,
    pub flush_interval: Duration,
}

/// What makes two judged packets the same flow record.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    /// `namespace/name` of the endpoint whose policy decided.
    pub endpoint: String,
    /// "src": the endpoint sent the packet (its egress policy); "dst": it received it.
    pub reporter: &'static str,
    pub source_ip: IpAddr,
    pub dest_ip: IpAddr,
    pub proto: u8,
    pub source_port: u16,
    /// Destination port, or `type << 8 | code` for ICMP.
    pub dest_port: u16,
    pub action: &'static str,
    /// `<tier>|<policy>|<rule index>|<action>`, `<tier>|end-of-tier|deny`, `profile|<name>|…`,
    /// `no-match|deny`, or `unknown` for a program replaced before its events were read.
    pub policy: String,
}

#[derive(Debug, Clone)]
struct Totals {
    packets: u64,
    bytes: u64,
    start: SystemTime,
    end: SystemTime,
    /// What the staged policies would have decided, when they change this endpoint's
    /// policy (else the pending verdict is the enforced one).
    pending: Option<RuleLabels>,
}

/// The deciding rule as flow records and metrics name it: (tier, policy, rule, action).
pub type RuleLabels = (String, String, String, &'static str);

/// `<tier>|<policy>|<rule>|<action>`, the `policy` field of a flow record.
pub fn policy_field((tier, policy, rule, action): &RuleLabels) -> String {
    format!("{tier}|{policy}|{rule}|{action}")
}

/// The deciding rule as flow records and metrics name it: (tier, policy, rule, action).
pub fn rule_labels(verdict: &Verdict) -> RuleLabels {
    let (action, rule) = match verdict {
        Verdict::Allow(r) => ("allow", r),
        Verdict::Deny(r) => ("deny", r),
    };
    match rule {
        RuleRef::Rule {
            tier: Some(tier),
            policy,
            index,
        } => (tier.clone(), policy.clone(), index.to_string(), action),
        RuleRef::Rule {
            tier: None,
            policy,
            index,
        } => ("profile".into(), policy.clone(), index.to_string(), action),
        RuleRef::EndOfTier(tier) => (tier.clone(), String::new(), "end-of-tier".into(), action),
        RuleRef::NoMatch => (String::new(), String::new(), "no-match".into(), action),
    }
}

/// Flow records being aggregated until the next flush.
#[derive(Default)]
pub struct FlowLog {
    records: BTreeMap<FlowKey, Totals>,
    /// Events dropped because the aggregation is full (counted; see `MAX_RECORDS`).
    pub dropped: u64,
}

/// Most records held between flushes: a flood of distinct flows cannot grow the agent.
const MAX_RECORDS: usize = 100_000;

impl FlowLog {
    /// Whether `key` has a record already (its pending verdict is then known).
    pub fn contains(&self, key: &FlowKey) -> bool {
        self.records.contains_key(key)
    }

    /// Counts one judged packet; `pending` is kept when the packet opens a record. Returns
    /// the record's pending verdict.
    pub fn add(
        &mut self,
        key: FlowKey,
        bytes: u64,
        at: SystemTime,
        pending: Option<RuleLabels>,
    ) -> Option<RuleLabels> {
        if let Some(t) = self.records.get_mut(&key) {
            t.packets += 1;
            t.bytes += bytes;
            t.end = t.end.max(at);
            return t.pending.clone();
        }
        if self.records.len() >= MAX_RECORDS {
            self.dropped += 1;
            return pending;
        }
        self.records.insert(
            key,
            Totals {
                packets: 1,
                bytes,
                start: at,
                end: at,
                pending: pending.clone(),
            },
        );
        pending
    }

    /// The records aggregated since the last flush, as JSON lines (emptied).
    pub fn take_lines(&mut self) -> Vec<String> {
        let secs = |t: SystemTime| {
            t.duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64())
        };
        std::mem::take(&mut self.records)
            .into_iter()
            .map(|(k, t)| {
                serde_json::json!({
                    "start_time": secs(t.start),
                    "end_time": secs(t.end),
                    "endpoint": k.endpoint,
                    "reporter": k.reporter,
                    "source_ip": k.source_ip.to_string(),
                    "dest_ip": k.dest_ip.to_string(),
                    "proto": k.proto,
                    "source_port": k.source_port,
                    "dest_port": k.dest_port,
                    "action": k.action,
                    "policy": k.policy,
                    // What committing the staged policies would decide (the enforced
                    // verdict when none changes this endpoint's policy).
                    "pending_action": t.pending.as_ref().map_or(k.action, |p| p.3),
                    "pending_policy": t.pending.as_ref().map_or_else(|| k.policy.clone(), policy_field),
                    "packets": t.packets,
                    "bytes": t.bytes,
                })
                .to_string()
            })
            .collect()
    }
}

/// Appends `lines` to `<directory>/flows.log` (the directory is made if missing).
pub fn append(directory: &Path, lines: &[String]) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(directory)?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(directory.join("flows.log"))?;
    let mut text = lines.join("\n");
    text.push('\n');
    file.write_all(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(action: &'static str, port: u16) -> FlowKey {
        FlowKey {
            endpoint: "default/web".into(),
            reporter: "dst",
            source_ip: "10.0.0.2".parse().unwrap(),
            dest_ip: "10.0.0.1".parse().unwrap(),
            proto: 6,
            source_port: 40000,
            dest_port: port,
            action,
            policy: "default|allow-web|0|allow".into(),
        }
    }

    #[test]
    fn packets_of_one_flow_make_one_record() {
        let mut log = FlowLog::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
        let staged_deny = (
            "default".to_owned(),
            "default.staged:deny-web".to_owned(),
            "0".to_owned(),
            "deny",
        );
        log.add(key("allow", 80), 60, t0, Some(staged_deny.clone()));
        // A later packet of the record keeps the pending verdict the first one got.
        assert_eq!(
            log.add(key("allow", 80), 1500, t0 + Duration::from_secs(2), None),
            Some(staged_deny)
        );
        log.add(key("deny", 81), 60, t0 + Duration::from_secs(1), None);
        let lines = log.take_lines();
        assert_eq!(lines.len(), 2);
        let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(first["packets"], 2);
        assert_eq!(first["bytes"], 1560);
        assert_eq!(first["start_time"], 100.0);
        assert_eq!(first["end_time"], 102.0);
        assert_eq!(first["policy"], "default|allow-web|0|allow");
        assert_eq!(first["pending_action"], "deny");
        assert_eq!(
            first["pending_policy"],
            "default|default.staged:deny-web|0|deny"
        );
        let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
        assert_eq!(
            second["pending_action"], "deny",
            "no staged change: as enforced"
        );
        assert_eq!(second["pending_policy"], second["policy"]);
        assert!(log.take_lines().is_empty(), "a flush empties the log");
    }

    #[test]
    fn rules_are_named_with_tier_policy_and_index() {
        let rule = |tier: Option<&str>| RuleRef::Rule {
            tier: tier.map(String::from),
            policy: "p".into(),
            index: 3,
        };
        assert_eq!(
            rule_labels(&Verdict::Allow(rule(Some("default")))),
            ("default".into(), "p".into(), "3".into(), "allow")
        );
        assert_eq!(
            rule_labels(&Verdict::Deny(rule(None))),
            ("profile".into(), "p".into(), "3".into(), "deny")
        );
        assert_eq!(
            rule_labels(&Verdict::Deny(RuleRef::EndOfTier("t".into()))).2,
            "end-of-tier"
        );
    }
}
