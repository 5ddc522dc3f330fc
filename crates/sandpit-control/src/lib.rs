//! Sandpit's control layer: the typed domain (a sandbox's [`Status`] and its allowed
//! transitions, stored records that decode fail-closed) and the [`Store`], split by
//! aggregate, on SQLite or PostgreSQL behind one interface.
//!
//! Invariant: this crate knows no HTTP (no axum, hyper or status codes; checked by
//! `tests/no_http.rs`). The HTTP edge (`sandpit-server`) maps [`ControlError`] once.

pub mod agent;
pub mod agent_terminal;
pub mod agent_watch;
pub mod create;
pub mod domain;
pub mod error;
pub mod faults;
pub mod live;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod recovery;
pub mod remote;
// Workspace secrets: node-side (lineage CAs, the proxy), one room with `node`.
pub use node::secrets;
/// The phase recorder of create, wake, fork and hibernate (see `sandpit_runtime::phases`).
pub use sandpit_runtime::phases;
pub mod store;
#[cfg(any(test, feature = "fake"))]
pub mod testing;
pub mod tokens;
pub mod trace;
pub mod util;

pub use domain::{SandboxId, Status, Stored, Transition, WorkspaceId};
pub use error::{ControlError, DisplayChain, decode};
pub use node::{Node, NodeConfig};
pub use store::{Backend, Db, Store};
