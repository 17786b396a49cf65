//! Calico's policy semantics as pure functions (no I/O, no kernel):
//!
//! * [`World`] holds what the calculation needs: endpoints with their labels and addresses,
//!   namespaces, network sets, tiers, policies and profiles.
//! * [`World::program`] works out, for one endpoint and direction, which tiers and policies
//!   apply and in what order (tiers by order then name; policies by order then name), followed
//!   by the endpoint's profiles. This is the calculation the agent keeps up to date.
//! * [`evaluate`] is the reference evaluator: the verdict and deciding rule for one packet,
//!   with Calico's semantics (Allow and Deny decide; Pass leaves the tier; Log continues; a
//!   tier whose policies select the endpoint but decide nothing drops, unless its default
//!   action is Pass; profiles come after all tiers; nothing applied at all means drop). The
//!   eBPF dataplane's compiled tables are checked against it packet by packet.

mod compile;
mod eval;
mod program;
#[cfg(feature = "testing")]
pub mod testing;
mod world;

pub use compile::{range_to_prefixes, Cell, CompileError, CompiledProgram, PeerSet, MAX_PEER_SETS};
pub use eval::{evaluate, Direction, Packet, RuleRef, Verdict};
pub use program::{PolicyProgram, ProgramPolicy, ProgramTier};
pub use world::{
    named_port_scope, namespace_of_profile, staged_name, EndpointId, EndpointInfo, EndpointLabels,
    IpSetSource, Item, LabelSet, NamedPort, NamedPortKey, NamedPortMembers, NetworkSetInfo,
    PolicyInfo, PolicyKey, Rules, SelectorScope, StagedPolicy, World, NAMESPACE_PROFILE_PREFIX,
};
