//! Integration test of the gVisor backend with real runsc sandboxes, overlay mounts, cgroups
//! and sandpit-net namespaces. Needs root; skipped (with a message) if runsc is missing.
//!
//! Traffic only goes from the host to sandbox addresses inside namespaces this test creates.
#![allow(
    clippy::disallowed_methods,
    reason = "integration tests build host-side fixtures and read host state by path"
)]

use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use sandpit_net::{EgressRules, Ipv4Net, NetConfig, Network, SlotAddrs};
use sandpit_runtime::{
    NetworkAttachment, Resources, Runtime, RuntimeError, RuntimeStatus, SandboxSpec,
};
use sandpit_runtime_gvisor::{GvisorConfig, GvisorError, GvisorRuntime};
use tokio::io::AsyncReadExt;

const MEMORY: u64 = 256 << 20;
const CPU_MILLIS: u32 = 500;

/// The init process: remembers the count of the previous boot, serves "hello" on 8080 (the
/// loop restarts nc, which dies of EINTR after a restore) and counts ten times a second.
const INIT: &str = "[ -f /tmp/count ] && cp /tmp/count /tmp/prev_boot; \
    (while true; do nc -l -p 8080 -e echo hello; done) & \
    i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done";

fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A /24 in 10.231.0.0/16 that no host route or address touches.
fn free_pool() -> Ipv4Net {
    let used = sh(&["ip", "-4", "route", "show", "table", "all"]) + &sh(&["ip", "-4", "addr"]);
    for _ in 0..50 {
        let third = random() as u8;
        let needle = format!("10.231.{third}.");
        if !used.contains(&needle) {
            return format!("10.231.{third}.0/24").parse().unwrap();
        }
    }
    panic!("no free test pool");
}

/// Two layers: busybox (with every applet as a symlink) and a top layer overriding a file.
fn build_layers(dir: &Path) -> Vec<PathBuf> {
    let base = dir.join("layer0");
    let top = dir.join("layer1");
    std::fs::create_dir_all(base.join("bin")).unwrap();
    std::fs::create_dir_all(base.join("etc")).unwrap();
    std::fs::create_dir_all(top.join("etc")).unwrap();
    std::fs::copy("/bin/busybox", base.join("bin/busybox")).unwrap();
    let list = sh(&["/bin/busybox", "--list"]);
    for applet in list.lines().map(str::trim).filter(|a| !a.is_empty()) {
        if applet == "busybox" || applet.contains('/') {
            continue;
        }
        let link = base.join("bin").join(applet);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).unwrap();
        }
    }
    std::fs::write(base.join("etc/which"), "bottom").unwrap();
    std::fs::write(base.join("etc/base-only"), "base").unwrap();
    std::fs::write(top.join("etc/which"), "top").unwrap();
    vec![base, top]
}

/// Everything the test creates, removed on drop even if the test fails.
struct Fixture {
    rt: GvisorRuntime,
    net: Network,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A runtime and a network under a fresh tag (`<tag_prefix><4 hex digits>`, returned), a
    /// temporary directory named `<dir_prefix>…`, and the test's log output.
    fn new(tag_prefix: &str, dir_prefix: &str) -> (Fixture, String) {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "sandpit_runtime_gvisor=debug".into()),
            )
            .with_test_writer()
            .try_init();
        let tag = format!("{tag_prefix}{:04x}", random() as u16);
        let dir = tempfile::Builder::new()
            .prefix(dir_prefix)
            .tempdir()
            .unwrap();
        let mut cfg = GvisorConfig::new(dir.path().join("runsc-root"));
        cfg.cgroup_parent = format!("sandpit-test-{tag}");
        let rt = GvisorRuntime::new(cfg).unwrap();
        let net = Network::new(NetConfig {
            prefix: tag.clone(),
            pool: free_pool(),
            nameservers: Vec::new(),
        })
        .unwrap();
        (Fixture { rt, net, dir }, tag)
    }

    fn state(&self, name: &str) -> PathBuf {
        self.dir.path().join("sandboxes").join(name)
    }

    fn mounts_below_dir(&self) -> Vec<String> {
        let root = std::fs::canonicalize(self.dir.path()).unwrap();
        let root = root.to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let root = self.rt.config().root_dir.clone();
        if let Ok(out) = Command::new("runsc")
            .arg(format!("--root={}", root.display()))
            .args(["list", "-quiet"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("runsc")
                    .arg(format!("--root={}", root.display()))
                    .args(["delete", "-force", id])
                    .output();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut mounts = self.mounts_below_dir();
        mounts.reverse();
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).output();
        }
        let net = self.net.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            if let Err(e) = rt.block_on(net.teardown()) {
                eprintln!("network teardown failed: {e}");
            }
        })
        .join();
        self.rt.remove_cgroup_parent();
    }
}

fn attachment(a: &SlotAddrs) -> NetworkAttachment {
    NetworkAttachment {
        netns_path: a.netns_path.clone(),
        ifname: a.sandbox_if.clone(),
        address: a.sandbox_ip,
        prefix_len: a.prefix_len,
        gateway: a.host_ip,
    }
}

fn spec(id: &str, layers: &[PathBuf], state_dir: &Path, net: Option<&SlotAddrs>) -> SandboxSpec {
    SandboxSpec {
        id: id.into(),
        layers: layers.to_vec(),
        state_dir: state_dir.into(),
        args: vec!["/bin/sh".into(), "-c".into(), INIT.into()],
        env: vec!["SANDPIT_TEST=1".into()],
        hostname: id.into(),
        network: net.map(attachment),
        resources: Resources {
            cpu_millis: CPU_MILLIS,
            memory_bytes: MEMORY,
            disk_bytes: None,
        },
        volumes: vec![],
    }
}

fn count(state_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(state_dir.join("upper/tmp/count"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits until the sandbox's counter satisfies `pred`; returns the value.
async fn wait_count(state_dir: &Path, what: &str, pred: impl Fn(u64) -> bool) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(c) = count(state_dir)
            && pred(c)
        {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: counter stuck at {:?}",
            count(state_dir)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connects to the sandbox's "hello" server, reads the greeting and closes with RST (so no
/// endpoint in the sandbox stays connected or closing, which would block a checkpoint).
async fn hello(ip: Ipv4Addr) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect((ip, 8080)).await?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await?;
            s.set_zero_linger()?;
            drop(s);
            Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(text)) if !text.is_empty() => return text,
            other => {
                assert!(Instant::now() < deadline, "no hello from {ip}: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Host pids of the sentry and gofer of sandbox `id`.
fn sandbox_pids(id: &str, state_dir: &Path) -> Vec<u32> {
    let bundle = format!(
        "--bundle={}",
        std::fs::canonicalize(state_dir)
            .unwrap()
            .join("bundle")
            .display()
    );
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let is_sentry = args[0] == "runsc-sandbox" && args.iter().any(|a| a == id);
        let is_gofer = args[0] == "runsc-gofer" && args.contains(&bundle);
        if is_sentry || is_gofer {
            pids.push(pid);
        }
    }
    assert!(!pids.is_empty(), "no processes found for {id}");
    pids
}

/// A cgroup directory named `id` anywhere below /sys/fs/cgroup, found without the crate.
fn find_cgroup_files(id: &str, file: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, id: &str, file: &str, depth: u32, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let p = e.path();
            if e.file_name() == id && p.join(file).exists() {
                out.push(p.join(file));
            } else if depth > 0 {
                walk(&p, id, file, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("/sys/fs/cgroup"), id, file, 6, &mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gvisor_lifecycle() {
    match sandpit_runtime_gvisor::check_host(Path::new("runsc")) {
        Ok(version) => eprintln!("using {version}"),
        Err(GvisorError::ToolMissing { program, source }) if program == Path::new("runsc") => {
            eprintln!("SKIPPED gvisor_lifecycle: runsc is not installed ({source})");
            return;
        }
        Err(e) => panic!("this host cannot run gVisor sandboxes: {e}"),
    }
    let (fx, tag) = Fixture::new("gv", "sandpit-gvisor-it-");
    let (rt, net) = (&fx.rt, &fx.net);
    assert_eq!(rt.name(), "gvisor");
    net.init().await.unwrap();
    let slot1 = net.attach(1, &EgressRules::deny_all()).await.unwrap();
    let slot2 = net.attach(2, &EgressRules::deny_all()).await.unwrap();
    let layers = build_layers(fx.dir.path());
    let (id_a, id_b, id_c) = (format!("{tag}-a"), format!("{tag}-b"), format!("{tag}-c"));
    let state_a = fx.state("a");
    let state_b = fx.state("b");
    let spec_a = spec(&id_a, &layers, &state_a, Some(&slot1));

    // Cold start.
    let t = Instant::now();
    rt.start(&spec_a).await.unwrap();
    eprintln!("TIMING start: {:?}", t.elapsed());
    assert_eq!(rt.status(&id_a).await.unwrap(), RuntimeStatus::Running);
    assert_eq!(rt.list().await.unwrap(), vec![id_a.clone()]);
    assert_eq!(
        rt.status(&format!("{tag}-")).await.unwrap(),
        RuntimeStatus::Missing
    );
    assert!(matches!(
        rt.start(&spec_a).await,
        Err(RuntimeError::Command { .. })
    ));
    assert_eq!(rt.status(&id_a).await.unwrap(), RuntimeStatus::Running);
    // The overlay: top layer wins, lower layers show through.
    let merged = state_a.join("rootfs");
    assert_eq!(
        std::fs::read_to_string(merged.join("etc/which")).unwrap(),
        "top"
    );
    assert_eq!(
        std::fs::read_to_string(merged.join("etc/base-only")).unwrap(),
        "base"
    );
    assert_eq!(hello(slot1.sandbox_ip).await.trim(), "hello");
    let c = wait_count(&state_a, "cold start", |c| c >= 3).await;
    eprintln!("counter after start: {c}");

    // cgroup limits, via the crate and found independently.
    let limits = rt.cgroup_limits(&id_a).expect("cgroup limits");
    assert_eq!(limits.memory_bytes, Some(MEMORY));
    assert_eq!(limits.cpu_millis, Some(u64::from(CPU_MILLIS)));
    let mut mem_files = find_cgroup_files(&id_a, "memory.limit_in_bytes");
    mem_files.extend(find_cgroup_files(&id_a, "memory.max"));
    assert!(!mem_files.is_empty(), "no memory cgroup for {id_a}");
    for f in &mem_files {
        assert_eq!(
            std::fs::read_to_string(f).unwrap().trim(),
            MEMORY.to_string()
        );
    }

    // Checkpoint → restore with the same id in the same slot.
    let img1 = fx.dir.path().join("images/one");
    let t = Instant::now();
    rt.checkpoint(&id_a, &img1).await.unwrap();
    eprintln!(
        "TIMING checkpoint (incl. fsync + delete + unmount): {:?}",
        t.elapsed()
    );
    assert!(img1.join("checkpoint.img").is_file());
    assert_eq!(rt.status(&id_a).await.unwrap(), RuntimeStatus::Missing);
    assert!(
        fx.mounts_below_dir().is_empty(),
        "{:?}",
        fx.mounts_below_dir()
    );
    let c1 = count(&state_a).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&state_a), Some(c1), "counter moved after checkpoint");
    let t = Instant::now();
    rt.restore(&spec_a, &img1).await.unwrap();
    eprintln!("TIMING restore: {:?}", t.elapsed());
    let c = wait_count(&state_a, "restore", |c| c != c1).await;
    assert!(
        c > c1,
        "restored counter {c} is not above the checkpointed {c1}"
    );
    assert_eq!(hello(slot1.sandbox_ip).await.trim(), "hello");

    // Checkpoint again (over an image dir that exists: replaced atomically), then restore two
    // clones from it: `a` in slot 1 and, with a copy of the upper dir, `b` in slot 2. This
    // checkpoint is taken by another instance of the runtime, as after a server restart: it
    // did not boot `a` and asks runsc about it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let adopting = GvisorRuntime::new(rt.config().clone()).unwrap();
    adopting.checkpoint(&id_a, &img1).await.unwrap();
    eprintln!("TIMING second checkpoint: {:?}", t.elapsed());
    assert_eq!(rt.status(&id_a).await.unwrap(), RuntimeStatus::Missing);
    let c2 = count(&state_a).unwrap();
    assert!(c2 > c1);
    std::fs::create_dir_all(&state_b).unwrap();
    sh(&[
        "cp",
        "-a",
        state_a.join("upper").to_str().unwrap(),
        state_b.to_str().unwrap(),
    ]);
    let spec_b = spec(&id_b, &layers, &state_b, Some(&slot2));
    let t = Instant::now();
    rt.restore(&spec_b, &img1).await.unwrap();
    eprintln!(
        "TIMING restore as another id in another slot: {:?}",
        t.elapsed()
    );
    rt.restore(&spec_a, &img1).await.unwrap();
    let cb = wait_count(&state_b, "clone b", |c| c > c2).await;
    let ca = wait_count(&state_a, "clone a", |c| c > c2).await;
    eprintln!("checkpointed at {c2}, clones now at a={ca} b={cb}");
    assert_eq!(hello(slot2.sandbox_ip).await.trim(), "hello");
    assert_eq!(hello(slot1.sandbox_ip).await.trim(), "hello");
    // The sentry and gofer of `a` (each pivoted into its own mount namespace) see neither
    // `b`'s rootfs nor `b`'s netns, although both were mounted on the host when `a` started.
    let b_rootfs = std::fs::canonicalize(&state_b).unwrap().join("rootfs");
    let b_netns = format!("/run/netns/{}", slot2.netns_name);
    for pid in sandbox_pids(&id_a, &state_a) {
        let mi = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
        let points: Vec<&str> = mi.lines().filter_map(|l| l.split(' ').nth(4)).collect();
        assert!(
            !points.contains(&b_rootfs.to_str().unwrap()) && !points.contains(&b_netns.as_str()),
            "process {pid} of {id_a} sees mounts of {id_b}: {points:?}"
        );
    }
    // Informational: which hostname a clone restored under another spec has.
    let root = rt.config().root_dir.clone();
    let hostname = Command::new("runsc")
        .arg(format!("--root={}", root.display()))
        .args(["exec", &id_b, "/bin/hostname"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    eprintln!("clone {id_b} (spec hostname {id_b}) reports hostname {hostname:?}");
    let mut ids = rt.list().await.unwrap();
    ids.sort();
    assert_eq!(ids, vec![id_a.clone(), id_b.clone()]);

    // A connection left open into the sandbox makes the checkpoint fail (and kills b).
    let mut held = tokio::net::TcpStream::connect((slot2.sandbox_ip, 8080))
        .await
        .unwrap();
    let mut buf = [0u8; 6];
    held.read_exact(&mut buf).await.unwrap();
    let img3 = fx.dir.path().join("images/refused");
    match rt.checkpoint(&id_b, &img3).await {
        Err(RuntimeError::CheckpointRefused { reason, .. }) => {
            eprintln!("refused as expected: {reason}");
            assert!(
                reason.contains("connected") || reason.contains("closing"),
                "{reason}"
            );
            assert!(reason.contains("killed the sandbox"), "{reason}");
        }
        other => panic!("checkpoint with an open connection: {other:?}"),
    }
    held.set_zero_linger().unwrap();
    drop(held);
    assert!(!img3.exists());
    let leftovers: Vec<_> = std::fs::read_dir(fx.dir.path().join("images"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec![std::ffi::OsString::from("one")],
        "temp image dirs left"
    );
    assert_eq!(rt.status(&id_b).await.unwrap(), RuntimeStatus::Stopped);
    // A checkpoint of a sandbox whose sentry is gone fails and leaves no image.
    match rt.checkpoint(&id_b, &img3).await {
        Err(RuntimeError::Command { stderr, .. }) => {
            assert!(stderr.contains("not running"), "{stderr}");
        }
        other => panic!("checkpoint of a stopped sandbox: {other:?}"),
    }
    assert!(!img3.exists());
    rt.stop(&id_b, &state_b).await.unwrap();
    assert_eq!(rt.status(&id_b).await.unwrap(), RuntimeStatus::Missing);

    // Stop keeps the files; a cold start sees them.
    let t = Instant::now();
    rt.stop(&id_a, &state_a).await.unwrap();
    eprintln!("TIMING stop: {:?}", t.elapsed());
    rt.stop(&id_a, &state_a).await.unwrap(); // idempotent
    assert_eq!(rt.status(&id_a).await.unwrap(), RuntimeStatus::Missing);
    assert!(
        fx.mounts_below_dir().is_empty(),
        "{:?}",
        fx.mounts_below_dir()
    );
    assert!(rt.cgroup_dirs(&id_a).iter().all(|d| !d.exists()));
    assert!(rt.cgroup_limits(&id_a).is_none());
    let at_stop = count(&state_a).expect("counter persisted in upper/");
    rt.start(&spec_a).await.unwrap();
    let prev = state_a.join("upper/tmp/prev_boot");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !prev.exists() {
        assert!(
            Instant::now() < deadline,
            "the cold start did not see /tmp/count"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        std::fs::read_to_string(&prev).unwrap().trim(),
        at_stop.to_string()
    );
    // Address re-applied for the cold boot in the same slot.
    assert_eq!(hello(slot1.sandbox_ip).await.trim(), "hello");

    // A start that fails leaves nothing running or mounted; the files stay.
    let (id_d, state_d) = (format!("{tag}-d"), fx.state("d"));
    let mut bad = spec(&id_d, &layers, &state_d, None);
    bad.args = vec!["/no/such/binary".into()];
    let err = rt.start(&bad).await.unwrap_err();
    eprintln!("failed start reported as: {err}");
    assert!(matches!(err, RuntimeError::Command { .. }), "{err:?}");
    assert_eq!(rt.status(&id_d).await.unwrap(), RuntimeStatus::Missing);
    assert!(state_d.join("bundle/config.json").is_file());
    assert!(
        !fx.mounts_below_dir()
            .iter()
            .any(|m| m.ends_with("/d/rootfs")),
        "{:?}",
        fx.mounts_below_dir()
    );
    rt.destroy(&id_d, &state_d).await.unwrap();
    assert!(!state_d.exists());

    // Orphan cleanup: a sandbox without network that the "server" no longer knows.
    let state_c = fx.state("c");
    rt.start(&spec(&id_c, &layers, &state_c, None))
        .await
        .unwrap();
    wait_count(&state_c, "no-network sandbox", |c| c >= 1).await;
    let keep: HashSet<String> = [id_a.clone()].into();
    let report = rt
        .cleanup_orphans(&keep, &fx.dir.path().join("sandboxes"))
        .await
        .unwrap();
    assert_eq!(report.removed, vec![id_c.clone()]);
    assert_eq!(
        report.unmounted,
        vec![std::fs::canonicalize(&state_c).unwrap().join("rootfs")]
    );
    assert_eq!(rt.list().await.unwrap(), vec![id_a.clone()]);
    assert_eq!(rt.status(&id_a).await.unwrap(), RuntimeStatus::Running);

    // Destroy leaves nothing.
    for (id, state) in [(&id_a, &state_a), (&id_b, &state_b), (&id_c, &state_c)] {
        rt.destroy(id, state).await.unwrap();
        rt.destroy(id, state).await.unwrap(); // idempotent
        assert!(!state.exists());
    }
    assert!(rt.list().await.unwrap().is_empty());
    assert!(
        fx.mounts_below_dir().is_empty(),
        "{:?}",
        fx.mounts_below_dir()
    );
    for id in [&id_a, &id_b, &id_c] {
        assert!(rt.cgroup_dirs(id).iter().all(|d| !d.exists()));
    }
    net.teardown().await.unwrap();
    assert!(!slot1.netns_path.exists() && !slot2.netns_path.exists());
    assert!(!sh(&["ip", "-br", "link"]).contains(&tag));
    rt.remove_cgroup_parent();
    assert!(find_cgroup_files(&format!("sandpit-test-{tag}"), "cgroup.procs").is_empty());
}

/// Writes inside a sandbox with a disk limit stop at the limit (ENOSPC in the sandbox), the
/// host keeps only what the sandbox holds, the files move with the disk to another sandbox,
/// and nothing stays mounted or attached afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_limit_contains_a_fill() {
    if which_runsc_missing("disk_limit_contains_a_fill") {
        return;
    }
    let (fx, tag) = Fixture::new("gd", "sandpit-gvisor-disk-");
    let rt = &fx.rt;
    let layers = build_layers(fx.dir.path());
    const DISK: u64 = 48 << 20;
    let (id_a, id_b) = (format!("{tag}-a"), format!("{tag}-b"));
    let (state_a, state_b) = (fx.state("a"), fx.state("b"));
    let mut spec_a = spec(&id_a, &layers, &state_a, None);
    spec_a.resources.disk_bytes = Some(DISK);
    spec_a.args = vec![
        "/bin/sh".into(),
        "-c".into(),
        "echo kept > /kept; dd if=/dev/zero of=/fill bs=1M count=200 2>/tmp/dd.err; \
         echo $? > /tmp/dd.rc.new; mv /tmp/dd.rc.new /tmp/dd.rc; sleep 1000"
            .into(),
    ];
    rt.start(&spec_a).await.unwrap();
    let rc_path = state_a.join("disk/upper/tmp/dd.rc");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rc_path.exists() {
        assert!(Instant::now() < deadline, "dd never finished");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rc = std::fs::read_to_string(&rc_path).unwrap();
    let err = std::fs::read_to_string(state_a.join("disk/upper/tmp/dd.err")).unwrap();
    assert_ne!(
        rc.trim(),
        "0",
        "dd of 200 MiB into a 48 MiB disk succeeded: {err}"
    );
    assert!(err.contains("No space left"), "{err}");
    assert!(
        !state_a.join("upper").exists(),
        "the layer must live on the disk"
    );
    let filled = std::fs::metadata(state_a.join("disk/upper/fill"))
        .unwrap()
        .len();
    assert!(filled > 16 << 20 && filled < DISK, "{filled}");
    // The host holds at most the disk's size, whatever was tried.
    use std::os::unix::fs::MetadataExt;
    let img = std::fs::metadata(state_a.join("disk.img")).unwrap();
    assert_eq!(img.len(), DISK);
    assert!(
        img.blocks() * 512 <= DISK,
        "{} bytes allocated",
        img.blocks() * 512
    );

    // Stopped: the disk is unmounted and its loop device released; the files move to
    // another sandbox with the image, limit included.
    rt.stop(&id_a, &state_a).await.unwrap();
    assert!(
        fx.mounts_below_dir().is_empty(),
        "{:?}",
        fx.mounts_below_dir()
    );
    let canon_a = std::fs::canonicalize(&state_a).unwrap();
    assert!(!sh(&["losetup", "-a"]).contains(canon_a.to_str().unwrap()));
    rt.copy_files(&state_a, &state_b).await.unwrap();
    assert_eq!(
        rt.copy_files(&state_a, &state_b)
            .await
            .unwrap_err()
            .to_string(),
        RuntimeError::CopyFiles {
            from: state_a.join("disk.img"),
            to: state_b.join("disk.img"),
            detail: String::new()
        }
        .to_string()
    );
    let mut spec_b = spec(&id_b, &layers, &state_b, None);
    spec_b.resources.disk_bytes = Some(DISK * 2); // a larger size grows the copy's disk
    spec_b.args = vec![
        "/bin/sh".into(),
        "-c".into(),
        "exec 2>/dev/.init.log; echo diagnose-me >&2; cat /kept > /tmp/seen; rm /fill; df -k / | tail -1 > /tmp/df.new; mv /tmp/df.new /tmp/df; sleep 1000".into(),
    ];
    rt.start(&spec_b).await.unwrap();
    let seen = state_b.join("disk/upper/tmp/df");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !seen.exists() {
        assert!(Instant::now() < deadline, "the copy never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        std::fs::read_to_string(state_b.join("disk/upper/tmp/seen"))
            .unwrap()
            .trim(),
        "kept"
    );
    assert_eq!(
        std::fs::metadata(state_b.join("disk.img")).unwrap().len(),
        DISK * 2
    );
    // `df -k /` inside: the filesystem grew with the image (total KiB in the second field).
    let df = std::fs::read_to_string(&seen).unwrap();
    let total_kib: u64 = df.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(total_kib * 1024 > DISK * 3 / 2, "{df}");
    // The diagnosis shows the runtime's view and, read from inside, init's stderr (a file in
    // the sandbox, as the agent keeps it).
    let diagnosis = rt.diagnose(&id_b, &state_b).await;
    assert!(
        diagnosis.starts_with("runtime status: Running"),
        "{diagnosis}"
    );
    assert!(
        diagnosis
            .split("--- init stderr:")
            .nth(1)
            .is_some_and(|inside| inside.contains("diagnose-me")),
        "{diagnosis}"
    );
    // Destroy leaves no mount, loop device or file.
    for (id, state) in [(&id_a, &state_a), (&id_b, &state_b)] {
        let canon = std::fs::canonicalize(state).unwrap();
        rt.destroy(id, state).await.unwrap();
        assert!(!state.exists());
        assert!(!sh(&["losetup", "-a"]).contains(canon.to_str().unwrap()));
    }
    assert!(
        fx.mounts_below_dir().is_empty(),
        "{:?}",
        fx.mounts_below_dir()
    );
    fx.rt.remove_cgroup_parent();
}

/// Whether runsc is missing (the test is then skipped with a message); panics if the host
/// cannot run sandboxes for another reason.
fn which_runsc_missing(test: &str) -> bool {
    match sandpit_runtime_gvisor::check_host(Path::new("runsc")) {
        Ok(_) => false,
        Err(GvisorError::ToolMissing { program, source }) if program == Path::new("runsc") => {
            eprintln!("SKIPPED {test}: runsc is not installed ({source})");
            true
        }
        Err(e) => panic!("this host cannot run gVisor sandboxes: {e}"),
    }
}
