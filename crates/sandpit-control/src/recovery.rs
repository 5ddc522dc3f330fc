//! What becomes of a sandbox the server finds after a restart or sees die: the decisions of
//! crash recovery and the liveness watch, as pure functions. The server gathers the facts
//! (the row, whether the runtime still runs it and its agent answers) and carries out the
//! answer (teardown, stop, store settlement).

use sandpit_api_types::SandboxMode;

use crate::domain::Status;

/// The note a persistent sandbox found stopped after a restart carries.
pub const LOST_WHILE_DOWN: &str =
    "stopped while the server was down; memory was lost, files were kept";
/// The note an ephemeral sandbox found stopped after a restart carries.
pub const EPHEMERAL_LOST_WHILE_DOWN: &str = "the sandbox stopped while the server was down";
/// The note of a create the server was in the middle of.
pub const INTERRUPTED_CREATE: &str = "the server stopped while this sandbox was being created";

/// What to do with one sandbox found at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Warm-pool sandboxes are not kept across restarts: tear down, mark destroyed (the pool
    /// is refilled fresh).
    DiscardPooled,
    /// A create was under way: tear down, mark failed with [`INTERRUPTED_CREATE`].
    FailInterruptedCreate,
    /// It runs and its agent answers: keep it (runtime, network slot, files) and adopt its
    /// egress rules.
    Adopt,
    /// Persistent and no longer running: stop what is left, give the slot back, mark
    /// suspended with [`LOST_WHILE_DOWN`]; its files are kept.
    SuspendLost,
    /// Ephemeral and no longer running: tear down, mark failed with
    /// [`EPHEMERAL_LOST_WHILE_DOWN`].
    FailLost,
    /// Suspended: nothing may run; files and image are kept, and a slot it still holds
    /// (from an older server) is given back.
    KeepSuspended { release_slot: bool },
    /// Destroyed or failed: nothing to do (the start-up listing leaves these out).
    Nothing,
}

/// The decision for a row in `status`. `answers` says whether the runtime still runs a
/// `running` sandbox and its agent answers; it is asked only for those (`None` otherwise).
pub fn after_restart(
    status: Status,
    mode: SandboxMode,
    answers: Option<bool>,
    holds_slot: bool,
) -> Recovery {
    match status {
        Status::Pooled => Recovery::DiscardPooled,
        Status::Creating => Recovery::FailInterruptedCreate,
        Status::Running if answers == Some(true) && holds_slot => Recovery::Adopt,
        Status::Running => after_death(mode),
        Status::Suspended => Recovery::KeepSuspended {
            release_slot: holds_slot,
        },
        Status::Destroyed | Status::Failed => Recovery::Nothing,
    }
}

/// A running sandbox that died (found by the liveness watch, or stopped while the server was
/// down): a persistent one keeps its files and is suspended, an ephemeral one fails.
pub fn after_death(mode: SandboxMode) -> Recovery {
    match mode {
        SandboxMode::Persistent => Recovery::SuspendLost,
        SandboxMode::Ephemeral => Recovery::FailLost,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn mode(persistent: bool) -> SandboxMode {
        if persistent {
            SandboxMode::Persistent
        } else {
            SandboxMode::Ephemeral
        }
    }

    proptest! {
        /// Only a running sandbox whose agent answers, with its slot, is kept running; a
        /// persistent sandbox never loses its files (never failed or discarded unless it was
        /// pooled or still being created); final rows are never touched.
        #[test]
        fn recovery_keeps_only_what_answers(s in 0..6usize, persistent: bool, answers: Option<bool>, slot: bool) {
            let status = Status::ALL[s];
            let r = after_restart(status, mode(persistent), answers, slot);
            if r == Recovery::Adopt {
                prop_assert!(status == Status::Running && answers == Some(true) && slot);
            }
            if persistent && matches!(status, Status::Running | Status::Suspended) {
                let keeps_files = matches!(
                    r,
                    Recovery::Adopt | Recovery::SuspendLost | Recovery::KeepSuspended { .. }
                );
                prop_assert!(keeps_files, "{:?}", r);
            }
            if status.is_final() {
                prop_assert_eq!(r, Recovery::Nothing);
            }
            if let Recovery::KeepSuspended { release_slot } = r {
                prop_assert_eq!(release_slot, slot);
            }
        }
    }

    #[test]
    fn the_table() {
        use SandboxMode::*;
        assert_eq!(
            after_restart(Status::Pooled, Ephemeral, None, true),
            Recovery::DiscardPooled
        );
        assert_eq!(
            after_restart(Status::Creating, Persistent, None, true),
            Recovery::FailInterruptedCreate
        );
        assert_eq!(
            after_restart(Status::Running, Ephemeral, Some(true), true),
            Recovery::Adopt
        );
        assert_eq!(
            after_restart(Status::Running, Ephemeral, Some(true), false),
            Recovery::FailLost,
            "no slot: unreachable"
        );
        assert_eq!(
            after_restart(Status::Running, Persistent, Some(false), true),
            Recovery::SuspendLost
        );
        assert_eq!(
            after_restart(Status::Running, Ephemeral, Some(false), true),
            Recovery::FailLost
        );
        assert_eq!(after_death(Persistent), Recovery::SuspendLost);
    }
}
