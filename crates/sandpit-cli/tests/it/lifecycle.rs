//! Persistent sandboxes: suspend on idle, wake on demand, memory and files kept.

use std::time::Duration;

use sandpit_sdk::types::{CreateSandboxRequest, SandboxMode, SandboxStatus};
use sandpit_test_support::wait_until;

use crate::{assert_api_err, create, server, sh};

/// The counter's current value, read through the agent.

#[tokio::test]
async fn persistent_sandbox_suspends_when_idle_and_wakes_with_memory_and_files() {
    let srv = server().await;
    let client = srv.client();
    let sb = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("3s".into()),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(sb.expires_at, None);
    assert_eq!(sb.idle_timeout.as_deref(), Some("3s"));
    let id = sb.id.clone();

    // A process that counts in memory and writes its count to a file, and a file.
    sh(&client, &id, crate::COUNTER).await;
    client
        .upload(&id, "/home/notes.txt", "kept across suspend")
        .await
        .unwrap();
    wait_until(Duration::from_secs(10), "the counter runs", || async {
        (crate::counter(&client, &id).await >= 3).then_some(())
    })
    .await
    .unwrap();
    assert_api_err(client.keepalive(&id, "1m").await, 409, "invalid_state");

    // Idle: the reaper suspends it.
    wait_until(Duration::from_secs(60), "idle suspend", || async {
        (client.get_sandbox(&id).await.ok()?.status == SandboxStatus::Suspended).then_some(())
    })
    .await
    .unwrap();
    let leaks = srv.leaks();
    assert!(
        leaks.runsc.is_empty() && leaks.mounts.is_empty() && leaks.processes.is_empty(),
        "suspended holds no runtime: {leaks:?}"
    );
    assert_eq!(
        client
            .list_sandboxes(Some("suspended"))
            .await
            .unwrap()
            .len(),
        1
    );
    let on_disk = std::fs::read_dir(srv.data_dir.join("checkpoints").join(&id))
        .unwrap()
        .count();
    assert!(on_disk > 0, "a memory image is on disk");

    // Any call that needs it running wakes it: the file is there and the same process
    // continues counting from where it stopped (a fresh boot would start at 1).
    let suspended_at = {
        let text = sandpit_test_support::read_stopped_sandbox_file(
            &srv.data_dir.join("sandboxes").join(&id),
            "/tmp/count",
        )
        .expect("the suspended sandbox's counter is on its disk");
        text.trim().parse::<u64>().unwrap()
    };
    let out = sh(&client, &id, "cat /home/notes.txt").await;
    assert_eq!(out.stdout, "kept across suspend");
    assert_eq!(
        client.get_sandbox(&id).await.unwrap().status,
        SandboxStatus::Running
    );
    let first = crate::counter(&client, &id).await;
    assert!(
        first >= suspended_at,
        "resumed at {first}, suspended at {suspended_at}"
    );
    wait_until(
        Duration::from_secs(10),
        "the counter keeps counting",
        || async { (crate::counter(&client, &id).await > first).then_some(()) },
    )
    .await
    .unwrap();

    // Explicit hibernate and wake.
    assert_eq!(
        client.hibernate(&id).await.unwrap().status,
        SandboxStatus::Suspended
    );
    assert_eq!(
        client.hibernate(&id).await.unwrap().status,
        SandboxStatus::Suspended
    );
    let woken = client.wake(&id).await.unwrap();
    assert_eq!(woken.status, SandboxStatus::Running);
    assert_eq!(
        client.wake(&id).await.unwrap().status,
        SandboxStatus::Running,
        "wake of a running sandbox is 200"
    );
    let after = crate::counter(&client, &id).await;
    assert!(after >= first, "{after} >= {first}");

    // A memory image that will not restore (here: damaged on disk) does not leave the
    // sandbox unusable: it starts from its files, and says that its processes were lost.
    client.hibernate(&id).await.unwrap();
    let image = srv
        .data_dir
        .join("checkpoints")
        .join(&id)
        .join("checkpoint.img");
    std::fs::write(&image, b"not a memory image").unwrap();
    let woken = client.wake(&id).await.unwrap();
    assert_eq!(woken.status, SandboxStatus::Running);
    let why = woken.error.unwrap_or_default();
    assert!(
        why.contains("memory snapshot could not be restored"),
        "{why}"
    );
    let out = sh(
        &client,
        &id,
        "cat /home/notes.txt; a=$(cat /tmp/count); sleep 0.5; b=$(cat /tmp/count); [ \"$a\" = \"$b\" ] && echo ' gone'",
    )
    .await;
    assert_eq!(out.stdout, "kept across suspend gone\n", "{out:?}");
    assert!(
        !srv.data_dir.join("checkpoints").join(&id).exists(),
        "the spent image is removed"
    );

    // Shutdown: no memory kept; the next call boots afresh with the files.
    assert_eq!(
        client.shutdown(&id).await.unwrap().status,
        SandboxStatus::Suspended
    );
    assert!(!srv.data_dir.join("checkpoints").join(&id).exists());
    let out = sh(
        &client,
        &id,
        "cat /home/notes.txt; a=$(cat /tmp/count); sleep 0.5; b=$(cat /tmp/count); [ \"$a\" = \"$b\" ] && echo ' stopped'",
    )
    .await;
    assert_eq!(
        out.stdout, "kept across suspend stopped\n",
        "files kept, processes gone: {out:?}"
    );

    client.destroy_sandbox(&id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

#[tokio::test]
async fn warm_pool_hands_out_fresh_sandboxes_rekeyed_for_their_owner() {
    let srv =
        sandpit_test_support::TestServer::start_with(crate::bin(), &[("SANDPIT_WARM_POOL", "2")])
            .await
            .unwrap();
    let client = srv.client();
    let warm = || async {
        let t = client.templates().await.ok()?;
        t.into_iter().find(|t| t.name == "base").map(|t| t.warm)
    };
    wait_until(Duration::from_secs(60), "the pool fills", || async {
        (warm().await? == 2).then_some(())
    })
    .await
    .unwrap();

    let a = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            env: [("OWNER".to_string(), "alice".to_string())].into(),
            ..Default::default()
        },
    )
    .await;
    let out = sh(&client, &a.id, "echo $OWNER $SANDPIT_SANDBOX_ID").await;
    assert_eq!(out.stdout, format!("alice {}\n", a.id));
    // Its resolver was written while it waited in the pool: the node's, like a cold create's.
    let out = sh(&client, &a.id, "cat /etc/resolv.conf").await;
    assert!(
        out.stdout.starts_with("# written by sandpit") || out.stdout.starts_with("# sandpit:"),
        "a pooled sandbox has the node's resolver: {out:?}"
    );
    client
        .upload(&a.id, "/home/alice.txt", "private")
        .await
        .unwrap();

    let b = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            ..Default::default()
        },
    )
    .await;
    assert_ne!(a.id, b.id);
    let out = sh(&client, &b.id, "echo \"[$OWNER]\"; ls /home").await;
    assert_eq!(
        out.stdout, "[]\nuser\n",
        "nothing of the previous owner: {out:?}"
    );
    assert_eq!(
        client.list_sandboxes(None).await.unwrap().len(),
        2,
        "pooled sandboxes are not listed"
    );

    // The pool refills after hand-outs.
    wait_until(Duration::from_secs(60), "the pool refills", || async {
        (warm().await? == 2).then_some(())
    })
    .await
    .unwrap();

    client.destroy_sandbox(&a.id).await.unwrap();
    client.destroy_sandbox(&b.id).await.unwrap();
    let leaks = srv.leaks();
    assert_eq!(leaks.runsc.len(), 2, "only the pool is left: {leaks:?}");
}

#[tokio::test]
async fn creates_restore_the_template_boot_snapshot_when_enabled() {
    let srv = sandpit_test_support::TestServer::start_with(
        crate::bin(),
        &[("SANDPIT_BOOT_SNAPSHOTS", "true")],
    )
    .await
    .unwrap();
    let client = srv.client();
    wait_until(Duration::from_secs(60), "the boot snapshot", || async {
        let t = client.templates().await.ok()?;
        t.into_iter()
            .find(|t| t.name == "base" && t.boot_snapshot)
            .map(|_| ())
    })
    .await
    .unwrap();
    let owner = |who: &str| CreateSandboxRequest {
        template: "base".into(),
        env: [("OWNER".to_string(), who.to_string())].into(),
        ..Default::default()
    };
    let a = create(&client, owner("a")).await;
    let b = create(&client, owner("b")).await;
    assert_eq!(
        sh(&client, &a.id, "echo $OWNER > /home/who; cat /home/who")
            .await
            .stdout,
        "a\n"
    );
    assert_eq!(
        sh(&client, &b.id, "echo $OWNER; ls /home").await.stdout,
        "b\nuser\n",
        "restored copies share nothing"
    );
    // The resolver came with the image (written before it was taken), not written again.
    let resolv = sh(&client, &b.id, "cat /etc/resolv.conf").await.stdout;
    assert!(
        resolv.starts_with("# written by sandpit") || resolv.starts_with("# sandpit:"),
        "{resolv:?}"
    );
    assert!(srv.log().contains("took the base template's boot snapshot"));
    assert!(!srv.log().contains("booting cold"), "restores succeeded");
    client.destroy_sandbox(&a.id).await.unwrap();
    client.destroy_sandbox(&b.id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// What counts as activity: a command still running keeps a persistent sandbox awake past
/// its idle timeout (the reaper skips it); once the sandbox is idle again it is suspended.
#[tokio::test]
async fn a_running_exec_keeps_a_persistent_sandbox_awake() {
    let srv = server().await;
    let client = srv.client();
    let sb = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("1s".into()),
            ..Default::default()
        },
    )
    .await;
    let out = sh(&client, &sb.id, "sleep 3; echo done").await;
    assert_eq!(
        out.stdout, "done\n",
        "the command ran to completion, uninterrupted"
    );
    assert_eq!(
        client.get_sandbox(&sb.id).await.unwrap().status,
        SandboxStatus::Running
    );
    wait_until(
        Duration::from_secs(30),
        "idle suspend after the command",
        || async {
            (client.get_sandbox(&sb.id).await.ok()?.status == SandboxStatus::Suspended)
                .then_some(())
        },
    )
    .await
    .unwrap();
    client.destroy_sandbox(&sb.id).await.unwrap();
}

/// A restored sandbox whose agent does not answer (here: stopped with SIGSTOP before the
/// checkpoint, so it is restored stopped) gets its agent restarted by init, and keeps its memory.
#[tokio::test]
async fn a_deaf_restored_agent_is_restarted_and_memory_is_kept() {
    let srv = sandpit_test_support::TestServer::start_with(
        crate::bin(),
        &[("SANDPIT_AGENT_READY_TIMEOUT", "6s")],
    )
    .await
    .unwrap();
    let client = srv.client();
    let sb = create(
        &client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            ..Default::default()
        },
    )
    .await;
    let id = sb.id;
    sh(&client, &id, crate::COUNTER).await;
    wait_until(Duration::from_secs(10), "the counter runs", || async {
        (crate::counter(&client, &id).await >= 2).then_some(())
    })
    .await
    .unwrap();
    // Stop the agent's server process (the child of init named `exe`).
    let root = srv.data_dir.join("runsc");
    let runtime_id = format!("{}-{id}", srv.prefix);
    let agent_server = || {
        let ps = std::process::Command::new("runsc")
            .arg(format!("--root={}", root.display()))
            .args(["ps", &runtime_id])
            .output()
            .unwrap();
        let table = String::from_utf8_lossy(&ps.stdout).into_owned();
        table
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(2) == Some(&"1") && f.last() == Some(&"exe")).then(|| f[1].to_string())
            })
            .unwrap_or_else(|| panic!("no agent server in {table}"))
    };
    let serve = agent_server();
    let stopped = std::process::Command::new("runsc")
        .arg(format!("--root={}", root.display()))
        .args(["kill", "--pid", &serve, &runtime_id, "STOP"])
        .status()
        .unwrap();
    assert!(stopped.success());
    // It is checkpointed stopped, and restored stopped: deaf.
    client.hibernate(&id).await.unwrap();
    client.wake(&id).await.unwrap();
    assert_ne!(agent_server(), serve, "the deaf agent server was replaced");
    let before = crate::counter(&client, &id).await;
    let after_restart = client.get_sandbox(&id).await.unwrap();
    assert_eq!(after_restart.status, SandboxStatus::Running);
    assert_eq!(after_restart.error, None, "memory kept: {after_restart:?}");
    wait_until(Duration::from_secs(10), "the counter goes on", || async {
        (crate::counter(&client, &id).await > before).then_some(())
    })
    .await
    .unwrap();
    client.destroy_sandbox(&id).await.unwrap();
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// The memory limit (bytes) and CPU quota (thousandths of a core) of sandbox `id` of
/// server `srv`, read from its cgroups on the host (v2 or v1).
fn cgroup_limits(srv: &sandpit_test_support::TestServer, id: &str) -> (Option<u64>, Option<u64>) {
    let out = std::process::Command::new("find")
        .args(["/sys/fs/cgroup", "-maxdepth", "8", "-type", "d", "-name"])
        .arg(format!("{}-{id}", srv.prefix))
        .output()
        .expect("find runs");
    let read = |dir: &str, name: &str| {
        std::fs::read_to_string(std::path::Path::new(dir).join(name))
            .ok()
            .map(|s| s.trim().to_string())
    };
    let (mut memory, mut cpu) = (None, None);
    for dir in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(v) = read(dir, "memory.max").or_else(|| read(dir, "memory.limit_in_bytes")) {
            memory = v.parse().ok();
        }
        if let Some(v) = read(dir, "cpu.max") {
            let mut parts = v.split_whitespace().map(|p| p.parse::<u64>().ok());
            if let (Some(Some(q)), Some(Some(p))) = (parts.next(), parts.next()) {
                cpu = Some(q * 1000 / p);
            }
        }
        if let (Some(q), Some(p)) = (
            read(dir, "cpu.cfs_quota_us"),
            read(dir, "cpu.cfs_period_us"),
        ) && let (Ok(q), Ok(p)) = (q.parse::<u64>(), p.parse::<u64>())
        {
            cpu = Some(q * 1000 / p);
        }
    }
    (memory, cpu)
}

/// `--cgroup-parent /…` (what the systemd unit gives): a sandbox's cgroups are made under
/// that path from each hierarchy's root, outside the server's own, carry its limits, and go
/// with it.
#[tokio::test]
async fn sandboxes_go_under_an_absolute_cgroup_parent() {
    let parent = format!("sandpit-it-{}", std::process::id());
    let srv = sandpit_test_support::TestServer::start_with(
        crate::bin(),
        &[("SANDPIT_CGROUP_PARENT", format!("/{parent}").as_str())],
    )
    .await
    .expect("server starts");
    let c = srv.client();
    let sb = create(&c, crate::base()).await;
    let id = sb.id.as_str();
    assert_eq!(sh(&c, id, "echo ok").await.stdout, "ok\n");
    let dirs = |name: &str| {
        let out = std::process::Command::new("find")
            .args([
                "/sys/fs/cgroup",
                "-maxdepth",
                "8",
                "-type",
                "d",
                "-name",
                name,
            ])
            .output()
            .expect("find runs");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let own = dirs(&format!("{}-{id}", srv.prefix));
    assert!(!own.is_empty(), "no cgroup of the sandbox");
    for d in &own {
        assert!(
            d.ends_with(&format!("/{parent}/{}-{id}", srv.prefix))
                && d.split('/').filter(|c| *c == parent).count() == 1,
            "{d} is not right under /{parent} of its hierarchy"
        );
    }
    assert_eq!(cgroup_limits(&srv, id), (Some(1 << 30), Some(1000)));
    c.destroy_sandbox(id).await.expect("destroy");
    assert!(
        dirs(&format!("{}-{id}", srv.prefix)).is_empty(),
        "the sandbox's cgroups outlived it"
    );
    for d in dirs(&parent) {
        let _ = std::fs::remove_dir(d);
    }
}

/// A running sandbox resized through the API gets its new CPU and memory limits at once
/// (same processes, same memory) and its disk grown; shrinking keeps the larger disk.
#[tokio::test]
async fn a_running_sandbox_is_resized_in_place() {
    let srv = server().await;
    let c = srv.client();
    let sb = create(
        &c,
        CreateSandboxRequest {
            mode: SandboxMode::Persistent,
            timeout: None,
            ..crate::base()
        },
    )
    .await;
    let id = sb.id.as_str();
    sh(
        &c,
        id,
        "sleep 1000 >/dev/null 2>&1 & echo $! > /tmp/pid; echo kept > /tmp/mark",
    )
    .await;
    let pid = sh(&c, id, "cat /tmp/pid").await.stdout;
    assert_eq!(cgroup_limits(&srv, id), (Some(1 << 30), Some(1000)));
    let disk_kib = |c: &sandpit_sdk::Client| {
        let c = c.clone();
        async move {
            let out = sh(&c, id, "df -k / | tail -1").await.stdout;
            out.split_whitespace()
                .nth(1)
                .and_then(|k| k.parse::<u64>().ok())
                .unwrap_or_else(|| panic!("df: {out}"))
        }
    };
    let small_disk = disk_kib(&c).await;

    let resized = c
        .update_sandbox(
            id,
            &sandpit_sdk::types::UpdateSandboxRequest {
                size: Some("large".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (resized.size.as_str(), resized.status),
        ("large", SandboxStatus::Running)
    );
    assert_eq!(cgroup_limits(&srv, id), (Some(4 << 30), Some(4000)));
    assert_eq!(
        sh(&c, id, "cat /tmp/pid").await.stdout,
        pid,
        "same processes"
    );
    assert_eq!(
        sh(&c, id, "kill -0 $(cat /tmp/pid) && cat /tmp/mark")
            .await
            .stdout,
        "kept\n"
    );
    // The disk grows at once where the kernel lets a mounted filesystem grow (it needs
    // CAP_SYS_RESOURCE, which some CI containers lack), else at the next start: a wake.
    let running_disk = disk_kib(&c).await;
    assert!(
        running_disk >= small_disk,
        "{small_disk} KiB -> {running_disk} KiB"
    );
    c.hibernate(id).await.unwrap();
    c.wake(id).await.unwrap();
    let large_disk = disk_kib(&c).await;
    assert!(
        large_disk > small_disk * 3,
        "the disk grew: {small_disk} KiB -> {large_disk} KiB (while running: {running_disk} KiB)"
    );
    assert_eq!(
        cgroup_limits(&srv, id),
        (Some(4 << 30), Some(4000)),
        "kept across the wake"
    );
    // The sandbox can use the new room.
    let dd = sh(
        &c,
        id,
        "dd if=/dev/zero of=/tmp/big bs=1M count=400 2>&1; sync",
    )
    .await;
    assert_eq!(dd.exit_code, 0, "{dd:?}");
    // Its size from stat: busybox `wc -c` reads a small read at a time, a gVisor syscall
    // each (100 MB took 10 s on the dev box one day), so 400 MB could pass the exec's 30 s.
    assert_eq!(
        sh(&c, id, "stat -c %s /tmp/big").await.stdout.trim(),
        (400u64 << 20).to_string()
    );

    // Back to small: CPU and memory shrink, the disk keeps its size.
    c.update_sandbox(
        id,
        &sandpit_sdk::types::UpdateSandboxRequest {
            size: Some("small".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(cgroup_limits(&srv, id), (Some(1 << 30), Some(1000)));
    assert_eq!(disk_kib(&c).await, large_disk);
    assert_api_err(
        c.update_sandbox(
            id,
            &sandpit_sdk::types::UpdateSandboxRequest {
                size: Some("huge".into()),
                ..Default::default()
            },
        )
        .await,
        400,
        "invalid_size",
    );
    c.destroy_sandbox(id).await.unwrap();
    assert!(srv.leaks().is_empty(), "{:?}", srv.leaks());
}
