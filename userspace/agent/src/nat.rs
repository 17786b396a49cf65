//! natOutgoing: traffic from an IPPool with `natOutgoing: true` to a destination outside every
//! pool leaves with the node's address (or FelixConfiguration `natOutgoingAddress`), as
//! upstream's `cali-nat-outgoing` chain does; pool-to-pool traffic is untouched.
//!
//! Done with nftables rather than in BPF: traffic that leaves the node is not redirected by
//! the classifiers (they short-circuit only local endpoint to local endpoint), so it crosses
//! netfilter's postrouting hook anyway, and netfilter's NAT brings port allocation, reverse
//! translation of replies and ICMP errors, and expiry with its conntrack for nothing. SNAT in
//! BPF would duplicate all of that in the classifiers' own conntrack.
//!
//! The agent owns one table, `inet calico`, replaced whole in one `nft -f` transaction
//! whenever what it should hold changes and again every refresh (another tool flushing it is
//! undone). Applying it runs `nft` on a blocking thread, never on the loop that applies policy.

use std::{
    collections::BTreeSet,
    io::Write,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::Duration,
};

use ipnet::IpNet;
use tokio::sync::watch;

/// The table the agent owns.
pub const TABLE: &str = "calico";

/// What natOutgoing should do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredNat {
    /// Pools whose traffic is masqueraded (`natOutgoing: true`).
    pub masquerade: BTreeSet<IpNet>,
    /// Every pool: destinations inside them are not NATed.
    pub pools: BTreeSet<IpNet>,
    /// `natOutgoingAddress`: SNAT to it instead of the outgoing interface's address (IPv4).
    pub address: Option<Ipv4Addr>,
    /// False until the first complete snapshot: until then the table is left as it is (a
    /// restarted agent must not cut its workloads' outgoing connections).
    pub complete: bool,
}

/// The nftables script that makes the table what `desired` says: created if missing, deleted
/// and defined again, all in one transaction (no moment without NAT for existing pools).
pub fn ruleset(desired: &DesiredNat) -> String {
    let mut out = format!("table inet {TABLE}\ndelete table inet {TABLE}\n");
    if desired.masquerade.is_empty() {
        return out;
    }
    let elements = |v4: bool, nets: &BTreeSet<IpNet>| -> String {
        let listed: Vec<String> = nets
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)) == v4)
            .map(|n| n.trunc().to_string())
            .collect();
        if listed.is_empty() {
            String::new()
        } else {
            format!(" elements = {{ {} }};", listed.join(", "))
        }
    };
    out.push_str(&format!("table inet {TABLE} {{\n"));
    for (family, v4) in [("v4", true), ("v6", false)] {
        let kind = if v4 { "ipv4_addr" } else { "ipv6_addr" };
        for (set, nets) in [("masq", &desired.masquerade), ("pools", &desired.pools)] {
            out.push_str(&format!(
                "  set {set}-{family} {{ type {kind}; flags interval; auto-merge;{} }}\n",
                elements(v4, nets)
            ));
        }
    }
    let v4_action = match desired.address {
        Some(a) => format!("snat ip to {a}"),
        None => "masquerade".to_owned(),
    };
    out.push_str(&format!(
        "  chain nat-outgoing {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr @masq-v4 ip daddr != @pools-v4 {v4_action}\n    ip6 saddr @masq-v6 ip6 daddr != @pools-v6 masquerade\n  }}\n}}\n"
    ));
    out
}

/// Starts the task; it ends when the sender is dropped.
pub fn spawn(refresh: Duration) -> watch::Sender<DesiredNat> {
    let (tx, mut rx) = watch::channel(DesiredNat::default());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(refresh);
        let mut applied: Option<DesiredNat> = None;
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            let desired = rx.borrow_and_update().clone();
            if !desired.complete {
                continue;
            }
            // Nothing to own and nothing applied yet: no table to make or remove.
            if applied.is_none() && desired.masquerade.is_empty() && !table_exists().await {
                applied = Some(desired);
                continue;
            }
            let script = ruleset(&desired);
            match tokio::task::spawn_blocking(move || nft(&script)).await {
                Ok(Ok(())) => {
                    if applied.as_ref() != Some(&desired) {
                        tracing::info!(pools = desired.masquerade.len(), address = ?desired.address, "natOutgoing programmed");
                    }
                    applied = Some(desired);
                }
                Ok(Err(e)) => tracing::error!(error = %e, "programming natOutgoing (nftables)"),
                Err(e) => tracing::error!(error = %e, "programming natOutgoing"),
            }
        }
    });
    tx
}

async fn table_exists() -> bool {
    tokio::task::spawn_blocking(|| {
        Command::new("nft")
            .args(["list", "table", "inet", TABLE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
    .await
    .unwrap_or(false)
}

/// Runs `script` through `nft -f -` (one transaction).
fn nft(script: &str) -> Result<(), String> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running nft: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("nft's stdin")?
        .write_all(script.as_bytes())
        .map_err(|e| format!("writing to nft: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft refused the ruleset: {}\n{script}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> BTreeSet<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn masquerades_pools_to_outside_every_pool() {
        let text = ruleset(&DesiredNat {
            masquerade: nets(&["10.65.0.0/16", "fd00:65::/64"]),
            pools: nets(&["10.65.0.0/16", "10.66.0.0/16", "fd00:65::/64"]),
            address: None,
            complete: true,
        });
        assert!(text.starts_with("table inet calico\ndelete table inet calico\n"));
        assert!(text.contains("set masq-v4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.65.0.0/16 }; }"), "{text}");
        assert!(text.contains("set pools-v4 { type ipv4_addr; flags interval; auto-merge; elements = { 10.65.0.0/16, 10.66.0.0/16 }; }"), "{text}");
        assert!(text.contains("set masq-v6 { type ipv6_addr; flags interval; auto-merge; elements = { fd00:65::/64 }; }"), "{text}");
        assert!(
            text.contains("ip saddr @masq-v4 ip daddr != @pools-v4 masquerade"),
            "{text}"
        );
        assert!(
            text.contains("type nat hook postrouting priority srcnat"),
            "{text}"
        );
    }

    #[test]
    fn nat_outgoing_address_and_nothing_to_masquerade() {
        let text = ruleset(&DesiredNat {
            masquerade: nets(&["10.65.0.0/16"]),
            pools: nets(&["10.65.0.0/16"]),
            address: Some("192.0.2.3".parse().unwrap()),
            complete: true,
        });
        assert!(
            text.contains("ip saddr @masq-v4 ip daddr != @pools-v4 snat ip to 192.0.2.3"),
            "{text}"
        );
        // An empty set is declared without elements.
        assert!(
            text.contains("set masq-v6 { type ipv6_addr; flags interval; auto-merge; }"),
            "{text}"
        );
        // No natOutgoing pool: the table goes.
        assert_eq!(
            ruleset(&DesiredNat {
                pools: nets(&["10.65.0.0/16"]),
                ..Default::default()
            }),
            "table inet calico\ndelete table inet calico\n"
        );
    }
}
