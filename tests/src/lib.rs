//! Test harness: throwaway network namespaces and veth pairs, commands run inside them, and a real
//! etcd on a free loopback port. Everything a harness object creates is removed when it drops,
//! including when the test that owns it panics.

mod agent;
mod cni;
mod etcd;
mod forward;
pub mod http;
mod image;
mod kube;
mod kubelet;
mod netns;
mod reach;
mod requirements;
mod store;

pub use agent::{AgentProcess, Workload, HEALTH_PORT};
pub use cni::{cni, cni_conf, cni_plugin_dir, cni_with_args, cni_with_conf};
pub use etcd::{Etcd, TlsFiles};
pub use forward::Forward;
pub use image::busybox_rootfs_tar;
pub use kube::{
    first_address, kubernetes_bin_dir, KubeApiServer, KubeCluster, KubeControllers, KubePod,
    ALL_KUBE_CONTROLLERS, KUBE_POOL,
};
pub use kubelet::{Kubelet, KUBELET_IMAGE};
pub use netns::{unique_name, NetNs, TcpServer, Veth};
pub use reach::{print_reach_matrix, reach_matrix, wait_reach_matrix};
pub use requirements::{require, Requirement};
pub use store::Store;

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Tests in one binary run two at a time. A test that loads the whole kernel for seconds (a
/// burst of hundreds of interfaces holds the RTNL lock that every netlink change and many dumps
/// take) would make the others' waits time out, so it runs alone: it takes [`alone`], every
/// other test of its binary [`beside_others`].
static KERNEL_LOAD: RwLock<()> = RwLock::new(());

pub fn alone() -> RwLockWriteGuard<'static, ()> {
    KERNEL_LOAD.write().unwrap_or_else(|e| e.into_inner())
}

pub fn beside_others() -> RwLockReadGuard<'static, ()> {
    KERNEL_LOAD.read().unwrap_or_else(|e| e.into_inner())
}
