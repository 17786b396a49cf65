//! calicoctl, the built binary, against a real etcd: Calico's documented examples in and out,
//! upstream's semantics, the output formats, and bad input with its message and exit code.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
};

use harness::{require, Etcd, Requirement};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

struct Ctl {
    etcd: Etcd,
    dir: tempfile::TempDir,
}

impl Ctl {
    fn start() -> Option<Self> {
        if !require("calicoctl CLI tests", &[Requirement::Etcd]) {
            return None;
        }
        Some(Self {
            etcd: Etcd::start().expect("etcd starts"),
            dir: tempfile::tempdir().expect("temp dir"),
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_calicoctl"));
        c.args(args)
            .env("ETCD_ENDPOINTS", self.etcd.endpoint())
            .env_remove("DATASTORE_TYPE");
        c
    }

    fn run(&self, args: &[&str]) -> Out {
        let o = self.command(args).output().expect("calicoctl runs");
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    fn run_stdin(&self, args: &[&str], input: &str) -> Out {
        let mut child = self
            .command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("calicoctl runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let o = child.wait_with_output().unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_eq!(out.code, 0, "calicoctl {args:?} failed: {out:?}");
        out.stdout
    }

    fn file(&self, name: &str, text: &str) -> String {
        let path: PathBuf = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

const FIXTURES: &[&str] = &[
    include_str!("../../../userspace/model/tests/fixtures/policies.yaml"),
    include_str!("../../../userspace/model/tests/fixtures/endpoints.yaml"),
    include_str!("../../../userspace/model/tests/fixtures/network.yaml"),
    include_str!("../../../userspace/model/tests/fixtures/config.yaml"),
    // Every FelixConfiguration and BGPConfiguration field of upstream's API.
    include_str!("../../../userspace/model/tests/fixtures/upstream-config.yaml"),
    include_str!("../../../userspace/model/tests/fixtures/upstream-kinds.yaml"),
];

/// The YAML documents of `text` as values, without the metadata the datastore sets.
fn documents(text: &str) -> Vec<serde_yaml_ng::Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde_yaml_ng::Value::deserialize(d).unwrap())
        .filter(|v| !v.is_null())
        .flat_map(|v| match v.get("items") {
            Some(serde_yaml_ng::Value::Sequence(items)) => items.clone(),
            _ => vec![v],
        })
        .map(|mut v| {
            if let Some(serde_yaml_ng::Value::Mapping(meta)) = v.get_mut("metadata") {
                for server_set in ["uid", "creationTimestamp", "resourceVersion"] {
                    meta.remove(server_set);
                }
            }
            v
        })
        .collect()
}

#[test]
fn documented_examples_apply_and_read_back_unchanged() {
    let Some(ctl) = Ctl::start() else { return };
    for (i, text) in FIXTURES.iter().enumerate() {
        let path = ctl.file(&format!("fixture{i}.yaml"), text);
        let out = ctl.ok(&["apply", "-f", &path]);
        assert!(out.starts_with("Successfully applied"), "{out}");
        for original in documents(text) {
            let kind = original["kind"].as_str().unwrap().to_owned();
            let name = original["metadata"]["name"].as_str().unwrap().to_owned();
            let mut args = vec!["get", kind.as_str(), name.as_str(), "-o", "yaml"];
            let ns = original["metadata"]["namespace"]
                .as_str()
                .map(str::to_owned);
            if let Some(ns) = &ns {
                args.extend(["-n", ns.as_str()]);
            }
            let got = ctl.ok(&args);
            let round = documents(&got);
            assert_eq!(
                round,
                std::slice::from_ref(&original),
                "{kind} {name} changed:\n{got}"
            );
            assert!(
                got.contains("resourceVersion"),
                "server metadata missing:\n{got}"
            );
        }
    }
    // The keys sit where upstream puts them.
    let keys = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &ctl.etcd.endpoint(),
            "get",
            "--prefix",
            "--keys-only",
            "/calico/",
        ])
        .output()
        .expect("etcdctl runs (Debian etcd-client)");
    let keys = String::from_utf8_lossy(&keys.stdout);
    for expected in [
        "/calico/resources/v3/projectcalico.org/networkpolicies/production/allow-tcp-6379",
        "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/deny-blue",
        "/calico/resources/v3/projectcalico.org/tiers/security",
        "/calico/resources/v3/projectcalico.org/ippools/my.ippool-1",
        "/calico/resources/v3/projectcalico.org/workloadendpoints/default/node1-k8s-my--nginx--b1337a-eth0",
        "/calico/resources/v3/projectcalico.org/bgpconfigurations/default",
        "/calico/resources/v3/projectcalico.org/felixconfigurations/node.node1",
    ] {
        assert!(keys.lines().any(|k| k == expected), "{expected} missing from:\n{keys}");
    }
    // Applying the same files again is a no-op that succeeds.
    let path = ctl.file("again.yaml", FIXTURES[0]);
    assert!(ctl
        .ok(&["apply", "-f", &path])
        .starts_with("Successfully applied"));
}

#[test]
fn create_replace_delete_follow_upstream_semantics() {
    let Some(ctl) = Ctl::start() else { return };
    let pool = ctl.file(
        "pool.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool1\nspec:\n  cidr: 10.10.0.0/16\n",
    );
    assert_eq!(
        ctl.ok(&["create", "-f", &pool]),
        "Successfully created 1 'IPPool' resource(s)\n"
    );
    let again = ctl.run(&["create", "-f", &pool]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(
        again.stderr.contains("IPPool pool1 already exists"),
        "{again:?}"
    );
    ctl.ok(&["create", "-f", &pool, "--skip-exists"]);

    // replace with the current resourceVersion works; with a stale one it is refused.
    let current = ctl.ok(&["get", "ippool", "pool1", "-o", "yaml"]);
    let edited = ctl.file(
        "edited.yaml",
        &current.replace("cidr: 10.10.0.0/16", "cidr: 10.11.0.0/16"),
    );
    assert!(ctl
        .ok(&["replace", "-f", &edited])
        .starts_with("Successfully replaced"));
    let stale = ctl.run(&["replace", "-f", &edited]);
    assert_eq!(stale.code, 1, "{stale:?}");
    assert!(stale.stderr.contains("is stale"), "{stale:?}");

    // An overlapping pool is refused, naming both, and nothing is written.
    let overlapping = ctl.file(
        "overlap.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool2\nspec:\n  cidr: 10.11.128.0/24\n",
    );
    let refused = ctl.run(&["apply", "-f", &overlapping]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("IPPool pool2 (10.11.128.0/24) overlaps IPPool pool1 (10.11.0.0/16)"),
        "{refused:?}"
    );
    assert_eq!(
        ctl.run(&["get", "ippool", "pool2"]).code,
        1,
        "nothing written"
    );

    // get of a missing name exits 1 naming it.
    let missing = ctl.run(&["get", "ippool", "nope"]);
    assert_eq!(missing.code, 1);
    assert!(
        missing
            .stderr
            .contains("resource does not exist: IPPool(nope)"),
        "{missing:?}"
    );
    let missing_ns = ctl.run(&["get", "networkpolicy", "nope", "-n", "prod"]);
    assert!(
        missing_ns.stderr.contains("NetworkPolicy(prod/nope)"),
        "{missing_ns:?}"
    );

    assert_eq!(
        ctl.ok(&["delete", "ippool", "pool1"]),
        "Successfully deleted 1 'IPPool' resource(s)\n"
    );
    let twice = ctl.run(&["delete", "ippool", "pool1"]);
    assert_eq!(twice.code, 1, "{twice:?}");
    ctl.ok(&["delete", "ippool", "pool1", "--skip-not-exists"]);

    // Namespaced kinds default to `default`; stdin works.
    let out = ctl.run_stdin(
        &["apply", "-f", "-"],
        "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: np1}\nspec: {selector: all()}\n",
    );
    assert_eq!(out.code, 0, "{out:?}");
    assert!(ctl
        .ok(&["get", "netpol", "np1", "-n", "default"])
        .contains("np1"));
    assert!(ctl.ok(&["get", "policy", "-A"]).contains("default     np1"));
}

#[test]
fn output_formats() {
    let Some(ctl) = Ctl::start() else { return };
    let path = ctl.file("network.yaml", FIXTURES[2]);
    ctl.ok(&["apply", "-f", &path]);
    let table = ctl.ok(&["get", "ippools"]);
    assert_eq!(
        table,
        "NAME          CIDR           SELECTOR\nipv6-pool     fd00:10::/64\nmy.ippool-1   10.1.0.0/16    all()\n"
    );
    let wide = ctl.ok(&["get", "ippools", "-o", "wide"]);
    assert!(
        wide.starts_with("NAME          CIDR           SELECTOR   NAT    IPIPMODE      VXLANMODE"),
        "{wide}"
    );
    assert!(wide.contains("CrossSubnet"), "{wide}");
    let custom = ctl.ok(&["get", "ippools", "-o", "custom-columns=NAME,NAT"]);
    assert_eq!(custom, "NAME          NAT\nipv6-pool\nmy.ippool-1   true\n");
    let bad_column = ctl.run(&["get", "ippools", "-o", "custom-columns=NAME,COLOUR"]);
    assert_eq!(bad_column.code, 1);
    assert!(
        bad_column.stderr.contains("no column `COLOUR`"),
        "{bad_column:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["get", "ippools", "-o", "json"])).unwrap();
    assert_eq!(json["kind"], "IPPoolList");
    assert_eq!(json["items"].as_array().unwrap().len(), 2);
    let one: serde_json::Value =
        serde_json::from_str(&ctl.ok(&["get", "bgppeer", "some.name", "-o", "json"])).unwrap();
    assert_eq!(one["spec"]["peerIP"], "192.168.1.1");
    // A list request answers with the kind's list whatever the count (upstream's shape); one
    // name, with the object.
    for (args, kind, count) in [
        (&["get", "bgppeers", "-o", "json"][..], "BGPPeerList", 3),
        (
            &["get", "hostendpoints", "-o", "json"][..],
            "HostEndpointList",
            0,
        ),
        (
            &["get", "ippool", "my.ippool-1", "ipv6-pool", "-o", "json"][..],
            "IPPoolList",
            2,
        ),
    ] {
        let list: serde_json::Value = serde_json::from_str(&ctl.ok(args)).unwrap();
        assert_eq!(list["kind"], kind, "{args:?}");
        assert_eq!(list["items"].as_array().unwrap().len(), count, "{args:?}");
    }
    let yaml = ctl.ok(&["get", "bgppeers", "-o", "yaml"]);
    assert!(yaml.contains("kind: BGPPeerList"), "{yaml}");
    let bad_format = ctl.run(&["get", "ippools", "-o", "xml"]);
    assert_eq!(bad_format.code, 2, "{bad_format:?}");
    assert!(bad_format.stderr.contains("unknown output format `xml`"));
}

#[test]
fn patch_and_label() {
    let Some(ctl) = Ctl::start() else { return };
    let path = ctl.file("network.yaml", FIXTURES[2]);
    ctl.ok(&["apply", "-f", &path]);
    ctl.ok(&[
        "patch",
        "ippool",
        "my.ippool-1",
        "-p",
        r#"{"spec":{"disabled":true}}"#,
    ]);
    assert!(ctl
        .ok(&["get", "ippool", "my.ippool-1", "-o", "yaml"])
        .contains("disabled: true"));
    let invalid = ctl.run(&[
        "patch",
        "ippool",
        "my.ippool-1",
        "-p",
        r#"{"spec":{"blockSize":8}}"#,
    ]);
    assert_eq!(invalid.code, 1);
    assert!(invalid.stderr.contains("spec.blockSize"), "{invalid:?}");
    let not_json = ctl.run(&["patch", "ippool", "my.ippool-1", "-p", "{spec"]);
    assert!(not_json.stderr.contains("not valid JSON"), "{not_json:?}");

    assert_eq!(
        ctl.ok(&["label", "nodes", "node-hostname", "rack=r1"]),
        "Successfully set label rack on nodes node-hostname\n"
    );
    let clash = ctl.run(&["label", "nodes", "node-hostname", "rack=r2"]);
    assert_eq!(clash.code, 1);
    assert!(clash.stderr.contains("--overwrite"), "{clash:?}");
    ctl.ok(&["label", "nodes", "node-hostname", "rack=r2", "--overwrite"]);
    assert!(ctl
        .ok(&["get", "node", "node-hostname", "-o", "yaml"])
        .contains("rack: r2"));
    ctl.ok(&["label", "nodes", "node-hostname", "rack-"]);
    assert!(!ctl
        .ok(&["get", "node", "node-hostname", "-o", "yaml"])
        .contains("rack"));
}

#[test]
fn bad_input_is_reported_with_position_and_nothing_is_applied() {
    let Some(ctl) = Ctl::start() else { return };
    // YAML syntax: file:line:column.
    let broken = ctl.file(
        "broken.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: [x\n",
    );
    let out = ctl.run(&["apply", "-f", &broken]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains(&format!("{broken}: line 5, column 1")),
        "{out:?}"
    );

    // A batch with one invalid document: every problem named, nothing applied.
    let batch = ctl.file(
        "batch.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: good}\nspec: {cidr: 10.1.0.0/16}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: bad}\nspec:\n  ingress:\n    - action: Allow\n      protocol: TCP\n      source:\n        ports: ['90:80']\n",
    );
    let out = ctl.run(&["apply", "-f", &batch]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("nothing was applied"), "{out:?}");
    assert!(
        out.stderr
            .contains("spec.ingress[0].source.ports[0]: port range 90:80 is reversed"),
        "{out:?}"
    );
    assert_eq!(
        ctl.ok(&["get", "ippools"]),
        "NAME   CIDR   SELECTOR\n",
        "the valid pool must not be applied"
    );

    // Unknown field and unknown kind.
    let typo = ctl.file("typo.yaml", "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: x}\nspec: {cidr: 10.0.0.0/16, natOutgoin: true}\n");
    let out = ctl.run(&["create", "-f", &typo]);
    assert!(
        out.stderr
            .contains("spec.natOutgoin: unknown field `natOutgoin`"),
        "{out:?}"
    );
    let unknown = ctl.run(&["get", "pools2"]);
    assert_eq!(unknown.code, 1);
    assert!(
        unknown.stderr.contains("unknown resource type `pools2`"),
        "{unknown:?}"
    );
    let missing_file = ctl.run(&["apply", "-f", "/nonexistent/x.yaml"]);
    assert!(
        missing_file
            .stderr
            .contains("/nonexistent/x.yaml: cannot read"),
        "{missing_file:?}"
    );

    // A namespace in the document that contradicts --namespace.
    let ns = ctl.file("ns.yaml", "apiVersion: projectcalico.org/v3\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec: {}\n");
    let out = ctl.run(&["apply", "-f", &ns, "-n", "b"]);
    assert!(
        out.stderr.contains("does not match --namespace `b`"),
        "{out:?}"
    );
    // Upstream's FelixConfiguration fields this dataplane has no use for are accepted with a
    // warning and read back as written; a made-up one beside them is still refused.
    let felix = ctl.file("felix.yaml", "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\nspec:\n  logSeverityScreen: Info\n  iptablesBackend: Auto\n  serviceLoopPrevention: Drop\n  routeTableRanges: [{min: 1, max: 250}]\n");
    let out = ctl.run(&["apply", "-f", &felix]);
    assert_eq!(out.code, 0, "{out:?}");
    for field in [
        "spec.iptablesBackend",
        "spec.serviceLoopPrevention",
        "spec.routeTableRanges",
    ] {
        assert!(
            out.stderr.contains(&format!(
                "{field} is stored, but has no effect in this dataplane"
            )),
            "no warning for {field}: {out:?}"
        );
    }
    let back = ctl.ok(&["get", "felixconfiguration", "default", "-o", "yaml"]);
    for line in [
        "iptablesBackend: Auto",
        "serviceLoopPrevention: Drop",
        "max: 250",
    ] {
        assert!(back.contains(line), "{line} not read back:\n{back}");
    }
    let made_up = ctl.file("felix2.yaml", "apiVersion: projectcalico.org/v3\nkind: FelixConfiguration\nmetadata: {name: default}\nspec:\n  iptablesBackend: Auto\n  iptablesBackendz: Auto\n");
    let out = ctl.run(&["apply", "-f", &made_up]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stderr
            .contains("spec.iptablesBackendz: unknown field `iptablesBackendz`"),
        "{out:?}"
    );
}

/// A file goes in whole or not at all: one object that cannot be created (it exists) leaves the
/// others unwritten, each failure named; duplicate names in one file are refused; skipping
/// existing objects writes the rest (the positive control).
#[test]
fn a_file_is_written_whole_or_not_at_all() {
    let Some(ctl) = Ctl::start() else { return };
    let one = ctl.file(
        "one.yaml",
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: b}\nspec: {order: 2}\n",
    );
    ctl.ok(&["create", "-f", &one]);
    let three = ctl.file(
        "three.yaml",
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: a}\nspec: {order: 1}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: b}\nspec: {order: 2}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: c}\nspec: {order: 3}\n",
    );
    let out = ctl.run(&["create", "-f", &three]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("Failed to create Tier 'b'"), "{out:?}");
    assert!(
        out.stderr
            .contains("Nothing was created: 1 of 3 'Tier' resource(s) cannot be written"),
        "{out:?}"
    );
    let tiers = ctl.ok(&["get", "tiers"]);
    assert!(
        !tiers.contains("a ") && !tiers.contains("c "),
        "part of a refused file was written:\n{tiers}"
    );

    let twice = ctl.file(
        "twice.yaml",
        "apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: d}\nspec: {order: 4}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {name: d}\nspec: {order: 5}\n",
    );
    let out = ctl.run(&["apply", "-f", &twice]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(out.stderr.contains("appears twice in one batch"), "{out:?}");
    assert!(
        !ctl.ok(&["get", "tiers"]).contains("d "),
        "a duplicate was written"
    );

    let out = ctl.run(&["create", "--skip-exists", "-f", &three]);
    assert_eq!(out.code, 0, "{out:?}");
    let tiers = ctl.ok(&["get", "tiers"]);
    assert!(tiers.contains("a ") && tiers.contains("c "), "{tiers}");
}

#[test]
fn configuration_from_file_and_environment() {
    let Some(ctl) = Ctl::start() else { return };
    let cfg = ctl.file(
        "calicoctl.cfg",
        &format!(
            "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nmetadata:\nspec:\n  datastoreType: etcdv3\n  etcdEndpoints: {}\n",
            ctl.etcd.endpoint()
        ),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_calicoctl"))
        .args(["--config", &cfg, "get", "ippools"])
        .env_remove("ETCD_ENDPOINTS")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad_cfg = ctl.file("bad.cfg", "apiVersion: projectcalico.org/v3\nkind: CalicoAPIConfig\nspec:\n  datastoreType: kubernetes\n");
    let out = ctl.run(&["--config", &bad_cfg, "get", "ippools"]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr
            .contains("datastoreType `kubernetes` is not supported"),
        "{out:?}"
    );

    // An unreachable datastore names the endpoint.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(env!("CARGO_BIN_EXE_calicoctl"))
        .args(["get", "ippools"])
        .env("ETCD_ENDPOINTS", format!("http://127.0.0.1:{port}"))
        .env("ETCD_TIMEOUT", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(&format!("http://127.0.0.1:{port}")),
        "{stderr}"
    );
}

#[test]
fn convert_kubernetes_network_policy() {
    let Some(ctl) = Ctl::start() else { return };
    let k8s = ctl.file(
        "k8s.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: allow-frontend\n  namespace: shop\nspec:\n  podSelector:\n    matchLabels: {role: db}\n  ingress:\n    - from:\n        - podSelector:\n            matchLabels: {role: frontend}\n      ports:\n        - port: 6379\n",
    );
    let yaml = ctl.ok(&["convert", "-f", &k8s]);
    let docs = documents(&yaml);
    assert_eq!(docs.len(), 1);
    let p = &docs[0];
    assert_eq!(p["metadata"]["name"], "knp.default.allow-frontend");
    assert_eq!(p["metadata"]["namespace"], "shop");
    assert_eq!(p["spec"]["order"], 1000);
    assert_eq!(
        p["spec"]["selector"],
        "projectcalico.org/orchestrator == 'k8s' && role == 'db'"
    );
    assert_eq!(p["spec"]["ingress"][0]["protocol"], "TCP");
    assert_eq!(p["spec"]["ingress"][0]["destination"]["ports"][0], 6379);
    // The converted policy is accepted as it is.
    let converted = ctl.file("converted.yaml", &yaml);
    ctl.ok(&["apply", "-f", &converted]);
}

#[test]
fn ipam_show_check_and_release() {
    let Some(ctl) = Ctl::start() else { return };
    let objects = ctl.file(
        "ipam.yaml",
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.1.0.0/24}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: IPAMBlock\nmetadata: {name: 10-1-0-0-30}\nspec:\n  cidr: 10.1.0.0/30\n  affinity: host:node1\n  allocations: [0, null, 1, null]\n  unallocated: [1, 3]\n  attributes:\n    - {handle_id: h-web, secondary: {pod: web}}\n    - {handle_id: h-leak, secondary: {pod: gone}}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: IPAMHandle\nmetadata: {name: h-web}\nspec: {handleID: h-web, block: {10.1.0.0/30: 1}}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: IPAMHandle\nmetadata: {name: h-leak}\nspec: {handleID: h-leak, block: {10.1.0.0/30: 1}}\n---\n\
         apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: node1-cni-web-eth0, namespace: default}\nspec: {node: node1, ipNetworks: [10.1.0.0/32]}\n",
    );
    ctl.ok(&["apply", "-f", &objects]);
    let show = ctl.ok(&["ipam", "show", "--show-blocks"]);
    assert!(
        show.contains("| IP Pool  | 10.1.0.0/24 | 256       | 2 (0%)     | 254 (99%) |"),
        "{show}"
    );
    assert!(
        show.contains("| Block    | 10.1.0.0/30 | 4         | 2 (50%)    | 2 (50%)   |"),
        "{show}"
    );
    let ip = ctl.ok(&["ipam", "show", "--ip=10.1.0.2"]);
    assert!(
        ip.contains("IP 10.1.0.2 is in use") && ip.contains("h-leak"),
        "{ip}"
    );

    let check = ctl.run(&["ipam", "check"]);
    assert_eq!(check.code, 1, "a leak must make check fail: {check:?}");
    assert!(
        check
            .stdout
            .contains("10.1.0.2: allocated (handle `h-leak`) but no workload endpoint uses it"),
        "{check:?}"
    );

    assert_eq!(
        ctl.ok(&["ipam", "release", "--ip=10.1.0.2"]),
        "Successfully released IP 10.1.0.2\n"
    );
    let clean = ctl.run(&["ipam", "check"]);
    assert_eq!(clean.code, 0, "{clean:?}");
    assert!(clean.stdout.contains("IPAM is clean"), "{clean:?}");
    let gone = ctl.run(&["get", "ipamhandle", "h-leak"]);
    assert_eq!(gone.code, 1, "the emptied handle must be deleted: {gone:?}");
    let not_assigned = ctl.run(&["ipam", "release", "--ip=10.1.0.3"]);
    assert!(
        not_assigned.stderr.contains("IP 10.1.0.3 is not assigned"),
        "{not_assigned:?}"
    );

    // An address a live workload uses is not released (another ADD would get it) unless
    // forced; check then names the endpoint whose address is not allocated.
    let in_use = ctl.run(&["ipam", "release", "--ip=10.1.0.0"]);
    assert_eq!(in_use.code, 1, "{in_use:?}");
    assert!(
        in_use
            .stderr
            .contains("IP 10.1.0.0 is in use by workload endpoint default/node1-cni-web-eth0"),
        "{in_use:?}"
    );
    assert!(ctl.run(&["ipam", "check"]).stdout.contains("IPAM is clean"));
    ctl.ok(&["ipam", "release", "--ip=10.1.0.0", "--force"]);
    let check = ctl.run(&["ipam", "check"]);
    assert_eq!(check.code, 1, "{check:?}");
    assert!(
        check.stdout.contains(
            "10.1.0.0: used by workload endpoint default/node1-cni-web-eth0 but not allocated in IPAM"
        ),
        "{check:?}"
    );
    // Two endpoints sharing one address.
    let twin = ctl.file(
        "twin.yaml",
        "apiVersion: projectcalico.org/v3\nkind: WorkloadEndpoint\nmetadata: {name: node1-cni-twin-eth0, namespace: default}\nspec: {node: node1, ipNetworks: [10.1.0.0/32]}\n",
    );
    ctl.ok(&["apply", "-f", &twin]);
    let check = ctl.run(&["ipam", "check"]);
    assert!(
        check
            .stdout
            .contains("10.1.0.0: used by 2 workload endpoints at once"),
        "{check:?}"
    );
}

#[test]
fn node_commands_version_and_completion() {
    let Some(ctl) = Ctl::start() else { return };
    let status = Command::new(env!("CARGO_BIN_EXE_calicoctl"))
        .args(["node", "status"])
        .env("CALICO_BIRD_SOCKET", ctl.dir.path().join("no-bird.ctl"))
        .output()
        .unwrap();
    assert_eq!(status.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&status.stdout).contains("Calico process is not running."));

    let check = ctl.run(&["node", "checksystem"]);
    assert!(
        check.stdout.contains("Checking kernel version"),
        "{check:?}"
    );
    if nix_is_root() {
        assert_eq!(check.code, 0, "{check:?}");
    }
    assert!(ctl.ok(&["version"]).starts_with("Client Version:    v"));
    assert!(ctl.ok(&["completion", "bash"]).contains("_calicoctl()"));
    for sub in [
        &["create"][..],
        &["apply"],
        &["replace"],
        &["delete"],
        &["get"],
        &["patch"],
        &["label"],
        &["ipam"],
        &["ipam", "show"],
        &["ipam", "check"],
        &["ipam", "release"],
        &["node"],
        &["node", "status"],
        &["node", "checksystem"],
        &["convert"],
        &["version"],
        &["completion"],
    ] {
        let mut args = sub.to_vec();
        args.push("--help");
        let help = ctl.ok(&args);
        assert!(
            help.contains("Examples:"),
            "{sub:?} --help has no examples:\n{help}"
        );
    }
}

#[test]
fn node_status_reads_a_real_bird() {
    if !require(
        "node_status_reads_a_real_bird",
        &[Requirement::Root, Requirement::NetNs],
    ) {
        return;
    }
    let ns = harness::NetNs::new("bird").expect("netns");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("bird.ctl");
    let config = dir.path().join("bird.conf");
    // A mesh peer that never answers: BIRD shows it as a BGP protocol that is not Established.
    std::fs::write(
        &config,
        "router id 198.18.2.1;\nprotocol device {}\n\
         protocol bgp Mesh_198_18_2_2 {\n  local 198.18.2.1 as 64512;\n  neighbor 198.18.2.2 as 64512;\n  ipv4 { import all; export none; };\n}\n",
    )
    .unwrap();
    ns.add_address("lo", "198.18.2.1/32").unwrap();
    let sock = socket.display().to_string();
    let conf = config.display().to_string();
    ns.exec_ok(
        "bird",
        &[
            "-c",
            &conf,
            "-s",
            &sock,
            "-P",
            &format!("{}/bird.pid", dir.path().display()),
        ],
    )
    .expect("bird starts (Debian bird2)");
    let _stop = Defer(|| {
        let _ = Command::new("birdc").args(["-s", &sock, "down"]).output();
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let stdout = loop {
        let out = Command::new(env!("CARGO_BIN_EXE_calicoctl"))
            .args(["node", "status"])
            .env("CALICO_BIRD_SOCKET", &socket)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() || std::time::Instant::now() > deadline {
            break stdout;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(stdout.contains("Calico process is running."), "{stdout}");
    assert!(
        stdout.contains("| 198.18.2.2   | node-to-node mesh |"),
        "{stdout}"
    );
    assert!(stdout.contains("No IPv6 peers found."), "{stdout}");
}

/// Runs a closure on drop (cleanup that must happen when an assertion fails).
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

/// One value in etcd that is not a resource (another tool's write, a torn restore) hides
/// nothing else of its kind from `get`, is named by its key, and `delete` removes it and says
/// so, instead of reporting a failure for a delete that happened.
#[test]
fn a_corrupt_value_is_named_hides_nothing_and_can_be_deleted() {
    let Some(ctl) = Ctl::start() else { return };
    let good = ctl.file(
        "good.yaml",
        "apiVersion: projectcalico.org/v3\nkind: GlobalNetworkPolicy\nmetadata: {name: good}\nspec: {selector: all()}\n",
    );
    ctl.ok(&["apply", "-f", &good]);
    let key = "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/bad";
    let put = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &ctl.etcd.endpoint(), "put", key, "{not json"])
        .output()
        .expect("etcdctl runs (Debian etcd-client)");
    assert!(put.status.success(), "{put:?}");

    let got = ctl.run(&["get", "globalnetworkpolicies"]);
    assert_eq!(got.code, 1, "a bad value is a failure: {got:?}");
    assert!(
        got.stdout.contains("good"),
        "the good policy is listed: {got:?}"
    );
    assert!(
        got.stderr
            .contains(&format!("stored value at {key} cannot be read")),
        "{got:?}"
    );
    let deleted = ctl.run(&["delete", "globalnetworkpolicy", "bad"]);
    assert_eq!(deleted.code, 0, "{deleted:?}");
    assert!(
        deleted.stdout.contains("Successfully deleted 1")
            && deleted
                .stderr
                .contains("whose stored value could not be read"),
        "{deleted:?}"
    );
    let after = ctl.run(&["get", "globalnetworkpolicies"]);
    assert_eq!(after.code, 0, "{after:?}");
    assert!(after.stdout.contains("good"), "{after:?}");
}

/// `calicoctl policy trace`: an allowed packet, one denied by a rule, one dropped at the end of
/// a tier whose policy selects but does not decide, and one decided by a profile, each with
/// the tiers and policies in order and the deciding rule named.
#[test]
fn policy_trace_names_what_decides() {
    let Some(ctl) = Ctl::start() else { return };
    let path = ctl.file(
        "trace.yaml",
        "apiVersion: projectcalico.org/v3
kind: Profile
metadata: {name: kns.shop}
spec:
  labelsToApply: {pcns.team: a}
  ingress: [{action: Allow, protocol: UDP}]
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {node: n1, ipNetworks: [10.0.0.2/32], profiles: [kns.shop]}
---
apiVersion: projectcalico.org/v3
kind: WorkloadEndpoint
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {node: n1, ipNetworks: [10.0.0.1/32], profiles: [kns.shop]}
---
apiVersion: projectcalico.org/v3
kind: Tier
metadata: {name: security}
spec: {order: 10}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: security.quarantine}
spec:
  tier: security
  selector: app == 'db'
  types: [Ingress]
  ingress:
  - {action: Deny, protocol: TCP, destination: {ports: [22]}}
  - {action: Pass, protocol: TCP, source: {namespaceSelector: team == 'a'}}
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  selector: app == 'db'
  types: [Ingress]
  ingress:
  - {action: Allow, protocol: TCP, source: {selector: app == 'web'}, destination: {ports: [5432]}}
",
    );
    ctl.ok(&["apply", "-f", &path]);
    for (args, verdict, because) in [
        (
            vec!["shop/db-1", "shop/web-1", "tcp/5432"],
            "verdict: ALLOW by rule 0 of policy shop/db-from-web in tier default",
            "1. shop/db-from-web (1 rule(s))  ← rule 0 decides",
        ),
        (
            vec!["shop/db-1", "10.0.0.1", "tcp/22"],
            "verdict: DENY by rule 0 of policy security.quarantine in tier security",
            "1. security.quarantine (2 rule(s))  ← rule 0 decides",
        ),
        (
            vec!["db-1", "-n", "shop", "192.0.2.9", "tcp/5432"],
            "verdict: DENY by end of tier security",
            "tier security",
        ),
        (
            vec!["shop/web-1", "shop/db-1", "udp/53"],
            "verdict: ALLOW by rule 0 of profile kns.shop",
            "kns.shop (1 rule(s))  ← rule 0 decides",
        ),
    ] {
        let mut full = vec!["policy", "trace"];
        full.extend(args.iter());
        let out = ctl.ok(&full);
        assert!(out.contains(verdict), "{args:?}:\n{out}");
        assert!(out.contains(because), "{args:?}:\n{out}");
    }
    let bad = ctl.run(&["policy", "trace", "shop/nobody", "10.0.0.1", "tcp/1"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("no endpoint `shop/nobody`"), "{bad:?}");
    let bad = ctl.run(&["policy", "trace", "shop/db-1", "10.0.0.1", "tcp"]);
    assert!(bad.stderr.contains("give the destination port"), "{bad:?}");
}

/// `--dry-run` validates as a real run does and shows what would be created, updated (with the
/// changed fields), left unchanged, deleted or refused, and writes nothing: the datastore
/// reads the same after it, and a real run then does what the dry run said.
#[test]
fn dry_run_shows_changes_and_writes_nothing() {
    let Some(ctl) = Ctl::start() else { return };
    let tier = |name: &str, order: u32| {
        format!("apiVersion: projectcalico.org/v3\nkind: Tier\nmetadata: {{name: {name}}}\nspec: {{order: {order}}}\n")
    };
    let first = ctl.file(
        "first.yaml",
        &format!("{}---\n{}", tier("a", 1), tier("b", 2)),
    );
    ctl.ok(&["apply", "-f", &first]);
    let before = ctl.ok(&["get", "tiers", "-o", "yaml"]);

    let next = ctl.file(
        "next.yaml",
        &format!("{}---\n{}---\n{}", tier("a", 1), tier("b", 5), tier("c", 3)),
    );
    let out = ctl.ok(&["apply", "-f", &next, "--dry-run"]);
    assert!(out.contains("unchanged Tier 'a'"), "{out}");
    assert!(
        out.contains("would update Tier 'b'") && out.contains(": spec.order"),
        "{out}"
    );
    assert!(out.contains("would create Tier 'c'"), "{out}");
    assert!(
        out.contains("1 to create, 1 to update, 0 to delete, 1 unchanged, 0 would fail"),
        "{out}"
    );
    let refused = ctl.run(&["create", "-f", &next, "--dry-run"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stdout.contains("would fail Tier 'a'") && refused.stdout.contains("already exists"),
        "{refused:?}"
    );
    let deleting = ctl.ok(&["delete", "tier", "a", "--dry-run"]);
    assert!(deleting.contains("would delete Tier 'a'"), "{deleting}");
    let invalid = ctl.file("bad.yaml", &tier("Bad_Name", 1));
    assert_eq!(ctl.run(&["apply", "-f", &invalid, "--dry-run"]).code, 1);
    assert_eq!(
        ctl.ok(&["get", "tiers", "-o", "yaml"]),
        before,
        "a dry run wrote"
    );

    // The real run does what the dry run said.
    ctl.ok(&["apply", "-f", &next]);
    let after = ctl.ok(&["get", "tiers", "-o", "yaml"]);
    assert!(
        after.contains("name: c") && after.contains("order: 5"),
        "{after}"
    );
}
