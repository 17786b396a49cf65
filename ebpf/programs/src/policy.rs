//! The policy classifier: the verdict of the endpoint's compiled policy for each packet, in a
//! fixed number of map lookups whatever the number of rules (see calico-policy's compiler).
//!
//! Attached on the host side of a workload's veth: `policy_ingress` on tc ingress (what the
//! workload sends, judged by its egress policy), `policy_egress` on tc egress (what it
//! receives, judged by its ingress policy). Interfaces without a program pass untouched.
//!
//! Parsing: Ethernet; IPv4 with options; IPv6 with up to four extension headers (hop-by-hop,
//! routing, destination options, fragment). Non-IP frames (ARP) pass. A non-first fragment
//! carries no transport header: it is judged with ports 0 and no ICMP type, so rules that name
//! ports never allow it (fail closed). IPv6 neighbour discovery (ICMPv6 133-137) always passes,
//! or no workload could resolve its gateway.

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_PIPE, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::{
        lpm_trie::{Key, LpmTrie},
        HashMap, PerCpuArray,
    },
    programs::TcContext,
};
use aya_log_ebpf::debug;
use calico_bpf_common::{
    EndpointKey, LocalKey, PeerKeyData, PolicyStat, PortKeyData, ProgramRef, ProtoKey,
    VerdictKeyData, VerdictValue, ACTION_ALLOW, POLICY_MAX_CLASSES, POLICY_MAX_ENDPOINTS,
    POLICY_MAX_VERDICTS, POLICY_STAT_COUNT, TC_EGRESS, TC_INGRESS, VERDICT_FIXED_BITS,
};

#[map(name = "POLICY_EPS")]
static POLICY_EPS: HashMap<EndpointKey, ProgramRef> =
    HashMap::with_max_entries(POLICY_MAX_ENDPOINTS, 0);

#[map(name = "POLICY_PEERS")]
static POLICY_PEERS: LpmTrie<PeerKeyData, u32> =
    LpmTrie::with_max_entries(POLICY_MAX_CLASSES, BPF_F_NO_PREALLOC);

#[map(name = "POLICY_LOCALS")]
static POLICY_LOCALS: HashMap<LocalKey, u32> = HashMap::with_max_entries(POLICY_MAX_CLASSES, 0);

#[map(name = "POLICY_PROTOS")]
static POLICY_PROTOS: HashMap<ProtoKey, u32> = HashMap::with_max_entries(POLICY_MAX_CLASSES, 0);

#[map(name = "POLICY_SPORTS")]
static POLICY_SPORTS: LpmTrie<PortKeyData, u32> =
    LpmTrie::with_max_entries(POLICY_MAX_CLASSES, BPF_F_NO_PREALLOC);

#[map(name = "POLICY_VERDICTS")]
static POLICY_VERDICTS: LpmTrie<VerdictKeyData, VerdictValue> =
    LpmTrie::with_max_entries(POLICY_MAX_VERDICTS, BPF_F_NO_PREALLOC);

#[map(name = "POLICY_STATS")]
static POLICY_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(POLICY_STAT_COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

/// What policy looks at.
struct Flow {
    src: [u8; 16],
    dst: [u8; 16],
    protocol: u8,
    src_port: u16,
    /// Destination port, or `type << 8 | code` for ICMP.
    dim: u16,
}

fn mapped_v4(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Parses the packet; `Ok(None)` for frames policy does not judge.
#[inline(always)]
fn parse(ctx: &TcContext) -> Result<Option<Flow>, ()> {
    let ether: [u8; 2] = ctx.load(12).map_err(|_| ())?;
    let (src, dst, mut protocol, mut offset, first_fragment) = match u16::from_be_bytes(ether) {
        ETH_P_IP => {
            let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
            let ihl = usize::from(vihl & 0x0f) * 4;
            if ihl < 20 {
                return Err(());
            }
            let frags: [u8; 2] = ctx.load(ETH_HLEN + 6).map_err(|_| ())?;
            let protocol: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| ())?;
            let src: [u8; 4] = ctx.load(ETH_HLEN + 12).map_err(|_| ())?;
            let dst: [u8; 4] = ctx.load(ETH_HLEN + 16).map_err(|_| ())?;
            let fragment_offset = u16::from_be_bytes(frags) & 0x1fff;
            (
                mapped_v4(src),
                mapped_v4(dst),
                protocol,
                ETH_HLEN + ihl,
                fragment_offset == 0,
            )
        }
        ETH_P_IPV6 => {
            let next: u8 = ctx.load(ETH_HLEN + 6).map_err(|_| ())?;
            let src: [u8; 16] = ctx.load(ETH_HLEN + 8).map_err(|_| ())?;
            let dst: [u8; 16] = ctx.load(ETH_HLEN + 24).map_err(|_| ())?;
            (src, dst, next, ETH_HLEN + 40, true)
        }
        _ => return Ok(None),
    };
    let mut first = first_fragment;
    if u16::from_be_bytes(ether) == ETH_P_IPV6 {
        // Extension headers, bounded.
        for _ in 0..4 {
            match protocol {
                0 | 43 | 60 => {
                    let h: [u8; 2] = ctx.load(offset).map_err(|_| ())?;
                    protocol = h[0];
                    offset += (usize::from(h[1]) + 1) * 8;
                }
                44 => {
                    let h: [u8; 4] = ctx.load(offset).map_err(|_| ())?;
                    protocol = h[0];
                    if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                        first = false;
                    }
                    offset += 8;
                }
                _ => break,
            }
        }
    }
    let (src_port, dim) = if !first {
        (0, 0)
    } else {
        match protocol {
            6 | 17 | 132 | 136 => {
                let ports: [u8; 4] = ctx.load(offset).map_err(|_| ())?;
                (
                    u16::from_be_bytes([ports[0], ports[1]]),
                    u16::from_be_bytes([ports[2], ports[3]]),
                )
            }
            1 | 58 => {
                let tc: [u8; 2] = ctx.load(offset).map_err(|_| ())?;
                (0, u16::from_be_bytes(tc))
            }
            _ => (0, 0),
        }
    };
    Ok(Some(Flow {
        src,
        dst,
        protocol,
        src_port,
        dim,
    }))
}

#[inline(always)]
fn count(stat: PolicyStat) {
    if let Some(c) = POLICY_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// The verdict of the compiled program for `flow`; `None` when a table has no answer (which
/// only happens for a program that is not fully written: fail closed).
#[inline(always)]
fn decide(
    program: &ProgramRef,
    flow: &Flow,
    peer_addr: [u8; 16],
    local_addr: [u8; 16],
) -> Option<VerdictValue> {
    let id = program.program;
    let peer = *POLICY_PEERS.get(Key::new(
        160,
        PeerKeyData {
            program: id.to_be_bytes(),
            addr: peer_addr,
        },
    ))?;
    // SAFETY: the value is copied out at once.
    let local = unsafe {
        *POLICY_LOCALS.get(LocalKey {
            program: id,
            addr: local_addr,
        })?
    };
    let protocol = unsafe {
        POLICY_PROTOS.get(ProtoKey {
            program: id,
            protocol: u32::from(flow.protocol),
        })
    }
    .copied()
    .unwrap_or(program.other_protocol);
    let sport = *POLICY_SPORTS.get(Key::new(
        48,
        PortKeyData {
            program: id.to_be_bytes(),
            port: flow.src_port.to_be_bytes(),
        },
    ))?;
    let mut bytes = [0u8; 16];
    bytes[0..4].copy_from_slice(&id.to_be_bytes());
    bytes[4..8].copy_from_slice(&peer.to_be_bytes());
    bytes[8..10].copy_from_slice(&(local as u16).to_be_bytes());
    bytes[10..12].copy_from_slice(&(protocol as u16).to_be_bytes());
    bytes[12..14].copy_from_slice(&(sport as u16).to_be_bytes());
    bytes[14..16].copy_from_slice(&flow.dim.to_be_bytes());
    POLICY_VERDICTS
        .get(Key::new(VERDICT_FIXED_BITS + 16, VerdictKeyData { bytes }))
        .copied()
}

#[inline(always)]
fn judge(ctx: &TcContext, hook: u32) -> i32 {
    // SAFETY: the kernel passes a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let Some(program) = (unsafe { POLICY_EPS.get(EndpointKey { ifindex, hook }) }).copied() else {
        count(PolicyStat::Unmanaged);
        return TC_ACT_PIPE;
    };
    let flow = match parse(ctx) {
        Ok(Some(flow)) => flow,
        Ok(None) => return TC_ACT_PIPE,
        Err(()) => {
            count(PolicyStat::Malformed);
            return TC_ACT_SHOT;
        }
    };
    if flow.protocol == 58 && (133..=137).contains(&(flow.dim >> 8)) {
        return TC_ACT_PIPE;
    }
    // From the workload (tc ingress) the workload is the source; to it, the destination.
    let (peer, local) = if hook == TC_INGRESS {
        (flow.dst, flow.src)
    } else {
        (flow.src, flow.dst)
    };
    match decide(&program, &flow, peer, local) {
        Some(v) if v.action == ACTION_ALLOW => {
            count(PolicyStat::Allowed);
            TC_ACT_PIPE
        }
        Some(v) => {
            debug!(
                ctx,
                "policy: deny by rule {} on ifindex {}", v.rule, ifindex
            );
            count(PolicyStat::Denied);
            TC_ACT_SHOT
        }
        None => {
            count(PolicyStat::Denied);
            TC_ACT_SHOT
        }
    }
}

#[classifier]
pub fn policy_ingress(ctx: TcContext) -> i32 {
    judge(&ctx, TC_INGRESS)
}

#[classifier]
pub fn policy_egress(ctx: TcContext) -> i32 {
    judge(&ctx, TC_EGRESS)
}
