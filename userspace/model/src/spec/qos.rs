//! Upstream's QoS kinds: `QoSPolicy` and a workload endpoint's `qosControls`. Stored and
//! validated as upstream's API has them; this dataplane does not apply them (calicoctl warns).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Order, Port, Protocol};

/// Spec of a QoSPolicy: DSCP marking of the egress traffic of the endpoints it selects.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QosPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<Order>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress: Vec<QosRule>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QosRule {
    pub action: QosAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_version: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "QosEntityRule::is_empty")]
    pub destination: QosEntityRule,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QosAction {
    /// 0-63, or one of upstream's names (`EF`, `AF11`, `CS1`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dscp: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QosEntityRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Port>,
}

impl QosEntityRule {
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && self.ports.is_empty()
    }
}

/// The DSCP names upstream accepts beside the numbers 0-63.
pub const DSCP_NAMES: &[&str] = &[
    "DF", "EF", "AF11", "AF12", "AF13", "AF21", "AF22", "AF23", "AF31", "AF32", "AF33", "AF41",
    "AF42", "AF43", "CS0", "CS1", "CS2", "CS3", "CS4", "CS5", "CS6",
];

/// A workload endpoint's `qosControls`: bandwidth, packet rate and connection limits, and a
/// DSCP value, as upstream's API has them (integers; bits per second for bandwidth).
pub type QosControls = BTreeMap<String, serde_json::Value>;

/// The fields of `qosControls` upstream's API has.
pub const QOS_CONTROLS_FIELDS: &[&str] = &[
    "ingressBandwidth",
    "egressBandwidth",
    "ingressBurst",
    "egressBurst",
    "ingressPeakrate",
    "egressPeakrate",
    "ingressMinburst",
    "egressMinburst",
    "ingressPacketRate",
    "egressPacketRate",
    "ingressPacketBurst",
    "egressPacketBurst",
    "ingressMaxConnections",
    "egressMaxConnections",
    "dscp",
];
