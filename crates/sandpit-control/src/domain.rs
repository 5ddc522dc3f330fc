//! The domain: a sandbox's lifecycle [`Status`] with the transitions it allows, and
//! [`Stored`] records that decode fail-closed.
//!
//! The store decodes every row at its edge: a status, mode or privacy no version wrote is
//! a [`ControlError::Corrupt`], never a default. JSON records (environment, egress policy)
//! stay [`Stored`] until an operation needs them, so a sandbox whose policy does not
//! decode can still be listed, shown and destroyed, while whatever needs the policy fails.

use std::fmt;
use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ControlError;

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Status {
    /// Being created (row inserted, runtime starting). Counts against the running quota.
    Creating,
    /// Running in the warm pool, owned by the system workspace until a create takes it.
    Pooled,
    Running,
    /// Memory and processes saved to disk; holds no network slot.
    Suspended,
    /// Gone. The row stays so ids are never reused and late calls get a clear answer.
    Destroyed,
    /// Could not be started or recovered; `error` says why.
    Failed,
}

/// A named change of [`Status`]; [`Status::apply`] says whether it is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The runtime answered: creating → running, or a pooled sandbox's boot done.
    Started,
    /// A warm-pool sandbox finished booting and waits for a create: creating → pooled.
    Parked,
    /// A create hands out a pooled sandbox.
    TakenFromPool,
    Suspend,
    Wake,
    Destroy,
    Fail,
}

impl Status {
    pub const ALL: [Status; 6] = [
        Status::Creating,
        Status::Pooled,
        Status::Running,
        Status::Suspended,
        Status::Destroyed,
        Status::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Pooled => "pooled",
            Status::Running => "running",
            Status::Suspended => "suspended",
            Status::Destroyed => "destroyed",
            Status::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Destroyed and failed sandboxes never change again (a failed one may still be
    /// destroyed, which only records that its leftovers are gone).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Destroyed | Status::Failed)
    }

    /// Whether the sandbox holds runtime resources (a running container or its image).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            Status::Creating | Status::Pooled | Status::Running | Status::Suspended
        )
    }

    /// The status every allowed use of `t` lands on.
    pub fn target_of(t: Transition) -> Status {
        match t {
            Transition::Started | Transition::TakenFromPool | Transition::Wake => Status::Running,
            Transition::Parked => Status::Pooled,
            Transition::Suspend => Status::Suspended,
            Transition::Destroy => Status::Destroyed,
            Transition::Fail => Status::Failed,
        }
    }

    /// The statuses `t` is allowed from.
    pub fn sources_of(t: Transition) -> Vec<Status> {
        Status::ALL
            .into_iter()
            .filter(|s| s.apply(t).is_some())
            .collect()
    }

    /// The status after `t`, or `None` when `t` is not allowed from here.
    pub fn apply(self, t: Transition) -> Option<Status> {
        use Status::*;
        use Transition::*;
        Some(match (self, t) {
            (Creating, Started) => Running,
            (Creating, Parked) => Pooled,
            (Pooled, TakenFromPool) => Running,
            (Running, Suspend) => Suspended,
            (Suspended, Wake) => Running,
            (Creating | Pooled | Running | Suspended | Failed, Destroy) => Destroyed,
            (Creating | Pooled | Running | Suspended, Fail) => Failed,
            _ => return None,
        })
    }

    /// The API's view: a pooled sandbox is never shown to a tenant; if one is, it is running.
    pub fn to_api(self) -> sandpit_api_types::SandboxStatus {
        use sandpit_api_types::SandboxStatus as A;
        match self {
            Status::Creating => A::Creating,
            Status::Pooled | Status::Running => A::Running,
            Status::Suspended => A::Suspended,
            Status::Destroyed => A::Destroyed,
            Status::Failed => A::Failed,
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<sandpit_api_types::SandboxStatus> for Status {
    fn from(s: sandpit_api_types::SandboxStatus) -> Status {
        use sandpit_api_types::SandboxStatus as A;
        match s {
            A::Creating => Status::Creating,
            A::Running => Status::Running,
            A::Suspended => Status::Suspended,
            A::Destroyed => Status::Destroyed,
            A::Failed => Status::Failed,
        }
    }
}

/// A JSON record kept as stored, decoded only when an operation needs it, and then
/// fail-closed: [`Stored::decode`] is an error naming the record, never a default.
pub struct Stored<T> {
    raw: String,
    _of: PhantomData<fn() -> T>,
}

impl<T> Stored<T> {
    /// A record as read from the store (not checked until decoded).
    pub fn from_raw(raw: String) -> Stored<T> {
        Stored {
            raw,
            _of: PhantomData,
        }
    }

    /// The stored text, for writing back or comparing.
    pub fn raw(&self) -> &str {
        &self.raw
    }
}

impl<T: Serialize> Stored<T> {
    /// Encode a value. Serializing the domain's own types does not fail; if one ever did,
    /// the record would hold `null` and fail closed when decoded.
    pub fn encode(value: &T) -> Stored<T> {
        Stored::from_raw(serde_json::to_string(value).unwrap_or_else(|_| "null".into()))
    }
}

impl<T: DeserializeOwned> Stored<T> {
    /// Decode, failing closed: `what` names the record in the error (e.g. "egress policy
    /// of sb_…").
    pub fn decode(&self, what: impl FnOnce() -> String) -> Result<T, ControlError> {
        serde_json::from_str(&self.raw).map_err(|e| ControlError::corrupt(what(), e))
    }
}

impl<T> Clone for Stored<T> {
    fn clone(&self) -> Self {
        Stored::from_raw(self.raw.clone())
    }
}

impl<T> fmt::Debug for Stored<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Stored({})", self.raw)
    }
}

impl<T> PartialEq for Stored<T> {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

/// An id newtype: which kind of object an id names is in its type, so a workspace id is
/// never passed where a sandbox id goes. Reads as `&str` (`Deref`), prints as itself.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> Self {
                $name(id.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }
        impl From<&str> for $name {
            fn from(id: &str) -> Self {
                $name(id.to_string())
            }
        }
        impl From<String> for $name {
            fn from(id: String) -> Self {
                $name(id)
            }
        }
        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
        impl PartialEq<$name> for String {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
    };
}

id_type!(
    /// A sandbox's id (`sb` and 16 hex digits for the ones this version makes).
    SandboxId
);
id_type!(
    /// A workspace's id (`ws_…`; `ws_system` owns the node's own sandboxes).
    WorkspaceId
);

/// Decode a stored enum-like column at the store edge.
pub(crate) fn parse_column<T>(
    what: &'static str,
    raw: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ControlError> {
    parse(raw).ok_or_else(|| ControlError::corrupt(what, format!("unknown value {raw:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TRANSITIONS: [Transition; 7] = [
        Transition::Started,
        Transition::Parked,
        Transition::TakenFromPool,
        Transition::Suspend,
        Transition::Wake,
        Transition::Destroy,
        Transition::Fail,
    ];

    #[test]
    fn statuses_round_trip_and_unknown_ones_are_refused() {
        for s in Status::ALL {
            assert_eq!(Status::parse(s.as_str()), Some(s));
        }
        for bad in ["", "Running", "running ", "deleted", "paused"] {
            assert_eq!(Status::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_lifecycle_allows_exactly_its_edges() {
        use Status::*;
        assert_eq!(Creating.apply(Transition::Started), Some(Running));
        assert_eq!(Running.apply(Transition::Suspend), Some(Suspended));
        assert_eq!(Suspended.apply(Transition::Wake), Some(Running));
        assert_eq!(Pooled.apply(Transition::TakenFromPool), Some(Running));
        assert_eq!(Suspended.apply(Transition::Suspend), None);
        assert_eq!(Running.apply(Transition::Wake), None);
        assert_eq!(Creating.apply(Transition::Suspend), None);
        assert_eq!(Failed.apply(Transition::Destroy), Some(Destroyed));
    }

    proptest! {
        /// Nothing leaves `destroyed`; `failed` only becomes `destroyed`; every allowed
        /// transition lands on a status that `parse` knows.
        #[test]
        fn final_states_stay_final(from in 0..6usize, t in 0..7usize) {
            let from = Status::ALL[from];
            let t = TRANSITIONS[t];
            if let Some(to) = from.apply(t) {
                prop_assert_ne!(from, Status::Destroyed);
                if from == Status::Failed {
                    prop_assert_eq!(to, Status::Destroyed);
                }
                prop_assert_eq!(Status::parse(to.as_str()), Some(to));
                prop_assert!(to != from, "a transition changes the status");
                prop_assert_eq!(to, Status::target_of(t), "one target per transition");
                prop_assert!(Status::sources_of(t).contains(&from));
            }
        }

        /// A stored record that is not valid JSON of its type never decodes to a value.
        #[test]
        fn stored_records_fail_closed(raw in ".{0,40}") {
            let stored: Stored<sandpit_api_types::EgressPolicy> = Stored::from_raw(raw.clone());
            if let Ok(p) = stored.decode(|| "egress".into()) {
                // Whatever decoded must be what the text says, not a default.
                let again: sandpit_api_types::EgressPolicy = serde_json::from_str(&raw).unwrap();
                prop_assert_eq!(p, again);
            }
        }
    }

    #[test]
    fn corrupt_records_name_what_they_are() {
        let s: Stored<sandpit_api_types::EgressPolicy> = Stored::from_raw("not json".into());
        let e = s.decode(|| "egress policy of sb_1".into()).unwrap_err();
        assert!(
            matches!(e, ControlError::Corrupt { ref what, .. } if what == "egress policy of sb_1")
        );
        let e = parse_column("status", "zombie", Status::parse).unwrap_err();
        assert!(e.to_string().contains("zombie"), "{e}");
    }
}
