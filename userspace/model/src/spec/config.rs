use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A protocol/port pair (and optional net) as in Felix's failsafe port lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProtoPort {
    pub protocol: String,
    pub port: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<String>,
}

/// Spec of a FelixConfiguration (`default` cluster-wide, `node.<name>` per node). The fields
/// the agent understands are typed; upstream's other fields ([`FELIX_UPSTREAM_ONLY_FIELDS`])
/// are accepted, stored and round-tripped as they are (calicoctl warns that they have no
/// effect here); anything else is refused as an unknown field by validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FelixConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_internal_dataplane_driver: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataplane_driver: Option<String>,
    #[serde(
        default,
        rename = "ipv6Support",
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_support: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_refresh_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iptables_refresh_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_file_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_screen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_sys: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface_exclude: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_insert_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_endpoint_to_host_action: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_inbound_host_ports: Option<Vec<ProtoPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_outbound_host_ports: Option<Vec<ProtoPort>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_go_metrics_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_process_metrics_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_interval: Option<String>,
    #[serde(
        default,
        rename = "reportingTTL",
        skip_serializing_if = "Option::is_none"
    )]
    pub reporting_ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_reporting_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_enabled: Option<bool>,
    #[serde(default, rename = "ipipMTU", skip_serializing_if = "Option::is_none")]
    pub ipip_mtu: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_enabled: Option<bool>,
    #[serde(default, rename = "vxlanMTU", skip_serializing_if = "Option::is_none")]
    pub vxlan_mtu: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_port: Option<i64>,
    #[serde(default, rename = "vxlanVNI", skip_serializing_if = "Option::is_none")]
    pub vxlan_vni: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_outgoing_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_port_range: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_route_source_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_route_protocol: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remove_external_routes: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf_log_level: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf_data_iface_pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf_connect_time_load_balancing_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf_external_service_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf_map_size_conntrack: Option<i64>,
    #[serde(
        default,
        rename = "bpfMapSizeIPSets",
        skip_serializing_if = "Option::is_none"
    )]
    pub bpf_map_size_ip_sets: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bpf_policy_debug_enabled: Option<bool>,
    /// Flow logs (upstream's names): aggregated flow records written as JSON lines to
    /// `<flowLogsFileDirectory>/flows.log` every `flowLogsFlushInterval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_logs_file_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_logs_flush_interval: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow_logs_file_directory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard_listening_port: Option<i64>,
    #[serde(
        default,
        rename = "wireguardMTU",
        skip_serializing_if = "Option::is_none"
    )]
    pub wireguard_mtu: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu_iface_pattern: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_detect_override: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_sync_path_prefix: Option<String>,
    /// Upstream fields this dataplane does not use, kept as written.
    #[serde(flatten)]
    pub upstream_only: BTreeMap<String, serde_json::Value>,
}

/// FelixConfiguration fields upstream's v3 API has that this dataplane has no use for
/// (iptables, nftables, XDP, WireGuard, OpenStack, Go runtime knobs, upstream's BPF options):
/// accepted and stored so that users' manifests apply unchanged.
pub const FELIX_UPSTREAM_ONLY_FIELDS: &[&str] = &[
    "allowIPIPPacketsFromWorkloads",
    "allowVXLANPacketsFromWorkloads",
    "awsSrcDstCheck",
    "bpfAttachType",
    "bpfCTLBLogFilter",
    "bpfConnectTimeLoadBalancing",
    "bpfConntrackLogLevel",
    "bpfConntrackMode",
    "bpfConntrackTimeouts",
    "bpfDSROptoutCIDRs",
    "bpfDisableGROForIfaces",
    "bpfDisableUnprivileged",
    "bpfEnforceRPF",
    "bpfExcludeCIDRsFromNAT",
    "bpfExportBufferSizeMB",
    "bpfExtToServiceConnmark",
    "bpfForceTrackPacketsFromIfaces",
    "bpfHostConntrackBypass",
    "bpfHostNetworkedNATWithoutCTLB",
    "bpfKubeProxyEndpointSlicesEnabled",
    "bpfKubeProxyIptablesCleanupEnabled",
    "bpfKubeProxyMinSyncPeriod",
    "bpfL3IfacePattern",
    "bpfLogFilters",
    "bpfMapSizeConntrackCleanupQueue",
    "bpfMapSizeConntrackScaling",
    "bpfMapSizeIfState",
    "bpfMapSizeNATAffinity",
    "bpfMapSizeNATBackend",
    "bpfMapSizeNATFrontend",
    "bpfMapSizePerCpuConntrack",
    "bpfMapSizeRoute",
    "bpfPSNATPorts",
    "bpfProfiling",
    "bpfRedirectToPeer",
    "cgroupV2Path",
    "dataplaneWatchdogTimeout",
    "debugDisableLogDropping",
    "debugHost",
    "debugMemoryProfilePath",
    "debugPort",
    "debugSimulateCalcGraphHangAfter",
    "debugSimulateDataplaneApplyDelay",
    "debugSimulateDataplaneHangAfter",
    "deviceRouteSourceAddressIPv6",
    "disableConntrackInvalidCheck",
    "endpointReportingDelay",
    "endpointStatusPathPrefix",
    "externalNodesList",
    "featureGates",
    "floatingIPs",
    "flowLogsCollectorDebugTrace",
    "flowLogsGoldmaneServer",
    "flowLogsLocalReporter",
    "flowLogsPolicyEvaluationMode",
    "genericXDPEnabled",
    "goGCThreshold",
    "goMaxProcs",
    "goMemoryLimitMB",
    "healthTimeoutOverrides",
    "interfaceRefreshInterval",
    "ipForwarding",
    "ipsetsRefreshInterval",
    "iptablesBackend",
    "iptablesFilterAllowAction",
    "iptablesFilterDenyAction",
    "iptablesLockFilePath",
    "iptablesLockProbeInterval",
    "iptablesLockTimeout",
    "iptablesMangleAllowAction",
    "iptablesMarkMask",
    "iptablesNATOutgoingInterfaceFilter",
    "iptablesPostWriteCheckInterval",
    "kubeNodePortRanges",
    "logDebugFilenameRegex",
    "logPrefix",
    "maxIpsetSize",
    "metadataAddr",
    "metadataPort",
    "natOutgoingExclusions",
    "netlinkTimeout",
    "nftablesFilterAllowAction",
    "nftablesFilterDenyAction",
    "nftablesMangleAllowAction",
    "nftablesMarkMask",
    "nftablesMode",
    "nftablesRefreshInterval",
    "openstackRegion",
    "programClusterRoutes",
    "prometheusWireGuardMetricsEnabled",
    "requireMTUFile",
    "routeSource",
    "routeSyncDisabled",
    "routeTableRange",
    "routeTableRanges",
    "serviceLoopPrevention",
    "sidecarAccelerationEnabled",
    "usageReportingEnabled",
    "usageReportingInitialDelay",
    "usageReportingInterval",
    "vxlanMTUV6",
    "windowsManageFirewallRules",
    "wireguardEnabledV6",
    "wireguardHostEncryptionEnabled",
    "wireguardInterfaceName",
    "wireguardInterfaceNameV6",
    "wireguardKeepAlive",
    "wireguardListeningPortV6",
    "wireguardMTUV6",
    "wireguardRoutingRulePriority",
    "wireguardThreadingEnabled",
    "workloadSourceSpoofing",
    "xdpEnabled",
    "xdpRefreshInterval",
];

/// Spec of the ClusterInformation singleton (`default`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterInformationSpec {
    #[serde(
        default,
        rename = "clusterGUID",
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster_guid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calico_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datastore_ready: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// Spec of the KubeControllersConfiguration singleton (`default`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeControllersConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_screen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_checks: Option<String>,
    #[serde(
        default,
        rename = "etcdV3CompactionPeriod",
        skip_serializing_if = "Option::is_none"
    )]
    pub etcd_v3_compaction_period: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prometheus_metrics_port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_profile_port: Option<i64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub controllers: BTreeMap<String, serde_json::Value>,
}

/// Status of the KubeControllersConfiguration singleton.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct KubeControllersConfigurationStatus {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment_vars: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_config: Option<KubeControllersConfigurationSpec>,
}
