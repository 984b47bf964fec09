//! Quotas and host capacity at admission ([`crate::quota`]): counted under
//! the admission lock together with the create or boot they guard, so
//! concurrent requests never overshoot a limit.

use super::*;
use crate::quota::{self, Limits, QuotaBook, Usage};

/// A boot admitted against the running-VM quota and the host's capacity:
/// counted as running until it is dropped (by then the row says whether
/// the VM runs).
pub(super) struct BootTicket {
    inner: Arc<Inner>,
    id: VmId,
}

impl Drop for BootTicket {
    fn drop(&mut self) {
        self.inner
            .booting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// One create taken from a customer's rate: given back when dropped, unless
/// spent.
pub(super) struct CreateToken {
    inner: Arc<Inner>,
    customer: CustomerId,
    rate: Option<u64>,
}

impl CreateToken {
    /// The create happened: it counts against the rate.
    pub(super) fn spend(mut self) {
        self.rate = None;
    }
}

impl Drop for CreateToken {
    fn drop(&mut self) {
        if let Some(rate) = self.rate {
            self.inner.create_rate.give_back(&self.customer, rate);
        }
    }
}

impl VmService {
    /// Replaces every customer's limits (a reloaded quotas file); requests
    /// already admitted keep what they were given.
    pub fn set_quotas(&self, book: QuotaBook) {
        *self.inner.quotas.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(book);
    }

    fn limits(&self, customer: &CustomerId) -> Limits {
        self.inner
            .quotas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .limits(customer)
    }

    /// Takes one create from the customer's create rate (before anything
    /// costlier, so a flood is refused cheaply); the create is handed back
    /// unless [`CreateToken::spend`] says the create happened.
    pub(super) fn take_create(&self, customer: &CustomerId) -> Result<CreateToken> {
        let rate = self.limits(customer).create_rate;
        if let Some(rate) = rate {
            self.inner.create_rate.take(customer, rate)?;
        }
        Ok(CreateToken {
            inner: self.inner.clone(),
            customer: customer.clone(),
            rate,
        })
    }

    /// Every VM of `customer`, all pages.
    pub(super) async fn customer_vms(&self, customer: &CustomerId) -> Result<Vec<VmRecord>> {
        let mut vms = Vec::new();
        let mut cursor = None;
        loop {
            let page = self
                .inner
                .store
                .list(customer, &[], cursor, MAX_PAGE_SIZE)
                .await
                .map_err(store_err)?;
            vms.extend(page.vms);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => return Ok(vms),
            }
        }
    }

    /// Whether a VM of `spec` fits beside the customer's `vms` (the caller
    /// holds the admission lock).
    pub(super) fn check_create_quota(
        &self,
        customer: &CustomerId,
        vms: &[VmRecord],
        spec: &VmSpec,
    ) -> Result<()> {
        let mut used = Usage::default();
        for vm in vms {
            used.add(&vm.spec, false);
        }
        quota::check_create(&self.limits(customer), &used, spec)
    }

    /// Admits a boot of `vm` against the customer's running-VM quota and
    /// the host's capacity, counting it as running until the ticket drops.
    pub(super) async fn admit_boot(&self, vm: &VmRecord) -> Result<BootTicket> {
        let _admission = self.inner.disk_claims.lock().await;
        let limits = self.limits(&vm.customer);
        let host = self.inner.config.host;
        if limits.max_running_vms.is_none() && host.is_none() {
            return Ok(self.ticket(&vm.id));
        }
        let booting = self
            .inner
            .booting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let runs =
            |r: &VmRecord| r.id != vm.id && (r.state.has_process() || booting.contains(&r.id));
        let mut mine = Usage::default();
        for r in self
            .customer_vms(&vm.customer)
            .await?
            .iter()
            .filter(|r| runs(r))
        {
            mine.add(&r.spec, true);
        }
        let mut all = Usage::default();
        if host.is_some() {
            for r in self
                .inner
                .store
                .all()
                .await
                .map_err(store_err)?
                .iter()
                .filter(|r| runs(r))
            {
                all.add(&r.spec, true);
            }
        }
        quota::check_boot(&limits, &mine, host.as_ref().map(|h| (h, &all)), &vm.spec)?;
        Ok(self.ticket(&vm.id))
    }

    fn ticket(&self, id: &VmId) -> BootTicket {
        self.inner
            .booting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        BootTicket {
            inner: self.inner.clone(),
            id: id.clone(),
        }
    }
}
