//! The plugins called the way libcni calls them, on real network namespaces, veths and etcd.

use crate::common::*;
use harness::{require, NetNs, Requirement, Veth};
use serde_json::{json, Value};

const NEEDS: &[Requirement] = &[Requirement::Root, Requirement::NetNs, Requirement::Etcd];

fn ok(out: &Out, what: &str) {
    assert_eq!(out.code, 0, "{what}: {out:?}");
}

/// The structure of a result: keys, interface roles, which interface each IP is on.
fn shape(result: &Value) -> Value {
    let interfaces: Vec<Value> = result["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(
            |i| json!({ "has_mac": i["mac"].is_string(), "has_sandbox": i["sandbox"].is_string() }),
        )
        .collect();
    let ips: Vec<Value> = result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| {
            let iface = ip["interface"].as_u64().unwrap() as usize;
            json!({
                "on_sandbox_interface": result["interfaces"][iface]["sandbox"].is_string(),
                "has_gateway": ip["gateway"].is_string(),
            })
        })
        .collect();
    let mut keys: Vec<&String> = result.as_object().unwrap().keys().collect();
    keys.sort();
    json!({ "keys": keys, "interfaces": interfaces, "ips": ips, "routes": result["routes"].as_array().unwrap().len() })
}

#[tokio::test]
async fn libcni_sequence_and_the_reference_ptp_shape() -> anyhow::Result<()> {
    if !require("libcni_sequence_and_the_reference_ptp_shape", NEEDS) {
        return Ok(());
    }
    let etcd = etcd_with_pools(&[("p", "198.18.20.0/24")]).await?;
    let conf = netconf(&etcd, "net1", "1.0.0", "node1");
    let w = Attachment::new(conf.clone());

    // libcni probes the version first.
    let version = call(
        calico(),
        "VERSION",
        "",
        "dummy",
        "dummy",
        "",
        &json!({"cniVersion": "1.0.0"}),
    );
    ok(&version, "VERSION");
    let supported = version.json()["supportedVersions"].clone();
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(
            supported.as_array().unwrap().contains(&json!(v)),
            "{v} missing: {supported}"
        );
    }

    let add = w.run("ADD");
    ok(&add, "ADD");
    let result = add.json();
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(result["interfaces"][0]["name"], w.host_veth());
    assert_eq!(result["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(result["interfaces"][1]["sandbox"], w.netns_path());
    assert_eq!(result["ips"][0]["address"], "198.18.20.0/32");
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");

    // Inside the workload: address, default route via 169.254.1.1, permanent neighbour, MTU.
    let addr = w.ns.exec_ok("ip", &["-o", "addr", "show", "eth0"])?;
    assert!(addr.contains("198.18.20.0/32"), "{addr}");
    let routes = w.ns.exec_ok("ip", &["route"])?;
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    let neigh = w.ns.exec_ok("ip", &["neigh"])?;
    assert!(
        neigh.contains("169.254.1.1 dev eth0 lladdr ee:ee:ee:ee:ee:ee PERMANENT"),
        "{neigh}"
    );
    assert!(w
        .ns
        .exec_ok("ip", &["link", "show", "eth0"])?
        .contains("mtu 1450"));
    // On the host: the veth with proxy ARP and a route to the workload.
    let proxy_arp = std::fs::read_to_string(format!(
        "/proc/sys/net/ipv4/conf/{}/proxy_arp",
        w.host_veth()
    ))?;
    assert_eq!(proxy_arp.trim(), "1");
    let host_routes = std::process::Command::new("ip")
        .args(["route", "show", "198.18.20.0"])
        .output()?;
    assert!(String::from_utf8_lossy(&host_routes.stdout).contains(&w.host_veth()));

    // The reference ptp plugin, called the same way, gives a result of the same shape.
    let reference_ns = NetNs::new("ref")?;
    let ptp_conf = json!({
        "cniVersion": "1.0.0", "name": "refnet", "type": "ptp", "ipMasq": false, "mtu": 1450,
        "ipam": { "type": "host-local", "ranges": [[{"subnet": "198.18.21.0/24"}]],
                  "routes": [{"dst": "0.0.0.0/0"}],
                  "dataDir": std::env::temp_dir().join(format!("ptp-{}", std::process::id())).display().to_string() },
    });
    let ref_container = container_id();
    let ref_netns = format!("/run/netns/{}", reference_ns.name());
    let ptp = call(
        "/usr/lib/cni/ptp",
        "ADD",
        &ref_container,
        &ref_netns,
        "eth0",
        "",
        &ptp_conf,
    );
    ok(&ptp, "reference ptp ADD");
    let ptp_result = ptp.json();
    assert_eq!(
        shape(&result),
        shape(&ptp_result),
        "calico: {result}\nptp: {ptp_result}"
    );
    ok(
        &call(
            "/usr/lib/cni/ptp",
            "DEL",
            &ref_container,
            &ref_netns,
            "eth0",
            "",
            &ptp_conf,
        ),
        "ptp DEL",
    );
    // And the same shape as the capture in shared/reference, when it is there.
    let capture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/reference/ptp-add-1.json");
    if let Ok(text) = std::fs::read_to_string(&capture) {
        let captured: Value = serde_json::from_str(&text)?;
        assert_eq!(
            shape(&result),
            shape(&captured),
            "capture {}",
            capture.display()
        );
    }

    // CHECK with the previous result, as libcni sends it.
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    ok(&w.run_with("CHECK", &with_prev), "CHECK");

    // The endpoint is in the datastore.
    let weps = endpoints(&etcd).await?;
    assert_eq!(weps.len(), 1);
    assert_eq!(weps[0].name(), format!("node1-cni-{}-eth0", w.container));

    ok(&w.run_with("DEL", &with_prev), "DEL");
    ok(&w.run_with("DEL", &with_prev), "second DEL");
    assert!(!host_link_exists(&w.host_veth()), "veth left behind");
    assert_eq!(ipam_usage(&etcd).await?, (0, 0), "allocation left behind");
    assert!(endpoints(&etcd).await?.is_empty(), "endpoint left behind");
    // CHECK now reports what is missing.
    let check = w.run_with("CHECK", &with_prev);
    assert_eq!(check.code, 1);
    assert_eq!(check.json()["code"], 999);
    assert!(
        check.json()["details"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{check:?}"
    );
    Ok(())
}

#[tokio::test]
async fn two_workloads_reach_each_other_through_the_host() -> anyhow::Result<()> {
    if !require("two_workloads_reach_each_other_through_the_host", NEEDS) {
        return Ok(());
    }
    enable_host_forwarding();
    let etcd = etcd_with_pools(&[("p", "198.18.22.0/24")]).await?;
    let conf = netconf(&etcd, "net1", "1.0.0", "node1");
    let a = Attachment::new(conf.clone());
    let b = Attachment::new(conf);
    ok(&a.run("ADD"), "ADD a");
    let b_add = b.run("ADD");
    ok(&b_add, "ADD b");
    let b_ip: std::net::IpAddr = b_add.json()["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()?;
    assert!(a.ns.ping(b_ip)?, "a cannot reach b at {b_ip}");
    Ok(())
}

#[tokio::test]
async fn older_versions_dual_stack_and_idempotent_retries() -> anyhow::Result<()> {
    if !require("older_versions_dual_stack_and_idempotent_retries", NEEDS) {
        return Ok(());
    }
    let etcd = etcd_with_pools(&[("p4", "198.18.23.0/24"), ("p6", "fd00:18:23::/120")]).await?;
    let mut conf = netconf(&etcd, "net1", "0.3.1", "node1");
    conf["ipam"]["assign_ipv6"] = json!("true");
    let w = Attachment::new(conf);
    let add = w.run("ADD");
    ok(&add, "ADD");
    let r = add.json();
    assert_eq!(r["cniVersion"], "0.3.1");
    assert_eq!(r["ips"][0]["version"], "4");
    assert_eq!(r["ips"][1]["version"], "6");
    assert_eq!(r["ips"][1]["gateway"], "fe80::ecee:eeff:feee:eeee");
    let v6 = w.ns.exec_ok("ip", &["-6", "route"])?;
    assert!(
        v6.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{v6}"
    );
    // A runtime retrying ADD gets the same answer and nothing more is allocated.
    let again = w.run("ADD");
    ok(&again, "second ADD");
    assert_eq!(again.json()["ips"], r["ips"]);
    assert_eq!(ipam_usage(&etcd).await?, (2, 1));
    // The same container ID in a new namespace (a sandbox re-created under the same ID) is
    // wired there, with the same addresses, not answered with the old namespace's result.
    let fresh = harness::NetNs::new("wl2")?;
    let fresh_path = format!("/run/netns/{}", fresh.name());
    let moved = call(
        calico(),
        "ADD",
        &w.container,
        &fresh_path,
        "eth0",
        "",
        &w.conf,
    );
    ok(&moved, "ADD in a new netns");
    let m = moved.json();
    assert_eq!(m["ips"], r["ips"], "addresses kept");
    assert_eq!(m["interfaces"][1]["sandbox"], fresh_path.as_str(), "{m}");
    let v4 = r["ips"][0]["address"].as_str().unwrap().to_owned();
    let inside = fresh.exec_ok("ip", &["-o", "addr", "show", "dev", "eth0"])?;
    assert!(
        inside.contains(&v4),
        "{v4} not on eth0 in the new netns: {inside}"
    );
    assert_eq!(ipam_usage(&etcd).await?, (2, 1), "nothing more allocated");
    for v in ["0.3.0", "0.4.0", "1.1.0"] {
        let mut c = w.conf.clone();
        c["cniVersion"] = json!(v);
        let out = w.run_with("ADD", &c);
        ok(&out, v);
        assert_eq!(out.json()["cniVersion"], v);
    }
    Ok(())
}

#[tokio::test]
async fn kubernetes_arguments_name_things_as_upstream() -> anyhow::Result<()> {
    if !require("kubernetes_arguments_name_things_as_upstream", NEEDS) {
        return Ok(());
    }
    let etcd = etcd_with_pools(&[("p", "198.18.24.0/24")]).await?;
    let mut w = Attachment::new(netconf(&etcd, "k8s-pod-network", "1.0.0", "node-1"));
    let pod = format!("web-{}", &w.container[..8]);
    w.args = format!(
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={}",
        w.container
    );
    let add = w.run("ADD");
    ok(&add, "ADD");
    let veth = add.json()["interfaces"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let _guard = HostLinkGuard(veth.clone());
    let expected_veth = {
        use sha1::{Digest, Sha1};
        let d = Sha1::digest(format!("shop.{pod}").as_bytes());
        format!(
            "cali{}",
            &d.iter().map(|b| format!("{b:02x}")).collect::<String>()[..11]
        )
    };
    assert_eq!(veth, expected_veth);
    let weps = endpoints(&etcd).await?;
    let calico_model::Resource::WorkloadEndpoint(wep) = &weps[0] else {
        panic!("not an endpoint")
    };
    assert_eq!(
        wep.metadata.name,
        format!("node--1-k8s-{}-eth0", pod.replace('-', "--"))
    );
    assert_eq!(wep.metadata.namespace.as_deref(), Some("shop"));
    assert_eq!(wep.spec.orchestrator, "k8s");
    assert_eq!(wep.spec.pod, pod);
    assert_eq!(wep.spec.profiles, ["kns.shop"]);
    assert_eq!(wep.metadata.labels["projectcalico.org/namespace"], "shop");
    ok(&w.run("DEL"), "DEL");
    assert!(!host_link_exists(&veth));
    Ok(())
}

#[tokio::test]
async fn errors_carry_the_spec_codes_and_roll_back() -> anyhow::Result<()> {
    if !require("errors_carry_the_spec_codes_and_roll_back", NEEDS) {
        return Ok(());
    }
    let etcd = etcd_with_pools(&[("tiny", "cidr: '198.18.25.0/31', blockSize: 31")]).await?;
    let conf = netconf(&etcd, "net1", "1.0.0", "node1");
    let w = Attachment::new(conf.clone());

    let raw = |stdin: &str, env: &[(&str, &str)]| {
        let mut c = std::process::Command::new(calico());
        c.env_clear().env("CNI_PATH", cni_path());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.code().unwrap(),
            serde_json::from_slice::<Value>(&out.stdout).unwrap_or_default(),
        )
    };
    let add_env = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "x"),
        ("CNI_NETNS", "/run/netns/none"),
        ("CNI_IFNAME", "eth0"),
    ];
    let (rc, out) = raw("{not json", &add_env);
    assert_eq!((rc, out["code"].as_u64()), (1, Some(6)), "{out}");
    let (rc, out) = raw(
        r#"{"cniVersion":"0.2.0","name":"n","type":"calico","ipam":{"type":"calico-ipam"}}"#,
        &add_env,
    );
    assert_eq!((rc, out["code"].as_u64()), (1, Some(1)), "{out}");
    let (rc, out) = raw(&conf.to_string(), &[("CNI_COMMAND", "ADD")]);
    assert_eq!((rc, out["code"].as_u64()), (1, Some(4)), "{out}");
    let mut no_ipam = conf.clone();
    no_ipam.as_object_mut().unwrap().remove("ipam");
    let out = w.run_with("ADD", &no_ipam);
    assert_eq!(out.json()["code"], 7, "{out:?}");
    assert!(out.json()["msg"].as_str().unwrap().contains("ipam"));

    // STATUS: fine while etcd answers; 50 when it does not.
    let mut status_conf = conf.clone();
    status_conf["cniVersion"] = json!("1.1.0");
    let status = w.run_with("STATUS", &status_conf);
    assert_eq!((status.code, status.stdout.trim()), (0, ""), "{status:?}");
    let mut down = status_conf.clone();
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    down["etcd_endpoints"] = json!(format!("http://127.0.0.1:{port}"));
    let status = w.run_with("STATUS", &down);
    assert_eq!(status.json()["code"], 50, "{status:?}");
    let mut down_add = down.clone();
    down_add["cniVersion"] = json!("1.0.0");
    assert_eq!(
        w.run_with("ADD", &down_add).json()["code"],
        11,
        "unreachable datastore means try again later"
    );

    // A failure after IPAM (the interface name is taken in the workload) rolls back.
    let other = NetNs::new("oth")?;
    let taken = Veth::between(&w.ns, &other)?;
    let mut taken_att = Attachment::new(conf.clone());
    taken_att.ns = NetNs::new("tk")?;
    drop(taken);
    // Give the workload an interface already called eth0.
    let blocker = NetNs::new("blk")?;
    let veth = Veth::between(&taken_att.ns, &blocker)?;
    taken_att
        .ns
        .exec_ok("ip", &["link", "set", &veth.a_name, "name", "eth0"])?;
    let out = taken_att.run("ADD");
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(out.json()["code"], 999);
    assert!(
        !host_link_exists(&taken_att.host_veth()),
        "veth left behind after a failed ADD"
    );
    assert!(
        taken_att
            .ns
            .exec("ip", &["link", "show", "eth0"])?
            .status
            .success(),
        "the rollback of a failed ADD deleted the container's own eth0"
    );
    assert_eq!(
        ipam_usage(&etcd).await?,
        (0, 0),
        "address left allocated after a failed ADD"
    );

    // An exhausted pool is a clear error and leaves nothing behind.
    let a = Attachment::new(conf.clone());
    let b = Attachment::new(conf.clone());
    let c = Attachment::new(conf.clone());
    ok(&a.run("ADD"), "a");
    ok(&b.run("ADD"), "b");
    let out = c.run("ADD");
    assert_eq!(out.code, 1);
    assert!(
        out.json()["msg"]
            .as_str()
            .unwrap()
            .contains("no free address"),
        "{out:?}"
    );
    assert!(!host_link_exists(&c.host_veth()));
    assert_eq!(ipam_usage(&etcd).await?, (2, 2));
    Ok(())
}

#[tokio::test]
async fn gc_removes_attachments_that_are_no_longer_valid() -> anyhow::Result<()> {
    if !require("gc_removes_attachments_that_are_no_longer_valid", NEEDS) {
        return Ok(());
    }
    let etcd = etcd_with_pools(&[("p", "198.18.26.0/24")]).await?;
    let conf = netconf(&etcd, "net1", "1.1.0", "node1");
    let keep = Attachment::new(conf.clone());
    let stale = Attachment::new(conf.clone());
    ok(&keep.run("ADD"), "keep");
    ok(&stale.run("ADD"), "stale");
    // A GC whose list is missing or unreadable is refused and removes nothing.
    for bad in [
        None,
        Some(json!("not a list")),
        Some(json!([{ "ifname": "eth0" }])),
        Some(json!([{ "containerID": 7 }])),
    ] {
        let mut gc = conf.clone();
        if let Some(list) = &bad {
            gc["cni.dev/valid-attachments"] = list.clone();
        }
        let out = call(calico(), "GC", "", "", "", "", &gc);
        assert_eq!(
            (out.code, out.json()["code"].as_u64()),
            (1, Some(7)),
            "{bad:?}: {out:?}"
        );
        assert!(
            host_link_exists(&keep.host_veth()) && host_link_exists(&stale.host_veth()),
            "a refused GC ({bad:?}) removed attachments"
        );
        assert_eq!(
            ipam_usage(&etcd).await?,
            (2, 2),
            "a refused GC ({bad:?}) released addresses"
        );
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{ "containerID": keep.container, "ifname": "eth0" }]);
    let out = call(calico(), "GC", "", "", "", "", &gc);
    ok(&out, "GC");
    assert!(
        host_link_exists(&keep.host_veth()),
        "GC removed a valid attachment"
    );
    assert!(
        !host_link_exists(&stale.host_veth()),
        "GC left a stale veth"
    );
    assert_eq!(ipam_usage(&etcd).await?, (1, 1));
    let weps = endpoints(&etcd).await?;
    assert_eq!(weps.len(), 1);
    Ok(())
}

/// Two container IDs that share their first 11 characters (upstream's veth name) get two veths;
/// deleting one leaves the other's veth, endpoint and address alone.
#[tokio::test]
async fn attachments_sharing_a_name_prefix_keep_their_own_veths() -> anyhow::Result<()> {
    if !require(
        "attachments_sharing_a_name_prefix_keep_their_own_veths",
        NEEDS,
    ) {
        return Ok(());
    }
    let etcd = etcd_with_pools(&[("p", "198.18.27.0/24")]).await?;
    let conf = netconf(&etcd, "net1", "1.0.0", "node1");
    let prefix = format!("{:08x}abc", std::process::id());
    let mut a = Attachment::new(conf.clone());
    a.container = format!("{prefix}{}", "1".repeat(53));
    let mut b = Attachment::new(conf.clone());
    b.container = format!("{prefix}{}", "2".repeat(53));
    let host_name = |out: &Out| -> String {
        out.json()["interfaces"][0]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let out_a = a.run("ADD");
    ok(&out_a, "a");
    let out_b = b.run("ADD");
    ok(&out_b, "b");
    let (veth_a, veth_b) = (host_name(&out_a), host_name(&out_b));
    assert_eq!(
        veth_a,
        format!("cali{}", &prefix[..11]),
        "a keeps upstream's name"
    );
    assert_ne!(veth_a, veth_b, "two attachments share one veth");
    assert!(host_link_exists(&veth_a) && host_link_exists(&veth_b));

    let del = b.run("DEL");
    assert_eq!(del.code, 0, "{del:?}");
    assert!(!host_link_exists(&veth_b), "b's veth stayed");
    assert!(host_link_exists(&veth_a), "deleting b took a's veth");
    assert_eq!(endpoints(&etcd).await?.len(), 1, "a's endpoint went with b");
    assert_eq!(ipam_usage(&etcd).await?, (1, 1));
    // A retried ADD of a finds its own veth again.
    let again = a.run("ADD");
    ok(&again, "a again");
    assert_eq!(host_name(&again), veth_a);
    Ok(())
}

/// A handle record counting an address no block holds (what a DEL that died between freeing
/// the address and deleting the record leaves; an allocation and its record are written in
/// one transaction, so an ADD cannot). An ADD for the attachment corrects it: one address,
/// one record that counts exactly that address; and its DEL leaves nothing.
#[tokio::test]
async fn a_retried_add_corrects_a_record_of_an_address_never_assigned() -> anyhow::Result<()> {
    if !require(
        "a_retried_add_corrects_a_record_of_an_address_never_assigned",
        NEEDS,
    ) {
        return Ok(());
    }
    let etcd = etcd_with_pools(&[("p4", "198.18.26.0/24")]).await?;
    let w = Attachment::new(netconf(&etcd, "net1", "1.0.0", "node1"));
    let store = store_of(&etcd).await?;
    let handle = format!("net1.{}", w.container);
    let record = |count: usize| {
        calico_model::Resource::IPAMHandle(calico_model::Object {
            api_version: calico_model::API_VERSION.into(),
            kind: "IPAMHandle".into(),
            metadata: calico_model::ObjectMeta {
                name: handle.clone(),
                ..Default::default()
            },
            spec: calico_model::spec::IpamHandleSpec {
                handle_id: handle.clone(),
                block: [("198.18.26.0/26".to_owned(), count)].into(),
                deleted: false,
            },
            status: None,
        })
    };
    store.create(record(1)).await?;
    assert_eq!(ipam_usage(&etcd).await?, (0, 1), "a record of nothing");
    let add = w.run("ADD");
    ok(&add, "the runtime's retried ADD");
    assert_eq!(ipam_usage(&etcd).await?, (1, 1));
    let stored = store
        .get(calico_model::Kind::IPAMHandle, None, &handle)
        .await?;
    let calico_model::Resource::IPAMHandle(h) = stored else {
        anyhow::bail!("not a handle: {stored:?}")
    };
    assert_eq!(
        h.spec.block.values().sum::<usize>(),
        1,
        "the record counts the one address held: {:?}",
        h.spec.block
    );
    ok(&w.run("DEL"), "DEL");
    assert_eq!(ipam_usage(&etcd).await?, (0, 0), "nothing left");
    Ok(())
}

/// An address whose handle record was lost (what an older version, which wrote the block and
/// the record apart, could leave) is not found by a retried ADD, which assigns another; the
/// attachment's DEL then releases both, so nothing leaks.
#[tokio::test]
async fn a_del_releases_an_address_whose_handle_record_was_lost() -> anyhow::Result<()> {
    if !require(
        "a_del_releases_an_address_whose_handle_record_was_lost",
        NEEDS,
    ) {
        return Ok(());
    }
    let etcd = etcd_with_pools(&[("p4", "198.18.27.0/24")]).await?;
    let w = Attachment::new(netconf(&etcd, "net1", "1.0.0", "node1"));
    // The IPAM half of a first attempt, as the network plugin runs it.
    let ipam = std::path::Path::new(calico()).with_file_name("calico-ipam");
    let first = call(
        &ipam.display().to_string(),
        "ADD",
        &w.container,
        &w.netns_path(),
        "eth0",
        "",
        &w.conf,
    );
    ok(&first, "calico-ipam ADD");
    store_of(&etcd)
        .await?
        .delete(
            calico_model::Kind::IPAMHandle,
            None,
            &format!("net1.{}", w.container),
            None,
        )
        .await?;
    assert_eq!(ipam_usage(&etcd).await?, (1, 0), "the record was lost");
    ok(&w.run("ADD"), "the runtime's retried ADD");
    assert_eq!(ipam_usage(&etcd).await?, (2, 1));
    ok(&w.run("DEL"), "DEL");
    assert_eq!(ipam_usage(&etcd).await?, (0, 0), "both released");
    Ok(())
}
