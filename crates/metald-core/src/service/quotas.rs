//! Quotas and host capacity at admission ([`crate::quota`]): counted under
//! the admission lock together with the create or boot they guard, so
//! concurrent requests never overshoot a limit.

use super::*;
use crate::quota::{self, Limits, QuotaBook};

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

    pub(super) fn limits(&self, customer: &CustomerId) -> Limits {
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

    /// Admits a boot of `vm` against the customer's running-VM quota and
    /// the host's capacity, counting it as running until the ticket drops.
    pub(super) async fn admit_boot(&self, vm: &VmRecord) -> Result<BootTicket> {
        let _admission = self.inner.disk_claims.lock().await;
        let limits = self.limits(&vm.customer);
        let host = self.inner.config.host;
        if limits.max_running_vms.is_none() && host.is_none() {
            return Ok(self.ticket(&vm.id));
        }
        let booting: Vec<VmId> = self
            .inner
            .booting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        let running = self
            .inner
            .store
            .running(&vm.customer, &vm.id, &booting)
            .await
            .map_err(store_err)?;
        let host = host.as_ref().map(|h| (h, &running.host));
        quota::check_boot(&limits, &running.customer, host, &vm.spec)?;
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
