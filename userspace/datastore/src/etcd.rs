//! The etcd v3 backend.

use std::time::{Duration, SystemTime};

use calico_model::{validate, Kind, ObjectMeta, Resource, API_VERSION};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, Identity,
    KeyValue, TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use crate::{
    keys::{key_for, key_for_name, parse_key, prefix_for, KeyInfo},
    Backoff, DatastoreError, EtcdConfig,
};

/// Reads are retried this many times on transport errors, with doubling backoff.
const READ_ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Keys per page when listing a prefix: a cluster's worth of objects never comes back as one
/// message (gRPC's default limit is 4 MiB, about 4,500 endpoints).
pub(crate) const PAGE_KEYS: i64 = 5000;
/// `apply` re-reads and retries this many times when a concurrent writer wins.
const APPLY_ATTEMPTS: u32 = 8;

/// HTTP/2 keepalive of every connection (see [`Datastore::connect`]).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(8);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(4);

/// One object of a [`Datastore::write_all`] transaction, with its condition.
#[derive(Debug, Clone)]
pub enum Write {
    /// Created: nothing may be stored under its key.
    Create(Resource),
    /// Written back: what is stored must still be the version it was read at (its
    /// `resourceVersion`); its `uid` and `creationTimestamp` are kept as read.
    Back(Resource),
}

/// A connection to the datastore. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Datastore {
    client: Client,
    endpoints: String,
    /// See [`EtcdConfig::max_message_bytes`].
    pub(crate) max_message: usize,
}

impl Datastore {
    /// Connects and checks that etcd answers.
    pub async fn connect(config: &EtcdConfig) -> Result<Self, DatastoreError> {
        let endpoints = config.endpoints_display();
        let mut options = ConnectOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.connect_timeout)
            // HTTP/2 pings, not etcd requests: a watch on a stalled etcd (or a dead path to
            // it) fails within interval + timeout instead of waiting forever. etcd refuses
            // pings more often than every 5 s (--grpc-keepalive-min-time).
            .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT);
        if let (Some(user), Some(password)) = (&config.username, &config.password) {
            options = options.with_user(user, password);
        }
        if config.ca_cert_file.is_some() || config.cert_file.is_some() {
            options = options.with_tls(tls_options(config)?);
        }
        let unavailable = |source: etcd_client::Error| {
            let message = source.to_string();
            if message.contains("authentication failed") || message.contains("permission denied") {
                DatastoreError::Unauthorized {
                    endpoints: endpoints.clone(),
                    message,
                }
            } else {
                DatastoreError::Unavailable {
                    endpoints: endpoints.clone(),
                    source,
                }
            }
        };
        // Endpoints in order, the first that answers: a client over all of them would send
        // some requests to a dead member and fail them (etcd's own clients fail over).
        let mut last_error = None;
        for endpoint in &config.endpoints {
            let answered = async {
                let mut client = Client::connect([endpoint], Some(options.clone())).await?;
                client.status().await?;
                Ok::<_, etcd_client::Error>(client)
            }
            .await;
            match answered {
                Ok(client) => {
                    return Ok(Self {
                        client,
                        endpoints,
                        max_message: config.max_message_bytes,
                    })
                }
                Err(e) => {
                    tracing::debug!(endpoint, error = %e, "etcd endpoint does not answer; trying the next");
                    last_error = Some(e);
                }
            }
        }
        Err(unavailable(last_error.unwrap_or_else(|| {
            etcd_client::Error::InvalidArgs("no etcd endpoint configured".into())
        })))
    }

    /// Whether etcd answers: one small maintenance request, whatever the cluster's size.
    pub async fn ping(&self) -> Result<(), DatastoreError> {
        self.client
            .maintenance_client()
            .status()
            .await
            .map(drop)
            .map_err(|e| self.unavailable(e))
    }

    /// The raw etcd client (for tests and tools that inspect keys directly).
    pub fn etcd(&self) -> Client {
        self.client.clone()
    }

    fn unavailable(&self, source: etcd_client::Error) -> DatastoreError {
        DatastoreError::Unavailable {
            endpoints: self.endpoints.clone(),
            source,
        }
    }

    /// Stores a new object. Fails with `AlreadyExists` if one is stored under its name. Sets
    /// `uid`, `creationTimestamp` and `resourceVersion`.
    pub async fn create(&self, mut resource: Resource) -> Result<Resource, DatastoreError> {
        check(&resource)?;
        let meta = resource.metadata_mut();
        meta.resource_version = None;
        meta.uid = Some(uuid::Uuid::new_v4().to_string());
        meta.creation_timestamp = Some(now_rfc3339());
        let key = storage_key(&resource)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), encode(&resource)?, None)]);
        let response = self.run_txn(txn).await?;
        if !response.succeeded() {
            return Err(DatastoreError::AlreadyExists {
                kind: resource.kind(),
                name: display_name(&resource),
            });
        }
        let revision = response.header().map_or(0, |h| h.revision());
        resource.metadata_mut().resource_version = Some(revision.to_string());
        Ok(resource)
    }

    /// Replaces a stored object. With `metadata.resourceVersion` set, fails with `Conflict`
    /// unless that is still the stored version; without it, replaces whatever is stored. Keeps
    /// the stored `uid` and `creationTimestamp`.
    pub async fn update(&self, resource: Resource) -> Result<Resource, DatastoreError> {
        check(&resource)?;
        // A version that is no revision at all is a malformed request, not a stale one.
        if let Some(rv) = &resource.metadata().resource_version {
            if rv.parse::<i64>().map_or(true, |r| r <= 0) {
                return Err(DatastoreError::BadRequest {
                    kind: resource.kind(),
                    name: display_name(&resource),
                    message: format!("resourceVersion `{rv}` is not a revision number"),
                });
            }
        }
        let current = self.get_resource_like(&resource).await?;
        let stored = current
            .metadata()
            .resource_version
            .clone()
            .unwrap_or_default();
        let expected = match resource.metadata().resource_version.clone() {
            Some(rv) if rv != stored => {
                return Err(DatastoreError::Conflict {
                    kind: resource.kind(),
                    name: display_name(&resource),
                    expected: rv,
                    actual: stored,
                })
            }
            _ => stored,
        };
        self.replace_at(resource, current.metadata(), &expected)
            .await
    }

    /// Creates the object, or replaces what is stored whatever its version (retrying when a
    /// concurrent writer gets in between). Idempotent.
    pub async fn apply(&self, resource: Resource) -> Result<Resource, DatastoreError> {
        check(&resource)?;
        for _ in 0..APPLY_ATTEMPTS {
            let result = match self.get_resource_like(&resource).await {
                Err(DatastoreError::NotFound { .. }) => self.create(resource.clone()).await,
                Err(e) => return Err(e),
                Ok(current) => {
                    let stored = current
                        .metadata()
                        .resource_version
                        .clone()
                        .unwrap_or_default();
                    self.replace_at(resource.clone(), current.metadata(), &stored)
                        .await
                }
            };
            match result {
                Err(DatastoreError::AlreadyExists { .. } | DatastoreError::Conflict { .. }) => {
                    continue
                }
                other => return other,
            }
        }
        Err(DatastoreError::Conflict {
            kind: resource.kind(),
            name: display_name(&resource),
            expected: "any".to_owned(),
            actual: format!("still changing after {APPLY_ATTEMPTS} attempts"),
        })
    }

    /// Writes back an object this caller read and changed, if nothing changed it since (its
    /// `resourceVersion`, which it must carry): one request, where [`Datastore::update`] first
    /// reads what is stored. Its `uid` and `creationTimestamp` are taken as read. For
    /// read-modify-write loops (IPAM blocks and handles), which retry on `Conflict`.
    pub async fn write_back(&self, resource: Resource) -> Result<Resource, DatastoreError> {
        check(&resource)?;
        let expected = read_revision(&resource)?.to_string();
        let read = resource.metadata().clone();
        self.replace_at(resource, &read, &expected).await
    }

    /// Writes several objects in one transaction: all of them or none. Each [`Write`] carries
    /// its condition (absent, or unchanged since read); when any does not hold, nothing is
    /// written and the answer is `Conflict` (naming the first object). Returns the objects as
    /// written, in order. For objects that must change together, such as an IPAM block's
    /// allocation and the handle record that counts it.
    pub async fn write_all(&self, writes: Vec<Write>) -> Result<Vec<Resource>, DatastoreError> {
        let mut compares = Vec::with_capacity(writes.len());
        let mut puts = Vec::with_capacity(writes.len());
        let mut written = Vec::with_capacity(writes.len());
        for write in writes {
            let (mut resource, condition) = match write {
                Write::Create(r) => (r, None),
                Write::Back(r) => {
                    let revision = read_revision(&r)?;
                    (r, Some(revision))
                }
            };
            check(&resource)?;
            let key = storage_key(&resource)?;
            let meta = resource.metadata_mut();
            meta.resource_version = None;
            compares.push(match condition {
                None => {
                    meta.uid = Some(uuid::Uuid::new_v4().to_string());
                    meta.creation_timestamp = Some(now_rfc3339());
                    Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
                }
                Some(revision) => Compare::mod_revision(key.as_str(), CompareOp::Equal, revision),
            });
            puts.push(TxnOp::put(key.as_str(), encode(&resource)?, None));
            written.push(resource);
        }
        let response = self
            .run_txn(Txn::new().when(compares).and_then(puts))
            .await?;
        if !response.succeeded() {
            let first = written.first();
            return Err(DatastoreError::Conflict {
                kind: first.map_or(Kind::IPAMBlock, Resource::kind),
                name: first.map(display_name).unwrap_or_default(),
                expected: "each object absent or as read".to_owned(),
                actual: "one of them changed".to_owned(),
            });
        }
        let revision = response.header().map_or(0, |h| h.revision()).to_string();
        for resource in &mut written {
            resource.metadata_mut().resource_version = Some(revision.clone());
        }
        Ok(written)
    }

    /// Writes `resource` over what is stored (whose metadata is `current`) if the stored
    /// mod_revision is still `expected`.
    async fn replace_at(
        &self,
        mut resource: Resource,
        current: &ObjectMeta,
        expected: &str,
    ) -> Result<Resource, DatastoreError> {
        let meta = resource.metadata_mut();
        meta.uid = current.uid.clone();
        meta.creation_timestamp = current.creation_timestamp.clone();
        meta.resource_version = None;
        let key = storage_key(&resource)?;
        let expected_revision: i64 = expected.parse().map_err(|_| DatastoreError::BadRequest {
            kind: resource.kind(),
            name: display_name(&resource),
            message: format!("resourceVersion `{expected}` is not a revision number"),
        })?;
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.as_str(),
                CompareOp::Equal,
                expected_revision,
            )])
            .and_then([TxnOp::put(key.as_str(), encode(&resource)?, None)])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let response = self.run_txn(txn).await?;
        if !response.succeeded() {
            let actual =
                first_get(&response.op_responses()).map(|kv| kv.mod_revision().to_string());
            return Err(match actual {
                Some(actual) => DatastoreError::Conflict {
                    kind: resource.kind(),
                    name: display_name(&resource),
                    expected: expected.to_owned(),
                    actual,
                },
                None => DatastoreError::NotFound {
                    kind: resource.kind(),
                    name: display_name(&resource),
                },
            });
        }
        let revision = response.header().map_or(0, |h| h.revision());
        resource.metadata_mut().resource_version = Some(revision.to_string());
        Ok(resource)
    }

    /// Deletes an object; with `resource_version`, only if that is still the stored version.
    /// Returns what was stored.
    pub async fn delete(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        resource_version: Option<&str>,
    ) -> Result<Resource, DatastoreError> {
        let what = display(kind, namespace, name);
        let key = self.locate(kind, namespace, name).await?;
        let condition = match resource_version {
            Some(rv) => {
                let rev: i64 = rv.parse().map_err(|_| DatastoreError::BadRequest {
                    kind,
                    name: what.clone(),
                    message: format!("resourceVersion `{rv}` is not a revision number"),
                })?;
                Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)
            }
            None => Compare::create_revision(key.as_str(), CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([condition])
            .and_then([TxnOp::delete(
                key.as_str(),
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key.as_str(), None)]);
        let response = self.run_txn(txn).await?;
        let ops = response.op_responses();
        if !response.succeeded() {
            return Err(match first_get(&ops) {
                Some(kv) => DatastoreError::Conflict {
                    kind,
                    name: what,
                    expected: resource_version.unwrap_or_default().to_owned(),
                    actual: kv.mod_revision().to_string(),
                },
                None => DatastoreError::NotFound { kind, name: what },
            });
        }
        let deleted = ops.iter().find_map(|op| match op {
            TxnOpResponse::Delete(d) => d.prev_kvs().first().cloned(),
            _ => None,
        });
        match deleted.map(|kv| decode(&kv)) {
            Some(Ok(resource)) => Ok(resource),
            // The delete happened: say so, not that it failed.
            Some(Err(DatastoreError::Corrupt { key, message })) => {
                Err(DatastoreError::DeletedUnreadable { key, message })
            }
            Some(Err(e)) => Err(e),
            None => Err(DatastoreError::NotFound { kind, name: what }),
        }
    }

    /// Reads one object.
    pub async fn get(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Resource, DatastoreError> {
        // A block's key follows from its name nearly always: one read, not a listing of
        // every block's key (thousands in a large cluster, on every IPAM assignment).
        if let Some(cidr) = (kind == Kind::IPAMBlock)
            .then(|| crate::keys::block_cidr_guess(name))
            .flatten()
        {
            if let Some(kv) = self
                .read(&crate::keys::block_key(&cidr), None)
                .await?
                .0
                .first()
            {
                return decode(kv);
            }
        }
        let key = self.locate(kind, namespace, name).await?;
        let kvs = self.read(&key, None).await?.0;
        match kvs.first() {
            Some(kv) => decode(kv),
            None => Err(DatastoreError::NotFound {
                kind,
                name: display(kind, namespace, name),
            }),
        }
    }

    /// Reads every object of `kind` (in `namespace`, or in all namespaces when `None`), with
    /// the etcd revision the list was read at (watch from there to miss nothing).
    pub async fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
    ) -> Result<(Vec<Resource>, i64), DatastoreError> {
        let (each, revision) = self.list_each(kind, namespace).await?;
        Ok((each.into_iter().collect::<Result<Vec<_>, _>>()?, revision))
    }

    /// [`Datastore::list`], with a value that cannot be read returned as an error in its place
    /// rather than failing the whole list (what `calicoctl get` shows: every good object, and
    /// each bad key by name).
    pub async fn list_each(
        &self,
        kind: Kind,
        namespace: Option<&str>,
    ) -> Result<(Vec<Result<Resource, DatastoreError>>, i64), DatastoreError> {
        self.read_decoded(&prefix_for(kind, namespace), |k| k.kind == kind)
            .await
    }

    /// Reads every object under `prefix` (any kinds), with the revision it was read at. Values
    /// that cannot be read are returned as errors in place, so one bad key hides nothing else.
    pub async fn list_prefix(
        &self,
        prefix: &str,
    ) -> Result<(Vec<Result<Resource, DatastoreError>>, i64), DatastoreError> {
        self.read_decoded(prefix, |_| true).await
    }

    /// The objects under `prefix` whose keys `keep` accepts (keys outside the layout are
    /// skipped), each decoded or the error that says why it cannot be.
    async fn read_decoded(
        &self,
        prefix: &str,
        keep: impl Fn(&KeyInfo) -> bool,
    ) -> Result<(Vec<Result<Resource, DatastoreError>>, i64), DatastoreError> {
        let (kvs, revision) = self.read_prefix(prefix).await?;
        let resources = kvs
            .iter()
            .filter(|kv| parse_key(kv.key_str().unwrap_or_default()).is_some_and(|k| keep(&k)))
            .map(decode)
            .collect();
        Ok((resources, revision))
    }

    /// Every key under `prefix`, read in pages of [`PAGE_KEYS`] all at the revision of the
    /// first page (a consistent snapshot however large), and that revision.
    pub(crate) async fn read_prefix(
        &self,
        prefix: &str,
    ) -> Result<(Vec<KeyValue>, i64), DatastoreError> {
        let mut all = Vec::new();
        let revision = self
            .read_prefix_pages(prefix, |page| all.extend(page))
            .await?;
        Ok((all, revision))
    }

    /// [`Datastore::read_prefix`] a page at a time, each handed to `each_page` as it arrives
    /// (so a caller that decodes it need not hold a large cluster's raw bytes all at once);
    /// returns the revision every page was read at.
    pub(crate) async fn read_prefix_pages(
        &self,
        prefix: &str,
        mut each_page: impl FnMut(Vec<KeyValue>),
    ) -> Result<i64, DatastoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        // Large pages: etcd counts every key left in the range for each page, so 1,000-key
        // pages cost a 150,000-object listing 3 s where 5,000-key pages cost 0.8 s. A page of
        // large objects that overflows the message limit is asked for again at half the size.
        let mut page_keys = PAGE_KEYS;
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(page_keys + 1);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let (mut page, read_at) = match self.read_bytes(&from, Some(options)).await {
                Ok(read) => read,
                Err(DatastoreError::TooLarge { .. }) if page_keys > 1 => {
                    page_keys /= 2;
                    tracing::debug!(
                        page_keys,
                        "page over the message limit; asking for fewer keys"
                    );
                    continue;
                }
                Err(e) => return Err(e),
            };
            if revision == 0 {
                revision = read_at;
            }
            // One key more than a page says whether another page follows; it starts it.
            let more = page.len() as i64 > page_keys;
            if more {
                let next = page.pop().expect("more than a page");
                from = next.key().to_vec();
            }
            each_page(page);
            if !more {
                return Ok(revision);
            }
        }
    }

    /// One key as stored (with retries on transport errors).
    pub(crate) async fn read_raw(&self, key: &str) -> Result<(Vec<KeyValue>, i64), DatastoreError> {
        self.read(key, None).await
    }

    /// One transaction.
    pub(crate) async fn run_txn(
        &self,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse, DatastoreError> {
        // A delete returns the object it removed: a large one must not fail the answer after
        // the delete happened.
        self.client
            .kv_client()
            .max_decoding_message_size(self.max_message)
            .txn(txn)
            .await
            .map_err(|e| self.unavailable(e))
    }

    /// A get with retries on transport errors.
    async fn read(
        &self,
        key: &str,
        options: Option<GetOptions>,
    ) -> Result<(Vec<KeyValue>, i64), DatastoreError> {
        self.read_bytes(key.as_bytes(), options).await
    }

    async fn read_bytes(
        &self,
        key: &[u8],
        options: Option<GetOptions>,
    ) -> Result<(Vec<KeyValue>, i64), DatastoreError> {
        let mut backoff = Backoff::new(FIRST_BACKOFF, FIRST_BACKOFF * 8);
        let mut attempt = 1;
        loop {
            let mut kv = self
                .client
                .kv_client()
                .max_decoding_message_size(self.max_message);
            match kv.get(key, options.clone()).await {
                Ok(mut response) => {
                    let revision = response.header().map_or(0, |h| h.revision());
                    return Ok((response.take_kvs(), revision));
                }
                // Not transient: a listing asks for less (see `read_prefix_pages`).
                Err(e) if too_large(&e) => {
                    return Err(DatastoreError::TooLarge {
                        key: String::from_utf8_lossy(key).into_owned(),
                        limit: self.max_message,
                    })
                }
                Err(e) if attempt < READ_ATTEMPTS => {
                    let key = String::from_utf8_lossy(key);
                    tracing::warn!(%key, attempt, error = %e, "etcd read failed; retrying");
                    backoff.wait().await;
                    attempt += 1;
                }
                Err(e) => return Err(self.unavailable(e)),
            }
        }
    }

    /// The CIDR of every IPAM block, read as keys alone (a block's value is kilobytes, its
    /// key tens of bytes): what finding a block nobody has claimed needs.
    pub async fn block_cidrs(&self) -> Result<Vec<ipnet::IpNet>, DatastoreError> {
        let (kvs, _) = self
            .read(
                &prefix_for(Kind::IPAMBlock, None),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| kv.key_str().ok())
            .filter_map(crate::keys::block_cidr_of_key)
            .collect())
    }

    /// The key of a named object; IPAM blocks and affinities are found by listing.
    async fn locate(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<String, DatastoreError> {
        if kind.is_namespaced() && namespace.is_none() {
            return Err(DatastoreError::BadRequest {
                kind,
                name: name.to_owned(),
                message: "a namespace is required for this kind".to_owned(),
            });
        }
        if let Some(key) = key_for_name(kind, namespace, name) {
            return Ok(key);
        }
        let prefix = prefix_for(kind, None);
        let (kvs, _) = self
            .read(
                &prefix,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        kvs.iter()
            .filter_map(|kv| kv.key_str().ok())
            .find(|key| parse_key(key).is_some_and(|k| k.kind == kind && k.name == name))
            .map(str::to_owned)
            .ok_or_else(|| DatastoreError::NotFound {
                kind,
                name: name.to_owned(),
            })
    }

    async fn get_resource_like(&self, resource: &Resource) -> Result<Resource, DatastoreError> {
        let key = storage_key(resource)?;
        let kvs = self.read(&key, None).await?.0;
        match kvs.first() {
            Some(kv) => decode(kv),
            None => Err(DatastoreError::NotFound {
                kind: resource.kind(),
                name: display_name(resource),
            }),
        }
    }
}

pub(crate) fn check(resource: &Resource) -> Result<(), DatastoreError> {
    validate(resource).map_err(|errors| DatastoreError::Invalid {
        kind: resource.kind(),
        name: display_name(resource),
        errors,
    })
}

pub(crate) fn storage_key(resource: &Resource) -> Result<String, DatastoreError> {
    key_for(resource).map_err(|message| DatastoreError::BadRequest {
        kind: resource.kind(),
        name: display_name(resource),
        message,
    })
}

fn is_ipam(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::IPAMBlock | Kind::BlockAffinity | Kind::IPAMHandle | Kind::IPAMConfig
    )
}

/// The revision `resource` was read at (its `resourceVersion`), which writing it back needs.
fn read_revision(resource: &Resource) -> Result<i64, DatastoreError> {
    let bad = |message: String| DatastoreError::BadRequest {
        kind: resource.kind(),
        name: display_name(resource),
        message,
    };
    let rv = resource
        .metadata()
        .resource_version
        .as_deref()
        .ok_or_else(|| bad("a write back needs the resourceVersion it was read at".to_owned()))?;
    rv.parse()
        .map_err(|_| bad(format!("resourceVersion `{rv}` is not a revision number")))
}

/// The stored form: v3 objects as upstream stores them (without resourceVersion, which is the
/// key's revision); IPAM objects as their spec, the shape of upstream's `/calico/ipam/v2/`
/// values.
pub fn encode(resource: &Resource) -> Result<Vec<u8>, DatastoreError> {
    let result = if is_ipam(resource.kind()) {
        serde_json::to_vec(&resource.spec_json())
    } else {
        serde_json::to_vec(resource)
    };
    result.map_err(|e| DatastoreError::BadRequest {
        kind: resource.kind(),
        name: display_name(resource),
        message: format!("cannot encode: {e}"),
    })
}

/// Reads a stored value back into a resource, with `resourceVersion` set to its revision.
/// Whether etcd's answer was over the client's message limit.
fn too_large(e: &etcd_client::Error) -> bool {
    e.to_string().contains("message length too large")
}

pub(crate) fn decode(kv: &KeyValue) -> Result<Resource, DatastoreError> {
    decode_value(
        kv.key_str().unwrap_or("<non-UTF-8 key>"),
        kv.value(),
        kv.mod_revision(),
    )
}

/// A stored value at `key`, last changed at `mod_revision`.
pub(crate) fn decode_value(
    key: &str,
    value: &[u8],
    mod_revision: i64,
) -> Result<Resource, DatastoreError> {
    let key = key.to_owned();
    let corrupt = |message: String| DatastoreError::Corrupt {
        key: key.clone(),
        message,
    };
    let info = parse_key(&key).ok_or_else(|| corrupt("not a Calico key".to_owned()))?;
    let mut resource = if is_ipam(info.kind) {
        let spec: serde_json::Value =
            serde_json::from_slice(value).map_err(|e| corrupt(format!("not JSON: {e}")))?;
        let value = serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": info.kind.as_str(),
            "metadata": { "name": info.name },
            "spec": spec,
        });
        Resource::deserialize_as(info.kind, value)
            .map_err(|e| corrupt(format!("{}: {}", e.path(), e.inner())))?
    } else {
        // Straight from the bytes: no intermediate JSON tree (most of a snapshot's decoding).
        let mut json = serde_json::Deserializer::from_slice(value);
        let resource = Resource::deserialize_as(info.kind, &mut json).map_err(|e| {
            if e.inner().is_syntax() || e.inner().is_eof() {
                corrupt(format!("not JSON: {}", e.inner()))
            } else {
                corrupt(format!("{}: {}", e.path(), e.inner()))
            }
        })?;
        json.end().map_err(|e| corrupt(format!("not JSON: {e}")))?;
        resource
    };
    resource.metadata_mut().resource_version = Some(mod_revision.to_string());
    Ok(resource)
}

fn first_get(ops: &[TxnOpResponse]) -> Option<KeyValue> {
    ops.iter().find_map(|op| match op {
        TxnOpResponse::Get(g) => g.kvs().first().cloned(),
        _ => None,
    })
}

fn display(kind: Kind, namespace: Option<&str>, name: &str) -> String {
    match namespace.filter(|_| kind.is_namespaced()) {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    }
}

pub(crate) fn display_name(resource: &Resource) -> String {
    display(resource.kind(), resource.namespace(), resource.name())
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

fn tls_options(config: &EtcdConfig) -> Result<TlsOptions, DatastoreError> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| DatastoreError::Config(format!("{what} {}: {e}", path.display())))
    };
    let mut tls = TlsOptions::new();
    if let Some(ca) = &config.ca_cert_file {
        tls = tls.ca_certificate(Certificate::from_pem(read("ETCD_CA_CERT_FILE", ca)?));
    }
    if let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) {
        tls = tls.identity(Identity::from_pem(
            read("ETCD_CERT_FILE", cert)?,
            read("ETCD_KEY_FILE", key)?,
        ));
    }
    Ok(tls)
}

/// The first key after every key that starts with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff (or empty): to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod page_tests {
    use super::prefix_end;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/calico/"), b"/calico0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), [0]);
    }
}
