//! Scale benchmark (`cargo xtask bench scale`): one node of a large cluster, at Kubernetes'
//! published limits. The benchmark writes the cluster to a real etcd — 150,000
//! WorkloadEndpoints across 5,000 namespaces and 1,000 nodes, 110 of them on this node on real
//! veths; per namespace an "allow from the same namespace" policy and a cross-namespace one
//! (10 rules each), and a global tier of 10 GlobalNetworkPolicies (10 rules each, ending in
//! Pass) — then starts calico-node and measures:
//!
//! * start → every local endpoint programmed (readiness), and the agent's RSS;
//! * each eBPF map's entries against its capacity;
//! * update → enforced, as the first datagram through after a datastore write (a probe sends
//!   one from a fresh source port every millisecond), for (a) a remote pod's label change that
//!   moves it into an IP set, (b) a new policy, (c) a new local pod: CNI ADD (the real
//!   plugin, Kubernetes mode) → its first datagram through;
//! * the etcd requests per second the node makes while idle (etcd's own counters).
//!
//! Before each (a)/(b) sample the deny is confirmed: the probe runs 50 ms and anything that
//! gets through is reported as a leak.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use calico_model::{parse_documents, Resource};
use harness::{
    cni_conf, cni_with_conf, require, unique_name, AgentProcess, Etcd, Forward, NetNs, Requirement,
    Store, Workload,
};

const NAMESPACES: usize = 5_000;
const NODES: usize = 1_000;
const ENDPOINTS: usize = 150_000;
const LOCAL: usize = 110;
const TEAMS: usize = 50;
const APPS: usize = 5;
const GLOBAL_POLICIES: usize = 10;
const SAMPLES: usize = 100;

/// Cluster endpoint `i`'s address: 10.128.0.0/9 upwards.
fn address(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0A80_0000u32 + i as u32 + 1)
}

/// The IPAM blocks (/26) of the remote endpoints' addresses, each affine to a cluster node,
/// every address allocated to its endpoint's handle as the CNI plugin records it.
fn cluster_blocks() -> Vec<Resource> {
    let remote = ENDPOINTS - LOCAL;
    let first = u32::from(address(0)) & !63;
    let last = u32::from(address(remote - 1));
    (first..=last)
        .step_by(64)
        .enumerate()
        .map(|(b, base)| {
            let cidr = ipnet::IpNet::new(Ipv4Addr::from(base).into(), 26).expect("a /26");
            let node = format!("cluster-node{}", b % NODES);
            let mut spec = calico_ipam::block::new_block(&cidr, Some(&node));
            for addr in base..base + 64 {
                // Endpoint i has address(i).
                let Some(i) = (addr as usize).checked_sub(u32::from(address(0)) as usize) else {
                    continue;
                };
                if i >= remote {
                    continue;
                }
                let attrs = BTreeMap::from([
                    ("node".to_owned(), format!("cluster-node{}", i % NODES)),
                    ("namespace".to_owned(), namespace(i % NAMESPACES)),
                    ("pod".to_owned(), format!("pod{i}")),
                ]);
                let handle = format!("k8s-pod-network.c{i:012x}");
                calico_ipam::block::assign_ip(
                    &mut spec,
                    &cidr,
                    Ipv4Addr::from(addr).into(),
                    &handle,
                    &attrs,
                );
            }
            Resource::IPAMBlock(calico_model::Object {
                api_version: calico_model::API_VERSION.into(),
                kind: "IPAMBlock".into(),
                metadata: calico_model::ObjectMeta {
                    name: calico_datastore::keys::block_name(&cidr),
                    ..Default::default()
                },
                spec,
                status: None,
            })
        })
        .collect()
}

fn namespace(i: usize) -> String {
    format!("ns{i}")
}

/// The namespace of local endpoint `j`: spread over the cluster, one each.
fn local_namespace(j: usize) -> usize {
    (j * 45) % NAMESPACES
}

fn resource(yaml: &str) -> Resource {
    parse_documents(yaml)
        .expect("benchmark documents parse")
        .remove(0)
}

fn namespace_profile(i: usize) -> Resource {
    resource(&format!(
        "apiVersion: projectcalico.org/v3\nkind: Profile\nmetadata: {{name: kns.{ns}}}\nspec:\n  ingress: [{{action: Allow}}]\n  egress: [{{action: Allow}}]\n  labelsToApply: {{pcns.projectcalico.org/name: {ns}, pcns.team: t{team}, pcns.env: {env}}}\n",
        ns = namespace(i),
        team = i % TEAMS,
        env = if i.is_multiple_of(2) { "prod" } else { "dev" },
    ))
}

#[allow(clippy::too_many_arguments)]
fn endpoint(
    node: &str,
    ns: &str,
    name: &str,
    iface: &str,
    addr: Ipv4Addr,
    app: usize,
    extra_labels: &str,
) -> Resource {
    resource(&format!(
        "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata:\n  name: {node}-k8s-{name}-eth0\n  namespace: {ns}\n  labels: {{app: a{app}, projectcalico.org/namespace: {ns}, projectcalico.org/orchestrator: k8s{extra_labels}}}\nspec:\n  orchestrator: k8s\n  node: {node}\n  pod: {name}\n  endpoint: eth0\n  interfaceName: {iface}\n  ipNetworks: ['{addr}/32']\n  profiles: [kns.{ns}]\n"
    ))
}

/// "Allow from the same namespace": UDP 7000 from anything there, TCP from each app, ICMP.
fn same_namespace_policy(ns: &str) -> Resource {
    let mut rules = String::from(
        "  - {action: Allow, protocol: UDP, destination: {ports: [7000]}, source: {selector: all()}}\n",
    );
    for k in 0..8 {
        rules.push_str(&format!(
            "  - {{action: Allow, protocol: TCP, destination: {{ports: [{}]}}, source: {{selector: app == 'a{}'}}}}\n",
            80 + k,
            k % APPS
        ));
    }
    rules.push_str("  - {action: Allow, protocol: ICMP, source: {selector: has(app)}}\n");
    resource(&format!(
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: same-namespace, namespace: {ns}}}\nspec:\n  order: 100\n  selector: all()\n  types: [Ingress]\n  ingress:\n{rules}"
    ))
}

/// Cross-namespace: TCP from an app in the namespaces of another team.
fn cross_namespace_policy(i: usize) -> Resource {
    let mut rules = String::new();
    for k in 0..10 {
        rules.push_str(&format!(
            "  - {{action: Allow, protocol: TCP, destination: {{ports: [{}]}}, source: {{namespaceSelector: team == 't{}', selector: app == 'a{}'}}}}\n",
            8000 + k,
            (i + k) % TEAMS,
            k % APPS
        ));
    }
    resource(&format!(
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: cross-namespace, namespace: {ns}}}\nspec:\n  order: 200\n  selector: app in {{'a0', 'a1'}}\n  types: [Ingress]\n  ingress:\n{rules}",
        ns = namespace(i)
    ))
}

/// The platform tier: monitoring may scrape everyone, some nets are refused, the rest passes
/// to the namespaces' own policies.
fn global_policy(k: usize) -> Resource {
    let mut rules = format!(
        "  - {{action: Allow, protocol: TCP, destination: {{ports: [{}]}}, source: {{selector: role == 'monitoring'}}}}\n",
        9100 + k
    );
    for n in 0..8 {
        rules.push_str(&format!(
            "  - {{action: Deny, source: {{nets: ['198.18.{}.0/24']}}}}\n",
            k * 8 + n
        ));
    }
    rules.push_str("  - {action: Pass}\n");
    resource(&format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {{name: platform.g{k}}}\nspec:\n  tier: platform\n  order: {k}\n  selector: all()\n  types: [Ingress]\n  ingress:\n{rules}"
    ))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<()> {
    if !require(
        "scale benchmark",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Bpf,
            Requirement::Etcd,
        ],
    ) {
        return Ok(());
    }
    let bin = std::env::current_exe()?
        .parent()
        .and_then(|d| d.parent())
        .context("target dir")?
        .to_path_buf();
    for program in ["calico-node", "calico"] {
        anyhow::ensure!(
            bin.join(program).exists(),
            "{} missing: cargo xtask bench scale builds it",
            bin.join(program).display()
        );
    }
    let etcd = Etcd::start()?;
    let host = NetNs::new("bs")?;
    let _forward = Forward::loopback(&host, etcd.port())?;
    let store = Store::connect(&etcd)?;
    let node = unique_name("node");

    // The cluster.
    let written = Instant::now();
    let mut objects: Vec<Resource> = Vec::new();
    // No FelixConfiguration: the default map sizes hold this cluster's IP sets (each stored
    // once, however many local endpoints consult it).
    objects.push(resource(
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: platform}\nspec: {order: 100}\n",
    ));
    objects.push(resource("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.64.0.0/16, blockSize: 26}\n"));
    for n in 0..NODES {
        objects.push(resource(&format!(
            "apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: cluster-node{n}}}\nspec: {{}}\n"
        )));
    }
    for i in 0..NAMESPACES {
        objects.push(namespace_profile(i));
        objects.push(same_namespace_policy(&namespace(i)));
        objects.push(cross_namespace_policy(i));
    }
    for k in 0..GLOBAL_POLICIES {
        objects.push(global_policy(k));
    }
    let policies = NAMESPACES * 2 + GLOBAL_POLICIES;
    let rules = NAMESPACES * 20 + GLOBAL_POLICIES * 10;
    // Remote endpoints; the local ones follow with their veths.
    for i in 0..ENDPOINTS - LOCAL {
        let monitoring = if i.is_multiple_of(100) {
            ", role: monitoring"
        } else {
            ""
        };
        objects.push(endpoint(
            &format!("cluster-node{}", i % NODES),
            &namespace(i % NAMESPACES),
            &format!("pod{i}"),
            &format!("cali{i:011x}"),
            address(i),
            (i / NAMESPACES) % APPS,
            monitoring,
        ));
    }
    // The other nodes' IPAM blocks holding those endpoints' addresses, in a pool that no
    // longer hands out addresses: what IPAM reads must not grow with them.
    objects.push(resource("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: cluster}\nspec: {cidr: 10.128.0.0/9, blockSize: 26, disabled: true}\n"));
    objects.extend(cluster_blocks());
    store.put_many(&objects)?;
    drop(objects);

    // This node: 109 endpoints on bare veths, and the server (a real namespace) in ns0.
    let mut batch = String::new();
    for j in 1..LOCAL {
        batch.push_str(&format!(
            "link add calis{j} type veth peer name ps{j}\nlink set calis{j} up\n"
        ));
    }
    let path = std::env::temp_dir().join(format!("{}.batch", host.name()));
    std::fs::write(&path, batch)?;
    host.exec_ok("ip", &["-batch", &path.display().to_string()])?;
    let _ = std::fs::remove_file(&path);
    let server = Workload::new(&host, address(ENDPOINTS - 1))?;
    let mut local = vec![endpoint(
        &node,
        "ns0",
        "server",
        &server.interface,
        server.address,
        0,
        "",
    )];
    for j in 1..LOCAL {
        local.push(endpoint(
            &node,
            &namespace(local_namespace(j)),
            &format!("local{j}"),
            &format!("calis{j}"),
            address(ENDPOINTS - 1 - j),
            j % APPS,
            "",
        ));
    }
    store.put_many(&local)?;
    // A pod of ns0 on another node: a namespace the agent does not manage, routed to through
    // this host, whose datagrams reach the server as a remote pod's would.
    let remote_address = Ipv4Addr::new(10, 127, 0, 1);
    let remote = Workload::with_host_prefix(&host, remote_address, "rmt")?;
    host.exec_ok(
        "ip",
        &[
            "route",
            "add",
            &format!("{remote_address}/32"),
            "dev",
            &remote.interface,
        ],
    )?;
    let remote_endpoint = |trusted: bool| {
        endpoint(
            "cluster-node1",
            "ns0",
            "remote",
            "caliremote",
            remote_address,
            4,
            if trusted { ", trust: 'yes'" } else { "" },
        )
    };
    store.put_many(&[
        remote_endpoint(false),
        resource("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: trusted-7001, namespace: ns0}\nspec:\n  order: 50\n  selector: all()\n  types: [Ingress]\n  ingress:\n  - {action: Allow, protocol: UDP, destination: {ports: [7001]}, source: {selector: trust == 'yes'}}\n"),
    ])?;
    let write_time = written.elapsed();
    println!(
        "cluster written in {:.1} s: {ENDPOINTS} endpoints ({LOCAL} local), {NAMESPACES} namespaces, {NODES} nodes, {} policies, {} rules",
        write_time.as_secs_f64(),
        policies + 1,
        rules + 1
    );

    // Start → every local endpoint programmed.
    let started = Instant::now();
    let mut agent = AgentProcess::start_with(
        &bin.join("calico-node"),
        &host,
        &etcd.endpoint(),
        &node,
        &["--networking-backend", "none"],
    )?;
    let ready = agent.wait_ready(&host, true, Duration::from_secs(600));
    let start_time = started.elapsed();
    if let Err(e) = ready {
        eprintln!("agent log tail:\n{}", tail(&agent.log(), 40));
        return Err(e);
    }
    let programmed = agent.metric(&host, "felix_active_local_endpoints")?;
    let rss_after_start = agent.rss_mib();

    let probe = Probe::new(&server)?;

    // (a) A remote pod's label change moves it into the set of `trust == 'yes'`.
    let (label, label_leaks) = probe.samples(
        &remote,
        7001,
        |_| store.put_many(&[remote_endpoint(false)]),
        |_| store.put_many(&[remote_endpoint(true)]),
    )?;
    // (b) A new policy.
    let (new_policy, policy_leaks) = probe.samples(
        &remote,
        7002,
        |n| {
            if n > 0 {
                store.delete(
                    calico_model::Kind::NetworkPolicy,
                    Some("ns0"),
                    &format!("allow-7002-{}", n - 1),
                )?;
            }
            Ok(())
        },
        |n| {
            store.apply(&format!("apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {{name: allow-7002-{n}, namespace: ns0}}\nspec:\n  order: 60\n  selector: all()\n  types: [Ingress]\n  ingress:\n  - {{action: Allow, protocol: UDP, destination: {{ports: [7002]}}}}\n"))
        },
    )?;
    // (c) A new local pod: CNI ADD → its first datagram through (allowed by ns0's
    // same-namespace policy once its address is in the server's set).
    let mut new_pod = Vec::new();
    let mut cni_add = Vec::new();
    let mut conf = cni_conf(&etcd.endpoint(), &node);
    // CNI_BENCH_LOG=<file>: the plugins' debug log (each ADD's phases, timed) goes there.
    if let Ok(path) = std::env::var("CNI_BENCH_LOG") {
        conf["log_level"] = "debug".into();
        conf["log_file_path"] = path.into();
    }
    // The pods' namespaces go after the last sample: deleting one starts the kernel's
    // teardown of the namespace in the background (tens of milliseconds of CPU and RTNL),
    // which would overlap the next sample's ADD.
    let mut gone_pods = Vec::with_capacity(SAMPLES);
    for n in 0..SAMPLES {
        let pod = NetNs::new("pod")?;
        let container = format!("scale{n:04}{}", std::process::id());
        let t0 = Instant::now();
        let args = format!("K8S_POD_NAMESPACE=ns0;K8S_POD_NAME=new{n}");
        cni_with_conf(&bin, &host, &conf, "ADD", &container, &pod, &args)?;
        cni_add.push(t0.elapsed());
        let arrived = probe.first_from(&pod, 7000, t0)?;
        new_pod.push(arrived - t0);
        cni_with_conf(&bin, &host, &conf, "DEL", &container, &pod, &args)?;
        // The next sample starts once the agent has applied this DEL (its last write is the
        // endpoint's deletion), as (a) and (b) start from a settled agent: an ADD then never
        // queues behind the previous pod's removal.
        agent_caught_up(&agent, &host, &store)?;
        gone_pods.push(pod);
    }
    drop(gone_pods);

    // Idle: what one node asks of etcd per second, beside its watches.
    let idle = Duration::from_secs(20);
    let before = etcd_unary_requests(&etcd)?;
    std::thread::sleep(idle);
    let after = etcd_unary_requests(&etcd)?;
    let idle_rate = (after - before) / idle.as_secs_f64();

    let metrics = agent.get(&host, "/metrics")?.1;
    let rss = agent.rss_mib();
    probe.stop();
    let log = std::env::temp_dir().join("calico-node-scale.log");
    std::fs::write(&log, agent.log())?;
    println!("(agent log: {})", log.display());

    println!("\ncalico-node at scale: {ENDPOINTS} endpoints in {NAMESPACES} namespaces on {NODES} nodes, {LOCAL} local ({programmed} programmed), {} policies / {} rules, {SAMPLES} samples per update row\n", policies + 1, rules + 1);
    println!("| measure | value | goal |");
    println!("|---|---|---|");
    println!(
        "| agent start → all local endpoints programmed | {:.2} s | < 10 s |",
        start_time.as_secs_f64()
    );
    println!(
        "| RSS after start / after the run | {rss_after_start:.1} / {rss:.1} MiB | < 300 MiB |"
    );
    for (what, samples, leaks) in [
        (
            "(a) remote pod label change → in an IP set",
            label,
            Some(label_leaks),
        ),
        ("(b) new policy", new_policy, Some(policy_leaks)),
        ("(c) new local pod: CNI ADD → first packet", new_pod, None),
        (
            "(c) of which the CNI ADD itself (until the plugin returns)",
            cni_add,
            None,
        ),
    ] {
        let mut s = samples;
        s.sort();
        let goal = if what.contains("of which") {
            "(no goal: a part of (c))"
        } else {
            "p99 < 50 ms"
        };
        println!(
            "| update → enforced, {what}: p50 / p99 (min … max) | {:.1} / {:.1} ms ({:.1} … {:.1}) | {goal} |",
            ms(percentile(&s, 0.5)),
            ms(percentile(&s, 0.99)),
            ms(s[0]),
            ms(s[s.len() - 1])
        );
        if let Some(leaks) = leaks {
            println!("| datagrams through the deny before each sample, {what} | {leaks} of {SAMPLES} | 0 |");
        }
    }
    println!("| etcd requests/s by the idle node, beside its watches | {idle_rate:.2} | 0 (the watch alone) |");
    println!("\n| eBPF map | entries | capacity |");
    println!("|---|---|---|");
    for (map, entries, capacity) in map_table(&metrics) {
        println!("| {map} | {entries} | {capacity} |");
    }
    Ok(())
}

/// Waits until the agent's dataplane reflects every datastore write made so far.
fn agent_caught_up(agent: &AgentProcess, host: &NetNs, store: &Store) -> Result<()> {
    let written = store.revision()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let applied = agent.metric(host, "felix_applied_datastore_revision")?;
        if applied >= written as f64 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the agent applied revision {applied} but not {written} within 10 s");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Unary gRPC requests etcd has started (everything but the watch and lease streams).
fn etcd_unary_requests(etcd: &Etcd) -> Result<f64> {
    let text = etcd.metrics()?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
        .filter(|l| l.contains("grpc_type=\"unary\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// (map, entries, capacity) from the agent's /metrics.
fn map_table(metrics: &str) -> Vec<(String, String, String)> {
    let value = |prefix: &str| -> BTreeMap<String, String> {
        metrics
            .lines()
            .filter_map(|l| {
                let rest = l.strip_prefix(prefix)?;
                let map = rest.split('"').nth(1)?.to_owned();
                Some((map, l.rsplit(' ').next()?.to_owned()))
            })
            .collect()
    };
    let entries = value("felix_bpf_map_entries{");
    let capacity = value("felix_bpf_map_capacity{");
    entries
        .into_iter()
        .map(|(m, e)| {
            let c = capacity.get(&m).cloned().unwrap_or_else(|| "-".into());
            (m, e, c)
        })
        .collect()
}

/// Datagrams to the server: a receiver per port, and senders from fresh source ports.
struct Probe {
    server: Ipv4Addr,
    arrivals: Arc<Mutex<BTreeMap<u16, Instant>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The next source port: each used once in a run (a tracked flow would carry an old
    /// verdict), the probe stops when they run out.
    next_port: Arc<AtomicU32>,
}

impl Probe {
    fn new(server: &Workload) -> Result<Self> {
        let arrivals: Arc<Mutex<BTreeMap<u16, Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for port in [7000u16, 7001, 7002] {
            let target = SocketAddr::from((server.address, port));
            let socket = server.ns.run(move || UdpSocket::bind(target))??;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            let (arrivals, stop) = (arrivals.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop.load(Ordering::Relaxed) {
                    if socket.recv(&mut buf).is_ok() {
                        arrivals.lock().unwrap().insert(port, Instant::now());
                    }
                }
            }));
        }
        Ok(Self {
            server: server.address,
            arrivals,
            stop,
            threads,
            next_port: Arc::new(AtomicU32::new(10000)),
        })
    }

    fn arrived_since(&self, port: u16, since: Instant) -> Option<Instant> {
        self.arrivals
            .lock()
            .unwrap()
            .get(&port)
            .copied()
            .filter(|t| *t > since)
    }

    /// Sends from `from` to the server's `port` every millisecond (fresh source ports, so no tracked
    /// flow carries a verdict over) until `until` says stop; runs on its own thread in `from`.
    fn send_while(
        &self,
        from: &NetNs,
        port: u16,
        until: Arc<AtomicBool>,
    ) -> Result<std::thread::JoinHandle<()>> {
        let target = SocketAddr::from((self.server, port));
        let ns = format!("/run/netns/{}", from.name());
        let next = self.next_port.clone();
        Ok(std::thread::spawn(move || {
            let f = std::fs::File::open(&ns).expect("netns");
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            while !until.load(Ordering::Relaxed) {
                let Ok(p) = u16::try_from(next.fetch_add(1, Ordering::Relaxed)) else {
                    eprintln!("the probe ran out of fresh source ports");
                    return;
                };
                if let Ok(s) = UdpSocket::bind(("0.0.0.0", p)) {
                    let _ = s.send_to(b"probe", target);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }))
    }

    /// `SAMPLES` rounds of: `deny(n)`, confirm nothing passes for 50 ms (a leak otherwise),
    /// then `allow(n)` and time the first datagram through.
    fn samples(
        &self,
        from: &Workload,
        port: u16,
        deny: impl Fn(usize) -> Result<()>,
        allow: impl Fn(usize) -> Result<()>,
    ) -> Result<(Vec<Duration>, usize)> {
        let mut samples = Vec::new();
        let mut leaks = 0;
        for n in 0..SAMPLES {
            deny(n)?;
            // The deny is in once nothing has come through for 200 ms (at most 10 s).
            let deadline = Instant::now() + Duration::from_secs(10);
            let quiet = Arc::new(AtomicBool::new(false));
            let sender = self.send_while(&from.ns, port, quiet.clone())?;
            let mut since = Instant::now();
            loop {
                std::thread::sleep(Duration::from_millis(10));
                if let Some(t) = self.arrived_since(port, since) {
                    since = t;
                }
                if since.elapsed() >= Duration::from_millis(200) {
                    break;
                }
                if Instant::now() > deadline {
                    quiet.store(true, Ordering::Relaxed);
                    let _ = sender.join();
                    bail!("port {port}: the deny never took effect");
                }
            }
            let probe = Instant::now();
            std::thread::sleep(Duration::from_millis(50));
            if self.arrived_since(port, probe).is_some() {
                leaks += 1;
            }
            let t0 = Instant::now();
            allow(n)?;
            let arrived = self.wait_arrival(port, t0);
            quiet.store(true, Ordering::Relaxed);
            let _ = sender.join();
            samples.push(arrived? - t0);
        }
        Ok((samples, leaks))
    }

    fn wait_arrival(&self, port: u16, since: Instant) -> Result<Instant> {
        let deadline = since + Duration::from_secs(30);
        loop {
            if let Some(t) = self.arrived_since(port, since) {
                return Ok(t);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "port {port}: nothing arrived within 30 s"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// The first datagram from `from` to `port` after `since` (sending until it arrives).
    fn first_from(&self, from: &NetNs, port: u16, since: Instant) -> Result<Instant> {
        let done = Arc::new(AtomicBool::new(false));
        let sender = self.send_while(from, port, done.clone())?;
        let arrived = self.wait_arrival(port, since);
        done.store(true, Ordering::Relaxed);
        let _ = sender.join();
        arrived
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
    }
}
