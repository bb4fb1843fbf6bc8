//! The supervisor: enrol, then keep a stream to some controller open,
//! trying the controllers in turn with jittered, capped exponential backoff,
//! and keep upkeeping (and failing over) while no controller answers.

use std::time::{Duration, Instant};

use rand::Rng;

use super::Agent;
use super::enrol::enrol;
use super::session::End;
use super::settings::AgentError;

impl Agent {
    /// Runs until the process ends: enrol if needed, then keep a stream to
    /// some controller open.
    pub async fn run(mut self) -> Result<(), AgentError> {
        let mut attempt: u32 = 0;
        // Each agent starts at a replica of its own choosing: a fleet spreads
        // over every controller it lists, and a replica that goes takes only
        // its share along, spread over the others (`next_controller`).
        let replicas = self.settings.controllers.len().max(1);
        let mut next = rand::rng().random_range(0..replicas);
        loop {
            if let Err(e) = enrol(&self.settings).await {
                match e {
                    AgentError::Unreachable(_) => {
                        tracing::warn!(site = %self.settings.site, error = %e, "enrolment failed; retrying")
                    }
                    other => return Err(other),
                }
            } else {
                let address = self.settings.controllers[next % replicas].clone();
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
                next = next_controller(next, replicas, rand::rng().random_range(0.0..1.0));
            }
            // Headless between attempts, but still upkeeping.
            let until = tokio::time::Instant::now() + self.backoff(attempt);
            let mut last = tokio::time::Instant::now();
            while let Some(period) = self.settings.upkeep {
                let now = tokio::time::Instant::now();
                if now >= until {
                    break;
                }
                // Failover goes on without a controller.
                let upkeep_at = last + period;
                self.failing_over(tokio::time::sleep_until(upkeep_at.min(until))).await;
                if tokio::time::Instant::now() >= upkeep_at {
                    self.refresh_hops();
                    self.upkeep();
                    last = tokio::time::Instant::now();
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

/// The replica to try after `current` (of `replicas`): one of the others,
/// chosen by `random` in [0, 1). Not simply the next one: the agents of a
/// replica that went would all land on the same survivor (at 2,000 sites on
/// three replicas, the killed one's 687 agents all went to one, which then
/// served 1,368 while another served 634).
pub fn next_controller(current: usize, replicas: usize, random: f64) -> usize {
    if replicas <= 1 {
        return 0;
    }
    let others = replicas - 1;
    let pick = ((random * others as f64) as usize).min(others - 1);
    (current % replicas + 1 + pick) % replicas
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

    /// An agent that lost its replica goes to one of the others, never the
    /// same, and the agents of one lost replica spread over all the others.
    #[test]
    fn the_next_replica_is_another_one_chosen_at_random() {
        assert_eq!(next_controller(0, 1, 0.7), 0, "one replica: it again");
        for current in 0..3 {
            let picks: std::collections::BTreeSet<usize> =
                (0..100).map(|i| next_controller(current, 3, f64::from(i) / 100.0)).collect();
            let others: std::collections::BTreeSet<usize> = (0..3).filter(|r| *r != current).collect();
            assert_eq!(picks, others, "from replica {current}");
        }
        // Evenly: 300 agents of replica 2, 150 to each of the other two.
        let to_zero = (0..300).filter(|i| next_controller(2, 3, f64::from(*i) / 300.0) == 0).count();
        assert_eq!(to_zero, 150);
        assert!(next_controller(4, 5, 0.999_999) < 5);
    }

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
