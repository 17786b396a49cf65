//! Calling the IPAM plugin the way a runtime calls plugins: find it on CNI_PATH, run it with
//! the same environment and configuration, read its answer.
//!
//! When the plugin found is `calico-ipam` and it is this very program (installed, as
//! upstream does, as a link to `calico`), its code runs in this process on the connection the
//! `calico` plugin already holds: the same work, without a second process start and a second
//! datastore connection on every ADD.

use std::{
    io::Write,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Stdio,
};

use calico_datastore::Datastore;
use serde_json::Value;

use crate::{
    ipam_plugin,
    netconf::NetConf,
    protocol::{code, CniError, CniResult, Command, Env},
};

/// The name `calico-ipam` answers to (see `Plugin::from_program_name`).
const CALICO_IPAM: &str = "calico-ipam";

/// The IPAM plugin of one call, with what it is called with.
pub struct Ipam<'a> {
    name: &'a str,
    env: &'a Env,
    conf: &'a NetConf,
    raw: &'a Value,
    stdin: &'a [u8],
    /// How it runs, or why it cannot (reported when it is called, so a DEL still undoes the
    /// rest of the attachment first).
    runs: Result<Runs<'a>, CniError>,
}

enum Runs<'a> {
    /// `calico-ipam` is this program: served here, on this connection.
    InProcess(&'a Datastore),
    /// Any other plugin (or a separately installed `calico-ipam`): executed.
    Executed(PathBuf),
}

impl<'a> Ipam<'a> {
    /// The IPAM plugin `name` as found on CNI_PATH.
    pub fn find(
        name: &'a str,
        env: &'a Env,
        conf: &'a NetConf,
        raw: &'a Value,
        stdin: &'a [u8],
        store: &'a Datastore,
    ) -> Self {
        let runs = find(env, name).map(|path| {
            if name == CALICO_IPAM && is_this_program(&path) {
                Runs::InProcess(store)
            } else {
                Runs::Executed(path)
            }
        });
        Self {
            name,
            env,
            conf,
            raw,
            stdin,
            runs,
        }
    }

    pub fn name(&self) -> &str {
        self.name
    }

    fn runs(&self) -> Result<&Runs<'a>, CniError> {
        self.runs.as_ref().map_err(Clone::clone)
    }

    /// ADD: the addresses the plugin assigned.
    pub async fn add(&self) -> Result<CniResult, CniError> {
        let result = match self.runs()? {
            Runs::InProcess(store) => {
                ipam_plugin::serve(Command::Add, self.env, self.conf, self.raw, store)
                    .await
                    .map_err(|e| self.failed(e))?
            }
            Runs::Executed(path) => execute(path, self.name, Command::Add, self.stdin)?
                .map(|v| CniResult::from_value(&v))
                .transpose()?,
        };
        result.ok_or_else(|| {
            CniError::new(
                code::GENERIC,
                format!("IPAM plugin {} returned no result", self.name),
            )
        })
    }

    /// DEL, CHECK, GC or STATUS, which answer nothing but success or an error.
    pub async fn run(&self, command: Command) -> Result<(), CniError> {
        match self.runs()? {
            Runs::InProcess(store) => {
                ipam_plugin::serve(command, self.env, self.conf, self.raw, store)
                    .await
                    .map_err(|e| self.failed(e))?;
            }
            Runs::Executed(path) => {
                execute(path, self.name, command, self.stdin)?;
            }
        }
        Ok(())
    }

    /// The error as the caller would see it from an executed plugin.
    fn failed(&self, e: CniError) -> CniError {
        CniError {
            msg: format!("IPAM plugin {} failed: {}", self.name, e.msg),
            ..e
        }
    }
}

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

/// Whether `path` (links followed) is the executable this process runs: same device and inode,
/// so a link or hard link to `calico` is, and a separately built or copied binary is not.
fn is_this_program(path: &Path) -> bool {
    let (Ok(found), Ok(running)) = (std::fs::metadata(path), std::fs::metadata("/proc/self/exe"))
    else {
        return false;
    };
    (found.dev(), found.ino()) == (running.dev(), running.ino())
}

/// Runs the plugin at `path` with `command`; returns its parsed answer (ADD) or nothing.
fn execute(
    path: &Path,
    plugin: &str,
    command: Command,
    stdin: &[u8],
) -> Result<Option<Value>, CniError> {
    let mut child = std::process::Command::new(path)
        .env("CNI_COMMAND", command.as_str())
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

#[cfg(test)]
mod tests {
    use super::is_this_program;

    #[test]
    fn a_link_to_this_program_is_this_program_and_a_copy_is_not() {
        let exe = std::env::current_exe().unwrap();
        let dir = std::env::temp_dir().join(format!("calico-delegate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("calico-ipam");
        let copy = dir.join("calico-ipam-copy");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        std::fs::copy(&exe, &copy).unwrap();
        let (linked, copied, missing) = (
            is_this_program(&link),
            is_this_program(&copy),
            is_this_program(&dir.join("absent")),
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(is_this_program(&exe));
        assert!(linked, "a symlink to the running executable");
        assert!(!copied, "a copy is another program");
        assert!(!missing);
    }
}
