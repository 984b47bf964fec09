//! Lifecycle work as plans of idempotent steps.
//!
//! Every change that takes more than one side effect (create, boot,
//! reboot, shutdown, delete, and the reconciler's cleanup) is a [`Plan`]:
//! an ordered list of [`Step`]s, each of which can tell from the world
//! (the store, the VMM, the host's network) whether it is done already,
//! and do itself again without harm. The service's executor
//! (`service/executor.rs`) records the plan in the VM's row before the
//! first side effect, writes the index of the first undone step after each
//! step (without an fsync: on resume the steps' own checks are the truth),
//! and clears the record with the operation's last write.
//!
//! A metald that finds a plan record (after a crash, or when a step kept
//! failing) resumes it from its first undone step. Every plan is finished
//! where its intent can still be reached; [`Plan::on_failure`] says what
//! happens when a step fails (a refused configuration, a VMM that does not
//! answer):
//!
//! | plan     | steps                                          | a step fails (request / resumed) |
//! |----------|------------------------------------------------|----------------------------------|
//! | create   | wire                                           | undone by cleanup / the same     |
//! | boot     | spawn                                          | given up: state kept, error recorded |
//! | reboot   | restart                                        | given up: the row follows the VMM |
//! | shutdown | stop VMM, release                              | given up, error recorded / retried |
//! | delete   | stop VMM, release, destroy, unwire, remove row | given up, error recorded / retried |
//! | cleanup  | stop VMM, release, destroy, unwire, remove row | retried by the reconciler        |
//!
//! "stop VMM, release" is the one stop sequence (shutdown, a failed boot,
//! shutdown-on-exit); delete and cleanup are the one teardown built on it.

use std::fmt;

use crate::state::{Op, VmState};

/// A lifecycle change made of [`Step`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Plan {
    /// Addresses leased and interfaces attached for a new VM's row.
    Create,
    /// A VMM started for the VM and its guest running.
    Boot,
    /// The guest reset; backends that must respawn the VMM do so.
    Reboot,
    /// The VMM stopped and what it kept released; row and network stay.
    Shutdown,
    /// Everything of the VM removed at a client's request.
    Delete,
    /// Everything of a VM removed that cannot stay: a create that failed,
    /// found by the request itself or by the reconciler.
    Cleanup,
}

/// One idempotent piece of a [`Plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Step {
    /// Lease each interface's addresses and attach its devices. Done when
    /// every interface has an attachment recorded in the spec.
    Wire,
    /// Clear what an earlier VMM left and start a fresh one. Done when the
    /// row records a live VMM process.
    Spawn,
    /// Reset the guest (respawning the VMM where the backend must). Done
    /// when the recorded VMM is alive after the request.
    Restart,
    /// Stop the VMM (as the request asked; forced when resumed). Done when
    /// no recorded VMM process is alive.
    StopVmm,
    /// Free what the backend kept for the VMM (control socket, cgroups,
    /// metrics reader); the console log stays. Idempotent; always run.
    Release,
    /// Kill any process left by the VM's naming scheme and remove every
    /// file the backend made for it. Idempotent; always run.
    Destroy,
    /// Detach every interface and release every address. Done when no
    /// address is leased to the VM and no interface of it is found.
    Unwire,
    /// Remove the VM's row. Done when the row is gone.
    RemoveRow,
}

impl Step {
    /// The step's name in traces and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Wire => "wire",
            Step::Spawn => "spawn",
            Step::Restart => "restart",
            Step::StopVmm => "stop_vmm",
            Step::Release => "release",
            Step::Destroy => "destroy",
            Step::Unwire => "unwire",
            Step::RemoveRow => "remove_row",
        }
    }
}

/// What becomes of a plan whose step failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Run this plan instead, to undo what was done.
    Undo(Plan),
    /// Clear the record and keep the VM as it is, with the error recorded:
    /// the client was told and may try again.
    GiveUp,
    /// Keep the record: the reconciler resumes the plan later.
    Retry,
}

/// A plan in progress, as the VM's row records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanRecord {
    pub plan: Plan,
    /// Index of the first step not known to be done.
    pub next: usize,
}

impl Plan {
    /// Every plan, for exhaustive tests.
    pub const ALL: [Plan; 6] = [
        Plan::Create,
        Plan::Boot,
        Plan::Reboot,
        Plan::Shutdown,
        Plan::Delete,
        Plan::Cleanup,
    ];

    /// The steps, in order.
    pub fn steps(self) -> &'static [Step] {
        use Step::*;
        const TEARDOWN: &[Step] = &[StopVmm, Release, Destroy, Unwire, RemoveRow];
        match self {
            Plan::Create => &[Wire],
            Plan::Boot => &[Spawn],
            Plan::Reboot => &[Restart],
            Plan::Shutdown => &TEARDOWN[..2],
            Plan::Delete | Plan::Cleanup => TEARDOWN,
        }
    }

    /// What happens when a step fails, in a client's request
    /// (`resumed` false) or when metald resumes the plan after a restart or
    /// from the reconciler (`resumed` true: no client waits for the answer,
    /// so what must end, a stop or a removal, is retried until it does).
    pub fn on_failure(self, resumed: bool) -> Failure {
        match (self, resumed) {
            (Plan::Create, _) => Failure::Undo(Plan::Cleanup),
            (Plan::Boot | Plan::Reboot, _) => Failure::GiveUp,
            (Plan::Shutdown | Plan::Delete, false) => Failure::GiveUp,
            (Plan::Shutdown | Plan::Delete, true) | (Plan::Cleanup, _) => Failure::Retry,
        }
    }

    /// The plan that carries out a client's operation, for operations that
    /// take more than one call of a backend (pause and resume take one).
    pub fn for_op(op: Op) -> Option<Plan> {
        match op {
            Op::Boot => Some(Plan::Boot),
            Op::Reboot => Some(Plan::Reboot),
            Op::Shutdown => Some(Plan::Shutdown),
            Op::Delete => Some(Plan::Delete),
            Op::Pause | Op::Resume | Op::Crashed | Op::PoweredOff => None,
        }
    }

    /// Where a finished plan leaves the VM; `None`: the row is gone.
    pub fn ends_in(self) -> Option<VmState> {
        match self {
            Plan::Create => Some(VmState::Created),
            Plan::Boot | Plan::Reboot => Some(VmState::Running),
            Plan::Shutdown => Some(VmState::Shutdown),
            Plan::Delete | Plan::Cleanup => None,
        }
    }

    /// Whether the plan ends with the VM's row removed.
    pub fn removes_row(self) -> bool {
        self.steps().last() == Some(&Step::RemoveRow)
    }

    /// Stable name used in the store and in `backend_info`.
    pub fn as_str(self) -> &'static str {
        match self {
            Plan::Create => "create",
            Plan::Boot => "boot",
            Plan::Reboot => "reboot",
            Plan::Shutdown => "shutdown",
            Plan::Delete => "delete",
            Plan::Cleanup => "cleanup",
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PlanRecord {
    /// A plan about to take its first step.
    pub fn start(plan: Plan) -> Self {
        PlanRecord { plan, next: 0 }
    }

    /// The record as stored: `delete` at step 0, `delete@3` later.
    pub fn encode(self) -> String {
        match self.next {
            0 => self.plan.as_str().to_owned(),
            n => format!("{}@{n}", self.plan.as_str()),
        }
    }

    /// Inverse of [`PlanRecord::encode`]. Rows written before plans had
    /// steps hold the bare name, which reads as step 0.
    pub fn decode(s: &str) -> Option<Self> {
        let (name, next) = match s.split_once('@') {
            Some((n, i)) => (n, i.parse().ok()?),
            None => (s, 0),
        };
        let plan = Plan::ALL.into_iter().find(|p| p.as_str() == name)?;
        (next <= plan.steps().len()).then_some(PlanRecord { plan, next })
    }

    /// The steps still to take.
    pub fn remaining(self) -> &'static [Step] {
        &self.plan.steps()[self.next.min(self.plan.steps().len())..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_record_of_every_plan_survives_the_store() {
        for plan in Plan::ALL {
            for next in 0..=plan.steps().len() {
                let r = PlanRecord { plan, next };
                assert_eq!(PlanRecord::decode(&r.encode()), Some(r), "{}", r.encode());
                assert_eq!(r.remaining().len(), plan.steps().len() - next);
            }
            let past = format!("{}@{}", plan.as_str(), plan.steps().len() + 1);
            assert_eq!(PlanRecord::decode(&past), None, "{past}");
        }
        for bad in ["", "@1", "boot@", "boot@x", "boot@-1", "BOOT", "boot@1@1"] {
            assert_eq!(PlanRecord::decode(bad), None, "{bad:?}");
        }
        // Rows from before plans had steps.
        for old in ["create", "boot", "shutdown", "delete"] {
            assert_eq!(PlanRecord::decode(old).map(|r| r.next), Some(0), "{old}");
        }
    }

    #[test]
    fn the_stop_sequence_and_the_teardown_are_written_once() {
        let stop = Plan::Shutdown.steps();
        assert_eq!(stop, [Step::StopVmm, Step::Release]);
        for p in [Plan::Delete, Plan::Cleanup] {
            assert!(p.steps().starts_with(stop), "{p} stops like shutdown");
            assert!(p.removes_row());
        }
        assert_eq!(Plan::Delete.steps(), Plan::Cleanup.steps());
        for p in Plan::ALL {
            assert!(!p.steps().is_empty(), "{p}");
            for resumed in [false, true] {
                if let Failure::Undo(u) = p.on_failure(resumed) {
                    assert_eq!(u.on_failure(resumed), Failure::Retry, "{p}: an undo ends");
                    assert!(u.removes_row(), "{p}");
                }
            }
            if p.steps().contains(&Step::RemoveRow) {
                assert_eq!(p.steps().last(), Some(&Step::RemoveRow), "{p}");
            }
            assert_eq!(p.removes_row(), p.ends_in().is_none(), "{p}");
        }
    }

    /// Every (state, operation) pair: a plan ends where the state machine
    /// says the operation leads, and is only ever started where it is legal.
    #[test]
    fn plans_end_where_the_state_machine_leads() {
        use crate::state::{Outcome, next};
        let mut used = std::collections::HashSet::new();
        for state in VmState::ALL {
            for op in Op::ALL {
                let (Some(plan), Some(outcome)) = (Plan::for_op(op), next(state, op)) else {
                    continue;
                };
                used.insert(plan);
                let want = match outcome {
                    Outcome::To(s) => Some(s),
                    Outcome::Gone => None,
                };
                assert_eq!(plan.ends_in(), want, "{op:?} from {state}");
            }
        }
        // The rest are started by metald itself, never by a client's op.
        for p in Plan::ALL {
            let by_metald = matches!(p, Plan::Create | Plan::Cleanup);
            assert_eq!(used.contains(&p), !by_metald, "{p}");
        }
    }
}
