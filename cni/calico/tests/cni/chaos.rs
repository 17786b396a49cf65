//! Chaos: 100 attachments ADDed and DELeted concurrently while plugins are killed with SIGKILL
//! at random moments and etcd is killed and restarted twice; then the runtime's own clean-up
//! (DEL, retried, for every attachment it does not hold as running; GC with the ones it
//! does). After that `calicoctl ipam check` for the node is clean (no leaked or duplicate
//! address, no orphan veth, no endpoint without its interface) and the running attachments
//! are exactly what the datastore and the host hold.

use std::{
    collections::BTreeSet,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use crate::common::*;
use harness::{require, unique_name, Forward, NetNs, Requirement};
use serde_json::{json, Value};

const NEEDS: &[Requirement] = &[Requirement::Root, Requirement::NetNs, Requirement::Etcd];
const WORKLOADS: usize = 100;

/// xorshift64*: reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

struct Chaos<'a> {
    host: &'a NetNs,
    conf: &'a Value,
    /// Plugins started so far (the etcd killer waits on it, not on a clock).
    started: AtomicUsize,
    plugins_killed: AtomicUsize,
    /// CNI error codes of the ADDs that failed (not killed).
    add_failures: std::sync::Mutex<Vec<u64>>,
}

impl Chaos<'_> {
    /// One plugin call, SIGKILLed after `kill_after` if it has not finished by then.
    fn call(
        &self,
        command: &str,
        container: &str,
        netns: &str,
        kill_after: Option<Duration>,
    ) -> Option<Out> {
        let start = Instant::now();
        let mut child = spawn(
            Some(self.host),
            calico(),
            command,
            container,
            netns,
            "eth0",
            "",
            self.conf,
        );
        self.started.fetch_add(1, Ordering::SeqCst);
        if let Some(after) = kill_after {
            while start.elapsed() < after {
                if child.try_wait().expect("plugin status").is_some() {
                    return Some(wait(child, start));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = child.kill();
            let _ = child.wait();
            self.plugins_killed.fetch_add(1, Ordering::SeqCst);
            return None;
        }
        Some(wait(child, start))
    }
}

struct Workload {
    ns: NetNs,
    container: String,
}

impl Workload {
    fn netns(&self) -> String {
        format!("/run/netns/{}", self.ns.name())
    }
}

fn calicoctl() -> std::path::PathBuf {
    let path = Path::new(calico()).with_file_name("calicoctl");
    assert!(
        path.exists(),
        "{} is not built (cargo test --workspace builds it; or cargo build -p calicoctl)",
        path.display()
    );
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_of_kills_leaves_ipam_and_host_consistent() -> anyhow::Result<()> {
    if !require("chaos_of_kills_leaves_ipam_and_host_consistent", NEEDS) {
        return Ok(());
    }
    let mut etcd = etcd_with_pools(&[("chaos", "198.18.40.0/24")]).await?;
    let host = NetNs::new("chh")?;
    let _forward = Forward::loopback(&host, etcd.port())?;
    let node = unique_name("cha");
    let conf = netconf(&etcd, "chaos", "1.1.0", &node);
    let workloads = (0..WORKLOADS)
        .map(|_| {
            Ok(Workload {
                ns: NetNs::new("cw")?,
                container: container_id(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // CHAOS_SEED replays a run's choices of what to kill and when (timings still vary).
    let seed = match std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => seed,
        None => {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_nanos() as u64
                | 1
        }
    };
    println!("chaos seed {seed} (CHAOS_SEED={seed} replays it)");
    let chaos = Chaos {
        host: &host,
        conf: &conf,
        started: AtomicUsize::new(0),
        plugins_killed: AtomicUsize::new(0),
        add_failures: std::sync::Mutex::new(Vec::new()),
    };

    // Phase 1: every workload ADDs, half of them then DEL; a quarter of the calls are killed
    // part-way; etcd is killed (and restarted) after about a third and two thirds of the
    // calls have started. Each worker records whether the runtime would hold it as running.
    let done = AtomicBool::new(false);
    let (etcd_kills, running) = std::thread::scope(|s| -> anyhow::Result<(usize, Vec<bool>)> {
        let killer = s.spawn(|| -> anyhow::Result<usize> {
            let mut kills = 0;
            for threshold in [WORKLOADS / 3, WORKLOADS * 2 / 3] {
                while chaos.started.load(Ordering::SeqCst) < threshold {
                    if done.load(Ordering::SeqCst) {
                        return Ok(kills);
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                etcd.kill()?;
                kills += 1;
                // Down for a while (an outage, not a blip); calls meanwhile must fail cleanly.
                std::thread::sleep(Duration::from_millis(300));
                etcd.resume()?;
            }
            Ok(kills)
        });
        let workers: Vec<_> = workloads
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let chaos = &chaos;
                s.spawn(move || {
                    let mut rng =
                        Rng(seed.wrapping_add((i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1);
                    let kill = |rng: &mut Rng| {
                        (rng.below(4) == 0).then(|| Duration::from_millis(rng.below(60)))
                    };
                    // Arrivals spread over four seconds, as pods are scheduled, so the etcd
                    // outages fall among the calls rather than before all of them.
                    std::thread::sleep(Duration::from_millis(rng.below(4000)));
                    // A failed ADD is cleaned up with DEL and tried again later, as kubelet
                    // does with a pod sandbox; a killed one is left to the clean-up below.
                    let mut added = false;
                    for _ in 0..3 {
                        match chaos.call("ADD", &w.container, &w.netns(), kill(&mut rng)) {
                            Some(out) if out.code == 0 => {
                                added = true;
                                break;
                            }
                            Some(out) => {
                                // Expected under chaos (etcd down: "try again later"); any
                                // other failure is named in the summary.
                                let code = out.json()["code"].as_u64().unwrap_or(0);
                                chaos.add_failures.lock().unwrap().push(code);
                                let _ = chaos.call("DEL", &w.container, &w.netns(), None);
                                std::thread::sleep(Duration::from_millis(300));
                            }
                            None => break,
                        }
                    }
                    if rng.below(2) == 0 {
                        let _ = chaos.call("DEL", &w.container, &w.netns(), kill(&mut rng));
                        false
                    } else {
                        added
                    }
                })
            })
            .collect();
        // Joined before any verdict, so a failed worker cannot leave the killer waiting.
        let outcomes: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        done.store(true, Ordering::SeqCst);
        let running = outcomes
            .into_iter()
            .map(|o| o.expect("a worker failed"))
            .collect();
        Ok((killer.join().unwrap()?, running))
    })?;

    // Phase 2, the runtime's clean-up: DEL (retried, as kubelet does) for every attachment it
    // does not hold as running, then GC with the ones it does.
    for (w, _) in workloads.iter().zip(&running).filter(|(_, r)| !**r) {
        let mut last = None;
        for _ in 0..20 {
            let out = chaos.call("DEL", &w.container, &w.netns(), None).unwrap();
            if out.code == 0 {
                last = None;
                break;
            }
            last = Some(out);
        }
        assert!(
            last.is_none(),
            "DEL {} never succeeded: {last:?}",
            w.container
        );
    }
    let live: Vec<&Workload> = workloads
        .iter()
        .zip(&running)
        .filter(|(_, r)| **r)
        .map(|(w, _)| w)
        .collect();
    let mut gc_conf = conf.clone();
    gc_conf["cni.dev/valid-attachments"] = json!(live
        .iter()
        .map(|w| json!({ "containerID": w.container, "ifname": "eth0" }))
        .collect::<Vec<_>>());
    let gc = wait(
        spawn(Some(&host), calico(), "GC", "", "", "", "", &gc_conf),
        Instant::now(),
    );
    assert_eq!(gc.code, 0, "GC: {gc:?}");

    // What is left: exactly the running attachments, each with its own address and veth.
    let check = |what: &str| -> anyhow::Result<()> {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", host.name()))
            .arg("--")
            .arg(calicoctl())
            .args(["ipam", "check", "--node", &node])
            .env("ETCD_ENDPOINTS", etcd.endpoint())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(
            out.status.success() && text.contains("IPAM is clean"),
            "calicoctl ipam check {what}:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("$ calicoctl ipam check --node {node}   ({what})\n{text}");
        Ok(())
    };
    check("after the runtime's clean-up")?;
    let left = endpoints(&etcd).await?;
    let mut addresses = BTreeSet::new();
    let mut interfaces = BTreeSet::new();
    for e in &left {
        let calico_model::Resource::WorkloadEndpoint(w) = e else {
            continue;
        };
        for net in &w.spec.ip_networks {
            assert!(addresses.insert(net.clone()), "{net} used by two endpoints");
        }
        interfaces.insert(w.spec.interface_name.clone());
    }
    assert_eq!(
        left.len(),
        live.len(),
        "endpoints against running attachments"
    );
    let veths: BTreeSet<String> = host
        .exec_ok("ip", &["-o", "link", "show", "type", "veth"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with("cali"))
        .collect();
    assert_eq!(veths, interfaces, "host veths against endpoints");
    assert_eq!(ipam_usage(&etcd).await?, (live.len(), live.len()));

    // The chaos happened (else this proves nothing), and some attachments survived it.
    let plugins_killed = chaos.plugins_killed.load(Ordering::SeqCst);
    assert_eq!(etcd_kills, 2, "etcd was not killed twice");
    assert!(plugins_killed > 0, "no plugin was killed (seed {seed})");
    assert!(!live.is_empty(), "no attachment survived (seed {seed})");

    // And the runtime's DEL of the survivors leaves nothing at all.
    for w in &live {
        let out = chaos.call("DEL", &w.container, &w.netns(), None).unwrap();
        assert_eq!(out.code, 0, "DEL {}: {out:?}", w.container);
    }
    check("after DEL of the survivors")?;
    // The check sees what it is for: a veth that no endpoint names.
    host.exec_ok(
        "ip",
        &[
            "link",
            "add",
            "califorgotten0",
            "type",
            "veth",
            "peer",
            "name",
            "stray0",
        ],
    )?;
    let orphan = check("with a stray veth").unwrap_err().to_string();
    assert!(
        orphan.contains("interface califorgotten0: no workload endpoint of node"),
        "{orphan}"
    );
    assert_eq!(ipam_usage(&etcd).await?, (0, 0), "allocations left");
    assert!(endpoints(&etcd).await?.is_empty(), "endpoints left");
    let failures = chaos.add_failures.lock().unwrap().clone();
    let try_again = failures.iter().filter(|c| **c == 11).count();
    println!(
        "chaos: {} ADDs failed cleanly ({try_again} 'try again later', code 11; others: {:?})",
        failures.len(),
        failures.iter().filter(|c| **c != 11).collect::<Vec<_>>()
    );
    println!(
        "chaos: {WORKLOADS} workloads, {plugins_killed} plugins and etcd {etcd_kills} times killed; \
         {} running after the runtime's clean-up, each with its own address and veth; \
         ipam check clean; after DEL nothing left",
        live.len()
    );
    Ok(())
}
