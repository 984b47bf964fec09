//! What every customer's VMs hold, kept up to date from the service's own
//! store writes, so admission costs the same with ten VMs or ten thousand.
//!
//! [`Tally`] wraps the store: every `insert`, `update` and `remove` goes
//! through it and, once the store has it, changes the tally under one
//! lock, so the tally is always what the rows say. It is filled from every
//! row on first use (and again after [`Tally::forget`], which start-up
//! recovery calls) and then never reads VM rows from the store again;
//! leases pass straight through. One entry per VM row; nothing a request
//! controls makes it grow beyond the rows themselves.
//!
//! It also keeps every row itself ([`Records`]), so `get` and `find`
//! (GetVmInfo, and every lifecycle call's lookup) are answered from memory
//! without a trip to SQLite or decoding a spec, and so are ListVms pages
//! (each customer's rows are kept in the store's order, with how many are
//! in each state, so a page costs its rows) and the full scans of the
//! reconciler and the metrics. The copies change after the
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

/// A copy of every row, by key and by (customer, name), and each
/// customer's rows in the store's order for ListVms.
#[derive(Default)]
struct Records {
    by_id: HashMap<VmId, Kept>,
    by_name: HashMap<(CustomerId, VmId), VmId>,
    pages: HashMap<CustomerId, Pages>,
}

struct Kept {
    /// The row's position in the store ([`Store::insert`]).
    seq: i64,
    vm: VmRecord,
}

/// One customer's rows by position, with how many are in each state.
#[derive(Default)]
struct Pages {
    order: BTreeMap<i64, (VmId, VmState)>,
    states: HashMap<VmState, i64>,
}

impl Records {
    /// Keeps `vm` at position `seq`.
    fn put(&mut self, seq: i64, vm: &VmRecord) {
        self.take(&vm.id);
        self.by_name
            .insert((vm.customer.clone(), vm.name.clone()), vm.id.clone());
        let pages = self.pages.entry(vm.customer.clone()).or_default();
        pages.order.insert(seq, (vm.id.clone(), vm.state));
        *pages.states.entry(vm.state).or_default() += 1;
        self.by_id.insert(
            vm.id.clone(),
            Kept {
                seq,
                vm: vm.clone(),
            },
        );
    }

    /// Replaces a kept row, keeping its position; `false` when the row is
    /// not kept (its position is then unknown).
    fn replace(&mut self, vm: &VmRecord) -> bool {
        match self.by_id.get(&vm.id) {
            Some(k) => {
                let seq = k.seq;
                self.put(seq, vm);
                true
            }
            None => false,
        }
    }

    fn take(&mut self, id: &VmId) {
        let Some(old) = self.by_id.remove(id) else {
            return;
        };
        let (customer, name, state) = (old.vm.customer, old.vm.name, old.vm.state);
        if let Some(pages) = self.pages.get_mut(&customer) {
            pages.order.remove(&old.seq);
            if let Some(n) = pages.states.get_mut(&state) {
                *n -= 1;
                if *n <= 0 {
                    pages.states.remove(&state);
                }
            }
            if pages.order.is_empty() {
                self.pages.remove(&customer);
            }
        }
        self.by_name.remove(&(customer, name));
    }

    /// The page [`Store::list`] returns, from the copies.
    fn page(
        &self,
        customer: &CustomerId,
        states: &[VmState],
        cursor: Option<i64>,
        limit: u32,
    ) -> VmPage {
        use std::ops::Bound::{Excluded, Unbounded};
        let Some(pages) = self.pages.get(customer) else {
            return VmPage {
                vms: Vec::new(),
                next_cursor: None,
                total: 0,
            };
        };
        let mut wanted = states.to_vec();
        wanted.sort_by_key(|s| s.as_str());
        wanted.dedup();
        let total = if wanted.is_empty() {
            pages.order.len() as i64
        } else {
            wanted
                .iter()
                .map(|s| pages.states.get(s).copied().unwrap_or(0))
                .sum()
        };
        let limit = limit as usize;
        let mut vms = Vec::with_capacity(limit.min(pages.order.len()));
        let mut next_cursor = None;
        if limit > 0 {
            let start = cursor.map_or(Unbounded, Excluded);
            let mut last = None;
            for (seq, (id, state)) in pages.order.range((start, Unbounded)) {
                if !wanted.is_empty() && !wanted.contains(state) {
                    continue;
                }
                if vms.len() == limit {
                    next_cursor = last;
                    break;
                }
                let Some(k) = self.by_id.get(id) else {
                    continue;
                };
                vms.push(k.vm.clone());
                last = Some(*seq);
            }
        }
        VmPage {
            vms,
            next_cursor,
            total,
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

    /// `read` of the copies, or `None` when nothing is kept yet (ask the
    /// store). A row read this way is `Some(None)` when no such row exists.
    fn kept_with<T>(&self, read: impl FnOnce(&Records) -> T) -> Option<T> {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        records.as_ref().map(read)
    }

    /// Applies a write's outcome to the index and the copies (the caller
    /// holds the index lock). A failed write may still have landed: both are
    /// dropped and read again on next use; so they are when `change`
    /// returns `false` (the copies cannot follow the write).
    fn apply<T>(
        &self,
        guard: &mut Option<Index>,
        written: &Result<T, StoreError>,
        change: impl FnOnce(&mut Index, &mut Records, &T) -> bool,
    ) {
        match (written, guard.as_mut()) {
            (Ok(done), Some(index)) => {
                let mut records = self.records_mut();
                let followed = records.as_mut().is_some_and(|r| change(index, r, done));
                if !followed {
                    *guard = None;
                    *records = None;
                }
            }
            (Ok(_), None) | (Err(StoreError::AlreadyExists), _) => {}
            (Err(_), _) => {
                *guard = None;
                *self.records_mut() = None;
            }
        }
    }

    /// A row write (`update` or `update_unsynced`) through the tally.
    async fn rewrite(
        &self,
        vm: &VmRecord,
        write: impl std::future::Future<Output = Result<(), StoreError>>,
    ) -> Result<(), StoreError> {
        let mut guard = self.index.lock().await;
        let written = write.await;
        self.apply(&mut guard, &written, |index, records, _| {
            index.put(&vm.id, Entry::of(vm));
            records.replace(vm)
        });
        written
    }

    /// Reads every row into the index and the copies, if not done yet.
    async fn fill(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Index>>, StoreError> {
        let mut guard = self.index.lock().await;
        if guard.is_none() {
            let mut index = Index::default();
            let mut records = Records::default();
            // Both reads under the index lock, which every write takes.
            let rows = self.store.all().await?;
            let seqs: HashMap<VmId, i64> = self
                .store
                .positions()
                .await?
                .into_iter()
                .map(|(seq, id)| (id, seq))
                .collect();
            for vm in rows {
                let Some(&seq) = seqs.get(&vm.id) else {
                    return Err(StoreError::Other(format!(
                        "vm {:?} has no position in the store",
                        vm.id.as_str()
                    )));
                };
                index.put(&vm.id, Entry::of(&vm));
                records.put(seq, &vm);
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
    async fn insert(&self, vm: &VmRecord) -> Result<i64, StoreError> {
        let mut guard = self.index.lock().await;
        let written = self.store.insert(vm).await;
        self.apply(&mut guard, &written, |index, records, &seq| {
            index.put(&vm.id, Entry::of(vm));
            records.put(seq, vm);
            true
        });
        written
    }

    async fn get(&self, id: &VmId) -> Result<Option<VmRecord>, StoreError> {
        let key = |r: &Records| r.by_id.get(id).map(|k| k.vm.clone());
        if let Some(kept) = self.kept_with(key) {
            return Ok(kept);
        }
        drop(self.fill().await?);
        match self.kept_with(key) {
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
            r.by_id.get(id).map(|k| k.vm.clone())
        };
        if let Some(kept) = self.kept_with(key) {
            return Ok(kept);
        }
        drop(self.fill().await?);
        match self.kept_with(key) {
            Some(kept) => Ok(kept),
            None => self.store.find(customer, name).await,
        }
    }

    async fn update(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.rewrite(vm, self.store.update(vm)).await
    }

    async fn update_unsynced(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.rewrite(vm, self.store.update_unsynced(vm)).await
    }

    async fn progress(&self, id: &VmId, plan: Option<PlanRecord>) -> Result<(), StoreError> {
        let mut guard = self.index.lock().await;
        let written = self.store.progress(id, plan).await;
        self.apply(&mut guard, &written, |_, records, _| {
            if let Some(k) = records.by_id.get_mut(id) {
                k.vm.plan = plan;
            }
            true
        });
        written
    }

    async fn remove(&self, id: &VmId) -> Result<(), StoreError> {
        let mut guard = self.index.lock().await;
        let written = self.store.remove(id).await;
        self.apply(&mut guard, &written, |index, records, _| {
            index.take(id);
            records.take(id);
            true
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
        let page = |r: &Records| r.page(customer, states, cursor, limit);
        if let Some(page) = self.kept_with(page) {
            return Ok(page);
        }
        drop(self.fill().await?);
        match self.kept_with(page) {
            Some(page) => Ok(page),
            None => self.store.list(customer, states, cursor, limit).await,
        }
    }

    /// Every row, from the copies, in the store's order.
    async fn all(&self) -> Result<Vec<VmRecord>, StoreError> {
        let all = |r: &Records| {
            let mut kept: Vec<&Kept> = r.by_id.values().collect();
            kept.sort_by_key(|k| k.seq);
            kept.into_iter().map(|k| k.vm.clone()).collect()
        };
        drop(self.fill().await?);
        match self.kept_with(all) {
            Some(rows) => Ok(rows),
            None => self.store.all().await,
        }
    }

    async fn positions(&self) -> Result<Vec<(i64, VmId)>, StoreError> {
        self.store.positions().await
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
