//! The plan executor ([`crate::plan`]): records a plan in the VM's row,
//! runs its steps in order, and resumes an interrupted one.

use super::*;
use crate::plan::{Failure, Plan, PlanRecord, Step};

/// What a plan's steps need besides the VM's row.
pub(super) struct PlanArgs {
    /// How the stop step stops the VMM.
    pub mode: StopMode,
    /// The VM's files as checked for this spawn (boot, reboot); resolved
    /// again when absent.
    pub resolved: Option<Resolved>,
    /// The plan is resumed (after a restart, or by the reconciler), not run
    /// for a waiting client.
    pub resumed: bool,
}

impl PlanArgs {
    /// Arguments of a plan a client asked for.
    pub fn request(mode: StopMode) -> Self {
        PlanArgs {
            mode,
            resolved: None,
            resumed: false,
        }
    }

    /// Arguments of a plan metald resumes: no client waits, so VMMs are
    /// stopped at once.
    pub fn resume() -> Self {
        PlanArgs {
            mode: StopMode::Force,
            resolved: None,
            resumed: true,
        }
    }
}

/// Where a test makes the executor stop as if metald were killed.
#[derive(Debug, Default)]
pub(super) struct CrashPoint(Mutex<Option<(Plan, usize)>>);

impl CrashPoint {
    fn hit(&self, plan: Plan, step: usize) -> bool {
        let mut at = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if *at == Some((plan, step)) {
            *at = None;
            return true;
        }
        false
    }
}

/// What a simulated crash answers; nothing after it is written.
const CRASHED: &str = "metald stopped here (test crash point)";

impl VmService {
    /// For the service's tests: the next run of `plan` stops before its
    /// step `step` (`steps().len()`: before its last write, for plans that
    /// keep the row) as if metald were killed there: nothing more is
    /// written or undone.
    #[doc(hidden)]
    pub fn crash_before(&self, plan: Plan, step: usize) {
        *self.inner.crash.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((plan, step));
    }

    /// Records `plan` in the VM's row, durably: the write before the plan's
    /// first side effect.
    pub(super) async fn begin(&self, vm: &mut VmRecord, plan: Plan) -> Result<()> {
        vm.plan = Some(PlanRecord::start(plan));
        vm.modified_at = now();
        self.write(vm, format!("store.write.{plan}"), true).await
    }

    /// Runs the VM's recorded plan from its first undone step (the caller
    /// holds the VM's lock). Each step is skipped when it is done already;
    /// progress is written after each step but the last without an fsync.
    /// On success the row still holds the record: the caller's last write
    /// (the plan's outcome) clears it, unless the plan removed the row.
    pub(super) async fn run_plan(&self, vm: &mut VmRecord, args: &mut PlanArgs) -> Result<()> {
        let Some(rec) = vm.plan else {
            return Ok(());
        };
        let steps = rec.plan.steps();
        for i in rec.next..steps.len() {
            if self.inner.crash.hit(rec.plan, i) {
                return Err(Error::Unavailable(CRASHED.into()));
            }
            let step = steps[i];
            let span = tracing::info_span!(
                "step",
                otel.name = %format_args!("{}.{}", rec.plan, step.as_str()),
                plan = rec.plan.as_str(),
                step = step.as_str(),
                metald.customer_id = %vm.customer,
            );
            async {
                if !self.step_done(step, vm, args).await? {
                    self.step_run(step, vm, args).await?;
                }
                Ok::<_, Error>(())
            }
            .instrument(span)
            .await?;
            if step == Step::RemoveRow {
                return Ok(());
            }
            vm.plan = Some(PlanRecord { next: i + 1, ..rec });
            if i + 1 < steps.len() {
                self.inner
                    .store
                    .progress(&vm.id, vm.plan)
                    .await
                    .map_err(store_err)?;
            }
        }
        if self.inner.crash.hit(rec.plan, steps.len()) {
            return Err(Error::Unavailable(CRASHED.into()));
        }
        Ok(())
    }

    /// The stop sequence for a VMM that exited on its own: no record, as
    /// the one write that follows settles it.
    pub(super) async fn stop_unrecorded(&self, vm: &mut VmRecord) -> Result<()> {
        let mut args = PlanArgs::request(StopMode::Force);
        for &step in Plan::Shutdown.steps() {
            if !self.step_done(step, vm, &args).await? {
                self.step_run(step, vm, &mut args).await?;
            }
        }
        Ok(())
    }

    /// Whether `e` is a simulated crash: nothing may be written after it.
    pub(super) fn crashed(e: &Error) -> bool {
        matches!(e, Error::Unavailable(m) if m == CRASHED)
    }

    /// Runs the VM's recorded plan and writes its outcome, or what its
    /// failure policy says (the caller holds the VM's lock). `Ok(false)`:
    /// the plan removed the row. On an error, `vm.plan` tells whether the
    /// plan is still owed (`Some`: the reconciler resumes it) or settled
    /// (given up or undone, the outcome written).
    pub(super) async fn execute(&self, vm: &mut VmRecord, args: &mut PlanArgs) -> Result<bool> {
        let Some(rec) = vm.plan else {
            return Ok(true);
        };
        match self.run_plan(vm, args).await {
            Ok(()) => self.finish(vm, rec.plan).await,
            Err(e) if Self::crashed(&e) => Err(e),
            Err(e) => self.failed(vm, rec.plan, args, e).await,
        }
    }

    /// The outcome of a finished plan: one durable write (or none when the
    /// row went with the plan's last step).
    async fn finish(&self, vm: &mut VmRecord, plan: Plan) -> Result<bool> {
        let Some(state) = plan.ends_in() else {
            self.removed(&vm.id);
            return Ok(false);
        };
        let runtime = if state.has_process() {
            vm.runtime.clone()
        } else {
            None
        };
        self.save(vm, state, runtime, None).await?;
        Ok(true)
    }

    /// Applies the plan's failure policy to a step's error `e`, and returns
    /// it (or what the VM's fate makes of it).
    async fn failed(
        &self,
        vm: &mut VmRecord,
        plan: Plan,
        args: &mut PlanArgs,
        e: Error,
    ) -> Result<bool> {
        let eid = error_id();
        warn!(vm_id = %vm.id, plan = %plan, error_id = %eid, error = %e, "a lifecycle step failed");
        match plan.on_failure(args.resumed) {
            Failure::Undo(undo) => {
                self.begin(vm, undo).await?;
                let mut undo_args = PlanArgs::resume();
                if let Err(u) = self.run_plan(vm, &mut undo_args).await {
                    if Self::crashed(&u) {
                        return Err(u);
                    }
                    warn!(vm_id = %vm.id, error = %u, "undo failed; the reconciler retries");
                } else {
                    vm.plan = None;
                    self.removed(&vm.id);
                }
            }
            Failure::GiveUp => {
                let (state, runtime) = (vm.state, vm.runtime.clone());
                // A boot's error is already cleaned for the client (see
                // `boot_err`); others may carry a VMM's own words.
                let why = match plan {
                    Plan::Boot => format!("boot failed: {e}"),
                    _ => format!("{plan} failed (error id {eid})"),
                };
                self.save(vm, state, runtime, Some(why)).await?;
            }
            Failure::Retry => {}
        }
        Err(e)
    }
}
