//! The userspace side of the calico eBPF dataplane: loads the TC programs built by
//! `cargo xtask build-ebpf`, attaches them to interfaces and keeps their maps in step with the
//! state computed above it.
//!
//! Attaching resolves interface names in the calling thread's network namespace; callers that
//! attach inside another namespace must do so from a thread that has switched into it.

mod error;
mod log_pump;
mod object;
mod policy;
mod source_filter;

pub use calico_bpf_common::VerdictEvent;
pub use error::DataplaneError;
pub use log_pump::{spawn_log_pump, ProgramLogger};
pub use object::{SOURCE_FILTER_OBJECT, TC_OBJECT};
pub use policy::{
    ConntrackExpirer, ConntrackTimeouts, Hook, PolicyCounters, PolicyDataplane, RuleCounter,
    TrackedFlow,
};
pub use source_filter::{
    tcx_programs, AttachMode, Direction, FilterCounters, LoadOptions, SourceFilter,
};
