//! The `calico` CNI plugin and the `calico-ipam` IPAM plugin.
//!
//! Both speak CNI 1.1.0 and the older versions runtimes still send (0.3.0, 0.3.1, 0.4.0,
//! 1.0.0): ADD, DEL, CHECK, VERSION, STATUS and GC. Errors are CNI error JSON on stdout with a
//! non-zero exit, using the spec's codes. A failure part-way through ADD is rolled back: no
//! address stays allocated and no veth is left behind.

pub mod identity;
pub mod netconf;
pub mod protocol;
pub mod wiring;

mod calico_plugin;
mod delegate;
mod ipam_plugin;
mod kubernetes;

pub use ipam_plugin::valid_attachments;

use std::{io::Read, process::ExitCode};

use protocol::{check_version, code, version_result, CniError, Command, Env};

/// Which plugin this binary is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plugin {
    Calico,
    CalicoIpam,
}

impl Plugin {
    /// The plugin a binary is by the name it was run as (`argv[0]`): `calico-ipam` is the IPAM
    /// plugin, anything else the network plugin.
    pub fn from_program_name(argv0: &std::ffi::OsStr) -> Self {
        let name = std::path::Path::new(argv0)
            .file_name()
            .unwrap_or(argv0)
            .to_string_lossy();
        if name == "calico-ipam" {
            Plugin::CalicoIpam
        } else {
            Plugin::Calico
        }
    }
}

/// The whole plugin run: reads the environment and stdin, writes the answer to stdout.
pub fn main(plugin: Plugin) -> ExitCode {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    // Errors are written in the version the caller asked for, when it could be read.
    let requested = requested_version(&stdin)
        .filter(|v| protocol::SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_owned());
    match run(plugin, &stdin) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(code = e.code, error = %e, "CNI command failed");
            println!("{}", e.to_json(&requested));
            ExitCode::FAILURE
        }
    }
}

/// The `cniVersion` stdin asks for, when it is JSON that names one.
fn requested_version(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
}

/// One plugin call, read from the environment and stdin and checked before anything on the
/// host or in the datastore is touched.
#[derive(Debug)]
pub enum Invocation {
    /// VERSION: answered from the requested version alone; it needs no valid configuration.
    Version(String),
    Network(Box<NetworkCall>),
}

/// Every command but VERSION: a valid network configuration and the variables it needs.
#[derive(Debug)]
pub struct NetworkCall {
    pub command: Command,
    pub env: Env,
    pub conf: netconf::NetConf,
    /// The configuration as sent (plugins pass it on to IPAM and read GC's attachment list).
    pub raw: serde_json::Value,
    pub version: String,
}

impl Invocation {
    /// Reads a call. Pure: no file, socket or interface is touched, so hostile input can be
    /// explored (the fuzz target `cni_invocation` drives this).
    pub fn read(
        lookup: impl Fn(&str) -> Option<String>,
        stdin: &[u8],
    ) -> Result<Invocation, CniError> {
        let (command, env) = Env::read(lookup)?;
        if command == Command::Version {
            let version = requested_version(stdin).unwrap_or_else(|| "1.1.0".to_owned());
            return Ok(Invocation::Version(version));
        }
        let (conf, raw) = netconf::NetConf::parse(stdin)?;
        let version = check_version(&conf.cni_version)?;
        conf.require_network()?;
        if matches!(command, Command::Status | Command::Gc) && !version.starts_with("1.1") {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("{command:?} needs cniVersion 1.1.0 (got {version})"),
            ));
        }
        Ok(Invocation::Network(Box::new(NetworkCall {
            command,
            env,
            conf,
            raw,
            version,
        })))
    }
}

fn run(plugin: Plugin, stdin: &[u8]) -> Result<Option<String>, CniError> {
    let call = match Invocation::read(|k| std::env::var(k).ok(), stdin)? {
        Invocation::Version(version) => return Ok(Some(version_result(&version))),
        Invocation::Network(call) => call,
    };
    init_logging(&call.conf);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            CniError::new(code::GENERIC, "cannot start a runtime").with_details(e.to_string())
        })?;
    let NetworkCall {
        command,
        env,
        conf,
        raw,
        version,
    } = &*call;
    runtime.block_on(async {
        match plugin {
            Plugin::Calico => calico_plugin::run(*command, env, conf, raw, stdin, version).await,
            Plugin::CalicoIpam => ipam_plugin::run(*command, env, conf, raw, version).await,
        }
    })
}

fn init_logging(conf: &netconf::NetConf) {
    let level = conf
        .log_level
        .clone()
        .unwrap_or_else(|| "warn".into())
        .to_ascii_lowercase();
    let level = level
        .parse::<tracing::Level>()
        .unwrap_or(tracing::Level::WARN);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false);
    let file = conf.log_file_path.as_deref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
    });
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// Datastore errors map to "try again later" when they are transient.
pub(crate) fn datastore_error(e: calico_datastore::DatastoreError) -> CniError {
    let c = if e.is_transient() {
        code::TRY_AGAIN_LATER
    } else {
        code::GENERIC
    };
    CniError::new(c, "datastore error").with_details(e.to_string())
}

pub(crate) async fn connect(
    conf: &netconf::NetConf,
) -> Result<calico_datastore::Datastore, CniError> {
    let cfg = conf.etcd(|k| std::env::var(k).ok())?;
    calico_datastore::Datastore::connect(&cfg)
        .await
        .map_err(|e| {
            CniError::new(code::TRY_AGAIN_LATER, "cannot reach the datastore")
                .with_details(e.to_string())
        })
}

#[cfg(test)]
mod tests {
    use super::Plugin;

    #[test]
    fn the_program_name_picks_the_plugin() {
        for (argv0, plugin) in [
            ("calico-ipam", Plugin::CalicoIpam),
            ("/opt/cni/bin/calico-ipam", Plugin::CalicoIpam),
            ("calico", Plugin::Calico),
            ("/opt/cni/bin/calico", Plugin::Calico),
            ("calico-ipam-old", Plugin::Calico),
            ("", Plugin::Calico),
        ] {
            assert_eq!(Plugin::from_program_name(argv0.as_ref()), plugin, "{argv0}");
        }
    }
}
