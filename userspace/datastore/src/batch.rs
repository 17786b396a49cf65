//! Writing a file's worth of objects as one: every precondition (and duplicate names) is
//! checked first and nothing is written unless all hold; then all go in one etcd transaction,
//! or, beyond etcd's per-transaction limit, in several that are undone in reverse if a later
//! one finds that something changed meanwhile. `calicoctl create/apply/replace -f` use it, so a
//! file goes in whole or not at all.

use std::collections::BTreeMap;

use calico_model::Resource;
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use crate::{
    etcd::{check, display_name, encode, now_rfc3339, storage_key},
    Datastore, DatastoreError,
};

/// What a batch does to each of its objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchWrite {
    /// Fails for an object that exists (unless skipped).
    Create,
    /// Creates or replaces.
    Apply,
    /// Fails for an object that does not exist, or whose given resourceVersion is stale.
    Replace,
}

/// One object of a batch that cannot be written, by its position in the batch.
#[derive(Debug)]
pub struct BatchFailure {
    pub index: usize,
    pub error: DatastoreError,
}

/// etcd refuses transactions of more than 128 operations by default; stay below.
const OPS_PER_TXN: usize = 100;
/// A batch whose objects keep changing under it is retried this many times.
const BATCH_ATTEMPTS: usize = 4;

/// One planned write: its compare, its write, and how to undo it.
struct Planned {
    key: String,
    compare: Compare,
    value: Vec<u8>,
    /// The value before (for undo); `None` when the key did not exist.
    before: Option<Vec<u8>>,
}

impl Datastore {
    /// Writes `resources` all or nothing. With `skip_existing`, a `Create` of an object that
    /// exists is left out instead of failing. Returns how many objects were written; on
    /// failure, every object that cannot be written, and nothing has been written.
    pub async fn write_batch(
        &self,
        how: BatchWrite,
        resources: &[Resource],
        skip_existing: bool,
    ) -> Result<usize, Vec<BatchFailure>> {
        for _ in 0..BATCH_ATTEMPTS {
            let planned = self.plan(how, resources, skip_existing).await?;
            match self.commit(&planned).await {
                Ok(true) => return Ok(planned.len()),
                // Something changed between planning and writing: plan again.
                Ok(false) => continue,
                Err(error) => return Err(vec![BatchFailure { index: 0, error }]),
            }
        }
        Err(vec![BatchFailure {
            index: 0,
            error: DatastoreError::Conflict {
                kind: resources
                    .first()
                    .map_or(calico_model::Kind::Profile, Resource::kind),
                name: "the batch".to_owned(),
                expected: "a quiet moment".to_owned(),
                actual: format!("objects still changing after {BATCH_ATTEMPTS} attempts"),
            },
        }])
    }

    /// Every object's write, with every precondition checked against what is stored now.
    async fn plan(
        &self,
        how: BatchWrite,
        resources: &[Resource],
        skip_existing: bool,
    ) -> Result<Vec<Planned>, Vec<BatchFailure>> {
        let mut failures = Vec::new();
        let mut planned = Vec::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (index, resource) in resources.iter().enumerate() {
            match self
                .plan_one(how, resource, skip_existing, index, &mut seen)
                .await
            {
                Ok(Some(p)) => planned.push(p),
                Ok(None) => {}
                Err(error) => failures.push(BatchFailure { index, error }),
            }
        }
        if failures.is_empty() {
            Ok(planned)
        } else {
            Err(failures)
        }
    }

    async fn plan_one(
        &self,
        how: BatchWrite,
        resource: &Resource,
        skip_existing: bool,
        index: usize,
        seen: &mut BTreeMap<String, usize>,
    ) -> Result<Option<Planned>, DatastoreError> {
        check(resource)?;
        let key = storage_key(resource)?;
        if let Some(first) = seen.insert(key.clone(), index) {
            return Err(DatastoreError::BadRequest {
                kind: resource.kind(),
                name: display_name(resource),
                message: format!(
                    "appears twice in one batch (documents {} and {}): which one is meant?",
                    first + 1,
                    index + 1
                ),
            });
        }
        let current = self.raw_get(&key).await?;
        let mut resource = resource.clone();
        let given_version = resource.metadata().resource_version.clone();
        let meta = resource.metadata_mut();
        meta.resource_version = None;
        let compare = match (&current, how) {
            (Some(_), BatchWrite::Create) if skip_existing => return Ok(None),
            (Some(_), BatchWrite::Create) => {
                return Err(DatastoreError::AlreadyExists {
                    kind: resource.kind(),
                    name: display_name(&resource),
                })
            }
            (None, BatchWrite::Replace) => {
                return Err(DatastoreError::NotFound {
                    kind: resource.kind(),
                    name: display_name(&resource),
                })
            }
            (None, _) => {
                meta.uid = Some(uuid::Uuid::new_v4().to_string());
                meta.creation_timestamp = Some(now_rfc3339());
                Compare::create_revision(key.as_str(), CompareOp::Equal, 0)
            }
            (Some((stored, revision)), _) => {
                if let (BatchWrite::Replace, Some(given)) = (how, &given_version) {
                    if given != &revision.to_string() {
                        return Err(DatastoreError::Conflict {
                            kind: resource.kind(),
                            name: display_name(&resource),
                            expected: given.clone(),
                            actual: revision.to_string(),
                        });
                    }
                }
                let before = crate::etcd::decode_value(&key, stored, *revision)?;
                let kept = before.metadata();
                meta.uid = kept.uid.clone();
                meta.creation_timestamp = kept.creation_timestamp.clone();
                Compare::mod_revision(key.as_str(), CompareOp::Equal, *revision)
            }
        };
        Ok(Some(Planned {
            value: encode(&resource)?,
            before: current.map(|(v, _)| v),
            key,
            compare,
        }))
    }

    /// The stored value and mod_revision at `key`.
    async fn raw_get(&self, key: &str) -> Result<Option<(Vec<u8>, i64)>, DatastoreError> {
        let (kvs, _) = self.read_raw(key).await?;
        Ok(kvs
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())))
    }

    /// Writes the plan; `false` when a compare failed (nothing of that transaction written,
    /// earlier ones undone).
    async fn commit(&self, planned: &[Planned]) -> Result<bool, DatastoreError> {
        let mut committed: Vec<&[Planned]> = Vec::new();
        for chunk in planned.chunks(OPS_PER_TXN) {
            let txn = Txn::new()
                .when(chunk.iter().map(|p| p.compare.clone()).collect::<Vec<_>>())
                .and_then(
                    chunk
                        .iter()
                        .map(|p| TxnOp::put(p.key.as_str(), p.value.clone(), None))
                        .collect::<Vec<_>>(),
                );
            let succeeded = self.run_txn(txn).await?.succeeded();
            if !succeeded {
                for done in committed.iter().rev() {
                    self.undo(done).await;
                }
                return Ok(false);
            }
            committed.push(chunk);
        }
        Ok(true)
    }

    /// Puts back what a committed chunk replaced (best effort: it runs only when a later chunk
    /// found its objects changed, and reports what it could not undo).
    async fn undo(&self, chunk: &[Planned]) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|p| match &p.before {
                Some(value) => TxnOp::put(p.key.as_str(), value.clone(), None),
                None => TxnOp::delete(p.key.as_str(), None),
            })
            .collect();
        if let Err(e) = self.run_txn(Txn::new().and_then(ops)).await {
            tracing::error!(error = %e, "undoing part of a batch failed");
        }
    }
}
