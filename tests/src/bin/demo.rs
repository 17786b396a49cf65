//! The main job, as far as the project has grown: a real etcd, workloads in network namespaces
//! behind a host namespace that routes between them, and the eBPF source filter on the server
//! workload's host-side interface. A GlobalNetworkSet in etcd names the sources to deny; the demo
//! reads it back from etcd, programs the filter's maps from it, and prints reachability before
//! and after. It exits non-zero if what it observes is not what the filter should do.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use calico_dataplane::{
    spawn_log_pump, tcx_programs, AttachMode, Direction, LoadOptions, SourceFilter,
};
use etcd_client::Client;
use harness::{require, Etcd, NetNs, Requirement, Veth};
use ipnet::IpNet;

/// Where upstream Calico keeps a GlobalNetworkSet named `demo-denied-clients` in etcd.
const NETWORK_SET_KEY: &str =
    "/calico/resources/v3/projectcalico.org/globalnetworksets/demo-denied-clients";

/// A workload namespace joined to the host namespace by a veth.
struct Workload {
    name: &'static str,
    ns: NetNs,
    v4: IpAddr,
    v6: IpAddr,
    /// The veth end in the host namespace (where Calico attaches its programs).
    host_if: String,
    _veth: Veth,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    if !require(
        "calico-demo",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Bpf,
            Requirement::Etcd,
        ],
    ) {
        bail!("the demo needs root, network namespaces, BPF and etcd (see above)");
    }

    banner("etcd");
    let etcd = Etcd::start()?;
    println!("etcd is healthy at {}", etcd.endpoint());
    let mut client = Client::connect([etcd.endpoint()], None)
        .await
        .with_context(|| format!("connecting to etcd at {}", etcd.endpoint()))?;

    banner("workloads");
    let host = NetNs::new("host")?;
    for sysctl in [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv6.conf.default.forwarding=1",
    ] {
        host.exec_ok("sysctl", &["-qw", sysctl])?;
    }
    let workloads = [
        workload(&host, "client-a", 1)?,
        workload(&host, "client-b", 2)?,
        workload(&host, "server", 3)?,
    ];
    for w in &workloads {
        println!(
            "{:<9} netns {:<16} {} {}  host side {}",
            w.name,
            w.ns.name(),
            w.v4,
            w.v6,
            w.host_if
        );
    }
    let [client_a, client_b, server] = &workloads;
    let clients = [client_a, client_b];

    banner("reachability before any policy");
    let before = matrix(&clients, server)?;

    banner("deny client-b: a GlobalNetworkSet in etcd, compiled into the filter's LPM tries");
    let network_set = network_set_json(&[client_b.v4, client_b.v6]);
    client
        .put(NETWORK_SET_KEY, network_set.clone(), None)
        .await
        .context("writing the GlobalNetworkSet")?;
    println!("put {NETWORK_SET_KEY}\n    {network_set}");
    let nets = read_denied_nets(&mut client).await?;

    let (mut filter, logger) = SourceFilter::load(&LoadOptions {
        // Program log lines show with `RUST_LOG=debug cargo xtask demo`.
        log_level: Some(aya_log::Level::Debug),
        ..Default::default()
    })?;
    let _pump = logger.map(spawn_log_pump).transpose()?;
    // Toward the workload = egress of its host-side veth, as Calico attaches ingress policy.
    let server_if = server.host_if.clone();
    let mode = host.run(|| filter.attach(&server_if, Direction::Egress))??;
    for (rule_id, net) in (1..).zip(&nets) {
        filter.deny(*net, rule_id)?;
        println!("deny source {net} (rule {rule_id})");
    }

    banner("the kernel's view while attached");
    println!(
        "program id {} attached to {server_if} egress as {mode:?}",
        filter.program_id()?
    );
    match mode {
        AttachMode::Tcx => {
            let names = host.run(|| tcx_programs(&server_if, Direction::Egress))??;
            println!("TCX programs on {server_if} egress: {names:?}");
        }
        AttachMode::Clsact => print!(
            "{}",
            host.exec_ok("bpftool", &["net", "show", "dev", &server_if])?
        ),
    }
    print!(
        "{}",
        harness_cmd("bpftool", &["prog", "show", "name", "source_filter"])?
    );

    banner("reachability with client-b denied");
    let after = matrix(&clients, server)?;
    let counters = filter.counters()?;
    println!(
        "filter counters: {} passed, {} dropped",
        counters.passed, counters.dropped
    );

    // The filter must have changed exactly client-b's row.
    let expected_after = [before[0], [false, false]];
    if before != [[true, true], [true, true]] || after != expected_after {
        bail!("unexpected reachability: before {before:?}, after {after:?}");
    }
    println!("\nresult: client-a still reaches server; client-b is dropped by the eBPF filter");
    Ok(())
}

/// Creates workload `index` with a /30 (and /64) link to the host namespace, routed by it.
fn workload(host: &NetNs, name: &'static str, index: u8) -> Result<Workload> {
    let ns = NetNs::new("wl")?;
    let veth = Veth::between(host, &ns)?;
    let base = 4 * index;
    host.add_address(&veth.a_name, &format!("198.18.100.{}/30", base + 1))?;
    host.add_address(&veth.a_name, &format!("fd00:de:{index}::1/64"))?;
    ns.add_address(&veth.b_name, &format!("198.18.100.{}/30", base + 2))?;
    ns.add_address(&veth.b_name, &format!("fd00:de:{index}::2/64"))?;
    ns.exec_ok(
        "ip",
        &[
            "route",
            "add",
            "default",
            "via",
            &format!("198.18.100.{}", base + 1),
        ],
    )?;
    ns.exec_ok(
        "ip",
        &[
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd00:de:{index}::1"),
        ],
    )?;
    Ok(Workload {
        name,
        v4: format!("198.18.100.{}", base + 2).parse()?,
        v6: format!("fd00:de:{index}::2").parse()?,
        host_if: veth.a_name.clone(),
        ns,
        _veth: veth,
    })
}

/// Pings the server from each client over IPv4 and IPv6 and prints the table.
fn matrix(clients: &[&Workload; 2], server: &Workload) -> Result<[[bool; 2]; 2]> {
    println!("{:<10} {:>22} {:>22}", "from \\ to", server.v4, server.v6);
    let mut rows = [[false; 2]; 2];
    for (row, client) in rows.iter_mut().zip(clients) {
        *row = [client.ns.ping(server.v4)?, client.ns.ping(server.v6)?];
        let cell = |ok: bool| if ok { "reachable" } else { "DROPPED" };
        println!(
            "{:<10} {:>22} {:>22}",
            client.name,
            cell(row[0]),
            cell(row[1])
        );
    }
    Ok(rows)
}

/// A GlobalNetworkSet in upstream's JSON form, holding one host prefix per address.
fn network_set_json(addrs: &[IpAddr]) -> String {
    let nets: Vec<String> = addrs.iter().map(|a| IpNet::from(*a).to_string()).collect();
    serde_json::json!({
        "kind": "GlobalNetworkSet",
        "apiVersion": "projectcalico.org/v3",
        "metadata": { "name": "demo-denied-clients", "labels": { "role": "denied" } },
        "spec": { "nets": nets },
    })
    .to_string()
}

/// Reads the network set back from etcd and parses `spec.nets`.
async fn read_denied_nets(client: &mut Client) -> Result<Vec<IpNet>> {
    let response = client.get(NETWORK_SET_KEY, None).await?;
    let kv = response
        .kvs()
        .first()
        .with_context(|| format!("{NETWORK_SET_KEY} missing right after it was written"))?;
    let value: serde_json::Value = serde_json::from_slice(kv.value())
        .with_context(|| format!("{NETWORK_SET_KEY}: not JSON"))?;
    let nets = value["spec"]["nets"]
        .as_array()
        .with_context(|| format!("{NETWORK_SET_KEY}: spec.nets is not a list"))?;
    nets.iter()
        .enumerate()
        .map(|(i, n)| {
            n.as_str()
                .and_then(|s| s.parse::<IpNet>().ok())
                .with_context(|| format!("{NETWORK_SET_KEY}: spec.nets[{i}]: {n} is not a CIDR"))
        })
        .collect()
}

fn harness_cmd(program: &str, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn banner(what: &str) {
    println!("\n--- {what}");
}
