//! A calico-node agent process running in a test "host" namespace, and workloads wired to that
//! host the way the CNI plugin wires them (a `cali*` veth, the workload's address as a /32,
//! the 169.254.1.1 gateway).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{netns::run_ok, unique_name, NetNs};

/// The MAC of every workload veth's host end (upstream's choice).
const HOST_MAC: &str = "ee:ee:ee:ee:ee:ee";

/// Port of the agent's health/metrics endpoint inside its namespace.
pub const HEALTH_PORT: u16 = 9099;

/// A running agent; killed (and its pins removed) when dropped.
pub struct AgentProcess {
    binary: PathBuf,
    netns: String,
    etcd: String,
    pub node: String,
    pub pin_path: PathBuf,
    extra: Vec<String>,
    log: tempfile::NamedTempFile,
    /// Holds the MTU file the agent writes (never the machine's /var/lib/calico/mtu).
    state: tempfile::TempDir,
    child: Option<Child>,
}

impl AgentProcess {
    /// Where this agent writes the workloads' MTU (a CNI configuration's `mtu_file`).
    pub fn mtu_file(&self) -> PathBuf {
        self.state.path().join("mtu")
    }

    /// Starts `binary` (calico-node) in `host` for node `node`, talking to etcd at `etcd`.
    pub fn start(binary: &Path, host: &NetNs, etcd: &str, node: &str) -> Result<Self> {
        Self::start_with(binary, host, etcd, node, &[])
    }

    /// As [`AgentProcess::start`], with extra command-line arguments.
    pub fn start_with(
        binary: &Path,
        host: &NetNs,
        etcd: &str,
        node: &str,
        extra: &[&str],
    ) -> Result<Self> {
        let mut agent = Self {
            extra: extra.iter().map(|s| (*s).to_owned()).collect(),
            binary: binary.to_owned(),
            netns: host.name().to_owned(),
            etcd: etcd.to_owned(),
            node: node.to_owned(),
            pin_path: PathBuf::from(format!("/sys/fs/bpf/{}", unique_name("tcn"))),
            log: tempfile::NamedTempFile::new()?,
            state: tempfile::tempdir()?,
            child: None,
        };
        agent.spawn()?;
        Ok(agent)
    }

    fn spawn(&mut self) -> Result<()> {
        let log = self.log.reopen()?;
        // nsenter switches only the network namespace; `ip netns exec` would also remount
        // /sys and hide the bpffs the pins live on.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(&self.binary)
            .args([
                "--nodename",
                &self.node,
                "--health-port",
                &HEALTH_PORT.to_string(),
            ])
            .args([
                "--metrics-port",
                "0",
                "--refresh-interval",
                "2",
                "--log-level",
                "debug",
            ])
            .arg("--bpf-pin-path")
            .arg(&self.pin_path)
            .arg("--mtu-file")
            .arg(self.mtu_file())
            .args(&self.extra)
            .env("ETCD_ENDPOINTS", &self.etcd)
            .env(
                "RUST_LOG",
                "info,calico_node=debug,calico_libnetwork=debug,calico_tc=debug",
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, like a crash: nothing is cleaned up by the agent.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill().context("killing calico-node")?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts the agent again with the same settings (after [`AgentProcess::kill9`]).
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's resident set size in MiB (`VmRSS`; nsenter execs the agent in place, so
    /// the child's pid is the agent's), 0 when it is not running.
    pub fn rss_mib(&self) -> f64 {
        self.pid()
            .and_then(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("VmRSS:")?
                        .trim()
                        .trim_end_matches(" kB")
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
            })
            .unwrap_or(0.0)
            / 1024.0
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    /// GET `path` on the agent's health port: (status code, body).
    pub fn get(&self, host: &NetNs, path: &str) -> Result<(u16, String)> {
        let path = path.to_owned();
        host.run(move || {
            crate::http::get(SocketAddr::from((Ipv4Addr::LOCALHOST, HEALTH_PORT)), &path)
        })?
    }

    /// Waits until /readiness answers `ready` (true: 200, false: 503).
    pub fn wait_ready(&mut self, host: &NetNs, ready: bool, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!("calico-node exited ({status}); log:\n{}", self.log());
                }
            }
            let code = self.get(host, "/readiness").map(|(c, _)| c).unwrap_or(0);
            if (code == 200) == ready && code != 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("calico-node readiness did not become {ready} in {timeout:?} (last {code}); log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A counter or gauge from /metrics.
    pub fn metric(&self, host: &NetNs, name: &str) -> Result<f64> {
        let (_, body) = self.get(host, "/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("metric {name} not in:\n{body}"))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.kill9();
        // Unpinning releases the attachments and maps.
        let _ = std::fs::remove_dir_all(&self.pin_path);
    }
}

/// A workload namespace wired to a host namespace through a `cali*` veth.
pub struct Workload {
    pub ns: NetNs,
    /// The host end's name (in the host namespace).
    pub interface: String,
    pub address: Ipv4Addr,
    host_ns: String,
}

impl Workload {
    pub fn new(host: &NetNs, address: Ipv4Addr) -> Result<Self> {
        Self::with_host_prefix(host, address, "cali")
    }

    /// The same wiring with a host end named from `prefix`: with one other than `cali`, a
    /// namespace the agent does not manage (a stand-in for a pod on another host, routed in
    /// by the test).
    pub fn with_host_prefix(host: &NetNs, address: Ipv4Addr, prefix: &str) -> Result<Self> {
        let ns = NetNs::new("wl")?;
        let interface = unique_name(prefix);
        run_ok(Command::new("ip").args([
            "link",
            "add",
            &interface,
            "netns",
            host.name(),
            "address",
            HOST_MAC,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ]))?;
        let w = Self {
            ns,
            interface,
            address,
            host_ns: host.name().to_owned(),
        };
        w.ns.exec_ok(
            "ip",
            &["addr", "add", &format!("{address}/32"), "dev", "eth0"],
        )?;
        w.ns.exec_ok("ip", &["link", "set", "eth0", "up"])?;
        w.ns.exec_ok(
            "ip",
            &[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        w.ns.exec_ok(
            "ip",
            &[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
        )?;
        // As the CNI plugin does: the gateway is the host end, known without ARP.
        w.ns.exec_ok(
            "ip",
            &[
                "neigh",
                "replace",
                "169.254.1.1",
                "lladdr",
                HOST_MAC,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        )?;
        host.exec_ok("ip", &["link", "set", &w.interface, "up"])?;
        Ok(w)
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.host_ns, "link", "del", &self.interface])
            .output();
    }
}
