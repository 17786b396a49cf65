//! calico-node end to end: a real etcd, network namespaces, BPF, BIRD and dockerd.
//! (one test binary: linking one per file dominated the test run's build time)

mod agent;
mod docker;
mod hostendpoint;
mod kubernetes;
mod multihost;
