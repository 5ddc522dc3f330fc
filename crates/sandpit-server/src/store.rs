//! The store is the control layer's (`sandpit_control::store`: one handle per aggregate,
//! SQLite or PostgreSQL); the CodeSandbox tables are `crate::csb_store`'s.

pub use sandpit_control::store::*;
