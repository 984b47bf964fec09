//! The VM lifecycle state machine: every legal move, in one table.
//!
//! ```text
//!            boot                pause
//! Created ─────────▶ Running ◀════════▶ Paused
//!                    │  ▲  reboot ↺       │
//!           shutdown │  │ boot            │ shutdown
//!                    ▼  │                 │
//!                  Shutdown ◀─────────────┘
//! Running/Paused ──(VMM exits on its own)──▶ Failed ──boot──▶ Running
//! any ──delete──▶ (gone)
//! ```
//!
//! The service asks [`next`] before touching a backend; an illegal move is
//! answered with `failed_precondition` naming the current state.

use serde::{Deserialize, Serialize};

/// Where a VM is in its life. Numbers match `vmprovisioner.v1.VmState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum VmState {
    /// Recorded, never booted (or configuration only): no VMM process.
    Created,
    /// A VMM process exists and the guest's vCPUs run.
    Running,
    /// A VMM process exists and the guest's vCPUs are stopped.
    Paused,
    /// Stopped on request (or the guest powered itself off): no VMM process.
    Shutdown,
    /// The VMM exited without being asked, or a step failed: no VMM process.
    Failed,
}

impl VmState {
    /// Every state, for exhaustive tests and listings.
    pub const ALL: [VmState; 5] = [
        VmState::Created,
        VmState::Running,
        VmState::Paused,
        VmState::Shutdown,
        VmState::Failed,
    ];

    /// Whether a VMM process is expected to exist in this state.
    pub fn has_process(self) -> bool {
        matches!(self, VmState::Running | VmState::Paused)
    }

    /// Stable name used in the store and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Shutdown => "shutdown",
            VmState::Failed => "failed",
        }
    }

    /// Inverse of [`VmState::as_str`].
    pub fn parse(s: &str) -> Option<Self> {
        VmState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that moves a VM: a client request or an observed event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Boot,
    Pause,
    Resume,
    Reboot,
    Shutdown,
    Delete,
    /// The VMM process exited without metald asking it to.
    Crashed,
    /// The guest powered itself off and the VMM exited cleanly.
    PoweredOff,
}

impl Op {
    /// Every operation, for exhaustive tests.
    pub const ALL: [Op; 8] = [
        Op::Boot,
        Op::Pause,
        Op::Resume,
        Op::Reboot,
        Op::Shutdown,
        Op::Delete,
        Op::Crashed,
        Op::PoweredOff,
    ];

    /// The verb used in error messages.
    pub fn verb(self) -> &'static str {
        match self {
            Op::Boot => "boot",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Reboot => "reboot",
            Op::Shutdown => "shut down",
            Op::Delete => "delete",
            Op::Crashed => "record a crash of",
            Op::PoweredOff => "record a power-off of",
        }
    }
}

/// What a legal move leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The VM ends up in this state.
    To(VmState),
    /// The VM and everything it owns are removed.
    Gone,
}

/// The transition table. `None` means the move is illegal from `from`.
pub fn next(from: VmState, op: Op) -> Option<Outcome> {
    use Outcome::{Gone, To};
    use VmState as S;
    match (from, op) {
        (_, Op::Delete) => Some(Gone),
        (S::Created | S::Shutdown | S::Failed, Op::Boot) => Some(To(S::Running)),
        (S::Running, Op::Pause) => Some(To(S::Paused)),
        (S::Paused, Op::Resume) => Some(To(S::Running)),
        (S::Running, Op::Reboot) => Some(To(S::Running)),
        (S::Running | S::Paused, Op::Shutdown) => Some(To(S::Shutdown)),
        (S::Running | S::Paused, Op::Crashed) => Some(To(S::Failed)),
        (S::Running | S::Paused, Op::PoweredOff) => Some(To(S::Shutdown)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole table, written out independently of `next`, so a change to
    /// either is caught. Every (state, op) pair appears exactly once.
    #[test]
    fn table_is_exactly_as_specified() {
        use Op::{Boot, Crashed, Delete, Pause, PoweredOff, Reboot, Resume};
        use Outcome::{Gone, To};
        use VmState::{Created, Failed, Paused, Running};
        const SHUTDOWN: VmState = VmState::Shutdown;
        const STOP: Op = Op::Shutdown;
        let expected: &[(VmState, Op, Option<Outcome>)] = &[
            (Created, Boot, Some(To(Running))),
            (Created, Pause, None),
            (Created, Resume, None),
            (Created, Reboot, None),
            (Created, STOP, None),
            (Created, Delete, Some(Gone)),
            (Created, Crashed, None),
            (Created, PoweredOff, None),
            (Running, Boot, None),
            (Running, Pause, Some(To(Paused))),
            (Running, Resume, None),
            (Running, Reboot, Some(To(Running))),
            (Running, STOP, Some(To(SHUTDOWN))),
            (Running, Delete, Some(Gone)),
            (Running, Crashed, Some(To(Failed))),
            (Running, PoweredOff, Some(To(SHUTDOWN))),
            (Paused, Boot, None),
            (Paused, Pause, None),
            (Paused, Resume, Some(To(Running))),
            (Paused, Reboot, None),
            (Paused, STOP, Some(To(SHUTDOWN))),
            (Paused, Delete, Some(Gone)),
            (Paused, Crashed, Some(To(Failed))),
            (Paused, PoweredOff, Some(To(SHUTDOWN))),
            (SHUTDOWN, Boot, Some(To(Running))),
            (SHUTDOWN, Pause, None),
            (SHUTDOWN, Resume, None),
            (SHUTDOWN, Reboot, None),
            (SHUTDOWN, STOP, None),
            (SHUTDOWN, Delete, Some(Gone)),
            (SHUTDOWN, Crashed, None),
            (SHUTDOWN, PoweredOff, None),
            (Failed, Boot, Some(To(Running))),
            (Failed, Pause, None),
            (Failed, Resume, None),
            (Failed, Reboot, None),
            (Failed, STOP, None),
            (Failed, Delete, Some(Gone)),
            (Failed, Crashed, None),
            (Failed, PoweredOff, None),
        ];
        assert_eq!(expected.len(), VmState::ALL.len() * Op::ALL.len());
        for state in VmState::ALL {
            for op in Op::ALL {
                let want = expected
                    .iter()
                    .find(|(s, o, _)| *s == state && *o == op)
                    .map(|(_, _, w)| *w)
                    .unwrap_or_else(|| panic!("table misses ({state}, {op:?})"));
                assert_eq!(next(state, op), want, "({state}, {op:?})");
            }
        }
    }

    #[test]
    fn process_exists_exactly_in_running_and_paused() {
        for s in VmState::ALL {
            assert_eq!(
                s.has_process(),
                matches!(s, VmState::Running | VmState::Paused)
            );
        }
    }

    #[test]
    fn names_round_trip() {
        for s in VmState::ALL {
            assert_eq!(VmState::parse(s.as_str()), Some(s));
        }
        assert_eq!(VmState::parse("deleted"), None);
    }
}
