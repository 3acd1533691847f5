//! Pauses between reconnection attempts: exponential backoff with jitter, so that a
//! fleet that lost its server (or its Redis) does not come back in step. Every
//! reconnect loop uses it: the Rust client's subscriptions, the sidecar's upstream
//! session and Publish relay, and each connection of the Redis bus.

use std::time::Duration;

/// How far a pause strays from its step, at random.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jitter {
    /// Between half the step and the whole step ("equal jitter").
    #[default]
    Equal,
    /// Between the step and half again: never shorter than the step.
    UpToHalfMore,
}

/// Attempt `n` (0 for the first) pauses for its step, `initial · 2ⁿ` but at most
/// `max`, spread by `jitter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The step of the first attempt.
    pub initial: Duration,
    /// The largest step.
    pub max: Duration,
    pub jitter: Jitter,
}

impl Default for Backoff {
    /// 100 ms doubling up to 5 s, equal jitter.
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(5))
    }
}

impl Backoff {
    /// From `initial` doubling up to `max`, with equal jitter.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            jitter: Jitter::Equal,
        }
    }

    pub const fn with_jitter(mut self, jitter: Jitter) -> Self {
        self.jitter = jitter;
        self
    }

    /// The step of attempt `attempt`, before jitter.
    pub fn step(&self, attempt: u32) -> Duration {
        self.initial
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.max)
            .max(self.initial.min(self.max))
    }

    /// The pause before attempt `attempt` (0 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let step = self.step(attempt);
        let spread = rand::random::<f64>();
        match self.jitter {
            Jitter::Equal => step / 2 + (step / 2).mul_f64(spread),
            Jitter::UpToHalfMore => step + step.mul_f64(spread * 0.5),
        }
    }

    /// A reconnect loop's count of attempts, starting at the first.
    pub fn attempts(self) -> Attempts {
        Attempts {
            backoff: self,
            attempt: 0,
        }
    }
}

/// The attempts of one reconnect loop: [`Attempts::next_pause`] before each retry,
/// [`Attempts::reset`] once connected.
#[derive(Debug, Clone)]
pub struct Attempts {
    backoff: Backoff,
    attempt: u32,
}

impl Attempts {
    /// The pause before the next attempt.
    pub fn next_pause(&mut self) -> Duration {
        let delay = self.backoff.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Connected: the next failure starts from the first step again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn equal_jitter_stays_between_half_the_step_and_the_step() {
        let backoff = Backoff::new(100 * MS, 2000 * MS);
        for attempt in 0..40 {
            let step = (100 * MS * (1 << attempt.min(5))).min(backoff.max);
            let delay = backoff.delay(attempt);
            assert!(delay <= step && delay >= step / 2, "{attempt}: {delay:?}");
        }
    }

    #[test]
    fn up_to_half_more_never_pauses_less_than_the_step() {
        let mut attempts = Backoff::new(50 * MS, 2000 * MS)
            .with_jitter(Jitter::UpToHalfMore)
            .attempts();
        let first = attempts.next_pause();
        assert!(first >= 50 * MS && first <= 75 * MS);
        let later: Vec<Duration> = (0..20).map(|_| attempts.next_pause()).collect();
        assert!(later.iter().all(|d| *d <= 3000 * MS));
        assert!(*later.last().unwrap() >= 2000 * MS);
        attempts.reset();
        assert!(attempts.next_pause() <= 75 * MS);
    }

    #[test]
    fn a_max_below_the_first_step_caps_it() {
        let backoff = Backoff::new(100 * MS, 40 * MS);
        assert_eq!(backoff.step(0), 40 * MS);
        assert_eq!(backoff.step(9), 40 * MS);
    }
}
