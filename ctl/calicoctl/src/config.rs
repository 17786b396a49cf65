//! Where calicoctl finds the datastore: `--config` (or /etc/calico/calicoctl.cfg) holding a
//! CalicoAPIConfig, else the environment, as upstream does.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use calico_datastore::EtcdConfig;
use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/calico/calicoctl.cfg";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApiConfigFile {
    api_version: String,
    kind: String,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    spec: ApiConfigSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ApiConfigSpec {
    datastore_type: Option<String>,
    etcd_endpoints: Option<String>,
    etcd_username: Option<String>,
    etcd_password: Option<String>,
    etcd_key_file: Option<String>,
    etcd_cert_file: Option<String>,
    #[serde(rename = "etcdCACertFile")]
    etcd_ca_cert_file: Option<String>,
    kubeconfig: Option<String>,
}

/// The datastore settings: from `explicit` (which must exist), else from the default file if
/// it exists, else from the environment.
pub fn load(explicit: Option<&Path>) -> Result<EtcdConfig> {
    let path = match explicit {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.exists()),
    };
    match path {
        Some(path) => from_file(&path),
        None => from_env(|name| std::env::var(name).ok()),
    }
}

fn check_datastore_type(value: Option<&str>, source: &str) -> Result<()> {
    match value.map(str::trim) {
        None | Some("") | Some("etcdv3") => Ok(()),
        Some("kubernetes") => bail!(
            "{source}: datastoreType `kubernetes` is not supported: this calicoctl talks to etcd \
             (use `etcdv3`)"
        ),
        Some(other) => bail!("{source}: datastoreType `{other}` is unknown (expected `etcdv3`)"),
    }
}

pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<EtcdConfig> {
    check_datastore_type(lookup("DATASTORE_TYPE").as_deref(), "DATASTORE_TYPE")?;
    Ok(EtcdConfig::from_lookup(lookup)?)
}

fn from_file(path: &Path) -> Result<EtcdConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading calicoctl config {}", path.display()))?;
    let file: ApiConfigFile = serde_yaml_ng::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        anyhow::anyhow!("{}{at}: {e}", path.display())
    })?;
    let shown = path.display().to_string();
    if file.kind != "CalicoAPIConfig" {
        bail!(
            "{shown}: kind must be CalicoAPIConfig (got `{}`)",
            file.kind
        );
    }
    if file.api_version != "projectcalico.org/v3" {
        bail!(
            "{shown}: apiVersion must be projectcalico.org/v3 (got `{}`)",
            file.api_version
        );
    }
    check_datastore_type(file.spec.datastore_type.as_deref(), &shown)?;
    if file.spec.kubeconfig.is_some() {
        bail!("{shown}: spec.kubeconfig is not supported (etcdv3 only)");
    }
    let spec = file.spec;
    let lookup = |name: &str| -> Option<String> {
        match name {
            "ETCD_ENDPOINTS" => spec.etcd_endpoints.clone(),
            "ETCD_USERNAME" => spec.etcd_username.clone(),
            "ETCD_PASSWORD" => spec.etcd_password.clone(),
            "ETCD_KEY_FILE" => spec.etcd_key_file.clone(),
            "ETCD_CERT_FILE" => spec.etcd_cert_file.clone(),
            "ETCD_CA_CERT_FILE" => spec.etcd_ca_cert_file.clone(),
            _ => None,
        }
    };
    EtcdConfig::from_lookup(lookup).map_err(|e| anyhow::anyhow!("{shown}: {e}"))
}
