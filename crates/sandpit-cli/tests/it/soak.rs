//! Soak: a long run of mixed create / fork / hibernate / wake / exec / destroy operations,
//! then a count of everything left on the host. `SANDPIT_SOAK_OPS` sets the length (CI runs
//! a short one; `SANDPIT_SOAK_OPS=500` is the full soak).

use sandpit_sdk::types::{CreateSandboxRequest, ForkResult, SandboxMode};

use crate::{server, sh};

/// A small deterministic generator, so a failing sequence can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

#[tokio::test]
async fn soak_mixed_lifecycle_operations_leave_nothing_behind() {
    let ops: usize = std::env::var("SANDPIT_SOAK_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let seed: u64 = std::env::var("SANDPIT_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let srv = server().await;
    let client = srv.client();
    let mut rng = Lcg(seed);
    let mut live: Vec<String> = Vec::new();
    let mut done = [0usize; 6];
    for step in 0..ops {
        // Keep the population between 1 and 6 sandboxes.
        let op = if live.is_empty() {
            0
        } else if live.len() >= 6 {
            5
        } else {
            rng.next(6)
        };
        let pick = |rng: &mut Lcg, live: &[String]| live[rng.next(live.len())].clone();
        match op {
            0 => {
                let mode = if rng.next(2) == 0 {
                    SandboxMode::Persistent
                } else {
                    SandboxMode::Ephemeral
                };
                let sb = client
                    .create_sandbox(&CreateSandboxRequest {
                        template: "base".into(),
                        mode,
                        timeout: (mode == SandboxMode::Ephemeral).then(|| "10m".into()),
                        ..Default::default()
                    })
                    .await
                    .unwrap_or_else(|e| panic!("step {step}: create: {e}"));
                live.push(sb.id);
            }
            1 => {
                let id = pick(&mut rng, &live);
                for r in client
                    .fork(&id, 1 + rng.next(2) as u32)
                    .await
                    .unwrap_or_else(|e| panic!("step {step}: fork {id}: {e}"))
                {
                    match r {
                        ForkResult::Ok(sb) => live.push(sb.id),
                        ForkResult::Err(e) => panic!("step {step}: fork child of {id}: {e:?}"),
                    }
                }
            }
            2 => {
                let id = pick(&mut rng, &live);
                client
                    .hibernate(&id)
                    .await
                    .unwrap_or_else(|e| panic!("step {step}: hibernate {id}: {e}"));
            }
            3 => {
                let id = pick(&mut rng, &live);
                client
                    .wake(&id)
                    .await
                    .unwrap_or_else(|e| panic!("step {step}: wake {id}: {e}"));
            }
            4 => {
                let id = pick(&mut rng, &live);
                let out = sh(&client, &id, "echo ok").await;
                assert_eq!(out.stdout, "ok\n", "step {step}: exec in {id}");
            }
            _ => {
                let i = rng.next(live.len());
                let id = live.swap_remove(i);
                client
                    .destroy_sandbox(&id)
                    .await
                    .unwrap_or_else(|e| panic!("step {step}: destroy {id}: {e}"));
            }
        }
        done[op] += 1;
    }
    for id in live.drain(..) {
        client.destroy_sandbox(&id).await.unwrap();
    }
    eprintln!("soak: {ops} operations (create, fork, hibernate, wake, exec, destroy) = {done:?}");
    let leaks = srv.leaks();
    let rows = client.list_sandboxes(None).await.unwrap().len();
    println!(
        "FIGURE load soak ops={ops} leaked_rows={rows} leaked_host_objects={}",
        leaks.netns.len()
            + leaks.links.len()
            + leaks.runsc.len()
            + leaks.mounts.len()
            + leaks.sandbox_dirs.len()
            + leaks.processes.len()
            + leaks.nft_chains.len()
    );
    assert!(leaks.is_empty(), "after {ops} operations: {leaks:?}");
    assert_eq!(rows, 0);
}
