//! The number of VMs a ListVms filter matches, kept between pages.
//!
//! ListVms reports the total of every page. Counting is a scan of the
//! customer's index entries (10,000 for a customer with 10,000 VMs) on
//! every page, while the page itself reads only its rows; so the count of
//! each (customer, state filter) is kept here once read, and every write
//! that changes a customer's rows (insert, state change, delete) drops that
//! customer's counts once it has committed.
//!
//! A count read while a write was under way must not be kept: each read
//! takes a [`Token`] (the customer's generation) before it counts and keeps
//! its result only if the generation is unchanged afterwards. Generations
//! come from one counter that never goes back, so a customer whose entry
//! was dropped cannot reappear with an old generation. The cache holds at
//! most [`MAX_ENTRIES`] counts; beyond that it is emptied (a new epoch), so
//! what clients send never grows it without a bound.
//!
//! A count kept by a reader whose snapshot preceded a write is dropped by
//! that write's drop; a page served in the instant between the write's
//! commit and its drop can pair the new rows with the count from just
//! before the write.

use std::collections::HashMap;
use std::sync::Mutex;

/// Counts kept at most, over all customers and filters.
const MAX_ENTRIES: usize = 10_000;

/// The state filter of a count: sorted, deduplicated state names.
pub(crate) type Filter = Vec<&'static str>;

/// What a reader saw before counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Token {
    epoch: u64,
    generation: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counts {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    epoch: u64,
    /// The source of generations; only grows.
    next: u64,
    entries: usize,
    customers: HashMap<String, Customer>,
}

#[derive(Debug, Default)]
struct Customer {
    generation: u64,
    counts: HashMap<Filter, i64>,
}

impl Counts {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kept count of `filter` for `customer`, or the token to keep one
    /// read now under.
    pub(crate) fn get(&self, customer: &str, filter: &Filter) -> Result<i64, Token> {
        let inner = self.lock();
        let c = inner.customers.get(customer);
        if let Some(n) = c.and_then(|c| c.counts.get(filter)) {
            return Ok(*n);
        }
        Err(Token {
            epoch: inner.epoch,
            generation: c.map_or(0, |c| c.generation),
        })
    }

    /// Keeps `n`, counted after `token` was taken, unless a write to the
    /// customer's rows began since.
    pub(crate) fn put(&self, customer: &str, filter: Filter, token: Token, n: i64) {
        let mut inner = self.lock();
        let generation = inner.customers.get(customer).map_or(0, |c| c.generation);
        if token.epoch != inner.epoch || token.generation != generation {
            return;
        }
        if inner.entries >= MAX_ENTRIES {
            inner.customers.clear();
            inner.entries = 0;
            inner.epoch += 1;
            return;
        }
        let c = inner.customers.entry(customer.to_owned()).or_default();
        if c.counts.insert(filter, n).is_none() {
            inner.entries += 1;
        }
    }

    /// Drops every count of `customer`: its rows are changing.
    pub(crate) fn invalidate(&self, customer: &str) {
        let mut inner = self.lock();
        inner.next += 1;
        let generation = inner.next;
        let c = inner.customers.entry(customer.to_owned()).or_default();
        let dropped = c.counts.len();
        c.counts.clear();
        c.generation = generation;
        inner.entries -= dropped;
        // A customer with no counts left keeps only its generation; bound
        // those too.
        if inner.customers.len() > MAX_ENTRIES {
            inner.customers.clear();
            inner.entries = 0;
            inner.epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Filter {
        Vec::new()
    }

    #[test]
    fn a_count_is_kept_until_the_customer_writes() {
        let c = Counts::default();
        let t = c.get("acme", &all()).unwrap_err();
        c.put("acme", all(), t, 3);
        assert_eq!(c.get("acme", &all()), Ok(3));
        c.invalidate("other");
        assert_eq!(c.get("acme", &all()), Ok(3), "another customer's write");
        c.invalidate("acme");
        assert!(c.get("acme", &all()).is_err());
    }

    #[test]
    fn a_count_read_across_a_write_is_not_kept() {
        let c = Counts::default();
        let t = c.get("acme", &all()).unwrap_err();
        c.invalidate("acme");
        c.put("acme", all(), t, 3);
        assert!(c.get("acme", &all()).is_err());
        // Also when the write dropped the customer's entry.
        let t = c.get("new", &all()).unwrap_err();
        c.invalidate("new");
        c.put("new", all(), t, 1);
        assert!(c.get("new", &all()).is_err());
    }

    #[test]
    fn filters_are_kept_apart() {
        let c = Counts::default();
        let running = vec!["running"];
        let t = c.get("acme", &running).unwrap_err();
        c.put("acme", running.clone(), t, 1);
        assert_eq!(c.get("acme", &running), Ok(1));
        assert!(c.get("acme", &all()).is_err());
    }

    #[test]
    fn the_cache_never_holds_more_than_its_bound() {
        let c = Counts::default();
        for i in 0..MAX_ENTRIES + 10 {
            let name = format!("c{i}");
            let t = c.get(&name, &all()).unwrap_err();
            c.put(&name, all(), t, 1);
        }
        assert!(c.lock().entries <= MAX_ENTRIES);
        for i in 0..MAX_ENTRIES + 10 {
            c.invalidate(&format!("w{i}"));
        }
        assert!(c.lock().customers.len() <= MAX_ENTRIES);
    }
}
