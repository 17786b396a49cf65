//! ADD latency of calico + calico-ipam against the reference ptp + host-local plugins, measured
//! in the same run on the same machine, alone and with 100 concurrent ADDs.
//! `cargo bench -p calico-cni --bench add_latency` (or `cargo xtask bench cni`).

#[path = "../tests/cni/common.rs"]
mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const CONCURRENCY: [usize; 2] = [1, 100];

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Row {
    plugin: &'static str,
    concurrency: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    del_p50: Duration,
}

fn measure(plugin: &'static str, binary: &str, conf: &Value, concurrency: usize) -> Row {
    let workloads: Vec<Attachment> = (0..concurrency)
        .map(|_| Attachment::new(conf.clone()))
        .collect();
    let run = |command: &str| -> Vec<Duration> {
        let mut times: Vec<Duration> = std::thread::scope(|s| {
            let handles: Vec<_> = workloads
                .iter()
                .map(|w| {
                    s.spawn(|| {
                        let out = call(
                            binary,
                            command,
                            &w.container,
                            &w.netns_path(),
                            "eth0",
                            "",
                            conf,
                        );
                        assert_eq!(out.code, 0, "{plugin} {command}: {out:?}");
                        out.elapsed
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        times.sort();
        times
    };
    let adds = run("ADD");
    let dels = run("DEL");
    Row {
        plugin,
        concurrency,
        p50: percentile(&adds, 0.5),
        p99: percentile(&adds, 0.99),
        max: *adds.last().unwrap(),
        del_p50: percentile(&dels, 0.5),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> anyhow::Result<()> {
    if !harness::require(
        "cni add_latency benchmark",
        &[
            harness::Requirement::Root,
            harness::Requirement::NetNs,
            harness::Requirement::Etcd,
        ],
    ) {
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new()?;
    let etcd = runtime.block_on(etcd_with_pools(&[("bench", "198.18.40.0/22")]))?;
    let mut calico_conf = netconf(&etcd, "bench", "1.0.0", "bench-node");
    // CNI_BENCH_LOG=<file>: the plugins' debug log (each ADD's phases, timed) goes there.
    if let Ok(path) = std::env::var("CNI_BENCH_LOG") {
        calico_conf["log_level"] = json!("debug");
        calico_conf["log_file_path"] = json!(path);
    }
    let data_dir = tempfile_dir();
    let ptp_conf = json!({
        "cniVersion": "1.0.0", "name": "bench-ptp", "type": "ptp", "ipMasq": false,
        "ipam": { "type": "host-local", "ranges": [[{"subnet": "198.18.44.0/22"}]],
                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": data_dir },
    });
    let mut rows = Vec::new();
    for concurrency in CONCURRENCY {
        rows.push(measure(
            "reference ptp + host-local",
            "/usr/lib/cni/ptp",
            &ptp_conf,
            concurrency,
        ));
        rows.push(measure(
            "calico + calico-ipam",
            calico(),
            &calico_conf,
            concurrency,
        ));
    }
    println!(
        "\nCNI ADD latency (release build, {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| plugin | concurrent ADDs | ADD p50 | ADD p99 | ADD max | DEL p50 |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.plugin,
            r.concurrency,
            ms(r.p50),
            ms(r.p99),
            ms(r.max),
            ms(r.del_p50)
        );
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    Ok(())
}

fn tempfile_dir() -> String {
    std::env::temp_dir()
        .join(format!("cni-bench-{}", std::process::id()))
        .display()
        .to_string()
}
