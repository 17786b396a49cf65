//! The calls of Docker's remote NetworkDriver and IpamDriver, answered from the calico
//! datastore and IPAM. A Docker network is a calico profile (members reach each other by
//! default; policy refines it); an endpoint is a WorkloadEndpoint (orchestrator `libnetwork`)
//! behind a `cali*` veth that the agent programs.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
};

use calico_datastore::{Datastore, DatastoreError};
use calico_hostlink::{Peer, GATEWAY_V4};
use calico_ipam::{AssignRequest, Ipam};
use calico_model::{
    spec::{ProfileSpec, WorkloadEndpointSpec},
    Kind, Object, ObjectMeta, Resource, API_VERSION,
};
use ipnet::IpNet;
use rtnetlink::Handle;
use serde_json::{json, Value};

use crate::request::Request;

pub const POOL_ID_V4: &str = "CalicoPoolIPv4";
pub const POOL_ID_V6: &str = "CalicoPoolIPv6";
pub const ORCHESTRATOR: &str = "libnetwork";
pub const NAMESPACE: &str = "libnetwork";

/// A request Docker sent that cannot be honoured; answered as `{"Err": ...}`.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("malformed request body for {call}: {reason}")]
    Malformed { call: String, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error(transparent)]
    Ipam(#[from] calico_ipam::IpamError),
    #[error("netlink: {0}")]
    Netlink(String),
}

pub struct Driver {
    store: Datastore,
    ipam: Ipam,
    netlink: Handle,
    node: String,
    interface_prefix: String,
}

/// Names of an endpoint's pieces, from Docker's endpoint ID (upstream's scheme).
pub struct EndpointNames {
    pub host_veth: String,
    pub temp_veth: String,
    pub workload_endpoint: String,
}

impl EndpointNames {
    pub fn new(node: &str, prefix: &str, endpoint_id: &str) -> Self {
        let short: String = endpoint_id.chars().take(11).collect();
        Self {
            host_veth: format!("{prefix}{short}"),
            temp_veth: format!("temp{short}"),
            workload_endpoint: format!(
                "{}-{ORCHESTRATOR}-{ORCHESTRATOR}-{endpoint_id}",
                node.replace('-', "--")
            ),
        }
    }
}

/// The profile of a Docker network, and the label its members carry.
pub fn network_profile(network_id: &str) -> (String, String) {
    let short: String = network_id.chars().take(12).collect();
    (network_id.to_owned(), format!("docker-network-{short}"))
}

/// Which pool a `RequestPool` gets: Docker's `--subnet` must be exactly a calico IPPool's
/// CIDR; without one, addresses come from any pool of the family.
pub fn choose_pool(
    requested: Option<IpNet>,
    v6: bool,
    pools: &[IpNet],
) -> Result<(String, String), String> {
    let Some(net) = requested else {
        return Ok(if v6 {
            (POOL_ID_V6.into(), "::/0".into())
        } else {
            (POOL_ID_V4.into(), "0.0.0.0/0".into())
        });
    };
    if pools.iter().any(|p| p.trunc() == net.trunc()) {
        Ok((net.to_string(), net.to_string()))
    } else {
        Err(format!(
            "the requested subnet {net} must match the CIDR of a configured calico IPPool (have: {})",
            pools.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ))
    }
}

/// Every IPAM handle this driver makes starts so; it releases no address held by another.
const HANDLE_PREFIX: &str = "libnetwork.";

fn handle_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{HANDLE_PREFIX}{nanos:x}.{}",
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Driver {
    pub fn new(store: Datastore, netlink: Handle, node: String, interface_prefix: String) -> Self {
        Self {
            ipam: Ipam::new(store.clone(), node.clone()),
            store,
            netlink,
            node,
            interface_prefix,
        }
    }

    /// Answers one call; errors become `{"Err": "..."}` so Docker shows them.
    pub async fn handle(&self, call: &str, body: &[u8]) -> Value {
        let result = match Request::parse(call, body) {
            Ok(request) => self.dispatch(request).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(call, error = %e, "request refused");
                json!({ "Err": e.to_string() })
            }
        }
    }

    async fn dispatch(&self, request: Request) -> Result<Value, DriverError> {
        match request {
            Request::Activate => Ok(json!({ "Implements": ["NetworkDriver", "IpamDriver"] })),
            Request::NetworkCapabilities => {
                Ok(json!({ "Scope": "local", "ConnectivityScope": "global" }))
            }
            Request::IpamCapabilities => {
                Ok(json!({ "RequiresMACAddress": false, "RequiresRequestReplay": false }))
            }
            Request::DefaultAddressSpaces => Ok(json!({
                "LocalDefaultAddressSpace": "CalicoLocalAddressSpace",
                "GlobalDefaultAddressSpace": "CalicoGlobalAddressSpace",
            })),
            Request::RequestPool { pool, v6 } => self.request_pool(pool, v6).await,
            Request::ReleasePool | Request::Acknowledge => Ok(json!({})),
            Request::RequestAddress { pool_id, address } => {
                self.request_address(&pool_id, address).await
            }
            Request::ReleaseAddress { address } => self.release_address(address).await,
            Request::CreateNetwork { network_id, v6 } => {
                if v6 {
                    tracing::info!(
                        network = network_id,
                        "IPv6 data given; endpoints get IPv4 and IPv6 as docker requests them"
                    );
                }
                let (name, label) = network_profile(&network_id);
                let profile = Resource::Profile(Object {
                    api_version: API_VERSION.into(),
                    kind: Kind::Profile.as_str().into(),
                    metadata: ObjectMeta {
                        name,
                        ..Default::default()
                    },
                    spec: ProfileSpec::network(&label),
                    status: None,
                });
                match self.store.create(profile).await {
                    Ok(_) | Err(DatastoreError::AlreadyExists { .. }) => Ok(json!({})),
                    Err(e) => Err(e.into()),
                }
            }
            Request::DeleteNetwork { network_id } => {
                match self
                    .store
                    .delete(Kind::Profile, None, &network_profile(&network_id).0, None)
                    .await
                {
                    Ok(_) | Err(DatastoreError::NotFound { .. }) => Ok(json!({})),
                    Err(e) => Err(e.into()),
                }
            }
            Request::CreateEndpoint {
                network_id,
                endpoint_id,
                addresses,
            } => {
                self.create_endpoint(&network_id, &endpoint_id, &addresses)
                    .await
            }
            Request::DeleteEndpoint { endpoint_id } => self.delete_endpoint(&endpoint_id).await,
            Request::EndpointOperInfo => Ok(json!({ "Value": {} })),
            Request::Join { endpoint_id } => {
                let names = EndpointNames::new(&self.node, &self.interface_prefix, &endpoint_id);
                if self.link_index(&names.temp_veth).await?.is_none() {
                    return Err(DriverError::Refused(format!(
                        "endpoint {endpoint_id} has no interface {} (was it created by this driver?)",
                        names.temp_veth
                    )));
                }
                Ok(json!({
                    "InterfaceName": { "SrcName": names.temp_veth, "DstPrefix": "eth" },
                    "Gateway": GATEWAY_V4.to_string(),
                    "DisableGatewayService": true,
                    "StaticRoutes": [{ "Destination": format!("{GATEWAY_V4}/32"), "RouteType": 1, "NextHop": "" }],
                }))
            }
        }
    }

    /// Releases an address this driver handed out. One held by another component (the CNI
    /// plugin, a different runtime) is refused: Docker's view of the address is stale.
    async fn release_address(&self, ip: IpAddr) -> Result<Value, DriverError> {
        match self.ipam.handle_of(ip).await? {
            None => Ok(json!({})),
            Some(handle) if handle.starts_with(HANDLE_PREFIX) => {
                self.ipam.release_ips(&[ip]).await?;
                Ok(json!({}))
            }
            Some(handle) => Err(DriverError::Refused(format!(
                "address {ip} is held by IPAM handle `{handle}`, not by this driver; not released"
            ))),
        }
    }

    /// Removes an endpoint this driver made: its WorkloadEndpoint, and the host veth only
    /// when that endpoint names it (or the pair is still half-made, its temporary end on the
    /// host), so a `cali*` interface of another component is never touched.
    async fn delete_endpoint(&self, endpoint_id: &str) -> Result<Value, DriverError> {
        let names = EndpointNames::new(&self.node, &self.interface_prefix, endpoint_id);
        let ours = match self
            .store
            .get(
                Kind::WorkloadEndpoint,
                Some(NAMESPACE),
                &names.workload_endpoint,
            )
            .await
        {
            Ok(Resource::WorkloadEndpoint(w)) => {
                w.spec.orchestrator == ORCHESTRATOR && w.spec.interface_name == names.host_veth
            }
            Ok(_) | Err(DatastoreError::NotFound { .. }) => false,
            Err(e) => return Err(e.into()),
        };
        if ours || self.link_index(&names.temp_veth).await?.is_some() {
            self.delete_link(&names.host_veth).await?;
        } else if self.link_index(&names.host_veth).await?.is_some() {
            tracing::warn!(
                endpoint = endpoint_id,
                interface = names.host_veth,
                "no endpoint of this driver names the interface; left alone"
            );
        }
        match self
            .store
            .delete(
                Kind::WorkloadEndpoint,
                Some(NAMESPACE),
                &names.workload_endpoint,
                None,
            )
            .await
        {
            Ok(_) | Err(DatastoreError::NotFound { .. }) => Ok(json!({})),
            Err(e) => Err(e.into()),
        }
    }

    async fn pools(&self) -> Result<Vec<IpNet>, DriverError> {
        let (pools, _) = self.store.list(Kind::IPPool, None).await?;
        Ok(pools
            .iter()
            .filter_map(|p| match p {
                Resource::IPPool(p) => p.spec.cidr.parse().ok(),
                _ => None,
            })
            .collect())
    }

    async fn request_pool(&self, requested: Option<IpNet>, v6: bool) -> Result<Value, DriverError> {
        let pools = match requested {
            None => Vec::new(),
            Some(_) => self.pools().await?,
        };
        let (id, pool) = choose_pool(requested, v6, &pools).map_err(DriverError::Refused)?;
        // The dummy gateway keeps libnetwork from asking for one: workloads route via
        // 169.254.1.1, answered by the host.
        let gateway = if v6 { "::/0" } else { "0.0.0.0/0" };
        Ok(json!({ "PoolID": id, "Pool": pool, "Data": { "com.docker.network.gateway": gateway } }))
    }

    async fn request_address(
        &self,
        pool_id: &str,
        requested: Option<IpAddr>,
    ) -> Result<Value, DriverError> {
        let handle = handle_id();
        let attrs = BTreeMap::from([("node".to_owned(), self.node.clone())]);
        let ip: IpAddr = if let Some(ip) = requested {
            self.ipam.assign_ip(ip, &handle, &attrs).await?;
            ip
        } else {
            let (v6, pools) = match pool_id {
                POOL_ID_V4 => (false, vec![]),
                POOL_ID_V6 => (true, vec![]),
                cidr => {
                    let net: IpNet = cidr.parse().map_err(|_| {
                        DriverError::Refused(format!(
                            "pool `{cidr}` is not one this driver handed out"
                        ))
                    })?;
                    if !self.pools().await?.iter().any(|p| p.trunc() == net.trunc()) {
                        return Err(DriverError::Refused(format!(
                            "the network's calico IPPool {cidr} no longer exists; re-create it before using the network"
                        )));
                    }
                    (net.addr().is_ipv6(), vec![cidr.to_owned()])
                }
            };
            let req = AssignRequest {
                handle,
                attrs,
                num_v4: usize::from(!v6),
                num_v6: usize::from(v6),
                ipv4_pools: if v6 { vec![] } else { pools.clone() },
                ipv6_pools: if v6 { pools } else { vec![] },
            };
            let assigned = self.ipam.auto_assign(&req).await?;
            assigned
                .first()
                .map(|n| n.addr())
                .ok_or_else(|| DriverError::Refused("IPAM assigned no address".into()))?
        };
        let len = if ip.is_ipv4() { 32 } else { 128 };
        Ok(json!({ "Address": format!("{ip}/{len}"), "Data": {} }))
    }

    async fn create_endpoint(
        &self,
        network: &str,
        endpoint: &str,
        addresses: &[IpAddr],
    ) -> Result<Value, DriverError> {
        if addresses.is_empty() {
            return Err(DriverError::Refused(
                "the endpoint has no address (use --ipam-driver calico-ipam)".into(),
            ));
        }
        let networks = addresses
            .iter()
            .map(|ip| IpNet::from(*ip).to_string())
            .collect();
        let (profile, _) = network_profile(network);
        match self.store.get(Kind::Profile, None, &profile).await {
            Ok(_) => {}
            Err(DatastoreError::NotFound { .. }) => {
                return Err(DriverError::Refused(format!(
                    "network {network} is unknown to calico (no profile {profile}); create it with `docker network create --driver calico`"
                )))
            }
            Err(e) => return Err(e.into()),
        }
        let names = EndpointNames::new(&self.node, &self.interface_prefix, endpoint);
        self.create_veth(&names).await?;
        let wep = Resource::WorkloadEndpoint(Object {
            api_version: API_VERSION.into(),
            kind: Kind::WorkloadEndpoint.as_str().into(),
            metadata: ObjectMeta {
                name: names.workload_endpoint.clone(),
                namespace: Some(NAMESPACE.into()),
                labels: BTreeMap::from([(
                    "projectcalico.org/orchestrator".to_owned(),
                    ORCHESTRATOR.to_owned(),
                )]),
                ..Default::default()
            },
            spec: WorkloadEndpointSpec {
                orchestrator: ORCHESTRATOR.into(),
                workload: ORCHESTRATOR.into(),
                node: self.node.clone(),
                endpoint: endpoint.to_owned(),
                ip_networks: networks,
                profiles: vec![profile],
                interface_name: names.host_veth.clone(),
                mac: Some("ee:ee:ee:ee:ee:ee".into()),
                ..Default::default()
            },
            status: None,
        });
        if let Err(e) = self.store.apply(wep).await {
            // Nothing half-made stays behind.
            let _ = self.delete_link(&names.host_veth).await;
            return Err(e.into());
        }
        Ok(json!({ "Interface": {} }))
    }

    async fn link_index(&self, name: &str) -> Result<Option<u32>, DriverError> {
        Ok(calico_hostlink::link_by_name(&self.netlink, name)
            .await
            .map_err(|e| DriverError::Netlink(e.to_string()))?
            .map(|l| l.index))
    }

    /// The veth pair, host end up; the temporary end stays here until Docker moves it into
    /// the container.
    async fn create_veth(&self, names: &EndpointNames) -> Result<(), DriverError> {
        let peer = Peer {
            name: names.temp_veth.clone(),
            netns_fd: None,
            mtu: None,
        };
        let index = calico_hostlink::create_workload_veth(&self.netlink, &names.host_veth, &peer)
            .await
            .map_err(|e| DriverError::Netlink(e.to_string()))?;
        calico_hostlink::set_up(&self.netlink, index)
            .await
            .map_err(|e| DriverError::Netlink(e.to_string()))
    }

    async fn delete_link(&self, name: &str) -> Result<(), DriverError> {
        calico_hostlink::delete_link(&self.netlink, name)
            .await
            .map(drop)
            .map_err(|e| DriverError::Netlink(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_must_be_a_pool() {
        let pools: Vec<IpNet> = vec!["10.60.0.0/24".parse().unwrap()];
        assert_eq!(
            choose_pool(None, false, &pools).unwrap(),
            (POOL_ID_V4.into(), "0.0.0.0/0".into())
        );
        assert_eq!(
            choose_pool(None, true, &pools).unwrap(),
            (POOL_ID_V6.into(), "::/0".into())
        );
        assert_eq!(
            choose_pool(Some("10.60.0.0/24".parse().unwrap()), false, &pools)
                .unwrap()
                .0,
            "10.60.0.0/24"
        );
        let err = choose_pool(Some("10.61.0.0/24".parse().unwrap()), false, &pools).unwrap_err();
        assert!(
            err.contains("must match the CIDR of a configured calico IPPool"),
            "{err}"
        );
    }

    #[test]
    fn names_fit_interfaces() {
        let n = EndpointNames::new(
            "my-node",
            "cali",
            "45f2152d0f9f7baaf2bfd54775cf39098d422373ad6a5dedc663f340f4ff4ce5",
        );
        assert_eq!(n.host_veth, "cali45f2152d0f9");
        assert_eq!(n.temp_veth, "temp45f2152d0f9");
        assert!(n.host_veth.len() <= 15);
        assert_eq!(n.workload_endpoint, "my--node-libnetwork-libnetwork-45f2152d0f9f7baaf2bfd54775cf39098d422373ad6a5dedc663f340f4ff4ce5");
        let (profile, label) =
            network_profile("cec06969d3260b72ab90da13b20456da65edd50e2b19e9a07d7f0d6c616de18a");
        assert_eq!(label, "docker-network-cec06969d326");
        assert!(profile.starts_with("cec06969"));
    }
}
