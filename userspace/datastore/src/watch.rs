//! Watching the datastore from a revision, in order, across etcd restarts and compactions.

use std::time::Duration;

use calico_model::{Kind, Resource};
use etcd_client::{EventType, WatchOptions};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::{etcd::decode, keys::parse_key, Backoff, Datastore, DatastoreError};

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One change seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// The whole state under the watched prefix at `revision`: sent first when the watch starts
    /// without a revision, and again whenever etcd compacted the revision the watch needed
    /// (replace everything you knew with this).
    Snapshot {
        resources: SnapshotObjects,
        revision: i64,
    },
    /// An object was created or changed.
    Put {
        resource: Box<Resource>,
        revision: i64,
    },
    /// An object was deleted.
    Deleted {
        kind: Kind,
        namespace: Option<String>,
        name: String,
        revision: i64,
    },
    /// A stored value under the prefix cannot be read; the watch goes on.
    Unreadable { error: String, revision: i64 },
}

/// The objects of a snapshot, kept as stored and decoded one at a time as they are taken: a
/// large cluster's objects (150,000 endpoints: 56 MB as stored) never all exist parsed at once
/// (several times that), so the agent's peak and resident size stay near what it keeps.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SnapshotObjects(Vec<Stored>);

#[derive(Debug, Clone, PartialEq)]
struct Stored {
    key: String,
    value: Vec<u8>,
    mod_revision: i64,
}

impl SnapshotObjects {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each object's identity, from its key (nothing decoded).
    pub fn keys(&self) -> impl Iterator<Item = (Kind, Option<String>, String)> + '_ {
        self.0.iter().filter_map(|s| {
            let info = parse_key(&s.key)?;
            Some((info.kind, info.namespace, info.name))
        })
    }

    /// Every readable object, decoded now (for callers that want them all at hand).
    pub fn decode_all(self) -> Vec<Resource> {
        self.into_iter().collect()
    }
}

/// Decodes as it goes; a value that cannot be read is logged and left out.
impl IntoIterator for SnapshotObjects {
    type Item = Resource;
    type IntoIter = Box<dyn Iterator<Item = Resource> + Send>;

    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.0.into_iter().filter_map(|s| {
            match crate::etcd::decode_value(&s.key, &s.value, s.mod_revision) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::error!(error = %e, "unreadable value left out of the snapshot");
                    None
                }
            }
        }))
    }
}

impl WatchEvent {
    pub fn revision(&self) -> i64 {
        match self {
            WatchEvent::Snapshot { revision, .. }
            | WatchEvent::Put { revision, .. }
            | WatchEvent::Deleted { revision, .. }
            | WatchEvent::Unreadable { revision, .. } => *revision,
        }
    }
}

/// A running watch. Events arrive in revision order; dropping it stops the watch.
pub struct Watch {
    events: mpsc::Receiver<WatchEvent>,
    task: JoinHandle<()>,
    live: watch::Receiver<bool>,
}

impl Watch {
    /// The next event; `None` only after the watch task ended.
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.events.recv().await
    }

    /// Whether the watch is established and its connection answering: true from etcd's
    /// "created" until the stream fails, ends, or stops answering HTTP/2 keepalive pings
    /// (a stalled etcd); false while it reconnects. Costs no request of its own.
    pub fn live(&self) -> watch::Receiver<bool> {
        self.live.clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Datastore {
    /// Watches every Calico object under `prefix` (e.g. [`crate::keys::RESOURCES_PREFIX`]).
    /// With `after_revision`, delivers the changes made after that revision; without, starts
    /// with a [`WatchEvent::Snapshot`]. Reconnects with backoff when etcd goes away, resuming
    /// where it left off; resyncs with a snapshot when that revision has been compacted.
    pub fn watch(&self, prefix: impl Into<String>, after_revision: Option<i64>) -> Watch {
        let (tx, events) = mpsc::channel(1024);
        let (live_tx, live) = watch::channel(false);
        let store = self.clone();
        let prefix = prefix.into();
        let task = tokio::spawn(async move {
            if let Err(Closed) = run(store, prefix, after_revision, tx, live_tx).await {
                tracing::debug!("watch receiver dropped; watch ends");
            }
        });
        Watch { events, task, live }
    }
}

struct Closed;

async fn send(tx: &mpsc::Sender<WatchEvent>, event: WatchEvent) -> Result<(), Closed> {
    tx.send(event).await.map_err(|_| Closed)
}

async fn run(
    store: Datastore,
    prefix: String,
    after_revision: Option<i64>,
    tx: mpsc::Sender<WatchEvent>,
    live: watch::Sender<bool>,
) -> Result<(), Closed> {
    let mut backoff = Backoff::new(FIRST_BACKOFF, MAX_BACKOFF);
    // The first revision not yet delivered.
    let mut next = match after_revision {
        Some(rev) => rev + 1,
        None => snapshot(&store, &prefix, &tx, &mut backoff).await? + 1,
    };
    loop {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next)
            .with_prev_key();
        let mut client = store
            .etcd()
            .watch_client()
            .max_decoding_message_size(store.max_message);
        let (_watcher, mut stream) = match client.watch(prefix.as_str(), Some(options)).await {
            Ok(pair) => pair,
            Err(e) => {
                live.send_replace(false);
                tracing::warn!(error = %e, "etcd watch failed to start; retrying");
                backoff.wait().await;
                continue;
            }
        };
        live.send_replace(true);
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    if response.compact_revision() > 0 {
                        tracing::warn!(
                            wanted = next,
                            compacted = response.compact_revision(),
                            "watch revision compacted; resyncing"
                        );
                        next = snapshot(&store, &prefix, &tx, &mut backoff).await? + 1;
                        break;
                    }
                    if response.canceled() {
                        tracing::warn!(reason = response.cancel_reason(), "watch canceled");
                        break;
                    }
                    backoff.reset();
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let revision = kv.mod_revision();
                        next = revision + 1;
                        // Keys under the prefix outside Calico's layout are not objects.
                        let Some(info) = parse_key(kv.key_str().unwrap_or_default()) else {
                            continue;
                        };
                        let delivered = match event.event_type() {
                            EventType::Put => match decode(kv) {
                                Ok(resource) => WatchEvent::Put {
                                    resource: Box::new(resource),
                                    revision,
                                },
                                Err(e) => WatchEvent::Unreadable {
                                    error: e.to_string(),
                                    revision,
                                },
                            },
                            EventType::Delete => WatchEvent::Deleted {
                                kind: info.kind,
                                namespace: info.namespace,
                                name: info.name,
                                revision,
                            },
                        };
                        send(&tx, delivered).await?;
                    }
                }
                Ok(None) => {
                    tracing::warn!("etcd watch stream ended; reconnecting");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "etcd watch stream failed; reconnecting");
                    break;
                }
            }
        }
        live.send_replace(false);
        backoff.wait().await;
    }
}

/// Lists the prefix (retrying until etcd answers) and sends the snapshot; returns its revision.
async fn snapshot(
    store: &Datastore,
    prefix: &str,
    tx: &mpsc::Sender<WatchEvent>,
    backoff: &mut Backoff,
) -> Result<i64, Closed> {
    loop {
        match list(store, prefix).await {
            Ok((resources, revision)) => {
                send(
                    tx,
                    WatchEvent::Snapshot {
                        resources,
                        revision,
                    },
                )
                .await?;
                return Ok(revision);
            }
            Err(e) => {
                tracing::warn!(error = %e, "listing for a resync failed; retrying");
                backoff.wait().await;
            }
        }
    }
}

async fn list(store: &Datastore, prefix: &str) -> Result<(SnapshotObjects, i64), DatastoreError> {
    // Paged, at one revision: a large cluster's snapshot is many messages, one consistent view.
    let mut objects = Vec::new();
    let (started, mut pages) = (std::time::Instant::now(), 0);
    let revision = store
        .read_prefix_pages(prefix, |page| {
            pages += 1;
            objects.extend(page.into_iter().filter_map(|kv| {
                // Keys under the prefix outside Calico's layout are not objects.
                let key = kv
                    .key_str()
                    .ok()
                    .filter(|k| parse_key(k).is_some())?
                    .to_owned();
                let mod_revision = kv.mod_revision();
                let (_, value) = kv.into_key_value();
                Some(Stored {
                    key,
                    value,
                    mod_revision,
                })
            }));
        })
        .await?;
    tracing::debug!(
        prefix,
        pages,
        objects = objects.len(),
        total_ms = started.elapsed().as_millis() as u64,
        "listed"
    );
    Ok((SnapshotObjects(objects), revision))
}
