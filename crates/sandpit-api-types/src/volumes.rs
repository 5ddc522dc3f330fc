//! Named volumes: storage of a workspace that outlives its sandboxes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The most volumes one sandbox mounts.
pub const MAX_VOLUME_MOUNTS: usize = 8;
/// The longest volume name.
pub const MAX_VOLUME_NAME: usize = 63;
/// The longest mount path.
pub const MAX_VOLUME_PATH: usize = 256;

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    /// `[a-z0-9-]`, 1 to 63 characters, unique in the workspace.
    #[schema(pattern = "^[a-z0-9-]{1,63}$")]
    pub name: String,
    /// Its size, e.g. `1G` or `512M` (default: the server's `small` disk size; at most
    /// four times that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9]+\s*([KMGT](i?B)?|B)?$")]
    pub size: Option<String>,
}

/// A volume.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Volume {
    pub name: String,
    pub size_bytes: u64,
    /// The node that holds it: sandboxes mounting it run there. `~stored` while it is only
    /// in object storage (its node drained): the next sandbox mounting it takes it to its
    /// node.
    pub node: String,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VolumeList {
    pub volumes: Vec<Volume>,
}

/// A volume to mount into a new sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeMountRequest {
    /// The volume's name.
    pub name: String,
    /// Absolute path in the sandbox (not `/`, nor under `/proc`, `/sys`, `/dev` or
    /// `/.sandpit`).
    pub path: String,
    /// Mount it read-only (writes fail with EROFS). A volume has at most one read-write
    /// mount among live sandboxes; read-only mounts are not limited.
    #[serde(default)]
    pub read_only: bool,
}

/// Whether `name` is a valid volume name (`[a-z0-9-]`, 1 to 63 characters).
pub fn valid_volume_name(name: &str) -> bool {
    (1..=MAX_VOLUME_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Where a volume may not be mounted: the sandbox's kernel interfaces and the agent's files.
const RESERVED: &[&str] = &["/proc", "/sys", "/dev", "/.sandpit"];

/// A mount path, normalized (`//` and a trailing `/` dropped), or why it is refused:
/// relative, `.` or `..` components, characters other than `[A-Za-z0-9._-]` in a component,
/// too long, `/`, `/tmp` itself, or in a reserved tree.
pub fn normalize_volume_path(path: &str) -> Result<String, String> {
    if path.len() > MAX_VOLUME_PATH {
        return Err(format!("longer than {MAX_VOLUME_PATH} bytes"));
    }
    if !path.starts_with('/') {
        return Err("must be absolute".into());
    }
    let mut out = String::new();
    for c in path.split('/').filter(|c| !c.is_empty()) {
        if c == "." || c == ".." {
            return Err("must not contain `.` or `..`".into());
        }
        if !c
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err("components may hold only [A-Za-z0-9._-]".into());
        }
        out.push('/');
        out.push_str(c);
    }
    if out.is_empty() {
        return Err("cannot be /".into());
    }
    if out == "/tmp" {
        return Err("cannot be /tmp itself (a directory below it is fine)".into());
    }
    if let Some(r) = RESERVED
        .iter()
        .find(|r| out == **r || out.starts_with(&format!("{r}/")))
    {
        return Err(format!("cannot be in {r}"));
    }
    Ok(out)
}

/// Whether one of two normalized paths is the other or lies below it.
pub fn paths_nest(a: &str, b: &str) -> bool {
    a == b || a.starts_with(&format!("{b}/")) || b.starts_with(&format!("{a}/"))
}

/// A size such as `1G`, `512M`, `64MiB` or a number of bytes.
pub fn parse_volume_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let unit = unit.trim().to_ascii_uppercase();
    let shift = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names() {
        for ok in ["a", "data", "my-vol-2", &"a".repeat(63)] {
            assert!(valid_volume_name(ok), "{ok}");
        }
        for bad in [
            "",
            "../x",
            "a/b",
            "a\0b",
            "Data",
            "vé",
            "a_b",
            "a.b",
            " a",
            &"a".repeat(64),
        ] {
            assert!(!valid_volume_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn volume_paths() {
        assert_eq!(normalize_volume_path("/data").unwrap(), "/data");
        assert_eq!(
            normalize_volume_path("//work//cache/").unwrap(),
            "/work/cache"
        );
        assert_eq!(normalize_volume_path("/tmp/x").unwrap(), "/tmp/x");
        assert_eq!(normalize_volume_path("/devices").unwrap(), "/devices");
        for bad in [
            "",
            "/",
            "//",
            "data",
            "/a/../b",
            "/a/./b",
            "/proc",
            "/proc/x",
            "/sys/fs",
            "/dev",
            "/dev/shm",
            "/.sandpit",
            "/.sandpit/agent",
            "/tmp",
            "/a\0b",
            "/é",
            "/a b",
            &format!("/{}", "a".repeat(300)),
        ] {
            assert!(normalize_volume_path(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn nesting() {
        assert!(paths_nest("/a", "/a"));
        assert!(paths_nest("/a", "/a/b"));
        assert!(paths_nest("/a/b", "/a"));
        assert!(!paths_nest("/a", "/ab"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_volume_size("1G"), Some(1 << 30));
        assert_eq!(parse_volume_size("512M"), Some(512 << 20));
        assert_eq!(parse_volume_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_volume_size("100"), Some(100));
        assert_eq!(parse_volume_size("1X"), None);
        assert_eq!(parse_volume_size("G"), None);
        assert_eq!(parse_volume_size("99999999999T"), None);
    }
}
