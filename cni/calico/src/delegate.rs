//! Calling the IPAM plugin the way a runtime calls plugins: find it on CNI_PATH, run it with
//! the same environment and configuration, read its answer.

use std::{io::Write, path::PathBuf, process::Stdio};

use serde_json::Value;

use crate::protocol::{code, CniError, CniResult, Env};

fn find(env: &Env, plugin: &str) -> Result<PathBuf, CniError> {
    if plugin.contains('/') {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("ipam type `{plugin}` must be a plain name"),
        ));
    }
    env.path
        .iter()
        .map(|dir| PathBuf::from(dir).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!(
                    "IPAM plugin `{plugin}` not found in CNI_PATH ({})",
                    env.path.join(":")
                ),
            )
        })
}

/// Runs `plugin` with `command`; returns its parsed result (ADD) or nothing.
pub fn run(
    env: &Env,
    plugin: &str,
    command: &str,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    let path = find(env, plugin)?;
    let mut child = std::process::Command::new(&path)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| {
            CniError::new(code::GENERIC, format!("cannot run {}", path.display()))
                .with_details(e.to_string())
        })?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin)
        .map_err(|e| {
            CniError::new(code::GENERIC, "cannot write to the IPAM plugin")
                .with_details(e.to_string())
        })?;
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(code::GENERIC, "IPAM plugin did not finish").with_details(e.to_string())
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        let err: Value = serde_json::from_str(&text).unwrap_or_default();
        return Err(CniError::new(
            err["code"].as_u64().map_or(code::GENERIC, |c| c as u32),
            format!(
                "IPAM plugin {plugin} failed: {}",
                err["msg"].as_str().unwrap_or("no message")
            ),
        )
        .with_details(err["details"].as_str().unwrap_or(text.trim()).to_owned()));
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    serde_json::from_str(&text).map(Some).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            format!("IPAM plugin {plugin} answered something that is not JSON"),
        )
        .with_details(e.to_string())
    })
}

/// ADD through the IPAM plugin.
pub fn add(env: &Env, plugin: &str, stdin: &[u8]) -> Result<CniResult, CniError> {
    let value = run(env, plugin, "ADD", stdin)?.ok_or_else(|| {
        CniError::new(
            code::GENERIC,
            format!("IPAM plugin {plugin} returned no result"),
        )
    })?;
    CniResult::from_value(&value)
}
