//! Types shared by the eBPF programs and userspace.
//!
//! Every map key and value is `#[repr(C)]` and defined once, here, so both sides agree on the
//! layout byte for byte. With the `user` feature the types implement [`aya::Pod`] so userspace can
//! read and write them through aya's map wrappers.
#![no_std]

/// Name of the LPM trie of IPv4 source prefixes that the filter drops.
pub const SRC_DENY_V4_MAP: &str = "SRC_DENY_V4";
/// Name of the LPM trie of IPv6 source prefixes that the filter drops.
pub const SRC_DENY_V6_MAP: &str = "SRC_DENY_V6";
/// Name of the per-CPU array of filter counters, indexed by [`FilterStat`].
pub const FILTER_STATS_MAP: &str = "FILTER_STATS";
/// Name of the TC classifier program in the object file.
pub const SOURCE_FILTER_PROG: &str = "source_filter";

/// Capacity of each source-deny trie.
pub const SRC_DENY_MAX_ENTRIES: u32 = 16_384;

/// Data part of an IPv4 LPM trie key: the address in network byte order.
pub type Ipv4KeyData = [u8; 4];
/// Data part of an IPv6 LPM trie key: the address in network byte order.
pub type Ipv6KeyData = [u8; 16];

/// Value stored for each denied source prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceDenyEntry {
    /// Opaque identifier chosen by userspace (e.g. a rule index); logged when a packet is dropped
    /// so an operator can tell which entry matched.
    pub rule_id: u32,
    /// Keeps the value 8-byte sized and leaves room for flags without a layout change.
    pub reserved: u32,
}

/// Index into the per-CPU [`FILTER_STATS_MAP`] counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterStat {
    /// Packets the filter let through (including non-IP packets).
    Passed = 0,
    /// Packets dropped because their source matched a deny prefix.
    Dropped = 1,
}

/// Number of counters in [`FILTER_STATS_MAP`].
pub const FILTER_STAT_COUNT: u32 = 2;

#[cfg(feature = "user")]
// SAFETY: plain-old-data: `#[repr(C)]`, only integer fields, no padding.
unsafe impl aya::Pod for SourceDenyEntry {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_entry_layout_is_stable() {
        // The eBPF side reads this value by layout; a change here must be deliberate.
        assert_eq!(core::mem::size_of::<SourceDenyEntry>(), 8);
        assert_eq!(core::mem::align_of::<SourceDenyEntry>(), 4);
    }
}

// ---------------------------------------------------------------------------------------------
// Policy: the tables calico-policy's compiler produces, in map form. A packet's verdict is a
// handful of lookups whatever the number of rules: endpoint → program; peer address → the
// class of the rules' own nets it falls in, and its membership of each IP set the program's
// selectors name (one shared set per selector, as upstream's `cali_v4_ip_sets`); those two →
// peer class; local address, protocol and source port → classes; classes + destination port
// (or ICMP type/code) → verdict. Programs are identified by a number so that a new version can
// be written beside the old one and switched to with a single map update.

/// `EndpointKey` → `ProgramRef`: which compiled program guards an interface and direction.
pub const POLICY_ENDPOINTS_MAP: &str = "POLICY_EPS";
/// LPM trie, `PeerKeyData` (nets table id, address) → net class: the rules' own `nets` and
/// `notNets`, per table (shared by content).
pub const POLICY_NETS_MAP: &str = "POLICY_NETS";
/// LPM trie, `PeerKeyData` (IP set id, address) → 1: the members of every IP set a program's
/// selectors stand for, each set stored once whatever the number of programs reading it.
pub const POLICY_IP_SETS_MAP: &str = "POLICY_IP_SETS";
/// Hash, program id → `SetList`: the IP sets a program consults, in mask bit order.
pub const POLICY_SET_LISTS_MAP: &str = "POLICY_SET_LISTS";
/// Hash, `PeerClassKey` → peer class (absent: the combination cannot occur; fail closed).
pub const POLICY_PEER_CLASSES_MAP: &str = "POLICY_PEER_CLASSES";
/// Hash, `LocalKey` → local class.
pub const POLICY_LOCALS_MAP: &str = "POLICY_LOCALS";
/// Hash, `ProtoKey` → protocol class (absent: `ProgramRef::other_protocol`).
pub const POLICY_PROTOS_MAP: &str = "POLICY_PROTOS";
/// LPM trie, `PortKeyData` → source-port class.
pub const POLICY_SPORTS_MAP: &str = "POLICY_SPORTS";
/// LPM trie, `VerdictKeyData` → `VerdictValue`.
pub const POLICY_VERDICTS_MAP: &str = "POLICY_VERDICTS";
/// The policy classifier for tc ingress (traffic from a workload: its egress policy).
pub const POLICY_INGRESS_PROG: &str = "policy_ingress";
/// The policy classifier for tc egress (traffic to a workload: its ingress policy).
pub const POLICY_EGRESS_PROG: &str = "policy_egress";

/// TC hook direction of an attachment (on the host side of a workload's veth, ingress sees
/// what the workload sends: its egress policy).
pub const TC_INGRESS: u32 = 0;
pub const TC_EGRESS: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub ifindex: u32,
    /// `TC_INGRESS` or `TC_EGRESS`.
    pub hook: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgramRef {
    pub program: u32,
    /// Class of protocols no rule names.
    pub other_protocol: u32,
    /// The nets table (in `POLICY_NETS`) the program reads, shared by every program whose
    /// rules name the same nets.
    pub nets: u32,
    /// How many IP sets its `SetList` names (0: no lookup at all).
    pub sets: u32,
    /// The peer class table (in `POLICY_PEER_CLASSES`) it reads, shared by every program with
    /// the same (net class, mask) → class mapping.
    pub classes: u32,
    /// `PROGRAM_*` flags.
    pub flags: u32,
}

/// A host endpoint's program: a packet whose local address is not one of the endpoint's is
/// traffic the host forwards (not to or from the host itself), which its policy does not
/// judge (upstream's semantics for host endpoints): it passes, counted as `HostForwarded`.
/// A workload's program never has it: there such a packet is spoofed and dropped.
pub const PROGRAM_FORWARD_PASSES: u32 = 1;

/// A host endpoint's program (its interface is not a workload veth whose peer sits in
/// another namespace): traffic forwarded to it in BPF is redirected to the interface's egress,
/// where its own classifier judges it. A workload's program judges such traffic in the
/// forwarding classifier, which then hands it to the veth's peer (`bpf_redirect_peer`).
pub const PROGRAM_HOST: u32 = 2;

/// The verdict index `decide` gives traffic a host endpoint forwards (see
/// [`PROGRAM_FORWARD_PASSES`]); never an index of a compiled program.
pub const VERDICT_FORWARDED: u32 = u32::MAX - 1;

/// LPM data: a nets table id or an IP set id (big-endian, always fully matched) then the
/// address as IPv6 (IPv4 mapped to ::ffff:a.b.c.d).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerKeyData {
    pub table: [u8; 4],
    pub addr: [u8; 16],
}

/// Most IP sets one program consults (the bits of `PeerClassKey::mask`).
pub const POLICY_MAX_PROGRAM_SETS: usize = 64;

/// The IP sets of one program: bit `i` of a peer's membership mask is `ids[i]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SetList {
    pub ids: [u32; POLICY_MAX_PROGRAM_SETS],
}

impl Default for SetList {
    fn default() -> Self {
        Self {
            ids: [0; POLICY_MAX_PROGRAM_SETS],
        }
    }
}

/// A peer's net class and IP set memberships, in one peer class table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerClassKey {
    pub table: u32,
    pub net_class: u32,
    pub mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LocalKey {
    pub program: u32,
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ProtoKey {
    pub program: u32,
    pub protocol: u32,
}

/// LPM data: program id (big-endian) then a port (big-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortKeyData {
    pub program: [u8; 4],
    pub port: [u8; 2],
}

/// LPM data: program (4), peer class (4), local class (2), protocol class (2), source-port
/// class (2), all big-endian and always fully matched, then the destination port or ICMP
/// `type << 8 | code` (2), matched by prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictKeyData {
    pub bytes: [u8; 16],
}

/// Bits of `VerdictKeyData` before the port.
pub const VERDICT_FIXED_BITS: u32 = 112;

pub const ACTION_DENY: u32 = 0;
pub const ACTION_ALLOW: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictValue {
    /// `ACTION_ALLOW` or `ACTION_DENY`.
    pub action: u32,
    /// Which rule decided (an index userspace keeps), for counters and logs.
    pub rule: u32,
}

/// Maximum entries of the policy maps.
pub const POLICY_MAX_ENDPOINTS: u32 = 16_384;
pub const POLICY_MAX_CLASSES: u32 = 262_144;
pub const POLICY_MAX_VERDICTS: u32 = 1_048_576;
pub const POLICY_MAX_IP_SET_MEMBERS: u32 = 1_048_576;

/// Packets and bytes each verdict of each program decided (per-CPU hash `POLICY_RULE_STATS`);
/// userspace maps `verdict` back to the deciding rule of the program it compiled.
pub const POLICY_RULE_STATS_MAP: &str = "POLICY_RULE_STATS";
pub const POLICY_MAX_RULE_STATS: u32 = 65_536;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleStatKey {
    pub program: u32,
    pub verdict: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStatValue {
    pub packets: u64,
    pub bytes: u64,
}

/// The policy programs' debug logging switch (array of one u32: non-zero logs), flipped at run
/// time; the aya-log level itself is fixed when the object is loaded.
pub const POLICY_LOG_MAP: &str = "POLICY_LOG";

/// Verdict events (ring buffer `POLICY_EVENTS`): one per packet judged by policy (new flows
/// and denied packets; tracked packets make none).
pub const POLICY_EVENTS_MAP: &str = "POLICY_EVENTS";

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VerdictEvent {
    pub ifindex: u32,
    /// `TC_INGRESS` or `TC_EGRESS`.
    pub hook: u32,
    pub program: u32,
    /// Index of the verdict in the program (see `RuleStatKey::verdict`); `u32::MAX` when a
    /// table had no answer (fail closed).
    pub verdict: u32,
    /// `ACTION_ALLOW` or `ACTION_DENY`.
    pub action: u32,
    pub protocol: u32,
    /// IPv4 as v4-mapped IPv6.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub src_port: u16,
    /// Destination port, or `type << 8 | code` for ICMP.
    pub dst_port: u16,
    /// The packet's length (bytes, as the hook saw it).
    pub len: u32,
}

/// Counters of the policy program (per-CPU array `POLICY_STATS`).
pub const POLICY_STATS_MAP: &str = "POLICY_STATS";
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyStat {
    Allowed = 0,
    Denied = 1,
    /// IP packets on an attached interface that has no program (yet, or any more) for this
    /// hook: dropped, so an interface is never open between attach and install or after an
    /// install failed. ARP and IPv6 neighbour discovery still pass.
    NoPolicy = 2,
    /// Packets that could not be parsed (dropped).
    Malformed = 3,
    /// Packets of tracked flows (passed without a verdict).
    Tracked = 4,
    /// Packets sent straight to another local endpoint's interface (bpf_redirect_neigh after a
    /// FIB lookup), past the host's routing and netfilter path.
    Forwarded = 5,
    /// Allowed flows whose conntrack entry could not be written (their later packets are
    /// judged again, one by one).
    ConntrackLost = 6,
    /// Verdict events dropped because the ring buffer was full (nobody drained it in time).
    EventsLost = 7,
    /// Per-rule counters that could not be created (the counter map was full).
    CountersLost = 8,
    /// Allowed flows left untracked because their interface holds its share of the
    /// conntrack table already (`CONNTRACK_LIMIT`): one workload cannot evict everybody's.
    ConntrackOverLimit = 9,
    /// Packets a host endpoint's interface carried for traffic the host forwards (see
    /// [`PROGRAM_FORWARD_PASSES`]): passed unjudged.
    HostForwarded = 10,
}
pub const POLICY_STAT_COUNT: u32 = 11;

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `#[repr(C)]` structs of integers and byte arrays without padding.
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::RuleStatKey {}
    unsafe impl aya::Pod for super::RuleStatValue {}
    unsafe impl aya::Pod for super::VerdictEvent {}
    unsafe impl aya::Pod for super::ProgramRef {}
    unsafe impl aya::Pod for super::PeerKeyData {}
    unsafe impl aya::Pod for super::SetList {}
    unsafe impl aya::Pod for super::PeerClassKey {}
    unsafe impl aya::Pod for super::LocalKey {}
    unsafe impl aya::Pod for super::ProtoKey {}
    unsafe impl aya::Pod for super::PortKeyData {}
    unsafe impl aya::Pod for super::VerdictKeyData {}
    unsafe impl aya::Pod for super::VerdictValue {}
}

#[cfg(test)]
mod policy_layout {
    use super::*;

    #[test]
    fn policy_map_types_have_no_padding() {
        use core::mem::size_of;
        assert_eq!(size_of::<EndpointKey>(), 8);
        assert_eq!(size_of::<ProgramRef>(), 24);
        assert_eq!(size_of::<PeerKeyData>(), 20);
        assert_eq!(size_of::<SetList>(), 4 * POLICY_MAX_PROGRAM_SETS);
        assert_eq!(size_of::<PeerClassKey>(), 16);
        assert_eq!(size_of::<LocalKey>(), 20);
        assert_eq!(size_of::<ProtoKey>(), 8);
        assert_eq!(size_of::<PortKeyData>(), 6);
        assert_eq!(size_of::<VerdictKeyData>(), 16);
        assert_eq!(size_of::<VerdictValue>(), 8);
    }
}

// ---------------------------------------------------------------------------------------------
// Connection tracking: a flow policy allowed at an endpoint's hook is remembered per interface,
// so its later packets, its replies and ICMP errors about it pass without another verdict.

/// LRU hash, `CtKey` → `CtValue`.
pub const CONNTRACK_MAP: &str = "CONNTRACK";
pub const CONNTRACK_MAX_ENTRIES: u32 = 262_144;
/// Hash, ifindex → conntrack entries the interface holds (counted as flows are tracked,
/// recounted by every expiry pass).
pub const CONNTRACK_COUNTS_MAP: &str = "CONNTRACK_COUNTS";
/// Array of one u32: the most conntrack entries one interface may hold (0: no limit).
pub const CONNTRACK_LIMIT_MAP: &str = "CONNTRACK_LIMIT";

/// A flow seen at one interface: its addresses and ports ordered low-then-high, so both
/// directions of a flow share one key. ICMP echo flows use the echo id as both ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ifindex: u32,
    pub protocol: u32,
    pub addr_lo: [u8; 16],
    pub addr_hi: [u8; 16],
    pub port_lo: u16,
    pub port_hi: u16,
}

/// LRU hash, `FragKey` → the rule that allowed the datagram's first fragment: its later
/// fragments (no transport header, so no ports to judge) follow that verdict.
pub const FRAGMENTS_MAP: &str = "POLICY_FRAGMENTS";
pub const FRAGMENTS_MAX_ENTRIES: u32 = 16_384;

/// One fragmented datagram at one interface and hook: addresses, protocol and IP id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub ifindex: u32,
    pub hook: u32,
    pub protocol: u32,
    /// IPv4's 16-bit identification, or IPv6's fragment header identification.
    pub id: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// TCP saw a FIN from the low side / the high side.
pub const CT_FIN_LO: u32 = 1;
pub const CT_FIN_HI: u32 = 2;
/// TCP saw a reset (the entry then lives for the reset timeout only).
pub const CT_RST: u32 = 4;
/// The side that did not open the flow has sent a packet (TCP: past SYN-sent).
pub const CT_ANSWERED: u32 = 8;
/// The flow was opened (its first packet judged) from the low side of the key.
pub const CT_OPENED_BY_LO: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the first and the latest packet.
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// `CT_FIN_*` bits.
    pub flags: u32,
    /// Index of the rule (verdict) that allowed the flow.
    pub rule: u32,
    /// Where the flow's packets arriving at the entry's interface from its side (tc ingress)
    /// were last forwarded: `bpf_ktime_get_ns()` of the FIB lookup (0: none cached), the
    /// local endpoint's interface, and the destination then source MAC written to the frame.
    /// Established packets reuse it for [`FORWARD_CACHE_NS`] instead of a FIB lookup.
    pub fwd_ns: u64,
    pub fwd_ifindex: u32,
    pub fwd_macs: [u8; 12],
}

/// How long a flow's cached forwarding decision is used before the FIB is asked again (a
/// moved or recreated workload is followed within this time).
pub const FORWARD_CACHE_NS: u64 = 1_000_000_000;

#[cfg(feature = "user")]
mod ct_pod {
    // SAFETY: `#[repr(C)]` integers and byte arrays, no padding.
    unsafe impl aya::Pod for super::CtKey {}
    unsafe impl aya::Pod for super::CtValue {}
}

#[cfg(test)]
mod ct_layout {
    #[test]
    fn conntrack_types_have_no_padding() {
        assert_eq!(core::mem::size_of::<super::CtKey>(), 44);
        assert_eq!(core::mem::size_of::<super::CtValue>(), 48);
    }
}
