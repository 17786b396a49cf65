use clap::Parser;

/// Docker's remote network and IPAM driver for calico.
#[derive(Debug, Parser)]
#[command(
    name = "calico-libnetwork",
    version,
    after_help = "Example:\n  ETCD_ENDPOINTS=http://127.0.0.1:2379 calico-libnetwork --nodename node1\n  docker network create --driver calico --ipam-driver calico-ipam net1"
)]
struct Flags {
    /// This node's name (default: the hostname).
    #[arg(long, env = "NODENAME")]
    nodename: Option<String>,
    /// Docker's plugin directory.
    #[arg(
        long,
        env = "CALICO_LIBNETWORK_PLUGIN_DIR",
        default_value = "/run/docker/plugins"
    )]
    plugin_dir: std::path::PathBuf,
    /// Interface name prefix of workload veths.
    #[arg(long, env = "CALICO_LIBNETWORK_IFPREFIX", default_value = "cali")]
    interface_prefix: String,
}

fn main() -> std::process::ExitCode {
    let flags = Flags::parse();
    calico_libnetwork::logging::init("info");
    let run = async {
        let node = match flags.nodename {
            Some(n) => n,
            None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
        };
        let etcd = calico_datastore::EtcdConfig::from_env()?;
        calico_libnetwork::serve(calico_libnetwork::DriverConfig {
            plugin_dir: flags.plugin_dir,
            node,
            etcd,
            interface_prefix: flags.interface_prefix,
        })
        .await
    };
    match tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(run))
    {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("calico-libnetwork: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
