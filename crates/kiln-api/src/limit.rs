//! Per-account rate limit on submissions (kit orders, holds): a token bucket per account, in
//! memory (per process: N serve processes allow N times the rate — set it for one process of
//! N). Refused requests are 429 with `Retry-After` in whole seconds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_core::AccountId;

#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<AccountId, (f64, Instant)>>,
}

impl RateLimiter {
    /// `burst` at once, refilled at `per_minute`. A zero rate means no limit.
    pub fn new(burst: u32, per_minute: u32) -> RateLimiter {
        RateLimiter {
            burst: f64::from(burst.max(1)),
            per_second: f64::from(per_minute) / 60.0,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `account`, or says how long until one is there.
    pub fn take(&self, account: AccountId) -> Result<(), Duration> {
        self.take_at(account, Instant::now())
    }

    fn take_at(&self, account: AccountId, now: Instant) -> Result<(), Duration> {
        if self.per_second <= 0.0 {
            return Ok(());
        }
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Forget accounts whose bucket is full again, so the map stays small.
        if buckets.len() > 10_000 {
            let (burst, rate) = (self.burst, self.per_second);
            buckets.retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = buckets.entry(account).or_insert((self.burst, now));
        let refill = now.duration_since(*at).as_secs_f64() * self.per_second;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate() {
        let l = RateLimiter::new(3, 60);
        let a = AccountId::new();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take_at(a, t0).is_ok());
        }
        let wait = l.take_at(a, t0).expect_err("the fourth at once is refused");
        assert!((0.9..=1.0).contains(&wait.as_secs_f64()), "{wait:?}");
        // Another account has its own bucket.
        assert!(l.take_at(AccountId::new(), t0).is_ok());
        // One second later one more token is there, and only one.
        let t1 = t0 + Duration::from_secs(1);
        assert!(l.take_at(a, t1).is_ok());
        assert!(l.take_at(a, t1).is_err());
    }
}
