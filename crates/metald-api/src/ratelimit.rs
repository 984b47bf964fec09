//! Per-customer request rate at the API door: one token bucket per
//! customer (`rate` tokens a second, at most `burst` banked). Transport
//! policy only: what a customer may do is the core service's business.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets beyond this many are pruned of the full ones (customers idle
/// long enough to have refilled), so the map cannot grow without bound.
const PRUNE_ABOVE: usize = 10_000;

/// A request rate limit shared by every connection.
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    /// `rate` requests a second with bursts of `burst`; both must be
    /// positive and finite.
    pub fn new(rate: f64, burst: u32) -> Result<RateLimiter, String> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("rate must be a positive number, got {rate}"));
        }
        if burst == 0 {
            return Err("burst must be at least 1".into());
        }
        Ok(RateLimiter {
            rate,
            burst: f64::from(burst),
            buckets: Mutex::new(HashMap::new()),
        })
    }

    /// The configured rate, requests a second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Takes one request from `customer`'s bucket, or says how long until
    /// one is there.
    pub fn take(&self, customer: &str) -> Result<(), Duration> {
        self.take_at(customer, Instant::now())
    }

    fn take_at(&self, customer: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(b, now, rate, burst) < burst);
        }
        let b = buckets.entry(customer.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = refill(b, now, self.rate, self.burst);
        b.tokens = tokens;
        b.at = now;
        if tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }
}

fn refill(b: &Bucket, now: Instant, rate: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
    (b.tokens + elapsed * rate).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_and_customers_apart() {
        let l = RateLimiter::new(2.0, 3).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(l.take_at("a", t0).is_ok());
        }
        let wait = l.take_at("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500));
        assert!(l.take_at("b", t0).is_ok(), "another customer is unaffected");
        assert!(l.take_at("a", t0 + Duration::from_millis(500)).is_ok());
        assert!(l.take_at("a", t0 + Duration::from_millis(500)).is_err());
        // Idle for long: the bucket holds at most the burst.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(l.take_at("a", later).is_ok());
        }
        assert!(l.take_at("a", later).is_err());
    }

    #[test]
    fn bad_settings_are_refused() {
        assert!(RateLimiter::new(0.0, 1).is_err());
        assert!(RateLimiter::new(f64::NAN, 1).is_err());
        assert!(RateLimiter::new(1.0, 0).is_err());
    }
}
