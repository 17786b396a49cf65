//! The main job: a real etcd on loopback, the calico-node agent in a host network namespace,
//! three workloads wired by the `calico` CNI plugin (addresses from `calico-ipam`), and a
//! policy applied with `calicoctl`. It prints the reachability matrix before and after the
//! policy and exits non-zero if what it observes is not what the policy says.

use std::{
    io::Write,
    net::IpAddr,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use harness::{require, unique_name, AgentProcess, Etcd, Forward, NetNs, Requirement};

const ROLES: [&str; 3] = ["frontend", "backend", "db"];

const POLICY: &str = "apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata:
  name: db-from-backend-only
spec:
  selector: role == 'db'
  types: [Ingress]
  ingress:
  - action: Allow
    source:
      selector: role == 'backend'
";

struct Workload {
    role: &'static str,
    ns: NetNs,
    container_id: String,
    address: IpAddr,
    endpoint: String,
}

fn main() -> Result<()> {
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
    let bin = std::env::current_exe()?
        .parent()
        .context("the demo's directory")?
        .to_owned();
    harness::cni_plugin_dir(&bin)?;
    for b in ["calico-node", "calico", "calico-ipam", "calicoctl"] {
        if !bin.join(b).exists() {
            bail!(
                "{} is missing: run `cargo xtask demo`, which builds it",
                bin.join(b).display()
            );
        }
    }

    banner("etcd");
    let etcd = Etcd::start()?;
    println!("etcd is healthy at {}", etcd.endpoint());
    let ctl = |args: &[&str], stdin: Option<&str>| calicoctl(&bin, &etcd.endpoint(), args, stdin);
    println!("$ calicoctl apply -f - (IPPool demo-pool 10.65.0.0/24)");
    print!(
        "{}",
        ctl(
            &["apply", "-f", "-"],
            Some("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: demo-pool\nspec:\n  cidr: 10.65.0.0/24\n  blockSize: 26\n"),
        )?
    );

    banner("calico-node");
    let host = NetNs::new("demo")?;
    let _forward = Forward::loopback(&host, etcd.port())?;
    let node = unique_name("node");
    let mut agent = AgentProcess::start(&bin.join("calico-node"), &host, &etcd.endpoint(), &node)?;
    agent.wait_ready(&host, true, Duration::from_secs(30))?;
    println!(
        "calico-node for node {node} is ready (host namespace {}, pins under {})",
        host.name(),
        agent.pin_path.display()
    );

    banner("workloads through the CNI plugin");
    let mut workloads = Vec::new();
    for role in ROLES {
        let w = cni_add(&bin, &host, &etcd.endpoint(), &node, role)?;
        ctl(
            &[
                "label",
                "workloadendpoint",
                &w.endpoint,
                &format!("role={role}"),
                "-n",
                "default",
            ],
            None,
        )?;
        println!(
            "{:<9} {:<15} endpoint {}",
            w.role,
            w.address.to_string(),
            w.endpoint
        );
        workloads.push(w);
    }
    println!("\n$ calicoctl get workloadendpoints -o wide");
    print!(
        "{}",
        ctl(&["get", "workloadendpoints", "-o", "wide"], None)?
    );

    banner("reachability before any policy (ping, row → column)");
    let before = wait_matrix(&workloads, |_, _| true)?;
    print_matrix(&workloads, &before);

    banner("policy: only the backend may reach the db");
    println!("$ calicoctl apply -f db-from-backend-only.yaml\n{POLICY}");
    print!("{}", ctl(&["apply", "-f", "-"], Some(POLICY))?);
    let expected = |from: &Workload, to: &Workload| to.role != "db" || from.role == "backend";
    let started = Instant::now();
    let after = wait_matrix(&workloads, expected)?;
    println!(
        "(matrix as expected {:.1} s after the apply)",
        started.elapsed().as_secs_f64()
    );
    print_matrix(&workloads, &after);

    banner("the agent's view");
    let m = |name: &str| agent.metric(&host, name).unwrap_or(f64::NAN);
    println!(
        "endpoints {}  packets allowed {}  denied {}  policy updates observed {}",
        m("felix_active_local_endpoints"),
        m("felix_bpf_packets_allowed_total"),
        m("felix_bpf_packets_denied_total"),
        m("felix_policy_update_latency_seconds_count"),
    );
    // The CNI plugin adds each workload's host route; the agent keeps it (whatever its proto).
    let workload_routes: String = host
        .exec_ok("ip", &["route", "show"])?
        .lines()
        .filter(|l| l.contains(" dev cali"))
        .map(|l| format!("{l}\n"))
        .collect();
    println!("host routes to workloads:\n{workload_routes}");

    banner("clean up through the CNI plugin");
    for w in &workloads {
        harness::cni(
            &bin,
            &host,
            &etcd.endpoint(),
            &node,
            "DEL",
            &w.container_id,
            &w.ns,
        )?;
    }
    println!("$ calicoctl ipam check");
    print!("{}", ctl(&["ipam", "check"], None)?);
    drop(agent);
    println!("\ndemo passed");
    Ok(())
}

fn calicoctl(bin: &Path, etcd: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(bin.join("calicoctl"))
        .args(args)
        .env("ETCD_ENDPOINTS", etcd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.unwrap_or("").as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "calicoctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cni_add(
    bin: &Path,
    host: &NetNs,
    etcd: &str,
    node: &str,
    role: &'static str,
) -> Result<Workload> {
    let ns = NetNs::new("wl")?;
    let container_id = format!("{role}{}", "0".repeat(24));
    let result = harness::cni(bin, host, etcd, node, "ADD", &container_id, &ns)?;
    let address: IpAddr = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address in the CNI result {result}"))?;
    Ok(Workload {
        role,
        ns,
        endpoint: format!("{node}-cni-{container_id}-eth0"),
        container_id,
        address,
    })
}

fn names(ws: &[Workload]) -> Vec<String> {
    ws.iter().map(|w| w.role.to_owned()).collect()
}

/// Measures (ping) until the matrix is what `expected` says (programming takes a moment).
fn wait_matrix(
    ws: &[Workload],
    expected: impl Fn(&Workload, &Workload) -> bool,
) -> Result<Vec<Vec<bool>>> {
    harness::wait_reach_matrix(
        &names(ws),
        |f, t| ws[f].ns.ping(ws[t].address),
        |f, t| expected(&ws[f], &ws[t]),
        Duration::from_secs(20),
    )
}

fn print_matrix(ws: &[Workload], m: &[Vec<bool>]) {
    harness::print_reach_matrix(&names(ws), m);
}

fn banner(what: &str) {
    println!("\n== {what} ==");
}
