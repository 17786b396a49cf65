//! calico-kube-controllers: keeps the etcd datastore in step with the Kubernetes API, as
//! upstream's controllers do in etcd mode.
//!
//! * [`mirror`]: Namespaces → `kns.*` Profiles, ServiceAccounts → `ksa.*` Profiles,
//!   NetworkPolicies → `knp.default.*` NetworkPolicies (one generic controller; the objects are
//!   built by `calico_model::k8s`, the code `calicoctl convert` uses).
//! * [`pods`]: pod labels and service accounts onto their WorkloadEndpoints, and IPAM garbage
//!   collection of addresses whose pod is gone.
//! * [`nodes`]: a deleted Node's addresses, blocks, affinities and endpoints released.
//! * [`writes`]: the datastore side every controller shares (write only what differs).
//!
//! Each controller lists first and reconciles what etcd holds against the list (a full resync:
//! what the API no longer has is removed), then follows the watch.

pub mod config;
pub mod health;
pub mod lease;
pub mod metrics;
pub mod mirror;
pub mod nodes;
pub mod pods;
pub mod writes;
