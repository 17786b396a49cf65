//! A storm of concurrent ADDs then DELs, on one node and on two nodes sharing a pool: no
//! address handed out twice, nothing leaked, no veth left behind.

use std::{collections::BTreeSet, time::Duration};

use crate::common::*;
use harness::{require, Requirement};

const NEEDS: &[Requirement] = &[Requirement::Root, Requirement::NetNs, Requirement::Etcd];
const WORKLOADS: usize = 100;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn storm(nodes: &[&str], pool: &str) -> anyhow::Result<()> {
    let etcd = etcd_with_pools(&[("storm", pool)]).await?;
    let attachments: Vec<Attachment> = (0..WORKLOADS)
        .map(|i| Attachment::new(netconf(&etcd, "storm", "1.0.0", nodes[i % nodes.len()])))
        .collect();
    let adds: Vec<Out> = std::thread::scope(|s| {
        let handles: Vec<_> = attachments
            .iter()
            .map(|a| s.spawn(|| a.run("ADD")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut ips = BTreeSet::new();
    for (a, out) in attachments.iter().zip(&adds) {
        assert_eq!(out.code, 0, "ADD {}: {out:?}", a.container);
        let ip = out.json()["ips"][0]["address"].as_str().unwrap().to_owned();
        assert!(ips.insert(ip.clone()), "{ip} handed out twice");
        assert!(
            host_link_exists(&a.host_veth()),
            "no veth for {}",
            a.container
        );
    }
    assert_eq!(ipam_usage(&etcd).await?, (WORKLOADS, WORKLOADS));
    assert_eq!(endpoints(&etcd).await?.len(), WORKLOADS);

    let dels: Vec<Out> = std::thread::scope(|s| {
        let handles: Vec<_> = attachments
            .iter()
            .map(|a| s.spawn(|| a.run("DEL")))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (a, out) in attachments.iter().zip(&dels) {
        assert_eq!(out.code, 0, "DEL {}: {out:?}", a.container);
        assert!(
            !host_link_exists(&a.host_veth()),
            "veth of {} left behind",
            a.container
        );
    }
    assert_eq!(ipam_usage(&etcd).await?, (0, 0), "allocations leaked");
    assert!(endpoints(&etcd).await?.is_empty(), "endpoints leaked");

    let mut latencies: Vec<Duration> = adds.iter().map(|o| o.elapsed).collect();
    latencies.sort();
    println!(
        "storm on {} node(s): {WORKLOADS} concurrent ADDs, {} distinct addresses, 0 duplicates; \
         after DEL 0 allocations, 0 handles, 0 endpoints, 0 veths left; ADD latency p50 {:?} p99 {:?}",
        nodes.len(),
        ips.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_on_one_node() -> anyhow::Result<()> {
    if !require("storm_on_one_node", NEEDS) {
        return Ok(());
    }
    storm(&["node-a"], "198.18.30.0/24").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_on_two_nodes_sharing_a_pool() -> anyhow::Result<()> {
    if !require("storm_on_two_nodes_sharing_a_pool", NEEDS) {
        return Ok(());
    }
    storm(&["node-a", "node-b"], "198.18.31.0/24").await
}
