//! A real container runtime: podman (CNI backend, as Debian's 4.3 has it) starts two containers
//! on a network whose conflist chains `calico` + `calico-ipam` + the reference `portmap`; they
//! reach each other; removing them leaves no address, endpoint or veth behind.

use std::{path::Path, process::Command};

use crate::common::*;
use harness::{require, Requirement};

struct Podman {
    dir: std::path::PathBuf,
}

impl Podman {
    fn cmd(&self, args: &[&str]) -> std::process::Output {
        Command::new("podman")
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .arg("--root")
            .arg(self.dir.join("root"))
            .arg("--runroot")
            .arg(self.dir.join("runroot"))
            .args(args)
            .output()
            .expect("podman runs")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args);
        assert!(
            out.status.success(),
            "podman {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.cmd(&["rm", "--all", "--force", "--time", "0"]);
        let _ = self.cmd(&["system", "reset", "--force"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_containers_on_a_calico_network() -> anyhow::Result<()> {
    if !require(
        "podman_containers_on_a_calico_network",
        &[
            Requirement::Root,
            Requirement::NetNs,
            Requirement::Etcd,
            Requirement::Podman,
        ],
    ) {
        return Ok(());
    }
    enable_host_forwarding();
    let etcd = etcd_with_pools(&[("podman-pool", "198.18.51.0/24")]).await?;
    let dir = std::env::temp_dir().join(format!("calico-podman-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("net.d"))?;
    let podman = Podman { dir: dir.clone() };
    let network = format!("calinet{}", std::process::id());

    let plugins = Path::new(calico()).parent().unwrap();
    harness::cni_plugin_dir(plugins)?;
    let plugins = plugins.display().to_string();
    std::fs::write(
        dir.join("containers.conf"),
        format!(
            "[containers]\n# The sandbox's hard limits are below podman's defaults.\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n\
             [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{plugins}\", \"/usr/lib/cni\"]\nnetwork_config_dir = \"{}\"\n\
             [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\n",
            dir.join("net.d").display()
        ),
    )?;
    std::fs::write(
        dir.join("net.d").join(format!("{network}.conflist")),
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [
                { "type": "calico", "etcd_endpoints": etcd.endpoint(), "nodename": "podman-node", "mtu": 1450,
                  "ipam": { "type": "calico-ipam" } },
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        })
        .to_string(),
    )?;

    // A local image: a busybox-static root filesystem, imported.
    let tar = harness::busybox_rootfs_tar(&dir)?;
    podman.ok(&["import", tar.to_str().unwrap(), "localhost/calico-busybox"]);
    assert!(podman.ok(&["network", "ls"]).contains(&network));

    for name in ["a", "b"] {
        podman.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &network,
            "--cap-add",
            "NET_RAW",
            "localhost/calico-busybox",
            "sleep",
            "300",
        ]);
    }
    let ip_of = |name: &str| {
        podman.ok(&[
            "inspect",
            name,
            "--format",
            &format!("{{{{.NetworkSettings.Networks.{network}.IPAddress}}}}"),
        ])
    };
    let (a, b) = (ip_of("a"), ip_of("b"));
    assert!(
        a.starts_with("198.18.51.") && b.starts_with("198.18.51."),
        "a={a} b={b}"
    );
    assert_ne!(a, b);
    let ping = podman.ok(&["exec", "b", "ping", "-c", "2", "-W", "2", &a]);
    assert!(ping.contains("2 packets received"), "{ping}");
    assert_eq!(ipam_usage(&etcd).await?, (2, 2));
    let weps = endpoints(&etcd).await?;
    assert_eq!(weps.len(), 2, "one endpoint per container");
    let veths: Vec<String> = weps
        .iter()
        .filter_map(|r| match r {
            calico_model::Resource::WorkloadEndpoint(w) => Some(w.spec.interface_name.clone()),
            _ => None,
        })
        .collect();
    assert!(veths.iter().all(|v| host_link_exists(v)));
    println!("podman: containers a ({a}) and b ({b}) on {network}; b pings a");

    podman.ok(&["rm", "--force", "--time", "0", "a", "b"]);
    assert_eq!(
        ipam_usage(&etcd).await?,
        (0, 0),
        "addresses leaked after podman rm"
    );
    assert!(
        endpoints(&etcd).await?.is_empty(),
        "endpoints leaked after podman rm"
    );
    assert!(
        veths.iter().all(|v| !host_link_exists(v)),
        "veths left after podman rm"
    );
    Ok(())
}
