//! Running the built `calico` CNI plugin the way a runtime does, inside a host namespace.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::NetNs;

/// Makes `dir` (where cargo put the `calico` binary) a CNI plugin directory: `calico-ipam` is
/// the same program under the name it dispatches on, as upstream installs it. The link replaces
/// whatever is there (an older build's separate binary) by an atomic rename, so parallel tests
/// can call this together.
pub fn cni_plugin_dir(dir: &Path) -> Result<()> {
    let link = dir.join("calico-ipam");
    if std::fs::read_link(&link).is_ok_and(|target| target == Path::new("calico")) {
        return Ok(());
    }
    let temporary = dir.join(format!(".calico-ipam.{}", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    std::os::unix::fs::symlink("calico", &temporary)
        .with_context(|| format!("linking {}", temporary.display()))?;
    std::fs::rename(&temporary, &link).with_context(|| format!("placing {}", link.display()))
}

/// Runs the calico CNI plugin in `bin` (with `calico-ipam` beside it) for `command` (ADD,
/// DEL, ...) inside `host`'s network namespace, wiring workload namespace `ns`; returns the
/// plugin's JSON answer.
pub fn cni(
    bin: &Path,
    host: &NetNs,
    etcd: &str,
    node: &str,
    command: &str,
    container: &str,
    ns: &NetNs,
) -> Result<serde_json::Value> {
    cni_with_args(bin, host, etcd, node, command, container, ns, "")
}

/// [`cni`] with `CNI_ARGS` (e.g. `K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0`, which makes the
/// plugin name and profile the endpoint as a Kubernetes pod's).
#[allow(clippy::too_many_arguments)]
pub fn cni_with_args(
    bin: &Path,
    host: &NetNs,
    etcd: &str,
    node: &str,
    command: &str,
    container: &str,
    ns: &NetNs,
    args: &str,
) -> Result<serde_json::Value> {
    cni_with_conf(
        bin,
        host,
        &cni_conf(etcd, node),
        command,
        container,
        ns,
        args,
    )
}

/// The network configuration the helpers pass: network `demo-net`, node `node`, etcd at
/// `etcd`, `calico-ipam`. Add fields (e.g. `kubernetes`) before [`cni_with_conf`].
pub fn cni_conf(etcd: &str, node: &str) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "demo-net",
        "type": "calico",
        "nodename": node,
        "etcd_endpoints": etcd,
        "ipam": { "type": "calico-ipam" },
        // Never the machine's /var/lib/calico/mtu: a test that wants an agent's MTU names
        // that agent's file (`AgentProcess::mtu_file`).
        "mtu_file": "/nonexistent/calico-tests/mtu",
    })
}

/// [`cni_with_args`] with a network configuration of the caller's.
pub fn cni_with_conf(
    bin: &Path,
    host: &NetNs,
    conf: &serde_json::Value,
    command: &str,
    container: &str,
    ns: &NetNs,
    args: &str,
) -> Result<serde_json::Value> {
    cni_plugin_dir(bin)?;
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", host.name()))
        .arg(bin.join("calico"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/run/netns/{}", ns.name()))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", bin.display().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "calico CNI {command}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null))
}
