//! Pinned maps of another layout: a release that resizes conntrack keeps its tracked flows,
//! and a map whose key changed is recreated instead of being misread.

use std::{path::PathBuf, process::Command};

use calico_bpf_common::{EndpointKey, CONNTRACK_MAP, POLICY_ENDPOINTS_MAP};
use calico_dataplane::{Hook, LoadOptions, PolicyDataplane};
use calico_policy::{CompiledProgram, Direction, Packet};
use harness::{require, unique_name, Requirement};

use crate::bpf_differential::{frame, LOOPBACK};

/// A pin directory on bpffs, removed with everything in it on drop.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn max_entries(path: &std::path::Path) -> u32 {
    aya::maps::MapInfo::from_pin(path)
        .expect("pinned map")
        .max_entries()
}

#[test]
fn pins_of_an_older_layout_are_migrated_or_recreated() -> anyhow::Result<()> {
    if !require(
        "pins_of_an_older_layout_are_migrated_or_recreated",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let dir = PinDir(PathBuf::from("/sys/fs/bpf").join(unique_name("pin")));
    let syn = Packet {
        src: "10.0.0.9".parse()?,
        dst: "10.0.0.1".parse()?,
        protocol: 6,
        src_port: 40000,
        dst_port: 80,
        icmp: None,
    };

    // "The previous release": a smaller conntrack map, one tracked flow in it.
    {
        let (mut dp, _) = PolicyDataplane::load(&LoadOptions {
            pin_path: Some(dir.0.clone()),
            map_sizes: vec![(CONNTRACK_MAP, 1024)],
            ..Default::default()
        })?;
        let w = calico_policy::testing::deny_rules_then_allow(0);
        let id = w.endpoints.keys().next().unwrap().clone();
        let program = w.program(&id, Direction::Ingress);
        let compiled =
            CompiledProgram::compile(&w, &program, &["10.0.0.1".parse()?], Direction::Ingress)?;
        dp.install(LOOPBACK, Hook::Egress, &compiled)?;
        assert_eq!(
            dp.test_run(Hook::Egress, &frame(&syn))?,
            3,
            "the SYN passes"
        );
        assert_eq!(dp.tracked_flows()?.len(), 1, "the SYN's flow is tracked");
    }
    assert_eq!(max_entries(&dir.0.join(CONNTRACK_MAP)), 1024);
    // ... and an endpoint map whose key was 4 bytes then.
    std::fs::remove_file(dir.0.join(POLICY_ENDPOINTS_MAP))?;
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(dir.0.join(POLICY_ENDPOINTS_MAP))
        .args([
            "type", "hash", "key", "4", "value", "8", "entries", "16", "name",
        ])
        .arg(POLICY_ENDPOINTS_MAP)
        .output()?;
    anyhow::ensure!(
        created.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&created.stderr)
    );

    // ... and the per-program peer table layout 3 had (layout 4 has nets tables and shared
    // IP sets instead).
    let retired = dir.0.join("POLICY_PEERS");
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&retired)
        .args([
            "type",
            "lpm_trie",
            "key",
            "20",
            "value",
            "4",
            "entries",
            "16",
            "name",
            "POLICY_PEERS",
            "flags",
            "1",
        ])
        .output()?;
    anyhow::ensure!(
        created.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    assert!(retired.exists());

    // "This release", asked for a bigger conntrack (bpfMapSizeConntrack).
    let (dp, _) = PolicyDataplane::load(&LoadOptions {
        pin_path: Some(dir.0.clone()),
        map_sizes: vec![(CONNTRACK_MAP, 4096)],
        ..Default::default()
    })?;
    assert_eq!(
        max_entries(&dir.0.join(CONNTRACK_MAP)),
        4096,
        "conntrack kept the old capacity"
    );
    assert_eq!(
        dp.tracked_flows()?.len(),
        1,
        "the tracked flow did not survive the migration"
    );
    let eps = aya::maps::MapInfo::from_pin(dir.0.join(POLICY_ENDPOINTS_MAP))?;
    assert_eq!(
        eps.key_size() as usize,
        std::mem::size_of::<EndpointKey>(),
        "the endpoint map kept the old key"
    );
    assert!(dir.0.join("layout-v5").is_dir(), "no layout version marker");
    assert!(!retired.exists(), "the retired map's pin stayed");
    // A restart that does not know the configured size (etcd unreachable) keeps it.
    drop(dp);
    let (dp, _) = PolicyDataplane::load(&LoadOptions {
        pin_path: Some(dir.0.clone()),
        ..Default::default()
    })?;
    assert_eq!(max_entries(&dir.0.join(CONNTRACK_MAP)), 4096);
    assert_eq!(
        dp.tracked_flows()?.len(),
        1,
        "the flow went with a plain restart"
    );
    Ok(())
}
