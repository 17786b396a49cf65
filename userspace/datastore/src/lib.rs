//! The datastore: Calico's resources in etcd v3, under upstream's key layout.
//!
//! * `/calico/resources/v3/projectcalico.org/<plural>/<namespace>/<name>` for namespaced kinds,
//!   `/calico/resources/v3/projectcalico.org/<plural>/<name>` for cluster-wide ones;
//! * IPAM under `/calico/ipam/v2/` (blocks, affinities, handles, config).
//!
//! Every write is a transaction that compares revisions, so concurrent writers never lose an
//! update: `create` fails if the key exists, `update` fails unless the caller's
//! `resourceVersion` (the key's etcd mod_revision) is still current. [`Watch`] delivers changes
//! in order from a revision and, when etcd has compacted that revision away, resyncs with a full
//! snapshot instead of missing events.

mod backoff;
mod batch;
mod config;
mod error;
mod etcd;
pub mod keys;
mod watch;

pub use backoff::Backoff;
pub use batch::{BatchFailure, BatchWrite};
pub use config::EtcdConfig;
pub use error::DatastoreError;
pub use etcd::{encode, Datastore, Write};
pub use watch::{SnapshotObjects, Watch, WatchEvent};
