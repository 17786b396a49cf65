//! Writing to the datastore as a controller: only what differs from what is stored, retried
//! while etcd is unavailable, each outcome counted.

use std::time::Duration;

use calico_datastore::{Backoff, Datastore, DatastoreError};
use calico_model::{Kind, Resource};

use crate::metrics::Metrics;

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Updated,
    Deleted,
    Unchanged,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Created => "create",
            Outcome::Updated => "update",
            Outcome::Deleted => "delete",
            Outcome::Unchanged => "unchanged",
        }
    }
}

const ATTEMPTS: usize = 10;

/// Whether `stored` already says what `desired` says (spec and labels: what the controllers
/// own; uid, versions and timestamps are the datastore's).
pub fn same(stored: &Resource, desired: &Resource) -> bool {
    stored.spec_json() == desired.spec_json()
        && stored.metadata().labels == desired.metadata().labels
}

/// Makes the stored object say what `desired` says: creates it, or updates it at the version
/// read (retrying when someone else wrote in between); writes nothing when it already does.
pub async fn ensure(store: &Datastore, desired: &Resource) -> Result<Outcome, DatastoreError> {
    let (kind, namespace, name) = (desired.kind(), desired.namespace(), desired.name());
    for _ in 0..ATTEMPTS {
        match store.get(kind, namespace, name).await {
            Err(DatastoreError::NotFound { .. }) => match store.create(desired.clone()).await {
                Ok(_) => return Ok(Outcome::Created),
                Err(DatastoreError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e),
            },
            Ok(stored) if same(&stored, desired) => return Ok(Outcome::Unchanged),
            Ok(stored) => {
                let mut next = desired.clone();
                next.metadata_mut().resource_version = stored.metadata().resource_version.clone();
                // Annotations are others' (the CNI plugin records its network and container).
                next.metadata_mut().annotations = stored.metadata().annotations.clone();
                match store.update(next).await {
                    Ok(_) => return Ok(Outcome::Updated),
                    Err(DatastoreError::Conflict { .. } | DatastoreError::NotFound { .. }) => {
                        continue
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Err(DatastoreError::Conflict {
        kind,
        name: name.to_owned(),
        expected: "any".to_owned(),
        actual: format!("still changing after {ATTEMPTS} attempts"),
    })
}

/// Deletes an object; one already gone is not an error.
pub async fn remove(
    store: &Datastore,
    kind: Kind,
    namespace: Option<&str>,
    name: &str,
) -> Result<Outcome, DatastoreError> {
    match store.delete(kind, namespace, name, None).await {
        Ok(_) | Err(DatastoreError::DeletedUnreadable { .. }) => Ok(Outcome::Deleted),
        Err(DatastoreError::NotFound { .. }) => Ok(Outcome::Unchanged),
        Err(e) => Err(e),
    }
}

/// Runs `write` until it succeeds or fails for a reason retrying cannot fix; waits with backoff
/// while etcd is unavailable (the controller's events queue up meanwhile). Logs and counts.
pub async fn retrying<F, Fut>(
    controller: &'static str,
    what: &str,
    metrics: &Metrics,
    mut write: F,
) -> Option<Outcome>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, DatastoreError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match write().await {
            Ok(outcome) => {
                if outcome != Outcome::Unchanged {
                    tracing::info!(controller, what, op = outcome.as_str(), "datastore written");
                }
                metrics.write(controller, outcome);
                return Some(outcome);
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(controller, what, error = %e, "datastore unavailable; retrying");
                metrics.error(controller);
                backoff.wait().await;
            }
            Err(e) => {
                tracing::error!(controller, what, error = %e, "datastore refused the write");
                metrics.error(controller);
                return None;
            }
        }
    }
}
