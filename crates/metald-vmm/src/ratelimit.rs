//! Rate limiters as Firecracker and Cloud Hypervisor both take them: a
//! token bucket for bandwidth (bytes) and one for operations.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One token bucket of a rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucket {
    /// Tokens (bytes or operations) per refill.
    pub size: u64,
    /// Extra tokens available once, at start.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

/// A device's rate limiter: bandwidth (bytes) and/or operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RateLimiter {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bandwidth: Option<TokenBucket>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// A drive's rate limit from its `options` (`rate_limit_bytes_per_sec`,
    /// `rate_limit_ops_per_sec`).
    pub fn from_options(options: &BTreeMap<String, String>) -> Result<Option<Self>, String> {
        let num = |k: &str| -> Result<u64, String> {
            options.get(k).map_or(Ok(0), |v| {
                v.parse()
                    .map_err(|_| format!("storage option {k}={v:?} is not a whole number"))
            })
        };
        let bytes = num("rate_limit_bytes_per_sec")?;
        let ops = num("rate_limit_ops_per_sec")?;
        if bytes == 0 && ops == 0 {
            return Ok(None);
        }
        let bucket = |size: u64| {
            (size > 0).then_some(TokenBucket {
                size,
                one_time_burst: None,
                refill_time: 1000,
            })
        };
        Ok(Some(RateLimiter {
            bandwidth: bucket(bytes),
            ops: bucket(ops),
        }))
    }

    /// A bandwidth limit of `bytes_per_sec` refilled every second; `None`
    /// for 0 (unlimited).
    pub fn bytes_per_sec(bytes_per_sec: u64) -> Option<Self> {
        (bytes_per_sec > 0).then_some(RateLimiter {
            bandwidth: Some(TokenBucket {
                size: bytes_per_sec,
                one_time_burst: None,
                refill_time: 1000,
            }),
            ops: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drive_options_become_rate_limiters_and_bad_ones_are_named() {
        let mut o = BTreeMap::new();
        assert_eq!(RateLimiter::from_options(&o), Ok(None));
        o.insert(
            "rate_limit_bytes_per_sec".to_string(),
            "1048576".to_string(),
        );
        let l = RateLimiter::from_options(&o).unwrap().unwrap();
        assert_eq!(l.bandwidth.unwrap().size, 1048576);
        assert_eq!(l.ops, None);
        o.insert("rate_limit_ops_per_sec".to_string(), "many".to_string());
        assert!(
            RateLimiter::from_options(&o)
                .unwrap_err()
                .contains("rate_limit_ops_per_sec")
        );
    }
}
