//! A real kube-apiserver (built by `cargo xtask setup` from the k8s.io/kubernetes module) on a
//! free loopback port over the test's etcd, as envtest runs one: certificates and the
//! service-account key made here, client-certificate authentication, every request allowed.
//! And calico-kube-controllers running against both.

use std::{
    fs,
    io::Write,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::{
    cni_conf, cni_with_conf,
    etcd::{free_port_pair, log_tail, make_certificates},
    unique_name, Etcd, Forward, NetNs, Store, TcpServer,
};

const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Where `cargo xtask setup` puts kube-apiserver and kubectl.
pub fn kubernetes_bin_dir() -> PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".local/share/calico-kubernetes/bin")
}

/// A running kube-apiserver; killed and its files removed on drop.
pub struct KubeApiServer {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl KubeApiServer {
    /// Starts kube-apiserver over `etcd` and waits until `/readyz` passes.
    pub fn start(etcd: &Etcd) -> Result<Self> {
        let mut last = None;
        // A port picked as free can be taken before the server binds it: retry.
        for _ in 0..3 {
            match Self::try_start(etcd) {
                Ok(server) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn try_start(etcd: &Etcd) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("calico-kube-")
            .tempdir()
            .context("creating kube-apiserver dir")?;
        let tls = make_certificates(&dir.path().join("tls"))?;
        let (port, _) = free_port_pair()?;
        let log = fs::File::create(dir.path().join("kube-apiserver.log"))?;
        let child = Command::new(kubernetes_bin_dir().join("kube-apiserver"))
            .arg(format!("--etcd-servers={}", etcd.endpoint()))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={port}"))
            .arg(format!("--tls-cert-file={}", tls.server_cert.display()))
            .arg(format!(
                "--tls-private-key-file={}",
                tls.server_key.display()
            ))
            .arg(format!("--client-ca-file={}", tls.ca.display()))
            .arg("--authorization-mode=AlwaysAllow")
            .arg("--service-account-issuer=https://127.0.0.1")
            .arg(format!(
                "--service-account-key-file={}",
                tls.server_key.display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                tls.server_key.display()
            ))
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            // No controller-manager makes each namespace's `default` account here.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg(format!("--cert-dir={}", dir.path().join("certs").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting kube-apiserver (run `cargo xtask setup` to build it)")?;
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{server: 'https://127.0.0.1:{port}', certificate-authority: '{}'}}\nusers:\n- name: test\n  user: {{client-certificate: '{}', client-key: '{}'}}\ncontexts:\n- name: test\n  context: {{cluster: test, user: test}}\ncurrent-context: test\n",
            tls.ca.display(),
            tls.client_cert.display(),
            tls.client_key.display()
        );
        fs::write(dir.path().join("kubeconfig"), kubeconfig)?;
        let mut server = Self { child, port, dir };
        server.wait_ready()?;
        Ok(server)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "kube-apiserver exited during start-up ({status}); log tail:\n{}",
                    self.log_tail()
                );
            }
            if self
                .kubectl(&["get", "--raw", "/readyz"])
                .is_ok_and(|out| out.trim() == "ok")
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready after {START_TIMEOUT:?}; log tail:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_tail(&self) -> String {
        log_tail(&self.dir.path().join("kube-apiserver.log"))
    }

    /// The kubeconfig a client uses (an admin's client certificate).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs kubectl with this server's kubeconfig; returns stdout, or the error with stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_with_input(args, None)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> Result<String> {
        self.kubectl_with_input(&["apply", "-f", "-"], Some(yaml))
    }

    fn kubectl_with_input(&self, args: &[&str], input: Option<&str>) -> Result<String> {
        let mut child = Command::new(kubernetes_bin_dir().join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running kubectl (run `cargo xtask setup` to build it)")?;
        if let Some(input) = input {
            child
                .stdin
                .take()
                .context("kubectl stdin")?
                .write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for KubeApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running calico-kube-controllers (in the caller's network namespace); killed on drop.
pub struct KubeControllers {
    child: Option<Child>,
    log: tempfile::NamedTempFile,
    pub health_port: u16,
}

impl KubeControllers {
    /// Starts `binary` against `api` and `etcd`, serving health on a free loopback port.
    pub fn start(binary: &Path, api: &KubeApiServer, etcd: &Etcd) -> Result<Self> {
        Self::start_with(binary, api, etcd, &[])
    }

    /// [`KubeControllers::start`] with extra environment variables.
    pub fn start_with(
        binary: &Path,
        api: &KubeApiServer,
        etcd: &Etcd,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        if !binary.exists() {
            bail!(
                "{} is not built: `cargo xtask test` builds every binary first (or run `cargo build --workspace --bins`)",
                binary.display()
            );
        }
        let log = tempfile::NamedTempFile::new()?;
        let (health_port, _) = free_port_pair()?;
        let child = Command::new(binary)
            .env("KUBECONFIG", api.kubeconfig())
            .env("ETCD_ENDPOINTS", etcd.endpoint())
            .env("HEALTH_PORT", health_port.to_string())
            .env("RUST_LOG", "info,calico_kube_controllers=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.reopen()?)
            .stderr(log.reopen()?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            child: Some(child),
            log,
            health_port,
        })
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// GET `path` on the health port: (status, body).
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        crate::http::get(
            std::net::SocketAddr::from(([127, 0, 0, 1], self.health_port)),
            path,
        )
    }

    /// Whether /readiness answers 200 now.
    pub fn is_ready(&self) -> bool {
        self.get("/readiness").is_ok_and(|(code, _)| code == 200)
    }

    /// Waits until /readiness answers 200 (leading, every controller synced).
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "calico-kube-controllers exited ({status}); log:\n{}",
                        self.log()
                    );
                }
            }
            if self.get("/readiness").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "calico-kube-controllers not ready in {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the process has exited by itself; returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.as_mut().context("not running")?.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "calico-kube-controllers still running after {timeout:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for KubeControllers {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

/// The `spec` of a KubeControllersConfiguration running every controller, for
/// [`KubeCluster::start`].
pub const ALL_KUBE_CONTROLLERS: &str =
    "{controllers: {node: {}, policy: {}, namespace: {}, serviceAccount: {}, workloadEndpoint: {}}}";

/// The IPv4 pool of the test cluster.
pub const KUBE_POOL: &str = "10.71.0.0/16";

/// etcd, kube-apiserver, a host namespace reaching both, and (optionally)
/// calico-kube-controllers: a Kubernetes cluster of one node, but for kubelet.
pub struct KubeCluster {
    /// Where the project's binaries are (calico, calicoctl, calico-kube-controllers, ...).
    pub bin: PathBuf,
    pub controllers: Option<KubeControllers>,
    pub api: KubeApiServer,
    pub store: Store,
    _forwards: [Forward; 2],
    pub host: NetNs,
    pub etcd: Etcd,
}

impl KubeCluster {
    /// With `controllers_config` (the `spec` of KubeControllersConfiguration `default`, YAML
    /// flow form) stored before calico-kube-controllers starts; empty: neither is (the test
    /// starts its own, or none).
    pub fn start(bin: &Path, controllers_config: &str) -> Result<Self> {
        let etcd = Etcd::start()?;
        let api = KubeApiServer::start(&etcd)?;
        let store = Store::connect(&etcd)?;
        store.apply(&format!(
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: pool1}}\nspec: {{cidr: '{KUBE_POOL}', blockSize: 26}}\n"
        ))?;
        if !controllers_config.is_empty() {
            store.apply(&format!(
                "apiVersion: projectcalico.org/v3\nkind: KubeControllersConfiguration\nmetadata: {{name: default}}\nspec: {controllers_config}\n"
            ))?;
        }
        let host = NetNs::new("kh")?;
        // The CNI plugin and the agent run in the host namespace: etcd and the API server are
        // reached through its loopback.
        let forwards = [
            Forward::loopback(&host, etcd.port())?,
            Forward::loopback(&host, api.port())?,
        ];
        let controllers = if controllers_config.is_empty() {
            None
        } else {
            let mut c = KubeControllers::start(&bin.join("calico-kube-controllers"), &api, &etcd)?;
            c.wait_ready(Duration::from_secs(60))?;
            Some(c)
        };
        Ok(Self {
            bin: bin.to_owned(),
            controllers,
            api,
            store,
            _forwards: forwards,
            host,
            etcd,
        })
    }

    /// calico-node for `node` in the host namespace, ready.
    pub fn start_agent(&self, node: &str) -> Result<crate::AgentProcess> {
        let mut agent = crate::AgentProcess::start(
            &self.bin.join("calico-node"),
            &self.host,
            &self.etcd.endpoint(),
            node,
        )?;
        agent.wait_ready(&self.host, true, Duration::from_secs(30))?;
        Ok(agent)
    }

    pub fn controllers_log(&self) -> String {
        self.controllers
            .as_ref()
            .map(KubeControllers::log)
            .unwrap_or_default()
    }

    /// The CNI ADD kubelet runs for pod `namespace/name` (Kubernetes mode: the plugins read
    /// the pod from the API through `kubernetes.kubeconfig`), in namespace `ns`.
    pub fn cni_add(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        ns: &NetNs,
    ) -> Result<serde_json::Value> {
        let mut conf = cni_conf(&self.etcd.endpoint(), node);
        conf["kubernetes"] = serde_json::json!({ "kubeconfig": self.api.kubeconfig() });
        cni_with_conf(
            &self.bin,
            &self.host,
            &conf,
            "ADD",
            &unique_name("ctr"),
            ns,
            &format!("K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
        )
    }

    /// Creates pod `namespace/name` on `node` in the API (label `pod: <name>`, named ports
    /// serve-80 and serve-81), then wires it with [`KubeCluster::wire_pod`].
    pub fn add_pod(&self, namespace: &str, name: &str, node: &str) -> Result<KubePod> {
        self.api.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: '{namespace}', labels: {{pod: {name}}}}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: c\n    image: busybox\n    ports: [{{name: serve-80, containerPort: 80}}, {{name: serve-81, containerPort: 81}}]\n"
        ))?;
        self.wire_pod(namespace, name, node)
    }

    /// Runs the CNI ADD kubelet would for a pod already in the API, in a network namespace of
    /// its own, and serves TCP 80 and 81 there.
    pub fn wire_pod(&self, namespace: &str, name: &str, node: &str) -> Result<KubePod> {
        let ns = NetNs::new("kp")?;
        let result = self.cni_add(namespace, name, node, &ns)?;
        let address = first_address(&result)?;
        let servers = vec![ns.tcp_server(80)?, ns.tcp_server(81)?];
        Ok(KubePod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            address,
            ns,
            _servers: servers,
        })
    }

    /// `calicoctl ipam check` (exit status, output).
    pub fn ipam_check(&self) -> Result<(bool, String)> {
        let out = Command::new(self.bin.join("calicoctl"))
            .args(["ipam", "check"])
            .env("ETCD_ENDPOINTS", self.etcd.endpoint())
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
    }
}

/// The first IPv4 address of a CNI result.
pub fn first_address(result: &serde_json::Value) -> Result<Ipv4Addr> {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no IPv4 address in the CNI result {result}"))
}

/// A pod wired by the CNI plugin, serving TCP 80 and 81.
pub struct KubePod {
    pub namespace: String,
    pub name: String,
    pub address: Ipv4Addr,
    _servers: Vec<TcpServer>,
    pub ns: NetNs,
}
