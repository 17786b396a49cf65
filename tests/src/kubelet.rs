//! A real kubelet (built by `cargo xtask setup` from the k8s.io/kubernetes module) with
//! Debian's containerd and runc, running the pods of one node of a [`KubeCluster`]: containerd's
//! CRI calls the project's CNI plugin (Kubernetes mode) from the cluster's host namespace, with a
//! pause image built here from busybox (nothing downloaded).
//!
//! What this machine needs of them (found by running them here): containerd's CRI with
//! `restrict_oom_score_adj`, `disable_cgroup`, `disable_apparmor`, `disable_hugetlb_controller`
//! (the sandbox cannot set a negative OOM score or use the cgroup v1 controllers); kubelet with
//! `failCgroupV1: false`, `cgroupsPerQOS: false`, no node-allocatable enforcement. kubelet also
//! sets three kernel-wide sysctls at start (`vm.overcommit_memory=1`, `kernel.panic=10`,
//! `kernel.panic_on_oops=1`); it runs in a mount namespace of its own where those three files are
//! stand-ins already holding what it wants, so the machine's are never touched.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::{busybox_rootfs_tar, kubernetes_bin_dir, netns::run_ok, KubeCluster};

/// The pause image every pod sandbox runs (and the pods' own image: busybox).
pub const KUBELET_IMAGE: &str = "localhost/calico-test:busybox";

/// containerd + kubelet for node `node`; stopped (pods first) on drop.
pub struct Kubelet {
    pub node: String,
    dir: TempDir,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    kubectl_kubeconfig: PathBuf,
}

impl Kubelet {
    /// Starts containerd and kubelet in `cluster`'s host namespace and waits until the node
    /// has registered itself.
    pub fn start(cluster: &KubeCluster, node: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("calico-kubelet-")
            .tempdir()
            .context("creating the kubelet's dir")?;
        let path = |p: &str| dir.path().join(p);
        let image_tar = pause_image(dir.path())?;

        // containerd, its CRI calling the project's CNI plugins.
        let cni_bin = path("cni/bin");
        fs::create_dir_all(&cni_bin)?;
        fs::create_dir_all(path("cni/net.d"))?;
        for (link, target) in [
            ("calico", cluster.bin.join("calico")),
            ("calico-ipam", cluster.bin.join("calico")),
            ("loopback", PathBuf::from("/usr/lib/cni/loopback")),
        ] {
            std::os::unix::fs::symlink(&target, cni_bin.join(link))?;
        }
        let mut conf = crate::cni_conf(&cluster.etcd.endpoint(), node);
        conf["name"] = "k8s-pod-network".into();
        conf["kubernetes"] = serde_json::json!({ "kubeconfig": cluster.api.kubeconfig() });
        let conflist = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "plugins": [conf],
        });
        fs::write(path("cni/net.d/10-calico.conflist"), conflist.to_string())?;
        let socket = path("containerd.sock");
        fs::write(
            path("containerd.toml"),
            format!(
                "version = 2\nroot = '{root}'\nstate = '{state}'\n[grpc]\n  address = '{socket}'\n[plugins.'io.containerd.grpc.v1.cri']\n  sandbox_image = '{KUBELET_IMAGE}'\n  restrict_oom_score_adj = true\n  disable_cgroup = true\n  disable_apparmor = true\n  disable_hugetlb_controller = true\n  [plugins.'io.containerd.grpc.v1.cri'.cni]\n    bin_dir = '{bin}'\n    conf_dir = '{confdir}'\n  [plugins.'io.containerd.grpc.v1.cri'.containerd]\n    snapshotter = 'overlayfs'\n    default_runtime_name = 'runc'\n  [plugins.'io.containerd.grpc.v1.cri'.containerd.runtimes.runc]\n    runtime_type = 'io.containerd.runc.v2'\n",
                root = path("containerd/root").display(),
                state = path("containerd/state").display(),
                socket = socket.display(),
                bin = cni_bin.display(),
                confdir = path("cni/net.d").display(),
            ),
        )?;
        let containerd = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", cluster.host.name()))
            .arg("containerd")
            .arg("--config")
            .arg(path("containerd.toml"))
            .stdin(Stdio::null())
            .stdout(fs::File::create(path("containerd.log"))?)
            .stderr(fs::File::create(path("containerd.err"))?)
            .spawn()
            .context("starting containerd (Debian package containerd)")?;
        let mut kubelet = Self {
            node: node.to_owned(),
            containerd: Some(containerd),
            kubelet: None,
            kubectl_kubeconfig: cluster.api.kubeconfig(),
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while kubelet
            .ctr(&["images", "import"], Some(&image_tar))
            .is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "containerd did not take the image; log:\n{}",
                    kubelet.log("containerd.err")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }

        // kubelet, with stand-ins for the kernel-wide sysctls it would otherwise rewrite.
        let sysctls = [
            ("/proc/sys/vm/overcommit_memory", "1"),
            ("/proc/sys/kernel/panic", "10"),
            ("/proc/sys/kernel/panic_on_oops", "1"),
        ];
        let mut binds = String::new();
        for (i, (file, value)) in sysctls.iter().enumerate() {
            let stand_in = kubelet.path(&format!("sysctl{i}"));
            fs::write(&stand_in, format!("{value}\n"))?;
            binds.push_str(&format!(
                "mount --bind '{}' '{file}' && ",
                stand_in.display()
            ));
        }
        fs::write(
            kubelet.path("kubelet.yaml"),
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nauthentication: {{anonymous: {{enabled: true}}, webhook: {{enabled: false}}}}\nauthorization: {{mode: AlwaysAllow}}\ncgroupDriver: cgroupfs\nfailSwapOn: false\nfailCgroupV1: false\ncontainerRuntimeEndpoint: 'unix://{socket}'\ncgroupsPerQOS: false\nenforceNodeAllocatable: []\nreadOnlyPort: 0\nhealthzPort: 0\nresolvConf: ''\nlocalStorageCapacityIsolation: false\nevictionHard: {{}}\npodLogsDir: '{logs}'\nsyncFrequency: 5s\nfileCheckFrequency: 5s\n",
                socket = socket.display(),
                logs = kubelet.path("pods").display(),
            ),
        )?;
        let script = format!(
            "{binds}exec nsenter --net=/run/netns/{host} '{kubelet}' --config '{config}' --kubeconfig '{kubeconfig}' --hostname-override '{node}' --root-dir '{root}' --v=1",
            host = cluster.host.name(),
            kubelet = kubernetes_bin_dir().join("kubelet").display(),
            config = kubelet.path("kubelet.yaml").display(),
            kubeconfig = cluster.api.kubeconfig().display(),
            root = kubelet.path("kubelet").display(),
        );
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(fs::File::create(kubelet.path("kubelet.out"))?)
            .stderr(fs::File::create(kubelet.path("kubelet.log"))?)
            .spawn()
            .context("starting kubelet")?;
        kubelet.kubelet = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster.api.kubectl(&["get", "node", node]).is_err() {
            if let Some(status) = kubelet
                .kubelet
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "kubelet exited ({status}); log:\n{}",
                    kubelet.log("kubelet.log")
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "kubelet did not register node {node}; log:\n{}",
                    kubelet.log("kubelet.log")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(kubelet)
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// The tail of one of the logs (`kubelet.log`, `containerd.err`).
    pub fn log(&self, name: &str) -> String {
        crate::etcd::log_tail(&self.path(name))
    }

    /// `ctr` against this containerd (namespace k8s.io), with an optional file argument.
    fn ctr(&self, args: &[&str], file: Option<&Path>) -> Result<String> {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.path("containerd.sock"))
            .args(["--namespace", "k8s.io"])
            .args(args);
        if let Some(file) = file {
            cmd.arg(file);
        }
        run_ok(&mut cmd)
    }

    /// The network namespace (its name under /run/netns) of the pod sandbox `sandbox` (the
    /// container ID the CNI plugin records on the endpoint).
    pub fn pod_netns(&self, sandbox: &str) -> Result<String> {
        let info: serde_json::Value =
            serde_json::from_str(&self.ctr(&["containers", "info", sandbox], None)?)?;
        info["Spec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .and_then(|p| p.rsplit('/').next())
            .map(str::to_owned)
            .with_context(|| format!("sandbox {sandbox} has no network namespace path"))
    }

    /// How many containers (sandboxes included) are running.
    pub fn running_tasks(&self) -> Result<usize> {
        Ok(self
            .ctr(&["tasks", "ls", "-q"], None)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count())
    }
}

/// The busybox image, as a docker-archive tar containerd imports (built with podman, which
/// setup installs, from the local busybox-static).
fn pause_image(dir: &Path) -> Result<PathBuf> {
    let tar = busybox_rootfs_tar(dir)?;
    // Named as the pods name it (one kubelet test runs at a time; podman's copy is removed).
    let name = KUBELET_IMAGE;
    run_ok(
        Command::new("podman")
            .args([
                "import",
                "--change",
                r#"CMD ["/bin/busybox", "sleep", "2147483647"]"#,
            ])
            .arg(&tar)
            .arg(name),
    )?;
    let archive = dir.join("image.tar");
    let saved = run_ok(
        Command::new("podman")
            .args(["save", "--format", "docker-archive", "-o"])
            .arg(&archive)
            .arg(name),
    );
    let _ = Command::new("podman").args(["rmi", "-f", name]).output();
    saved?;
    Ok(archive)
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        // Pods first, through kubelet (their network torn down by the CNI DEL), so nothing
        // outlives the test: then kubelet, then containerd.
        let _ = Command::new(kubernetes_bin_dir().join("kubectl"))
            .arg(format!(
                "--kubeconfig={}",
                self.kubectl_kubeconfig.display()
            ))
            .args([
                "delete",
                "pods",
                "--all-namespaces",
                "--all",
                "--field-selector",
            ])
            .arg(format!("spec.nodeName={}", self.node))
            .args(["--grace-period=0", "--force", "--wait=false"])
            .output();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.running_tasks().is_ok_and(|n| n > 0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        for child in [self.kubelet.take(), self.containerd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever a failed test left: shims (named by this dir's socket) and mounts under it.
        let _ = Command::new("pkill")
            .args(["-9", "-f"])
            .arg(self.dir.path())
            .output();
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(self.path("containerd"))
            .output();
    }
}
