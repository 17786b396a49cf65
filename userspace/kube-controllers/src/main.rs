//! calico-kube-controllers: `ETCD_ENDPOINTS` (and upstream's other `ETCD_*` variables) name
//! the datastore, `KUBECONFIG` (or the in-cluster service account) the Kubernetes API.

use std::{net::SocketAddr, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use calico_datastore::{keys::resource_key, Datastore, DatastoreError, EtcdConfig, WatchEvent};
use calico_kube_controllers::{
    config::Settings,
    health,
    lease::{Elector, LeaseSettings},
    metrics::Metrics,
    mirror, nodes, pods,
};
use calico_model::{Kind, Object, ObjectMeta, Resource, API_VERSION};
use clap::Parser;
use k8s_openapi::api::{
    core::v1::{Namespace, ServiceAccount},
    networking::v1::NetworkPolicy,
};

#[derive(Parser, Debug)]
#[command(name = "calico-kube-controllers", version, about)]
struct Args {
    /// kubeconfig of the cluster; without it, the in-cluster service account (or ~/.kube/config).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Controllers to run when no KubeControllersConfiguration is stored (upstream's names).
    #[arg(long, env = "ENABLED_CONTROLLERS")]
    enabled_controllers: Option<String>,
    /// Port of /liveness, /readiness and /metrics on all addresses (0: none); unset, the
    /// configuration's `prometheusMetricsPort`, else 9094 (upstream's).
    #[arg(long, env = "HEALTH_PORT")]
    health_port: Option<u16>,
    /// Namespace and name of the Lease that keeps one instance active.
    #[arg(long, env = "LEASE_NAMESPACE", default_value = "kube-system")]
    lease_namespace: String,
    #[arg(long, env = "LEASE_NAME", default_value = "calico-kube-controllers")]
    lease_name: String,
    /// Seconds a holder that stopped renewing keeps the lease.
    #[arg(long, env = "LEASE_DURATION", default_value_t = 15)]
    lease_duration: u64,
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
}

/// Upstream's `prometheusMetricsPort` default.
const DEFAULT_METRICS_PORT: u16 = 9094;

fn main() -> ExitCode {
    let args = Args::parse();
    calico_libnetwork::logging::init(&args.log_level.to_lowercase());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let etcd = EtcdConfig::from_env().context("datastore configuration")?;
    let store = Datastore::connect(&etcd)
        .await
        .with_context(|| format!("connecting to etcd at {}", etcd.endpoints_display()))?;
    let client = calico_k8s::client(args.kubeconfig.as_deref()).await?;
    let settings = settings(&store, args.enabled_controllers.as_deref()).await?;
    tracing::info!(?settings, "starting");
    let metrics = Arc::new(Metrics::new(settings.enabled.iter().copied()));
    let health_port = args
        .health_port
        .or(settings.metrics_port)
        .unwrap_or(DEFAULT_METRICS_PORT);
    if health_port != 0 {
        let addr = SocketAddr::from(([0, 0, 0, 0], health_port));
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the health port {addr}"))?;
        tokio::spawn(health::serve(listener, metrics.clone()));
    }
    let identity = format!("{}_{}", hostname(), std::process::id());
    let mut elector = Elector::new(
        client.clone(),
        LeaseSettings {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity,
            duration: Duration::from_secs(args.lease_duration),
            // Renew well inside the duration, as client-go's defaults (15 s / 2 s) do.
            retry: (Duration::from_secs(args.lease_duration) / 4).min(Duration::from_secs(2)),
        },
    );
    elector.acquire().await;
    metrics.set_leader(true);
    let mut tasks = tokio::task::JoinSet::new();
    for controller in &settings.enabled {
        let (client, store, metrics) = (client.clone(), store.clone(), metrics.clone());
        match *controller {
            "namespace" => tasks.spawn(mirror::run::<Namespace>(client, store, metrics)),
            "serviceaccount" => tasks.spawn(mirror::run::<ServiceAccount>(client, store, metrics)),
            "policy" => tasks.spawn(mirror::run::<NetworkPolicy>(client, store, metrics)),
            "node" => tasks.spawn(nodes::run(client, store, metrics, settings.sync_labels)),
            _ => tasks.spawn(pods::run(
                client,
                store,
                metrics,
                pods::GcSettings {
                    period: settings.reconciler_period,
                    grace: settings.leak_grace_period,
                },
            )),
        };
    }
    tokio::select! {
        // Leading ends only when the lease is lost: stop acting at once (upstream exits too,
        // and its supervisor starts it again as a follower).
        () = elector.hold() => {
            metrics.set_leader(false);
            anyhow::bail!("lost the lease; exiting so that only one instance acts")
        }
        () = configuration_changed(store.clone(), settings) => {
            tracing::info!("KubeControllersConfiguration default changed; exiting to start again with it");
            Ok(())
        }
    }
}

/// Returns once the stored configuration no longer says `running` (changed, deleted or
/// invalid). Settings are read at start, so a change restarts the process, as upstream's does.
async fn configuration_changed(store: Datastore, running: Settings) {
    let key = resource_key(Kind::KubeControllersConfiguration, None, "default");
    let mut watch = store.watch(key, None);
    while let Some(event) = watch.next().await {
        let stored = match event {
            WatchEvent::Snapshot { resources, .. } => {
                resources.into_iter().find(|r| r.name() == "default")
            }
            WatchEvent::Put { resource, .. } if resource.name() == "default" => Some(*resource),
            WatchEvent::Deleted { name, .. } if name == "default" => None,
            _ => continue,
        };
        let now = match stored {
            Some(Resource::KubeControllersConfiguration(c)) => Settings::from_spec(&c.spec).ok(),
            _ => None,
        };
        if now.as_ref() != Some(&running) {
            return;
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "calico-kube-controllers".to_owned())
}

/// The stored configuration, or (none stored) the environment's, written back.
async fn settings(store: &Datastore, enabled: Option<&str>) -> Result<Settings> {
    match store
        .get(Kind::KubeControllersConfiguration, None, "default")
        .await
    {
        Ok(Resource::KubeControllersConfiguration(c)) => Settings::from_spec(&c.spec)
            .map_err(|e| anyhow::anyhow!("KubeControllersConfiguration default: {e}")),
        Ok(_) => unreachable!("asked for a KubeControllersConfiguration"),
        Err(DatastoreError::NotFound { .. }) => {
            let settings = Settings::from_env(enabled).map_err(|e| anyhow::anyhow!(e))?;
            let config = Resource::KubeControllersConfiguration(Object {
                api_version: API_VERSION.into(),
                kind: Kind::KubeControllersConfiguration.as_str().into(),
                metadata: ObjectMeta {
                    name: "default".into(),
                    ..Default::default()
                },
                spec: settings.to_spec(),
                status: None,
            });
            match store.create(config).await {
                Ok(_) | Err(DatastoreError::AlreadyExists { .. }) => Ok(settings),
                Err(e) => Err(e).context("writing KubeControllersConfiguration default"),
            }
        }
        Err(e) => Err(e).context("reading KubeControllersConfiguration default"),
    }
}
