//! Resource abuse inside a sandbox: a CPU hog, an output flood, a disk fill, a fork bomb and a
//! memory hog.
//! The abusive sandbox is contained (throttled, capped, or killed and settled with a reason);
//! the server and a neighbour sandbox stay responsive. Prints the neighbour's exec p50
//! inflation as a `FIGURE` line for `scripts/reliability`.

use std::time::{Duration, Instant};

use sandpit_sdk::Client;
use sandpit_sdk::types::ExecRequest;
use sandpit_test_support::wait_until;

use crate::{base, create, server, sh};

/// Median latency of `n` trivial execs in `id`.
async fn exec_p50(client: &Client, id: &str, n: usize) -> Duration {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let out = sh(client, id, "true").await;
        assert_eq!(out.exit_code, 0, "{out:?}");
        times.push(t.elapsed());
    }
    times.sort();
    times[n / 2]
}

fn exec_req(command: &str, timeout: &str) -> ExecRequest {
    ExecRequest {
        command: Some(command.into()),
        timeout: Some(timeout.into()),
        ..Default::default()
    }
}

/// Wait until `id` is found dead: an exec answers 409 `sandbox_stopped` (the server settled
/// it) or `sandbox_not_running` (an earlier call did).
async fn wait_stopped(client: &Client, id: &str, what: &str) {
    wait_until(Duration::from_secs(90), what, || async {
        match client.exec(id, &exec_req("true", "3s")).await {
            Err(e) if matches!(e.code(), Some("sandbox_stopped" | "sandbox_not_running")) => {
                Some(())
            }
            _ => None,
        }
    })
    .await
    .unwrap();
    let sb = client.get_sandbox(id).await.unwrap();
    assert_eq!(sb.status.as_str(), "failed", "{sb:?}");
    assert!(
        sb.error
            .as_deref()
            .is_some_and(|e| e.contains("memory or process limit")),
        "{sb:?}"
    );
}

#[tokio::test]
async fn abusive_sandboxes_are_contained_and_neighbours_stay_responsive() {
    let srv = server().await;
    let client = srv.client();
    let neighbour = create(&client, base()).await;
    let abuser = create(&client, base()).await;
    let baseline = exec_p50(&client, &neighbour.id, 15).await;

    // CPU hog: four spinning processes, throttled to the sandbox's one core.
    let out = sh(
        &client,
        &abuser.id,
        "for i in 1 2 3 4; do (while :; do :; done) >/dev/null 2>&1 & done; echo started",
    )
    .await;
    assert_eq!(out.stdout.trim(), "started");
    let under_cpu_hog = exec_p50(&client, &neighbour.id, 15).await;

    // Output flood: 48 MiB on stdout; the response keeps 16 MiB and the server's memory
    // stays bounded.
    let rss_before = srv.rss_bytes().expect("server RSS");
    let flood = client
        .exec(&abuser.id, &exec_req("yes | head -c 50331648", "60s"))
        .await
        .expect("the flood exec answers");
    assert_eq!(flood.stdout.len(), 16 << 20);
    let rss_after = srv.rss_bytes().expect("server RSS");
    let rss_growth = rss_after.saturating_sub(rss_before);
    assert!(
        rss_growth < 160 << 20,
        "server RSS grew by {rss_growth} bytes"
    );

    // Console flood: init's descriptors (reachable through /proc/1/fd) no longer lead to a
    // host file, so writing to them grows nothing on the host.
    let console = srv
        .data_dir
        .join("sandboxes")
        .join(&abuser.id)
        .join("console.log");
    let console_before = std::fs::metadata(&console).map_or(0, |m| m.len());
    let out = sh(
        &client,
        &abuser.id,
        "for fd in 0 1 2; do head -c 5000000 /dev/zero > /proc/1/fd/$fd; done; echo done",
    )
    .await;
    assert_eq!(out.stdout, "done\n", "{out:?}");
    let console_growth = std::fs::metadata(&console)
        .map_or(0, |m| m.len())
        .saturating_sub(console_before);
    assert!(
        console_growth < 4096,
        "console.log grew by {console_growth} bytes"
    );

    // Disk fill: the sandbox's disk (256 MiB for test servers) fills up. Writes inside get
    // ENOSPC and an upload answers 507 `disk_full`; the host holds no more than the disk's
    // size; the sandbox keeps running, and freeing space makes writes work again.
    let fill = sh(
        &client,
        &abuser.id,
        "dd if=/dev/zero of=/fill bs=1M count=400 2>&1; echo rc=$?",
    )
    .await;
    assert!(
        fill.stdout.contains("No space left") && !fill.stdout.contains("rc=0"),
        "{fill:?}"
    );
    let upload = client
        .upload(&abuser.id, "/more", vec![7u8; 4 << 20])
        .await
        .expect_err("an upload into a full disk fails");
    assert_eq!(upload.code(), Some("disk_full"), "{upload:?}");
    {
        use std::os::unix::fs::MetadataExt;
        let image = srv
            .data_dir
            .join("sandboxes")
            .join(&abuser.id)
            .join("disk.img");
        let meta = std::fs::metadata(&image).expect("the sandbox has a disk image");
        assert_eq!(meta.len(), 256 << 20);
        assert!(
            meta.blocks() * 512 <= 256 << 20,
            "{} bytes",
            meta.blocks() * 512
        );
    }
    let neighbour_out = sh(&client, &neighbour.id, "echo ok > /x && cat /x").await;
    assert_eq!(
        neighbour_out.stdout, "ok\n",
        "the neighbour's disk is its own"
    );
    let freed = sh(
        &client,
        &abuser.id,
        "rm /fill && echo again > /after && cat /after",
    )
    .await;
    assert_eq!(freed.stdout, "again\n", "{freed:?}");
    client
        .upload(&abuser.id, "/more", vec![7u8; 4 << 20])
        .await
        .expect("an upload fits once space is freed");

    // Fork bomb: the sandbox hits its process limit and dies; the server notices and fails
    // it with a reason (an ephemeral sandbox) and removes what it held.
    let t = Instant::now();
    // In a session of its own, so the exec's end does not kill it.
    let out = sh(
        &client,
        &abuser.id,
        "setsid sh -c 'b(){ b|b& }; b' </dev/null >/dev/null 2>&1 & echo started",
    )
    .await;
    assert_eq!(out.stdout.trim(), "started");
    wait_stopped(&client, &abuser.id, "the fork bomb's sandbox is settled").await;
    let fork_bomb_settled = t.elapsed();
    let under_fork_bomb = exec_p50(&client, &neighbour.id, 5).await;

    // Memory hog: tmpfs past the 1 GiB limit; the same outcome. Nobody calls the sandbox
    // this time: the liveness watch notices the death, ends the command still running in it
    // (409 `sandbox_stopped`, not a timeout 110 s later) and settles it.
    let hog = create(&client, base()).await;
    let sleeper = {
        let (client, id) = (client.clone(), hog.id.clone());
        tokio::spawn(async move { client.exec(&id, &exec_req("sleep 100", "100s")).await })
    };
    let t = Instant::now();
    let out = sh(
        &client,
        &hog.id,
        "setsid dd if=/dev/zero of=/dev/shm/fill bs=1M count=1500 </dev/null >/dev/null 2>&1 & echo started",
    )
    .await;
    assert_eq!(out.stdout.trim(), "started");
    wait_until(
        Duration::from_secs(90),
        "the liveness watch settles the memory hog's sandbox",
        || async {
            let sb = client.get_sandbox(&hog.id).await.unwrap();
            (sb.status.as_str() == "failed").then_some(sb)
        },
    )
    .await
    .unwrap();
    let memory_hog_settled = t.elapsed();
    let ended = sleeper
        .await
        .unwrap()
        .expect_err("the command died with its sandbox");
    assert_eq!(ended.code(), Some("sandbox_stopped"), "{ended:?}");
    wait_stopped(&client, &hog.id, "the memory hog's sandbox is settled").await;

    // The neighbour and the server never noticed more than a slowdown.
    let after = exec_p50(&client, &neighbour.id, 15).await;
    let health = Instant::now();
    let r = reqwest::get(format!("{}/healthz", srv.url)).await.unwrap();
    assert!(r.status().is_success());
    let health = health.elapsed();
    assert!(
        under_cpu_hog < Duration::from_secs(2) && under_fork_bomb < Duration::from_secs(2),
        "neighbour p50: {baseline:?} → {under_cpu_hog:?} (CPU hog), {under_fork_bomb:?} (fork bomb)"
    );
    assert!(health < Duration::from_secs(1), "healthz took {health:?}");
    let neighbour_out = sh(&client, &neighbour.id, "echo fine").await;
    assert_eq!(neighbour_out.stdout, "fine\n");

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "FIGURE abuse neighbour_p50_ms baseline={:.1} cpu_hog={:.1} fork_bomb={:.1} after={:.1} inflation_cpu_hog={:.2}x server_rss_growth_mib={:.1} fork_bomb_settled_s={:.1} memory_hog_settled_s={:.1}",
        ms(baseline),
        ms(under_cpu_hog),
        ms(under_fork_bomb),
        ms(after),
        ms(under_cpu_hog) / ms(baseline).max(0.001),
        rss_growth as f64 / (1 << 20) as f64,
        fork_bomb_settled.as_secs_f64(),
        memory_hog_settled.as_secs_f64(),
    );

    client.destroy_sandbox(&neighbour.id).await.unwrap();
    // Destroy is idempotent for failed sandboxes too.
    for id in [&abuser.id, &hog.id] {
        client.destroy_sandbox(id).await.unwrap();
        assert_eq!(
            client.get_sandbox(id).await.unwrap().status.as_str(),
            "destroyed"
        );
    }
    // Failed sandboxes were torn down when they were settled.
    let leaks = srv.leaks();
    assert!(leaks.is_empty(), "{leaks:?}");
}
