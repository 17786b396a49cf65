//! One active instance: a `coordination.k8s.io/v1` Lease, taken and renewed as client-go's
//! leader election does. Expiry is judged by this process's own clock (how long the record
//! has gone unchanged since it was first seen so), never by comparing clocks across machines.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    api::{Api, PostParams},
    Client,
};

#[derive(Debug, Clone)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a holder that stopped renewing keeps the lease.
    pub duration: Duration,
    /// How often the holder renews (and a waiting instance looks).
    pub retry: Duration,
}

/// What a look at the lease decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Ours to take or renew.
    Take,
    /// Someone else's, still live.
    Wait,
}

/// Whether `me` may take the lease whose holder is `holder`, whose record has not changed
/// for `unchanged_for`.
pub fn decide(
    holder: Option<&str>,
    me: &str,
    unchanged_for: Duration,
    duration: Duration,
) -> Verdict {
    match holder {
        None | Some("") => Verdict::Take,
        Some(h) if h == me => Verdict::Take,
        Some(_) if unchanged_for >= duration => Verdict::Take,
        Some(_) => Verdict::Wait,
    }
}

pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The record last seen (resourceVersion) and when it was first seen.
    observed: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            observed: None,
        }
    }

    /// Returns once this instance holds the lease.
    pub async fn acquire(&mut self) {
        loop {
            match self.try_take().await {
                Ok(true) => {
                    tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "leading");
                    return;
                }
                Ok(false) => {
                    tracing::debug!(lease = %self.settings.name, "held by another instance; following")
                }
                Err(e) => {
                    tracing::warn!(lease = %self.settings.name, error = %e, "lease not reachable; retrying")
                }
            }
            tokio::time::sleep(self.settings.retry).await;
        }
    }

    /// Renews until a renewal has failed for a whole lease duration (another instance may
    /// have taken over by then): returns, and the caller must stop acting.
    pub async fn hold(&mut self) {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.settings.retry).await;
            match self.try_take().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.settings.name, "the lease was taken by another instance");
                    return;
                }
                Err(e) => {
                    tracing::warn!(lease = %self.settings.name, error = %e, "renewing the lease failed")
                }
            }
            if last_renewal.elapsed() >= self.settings.duration {
                tracing::error!(lease = %self.settings.name, "could not renew the lease in time");
                return;
            }
        }
    }

    /// One attempt to take or renew. `Ok(false)`: someone else holds it.
    async fn try_take(&mut self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let me = self.settings.identity.clone();
        let duration_secs = i32::try_from(self.settings.duration.as_secs()).unwrap_or(i32::MAX);
        let current = self.api.get_opt(&self.settings.name).await?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let first_seen = match &self.observed {
            Some((v, at)) if *v == version => *at,
            _ => {
                self.observed = Some((version, Instant::now()));
                Instant::now()
            }
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone();
        if decide(
            holder.as_deref(),
            &me,
            first_seen.elapsed(),
            self.settings.duration,
        ) == Verdict::Wait
        {
            return Ok(false);
        }
        if holder.as_deref() != Some(me.as_str()) {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(me);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(duration_secs);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_lease_of_another_waits_an_expired_or_own_one_is_taken() {
        let d = Duration::from_secs(15);
        assert_eq!(decide(None, "a", Duration::ZERO, d), Verdict::Take);
        assert_eq!(decide(Some("a"), "a", Duration::ZERO, d), Verdict::Take);
        assert_eq!(
            decide(Some("b"), "a", Duration::from_secs(14), d),
            Verdict::Wait
        );
        assert_eq!(
            decide(Some("b"), "a", Duration::from_secs(15), d),
            Verdict::Take
        );
    }
}
