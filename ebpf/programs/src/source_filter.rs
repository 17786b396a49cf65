//! The source filter, an object of its own (only the tests and the source-filter API load it,
//! so loading it never creates the policy dataplane's maps).
//!
//! `source_filter` drops IPv4 and IPv6 packets whose source address falls in a prefix held in the
//! `SRC_DENY_V4` / `SRC_DENY_V6` LPM tries, and passes everything else on to the next program
//! (`TC_ACT_PIPE`, which TCX treats as "next").
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, TC_ACT_PIPE, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::{
        lpm_trie::{Key, LpmTrie},
        PerCpuArray,
    },
    programs::TcContext,
};
use aya_log_ebpf::debug;
use calico_bpf_common::{
    FilterStat, Ipv4KeyData, Ipv6KeyData, SourceDenyEntry, FILTER_STAT_COUNT, SRC_DENY_MAX_ENTRIES,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
};

#[map(name = "SRC_DENY_V4")]
static SRC_DENY_V4: LpmTrie<Ipv4KeyData, SourceDenyEntry> =
    LpmTrie::with_max_entries(SRC_DENY_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "SRC_DENY_V6")]
static SRC_DENY_V6: LpmTrie<Ipv6KeyData, SourceDenyEntry> =
    LpmTrie::with_max_entries(SRC_DENY_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "FILTER_STATS")]
static FILTER_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(FILTER_STAT_COUNT, 0);

const ETH_P_IP: u16 = EtherType::Ipv4 as u16;
const ETH_P_IPV6: u16 = EtherType::Ipv6 as u16;

#[classifier]
pub fn source_filter(ctx: TcContext) -> i32 {
    let verdict = match classify(&ctx) {
        Some(entry) => {
            debug!(&ctx, "source_filter: drop, deny rule {}", entry.rule_id);
            count(FilterStat::Dropped);
            TC_ACT_SHOT
        }
        None => {
            count(FilterStat::Passed);
            TC_ACT_PIPE
        }
    };
    verdict as i32
}

/// Returns the deny entry matching the packet's source, if any. Packets too short to parse, and
/// non-IP packets (ARP in particular), match nothing and pass.
#[inline(always)]
fn classify(ctx: &TcContext) -> Option<SourceDenyEntry> {
    let eth: EthHdr = ctx.load(0).ok()?;
    // `EtherType` discriminants are already in network byte order, like the wire field.
    match eth.ether_type {
        ETH_P_IP => {
            let ip: Ipv4Hdr = ctx.load(EthHdr::LEN).ok()?;
            SRC_DENY_V4.get(Key::new(32, ip.src_addr)).copied()
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Hdr = ctx.load(EthHdr::LEN).ok()?;
            SRC_DENY_V6.get(Key::new(128, ip.src_addr)).copied()
        }
        _ => None,
    }
}

#[inline(always)]
fn count(stat: FilterStat) {
    if let Some(counter) = FILTER_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, so no other CPU writes it concurrently.
        unsafe { *counter += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
