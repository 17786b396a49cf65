//! Test harness: throwaway network namespaces and veth pairs, commands run inside them, and a real
//! etcd on a free loopback port. Everything a harness object creates is removed when it drops,
//! including when the test that owns it panics.

mod agent;
mod cni;
mod etcd;
mod forward;
pub mod http;
mod image;
mod netns;
mod requirements;
mod store;

pub use agent::{AgentProcess, Workload, HEALTH_PORT};
pub use cni::{cni, cni_plugin_dir};
pub use etcd::{Etcd, TlsFiles};
pub use forward::Forward;
pub use image::busybox_rootfs_tar;
pub use netns::{unique_name, NetNs, TcpServer, Veth};
pub use requirements::{require, Requirement};
pub use store::Store;
