//! Docker's remote network and IPAM driver for calico (`docker network create --driver calico
//! --ipam-driver calico-ipam`). Two unix sockets in Docker's plugin directory, `calico.sock`
//! and `calico-ipam.sock`, answer the libnetwork remote driver protocol (HTTP + JSON).

pub mod driver;
pub mod http;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use calico_datastore::{Datastore, EtcdConfig};
use tokio::{io::BufReader, net::UnixListener};

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
    let mut backoff = Duration::from_millis(100);
    let store = loop {
        match Datastore::connect(&config.etcd).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "datastore unreachable; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
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
        tasks.push(tokio::spawn(accept(listener, driver.clone())));
    }
    for t in tasks {
        t.await.context("listener task")?;
    }
    Ok(())
}

async fn accept(listener: UnixListener, driver: Arc<Driver>) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let driver = driver.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read);
            loop {
                let request = match http::read_request(&mut reader).await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "unreadable request");
                        let _ = http::write_response(
                            &mut write,
                            &serde_json::json!({ "Err": e.to_string() }),
                        )
                        .await;
                        return;
                    }
                };
                let call = request.path.trim_start_matches('/');
                tracing::debug!(call, body = %String::from_utf8_lossy(&request.body), "request");
                let answer = driver.handle(call, &request.body).await;
                tracing::debug!(call, %answer, "answer");
                if http::write_response(&mut write, &answer).await.is_err() {
                    return;
                }
            }
        });
    }
}
