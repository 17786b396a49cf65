//! Block IPAM as Calico does it.
//!
//! Pools are cut into blocks (default /26 for IPv4, /122 for IPv6); a node claims blocks with
//! an affinity and hands out addresses from them, recording who holds each address (a handle
//! and attributes) in the block itself. When its blocks are full and the pools have no
//! unclaimed block left it borrows from other nodes' blocks, unless strict affinity is on.
//!
//! [`block`] and [`plan`] are pure (no I/O) and tested exhaustively; [`Ipam`] drives them over
//! the datastore, where every block and handle write is a compare-and-swap, so allocators on
//! several nodes never hand out one address twice.

mod allocator;
pub mod block;
pub mod plan;

pub use allocator::{AssignRequest, Ipam, IpamError};
