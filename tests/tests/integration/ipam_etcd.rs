//! Block IPAM against a real etcd: affinity, borrowing, strict affinity, exhaustion, release,
//! and many allocators on two nodes racing without ever handing out an address twice.

use std::{collections::BTreeSet, net::IpAddr};

use calico_datastore::{Datastore, EtcdConfig};
use calico_ipam::{AssignRequest, Ipam, IpamError};
use calico_model::{parse_documents, Kind, Resource};
use harness::{require, Etcd, Requirement};

async fn setup(pools: &str) -> anyhow::Result<Option<(Etcd, Datastore)>> {
    if !require("ipam against etcd", &[Requirement::Etcd]) {
        return Ok(None);
    }
    let etcd = Etcd::start()?;
    let store = Datastore::connect(&EtcdConfig::with_endpoints([etcd.endpoint()])).await?;
    for r in parse_documents(pools)? {
        store.create(r).await?;
    }
    Ok(Some((etcd, store)))
}

fn pool(name: &str, cidr: &str, block: u8) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{cidr: '{cidr}', blockSize: {block}}}\n---\n"
    )
}

fn request(handle: &str, v4: usize, v6: usize) -> AssignRequest {
    AssignRequest {
        handle: handle.into(),
        num_v4: v4,
        num_v6: v6,
        ..Default::default()
    }
}

#[tokio::test]
async fn nodes_claim_their_own_blocks_then_borrow() -> anyhow::Result<()> {
    let Some((_etcd, store)) = setup(&pool("p", "10.20.0.0/29", 30)).await? else {
        return Ok(());
    };
    let a = Ipam::new(store.clone(), "node-a");
    let b = Ipam::new(store.clone(), "node-b");
    // Two /30 blocks in the pool: one each.
    let a1 = a.auto_assign(&request("a1", 2, 0)).await?;
    let b1 = b.auto_assign(&request("b1", 2, 0)).await?;
    assert_eq!(
        a1.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.20.0.0/32", "10.20.0.1/32"]
    );
    assert_eq!(
        b1.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.20.0.4/32", "10.20.0.5/32"]
    );
    // node-a's block is half full; it fills it, then borrows from node-b's.
    let a2 = a.auto_assign(&request("a2", 4, 0)).await?;
    let a2: BTreeSet<String> = a2.iter().map(ToString::to_string).collect();
    assert_eq!(
        a2,
        BTreeSet::from(
            [
                "10.20.0.2/32",
                "10.20.0.3/32",
                "10.20.0.6/32",
                "10.20.0.7/32"
            ]
            .map(String::from)
        )
    );
    // The pool is full now.
    let err = b.auto_assign(&request("b2", 1, 0)).await.unwrap_err();
    assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
    // Affinities are recorded where upstream keeps them.
    let (affinities, _) = store.list(Kind::BlockAffinity, None).await?;
    let names: BTreeSet<String> = affinities.iter().map(|r| r.name().to_owned()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["node-a-10-20-0-0-30".into(), "node-b-10-20-0-4-30".into()])
    );

    // Release by handle frees exactly that handle's addresses, and the handle goes away.
    let released = a.release_by_handle("a2").await?;
    assert_eq!(released.len(), 4);
    assert!(matches!(
        store.get(Kind::IPAMHandle, None, "a2").await,
        Err(calico_datastore::DatastoreError::NotFound { .. })
    ));
    assert!(
        a.release_by_handle("a2").await?.is_empty(),
        "a second release is a no-op"
    );
    assert_eq!(a.ips_by_handle("a1").await?.len(), 2);

    // Release by address.
    let ip: IpAddr = "10.20.0.4".parse()?;
    assert!(b.release_ips(&[ip]).await?.is_empty());
    assert_eq!(
        b.ips_by_handle("b1").await?,
        ["10.20.0.5".parse::<IpAddr>()?]
    );
    let not_allocated = b.release_ips(&[ip]).await?;
    assert_eq!(not_allocated, [ip]);
    Ok(())
}

#[tokio::test]
async fn strict_affinity_never_borrows_and_dual_stack_is_all_or_nothing() -> anyhow::Result<()> {
    let docs = pool("p4", "10.30.0.0/30", 30)
        + &pool("p6", "fd00:30::/126", 126)
        + "apiVersion: projectcalico.org/v3\nkind: IPAMConfig\nmetadata: {name: default}\nspec: {strictAffinity: true}\n";
    let Some((_etcd, store)) = setup(&docs).await? else {
        return Ok(());
    };
    let a = Ipam::new(store.clone(), "node-a");
    let b = Ipam::new(store.clone(), "node-b");
    let dual = a.auto_assign(&request("a", 1, 1)).await?;
    assert_eq!(dual.len(), 2);
    assert!(dual[0].addr().is_ipv4() && dual[1].addr().is_ipv6());
    // node-b: no block left to claim, and borrowing is forbidden.
    let err = b.auto_assign(&request("b", 1, 0)).await.unwrap_err();
    assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
    // A request whose IPv6 half fails keeps nothing of its IPv4 half.
    let err = a.auto_assign(&request("a2", 1, 10)).await.unwrap_err();
    assert!(matches!(err, IpamError::Exhausted { .. }), "{err}");
    assert!(
        a.ips_by_handle("a2").await?.is_empty(),
        "partial assignment was not rolled back"
    );
    Ok(())
}

#[tokio::test]
async fn reservations_disabled_pools_and_static_addresses() -> anyhow::Result<()> {
    let docs = pool("p", "10.40.0.0/29", 29)
        + "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: off}\nspec: {cidr: 10.41.0.0/24, disabled: true}\n---\n"
        + "apiVersion: projectcalico.org/v3\nkind: IPReservation\nmetadata: {name: r}\nspec: {reservedCIDRs: [10.40.0.0/30]}\n";
    let Some((_etcd, store)) = setup(&docs).await? else {
        return Ok(());
    };
    let a = Ipam::new(store.clone(), "node-a");
    let got = a.auto_assign(&request("h", 4, 0)).await?;
    let got: Vec<String> = got.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        [
            "10.40.0.4/32",
            "10.40.0.5/32",
            "10.40.0.6/32",
            "10.40.0.7/32"
        ]
    );
    let err = a.auto_assign(&request("h2", 0, 1)).await.unwrap_err();
    assert!(matches!(err, IpamError::NoPools { .. }), "{err}");

    a.release_by_handle("h").await?;
    a.assign_ip("10.40.0.6".parse()?, "static", &Default::default())
        .await?;
    let err = a
        .assign_ip("10.40.0.6".parse()?, "other", &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(err, IpamError::InUse { .. }), "{err}");
    let err = a
        .assign_ip("10.41.0.1".parse()?, "x", &Default::default())
        .await
        .unwrap_err();
    assert!(matches!(err, IpamError::NotInPool { .. }), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_allocators_on_two_nodes_never_share_an_address() -> anyhow::Result<()> {
    let Some((_etcd, store)) = setup(&pool("p", "10.50.0.0/24", 28)).await? else {
        return Ok(());
    };
    const PER_NODE: usize = 40;
    let mut tasks = Vec::new();
    for node in ["node-a", "node-b"] {
        for i in 0..PER_NODE {
            let ipam = Ipam::new(store.clone(), node);
            tasks.push(tokio::spawn(async move {
                ipam.auto_assign(&request(&format!("{node}-{i}"), 1, 0))
                    .await
            }));
        }
    }
    let mut all = BTreeSet::new();
    for t in tasks {
        let ips = t.await??;
        assert_eq!(ips.len(), 1);
        assert!(all.insert(ips[0]), "{} handed out twice", ips[0]);
    }
    assert_eq!(all.len(), 2 * PER_NODE);
    // Blocks and handles agree with what was handed out.
    let (blocks, _) = store.list(Kind::IPAMBlock, None).await?;
    let allocated: usize = blocks
        .iter()
        .map(|r| match r {
            Resource::IPAMBlock(b) => b.spec.allocations.iter().filter(|a| a.is_some()).count(),
            _ => 0,
        })
        .sum();
    assert_eq!(allocated, 2 * PER_NODE);
    let (handles, _) = store.list(Kind::IPAMHandle, None).await?;
    assert_eq!(handles.len(), 2 * PER_NODE);
    println!(
        "{} concurrent assignments on 2 nodes: {} distinct addresses in {} blocks",
        2 * PER_NODE,
        all.len(),
        blocks.len()
    );
    Ok(())
}

/// A handle the datastore would refuse (what a container id with `/`, spaces or upper case, or
/// a network name like "Bad Name!", makes) fails the assignment before any block is written:
/// no address leaks. A valid handle then gets the same address (the positive control).
#[tokio::test]
async fn an_unstorable_handle_fails_before_anything_is_written() -> anyhow::Result<()> {
    let Some((_etcd, store)) = setup(&pool("p", "10.21.0.0/30", 30)).await? else {
        return Ok(());
    };
    let ipam = Ipam::new(store.clone(), "node-a");
    for bad in ["Bad Name!.abc", "net1.a/b", "net1.ABCDEF", &"n".repeat(300)] {
        let refused = ipam.auto_assign(&request(bad, 1, 0)).await;
        assert!(
            matches!(refused, Err(calico_ipam::IpamError::BadHandle { .. })),
            "{bad}: {refused:?}"
        );
        let static_ip = ipam
            .assign_ip("10.21.0.1".parse()?, bad, &Default::default())
            .await;
        assert!(static_ip.is_err(), "{bad}: static assignment went through");
    }
    let (blocks, _) = store.list(Kind::IPAMBlock, None).await?;
    let allocated: usize = blocks
        .iter()
        .map(|b| match b {
            calico_model::Resource::IPAMBlock(b) => {
                b.spec.allocations.iter().filter(|a| a.is_some()).count()
            }
            _ => 0,
        })
        .sum();
    assert_eq!(allocated, 0, "a refused handle left addresses allocated");
    let got = ipam.auto_assign(&request("net1.abcdef", 1, 0)).await?;
    assert_eq!(got.len(), 1);
    Ok(())
}

/// Sets the handle record's counts, as a writer that died part-way could leave them.
async fn set_record(
    store: &Datastore,
    handle: &str,
    counts: &[(&str, usize)],
) -> anyhow::Result<()> {
    let mut record = store.get(Kind::IPAMHandle, None, handle).await?;
    let Resource::IPAMHandle(h) = &mut record else {
        anyhow::bail!("not a handle")
    };
    h.spec.block = counts.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect();
    store.update(record).await?;
    Ok(())
}

async fn record_counts(store: &Datastore, handle: &str) -> anyhow::Result<Option<usize>> {
    match store.get(Kind::IPAMHandle, None, handle).await {
        Ok(Resource::IPAMHandle(h)) => Ok(Some(h.spec.block.values().sum())),
        Ok(other) => anyhow::bail!("not a handle: {other:?}"),
        Err(calico_datastore::DatastoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A handle's record is what finds its addresses (an allocation and its record are written
/// in one transaction). A record that counts more than its blocks hold (a release that died
/// before deleting it) is corrected by the next look, or removed when it holds nothing; an
/// address whose record an older version lost is still released by its handle.
#[tokio::test]
async fn a_handle_record_is_brought_to_what_its_blocks_hold() -> anyhow::Result<()> {
    let Some((_etcd, store)) = setup(&pool("p", "10.22.0.0/28", 30)).await? else {
        return Ok(());
    };
    let ipam = Ipam::new(store.clone(), "node-a");
    let got = ipam.auto_assign(&request("net1.a", 1, 0)).await?;
    let block = "10.22.0.0/30";
    assert_eq!(
        record_counts(&store, "net1.a").await?,
        Some(1),
        "written with the address"
    );

    // Over-counted: corrected to what the block holds.
    set_record(&store, "net1.a", &[(block, 3)]).await?;
    assert_eq!(ipam.adopt_held("net1.a").await?, vec![got[0].addr()]);
    assert_eq!(record_counts(&store, "net1.a").await?, Some(1), "corrected");

    // A record of nothing: removed. (Positive control: a handle with no record stays so.)
    store
        .create(Resource::IPAMHandle(calico_model::Object {
            api_version: calico_model::API_VERSION.into(),
            kind: "IPAMHandle".into(),
            metadata: calico_model::ObjectMeta {
                name: "net1.b".into(),
                ..Default::default()
            },
            spec: calico_model::spec::IpamHandleSpec {
                handle_id: "net1.b".into(),
                block: [(block.to_owned(), 1)].into(),
                deleted: false,
            },
            status: None,
        }))
        .await?;
    assert!(ipam.adopt_held("net1.b").await?.is_empty());
    assert_eq!(record_counts(&store, "net1.b").await?, None, "removed");
    assert!(ipam.adopt_held("net1.never").await?.is_empty());
    assert_eq!(record_counts(&store, "net1.never").await?, None);

    // An older version's lost record: not found by the handle, but released by it.
    let legacy = ipam.auto_assign(&request("net1.c", 1, 0)).await?;
    store.delete(Kind::IPAMHandle, None, "net1.c", None).await?;
    assert!(ipam.ips_by_handle("net1.c").await?.is_empty());
    assert_eq!(
        ipam.release_by_handle("net1.c").await?,
        vec![legacy[0].addr()],
        "released all the same"
    );
    Ok(())
}
