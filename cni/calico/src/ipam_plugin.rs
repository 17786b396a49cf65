//! `calico-ipam`: addresses from Calico's block IPAM for one attachment.

use std::{collections::BTreeMap, collections::BTreeSet, net::IpAddr};

use calico_datastore::Datastore;
use calico_ipam::{AssignRequest, Ipam, IpamError};
use calico_model::{Kind, Resource};
use ipnet::IpNet;
use serde_json::Value;

use crate::{
    connect, datastore_error,
    identity::Workload,
    netconf::NetConf,
    protocol::{code, CniError, CniResult, Command, Env, IpConfig},
};

fn ipam_error(e: IpamError) -> CniError {
    let c = if e.is_transient() {
        code::TRY_AGAIN_LATER
    } else {
        code::GENERIC
    };
    CniError::new(c, e.to_string())
}

/// Addresses requested explicitly: `IP=a,b` in CNI_ARGS or `runtimeConfig.ips`.
fn static_ips(env: &Env, raw: &Value) -> Result<Vec<IpAddr>, CniError> {
    let mut texts: Vec<String> = env
        .args
        .get("IP")
        .map(|v| v.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    if let Some(list) = raw.pointer("/runtimeConfig/ips").and_then(Value::as_array) {
        texts.extend(list.iter().filter_map(|v| v.as_str().map(str::to_owned)));
    }
    texts
        .iter()
        .map(|t| {
            let t = t.trim();
            t.parse::<IpAddr>()
                .or_else(|_| t.parse::<IpNet>().map(|n| n.addr()))
                .map_err(|_| {
                    CniError::new(
                        code::INVALID_CONFIG,
                        format!("requested IP `{t}` is not an address"),
                    )
                })
        })
        .collect()
}

fn result_for(ips: &[IpAddr]) -> CniResult {
    CniResult {
        ips: ips
            .iter()
            .map(|ip| IpConfig {
                address: IpNet::from(*ip),
                gateway: None,
                interface: None,
            })
            .collect(),
        ..Default::default()
    }
}

/// Where calico-ipam serialises the IPAM work of one host, as upstream does: concurrent
/// plugins on a node would otherwise all race for the same block and mostly lose.
pub const DEFAULT_LOCK_FILE: &str = "/var/run/calico/ipam.lock";

/// Takes the host-wide IPAM lock (released when the returned value drops).
fn host_lock() -> Result<nix::fcntl::Flock<std::fs::File>, CniError> {
    let path =
        std::env::var("CALICO_IPAM_LOCK_FILE").unwrap_or_else(|_| DEFAULT_LOCK_FILE.to_owned());
    let fail = |what: &str, e: String| {
        CniError::new(code::GENERIC, format!("cannot {what} the IPAM lock {path}")).with_details(e)
    };
    if let Some(dir) = std::path::Path::new(&path).parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail("create the directory of", e.to_string()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| fail("open", e.to_string()))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, errno)| fail("take", errno.to_string()))
}

/// The `calico-ipam` binary's run: connects, then serves the command.
pub async fn run(
    command: Command,
    env: &Env,
    conf: &NetConf,
    raw: &Value,
    version: &str,
) -> Result<Option<String>, CniError> {
    let connecting = std::time::Instant::now();
    let store = connect(conf).await;
    tracing::debug!(
        ms = connecting.elapsed().as_secs_f64() * 1e3,
        "IPAM: datastore connected"
    );
    if command == Command::Status {
        return store.map(|_| None).map_err(|e| {
            CniError::new(code::PLUGIN_NOT_AVAILABLE, "datastore unreachable")
                .with_details(e.to_string())
        });
    }
    let result = serve(command, env, conf, raw, &store?).await?;
    Ok(result.map(|r| r.to_json(version)))
}

/// One IPAM command on an open datastore connection: what `calico-ipam` does, and what the
/// `calico` plugin runs in its own process when `calico-ipam` is the same program (one
/// process and one connection per ADD instead of two). ADD answers with the addresses.
pub async fn serve(
    command: Command,
    env: &Env,
    conf: &NetConf,
    raw: &Value,
    store: &Datastore,
) -> Result<Option<CniResult>, CniError> {
    let started = std::time::Instant::now();
    let phase =
        |what: &str| tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "IPAM: {what}");
    let _lock = match command {
        Command::Add | Command::Del | Command::Gc => Some(host_lock()?),
        _ => None,
    };
    phase("host lock taken");
    let node = conf.node_name();
    let ipam = Ipam::new(store.clone(), node.clone());
    let handle = Workload::handle(&conf.name, &env.container_id);
    match command {
        Command::Add => {
            let held = ipam.adopt_held(&handle).await.map_err(ipam_error)?;
            phase("handle read");
            if !held.is_empty() {
                // A retried ADD: answer with what this attachment already holds (its handle
                // record restored if a failed attempt lost it).
                return Ok(Some(result_for(&held)));
            }
            let workload = Workload::new(&node, &env.container_id, &env.ifname, &env.args);
            let mut attrs = BTreeMap::from([("node".to_owned(), node.clone())]);
            match &workload.pod {
                Some(pod) => {
                    attrs.insert("namespace".into(), workload.namespace.clone());
                    attrs.insert("pod".into(), pod.clone());
                }
                None => {
                    attrs.insert("containerID".into(), env.container_id.clone());
                }
            }
            let annotations = crate::kubernetes::ipam_request(conf, &workload).await?;
            let mut wanted = static_ips(env, raw)?;
            if wanted.is_empty() {
                wanted = annotations.ip_addrs.clone();
            }
            let ips = if wanted.is_empty() {
                let section = conf.ipam.clone().unwrap_or_default();
                let request = AssignRequest {
                    handle: handle.clone(),
                    attrs,
                    num_v4: usize::from(section.assign_ipv4.is_none_or(|f| f.0)),
                    num_v6: usize::from(section.assign_ipv6.is_some_and(|f| f.0)),
                    ipv4_pools: annotations
                        .ipv4_pools
                        .unwrap_or_else(|| section.ipv4_pools.clone()),
                    ipv6_pools: annotations
                        .ipv6_pools
                        .unwrap_or_else(|| section.ipv6_pools.clone()),
                };
                if request.num_v4 + request.num_v6 == 0 {
                    return Err(CniError::new(
                        code::INVALID_CONFIG,
                        "assign_ipv4 and assign_ipv6 are both false",
                    ));
                }
                ipam.auto_assign(&request)
                    .await
                    .map_err(ipam_error)?
                    .into_iter()
                    .map(|n| n.addr())
                    .collect()
            } else {
                let mut done = Vec::new();
                for ip in wanted {
                    if let Err(e) = ipam.assign_ip(ip, &handle, &attrs).await {
                        let _ = ipam.release_by_handle(&handle).await;
                        return Err(ipam_error(e));
                    }
                    done.push(ip);
                }
                done
            };
            phase("assigned");
            Ok(Some(result_for(&ips)))
        }
        Command::Del => {
            ipam.release_by_handle(&handle).await.map_err(ipam_error)?;
            Ok(None)
        }
        Command::Check => {
            let prev = raw
                .get("prevResult")
                .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
            let prev = CniResult::from_value(prev)?;
            let held: BTreeSet<IpAddr> = ipam
                .ips_by_handle(&handle)
                .await
                .map_err(ipam_error)?
                .into_iter()
                .collect();
            let missing: Vec<String> = prev
                .ips
                .iter()
                .map(|i| i.address.addr())
                .filter(|ip| !held.contains(ip))
                .map(|ip| ip.to_string())
                .collect();
            if missing.is_empty() {
                Ok(None)
            } else {
                Err(CniError::new(
                    code::GENERIC,
                    format!(
                        "IPAM does not hold {} for handle {handle}",
                        missing.join(", ")
                    ),
                ))
            }
        }
        Command::Gc => {
            let valid = valid_attachments(raw)?;
            let prefix = format!("{}.", conf.name);
            let (handles, _) = store
                .list(Kind::IPAMHandle, None)
                .await
                .map_err(datastore_error)?;
            for h in handles {
                let Resource::IPAMHandle(h) = h else { continue };
                let id = &h.spec.handle_id;
                let Some(container) = id.strip_prefix(&prefix) else {
                    continue;
                };
                if !valid.iter().any(|(c, _)| c == container) {
                    tracing::info!(handle = id, "GC: releasing addresses of a stale attachment");
                    ipam.release_by_handle(id).await.map_err(ipam_error)?;
                }
            }
            Ok(None)
        }
        // The connection is open: the datastore is reachable.
        Command::Status => Ok(None),
        Command::Version => Err(CniError::new(
            code::GENERIC,
            "VERSION is answered before IPAM is reached",
        )),
    }
}

/// `cni.dev/valid-attachments` of a GC call: (containerID, ifname) pairs. GC removes every
/// attachment not listed, so a list that is missing or cannot be read is an error that removes
/// nothing (an empty list is a real answer: nothing is valid any more).
pub fn valid_attachments(raw: &Value) -> Result<Vec<(String, String)>, CniError> {
    const KEY: &str = "cni.dev/valid-attachments";
    let invalid = |what: String| CniError::new(code::INVALID_CONFIG, format!("GC: {KEY} {what}"));
    let list = raw
        .get(KEY)
        .ok_or_else(|| invalid("is missing; without it GC would remove every attachment".into()))?
        .as_array()
        .ok_or_else(|| invalid("is not a list".into()))?;
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let container = a
                .get("containerID")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
                .ok_or_else(|| invalid(format!("[{i}]: no containerID string")))?;
            let ifname = match a.get("ifname") {
                None => "",
                Some(v) => v
                    .as_str()
                    .ok_or_else(|| invalid(format!("[{i}].ifname: not a string")))?,
            };
            Ok((container.to_owned(), ifname.to_owned()))
        })
        .collect()
}
