//! Running the built `calico` CNI plugin the way a runtime does, inside a host namespace.

use std::{
    io::Write,
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::NetNs;

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
    let conf = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "demo-net",
        "type": "calico",
        "nodename": node,
        "etcd_endpoints": etcd,
        "ipam": { "type": "calico-ipam" },
    });
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", host.name()))
        .arg(bin.join("calico"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/run/netns/{}", ns.name()))
        .env("CNI_IFNAME", "eth0")
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
