//! The datastore against a real etcd: CRUD with Calico's semantics and key layout, racing
//! compare-and-swap writers, and watches that survive restarts and compaction.

use std::{collections::BTreeMap, time::Duration};

use calico_datastore::{keys, Datastore, DatastoreError, EtcdConfig, WatchEvent};
use calico_model::{parse_documents, Kind, Resource};
use harness::{require, Etcd, Requirement};

fn doc(text: &str) -> Resource {
    let mut resources = parse_documents(text).expect("test document parses");
    assert_eq!(resources.len(), 1);
    resources.remove(0)
}

fn policy(namespace: &str, name: &str, selector: &str) -> Resource {
    doc(&format!(
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  selector: \"{selector}\"\n  ingress:\n    - action: Allow\n"
    ))
}

fn pool(name: &str, cidr: &str) -> Resource {
    doc(&format!(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n"
    ))
}

async fn connect(etcd: &Etcd) -> anyhow::Result<Datastore> {
    Ok(Datastore::connect(&EtcdConfig::with_endpoints([etcd.endpoint()])).await?)
}

fn rv(r: &Resource) -> String {
    r.metadata()
        .resource_version
        .clone()
        .expect("stored objects carry a resourceVersion")
}

#[tokio::test]
async fn crud_follows_calico_semantics() -> anyhow::Result<()> {
    if !require("crud_follows_calico_semantics", &[Requirement::Etcd]) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let store = connect(&etcd).await?;

    let created = store
        .create(policy("prod", "allow-web", "app == 'web'"))
        .await?;
    let meta = created.metadata();
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    let first_rv = rv(&created);

    // Create of an existing name fails and changes nothing.
    let again = store
        .create(policy("prod", "allow-web", "app == 'other'"))
        .await;
    assert!(
        matches!(again, Err(DatastoreError::AlreadyExists { .. })),
        "{again:?}"
    );
    let got = store
        .get(Kind::NetworkPolicy, Some("prod"), "allow-web")
        .await?;
    assert_eq!(got, created);

    // Update with the current resourceVersion succeeds and moves the version on.
    let mut changed = got.clone();
    if let Resource::NetworkPolicy(p) = &mut changed {
        p.spec.selector = Some("app == 'web2'".into());
    }
    let updated = store.update(changed.clone()).await?;
    assert_ne!(rv(&updated), first_rv);
    assert_eq!(
        updated.metadata().uid,
        created.metadata().uid,
        "uid must survive updates"
    );

    // A resourceVersion that is no revision is a malformed request, not a stale one.
    let mut garbled = changed.clone();
    garbled.metadata_mut().resource_version = Some("not-a-revision".into());
    let malformed = store.update(garbled).await;
    assert!(
        matches!(&malformed, Err(DatastoreError::BadRequest { message, .. }) if message.contains("not a revision")),
        "{malformed:?}"
    );

    // Update with the stale version is a conflict and leaves the stored object alone.
    let stale = store.update(changed).await;
    assert!(
        matches!(stale, Err(DatastoreError::Conflict { .. })),
        "{stale:?}"
    );
    assert_eq!(
        store
            .get(Kind::NetworkPolicy, Some("prod"), "allow-web")
            .await?,
        updated
    );

    // Apply is idempotent: same content twice, one object, uid kept.
    let applied = store
        .apply(policy("prod", "allow-web", "app == 'web3'"))
        .await?;
    let applied_again = store
        .apply(policy("prod", "allow-web", "app == 'web3'"))
        .await?;
    assert_eq!(applied_again.metadata().uid, created.metadata().uid);
    assert_eq!(applied.spec_json(), applied_again.spec_json());
    store.apply(policy("dev", "allow-web", "all()")).await?;

    // List one namespace or all.
    let (prod, _) = store.list(Kind::NetworkPolicy, Some("prod")).await?;
    let (all, revision) = store.list(Kind::NetworkPolicy, None).await?;
    assert_eq!(prod.len(), 1);
    assert_eq!(all.len(), 2);
    assert!(revision > 0);

    // Invalid objects never reach etcd.
    let bad = store.create(pool("bad", "10.0.0.0/33")).await;
    assert!(
        matches!(bad, Err(DatastoreError::Invalid { .. })),
        "{bad:?}"
    );
    assert!(store.list(Kind::IPPool, None).await?.0.is_empty());

    // Delete with a stale version fails; without one it succeeds; twice is NotFound.
    let stale_delete = store
        .delete(
            Kind::NetworkPolicy,
            Some("prod"),
            "allow-web",
            Some(&first_rv),
        )
        .await;
    assert!(
        matches!(stale_delete, Err(DatastoreError::Conflict { .. })),
        "{stale_delete:?}"
    );
    let deleted = store
        .delete(Kind::NetworkPolicy, Some("prod"), "allow-web", None)
        .await?;
    assert_eq!(deleted.name(), "allow-web");
    let gone = store
        .get(Kind::NetworkPolicy, Some("prod"), "allow-web")
        .await;
    assert!(
        matches!(gone, Err(DatastoreError::NotFound { .. })),
        "{gone:?}"
    );
    let twice = store
        .delete(Kind::NetworkPolicy, Some("prod"), "allow-web", None)
        .await;
    assert!(
        matches!(twice, Err(DatastoreError::NotFound { .. })),
        "{twice:?}"
    );
    Ok(())
}

#[tokio::test]
async fn keys_sit_where_upstream_puts_them() -> anyhow::Result<()> {
    if !require("keys_sit_where_upstream_puts_them", &[Requirement::Etcd]) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let store = connect(&etcd).await?;
    store.create(policy("prod", "allow-web", "all()")).await?;
    store
        .create(pool("default-ipv4-ippool", "10.244.0.0/16"))
        .await?;
    store
        .create(doc("apiVersion: projectcalico.org/v3\nkind: IPAMBlock\nmetadata: {name: 10-244-0-0-26}\nspec: {cidr: 10.244.0.0/26, affinity: 'host:node1', allocations: [null], unallocated: [0], attributes: []}\n"))
        .await?;
    store
        .create(doc("apiVersion: projectcalico.org/v3\nkind: BlockAffinity\nmetadata: {name: node1-10-244-0-0-26}\nspec: {state: confirmed, node: node1, cidr: 10.244.0.0/26}\n"))
        .await?;
    store
        .create(doc("apiVersion: projectcalico.org/v3\nkind: IPAMHandle\nmetadata: {name: k8s-pod-network.abc}\nspec: {handleID: k8s-pod-network.abc, block: {10.244.0.0/26: 1}}\n"))
        .await?;

    let mut raw = store.etcd();
    let listing = raw
        .get(
            "/calico/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await?;
    let keys: Vec<&str> = listing
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap())
        .collect();
    for expected in [
        "/calico/resources/v3/projectcalico.org/networkpolicies/prod/allow-web",
        "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool",
        "/calico/ipam/v2/assignment/ipv4/block/10.244.0.0-26",
        "/calico/ipam/v2/host/node1/ipv4/block/10.244.0.0-26",
        "/calico/ipam/v2/handle/k8s-pod-network.abc",
    ] {
        assert!(
            keys.contains(&expected),
            "{expected} missing; keys: {keys:?}"
        );
    }
    // The stored value is upstream's JSON form of the object.
    let value = raw
        .get(
            "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool",
            None,
        )
        .await?;
    let json: serde_json::Value = serde_json::from_slice(value.kvs()[0].value())?;
    assert_eq!(json["kind"], "IPPool");
    assert_eq!(json["spec"]["cidr"], "10.244.0.0/16");
    assert!(json["metadata"].get("resourceVersion").is_none(), "{json}");

    // Named lookups find spec-keyed IPAM objects too.
    let block = store.get(Kind::IPAMBlock, None, "10-244-0-0-26").await?;
    assert_eq!(block.name(), "10-244-0-0-26");
    assert_eq!(keys::block_name(&"10.244.0.0/26".parse()?), "10-244-0-0-26");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_compare_and_swap_writers_lose_no_update() -> anyhow::Result<()> {
    if !require(
        "racing_compare_and_swap_writers_lose_no_update",
        &[Requirement::Etcd],
    ) {
        return Ok(());
    }
    const WRITERS: usize = 8;
    const INCREMENTS: usize = 20;
    let etcd = Etcd::start()?;
    let store = connect(&etcd).await?;
    let created = store.create(pool("counter", "10.9.0.0/16")).await?;
    let mut unversioned = created.clone();
    unversioned.metadata_mut().resource_version = None;
    assert!(
        matches!(
            store.write_back(unversioned).await,
            Err(DatastoreError::BadRequest { .. })
        ),
        "write_back without the version it was read at"
    );

    let mut tasks = Vec::new();
    for writer in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            let mut conflicts = 0usize;
            while wins.len() < INCREMENTS {
                let mut current = store.get(Kind::IPPool, None, "counter").await?;
                let labels = &mut current.metadata_mut().labels;
                let n: usize = labels.get("count").map_or(0, |c| c.parse().unwrap());
                labels.insert("count".into(), (n + 1).to_string());
                labels.insert("last-writer".into(), writer.to_string());
                // Half write through `update` (which reads what is stored first), half
                // through `write_back` (one request): both compare-and-swap.
                let written = if writer % 2 == 0 {
                    store.update(current).await
                } else {
                    store.write_back(current).await
                };
                match written {
                    Ok(written) => wins.push(rv(&written)),
                    Err(DatastoreError::Conflict { .. }) => conflicts += 1,
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            Ok::<_, anyhow::Error>((wins, conflicts))
        }));
    }
    let mut revisions = BTreeMap::new();
    let mut conflicts = 0;
    for task in tasks {
        let (wins, lost) = task.await??;
        conflicts += lost;
        for revision in wins {
            // Exactly one winner per revision.
            assert!(
                revisions.insert(revision.clone(), ()).is_none(),
                "two winners at {revision}"
            );
        }
    }
    let last = store.get(Kind::IPPool, None, "counter").await?;
    let count: usize = last.metadata().labels["count"].parse()?;
    assert_eq!(count, WRITERS * INCREMENTS, "an update was lost");
    assert_eq!(last.metadata().uid, created.metadata().uid, "identity kept");
    assert_eq!(revisions.len(), WRITERS * INCREMENTS);
    println!(
        "{} successful CAS updates from {WRITERS} writers, {conflicts} conflicts retried, none lost",
        revisions.len()
    );
    Ok(())
}

/// `write_all`: every object or none. A stale version or an object that exists already
/// fails the whole transaction, and nothing of it is written.
#[tokio::test]
async fn write_all_writes_every_object_or_none() -> anyhow::Result<()> {
    if !require(
        "write_all_writes_every_object_or_none",
        &[Requirement::Etcd],
    ) {
        return Ok(());
    }
    use calico_datastore::Write;
    let etcd = Etcd::start()?;
    let store = connect(&etcd).await?;
    let a = store.create(pool("a", "10.10.0.0/16")).await?;
    let mut changed = a.clone();
    changed.metadata_mut().labels.insert("n".into(), "1".into());
    let written = store
        .write_all(vec![
            Write::Create(pool("b", "10.11.0.0/16")),
            Write::Back(changed.clone()),
        ])
        .await?;
    assert_eq!(rv(&written[0]), rv(&written[1]), "one transaction");
    let stored_a = store.get(Kind::IPPool, None, "a").await?;
    assert_eq!(stored_a.metadata().labels["n"], "1");
    assert_eq!(stored_a.metadata().uid, a.metadata().uid, "identity kept");
    store.get(Kind::IPPool, None, "b").await?;

    // `changed` carries the version before the write: stale now.
    for (what, writes) in [
        (
            "a stale version",
            vec![
                Write::Create(pool("c", "10.12.0.0/16")),
                Write::Back(changed),
            ],
        ),
        (
            "an object that exists",
            vec![
                Write::Create(pool("c", "10.12.0.0/16")),
                Write::Create(pool("b", "10.11.0.0/16")),
            ],
        ),
    ] {
        let result = store.write_all(writes).await;
        assert!(
            matches!(result, Err(DatastoreError::Conflict { .. })),
            "{what}: {result:?}"
        );
        assert!(
            matches!(
                store.get(Kind::IPPool, None, "c").await,
                Err(DatastoreError::NotFound { .. })
            ),
            "{what}: nothing of the transaction was written"
        );
    }
    Ok(())
}

async fn next_event(watch: &mut calico_datastore::Watch) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("watch event within 20 s")
        .expect("watch still running")
}

fn labelled_pool(name: &str, n: usize) -> Resource {
    let mut p = pool(name, "10.8.0.0/16");
    p.metadata_mut().labels.insert("n".into(), n.to_string());
    p
}

#[tokio::test]
async fn watch_delivers_every_change_in_order() -> anyhow::Result<()> {
    if !require("watch_delivers_every_change_in_order", &[Requirement::Etcd]) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let store = connect(&etcd).await?;
    store.create(pool("before", "10.7.0.0/16")).await?;
    let mut watch = store.watch(keys::RESOURCES_PREFIX, None);
    let WatchEvent::Snapshot {
        resources,
        revision,
    } = next_event(&mut watch).await
    else {
        panic!("a watch without a revision starts with a snapshot");
    };
    let resources = resources.decode_all();
    assert_eq!(
        resources.iter().map(Resource::name).collect::<Vec<_>>(),
        ["before"]
    );

    for n in 0..30 {
        store.apply(labelled_pool("p", n)).await?;
    }
    store.delete(Kind::IPPool, None, "p", None).await?;

    let mut last = revision;
    for n in 0..30 {
        match next_event(&mut watch).await {
            WatchEvent::Put { resource, revision } => {
                assert_eq!(
                    resource.metadata().labels["n"],
                    n.to_string(),
                    "out of order"
                );
                assert!(revision > last);
                last = revision;
            }
            other => panic!("expected put {n}, got {other:?}"),
        }
    }
    match next_event(&mut watch).await {
        WatchEvent::Deleted { kind, name, .. } => {
            assert_eq!((kind, name.as_str()), (Kind::IPPool, "p"))
        }
        other => panic!("expected the delete, got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_an_etcd_restart() -> anyhow::Result<()> {
    if !require("watch_resumes_across_an_etcd_restart", &[Requirement::Etcd]) {
        return Ok(());
    }
    let mut etcd = Etcd::start()?;
    let store = connect(&etcd).await?;
    let (_, revision) = store.list(Kind::IPPool, None).await?;
    let mut watch = store.watch(keys::RESOURCES_PREFIX, Some(revision));
    store.apply(labelled_pool("p", 0)).await?;
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Put { .. }
    ));

    // etcd crashes and comes back; writes made after it returns reach the same watch.
    tokio::task::block_in_place(|| etcd.kill())?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| etcd.resume())?;
    for n in 1..=5 {
        store.apply(labelled_pool("p", n)).await?;
    }
    for n in 1..=5 {
        match next_event(&mut watch).await {
            WatchEvent::Put { resource, .. } => {
                assert_eq!(resource.metadata().labels["n"], n.to_string())
            }
            other => panic!("expected put {n} after the restart, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn watch_from_a_compacted_revision_resyncs_with_a_snapshot() -> anyhow::Result<()> {
    if !require(
        "watch_from_a_compacted_revision_resyncs_with_a_snapshot",
        &[Requirement::Etcd],
    ) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let store = connect(&etcd).await?;
    let (_, old_revision) = store.list(Kind::IPPool, None).await?;
    for n in 0..10 {
        store.apply(labelled_pool("p", n)).await?;
    }
    store.create(pool("q", "10.6.0.0/16")).await?;
    let (_, now) = store.list(Kind::IPPool, None).await?;
    store.etcd().compact(now, None).await?;

    let mut watch = store.watch(keys::RESOURCES_PREFIX, Some(old_revision));
    match next_event(&mut watch).await {
        WatchEvent::Snapshot {
            resources,
            revision,
        } => {
            let resources = resources.decode_all();
            assert!(revision >= now);
            let mut names: Vec<&str> = resources.iter().map(Resource::name).collect();
            names.sort();
            assert_eq!(names, ["p", "q"]);
            let p = resources.iter().find(|r| r.name() == "p").unwrap();
            assert_eq!(
                p.metadata().labels["n"],
                "9",
                "snapshot must hold the latest state"
            );
        }
        other => panic!("expected a resync snapshot, got {other:?}"),
    }
    // And it carries on with live changes after the snapshot.
    store.delete(Kind::IPPool, None, "q", None).await?;
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Deleted { .. }
    ));
    Ok(())
}

#[tokio::test]
async fn an_unreachable_etcd_is_named_in_the_error() -> anyhow::Result<()> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut config = EtcdConfig::with_endpoints([endpoint.clone()]);
    config.connect_timeout = Duration::from_millis(500);
    config.timeout = Duration::from_secs(1);
    let err = match Datastore::connect(&config).await {
        Ok(_) => panic!("connected to a closed port"),
        Err(e) => e,
    };
    assert!(matches!(err, DatastoreError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains(&endpoint), "{err}");
    Ok(())
}

#[tokio::test]
async fn tls_with_client_certificates_from_the_upstream_variables() -> anyhow::Result<()> {
    if !require(
        "tls_with_client_certificates_from_the_upstream_variables",
        &[Requirement::Etcd],
    ) {
        return Ok(());
    }
    let etcd = Etcd::start_tls()?;
    let tls = etcd.tls_files().expect("a TLS etcd has TLS files").clone();
    let env = |name: &str| -> Option<String> {
        match name {
            "ETCD_ENDPOINTS" => Some(etcd.endpoint()),
            "ETCD_CA_CERT_FILE" => Some(tls.ca.display().to_string()),
            "ETCD_CERT_FILE" => Some(tls.client_cert.display().to_string()),
            "ETCD_KEY_FILE" => Some(tls.client_key.display().to_string()),
            _ => None,
        }
    };
    let store = Datastore::connect(&EtcdConfig::from_lookup(env)?).await?;
    store.create(pool("over-tls", "10.5.0.0/16")).await?;
    assert_eq!(
        store.get(Kind::IPPool, None, "over-tls").await?.name(),
        "over-tls"
    );

    // Without a client certificate the server refuses, and the error names the endpoint.
    let mut no_cert = EtcdConfig::from_lookup(env)?;
    no_cert.cert_file = None;
    no_cert.key_file = None;
    no_cert.timeout = Duration::from_secs(2);
    let err = match Datastore::connect(&no_cert).await {
        Ok(_) => panic!("connected without a client certificate"),
        Err(e) => e,
    };
    assert!(err.to_string().contains(&etcd.endpoint()), "{err}");
    Ok(())
}

#[tokio::test]
async fn username_and_password_authenticate() -> anyhow::Result<()> {
    if !require("username_and_password_authenticate", &[Requirement::Etcd]) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let mut admin = etcd_client::Client::connect([etcd.endpoint()], None).await?;
    admin.user_add("root", "rootpw", None).await?;
    admin.user_grant_role("root", "root").await?;
    admin.auth_enable().await?;

    let mut config = EtcdConfig::with_endpoints([etcd.endpoint()]);
    config.username = Some("root".into());
    config.password = Some("rootpw".into());
    let store = Datastore::connect(&config).await?;
    store.create(pool("authed", "10.4.0.0/16")).await?;

    config.password = Some("wrong".into());
    let err = match Datastore::connect(&config).await {
        Ok(_) => panic!("connected with a wrong password"),
        Err(e) => e,
    };
    assert!(
        matches!(err, DatastoreError::Unauthorized { .. }),
        "{err:?}"
    );
    Ok(())
}

/// More than gRPC's default 4 MiB of resources (about what 4,500 endpoints take): listing and
/// a watch's first snapshot still see every one, read in pages at one revision; pages over the
/// client's message limit are asked for again smaller.
#[tokio::test]
async fn snapshots_larger_than_one_message_arrive_whole() -> anyhow::Result<()> {
    if !require(
        "snapshots_larger_than_one_message_arrive_whole",
        &[Requirement::Etcd],
    ) {
        return Ok(());
    }
    const SETS: usize = 2_000;
    let etcd = Etcd::start()?;
    let store = connect(&etcd).await?;
    // ~4 KiB each, written straight to their keys (validation is not what is tested here).
    let nets: Vec<String> = (0..200)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    let mut bytes = 0;
    let mut kv = store.etcd().kv_client();
    for n in 0..SETS {
        let set = doc(&format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: set-{n:05}\nspec:\n  nets: [{}]\n",
            nets.join(", ")
        ));
        let value = serde_json::to_vec(&set)?;
        bytes += value.len();
        kv.put(
            keys::key_for(&set).map_err(anyhow::Error::msg)?,
            value,
            None,
        )
        .await?;
    }
    assert!(bytes > 6 << 20, "only {bytes} bytes written");

    let (listed, _) = store.list(Kind::GlobalNetworkSet, None).await?;
    assert_eq!(listed.len(), SETS, "list lost objects");
    let mut watch = store.watch(keys::RESOURCES_PREFIX, None);
    let first = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await?
        .expect("the watch ended");
    match first {
        WatchEvent::Snapshot { resources, .. } => {
            assert_eq!(resources.len(), SETS, "the snapshot lost objects")
        }
        other => panic!("expected a snapshot, got {other:?}"),
    }
    // The watch goes on from the snapshot's revision: a later change arrives.
    store.apply(pool("after", "10.200.0.0/16")).await?;
    assert!(matches!(
        next_event(&mut watch).await,
        WatchEvent::Put { .. }
    ));

    // With a 4 MiB limit no page of them fits in one message at first: the listing asks for
    // fewer keys per page until they do, and still sees every object.
    let small = Datastore::connect(&EtcdConfig {
        max_message_bytes: 4 << 20,
        ..EtcdConfig::with_endpoints([etcd.endpoint()])
    })
    .await?;
    let (listed, _) = small.list(Kind::GlobalNetworkSet, None).await?;
    assert_eq!(listed.len(), SETS, "a 4 MiB client's list lost objects");
    let mut watch = small.watch(keys::RESOURCES_PREFIX, None);
    match tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await?
        .expect("the watch ended")
    {
        WatchEvent::Snapshot { resources, .. } => assert_eq!(resources.len(), SETS + 1),
        other => panic!("expected a snapshot, got {other:?}"),
    }
    println!("snapshot: {SETS} objects, {bytes} bytes, in pages of up to 5,000 keys (fewer under a 4 MiB limit)");
    Ok(())
}

/// An object larger than the client's message limit is reported as that, naming the key and
/// the limit, not as etcd being unavailable; a listing that cannot shrink its page further
/// says the same.
#[tokio::test]
async fn an_answer_over_the_message_limit_is_named_as_such() -> anyhow::Result<()> {
    if !require(
        "an_answer_over_the_message_limit_is_named_as_such",
        &[Requirement::Etcd],
    ) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let store = connect(&etcd).await?;
    let nets: Vec<String> = (0..4000)
        .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
        .collect();
    store
        .apply(doc(&format!(
            "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkSet\nmetadata:\n  name: big\nspec:\n  nets: [{}]\n",
            nets.join(", ")
        )))
        .await?;
    let small = Datastore::connect(&EtcdConfig {
        max_message_bytes: 16 << 10,
        ..EtcdConfig::with_endpoints([etcd.endpoint()])
    })
    .await?;
    // Positive control: the same client reads a small object.
    store.apply(pool("small", "10.9.0.0/16")).await?;
    assert!(small.get(Kind::IPPool, None, "small").await.is_ok());
    for err in [
        small
            .get(Kind::GlobalNetworkSet, None, "big")
            .await
            .map(drop),
        small.list(Kind::GlobalNetworkSet, None).await.map(drop),
    ] {
        match err {
            Err(e @ DatastoreError::TooLarge { limit: 16384, .. }) => {
                assert!(!e.is_transient());
                assert!(e.to_string().contains("globalnetworksets/"), "{e}");
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
    }
    Ok(())
}

/// Several endpoints with one member down: every connection finds the live one, in either
/// order, and works (etcd's own clients fail over the same way).
#[tokio::test]
async fn a_dead_endpoint_beside_a_live_one_is_skipped() -> anyhow::Result<()> {
    if !require(
        "a_dead_endpoint_beside_a_live_one_is_skipped",
        &[Requirement::Etcd],
    ) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let dead = format!("http://127.0.0.1:{port}");
    for endpoints in [
        [dead.clone(), etcd.endpoint()],
        [etcd.endpoint(), dead.clone()],
    ] {
        for attempt in 0..10 {
            let mut config = EtcdConfig::with_endpoints(endpoints.clone());
            config.connect_timeout = Duration::from_millis(500);
            let store = Datastore::connect(&config)
                .await
                .map_err(|e| anyhow::anyhow!("{endpoints:?}, attempt {attempt}: {e}"))?;
            store.list(Kind::IPPool, None).await?;
            store
                .apply(pool(&format!("p{attempt}"), "10.210.0.0/16"))
                .await?;
        }
    }
    Ok(())
}
