//! Start-up recovery: interrupted plans resumed, VMMs adopted, VMs that
//! cannot be settled marked for the reconciler.

use super::executor::PlanArgs;
use super::*;

impl VmService {
    /// Brings every VM back under control after a (re)start: resumes the
    /// plans a crash interrupted, re-attaches to every VMM
    /// the store says is alive, and marks the rest failed after cleaning
    /// up after them. A reused pid is never adopted or killed: identity is
    /// pid + start time + the VMM's own command line and socket.
    pub async fn recover(&self) -> Result<RecoveryReport> {
        let mut report = RecoveryReport::default();
        // Rows written before the service ran (another metald, a test)
        // are counted afresh.
        self.inner.store.forget().await;
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
        self.inner.telemetry.recovered(&report);
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

    /// Resumes one VM's interrupted plan, or adopts its VMM (the caller
    /// holds its lock).
    pub(super) async fn recover_one(
        &self,
        vm: &mut VmRecord,
        report: &mut RecoveryReport,
    ) -> Result<()> {
        if let Some(rec) = vm.plan {
            match self.execute(vm, &mut PlanArgs::resume()).await {
                Ok(kept) => {
                    if kept && let Some(rt) = vm.runtime.clone() {
                        self.watch(vm.id.clone(), rt);
                    }
                    info!(vm_id = %vm.id, plan = %rec.plan, step = rec.next, "finished a plan interrupted by a restart");
                    report.finished += 1;
                }
                // Settled the other way: given up (error recorded) or undone.
                Err(e) if vm.plan.is_none() => {
                    info!(vm_id = %vm.id, plan = %rec.plan, error = %e, "could not finish a plan interrupted by a restart; settled");
                    report.given_up += 1;
                }
                Err(e) => return Err(e),
            }
            return Ok(());
        }
        if !vm.state.has_process() {
            return Ok(());
        }
        let vmm = &self.inner.vmm;
        let id = vm.id.clone();
        let adopted = match &vm.runtime {
            Some(rt) => match vmm.adopt(&vm.id, rt).await {
                Ok(GuestStatus::Running) => Ok((VmState::Running, rt.clone())),
                Ok(GuestStatus::Paused) => Ok((VmState::Paused, rt.clone())),
                Ok(GuestStatus::Halted) => Err("its guest has halted".to_owned()),
                Err(e) => Err(e.to_string()),
            },
            None => Err("no VMM process was recorded".into()),
        };
        match adopted {
            Ok((state, rt)) => {
                self.save(vm, state, Some(rt.clone()), None).await?;
                self.watch(id, rt);
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
                    .map_err(vmm_err)?;
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

/// What [`VmService::recover`] found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    /// VMMs re-attached.
    pub adopted: usize,
    /// VMs whose VMM was gone or not theirs: marked failed.
    pub failed: usize,
    /// Interrupted plans finished.
    pub finished: usize,
    /// Interrupted plans that could not be finished and were settled
    /// otherwise: given up with the reason recorded (a boot whose files are
    /// gone), or undone (a create that can no longer be wired).
    pub given_up: usize,
    /// VMs that could not be settled: marked failed, retried by the
    /// periodic reconciler.
    pub unsettled: usize,
}
