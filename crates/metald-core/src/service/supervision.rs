//! Watching VMM processes: exits noticed at once, and reads that never report a dead VMM as running.

use super::*;

impl VmService {
    /// Records the exit of a VM's VMM if the process is gone (the caller
    /// holds the VM's lock). The exit watcher normally does this at once;
    /// this closes the gap between the exit and the watcher's write.
    pub(super) async fn refresh(&self, vm: &mut VmRecord) -> Result<()> {
        if !vm.state.has_process() {
            return Ok(());
        }
        let unknown = VmmExit {
            code: None,
            signal: None,
        };
        let exit = match &vm.runtime {
            Some(rt) if self.inner.vmm.is_alive(rt) => return Ok(()),
            // Dead: the status is known at once for metald's own children.
            Some(rt) => tokio::time::timeout(Duration::from_secs(1), self.inner.vmm.wait_exit(rt))
                .await
                .unwrap_or(unknown),
            None => unknown,
        };
        self.record_exit(vm, exit).await
    }

    /// [`Self::refresh`] for readers. When the VM's lock is held (the exit
    /// watcher recording this very exit, or an operation that will write
    /// its own outcome), waits a bounded time for it and rereads the row,
    /// so a reader never reports a dead VMM as running just because it
    /// arrived while the exit was being written.
    pub(super) async fn refresh_if_idle(&self, vm: &mut VmRecord) {
        let stale = vm.state.has_process()
            && !vm
                .runtime
                .as_ref()
                .is_some_and(|rt| self.inner.vmm.is_alive(rt));
        if !stale {
            return;
        }
        let Ok(_guard) = tokio::time::timeout(READ_LOCK_WAIT, self.lock(&vm.id)).await else {
            return;
        };
        match self.inner.store.get(&vm.id).await {
            Ok(Some(mut fresh)) => {
                if let Err(e) = self.refresh(&mut fresh).await {
                    warn!(vm_id = %vm.id, error = %e, "cannot record VMM exit");
                }
                *vm = fresh;
            }
            Ok(None) => {}
            Err(e) => warn!(vm_id = %vm.id, error = %e, "cannot reload vm"),
        }
    }

    /// Moves a VM whose VMM exited on its own to `Failed` (or `Shutdown`
    /// after a clean guest power-off), with the reason, and releases what
    /// the VMM left behind.
    pub(super) async fn record_exit(&self, vm: &mut VmRecord, exit: VmmExit) -> Result<()> {
        let unknown = exit.code.is_none() && exit.signal.is_none();
        let said_off = unknown && self.inner.vmm.powered_off(&vm.id).await;
        let op = if exit.is_clean() || said_off {
            Op::PoweredOff
        } else {
            Op::Crashed
        };
        let Some(Outcome::To(to)) = state::next(vm.state, op) else {
            return Ok(());
        };
        let reason = match said_off {
            true => "the guest powered off (its console says so; the VMM was adopted, so its exit status is unknown)".to_owned(),
            false => format!("VMM {}", exit.describe()),
        };
        warn!(vm_id = %vm.id, %reason, state = %to, "VMM exited without being asked");
        let expected = op == Op::PoweredOff;
        self.inner
            .telemetry
            .vmm_exit(self.inner.vmm.name(), expected);
        self.stop_unrecorded(vm).await?;
        self.save(vm, to, None, Some(reason)).await
    }

    /// The answer to a pause or resume the VMM failed (the caller holds the
    /// VM's lock). A VMM that died under the request, or is gone from its
    /// control socket, is handled as an exit ([`Self::vmm_lost`]) and the
    /// answer names the state that left (`failed_precondition`); a request
    /// the VMM refused is the caller's (`failed_precondition`, with the
    /// VMM's reason); anything else is metald's (`internal`).
    pub(super) async fn call_failed(
        &self,
        vm: &mut VmRecord,
        op: Op,
        e: VmmError,
    ) -> Result<Error> {
        self.refresh(vm).await?;
        if e.is_gone() && vm.state.has_process() {
            self.vmm_lost(vm, &e).await?;
        }
        if !vm.state.has_process() {
            return Ok(Self::check(vm, op).err().unwrap_or_else(|| vmm_err(e)));
        }
        Ok(match e {
            VmmError::Refused(reason) => {
                let eid = error_id();
                warn!(vm_id = %vm.id, error_id = %eid, %reason, "the VMM refused to {}", op.verb());
                // The stored spec holds the client's paths; any other path
                // the VMM names shows as `<path>`.
                let as_given = Resolved {
                    spec: vm.spec.clone(),
                    disks: Vec::new(),
                };
                Error::FailedPrecondition(format!(
                    "the VMM refused to {} the guest: {} (error id {eid})",
                    op.verb(),
                    scrub(&reason, &as_given, &vm.spec)
                ))
            }
            e => vmm_err(e),
        })
    }

    /// Records a VMM that still runs but no longer answers as this VM's
    /// (nothing listens on its control socket) as an exit: it is stopped
    /// and its VM marked `failed` with the reason, as the exit watcher
    /// records a crash.
    pub(super) async fn vmm_lost(&self, vm: &mut VmRecord, e: &VmmError) -> Result<()> {
        let Some(Outcome::To(to)) = state::next(vm.state, Op::Crashed) else {
            return Ok(());
        };
        let eid = error_id();
        warn!(vm_id = %vm.id, error_id = %eid, error = %e, "the VMM is gone from its control socket; stopping it");
        self.inner.telemetry.vmm_exit(self.inner.vmm.name(), false);
        self.stop_unrecorded(vm).await?;
        let reason = format!("the VMM stopped answering on its control socket (error id {eid})");
        self.save(vm, to, None, Some(reason)).await
    }

    /// Watches a VMM process and records an exit metald did not ask for.
    pub(super) fn watch(&self, id: VmId, rt: VmmRuntime) {
        let svc = self.clone();
        let exited = self.inner.vmm.wait_exit(&rt);
        tokio::spawn(async move {
            let exit = exited.await;
            svc.on_exit(&id, &rt, exit).await;
        });
    }

    pub(super) async fn on_exit(&self, id: &VmId, rt: &VmmRuntime, exit: VmmExit) {
        let _guard = self.lock(id).await;
        let mut vm = match self.inner.store.get(id).await {
            Ok(Some(vm)) => vm,
            Ok(None) => return,
            Err(e) => {
                warn!(vm_id = %id, error = %e, "cannot load vm after its VMM exited");
                return;
            }
        };
        // An exit metald caused (shutdown, delete, reboot by restart) has
        // already replaced or cleared the runtime.
        if vm.runtime.as_ref() != Some(rt) || !vm.state.has_process() {
            return;
        }
        // A plan still recorded (one interrupted, or given up mid-way) owns
        // the VM: its resumption, at the next start or reconcile, finds the
        // VMM gone and finishes. Recording the exit here would clear the
        // record and lose that intent (a delete would leave the VM behind).
        if vm.plan.is_some() {
            tracing::debug!(vm_id = %id, plan = ?vm.plan, "VMM exited under a recorded plan; the plan settles it");
            return;
        }
        if let Err(e) = self.record_exit(&mut vm, exit).await {
            warn!(vm_id = %id, error = %e, "cannot record VMM exit");
        }
    }

    /// Brings the row in line with what the VMM says about its guest: a
    /// guest paused or resumed outside metald is recorded as it is, and one
    /// that halted while its VMM still answers is stopped and recorded
    /// `failed`. The caller holds the VM's lock. Whether the row changed.
    pub(super) async fn correct_drift(&self, vm: &mut VmRecord) -> Result<bool> {
        let Some(rt) = vm.runtime.clone().filter(|_| vm.state.has_process()) else {
            return Ok(false);
        };
        let Ok(status) = self.inner.vmm.status(&rt).await else {
            return Ok(false);
        };
        let to = match (vm.state, status) {
            (VmState::Running, GuestStatus::Paused) => VmState::Paused,
            (VmState::Paused, GuestStatus::Running) => VmState::Running,
            (_, GuestStatus::Halted) => {
                warn!(vm_id = %vm.id, "the guest halted while its VMM ran; stopping the VMM");
                self.stop_unrecorded(vm).await?;
                let why = "the guest halted while its VMM still ran".to_owned();
                self.save(vm, VmState::Failed, None, Some(why)).await?;
                return Ok(true);
            }
            _ => return Ok(false),
        };
        info!(vm_id = %vm.id, from = %vm.state, to = %to, "the guest's state changed outside metald");
        self.save(vm, to, Some(rt), None).await?;
        Ok(true)
    }

    /// [`Self::correct_drift`] for readers: only when no operation holds
    /// the VM (one that does writes its own outcome).
    pub(super) async fn correct_drift_if_idle(&self, vm: &mut VmRecord) {
        if !vm.state.has_process() {
            return;
        }
        let Some(_guard) = self.try_lock(&vm.id) else {
            return;
        };
        match self.inner.store.get(&vm.id).await {
            Ok(Some(mut fresh)) => {
                if let Err(e) = self.correct_drift(&mut fresh).await {
                    warn!(vm_id = %vm.id, error = %e, "cannot record the guest's state");
                }
                *vm = fresh;
            }
            Ok(None) => {}
            Err(e) => warn!(vm_id = %vm.id, error = %e, "cannot reload vm"),
        }
    }
}
