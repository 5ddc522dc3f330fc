//! The OCI runtime spec (`bundle/config.json`) handed to runsc, written by hand.

use std::path::Path;

use sandpit_runtime::SandboxSpec;
use serde_json::{Value, json};

/// Docker's default capability set: what `apt-get`, `chown` and `su` need inside the sandbox.
/// gVisor implements capabilities itself; none of them reaches the host kernel.
pub(crate) const DEFAULT_CAPS: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

pub(crate) const DEFAULT_PATH: &str =
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Most host tasks (the Sentry's threads and the platform's stub processes) one sandbox may
/// hold. gVisor backs each guest process with host tasks, so without this a fork bomb inside
/// a sandbox exhausts the host's PIDs (measured: ~1000 new host tasks per second, unbounded).
/// At the limit the Sentry cannot grow and the sandbox dies: contained, not throttled (root
/// inside ignores `RLIMIT_NPROC`). An idle sandbox holds ~40.
pub const PIDS_MAX: i64 = 4096;

/// CFS period used for the CPU quota.
pub(crate) const CPU_PERIOD_US: u64 = 100_000;

/// Inputs of [`oci_config`] besides the sandbox spec.
pub(crate) struct BundleParams<'a> {
    /// The merged overlay mount: the container's root.
    pub rootfs: &'a Path,
    /// Bind-mount the rootfs's own `/tmp` over `/tmp`: without an explicit `/tmp` mount runsc
    /// puts an in-memory tmpfs there whenever `/tmp` is empty, and files written to it would
    /// neither reach the upper dir nor survive a stop.
    pub bind_tmp: bool,
    /// `linux.cgroupsPath`.
    pub cgroups_path: &'a str,
    /// Where each of `spec.volumes` is bind-mounted for runsc, in order.
    pub volume_sources: &'a [std::path::PathBuf],
}

/// The OCI runtime configuration for `spec`.
pub(crate) fn oci_config(spec: &SandboxSpec, p: &BundleParams<'_>) -> Value {
    let mut env = spec.env.clone();
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(0, DEFAULT_PATH.to_string());
    }
    let caps: Vec<&str> = DEFAULT_CAPS.to_vec();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    if p.bind_tmp {
        mounts.push(json!({"destination": "/tmp", "type": "bind",
                           "source": p.rootfs.join("tmp"), "options": ["rbind", "rw"]}));
    }
    for (v, source) in spec.volumes.iter().zip(p.volume_sources) {
        let mode = if v.read_only { "ro" } else { "rw" };
        mounts.push(json!({"destination": v.destination, "type": "bind",
                           "source": source, "options": ["rbind", mode]}));
    }
    let network = match &spec.network {
        Some(n) => json!({"type": "network", "path": n.netns_path}),
        None => json!({"type": "network"}),
    };
    let mut resources = serde_json::Map::new();
    if spec.resources.memory_bytes > 0 {
        resources.insert(
            "memory".into(),
            json!({"limit": spec.resources.memory_bytes}),
        );
    }
    if spec.resources.cpu_millis > 0 {
        let quota = u64::from(spec.resources.cpu_millis) * CPU_PERIOD_US / 1000;
        resources.insert(
            "cpu".into(),
            json!({"quota": quota, "period": CPU_PERIOD_US}),
        );
    }
    resources.insert("pids".into(), json!({"limit": PIDS_MAX}));
    json!({
        "ociVersion": "1.0.0",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": spec.args,
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 524_288, "soft": 1024}],
        },
        "root": {"path": p.rootfs, "readonly": false},
        "hostname": spec.hostname,
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"},
                network,
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"},
            ],
            "cgroupsPath": p.cgroups_path,
            "resources": resources,
        },
    })
}

/// The overlayfs `lowerdir=` value: overlayfs wants the top layer first, `layers` is lowest
/// first.
pub(crate) fn lowerdir(layers: &[impl AsRef<Path>]) -> String {
    layers
        .iter()
        .rev()
        .map(|l| l.as_ref().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandpit_runtime::{NetworkAttachment, Resources};
    use std::net::Ipv4Addr;
    use std::path::PathBuf;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            id: "sbx-0001".into(),
            layers: vec!["/l/base".into(), "/l/top".into()],
            state_dir: "/s/sbx".into(),
            args: vec!["/bin/agent".into(), "--flag".into()],
            env: vec!["A=1".into()],
            hostname: "box".into(),
            network: Some(NetworkAttachment {
                netns_path: "/var/run/netns/sp-3".into(),
                ifname: "sps3".into(),
                address: Ipv4Addr::new(10, 88, 0, 14),
                prefix_len: 30,
                gateway: Ipv4Addr::new(10, 88, 0, 13),
            }),
            resources: Resources {
                cpu_millis: 1500,
                memory_bytes: 512 << 20,
                disk_bytes: None,
            },
            volumes: vec![],
        }
    }

    fn params(rootfs: &Path) -> BundleParams<'_> {
        BundleParams {
            rootfs,
            bind_tmp: true,
            cgroups_path: "sandpit/sbx-0001",
            volume_sources: &[],
        }
    }

    #[test]
    fn config_fields() {
        let rootfs = PathBuf::from("/s/sbx/rootfs");
        let c = oci_config(&spec(), &params(&rootfs));
        assert_eq!(c["process"]["args"], json!(["/bin/agent", "--flag"]));
        assert_eq!(c["process"]["env"][0], DEFAULT_PATH);
        assert_eq!(c["process"]["env"][1], "A=1");
        assert_eq!(c["process"]["cwd"], "/");
        assert_eq!(c["process"]["terminal"], false);
        assert_eq!(c["root"]["path"], "/s/sbx/rootfs");
        assert_eq!(c["root"]["readonly"], false);
        assert_eq!(c["hostname"], "box");
        assert_eq!(
            c["linux"]["namespaces"][1],
            json!({"type": "network", "path": "/var/run/netns/sp-3"})
        );
        assert_eq!(c["linux"]["cgroupsPath"], "sandpit/sbx-0001");
        assert_eq!(c["linux"]["resources"]["memory"]["limit"], 512u64 << 20);
        assert_eq!(c["linux"]["resources"]["cpu"]["quota"], 150_000);
        assert_eq!(c["linux"]["resources"]["cpu"]["period"], 100_000);
        assert_eq!(c["linux"]["resources"]["pids"]["limit"], PIDS_MAX);
        let tmp = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["destination"] == "/tmp")
            .unwrap();
        assert_eq!(tmp["source"], "/s/sbx/rootfs/tmp");
        assert_eq!(tmp["type"], "bind");
    }

    #[test]
    fn no_network_no_limits_own_path() {
        let mut s = spec();
        s.network = None;
        s.resources = Resources {
            cpu_millis: 0,
            memory_bytes: 0,
            disk_bytes: None,
        };
        s.env = vec!["PATH=/x".into()];
        let rootfs = PathBuf::from("/r");
        let mut p = params(&rootfs);
        p.bind_tmp = false;
        let c = oci_config(&s, &p);
        assert_eq!(c["linux"]["namespaces"][1], json!({"type": "network"}));
        assert_eq!(
            c["linux"]["resources"],
            json!({"pids": {"limit": PIDS_MAX}})
        );
        assert_eq!(c["process"]["env"], json!(["PATH=/x"]));
        assert!(
            !c["mounts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["destination"] == "/tmp")
        );
    }

    #[test]
    fn lowerdir_lists_top_first() {
        assert_eq!(lowerdir(&["/l/0", "/l/1", "/l/2"]), "/l/2:/l/1:/l/0");
        assert_eq!(lowerdir(&["/only"]), "/only");
    }
}
