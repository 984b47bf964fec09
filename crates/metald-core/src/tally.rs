//! What every customer's VMs hold, kept up to date from the service's own
//! store writes, so admission costs the same with ten VMs or ten thousand.
//!
//! [`Tally`] wraps the store: every `insert`, `update` and `remove` goes
//! through it and, once the store has it, changes the tally under one
//! lock, so the tally is always what the rows say. It is filled from every
//! row on first use (and again after [`Tally::forget`], which start-up
//! recovery calls) and then never reads the store again. Plan progress and
//! reads pass straight through. One entry per VM row; nothing a request
//! controls makes it grow beyond the rows themselves.
//!
//! It also keeps every row itself ([`Records`]), so `get` and `find`
//! (GetVmInfo, and every lifecycle call's lookup) are answered from memory
//! without a trip to SQLite or decoding a spec, and ListVms asks SQLite
//! only for a page of keys. The copies change after the
//! store has the write and before the write returns, under a lock only
//! held for the change, so a read never waits for a write's fsync and no
//! caller sees a write acknowledged that reads do not show. Plan progress
//! goes through the same lock as every other write, so the copies see the
//! writes in the store's order.
//!
//! A fleet-wide store would answer these sums itself (fleet-wide quotas);
//! this one is for one host, where metald is the store's only writer.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;

use crate::plan::PlanRecord;
use crate::ports::{Store, StoreError, VmPage, VmRecord};
pub use crate::quota::Usage;
use crate::state::VmState;
use crate::vm::{CustomerId, VmId};

/// One row, as far as quotas and disk claims see it.
struct Entry {
    customer: CustomerId,
    /// The VM alone: `running` is 1 while its row says a VMM exists.
    usage: Usage,
    /// Its disks' paths, each with whether it is attached read-only.
    disks: Vec<(PathBuf, bool)>,
}

impl Entry {
    fn of(vm: &VmRecord) -> Entry {
        let mut usage = Usage::default();
        usage.add(&vm.spec, vm.state.has_process());
        Entry {
            customer: vm.customer.clone(),
            usage,
            disks: vm
                .spec
                .disks()
                .iter()
                .map(|d| (d.path.clone(), d.read_only))
                .collect(),
        }
    }

    fn running(&self) -> bool {
        self.usage.running > 0
    }
}

/// How many of a customer's VMs attach a file, read-only and writable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Claims {
    pub read_only: u32,
    pub writable: u32,
}

#[derive(Default)]
struct Sums {
    /// Every VM of the customer, running or not.
    all: Usage,
    /// Only those whose row says a VMM exists.
    running: Usage,
    disks: BTreeMap<PathBuf, Claims>,
}

#[derive(Default)]
struct Index {
    vms: HashMap<VmId, Entry>,
    customers: HashMap<CustomerId, Sums>,
    /// Every customer's running VMs.
    host_running: Usage,
}

impl Index {
    fn put(&mut self, id: &VmId, entry: Entry) {
        self.take(id);
        let sums = self.customers.entry(entry.customer.clone()).or_default();
        sums.all.plus(&entry.usage);
        if entry.running() {
            sums.running.plus(&entry.usage);
            self.host_running.plus(&entry.usage);
        }
        for (path, read_only) in &entry.disks {
            let c = sums.disks.entry(path.clone()).or_default();
            if *read_only {
                c.read_only += 1;
            } else {
                c.writable += 1;
            }
        }
        self.vms.insert(id.clone(), entry);
    }

    fn take(&mut self, id: &VmId) {
        let Some(old) = self.vms.remove(id) else {
            return;
        };
        let Some(sums) = self.customers.get_mut(&old.customer) else {
            return;
        };
        sums.all.minus(&old.usage);
        if old.running() {
            sums.running.minus(&old.usage);
            self.host_running.minus(&old.usage);
        }
        for (path, read_only) in &old.disks {
            if let Some(c) = sums.disks.get_mut(path) {
                if *read_only {
                    c.read_only = c.read_only.saturating_sub(1);
                } else {
                    c.writable = c.writable.saturating_sub(1);
                }
                if *c == Claims::default() {
                    sums.disks.remove(path);
                }
            }
        }
        if sums.all.vms == 0 {
            self.customers.remove(&old.customer);
        }
    }
}

/// The running usage a boot is judged against.
pub struct Running {
    /// The customer's VMs with a VMM, or admitted to boot.
    pub customer: Usage,
    /// Every customer's.
    pub host: Usage,
}

/// A copy of every row, by key and by (customer, name).
#[derive(Default)]
struct Records {
    by_id: HashMap<VmId, VmRecord>,
    by_name: HashMap<(CustomerId, VmId), VmId>,
}

impl Records {
    fn put(&mut self, vm: &VmRecord) {
        self.take(&vm.id);
        self.by_name
            .insert((vm.customer.clone(), vm.name.clone()), vm.id.clone());
        self.by_id.insert(vm.id.clone(), vm.clone());
    }

    fn take(&mut self, id: &VmId) {
        if let Some(old) = self.by_id.remove(id) {
            self.by_name.remove(&(old.customer, old.name));
        }
    }
}

/// The store, with the sums admission needs and a copy of every row kept
/// beside it.
pub struct Tally {
    store: Arc<dyn Store>,
    /// Held across each write to the store, so writes and the kept state
    /// change in one order.
    index: tokio::sync::Mutex<Option<Index>>,
    /// `None` until filled (with the index) and after any failed write.
    records: std::sync::RwLock<Option<Records>>,
}

impl Tally {
    pub fn new(store: Arc<dyn Store>) -> Tally {
        Tally {
            store,
            index: tokio::sync::Mutex::new(None),
            records: std::sync::RwLock::new(None),
        }
    }

    /// Drops the sums and copies; the next use reads every row again.
    pub async fn forget(&self) {
        let mut guard = self.index.lock().await;
        *guard = None;
        *self.records_mut() = None;
    }

    fn records_mut(&self) -> std::sync::RwLockWriteGuard<'_, Option<Records>> {
        self.records.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A kept row by `key`, or `None` when nothing is kept yet (ask the
    /// store); `Some(None)` when no such row exists.
    fn kept(&self, key: impl FnOnce(&Records) -> Option<VmRecord>) -> Option<Option<VmRecord>> {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        records.as_ref().map(key)
    }

    /// Applies a write's outcome to the index and the copies (the caller
    /// holds the index lock). A failed write may still have landed: both
    /// are dropped and read again on next use.
    fn apply(
        &self,
        guard: &mut Option<Index>,
        written: &Result<(), StoreError>,
        change: impl FnOnce(&mut Index, &mut Records),
    ) {
        match (written, guard.as_mut()) {
            (Ok(()), Some(index)) => {
                let mut records = self.records_mut();
                match records.as_mut() {
                    Some(r) => change(index, r),
                    None => {
                        *guard = None;
                    }
                }
            }
            (Ok(()), None) | (Err(StoreError::AlreadyExists), _) => {}
            (Err(_), _) => {
                *guard = None;
                *self.records_mut() = None;
            }
        }
    }

    /// Reads every row into the index and the copies, if not done yet.
    async fn fill(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Index>>, StoreError> {
        let mut guard = self.index.lock().await;
        if guard.is_none() {
            let mut index = Index::default();
            let mut records = Records::default();
            for vm in self.store.all().await? {
                index.put(&vm.id, Entry::of(&vm));
                records.put(&vm);
            }
            *guard = Some(index);
            *self.records_mut() = Some(records);
        }
        Ok(guard)
    }

    async fn with<T>(&self, f: impl FnOnce(&Index) -> T) -> Result<T, StoreError> {
        let guard = self.fill().await?;
        Ok(f(guard.as_ref().expect("filled above")))
    }

    /// What all of the customer's VMs hold, and the files they attach.
    pub async fn customer(
        &self,
        customer: &CustomerId,
    ) -> Result<(Usage, BTreeMap<PathBuf, Claims>), StoreError> {
        self.with(|index| {
            index
                .customers
                .get(customer)
                .map(|s| (s.all, s.disks.clone()))
                .unwrap_or_default()
        })
        .await
    }

    /// The running usage of `customer` and of the host, leaving out `vm`
    /// and counting the VMs in `booting` (admitted, not yet recorded
    /// running) as running.
    pub async fn running(
        &self,
        customer: &CustomerId,
        vm: &VmId,
        booting: &[VmId],
    ) -> Result<Running, StoreError> {
        self.with(|index| {
            let mut out = Running {
                customer: index
                    .customers
                    .get(customer)
                    .map(|s| s.running)
                    .unwrap_or_default(),
                host: index.host_running,
            };
            let mut count = |e: &Entry, add: bool| {
                let mut one = e.usage;
                one.running = 1;
                let apply = |u: &mut Usage| if add { u.plus(&one) } else { u.minus(&one) };
                apply(&mut out.host);
                if &e.customer == customer {
                    apply(&mut out.customer);
                }
            };
            if let Some(e) = index.vms.get(vm).filter(|e| e.running()) {
                count(e, false);
            }
            for id in booting.iter().filter(|id| *id != vm) {
                if let Some(e) = index.vms.get(id).filter(|e| !e.running()) {
                    count(e, true);
                }
            }
            out
        })
        .await
    }
}

#[async_trait]
impl Store for Tally {
    async fn insert(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let mut guard = self.index.lock().await;
        let written = self.store.insert(vm).await;
        self.apply(&mut guard, &written, |index, records| {
            index.put(&vm.id, Entry::of(vm));
            records.put(vm);
        });
        written
    }

    async fn get(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        if let Some(kept) = self.kept(|r| r.by_id.get(id).cloned()) {
            return Ok(kept);
        }
        let guard = self.fill().await?;
        drop(guard);
        match self.kept(|r| r.by_id.get(id).cloned()) {
            Some(kept) => Ok(kept),
            None => self.store.get(id).await,
        }
    }

    async fn find(
        &self,
        customer: &CustomerId,
        name: &VmId,
    ) -> Result<Option<VmRecord>, StoreError> {
        let key = |r: &Records| {
            let id = r.by_name.get(&(customer.clone(), name.clone()))?;
            r.by_id.get(id).cloned()
        };
        if let Some(kept) = self.kept(key) {
            return Ok(kept);
        }
        drop(self.fill().await?);
        match self.kept(key) {
            Some(kept) => Ok(kept),
            None => self.store.find(customer, name).await,
        }
    }

    async fn update(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let mut guard = self.index.lock().await;
        let written = self.store.update(vm).await;
        self.apply(&mut guard, &written, |index, records| {
            index.put(&vm.id, Entry::of(vm));
            records.put(vm);
        });
        written
    }

    async fn update_unsynced(&self, vm: &VmRecord) -> Result<(), StoreError> {
        let mut guard = self.index.lock().await;
        let written = self.store.update_unsynced(vm).await;
        self.apply(&mut guard, &written, |index, records| {
            index.put(&vm.id, Entry::of(vm));
            records.put(vm);
        });
        written
    }

    async fn progress(&self, id: &VmId, plan: Option<PlanRecord>) -> Result<(), StoreError> {
        let mut guard = self.index.lock().await;
        let written = self.store.progress(id, plan).await;
        self.apply(&mut guard, &written, |_, records| {
            if let Some(vm) = records.by_id.get_mut(id) {
                vm.plan = plan;
            }
        });
        written
    }

    async fn remove(&self, id: &VmId) -> Result<(), StoreError> {
        let mut guard = self.index.lock().await;
        let written = self.store.remove(id).await;
        self.apply(&mut guard, &written, |index, records| {
            index.take(id);
            records.take(id);
        });
        written
    }

    async fn list(
        &self,
        customer: &CustomerId,
        states: &[VmState],
        cursor: Option<i64>,
        limit: u32,
    ) -> Result<VmPage, StoreError> {
        if self.kept(|_| None).is_none() {
            return self.store.list(customer, states, cursor, limit).await;
        }
        // The store pages by key; the rows come from the copies. A row
        // removed or changed since the page was read is left out if it no
        // longer matches (a write that raced the read).
        let page = self
            .store
            .list_keys(customer, states, cursor, limit)
            .await?;
        let vms: Option<Vec<VmRecord>> = {
            let records = self.records.read().unwrap_or_else(|p| p.into_inner());
            records.as_ref().map(|records| {
                page.keys
                    .iter()
                    .filter_map(|id| records.by_id.get(id))
                    .filter(|vm| &vm.customer == customer)
                    .filter(|vm| states.is_empty() || states.contains(&vm.state))
                    .cloned()
                    .collect()
            })
        };
        // (The copies were dropped meanwhile by a failed write.)
        let Some(vms) = vms else {
            return self.store.list(customer, states, cursor, limit).await;
        };
        Ok(VmPage {
            vms,
            next_cursor: page.next_cursor,
            total: page.total,
        })
    }

    async fn all(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.store.all().await
    }

    async fn lease(&self, addr: IpAddr, vm: &VmId) -> Result<bool, StoreError> {
        self.store.lease(addr, vm).await
    }

    async fn leases(&self) -> Result<Vec<(IpAddr, VmId)>, StoreError> {
        self.store.leases().await
    }

    async fn release(&self, vm: &VmId) -> Result<(), StoreError> {
        self.store.release(vm).await
    }
}
