//! The steps of every plan ([`crate::plan::Step`]): whether each is done
//! already, read from the world, and how it is done. Each can run again
//! after a crash without harm.

use super::executor::PlanArgs;
use super::*;
use crate::plan::Step;
use crate::ports::BootPhases;

impl VmService {
    /// Whether `step` is done already for `vm`. Steps whose action is
    /// idempotent and costs no more than the check (release, destroy,
    /// unwire) always run.
    pub(super) async fn step_done(
        &self,
        step: Step,
        vm: &VmRecord,
        args: &PlanArgs,
    ) -> Result<bool> {
        let alive = || {
            vm.runtime
                .as_ref()
                .is_some_and(|rt| self.inner.vmm.is_alive(rt))
        };
        Ok(match step {
            Step::Wire => vm.spec.nics().iter().all(|n| n.attachment.is_some()),
            Step::Spawn => vm.state == VmState::Running && alive(),
            // A reset cannot be seen from outside; after a restart a live
            // VMM runs the guest either way.
            Step::Restart => args.resumed && alive(),
            Step::StopVmm => !alive(),
            Step::Release | Step::Destroy | Step::Unwire => false,
            Step::RemoveRow => self
                .inner
                .store
                .get(&vm.id)
                .await
                .map_err(store_err)?
                .is_none(),
        })
    }

    /// Does `step` for `vm`, updating the record in memory; the executor
    /// writes it.
    pub(super) async fn step_run(
        &self,
        step: Step,
        vm: &mut VmRecord,
        args: &mut PlanArgs,
    ) -> Result<()> {
        let vmm = &self.inner.vmm;
        let id = vm.id.clone();
        match step {
            Step::Wire => {
                // A resumed wiring starts clean, so a crash mid-way never
                // leaves a second set of addresses leased.
                if args.resumed {
                    self.unwire(&id, vm.spec.nics().len()).await?;
                    for i in 0..vm.spec.nics().len() {
                        vm.spec.set_attachment(i, None);
                    }
                }
                self.wire(vm).await?;
            }
            Step::Spawn => self.spawn(vm, args).await?,
            Step::Restart => self.restart(vm, args).await?,
            Step::StopVmm => {
                if let Some(rt) = vm.runtime.clone() {
                    match vmm.shutdown(&rt, args.mode).await {
                        Ok(()) => self.inner.telemetry.vmm_exit(vmm.name(), true),
                        // Gone before it was asked: the stop is done.
                        Err(e) if e.is_gone() && !vmm.is_alive(&rt) => {
                            warn!(vm_id = %id, error = %e, "the VMM was gone before the stop");
                            self.inner.telemetry.vmm_exit(vmm.name(), false);
                        }
                        // A teardown goes on: its destroy step kills the VMM.
                        Err(e) if vm.plan.is_some_and(|p| p.plan.removes_row()) => {
                            warn!(vm_id = %id, error = %e, "graceful stop before removal failed; killing");
                        }
                        Err(e) => return Err(vmm_err(e)),
                    }
                }
            }
            Step::Release => {
                // The VMM is gone: free what the backend kept for it
                // (metrics reader, cgroups, exit bookkeeping).
                if let Some(rt) = &vm.runtime {
                    vmm.release(&id, rt).await;
                }
            }
            Step::Destroy => vmm
                .destroy(&id, vm.runtime.as_ref())
                .await
                .map_err(vmm_err)?,
            Step::Unwire => self.unwire(&id, vm.spec.nics().len()).await?,
            Step::RemoveRow => self.inner.store.remove(&id).await.map_err(store_err)?,
        }
        Ok(())
    }

    /// The files the VMM gets, checked again right before it is spawned.
    async fn resolved(&self, vm: &VmRecord, args: &mut PlanArgs) -> Result<Resolved> {
        match args.resolved.take() {
            Some(r) => Ok(r),
            None => self.resolve(&vm.customer, &vm.spec).await,
        }
    }

    /// Clears anything an earlier VMM (or a crash mid-boot) left and starts
    /// a fresh VMM. No process may exist in Created/Shutdown/Failed.
    async fn spawn(&self, vm: &mut VmRecord, args: &mut PlanArgs) -> Result<()> {
        let resolved = self.resolved(vm, args).await?;
        let (vmm, id) = (&self.inner.vmm, &vm.id);
        let started = match vmm.destroy(id, vm.runtime.as_ref()).await {
            Ok(()) => {
                let (booted, phases) = BootPhases::collect(vmm.boot(id, &resolved.spec)).await;
                if booted.is_ok() {
                    self.inner.telemetry.boot_phases(vmm.name(), &phases);
                }
                booted
            }
            Err(e) => Err(e),
        };
        let rt = started.map_err(|e| boot_err(id, e, &resolved, &vm.spec))?;
        vm.runtime = Some(rt);
        vm.state = VmState::Running;
        Ok(())
    }

    /// Resets the guest; a VMM found dead (a reboot a crash interrupted
    /// mid-respawn) is started again instead.
    async fn restart(&self, vm: &mut VmRecord, args: &mut PlanArgs) -> Result<()> {
        let live = vm.runtime.clone().filter(|rt| self.inner.vmm.is_alive(rt));
        let Some(rt) = live else {
            return self.spawn(vm, args).await;
        };
        // Some backends respawn the VMM to reboot: the files are checked
        // again like at every spawn.
        let resolved = self.resolved(vm, args).await?;
        let id = &vm.id;
        let new_rt = match self.inner.vmm.reboot(id, &resolved.spec, &rt).await {
            Ok(rt) => rt,
            // The VMM vanished under the reset: the guest restarts all
            // the same, in a new VMM.
            Err(e) if e.is_gone() && !self.inner.vmm.is_alive(&rt) => {
                warn!(vm_id = %id, error = %e, "the VMM was gone during the reboot; starting a new one");
                args.resolved = Some(resolved);
                return self.spawn(vm, args).await;
            }
            Err(e) => return Err(boot_err(id, e, &resolved, &vm.spec)),
        };
        vm.runtime = Some(new_rt);
        Ok(())
    }
}
