//! `cargo xtask setup`: installs what the project needs on a fresh Debian 12 machine. Every step
//! checks first, so a second run does nothing and takes a second or two.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};

use crate::{cmd::Cmd, step};

/// One external program and the Debian package that provides it.
pub(crate) struct Tool {
    pub(crate) program: &'static str,
    pub(crate) package: &'static str,
    /// Who runs it, for the reader of a failure.
    pub(crate) used_by: &'static str,
}

const fn tool(program: &'static str, package: &'static str, used_by: &'static str) -> Tool {
    Tool {
        program,
        package,
        used_by,
    }
}

/// Every program run by the tests, benchmarks, demo and the product's own subprocesses.
pub(crate) const TOOLS: &[Tool] = &[
    tool("ip", "iproute2", "netns, veths, routes in every netns test"),
    tool("ping", "iputils-ping", "reachability checks"),
    tool("sysctl", "procps", "per-namespace sysctls"),
    tool("pkill", "procps", "multihost test clean-up"),
    tool("etcd", "etcd-server", "the datastore of tests and demo"),
    tool("etcdctl", "etcd-client", "datastore tests (compaction)"),
    tool("bird", "bird2", "BGP daemon driven by the agent"),
    tool("birdc", "bird2", "BIRD's control client"),
    tool("nsenter", "util-linux", "dockerd in a network namespace"),
    tool("tar", "tar", "the local busybox image"),
    tool("openssl", "openssl", "TLS certificates for etcd tests"),
    tool("podman", "podman", "a real runtime calling the CNI plugins"),
    tool("runc", "runc", "podman's OCI runtime"),
    tool(
        "busybox",
        "busybox-static",
        "root filesystem of the test image",
    ),
    tool(
        "dockerd",
        "docker.io",
        "a real dockerd calling the libnetwork driver",
    ),
    // By full path: the image may carry a newer client earlier on PATH.
    tool(
        "/usr/bin/docker",
        "docker.io",
        "the client of that dockerd (by full path)",
    ),
    tool(
        "containerd",
        "containerd",
        "the CRI runtime of the kubelet test",
    ),
    tool(
        "ctr",
        "containerd",
        "images and sandboxes of the kubelet test",
    ),
    tool(
        "unshare",
        "util-linux",
        "kubelet in a mount namespace of its own",
    ),
    tool("umount", "mount", "clean-up of the kubelet test's mounts"),
    tool("iperf3", "iperf3", "dataplane benchmark"),
    tool(
        "nft",
        "nftables",
        "calico-node's natOutgoing (its own `inet calico` table)",
    ),
    tool(
        "iptables-nft-restore",
        "iptables",
        "dataplane benchmark baseline",
    ),
    tool(
        "iptables-legacy-restore",
        "iptables",
        "dataplane benchmark baseline",
    ),
    tool("bpftool", "bpftool", "inspecting loaded programs by hand"),
    tool(
        "llvm-objcopy",
        "llvm",
        "build-ebpf strips DWARF from the objects (BTF kept)",
    ),
];

/// Packages the build needs that provide no program the tests run.
pub(crate) const BUILD_PACKAGES: &[&str] = &[
    "protobuf-compiler",           // etcd-client's build script
    "libprotobuf-dev",             // well-known .proto files for etcd-client
    "containernetworking-plugins", // reference CNI plugins (ptp, portmap) run by path
];

/// Every Debian package setup installs: the tools' packages and the build's, each once.
pub(crate) fn packages() -> Vec<&'static str> {
    let mut seen = BTreeSet::new();
    TOOLS
        .iter()
        .map(|t| t.package)
        .chain(BUILD_PACKAGES.iter().copied())
        .filter(|p| seen.insert(*p))
        .collect()
}

const BPF_LINKER_VERSION: &str = "0.13.0";
/// The LLVM major version of the machine's rustc; bpf-linker must link the very same LLVM.
const LLVM_FEATURE: &str = "llvm-22";

pub(crate) fn run() -> Result<()> {
    step("cargo xtask setup");
    apt_packages()?;
    rust_src()?;
    bpf_linker()?;
    cargo_fuzz()?;
    kubernetes()?;
    bpffs()?;
    println!("setup: everything is in place");
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn apt_packages() -> Result<()> {
    let wanted = packages();
    let missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|pkg| {
            !Cmd::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output()
                .is_ok_and(|status| status.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        println!("apt packages: all {} present", wanted.len());
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}; run as root or install them with \
             `apt-get install {}`",
            missing.join(" ")
        );
    }
    println!("apt packages: installing {missing:?}");
    Cmd::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()?;
    Cmd::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()
}

fn rust_src() -> Result<()> {
    let installed = Cmd::new("rustup")
        .args(["component", "list", "--installed"])
        .output()?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("rust-src: present");
        return Ok(());
    }
    Cmd::new("rustup")
        .args(["component", "add", "rust-src"])
        .run()
}

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz drives `cargo xtask fuzz` (and its short run in `cargo xtask test`).
fn cargo_fuzz() -> Result<()> {
    let version = Cmd::new("cargo").args(["fuzz", "--version"]).output();
    if version
        .as_deref()
        .is_ok_and(|v| v.trim().ends_with(CARGO_FUZZ_VERSION))
    {
        println!("cargo-fuzz {CARGO_FUZZ_VERSION}: present");
        return Ok(());
    }
    println!("cargo-fuzz {CARGO_FUZZ_VERSION}: installing (about a minute)");
    Cmd::new("cargo")
        .args(["install", "--force", "--locked"])
        .args([format!("cargo-fuzz@{CARGO_FUZZ_VERSION}")])
        .run()
}

fn bpf_linker() -> Result<()> {
    // `--version` also proves the binary can load the libLLVM it was linked against.
    let version = Cmd::new("bpf-linker").args(["--version"]).output();
    if version
        .as_deref()
        .is_ok_and(|v| v.trim().ends_with(BPF_LINKER_VERSION))
    {
        println!("bpf-linker {BPF_LINKER_VERSION}: present");
        return Ok(());
    }
    println!(
        "bpf-linker {BPF_LINKER_VERSION}: building against rustc's own libLLVM (about a minute)"
    );
    let prefix = llvm_prefix()?;
    Cmd::new("cargo")
        .args(["install", "--force", "--locked"])
        .args([format!("bpf-linker@{BPF_LINKER_VERSION}")])
        .args(["--no-default-features", "--features", LLVM_FEATURE])
        .env("LLVM_PREFIX", &prefix)
        .run()
}

/// A directory laid out like an LLVM install (`lib/libLLVM.so`) whose library is rustc's own.
/// bpf-linker finds it at run time through its rpath, so it lives outside any checkout, and its
/// name follows the library's so a new toolchain gets a new one.
fn llvm_prefix() -> Result<PathBuf> {
    let sysroot = Cmd::new("rustc").args(["--print", "sysroot"]).output()?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let library = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so.") && name.contains("-rust-"))
        .with_context(|| {
            format!(
                "no libLLVM.so.*-rust-* in {}: this rustc does not ship its LLVM",
                lib_dir.display()
            )
        })?;
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    let prefix = Path::new(&home)
        .join(".local/share/calico-bpf-llvm")
        .join(&library);
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in ["libLLVM.so", library.as_str()] {
        let path = prefix_lib.join(link);
        let _ = fs::remove_file(&path);
        symlink(lib_dir.join(&library), &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }
    Ok(prefix)
}

/// Pinned programs and maps live on bpffs at /sys/fs/bpf; containers often lack the mount.
fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "))
    {
        println!("bpffs: mounted at /sys/fs/bpf");
        return Ok(());
    }
    if !is_root() {
        println!("bpffs: not mounted at /sys/fs/bpf (needs root: mount -t bpf bpf /sys/fs/bpf)");
        return Ok(());
    }
    println!("bpffs: mounting at /sys/fs/bpf");
    Cmd::new("mount")
        .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
        .run()
        .context("mounting bpffs at /sys/fs/bpf")
}

/// Where setup puts the Kubernetes programs built from `xtask/kubernetes/go.mod` (outside any
/// checkout, so a clean clone's CI reuses them); the tests look here too.
pub(crate) fn kubernetes_bin_dir() -> Result<PathBuf> {
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(Path::new(&home).join(".local/share/calico-kubernetes/bin"))
}

/// kube-apiserver, kubectl and kubelet, built from the `k8s.io/kubernetes` Go module that
/// `xtask/kubernetes/go.mod` pins (about nine minutes on two cores the first time). A stamp
/// holding that go.mod says what the binaries were built from; a changed go.mod rebuilds them.
fn kubernetes() -> Result<()> {
    let module = crate::workspace_root().join("xtask/kubernetes");
    let go_mod =
        fs::read_to_string(module.join("go.mod")).context("reading xtask/kubernetes/go.mod")?;
    let version = go_mod
        .lines()
        .find_map(|l| l.trim().strip_prefix("k8s.io/kubernetes v"))
        .and_then(|rest| rest.split_whitespace().next())
        .context("xtask/kubernetes/go.mod requires no k8s.io/kubernetes version")?
        .to_owned();
    let bin = kubernetes_bin_dir()?;
    let stamp = bin.join("built-from.go.mod");
    let programs = ["kube-apiserver", "kubectl", "kubelet"];
    if fs::read_to_string(&stamp).is_ok_and(|s| s == go_mod)
        && programs.iter().all(|p| bin.join(p).exists())
    {
        println!("kubernetes v{version} (kube-apiserver, kubectl, kubelet): present");
        return Ok(());
    }
    if Cmd::new("go").args(["version"]).output().is_err() {
        bail!("`go` is not on PATH: kube-apiserver and kubectl are built from their Go module");
    }
    println!("kubernetes v{version}: building kube-apiserver, kubectl and kubelet from the Go module (several minutes)");
    fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let (major, minor) = version
        .split_once('.')
        .map(|(a, b)| (a, b.split('.').next().unwrap_or("0")))
        .context("k8s.io/kubernetes version is not MAJOR.MINOR.PATCH")?;
    // What `kubectl version` and clients read; a plain `go build` says v0.0.0-master.
    let ldflags = format!(
        "-s -w -X k8s.io/component-base/version.gitVersion=v{version} \
         -X k8s.io/component-base/version.gitMajor={major} \
         -X k8s.io/component-base/version.gitMinor={minor}"
    );
    for program in programs {
        Cmd::new("go")
            .args(["build", "-ldflags", &ldflags, "-o"])
            .arg_path(&bin.join(program))
            .args([format!("k8s.io/kubernetes/cmd/{program}")])
            .current_dir(&module)
            .run()
            .with_context(|| format!("building {program} from k8s.io/kubernetes v{version}"))?;
    }
    fs::write(&stamp, &go_mod).with_context(|| format!("writing {}", stamp.display()))
}
