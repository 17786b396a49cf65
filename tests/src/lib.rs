//! Test harness: throwaway network namespaces and veth pairs, commands run inside them, and a real
//! etcd on a free loopback port. Everything a harness object creates is removed when it drops,
//! including when the test that owns it panics.

mod etcd;
mod netns;
mod requirements;

pub use etcd::{Etcd, TlsFiles};
pub use netns::{unique_name, NetNs, Veth};
pub use requirements::{require, Requirement};
