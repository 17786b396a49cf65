//! What a test needs from the machine, and what happens when it is missing: outside CI the test
//! skips with a printed reason; with `CI=true` it fails, so CI can never pass by skipping.

use std::{path::Path, process::Command};

/// Something a test needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// Effective uid 0 (for netns, veths, loading BPF programs).
    Root,
    /// `ip netns` from iproute2.
    NetNs,
    /// Loading BPF programs and attaching them to TC (root and a kernel with BPF syscall).
    Bpf,
    /// The `etcd` server binary (Debian `etcd-server`).
    Etcd,
    /// podman with runc and a static busybox to build a local image from (Debian `podman`,
    /// `runc`, `busybox-static`).
    Podman,
    /// BIRD 2 (Debian `bird2`).
    Bird,
    /// dockerd (Debian `docker.io`) and a static busybox for the local image.
    Docker,
    /// kube-apiserver and kubectl, built by `cargo xtask setup` from their Go module.
    Kubernetes,
    /// kubelet (built the same way) with Debian's containerd, podman (to build the local
    /// image), busybox-static and the reference `loopback` CNI plugin.
    Kubelet,
}

impl Requirement {
    /// Why this requirement is not met, or `None` when it is.
    fn missing(self) -> Option<String> {
        match self {
            Requirement::Root => (!nix::unistd::geteuid().is_root())
                .then(|| "not running as root (euid != 0)".to_owned()),
            Requirement::NetNs => {
                if Requirement::Root.missing().is_some() {
                    return Some("network namespaces need root".to_owned());
                }
                (!command_works("ip", &["netns", "list"]))
                    .then(|| "`ip netns` (iproute2) is not usable".to_owned())
            }
            Requirement::Bpf => {
                if Requirement::Root.missing().is_some() {
                    return Some("loading BPF programs needs root".to_owned());
                }
                (!Path::new("/proc/sys/net/core/bpf_jit_enable").exists()
                    && !Path::new("/sys/kernel/btf/vmlinux").exists())
                .then(|| "the kernel shows no sign of BPF support".to_owned())
            }
            Requirement::Etcd => (!command_works("etcd", &["--version"]))
                .then(|| "`etcd` is not installed (Debian package etcd-server)".to_owned()),
            Requirement::Bird => (!command_works("bird", &["--version"]))
                .then(|| "`bird` is not installed (Debian package bird2)".to_owned()),
            Requirement::Docker => {
                if !command_works("dockerd", &["--version"]) {
                    Some("`dockerd` is not installed (Debian package docker.io)".to_owned())
                } else if !Path::new("/bin/busybox").exists() {
                    Some("/bin/busybox is missing (Debian package busybox-static)".to_owned())
                } else {
                    None
                }
            }
            Requirement::Kubernetes => {
                let dir = crate::kubernetes_bin_dir();
                ["kube-apiserver", "kubectl"]
                    .iter()
                    .find(|p| !dir.join(p).exists())
                    .map(|p| {
                        format!(
                            "{} is missing (`cargo xtask setup` builds it)",
                            dir.join(p).display()
                        )
                    })
            }
            Requirement::Kubelet => {
                let kubelet = crate::kubernetes_bin_dir().join("kubelet");
                if !kubelet.exists() {
                    Some(format!(
                        "{} is missing (`cargo xtask setup` builds it)",
                        kubelet.display()
                    ))
                } else if !command_works("containerd", &["--version"]) {
                    Some("`containerd` is not installed".to_owned())
                } else if !command_works("podman", &["--version"]) {
                    Some("`podman` is not installed".to_owned())
                } else if !Path::new("/bin/busybox").exists() {
                    Some("/bin/busybox is missing (Debian package busybox-static)".to_owned())
                } else if !Path::new("/usr/lib/cni/loopback").exists() {
                    Some("/usr/lib/cni/loopback is missing (Debian package containernetworking-plugins)".to_owned())
                } else {
                    None
                }
            }
            Requirement::Podman => {
                if !command_works("podman", &["--version"]) {
                    Some("`podman` is not installed".to_owned())
                } else if !command_works("runc", &["--version"]) {
                    Some("`runc` is not installed".to_owned())
                } else if !Path::new("/bin/busybox").exists() {
                    Some("/bin/busybox is missing (Debian package busybox-static)".to_owned())
                } else {
                    None
                }
            }
        }
    }
}

fn command_works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Checks `requirements` for the test `test`. Returns `true` when the test may run.
///
/// When something is missing: panics if `CI=true` (CI must run every test), otherwise prints a
/// loud SKIPPED line and returns `false` so the test can return early.
#[must_use]
pub fn require(test: &str, requirements: &[Requirement]) -> bool {
    let missing: Vec<String> = requirements.iter().filter_map(|r| r.missing()).collect();
    if missing.is_empty() {
        return true;
    }
    let reason = missing.join("; ");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{test}: cannot run in CI: {reason}");
    }
    eprintln!("\n*** SKIPPED {test}: {reason} ***\n");
    false
}
