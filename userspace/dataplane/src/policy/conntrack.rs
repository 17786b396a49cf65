//! The conntrack table as userspace sees it: listing, expiry by idle time, clearing.

use std::{
    net::IpAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use aya::maps::{HashMap, Map, MapData};

use calico_bpf_common::{
    CtKey, CtValue, CONNTRACK_COUNTS_MAP, CONNTRACK_MAP, CT_ANSWERED, CT_FIN_HI, CT_FIN_LO, CT_RST,
};

use super::{map_err, PolicyDataplane};
use crate::{object::key_missing, DataplaneError};

/// How long an idle tracked flow is kept, by kind and TCP state (upstream Felix's BPF
/// conntrack defaults: `TCPSynSent`, `TCPEstablished`, `TCPFinsSeen`, `TCPResetSeen`, UDP,
/// ICMP, generic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConntrackTimeouts {
    /// TCP whose other side has not answered yet.
    pub tcp_syn_sent: std::time::Duration,
    pub tcp_established: std::time::Duration,
    /// TCP after a FIN from both sides.
    pub tcp_fins_seen: std::time::Duration,
    /// TCP after a reset.
    pub tcp_reset: std::time::Duration,
    pub udp: std::time::Duration,
    pub icmp: std::time::Duration,
    pub other: std::time::Duration,
}

impl Default for ConntrackTimeouts {
    fn default() -> Self {
        use std::time::Duration;
        Self {
            tcp_syn_sent: Duration::from_secs(20),
            tcp_established: Duration::from_secs(3600),
            tcp_fins_seen: Duration::from_secs(30),
            tcp_reset: Duration::from_secs(40),
            udp: Duration::from_secs(60),
            icmp: Duration::from_secs(5),
            other: Duration::from_secs(600),
        }
    }
}

impl ConntrackTimeouts {
    /// The idle time after which a flow of `protocol` in the state `flags` (`CT_*`) goes.
    pub fn of(&self, protocol: u32, flags: u32) -> std::time::Duration {
        match protocol {
            6 if flags & CT_RST != 0 => self.tcp_reset,
            6 if flags & (CT_FIN_LO | CT_FIN_HI) == (CT_FIN_LO | CT_FIN_HI) => self.tcp_fins_seen,
            6 if flags & CT_ANSWERED != 0 => self.tcp_established,
            6 => self.tcp_syn_sent,
            17 => self.udp,
            1 | 58 => self.icmp,
            _ => self.other,
        }
    }
}

/// One tracked flow, as userspace sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackedFlow {
    pub ifindex: u32,
    pub protocol: u8,
    pub addresses: (IpAddr, IpAddr),
    pub ports: (u16, u16),
    pub idle: std::time::Duration,
    /// TCP: both sides sent a FIN.
    pub closed: bool,
    /// TCP: a reset was seen.
    pub reset: bool,
    /// The side that did not open the flow has answered.
    pub answered: bool,
}

fn unmapped(a: [u8; 16]) -> IpAddr {
    let v6 = std::net::Ipv6Addr::from(a);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).expect("CLOCK_MONOTONIC");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

impl PolicyDataplane {
    /// Forgets every tracked flow.
    pub fn clear_conntrack(&mut self) -> Result<(), DataplaneError> {
        let keys: Vec<CtKey> = self
            .conntrack
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(CONNTRACK_MAP, "iterate"))?;
        for k in &keys {
            let _ = self.conntrack.remove(k);
        }
        let counted: Vec<u32> = self
            .conntrack_counts
            .keys()
            .filter_map(Result::ok)
            .collect();
        for ifindex in &counted {
            let _ = self.conntrack_counts.remove(ifindex);
        }
        Ok(())
    }

    /// Every tracked flow.
    pub fn tracked_flows(&self) -> Result<Vec<TrackedFlow>, DataplaneError> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for entry in self.conntrack.iter() {
            let (k, v) = entry.map_err(map_err(CONNTRACK_MAP, "iterate"))?;
            out.push(TrackedFlow {
                ifindex: k.ifindex,
                protocol: k.protocol as u8,
                addresses: (unmapped(k.addr_lo), unmapped(k.addr_hi)),
                ports: (k.port_lo, k.port_hi),
                idle: std::time::Duration::from_nanos(now.saturating_sub(v.last_seen_ns)),
                closed: v.flags & (CT_FIN_LO | CT_FIN_HI) == (CT_FIN_LO | CT_FIN_HI),
                reset: v.flags & CT_RST != 0,
                answered: v.flags & CT_ANSWERED != 0,
            });
        }
        Ok(out)
    }

    /// Removes flows idle longer than their timeout; returns how many.
    pub fn expire_conntrack(
        &mut self,
        timeouts: &ConntrackTimeouts,
    ) -> Result<usize, DataplaneError> {
        expire(
            &mut self.conntrack,
            &mut self.conntrack_counts,
            timeouts,
            &self.tracked_flows_seen,
        )
    }

    /// A second handle on the conntrack table for expiry elsewhere (a thread of its own: a
    /// walk over hundreds of thousands of flows must not hold up policy updates). Needs the
    /// maps pinned, as the agent has them; it reports into the same occupancy figure.
    pub fn conntrack_expirer(&self) -> Result<ConntrackExpirer, DataplaneError> {
        let dir = self.pin_path.as_ref().ok_or(DataplaneError::Layout(
            "conntrack expiry elsewhere needs the maps pinned".into(),
        ))?;
        let table = MapData::from_pin(dir.join(CONNTRACK_MAP))
            .and_then(Map::from_map_data)
            .and_then(HashMap::try_from)
            .map_err(map_err(CONNTRACK_MAP, "open a second handle"))?;
        let counts = MapData::from_pin(dir.join(CONNTRACK_COUNTS_MAP))
            .and_then(Map::from_map_data)
            .and_then(HashMap::try_from)
            .map_err(map_err(CONNTRACK_COUNTS_MAP, "open a second handle"))?;
        Ok(ConntrackExpirer {
            table,
            counts,
            seen: self.tracked_flows_seen.clone(),
        })
    }
}

/// Expires idle flows through its own handle on the (pinned) conntrack table.
pub struct ConntrackExpirer {
    table: HashMap<MapData, CtKey, CtValue>,
    counts: HashMap<MapData, u32, u32>,
    seen: Arc<AtomicUsize>,
}

impl ConntrackExpirer {
    /// Removes flows idle longer than their timeout; returns how many.
    pub fn expire(&mut self, timeouts: &ConntrackTimeouts) -> Result<usize, DataplaneError> {
        expire(&mut self.table, &mut self.counts, timeouts, &self.seen)
    }
}

/// One pass over `table`: idle flows go; `counts` gets how many each interface keeps (the
/// classifiers' running counts drift: evictions and lost increments), `seen` the total.
fn expire(
    table: &mut HashMap<MapData, CtKey, CtValue>,
    counts: &mut HashMap<MapData, u32, u32>,
    timeouts: &ConntrackTimeouts,
    seen: &AtomicUsize,
) -> Result<usize, DataplaneError> {
    let now = monotonic_ns();
    let mut stale = Vec::new();
    let mut total = 0;
    let mut kept: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for entry in table.iter() {
        let (k, v) = entry.map_err(map_err(CONNTRACK_MAP, "iterate"))?;
        total += 1;
        let limit = timeouts.of(k.protocol, v.flags);
        if now.saturating_sub(v.last_seen_ns) > limit.as_nanos() as u64 {
            stale.push(k);
        } else {
            *kept.entry(k.ifindex).or_default() += 1;
        }
    }
    let counted: Vec<u32> = counts.keys().filter_map(Result::ok).collect();
    for ifindex in counted {
        if !kept.contains_key(&ifindex) {
            let _ = counts.remove(&ifindex);
        }
    }
    for (ifindex, n) in &kept {
        let _ = counts.insert(ifindex, n, 0);
    }
    for k in &stale {
        match table.remove(k) {
            Ok(()) => {}
            Err(e) if key_missing(&e) => {}
            Err(source) => return Err(map_err(CONNTRACK_MAP, "remove")(source)),
        }
    }
    seen.store(total - stale.len().min(total), Ordering::Relaxed);
    Ok(stale.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use calico_bpf_common::CT_OPENED_BY_LO;
    use std::time::Duration;

    #[test]
    fn each_state_has_its_timeout() {
        let t = ConntrackTimeouts::default();
        let secs = |p, f| t.of(p, f).as_secs();
        assert_eq!(secs(6, 0), 20, "SYN sent");
        assert_eq!(
            secs(6, CT_OPENED_BY_LO),
            20,
            "SYN sent, opened from the low side"
        );
        assert_eq!(secs(6, CT_ANSWERED), 3600, "established");
        assert_eq!(
            secs(6, CT_ANSWERED | CT_FIN_LO),
            3600,
            "one FIN: still open"
        );
        assert_eq!(
            secs(6, CT_ANSWERED | CT_FIN_LO | CT_FIN_HI),
            30,
            "both FINs"
        );
        assert_eq!(secs(6, CT_ANSWERED | CT_RST), 40, "reset");
        assert_eq!(secs(6, CT_RST | CT_FIN_LO | CT_FIN_HI), 40, "reset wins");
        assert_eq!(secs(17, 0), 60);
        assert_eq!(secs(1, 0), 5);
        assert_eq!(secs(58, CT_ANSWERED), 5);
        assert_eq!(secs(132, 0), 600);
        assert_eq!(t.of(6, CT_RST), Duration::from_secs(40));
    }
}
