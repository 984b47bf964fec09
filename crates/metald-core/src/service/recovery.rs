//! Start-up recovery and the reconciler: interrupted operations finished or
//! rolled back, VMMs adopted, and what no row claims swept.

use super::*;

impl VmService {
    /// Brings every VM back under control after a (re)start: finishes or
    /// rolls back operations a crash interrupted, re-attaches to every VMM
    /// the store says is alive, and marks the rest failed after cleaning
    /// up after them. A reused pid is never adopted or killed: identity is
    /// pid + start time + the VMM's own command line and socket.
    pub async fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        for mut vm in self.inner.store.all().await.map_err(store_err)? {
            let _guard = self.lock(&vm.id).await;
            // One VM that cannot be settled (a VMM that survives SIGKILL for
            // a while, an unreadable directory, a failing rollback) must not
            // keep metald from serving the others.
            if let Err(e) = self.recover_one(&mut vm, &mut report).await {
                self.unsettled(&vm.id, &e).await;
                report.unsettled += 1;
            }
        }
        info!(?report, "recovered VMs");
        Ok(report)
    }

    /// Marks a VM that recovery could not settle `failed` with the reason,
    /// keeping its pending operation and recorded process, so the periodic
    /// reconciler retries the operation and sweeps the process.
    pub(super) async fn unsettled(&self, id: &VmId, e: &Error) {
        let eid = error_id();
        warn!(vm_id = %id, error_id = %eid, error = %e, "cannot settle a VM after a restart; the reconciler retries");
        let Ok(Some(mut vm)) = self.inner.store.get(id).await else {
            return;
        };
        vm.state = VmState::Failed;
        vm.last_error = Some(format!(
            "could not be settled after a metald restart (error id {eid}); retried in the background"
        ));
        vm.modified_at = now();
        match self.inner.store.update(&vm).await {
            Ok(()) => self.changed(&vm),
            Err(e) => warn!(vm_id = %id, error = %e, "cannot mark an unsettled VM"),
        }
    }

    /// Finishes, rolls back or adopts one VM (the caller holds its lock).
    pub(super) async fn recover_one(
        &self,
        vm: &mut VmRecord,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        let vmm = &self.inner.vmm;
        let id = vm.id.clone();
        match vm.pending {
            Some(Pending::Create) => {
                self.unwire(&id, vm.spec.nics.len()).await?;
                self.inner.store.remove(&id).await.map_err(store_err)?;
                info!(vm_id = %id, "rolled back a create interrupted by a restart");
                report.rolled_back += 1;
                return Ok(());
            }
            Some(Pending::Delete) => {
                vmm.destroy(&id, vm.runtime.as_ref())
                    .await
                    .map_err(Error::Backend)?;
                self.unwire(&id, vm.spec.nics.len()).await?;
                self.inner.store.remove(&id).await.map_err(store_err)?;
                self.removed(&id);
                info!(vm_id = %id, "finished a delete interrupted by a restart");
                report.finished += 1;
                return Ok(());
            }
            Some(Pending::Boot) => {
                vmm.destroy(&id, vm.runtime.as_ref())
                    .await
                    .map_err(Error::Backend)?;
                let state = vm.state;
                let why = "boot interrupted by a metald restart; rolled back".to_owned();
                self.save(vm, state, None, Some(why)).await?;
                info!(vm_id = %id, "rolled back a boot interrupted by a restart");
                report.rolled_back += 1;
                return Ok(());
            }
            Some(Pending::Shutdown) => {
                if let Some(rt) = vm.runtime.clone() {
                    vmm.shutdown(&rt, StopMode::Force)
                        .await
                        .map_err(Error::Backend)?;
                }
                self.save(vm, VmState::Shutdown, None, None).await?;
                info!(vm_id = %id, "finished a shutdown interrupted by a restart");
                report.finished += 1;
                return Ok(());
            }
            None => {}
        }
        if !vm.state.has_process() {
            return Ok(());
        }
        let adopted = match &vm.runtime {
            Some(rt) => vmm.adopt(&vm.id, rt).await.map(|s| (s, rt.clone())),
            None => Err("no VMM process was recorded".into()),
        };
        match adopted {
            Ok((status, rt)) => {
                let state = match status {
                    GuestStatus::Running => VmState::Running,
                    GuestStatus::Paused => VmState::Paused,
                };
                self.save(vm, state, Some(rt.clone()), None).await?;
                self.watch(id.clone(), rt);
                report.adopted += 1;
            }
            Err(e) => {
                let eid = error_id();
                warn!(vm_id = %id, error_id = %eid, error = %e, "VMM lost while metald was down; not adopting");
                let reason = format!("VMM lost while metald was down (error id {eid})");
                // Kills only processes whose identity still matches,
                // so an unrelated process on a reused pid survives.
                vmm.destroy(&id, vm.runtime.as_ref())
                    .await
                    .map_err(Error::Backend)?;
                self.save(vm, VmState::Failed, None, Some(reason)).await?;
                report.failed += 1;
            }
        }
        Ok(())
    }

    /// Tells the observers about every VM as stored, once recovery is done,
    /// so they can settle what they remembered from before a restart.
    pub async fn announce_all(&self) -> Result<()> {
        for vm in self.inner.store.all().await.map_err(store_err)? {
            self.changed(&vm);
        }
        Ok(())
    }

    /// One reconciliation pass: records VMMs found dead, kills VMM
    /// processes no row claims, and removes VM directories no row claims.
    ///
    /// Age guard: with `immediate` false (periodic passes while serving), an
    /// unclaimed process or directory is removed only when the previous
    /// pass already found it unclaimed, and only while no operation holds
    /// its VM; so a boot or delete in progress is never raced. The start-up
    /// pass runs before the API serves and acts at once.
    pub async fn reconcile(&self, immediate: bool) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let vmm = &self.inner.vmm;
        for mut vm in self.inner.store.all().await.map_err(store_err)? {
            if vm.state.has_process() && !vm.runtime.as_ref().is_some_and(|rt| vmm.is_alive(rt)) {
                let before = vm.state;
                self.refresh_if_idle(&mut vm).await;
                if vm.state != before {
                    report.dead += 1;
                }
            }
            // A create that failed and could not undo its wiring leaves its
            // row marked; with no operation holding the VM, nothing else
            // will finish it, so roll it back (the create holds the lock
            // from before its insert to its last write, so it is never
            // raced).
            // An operation a restart interrupted and recovery could not
            // settle: try again while nothing holds the VM.
            if matches!(
                vm.pending,
                Some(Pending::Delete | Pending::Boot | Pending::Shutdown)
            ) {
                let Some(_guard) = self.try_lock(&vm.id) else {
                    continue;
                };
                if let Some(mut v) = self.inner.store.get(&vm.id).await.map_err(store_err)?
                    && v.pending.is_some()
                {
                    let mut r = RecoveryReport::default();
                    match self.recover_one(&mut v, &mut r).await {
                        Ok(()) => report.settled += 1,
                        Err(e) => {
                            warn!(vm_id = %v.id, error = %e, "cannot settle an interrupted operation yet")
                        }
                    }
                }
                continue;
            }
            if vm.pending != Some(Pending::Create) {
                continue;
            }
            let Some(_guard) = self.try_lock(&vm.id) else {
                continue;
            };
            match self.inner.store.get(&vm.id).await.map_err(store_err)? {
                Some(v) if v.pending == Some(Pending::Create) => {
                    // Still failing: the next pass tries again; the rest of
                    // this pass goes on.
                    if let Err(e) = self.unwire(&v.id, v.spec.nics.len()).await {
                        warn!(vm_id = %v.id, error = %e, "cannot roll back an abandoned create yet");
                        continue;
                    }
                    self.inner.store.remove(&v.id).await.map_err(store_err)?;
                    info!(vm_id = %v.id, "rolled back a create that could not undo itself");
                    report.abandoned_creates += 1;
                }
                _ => {}
            }
        }
        let host = vmm.scan().await;
        let mut suspects = HashSet::new();
        let previous = std::mem::take(
            &mut *self
                .inner
                .suspects
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (id, pid, start_time) in host.processes {
            let key = format!("process {pid}/{start_time} of {id}");
            let Some(_guard) = self.try_lock(&id) else {
                continue;
            };
            let claimed = match self.inner.store.get(&id).await.map_err(store_err)? {
                Some(vm) => {
                    vm.state.has_process()
                        && vm
                            .runtime
                            .as_ref()
                            .is_some_and(|rt| rt.pid == pid && rt.start_time == start_time)
                }
                None => false,
            };
            if claimed {
                continue;
            }
            if !immediate && !previous.contains(&key) {
                suspects.insert(key);
                continue;
            }
            warn!(vm_id = %id, pid, "killing a VMM process no VM row claims");
            // One that can't be killed yet is retried next pass.
            if let Err(e) = vmm.kill_orphan(pid, start_time).await {
                warn!(vm_id = %id, pid, error = %e, "cannot kill an unclaimed VMM process yet");
                continue;
            }
            report.orphan_processes += 1;
        }
        for id in host.dirs {
            let key = format!("directory of {id}");
            let Some(_guard) = self
                .unclaimed(&id, key, immediate, &previous, &mut suspects)
                .await?
            else {
                continue;
            };
            warn!(vm_id = %id, "removing files no VM row claims");
            // One that can't be removed is retried next pass; the others
            // are still cleaned now.
            if let Err(e) = vmm.destroy(&id, None).await {
                warn!(vm_id = %id, error = %e, "cannot remove unclaimed files yet");
                continue;
            }
            report.orphan_dirs += 1;
        }
        if let Some(net) = &self.inner.network {
            let mut ids: HashSet<VmId> = net
                .scan()
                .await
                .map_err(Error::Backend)?
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            let leases = self.inner.store.leases().await.map_err(store_err)?;
            ids.extend(leases.into_iter().map(|(_, id)| id));
            for id in ids {
                let key = format!("network of {id}");
                let Some(_guard) = self
                    .unclaimed(&id, key, immediate, &previous, &mut suspects)
                    .await?
                else {
                    continue;
                };
                warn!(vm_id = %id, "removing network devices and addresses no VM row claims");
                if let Err(e) = self.unwire(&id, 1).await {
                    warn!(vm_id = %id, error = %e, "cannot remove unclaimed network devices yet");
                    continue;
                }
                report.orphan_networks += 1;
            }
        }
        *self
            .inner
            .suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = suspects;
        if report != ReconcileReport::default() {
            info!(?report, "reconciled");
        }
        Ok(report)
    }

    /// For the reconciler: takes `id`'s lock when no operation holds it, no
    /// row claims the VM and the age guard allows acting on `key` (found
    /// unclaimed by the previous pass, or `immediate`).
    pub(super) async fn unclaimed(
        &self,
        id: &VmId,
        key: String,
        immediate: bool,
        previous: &HashSet<String>,
        suspects: &mut HashSet<String>,
    ) -> Result<Option<VmLock>> {
        let Some(guard) = self.try_lock(id) else {
            return Ok(None);
        };
        if self.inner.store.get(id).await.map_err(store_err)?.is_some() {
            return Ok(None);
        }
        if !immediate && !previous.contains(&key) {
            suspects.insert(key);
            return Ok(None);
        }
        Ok(Some(guard))
    }

    /// Shuts every running or paused VM down (gracefully, killing after the
    /// default timeout), for `UNKEY_METALD_SHUTDOWN_VMS_ON_EXIT`.
    pub async fn shutdown_all(&self) -> Result<usize> {
        let mut n = 0;
        let mode = StopMode::Graceful(self.inner.config.default_shutdown_timeout);
        for vm in self.inner.store.all().await.map_err(store_err)? {
            if !vm.state.has_process() {
                continue;
            }
            let _guard = self.lock(&vm.id).await;
            let Some(mut vm) = self.inner.store.get(&vm.id).await.map_err(store_err)? else {
                continue;
            };
            if vm.state.has_process() {
                self.stop_locked(&mut vm, mode).await?;
                n += 1;
            }
        }
        Ok(n)
    }
}

/// What [`VmService::reconcile`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    /// VMs whose VMM was found dead and recorded as such.
    pub dead: usize,
    /// Unclaimed VMM processes killed.
    pub orphan_processes: usize,
    /// Unclaimed VM directories removed.
    pub orphan_dirs: usize,
    /// Unclaimed network devices / address leases removed (per VM).
    pub orphan_networks: usize,
    /// Creates whose own rollback failed, rolled back now.
    pub abandoned_creates: usize,
    /// Interrupted operations start-up recovery could not settle, settled
    /// now.
    pub settled: usize,
}

/// What [`VmService::recover`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    /// VMMs re-attached.
    pub adopted: usize,
    /// VMs whose VMM was gone or not theirs: marked failed.
    pub failed: usize,
    /// Interrupted deletes and shutdowns finished.
    pub finished: usize,
    /// Interrupted boots rolled back.
    pub rolled_back: usize,
    /// VMs that could not be settled: marked failed, retried by the
    /// periodic reconciler.
    pub unsettled: usize,
}
