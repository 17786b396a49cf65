//! Who the workload is: orchestrator, names of its endpoint, veth and IPAM handle, as upstream
//! derives them.

use std::collections::BTreeMap;

use sha1::{Digest, Sha1};

/// The identity of one attachment (container + interface).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// `k8s` when the runtime passed a pod namespace and name, else `cni`.
    pub orchestrator: &'static str,
    pub namespace: String,
    /// Pod name (k8s) or container ID (cni).
    pub workload: String,
    pub pod: Option<String>,
    pub container_id: String,
    pub ifname: String,
    pub node: String,
}

impl Workload {
    pub fn new(
        node: &str,
        container_id: &str,
        ifname: &str,
        args: &BTreeMap<String, String>,
    ) -> Self {
        match (args.get("K8S_POD_NAMESPACE"), args.get("K8S_POD_NAME")) {
            (Some(ns), Some(pod)) if !ns.is_empty() && !pod.is_empty() => Workload {
                orchestrator: "k8s",
                namespace: ns.clone(),
                workload: pod.clone(),
                pod: Some(pod.clone()),
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
                node: node.to_owned(),
            },
            _ => Workload {
                orchestrator: "cni",
                namespace: "default".to_owned(),
                workload: container_id.to_owned(),
                pod: None,
                container_id: container_id.to_owned(),
                ifname: ifname.to_owned(),
                node: node.to_owned(),
            },
        }
    }

    /// Host-side veth: `cali` + 11 hex chars of sha1(`<namespace>.<pod>`) for Kubernetes, the
    /// container ID's first 11 characters otherwise (as upstream names them). A container ID
    /// that is not plain ASCII letters, digits, `-`, `_` or `.` (any ID a runtime may pass)
    /// is hashed too, so the name is always a valid interface name.
    ///
    /// An interface other than `eth0` (a second network, Multus) hashes its name in too, so the
    /// attachments of one workload never share a veth.
    pub fn veth_name(&self) -> String {
        if self.ifname != "eth0" {
            let base = match &self.pod {
                Some(pod) => format!("{}.{pod}", self.namespace),
                None => self.container_id.clone(),
            };
            return format!(
                "cali{}",
                &sha1_hex(&format!("{base}.{}", self.ifname))[..11]
            );
        }
        let id = match &self.pod {
            Some(pod) => sha1_hex(&format!("{}.{pod}", self.namespace)),
            None if self
                .container_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) =>
            {
                self.container_id.clone()
            }
            None => sha1_hex(&self.container_id),
        };
        // ASCII by now, so slicing by bytes is slicing by characters.
        format!("cali{}", &id[..id.len().min(11)])
    }

    /// The name used when [`Workload::veth_name`] is already another live attachment's (two
    /// container IDs that share their first 11 characters): a hash of the whole ID and the
    /// interface.
    pub fn alternate_veth_name(&self) -> String {
        let digest = sha1_hex(&format!("{}.{}.alternate", self.container_id, self.ifname));
        format!("cali{}", &digest[..11])
    }

    /// WorkloadEndpoint name, e.g. `node1-k8s-my--pod-eth0` (dashes in parts doubled).
    pub fn endpoint_name(&self) -> String {
        let esc = |s: &str| s.replace('-', "--");
        format!(
            "{}-{}-{}-{}",
            esc(&self.node),
            self.orchestrator,
            esc(&self.workload),
            esc(&self.ifname)
        )
    }

    /// IPAM handle: `<network>.<containerID>`.
    pub fn handle(network: &str, container_id: &str) -> String {
        format!("{network}.{container_id}")
    }
}

fn sha1_hex(text: &str) -> String {
    Sha1::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_pods_are_named_as_upstream() {
        let args = BTreeMap::from([
            ("K8S_POD_NAMESPACE".to_owned(), "default".to_owned()),
            ("K8S_POD_NAME".to_owned(), "my-nginx-b1337a".to_owned()),
        ]);
        let w = Workload::new("node1", "abcdef0123456789", "eth0", &args);
        assert_eq!(w.orchestrator, "k8s");
        assert_eq!(w.endpoint_name(), "node1-k8s-my--nginx--b1337a-eth0");
        // sha1("default.my-nginx-b1337a"), first 11 hex chars.
        let digest = Sha1::digest(b"default.my-nginx-b1337a");
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(w.veth_name(), format!("cali{}", &hex[..11]));
        assert_eq!(w.veth_name().len(), 15);
    }

    #[test]
    fn other_runtimes_use_the_container_id() {
        let args = BTreeMap::from([("K8S_POD_NAME".to_owned(), "va".to_owned())]);
        let w = Workload::new("my-node", "702f68bf34d8b947e4", "eth0", &args);
        assert_eq!(w.orchestrator, "cni");
        assert_eq!(w.veth_name(), "cali702f68bf34d");
        assert_eq!(w.endpoint_name(), "my--node-cni-702f68bf34d8b947e4-eth0");
        assert_eq!(Workload::handle("net1", "702f"), "net1.702f");
    }

    #[test]
    fn any_container_id_gives_a_valid_interface_name() {
        let none = BTreeMap::new();
        for id in [
            "ünïcödé-container-id",
            "日本語のコンテナ",
            "a/b c:d",
            "é",
            "",
        ] {
            let name = Workload::new("n", id, "eth0", &none).veth_name();
            assert!(
                name.starts_with("cali") && name.len() <= 15,
                "{id:?} → {name:?}"
            );
            assert!(
                name.is_ascii() && !name.contains(['/', ' ', ':']),
                "{id:?} → {name:?}"
            );
        }
        // Two non-ASCII ids get two names.
        let a = Workload::new("n", "контейнер-1", "eth0", &none).veth_name();
        let b = Workload::new("n", "контейнер-2", "eth0", &none).veth_name();
        assert_ne!(a, b);
    }

    #[test]
    fn attachments_of_one_workload_never_share_a_veth() {
        let none = BTreeMap::new();
        let eth0 = Workload::new("n", "702f68bf34d8b947e4", "eth0", &none);
        let eth1 = Workload::new("n", "702f68bf34d8b947e4", "eth1", &none);
        assert_eq!(eth0.veth_name(), "cali702f68bf34d");
        assert_ne!(eth0.veth_name(), eth1.veth_name());
        assert!(eth1.veth_name().len() == 15 && eth1.veth_name().starts_with("cali"));
        // Two ids sharing 11 characters: the alternates differ.
        let other = Workload::new("n", "702f68bf34dffff", "eth0", &none);
        assert_eq!(eth0.veth_name(), other.veth_name());
        assert_ne!(eth0.alternate_veth_name(), other.alternate_veth_name());
    }
}
