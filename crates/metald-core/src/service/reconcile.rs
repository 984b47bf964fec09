//! The reconciler: VMMs found dead recorded, plans that could not finish
//! resumed, and VMM processes, VM directories and network devices no row
//! claims swept.

use super::executor::PlanArgs;
use super::*;
use crate::plan::Plan;

/// What one pass found unclaimed: acted on only when the previous pass
/// found it too (the age guard).
struct Guard<'a> {
    immediate: bool,
    previous: &'a HashSet<String>,
    suspects: HashSet<String>,
}

impl Guard<'_> {
    /// Whether `key` may be acted on now; otherwise it is remembered.
    fn ripe(&mut self, key: String) -> bool {
        if self.immediate || self.previous.contains(&key) {
            return true;
        }
        self.suspects.insert(key);
        false
    }

    /// Like [`Guard::ripe`], but only on a second sighting even at
    /// start-up: for what cannot be tied to a VM's lock (another metald on
    /// the host may be making it right now).
    fn seen_twice(&mut self, key: String) -> bool {
        if self.previous.contains(&key) {
            return true;
        }
        self.suspects.insert(key);
        false
    }
}

impl VmService {
    /// One reconciliation pass: records VMMs found dead, resumes plans no
    /// operation is running, kills VMM processes no row claims, and removes
    /// VM directories and network devices no row claims.
    ///
    /// Age guard: with `immediate` false (periodic passes while serving), an
    /// unclaimed process or directory is removed only when the previous
    /// pass already found it unclaimed, and only while no operation holds
    /// its VM; so a boot or delete in progress is never raced. The start-up
    /// pass runs before the API serves and acts at once.
    pub async fn reconcile(&self, immediate: bool) -> Result<ReconcileReport> {
        let mut report = ReconcileReport::default();
        let pass = self.reconcile_pass(immediate, &mut report).await;
        self.inner.telemetry.reconciled(&report, pass.is_ok());
        if let Err(Error::Store(_)) = &pass {
            self.inner.telemetry.store_error();
        }
        pass.map(|()| report)
    }

    async fn reconcile_pass(&self, immediate: bool, report: &mut ReconcileReport) -> Result<()> {
        self.reconcile_rows(report).await?;
        let previous = std::mem::take(
            &mut *self
                .inner
                .suspects
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut guard = Guard {
            immediate,
            previous: &previous,
            suspects: HashSet::new(),
        };
        self.sweep_host(&mut guard, report).await?;
        if self.inner.network.is_some() {
            self.sweep_networks(&mut guard, report).await?;
        }
        *self
            .inner
            .suspects
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = guard.suspects;
        if *report != ReconcileReport::default() {
            info!(?report, "reconciled");
        }
        Ok(())
    }

    /// Rows: dead VMMs recorded, recorded plans resumed while no operation
    /// holds their VM (an operation holds the lock from its first write to
    /// its last, so it is never raced).
    async fn reconcile_rows(&self, report: &mut ReconcileReport) -> Result<()> {
        let vmm = &self.inner.vmm;
        for mut vm in self.inner.store.all().await.map_err(store_err)? {
            if vm.state.has_process() && !vm.runtime.as_ref().is_some_and(|rt| vmm.is_alive(rt)) {
                let before = vm.state;
                self.refresh_if_idle(&mut vm).await;
                if vm.state != before {
                    report.dead += 1;
                }
            }
            if vm.plan.is_none() {
                let before = (vm.state, vm.last_error.clone());
                self.correct_drift_if_idle(&mut vm).await;
                if (vm.state, vm.last_error.clone()) != before {
                    report.drifted += 1;
                }
                continue;
            }
            let Some(_guard) = self.try_lock(&vm.id) else {
                continue;
            };
            let Some(mut v) = self.inner.store.get(&vm.id).await.map_err(store_err)? else {
                continue;
            };
            let Some(rec) = v.plan else {
                continue;
            };
            match self.execute(&mut v, &mut PlanArgs::resume()).await {
                Ok(kept) => {
                    if kept && let Some(rt) = v.runtime.clone() {
                        self.watch(v.id.clone(), rt);
                    }
                    info!(vm_id = %v.id, plan = %rec.plan, "finished a plan that could not finish before");
                    match rec.plan {
                        Plan::Cleanup => report.abandoned_creates += 1,
                        _ => report.settled += 1,
                    }
                }
                Err(e) if v.plan.is_none() => {
                    info!(vm_id = %v.id, plan = %rec.plan, error = %e, "could not finish a plan; settled");
                    report.settled += 1;
                }
                // Still failing: the next pass tries again; the rest of
                // this pass goes on.
                Err(e) => {
                    warn!(vm_id = %v.id, plan = %rec.plan, error = %e, "cannot finish a plan yet")
                }
            }
        }
        Ok(())
    }

    /// VMM processes and VM directories the backend finds by its naming
    /// scheme that no row claims.
    async fn sweep_host(&self, guard: &mut Guard<'_>, report: &mut ReconcileReport) -> Result<()> {
        let vmm = &self.inner.vmm;
        let host = vmm.scan().await;
        for (id, pid, start_time) in host.processes {
            let Some(_lock) = self.try_lock(&id) else {
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
            if claimed || !guard.ripe(format!("process {pid}/{start_time} of {id}")) {
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
            let Some(_lock) = self
                .unclaimed(&id, format!("directory of {id}"), guard)
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
        Ok(())
    }

    /// Network devices and address leases no row claims.
    async fn sweep_networks(
        &self,
        guard: &mut Guard<'_>,
        report: &mut ReconcileReport,
    ) -> Result<()> {
        let Some(net) = &self.inner.network else {
            return Ok(());
        };
        let mut ids: HashSet<VmId> = net
            .scan()
            .await
            .map_err(net_err)?
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let leases = self.inner.store.leases().await.map_err(store_err)?;
        ids.extend(leases.into_iter().map(|(_, id)| id));
        for id in ids {
            let Some(_lock) = self
                .unclaimed(&id, format!("network of {id}"), guard)
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
        // Devices a crash left before marking them: named by a hash, so
        // told apart from every row's (which may be being made) by name.
        let known: Vec<(VmId, usize)> = self
            .inner
            .store
            .all()
            .await
            .map_err(store_err)?
            .into_iter()
            .flat_map(|vm| (0..vm.spec.nics().len().max(1)).map(move |i| (vm.id.clone(), i)))
            .collect();
        for name in net.strays(&known).await.map_err(net_err)? {
            if !guard.seen_twice(format!("stray {name}")) {
                continue;
            }
            warn!(netns = %name, "removing an unmarked network namespace no VM row claims");
            if let Err(e) = net.remove_stray(&name).await {
                warn!(netns = %name, error = %e, "cannot remove an unmarked namespace yet");
                continue;
            }
            report.orphan_networks += 1;
        }
        Ok(())
    }

    /// Takes `id`'s lock when no operation holds it, no row claims the VM
    /// and the age guard allows acting on `key`.
    async fn unclaimed(
        &self,
        id: &VmId,
        key: String,
        guard: &mut Guard<'_>,
    ) -> Result<Option<VmLock>> {
        let Some(lock) = self.try_lock(id) else {
            return Ok(None);
        };
        if self.inner.store.get(id).await.map_err(store_err)?.is_some() {
            return Ok(None);
        }
        Ok(guard.ripe(key).then_some(lock))
    }
}

/// What [`VmService::reconcile`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReconcileReport {
    /// VMs whose VMM was found dead and recorded as such.
    pub dead: usize,
    /// VMs whose guest was paused, resumed or halted outside metald, and
    /// recorded as it is.
    pub drifted: usize,
    /// Unclaimed VMM processes killed.
    pub orphan_processes: usize,
    /// Unclaimed VM directories removed.
    pub orphan_dirs: usize,
    /// Unclaimed network devices / address leases removed (per VM).
    pub orphan_networks: usize,
    /// Creates whose own undo (the cleanup plan) failed, undone now.
    pub abandoned_creates: usize,
    /// Other plans that could not finish before (start-up recovery could
    /// not settle them), finished now.
    pub settled: usize,
}
