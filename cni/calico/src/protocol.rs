//! The CNI protocol: environment, versions, results and errors (spec 1.1.0 and older).

use std::{collections::BTreeMap, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// CNI error codes (spec section "Error").
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    pub const GENERIC: u32 = 999;
}

/// A CNI error result: printed as JSON on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}{}", if details.is_empty() { String::new() } else { format!(": {details}") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn to_json(&self, version: &str) -> String {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v.to_string()
    }
}

/// The CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    /// The command as CNI_COMMAND spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// The plugin's environment (`CNI_*` variables).
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: BTreeMap<String, String>,
    pub path: Vec<String>,
}

impl Env {
    /// Reads the command and the variables it needs, through `lookup`.
    pub fn read(lookup: impl Fn(&str) -> Option<String>) -> Result<(Command, Env), CniError> {
        let var = |name: &str| lookup(name).unwrap_or_default();
        let command = match var("CNI_COMMAND").as_str() {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "" => return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set")),
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND `{other}` is not ADD, DEL, CHECK, VERSION, STATUS or GC"),
                ))
            }
        };
        let env = Env {
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS"),
            ifname: var("CNI_IFNAME"),
            args: parse_args(&var("CNI_ARGS"))?,
            path: var("CNI_PATH")
                .split(':')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        let required: &[(&str, &String)] = match command {
            Command::Add | Command::Check => &[
                ("CNI_CONTAINERID", &env.container_id),
                ("CNI_NETNS", &env.netns),
                ("CNI_IFNAME", &env.ifname),
            ],
            Command::Del => &[
                ("CNI_CONTAINERID", &env.container_id),
                ("CNI_IFNAME", &env.ifname),
            ],
            _ => &[],
        };
        for (name, value) in required {
            if value.is_empty() {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{name} is required for {command:?}"),
                ));
            }
        }
        Ok((command, env))
    }
}

/// `K1=V1;K2=V2` → map.
fn parse_args(args: &str) -> Result<BTreeMap<String, String>, CniError> {
    args.split(';')
        .filter(|a| !a.is_empty())
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    CniError::new(
                        code::INVALID_ENV,
                        format!("CNI_ARGS entry `{pair}` is not KEY=VALUE"),
                    )
                })
        })
        .collect()
}

/// Checks the requested version; returns it.
pub fn check_version(version: &str) -> Result<String, CniError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        Ok(version.to_owned())
    } else {
        Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion `{version}` is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ))
    }
}

/// The VERSION answer.
pub fn version_result(version: &str) -> String {
    json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS }).to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// An ADD result, in the 1.x shape; [`CniResult::to_json`] converts to older versions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Reads a result of any supported version (0.3.x/0.4.0 carry `version` in ips).
    pub fn from_value(value: &Value) -> Result<Self, CniError> {
        let mut value = value.clone();
        if let Some(ips) = value.get_mut("ips").and_then(Value::as_array_mut) {
            for ip in ips {
                if let Some(o) = ip.as_object_mut() {
                    o.remove("version");
                }
            }
        }
        if let Some(o) = value.as_object_mut() {
            o.remove("cniVersion");
        }
        serde_json::from_value(value).map_err(|e| {
            CniError::new(code::DECODING_FAILURE, "result is not a CNI result")
                .with_details(e.to_string())
        })
    }

    /// The result as `version` expects it.
    pub fn to_json(&self, version: &str) -> String {
        let mut v = serde_json::to_value(self).expect("results serialize");
        v["cniVersion"] = json!(version);
        if version.starts_with("0.") {
            for ip in v["ips"].as_array_mut().into_iter().flatten() {
                let family = if ip["address"].as_str().unwrap_or("").contains(':') {
                    "6"
                } else {
                    "4"
                };
                ip["version"] = json!(family);
            }
        }
        // Field order as the reference plugins print it.
        let mut ordered = serde_json::Map::new();
        for key in ["cniVersion", "interfaces", "ips", "routes", "dns"] {
            if let Some(x) = v.get(key) {
                ordered.insert(key.to_owned(), x.clone());
            }
        }
        Value::Object(ordered).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn reads_the_environment_as_podman_sets_it() {
        let (cmd, env) = Env::read(lookup(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "702f68bf34d8"),
            ("CNI_NETNS", "/run/netns/netns-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=va"),
            ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        ]))
        .unwrap();
        assert_eq!(cmd, Command::Add);
        assert_eq!(env.args["K8S_POD_NAME"], "va");
        assert_eq!(env.path, ["/opt/cni/bin", "/usr/lib/cni"]);
    }

    #[test]
    fn environment_errors_use_code_4() {
        for pairs in [
            &[][..],
            &[("CNI_COMMAND", "FROB")],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "x"),
                ("CNI_IFNAME", "eth0"),
            ],
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "x"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_ARGS", "novalue"),
            ],
        ] {
            let err = Env::read(lookup(pairs)).unwrap_err();
            assert_eq!(err.code, code::INVALID_ENV, "{pairs:?}: {err}");
        }
    }

    #[test]
    fn results_convert_between_versions() {
        let r = CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                sandbox: "/run/netns/x".into(),
            }],
            ips: vec![IpConfig {
                address: "10.0.0.5/32".parse().unwrap(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: None,
            }],
            dns: Dns::default(),
        };
        let old: Value = serde_json::from_str(&r.to_json("0.3.1")).unwrap();
        assert_eq!(old["ips"][0]["version"], "4");
        let new: Value = serde_json::from_str(&r.to_json("1.0.0")).unwrap();
        assert!(new["ips"][0].get("version").is_none());
        assert_eq!(CniResult::from_value(&old).unwrap(), r);
        assert_eq!(
            check_version("0.2.0").unwrap_err().code,
            code::INCOMPATIBLE_VERSION
        );
    }
}
