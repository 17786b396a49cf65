//! `calicoctl node status` (BIRD's BGP peers) and `node checksystem` (what the eBPF dataplane
//! needs from the kernel).

use std::{path::Path, process::ExitCode};

use anyhow::Result;
use clap::Subcommand;

use crate::output::boxed;

/// Where calico-node's BIRD listens, unless `CALICO_BIRD_SOCKET` says otherwise.
pub const DEFAULT_BIRD_SOCKET: &str = "/var/run/calico/bird.ctl";

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Show the BGP peers of this node's BIRD, as upstream does.
    #[command(
        after_help = "Examples:\n  calicoctl node status\n  CALICO_BIRD_SOCKET=/run/bird/bird.ctl calicoctl node status"
    )]
    Status,
    /// Check that this host's kernel has what the eBPF dataplane needs.
    #[command(after_help = "Examples:\n  calicoctl node checksystem")]
    Checksystem,
}

pub async fn run(_config: Option<&Path>, cmd: NodeCommand) -> Result<ExitCode> {
    match cmd {
        NodeCommand::Status => Ok(status()),
        NodeCommand::Checksystem => Ok(checksystem()),
    }
}

/// One BGP protocol line of `birdc show protocols`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub address: String,
    pub peer_type: &'static str,
    pub state: String,
    pub since: String,
    pub info: String,
    pub ipv6: bool,
}

/// Parses `birdc show protocols` output into the BGP peers calico-node configured (protocols
/// named `Mesh_*`, `Node_*`, `Global_*`, with the peer address encoded in the name).
pub fn parse_protocols(output: &str) -> Vec<Peer> {
    output
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 5 || fields[1] != "BGP" {
                return None;
            }
            let (prefix, encoded) = fields[0].split_once('_')?;
            let peer_type = match prefix {
                "Mesh" => "node-to-node mesh",
                "Node" => "node specific",
                "Global" => "global",
                _ => return None,
            };
            // BIRD prints "since" as a time, or as a date and a time.
            let (since, info_start) =
                if fields.len() > 5 && fields[4].contains('-') && fields[5].contains(':') {
                    (format!("{} {}", fields[4], fields[5]), 6)
                } else {
                    (fields[4].to_owned(), 5)
                };
            let ipv6 = encoded.contains("__") || encoded.split('_').count() > 4;
            let address = if ipv6 {
                encoded.replace('_', ":")
            } else {
                encoded.replace('_', ".")
            };
            Some(Peer {
                address,
                peer_type,
                state: fields[3].to_owned(),
                since,
                info: fields
                    .get(info_start..)
                    .map(|f| f.join(" "))
                    .unwrap_or_default(),
                ipv6,
            })
        })
        .collect()
}

fn status() -> ExitCode {
    let socket =
        std::env::var("CALICO_BIRD_SOCKET").unwrap_or_else(|_| DEFAULT_BIRD_SOCKET.to_owned());
    let output = std::process::Command::new("birdc")
        .args(["-s", &socket, "show", "protocols"])
        .output();
    let text = match output {
        Ok(o)
            if o.status.success()
                && !String::from_utf8_lossy(&o.stdout).contains("Unable to connect") =>
        {
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
        Ok(o) => {
            println!("Calico process is not running.");
            eprintln!(
                "BIRD is not answering on {socket}: {}{}",
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            println!("Calico process is not running.");
            eprintln!("cannot run birdc (Debian package bird2): {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("Calico process is running.\n");
    // calico-node leaves the reason beside the socket when BIRD refused a new configuration.
    let error_file = std::path::Path::new(&socket).with_file_name("bird.error");
    if let Ok(reason) = std::fs::read_to_string(&error_file) {
        println!(
            "BIRD configuration error (BIRD runs its last good configuration):\n  {}\n",
            reason.trim()
        );
    }
    let peers = parse_protocols(&text);
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        println!("{family} BGP status");
        let rows: Vec<Vec<String>> = peers
            .iter()
            .filter(|p| p.ipv6 == v6)
            .map(|p| {
                vec![
                    p.address.clone(),
                    p.peer_type.to_owned(),
                    p.state.clone(),
                    p.since.clone(),
                    p.info.clone(),
                ]
            })
            .collect();
        if rows.is_empty() {
            println!("No {family} peers found.\n");
        } else {
            println!(
                "{}",
                boxed(
                    &["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"],
                    &rows
                )
            );
        }
    }
    ExitCode::SUCCESS
}

struct Check {
    what: &'static str,
    found: String,
    ok: bool,
    required: bool,
}

fn checksystem() -> ExitCode {
    let mut checks = Vec::new();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let version: Vec<u32> = release
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    let at_least = |major: u32, minor: u32| version.as_slice() >= [major, minor].as_slice();
    checks.push(Check {
        what: "kernel version (5.10 or newer for the eBPF dataplane)",
        found: release.clone(),
        ok: at_least(5, 10),
        required: true,
    });
    checks.push(Check {
        what: "TCX attachment (6.6 or newer; clsact is used otherwise)",
        found: if at_least(6, 6) {
            "available".into()
        } else {
            "not available".into()
        },
        ok: at_least(6, 6),
        required: false,
    });
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let bpffs = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.contains(" bpf "));
    checks.push(Check {
        what: "BPF filesystem at /sys/fs/bpf",
        found: if bpffs {
            "mounted".into()
        } else {
            "not mounted (mount -t bpf bpf /sys/fs/bpf)".into()
        },
        ok: bpffs,
        required: true,
    });
    let btf = Path::new("/sys/kernel/btf/vmlinux").exists();
    checks.push(Check {
        what: "kernel BTF (/sys/kernel/btf/vmlinux)",
        found: if btf {
            "present".into()
        } else {
            "missing".into()
        },
        ok: btf,
        required: false,
    });
    let jit = std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    checks.push(Check {
        what: "BPF JIT (net.core.bpf_jit_enable)",
        found: jit.clone(),
        ok: jit == "1" || jit == "2",
        required: false,
    });
    let (bpf_ok, bpf_found) = probe_bpf_syscall();
    checks.push(Check {
        what: "bpf() syscall (creating a map)",
        found: bpf_found,
        ok: bpf_ok,
        required: true,
    });

    let mut failed_required = false;
    for c in &checks {
        let verdict = match (c.ok, c.required) {
            (true, _) => "OK",
            (false, true) => {
                failed_required = true;
                "FAIL"
            }
            (false, false) => "WARNING",
        };
        println!("Checking {}...\n\t\t{:<40}{verdict}", c.what, c.found);
    }
    if failed_required {
        println!("System doesn't meet one or more minimum systems requirements to run Calico");
        ExitCode::FAILURE
    } else {
        println!("System meets minimum system requirements to run Calico!");
        ExitCode::SUCCESS
    }
}

/// Creates (and closes) a one-element array map through the raw bpf() syscall.
fn probe_bpf_syscall() -> (bool, String) {
    #[repr(C)]
    #[derive(Default)]
    struct MapCreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..Default::default()
    };
    // SAFETY: attr is a valid, initialised bpf_attr prefix of the size passed; the kernel only
    // reads it. A returned fd is closed at once.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreateAttr,
            std::mem::size_of::<MapCreateAttr>(),
        )
    };
    if fd >= 0 {
        // SAFETY: fd was just returned by the kernel and is owned here.
        unsafe { libc::close(fd as libc::c_int) };
        (true, "works".into())
    } else {
        (
            false,
            format!("failed: {}", std::io::Error::last_os_error()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_birdc_protocols() {
        let out = "BIRD 2.0.12 ready.\n\
Name       Proto      Table      State  Since         Info\n\
device1    Device     ---        up     09:00:00.000  \n\
kernel1    Kernel     master4    up     09:00:00.000  \n\
Mesh_10_0_0_2 BGP     ---        up     09:00:01.123  Established\n\
Node_192_168_1_1 BGP  ---        start  2026-11-23 09:00:02  Active        Socket: Connection refused\n\
Global_fd00__2 BGP    ---        up     09:00:03.000  Established\n";
        let peers = parse_protocols(out);
        assert_eq!(peers.len(), 3);
        assert_eq!(
            peers[0],
            Peer {
                address: "10.0.0.2".into(),
                peer_type: "node-to-node mesh",
                state: "up".into(),
                since: "09:00:01.123".into(),
                info: "Established".into(),
                ipv6: false,
            }
        );
        assert_eq!(peers[1].peer_type, "node specific");
        assert_eq!(peers[1].since, "2026-11-23 09:00:02");
        assert_eq!(peers[1].info, "Active Socket: Connection refused");
        assert!(peers[2].ipv6);
        assert_eq!(peers[2].address, "fd00::2");
    }
}
