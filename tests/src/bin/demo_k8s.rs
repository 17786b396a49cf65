//! The Kubernetes act (`cargo xtask demo k8s`): a real etcd and kube-apiserver on loopback,
//! calico-kube-controllers, calico-node in a host network namespace, and pods created with
//! kubectl and wired by the CNI plugin in Kubernetes mode (as kubelet would call it). A
//! Kubernetes NetworkPolicy applied with kubectl reshapes the TCP reachability matrix; a
//! namespace label widens it; deleting the policy restores it; deleting the Node gives its
//! addresses back. Exits non-zero if anything observed differs from Kubernetes semantics.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use harness::{require, unique_name, AgentProcess, KubeCluster, KubePod, Requirement};

const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: back-from-front, namespace: shop}
spec:
  podSelector: {matchLabels: {app: back}}
  ingress:
  - from:
    - podSelector: {matchLabels: {app: front}}
    - namespaceSelector: {matchLabels: {trusted: 'yes'}}
    ports: [{port: http}]
";

fn main() -> Result<()> {
    if !require(
        "calico-demo-k8s",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Bpf,
            Requirement::Etcd,
            Requirement::Kubernetes,
        ],
    ) {
        bail!("the Kubernetes act needs root, network namespaces, BPF, etcd and kube-apiserver (see above)");
    }
    let bin = std::env::current_exe()?
        .parent()
        .context("the demo's directory")?
        .to_owned();
    harness::cni_plugin_dir(&bin)?;
    for b in [
        "calico-node",
        "calico",
        "calicoctl",
        "calico-kube-controllers",
    ] {
        if !bin.join(b).exists() {
            bail!(
                "{} is missing: run `cargo xtask demo k8s`, which builds it",
                bin.join(b).display()
            );
        }
    }

    banner("etcd, kube-apiserver and calico-kube-controllers");
    let cluster = KubeCluster::start(&bin, harness::ALL_KUBE_CONTROLLERS)?;
    println!(
        "etcd at {}, kube-apiserver at https://127.0.0.1:{} (kubeconfig {}), calico-kube-controllers ready",
        cluster.etcd.endpoint(),
        cluster.api.port(),
        cluster.api.kubeconfig().display()
    );
    let kubectl = |args: &[&str]| -> Result<()> {
        println!("$ kubectl {}", args.join(" "));
        print!("{}", cluster.api.kubectl(args)?);
        Ok(())
    };

    banner("calico-node");
    let node = unique_name("node");
    cluster.api.apply(&format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {node}}}\n"
    ))?;
    let agent = cluster.start_agent(&node)?;
    println!("calico-node for node {node} is ready");

    banner("namespaces and pods: kubectl, then the CNI ADD kubelet runs");
    cluster.api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: ops}\n",
    )?;
    let mut pods = Vec::new();
    for (namespace, name, app) in [
        ("shop", "front", "front"),
        ("shop", "back", "back"),
        ("ops", "debug", "debug"),
    ] {
        cluster.api.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, labels: {{app: {app}}}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, image: busybox, ports: [{{name: http, containerPort: 80}}]}}]\n"
        ))?;
        let pod = cluster.wire_pod(namespace, name, &node)?;
        println!("{:<11} {}", format!("{namespace}/{name}"), pod.address);
        pods.push(pod);
    }
    kubectl(&["get", "namespaces,pods", "-A", "-l", "app", "--show-labels"]).ok();

    banner("TCP 80 before any policy (row → column)");
    show(&wait_matrix(&pods, &agent, |_, _| true)?, &pods);

    banner("kubectl apply: shop/back accepts http only from front, or from trusted namespaces");
    println!("{POLICY}");
    cluster.api.apply(POLICY)?;
    let only_front = |f: &KubePod, t: &KubePod| t.name != "back" || f.name == "front";
    show(&wait_matrix(&pods, &agent, only_front)?, &pods);
    println!("$ calicoctl get networkpolicies -A  (written by calico-kube-controllers)");
    print!(
        "{}",
        calicoctl(&cluster, &["get", "networkpolicies", "-A"])?
    );

    banner("kubectl label namespace ops trusted=yes");
    let started = Instant::now();
    cluster
        .api
        .kubectl(&["label", "namespace", "ops", "trusted=yes"])?;
    show(&wait_matrix(&pods, &agent, |_, _| true)?, &pods);
    println!(
        "(reshaped {:.2} s after the label)",
        started.elapsed().as_secs_f64()
    );
    cluster
        .api
        .kubectl(&["label", "namespace", "ops", "trusted-"])?;
    show(&wait_matrix(&pods, &agent, only_front)?, &pods);

    banner("kubectl delete networkpolicy back-from-front");
    cluster
        .api
        .kubectl(&["delete", "networkpolicy", "-n", "shop", "back-from-front"])?;
    show(&wait_matrix(&pods, &agent, |_, _| true)?, &pods);

    banner("kubectl delete node: its addresses come back");
    cluster.api.kubectl(&["delete", "node", &node])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (clean, report) = cluster.ipam_check()?;
        if clean && report.contains("0 allocation(s)") {
            println!("$ calicoctl ipam check\n{report}");
            break;
        }
        if Instant::now() > deadline {
            bail!("the node's addresses were not released:\n{report}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(agent);
    println!("\nKubernetes act passed");
    Ok(())
}

fn calicoctl(cluster: &KubeCluster, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(cluster.bin.join("calicoctl"))
        .args(args)
        .env("ETCD_ENDPOINTS", cluster.etcd.endpoint())
        .output()?;
    if !out.status.success() {
        bail!(
            "calicoctl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn names(pods: &[KubePod]) -> Vec<String> {
    pods.iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect()
}

/// Measures (TCP 80) until the matrix is what `expected` says (programming takes a moment).
fn wait_matrix(
    pods: &[KubePod],
    agent: &AgentProcess,
    expected: impl Fn(&KubePod, &KubePod) -> bool,
) -> Result<Vec<Vec<bool>>> {
    harness::wait_reach_matrix(
        &names(pods),
        |f, t| {
            pods[f]
                .ns
                .tcp_connects(pods[t].address.into(), 80, Duration::from_millis(400))
        },
        |f, t| expected(&pods[f], &pods[t]),
        Duration::from_secs(20),
    )
    .with_context(|| format!("agent log:\n{}", agent.log()))
}

fn show(m: &[Vec<bool>], pods: &[KubePod]) {
    harness::print_reach_matrix(&names(pods), m);
}

fn banner(what: &str) {
    println!("\n== {what} ==");
}
