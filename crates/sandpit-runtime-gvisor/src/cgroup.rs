//! Where runsc puts a sandbox's cgroups, and reading the limits back.
//!
//! A relative `cgroupsPath` is resolved by runsc against the cgroup of the calling process (the
//! server), per hierarchy; an absolute one against the hierarchy root. Both cgroup v1 (one
//! hierarchy per controller, as on hosts with a hybrid layout) and v2 are handled.
#![expect(
    clippy::disallowed_methods,
    reason = "cgroupfs and /proc are the kernel's"
)]

use std::path::{Component, Path, PathBuf};

use crate::mounts::MountInfo;

/// One mounted cgroup hierarchy and the calling process's place in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hierarchy {
    pub mount_point: PathBuf,
    /// The process's cgroup relative to the mount point.
    pub self_rel: PathBuf,
    /// v1 controllers (`memory`, `cpu`, `name=systemd`...); empty for v2.
    pub controllers: Vec<String>,
    pub v2: bool,
}

impl Hierarchy {
    /// The directory of `cgroups_path` (relative or absolute) in this hierarchy.
    pub fn dir(&self, cgroups_path: &str) -> PathBuf {
        match cgroups_path.strip_prefix('/') {
            Some(abs) => self.mount_point.join(abs),
            None => self.mount_point.join(&self.self_rel).join(cgroups_path),
        }
    }

    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// Matches cgroup mounts with the lines of `/proc/self/cgroup`.
pub(crate) fn hierarchies(mounts: &[MountInfo], self_cgroup: &str) -> Vec<Hierarchy> {
    let lines: Vec<(Vec<String>, PathBuf)> = self_cgroup
        .lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let ctrl = parts.next()?;
            let path = parts.next()?;
            let ctrls = ctrl
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((ctrls, PathBuf::from(path)))
        })
        .collect();
    let mut out: Vec<Hierarchy> = Vec::new();
    for m in mounts {
        let (v2, controllers) = match m.fstype.as_str() {
            "cgroup2" => (true, Vec::new()),
            "cgroup" => (
                false,
                m.super_options
                    .split(',')
                    .filter(|o| *o != "rw" && *o != "ro")
                    .map(str::to_string)
                    .collect::<Vec<_>>(),
            ),
            _ => continue,
        };
        let line = lines.iter().find(|(ctrls, _)| {
            if v2 {
                ctrls.is_empty()
            } else {
                !ctrls.is_empty() && ctrls.iter().all(|c| controllers.contains(c))
            }
        });
        let Some((_, self_path)) = line else { continue };
        let self_rel = self_path
            .strip_prefix(&m.root)
            .unwrap_or(self_path)
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect::<PathBuf>();
        if out
            .iter()
            .any(|h| h.v2 == v2 && h.controllers == controllers)
        {
            continue;
        }
        out.push(Hierarchy {
            mount_point: m.mount_point.clone(),
            self_rel,
            controllers,
            v2,
        });
    }
    out
}

/// The hierarchies of the current process on this host.
pub(crate) fn host_hierarchies() -> Vec<Hierarchy> {
    let mounts = crate::mounts::mountinfo().unwrap_or_default();
    let self_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    hierarchies(&mounts, &self_cgroup)
}

/// Limits read back from a sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `None`: unlimited.
    pub memory_bytes: Option<u64>,
    /// Quota / period in thousandths of a core; `None`: unlimited.
    pub cpu_millis: Option<u64>,
}

/// Reads the memory and CPU limits of the cgroup at `cgroups_path`; `None` if it has no
/// memory controller directory (the sandbox does not exist).
pub(crate) fn read_limits(hs: &[Hierarchy], cgroups_path: &str) -> Option<CgroupLimits> {
    let read = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    let mut memory = None;
    let mut cpu = None;
    for h in hs {
        let dir = h.dir(cgroups_path);
        if h.v2 {
            if let Some(v) = read(dir.join("memory.max")) {
                memory = Some(parse_limit(&v));
            }
            if let Some(v) = read(dir.join("cpu.max")) {
                let mut parts = v.split_whitespace();
                let quota = parts.next().and_then(|q| q.parse::<u64>().ok());
                let period = parts.next().and_then(|p| p.parse::<u64>().ok());
                cpu = Some(quota.zip(period).map(|(q, p)| q * 1000 / p.max(1)));
            }
        } else {
            if h.has("memory")
                && let Some(v) = read(dir.join("memory.limit_in_bytes"))
            {
                memory = Some(parse_limit(&v));
            }
            if h.has("cpu") {
                let quota = read(dir.join("cpu.cfs_quota_us"));
                let period = read(dir.join("cpu.cfs_period_us"));
                if let (Some(q), Some(p)) = (quota, period) {
                    let q = q.parse::<i64>().ok().filter(|q| *q > 0);
                    let p = p.parse::<u64>().ok().filter(|p| *p > 0);
                    cpu = Some(q.zip(p).map(|(q, p)| q as u64 * 1000 / p));
                }
            }
        }
    }
    memory.map(|memory_bytes| CgroupLimits {
        memory_bytes,
        cpu_millis: cpu.flatten(),
    })
}

/// Sets the memory limit and CPU quota (`cpu_millis` thousandths of a core over
/// `period_us`; 0: no quota) of the existing cgroup at `cgroups_path`, in every hierarchy
/// with the controller. Refuses (changing nothing) a memory limit below what the cgroup uses
/// now: the kernel would reclaim, then kill the sandbox. A memory limit raised is written
/// before the CPU one, lowered after nothing else could fail.
pub(crate) fn write_limits(
    hs: &[Hierarchy],
    cgroups_path: &str,
    memory_bytes: u64,
    cpu_millis: u32,
    period_us: u64,
) -> std::io::Result<()> {
    let quota = (cpu_millis > 0).then(|| u64::from(cpu_millis) * period_us / 1000);
    let mut writes: Vec<(PathBuf, String)> = Vec::new();
    let mut found = false;
    for h in hs {
        let dir = h.dir(cgroups_path);
        let (usage, limit, cpu): (PathBuf, PathBuf, Vec<(PathBuf, String)>) = if h.v2 {
            (
                dir.join("memory.current"),
                dir.join("memory.max"),
                vec![(
                    dir.join("cpu.max"),
                    match quota {
                        Some(q) => format!("{q} {period_us}"),
                        None => format!("max {period_us}"),
                    },
                )],
            )
        } else {
            (
                dir.join("memory.usage_in_bytes"),
                dir.join("memory.limit_in_bytes"),
                if h.has("cpu") {
                    vec![
                        (dir.join("cpu.cfs_period_us"), period_us.to_string()),
                        (
                            dir.join("cpu.cfs_quota_us"),
                            quota.map_or("-1".into(), |q| q.to_string()),
                        ),
                    ]
                } else {
                    Vec::new()
                },
            )
        };
        if (h.v2 || h.has("memory")) && limit.exists() {
            found = true;
            let used: u64 = std::fs::read_to_string(&usage)?
                .trim()
                .parse()
                .map_err(|_| {
                    std::io::Error::other(format!("{} is not a number", usage.display()))
                })?;
            if used > memory_bytes {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "the sandbox uses {} MiB of memory now, more than the {} MiB asked",
                        used >> 20,
                        memory_bytes >> 20
                    ),
                ));
            }
            writes.push((limit, memory_bytes.to_string()));
        }
        if h.v2 || h.has("cpu") {
            writes.extend(cpu.into_iter().filter(|(p, _)| p.exists()));
        }
    }
    if !found {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the sandbox has no memory cgroup (is it running?)",
        ));
    }
    for (path, value) in writes {
        std::fs::write(&path, &value).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("writing {value} to {}: {e}", path.display()),
            )
        })?;
    }
    Ok(())
}

/// `max`, or v1's "unlimited" (a page-rounded i64::MAX), is `None`.
fn parse_limit(v: &str) -> Option<u64> {
    v.parse::<u64>().ok().filter(|n| *n < (1u64 << 62))
}

/// Removes the leaf directory of `cgroups_path` in every hierarchy, if runsc left it. Fails
/// only if a directory exists and cannot be removed (processes still inside).
pub(crate) fn remove_dirs(hs: &[Hierarchy], cgroups_path: &str) -> std::io::Result<()> {
    for h in hs {
        remove_dir_if_exists(&h.dir(cgroups_path))?;
    }
    Ok(())
}

pub(crate) fn remove_dir_if_exists(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mounts::parse_mountinfo;

    const MOUNTS: &str = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
30 22 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
31 22 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
32 22 0:32 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
33 22 0:33 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
    const SELF: &str = "\
9:name=systemd:/
4:memory:/process_api/abc
1:cpu:/
0::/
";

    #[test]
    fn hybrid_layout() {
        let hs = hierarchies(&parse_mountinfo(MOUNTS), SELF);
        assert_eq!(hs.len(), 4);
        let mem = hs.iter().find(|h| h.has("memory")).unwrap();
        assert_eq!(
            mem.dir("sandpit/x1"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/sandpit/x1")
        );
        assert_eq!(
            mem.dir("/sandpit/x1"),
            PathBuf::from("/sys/fs/cgroup/memory/sandpit/x1")
        );
        let cpu = hs.iter().find(|h| h.has("cpu")).unwrap();
        assert_eq!(
            cpu.dir("sandpit/x1"),
            PathBuf::from("/sys/fs/cgroup/cpu/sandpit/x1")
        );
        let v2 = hs.iter().find(|h| h.v2).unwrap();
        assert_eq!(
            v2.dir("sandpit/x1"),
            PathBuf::from("/sys/fs/cgroup/unified/sandpit/x1")
        );
    }

    #[test]
    fn pure_v2_with_service_cgroup() {
        let mounts = parse_mountinfo(
            "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n\
             25 22 0:25 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        let hs = hierarchies(&mounts, "0::/system.slice/sandpit.service\n");
        assert_eq!(hs.len(), 1);
        assert_eq!(
            hs[0].dir("sandpit/x"),
            PathBuf::from("/sys/fs/cgroup/system.slice/sandpit.service/sandpit/x")
        );
    }

    #[test]
    fn limits() {
        assert_eq!(parse_limit("268435456"), Some(268_435_456));
        assert_eq!(parse_limit("max"), None);
        assert_eq!(parse_limit("9223372036854771712"), None);
    }
}
