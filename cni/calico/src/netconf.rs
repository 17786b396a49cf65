//! The network configuration a runtime passes on stdin, as Calico accepts it.

use std::collections::BTreeMap;

use calico_datastore::EtcdConfig;
use serde::Deserialize;
use serde_json::Value;

use crate::protocol::{code, CniError, Dns};

/// `true`/`false` given as a JSON boolean or, as upstream writes them, a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag(pub bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Value::deserialize(d)? {
            Value::Bool(b) => Ok(Flag(b)),
            Value::String(s) if s == "true" => Ok(Flag(true)),
            Value::String(s) if s == "false" => Ok(Flag(false)),
            other => Err(serde::de::Error::custom(format!(
                "expected true or false, got {other}"
            ))),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct IpamConf {
    #[serde(rename = "type")]
    pub plugin: String,
    #[serde(default)]
    pub assign_ipv4: Option<Flag>,
    #[serde(default)]
    pub assign_ipv6: Option<Flag>,
    #[serde(default)]
    pub ipv4_pools: Vec<String>,
    #[serde(default)]
    pub ipv6_pools: Vec<String>,
}

/// Network configuration. Fields Calico does not use are accepted (runtimes and chains add
/// their own); the ones it uses must have the right type.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion", default)]
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin: String,
    #[serde(default)]
    pub ipam: Option<IpamConf>,
    #[serde(default)]
    pub etcd_endpoints: Option<String>,
    #[serde(default)]
    pub etcd_key_file: Option<String>,
    #[serde(default)]
    pub etcd_cert_file: Option<String>,
    #[serde(default)]
    pub etcd_ca_cert_file: Option<String>,
    #[serde(default)]
    pub etcd_username: Option<String>,
    #[serde(default)]
    pub etcd_password: Option<String>,
    #[serde(default)]
    pub datastore_type: Option<String>,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub log_file_path: Option<String>,
    #[serde(default)]
    pub nodename: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Where calico-node writes the MTU workloads should use (upstream's path by default),
    /// read when `mtu` is not set.
    #[serde(default)]
    pub mtu_file: Option<String>,
    #[serde(default)]
    pub kubernetes: Option<Value>,
    #[serde(default)]
    pub policy: Option<Value>,
    #[serde(rename = "runtimeConfig", default)]
    pub runtime_config: Option<Value>,
    #[serde(rename = "prevResult", default)]
    pub prev_result: Option<Value>,
    #[serde(default)]
    pub args: Option<Value>,
    #[serde(default)]
    pub dns: Option<Dns>,
    /// Labels for the workload endpoint (a Calico extension).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Where calico-node writes the workloads' MTU (upstream's path).
pub const DEFAULT_MTU_FILE: &str = "/var/lib/calico/mtu";

impl NetConf {
    /// The workload's MTU: `mtu` if set, else what calico-node wrote to the MTU file (the
    /// overlay's, when VXLAN is on), else 1500.
    pub fn workload_mtu(&self) -> u32 {
        if let Some(mtu) = self.mtu {
            return mtu;
        }
        let path = self.mtu_file.as_deref().unwrap_or(DEFAULT_MTU_FILE);
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .filter(|m| (68..=65535).contains(m))
            .unwrap_or(1500)
    }

    /// Parses stdin. A body that is not JSON is a decoding failure (6); a missing or mistyped
    /// field Calico needs is an invalid configuration (7).
    pub fn parse(stdin: &[u8]) -> Result<(Self, Value), CniError> {
        let raw: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                code::DECODING_FAILURE,
                "network configuration on stdin is not JSON",
            )
            .with_details(e.to_string())
        })?;
        let conf: NetConf = serde_json::from_value(raw.clone()).map_err(|e| {
            CniError::new(code::INVALID_CONFIG, "network configuration is invalid")
                .with_details(e.to_string())
        })?;
        Ok((conf, raw))
    }

    /// Checks what every command but VERSION needs.
    pub fn require_network(&self) -> Result<(), CniError> {
        if self.name.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "network configuration has no `name`",
            ));
        }
        if self.cni_version.is_empty() {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "network configuration has no `cniVersion`",
            ));
        }
        if let Some(t) = self.datastore_type.as_deref().filter(|t| *t != "etcdv3") {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                format!("datastore_type `{t}` is not supported (use etcdv3)"),
            ));
        }
        Ok(())
    }

    /// Datastore settings: the config's `etcd_*` fields over the `ETCD_*` environment.
    pub fn etcd(&self, env: impl Fn(&str) -> Option<String>) -> Result<EtcdConfig, CniError> {
        let pick = |conf: &Option<String>, name: &str| conf.clone().or_else(|| env(name));
        let lookup = |name: &str| match name {
            "ETCD_ENDPOINTS" => pick(&self.etcd_endpoints, name),
            "ETCD_KEY_FILE" => pick(&self.etcd_key_file, name),
            "ETCD_CERT_FILE" => pick(&self.etcd_cert_file, name),
            "ETCD_CA_CERT_FILE" => pick(&self.etcd_ca_cert_file, name),
            "ETCD_USERNAME" => pick(&self.etcd_username, name),
            "ETCD_PASSWORD" => pick(&self.etcd_password, name),
            other => env(other),
        };
        let mut config = EtcdConfig::from_lookup(lookup)
            .map_err(|e| CniError::new(code::INVALID_CONFIG, e.to_string()))?;
        // A plugin call must not hang a runtime: fail fast and let it retry.
        config.timeout = config.timeout.min(std::time::Duration::from_secs(5));
        config.connect_timeout = config
            .connect_timeout
            .min(std::time::Duration::from_secs(3));
        Ok(config)
    }

    /// `kubernetes.kubeconfig`: set, the plugins read pods from the Kubernetes API.
    pub fn kubeconfig(&self) -> Option<std::path::PathBuf> {
        self.kubernetes
            .as_ref()?
            .get("kubeconfig")?
            .as_str()
            .filter(|s| !s.is_empty())
            .map(std::path::PathBuf::from)
    }

    /// This node's name: `nodename`, else /var/lib/calico/nodename, else the hostname.
    pub fn node_name(&self) -> String {
        if let Some(n) = self.nodename.clone().filter(|n| !n.is_empty()) {
            return n;
        }
        if let Ok(n) = std::fs::read_to_string("/var/lib/calico/nodename") {
            if !n.trim().is_empty() {
                return n.trim().to_owned();
            }
        }
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "localhost".to_owned())
    }

    /// Labels from the config and from `args.cni.labels` (the CNI labels convention).
    pub fn workload_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        if let Some(list) = self
            .args
            .as_ref()
            .and_then(|a| a.pointer("/cni/labels"))
            .and_then(Value::as_array)
        {
            for l in list {
                if let (Some(k), Some(v)) = (l["key"].as_str(), l["value"].as_str()) {
                    labels.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        labels
    }
}
