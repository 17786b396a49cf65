//! Dataplane benchmark: two namespaces joined by one veth (the physical limit here), the routed
//! veth path with no program, this dataplane with 0 to 10,000 rules on the endpoint (none
//! matching the test traffic, then a final allow), and the same rules as iptables-nft and
//! iptables-legacy in FORWARD: TCP throughput, UDP 64-byte packets/s and MTU-size Gbit/s
//! received (iperf3), new TCP connections/s, and for this dataplane the share of packets
//! forwarded in BPF. Every row is measured `BENCH_ROUNDS` times (default 5), the rows
//! interleaved (each round starts one row later), and the median is printed with the range.
//! `cargo xtask bench dataplane`; writes docs/bench-dataplane.md and docs/bench-dataplane.svg.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use calico_dataplane::{Hook, LoadOptions, PolicyDataplane};
use calico_model::{
    spec::{Action, EntityRule, Rule},
    Port, Protocol,
};
use calico_policy::{CompiledProgram, Direction, EndpointId, EndpointInfo, PolicyInfo, World};
use harness::{require, NetNs, Requirement, Veth};

const SECONDS: u64 = 3;

#[derive(Debug, Clone, Copy)]
enum Setup {
    /// Client and server on the two ends of one veth: no routing at all.
    Direct,
    Plain,
    Ebpf(usize),
    Nft(usize),
    Legacy(usize),
}

impl Setup {
    fn label(&self) -> String {
        match self {
            Setup::Direct => "one veth, no routing (physical limit)".into(),
            Setup::Plain => "routed veth, no program".into(),
            Setup::Ebpf(n) => format!("eBPF dataplane, {n} rules"),
            Setup::Nft(n) => format!("iptables-nft, {n} rules"),
            Setup::Legacy(n) => format!("iptables-legacy, {n} rules"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Figures {
    tcp_gbps: f64,
    udp_kpps: f64,
    udp_mtu_gbps: f64,
    conns_per_s: f64,
    /// This dataplane only: packets forwarded in BPF per packet that passed a workload's hook
    /// (each packet passes two).
    bpf_share: Option<f64>,
}

struct Topology {
    client: NetNs,
    router: NetNs,
    server: NetNs,
    server_ip: IpAddr,
    client_ip: IpAddr,
    router_server_if: String,
    router_client_if: String,
    _veths: Vec<Veth>,
}

/// Client and server on one veth.
fn direct_topology() -> anyhow::Result<Topology> {
    let router = NetNs::new("br")?;
    let client = NetNs::new("bc")?;
    let server = NetNs::new("bs")?;
    let link = Veth::between(&client, &server)?;
    client.add_address(&link.a_name, "198.18.71.1/30")?;
    server.add_address(&link.b_name, "198.18.71.2/30")?;
    Ok(Topology {
        server_ip: "198.18.71.2".parse()?,
        client_ip: "198.18.71.1".parse()?,
        router_server_if: String::new(),
        router_client_if: String::new(),
        client,
        router,
        server,
        _veths: vec![link],
    })
}

fn topology() -> anyhow::Result<Topology> {
    let router = NetNs::new("br")?;
    let client = NetNs::new("bc")?;
    let server = NetNs::new("bs")?;
    router.exec_ok("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
    let to_client = Veth::between(&router, &client)?;
    let to_server = Veth::between(&router, &server)?;
    router.add_address(&to_client.a_name, "198.18.70.1/30")?;
    client.add_address(&to_client.b_name, "198.18.70.2/30")?;
    router.add_address(&to_server.a_name, "198.18.70.5/30")?;
    server.add_address(&to_server.b_name, "198.18.70.6/30")?;
    client.exec_ok("ip", &["route", "add", "default", "via", "198.18.70.1"])?;
    server.exec_ok("ip", &["route", "add", "default", "via", "198.18.70.5"])?;
    Ok(Topology {
        server_ip: "198.18.70.6".parse()?,
        client_ip: "198.18.70.2".parse()?,
        router_server_if: to_server.a_name.clone(),
        router_client_if: to_client.a_name.clone(),
        client,
        router,
        server,
        _veths: vec![to_client, to_server],
    })
}

/// Deny rules (one source /32 and one port each, none matching the test traffic), then allow.
fn rule_net(i: usize) -> String {
    format!("10.{}.{}.{}/32", 100 + i / 65536, (i / 256) % 256, i % 256)
}

fn rule_port(i: usize) -> u16 {
    (10_000 + i % 50_000) as u16
}

fn world(n: usize, server: IpAddr) -> World {
    let mut w = World::default();
    w.endpoints.insert(
        EndpointId {
            namespace: Some("default".into()),
            name: "server".into(),
        },
        EndpointInfo {
            addresses: vec![server],
            ports: Vec::new(),
            ..Default::default()
        },
    );
    let mut ingress: Vec<Rule> = (0..n)
        .map(|i| Rule {
            protocol: Some(Protocol::Name("TCP".into())),
            source: EntityRule {
                nets: vec![rule_net(i)],
                ..Default::default()
            },
            destination: EntityRule {
                ports: vec![Port::Number(i64::from(rule_port(i)))],
                ..Default::default()
            },
            ..Rule::new(Action::Deny)
        })
        .collect();
    ingress.push(Rule::new(Action::Allow));
    w.put_policy(PolicyInfo {
        name: "bench".into(),
        namespace: None,
        tier: "default".into(),
        order: None,
        selector: calico_selector::Selector::all(),
        namespace_selector: None,
        types: vec![
            calico_model::spec::PolicyType::Ingress,
            calico_model::spec::PolicyType::Egress,
        ],
        ingress: ingress.into(),
        egress: vec![Rule::new(Action::Allow)].into(),
    });
    w
}

fn iptables(topo: &Topology, binary: &str, n: usize) -> anyhow::Result<()> {
    let mut rules =
        String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for i in 0..n {
        writeln!(
            rules,
            "-A FORWARD -s {} -p tcp --dport {} -j DROP",
            rule_net(i),
            rule_port(i)
        )?;
    }
    rules.push_str("-A FORWARD -j ACCEPT\nCOMMIT\n");
    let mut child = Command::new("ip")
        .args(["netns", "exec", topo.router.name(), binary])
        .stdin(Stdio::piped())
        .spawn()?;
    child.stdin.take().unwrap().write_all(rules.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "{binary} failed");
    Ok(())
}

/// TCP Gbit/s, or UDP (payload `udp` bytes) kpps received and Gbit/s received.
fn iperf(topo: &Topology, udp: Option<usize>) -> anyhow::Result<(f64, f64)> {
    let mut server = Command::new("ip")
        .args(["netns", "exec", topo.server.name(), "iperf3", "-s", "-1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let target = topo.server_ip.to_string();
    let secs = SECONDS.to_string();
    let mut args = vec!["-c", &target, "-t", &secs, "-J"];
    let len = udp.map(|l| l.to_string());
    if let Some(len) = &len {
        args.extend(["-u", "-b", "0", "-l", len]);
    }
    let out = topo.client.exec("iperf3", &args)?;
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if let Some(len) = udp {
        let sum = &json["end"]["sum"];
        let received =
            sum["packets"].as_f64().unwrap_or(0.0) - sum["lost_packets"].as_f64().unwrap_or(0.0);
        let per_s = received / sum["seconds"].as_f64().unwrap_or(1.0);
        Ok((per_s / 1000.0, per_s * len as f64 * 8.0 / 1e9))
    } else {
        let gbps = json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9;
        Ok((gbps, gbps))
    }
}

/// Closing `socket` sends a reset and leaves no state behind (no TIME_WAIT).
fn reset_on_close(socket: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(
        socket,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
}

const CONNECTION_PORTS: std::ops::Range<u16> = 7070..7078;

/// New TCP connections per second: connect, then close with RST (no TIME_WAIT pile-up).
///
/// At 20,000 a second the client's ephemeral ports wrap within a run, and a SYN that reuses a
/// recent 4-tuple is sometimes lost, on every path alike, costing a 1 s retransmission (3 s
/// of 3 in the worst runs): the client gets the widest port range and rotates over
/// [`CONNECTION_PORTS`] server ports, so a 4-tuple comes back only after minutes.
fn connections(topo: &Topology) -> anyhow::Result<f64> {
    topo.client.exec_ok(
        "sysctl",
        &["-qw", "net.ipv4.ip_local_port_range=1024 65535"],
    )?;
    let addrs: Vec<SocketAddr> = CONNECTION_PORTS
        .map(|p| SocketAddr::new(topo.server_ip, p))
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let listeners = CONNECTION_PORTS
        .map(|p| {
            let l = topo.server.run(|| TcpListener::bind(("0.0.0.0", p)))??;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .collect::<anyhow::Result<Vec<TcpListener>>>()?;
    let count = std::thread::scope(|s| -> anyhow::Result<usize> {
        let acceptor = s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut accepted = false;
                for listener in &listeners {
                    // Reset, not closed: no server-side state outlives the connection.
                    if let Ok((c, _)) = listener.accept() {
                        accepted = true;
                        reset_on_close(&c);
                        drop(c);
                    }
                }
                if !accepted {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        });
        let count = topo.client.run(|| {
            let deadline = Instant::now() + Duration::from_secs(SECONDS);
            let mut n = 0usize;
            while Instant::now() < deadline {
                let addr = &addrs[n % addrs.len()];
                if let Ok(c) = TcpStream::connect_timeout(addr, Duration::from_secs(1)) {
                    reset_on_close(&c);
                    n += 1;
                }
            }
            n
        })?;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = acceptor.join();
        Ok(count)
    })?;
    Ok(count as f64 / SECONDS as f64)
}

fn run(setup: Setup) -> anyhow::Result<(Figures, String)> {
    let topo = match setup {
        Setup::Direct => direct_topology()?,
        _ => topology()?,
    };
    let mut note = String::new();
    let dp = match setup {
        Setup::Direct | Setup::Plain => None,
        Setup::Nft(n) => {
            iptables(&topo, "iptables-nft-restore", n)?;
            None
        }
        Setup::Legacy(n) => {
            iptables(&topo, "iptables-legacy-restore", n)?;
            None
        }
        Setup::Ebpf(n) => {
            let (mut dp, _) = PolicyDataplane::load(&LoadOptions::default())?;
            let ifname = topo.router_server_if.clone();
            topo.router.run(|| dp.attach(&ifname))??;
            let ifindex = topo.router.ifindex(&ifname)?;
            let w = world(n, topo.server_ip);
            let id = EndpointId {
                namespace: Some("default".into()),
                name: "server".into(),
            };
            let start = Instant::now();
            for direction in [Direction::Ingress, Direction::Egress] {
                let hook = Hook::for_direction(direction);
                let compiled = CompiledProgram::compile(
                    &w,
                    &w.program(&id, direction),
                    &[topo.server_ip],
                    direction,
                )?;
                dp.install(ifindex, hook, &compiled)?;
            }
            note = format!(
                "compiled and loaded in {:.2} s",
                start.elapsed().as_secs_f64()
            );
            // The client is an endpoint too (allowed everything), as every workload veth has
            // the classifiers: traffic between the two is then forwarded in BPF.
            let client_if = topo.router_client_if.clone();
            topo.router.run(|| dp.attach(&client_if))??;
            let client_index = topo.router.ifindex(&client_if)?;
            let allow_all = calico_policy::PolicyProgram {
                tiers: vec![],
                profiles: vec![(
                    "allow-all".into(),
                    vec![calico_model::spec::Rule::new(
                        calico_model::spec::Action::Allow,
                    )],
                )],
            };
            for direction in [Direction::Ingress, Direction::Egress] {
                let hook = Hook::for_direction(direction);
                let compiled = CompiledProgram::compile(
                    &calico_policy::World::default(),
                    &allow_all,
                    &[topo.client_ip],
                    direction,
                )?;
                dp.install(client_index, hook, &compiled)?;
            }
            Some(dp)
        }
    };
    let mut figures = Figures {
        tcp_gbps: iperf(&topo, None)?.0,
        udp_kpps: iperf(&topo, Some(64))?.0,
        udp_mtu_gbps: iperf(&topo, Some(1472))?.1,
        conns_per_s: connections(&topo)?,
        bpf_share: None,
    };
    if let Some(dp) = &dp {
        let c = dp.counters()?;
        let passed = (c.allowed + c.tracked) as f64 / 2.0;
        figures.bpf_share = Some(c.forwarded as f64 / passed.max(1.0));
    }
    Ok((figures, note))
}

/// A chart title and how to read its value from the figures.
type Metric = (&'static str, fn(&Figures) -> f64);

fn svg(rows: &[(String, Figures)]) -> String {
    let metrics: [Metric; 4] = [
        ("TCP Gbit/s", |f| f.tcp_gbps),
        ("UDP 64-byte kpps", |f| f.udp_kpps),
        ("UDP 1,472-byte Gbit/s", |f| f.udp_mtu_gbps),
        ("new TCP connections/s", |f| f.conns_per_s),
    ];
    let (bar_h, gap, label_w, chart_w) = (14.0, 4.0, 240.0, 360.0);
    let block = rows.len() as f64 * (bar_h + gap) + 30.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n",
        label_w + chart_w + 80.0,
        block * metrics.len() as f64 + 10.0
    );
    for (m, (title, value)) in metrics.iter().enumerate() {
        let top = m as f64 * block + 15.0;
        let max = rows
            .iter()
            .map(|(_, f)| value(f))
            .fold(0.0f64, f64::max)
            .max(1e-9);
        writeln!(
            out,
            "<text x=\"4\" y=\"{top}\" font-weight=\"bold\">{title}</text>"
        )
        .ok();
        for (i, (label, f)) in rows.iter().enumerate() {
            let y = top + 8.0 + i as f64 * (bar_h + gap);
            let w = value(f) / max * chart_w;
            writeln!(
                out,
                "<text x=\"4\" y=\"{}\">{label}</text>",
                y + bar_h - 3.0
            )
            .ok();
            writeln!(out, "<rect x=\"{label_w}\" y=\"{y}\" width=\"{w:.1}\" height=\"{bar_h}\" fill=\"#3b7dd8\"/>").ok();
            writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{}\">{:.1}</text>",
                label_w + w + 4.0,
                y + bar_h - 3.0,
                value(f)
            )
            .ok();
        }
    }
    out.push_str("</svg>\n");
    out
}

fn main() -> anyhow::Result<()> {
    if !require(
        "dataplane benchmark",
        &[Requirement::Root, Requirement::NetNs, Requirement::Bpf],
    ) {
        return Ok(());
    }
    const ALL_ROWS: usize = 7;
    let setups: [Setup; ALL_ROWS] = [
        Setup::Direct,
        Setup::Plain,
        Setup::Ebpf(0),
        Setup::Ebpf(1_000),
        Setup::Ebpf(10_000),
        Setup::Nft(10_000),
        Setup::Legacy(10_000),
    ];
    // BENCH_ROWS=2,3 measures only those rows (by position, from 0): for working on one path.
    let setups: Vec<Setup> = match std::env::var("BENCH_ROWS") {
        Ok(rows) => rows
            .split(',')
            .filter_map(|r| r.trim().parse::<usize>().ok())
            .filter_map(|r| setups.get(r).copied())
            .collect(),
        Err(_) => setups.to_vec(),
    };
    anyhow::ensure!(!setups.is_empty(), "BENCH_ROWS selects no row");
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(5)
        .max(1);
    let mut samples: Vec<Vec<Figures>> = vec![Vec::new(); setups.len()];
    let mut notes = Vec::new();
    for round in 0..rounds {
        // Interleaved: each round starts one row later, so drift in the machine's state is
        // spread over every row instead of landing on one.
        for k in 0..setups.len() {
            let i = (round + k) % setups.len();
            let setup = setups[i];
            eprintln!("round {}/{rounds}: {}", round + 1, setup.label());
            let (f, note) = run(setup)?;
            if round == 0 && !note.is_empty() {
                notes.push(format!("{}: {note}", setup.label()));
            }
            samples[i].push(f);
        }
    }
    let summary = |i: usize, value: fn(&Figures) -> f64| -> (f64, f64, f64) {
        let mut v: Vec<f64> = samples[i].iter().map(value).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let cell = |i: usize, value: fn(&Figures) -> f64, digits: usize| {
        let (median, lo, hi) = summary(i, value);
        format!("{median:.digits$} ({lo:.digits$}–{hi:.digits$})")
    };
    let mut table = format!("Median of {rounds} interleaved runs (min–max), {SECONDS} s per figure.\n\n| path | TCP Gbit/s | UDP 64-byte kpps received | UDP 1,472-byte Gbit/s received | new TCP connections/s | packets forwarded in BPF |\n|---|---|---|---|---|---|\n");
    for (i, s) in setups.iter().enumerate() {
        let share = if samples[i].iter().all(|f| f.bpf_share.is_some()) {
            let (m, lo, hi) = summary(i, |f| f.bpf_share.unwrap_or(0.0) * 100.0);
            format!("{m:.1} % ({lo:.1}–{hi:.1})")
        } else {
            "–".into()
        };
        writeln!(
            table,
            "| {} | {} | {} | {} | {} | {share} |",
            s.label(),
            cell(i, |f| f.tcp_gbps, 2),
            cell(i, |f| f.udp_kpps, 0),
            cell(i, |f| f.udp_mtu_gbps, 2),
            cell(i, |f| f.conns_per_s, 0),
        )?;
    }
    let median = |want: &str| -> Option<Figures> {
        let i = setups.iter().position(|s| s.label() == want)?;
        Some(Figures {
            tcp_gbps: summary(i, |f| f.tcp_gbps).0,
            udp_kpps: summary(i, |f| f.udp_kpps).0,
            udp_mtu_gbps: summary(i, |f| f.udp_mtu_gbps).0,
            conns_per_s: summary(i, |f| f.conns_per_s).0,
            bpf_share: None,
        })
    };
    let mut verdicts = String::new();
    if let (Some(plain), Some(e0), Some(e10k), Some(nft10k)) = (
        median("routed veth, no program"),
        median("eBPF dataplane, 0 rules"),
        median("eBPF dataplane, 10000 rules"),
        median("iptables-nft, 10000 rules"),
    ) {
        let ratio = |a: f64, b: f64| a / b.max(1e-9);
        writeln!(verdicts, "- 0 rules vs the plain routed path (medians): TCP {:.2}x, UDP 64 B {:.2}x, UDP MTU {:.2}x, connections {:.2}x (target: at least 1.0x for TCP and UDP 64 B)",
            ratio(e0.tcp_gbps, plain.tcp_gbps), ratio(e0.udp_kpps, plain.udp_kpps), ratio(e0.udp_mtu_gbps, plain.udp_mtu_gbps), ratio(e0.conns_per_s, plain.conns_per_s))?;
        writeln!(verdicts, "- 10,000 rules vs 0 rules: TCP {:.2}x, UDP 64 B {:.2}x, connections {:.2}x (target: at least 0.9x on all three)",
            ratio(e10k.tcp_gbps, e0.tcp_gbps), ratio(e10k.udp_kpps, e0.udp_kpps), ratio(e10k.conns_per_s, e0.conns_per_s))?;
        writeln!(verdicts, "- 10,000 rules vs iptables-nft with the same rules: TCP {:.1}x, UDP 64 B {:.1}x, connections {:.1}x (target: at least 10x for TCP)",
            ratio(e10k.tcp_gbps, nft10k.tcp_gbps), ratio(e10k.udp_kpps, nft10k.udp_kpps), ratio(e10k.conns_per_s, nft10k.conns_per_s))?;
    }
    let labelled: Vec<(String, Figures)> = setups
        .iter()
        .filter_map(|s| Some((s.label(), median(&s.label())?)))
        .collect();
    println!("\n{table}\n{verdicts}");
    for n in &notes {
        println!("{n}");
    }
    if setups.len() < ALL_ROWS {
        // A partial run is for working on a path, not the record.
        return Ok(());
    }
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    std::fs::create_dir_all(&docs)?;
    std::fs::write(
        docs.join("bench-dataplane.md"),
        format!(
            "# Dataplane benchmark\n\n`cargo xtask bench dataplane`: client and server namespaces routed through a third; the \
             policy is the server's, on the router's veth toward it (eBPF; the client's veth carries an allow-all program, so traffic \
             between them is forwarded veth to veth in BPF) or in the router's FORWARD chain (iptables). \
             2 vCPUs.\n\n{table}\n{verdicts}\n{}\n\n![chart (medians)](bench-dataplane.svg)\n",
            notes.join("\n\n")
        ),
    )?;
    std::fs::write(docs.join("bench-dataplane.svg"), svg(&labelled))?;
    Ok(())
}
