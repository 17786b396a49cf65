//! The routes the agent owns (a /32 or /128 per local workload through its veth, a blackhole
//! per affine block), kept by a task of their own: the driver publishes the desired set, the
//! task brings the kernel to it on every change and every refresh. A full reconcile dumps the
//! routing table and waits on the kernel's RTNL lock; none of that happens on the loop that
//! applies policy.

use std::{collections::BTreeSet, time::Duration};

use tokio::sync::watch;

use crate::netlink::{Netlink, OwnedRoute};

/// What the routes should be.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredRoutes {
    pub routes: BTreeSet<OwnedRoute>,
    /// Interfaces whose `proto boot` routes are the agent's (its workload veths).
    pub workload_interfaces: BTreeSet<u32>,
    /// False until the first complete snapshot is programmed: until then nothing is removed
    /// (a restarted agent must not take away the routes its workloads are using).
    pub complete: bool,
}

/// Starts the task; it ends when the sender is dropped.
pub fn spawn(netlink: Netlink, refresh: Duration) -> watch::Sender<DesiredRoutes> {
    let (tx, mut rx) = watch::channel(DesiredRoutes::default());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(refresh);
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { return },
                _ = tick.tick() => {}
            }
            let desired = rx.borrow_and_update().clone();
            reconcile(&netlink, &desired).await;
        }
    });
    tx
}

async fn reconcile(netlink: &Netlink, desired: &DesiredRoutes) {
    let actual: BTreeSet<OwnedRoute> = match netlink
        .owned_routes(|i| desired.workload_interfaces.contains(&i))
        .await
    {
        Ok(r) => r.into_iter().collect(),
        Err(e) => {
            tracing::warn!(error = %e, "listing routes");
            return;
        }
    };
    if desired.complete {
        for r in actual.difference(&desired.routes) {
            tracing::info!(route = ?r, "removing a route nothing needs");
            if let Err(e) = netlink.delete(r).await {
                tracing::warn!(error = %e, "route removal");
            }
        }
    }
    for r in desired.routes.difference(&actual) {
        if let Err(e) = netlink.replace(r).await {
            tracing::warn!(route = ?r, error = %e, "route");
        }
    }
}
