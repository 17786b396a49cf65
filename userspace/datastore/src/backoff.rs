//! The one retry pace of everything that waits for the datastore: exponential with jitter and
//! a cap (backon's), reset after a success.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays between attempts: `first`, then doubling up to `max`, each with random jitter so
/// many nodes retrying together spread out.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    last: Duration,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(first)
            .with_max_delay(max)
            .with_jitter()
            .without_max_times();
        Self {
            delays: builder.build(),
            builder,
            last: first,
        }
    }

    /// The next delay (never runs out).
    pub fn next_delay(&mut self) -> Duration {
        if let Some(d) = self.delays.next() {
            self.last = d;
        }
        self.last
    }

    /// Sleeps the next delay.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let (first, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(first, max);
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        // Jitter adds up to one more delay: the first is within [first, 2 first].
        assert!(delays[0] >= first && delays[0] <= 2 * first, "{delays:?}");
        assert!(delays.iter().all(|d| *d <= 2 * max), "{delays:?}");
        assert!(delays[11] >= max, "never reached the cap: {delays:?}");
        b.reset();
        assert!(b.next_delay() <= 2 * first);
    }
}
