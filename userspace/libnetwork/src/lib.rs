//! Docker's remote network and IPAM driver for calico (`docker network create --driver calico
//! --ipam-driver calico-ipam`). Two unix sockets in Docker's plugin directory, `calico.sock`
//! and `calico-ipam.sock`, answer the libnetwork remote driver protocol (HTTP + JSON).

pub mod driver;
pub mod http;
pub mod logging;
pub mod request;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use calico_datastore::{Backoff, Datastore, EtcdConfig};
use tokio::net::UnixListener;

pub use driver::Driver;

/// Where and as what the driver serves.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// Docker's plugin directory (`/run/docker/plugins`).
    pub plugin_dir: PathBuf,
    pub node: String,
    pub etcd: EtcdConfig,
    pub interface_prefix: String,
}

/// Serves until the process ends. The sockets appear once the datastore answers, so Docker
/// never sees a driver that cannot do anything.
pub async fn serve(config: DriverConfig) -> anyhow::Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let store = loop {
        match Datastore::connect(&config.etcd).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "datastore unreachable; retrying");
                backoff.wait().await;
            }
        }
    };
    let (conn, handle, _) = rtnetlink::new_connection().context("opening netlink")?;
    tokio::spawn(conn);
    let driver = Arc::new(Driver::new(
        store,
        handle,
        config.node.clone(),
        config.interface_prefix.clone(),
    ));
    std::fs::create_dir_all(&config.plugin_dir)
        .with_context(|| format!("creating {}", config.plugin_dir.display()))?;
    let mut tasks = Vec::new();
    for name in ["calico.sock", "calico-ipam.sock"] {
        let path = config.plugin_dir.join(name);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("listening on {}", path.display()))?;
        tracing::info!(socket = %path.display(), "serving docker's remote driver protocol");
        let app = http::router(driver.clone());
        tasks.push(tokio::spawn(
            async move { axum::serve(listener, app).await },
        ));
    }
    for t in tasks {
        t.await
            .context("listener task")?
            .context("serving the plugin socket")?;
    }
    Ok(())
}
