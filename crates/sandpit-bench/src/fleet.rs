//! Two nodes on one database with object storage (`file://` on this host's disk): what the
//! relay between nodes adds to a create and an exec, and what a wake costs when the waking
//! node must fetch the image from object storage rather than find it on its own disk.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sandpit_sdk::Client;
use sandpit_sdk::types::{CreateSandboxRequest, SandboxMode};
use sandpit_test_support::TestServer;

use crate::{Row, exec_true, row};

const SECRET: &str = "bench-fleet-secret-0123";

/// Two servers, A and B, sharing A's SQLite database, a node secret and an object store.
async fn two_nodes(
    sandpit: &Path,
    platform: &str,
    store: &str,
) -> anyhow::Result<(TestServer, TestServer)> {
    let env = |i: u32, db: Option<String>| {
        let mut env = vec![
            ("SANDPIT_PLATFORM".to_string(), platform.to_string()),
            ("SANDPIT_NODE_NAME".into(), format!("bench-{i}")),
            ("SANDPIT_NODE_SECRET".into(), SECRET.into()),
            ("SANDPIT_OBJECT_STORE".into(), store.to_string()),
            // Beats every second: a node hears its drain or undrain within one.
            ("SANDPIT_NODE_LEASE".into(), "3s".into()),
        ];
        env.extend(db.map(|d| ("SANDPIT_DATABASE".to_string(), d)));
        env
    };
    let a = TestServer::start_with_index_env(sandpit, |i| env(i, None)).await?;
    let db = format!("sqlite://{}", a.data_dir.join("sandpit.db").display());
    let b = TestServer::start_with_index_env(sandpit, |i| env(i, Some(db.clone()))).await?;
    Ok((a, b))
}

/// `sandpit nodes drain|undrain NAME` on A's database. An undrain is heard by the node at
/// its next heartbeat (creates and take-overs on it answer 503 `node_draining` until
/// then): wait for it.
async fn set_draining(sandpit: &Path, a: &TestServer, name: &str, on: bool) -> anyhow::Result<()> {
    let out = std::process::Command::new(sandpit)
        .arg("nodes")
        .arg(if on { "drain" } else { "undrain" })
        .arg(name)
        .arg("--data-dir")
        .arg(&a.data_dir)
        .output()?;
    if !out.status.success() {
        bail!("sandpit nodes: {}", String::from_utf8_lossy(&out.stderr));
    }
    if !on {
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    Ok(())
}

fn node_name(s: &TestServer) -> String {
    format!("bench-{}", s.index)
}

/// Hibernate `id` through `c` and wait until its image is stored remotely; its bytes.
async fn hibernate_stored(c: &Client, id: &str) -> anyhow::Result<u64> {
    c.hibernate(id).await?;
    let start = Instant::now();
    loop {
        let sb = c.get_sandbox(id).await?;
        if let Some(image) = sb.image {
            match image.remote.as_str() {
                "stored" => return Ok(image.bytes.unwrap_or(0)),
                "uploading" => {}
                other => bail!("the upload ended {other}: {:?}", image.error),
            }
        }
        if start.elapsed() > Duration::from_secs(300) {
            bail!("the image of {id} was not stored within 5 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn bench(sandpit: &Path, platform: &str, quick: bool) -> anyhow::Result<Vec<Row>> {
    let bucket = tempfile::tempdir()?;
    let store = format!("file://{}", bucket.path().join("images").display());
    let (a, b) = two_nodes(sandpit, platform, &store).await?;
    let result = measure(sandpit, &a, &b, quick).await;
    if result.is_err() {
        for (name, s) in [("A", &a), ("B", &b)] {
            let log = s.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!("---- node {name} log (last 30 lines) ----");
            for l in tail.into_iter().rev() {
                eprintln!("{l}");
            }
        }
    }
    result
}

async fn measure(
    sandpit: &Path,
    a: &TestServer,
    b: &TestServer,
    quick: bool,
) -> anyhow::Result<Vec<Row>> {
    let n = if quick { 3 } else { 10 };
    let (ca, cb) = (a.client(), b.client_with(&a.token));
    let mut rows = Vec::new();

    // Relayed vs local: with A draining, every create sent to A is placed on B and relayed;
    // the same create sent to B runs there. Execs on B's sandbox, through A and through B.
    set_draining(sandpit, a, &node_name(a), true).await?;
    let (mut relayed, mut local) = (Vec::new(), Vec::new());
    let mut made = Vec::new();
    for i in 0..2 * n {
        let (client, into) = if i % 2 == 0 {
            (&ca, &mut relayed)
        } else {
            (&cb, &mut local)
        };
        let t = Instant::now();
        let sb = client
            .create_sandbox(&CreateSandboxRequest {
                template: "base".into(),
                ..Default::default()
            })
            .await
            .context("create")?;
        into.push(t.elapsed());
        made.push(sb.id);
    }
    if !b.leaks().runsc.iter().any(|r| r.contains(&made[0])) {
        bail!("the create sent to the draining node did not run on the other");
    }
    rows.push(row(
        "create, relayed to another node",
        &relayed,
        Some(("create on that node", &local)),
        "≤ +5 ms p50",
    ));
    let (mut exec_relayed, mut exec_local) = (Vec::new(), Vec::new());
    for _ in 0..5 * n {
        let t = Instant::now();
        exec_true(&ca, &made[0]).await?;
        exec_relayed.push(t.elapsed());
        let t = Instant::now();
        exec_true(&cb, &made[0]).await?;
        exec_local.push(t.elapsed());
    }
    rows.push(row(
        "exec, relayed to another node",
        &exec_relayed,
        Some(("exec on that node", &exec_local)),
        "",
    ));
    for id in made {
        cb.destroy_sandbox(&id).await?;
    }
    set_draining(sandpit, a, &node_name(a), false).await?;

    // Wake where the image is vs wake that fetches it: a persistent sandbox moves back and
    // forth; each round hibernates it where it runs (waiting for the upload), wakes it
    // there, hibernates it again and wakes it through the other node while its own drains.
    let sb = ca
        .create_sandbox(&CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            ..Default::default()
        })
        .await?;
    let id = sb.id;
    let owner_is_a = a.leaks().runsc.iter().any(|r| r.contains(&id));
    let (mut owner, mut other) = if owner_is_a { (a, b) } else { (b, a) };
    let (mut wake_local, mut wake_fetch) = (Vec::new(), Vec::new());
    let mut bytes = 0;
    for _ in 0..n {
        let (co, cx) = (owner.client_with(&a.token), other.client_with(&a.token));
        hibernate_stored(&co, &id).await?;
        let t = Instant::now();
        co.wake(&id).await?;
        exec_true(&co, &id).await?;
        wake_local.push(t.elapsed());

        bytes = hibernate_stored(&co, &id).await?;
        set_draining(sandpit, a, &node_name(owner), true).await?;
        let t = Instant::now();
        cx.wake(&id).await?;
        exec_true(&cx, &id).await?;
        wake_fetch.push(t.elapsed());
        set_draining(sandpit, a, &node_name(owner), false).await?;
        if !other.leaks().runsc.iter().any(|r| r.contains(&id)) {
            bail!("the wake through the other node did not move the sandbox");
        }
        std::mem::swap(&mut owner, &mut other);
    }
    let mut r = row(
        "wake → exec, image fetched",
        &wake_fetch,
        Some(("wake, image on the node", &wake_local)),
        "",
    );
    // The fetch's own rate, from the waking nodes' logs.
    let rates: Vec<f64> = [a.log(), b.log()]
        .iter()
        .flat_map(|log| log.lines().map(str::to_string).collect::<Vec<_>>())
        .filter(|l| l.contains("fetched from object storage") && l.contains("'s image"))
        .filter_map(|l| field(&l, "mb_per_s"))
        .collect();
    if !rates.is_empty() {
        let mut rates = rates;
        rates.sort_by(f64::total_cmp);
        r.mb_per_s = Some(rates[rates.len() / 2]);
    }
    r.unit = Some(format!("image {} MiB", bytes >> 20));
    rows.push(r);
    owner.client_with(&a.token).destroy_sandbox(&id).await?;
    Ok(rows)
}

/// The number after `name=` in a log line (ANSI colour codes removed first).
fn field(line: &str, name: &str) -> Option<f64> {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // An escape sequence: up to and including its final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let at = plain.find(&format!("{name}="))? + name.len() + 1;
    let digits: String = plain[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn fields_are_read_through_colour_codes() {
        let line = "\x1b[2mx\x1b[0m bytes\x1b[0m\x1b[2m=\x1b[0m5242880 \x1b[3mmb_per_s\x1b[0m\x1b[2m=\x1b[0m137 done";
        assert_eq!(super::field(line, "mb_per_s"), Some(137.0));
        assert_eq!(super::field(line, "bytes"), Some(5242880.0));
        assert_eq!(super::field("mb_per_s=12", "mb_per_s"), Some(12.0));
        assert_eq!(super::field("nothing", "mb_per_s"), None);
    }
}
