//! The IPAM objects. Their JSON matches what upstream stores under `/calico/ipam/v2/`, so the
//! same structs serve the v3 resources and the etcd values.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One allocation's owner: the IPAM handle and free-form attributes (pod, namespace, node).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocationAttribute {
    #[serde(default, rename = "handle_id", skip_serializing_if = "Option::is_none")]
    pub handle_id: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secondary: BTreeMap<String, String>,
}

/// Spec of an IPAMBlock: one block of a pool, its affinity, and who holds each address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamBlockSpec {
    pub cidr: String,
    /// `host:<node>` when the block is affine to a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_claim_time: Option<String>,
    #[serde(default)]
    pub strict_affinity: bool,
    /// One slot per address of the block: index into `attributes`, or `null` when free.
    #[serde(default)]
    pub allocations: Vec<Option<usize>>,
    /// Ordinals of the free addresses, in the order they will be handed out.
    #[serde(default)]
    pub unallocated: Vec<usize>,
    #[serde(default)]
    pub attributes: Vec<AllocationAttribute>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence_number: Option<u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sequence_number_for_allocation: BTreeMap<String, u64>,
    #[serde(default)]
    pub deleted: bool,
}

/// Spec of a BlockAffinity: a node's claim on a block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlockAffinitySpec {
    /// `pending`, `confirmed` or `pendingDeletion`.
    pub state: String,
    pub node: String,
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deleted: Option<String>,
}

/// Spec of an IPAMHandle: which blocks hold how many addresses for one owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamHandleSpec {
    #[serde(rename = "handleID")]
    pub handle_id: String,
    /// Block CIDR → number of addresses held there.
    #[serde(default)]
    pub block: BTreeMap<String, usize>,
    #[serde(default)]
    pub deleted: bool,
}

/// Spec of the IPAMConfig singleton (`default`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConfigSpec {
    #[serde(default)]
    pub strict_affinity: bool,
    #[serde(default = "default_true")]
    pub auto_allocate_blocks: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_blocks_per_host: Option<i64>,
}

fn default_true() -> bool {
    true
}
