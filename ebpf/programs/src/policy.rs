//! The policy classifier: the verdict of the endpoint's compiled policy for each packet, in a
//! fixed number of map lookups whatever the number of rules (see calico-policy's compiler).
//!
//! Attached on the host side of a workload's veth: `policy_ingress` on tc ingress (what the
//! workload sends, judged by its egress policy), `policy_egress` on tc egress (what it
//! receives, judged by its ingress policy). An attached interface without a program for the
//! hook drops IP traffic (fail closed: between attach and install, after a failed install).
//!
//! Forwarding: what a workload sends to another local workload is judged here twice, by the
//! sender's egress policy and then by the receiver's ingress policy (as the receiver's
//! `policy_egress` would), and handed to the receiver's veth peer (`bpf_redirect_peer`): one
//! pass through a backlog queue instead of two, no host routing. An established flow's
//! entry caches the FIB's answer (interface, MACs) for [`FORWARD_CACHE_NS`].
//!
//! Parsing: Ethernet; IPv4 with options; IPv6 with up to four extension headers (hop-by-hop,
//! routing, destination options, fragment). Non-IP frames (ARP) pass. A later fragment carries
//! no transport header: it follows the verdict its datagram's first fragment got at the same
//! interface and hook, and is dropped when that was not seen or not allowed (`fragment_gate`;
//! behind other IPv6 extension headers it is judged with ports 0, so rules that name ports
//! never allow it: fail closed). IPv6 neighbour discovery passes as far as a workload and
//! its host need it (solicitations and advertisements of neighbours; router solicitations out,
//! advertisements in); router advertisements and redirects from a workload are dropped.

// Map keys kept in the scratch slot are passed by reference: a copy would go on the 512-byte
// stack, which the judging's frame all but fills.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::{bpf_fib_lookup, BPF_F_NO_PREALLOC, TC_ACT_PIPE, TC_ACT_SHOT},
    helpers::{
        bpf_fib_lookup as fib_lookup, bpf_ktime_get_ns, bpf_redirect, bpf_redirect_peer,
        bpf_skb_load_bytes,
    },
    macros::{classifier, map},
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf,
    },
    programs::TcContext,
};
use aya_log_ebpf::debug;
use calico_bpf_common::{
    CtKey, CtValue, EndpointKey, FragKey, LocalKey, PeerClassKey, PeerKeyData, PolicyStat,
    PortKeyData, ProgramRef, ProtoKey, RuleStatKey, RuleStatValue, SetList, VerdictEvent,
    VerdictKeyData, VerdictValue, ACTION_ALLOW, CONNTRACK_MAX_ENTRIES, CT_ANSWERED, CT_FIN_HI,
    CT_FIN_LO, CT_OPENED_BY_LO, CT_RST, FORWARD_CACHE_NS, FRAGMENTS_MAX_ENTRIES,
    POLICY_MAX_CLASSES, POLICY_MAX_ENDPOINTS, POLICY_MAX_IP_SET_MEMBERS, POLICY_MAX_PROGRAM_SETS,
    POLICY_MAX_RULE_STATS, POLICY_MAX_VERDICTS, POLICY_STAT_COUNT, PROGRAM_FORWARD_PASSES,
    PROGRAM_HOST, TC_EGRESS, TC_INGRESS, VERDICT_FIXED_BITS, VERDICT_FORWARDED,
};

#[map(name = "POLICY_EPS")]
static POLICY_EPS: HashMap<EndpointKey, ProgramRef> =
    HashMap::with_max_entries(POLICY_MAX_ENDPOINTS, 0);

#[map(name = "POLICY_NETS")]
static POLICY_NETS: LpmTrie<PeerKeyData, u32> =
    LpmTrie::with_max_entries(POLICY_MAX_CLASSES, BPF_F_NO_PREALLOC);

#[map(name = "POLICY_IP_SETS")]
static POLICY_IP_SETS: LpmTrie<PeerKeyData, u32> =
    LpmTrie::with_max_entries(POLICY_MAX_IP_SET_MEMBERS, BPF_F_NO_PREALLOC);

#[map(name = "POLICY_SET_LISTS")]
static POLICY_SET_LISTS: HashMap<u32, SetList> = HashMap::with_max_entries(POLICY_MAX_ENDPOINTS, 0);

#[map(name = "POLICY_PEER_CLASSES")]
static POLICY_PEER_CLASSES: HashMap<PeerClassKey, u32> =
    HashMap::with_max_entries(POLICY_MAX_CLASSES, 0);

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

#[map(name = "CONNTRACK")]
static CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(CONNTRACK_MAX_ENTRIES, 0);

#[map(name = "CONNTRACK_COUNTS")]
static CONNTRACK_COUNTS: HashMap<u32, u32> = HashMap::with_max_entries(POLICY_MAX_ENDPOINTS, 0);

#[map(name = "CONNTRACK_LIMIT")]
static CONNTRACK_LIMIT: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "POLICY_FRAGMENTS")]
static FRAGMENTS: LruHashMap<FragKey, u32> = LruHashMap::with_max_entries(FRAGMENTS_MAX_ENTRIES, 0);

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
    /// Ports for the conntrack key (the echo id for ICMP echo, else 0).
    ct_src_port: u16,
    ct_dst_port: u16,
    tcp_flags: u8,
}

/// Per-packet working state, kept in a per-CPU map: it does not fit the 512-byte BPF stack
/// beside the lookup keys.
struct Scratch {
    flow: Flow,
    /// For an ICMP error: the flow of the packet it is about.
    inner: Tuple,
    has_inner: bool,
    peer_key: Key<PeerKeyData>,
    class_key: PeerClassKey,
    local_key: LocalKey,
    verdict_key: Key<VerdictKeyData>,
    /// The packet is the first fragment of a datagram (`frag_key` names the datagram).
    first_fragment: bool,
    frag_key: FragKey,
    key: CtKey,
    /// The packet was parsed and judged (not passed unparsed).
    judged: bool,
    /// An allowed flow to track (`remember_flow`), with what its entry records.
    track: bool,
    track_value: CtValue,
    /// The endpoint's program reference (copied here: the judging's stack has no room).
    program_ref: ProgramRef,
    /// Policy decided this packet (not conntrack): which program, verdict and action.
    decided: bool,
    program: u32,
    verdict: u32,
    action: u32,
    /// This packet's `bpf_ktime_get_ns()`.
    now: u64,
    /// The tracked flow's cached forwarding (`fwd_ifindex` 0: none, or too old).
    fwd_ifindex: u32,
    fwd_macs: [u8; 12],
    /// The local endpoint [`forward`] hands the packet to, once its policy allows it.
    peer_out: u32,
    /// The frame's first [`HEAD_LEN`] bytes (Ethernet, an IPv4 header without options), read
    /// in one call; `head_ok` false when the frame is shorter.
    head: [u8; HEAD_LEN],
    head_ok: bool,
    /// The conntrack key's low side is the packet's source (set by [`ct_key`]).
    src_first: bool,
}

/// `from` copied into `to` field by field (a whole-struct copy is a call to memmove in BPF,
/// on every packet).
#[inline(always)]
fn copy_program_ref(from: &ProgramRef, to: &mut ProgramRef) {
    // SAFETY: both are valid, aligned references.
    unsafe {
        to.program = core::ptr::read_volatile(&from.program);
        to.other_protocol = core::ptr::read_volatile(&from.other_protocol);
        to.nets = core::ptr::read_volatile(&from.nets);
        to.sets = core::ptr::read_volatile(&from.sets);
        to.classes = core::ptr::read_volatile(&from.classes);
        to.flags = core::ptr::read_volatile(&from.flags);
    }
}

/// See [`Scratch::head`].
const HEAD_LEN: usize = ETH_HLEN + 20;

/// Reads the frame's head into the scratch slot: most of what the judging and the forwarding
/// look at, in one helper call instead of one per field.
#[inline(always)]
fn read_head(ctx: &TcContext, scratch: &mut Scratch) {
    // SAFETY: the context is this program's skb and `head` HEAD_LEN writable bytes.
    scratch.head_ok = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            0,
            scratch.head.as_mut_ptr() as *mut _,
            HEAD_LEN as u32,
        )
    } == 0;
}

#[map(name = "POLICY_RULE_STATS")]
static RULE_STATS: PerCpuHashMap<RuleStatKey, RuleStatValue> =
    PerCpuHashMap::with_max_entries(POLICY_MAX_RULE_STATS, 0);

#[map(name = "POLICY_LOG")]
static LOG: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "POLICY_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// The FIB lookup's argument and answer, per CPU (64 bytes the stack cannot spare).
#[map(name = "POLICY_FIB")]
static FIB: PerCpuArray<bpf_fib_lookup> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "POLICY_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

#[derive(Clone, Copy)]
struct Tuple {
    src: [u8; 16],
    dst: [u8; 16],
    protocol: u8,
    src_port: u16,
    dst_port: u16,
}

fn mapped_v4(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What an IP header says: (source, destination, protocol, transport offset, first
/// fragment).
type IpHeader = ([u8; 16], [u8; 16], u8, usize, bool);

/// An IP header at `offset`.
#[inline(always)]
fn parse_ip(ctx: &TcContext, offset: usize, v6: bool) -> Result<IpHeader, ()> {
    if !v6 {
        let vihl: u8 = ctx.load(offset).map_err(|_| ())?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ihl < 20 {
            return Err(());
        }
        let frags: [u8; 2] = ctx.load(offset + 6).map_err(|_| ())?;
        let protocol: u8 = ctx.load(offset + 9).map_err(|_| ())?;
        let src: [u8; 4] = ctx.load(offset + 12).map_err(|_| ())?;
        let dst: [u8; 4] = ctx.load(offset + 16).map_err(|_| ())?;
        let first = u16::from_be_bytes(frags) & 0x1fff == 0;
        return Ok((
            mapped_v4(src),
            mapped_v4(dst),
            protocol,
            offset + ihl,
            first,
        ));
    }
    let mut protocol: u8 = ctx.load(offset + 6).map_err(|_| ())?;
    let src: [u8; 16] = ctx.load(offset + 8).map_err(|_| ())?;
    let dst: [u8; 16] = ctx.load(offset + 24).map_err(|_| ())?;
    let mut l4 = offset + 40;
    let mut first = true;
    // Extension headers, bounded.
    for _ in 0..4 {
        match protocol {
            0 | 43 | 60 => {
                let h: [u8; 2] = ctx.load(l4).map_err(|_| ())?;
                protocol = h[0];
                l4 += (usize::from(h[1]) + 1) * 8;
            }
            44 => {
                let h: [u8; 4] = ctx.load(l4).map_err(|_| ())?;
                protocol = h[0];
                if u16::from_be_bytes([h[2], h[3]]) >> 3 != 0 {
                    first = false;
                }
                l4 += 8;
            }
            _ => break,
        }
    }
    Ok((src, dst, protocol, l4, first))
}

/// The frame's EtherType, from the head when it was read.
#[inline(always)]
fn ether_type(ctx: &TcContext, scratch: &Scratch) -> Option<u16> {
    if scratch.head_ok {
        Some(u16::from_be_bytes([scratch.head[12], scratch.head[13]]))
    } else {
        ctx.load::<[u8; 2]>(12).ok().map(u16::from_be_bytes)
    }
}

/// An address as the classifier holds it is IPv4 (v4-mapped).
#[inline(always)]
fn is_v4(a: &[u8; 16]) -> bool {
    a[..12] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]
}

/// [`parse_ip`] of the IPv4 header in the frame's head.
#[inline(always)]
fn ipv4_of_head(head: &[u8; HEAD_LEN]) -> Result<IpHeader, ()> {
    let ip = &head[ETH_HLEN..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ihl < 20 {
        return Err(());
    }
    let first = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff == 0;
    Ok((
        mapped_v4([ip[12], ip[13], ip[14], ip[15]]),
        mapped_v4([ip[16], ip[17], ip[18], ip[19]]),
        ip[9],
        ETH_HLEN + ihl,
        first,
    ))
}

fn is_ports(protocol: u8) -> bool {
    matches!(protocol, 6 | 17 | 132 | 136)
}

/// Parses the packet into `scratch`; `Ok(false)` for frames policy does not judge.
#[inline(always)]
fn parse(ctx: &TcContext, scratch: &mut Scratch) -> Result<bool, ()> {
    let v6 = match ether_type(ctx, scratch).ok_or(())? {
        ETH_P_IP => false,
        ETH_P_IPV6 => true,
        _ => return Ok(false),
    };
    // An IPv4 frame without a whole head has no whole IPv4 header: malformed.
    let (src, dst, protocol, l4, first) = if v6 {
        parse_ip(ctx, ETH_HLEN, true)?
    } else if scratch.head_ok {
        ipv4_of_head(&scratch.head)?
    } else {
        return Err(());
    };
    scratch.has_inner = false;
    let flow = &mut scratch.flow;
    flow.src = src;
    flow.dst = dst;
    flow.protocol = protocol;
    flow.src_port = 0;
    flow.dim = 0;
    flow.ct_src_port = 0;
    flow.ct_dst_port = 0;
    flow.tcp_flags = 0;
    if !first {
        // No transport header in this fragment: judged with ports 0 (fail closed).
        return Ok(true);
    }
    if protocol == 6 {
        // Ports and flags in one read.
        let tcp: [u8; 14] = ctx.load(l4).map_err(|_| ())?;
        flow.src_port = u16::from_be_bytes([tcp[0], tcp[1]]);
        flow.dim = u16::from_be_bytes([tcp[2], tcp[3]]);
        flow.ct_src_port = flow.src_port;
        flow.ct_dst_port = flow.dim;
        flow.tcp_flags = tcp[13];
    } else if is_ports(protocol) {
        let ports: [u8; 4] = ctx.load(l4).map_err(|_| ())?;
        flow.src_port = u16::from_be_bytes([ports[0], ports[1]]);
        flow.dim = u16::from_be_bytes([ports[2], ports[3]]);
        flow.ct_src_port = flow.src_port;
        flow.ct_dst_port = flow.dim;
    } else if protocol == 1 || protocol == 58 {
        let head: [u8; 2] = ctx.load(l4).map_err(|_| ())?;
        flow.dim = u16::from_be_bytes(head);
        let (echo, error) = if protocol == 1 {
            (
                head[0] == 0 || head[0] == 8,
                head[0] == 3 || head[0] == 11 || head[0] == 12,
            )
        } else {
            (head[0] == 128 || head[0] == 129, (1..=4).contains(&head[0]))
        };
        if echo {
            let id: [u8; 2] = ctx.load(l4 + 4).map_err(|_| ())?;
            flow.ct_src_port = u16::from_be_bytes(id);
            flow.ct_dst_port = flow.ct_src_port;
        } else if error {
            // The packet the error is about starts 8 bytes in.
            if let Ok((isrc, idst, iproto, il4, ifirst)) = parse_ip(ctx, l4 + 8, v6) {
                let mut inner = Tuple {
                    src: isrc,
                    dst: idst,
                    protocol: iproto,
                    src_port: 0,
                    dst_port: 0,
                };
                if ifirst && is_ports(iproto) {
                    if let Ok(p) = ctx.load::<[u8; 4]>(il4) {
                        inner.src_port = u16::from_be_bytes([p[0], p[1]]);
                        inner.dst_port = u16::from_be_bytes([p[2], p[3]]);
                    }
                } else if ifirst && (iproto == 1 || iproto == 58) {
                    if let Ok(id) = ctx.load::<[u8; 2]>(il4 + 4) {
                        inner.src_port = u16::from_be_bytes(id);
                        inner.dst_port = inner.src_port;
                    }
                }
                scratch.inner = inner;
                scratch.has_inner = true;
            }
        }
    }
    Ok(true)
}

impl Tuple {
    fn as_ref(&self) -> TupleRef<'_> {
        TupleRef {
            src: &self.src,
            dst: &self.dst,
            protocol: self.protocol,
            src_port: self.src_port,
            dst_port: self.dst_port,
        }
    }
}

/// A flow's tuple, borrowed where it lies (a copy would cost stack and time).
#[derive(Clone, Copy)]
struct TupleRef<'a> {
    src: &'a [u8; 16],
    dst: &'a [u8; 16],
    protocol: u8,
    src_port: u16,
    dst_port: u16,
}

/// The conntrack key of a tuple at `ifindex`: low (address, port) first. Returns whether
/// that is the source.
#[inline(always)]
fn ct_key(ifindex: u32, t: TupleRef, out: &mut CtKey) -> bool {
    // Compared as two big-endian words each: the byte order, without a loop of branches.
    let word = |a: &[u8; 16], i: usize| {
        u64::from_be_bytes([
            a[i],
            a[i + 1],
            a[i + 2],
            a[i + 3],
            a[i + 4],
            a[i + 5],
            a[i + 6],
            a[i + 7],
        ])
    };
    let (s0, s1, d0, d1) = (
        word(t.src, 0),
        word(t.src, 8),
        word(t.dst, 0),
        word(t.dst, 8),
    );
    let src_first = if s0 != d0 {
        s0 < d0
    } else if s1 != d1 {
        s1 < d1
    } else {
        t.src_port <= t.dst_port
    };
    out.ifindex = ifindex;
    out.protocol = u32::from(t.protocol);
    if src_first {
        out.addr_lo = *t.src;
        out.addr_hi = *t.dst;
        out.port_lo = t.src_port;
        out.port_hi = t.dst_port;
    } else {
        out.addr_lo = *t.dst;
        out.addr_hi = *t.src;
        out.port_lo = t.dst_port;
        out.port_hi = t.src_port;
    }
    src_first
}

#[inline(always)]
fn count(stat: PolicyStat) {
    if let Some(c) = POLICY_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *c += 1 };
    }
}

/// The verdict of the compiled program for the packet in `scratch`; `None` when a table has no
/// answer (which only happens for a program that is not fully written: fail closed). The
/// lookup keys are built in the scratch slot: the stack has no room for them beside the
/// judging's frame.
#[inline(always)]
fn decide(scratch: &mut Scratch, from_workload: bool) -> Option<VerdictValue> {
    let id = scratch.program_ref.program;
    let (nets, sets, classes, other_protocol) = (
        scratch.program_ref.nets,
        scratch.program_ref.sets,
        scratch.program_ref.classes,
        scratch.program_ref.other_protocol,
    );
    // From the workload (tc ingress) the workload is the source; to it, the destination.
    let (peer_addr, local_addr) = if from_workload {
        (&scratch.flow.dst, &scratch.flow.src)
    } else {
        (&scratch.flow.src, &scratch.flow.dst)
    };
    scratch.peer_key.prefix_len = 160;
    scratch.peer_key.data.table = nets.to_be_bytes();
    scratch.peer_key.data.addr = *peer_addr;
    scratch.local_key.program = id;
    scratch.local_key.addr = *local_addr;
    // The endpoint's own addresses first: on a host endpoint anything else is forwarded.
    // SAFETY: the value is copied out at once.
    let local = match unsafe { POLICY_LOCALS.get(&scratch.local_key) } {
        Some(class) => *class,
        None if scratch.program_ref.flags & PROGRAM_FORWARD_PASSES != 0 => {
            return Some(VerdictValue {
                action: ACTION_ALLOW,
                rule: VERDICT_FORWARDED,
            })
        }
        None => return None,
    };
    scratch.class_key.table = classes;
    scratch.class_key.net_class = *POLICY_NETS.get(&scratch.peer_key)?;
    // The peer's membership of each IP set the program consults: one lookup per set in the
    // shared set map (the sets are stored once, not per program).
    let mut mask = 0u64;
    if sets > 0 {
        // SAFETY: the value is read while the program runs; a concurrent replacement is
        // written whole before the program that reads it is switched to.
        let list = unsafe { POLICY_SET_LISTS.get(&id) }?;
        for i in 0..POLICY_MAX_PROGRAM_SETS {
            if i as u32 >= sets {
                break;
            }
            scratch.peer_key.data.table = list.ids[i].to_be_bytes();
            if POLICY_IP_SETS.get(&scratch.peer_key).is_some() {
                mask |= 1 << i;
            }
        }
    }
    scratch.class_key.mask = mask;
    // SAFETY: the value is copied out at once.
    let peer = unsafe { *POLICY_PEER_CLASSES.get(&scratch.class_key)? };
    let flow = &scratch.flow;
    let protocol = unsafe {
        POLICY_PROTOS.get(ProtoKey {
            program: id,
            protocol: u32::from(flow.protocol),
        })
    }
    .copied()
    .unwrap_or(other_protocol);
    let sport = *POLICY_SPORTS.get(Key::new(
        48,
        PortKeyData {
            program: id.to_be_bytes(),
            port: flow.src_port.to_be_bytes(),
        },
    ))?;
    let dim = flow.dim;
    let key = &mut scratch.verdict_key;
    key.prefix_len = VERDICT_FIXED_BITS + 16;
    let bytes = &mut key.data.bytes;
    bytes[0..4].copy_from_slice(&id.to_be_bytes());
    bytes[4..8].copy_from_slice(&peer.to_be_bytes());
    bytes[8..10].copy_from_slice(&(local as u16).to_be_bytes());
    bytes[10..12].copy_from_slice(&(protocol as u16).to_be_bytes());
    bytes[12..14].copy_from_slice(&(sport as u16).to_be_bytes());
    bytes[14..16].copy_from_slice(&dim.to_be_bytes());
    POLICY_VERDICTS.get(&scratch.verdict_key).copied()
}

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// What [`forward`] answers for a packet it rewrote for a workload's veth: the forwarding
/// classifier judges it by that workload's policy, then hands it to the veth's peer.
const JUDGE_PEER: i32 = -2;

/// A packet a workload sent that may go on: when the FIB (or the flow's cached answer) says it
/// leaves through another local endpoint's interface, it is sent straight there (MACs from
/// the FIB, TTL/hop limit taken down as routing would), past the host's routing and netfilter
/// path. To a workload it goes into the veth's peer once [`judge`] has applied the workload's
/// policy ([`JUDGE_PEER`]); to a host endpoint, to the interface's egress, whose classifier
/// judges it. Anything else (other hosts, unresolved neighbours, TTL about to expire,
/// fragments) takes the kernel's path.
// Not inlined: its frame and the judging's are never on the stack together.
#[inline(never)]
fn forward(ctx: &mut TcContext, scratch: &mut Scratch, ifindex: u32) -> i32 {
    let cached = scratch.fwd_ifindex != 0;
    let (out, macs) = if cached {
        (scratch.fwd_ifindex, scratch.fwd_macs)
    } else {
        match fib_route(ctx, scratch, ifindex) {
            Some(route) => route,
            None => return TC_ACT_PIPE,
        }
    };
    if out == ifindex {
        return TC_ACT_PIPE;
    }
    // SAFETY: the reference is copied out at once.
    let Some(target) = (unsafe {
        POLICY_EPS.get(EndpointKey {
            ifindex: out,
            hook: TC_EGRESS,
        })
    }) else {
        return TC_ACT_PIPE;
    };
    let host = target.flags & PROGRAM_HOST != 0;
    if !host {
        // For `judge_for_peer`.
        copy_program_ref(target, &mut scratch.program_ref);
    }
    if !cached {
        // The flow's entry (written by `remember_flow` for this packet or an earlier one)
        // keeps the answer for the packets after it.
        if let Some(entry) = CONNTRACK.get_ptr_mut(&scratch.key) {
            // SAFETY: the entry is this map's value; a racing update loses only the cache.
            unsafe {
                (*entry).fwd_ns = scratch.now;
                (*entry).fwd_ifindex = out;
                (*entry).fwd_macs = macs;
            }
        }
    }
    if is_v4(&scratch.flow.dst) {
        // MACs, TTL and header checksum rewritten in the head and stored in one call (an
        // IPv4 packet that got here was parsed from the head).
        if !scratch.head_ok {
            return TC_ACT_PIPE;
        }
        let head = &mut scratch.head;
        let ttl = head[ETH_HLEN + 8];
        if ttl <= 1 {
            return TC_ACT_PIPE;
        }
        let old = u16::from_be_bytes([ttl, head[ETH_HLEN + 9]]);
        let check = u16::from_be_bytes([head[ETH_HLEN + 10], head[ETH_HLEN + 11]]);
        let check = checksum_update(check, old, old - 0x0100);
        head[ETH_HLEN + 8] = ttl - 1;
        head[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&check.to_be_bytes());
        head[..12].copy_from_slice(&macs);
        if ctx.store(0, head, 0).is_err() {
            return TC_ACT_SHOT;
        }
    } else {
        let Ok(hops) = ctx.load::<u8>(ETH_HLEN + 7) else {
            return TC_ACT_PIPE;
        };
        if hops <= 1 {
            return TC_ACT_PIPE;
        }
        if ctx.store(ETH_HLEN + 7, &(hops - 1), 0).is_err() || ctx.store(0, &macs, 0).is_err() {
            return TC_ACT_SHOT;
        }
    }
    count(PolicyStat::Forwarded);
    if host {
        // SAFETY: plain helper call; returns TC_ACT_REDIRECT on success.
        return unsafe { bpf_redirect(out, 0) as i32 };
    }
    scratch.peer_out = out;
    JUDGE_PEER
}

/// The Internet checksum `check` after a 16-bit word of what it covers went from `old` to
/// `new` (RFC 1624, eqn. 3).
#[inline(always)]
fn checksum_update(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The FIB's answer for the packet in `scratch` arriving at `ifindex`: the interface it leaves
/// by and the destination then source MAC; `None` when the FIB has no direct answer.
#[inline(always)]
fn fib_route(ctx: &TcContext, scratch: &Scratch, ifindex: u32) -> Option<(u32, [u8; 12])> {
    let flow = &scratch.flow;
    let v4 = is_v4(&flow.dst);
    let fib = FIB.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot, used by this packet only.
    let fib = unsafe { &mut *fib };
    // SAFETY: bpf_fib_lookup is plain old data; all-zero is its "unset" state. Zeroed in
    // place: a temporary would not fit the stack.
    unsafe {
        core::ptr::write_bytes(
            fib as *mut bpf_fib_lookup as *mut u8,
            0,
            core::mem::size_of::<bpf_fib_lookup>(),
        )
    };
    fib.ifindex = ifindex;
    fib.l4_protocol = flow.protocol;
    // 0: the kernel checks the skb against the egress MTU itself (GSO-aware). The frame's
    // length would count the Ethernet header and GSO super-packets, and every full-size
    // packet would come back "fragmentation needed" and leave the BPF path.
    fib.__bindgen_anon_1.tot_len = 0;
    if v4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src =
            u32::from_ne_bytes([flow.src[12], flow.src[13], flow.src[14], flow.src[15]]);
        fib.__bindgen_anon_4.ipv4_dst =
            u32::from_ne_bytes([flow.dst[12], flow.dst[13], flow.dst[14], flow.dst[15]]);
    } else {
        fib.family = AF_INET6;
        let mut src = [0u32; 4];
        let mut dst = [0u32; 4];
        for i in 0..4 {
            src[i] = u32::from_ne_bytes([
                flow.src[i * 4],
                flow.src[i * 4 + 1],
                flow.src[i * 4 + 2],
                flow.src[i * 4 + 3],
            ]);
            dst[i] = u32::from_ne_bytes([
                flow.dst[i * 4],
                flow.dst[i * 4 + 1],
                flow.dst[i * 4 + 2],
                flow.dst[i * 4 + 3],
            ]);
        }
        fib.__bindgen_anon_3.ipv6_src = src;
        fib.__bindgen_anon_4.ipv6_dst = dst;
    }
    // SAFETY: the context is this program's skb and `fib` a valid, writable struct of the
    // size passed.
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb as *mut _,
            fib as *mut bpf_fib_lookup,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != 0 {
        return None;
    }
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&fib.dmac);
    macs[6..].copy_from_slice(&fib.smac);
    Some((fib.ifindex, macs))
}

/// Judging a packet the workload sent, in a frame of its own so that [`forward`]'s frame is
/// never stacked on top of it (together they would not fit 512 bytes).
#[inline(never)]
fn judge_from_workload(ctx: &TcContext, ifindex: u32) -> i32 {
    judge_at(ctx, ifindex, TC_INGRESS, false)
}

/// Judging a packet going to the workload, likewise in its own frame.
#[inline(never)]
fn judge_to_workload(ctx: &TcContext, ifindex: u32) -> i32 {
    judge_at(ctx, ifindex, TC_EGRESS, false)
}

/// Judging a packet [`forward`] sends into the workload behind `out` by that workload's
/// (ingress) policy, as `out`'s own classifier would, from the flow parsed already.
#[inline(never)]
fn judge_for_peer(ctx: &TcContext, out: u32) -> i32 {
    judge_at(ctx, out, TC_EGRESS, true)
}

/// Per-rule counters, a verdict event and (when switched on) a debug line for a packet policy
/// decided. Here rather than in the judging, whose frame leaves no room for aya-log's calls.
#[inline(never)]
fn record(ctx: &TcContext, scratch: &Scratch, ifindex: u32, hook: u32) {
    if scratch.action != ACTION_ALLOW && LOG.get(0).is_some_and(|on| *on != 0) {
        debug!(
            ctx,
            "policy: deny by rule {} on ifindex {}", scratch.verdict, ifindex
        );
    }
    let key = RuleStatKey {
        program: scratch.program,
        verdict: scratch.verdict,
    };
    let len = u64::from(ctx.len());
    match RULE_STATS.get_ptr_mut(key) {
        // SAFETY: this CPU's value of the entry.
        Some(v) => unsafe {
            (*v).packets += 1;
            (*v).bytes += len;
        },
        None => {
            let created = RULE_STATS.insert(
                key,
                RuleStatValue {
                    packets: 1,
                    bytes: len,
                },
                0,
            );
            if created.is_err() {
                count(PolicyStat::CountersLost);
            }
        }
    }
    let Some(mut entry) = EVENTS.reserve::<VerdictEvent>(0) else {
        count(PolicyStat::EventsLost);
        return;
    };
    {
        let e = entry.as_mut_ptr();
        let flow = &scratch.flow;
        // SAFETY: `e` points at reserved ring-buffer space the size of a VerdictEvent; every
        // field is written before it is submitted.
        unsafe {
            (*e).ifindex = ifindex;
            (*e).hook = hook;
            (*e).program = scratch.program;
            (*e).verdict = scratch.verdict;
            (*e).action = scratch.action;
            (*e).protocol = u32::from(flow.protocol);
            (*e).src = flow.src;
            (*e).dst = flow.dst;
            (*e).src_port = flow.src_port;
            (*e).dst_port = flow.dim;
            (*e).len = len as u32;
        }
        entry.submit(0);
    }
}

#[inline(always)]
fn judge(ctx: &mut TcContext, hook: u32) -> i32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: this CPU's scratch slot, used by this packet only. Reset first: the judging
    // may return before it touches the slot (a packet it cannot parse), and what a previous
    // packet left must not count as this one's.
    unsafe {
        (*scratch).judged = false;
        (*scratch).track = false;
        (*scratch).decided = false;
        (*scratch).first_fragment = false;
        (*scratch).fwd_ifindex = 0;
        read_head(ctx, &mut *scratch);
    }
    // Fragments first, in a frame of their own beside the judging's (the two would not fit
    // 512 bytes together).
    // SAFETY: as above.
    let unfragmented_v4 = unsafe {
        let head = &(*scratch).head;
        (*scratch).head_ok
            && u16::from_be_bytes([head[12], head[13]]) == ETH_P_IP
            && u16::from_be_bytes([head[ETH_HLEN + 6], head[ETH_HLEN + 7]]) & 0x3fff == 0
    };
    if !unfragmented_v4 {
        let gated = fragment_gate(ctx, hook);
        if gated != UNDECIDED {
            return gated;
        }
    }
    // SAFETY: the kernel passes a valid __sk_buff.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let verdict = if hook == TC_INGRESS {
        judge_from_workload(ctx, ifindex)
    } else {
        judge_to_workload(ctx, ifindex)
    };
    // SAFETY: as above; judge_at filled it for this packet.
    let scratch = unsafe { &mut *scratch };
    if scratch.decided {
        record(ctx, scratch, ifindex, hook);
    }
    if verdict == TC_ACT_PIPE && scratch.first_fragment {
        remember_fragment();
    }
    if scratch.track {
        remember_flow(ifindex);
    }
    // A first fragment takes the kernel's path: its datagram's later fragments do, and the
    // classifier that sees them must have seen it.
    if verdict != TC_ACT_PIPE || hook != TC_INGRESS || !scratch.judged || scratch.first_fragment {
        return verdict;
    }
    let forwarded = forward(ctx, scratch, ifindex);
    if forwarded != JUDGE_PEER {
        return forwarded;
    }
    let out = scratch.peer_out;
    scratch.track = false;
    scratch.decided = false;
    let verdict = judge_for_peer(ctx, out);
    if scratch.decided {
        record(ctx, scratch, out, TC_EGRESS);
    }
    if scratch.track {
        remember_flow(out);
    }
    if verdict != TC_ACT_PIPE {
        return verdict;
    }
    // SAFETY: plain helper call; returns TC_ACT_REDIRECT on success.
    unsafe { bpf_redirect_peer(out, 0) as i32 }
}

/// The verdict of the policy at (`ifindex`, `hook`) for the packet, parsed into the scratch
/// slot unless `parsed` (then it holds this packet's flow already).
#[inline(always)]
fn judge_at(ctx: &TcContext, ifindex: u32, hook: u32, parsed: bool) -> i32 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: this CPU's scratch slot, used by this packet only.
    let scratch = unsafe { &mut *scratch };
    // After `forward` the endpoint's reference is in the slot already.
    let programmed = parsed
        || match unsafe { POLICY_EPS.get(EndpointKey { ifindex, hook }) } {
            Some(found) => {
                copy_program_ref(found, &mut scratch.program_ref);
                true
            }
            None => false,
        };
    if !parsed {
        match parse(ctx, scratch) {
            Ok(true) => scratch.judged = true,
            Ok(false) => return TC_ACT_PIPE,
            Err(()) => {
                count(PolicyStat::Malformed);
                return TC_ACT_SHOT;
            }
        }
    }
    // IPv6 neighbour discovery, limited to what a workload and its host need of each other
    // (as upstream): from the workload router solicitations and neighbour solicitations and
    // advertisements; to it router and neighbour advertisements and solicitations. A workload
    // sends no router advertisement or redirect, and receives no redirect.
    if scratch.flow.protocol == 58 && (133..=137).contains(&(scratch.flow.dim >> 8)) {
        let icmp_type = scratch.flow.dim >> 8;
        let needed = if hook == TC_INGRESS {
            matches!(icmp_type, 133 | 135 | 136)
        } else {
            matches!(icmp_type, 134..=136)
        };
        if needed {
            return TC_ACT_PIPE;
        }
        count(PolicyStat::Denied);
        return TC_ACT_SHOT;
    }
    // Fail closed: no program for this interface and hook means nothing is allowed yet.
    if !programmed {
        count(PolicyStat::NoPolicy);
        return TC_ACT_SHOT;
    }
    let now = if parsed {
        scratch.now
    } else {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        let now = unsafe { bpf_ktime_get_ns() };
        scratch.now = now;
        now
    };
    // An ICMP error about a tracked flow belongs to that flow.
    if scratch.has_inner {
        ct_key(ifindex, scratch.inner.as_ref(), &mut scratch.key);
        if let Some(entry) = CONNTRACK.get_ptr_mut(scratch.key) {
            // SAFETY: the entry is this map's value; a racing update only loses a timestamp.
            unsafe { (*entry).last_seen_ns = now };
            count(PolicyStat::Tracked);
            return TC_ACT_PIPE;
        }
    }
    let tuple = TupleRef {
        src: &scratch.flow.src,
        dst: &scratch.flow.dst,
        protocol: scratch.flow.protocol,
        src_port: scratch.flow.ct_src_port,
        dst_port: scratch.flow.ct_dst_port,
    };
    scratch.src_first = ct_key(ifindex, tuple, &mut scratch.key);
    let flow = &scratch.flow;
    let key = &scratch.key;
    // A SYN starts a connection: policy judges it even where an entry for the same ports
    // exists (a reused port, an entry from before a policy change). The entry stays for the
    // packets of the connection that had it; an allowed SYN renews it.
    let opens = flow.protocol == 6 && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let tracked = if opens {
        None
    } else {
        CONNTRACK.get_ptr_mut(key)
    };
    if let Some(entry) = tracked {
        let from_lo = scratch.src_first;
        // SAFETY: as above.
        unsafe {
            (*entry).last_seen_ns = now;
            let mut flags = (*entry).flags;
            if from_lo != (flags & CT_OPENED_BY_LO != 0) {
                flags |= CT_ANSWERED;
            }
            if flow.tcp_flags & TCP_FIN != 0 {
                flags |= if from_lo { CT_FIN_LO } else { CT_FIN_HI };
            }
            // A reset shortens the entry's life (the expiry's reset timeout) rather than
            // ending it at once: a forged reset cannot send the flow's packets back to policy.
            if flow.tcp_flags & TCP_RST != 0 {
                flags |= CT_RST;
            }
            (*entry).flags = flags;
            // Packets from this side reuse where the flow was last forwarded, while fresh.
            let fwd_ns = (*entry).fwd_ns;
            if hook == TC_INGRESS && fwd_ns != 0 && now.wrapping_sub(fwd_ns) < FORWARD_CACHE_NS {
                scratch.fwd_ifindex = (*entry).fwd_ifindex;
                // Byte by byte: a whole-array copy is a call to memmove in BPF.
                for (to, from) in scratch.fwd_macs.iter_mut().zip(&(*entry).fwd_macs) {
                    *to = core::ptr::read_volatile(from);
                }
            }
        }
        count(PolicyStat::Tracked);
        return TC_ACT_PIPE;
    }
    let decision = decide(scratch, hook == TC_INGRESS);
    if decision.is_some_and(|v| v.rule == VERDICT_FORWARDED) {
        count(PolicyStat::HostForwarded);
        return TC_ACT_PIPE;
    }
    scratch.decided = true;
    scratch.program = scratch.program_ref.program;
    (scratch.verdict, scratch.action) = match decision {
        Some(v) => (v.rule, v.action),
        None => (u32::MAX, 0),
    };
    let flow = &scratch.flow;
    match decision {
        Some(v) if v.action == ACTION_ALLOW => {
            if flow.tcp_flags & TCP_RST == 0 {
                let from_lo = scratch.src_first;
                // Tracked by `remember_flow`, in a frame of its own.
                scratch.track = true;
                scratch.track_value = CtValue {
                    created_ns: now,
                    last_seen_ns: now,
                    flags: if from_lo { CT_OPENED_BY_LO } else { 0 },
                    rule: v.rule,
                    fwd_ns: 0,
                    fwd_ifindex: 0,
                    fwd_macs: [0; 12],
                };
            }
            count(PolicyStat::Allowed);
            TC_ACT_PIPE
        }
        Some(_) | None => {
            count(PolicyStat::Denied);
            TC_ACT_SHOT
        }
    }
}

/// What [`fragment_gate`] answers for a packet it leaves to the judging (a plain integer, not
/// an `Option`: the entry's frame has no room for one).
const UNDECIDED: i32 = -1;

/// A fragmented datagram's later fragments carry no transport header, so no ports to judge:
/// they follow the verdict its first fragment got at this interface and hook. Notes the first
/// fragment (for [`remember_fragment`]); for a later one, the verdict: passed when its first
/// fragment passed here, else dropped (fail closed). [`UNDECIDED`] for everything else.
#[inline(never)]
fn fragment_gate(ctx: &TcContext, hook: u32) -> i32 {
    fragment_verdict(ctx, hook).unwrap_or(UNDECIDED)
}

#[inline(always)]
fn fragment_verdict(ctx: &TcContext, hook: u32) -> Option<i32> {
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot, used by this packet only.
    let scratch = unsafe { &mut *scratch };
    let ether = ether_type(ctx, scratch)?;
    let key = &mut scratch.frag_key;
    let later = match ether {
        ETH_P_IP => {
            // Without a whole head, not a whole IPv4 header: the judging drops it.
            if !scratch.head_ok {
                return None;
            }
            let ip = &scratch.head[ETH_HLEN..];
            let flags = u16::from_be_bytes([ip[6], ip[7]]);
            if flags & 0x3fff == 0 {
                return None;
            }
            key.id = u32::from(u16::from_be_bytes([ip[4], ip[5]]));
            key.protocol = u32::from(ip[9]);
            key.src = mapped_v4([ip[12], ip[13], ip[14], ip[15]]);
            key.dst = mapped_v4([ip[16], ip[17], ip[18], ip[19]]);
            flags & 0x1fff != 0
        }
        ETH_P_IPV6 => {
            // A fragment header right after the fixed header (where the kernel puts it for
            // what it fragments); behind other extension headers the judging treats it.
            if ctx.load::<u8>(ETH_HLEN + 6).ok()? != 44 {
                return None;
            }
            let h: [u8; 8] = ctx.load(ETH_HLEN + 40).ok()?;
            key.id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            key.protocol = u32::from(h[0]);
            key.src = ctx.load(ETH_HLEN + 8).ok()?;
            key.dst = ctx.load(ETH_HLEN + 24).ok()?;
            u16::from_be_bytes([h[2], h[3]]) >> 3 != 0
        }
        _ => return None,
    };
    // SAFETY: the kernel passes a valid __sk_buff.
    key.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    key.hook = hook;
    if !later {
        scratch.first_fragment = true;
        return None;
    }
    // SAFETY: the value is only tested for presence.
    let seen = unsafe { FRAGMENTS.get(&scratch.frag_key) }.is_some();
    Some(if seen {
        count(PolicyStat::Tracked);
        TC_ACT_PIPE
    } else {
        count(PolicyStat::Denied);
        TC_ACT_SHOT
    })
}

/// Tracks an allowed flow (its key and value in the scratch slot), unless its interface holds
/// its share of the table already: past `CONNTRACK_LIMIT` entries the flow's packets are
/// judged one by one instead, and other interfaces' flows are not evicted for it.
#[inline(never)]
fn remember_flow(ifindex: u32) {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's scratch slot, used by this packet only.
    let scratch = unsafe { &*scratch };
    let limit = CONNTRACK_LIMIT.get(0).copied().unwrap_or(0);
    let held = CONNTRACK_COUNTS.get_ptr_mut(&ifindex);
    // SAFETY: the map's value; concurrent updates may lose an increment (an approximate
    // count, recounted by every expiry pass).
    let count_now = held.map_or(0, |c| unsafe { *c });
    // SAFETY: the value is only tested for presence.
    let known = unsafe { CONNTRACK.get(&scratch.key) }.is_some();
    if limit != 0 && count_now >= limit && !known {
        count(PolicyStat::ConntrackOverLimit);
        return;
    }
    if CONNTRACK
        .insert(&scratch.key, &scratch.track_value, 0)
        .is_err()
    {
        count(PolicyStat::ConntrackLost);
        return;
    }
    if known {
        return;
    }
    match held {
        // SAFETY: as above.
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = CONNTRACK_COUNTS.insert(&ifindex, &1, 0);
        }
    }
}

/// A first fragment that passed (allowed, or on a tracked flow) lets its datagram's later
/// fragments pass after it.
#[inline(never)]
fn remember_fragment() {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: as in fragment_gate; the verdict is the rule that allowed (or u32::MAX).
    let scratch = unsafe { &*scratch };
    let _ = FRAGMENTS.insert(&scratch.frag_key, &scratch.verdict, 0);
}

#[classifier]
pub fn policy_ingress(mut ctx: TcContext) -> i32 {
    judge(&mut ctx, TC_INGRESS)
}

#[classifier]
pub fn policy_egress(mut ctx: TcContext) -> i32 {
    judge(&mut ctx, TC_EGRESS)
}
