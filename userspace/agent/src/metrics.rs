//! Health state and Prometheus metrics, shared between the agent's tasks and the HTTP side.
//! The exposition is `prometheus-client`'s; the agent only updates values.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

/// Upper bounds of the policy update latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Label set of the per-map gauges.
type MapLabels = Vec<(&'static str, &'static str)>;
/// tier, policy, rule (index, `end-of-tier` or `no-match`), action.
type RuleLabels = Vec<(&'static str, String)>;

pub struct Metrics {
    started: Instant,
    /// Milliseconds since `started` of the main loop's last turn.
    last_turn_ms: AtomicU64,
    /// 1 once the dataplane reflects a complete snapshot.
    pub in_sync: Gauge,
    /// 1 while the datastore answers.
    pub datastore_connected: Gauge,
    /// The datastore revision of the last watched change the dataplane reflects.
    pub applied_revision: Gauge,
    pub resyncs: Counter,
    pub endpoints: Gauge,
    pub compile_errors: Counter,
    pub install_errors: Counter,
    pub resources_refused: Counter,
    /// Totals read from the dataplane's own counters (hence set, not incremented).
    pub allowed: Counter,
    pub denied: Counter,
    pub tracked: Counter,
    pub forwarded: Counter,
    pub no_policy: Counter,
    pub conntrack_lost: Counter,
    pub events_lost: Counter,
    pub counters_lost: Counter,
    pub conntrack_over_limit: Counter,
    pub host_forwarded: Counter,
    pub bird_config_errors: Counter,
    pub bird_restarts: Counter,
    latency: Histogram,
    map_entries: Family<MapLabels, Gauge>,
    map_capacity: Family<MapLabels, Gauge>,
    rule_packets: Family<RuleLabels, Counter>,
    rule_bytes: Family<RuleLabels, Counter>,
    pending_rule_packets: Family<RuleLabels, Counter>,
    pending_rule_bytes: Family<RuleLabels, Counter>,
    pub flow_records_dropped: Counter,
    registry: Mutex<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Self {
            started: Instant::now(),
            last_turn_ms: AtomicU64::new(0),
            in_sync: Gauge::default(),
            datastore_connected: Gauge::default(),
            applied_revision: Gauge::default(),
            resyncs: Counter::default(),
            endpoints: Gauge::default(),
            compile_errors: Counter::default(),
            install_errors: Counter::default(),
            resources_refused: Counter::default(),
            allowed: Counter::default(),
            denied: Counter::default(),
            tracked: Counter::default(),
            forwarded: Counter::default(),
            no_policy: Counter::default(),
            conntrack_lost: Counter::default(),
            events_lost: Counter::default(),
            counters_lost: Counter::default(),
            conntrack_over_limit: Counter::default(),
            host_forwarded: Counter::default(),
            bird_config_errors: Counter::default(),
            bird_restarts: Counter::default(),
            latency: Histogram::new(BUCKETS),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            rule_packets: Family::default(),
            rule_bytes: Family::default(),
            pending_rule_packets: Family::default(),
            pending_rule_bytes: Family::default(),
            flow_records_dropped: Counter::default(),
            registry: Mutex::new(Registry::default()),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|e| e.into_inner());
            r.register(
                "felix_in_sync",
                "1 once the dataplane reflects a complete datastore snapshot",
                m.in_sync.clone(),
            );
            r.register(
                "felix_datastore_connected",
                "1 while the datastore answers",
                m.datastore_connected.clone(),
            );
            r.register(
                "felix_applied_datastore_revision",
                "datastore revision of the last watched change the dataplane reflects",
                m.applied_revision.clone(),
            );
            // Counters get their `_total` suffix from the encoder.
            r.register(
                "felix_resyncs",
                "Full resyncs from a datastore snapshot",
                m.resyncs.clone(),
            );
            r.register(
                "felix_active_local_endpoints",
                "Local endpoints with programmed policy",
                m.endpoints.clone(),
            );
            r.register(
                "felix_policy_compile_errors",
                "Endpoint programs refused at compile time (the endpoint then drops)",
                m.compile_errors.clone(),
            );
            r.register(
                "felix_bpf_install_errors",
                "Policy installs that failed (the endpoint drops that direction until a retry succeeds)",
                m.install_errors.clone(),
            );
            r.register(
                "felix_resources_refused",
                "Datastore resources that failed validation or could not be read",
                m.resources_refused.clone(),
            );
            r.register(
                "felix_bpf_packets_allowed",
                "Packets allowed by policy",
                m.allowed.clone(),
            );
            r.register(
                "felix_bpf_packets_denied",
                "Packets denied by policy",
                m.denied.clone(),
            );
            r.register(
                "felix_bpf_packets_tracked",
                "Packets of tracked flows passed without a verdict",
                m.tracked.clone(),
            );
            r.register(
                "felix_bpf_packets_forwarded",
                "Packets redirected straight to another local endpoint's interface",
                m.forwarded.clone(),
            );
            r.register(
                "felix_bpf_packets_no_policy",
                "IP packets dropped on an attached interface with no policy installed (yet)",
                m.no_policy.clone(),
            );
            r.register(
                "felix_bpf_conntrack_insert_failures",
                "Allowed flows whose conntrack entry could not be written (their packets are judged one by one)",
                m.conntrack_lost.clone(),
            );
            r.register(
                "felix_bpf_events_lost",
                "Verdict events dropped because the ring buffer was full",
                m.events_lost.clone(),
            );
            r.register(
                "felix_bpf_conntrack_over_limit",
                "Allowed flows left untracked because their interface held its share of the conntrack table",
                m.conntrack_over_limit.clone(),
            );
            r.register(
                "felix_bpf_packets_host_forwarded",
                "Packets host endpoints' interfaces carried for traffic the host forwards (their policy judges only traffic to and from the host)",
                m.host_forwarded.clone(),
            );
            r.register(
                "felix_bpf_rule_counters_lost",
                "Per-rule counters that could not be created (the counter map was full)",
                m.counters_lost.clone(),
            );
            r.register(
                "felix_bird_config_errors",
                "BIRD configurations refused (see bird.error beside the socket)",
                m.bird_config_errors.clone(),
            );
            r.register(
                "felix_bird_restarts",
                "Times BIRD died and was restarted",
                m.bird_restarts.clone(),
            );
            r.register(
                "felix_policy_update_latency_seconds",
                "Datastore change received to dataplane programmed",
                m.latency.clone(),
            );
            r.register(
                "felix_policy_rule_packets",
                "Packets each rule decided (a flow's first packet, every denied packet), by tier, policy, rule index and action",
                m.rule_packets.clone(),
            );
            r.register(
                "felix_policy_rule_bytes",
                "Bytes of the packets each rule decided, by tier, policy, rule index and action",
                m.rule_bytes.clone(),
            );
            r.register(
                "felix_pending_policy_rule_packets",
                "Judged packets of endpoints whose policy staged policies would change, by the rule that would decide them were the staged policies committed (tier, policy, rule index, action)",
                m.pending_rule_packets.clone(),
            );
            r.register(
                "felix_pending_policy_rule_bytes",
                "Bytes of those packets, by the rule that would decide them",
                m.pending_rule_bytes.clone(),
            );
            r.register(
                "felix_flow_records_dropped",
                "Judged packets left out of the flow logs because too many distinct flows were pending",
                m.flow_records_dropped.clone(),
            );
            r.register(
                "felix_bpf_map_entries",
                "Entries in each dataplane map",
                m.map_entries.clone(),
            );
            r.register(
                "felix_bpf_map_capacity",
                "Most entries each dataplane map holds (bpfMapSize* sets some)",
                m.map_capacity.clone(),
            );
        }
        m
    }
}

impl Metrics {
    /// The main loop is alive.
    pub fn turned(&self) {
        self.last_turn_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Alive: the main loop turned within `limit` (it turns at least every tick).
    pub fn live(&self, limit: Duration) -> bool {
        let last = Duration::from_millis(self.last_turn_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last) < limit
    }

    /// Ready: the dataplane reflects a complete snapshot and the datastore answers.
    pub fn ready(&self) -> bool {
        self.in_sync.get() == 1 && self.datastore_connected.get() == 1
    }

    /// Records whether the datastore answers; returns whether that changed.
    pub fn set_datastore_connected(&self, up: bool) -> bool {
        self.datastore_connected.set(i64::from(up)) != i64::from(up)
    }

    /// Sets a counter to a total kept elsewhere (the dataplane's per-CPU counters).
    pub fn set_total(counter: &Counter, total: u64) {
        counter.inner().store(total, Ordering::Relaxed);
    }

    pub fn observe_update(&self, latency: Duration) {
        self.latency.observe(latency.as_secs_f64());
    }

    /// Adds what a rule decided since it was last read.
    pub fn add_rule_counts(&self, rule: crate::flowlogs::RuleLabels, packets: u64, bytes: u64) {
        let labels = rule_labels(rule);
        self.rule_packets.get_or_create(&labels).inc_by(packets);
        self.rule_bytes.get_or_create(&labels).inc_by(bytes);
    }

    /// Adds packets the staged policies' pending verdict would have decided by `rule`.
    pub fn add_pending_rule_counts(
        &self,
        rule: crate::flowlogs::RuleLabels,
        packets: u64,
        bytes: u64,
    ) {
        let labels = rule_labels(rule);
        self.pending_rule_packets
            .get_or_create(&labels)
            .inc_by(packets);
        self.pending_rule_bytes.get_or_create(&labels).inc_by(bytes);
    }

    pub fn set_occupancy(&self, occupancy: Vec<(&'static str, usize)>) {
        self.map_entries.clear();
        for (map, entries) in occupancy {
            self.map_entries
                .get_or_create(&vec![("map", map)])
                .set(entries as i64);
        }
    }

    pub fn set_capacity(&self, capacity: Vec<(&'static str, u32)>) {
        for (map, size) in capacity {
            self.map_capacity
                .get_or_create(&vec![("map", map)])
                .set(i64::from(size));
        }
    }

    /// The exposition (OpenMetrics text, which Prometheus reads).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn rule_labels((tier, policy, rule, action): crate::flowlogs::RuleLabels) -> RuleLabels {
    vec![
        ("tier", tier),
        ("policy", policy),
        ("rule", rule),
        ("action", action.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.observe_update(Duration::from_micros(700));
        m.observe_update(Duration::from_millis(30));
        let text = m.render();
        assert!(
            text.contains("felix_policy_update_latency_seconds_bucket{le=\"0.0005\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("felix_policy_update_latency_seconds_bucket{le=\"0.001\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("felix_policy_update_latency_seconds_bucket{le=\"0.05\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("felix_policy_update_latency_seconds_count 2"),
            "{text}"
        );
        assert!(!m.ready());
    }

    #[test]
    fn totals_counters_and_map_gauges_are_exposed() {
        let m = Metrics::default();
        Metrics::set_total(&m.denied, 42);
        m.resyncs.inc();
        m.set_occupancy(vec![("POLICY_IP_SETS", 7)]);
        assert!(m.set_datastore_connected(true));
        assert!(!m.set_datastore_connected(true));
        m.in_sync.set(1);
        assert!(m.ready());
        let text = m.render();
        for line in [
            "felix_bpf_packets_denied_total 42",
            "felix_resyncs_total 1",
            "felix_bpf_map_entries{map=\"POLICY_IP_SETS\"} 7",
            "felix_datastore_connected 1",
        ] {
            assert!(text.contains(line), "no `{line}` in:\n{text}");
        }
    }
}
