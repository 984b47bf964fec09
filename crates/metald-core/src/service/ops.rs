//! The use cases behind the RPCs: create, boot, pause, resume, reboot, shutdown, delete, get, list.

use super::executor::PlanArgs;
use super::*;
use crate::plan::{Plan, PlanRecord};
use crate::ports::{HOST_DETAIL_KEYS, Operation};

impl VmService {
    /// Records a new VM in state `Created`. No process is started until
    /// Boot, so a created VM costs nothing but its row.
    pub async fn create(
        &self,
        caller: &CustomerId,
        requested_id: Option<VmId>,
        request_customer: &str,
        spec: VmSpec,
    ) -> Result<VmRecord> {
        let work = self.create_now(caller, requested_id, request_customer, spec);
        self.measured(Operation::Create, caller, work).await
    }

    async fn create_now(
        &self,
        caller: &CustomerId,
        requested_id: Option<VmId>,
        request_customer: &str,
        spec: VmSpec,
    ) -> Result<VmRecord> {
        if !request_customer.is_empty() && request_customer != caller.as_str() {
            return Err(Error::invalid(
                "customer_id",
                "must be empty or match the authenticated customer",
            ));
        }
        if !spec.nics().is_empty() && self.inner.network.is_none() {
            return Err(Error::Unimplemented(
                "config.network: networking is disabled on this host (UNKEY_METALD_NETWORK_ENABLED=false)".into(),
            ));
        }
        let resolved = self.resolve(caller, &spec).await?;
        let token = self.take_create(caller)?;
        let name = requested_id.unwrap_or_else(VmId::generate);
        let id = VmId::host_key(&name);
        let t = now();
        let has_network = !spec.nics().is_empty();
        // Without interfaces the insert is the whole create; with them the
        // row records the create plan, which a restart finishes.
        let mut vm = VmRecord {
            id: id.clone(),
            name: name.clone(),
            customer: caller.clone(),
            spec,
            state: VmState::Created,
            runtime: None,
            last_error: None,
            plan: has_network.then_some(PlanRecord::start(Plan::Create)),
            created_at: t,
            modified_at: t,
        };
        // The lock keeps the reconciler off the VM while it is wired.
        let _guard = self.lock(&id).await;
        {
            let _admission = self.inner.disk_claims.lock().await;
            let (used, claims) = self.inner.store.customer(caller).await.map_err(store_err)?;
            quota::check_create(&self.limits(caller), &used, &vm.spec)?;
            self.check_disk_claims(&resolved, claims).await?;
            let span = tracing::info_span!(
                "store.write",
                otel.name = "store.insert",
                metald.customer_id = %vm.customer,
            );
            match self.inner.store.insert(&vm).instrument(span).await {
                Ok(_) => token.spend(),
                Err(StoreError::AlreadyExists) => {
                    return Err(Error::AlreadyExists(name.to_string()));
                }
                Err(e) => return Err(store_err(e)),
            }
        }
        self.execute(&mut vm, &mut PlanArgs::request(StopMode::Force))
            .await?;
        info!(vm_id = %id, name = %name, customer = %caller, "vm created");
        Ok(vm)
    }

    /// Starts a VMM for the VM and lets the guest run (the boot plan: a
    /// restart mid-way finishes it).
    pub async fn boot(&self, caller: &CustomerId, name: &VmId) -> Result<VmRecord> {
        self.measured(
            Operation::Move(Op::Boot),
            caller,
            self.boot_now(caller, name),
        )
        .await
    }

    async fn boot_now(&self, caller: &CustomerId, name: &VmId) -> Result<VmRecord> {
        let (_guard, mut vm) = self.lock_owned(caller, name).await?;
        Self::check(&vm, Op::Boot)?;
        let mut args = PlanArgs::request(StopMode::Force);
        args.resolved = Some(self.resolve(caller, &vm.spec).await?);
        let _admitted = self.admit_boot(&vm).await?;
        self.begin(&mut vm, Plan::Boot).await?;
        self.execute(&mut vm, &mut args).await?;
        if let Some(rt) = vm.runtime.clone() {
            self.watch(vm.id.clone(), rt);
        }
        info!(vm_id = %vm.id, "vm booted");
        Ok(vm)
    }

    /// Stops the guest's vCPUs.
    pub async fn pause(&self, caller: &CustomerId, id: &VmId) -> Result<VmRecord> {
        let work = self.simple(caller, id, Op::Pause);
        self.measured(Operation::Move(Op::Pause), caller, work)
            .await
    }

    /// Lets a paused guest run again.
    pub async fn resume(&self, caller: &CustomerId, id: &VmId) -> Result<VmRecord> {
        let work = self.simple(caller, id, Op::Resume);
        self.measured(Operation::Move(Op::Resume), caller, work)
            .await
    }

    /// Resets the guest (the reboot plan: backends that respawn the VMM
    /// get the files checked again, and a restart mid-respawn finishes it).
    pub async fn reboot(&self, caller: &CustomerId, name: &VmId) -> Result<VmRecord> {
        self.measured(
            Operation::Move(Op::Reboot),
            caller,
            self.reboot_now(caller, name),
        )
        .await
    }

    async fn reboot_now(&self, caller: &CustomerId, name: &VmId) -> Result<VmRecord> {
        let (_guard, mut vm) = self.lock_owned(caller, name).await?;
        Self::check(&vm, Op::Reboot)?;
        let before = vm.runtime.clone();
        self.begin(&mut vm, Plan::Reboot).await?;
        if let Err(e) = self
            .execute(&mut vm, &mut PlanArgs::request(StopMode::Force))
            .await
        {
            if Self::crashed(&e) {
                return Err(e);
            }
            // The VMM may have died under the request: report that rather
            // than a bare backend error.
            self.refresh(&mut vm).await?;
            return Err(Self::check(&vm, Op::Reboot).err().unwrap_or(e));
        }
        if vm.runtime != before
            && let Some(rt) = vm.runtime.clone()
        {
            self.watch(vm.id.clone(), rt);
        }
        Ok(vm)
    }

    /// Pause and resume: one VMM call on a live process, so no plan: after a
    /// crash, adoption reads the guest's state from the VMM itself.
    pub(super) async fn simple(
        &self,
        caller: &CustomerId,
        name: &VmId,
        op: Op,
    ) -> Result<VmRecord> {
        let (_guard, mut vm) = self.lock_owned(caller, name).await?;
        let Outcome::To(to) = Self::check(&vm, op)? else {
            unreachable!("pause and resume never delete");
        };
        let rt = vm
            .runtime
            .clone()
            .ok_or_else(|| Error::Backend("no VMM process recorded".into()))?;
        let vmm = &self.inner.vmm;
        let done = match op {
            Op::Pause => vmm.pause(&rt).await,
            Op::Resume => vmm.resume(&rt).await,
            _ => unreachable!("only pause and resume come here"),
        };
        if let Err(e) = done {
            return Err(self.call_failed(&mut vm, op, e).await?);
        }
        self.save(&mut vm, to, Some(rt), None).await?;
        Ok(vm)
    }

    /// Stops the guest; afterwards no VMM process exists.
    pub async fn shutdown(
        &self,
        caller: &CustomerId,
        id: &VmId,
        force: bool,
        timeout: Option<Duration>,
    ) -> Result<VmRecord> {
        let work = self.shutdown_now(caller, id, force, timeout);
        self.measured(Operation::Move(Op::Shutdown), caller, work)
            .await
    }

    async fn shutdown_now(
        &self,
        caller: &CustomerId,
        id: &VmId,
        force: bool,
        timeout: Option<Duration>,
    ) -> Result<VmRecord> {
        let (_guard, mut vm) = self.lock_owned(caller, id).await?;
        Self::check(&vm, Op::Shutdown)?;
        let mode = if force {
            StopMode::Force
        } else {
            StopMode::Graceful(timeout.unwrap_or(self.inner.config.default_shutdown_timeout))
        };
        self.stop_locked(&mut vm, mode).await?;
        info!(vm_id = %vm.id, ?mode, "vm shut down");
        Ok(vm)
    }

    /// Stops a VM's VMM and records `Shutdown` (the shutdown plan: the stop
    /// sequence); the caller holds its lock.
    pub(super) async fn stop_locked(&self, vm: &mut VmRecord, mode: StopMode) -> Result<()> {
        self.begin(vm, Plan::Shutdown).await?;
        self.execute(vm, &mut PlanArgs::request(mode)).await?;
        Ok(())
    }

    /// Removes the VM (the delete plan: its VMM stopped, gracefully unless
    /// `force`, every file, address and interface removed, then the row).
    /// A restart mid-way finishes it; a failure answers an error and leaves
    /// the VM as it was, for a retry.
    pub async fn delete(&self, caller: &CustomerId, name: &VmId, force: bool) -> Result<()> {
        let work = self.delete_now(caller, name, force);
        self.measured(Operation::Move(Op::Delete), caller, work)
            .await
    }

    async fn delete_now(&self, caller: &CustomerId, name: &VmId, force: bool) -> Result<()> {
        let (guard, mut vm) = self.lock_owned(caller, name).await?;
        Self::check(&vm, Op::Delete)?;
        let mode = match force {
            true => StopMode::Force,
            false => StopMode::Graceful(self.inner.config.default_shutdown_timeout),
        };
        self.begin(&mut vm, Plan::Delete).await?;
        self.execute(&mut vm, &mut PlanArgs::request(mode)).await?;
        // The lock's entry goes with its last user (a waiter keeps it).
        drop(guard);
        info!(vm_id = %vm.id, "vm deleted");
        Ok(())
    }

    /// One VM with what the backend says about it. A VMM found dead is
    /// recorded before answering, so the state is never stale.
    pub async fn get(&self, caller: &CustomerId, name: &VmId) -> Result<VmDetails> {
        let mut record = self.owned(caller, name).await?;
        self.refresh_if_idle(&mut record).await;
        self.correct_drift_if_idle(&mut record).await;
        let id = &record.id.clone();
        let mut backend_info = self.inner.vmm.describe(id, record.runtime.as_ref()).await;
        if !self.inner.config.host_details_in_info {
            // What a backend reports of the host itself (its paths, pids,
            // uids) stays on the host.
            backend_info
                .retain(|k, v| !v.starts_with('/') && !HOST_DETAIL_KEYS.contains(&k.as_str()));
        }
        // The host-wide key the VM's files, processes and metald's logs are
        // named by, for correlating a customer's report with the host.
        backend_info.insert("vm_key".into(), id.to_string());
        if let Some(err) = &record.last_error {
            backend_info.insert("last_error".into(), err.clone());
        }
        if let Some(p) = record.plan {
            backend_info.insert("pending_operation".into(), p.plan.as_str().into());
        }
        let mut usage = match (&self.inner.usage, record.state.has_process()) {
            (Some(u), true) => u.usage(id),
            _ => None,
        };
        // The VMM's own device counters are exact where it keeps them.
        if let Some(rt) = record
            .runtime
            .as_ref()
            .filter(|_| record.state.has_process())
            && let Some(c) = self.inner.vmm.counters(id, rt).await
        {
            let u = usage.get_or_insert_with(VmUsage::default);
            u.disk_read_bytes = c.disk_read_bytes as i64;
            u.disk_write_bytes = c.disk_write_bytes as i64;
            u.net_rx_bytes = c.net_rx_bytes as i64;
            u.net_tx_bytes = c.net_tx_bytes as i64;
            backend_info.insert("device_counters".into(), "vmm".into());
        }
        Ok(VmDetails {
            record,
            backend_info,
            usage,
        })
    }

    /// A page of the caller's VMs. `page_size` 0 means the default; sizes
    /// above [`MAX_PAGE_SIZE`] are reduced to it.
    pub async fn list(
        &self,
        caller: &CustomerId,
        states: &[VmState],
        page_size: i32,
        cursor: Option<i64>,
    ) -> Result<VmPage> {
        if page_size < 0 {
            return Err(Error::invalid(
                "page_size",
                format!("must not be negative, got {page_size}"),
            ));
        }
        let limit = match page_size as u32 {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let mut page = self
            .inner
            .store
            .list(caller, states, cursor, limit)
            .await
            .map_err(store_err)?;
        for vm in &mut page.vms {
            self.refresh_if_idle(vm).await;
        }
        Ok(page)
    }
}
