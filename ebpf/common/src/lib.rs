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
