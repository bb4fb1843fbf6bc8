//! The supervisor: enrol, then keep a stream to some controller open,
//! trying the controllers in turn with jittered, capped exponential backoff,
//! and keep upkeeping (and failing over) while no controller answers.

use std::time::{Duration, Instant};

use rand::Rng;

use super::Agent;
use super::enrol::enrol;
use super::session::{End, health_changed, woken};
use super::settings::AgentError;

impl Agent {
    /// Runs until the process ends: enrol if needed, then keep a stream to
    /// some controller open.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let mut attempt: u32 = 0;
        // Each agent starts at a replica of its own choosing: a fleet spreads
        // over every controller it lists, and a replica that goes takes only
        // its share along (the next attempt goes to the one after it).
        let mut next = rand::rng().random_range(0..self.settings.controllers.len().max(1));
        loop {
            if let Err(e) = enrol(&self.settings).await {
                match e {
                    AgentError::Unreachable(_) => {
                        tracing::warn!(site = %self.settings.site, error = %e, "enrolment failed; retrying")
                    }
                    other => return Err(other),
                }
            } else {
                let address = self.settings.controllers[next % self.settings.controllers.len().max(1)].clone();
                let started = Instant::now();
                match self.session(&address).await {
                    Ok(()) => {}
                    Err(End::Refused(reason)) => {
                        tracing::error!(site = %self.settings.site, controller = %address, reason, "refused by the controller");
                        attempt = attempt.max(16);
                    }
                    Err(End::Broken(reason)) => {
                        tracing::warn!(site = %self.settings.site, controller = %address, reason, "no stream; keeping the datapath as it is");
                    }
                }
                if started.elapsed() > Duration::from_secs(10) {
                    attempt = 0;
                }
                next += 1;
            }
            // Headless between attempts, but still upkeeping.
            let until = tokio::time::Instant::now() + self.backoff(attempt);
            let changed = self.prober.as_ref().map(|p| p.changed.clone());
            let mut last = tokio::time::Instant::now();
            while let Some(period) = self.settings.upkeep {
                let now = tokio::time::Instant::now();
                if now >= until {
                    break;
                }
                // Failover goes on without a controller.
                let upkeep_at = last + period;
                tokio::select! {
                    _ = tokio::time::sleep_until(upkeep_at.min(until)) => {
                        if tokio::time::Instant::now() >= upkeep_at {
                            self.refresh_hops();
                            self.upkeep();
                            last = tokio::time::Instant::now();
                        }
                    }
                    _ = health_changed(&changed) => {
                        self.probed();
                    }
                    _ = woken(self.wake_at) => {
                        self.probed();
                    }
                }
            }
            tokio::time::sleep_until(until).await;
            attempt = attempt.saturating_add(1);
        }
    }

    /// The wait before the next attempt, jittered by this process's RNG.
    fn backoff(&self, attempt: u32) -> Duration {
        let backoff = Backoff { initial: self.settings.backoff_initial, max: self.settings.backoff_max };
        backoff.delay(attempt, rand::rng().random_range(0.0..1.0))
    }
}

/// Jittered, capped exponential backoff. Pure: the jitter is an argument,
/// so a test scripts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Backoff {
    /// `initial × 2^attempt`, at most `max`, times a factor in [0.5, 1.5)
    /// chosen by `jitter` in [0, 1): agents that lost the same controller
    /// do not all come back at once.
    pub fn delay(&self, attempt: u32, jitter: f64) -> Duration {
        let base = self.initial.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        base.mul_f64(0.5 + jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_jittered_both_ways() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(10) };
        assert_eq!(b.delay(0, 0.5), Duration::from_millis(100));
        assert_eq!(b.delay(3, 0.5), Duration::from_millis(800));
        assert_eq!(b.delay(30, 0.5), Duration::from_secs(10), "capped, and no overflow at large attempts");
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(400));
        assert!(b.delay(3, 0.999) > Duration::from_millis(1190));
        assert_eq!(b.delay(3, 7.0), b.delay(3, 1.0), "jitter out of range is clamped");
    }
}
