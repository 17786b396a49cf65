//! Settings: the KubeControllersConfiguration `default` in the datastore when there is one
//! (upstream's fields), else `ENABLED_CONTROLLERS` and upstream's defaults, written back as
//! that configuration so `calicoctl get kubecontrollersconfiguration` shows what runs.

use std::{collections::BTreeSet, time::Duration};

use calico_model::{parse_go_duration, spec::KubeControllersConfigurationSpec};
use serde_json::{json, Value};

/// The controllers, as upstream names them in `ENABLED_CONTROLLERS`.
pub const ALL_CONTROLLERS: &[&str] = &[
    "node",
    "policy",
    "namespace",
    "serviceaccount",
    "workloadendpoint",
];

/// Upstream's section name in `spec.controllers` for each controller.
fn section(controller: &str) -> &'static str {
    match controller {
        "node" => "node",
        "policy" => "policy",
        "namespace" => "namespace",
        "serviceaccount" => "serviceAccount",
        _ => "workloadEndpoint",
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub enabled: BTreeSet<&'static str>,
    /// How often the IPAM garbage collection looks (`controllers.node.reconcilerPeriod`).
    pub reconciler_period: Duration,
    /// How long an address may outlive its pod (`controllers.node.leakGracePeriod`).
    pub leak_grace_period: Duration,
    /// Kubernetes node labels copied onto Calico Nodes (`controllers.node.syncLabels`,
    /// `Enabled` unless `Disabled`).
    pub sync_labels: bool,
    /// Where /metrics (with /liveness and /readiness) is served (`prometheusMetricsPort`;
    /// 0: nowhere).
    pub metrics_port: Option<u16>,
}

const DEFAULT_RECONCILER_PERIOD: Duration = Duration::from_secs(5 * 60);
const DEFAULT_LEAK_GRACE_PERIOD: Duration = Duration::from_secs(15 * 60);

impl Settings {
    /// From `ENABLED_CONTROLLERS` (comma-separated; unset: all).
    pub fn from_env(enabled: Option<&str>) -> Result<Self, String> {
        let enabled = match enabled {
            None => ALL_CONTROLLERS.iter().copied().collect(),
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|name| {
                    ALL_CONTROLLERS
                        .iter()
                        .copied()
                        .find(|c| *c == name)
                        .ok_or_else(|| {
                            format!(
                                "ENABLED_CONTROLLERS: unknown controller `{name}` (known: {})",
                                ALL_CONTROLLERS.join(", ")
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            enabled,
            reconciler_period: DEFAULT_RECONCILER_PERIOD,
            leak_grace_period: DEFAULT_LEAK_GRACE_PERIOD,
            sync_labels: true,
            metrics_port: None,
        })
    }

    /// From a stored KubeControllersConfiguration: a controller runs when its section is there.
    pub fn from_spec(spec: &KubeControllersConfigurationSpec) -> Result<Self, String> {
        let enabled = ALL_CONTROLLERS
            .iter()
            .copied()
            .filter(|c| spec.controllers.contains_key(section(c)))
            .collect();
        let node = spec.controllers.get("node");
        let duration = |field: &str, default: Duration| -> Result<Duration, String> {
            match node.and_then(|n| n.get(field)) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::String(s)) => {
                    parse_go_duration(s).map_err(|e| format!("spec.controllers.node.{field}: {e}"))
                }
                Some(other) => Err(format!(
                    "spec.controllers.node.{field}: `{other}` is not a duration such as \"5m\""
                )),
            }
        };
        let sync_labels = match node.and_then(|n| n.get("syncLabels")) {
            None | Some(Value::Null) => true,
            Some(Value::String(s)) if s == "Enabled" => true,
            Some(Value::String(s)) if s == "Disabled" => false,
            Some(other) => {
                return Err(format!(
                    "spec.controllers.node.syncLabels: `{other}` is not Enabled or Disabled"
                ))
            }
        };
        let metrics_port = match spec.prometheus_metrics_port {
            None => None,
            Some(p) => Some(u16::try_from(p).map_err(|_| {
                format!("spec.prometheusMetricsPort: {p} is not a port (0 to 65535)")
            })?),
        };
        Ok(Self {
            enabled,
            reconciler_period: duration("reconcilerPeriod", DEFAULT_RECONCILER_PERIOD)?,
            leak_grace_period: duration("leakGracePeriod", DEFAULT_LEAK_GRACE_PERIOD)?,
            sync_labels,
            metrics_port,
        })
    }

    /// The configuration that says these settings (what upstream writes when none exists).
    pub fn to_spec(&self) -> KubeControllersConfigurationSpec {
        let mut spec = KubeControllersConfigurationSpec {
            log_severity_screen: Some("Info".to_owned()),
            health_checks: Some("Enabled".to_owned()),
            prometheus_metrics_port: self.metrics_port.map(i64::from),
            ..Default::default()
        };
        for c in &self.enabled {
            let mut value = json!({ "reconcilerPeriod": "5m" });
            if *c == "node" {
                value["leakGracePeriod"] = json!(format_duration(self.leak_grace_period));
                value["reconcilerPeriod"] = json!(format_duration(self.reconciler_period));
                value["syncLabels"] = json!(if self.sync_labels {
                    "Enabled"
                } else {
                    "Disabled"
                });
            }
            spec.controllers.insert(section(c).to_owned(), value);
        }
        spec
    }
}

fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_controllers_come_from_the_environment() {
        let s = Settings::from_env(Some("node, policy")).unwrap();
        assert_eq!(s.enabled, ["node", "policy"].into());
        assert_eq!(Settings::from_env(None).unwrap().enabled.len(), 5);
        let err = Settings::from_env(Some("node,pods")).unwrap_err();
        assert!(err.contains("unknown controller `pods`"), "{err}");
    }

    #[test]
    fn the_stored_configuration_enables_by_section_and_sets_the_node_periods() {
        let spec: KubeControllersConfigurationSpec = serde_json::from_value(json!({
            "controllers": {
                "node": {"reconcilerPeriod": "1s", "leakGracePeriod": "3s"},
                "namespace": {},
                "serviceAccount": {}
            }
        }))
        .unwrap();
        let s = Settings::from_spec(&spec).unwrap();
        assert!(s.sync_labels, "syncLabels defaults to Enabled");
        assert_eq!(s.metrics_port, None);
        assert_eq!(s.enabled, ["namespace", "node", "serviceaccount"].into());
        assert_eq!(s.reconciler_period, Duration::from_secs(1));
        assert_eq!(s.leak_grace_period, Duration::from_secs(3));
        let bad: KubeControllersConfigurationSpec = serde_json::from_value(json!({
            "controllers": {"node": {"leakGracePeriod": "soon"}}
        }))
        .unwrap();
        let err = Settings::from_spec(&bad).unwrap_err();
        assert!(
            err.contains("spec.controllers.node.leakGracePeriod"),
            "{err}"
        );
    }

    #[test]
    fn written_settings_read_back_the_same() {
        let s = Settings::from_env(Some("node,workloadendpoint")).unwrap();
        assert_eq!(Settings::from_spec(&s.to_spec()).unwrap(), s);
    }
}
