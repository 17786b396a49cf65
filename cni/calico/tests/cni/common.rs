//! Shared pieces of the plugin tests: a real etcd with a pool, and running the built plugins
//! the way a runtime does (environment, stdin, stdout).

#![allow(dead_code)]

use std::{
    io::Write,
    path::Path,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use harness::{Etcd, NetNs};
use serde_json::{json, Value};

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Out {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin output is not JSON ({e}): {self:?}"))
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// A container ID whose first 11 characters are unique to this process and call, so veth
/// names (`cali` + 11 characters) never collide between parallel tests.
pub fn container_id() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}{n:03x}{}", std::process::id(), "0".repeat(53))
}

/// CNI_PATH: the directory of the built plugins, then the reference plugins.
pub fn cni_path() -> String {
    let built = Path::new(env!("CARGO_BIN_EXE_calico")).parent().unwrap();
    harness::cni_plugin_dir(built).expect("linking calico-ipam beside calico");
    format!("{}:/usr/lib/cni", built.display())
}

/// Runs plugin `binary` (a path) with `command` for (`container`, `netns`, `ifname`).
pub fn call(
    binary: &str,
    command: &str,
    container: &str,
    netns: &str,
    ifname: &str,
    args: &str,
    conf: &Value,
) -> Out {
    let start = Instant::now();
    let child = spawn(None, binary, command, container, netns, ifname, args, conf);
    wait(child, start)
}

/// Starts plugin `binary` as a runtime does; in the network namespace `host` (a node that is
/// not this test's namespace) when given. The caller waits for it, or kills it.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    host: Option<&NetNs>,
    binary: &str,
    command: &str,
    container: &str,
    netns: &str,
    ifname: &str,
    args: &str,
    conf: &Value,
) -> Child {
    let mut cmd = match host {
        Some(host) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", host.name()))
                .arg("--")
                .arg(binary);
            c
        }
        None => Command::new(binary),
    };
    let mut child = cmd
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_ARGS", args)
        .env("CNI_PATH", cni_path())
        .env_remove("ETCD_ENDPOINTS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("plugin starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    child
}

/// What a plugin started at `start` answered.
pub fn wait(child: Child, start: Instant) -> Out {
    let out = child.wait_with_output().unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed: start.elapsed(),
    }
}

pub fn calico() -> &'static str {
    env!("CARGO_BIN_EXE_calico")
}

/// A network config for `calico` + `calico-ipam` against `etcd`.
pub fn netconf(etcd: &Etcd, name: &str, version: &str, node: &str) -> Value {
    json!({
        "cniVersion": version,
        "name": name,
        "type": "calico",
        "nodename": node,
        "etcd_endpoints": etcd.endpoint(),
        "mtu": 1450,
        "ipam": { "type": "calico-ipam" },
    })
}

/// A datastore connection to the test's etcd.
pub async fn store_of(etcd: &Etcd) -> anyhow::Result<calico_datastore::Datastore> {
    Ok(
        calico_datastore::Datastore::connect(&calico_datastore::EtcdConfig::with_endpoints([
            etcd.endpoint()
        ]))
        .await?,
    )
}

/// etcd with the given pools (name, spec in YAML flow form) stored through the datastore.
pub async fn etcd_with_pools(pools: &[(&str, &str)]) -> anyhow::Result<Etcd> {
    let etcd = Etcd::start()?;
    let store = store_of(&etcd).await?;
    for (name, cidr) in pools {
        let doc = format!("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {{name: {name}}}\nspec: {{{spec}}}\n", spec = pool_spec(cidr));
        for r in calico_model::parse_documents(&doc)? {
            store.create(r).await?;
        }
    }
    Ok(etcd)
}

/// `10.0.0.0/24` → `cidr: '10.0.0.0/24'`; anything with a colon-space is already a spec.
fn pool_spec(text: &str) -> String {
    if text.contains(": ") {
        text.to_owned()
    } else {
        format!("cidr: '{text}'")
    }
}

/// Whether a link exists in the root namespace.
pub fn host_link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Deletes a host link if a test left it (Drop guard for failing tests).
pub struct HostLinkGuard(pub String);

impl Drop for HostLinkGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.0]).output();
    }
}

/// A workload namespace and its attachment; DEL runs on drop (also when a test fails).
pub struct Attachment {
    pub ns: NetNs,
    pub container: String,
    pub conf: Value,
    pub args: String,
    pub ifname: String,
}

impl Attachment {
    pub fn new(conf: Value) -> Self {
        Self {
            ns: NetNs::new("wl").expect("netns"),
            container: container_id(),
            conf,
            args: String::new(),
            ifname: "eth0".into(),
        }
    }

    pub fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.ns.name())
    }

    pub fn run(&self, command: &str) -> Out {
        self.run_with(command, &self.conf)
    }

    pub fn run_with(&self, command: &str, conf: &Value) -> Out {
        call(
            calico(),
            command,
            &self.container,
            &self.netns_path(),
            &self.ifname,
            &self.args,
            conf,
        )
    }

    pub fn host_veth(&self) -> String {
        format!("cali{}", &self.container[..11])
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.run("DEL");
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_veth()])
            .output();
    }
}

/// Routing between workloads goes through the host (this namespace).
pub fn enable_host_forwarding() {
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("enable IPv4 forwarding");
}

/// IPAM state: (allocated addresses, handles).
pub async fn ipam_usage(etcd: &Etcd) -> anyhow::Result<(usize, usize)> {
    use calico_model::{Kind, Resource};
    let store = store_of(etcd).await?;
    let (blocks, _) = store.list(Kind::IPAMBlock, None).await?;
    let allocated = blocks
        .iter()
        .map(|r| match r {
            Resource::IPAMBlock(b) => b.spec.allocations.iter().filter(|a| a.is_some()).count(),
            _ => 0,
        })
        .sum();
    let (handles, _) = store.list(Kind::IPAMHandle, None).await?;
    Ok((allocated, handles.len()))
}

pub async fn endpoints(etcd: &Etcd) -> anyhow::Result<Vec<calico_model::Resource>> {
    let store = store_of(etcd).await?;
    Ok(store
        .list(calico_model::Kind::WorkloadEndpoint, None)
        .await?
        .0)
}
