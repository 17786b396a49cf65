//! Health state and Prometheus metrics, shared between the agent's tasks and the HTTP side.

use std::{
    fmt::Write,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

/// Upper bounds of the policy update latency histogram, in seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

#[derive(Default)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

pub struct Metrics {
    started: Instant,
    /// Milliseconds since `started` of the main loop's last turn.
    last_turn_ms: AtomicU64,
    pub in_sync: AtomicBool,
    pub datastore_connected: AtomicBool,
    pub resyncs: AtomicU64,
    pub endpoints: AtomicU64,
    pub compile_errors: AtomicU64,
    pub allowed: AtomicU64,
    pub denied: AtomicU64,
    pub tracked: AtomicU64,
    pub forwarded: AtomicU64,
    pub bird_config_errors: AtomicU64,
    pub bird_restarts: AtomicU64,
    latency: Mutex<Histogram>,
    occupancy: Mutex<Vec<(&'static str, usize)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            last_turn_ms: AtomicU64::new(0),
            in_sync: AtomicBool::new(false),
            datastore_connected: AtomicBool::new(false),
            resyncs: AtomicU64::new(0),
            endpoints: AtomicU64::new(0),
            compile_errors: AtomicU64::new(0),
            allowed: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            tracked: AtomicU64::new(0),
            forwarded: AtomicU64::new(0),
            bird_config_errors: AtomicU64::new(0),
            bird_restarts: AtomicU64::new(0),
            latency: Mutex::new(Histogram::default()),
            occupancy: Mutex::new(Vec::new()),
        }
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
        self.in_sync.load(Ordering::Relaxed) && self.datastore_connected.load(Ordering::Relaxed)
    }

    pub fn observe_update(&self, latency: Duration) {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let s = latency.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if s <= *bound {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += s;
    }

    pub fn set_occupancy(&self, occupancy: Vec<(&'static str, usize)>) {
        *self.occupancy.lock().unwrap_or_else(|e| e.into_inner()) = occupancy;
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, kind: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            &mut out,
            "felix_in_sync",
            "1 once the dataplane reflects a complete datastore snapshot.",
            "gauge",
            u64::from(self.in_sync.load(Ordering::Relaxed)),
        );
        gauge(
            &mut out,
            "felix_datastore_connected",
            "1 while the datastore answers.",
            "gauge",
            u64::from(self.datastore_connected.load(Ordering::Relaxed)),
        );
        gauge(
            &mut out,
            "felix_resyncs_total",
            "Full resyncs from a datastore snapshot.",
            "counter",
            load(&self.resyncs),
        );
        gauge(
            &mut out,
            "felix_active_local_endpoints",
            "Local endpoints with programmed policy.",
            "gauge",
            load(&self.endpoints),
        );
        gauge(
            &mut out,
            "felix_policy_compile_errors_total",
            "Endpoint programs refused at compile time (the endpoint then drops).",
            "counter",
            load(&self.compile_errors),
        );
        gauge(
            &mut out,
            "felix_bpf_packets_allowed_total",
            "Packets allowed by policy.",
            "counter",
            load(&self.allowed),
        );
        gauge(
            &mut out,
            "felix_bpf_packets_denied_total",
            "Packets denied by policy.",
            "counter",
            load(&self.denied),
        );
        gauge(
            &mut out,
            "felix_bpf_packets_tracked_total",
            "Packets of tracked flows passed without a verdict.",
            "counter",
            load(&self.tracked),
        );
        gauge(
            &mut out,
            "felix_bpf_packets_forwarded_total",
            "Packets redirected straight to another local endpoint's interface.",
            "counter",
            load(&self.forwarded),
        );
        gauge(
            &mut out,
            "felix_bird_config_errors_total",
            "BIRD configurations refused (see bird.error beside the socket).",
            "counter",
            load(&self.bird_config_errors),
        );
        gauge(
            &mut out,
            "felix_bird_restarts_total",
            "Times BIRD died and was restarted.",
            "counter",
            load(&self.bird_restarts),
        );
        {
            let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
            let name = "felix_policy_update_latency_seconds";
            let _ = writeln!(out, "# HELP {name} Datastore change received to dataplane programmed.\n# TYPE {name} histogram");
            for (i, bound) in BUCKETS.iter().enumerate() {
                let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {}", h.counts[i]);
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
                h.count, h.sum, h.count
            );
        }
        {
            let occ = self.occupancy.lock().unwrap_or_else(|e| e.into_inner());
            let name = "felix_bpf_map_entries";
            let _ = writeln!(
                out,
                "# HELP {name} Entries in each dataplane map.\n# TYPE {name} gauge"
            );
            for (map, n) in occ.iter() {
                let _ = writeln!(out, "{name}{{map=\"{map}\"}} {n}");
            }
        }
        out
    }
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
}
