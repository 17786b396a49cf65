//! calico-node's allocator settings (mimalloc, see `main.rs`).

use libmimalloc_sys::{mi_option_get, mi_option_set, mi_option_t};

/// mimalloc's `mi_option_purge_delay` (the same in its v2 and v3 enums; libmimalloc-sys
/// exports no constant for it).
const MI_OPTION_PURGE_DELAY: mi_option_t = 15;

/// Freed pages go back to the system at once instead of a second later (mimalloc v3's
/// default, the version this build links), and then only when the thread that freed them
/// allocates again: the agent's update loop, compiles and snapshot decoding run
/// on threads that then sit idle, and with the delay their freed pages stayed resident (`bench
/// agent`: 92–113 MiB after the run with the delay, 73 MiB without). An operator's
/// `MIMALLOC_PURGE_DELAY` wins.
pub fn purge_freed_memory_at_once() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one of mimalloc's options; no other precondition.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
}

/// The purge delay mimalloc uses now, in milliseconds.
// `c_long` is `i64` here but not on every target.
#[allow(clippy::useless_conversion)]
pub fn purge_delay_ms() -> i64 {
    // SAFETY: reads one of mimalloc's options.
    i64::from(unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_option_set_is_the_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // mimalloc v3's default purge delay (1,000 ms; v2's is 10): a wrong index reads
        // another option's value.
        assert_eq!(super::purge_delay_ms(), 1000);
        super::purge_freed_memory_at_once();
        assert_eq!(super::purge_delay_ms(), 0);
    }
}
