//! Named crash points for the reliability suite.
//!
//! With `SANDPIT_FAULT_POINT=<name>` in its environment the server aborts (like `kill -9`: no
//! destructor runs, nothing is cleaned up) the first time it reaches [`point`]`(<name>)`.
//! The suite restarts it without the variable and checks that reconciliation leaves every
//! sandbox running, suspended or failed with a reason, and loses no acknowledged write. Unset,
//! a point costs one comparison.

use std::sync::OnceLock;

/// Every point, in the order an operation reaches them.
pub const POINTS: &[&str] = &[
    "create.inserted",
    "create.booted",
    "hibernate.checkpointed",
    "wake.restored",
    "fork.copied",
    "fork.parent_restored",
    "destroy.torn_down",
    "upload.written",
    "relay.answered",
];

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Abort here if `SANDPIT_FAULT_POINT` names this point.
pub fn point(name: &'static str) {
    debug_assert!(POINTS.contains(&name), "unlisted fault point {name}");
    let armed = ARMED.get_or_init(|| {
        std::env::var("SANDPIT_FAULT_POINT")
            .ok()
            .filter(|p| !p.is_empty())
    });
    if armed.as_deref() == Some(name) {
        tracing::error!(point = name, "SANDPIT_FAULT_POINT reached: aborting");
        std::process::abort();
    }
}
