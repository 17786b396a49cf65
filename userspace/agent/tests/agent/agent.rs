//! The agent end to end: a real etcd, the calico-node binary in a host namespace, workloads in
//! their own namespaces behind `cali*` veths, policy written to the datastore, real traffic.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use calico_model::Kind;
use harness::{
    require, unique_name, AgentProcess, Etcd, Forward, NetNs, Requirement, Store, Veth, Workload,
};

const NEEDS: &[Requirement] = &[
    Requirement::Root,
    Requirement::NetNs,
    Requirement::Bpf,
    Requirement::Etcd,
];

/// etcd, a host namespace reaching it, an agent, and two workloads: a client and a server
/// whose network profile allows everything.
struct Setup {
    workloads: Vec<Workload>,
    agent: AgentProcess,
    store: Store,
    _forward: Forward,
    host: NetNs,
    etcd: Etcd,
    /// Last, so it is released after everything else is torn down.
    _load: Box<dyn std::any::Any>,
}

fn workload_yaml(node: &str, name: &str, w: &Workload, role: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata:\n  name: {node}-cni-{name}-eth0\n  namespace: default\n  labels:\n    role: {role}\nspec:\n  orchestrator: cni\n  workload: {name}\n  node: {node}\n  endpoint: eth0\n  interfaceName: {}\n  ipNetworks: ['{}/32']\n  profiles: [net1]\n",
        w.interface, w.address
    )
}

impl Setup {
    fn new() -> Result<Self> {
        Self::with_load(Box::new(harness::beside_others()))
    }

    /// The same, holding `load` (see `harness::alone`) for its whole life.
    fn with_load(load: Box<dyn std::any::Any>) -> Result<Self> {
        let etcd = Etcd::start()?;
        let host = NetNs::new("ah")?;
        let forward = Forward::loopback(&host, etcd.port())?;
        let store = Store::connect(&etcd)?;
        let node = unique_name("node");
        store.apply(
            "apiVersion: projectcalico.org/v3\nkind: Profile\nmetadata:\n  name: net1\nspec:\n  ingress: [{action: Allow}]\n  egress: [{action: Allow}]\n",
        )?;
        let client = Workload::new(&host, Ipv4Addr::new(10, 65, 0, 1))?;
        let server = Workload::new(&host, Ipv4Addr::new(10, 65, 0, 2))?;
        store.apply(&workload_yaml(&node, "client", &client, "client"))?;
        store.apply(&workload_yaml(&node, "server", &server, "server"))?;
        let agent = AgentProcess::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_calico-node")),
            &host,
            &etcd.endpoint(),
            &node,
        )?;
        let mut s = Self {
            _load: load,
            workloads: vec![client, server],
            agent,
            store,
            _forward: forward,
            host,
            etcd,
        };
        s.agent.wait_ready(&s.host, true, Duration::from_secs(30))?;
        Ok(s)
    }

    fn client(&self) -> &Workload {
        &self.workloads[0]
    }

    fn server(&self) -> &Workload {
        &self.workloads[1]
    }

    /// `calicoctl policy trace` of the client's ping (ICMP echo) into the server.
    fn trace_ping(&self) -> Result<String> {
        let calicoctl =
            std::path::Path::new(env!("CARGO_BIN_EXE_calico-node")).with_file_name("calicoctl");
        anyhow::ensure!(
            calicoctl.exists(),
            "{} is not built (cargo test --workspace builds it)",
            calicoctl.display()
        );
        let server = format!("default/{}-cni-server-eth0", self.agent.node);
        let out = std::process::Command::new(&calicoctl)
            .args([
                "policy",
                "trace",
                &server,
                &self.client().address.to_string(),
                "icmp/8",
            ])
            .env("ETCD_ENDPOINTS", self.etcd.endpoint())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "calicoctl policy trace: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Polls until the agent reports `count` programmed local endpoints.
    fn wait_programmed(&self, count: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let programmed = self
                .agent
                .metric(&self.host, "felix_active_local_endpoints")?;
            if programmed as usize == count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{programmed} endpoints programmed, expected {count}; agent log:\n{}",
                    self.agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Polls until ping from client to server gives `expected`.
    fn wait_ping(&self, expected: bool, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ok = self.client().ns.ping(self.server().address.into())?;
            if ok == expected {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "ping client→server stayed {ok}, expected {expected}; agent log:\n{}",
                    self.agent.log()
                );
            }
        }
    }
}

const DENY_CLIENT: &str = "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: deny-client\nspec:\n  selector: role == 'server'\n  ingress:\n  - action: Deny\n    source:\n      selector: role == 'client'\n  - action: Allow\n";

#[test]
fn agent_programs_policy_routes_and_metrics_from_the_datastore() -> Result<()> {
    if !require(
        "agent_programs_policy_routes_and_metrics_from_the_datastore",
        NEEDS,
    ) {
        return Ok(());
    }
    let s = Setup::new()?;
    s.wait_ping(true, Duration::from_secs(10))?;

    // Routes to both workloads through their veths, and the proxy ARP the gateway needs.
    let routes = s.host.exec_ok("ip", &["route", "show"])?;
    for w in &s.workloads {
        assert!(
            routes
                .lines()
                .any(|l| l.starts_with(&format!("{} dev {}", w.address, w.interface))),
            "no route to {} via {}:\n{routes}",
            w.address,
            w.interface
        );
        // /proc/sys/net shows the namespace of the thread that reads it.
        let path = format!("/proc/sys/net/ipv4/conf/{}/proxy_arp", w.interface);
        let proxy = s.host.run(move || std::fs::read_to_string(path))??;
        assert_eq!(proxy.trim(), "1");
    }
    assert_eq!(
        s.agent.metric(&s.host, "felix_active_local_endpoints")?,
        2.0
    );
    // The revision the dataplane reflects reaches the datastore's latest write (what a writer
    // waits on to know its change is in force; the scale benchmark does).
    let written = s.store.revision()?;
    wait_metric_above(
        &s,
        "felix_applied_datastore_revision",
        (written - 1) as f64,
        Duration::from_secs(10),
    )?;
    // Workload to workload on one host goes veth to veth in BPF (bpf_redirect after a FIB
    // lookup), not through the host's forwarding path.
    let deadline = Instant::now() + Duration::from_secs(5);
    while s
        .agent
        .metric(&s.host, "felix_bpf_packets_forwarded_total")?
        == 0.0
    {
        assert!(Instant::now() < deadline, "nothing was forwarded in BPF");
        s.client().ns.ping(s.server().address.into())?;
    }
    // Full-size datagrams (1,500-byte IP packets) too: the FIB lookup's MTU check is the
    // kernel's own (with the frame's length it answered "fragmentation needed" and they fell
    // back to the host's path).
    let target = std::net::SocketAddr::from((s.server().address, 7100));
    let listener = s
        .server()
        .ns
        .run(move || std::net::UdpSocket::bind(target))??;
    listener.set_read_timeout(Some(Duration::from_secs(5)))?;
    let sender = s
        .client()
        .ns
        .run(|| std::net::UdpSocket::bind(("0.0.0.0", 0)))??;
    let forwarded = || s.agent.metric(&s.host, "felix_bpf_packets_forwarded_total");
    let before = forwarded()?;
    const FULL: usize = 1500 - 20 - 8;
    for _ in 0..20 {
        sender.send_to(&[7u8; FULL], target)?;
    }
    let mut buf = [0u8; 2048];
    for i in 0..20 {
        let n = listener
            .recv(&mut buf)
            .with_context(|| format!("full-size datagram {i} never arrived"))?;
        assert_eq!(n, FULL);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while forwarded()? < before + 20.0 {
        assert!(
            Instant::now() < deadline,
            "{} of 20 full-size datagrams forwarded in BPF",
            forwarded()? - before
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A policy in the datastore denies, deleting it allows again.
    s.store.apply(DENY_CLIENT)?;
    s.wait_ping(false, Duration::from_secs(5))?;
    assert!(s.agent.metric(&s.host, "felix_bpf_packets_denied_total")? > 0.0);
    // `calicoctl policy trace` agrees with what the dataplane just did to the same packet.
    let trace = s.trace_ping()?;
    assert!(
        trace.contains("verdict: DENY by rule 0 of policy deny-client in tier default"),
        "{trace}"
    );
    // The programs' debug lines are off by default and switched on at run time through
    // FelixConfiguration, without reloading anything.
    assert!(
        !s.agent.log().contains("policy: deny by rule"),
        "debug lines while switched off"
    );
    s.store.apply(
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata:\n  name: default\nspec:\n  bpfLogLevel: Debug\n",
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.agent.log().contains("policy: deny by rule") {
        assert!(
            Instant::now() < deadline,
            "no eBPF debug line after bpfLogLevel: Debug; log:\n{}",
            s.agent.log()
        );
        s.client().ns.ping(s.server().address.into())?;
    }
    s.store
        .delete(Kind::GlobalNetworkPolicy, None, "deny-client")?;
    s.wait_ping(true, Duration::from_secs(5))?;
    let trace = s.trace_ping()?;
    assert!(
        trace.contains("verdict: ALLOW by rule 0 of profile net1"),
        "{trace}"
    );

    // A label change moves the client out of the policy's source set.
    s.store.apply(DENY_CLIENT)?;
    s.wait_ping(false, Duration::from_secs(5))?;
    s.store
        .apply(&workload_yaml(&s.agent.node, "client", s.client(), "other"))?;
    s.wait_ping(true, Duration::from_secs(5))?;
    let trace = s.trace_ping()?;
    assert!(
        trace.contains("verdict: ALLOW by rule 1 of policy deny-client in tier default"),
        "{trace}"
    );

    // A request line that never ends is refused after a bounded read (hyper's header limit),
    // not buffered until the agent runs out of memory; the agent answers afterwards.
    const ENDLESS: usize = 64 << 20;
    let taken = s.host.run(|| -> Result<usize> {
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, harness::HEALTH_PORT))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(harness::http::endless_request_line(stream, ENDLESS))
    })??;
    assert!(
        taken < ENDLESS / 4,
        "the health port read {taken} bytes of one request line"
    );
    let (code, body) = s.agent.get(&s.host, "/liveness")?;
    assert_eq!(code, 200, "{body}");
    let (_, metrics) = s.agent.get(&s.host, "/metrics")?;
    assert!(
        metrics.contains("felix_policy_update_latency_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains("felix_bpf_map_entries{map=\"POLICY_VERDICTS\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("felix_bpf_map_capacity{map=\"CONNTRACK\"}"),
        "{metrics}"
    );
    Ok(())
}

/// A TCP stream between the workloads, counted at both ends.
struct Stream {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    writer: std::thread::JoinHandle<Result<()>>,
    reader: std::thread::JoinHandle<Result<()>>,
}

fn in_netns<R: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> R + Send + 'static,
) -> std::thread::JoinHandle<R> {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("netns path");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

fn listen(ns: &NetNs, addr: SocketAddr) -> Result<TcpListener> {
    Ok(ns.run(move || TcpListener::bind(addr))??)
}

impl Stream {
    fn start(client: &Workload, server: &Workload, port: u16) -> Result<Self> {
        let addr = SocketAddr::from((server.address, port));
        let listener = listen(&server.ns, addr)?;
        let (stop, sent, received) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let r = received.clone();
        let reader = std::thread::spawn(move || -> Result<()> {
            let (mut conn, _) = listener.accept()?;
            let mut buf = [0u8; 65536];
            loop {
                match conn.read(&mut buf)? {
                    0 => return Ok(()),
                    n => r.fetch_add(n as u64, Ordering::Relaxed),
                };
            }
        });
        let (st, se) = (stop.clone(), sent.clone());
        let writer = in_netns(&client.ns, move || -> Result<()> {
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                .context("connecting the stream")?;
            conn.set_write_timeout(Some(Duration::from_secs(2)))?;
            let chunk = [7u8; 16384];
            while !st.load(Ordering::Relaxed) {
                conn.write_all(&chunk)
                    .context("stream write (a drop or stall)")?;
                se.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            conn.shutdown(std::net::Shutdown::Write)?;
            Ok(())
        });
        Ok(Self {
            stop,
            sent,
            received,
            writer,
            reader,
        })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Waits until at least 1 MiB more than `since` has arrived (10 s at most).
    fn wait_for_more(&self, since: u64, when: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.received() < since + (1 << 20) {
            if Instant::now() > deadline {
                bail!(
                    "the stream stalled {when}: {} bytes since",
                    self.received() - since
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn finish(self) -> Result<(u64, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.writer
            .join()
            .map_err(|_| anyhow::anyhow!("writer panicked"))??;
        self.reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))??;
        Ok((
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        ))
    }
}

/// Whether a new TCP connection from client to server:`port` gets through (a listener is
/// there, so a failure is the policy's drop: the attempt times out, it is not refused).
fn connects(client: &Workload, server: &Workload, port: u16) -> Result<bool> {
    let addr = SocketAddr::from((server.address, port));
    let listener = listen(&server.ns, addr)?;
    listener.set_nonblocking(true)?;
    let outcome = client
        .ns
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(700)))?;
    match outcome {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(false),
        Err(e) => bail!("connect to {addr} failed otherwise than by a drop: {e}"),
    }
}

#[test]
fn restart_keeps_streams_and_outage_keeps_the_dataplane() -> Result<()> {
    if !require(
        "restart_keeps_streams_and_outage_keeps_the_dataplane",
        NEEDS,
    ) {
        return Ok(());
    }
    let mut s = Setup::new()?;
    s.wait_ping(true, Duration::from_secs(10))?;
    assert!(
        connects(s.client(), s.server(), 5001)?,
        "port 5001 is open before the policy"
    );

    // kill -9 mid-stream: the pinned programs keep judging, the stream keeps flowing.
    let stream = Stream::start(s.client(), s.server(), 5000)?;
    stream.wait_for_more(0, "before the kill")?;
    s.agent.kill9()?;
    let at_kill = stream.received();
    stream.wait_for_more(at_kill, "while the agent was down")?;
    let while_down = stream.received() - at_kill;
    assert!(
        s.client().ns.ping(s.server().address.into())?,
        "ping while the agent is down"
    );

    // A policy change made while the agent is down applies once it is back.
    s.store.apply(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: close-5001\nspec:\n  selector: role == 'server'\n  ingress:\n  - action: Deny\n    protocol: TCP\n    destination:\n      ports: [5001]\n  - action: Allow\n",
    )?;
    s.agent.restart()?;
    s.agent.wait_ready(&s.host, true, Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while connects(s.client(), s.server(), 5001)? {
        assert!(
            Instant::now() < deadline,
            "the policy made while down never applied; log:\n{}",
            s.agent.log()
        );
    }
    // Positive control on the same path: the policy's final Allow still lets 5002 through.
    assert!(
        connects(s.client(), s.server(), 5002)?,
        "port 5002 closed as well"
    );
    // The stream flows under the restarted agent too, then ends with every byte delivered.
    stream.wait_for_more(stream.received(), "after the restart")?;
    let (sent, received) = stream.finish()?;
    assert_eq!(sent, received, "bytes lost across the restart");
    eprintln!(
        "stream: {sent} bytes across kill -9 and restart, {while_down} while the agent was down"
    );
    // The restarted agent adopted what was pinned and swept the old run's tables: the sweep's
    // log line is printed even when it removes nothing, so its count must be positive.
    let log = s.agent.log();
    let swept: u64 = log
        .lines()
        .filter(|l| l.contains("removed map entries of programs no endpoint uses"))
        .filter_map(|l| l.split("entries=").nth(1))
        .filter_map(|n| n.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(
        swept > 0,
        "the old run's table entries were not swept:\n{log}"
    );

    // etcd goes away: not ready, but the dataplane keeps its state.
    s.etcd.kill()?;
    s.agent
        .wait_ready(&s.host, false, Duration::from_secs(10))?;
    assert!(
        s.client().ns.ping(s.server().address.into())?,
        "ping during the etcd outage"
    );
    assert!(
        !connects(s.client(), s.server(), 5001)?,
        "policy kept during the outage"
    );
    assert!(
        connects(s.client(), s.server(), 5002)?,
        "the allowed port during the outage"
    );
    s.etcd.resume()?;
    s.agent.wait_ready(&s.host, true, Duration::from_secs(20))?;
    // The watch resumed: a change after the outage applies.
    s.store = Store::connect(&s.etcd)?;
    // (close-5001 ends in Allow and sorts first, so it would decide before deny-client.)
    s.store
        .delete(Kind::GlobalNetworkPolicy, None, "close-5001")?;
    s.store.apply(DENY_CLIENT)?;
    s.wait_ping(false, Duration::from_secs(15))?;

    // etcd hangs with its connections open (SIGSTOP): the watch's keepalive notices and
    // readiness drops, with no request of the agent's own; it comes back with etcd.
    s.etcd.freeze()?;
    let frozen = s.agent.wait_ready(&s.host, false, Duration::from_secs(30));
    s.etcd.thaw()?;
    frozen.context("readiness with etcd frozen")?;
    s.agent.wait_ready(&s.host, true, Duration::from_secs(30))?;
    Ok(())
}

/// Polls until `metric` exceeds `floor`; its value.
fn wait_metric_above(s: &Setup, metric: &str, floor: f64, timeout: Duration) -> Result<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let value = s.agent.metric(&s.host, metric)?;
        if value > floor {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!(
                "{metric} stayed at {value} (not above {floor}); agent log:\n{}",
                s.agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A policy written around calicoctl with an `Allow` whose source selector does not parse: read
/// as `all()` it would let everyone in. It must allow nothing: the endpoint it selects drops
/// that direction, as for any compile error, until the policy is fixed.
#[test]
fn a_rule_selector_that_does_not_parse_allows_nothing() -> Result<()> {
    if !require("a_rule_selector_that_does_not_parse_allows_nothing", NEEDS) {
        return Ok(());
    }
    let s = Setup::new()?;
    s.wait_ping(true, Duration::from_secs(10))?;
    // Only a `nobody` may reach the server: the client is denied.
    s.store.apply("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: server-in}\nspec:\n  order: 10\n  selector: role == 'server'\n  ingress: [{action: Allow, source: {selector: role == 'nobody'}}]\n")?;
    s.wait_ping(false, Duration::from_secs(10))?;

    let refused = s.agent.metric(&s.host, "felix_resources_refused_total")?;
    let compile_errors = s
        .agent
        .metric(&s.host, "felix_policy_compile_errors_total")?;
    s.store.put_unvalidated("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: open-up}\nspec:\n  order: 1\n  selector: role == 'server'\n  ingress: [{action: Allow, source: {selector: \"role == \"}}]\n")?;
    wait_metric_above(
        &s,
        "felix_resources_refused_total",
        refused,
        Duration::from_secs(10),
    )?;
    wait_metric_above(
        &s,
        "felix_policy_compile_errors_total",
        compile_errors,
        Duration::from_secs(10),
    )?;
    assert!(
        !s.client().ns.ping(s.server().address.into())?,
        "the unparsable selector let the client in"
    );

    // The same policy, fixed to name the client: the same path opens (positive control).
    s.store.apply("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: open-up}\nspec:\n  order: 1\n  selector: role == 'server'\n  ingress: [{action: Allow, source: {selector: role == 'client'}}]\n")?;
    s.wait_ping(true, Duration::from_secs(10))
}

/// A workload interface that appears before its WorkloadEndpoint (the CNI plugin wires it,
/// then writes the endpoint) drops traffic until the endpoint and its policy arrive.
#[test]
fn an_interface_without_its_endpoint_drops_until_the_endpoint_arrives() -> Result<()> {
    if !require(
        "an_interface_without_its_endpoint_drops_until_the_endpoint_arrives",
        NEEDS,
    ) {
        return Ok(());
    }
    let s = Setup::new()?;
    s.wait_ping(true, Duration::from_secs(10))?;
    let address = Ipv4Addr::new(10, 65, 0, 3);
    let late = Workload::new(&s.host, address)?;
    // As the CNI plugin does before writing the endpoint: the host route to the workload
    // (`proto static`, which the agent's route reconciliation leaves alone).
    s.host.exec_ok(
        "ip",
        &[
            "route",
            "add",
            &format!("{address}/32"),
            "dev",
            &late.interface,
            "proto",
            "static",
        ],
    )?;
    let dropped = s
        .agent
        .metric(&s.host, "felix_bpf_packets_no_policy_total")?;
    assert!(
        !s.client().ns.ping(address.into())?,
        "traffic reached a workload the agent knows no endpoint for"
    );
    wait_metric_above(
        &s,
        "felix_bpf_packets_no_policy_total",
        dropped,
        Duration::from_secs(10),
    )?;

    s.store
        .apply(&workload_yaml(&s.agent.node, "late", &late, "late"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.client().ns.ping(address.into())? {
        assert!(
            Instant::now() < deadline,
            "the endpoint arrived but its traffic stays dropped; log:\n{}",
            s.agent.log()
        );
    }
    Ok(())
}

/// A burst of 300 new workload interfaces at once (their endpoints already in the datastore):
/// every one gets programmed, whatever link events the burst costs the agent.
#[test]
fn a_burst_of_300_interfaces_all_get_programmed() -> Result<()> {
    if !require("a_burst_of_300_interfaces_all_get_programmed", NEEDS) {
        return Ok(());
    }
    const BURST: usize = 300;
    let s = Setup::with_load(Box::new(harness::alone()))?;
    s.wait_ping(true, Duration::from_secs(10))?;
    let name = |i: usize| format!("calib{i:04}");
    let mut endpoints = String::new();
    for i in 0..BURST {
        endpoints.push_str(&format!(
            "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata:\n  name: {node}-cni-b{i}-eth0\n  namespace: default\n  labels: {{role: burst}}\nspec:\n  orchestrator: cni\n  workload: b{i}\n  node: {node}\n  endpoint: eth0\n  interfaceName: {iface}\n  ipNetworks: ['10.66.{hi}.{lo}/32']\n  profiles: [net1]\n---\n",
            node = s.agent.node,
            iface = name(i),
            hi = i / 250,
            lo = i % 250 + 1,
        ));
    }
    s.store.apply(&endpoints)?;
    // All the veths in one netlink batch (the peers stay in the host namespace: the agent
    // only cares about the `cali` ends).
    ip_batch(
        &s.host,
        (0..BURST).map(|i| format!("link add {} type veth peer name peer{i:04}\n", name(i))),
    )?;
    s.wait_programmed(BURST + 2, Duration::from_secs(120))?;
    // The veths go (a runtime tore them down before the endpoints were deleted): the gauge of
    // programmed endpoints follows the interfaces, not the datastore.
    ip_batch(
        &s.host,
        (0..BURST).map(|i| format!("link del {}\n", name(i))),
    )?;
    s.wait_programmed(2, Duration::from_secs(60))?;
    // The earlier workloads are unaffected.
    s.wait_ping(true, Duration::from_secs(10))
}

/// Runs `ip -batch` in `host` with `lines` (one netlink request for many links).
fn ip_batch(host: &NetNs, lines: impl Iterator<Item = String>) -> Result<()> {
    let batch: String = lines.collect();
    let mut ip = std::process::Command::new("ip")
        .args(["-n", host.name(), "-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    ip.stdin
        .take()
        .context("stdin")?
        .write_all(batch.as_bytes())?;
    anyhow::ensure!(ip.wait()?.success(), "ip -batch failed");
    Ok(())
}

/// Flow logs switched on through FelixConfiguration into a directory of the test's own.
struct FlowLogs {
    dir: std::path::PathBuf,
}

impl Drop for FlowLogs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl FlowLogs {
    fn enable(s: &Setup) -> Result<FlowLogs> {
        let dir = std::env::temp_dir().join(unique_name("flow"));
        s.store.apply(&format!(
            "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {{name: default}}\nspec:\n  flowLogsFileEnabled: true\n  flowLogsFlushInterval: 1s\n  flowLogsFileDirectory: {}\n",
            dir.display()
        ))?;
        Ok(FlowLogs { dir })
    }

    fn records(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("flows.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Pings the server until a record of the client's ping at the server's endpoint
    /// satisfies `wanted` (the configuration may arrive after the first ping; each ping is a
    /// new echo id, so a new flow judged by policy).
    fn wait(
        &self,
        s: &Setup,
        what: &str,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let server_endpoint = format!("default/{}-cni-server-eth0", s.agent.node);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let _ = s.client().ns.ping(s.server().address.into())?;
            if let Some(r) = self.records().into_iter().find(|r| {
                r["proto"] == 1
                    && r["endpoint"] == server_endpoint.as_str()
                    && r["reporter"] == "dst"
                    && r["source_ip"] == s.client().address.to_string().as_str()
                    && wanted(r)
            }) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                bail!(
                    "no record {what} in {:?}; agent log:\n{}",
                    self.records(),
                    s.agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}

/// Whether `/metrics` text has `family{…policy, action, rule 0…}` above zero.
fn counted(metrics: &str, family: &str, policy: &str, action: &str) -> bool {
    metrics.lines().any(|l| {
        l.starts_with(&format!("{family}{{"))
            && l.contains(&format!("policy=\"{policy}\""))
            && l.contains(&format!("action=\"{action}\""))
            && l.contains("rule=\"0\"")
            && l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) > Some(0.0)
    })
}

/// Reads /metrics until `wanted` holds (counters are read at the periodic refresh).
fn wait_metrics(s: &Setup, wanted: impl Fn(&str) -> bool) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = s.agent.get(&s.host, "/metrics")?.1;
        if wanted(&text) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("counters missing from /metrics:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Flow logs and per-rule counters name the deciding rule: the client's ping allowed by the
/// network profile's rule, then denied by `deny-client`'s first rule, each a record in
/// `flows.log` (switched on through FelixConfiguration) and a counter on /metrics.
#[test]
fn flow_logs_and_rule_counters_name_the_deciding_rule() -> Result<()> {
    if !require("flow_logs_and_rule_counters_name_the_deciding_rule", NEEDS) {
        return Ok(());
    }
    let s = Setup::new()?;
    let flows = FlowLogs::enable(&s)?;
    let wait_record = |action: &str, policy: &str| {
        flows.wait(&s, &format!("{action} by {policy}"), |r| {
            r["action"] == action && r["policy"].as_str().is_some_and(|p| p.contains(policy))
        })
    };
    let allowed = wait_record("allow", "|net1|0|allow")?;
    assert!(allowed["packets"].as_u64() >= Some(1) && allowed["bytes"].as_u64() > Some(0));
    s.store.apply(DENY_CLIENT)?;
    s.wait_ping(false, Duration::from_secs(10))?;
    let denied = wait_record("deny", "deny-client|0|deny")?;
    assert_eq!(denied["dest_ip"], s.server().address.to_string().as_str());

    // The same two rules on /metrics (read at the periodic refresh).
    wait_metrics(&s, |text| {
        counted(
            text,
            "felix_policy_rule_packets_total",
            "deny-client",
            "deny",
        ) && counted(text, "felix_policy_rule_packets_total", "net1", "allow")
    })
}

/// Staged policies are evaluated, never enforced: a staged deny of the client leaves its
/// pings passing while their flow records say the staged rule would deny them; a staged
/// deletion of the enforced `deny-client` leaves the pings dropped while the records say the
/// profile would then allow them. Both pending verdicts are counted on /metrics.
#[test]
fn staged_policies_show_in_flow_records_without_being_enforced() -> Result<()> {
    if !require(
        "staged_policies_show_in_flow_records_without_being_enforced",
        NEEDS,
    ) {
        return Ok(());
    }
    let s = Setup::new()?;
    let flows = FlowLogs::enable(&s)?;
    s.store.apply(
        "apiVersion: projectcalico.org/v3\nkind: StagedGlobalNetworkPolicy\nmetadata: {name: block-client}\nspec:\n  selector: role == 'server'\n  ingress:\n  - action: Deny\n    source: {selector: role == 'client'}\n",
    )?;
    let staged_deny = flows.wait(&s, "allowed by net1, staged to be denied", |r| {
        r["action"] == "allow"
            && r["policy"]
                .as_str()
                .is_some_and(|p| p.contains("|net1|0|allow"))
            && r["pending_action"] == "deny"
            && r["pending_policy"] == "default|staged:block-client|0|deny"
    })?;
    assert!(staged_deny["packets"].as_u64() >= Some(1));
    // Not enforced: the pings still pass.
    s.wait_ping(true, Duration::from_secs(5))?;

    // The enforced deny, and a staged deletion of it (the staged deny withdrawn).
    s.store.apply(DENY_CLIENT)?;
    s.store.apply(
        "apiVersion: projectcalico.org/v3\nkind: StagedGlobalNetworkPolicy\nmetadata: {name: deny-client}\nspec: {stagedAction: Delete}\n",
    )?;
    s.store
        .delete(Kind::StagedGlobalNetworkPolicy, None, "block-client")?;
    s.wait_ping(false, Duration::from_secs(10))?;
    flows.wait(&s, "denied by deny-client, staged to be allowed", |r| {
        r["action"] == "deny"
            && r["policy"]
                .as_str()
                .is_some_and(|p| p.contains("deny-client|0|deny"))
            && r["pending_action"] == "allow"
            && r["pending_policy"]
                .as_str()
                .is_some_and(|p| p.contains("|net1|0|allow"))
    })?;
    // Still enforced: the deletion was only staged.
    assert!(
        !s.client().ns.ping(s.server().address.into())?,
        "a staged deletion must not lift the enforced deny"
    );
    wait_metrics(&s, |text| {
        counted(
            text,
            "felix_pending_policy_rule_packets_total",
            "staged:block-client",
            "deny",
        ) && counted(
            text,
            "felix_pending_policy_rule_packets_total",
            "net1",
            "allow",
        )
    })
}

/// A rule naming the peer's port follows the peer's WorkloadEndpoint: the client may reach
/// the server only on the server's port named `web`; moving `web` from 8080 to 9090 by
/// editing nothing but the server's endpoint moves what the client reaches (each refusal
/// beside a connection on the other port of the same server).
#[test]
fn a_named_port_of_the_peer_follows_its_workload_endpoint() -> Result<()> {
    if !require(
        "a_named_port_of_the_peer_follows_its_workload_endpoint",
        NEEDS,
    ) {
        return Ok(());
    }
    let s = Setup::new()?;
    s.wait_ping(true, Duration::from_secs(10))?;
    let _servers = (
        s.server().ns.tcp_server(8080)?,
        s.server().ns.tcp_server(9090)?,
    );
    let server_with_web = |port: u16| {
        format!(
            "{}  ports: [{{name: web, protocol: TCP, port: {port}}}]\n",
            workload_yaml(&s.agent.node, "server", s.server(), "server")
        )
    };
    let wait_connects = |port: u16, expected: bool| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let ok = s.client().ns.tcp_connects(
                s.server().address.into(),
                port,
                Duration::from_millis(500),
            )?;
            if ok == expected {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "client → server:{port} stayed {ok}, expected {expected}; agent log:\n{}",
                    s.agent.log()
                );
            }
        }
    };
    s.store.apply(&server_with_web(8080))?;
    s.store.apply(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: client-to-web}\nspec:\n  selector: role == 'client'\n  types: [Egress]\n  egress:\n  - {action: Allow, protocol: TCP, destination: {selector: role == 'server', ports: [web]}}\n",
    )?;
    wait_connects(9090, false)?;
    wait_connects(8080, true)?;
    // Only the server's endpoint changes.
    s.store.apply(&server_with_web(9090))?;
    wait_connects(8080, false)?;
    wait_connects(9090, true)?;
    Ok(())
}

/// natOutgoing: a workload reaches an "outside" namespace (which has no route back to the
/// pool) only once its pool has `natOutgoing: true`, and the outside sees the node's address
/// (then FelixConfiguration's `natOutgoingAddress`); pool-to-pool traffic keeps the
/// workload's own address.
#[test]
fn nat_outgoing_hides_pool_addresses_from_the_outside_only() -> Result<()> {
    if !require(
        "nat_outgoing_hides_pool_addresses_from_the_outside_only",
        NEEDS,
    ) {
        return Ok(());
    }
    let s = Setup::new()?;
    s.wait_ping(true, Duration::from_secs(10))?;
    let outside = NetNs::new("out")?;
    let link = Veth::between(&s.host, &outside)?;
    for address in ["192.0.2.1/24", "192.0.2.3/24"] {
        s.host
            .exec_ok("ip", &["addr", "add", address, "dev", &link.a_name])?;
    }
    s.host.exec_ok("ip", &["link", "set", &link.a_name, "up"])?;
    outside.exec_ok("ip", &["addr", "add", "192.0.2.2/24", "dev", &link.b_name])?;
    outside.exec_ok("ip", &["link", "set", &link.b_name, "up"])?;
    let outside_server = outside.tcp_server(8000)?;
    let inside_server = s.server().ns.tcp_server(9000)?;
    let outside_ip: std::net::IpAddr = "192.0.2.2".parse()?;
    let pool = |nat: bool| {
        format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: pool1}}\nspec: {{cidr: 10.65.0.0/16, natOutgoing: {nat}}}\n")
    };
    // Connects to `to:port` until a connection is accepted from `source`.
    let wait_seen = |server: &harness::TcpServer,
                     to: std::net::IpAddr,
                     port: u16,
                     source: &str|
     -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let connected = s
                .client()
                .ns
                .tcp_connects(to, port, Duration::from_millis(500))?;
            if connected && server.peers().iter().any(|p| p.ip().to_string() == source) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "no connection to {to}:{port} seen from {source} (connected: {connected}, seen: {:?}); agent log:\n{}",
                    server.peers(),
                    s.agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // A pool without natOutgoing: the outside cannot answer the pool's address.
    s.store.apply(&pool(false))?;
    wait_seen(&inside_server, s.server().address.into(), 9000, "10.65.0.1")?;
    assert!(
        !s.client()
            .ns
            .tcp_connects(outside_ip, 8000, Duration::from_secs(1))?,
        "reached the outside without natOutgoing"
    );
    assert!(
        outside_server.peers().is_empty(),
        "{:?}",
        outside_server.peers()
    );

    s.store.apply(&pool(true))?;
    wait_seen(&outside_server, outside_ip, 8000, "192.0.2.1")?;
    assert!(
        outside_server
            .peers()
            .iter()
            .all(|p| !p.ip().to_string().starts_with("10.65.")),
        "the pool's address reached the outside: {:?}",
        outside_server.peers()
    );
    // Pool to pool: not translated.
    let before = inside_server.peers().len();
    wait_seen(&inside_server, s.server().address.into(), 9000, "10.65.0.1")?;
    assert!(
        inside_server.peers()[before..]
            .iter()
            .all(|p| p.ip().to_string() == "10.65.0.1"),
        "{:?}",
        inside_server.peers()
    );

    s.store.apply(
        "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\nspec: {natOutgoingAddress: 192.0.2.3}\n",
    )?;
    wait_seen(&outside_server, outside_ip, 8000, "192.0.2.3")?;
    drop(link);
    Ok(())
}
