//! The policy classifiers of the calico eBPF dataplane (`policy_ingress`, `policy_egress`), with
//! their maps. The source filter is a separate object (`source_filter.rs`).
#![no_std]
#![no_main]

mod policy;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
