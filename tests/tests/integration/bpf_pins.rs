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

/// `bytes` as bpftool's `hex` arguments.
fn hex_args(bytes: &[u8]) -> Vec<String> {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_conntrack_pin_of_layout_5_keeps_its_flows() -> anyhow::Result<()> {
    if !require(
        "a_conntrack_pin_of_layout_5_keeps_its_flows",
        &[Requirement::Root, Requirement::Bpf],
    ) {
        return Ok(());
    }
    let dir = PinDir(PathBuf::from("/sys/fs/bpf").join(unique_name("pin5")));
    std::fs::create_dir_all(&dir.0)?;
    std::fs::create_dir_all(dir.0.join("layout-v5"))?;
    // Layout 5's conntrack: the same key, a 24-byte value (no forwarding cache), one flow.
    let pin = dir.0.join(CONNTRACK_MAP);
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(&pin)
        .args([
            "type", "lru_hash", "key", "44", "value", "24", "entries", "1024", "name",
        ])
        .arg(CONNTRACK_MAP)
        .output()?;
    anyhow::ensure!(
        created.status.success(),
        "bpftool map create: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let mapped = |a: [u8; 4]| {
        let mut m = [0u8; 16];
        m[10] = 0xff;
        m[11] = 0xff;
        m[12..].copy_from_slice(&a);
        m
    };
    let mut key = Vec::new();
    key.extend(7u32.to_ne_bytes());
    key.extend(6u32.to_ne_bytes());
    key.extend(mapped([10, 0, 0, 1]));
    key.extend(mapped([10, 0, 0, 9]));
    key.extend(80u16.to_ne_bytes());
    key.extend(40000u16.to_ne_bytes());
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    let now = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    let mut value = Vec::new();
    value.extend(now.to_ne_bytes());
    value.extend(now.to_ne_bytes());
    value.extend(calico_bpf_common::CT_ANSWERED.to_ne_bytes());
    value.extend(3u32.to_ne_bytes());
    let updated = Command::new("bpftool")
        .args(["map", "update", "pinned"])
        .arg(&pin)
        .arg("key")
        .arg("hex")
        .args(hex_args(&key))
        .arg("value")
        .arg("hex")
        .args(hex_args(&value))
        .output()?;
    anyhow::ensure!(
        updated.status.success(),
        "bpftool map update: {}",
        String::from_utf8_lossy(&updated.stderr)
    );

    let (dp, _) = PolicyDataplane::load(&LoadOptions {
        pin_path: Some(dir.0.clone()),
        ..Default::default()
    })?;
    let info = aya::maps::MapInfo::from_pin(&pin)?;
    assert_eq!(
        info.value_size() as usize,
        std::mem::size_of::<calico_bpf_common::CtValue>(),
        "conntrack kept the old value"
    );
    let flows = dp.tracked_flows()?;
    assert_eq!(flows.len(), 1, "the layout-5 flow was not migrated");
    let flow = &flows[0];
    assert_eq!(
        (flow.ifindex, flow.protocol, flow.ports, flow.answered),
        (7, 6, (80, 40000), true)
    );
    assert_eq!(
        flow.addresses,
        ("10.0.0.1".parse()?, "10.0.0.9".parse()?),
        "the flow's addresses were misread"
    );
    assert!(flow.idle < std::time::Duration::from_secs(60));
    Ok(())
}
