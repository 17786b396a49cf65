//! Project tasks. `cargo xtask <task>`; see `cargo xtask --help`.

mod build_ebpf;
mod cmd;
mod fuzz;
mod setup;
mod tools;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cmd::cargo;

#[derive(Parser)]
#[command(about = "Tasks for the calico eBPF workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the project needs on a Debian 12 machine (idempotent; quick when done).
    Setup,
    /// Build the eBPF programs (release) for bpfel-unknown-none.
    BuildEbpf,
    /// Set-up, build-ebpf, fmt check, clippy -D warnings, and every test.
    Test,
    /// Set-up, build, and run the demo: etcd, the eBPF filter on workloads in network
    /// namespaces, reachability before and after. `demo k8s`: the Kubernetes act (a real
    /// kube-apiserver, calico-kube-controllers, NetworkPolicies applied with kubectl).
    Demo {
        /// `k8s` for the Kubernetes act; nothing for the main one.
        act: Option<String>,
    },
    /// Benchmarks (release builds), each printing a table against a baseline measured in the
    /// same run: `cni` (ADD latency vs the reference ptp plugin), `dataplane` (throughput,
    /// packet rate and connection rate vs the plain path and iptables), `agent` (update
    /// latency, cold start and memory with 1,000 endpoints), `scale` (one node of a
    /// 150,000-pod cluster).
    Bench {
        /// Which benchmark: cni, dataplane, agent or scale.
        #[arg(default_value = "cni")]
        which: String,
    },
    /// Fuzz the parsers of hostile input (CNI config + environment, calicoctl documents,
    /// Docker driver calls, selectors) for a bounded time each, from the committed corpus.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
}

fn main() -> Result<()> {
    let root = workspace_root();
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf => build_ebpf::run(&root).map(|object| {
            println!("eBPF object: {}", object.display());
        }),
        Task::Test => test(&root),
        Task::Demo { act } => demo(&root, act.as_deref()),
        Task::Bench { which } => bench(&root, &which),
        Task::Fuzz { seconds, targets } => {
            setup::run()?;
            fuzz::run(&root, seconds, &targets)
        }
    }
}

fn test(root: &Path) -> Result<()> {
    setup::run()?;
    step("external programs: listed, and installed by setup");
    tools::check(root)?;
    build_ebpf::run(root)?;
    step("cargo fmt --check");
    cargo(root).args(["fmt", "--all", "--", "--check"]).run()?;
    build_ebpf::cargo_in_programs(root, &["fmt", "--", "--check"])?;
    cargo(root)
        .args(["fmt", "--manifest-path", "fuzz/Cargo.toml", "--", "--check"])
        .run()?;
    step("clippy -D warnings (host workspace)");
    cargo(root)
        .args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
        .run()?;
    step("clippy -D warnings (eBPF programs)");
    build_ebpf::clippy(root)?;
    // A short run: the targets build on a fresh machine and nothing in the corpus, or near
    // it, panics. `cargo xtask fuzz` runs longer.
    fuzz::run(root, 10, &[])?;
    step("cargo build --workspace --bins");
    // `cargo test` builds a package's binary only for that package's own integration tests;
    // the end-to-end tests also run other packages' (calico-kube-controllers, the CNI plugin).
    cargo(root).args(["build", "--workspace", "--bins"]).run()?;
    step("cargo test --workspace");
    // --show-output prints what passing tests printed, so the log shows that the privileged
    // tests ran (and any SKIPPED line outside CI).
    let tally = cargo(root)
        .args([
            "test",
            "--workspace",
            "--no-fail-fast",
            "--",
            "--show-output",
        ])
        .run_tests()?;
    // One closing line for the whole run, in the plain form CI reads.
    for name in &tally.skipped {
        println!("skipped: {name}");
    }
    println!(
        "\ntests: {} passed, {} failed, {} skipped",
        tally.passed(),
        tally.failed,
        tally.skipped.len()
    );
    tally.ensure_green()
}

fn demo(root: &Path, act: Option<&str>) -> Result<()> {
    let binary = match act {
        None => "calico-demo",
        Some("k8s") => "calico-demo-k8s",
        Some(other) => {
            anyhow::bail!("no demo act `{other}`: try `cargo xtask demo` or `cargo xtask demo k8s`")
        }
    };
    setup::run()?;
    tools::check(root)?;
    build_ebpf::run(root)?;
    step("building and running the demo");
    cargo(root)
        .args([
            "build",
            "--quiet",
            "-p",
            "calico-node",
            "-p",
            "calico-cni",
            "-p",
            "calicoctl",
            "-p",
            "calico-kube-controllers",
        ])
        .run()?;
    cargo(root)
        .args(["run", "--quiet", "-p", "calico-tests", "--bin", binary])
        .run()
}

fn bench(root: &Path, which: &str) -> Result<()> {
    setup::run()?;
    build_ebpf::run(root)?;
    match which {
        "cni" => cargo(root)
            .args(["bench", "-p", "calico-cni", "--bench", "add_latency"])
            .run(),
        "agent" => {
            cargo(root)
                .args(["build", "--release", "-p", "calico-node"])
                .run()?;
            cargo(root)
                .args(["bench", "-p", "calico-node", "--bench", "agent"])
                .run()
        }
        "scale" => {
            cargo(root)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "calico-node",
                    "-p",
                    "calico-cni",
                ])
                .run()?;
            cargo(root)
                .args(["bench", "-p", "calico-node", "--bench", "scale"])
                .run()
        }
        "dataplane" => cargo(root)
            .args(["bench", "-p", "calico-tests", "--bench", "dataplane"])
            .run(),
        other => {
            anyhow::bail!("unknown benchmark `{other}` (known: cni, dataplane, agent, scale)")
        }
    }
}

/// Prints a banner for a task step.
pub(crate) fn step(what: &str) {
    println!("\n==> {what}");
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits one level below the workspace root")
        .to_path_buf()
}
