//! The reliability suite's own cases: churn under concurrency, `kill -9` of the server (and
//! of sandboxes' runsc processes) at many points with acknowledged writes checked
//! afterwards, and hostile uploads and request bodies. Each prints a `FIGURE` line that
//! `scripts/reliability` adds up. Lengths come from the environment (the CI defaults are
//! short): `SANDPIT_CHURN_CYCLES`, `SANDPIT_FAULT_ROUNDS`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use reqwest::Method;
use sandpit_sdk::Client;
use sandpit_sdk::types::{CreateSandboxRequest, ForkResult, SandboxMode, SandboxStatus};
use sandpit_test_support::TestServer;

use crate::{base, bin, create, sh};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator, so a failing sequence can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// create → exec → destroy, `SANDPIT_CHURN_CYCLES` times (CI: 24; the long form: 1000) at
/// concurrency 8. Every cycle must succeed and nothing may be left: host objects or rows.
#[tokio::test]
async fn churn_create_exec_destroy_at_concurrency_8() {
    let cycles = env_or("SANDPIT_CHURN_CYCLES", 24);
    let srv = TestServer::start_with(bin(), &[("SANDPIT_RATE_LIMIT_SANDBOXES", "0")])
        .await
        .expect("server starts");
    let client = srv.client();
    let started = Instant::now();
    let cycle = |i: usize| {
        let client = client.clone();
        async move {
            let t = Instant::now();
            let sb = client
                .create_sandbox(&base())
                .await
                .map_err(|e| format!("create: {e:?}"))?;
            let out = sh(&client, &sb.id, &format!("echo {i}")).await;
            client
                .destroy_sandbox(&sb.id)
                .await
                .map_err(|e| format!("destroy: {e:?}"))?;
            if out.stdout != format!("{i}\n") {
                return Err(format!("exec said {out:?}"));
            }
            Ok::<Duration, String>(t.elapsed())
        }
    };
    let results: Vec<Result<Duration, String>> = futures::StreamExt::collect(
        futures::StreamExt::buffer_unordered(futures::stream::iter((0..cycles).map(cycle)), 8),
    )
    .await;
    let elapsed = started.elapsed();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let mut times: Vec<Duration> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    times.sort();
    let p = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    let rows = client.list_sandboxes(None).await.unwrap();
    let leaks = srv.leaks();
    println!(
        "FIGURE load churn cycles={cycles} ok={} failed={} concurrency=8 elapsed_s={:.1} cycles_per_s={:.2} cycle_p50_ms={} cycle_p99_ms={} leaked_rows={} leaked_host_objects={}",
        times.len(),
        failures.len(),
        elapsed.as_secs_f64(),
        cycles as f64 / elapsed.as_secs_f64(),
        p(0.5).as_millis(),
        p(0.99).as_millis(),
        rows.len(),
        leak_count(&leaks),
    );
    assert!(failures.is_empty(), "{failures:?}");
    assert!(rows.is_empty(), "rows left: {rows:?}");
    assert!(leaks.is_empty(), "{leaks:?}");
}

fn leak_count(l: &sandpit_test_support::Leaks) -> usize {
    l.netns.len()
        + l.links.len()
        + l.runsc.len()
        + l.mounts.len()
        + l.sandbox_dirs.len()
        + l.processes.len()
        + l.nft_chains.len()
}

/// Acknowledged writes per sandbox: path → content.
type Acked = BTreeMap<String, BTreeMap<String, String>>;

/// Write a file through the API; remember it only once the server acknowledged it.
async fn write_acked(client: &Client, acked: &mut Acked, id: &str, n: usize) {
    let path = format!("/home/ack-{n}");
    let content = format!("write {n} to {id}");
    if client.upload(id, &path, content.clone()).await.is_ok() {
        acked
            .entry(id.to_string())
            .or_default()
            .insert(path, content);
    }
}

/// A file's content through exec. A sandbox whose runtime was killed answers the first call
/// with 409 `sandbox_stopped` (and is suspended with its files); the retry wakes it.
async fn read_back(client: &Client, id: &str, path: &str) -> String {
    let req = sandpit_sdk::types::ExecRequest {
        command: Some(format!("cat {path}")),
        timeout: Some("30s".into()),
        ..Default::default()
    };
    for _ in 0..2 {
        match client.exec(id, &req).await {
            Ok(out) => return out.stdout,
            Err(e) if e.code() == Some("sandbox_stopped") => continue,
            Err(e) => panic!("reading {path} in {id}: {e:?}"),
        }
    }
    panic!("reading {path} in {id}: the sandbox keeps stopping");
}

/// Kill every process of one sandbox's runtime (`<prefix>-<id>` on its command line).
fn kill_runsc_of(prefix: &str, id: &str) -> usize {
    let needle = format!("{prefix}-{id}");
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmdline).contains(&needle)
            && std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        {
            killed += 1;
        }
    }
    killed
}

/// `kill -9` of the server at many points of create, hibernate, wake, fork, destroy and
/// uploads, and of sandboxes' runsc processes. After each fault: every sandbox is running,
/// suspended or failed with a reason (none stuck in `creating`), and every acknowledged
/// write to a persistent sandbox is still there.
#[tokio::test]
async fn faults_kill9_at_many_points_lose_no_acknowledged_write() {
    let rounds = env_or("SANDPIT_FAULT_ROUNDS", 8);
    let mut srv = TestServer::start_with(bin(), &[("SANDPIT_RATE_LIMIT_SANDBOXES", "0")])
        .await
        .expect("server starts");
    let mut client = srv.client();
    let persistent = || CreateSandboxRequest {
        template: "base".into(),
        mode: SandboxMode::Persistent,
        idle_timeout: Some("1h".into()),
        ..Default::default()
    };
    let mut rng = Lcg(env_or("SANDPIT_FAULT_SEED", 11) as u64);
    let mut acked = Acked::new();
    let mut n = 0;
    let mut keep: Vec<String> = Vec::new();
    for _ in 0..2 {
        let sb = create(&client, persistent()).await;
        for _ in 0..3 {
            n += 1;
            write_acked(&client, &mut acked, &sb.id, n).await;
        }
        keep.push(sb.id);
    }
    let mut faults = 0;
    let mut runsc_kills = 0;
    let mut failed_with_reason = 0;
    let ops = [
        "create",
        "hibernate",
        "wake",
        "fork",
        "destroy",
        "upload",
        "runsc",
    ];
    for round in 0..rounds {
        let op = ops[round % ops.len()];
        let target = keep[rng.next(keep.len() as u64) as usize].clone();
        if op == "runsc" {
            // The sandbox dies under the server: the next call settles it (persistent:
            // suspended with its files) and the one after wakes it.
            if client.get_sandbox(&target).await.unwrap().status == SandboxStatus::Running
                && kill_runsc_of(&srv.prefix, &target) > 0
            {
                runsc_kills += 1;
            }
        } else {
            // A sandbox made to be destroyed while the server dies.
            let victim = if op == "destroy" {
                Some(create(&client, persistent()).await.id)
            } else {
                None
            };
            let c = client.clone();
            let t = victim.clone().unwrap_or_else(|| target.clone());
            let n_up = n + 1;
            let task = tokio::spawn(async move {
                match op {
                    "create" => c.create_sandbox(&persistent()).await.map(|s| vec![s.id]),
                    "hibernate" => c.hibernate(&t).await.map(|_| vec![]),
                    "wake" => c.wake(&t).await.map(|_| vec![]),
                    "fork" => c.fork(&t, 1).await.map(|r| {
                        r.into_iter()
                            .filter_map(|f| match f {
                                ForkResult::Ok(sb) => Some(sb.id),
                                ForkResult::Err(_) => None,
                            })
                            .collect()
                    }),
                    "destroy" => c.destroy_sandbox(&t).await.map(|_| vec![]),
                    _ => c
                        .upload(
                            &t,
                            &format!("/home/ack-{n_up}"),
                            format!("write {n_up} to {t}"),
                        )
                        .await
                        .map(|_| vec![]),
                }
            });
            // Kill at a point somewhere inside the operation.
            tokio::time::sleep(Duration::from_millis(rng.next(900))).await;
            srv.kill9();
            faults += 1;
            let outcome = task.await.unwrap();
            if op == "upload" && outcome.is_ok() {
                n = n_up;
                acked
                    .entry(target.clone())
                    .or_default()
                    .insert(format!("/home/ack-{n}"), format!("write {n} to {target}"));
            }
            srv.restart().await.unwrap();
            client = srv.client();
            if let Some(v) = &victim {
                // Destroyed, or failed/left for a retry that completes it.
                client.destroy_sandbox(v).await.unwrap();
                let v = client.get_sandbox(v).await.unwrap();
                assert_eq!(v.status, SandboxStatus::Destroyed, "{v:?}");
            }
        }
        // Invariants after every fault.
        let rows = client.list_sandboxes(None).await.unwrap();
        for s in &rows {
            match s.status {
                SandboxStatus::Running | SandboxStatus::Suspended => {}
                SandboxStatus::Failed => {
                    assert!(s.error.is_some(), "failed without a reason: {s:?}");
                    failed_with_reason += 1;
                }
                other => panic!("round {round} ({op}): sandbox {} is {other:?}", s.id),
            }
        }
        // Sandboxes created by interrupted operations are not ours to keep.
        for s in rows.iter().filter(|s| !keep.contains(&s.id)) {
            client.destroy_sandbox(&s.id).await.unwrap();
        }
        // One more acknowledged write per round, to whichever sandbox was hit.
        n += 1;
        write_acked(&client, &mut acked, &target, n).await;
    }
    // Every acknowledged write is there (waking suspended sandboxes to read them).
    let mut lost = Vec::new();
    let mut checked = 0;
    for (id, files) in &acked {
        let sb = client.get_sandbox(id).await.unwrap();
        assert!(
            matches!(sb.status, SandboxStatus::Running | SandboxStatus::Suspended),
            "kept sandbox {id} is {:?}: {:?}",
            sb.status,
            sb.error
        );
        for (path, content) in files {
            checked += 1;
            let out = read_back(&client, id, path).await;
            if out != *content {
                lost.push(format!("{id}:{path}"));
            }
        }
    }
    for id in &keep {
        client.destroy_sandbox(id).await.unwrap();
    }
    let leaks = srv.leaks();
    println!(
        "FIGURE faults server_kill9={faults} runsc_kill9={runsc_kills} survived={} acked_writes={checked} lost={} failed_with_reason={failed_with_reason} leaked_host_objects={}",
        faults + runsc_kills,
        lost.len(),
        leak_count(&leaks)
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// A crash (abort, as `kill -9`: nothing cleaned up) at every named step of create,
/// hibernate, wake, fork, destroy and upload (`SANDPIT_FAULT_POINT`, see
/// `sandpit_server::faults`). After each, and a restart, every sandbox is running, suspended
/// or failed with a reason, the sandbox hit keeps its acknowledged write, and nothing leaks.
#[tokio::test]
async fn faults_at_every_named_step_lose_nothing() {
    let mut srv = TestServer::start_with(bin(), &[("SANDPIT_RATE_LIMIT_SANDBOXES", "0")])
        .await
        .expect("server starts");
    let persistent = || CreateSandboxRequest {
        template: "base".into(),
        mode: SandboxMode::Persistent,
        idle_timeout: Some("1h".into()),
        ..Default::default()
    };
    let (mut crashed, mut checked, mut failed_with_reason) = (0, 0, 0);
    let mut lost = Vec::new();
    for &point in sandpit_control::faults::POINTS {
        if point.starts_with("relay.") {
            // Only a server relaying to another reaches it: `fleet::` tests it.
            continue;
        }
        let client = srv.client();
        let sb = create(&client, persistent()).await;
        let content = format!("acknowledged before {point}");
        client
            .upload(&sb.id, "/home/acked", content.clone())
            .await
            .unwrap();
        if point.starts_with("wake.") {
            client.hibernate(&sb.id).await.unwrap();
        }
        srv.set_env("SANDPIT_FAULT_POINT", point);
        srv.restart().await.unwrap();
        let client = srv.client();
        let outcome = match point.split('.').next().unwrap() {
            "create" => client.create_sandbox(&persistent()).await.map(drop),
            "hibernate" => client.hibernate(&sb.id).await.map(drop),
            "wake" => client.wake(&sb.id).await.map(drop),
            "fork" => client.fork(&sb.id, 1).await.map(drop),
            "destroy" => client.destroy_sandbox(&sb.id).await.map(drop),
            "upload" => client.upload(&sb.id, "/home/unacked", "x").await.map(drop),
            other => panic!("no operation reaches {other}"),
        };
        assert!(
            outcome.is_err(),
            "{point}: answered although the server crashed"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !srv.has_exited() {
            assert!(
                Instant::now() < deadline,
                "{point}: the server did not crash"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        crashed += 1;
        srv.set_env("SANDPIT_FAULT_POINT", "");
        srv.restart().await.unwrap();
        let client = srv.client();
        for s in client.list_sandboxes(None).await.unwrap() {
            match s.status {
                SandboxStatus::Running | SandboxStatus::Suspended => {}
                SandboxStatus::Failed => {
                    assert!(s.error.is_some(), "{point}: failed without a reason: {s:?}");
                    failed_with_reason += 1;
                }
                other => panic!("{point}: sandbox {} is {other:?}", s.id),
            }
        }
        if point == "destroy.torn_down" {
            // The destroy is completed by a retry.
            client.destroy_sandbox(&sb.id).await.unwrap();
            let gone = client.get_sandbox(&sb.id).await.unwrap();
            assert_eq!(gone.status, SandboxStatus::Destroyed, "{gone:?}");
        } else {
            checked += 1;
            if read_back(&client, &sb.id, "/home/acked").await != content {
                lost.push(point);
            }
        }
        for s in client.list_sandboxes(None).await.unwrap() {
            client.destroy_sandbox(&s.id).await.unwrap();
        }
    }
    let leaks = srv.leaks();
    println!(
        "FIGURE faults named_points={crashed} survived={crashed} acked_writes={checked} lost={} failed_with_reason={failed_with_reason} leaked_host_objects={}",
        lost.len(),
        leak_count(&leaks)
    );
    assert!(lost.is_empty(), "acknowledged writes lost at {lost:?}");
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// Send raw bytes on a fresh connection and return what comes back within `wait`.
fn raw(url: &str, request: &[u8], wait: Duration) -> String {
    let addr = url.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).to_string()
}

/// Hostile uploads and bodies: over the cap (declared and streamed), a short body, a stalled
/// body, a slow but live client, oversized and malformed JSON, bad paths and ids. Each is
/// refused with a 4xx and a code (or completes, for the slow client), nothing partial is
/// left, and server memory stays bounded.
#[tokio::test]
async fn hostile_uploads_and_bodies_are_refused_or_reaped() {
    let srv = TestServer::start_with(
        bin(),
        &[
            ("SANDPIT_UPLOAD_LIMIT", "8388608"),
            ("SANDPIT_BODY_IDLE_TIMEOUT", "2s"),
        ],
    )
    .await
    .expect("server starts");
    let client = srv.client();
    let sb = create(&client, base()).await;
    let id = sb.id.clone();
    let mut tried = 0;
    let files_in_home = |client: Client, id: String| async move {
        sh(
            &client,
            &id,
            "ls -A /home | grep -v -e '^keep$' -e '^user$' | wc -l",
        )
        .await
        .stdout
        .trim()
        .to_string()
    };
    let rss_before = srv.rss_bytes().unwrap();

    // Over the cap, streamed without a length: refused once the cap passes.
    let chunks =
        futures::stream::iter((0..18).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 512 << 10])));
    crate::assert_api_err(
        client
            .upload(&id, "/home/big2", reqwest::Body::wrap_stream(chunks))
            .await,
        400,
        "file_too_large",
    );
    tried += 1;

    let head = |len: usize, path: &str| {
        format!(
            "PUT /v1/sandboxes/{id}/files?path={path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: {len}\r\n\r\n",
            srv.token
        )
    };
    // Over the cap, declared: refused before any of the body is read (a client still
    // sending would see its connection closed, so only the headers are sent here).
    let answer = raw(
        &srv.url,
        head(9 << 20, "/home/big").as_bytes(),
        Duration::from_secs(10),
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("file_too_large"), "{answer}");
    tried += 1;
    // A body shorter than its Content-Length, then the client goes away: nothing written.
    {
        let addr = srv.url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(head(1000, "/home/short").as_bytes()).unwrap();
        s.write_all(&[b'z'; 100]).unwrap();
        drop(s);
        tried += 1;
    }
    // A stalled body: reaped after the idle timeout (2 s) with 400 invalid_body.
    let t = Instant::now();
    let mut req = head(1000, "/home/stalled").into_bytes();
    req.extend_from_slice(&[b's'; 10]);
    let answer = raw(&srv.url, &req, Duration::from_secs(20));
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("invalid_body"), "{answer}");
    let reaped_after = t.elapsed();
    assert!(reaped_after < Duration::from_secs(15), "{reaped_after:?}");
    tried += 1;
    // The sandbox is not held by the dead upload: it hibernates and wakes.
    client.hibernate(&id).await.unwrap();
    client.wake(&id).await.unwrap();
    // A slow but live client (a byte every 300 ms) is served.
    {
        let addr = srv.url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(head(8, "/home/slow").as_bytes()).unwrap();
        for b in b"slowbody" {
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(&[*b]).unwrap();
        }
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 204"));
    }
    assert_eq!(sh(&client, &id, "cat /home/slow").await.stdout, "slowbody");
    sh(&client, &id, "rm /home/slow").await;
    assert_eq!(
        files_in_home(client.clone(), id.clone()).await,
        "0",
        "no partial files"
    );

    // Malformed and hostile requests: each a 4xx with a code, nothing created.
    let oversized = format!(
        r#"{{"template":"base","metadata":{{"k":"{}"}}}}"#,
        "v".repeat(2 << 20)
    );
    let cases: Vec<(Method, String, Vec<u8>, u16)> = vec![
        (
            Method::POST,
            "/v1/sandboxes".into(),
            oversized.into_bytes(),
            413,
        ),
        (
            Method::POST,
            "/v1/sandboxes".into(),
            b"{not json".to_vec(),
            400,
        ),
        (
            Method::POST,
            "/v1/sandboxes".into(),
            b"\xff\xfe\x00".to_vec(),
            400,
        ),
        (
            Method::POST,
            "/v1/sandboxes".into(),
            br#"{"template":"base","size":"huge"}"#.to_vec(),
            400,
        ),
        (
            Method::POST,
            "/v1/sandboxes".into(),
            br#"{"template":"base","timeout":"-1s"}"#.to_vec(),
            400,
        ),
        (
            Method::POST,
            "/v1/sandboxes".into(),
            br#"{"template":"base","unknown":1}"#.to_vec(),
            400,
        ),
        (
            Method::POST,
            "/v1/sandboxes".into(),
            br#"{"template":"base","env":{"A=B":"x"}}"#.to_vec(),
            400,
        ),
        (
            Method::POST,
            "/v1/sandboxes".into(),
            br#"{"template":"../../etc"}"#.to_vec(),
            404,
        ),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/exec"),
            br#"{"command":"true","timeout":"99d"}"#.to_vec(),
            400,
        ),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/exec"),
            br#"{"command":"true","cwd":"/../.."}"#.to_vec(),
            400,
        ),
        (
            Method::POST,
            format!("/v1/sandboxes/{id}/fork"),
            br#"{"count":100000}"#.to_vec(),
            400,
        ),
        (
            Method::PUT,
            format!("/v1/sandboxes/{id}/files?path=/home/%00x"),
            b"x".to_vec(),
            400,
        ),
        (
            Method::PUT,
            format!("/v1/sandboxes/{id}/files?path=/../../etc/passwd"),
            b"x".to_vec(),
            400,
        ),
        (
            Method::GET,
            format!("/v1/sandboxes/{id}/files?path={}", "a".repeat(5000)),
            vec![],
            400,
        ),
        (
            Method::GET,
            "/v1/sandboxes/..%2f..%2fetc".into(),
            vec![],
            404,
        ),
        (
            Method::GET,
            "/v1/sandboxes?status=everything".into(),
            vec![],
            400,
        ),
        (
            Method::PUT,
            format!("/v1/sandboxes/{id}/egress"),
            br#"{"allow":["300.1.1.1/33"]}"#.to_vec(),
            400,
        ),
        (Method::DELETE, "/v1/sandboxes".into(), vec![], 405),
    ];
    for (method, path, body, want) in &cases {
        // A fresh connection each: the server closes one whose body it did not read (413),
        // and a pooled client would reuse it.
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let sent = http
            .request(method.clone(), format!("{}{path}", srv.url))
            .bearer_auth(&srv.token)
            .body(body.clone())
            .send()
            .await;
        let resp = match sent {
            Ok(resp) => resp,
            // Refused while the client was still sending its 2 MiB: the connection closes
            // under it, which is a refusal too.
            Err(e) if *want == 413 && e.is_request() => {
                tried += 1;
                continue;
            }
            Err(e) => panic!("{method} {path}: {e:?}"),
        };
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let code: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert!(
            (400..500).contains(&status) && code["error"]["code"].is_string(),
            "{method} {path}: {status} {text}"
        );
        assert_eq!(status, *want, "{method} {path}: {text}");
        tried += 1;
    }
    assert_eq!(
        client.list_sandboxes(None).await.unwrap().len(),
        1,
        "nothing was created"
    );
    assert_eq!(
        files_in_home(client.clone(), id.clone()).await,
        "0",
        "no partial files"
    );
    let rss_growth = srv.rss_bytes().unwrap().saturating_sub(rss_before);
    assert!(
        rss_growth < 96 << 20,
        "server RSS grew by {rss_growth} bytes"
    );

    client.destroy_sandbox(&id).await.unwrap();
    let leaks = srv.leaks();
    println!(
        "FIGURE bad_inputs uploads_and_bodies={tried} stalled_body_reaped_s={:.1} server_rss_growth_mib={:.1} leaked_host_objects={}",
        reaped_after.as_secs_f64(),
        rss_growth as f64 / (1 << 20) as f64,
        leak_count(&leaks)
    );
    assert!(leaks.is_empty(), "{leaks:?}");
}
