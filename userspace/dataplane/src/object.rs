/// The TC programs' eBPF object, embedded at build time (see build.rs for where it comes from).
pub static TC_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/calico_tc.o"));
