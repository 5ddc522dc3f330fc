//! Resource abuse inside a sandbox: a CPU hog, an output flood, a fork bomb and a memory hog.
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

    // Memory hog: tmpfs past the 1 GiB limit; the same outcome.
    let hog = create(&client, base()).await;
    let t = Instant::now();
    let out = sh(
        &client,
        &hog.id,
        "setsid dd if=/dev/zero of=/dev/shm/fill bs=1M count=1500 </dev/null >/dev/null 2>&1 & echo started",
    )
    .await;
    assert_eq!(out.stdout.trim(), "started");
    wait_stopped(&client, &hog.id, "the memory hog's sandbox is settled").await;
    let memory_hog_settled = t.elapsed();

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
