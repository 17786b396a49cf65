//! Three hosts, each its own network namespace on a shared underlay, each running the agent
//! with BIRD: the iBGP mesh comes up from the datastore, workloads made by the CNI plugin on
//! every host reach each other across hosts, a deny policy blocks one pair only, and stopping
//! one host's BIRD withdraws its routes from the others.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use harness::{require, unique_name, AgentProcess, Etcd, Forward, NetNs, Requirement};

struct Host {
    ns: NetNs,
    agent: AgentProcess,
    bird_dir: tempfile::TempDir,
    underlay_ip: String,
    workload: NetNs,
    workload_ip: IpAddr,
    /// With dual stack, the workload's IPv6 address.
    workload_ip6: Option<IpAddr>,
    _forward: Forward,
}

/// A veth from `host`'s `eth1` to `other`; returns the name of `other`'s end.
fn eth1_leg(host: &NetNs, other: &NetNs, prefix: &str) -> Result<String> {
    let leg = unique_name(prefix);
    let status = Command::new("ip")
        .args(["link", "add", "eth1", "netns", host.name(), "type", "veth"])
        .args(["peer", "name", &leg, "netns", other.name()])
        .status()?;
    anyhow::ensure!(status.success(), "ip link add eth1 in {}", host.name());
    Ok(leg)
}

/// Host `i` of a BGP test: a namespace with a leg on `underlay`'s bridge (10.99.0.<i>/24, and
/// fd99::<i>/64 with `dual_stack`), calico-node with BIRD, and a workload made by the CNI
/// plugin (an address of each family with `dual_stack`).
fn bgp_host(bin: &Path, etcd: &Etcd, underlay: &NetNs, i: u8, dual_stack: bool) -> Result<Host> {
    let ns = NetNs::new("mh")?;
    let leg = eth1_leg(&ns, underlay, "ul")?;
    underlay.exec_ok("ip", &["link", "set", &leg, "master", "br0", "up"])?;
    let underlay_ip = format!("10.99.0.{i}");
    ns.add_address("eth1", &format!("{underlay_ip}/24"))?;
    let ip6 = format!("fd99::{i}/64");
    if dual_stack {
        ns.exec_ok("ip", &["-6", "addr", "add", &ip6, "dev", "eth1", "nodad"])?;
    }
    let forward = Forward::loopback(&ns, etcd.port())?;
    let bird_dir = tempfile::tempdir()?;
    let node = format!("{}-h{i}", unique_name("n"));
    let ip = format!("{underlay_ip}/24");
    let bird = bird_dir.path().display().to_string();
    let mut args = vec![
        "--ip",
        &ip,
        "--networking-backend",
        "bird",
        "--bird-dir",
        &bird,
    ];
    if dual_stack {
        args.extend(["--ip6", &ip6]);
    }
    let agent = AgentProcess::start_with(
        &bin.join("calico-node"),
        &ns,
        &etcd.endpoint(),
        &node,
        &args,
    )?;
    // A workload through the CNI plugin (its addresses from this host's blocks).
    let workload = NetNs::new("mw")?;
    let container = format!("{}{}", unique_name("c"), "0".repeat(20));
    let mut conf = harness::cni_conf(&etcd.endpoint(), &node);
    if dual_stack {
        conf["ipam"]["assign_ipv4"] = "true".into();
        conf["ipam"]["assign_ipv6"] = "true".into();
    }
    let result = harness::cni_with_conf(bin, &ns, &conf, "ADD", &container, &workload, "")?;
    let address = |v4: bool| -> Option<IpAddr> {
        result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str())
            .filter_map(|a| a.split('/').next()?.parse::<IpAddr>().ok())
            .find(|a| a.is_ipv4() == v4)
    };
    let workload_ip = address(true).with_context(|| format!("CNI result {result}"))?;
    let workload_ip6 = address(false);
    anyhow::ensure!(
        !dual_stack || workload_ip6.is_some(),
        "no IPv6 address: {result}"
    );
    Ok(Host {
        ns,
        agent,
        bird_dir,
        underlay_ip,
        workload,
        workload_ip,
        workload_ip6,
        _forward: forward,
    })
}

impl Host {
    fn birdc(&self, args: &[&str]) -> String {
        Command::new("birdc")
            .arg("-s")
            .arg(self.bird_dir.path().join("bird.ctl"))
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn bird_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.bird_dir.path().join("bird.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        if let Some(pid) = self.bird_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn bin_dir() -> PathBuf {
    // target/<profile>/: the workspace build puts every package's binaries there.
    let dir = Path::new(env!("CARGO_BIN_EXE_calico-node"))
        .parent()
        .unwrap()
        .to_owned();
    harness::cni_plugin_dir(&dir).expect("linking calico-ipam beside calico");
    dir
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok()? {
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Who reaches whom: pings between every ordered pair of workloads.
fn matrix(workloads: &[(NetNs, IpAddr)]) -> Result<Vec<Vec<bool>>> {
    workloads
        .iter()
        .enumerate()
        .map(|(i, (from, _))| {
            workloads
                .iter()
                .enumerate()
                .map(|(j, (_, to))| if i == j { Ok(true) } else { from.ping(*to) })
                .collect()
        })
        .collect()
}

fn print_matrix(m: &[Vec<bool>]) -> String {
    let mut out = String::from("from \\ to   host1 host2 host3\n");
    for (i, row) in m.iter().enumerate() {
        out.push_str(&format!("host{}       ", i + 1));
        for (j, ok) in row.iter().enumerate() {
            out.push_str(if i == j {
                "  -   "
            } else if *ok {
                "  ok  "
            } else {
                " DENY "
            });
        }
        out.push('\n');
    }
    out
}

/// Waits (30 s at most) for the matrix to be `want`; on failure shows it with `routes_of`'s
/// routes.
fn expect_matrix(
    workloads: &[(NetNs, IpAddr)],
    routes_of: &NetNs,
    want: &dyn Fn(usize, usize) -> bool,
) -> Result<Vec<Vec<bool>>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = matrix(workloads)?;
        if m.iter().enumerate().all(|(i, row)| {
            row.iter()
                .enumerate()
                .all(|(j, ok)| i == j || *ok == want(i, j))
        }) {
            return Ok(m);
        }
        if Instant::now() > deadline {
            let routes = routes_of.exec_ok("ip", &["route"])?;
            bail!("matrix:\n{}routes on host1:\n{routes}", print_matrix(&m));
        }
    }
}

#[test]
fn three_hosts_route_workloads_over_bgp() -> Result<()> {
    let _load = harness::beside_others();
    if !require(
        "three_hosts_route_workloads_over_bgp",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Bpf,
            Requirement::Etcd,
            Requirement::Bird,
        ],
    ) {
        return Ok(());
    }
    let bin = bin_dir();
    for b in ["calico", "calico-ipam", "calicoctl"] {
        anyhow::ensure!(
            bin.join(b).exists(),
            "{} missing: build the workspace (cargo test --workspace)",
            bin.join(b).display()
        );
    }
    let etcd = Etcd::start()?;
    let store = harness::Store::connect(&etcd)?;
    let apply = |yaml: &str| store.apply(yaml);
    apply("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool\nspec:\n  cidr: 10.65.0.0/16\n  blockSize: 26\n")?;

    // The underlay: a bridge in its own namespace, one leg per host.
    let underlay = NetNs::new("ul")?;
    underlay.exec_ok("ip", &["link", "add", "br0", "type", "bridge"])?;
    underlay.exec_ok("ip", &["link", "set", "br0", "up"])?;
    let mut hosts = Vec::new();
    for i in 1..=3u8 {
        hosts.push(bgp_host(&bin, &etcd, &underlay, i, false)?);
    }
    for h in &mut hosts {
        h.agent.wait_ready(&h.ns, true, Duration::from_secs(30))?;
    }

    // The mesh comes up: two Established sessions on every host.
    for h in &hosts {
        wait_for(
            &format!("mesh on {}", h.underlay_ip),
            Duration::from_secs(60),
            || {
                Ok(h.birdc(&["show", "protocols"])
                    .matches("Established")
                    .count()
                    == 2)
            },
        )
        .with_context(|| {
            format!(
                "{}\nagent log:\n{}",
                h.birdc(&["show", "protocols"]),
                h.agent.log()
            )
        })?;
    }
    let status = Command::new(bin.join("calicoctl"))
        .args(["node", "status"])
        .env(
            "CALICO_BIRD_SOCKET",
            hosts[0].bird_dir.path().join("bird.ctl"),
        )
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("10.99.0.2")
            && status.contains("node-to-node mesh")
            && status.contains("Established"),
        "{status}"
    );
    eprintln!("calicoctl node status on host 1:\n{status}");

    let workloads = |hosts: &[Host]| -> Vec<(NetNs, IpAddr)> {
        hosts
            .iter()
            .map(|h| (NetNs::borrow(h.workload.name()), h.workload_ip))
            .collect()
    };
    let expect = |hosts: &[Host], want: &dyn Fn(usize, usize) -> bool| {
        expect_matrix(&workloads(hosts), &hosts[0].ns, want)
    };
    let m = expect(&hosts, &|_, _| true)?;
    eprintln!("workloads across hosts, no policy:\n{}", print_matrix(&m));

    // A deny for one pair only: host1's workload into host3's.
    apply(&format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: deny-1-to-3\nspec:\n  selector: all()\n  ingress:\n  - action: Deny\n    source:\n      nets: ['{}/32']\n    destination:\n      nets: ['{}/32']\n  - action: Pass\n",
        hosts[0].workload_ip, hosts[2].workload_ip
    ))?;
    let m = expect(&hosts, &|i, j| !(i == 0 && j == 2))?;
    eprintln!("with deny-1-to-3:\n{}", print_matrix(&m));

    // A configuration that cannot be used is refused loudly: agent log, metric, node status;
    // BIRD keeps running the last good one.
    let password = hosts[0].bird_dir.path().join("peer-password");
    std::fs::write(&password, "has\"quote\n")?;
    apply(&format!(
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata:\n  name: tor\nspec:\n  peerIP: 10.99.0.254\n  asNumber: 64999\n  password:\n    file: {}\n",
        password.display()
    ))?;
    let error_file = hosts[0].bird_dir.path().join("bird.error");
    wait_for("bird.error on host1", Duration::from_secs(15), || {
        Ok(error_file.exists())
    })?;
    let status = Command::new(bin.join("calicoctl"))
        .args(["node", "status"])
        .env(
            "CALICO_BIRD_SOCKET",
            hosts[0].bird_dir.path().join("bird.ctl"),
        )
        .output()?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("BIRD configuration error") && status.contains("Global_10_99_0_254"),
        "{status}"
    );
    assert!(
        hosts[0]
            .agent
            .metric(&hosts[0].ns, "felix_bird_config_errors_total")?
            >= 1.0
    );
    assert!(hosts[0].agent.log().contains("BIRD configuration refused"));
    assert_eq!(
        hosts[0]
            .birdc(&["show", "protocols"])
            .matches("Established")
            .count(),
        2,
        "the mesh stays up"
    );
    store.delete(calico_model::Kind::BGPPeer, None, "tor")?;
    wait_for("bird.error cleared", Duration::from_secs(15), || {
        Ok(!error_file.exists())
    })?;

    // BIRD dies while its agent runs: the agent starts it again and the mesh recovers.
    let old = hosts[1].bird_pid().context("host2's BIRD pid")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    wait_for("BIRD restarted on host2", Duration::from_secs(20), || {
        Ok(hosts[1].bird_pid().is_some_and(|p| p != old)
            && hosts[1]
                .birdc(&["show", "protocols"])
                .matches("Established")
                .count()
                == 2)
    })?;

    // Host 3 goes away (agent and BIRD): its block's route is withdrawn from the others.
    let host3_block = hosts[0]
        .ns
        .exec_ok("ip", &["route", "show", "proto", "bird"])?
        .lines()
        .find(|l| l.contains(&format!("via {}", hosts[2].underlay_ip)))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_owned())
        .context("host1 has no BGP route via host3")?;
    hosts[2].agent.kill9()?;
    // Stopped as a service manager stops it (SIGTERM): BIRD tells its peers, which drop
    // its routes at once. (A SIGKILL leaves them to graceful restart: stale routes are kept
    // for the restart time, 120 s, so traffic survives a quick restart.)
    let pid3 = hosts[2].bird_pid().context("host3's BIRD pid")?;
    let stopped = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid3),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    for h in &hosts[..2] {
        wait_for("host3's route withdrawn", Duration::from_secs(90), || {
            Ok(!h
                .ns
                .exec_ok("ip", &["route", "show", "proto", "bird"])?
                .contains(&host3_block))
        })?;
    }
    eprintln!(
        "host3's block {host3_block} withdrawn from hosts 1 and 2 {:.1} s after its BIRD stopped",
        stopped.elapsed().as_secs_f64()
    );
    assert!(!hosts[0].workload.ping(hosts[2].workload_ip)?);
    Ok(())
}

/// A host of the overlay test: its namespace, agent and one workload.
struct OverlayHost {
    ns: NetNs,
    agent: AgentProcess,
    workload: NetNs,
    workload_ip: IpAddr,
    _forward: Forward,
}

/// Hosts on two subnets joined only by a router, no BGP anywhere: an IPPool with
/// `vxlanMode: Always` carries workloads across (a policy enforced across the overlay);
/// `CrossSubnet` then reaches the host on the same subnet directly (no encapsulation, shown
/// in its route) while the other subnet stays encapsulated.
#[test]
fn hosts_on_two_subnets_reach_each_other_over_vxlan() -> Result<()> {
    let _load = harness::beside_others();
    if !require(
        "hosts_on_two_subnets_reach_each_other_over_vxlan",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Bpf,
            Requirement::Etcd,
        ],
    ) {
        return Ok(());
    }
    let bin = bin_dir();
    let etcd = Etcd::start()?;
    let store = harness::Store::connect(&etcd)?;
    let pool = |mode: &str| {
        format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool\nspec:\n  cidr: 10.65.0.0/16\n  blockSize: 26\n  vxlanMode: {mode}\n")
    };
    store.apply(&pool("Always"))?;

    // The router: subnet 1 (10.98.1.0/24, a bridge: hosts 1 and 3) and subnet 2
    // (10.98.2.0/24: host 2).
    let router = NetNs::new("rt")?;
    router.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    router.exec_ok("ip", &["link", "add", "br1", "type", "bridge"])?;
    router.exec_ok("ip", &["addr", "add", "10.98.1.254/24", "dev", "br1"])?;
    router.exec_ok("ip", &["link", "set", "br1", "up"])?;
    let mut hosts = Vec::new();
    for (i, underlay, gateway) in [
        (1, "10.98.1.1", "10.98.1.254"),
        (2, "10.98.2.1", "10.98.2.254"),
        (3, "10.98.1.3", "10.98.1.254"),
    ] {
        let ns = NetNs::new("vx")?;
        let leg = eth1_leg(&ns, &router, "rl")?;
        if i == 2 {
            router.exec_ok("ip", &["addr", "add", "10.98.2.254/24", "dev", &leg])?;
            router.exec_ok("ip", &["link", "set", &leg, "up"])?;
        } else {
            router.exec_ok("ip", &["link", "set", &leg, "master", "br1", "up"])?;
        }
        ns.add_address("eth1", &format!("{underlay}/24"))?;
        ns.exec_ok("ip", &["route", "add", "default", "via", gateway])?;
        let forward = Forward::loopback(&ns, etcd.port())?;
        let node = format!("{}-v{i}", unique_name("n"));
        let mut agent = AgentProcess::start_with(
            &bin.join("calico-node"),
            &ns,
            &etcd.endpoint(),
            &node,
            &[
                "--ip",
                &format!("{underlay}/24"),
                "--networking-backend",
                "none",
            ],
        )?;
        agent.wait_ready(&ns, true, Duration::from_secs(30))?;
        // The overlay is up once the agent writes the workloads' MTU (the device's).
        wait_for("the overlay's MTU file", Duration::from_secs(30), || {
            Ok(std::fs::read_to_string(agent.mtu_file()).is_ok_and(|t| t.trim() == "1450"))
        })
        .with_context(|| agent.log())?;
        let workload = NetNs::new("vw")?;
        let container = format!("{}{}", unique_name("c"), "0".repeat(20));
        // No `mtu` in the configuration: the plugin takes the agent's.
        let mut conf = harness::cni_conf(&etcd.endpoint(), &node);
        conf["mtu_file"] = agent.mtu_file().display().to_string().into();
        let result = harness::cni_with_conf(&bin, &ns, &conf, "ADD", &container, &workload, "")?;
        let workload_ip: IpAddr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("CNI result {result}"))?;
        let link = workload.exec_ok("ip", &["link", "show", "eth0"])?;
        assert!(
            link.contains("mtu 1450"),
            "the workload's MTU leaves room for VXLAN: {link}"
        );
        hosts.push(OverlayHost {
            ns,
            agent,
            workload,
            workload_ip,
            _forward: forward,
        });
    }
    let workloads: Vec<(NetNs, IpAddr)> = hosts
        .iter()
        .map(|h| (NetNs::borrow(h.workload.name()), h.workload_ip))
        .collect();
    let with_log = |e: anyhow::Error| {
        let logs: String = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| format!("--- host{} agent log:\n{}\n", i + 1, h.agent.log()))
            .collect();
        e.context(logs)
    };
    let m = expect_matrix(&workloads, &hosts[0].ns, &|_, _| true).map_err(with_log)?;
    eprintln!("vxlanMode Always, no policy:\n{}", print_matrix(&m));
    // Each host's tunnel address and MAC are on its Node, and its tunnel address is in IPAM.
    let nodes = store.list(calico_model::Kind::Node)?;
    assert_eq!(nodes.len(), 3);
    for n in &nodes {
        let calico_model::Resource::Node(n) = n else {
            unreachable!()
        };
        let tunnel = n.spec.ipv4_vxlan_tunnel_addr.as_deref().unwrap_or_default();
        assert!(tunnel.starts_with("10.65."), "{n:?}");
        assert!(n.spec.vxlan_tunnel_mac_addr.is_some(), "{n:?}");
    }
    let routes = hosts[0]
        .ns
        .exec_ok("ip", &["route", "show", "proto", "80"])?;
    eprintln!("host1's overlay routes (Always):\n{routes}");
    assert_eq!(
        routes
            .lines()
            .filter(|l| l.contains("dev vxlan.calico") && l.contains("onlink"))
            .count(),
        2,
        "both remote blocks through the tunnel:\n{routes}"
    );
    let details = hosts[0]
        .ns
        .exec_ok("ip", &["-d", "link", "show", "vxlan.calico"])?;
    assert!(
        details.contains("vxlan id 4096") && details.contains("dstport 4789"),
        "{details}"
    );
    assert!(
        details.contains("mtu 1450"),
        "the underlay's 1500 less 50: {details}"
    );

    // A policy across the overlay: host1's workload reaches no other.
    store.apply(&format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: deny-from-1\nspec:\n  selector: all()\n  ingress:\n  - action: Deny\n    source:\n      nets: ['{}/32']\n  - action: Allow\n  egress:\n  - action: Allow\n",
        hosts[0].workload_ip
    ))?;
    let m = expect_matrix(&workloads, &hosts[0].ns, &|i, _| i != 0).map_err(with_log)?;
    eprintln!("with deny-from-1 (Always):\n{}", print_matrix(&m));

    // CrossSubnet: host3 (host1's subnet) directly, host2 (the other subnet) still tunnelled.
    store.apply(&pool("CrossSubnet"))?;
    let host3_block = |routes: &str| {
        routes
            .lines()
            .find(|l| l.contains("via 10.98.1.3"))
            .map(str::to_owned)
    };
    wait_for(
        "host3 reached directly from host1",
        Duration::from_secs(30),
        || {
            Ok(host3_block(
                &hosts[0]
                    .ns
                    .exec_ok("ip", &["route", "show", "proto", "80"])?,
            )
            .is_some())
        },
    )
    .map_err(with_log)?;
    let routes = hosts[0]
        .ns
        .exec_ok("ip", &["route", "show", "proto", "80"])?;
    eprintln!("host1's overlay routes (CrossSubnet):\n{routes}");
    let direct = host3_block(&routes).unwrap_or_default();
    assert!(
        direct.contains("dev eth1") && !direct.contains("vxlan"),
        "{direct}"
    );
    assert_eq!(
        routes
            .lines()
            .filter(|l| l.contains("dev vxlan.calico"))
            .count(),
        1,
        "host2's block stays encapsulated:\n{routes}"
    );
    let m = expect_matrix(&workloads, &hosts[0].ns, &|i, _| i != 0).map_err(with_log)?;
    eprintln!("with deny-from-1 (CrossSubnet):\n{}", print_matrix(&m));
    // And without the policy every pair again.
    store.delete(calico_model::Kind::GlobalNetworkPolicy, None, "deny-from-1")?;
    expect_matrix(&workloads, &hosts[0].ns, &|_, _| true).map_err(with_log)?;
    Ok(())
}

/// Dual stack over BGP: three hosts with IPv4 and IPv6 underlay addresses, each agent with
/// BIRD, an IPv4 and an IPv6 pool, workloads with one address of each. The mesh holds an
/// IPv4 and an IPv6 session between every pair; workloads reach each other over both
/// families; an IPv6 policy denies host1's workload over IPv6 only.
#[test]
fn three_hosts_dual_stack_over_bgp() -> Result<()> {
    let _load = harness::beside_others();
    if !require(
        "three_hosts_dual_stack_over_bgp",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Bpf,
            Requirement::Etcd,
            Requirement::Bird,
        ],
    ) {
        return Ok(());
    }
    let bin = bin_dir();
    let etcd = Etcd::start()?;
    let store = harness::Store::connect(&etcd)?;
    store.apply("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: v4}\nspec: {cidr: 10.65.0.0/16, blockSize: 26}\n---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: v6}\nspec: {cidr: 'fd65::/48', blockSize: 122}\n")?;
    let underlay = NetNs::new("ul")?;
    underlay.exec_ok("ip", &["link", "add", "br0", "type", "bridge"])?;
    underlay.exec_ok("ip", &["link", "set", "br0", "up"])?;
    let mut hosts = Vec::new();
    for i in 1..=3u8 {
        hosts.push(bgp_host(&bin, &etcd, &underlay, i, true)?);
    }
    let v6_workloads: Vec<(NetNs, IpAddr)> = hosts
        .iter()
        .filter_map(|h| Some((NetNs::borrow(h.workload.name()), h.workload_ip6?)))
        .collect();
    for h in &mut hosts {
        h.agent.wait_ready(&h.ns, true, Duration::from_secs(30))?;
    }
    // Four sessions on every host: IPv4 and IPv6 to each of the two others.
    for h in &hosts {
        wait_for(
            &format!("dual-stack mesh on {}", h.underlay_ip),
            Duration::from_secs(60),
            || {
                Ok(h.birdc(&["show", "protocols"])
                    .matches("Established")
                    .count()
                    == 4)
            },
        )
        .with_context(|| {
            format!(
                "{}\nagent log:\n{}",
                h.birdc(&["show", "protocols"]),
                h.agent.log()
            )
        })?;
    }
    let v4_workloads: Vec<(NetNs, IpAddr)> = hosts
        .iter()
        .map(|h| (NetNs::borrow(h.workload.name()), h.workload_ip))
        .collect();
    let m4 = expect_matrix(&v4_workloads, &hosts[0].ns, &|_, _| true)?;
    let m6 = expect_matrix(&v6_workloads, &hosts[0].ns, &|_, _| true).with_context(|| {
        hosts[0]
            .ns
            .exec_ok("ip", &["-6", "route"])
            .unwrap_or_default()
    })?;
    eprintln!(
        "IPv4, no policy:\n{}IPv6, no policy:\n{}",
        print_matrix(&m4),
        print_matrix(&m6)
    );
    let routes6 = hosts[0]
        .ns
        .exec_ok("ip", &["-6", "route", "show", "proto", "bird"])?;
    eprintln!("host1's IPv6 routes from BGP:\n{routes6}");
    assert_eq!(
        routes6.lines().filter(|l| l.starts_with("fd65:")).count(),
        2,
        "{routes6}"
    );
    // Its own IPv6 block is blackholed (unassigned addresses in it go nowhere).
    let blackholes = hosts[0]
        .ns
        .exec_ok("ip", &["-6", "route", "show", "type", "blackhole"])?;
    assert!(blackholes.contains("fd65::"), "{blackholes}");

    // An IPv6 policy: host1's workload reaches no other over IPv6; IPv4 is untouched.
    store.apply(&format!(
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: deny-v6-from-1\nspec:\n  selector: all()\n  ingress:\n  - action: Deny\n    source:\n      nets: ['{}/128']\n  - action: Allow\n  egress:\n  - action: Allow\n",
        v6_workloads[0].1
    ))?;
    let m6 = expect_matrix(&v6_workloads, &hosts[0].ns, &|i, _| i != 0)?;
    let m4 = expect_matrix(&v4_workloads, &hosts[0].ns, &|_, _| true)?;
    eprintln!(
        "with deny-v6-from-1, IPv6:\n{}IPv4:\n{}",
        print_matrix(&m6),
        print_matrix(&m4)
    );
    Ok(())
}
