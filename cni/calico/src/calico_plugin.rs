//! `calico`: wires a workload into the host and records it as a WorkloadEndpoint.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use calico_datastore::{Datastore, DatastoreError};
use calico_model::{
    k8s,
    spec::{ProfileSpec, WorkloadEndpointSpec},
    Kind, Object, ObjectMeta, Resource, API_VERSION,
};
use ipnet::IpNet;
use serde_json::Value;

use crate::{
    connect, datastore_error,
    delegate::Ipam,
    identity::Workload,
    ipam_plugin::valid_attachments,
    netconf::NetConf,
    protocol::{code, CniError, CniResult, Command, Env, Interface, IpConfig, Route},
    wiring::{self, Plan, GATEWAY_V4, GATEWAY_V6},
};

/// Annotations that tie an endpoint to the network and attachment that made it.
const NETWORK_ANNOTATION: &str = "cni.projectcalico.org/network";
const CONTAINER_ANNOTATION: &str = "cni.projectcalico.org/containerID";

fn wiring_error(e: wiring::WiringError) -> CniError {
    CniError::new(code::GENERIC, "cannot wire the workload").with_details(e.to_string())
}

pub async fn run(
    command: Command,
    env: &Env,
    conf: &NetConf,
    raw: &Value,
    stdin: &[u8],
    version: &str,
) -> Result<Option<String>, CniError> {
    let ipam_type = conf
        .ipam
        .as_ref()
        .map(|i| i.plugin.clone())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                "network configuration has no `ipam.type`",
            )
        })?;
    let connecting = std::time::Instant::now();
    let store = connect(conf).await;
    tracing::debug!(
        ms = connecting.elapsed().as_secs_f64() * 1e3,
        "datastore connected"
    );
    let store = match (command, store) {
        (Command::Status, Err(e)) => {
            return Err(
                CniError::new(code::PLUGIN_NOT_AVAILABLE, "datastore unreachable")
                    .with_details(e.to_string()),
            )
        }
        (_, store) => store?,
    };
    let ipam = Ipam::find(&ipam_type, env, conf, raw, stdin, &store);
    let node = conf.node_name();
    let workload = Workload::new(&node, &env.container_id, &env.ifname, &env.args);
    match command {
        Command::Add => add(env, conf, version, &store, &workload, &ipam)
            .await
            .map(Some),
        Command::Del => del(env, &store, &workload, &ipam).await.map(|()| None),
        Command::Check => check(env, conf, raw, &store, &workload, &ipam)
            .await
            .map(|()| None),
        Command::Gc => gc(conf, raw, &store, &node, &ipam).await.map(|()| None),
        Command::Status => ipam.run(Command::Status).await.map(|()| None),
        Command::Version => Err(CniError::new(
            code::GENERIC,
            "VERSION is answered before the network is reached",
        )),
    }
}

fn build_result(
    conf: &NetConf,
    env: &Env,
    veth: &str,
    host_mac: &str,
    container_mac: &str,
    ips: &[IpNet],
) -> CniResult {
    let mut routes = Vec::new();
    if ips.iter().any(|a| a.addr().is_ipv4()) {
        routes.push(Route {
            dst: "0.0.0.0/0".parse().expect("constant"),
            gw: None,
        });
    }
    if ips.iter().any(|a| a.addr().is_ipv6()) {
        routes.push(Route {
            dst: "::/0".parse().expect("constant"),
            gw: None,
        });
    }
    CniResult {
        interfaces: vec![
            Interface {
                name: veth.to_owned(),
                mac: host_mac.to_owned(),
                sandbox: String::new(),
            },
            Interface {
                name: env.ifname.clone(),
                mac: container_mac.to_owned(),
                sandbox: env.netns.clone(),
            },
        ],
        ips: ips
            .iter()
            .map(|a| IpConfig {
                address: *a,
                gateway: Some(if a.addr().is_ipv4() {
                    IpAddr::V4(GATEWAY_V4)
                } else {
                    IpAddr::V6(GATEWAY_V6)
                }),
                interface: Some(1),
            })
            .collect(),
        routes,
        dns: conf.dns.clone().unwrap_or_default(),
    }
}

async fn add(
    env: &Env,
    conf: &NetConf,
    version: &str,
    store: &Datastore,
    workload: &Workload,
    ipam: &Ipam<'_>,
) -> Result<String, CniError> {
    let started = std::time::Instant::now();
    let phase =
        |what: &str| tracing::debug!(ms = started.elapsed().as_secs_f64() * 1e3, "ADD: {what}");
    let stored = stored_endpoint(store, workload).await?;
    let veth = host_veth(store, workload, env, stored.as_ref()).await?;
    phase("endpoint read");
    // A retried ADD for the same attachment answers with what is already there, if it is
    // there: in this call's namespace, with its addresses and routes. A container whose
    // namespace was replaced (same ID, new CNI_NETNS) is wired again, keeping its addresses.
    if let Some(existing) = &stored {
        if existing.spec.container_id == env.container_id
            && wiring::host_link_exists(&veth).map_err(wiring_error)?
        {
            let ips: Vec<IpNet> = existing
                .spec
                .ip_networks
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect();
            let in_place = plan(env, conf, &veth, &ips);
            match wiring::check(&in_place) {
                Ok(problems) if problems.is_empty() => {
                    let mac = existing.spec.mac.clone().unwrap_or_default();
                    let host_mac = "ee:ee:ee:ee:ee:ee";
                    return Ok(
                        build_result(conf, env, &veth, host_mac, &mac, &ips).to_json(version)
                    );
                }
                Ok(problems) => tracing::info!(
                    ?problems,
                    "repeated ADD finds the attachment not in place; wiring it again"
                ),
                Err(e) => tracing::info!(
                    error = %e,
                    "repeated ADD cannot see the attachment; wiring it again"
                ),
            }
        }
    }

    // Read before anything is allocated or wired: a pod the API does not know fails clean.
    let pod = crate::kubernetes::pod_info(conf, workload).await?;
    phase("pod read");
    let ipam_result = ipam.add().await?;
    phase("addresses assigned");
    let addresses: Vec<IpNet> = ipam_result
        .ips
        .iter()
        .map(|i| IpNet::new(i.address.addr(), i.address.max_prefix_len()).expect("host prefix"))
        .collect();
    if addresses.is_empty() {
        let _ = ipam.run(Command::Del).await;
        return Err(CniError::new(
            code::GENERIC,
            format!("IPAM plugin {} assigned no address", ipam.name()),
        ));
    }
    let plan = plan(env, conf, &veth, &addresses);
    let wired = match wiring::wire(&plan) {
        Ok(w) => w,
        Err(e) => {
            let _ = ipam.run(Command::Del).await;
            return Err(wiring_error(e));
        }
    };
    phase("wired");
    let record = async {
        if workload.orchestrator == "cni" {
            ensure_network_profile(store, &conf.name).await?;
        }
        let record = endpoint(
            conf,
            env,
            workload,
            pod.as_ref(),
            &veth,
            &wired.container_mac,
            &addresses,
        );
        match stored {
            // None stored when this ADD began (the usual case): one create, not read-then-write.
            None => match store.create(record.clone()).await {
                Err(DatastoreError::AlreadyExists { .. }) => store.apply(record).await.map(drop),
                created => created.map(drop),
            },
            Some(_) => store.apply(record).await.map(drop),
        }
    };
    if let Err(e) = record.await {
        let _ = wiring::unwire(&veth, Some(&plan.netns), &env.ifname);
        let _ = ipam.run(Command::Del).await;
        return Err(datastore_error(e));
    }
    phase("endpoint written");
    Ok(build_result(
        conf,
        env,
        &veth,
        &wired.host_mac,
        &wired.container_mac,
        &addresses,
    )
    .to_json(version))
}

/// The wiring of this attachment: host veth `veth`, the call's namespace and interface.
fn plan(env: &Env, conf: &NetConf, veth: &str, addresses: &[IpNet]) -> Plan {
    Plan {
        host_veth: veth.to_owned(),
        netns: PathBuf::from(&env.netns),
        ifname: env.ifname.clone(),
        mtu: conf.workload_mtu(),
        addresses: addresses.to_vec(),
    }
}

/// The endpoint record; with `pod` (Kubernetes mode), its labels, service account and named
/// ports as upstream records them (calico-kube-controllers keeps them current after).
fn endpoint(
    conf: &NetConf,
    env: &Env,
    workload: &Workload,
    pod: Option<&calico_k8s::PodInfo>,
    veth: &str,
    mac: &str,
    addresses: &[IpNet],
) -> Resource {
    let account = pod.and_then(|p| p.service_account.as_deref());
    let mut labels = conf.workload_labels();
    labels.extend(k8s::pod_endpoint_labels(
        &workload.namespace,
        &pod.map(|p| p.labels.clone()).unwrap_or_default(),
        account,
    ));
    // Not every workload is a pod: the label names the orchestrator that made it.
    labels.insert(k8s::ORCHESTRATOR_LABEL.into(), workload.orchestrator.into());
    let profiles = match workload.orchestrator {
        "k8s" => k8s::pod_endpoint_profiles(&workload.namespace, account),
        _ => vec![conf.name.clone()],
    };
    Resource::WorkloadEndpoint(Object {
        api_version: API_VERSION.into(),
        kind: Kind::WorkloadEndpoint.as_str().into(),
        metadata: ObjectMeta {
            name: workload.endpoint_name(),
            namespace: Some(workload.namespace.clone()),
            labels,
            annotations: BTreeMap::from([
                (NETWORK_ANNOTATION.to_owned(), conf.name.clone()),
                (CONTAINER_ANNOTATION.to_owned(), env.container_id.clone()),
            ]),
            ..Default::default()
        },
        spec: WorkloadEndpointSpec {
            orchestrator: workload.orchestrator.into(),
            workload: if workload.pod.is_some() {
                String::new()
            } else {
                workload.workload.clone()
            },
            node: workload.node.clone(),
            container_id: env.container_id.clone(),
            pod: workload.pod.clone().unwrap_or_default(),
            endpoint: env.ifname.clone(),
            ip_networks: addresses.iter().map(ToString::to_string).collect(),
            profiles,
            interface_name: veth.to_owned(),
            mac: Some(mac.to_owned()),
            service_account_name: account.unwrap_or_default().to_owned(),
            ports: pod.map(|p| p.ports.clone()).unwrap_or_default(),
            ..Default::default()
        },
        status: None,
    })
}

/// Members of a network reach each other by default: its profile allows ingress from
/// endpoints carrying the profile's label and all egress. Policy refines it.
async fn ensure_network_profile(store: &Datastore, network: &str) -> Result<(), DatastoreError> {
    let profile = Resource::Profile(Object {
        api_version: API_VERSION.into(),
        kind: Kind::Profile.as_str().into(),
        metadata: ObjectMeta {
            name: network.to_owned(),
            ..Default::default()
        },
        spec: ProfileSpec::network(network),
        status: None,
    });
    match store.create(profile).await {
        Ok(_) | Err(DatastoreError::AlreadyExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The host end's name for this attachment: the one its endpoint records, else upstream's name
/// unless another live endpoint already has that veth (two container IDs sharing their first 11
/// characters), else the alternate. So an ADD or DEL never takes over or deletes another
/// attachment's veth.
async fn host_veth(
    store: &Datastore,
    workload: &Workload,
    env: &Env,
    stored: Option<&StoredEndpoint>,
) -> Result<String, CniError> {
    let ours = |w: &StoredEndpoint| {
        w.spec.container_id == env.container_id && w.spec.endpoint == env.ifname
    };
    if let Some(w) = stored.filter(|w| ours(w) && !w.spec.interface_name.is_empty()) {
        return Ok(w.spec.interface_name.clone());
    }
    let preferred = workload.veth_name();
    // Kubernetes names hash the pod's namespace and name: no prefix can collide there.
    if workload.pod.is_some() {
        return Ok(preferred);
    }
    let (endpoints, _) = store
        .list(Kind::WorkloadEndpoint, Some(&workload.namespace))
        .await
        .map_err(datastore_error)?;
    let taken = endpoints.iter().any(|r| {
        matches!(r, Resource::WorkloadEndpoint(w)
            if w.spec.interface_name == preferred && !ours(w))
    });
    Ok(if taken {
        workload.alternate_veth_name()
    } else {
        preferred
    })
}

type StoredEndpoint = calico_model::Object<calico_model::spec::WorkloadEndpointSpec>;

/// This attachment's WorkloadEndpoint as stored (whoever's it is now), read once per command.
async fn stored_endpoint(
    store: &Datastore,
    workload: &Workload,
) -> Result<Option<StoredEndpoint>, CniError> {
    match store
        .get(
            Kind::WorkloadEndpoint,
            Some(&workload.namespace),
            &workload.endpoint_name(),
        )
        .await
    {
        Ok(Resource::WorkloadEndpoint(w)) => Ok(Some(w)),
        Ok(_) | Err(DatastoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(datastore_error(e)),
    }
}

async fn del(
    env: &Env,
    store: &Datastore,
    workload: &Workload,
    ipam: &Ipam<'_>,
) -> Result<(), CniError> {
    let netns = (!env.netns.is_empty()).then(|| PathBuf::from(&env.netns));
    let stored = stored_endpoint(store, workload).await?;
    let veth = host_veth(store, workload, env, stored.as_ref()).await?;
    wiring::unwire(&veth, netns.as_deref(), &env.ifname).map_err(wiring_error)?;
    ipam.run(Command::Del).await?;
    // Gone already, or now belongs to a newer attachment: leave it.
    if stored.is_none_or(|w| w.spec.container_id != env.container_id) {
        return Ok(());
    }
    match store
        .delete(
            Kind::WorkloadEndpoint,
            Some(&workload.namespace),
            &workload.endpoint_name(),
            None,
        )
        .await
    {
        Ok(_) | Err(DatastoreError::NotFound { .. }) => Ok(()),
        Err(e) => Err(datastore_error(e)),
    }
}

async fn check(
    env: &Env,
    conf: &NetConf,
    raw: &Value,
    store: &Datastore,
    workload: &Workload,
    ipam: &Ipam<'_>,
) -> Result<(), CniError> {
    let prev = raw
        .get("prevResult")
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs prevResult"))?;
    let prev = CniResult::from_value(prev)?;
    let stored = stored_endpoint(store, workload).await?;
    let veth = host_veth(store, workload, env, stored.as_ref()).await?;
    let addresses: Vec<IpNet> = prev.ips.iter().map(|i| i.address).collect();
    let plan = plan(env, conf, &veth, &addresses);
    let mut problems = wiring::check(&plan).map_err(wiring_error)?;
    match &stored {
        Some(w) if w.spec.container_id != env.container_id => problems.push(format!(
            "endpoint {} belongs to container {}",
            workload.endpoint_name(),
            w.spec.container_id
        )),
        Some(_) => {}
        None => problems.push(format!(
            "workload endpoint {} does not exist",
            workload.endpoint_name()
        )),
    }
    if !problems.is_empty() {
        return Err(CniError::new(code::GENERIC, "CHECK failed").with_details(problems.join("; ")));
    }
    ipam.run(Command::Check).await?;
    Ok(())
}

async fn gc(
    conf: &NetConf,
    raw: &Value,
    store: &Datastore,
    node: &str,
    ipam: &Ipam<'_>,
) -> Result<(), CniError> {
    let valid = valid_attachments(raw)?;
    let (endpoints, _) = store
        .list(Kind::WorkloadEndpoint, None)
        .await
        .map_err(datastore_error)?;
    for r in endpoints {
        let Resource::WorkloadEndpoint(w) = r else {
            continue;
        };
        let ours = w.spec.node == node
            && w.metadata.annotations.get(NETWORK_ANNOTATION) == Some(&conf.name);
        let live = valid
            .iter()
            .any(|(c, i)| c == &w.spec.container_id && (i.is_empty() || i == &w.spec.endpoint));
        if ours && !live {
            tracing::info!(
                endpoint = w.metadata.name,
                "GC: removing a stale attachment"
            );
            wiring::unwire(&w.spec.interface_name, None, &w.spec.endpoint).map_err(wiring_error)?;
            match store
                .delete(
                    Kind::WorkloadEndpoint,
                    w.metadata.namespace.as_deref(),
                    &w.metadata.name,
                    None,
                )
                .await
            {
                Ok(_) | Err(DatastoreError::NotFound { .. }) => {}
                Err(e) => return Err(datastore_error(e)),
            }
        }
    }
    ipam.run(Command::Gc).await?;
    Ok(())
}
