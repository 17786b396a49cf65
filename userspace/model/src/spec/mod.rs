//! The `spec` of every kind, with Calico's exact (camelCase) field names. Optional fields stay
//! `Option` so a document reads back exactly as written; defaults are applied where they are
//! used (see the `*_or_default` helpers), as upstream's clients do.

mod config;
mod endpoint;
mod ipam;
mod network;
mod policy;
mod qos;

pub use config::*;
pub use endpoint::*;
pub use ipam::*;
pub use network::*;
pub use policy::*;
pub use qos::*;
