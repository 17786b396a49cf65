use std::{path::PathBuf, time::Duration};

use crate::DatastoreError;

/// How to reach etcd. [`EtcdConfig::from_env`] reads the variables upstream's tools use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    pub ca_cert_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Per-request deadline.
    pub timeout: Duration,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// The largest answer accepted (one page of a listing, one watch message): well above
    /// gRPC's 4 MiB default, as a policy of thousands of rules is hundreds of KB. A listing
    /// page over it is asked for again at half the size.
    pub max_message_bytes: usize,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_owned()],
            ca_cert_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            max_message_bytes: 64 << 20,
        }
    }
}

impl EtcdConfig {
    /// Client configuration for these endpoints, defaults otherwise.
    pub fn with_endpoints(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Reads `ETCD_ENDPOINTS` (comma-separated), `ETCD_CA_CERT_FILE`, `ETCD_CERT_FILE`,
    /// `ETCD_KEY_FILE`, `ETCD_USERNAME`, `ETCD_PASSWORD` and `ETCD_TIMEOUT` (seconds), through
    /// `lookup` so callers can layer config files over the environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, DatastoreError> {
        let mut config = Self::default();
        let non_empty = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        if let Some(endpoints) = non_empty("ETCD_ENDPOINTS") {
            config.endpoints = endpoints
                .split(',')
                .map(|e| e.trim().to_owned())
                .filter(|e| !e.is_empty())
                .collect();
        }
        for endpoint in &config.endpoints {
            check_endpoint(endpoint)?;
        }
        config.ca_cert_file = non_empty("ETCD_CA_CERT_FILE").map(PathBuf::from);
        config.cert_file = non_empty("ETCD_CERT_FILE").map(PathBuf::from);
        config.key_file = non_empty("ETCD_KEY_FILE").map(PathBuf::from);
        config.username = non_empty("ETCD_USERNAME");
        config.password = non_empty("ETCD_PASSWORD");
        if let Some(t) = non_empty("ETCD_TIMEOUT") {
            let secs: u64 = t.trim().parse().map_err(|_| {
                DatastoreError::Config(format!("ETCD_TIMEOUT: `{t}` is not a number of seconds"))
            })?;
            config.timeout = Duration::from_secs(secs);
        }
        if config.cert_file.is_some() != config.key_file.is_some() {
            return Err(DatastoreError::Config(
                "ETCD_CERT_FILE and ETCD_KEY_FILE must be given together".to_owned(),
            ));
        }
        if config.username.is_some() != config.password.is_some() {
            return Err(DatastoreError::Config(
                "ETCD_USERNAME and ETCD_PASSWORD must be given together".to_owned(),
            ));
        }
        Ok(config)
    }

    /// [`EtcdConfig::from_lookup`] over the process environment.
    pub fn from_env() -> Result<Self, DatastoreError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The endpoints as one string, for messages.
    pub fn endpoints_display(&self) -> String {
        self.endpoints.join(",")
    }
}

/// An endpoint is `http://` or `https://`, a host and, if given, a port that fits 16 bits
/// (a port that does not would otherwise be dropped silently and the default used).
fn check_endpoint(endpoint: &str) -> Result<(), DatastoreError> {
    let bad = |why: &str| DatastoreError::Config(format!("ETCD_ENDPOINTS: `{endpoint}` {why}"));
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err(bad("must start with http:// or https://"));
    }
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| bad(&format!("is not a URL: {e}")))?;
    let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
    if authority.host().is_empty() {
        return Err(bad("has no host"));
    }
    // `Uri` accepts a port it cannot read (and then reports none): read it here.
    if let Some((_, port)) = authority.as_str().rsplit_once(':') {
        if !port.contains(']') && port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad("has a port outside 1-65535"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn reads_upstream_variables() {
        let c = EtcdConfig::from_lookup(lookup(&[
            (
                "ETCD_ENDPOINTS",
                "https://10.0.0.1:2379, https://10.0.0.2:2379",
            ),
            ("ETCD_CA_CERT_FILE", "/etc/calico/ca.pem"),
            ("ETCD_CERT_FILE", "/etc/calico/cert.pem"),
            ("ETCD_KEY_FILE", "/etc/calico/key.pem"),
            ("ETCD_TIMEOUT", "3"),
        ]))
        .unwrap();
        assert_eq!(
            c.endpoints,
            ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
        );
        assert_eq!(
            c.ca_cert_file.as_deref(),
            Some(std::path::Path::new("/etc/calico/ca.pem"))
        );
        assert_eq!(c.timeout, Duration::from_secs(3));
    }

    #[test]
    fn defaults_to_local_etcd() {
        let c = EtcdConfig::from_lookup(lookup(&[])).unwrap();
        assert_eq!(c.endpoints, ["http://127.0.0.1:2379"]);
    }

    #[test]
    fn refuses_incomplete_or_malformed_settings() {
        for (pairs, needle) in [
            (
                &[("ETCD_ENDPOINTS", "10.0.0.1:2379")][..],
                "must start with http",
            ),
            (
                &[("ETCD_CERT_FILE", "/c.pem")][..],
                "must be given together",
            ),
            (&[("ETCD_USERNAME", "u")][..], "must be given together"),
            (&[("ETCD_TIMEOUT", "soon")][..], "not a number"),
            (
                &[("ETCD_ENDPOINTS", "http://127.0.0.1:99999")][..],
                "port outside 1-65535",
            ),
            (
                &[("ETCD_ENDPOINTS", "http://127.0.0.1:2379,http://:2379")][..],
                "",
            ),
            (
                &[("ETCD_ENDPOINTS", "http://127.0.0.1:0")][..],
                "port outside",
            ),
        ] {
            let err = EtcdConfig::from_lookup(lookup(pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{pairs:?}: {err}");
        }
    }
}
