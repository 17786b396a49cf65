//! The allocator: plans from [`crate::plan`], block arithmetic from [`crate::block`], and every
//! write a compare-and-swap in the datastore, retried on conflict.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use calico_datastore::{
    keys::{block_name, node_affinities_prefix},
    Datastore, DatastoreError, Write,
};
use calico_model::{
    spec::{BlockAffinitySpec, IpamBlockSpec, IpamHandleSpec},
    Kind, Object, ObjectMeta, Resource, API_VERSION,
};
use ipnet::IpNet;

use crate::{
    block,
    plan::{next_free_block, usable_pools, Family, Pool},
};

/// Writes retried on conflict before giving up.
const MAX_ATTEMPTS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("no enabled {family} pool is usable by workloads on node {node}")]
    NoPools { family: &'static str, node: String },
    #[error("{family} pools {pools} have no free address for node {node}")]
    Exhausted {
        family: &'static str,
        pools: String,
        node: String,
    },
    #[error("{ip} is already in use")]
    InUse { ip: IpAddr },
    #[error("{ip} is not in any enabled IP pool")]
    NotInPool { ip: IpAddr },
    #[error("gave up after {MAX_ATTEMPTS} conflicting writes to {what}")]
    Contention { what: String },
    #[error("IPAM handle `{handle}` cannot be stored: {reason}")]
    BadHandle { handle: String, reason: String },
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
}

impl IpamError {
    /// Whether the same request may succeed later (CNI "try again later").
    pub fn is_transient(&self) -> bool {
        match self {
            IpamError::Contention { .. } => true,
            IpamError::Datastore(e) => e.is_transient(),
            _ => false,
        }
    }
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// What to assign.
#[derive(Debug, Clone, Default)]
pub struct AssignRequest {
    /// Owner of the addresses, e.g. `k8s-pod-network.<containerID>`.
    pub handle: String,
    /// Recorded with each address (pod, namespace, node, ...).
    pub attrs: BTreeMap<String, String>,
    pub num_v4: usize,
    pub num_v6: usize,
    /// Restrict to these pools (names or CIDRs); empty means any usable pool.
    pub ipv4_pools: Vec<String>,
    pub ipv6_pools: Vec<String>,
}

/// Block IPAM for one node.
#[derive(Clone)]
pub struct Ipam {
    store: Datastore,
    node: String,
}

/// What an assignment knows of its handle's record.
enum HandleRecord {
    /// Not read: assumed absent (a new attachment's).
    Unread,
    Absent,
    Read(Box<Resource>),
}

struct Context {
    pools: Vec<Resource>,
    node_labels: BTreeMap<String, String>,
    reserved: Vec<IpNet>,
    strict_affinity: bool,
    auto_allocate: bool,
    /// This node's block affinities, read with the rest: the first look for a block with
    /// room needs no request of its own.
    own_affinities: Vec<Resource>,
}

impl Ipam {
    pub fn new(store: Datastore, node: impl Into<String>) -> Self {
        Self {
            store,
            node: node.into(),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    async fn context(&self) -> Result<Context, IpamError> {
        // Independent reads, issued together.
        let (pools, node, reservations, config, affinities) = tokio::join!(
            self.store.list(Kind::IPPool, None),
            self.store.get(Kind::Node, None, &self.node),
            self.store.list(Kind::IPReservation, None),
            self.store.get(Kind::IPAMConfig, None, "default"),
            self.own_affinities(),
        );
        let (pools, _) = pools?;
        let node_labels = match node {
            Ok(node) => node.metadata().labels.clone(),
            Err(DatastoreError::NotFound { .. }) => BTreeMap::new(),
            Err(e) => return Err(e.into()),
        };
        let (reservations, _) = reservations?;
        let reserved = reservations
            .iter()
            .filter_map(|r| match r {
                Resource::IPReservation(o) => Some(&o.spec.reserved_cidrs),
                _ => None,
            })
            .flatten()
            .filter_map(|c| {
                c.parse::<IpNet>()
                    .ok()
                    .or_else(|| c.parse::<IpAddr>().ok().map(IpNet::from))
            })
            .collect();
        let (strict_affinity, auto_allocate) = match config {
            Ok(Resource::IPAMConfig(c)) => (c.spec.strict_affinity, c.spec.auto_allocate_blocks),
            Ok(_) | Err(DatastoreError::NotFound { .. }) => (false, true),
            Err(e) => return Err(e.into()),
        };
        Ok(Context {
            pools,
            node_labels,
            reserved,
            strict_affinity,
            auto_allocate,
            own_affinities: affinities?,
        })
    }

    /// The BlockAffinities of this node (its own keys, not everyone's).
    async fn own_affinities(&self) -> Result<Vec<Resource>, DatastoreError> {
        let (affinities, _) = self
            .store
            .list_prefix(&node_affinities_prefix(&self.node))
            .await?;
        Ok(affinities.into_iter().flatten().collect())
    }

    /// Assigns the requested numbers of IPv4 and IPv6 addresses to `req.handle`, as host
    /// prefixes. All or nothing: on failure, whatever was assigned is released again.
    pub async fn auto_assign(&self, req: &AssignRequest) -> Result<Vec<IpNet>, IpamError> {
        check_handle(&req.handle)?;
        let ctx = self.context().await?;
        let mut assigned = Vec::new();
        for (family, count, only) in [
            (Family::V4, req.num_v4, &req.ipv4_pools),
            (Family::V6, req.num_v6, &req.ipv6_pools),
        ] {
            if count == 0 {
                continue;
            }
            match self.assign_family(&ctx, family, count, only, req).await {
                Ok(ips) => assigned.extend(ips),
                Err(e) => {
                    if !assigned.is_empty() {
                        if let Err(undo) = self.release_by_handle(&req.handle).await {
                            tracing::error!(handle = req.handle, error = %undo, "rollback of a partial assignment failed");
                        }
                    }
                    return Err(e);
                }
            }
        }
        Ok(assigned.into_iter().map(IpNet::from).collect())
    }

    async fn assign_family(
        &self,
        ctx: &Context,
        family: Family,
        count: usize,
        only: &[String],
        req: &AssignRequest,
    ) -> Result<Vec<IpAddr>, IpamError> {
        let pools = usable_pools(&ctx.pools, family, &ctx.node_labels, only);
        if pools.is_empty() {
            return Err(IpamError::NoPools {
                family: family_name(family),
                node: self.node.clone(),
            });
        }
        let mut got: Vec<IpAddr> = Vec::new();
        // The first attempt looks through the affinities read with the context; later ones
        // (a block filled up, or one was claimed) read them again.
        let mut affinities = Some(ctx.own_affinities.clone());
        for _ in 0..MAX_ATTEMPTS {
            if got.len() == count {
                break;
            }
            let affinities = match affinities.take() {
                Some(read) => read,
                None => self.own_affinities().await?,
            };
            // 0. Our own blocks with room, found through this node's affinities: the common
            //    case reads a few keys, not every block in the cluster.
            if let Some((cidr, read)) = self
                .own_block_with_room(affinities, &pools, &ctx.reserved)
                .await?
            {
                let ips = self
                    .assign_in_block(&cidr, Some(read), count - got.len(), req, &ctx.reserved)
                    .await?;
                let taken = ips.len();
                got.extend(ips);
                // None: the block filled up meanwhile; look wider.
                if taken > 0 {
                    continue;
                }
            }
            // 1. Claim a block nobody has: which exist is read from the keys alone.
            if ctx.auto_allocate {
                let existing: BTreeSet<IpNet> =
                    self.store.block_cidrs().await?.into_iter().collect();
                if let Some(cidr) = pools.iter().find_map(|p| next_free_block(p, &existing)) {
                    self.claim(&cidr, ctx.strict_affinity).await?;
                    continue;
                }
            }
            // Every block is claimed (or claiming is off): read them whole.
            let blocks = self.blocks_in(&pools).await?;
            let affinity = format!("host:{}", self.node);
            // 2. Our own blocks with room that no affinity record names.
            let mine: Vec<&(IpNet, IpamBlockSpec, String)> = blocks
                .iter()
                .filter(|(c, s, _)| {
                    s.affinity.as_deref() == Some(affinity.as_str())
                        && block::free(s, c, &ctx.reserved) > 0
                })
                .collect();
            if let Some((cidr, _, _)) = mine.first() {
                let ips = self
                    .assign_in_block(cidr, None, count - got.len(), req, &ctx.reserved)
                    .await?;
                got.extend(ips);
                continue;
            }
            // 3. Borrow from another node's block.
            if ctx.strict_affinity {
                break;
            }
            let borrowable = blocks
                .iter()
                .find(|(c, s, _)| block::free(s, c, &ctx.reserved) > 0 && !s.strict_affinity);
            match borrowable {
                Some((cidr, _, _)) => {
                    let ips = self
                        .assign_in_block(cidr, None, count - got.len(), req, &ctx.reserved)
                        .await?;
                    got.extend(ips);
                }
                None => break,
            }
        }
        if got.len() < count {
            return Err(IpamError::Exhausted {
                family: family_name(family),
                pools: pools
                    .iter()
                    .map(|p| p.cidr.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                node: self.node.clone(),
            });
        }
        Ok(got)
    }

    /// A block inside `pools` that this node has a confirmed affinity to (among `affinities`,
    /// the node's own) and that has a free address; with the block as read.
    async fn own_block_with_room(
        &self,
        affinities: Vec<Resource>,
        pools: &[Pool],
        reserved: &[IpNet],
    ) -> Result<Option<(IpNet, Resource)>, IpamError> {
        let ours = format!("host:{}", self.node);
        for affinity in affinities {
            let Resource::BlockAffinity(a) = affinity else {
                continue;
            };
            let Ok(cidr) = a.spec.cidr.parse::<IpNet>() else {
                continue;
            };
            if a.spec.state != "confirmed"
                || !pools.iter().any(|p| p.cidr.contains(&cidr.network()))
            {
                continue;
            }
            match self
                .store
                .get(Kind::IPAMBlock, None, &block_name(&cidr))
                .await
            {
                Ok(Resource::IPAMBlock(b))
                    if b.spec.affinity.as_deref() == Some(ours.as_str())
                        && block::free(&b.spec, &cidr, reserved) > 0 =>
                {
                    return Ok(Some((cidr, Resource::IPAMBlock(b))))
                }
                Ok(_) | Err(DatastoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(None)
    }

    /// Every block inside `pools`, with its spec and resourceVersion.
    async fn blocks_in(
        &self,
        pools: &[Pool],
    ) -> Result<Vec<(IpNet, IpamBlockSpec, String)>, IpamError> {
        let (all, _) = self.store.list(Kind::IPAMBlock, None).await?;
        Ok(all
            .into_iter()
            .filter_map(|r| match r {
                Resource::IPAMBlock(b) => {
                    let cidr: IpNet = b.spec.cidr.parse().ok()?;
                    let rv = b.metadata.resource_version.clone().unwrap_or_default();
                    pools
                        .iter()
                        .any(|p| p.cidr.contains(&cidr.network()))
                        .then_some((cidr, b.spec, rv))
                }
                _ => None,
            })
            .collect())
    }

    /// Takes up to `want` addresses from one block, starting from `read` (the block as just
    /// read) when given, re-reading it on conflict. Returns what it got (possibly nothing when
    /// the block filled up).
    async fn assign_in_block(
        &self,
        cidr: &IpNet,
        mut read: Option<Resource>,
        want: usize,
        req: &AssignRequest,
        reserved: &[IpNet],
    ) -> Result<Vec<IpAddr>, IpamError> {
        let mut record = HandleRecord::Unread;
        for _ in 0..MAX_ATTEMPTS {
            let mut resource = match read.take() {
                Some(r) => r,
                None => {
                    self.store
                        .get(Kind::IPAMBlock, None, &block_name(cidr))
                        .await?
                }
            };
            let Resource::IPAMBlock(b) = &mut resource else {
                unreachable!("asked for a block")
            };
            let ips = block::assign(&mut b.spec, cidr, want, &req.handle, &req.attrs, reserved);
            if ips.is_empty() {
                return Ok(ips);
            }
            if self
                .commit(resource, &req.handle, cidr, ips.len(), &mut record)
                .await?
            {
                return Ok(ips);
            }
        }
        Err(IpamError::Contention {
            what: format!("block {cidr}"),
        })
    }

    /// Writes a block that now holds `count` more addresses of `handle` together with the
    /// handle record that counts them, in one transaction: an address is never without its
    /// record, whatever dies when, so what a handle holds is read from its record and the
    /// blocks it names, never from every block in the cluster. `false`: something changed
    /// (the caller reads the block again and retries).
    async fn commit(
        &self,
        block: Resource,
        handle: &str,
        cidr: &IpNet,
        count: usize,
        record: &mut HandleRecord,
    ) -> Result<bool, IpamError> {
        let counted = match record {
            // A new attachment's record does not exist yet: create it, no read first.
            HandleRecord::Unread | HandleRecord::Absent => {
                Write::Create(handle_resource(IpamHandleSpec {
                    handle_id: handle.to_owned(),
                    block: BTreeMap::from([(cidr.to_string(), count)]),
                    deleted: false,
                }))
            }
            HandleRecord::Read(current) => {
                let mut updated = (**current).clone();
                if let Resource::IPAMHandle(h) = &mut updated {
                    *h.spec.block.entry(cidr.to_string()).or_default() += count;
                }
                Write::Back(updated)
            }
        };
        match self
            .store
            .write_all(vec![Write::Back(block), counted])
            .await
        {
            Ok(_) => return Ok(true),
            Err(DatastoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let guessed = matches!(record, HandleRecord::Unread);
        *record = match self.store.get(Kind::IPAMHandle, None, handle).await {
            Ok(r) => HandleRecord::Read(Box::new(r)),
            Err(DatastoreError::NotFound { .. }) => HandleRecord::Absent,
            Err(e) => return Err(e.into()),
        };
        // A record that exists explains a failed guess; anything else is another writer.
        if !(guessed && matches!(record, HandleRecord::Read(_))) {
            contended().await;
        }
        Ok(false)
    }

    /// Claims `cidr` for this node: the block with our affinity and the affinity record, in one
    /// transaction (a claim that dies leaves both or neither; this node finds its blocks
    /// through the records). Losing the race to another node is not an error.
    async fn claim(&self, cidr: &IpNet, strict: bool) -> Result<(), IpamError> {
        let mut spec = block::new_block(cidr, Some(&self.node));
        spec.strict_affinity = strict;
        let block = block_resource(cidr, spec);
        let affinity = Resource::BlockAffinity(Object {
            api_version: API_VERSION.into(),
            kind: Kind::BlockAffinity.as_str().into(),
            metadata: ObjectMeta {
                name: format!("{}-{}", self.node, block_name(cidr)),
                ..Default::default()
            },
            spec: BlockAffinitySpec {
                state: "confirmed".into(),
                node: self.node.clone(),
                cidr: cidr.to_string(),
                deleted: None,
            },
            status: None,
        });
        match self
            .store
            .write_all(vec![
                Write::Create(block.clone()),
                Write::Create(affinity.clone()),
            ])
            .await
        {
            Ok(_) => {}
            Err(DatastoreError::Conflict { .. }) => {
                // The block exists (another node won), or a record of ours outlived its block:
                // the block alone, then the record brought up to date.
                match self.store.create(block).await {
                    Ok(_) => {}
                    Err(DatastoreError::AlreadyExists { .. }) => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
                self.store.apply(affinity).await?;
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(node = self.node, %cidr, "claimed IPAM block");
        Ok(())
    }

    async fn adjust_handle(&self, handle: &str, cidr: String, delta: i64) -> Result<(), IpamError> {
        for _ in 0..MAX_ATTEMPTS {
            let result = match self.store.get(Kind::IPAMHandle, None, handle).await {
                Err(DatastoreError::NotFound { .. }) if delta > 0 => {
                    let spec = IpamHandleSpec {
                        handle_id: handle.to_owned(),
                        block: BTreeMap::from([(cidr.clone(), delta as usize)]),
                        deleted: false,
                    };
                    self.store.create(handle_resource(spec)).await.map(drop)
                }
                Err(DatastoreError::NotFound { .. }) => return Ok(()),
                Err(e) => return Err(e.into()),
                Ok(mut resource) => {
                    let Resource::IPAMHandle(h) = &mut resource else {
                        unreachable!("asked for a handle")
                    };
                    let n = h.spec.block.entry(cidr.clone()).or_default();
                    *n = (*n as i64 + delta).max(0) as usize;
                    if *n == 0 {
                        h.spec.block.remove(&cidr);
                    }
                    if h.spec.block.is_empty() {
                        let rv = resource.metadata().resource_version.clone();
                        self.store
                            .delete(Kind::IPAMHandle, None, handle, rv.as_deref())
                            .await
                            .map(drop)
                    } else {
                        self.store.write_back(resource).await.map(drop)
                    }
                }
            };
            match result {
                Ok(()) => return Ok(()),
                Err(DatastoreError::Conflict { .. } | DatastoreError::AlreadyExists { .. }) => {
                    continue
                }
                Err(DatastoreError::NotFound { .. }) if delta < 0 => return Ok(()),
                Err(DatastoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention {
            what: format!("handle {handle}"),
        })
    }

    /// Assigns exactly `ip` (e.g. a requested static address) to `handle`.
    pub async fn assign_ip(
        &self,
        ip: IpAddr,
        handle: &str,
        attrs: &BTreeMap<String, String>,
    ) -> Result<(), IpamError> {
        check_handle(handle)?;
        let ctx = self.context().await?;
        let family = if ip.is_ipv4() { Family::V4 } else { Family::V6 };
        let pools = usable_pools(&ctx.pools, family, &ctx.node_labels, &[]);
        let pool = pools
            .iter()
            .find(|p| p.cidr.contains(&ip))
            .ok_or(IpamError::NotInPool { ip })?;
        let cidr = IpNet::new(ip, pool.block_size)
            .map(|n| n.trunc())
            .map_err(|_| IpamError::NotInPool { ip })?;
        let mut record = HandleRecord::Unread;
        for _ in 0..MAX_ATTEMPTS {
            let mut resource = match self
                .store
                .get(Kind::IPAMBlock, None, &block_name(&cidr))
                .await
            {
                Ok(r) => r,
                Err(DatastoreError::NotFound { .. }) => {
                    self.claim(&cidr, ctx.strict_affinity).await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let Resource::IPAMBlock(b) = &mut resource else {
                unreachable!("asked for a block")
            };
            if !block::assign_ip(&mut b.spec, &cidr, ip, handle, attrs) {
                return Err(IpamError::InUse { ip });
            }
            if self.commit(resource, handle, &cidr, 1, &mut record).await? {
                return Ok(());
            }
        }
        Err(IpamError::Contention {
            what: format!("block {cidr}"),
        })
    }

    /// Every block of the cluster, as (CIDR, spec).
    async fn all_blocks(&self) -> Result<Vec<(IpNet, IpamBlockSpec)>, IpamError> {
        let (blocks, _) = self.store.list(Kind::IPAMBlock, None).await?;
        Ok(blocks
            .into_iter()
            .filter_map(|r| match r {
                Resource::IPAMBlock(b) => Some((b.spec.cidr.parse::<IpNet>().ok()?, b.spec)),
                _ => None,
            })
            .collect())
    }

    /// Addresses `handle` holds.
    pub async fn ips_by_handle(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        Ok(self
            .blocks_of_handle(handle)
            .await?
            .unwrap_or_default()
            .iter()
            .flat_map(|(cidr, spec)| block::held_by(spec, cidr, handle))
            .collect())
    }

    /// The blocks `handle`'s record names, as (CIDR, spec); `None` without a record (then no
    /// block holds one of its addresses: see [`Ipam::commit`]).
    async fn blocks_of_handle(
        &self,
        handle: &str,
    ) -> Result<Option<Vec<(IpNet, IpamBlockSpec)>>, IpamError> {
        let cidrs: Vec<IpNet> = match self.store.get(Kind::IPAMHandle, None, handle).await {
            Ok(Resource::IPAMHandle(h)) => {
                h.spec.block.keys().filter_map(|c| c.parse().ok()).collect()
            }
            Ok(_) | Err(DatastoreError::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut blocks = Vec::with_capacity(cidrs.len());
        for cidr in cidrs {
            if let Some(Resource::IPAMBlock(b)) = self.stored_block(&cidr).await? {
                blocks.push((cidr, b.spec));
            }
        }
        Ok(Some(blocks))
    }

    /// Releases everything `handle` holds and deletes the handle. Releasing a handle that
    /// holds nothing is not an error (a runtime may DEL twice).
    pub async fn release_by_handle(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        let blocks: Vec<IpNet> = match self.store.get(Kind::IPAMHandle, None, handle).await {
            Ok(Resource::IPAMHandle(h)) => {
                h.spec.block.keys().filter_map(|c| c.parse().ok()).collect()
            }
            Ok(_) => Vec::new(),
            Err(DatastoreError::NotFound { .. }) => {
                // No record: nothing of this version's making is held, but an older one wrote
                // the block and the record apart and could lose the record; one read of every
                // block finds such an address, and only the blocks that hold one are written.
                self.all_blocks()
                    .await?
                    .into_iter()
                    .filter(|(cidr, spec)| !block::held_by(spec, cidr, handle).is_empty())
                    .map(|(cidr, _)| cidr)
                    .collect()
            }
            Err(e) => return Err(e.into()),
        };
        let mut released = Vec::new();
        for cidr in blocks {
            released.extend(
                self.release_in_block(&cidr, |spec| block::release_handle(spec, &cidr, handle))
                    .await?,
            );
        }
        for _ in 0..MAX_ATTEMPTS {
            match self.store.get(Kind::IPAMHandle, None, handle).await {
                Err(DatastoreError::NotFound { .. }) => break,
                Err(e) => return Err(e.into()),
                Ok(h) => {
                    let rv = h.metadata().resource_version.clone();
                    match self
                        .store
                        .delete(Kind::IPAMHandle, None, handle, rv.as_deref())
                        .await
                    {
                        Ok(_) | Err(DatastoreError::NotFound { .. }) => break,
                        Err(DatastoreError::Conflict { .. }) => contended().await,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Ok(released)
    }

    /// What `handle` holds, with its handle record brought to say so: a record that counts
    /// addresses its blocks no longer hold (a release that died between freeing them and
    /// deleting the record) is corrected, or removed when it holds nothing. Reads the record
    /// and the blocks it names.
    pub async fn adopt_held(&self, handle: &str) -> Result<Vec<IpAddr>, IpamError> {
        let Some(blocks) = self.blocks_of_handle(handle).await? else {
            return Ok(Vec::new());
        };
        let mut per_block: BTreeMap<String, usize> = BTreeMap::new();
        let mut held = Vec::new();
        for (cidr, spec) in blocks {
            let ips = block::held_by(&spec, &cidr, handle);
            if !ips.is_empty() {
                per_block.insert(cidr.to_string(), ips.len());
                held.extend(ips);
            }
        }
        if held.is_empty() {
            match self
                .store
                .delete(Kind::IPAMHandle, None, handle, None)
                .await
            {
                Ok(_) => tracing::info!(
                    handle,
                    "removed a handle record of addresses never assigned"
                ),
                Err(DatastoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
            return Ok(held);
        }
        for _ in 0..MAX_ATTEMPTS {
            let result = match self.store.get(Kind::IPAMHandle, None, handle).await {
                Ok(Resource::IPAMHandle(h)) if h.spec.block == per_block => return Ok(held),
                Ok(mut resource) => {
                    if let Resource::IPAMHandle(h) = &mut resource {
                        h.spec.block = per_block.clone();
                    }
                    self.store.write_back(resource).await.map(drop)
                }
                Err(DatastoreError::NotFound { .. }) => {
                    tracing::warn!(handle, addresses = ?held, "allocation without its handle record; adopting it");
                    let spec = IpamHandleSpec {
                        handle_id: handle.to_owned(),
                        block: per_block.clone(),
                        deleted: false,
                    };
                    self.store.create(handle_resource(spec)).await.map(drop)
                }
                Err(e) => return Err(e.into()),
            };
            match result {
                Ok(()) => return Ok(held),
                Err(DatastoreError::Conflict { .. } | DatastoreError::AlreadyExists { .. }) => {
                    contended().await
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention {
            what: format!("handle {handle}"),
        })
    }

    /// The handle that holds `ip`, or `None` when it is not allocated.
    pub async fn handle_of(&self, ip: IpAddr) -> Result<Option<String>, IpamError> {
        Ok(self
            .all_blocks()
            .await?
            .iter()
            .find(|(cidr, _)| cidr.contains(&ip))
            .and_then(|(cidr, spec)| {
                let attr = spec.allocations.get(block::ordinal(cidr, ip)?)?.as_ref()?;
                Some(
                    spec.attributes
                        .get(*attr)?
                        .handle_id
                        .clone()
                        .unwrap_or_default(),
                )
            }))
    }

    /// Releases `ips`; returns the ones that were not allocated.
    pub async fn release_ips(&self, ips: &[IpAddr]) -> Result<Vec<IpAddr>, IpamError> {
        let (all, _) = self.store.list(Kind::IPAMBlock, None).await?;
        let cidrs: Vec<IpNet> = all
            .iter()
            .filter_map(|r| match r {
                Resource::IPAMBlock(b) => b.spec.cidr.parse().ok(),
                _ => None,
            })
            .collect();
        let mut not_allocated: Vec<IpAddr> = ips
            .iter()
            .copied()
            .filter(|ip| !cidrs.iter().any(|c| c.contains(ip)))
            .collect();
        for cidr in cidrs {
            let mine: Vec<IpAddr> = ips.iter().copied().filter(|ip| cidr.contains(ip)).collect();
            if mine.is_empty() {
                continue;
            }
            let mut per_handle = BTreeMap::new();
            let mut missing = Vec::new();
            self.release_in_block(&cidr, |spec| {
                let (handles, absent) = block::release(spec, &cidr, &mine);
                let released: Vec<IpAddr> = mine
                    .iter()
                    .copied()
                    .filter(|ip| !absent.contains(ip))
                    .collect();
                per_handle = handles;
                missing = absent;
                released
            })
            .await?;
            not_allocated.extend(missing);
            for (handle, n) in per_handle {
                self.adjust_handle(&handle, cidr.to_string(), -(n as i64))
                    .await?;
            }
        }
        Ok(not_allocated)
    }

    /// Releases what `node` held, for a node gone for good (calico-kube-controllers, when its
    /// Kubernetes Node is deleted): every address allocated for it (by handle, so the handle
    /// records go too), its block affinities, and its blocks: an empty one is deleted, one
    /// still holding another node's borrowed addresses loses its affinity. Returns the
    /// addresses released.
    pub async fn release_node(&self, node: &str) -> Result<Vec<IpAddr>, IpamError> {
        let blocks = self.all_blocks().await?;
        let handles: BTreeSet<String> = blocks
            .iter()
            .flat_map(|(_, spec)| block::handles_of_node(spec, node))
            .collect();
        let mut released = Vec::new();
        for handle in &handles {
            released.extend(self.release_by_handle(handle).await?);
        }
        let (affinities, _) = self
            .store
            .list_prefix(&node_affinities_prefix(node))
            .await?;
        for affinity in affinities.into_iter().flatten() {
            match self
                .store
                .delete(Kind::BlockAffinity, None, affinity.name(), None)
                .await
            {
                Ok(_) | Err(DatastoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let ours = format!("host:{node}");
        for (cidr, spec) in &blocks {
            if spec.affinity.as_deref() == Some(ours.as_str()) {
                self.unclaim(cidr, &ours).await?;
            }
        }
        Ok(released)
    }

    /// The block at `cidr` as stored (its version for a compare-and-swap), `None` when gone.
    async fn stored_block(&self, cidr: &IpNet) -> Result<Option<Resource>, IpamError> {
        match self
            .store
            .get(Kind::IPAMBlock, None, &block_name(cidr))
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(DatastoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Drops `affinity` from a block: deletes it when empty, else clears the affinity.
    async fn unclaim(&self, cidr: &IpNet, affinity: &str) -> Result<(), IpamError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some(mut resource) = self.stored_block(cidr).await? else {
                return Ok(());
            };
            let Resource::IPAMBlock(b) = &mut resource else {
                unreachable!("asked for a block")
            };
            if b.spec.affinity.as_deref() != Some(affinity) {
                return Ok(());
            }
            let result = if block::is_empty(&b.spec) {
                let rv = b.metadata.resource_version.clone();
                self.store
                    .delete(Kind::IPAMBlock, None, &block_name(cidr), rv.as_deref())
                    .await
                    .map(drop)
            } else {
                b.spec.affinity = None;
                b.spec.affinity_claim_time = None;
                self.store.write_back(resource).await.map(drop)
            };
            match result {
                Ok(()) | Err(DatastoreError::NotFound { .. }) => return Ok(()),
                Err(DatastoreError::Conflict { .. }) => contended().await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention {
            what: format!("block {cidr}"),
        })
    }

    /// Applies `change` to a block with compare-and-swap, retrying on conflict.
    async fn release_in_block(
        &self,
        cidr: &IpNet,
        mut change: impl FnMut(&mut IpamBlockSpec) -> Vec<IpAddr>,
    ) -> Result<Vec<IpAddr>, IpamError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some(mut resource) = self.stored_block(cidr).await? else {
                return Ok(Vec::new());
            };
            let Resource::IPAMBlock(b) = &mut resource else {
                unreachable!("asked for a block")
            };
            let released = change(&mut b.spec);
            if released.is_empty() {
                return Ok(released);
            }
            match self.store.write_back(resource).await {
                Ok(_) => return Ok(released),
                Err(DatastoreError::Conflict { .. }) => contended().await,
                Err(e) => return Err(e.into()),
            }
        }
        Err(IpamError::Contention {
            what: format!("block {cidr}"),
        })
    }
}

/// After losing a compare-and-swap: wait a few random milliseconds so that writers racing for
/// the same object spread out instead of colliding again in lock step.
async fn contended() {
    let jitter = fastrand::u64(0..4000);
    tokio::time::sleep(std::time::Duration::from_micros(500 + jitter)).await;
}

fn block_resource(cidr: &IpNet, spec: IpamBlockSpec) -> Resource {
    Resource::IPAMBlock(Object {
        api_version: API_VERSION.into(),
        kind: Kind::IPAMBlock.as_str().into(),
        metadata: ObjectMeta {
            name: block_name(cidr),
            ..Default::default()
        },
        spec,
        status: None,
    })
}

/// A handle the datastore would refuse is refused before anything is written, so a failed
/// assignment leaves neither a record nor an address behind.
fn check_handle(handle: &str) -> Result<(), IpamError> {
    let record = handle_resource(IpamHandleSpec {
        handle_id: handle.to_owned(),
        block: BTreeMap::new(),
        deleted: false,
    });
    calico_model::validate(&record).map_err(|errors| IpamError::BadHandle {
        handle: handle.to_owned(),
        reason: errors.to_string(),
    })
}

fn handle_resource(spec: IpamHandleSpec) -> Resource {
    Resource::IPAMHandle(Object {
        api_version: API_VERSION.into(),
        kind: Kind::IPAMHandle.as_str().into(),
        metadata: ObjectMeta {
            name: spec.handle_id.clone(),
            ..Default::default()
        },
        spec,
        status: None,
    })
}
