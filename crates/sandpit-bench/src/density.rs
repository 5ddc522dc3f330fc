//! `--density N`: how many idle sandboxes one host holds, and what holding them costs.
//!
//! Creates `N` idle `base` sandboxes, 4 at a time as a user would, then reports the time to
//! get there, failures (and the first error), PSS per sandbox (its runsc processes), the
//! host's `MemAvailable` left, idle CPU over 30 s split into the server, the sentries, the
//! gofers and everything else the server ran (a `runsc` it waited for counts there), and
//! exec p50 on random sandboxes with `N` held against one idle box measured first in the
//! same run. Prints a table and writes `density.json` next to the other results. Destroys
//! everything it created at the end, on a failure and on Ctrl-C. Not run in CI.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use rand::seq::IndexedRandom;
use sandpit_sdk::Client;
use sandpit_sdk::types::{CreateSandboxRequest, SandboxMode};
use sandpit_test_support::TestServer;
use serde::Serialize;

/// Creates (and destroys) at once.
const PARALLEL: usize = 4;
/// How long idle CPU is sampled.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Execs on the idle box, and on random held sandboxes.
const EXECS: usize = 50;

#[derive(Serialize, Debug, Default)]
pub struct Density {
    pub platform: String,
    pub asked: usize,
    pub held: usize,
    pub create_wall_s: f64,
    pub failures: usize,
    pub first_error: Option<String>,
    pub pss_per_sandbox_mb: f64,
    pub mem_available_gb: f64,
    pub mem_total_gb: f64,
    /// Percent of the whole machine (all cores) over [`IDLE_WINDOW`].
    pub idle_cpu_pct: IdleCpu,
    pub exec_idle_box_p50_ms: f64,
    pub exec_held_p50_ms: f64,
    pub exec_held_p95_ms: f64,
    pub destroy_wall_s: f64,
}

/// CPU used while nothing happens, by whom: percent of all cores.
#[derive(Serialize, Debug, Default, Clone, Copy)]
pub struct IdleCpu {
    pub server: f64,
    pub sentries: f64,
    pub gofers: f64,
    pub other: f64,
    pub total: f64,
}

pub async fn bench(sandpit: &Path, platform: &str, n: usize, out: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(n >= 1, "--density needs at least 1 sandbox");
    if let Some(why) = sandpit_runtime_gvisor::task_limit_shortfall(n as u64) {
        anyhow::bail!("--density {n}: {why}");
    }
    // One /30 per sandbox, with room to spare; the production reaper interval and log level.
    let pool_bits = (4 * (n + 16)).next_power_of_two().trailing_zeros().max(8);
    let pool = format!("10.222.0.0/{}", 32 - pool_bits);
    // Persistent sandboxes count against the suspended limit too (they may be suspended).
    let max_running = (n + 16).to_string();
    let rate = (2 * n).max(1000).to_string();
    let mut srv = TestServer::start_with(
        sandpit,
        &[
            ("SANDPIT_PLATFORM", platform),
            ("SANDPIT_POOL", pool.as_str()),
            ("SANDPIT_MAX_RUNNING", max_running.as_str()),
            ("SANDPIT_MAX_SUSPENDED", max_running.as_str()),
            ("SANDPIT_RATE_LIMIT_SANDBOXES", rate.as_str()),
            ("SANDPIT_REAPER_INTERVAL", "1s"),
            ("RUST_LOG", "info"),
        ],
    )
    .await?;
    // `sandpit cleanup` (when the server is dropped) must see the same pool.
    srv.pool = pool;
    let client = srv.client();
    let mut made: Vec<String> = Vec::new();
    let run = run(&srv, &client, platform, n, &mut made);
    let result = tokio::select! {
        r = run => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    // Whatever happened: destroy what was made (the server's drop removes any rest).
    let t = Instant::now();
    let left = destroy_all(&client, &made).await;
    let destroy_wall_s = t.elapsed().as_secs_f64();
    drop(srv);
    let mut d = result?;
    d.destroy_wall_s = destroy_wall_s;
    print(&d);
    if left > 0 {
        eprintln!(
            "density: {left} sandboxes did not destroy through the API (cleanup removed them)"
        );
    }
    let path = out.with_file_name("density.json");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut json = serde_json::to_vec_pretty(&d)?;
    json.push(b'\n');
    std::fs::write(&path, json)?;
    println!("\nwrote {}", path.display());
    Ok(())
}

async fn create(client: &Client) -> anyhow::Result<String> {
    Ok(client
        .create_sandbox(&CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            ..Default::default()
        })
        .await?
        .id)
}

async fn run(
    srv: &TestServer,
    client: &Client,
    platform: &str,
    n: usize,
    made: &mut Vec<String>,
) -> anyhow::Result<Density> {
    let mut d = Density {
        platform: platform.into(),
        asked: n,
        ..Default::default()
    };
    // The reference: exec on one box with nothing else held.
    let first = create(client).await.context("creating the first sandbox")?;
    made.push(first.clone());
    let mut idle = Vec::with_capacity(EXECS);
    for _ in 0..EXECS {
        idle.push(crate::exec_true(client, &first).await?);
    }
    d.exec_idle_box_p50_ms = crate::percentile(&idle, 0.5);

    let t = Instant::now();
    let mut creates = futures::stream::iter(1..n)
        .map(|_| create(client))
        .buffer_unordered(PARALLEL);
    let mut consecutive = 0;
    while let Some(r) = creates.next().await {
        match r {
            Ok(id) => {
                made.push(id);
                consecutive = 0;
                if made.len().is_multiple_of(25) {
                    eprintln!(
                        "density: {} held after {:.1} s",
                        made.len(),
                        t.elapsed().as_secs_f64()
                    );
                }
            }
            Err(e) => {
                d.failures += 1;
                consecutive += 1;
                d.first_error.get_or_insert_with(|| format!("{e:#}"));
                // The host is full: more attempts only measure the refusal.
                if consecutive >= 10 {
                    eprintln!(
                        "density: 10 creates in a row failed; stopping at {}",
                        made.len()
                    );
                    break;
                }
            }
        }
    }
    drop(creates);
    d.create_wall_s = t.elapsed().as_secs_f64();
    d.held = made.len();

    // Let the last boots settle before anything is sampled.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pss = crate::runsc_pss_bytes(&srv.data_dir) as f64;
    d.pss_per_sandbox_mb = pss / d.held as f64 / 1e6;
    let (avail, total) = meminfo();
    d.mem_available_gb = avail as f64 / (1u64 << 30) as f64;
    d.mem_total_gb = total as f64 / (1u64 << 30) as f64;
    let server = srv.pid().context("the server's pid")? as i32;
    d.idle_cpu_pct = idle_cpu(server, IDLE_WINDOW).await;

    let mut held = Vec::with_capacity(EXECS * 2);
    for _ in 0..EXECS * 2 {
        let id = made.choose(&mut rand::rng()).expect("one sandbox at least");
        held.push(crate::exec_true(client, id).await?);
    }
    d.exec_held_p50_ms = crate::percentile(&held, 0.5);
    d.exec_held_p95_ms = crate::percentile(&held, 0.95);
    Ok(d)
}

/// Destroy `ids`, [`PARALLEL`] at a time; how many failed.
async fn destroy_all(client: &Client, ids: &[String]) -> usize {
    futures::stream::iter(ids)
        .map(|id| async move {
            tokio::time::timeout(Duration::from_secs(60), client.destroy_sandbox(id))
                .await
                .is_ok_and(|r| r.is_ok())
        })
        .buffer_unordered(PARALLEL)
        .filter(|ok| std::future::ready(!ok))
        .count()
        .await
}

/// `(MemAvailable, MemTotal)` in bytes.
fn meminfo() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("MemAvailable:"), field("MemTotal:"))
}

/// Who a process of the server's tree is.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Class {
    Server,
    Sentry,
    Gofer,
    Other,
}

/// One look at `/proc/<pid>/stat`: the parent, CPU of the process itself (utime + stime),
/// and of the children it waited for (cutime + cstime), in clock ticks.
#[derive(Clone, Copy, Debug)]
struct Stat {
    ppid: i32,
    own: u64,
    waited: u64,
}

fn parse_stat(stat: &str) -> Option<Stat> {
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state): ppid 4, utime 14, stime 15, cutime 16, cstime 17.
    let num = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some(Stat {
        ppid: f.get(1)?.parse().ok()?,
        own: num(11)? + num(12)?,
        waited: num(13)? + num(14)?,
    })
}

/// The server's process tree now: class and CPU of each process.
fn tree(server: i32) -> HashMap<i32, (Class, Stat)> {
    let mut stats = HashMap::new();
    let mut names = HashMap::new();
    for pid in sandpit_runtime_gvisor::host_pids() {
        let Some(st) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        else {
            continue;
        };
        // runsc re-executes itself as `runsc-sandbox` (the sentry) and `runsc-gofer`.
        let argv0 = std::fs::read(format!("/proc/{pid}/cmdline"))
            .ok()
            .and_then(|c| c.split(|b| *b == 0).next().map(|a| a.to_vec()))
            .unwrap_or_default();
        stats.insert(pid, st);
        names.insert(pid, argv0);
    }
    let mut classes: HashMap<i32, Option<Class>> = HashMap::new();
    fn classify(
        pid: i32,
        server: i32,
        stats: &HashMap<i32, Stat>,
        names: &HashMap<i32, Vec<u8>>,
        classes: &mut HashMap<i32, Option<Class>>,
        depth: usize,
    ) -> Option<Class> {
        if pid == server {
            return Some(Class::Server);
        }
        if let Some(c) = classes.get(&pid) {
            return *c;
        }
        let st = stats.get(&pid)?;
        if pid <= 1 || depth > 64 {
            return None;
        }
        let c = match classify(st.ppid, server, stats, names, classes, depth + 1) {
            None => None,
            // A sentry's children (the platform's stubs, running the sandbox's processes) are
            // the sentry's.
            Some(Class::Sentry) => Some(Class::Sentry),
            Some(Class::Gofer) => Some(Class::Gofer),
            Some(_) => match names.get(&pid).map(Vec::as_slice) {
                Some(b"runsc-sandbox") => Some(Class::Sentry),
                Some(b"runsc-gofer") => Some(Class::Gofer),
                _ => Some(Class::Other),
            },
        };
        classes.insert(pid, c);
        c
    }
    let pids: Vec<i32> = stats.keys().copied().collect();
    let mut out = HashMap::new();
    for pid in pids {
        if let Some(c) = classify(pid, server, &stats, &names, &mut classes, 0) {
            out.insert(pid, (c, stats[&pid]));
        }
    }
    out
}

/// CPU of the server's tree over `window`, as percent of the machine.
async fn idle_cpu(server: i32, window: Duration) -> IdleCpu {
    let before = tree(server);
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let after = tree(server);
    let secs = t.elapsed().as_secs_f64();
    // USER_HZ: /proc reports CPU time in hundredths of a second on every Linux we run on.
    let ticks = 100.0;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let pct = |t: u64| t as f64 / ticks / secs / cores * 100.0;
    let mut by: HashMap<Class, u64> = HashMap::new();
    for (pid, (class, st)) in &after {
        let (own0, waited0) = before.get(pid).map_or((0, 0), |(_, s)| (s.own, s.waited));
        *by.entry(*class).or_default() += st.own.saturating_sub(own0);
        if *class == Class::Server {
            // Whatever the server ran and waited for (`runsc list`, `ip`, `nft`...).
            *by.entry(Class::Other).or_default() += st.waited.saturating_sub(waited0);
        }
    }
    let get = |c| pct(by.get(&c).copied().unwrap_or(0));
    let cpu = IdleCpu {
        server: get(Class::Server),
        sentries: get(Class::Sentry),
        gofers: get(Class::Gofer),
        other: get(Class::Other),
        total: 0.0,
    };
    IdleCpu {
        total: cpu.server + cpu.sentries + cpu.gofers + cpu.other,
        ..cpu
    }
}

fn print(d: &Density) {
    let rows: Vec<(&str, String)> = vec![
        ("platform", d.platform.clone()),
        (
            "sandboxes held / asked",
            format!("{} / {}", d.held, d.asked),
        ),
        (
            "time to get there",
            format!(
                "{:.1} s ({:.0} ms per sandbox, {PARALLEL} at a time)",
                d.create_wall_s,
                d.create_wall_s * 1e3 / d.held.saturating_sub(1).max(1) as f64
            ),
        ),
        (
            "failures",
            match &d.first_error {
                Some(e) => format!("{} (first: {e})", d.failures),
                None => d.failures.to_string(),
            },
        ),
        (
            "PSS per sandbox",
            format!("{:.1} MB (runsc processes)", d.pss_per_sandbox_mb),
        ),
        (
            "MemAvailable left",
            format!("{:.1} of {:.1} GiB", d.mem_available_gb, d.mem_total_gb),
        ),
        (
            "idle CPU, % of machine (30 s)",
            format!(
                "{:.2} total: server {:.2} · sentries {:.2} · gofers {:.2} · other {:.2}",
                d.idle_cpu_pct.total,
                d.idle_cpu_pct.server,
                d.idle_cpu_pct.sentries,
                d.idle_cpu_pct.gofers,
                d.idle_cpu_pct.other
            ),
        ),
        (
            "exec p50, idle box",
            format!("{:.2} ms", d.exec_idle_box_p50_ms),
        ),
        (
            "exec p50 / p95, random held",
            format!(
                "{:.2} / {:.2} ms ({:.2}× the idle box)",
                d.exec_held_p50_ms,
                d.exec_held_p95_ms,
                d.exec_held_p50_ms / d.exec_idle_box_p50_ms
            ),
        ),
        (
            "destroy all",
            format!("{:.1} s ({PARALLEL} at a time)", d.destroy_wall_s),
        ),
    ];
    println!("density ({} idle sandboxes of base)", d.asked);
    for (k, v) in rows {
        println!("  {k:<32} {v}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields() {
        let st = parse_stat(
            "42 (runsc (x) S 7 42 42 0 -1 4194560 100 0 0 0 30 4 5 6 20 0 1 0 987654 1000 10",
        )
        .unwrap();
        assert_eq!((st.ppid, st.own, st.waited), (7, 34, 11));
    }

    #[test]
    fn own_tree_is_the_server() {
        let me = std::process::id() as i32;
        let t = tree(me);
        assert_eq!(t.get(&me).map(|(c, _)| *c), Some(Class::Server));
    }
}
