//! The rules of a create that need nothing but the request and the server's defaults:
//! size, lifetimes, environment and metadata. Checked before any lookup, so a request that
//! breaks one is refused (`Invalid{code}`) having read and changed nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use sandpit_api_types::{
    CreateSandboxRequest, MAX_EPHEMERAL_TIMEOUT_SECS, SandboxMode, parse_duration,
};

use crate::error::ControlError;

/// Longest idle timeout of a persistent sandbox.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);
/// Most metadata entries, and the longest key and value.
pub const MAX_METADATA: (usize, usize, usize) = (64, 256, 4096);

/// A sandbox size preset: CPU (thousandths of a core) and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    pub name: &'static str,
    pub cpu_millis: u32,
    pub memory_bytes: u64,
}

/// The presets, smallest first.
pub const SIZES: [Size; 3] = [
    Size {
        name: "small",
        cpu_millis: 1000,
        memory_bytes: 1 << 30,
    },
    Size {
        name: "medium",
        cpu_millis: 2000,
        memory_bytes: 2 << 30,
    },
    Size {
        name: "large",
        cpu_millis: 4000,
        memory_bytes: 4 << 30,
    },
];

impl Size {
    pub fn parse(name: &str) -> Option<Size> {
        SIZES.into_iter().find(|s| s.name == name)
    }

    /// `Invalid{invalid_size}` naming the presets.
    pub fn checked(name: &str) -> Result<Size, ControlError> {
        Size::parse(name).ok_or_else(|| {
            let names: Vec<_> = SIZES.iter().map(|s| s.name).collect();
            invalid(
                "invalid_size",
                format!("size must be one of {names:?}, not {name:?}"),
            )
        })
    }
}

/// The server's defaults for what a request leaves out.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub timeout: Duration,
    pub idle_timeout: Duration,
}

/// How long a sandbox lives: an ephemeral one until `expires_at`, a persistent one until it
/// has been idle for `idle_timeout_ms` (then it is suspended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    pub timeout_ms: Option<i64>,
    pub idle_timeout_ms: Option<i64>,
    pub expires_at: Option<i64>,
}

fn invalid(code: &'static str, message: impl Into<String>) -> ControlError {
    ControlError::Invalid {
        code,
        message: message.into(),
    }
}

/// Everything about a create that the request alone decides. `now` is Unix milliseconds.
pub fn check_request(
    req: &CreateSandboxRequest,
    defaults: &Defaults,
    now: i64,
) -> Result<Lifetimes, ControlError> {
    if req.snapshot.is_none() && req.template.trim().is_empty() {
        return Err(invalid(
            "missing_template",
            "template (or snapshot) is required",
        ));
    }
    if let Some(size) = &req.size {
        Size::checked(size)?;
    }
    let lifetimes = lifetimes(
        req.mode,
        req.timeout.as_deref(),
        req.idle_timeout.as_deref(),
        defaults,
        now,
    )?;
    check_env(&req.env)?;
    check_metadata(&req.metadata)?;
    Ok(lifetimes)
}

/// An ephemeral sandbox takes `timeout` (1 s to 24 h), a persistent one `idle_timeout`
/// (1 s to 7 d); naming the other one is an error, not ignored.
pub fn lifetimes(
    mode: SandboxMode,
    timeout: Option<&str>,
    idle_timeout: Option<&str>,
    defaults: &Defaults,
    now: i64,
) -> Result<Lifetimes, ControlError> {
    let parse = |text: &str| parse_duration(text).map_err(|m| invalid("invalid_timeout", m));
    match mode {
        SandboxMode::Ephemeral => {
            if idle_timeout.is_some() {
                return Err(invalid(
                    "invalid_timeout",
                    "idle_timeout applies to persistent sandboxes only",
                ));
            }
            let t = timeout.map(parse).transpose()?.unwrap_or(defaults.timeout);
            if t.is_zero() || t > Duration::from_secs(MAX_EPHEMERAL_TIMEOUT_SECS) {
                return Err(invalid(
                    "invalid_timeout",
                    "timeout must be between 1s and 24h",
                ));
            }
            let ms = t.as_millis() as i64;
            Ok(Lifetimes {
                timeout_ms: Some(ms),
                idle_timeout_ms: None,
                expires_at: Some(now + ms),
            })
        }
        SandboxMode::Persistent => {
            if timeout.is_some() {
                return Err(invalid(
                    "invalid_timeout",
                    "timeout applies to ephemeral sandboxes only; use idle_timeout",
                ));
            }
            let t = idle_timeout
                .map(parse)
                .transpose()?
                .unwrap_or(defaults.idle_timeout);
            if t < Duration::from_secs(1) || t > MAX_IDLE_TIMEOUT {
                return Err(invalid(
                    "invalid_timeout",
                    "idle_timeout must be between 1s and 7d",
                ));
            }
            Ok(Lifetimes {
                timeout_ms: None,
                idle_timeout_ms: Some(t.as_millis() as i64),
                expires_at: None,
            })
        }
    }
}

/// Variable names are non-empty and hold no `=` or NUL; values hold no NUL.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), ControlError> {
    if let Some(key) = env
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
    {
        return Err(invalid(
            "invalid_env",
            format!("invalid environment variable name {key:?}"),
        ));
    }
    if env.values().any(|v| v.contains('\0')) {
        return Err(invalid(
            "invalid_env",
            "environment values must not contain NUL",
        ));
    }
    Ok(())
}

/// At most 64 entries, keys up to 256 and values up to 4096 bytes.
pub fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), ControlError> {
    let (entries, key, value) = MAX_METADATA;
    if metadata.len() > entries
        || metadata
            .iter()
            .any(|(k, v)| k.len() > key || v.len() > value)
    {
        return Err(invalid(
            "invalid_metadata",
            "metadata holds at most 64 entries, keys up to 256 and values up to 4096 bytes",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: Defaults = Defaults {
        timeout: Duration::from_secs(300),
        idle_timeout: Duration::from_secs(600),
    };

    fn code(e: ControlError) -> &'static str {
        match e {
            ControlError::Invalid { code, .. } => code,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn lifetimes_follow_the_mode() {
        let l = lifetimes(SandboxMode::Ephemeral, None, None, &D, 1000).unwrap();
        assert_eq!(
            l,
            Lifetimes {
                timeout_ms: Some(300_000),
                idle_timeout_ms: None,
                expires_at: Some(301_000)
            }
        );
        let l = lifetimes(SandboxMode::Persistent, None, Some("2m"), &D, 1000).unwrap();
        assert_eq!(
            l,
            Lifetimes {
                timeout_ms: None,
                idle_timeout_ms: Some(120_000),
                expires_at: None
            }
        );
        for (mode, t, i) in [
            (SandboxMode::Ephemeral, None, Some("1m")),
            (SandboxMode::Persistent, Some("1m"), None),
            (SandboxMode::Ephemeral, Some("0s"), None),
            (SandboxMode::Ephemeral, Some("25h"), None),
            (SandboxMode::Persistent, None, Some("8d")),
            (SandboxMode::Ephemeral, Some("soon"), None),
        ] {
            assert_eq!(
                code(lifetimes(mode, t, i, &D, 0).unwrap_err()),
                "invalid_timeout",
                "{t:?} {i:?}"
            );
        }
    }

    #[test]
    fn requests_are_checked_before_any_lookup() {
        let mut req = CreateSandboxRequest::default();
        assert_eq!(
            code(check_request(&req, &D, 0).unwrap_err()),
            "missing_template"
        );
        req.template = "base".into();
        assert!(check_request(&req, &D, 0).is_ok());
        req.size = Some("huge".into());
        assert_eq!(
            code(check_request(&req, &D, 0).unwrap_err()),
            "invalid_size"
        );
        req.size = Some("large".into());
        req.env.insert("A=B".into(), "x".into());
        assert_eq!(code(check_request(&req, &D, 0).unwrap_err()), "invalid_env");
        req.env.clear();
        req.env.insert("A".into(), "x\0y".into());
        assert_eq!(code(check_request(&req, &D, 0).unwrap_err()), "invalid_env");
        req.env.clear();
        req.metadata.insert("k".repeat(257), "v".into());
        assert_eq!(
            code(check_request(&req, &D, 0).unwrap_err()),
            "invalid_metadata"
        );
        assert_eq!(Size::parse("medium").map(|s| s.cpu_millis), Some(2000));
    }

    proptest! {
        /// Whatever the text, a timeout is refused with `invalid_timeout` or lands in 1 s..24 h
        /// (ephemeral) and expires exactly that long after `now`.
        #[test]
        fn any_timeout_text_is_refused_or_in_range(text in ".{0,12}", now in 0i64..1 << 40) {
            match lifetimes(SandboxMode::Ephemeral, Some(&text), None, &D, now) {
                Ok(l) => {
                    let ms = l.timeout_ms.unwrap();
                    prop_assert!((1..=MAX_EPHEMERAL_TIMEOUT_SECS as i64 * 1000).contains(&ms));
                    prop_assert_eq!(l.expires_at, Some(now + ms));
                }
                Err(e) => prop_assert_eq!(code(e), "invalid_timeout"),
            }
        }

        /// Any environment either passes with names free of `=` and NUL, or is refused.
        #[test]
        fn env_names_never_smuggle_assignments(keys in proptest::collection::btree_map(".{0,6}", ".{0,6}", 0..4)) {
            match check_env(&keys) {
                Ok(()) => prop_assert!(keys.iter().all(|(k, v)| !k.is_empty() && !k.contains('=') && !k.contains('\0') && !v.contains('\0'))),
                Err(e) => prop_assert_eq!(code(e), "invalid_env"),
            }
        }
    }
}
