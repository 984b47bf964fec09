//! The VMs this run made, as last seen, and the names it tried to create
//! without learning whether metald made them (every one is deleted at the
//! end either way).

use std::collections::{BTreeMap, BTreeSet};

use crate::plan::Seen;

#[derive(Debug, Clone, Copy)]
pub struct Vm {
    pub customer: usize,
    pub seen: Seen,
}

#[derive(Debug, Default)]
pub struct Fleet {
    prefix: String,
    customers: usize,
    next: u64,
    pub vms: BTreeMap<String, Vm>,
    /// Creates whose outcome is unknown (a transport error or a deadline).
    pub maybe: BTreeSet<(usize, String)>,
    pub created: u64,
    pub deleted: u64,
}

impl Fleet {
    /// VM names are `<prefix>-<n>`; customers are taken in turn.
    pub fn new(prefix: String, customers: usize) -> Fleet {
        Fleet {
            prefix,
            customers,
            ..Default::default()
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A fresh name and the customer that will own it.
    pub fn new_name(&mut self) -> (String, usize) {
        self.next += 1;
        let customer = (self.next as usize - 1) % self.customers;
        let name = format!("{}-{}", self.prefix, self.next);
        self.maybe.insert((customer, name.clone()));
        (name, customer)
    }

    pub fn customer_of(&self, name: &str) -> Option<usize> {
        self.vms.get(name).map(|v| v.customer)
    }

    /// Records what metald answered about `name`: its state, or gone.
    pub fn set(&mut self, customer: usize, name: &str, seen: Option<Seen>) {
        let known = self.maybe.remove(&(customer, name.to_owned()));
        match seen {
            Some(seen) => {
                if self
                    .vms
                    .insert(name.to_owned(), Vm { customer, seen })
                    .is_none()
                    && known
                {
                    self.created += 1;
                }
            }
            None => {
                if self.vms.remove(name).is_some() {
                    self.deleted += 1;
                }
            }
        }
    }

    /// A create metald refused outright: no VM exists under `name`.
    pub fn refused(&mut self, customer: usize, name: &str) {
        self.maybe.remove(&(customer, name.to_owned()));
    }

    /// The state of every VM, for the plan.
    pub fn seen(&self) -> BTreeMap<String, Seen> {
        self.vms.iter().map(|(n, v)| (n.clone(), v.seen)).collect()
    }

    /// (running or paused, stopped, created).
    pub fn counts(&self) -> (usize, usize, usize) {
        let n = |f: fn(Seen) -> bool| self.vms.values().filter(|v| f(v.seen)).count();
        (
            n(|s| matches!(s, Seen::Running | Seen::Paused)),
            n(|s| s == Seen::Stopped),
            n(|s| s == Seen::Created),
        )
    }

    /// Everything that may exist: known VMs and unknown creates.
    pub fn everything(&self) -> Vec<(usize, String, bool)> {
        let known = self.vms.iter().map(|(n, v)| (v.customer, n.clone(), false));
        let maybe = self.maybe.iter().map(|(c, n)| (*c, n.clone(), true));
        known.chain(maybe).collect()
    }
}
