//! The Docker driver end to end: a real dockerd (in its own network namespace) creating a
//! calico network and running two containers through `calico-node --libnetwork`, which also
//! programs their policy. Then a calicoctl-style deny, and clean-up that leaves no IPAM
//! allocation and no veth.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use calico_model::{Kind, Resource};
use harness::{
    busybox_rootfs_tar, require, unique_name, AgentProcess, Etcd, Forward, NetNs, Requirement,
};

const PLUGIN_DIR: &str = "/run/docker/plugins";

/// dockerd in `host`, with everything under a temporary directory; killed on drop.
struct Dockerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Dockerd {
    fn start(host: &NetNs) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let log = std::fs::File::create(dir.path().join("dockerd.log"))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", host.name()))
            .arg("dockerd")
            .arg("--data-root")
            .arg(dir.path().join("data"))
            .arg("--exec-root")
            .arg(dir.path().join("exec"))
            .arg("--pidfile")
            .arg(dir.path().join("docker.pid"))
            .arg("-H")
            .arg(format!(
                "unix://{}",
                dir.path().join("docker.sock").display()
            ))
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--storage-driver=vfs",
            ])
            .args([
                "--default-ulimit",
                "nofile=1024:1024",
                "--default-ulimit",
                "nproc=1024:1024",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting dockerd")?;
        let mut d = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while d.docker(&["version"]).is_err() {
            if let Some(status) = d.child.try_wait()? {
                bail!("dockerd exited ({status}):\n{}", d.log());
            }
            if Instant::now() > deadline {
                bail!("dockerd did not answer within 60 s:\n{}", d.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(d)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// Runs the docker client against this daemon; its stdout, or its stderr as the error.
    fn docker(&self, args: &[&str]) -> Result<String> {
        // Debian's client, matching its dockerd (an image may put another earlier on PATH).
        let out = Command::new("/usr/bin/docker")
            .arg("-H")
            .arg(format!(
                "unix://{}",
                self.dir.path().join("docker.sock").display()
            ))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "docker {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Leftover container processes of this daemon's shim.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.dir.path().display().to_string())
            .status();
    }
}

/// Removes the driver's sockets when the test ends.
struct PluginSockets;
impl Drop for PluginSockets {
    fn drop(&mut self) {
        for s in ["calico.sock", "calico-ipam.sock"] {
            let _ = std::fs::remove_file(Path::new(PLUGIN_DIR).join(s));
        }
    }
}

fn docker_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_calico-node"))
}

#[test]
fn dockerd_runs_containers_on_a_calico_network() -> Result<()> {
    let _load = harness::beside_others();
    if !require(
        "dockerd_runs_containers_on_a_calico_network",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Bpf,
            Requirement::Etcd,
            Requirement::Docker,
        ],
    ) {
        return Ok(());
    }
    let etcd = Etcd::start()?;
    let store = harness::Store::connect(&etcd)?;
    let rt = &store.rt;
    store.apply("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: docker-pool\nspec:\n  cidr: 10.70.0.0/24\n  blockSize: 26\n")?;
    let host = NetNs::new("dk")?;
    // A default route, as every real host has: proxy ARP answers for 169.254.1.1 only when
    // the host has a route to it.
    host.exec_ok(
        "ip",
        &[
            "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
        ],
    )?;
    host.exec_ok("ip", &["link", "set", "uplink1", "up"])?;
    host.exec_ok("ip", &["link", "set", "uplink0", "up"])?;
    host.exec_ok("ip", &["route", "add", "default", "dev", "uplink0"])?;
    let _forward = Forward::loopback(&host, etcd.port())?;
    let _sockets = PluginSockets;
    let node = unique_name("dnod");
    let mut agent = AgentProcess::start_with(
        &docker_binary(),
        &host,
        &etcd.endpoint(),
        &node,
        &["--libnetwork"],
    )?;
    agent.wait_ready(&host, true, Duration::from_secs(30))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Path::new(PLUGIN_DIR).join("calico-ipam.sock").exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the driver's sockets never appeared:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let dockerd = Dockerd::start(&host)?;
    let image_dir = tempfile::tempdir()?;
    let tar = busybox_rootfs_tar(image_dir.path())?;
    dockerd.docker(&["import", &tar.display().to_string(), "calico-busybox:local"])?;

    // Bad requests answer with an error and the driver keeps serving.
    let err = dockerd
        .docker(&[
            "network",
            "create",
            "--driver",
            "calico",
            "--ipam-driver",
            "calico-ipam",
            "--subnet",
            "10.99.0.0/24",
            "badnet",
        ])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("must match the CIDR of a configured calico IPPool"),
        "{err}\nagent log:\n{}\ndockerd log:\n{}",
        agent.log(),
        dockerd.log()
    );

    dockerd
        .docker(&[
            "network",
            "create",
            "--driver",
            "calico",
            "--ipam-driver",
            "calico-ipam",
            "--subnet",
            "10.70.0.0/24",
            "net1",
        ])
        .with_context(|| agent.log())?;
    for (name, ip) in [("ctr-a", None), ("ctr-b", Some("10.70.0.77"))] {
        let mut args = vec!["run", "-d", "--net", "net1", "--name", name];
        if let Some(ip) = ip {
            args.extend(["--ip", ip]);
        }
        args.extend(["calico-busybox:local", "sleep", "600"]);
        dockerd.docker(&args).with_context(|| {
            format!(
                "docker run {name}; dockerd log:\n{}\nagent log:\n{}",
                dockerd.log(),
                agent.log()
            )
        })?;
    }
    let ip_of = |name: &str| -> Result<IpAddr> {
        Ok(dockerd
            .docker(&[
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                name,
            ])?
            .parse()?)
    };
    let (a, b) = (ip_of("ctr-a")?, ip_of("ctr-b")?);
    assert_eq!(b.to_string(), "10.70.0.77", "--ip honoured");
    // (Calico IPAM hands out every address of a block, .0 included: routes are /32.)
    assert!(a.to_string().starts_with("10.70.0."), "ctr-a got {a}");

    let ping = |from: &str, to: IpAddr| {
        dockerd
            .docker(&["exec", from, "ping", "-c", "1", "-W", "1", &to.to_string()])
            .is_ok()
    };
    let wait_ping = |from: &str, to: IpAddr, expected: bool| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while ping(from, to) != expected {
            if Instant::now() > deadline {
                bail!(
                    "ping {from} → {to} never became {expected}; agent log:\n{}",
                    agent.log()
                );
            }
        }
        Ok(())
    };
    wait_ping("ctr-a", b, true)?;
    wait_ping("ctr-b", a, true)?;

    // A policy (what `calicoctl apply` writes) denies traffic into b.
    store.apply("apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata:\n  name: deny-into-b\nspec:\n  selector: projectcalico.org/orchestrator == 'libnetwork' && !has(nothing)\n  ingress:\n  - action: Deny\n    destination:\n      nets: ['10.70.0.77/32']\n  - action: Pass\n")?;
    wait_ping("ctr-a", b, false)?;

    // Clean up through docker: nothing may be left behind.
    dockerd.docker(&["rm", "-f", "ctr-a", "ctr-b"])?;
    dockerd.docker(&["network", "rm", "net1"])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (blocks, _) = rt.block_on(store.ds.list(Kind::IPAMBlock, None))?;
        let allocated: usize = blocks
            .iter()
            .map(|r| match r {
                Resource::IPAMBlock(b) => b.spec.allocations.iter().filter(|a| a.is_some()).count(),
                _ => 0,
            })
            .sum();
        let (weps, _) = rt.block_on(store.ds.list(Kind::WorkloadEndpoint, None))?;
        let veths = host.exec_ok("ip", &["-o", "link", "show"])?;
        let leftover_veths = veths
            .lines()
            .filter(|l| l.contains(": cali") || l.contains(": temp"))
            .count();
        if allocated == 0 && weps.is_empty() && leftover_veths == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("left behind: {allocated} allocations, {} endpoints, {leftover_veths} veths\n{veths}", weps.len());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (profiles, _) = rt.block_on(store.ds.list(Kind::Profile, None))?;
    assert!(
        profiles.is_empty(),
        "the network's profile went with it: {profiles:?}"
    );
    let (handles, _) = rt.block_on(store.ds.list(Kind::IPAMHandle, None))?;
    assert!(handles.is_empty(), "IPAM handles left: {handles:?}");
    // And calicoctl agrees (built beside calico-node by the workspace build).
    let calicoctl = docker_binary().with_file_name("calicoctl");
    if calicoctl.exists() {
        let check = Command::new(&calicoctl)
            .args(["ipam", "check"])
            .env("ETCD_ENDPOINTS", etcd.endpoint())
            .output()?;
        let text = String::from_utf8_lossy(&check.stdout).into_owned();
        assert!(
            check.status.success() && text.contains("IPAM is clean"),
            "{text}{}",
            String::from_utf8_lossy(&check.stderr)
        );
        eprintln!("$ calicoctl ipam check\n{text}");
    } else {
        eprintln!("*** calicoctl not built beside calico-node; `ipam check` not run (cargo test --workspace builds it) ***");
    }

    // Bad requests straight to the socket: a clear `Err`, and the driver keeps serving.
    let (code, body) = call("NetworkDriver.CreateEndpoint", "{not json")?;
    assert_eq!(code, 500);
    assert!(
        body.contains("malformed request body for NetworkDriver.CreateEndpoint"),
        "{body}"
    );
    let (code, body) = call(
        "NetworkDriver.Join",
        r#"{"NetworkID":"n","EndpointID":"nosuchendpoint","SandboxKey":"/x"}"#,
    )?;
    assert_eq!(code, 500);
    assert!(
        body.contains("endpoint nosuchendpoint has no interface"),
        "{body}"
    );
    let (code, body) = call(
        "NetworkDriver.CreateEndpoint",
        r#"{"NetworkID":"nosuchnetwork","EndpointID":"e1","Interface":{"Address":"10.70.0.9/32"}}"#,
    )?;
    assert_eq!(code, 500);
    assert!(
        body.contains("network nosuchnetwork is unknown to calico"),
        "{body}"
    );
    let (code, body) = call(
        "IpamDriver.RequestAddress",
        r#"{"PoolID":"10.98.0.0/24","Address":"","Options":{}}"#,
    )?;
    assert_eq!(code, 500);
    assert!(
        body.contains("IPPool 10.98.0.0/24 no longer exists"),
        "{body}"
    );
    // An exhausted pool: a /30 pool of four addresses, asked for five.
    store.apply("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: tiny\nspec:\n  cidr: 10.71.0.0/30\n  blockSize: 30\n")?;
    let request = r#"{"PoolID":"10.71.0.0/30","Address":"","Options":{}}"#;
    let mut handed_out = Vec::new();
    for _ in 0..4 {
        let (code, body) = call("IpamDriver.RequestAddress", request)?;
        assert_eq!(code, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        handed_out.push(answer["Address"].as_str().unwrap_or_default().to_owned());
    }
    let (code, body) = call("IpamDriver.RequestAddress", request)?;
    assert_eq!(code, 500);
    assert!(body.contains("no free address"), "{body}");

    // The driver acts on its own addresses and interfaces only. An address another component
    // holds (the CNI plugin's handle) is not released; one the driver handed out is.
    let ipam = calico_ipam::Ipam::new(store.ds.clone(), node.clone());
    let foreign: IpAddr = "10.70.0.200".parse()?;
    rt.block_on(ipam.assign_ip(foreign, "k8s-pod-network.0123456789ab", &Default::default()))?;
    let (code, body) = call(
        "IpamDriver.ReleaseAddress",
        r#"{"PoolID":"10.70.0.0/24","Address":"10.70.0.200/32"}"#,
    )?;
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains("held by IPAM handle `k8s-pod-network.0123456789ab`"),
        "{body}"
    );
    assert_eq!(
        rt.block_on(ipam.handle_of(foreign))?.as_deref(),
        Some("k8s-pod-network.0123456789ab"),
        "another component's address was released"
    );
    let own = handed_out[0]
        .split('/')
        .next()
        .unwrap_or_default()
        .parse::<IpAddr>()?;
    let (code, body) = call(
        "IpamDriver.ReleaseAddress",
        &format!(
            r#"{{"PoolID":"10.71.0.0/30","Address":"{}"}}"#,
            handed_out[0]
        ),
    )?;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        rt.block_on(ipam.handle_of(own))?,
        None,
        "its own address stays held"
    );
    // A `cali*` veth that no endpoint of the driver names survives a DeleteEndpoint whose ID
    // maps to its name; the driver's own endpoints lost theirs above (`docker rm`).
    host.exec_ok(
        "ip",
        &[
            "link",
            "add",
            "califoreign0abc",
            "type",
            "veth",
            "peer",
            "name",
            "foreignpeer0",
        ],
    )?;
    let (code, body) = call(
        "NetworkDriver.DeleteEndpoint",
        r#"{"NetworkID":"n","EndpointID":"foreign0abcdef0123"}"#,
    )?;
    assert_eq!(code, 200, "{body}");
    assert!(
        host.exec("ip", &["link", "show", "califoreign0abc"])?
            .status
            .success(),
        "DeleteEndpoint removed an interface the driver did not make"
    );
    // A refused ID: nothing that could not be Docker's reaches a name.
    let (code, body) = call(
        "NetworkDriver.DeleteEndpoint",
        r#"{"NetworkID":"n","EndpointID":"../eth0"}"#,
    )?;
    assert_eq!(code, 500);
    assert!(body.contains("is not an ID"), "{body}");
    // The same bound on the plugin socket.
    const ENDLESS: usize = 64 << 20;
    let stream =
        std::os::unix::net::UnixStream::connect(Path::new(PLUGIN_DIR).join("calico.sock"))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    let taken = harness::http::endless_request_line(stream, ENDLESS);
    assert!(
        taken < ENDLESS / 4,
        "the plugin socket read {taken} bytes of one request line"
    );
    let (code, body) = call("Plugin.Activate", "")?;
    assert_eq!(
        (code, body.contains("NetworkDriver")),
        (200, true),
        "still serving: {body}"
    );
    Ok(())
}

/// One request on the driver's socket, as Docker sends it: (status, body).
fn call(method: &str, body: &str) -> Result<(u16, String)> {
    harness::http::post_unix(
        &Path::new(PLUGIN_DIR).join("calico.sock"),
        &format!("/{method}"),
        body,
    )
}
