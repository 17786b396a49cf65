//! Integration tests of the dataplane, datastore, IPAM and the harness itself, against real kernels and a real etcd.
//! (one test binary: linking one per file dominated the test run's build time)

mod bpf_differential;
mod bpf_logging;
mod bpf_pins;
mod bpf_policy;
mod bpf_source_filter;
mod datastore_etcd;
mod etcd_harness;
mod harness_cleanup;
mod ipam_etcd;
