//! `sandpit-bench`: measures Sandpit against raw runsc on the same machine in the same run,
//! prints a table and writes JSON (`[{name, n, p50_ms, p95_ms, baseline, baseline_p50_ms, ...}]`).
//! Rows of create, wake, fork and hibernate also carry `phases` (`{name: ms}`): the median of
//! each phase of the server's own `Server-Timing` over the row's iterations.
#![expect(
    clippy::disallowed_methods,
    reason = "an operator's benchmark tool: it reads and writes the operator's own files"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures::StreamExt;
use sandpit_sdk::types::{CreateSandboxRequest, ExecRequest, SandboxMode};
use sandpit_sdk::{Client, Timed};
use sandpit_test_support::TestServer;
use serde::Serialize;

mod density;
mod fleet;
mod placement;
mod templates;

#[derive(Parser)]
struct Args {
    /// The sandpit binary to benchmark (not needed with --only-placement).
    #[arg(long, required_unless_present = "only_placement")]
    sandpit: Option<PathBuf>,
    /// Where to write the JSON results.
    #[arg(long, default_value = "bench/out/latest.json")]
    out: PathBuf,
    /// gVisor platform for both Sandpit and the baselines.
    #[arg(long, default_value = "ptrace")]
    platform: String,
    /// Fewer iterations (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Run only the template benchmarks (pull, build, cache, first sandbox).
    #[arg(long)]
    only_templates: bool,
    /// Run only the placement benchmarks (one decision over 1,000 simulated nodes,
    /// best-of-3 against a full scan). Needs neither root, runsc nor --sandpit.
    #[arg(long, conflicts_with = "only_templates")]
    only_placement: bool,
    /// Run only the fleet benchmarks (two nodes with object storage: relayed create and
    /// exec, wake with the image fetched).
    #[arg(long, conflicts_with_all = ["only_templates", "only_placement"])]
    only_fleet: bool,
    /// Run only the rows of one node's sandboxes (create, exec, files, hibernate, wake,
    /// fork, pool, boot snapshot; with their phases): no templates, fleet or placement.
    #[arg(long, conflicts_with_all = ["only_templates", "only_placement", "only_fleet"])]
    only_lifecycle: bool,
    /// Only the density run: hold N idle sandboxes (created 4 at a time), then report memory,
    /// idle CPU by process kind and exec latency at N held; writes density.json next to
    /// --out. Not run in CI.
    #[arg(long, value_name = "N", conflicts_with_all = ["only_templates", "only_placement", "only_fleet", "only_lifecycle"])]
    density: Option<usize>,
}

#[derive(Serialize, Debug)]
struct Row {
    name: String,
    n: usize,
    p50_ms: f64,
    p95_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    p99_ms: Option<f64>,
    baseline: Option<String>,
    baseline_p50_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mb_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    /// A measurement that is not a latency (see `unit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    unit: Option<String>,
    /// The server's own timings (`Server-Timing`): per phase, in the order they ran, the
    /// median over the row's iterations, then `total`. A JSON object `{name: ms}`.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "ordered_map"
    )]
    phases: Option<Vec<(String, f64)>>,
    /// Why the row was not measured (say, no Docker daemon).
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
}

fn ordered_map<S: serde::Serializer>(
    v: &Option<Vec<(String, f64)>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_map(v.iter().map(|(k, x)| (k, x))),
        None => s.serialize_none(),
    }
}

/// Per phase (in the order phases first appear, `total` last), the median of its time over
/// the samples that have it; `None` when no sample had a `Server-Timing`.
fn median_phases(samples: &[Vec<(String, f64)>]) -> Option<Vec<(String, f64)>> {
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in samples.iter().flatten() {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    if names.is_empty() {
        return None;
    }
    names.sort_by_key(|n| *n == "total");
    Some(
        names
            .into_iter()
            .map(|name| {
                let mut v: Vec<f64> = samples
                    .iter()
                    .flatten()
                    .filter(|(n, _)| n == name)
                    .map(|(_, ms)| *ms)
                    .collect();
                v.sort_by(|a, b| a.total_cmp(b));
                (name.to_string(), v[v.len() / 2])
            })
            .collect(),
    )
}

/// A row whose iterations carried the server's timings.
fn timed_row(
    name: &str,
    samples: &[Duration],
    timings: &[Vec<(String, f64)>],
    baseline: Option<(&str, &[Duration])>,
    target: &str,
) -> Row {
    Row {
        phases: median_phases(timings),
        ..row(name, samples, baseline, target)
    }
}

fn percentile(samples: &[Duration], p: f64) -> f64 {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    if ms.is_empty() {
        return f64::NAN;
    }
    let idx = ((ms.len() - 1) as f64 * p).round() as usize;
    ms[idx]
}

fn row(
    name: &str,
    samples: &[Duration],
    baseline: Option<(&str, &[Duration])>,
    target: &str,
) -> Row {
    Row {
        name: name.into(),
        n: samples.len(),
        p50_ms: percentile(samples, 0.5),
        p95_ms: percentile(samples, 0.95),
        p99_ms: None,
        baseline: baseline.map(|(n, _)| n.to_string()),
        baseline_p50_ms: baseline.map(|(_, s)| percentile(s, 0.5)),
        mb_per_s: None,
        target: (!target.is_empty()).then(|| target.to_string()),
        value: None,
        unit: None,
        phases: None,
        skipped: None,
    }
}

/// Raw runsc on the base template's rootfs: `run -detach` (cold start) and `exec true`.
struct RawRunsc {
    dir: tempfile::TempDir,
    platform: String,
}

impl RawRunsc {
    fn new(rootfs: &Path, platform: &str) -> anyhow::Result<RawRunsc> {
        let dir = tempfile::tempdir()?;
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": ["/bin/sleep", "3600"],
                        "env": ["PATH=/bin"], "cwd": "/"},
            "root": {"path": rootfs, "readonly": true},
            "hostname": "bench",
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"},
                       {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"}],
            "linux": {"namespaces": [{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}]}
        });
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_vec_pretty(&spec)?,
        )?;
        Ok(RawRunsc {
            dir,
            platform: platform.into(),
        })
    }

    fn runsc(&self, args: &[&str]) -> anyhow::Result<()> {
        let root = self.dir.path().join("state");
        // A detached sandbox inherits runsc's stdio: never hand it a pipe we wait on.
        let log = self.dir.path().join("runsc.log");
        let status = Command::new("runsc")
            .arg("--root")
            .arg(&root)
            .arg("--platform")
            .arg(&self.platform)
            .arg("--network=none")
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .status()
            .context("running runsc")?;
        if !status.success() {
            bail!(
                "runsc {args:?}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(())
    }

    fn run(&self, id: &str) -> anyhow::Result<Duration> {
        let bundle = self
            .dir
            .path()
            .to_str()
            .expect("utf-8 temp path")
            .to_string();
        let t = Instant::now();
        self.runsc(&["run", "-detach", "--bundle", &bundle, id])?;
        Ok(t.elapsed())
    }

    fn exec_true(&self, id: &str) -> anyhow::Result<Duration> {
        let t = Instant::now();
        self.runsc(&["exec", id, "/bin/true"])?;
        Ok(t.elapsed())
    }

    /// `checkpoint` then time `restore` of the same image (the baseline for wake and for
    /// starting from a memory image).
    fn checkpoint_restore(&self, id: &str) -> anyhow::Result<Duration> {
        let image = self.dir.path().join(format!("image-{id}"));
        let image = image.to_str().expect("utf-8 temp path").to_string();
        self.runsc(&["checkpoint", "--image-path", &image, id])?;
        self.delete(id);
        let bundle = self
            .dir
            .path()
            .to_str()
            .expect("utf-8 temp path")
            .to_string();
        let t = Instant::now();
        self.runsc(&[
            "restore",
            "-detach",
            "--image-path",
            &image,
            "--bundle",
            &bundle,
            id,
        ])?;
        let elapsed = t.elapsed();
        let _ = std::fs::remove_dir_all(&image);
        Ok(elapsed)
    }

    fn delete(&self, id: &str) {
        let _ = self.runsc(&["delete", "-force", id]);
    }
}

async fn exec_true(client: &Client, id: &str) -> anyhow::Result<Duration> {
    let t = Instant::now();
    let out = client
        .exec(
            id,
            &ExecRequest {
                argv: Some(vec!["true".into()]),
                ..Default::default()
            },
        )
        .await?;
    anyhow::ensure!(out.exit_code == 0, "true failed: {out:?}");
    Ok(t.elapsed())
}

/// Create a `base` sandbox and run `true` in it: its id, the time until `true` answered, and
/// the create's `Server-Timing`.
async fn create_then_exec(
    client: &Client,
) -> anyhow::Result<(String, Duration, Vec<(String, f64)>)> {
    let t = Instant::now();
    let Timed {
        value: sb,
        server_timing,
    } = client
        .create_sandbox_timed(&CreateSandboxRequest {
            template: "base".into(),
            ..Default::default()
        })
        .await?;
    exec_true(client, &sb.id).await?;
    Ok((sb.id, t.elapsed(), server_timing))
}

/// The spawn floor inside a sandbox: one `sh` (a long-lived process in the sandbox) runs
/// `/bin/true` `n` times (fork, exec of busybox, wait; busybox sh execs a command given by
/// path) and then the same loop with the builtin `:`, reading `/proc/uptime` (10 ms
/// resolution) around each; per batch, (loop with `true` - empty loop) / n. One sample per
/// batch.
async fn spawn_floor(
    client: &Client,
    id: &str,
    batches: usize,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let script = format!(
        "i=0; read a _ </proc/uptime; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done; \
         read b _ </proc/uptime; i=0; while [ $i -lt {n} ]; do :; i=$((i+1)); done; \
         read c _ </proc/uptime; echo $a $b $c"
    );
    let mut out = Vec::with_capacity(batches);
    for _ in 0..batches {
        let r = client
            .exec(
                id,
                &ExecRequest {
                    argv: Some(vec!["sh".into(), "-c".into(), script.clone()]),
                    ..Default::default()
                },
            )
            .await?;
        anyhow::ensure!(r.exit_code == 0, "spawn loop: {r:?}");
        let t: Vec<f64> = r
            .stdout
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("spawn loop output {:?}", r.stdout))?;
        anyhow::ensure!(t.len() == 3, "spawn loop output {:?}", r.stdout);
        let per = ((t[1] - t[0]) - (t[2] - t[1])).max(0.0) / n as f64;
        out.push(Duration::from_secs_f64(per));
    }
    Ok(out)
}

/// `docker run --rm <image> /bin/true` of the same rootfs (`docker import` of a tar of it),
/// `n` times after one warm-up: the peer a user would otherwise pick. `Err(why)` when there
/// is no working Docker (`docker info` fails).
fn docker_run_true(rootfs: &Path, n: usize) -> anyhow::Result<Result<Vec<Duration>, String>> {
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(std::process::Stdio::null())
        .output();
    match info {
        Err(_) => return Ok(Err("skipped: no docker client".into())),
        Ok(o) if !o.status.success() => return Ok(Err("skipped: no docker daemon".into())),
        Ok(_) => {}
    }
    let image = "sandpit-bench-rootfs:latest";
    let mut tar = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .args(["-cf", "-", "."])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("tar of the rootfs")?;
    let import = Command::new("docker")
        .args(["import", "-", image])
        .stdin(tar.stdout.take().context("tar's stdout")?)
        .stdout(std::process::Stdio::null())
        .status()
        .context("docker import")?;
    anyhow::ensure!(
        tar.wait()?.success() && import.success(),
        "docker import failed"
    );
    let run = || -> anyhow::Result<Duration> {
        let t = Instant::now();
        let st = Command::new("docker")
            .args(["run", "--rm", image, "/bin/true"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "docker run failed: {st}");
        Ok(t.elapsed())
    };
    let result = run().and_then(|_| (0..n).map(|_| run()).collect::<anyhow::Result<Vec<_>>>());
    let _ = Command::new("docker")
        .args(["rmi", "-f", image])
        .stdout(std::process::Stdio::null())
        .status();
    result.map(Ok)
}

/// Sum of the proportional set size of every runsc process of one server (its data dir is
/// in their command lines).
fn runsc_pss_bytes(data_dir: &Path) -> u64 {
    let needle = format!("{}/", data_dir.display());
    let mut total = 0;
    for pid in sandpit_runtime_gvisor::host_pids() {
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmd).contains(&needle) {
            continue;
        }
        let Ok(rollup) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
            continue;
        };
        if let Some(kb) = rollup
            .lines()
            .find(|l| l.starts_with("Pss:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
        {
            total += kb * 1024;
        }
    }
    total
}

fn mem_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Wait until the base template has `n` sandboxes in the warm pool.
async fn wait_pool(client: &Client, n: u32) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let warm = client
            .templates()
            .await?
            .into_iter()
            .find(|t| t.name == "base")
            .map(|t| t.warm);
        if warm >= Some(n) {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the warm pool did not fill");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` small GETs of a busybox httpd page through the preview proxy, and `n` straight to
/// the sandbox's address from the host (both open a new connection to the sandbox per
/// request: httpd closes after each response).
async fn preview_get(
    srv: &TestServer,
    client: &Client,
    id: &str,
    n: usize,
) -> anyhow::Result<PreviewFigures> {
    let setup = client
        .exec(
            id,
            &ExecRequest {
                command: Some(
                    "mkdir -p /www && echo hello > /www/index.html && httpd -p 8080 -h /www && ip -4 route"
                        .into(),
                ),
                ..Default::default()
            },
        )
        .await?;
    anyhow::ensure!(setup.exit_code == 0, "httpd: {setup:?}");
    let gw: std::net::Ipv4Addr = setup
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("default via "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .context("the sandbox's gateway")?;
    let sandbox_ip = std::net::Ipv4Addr::from(u32::from(gw) + 1);
    client.wait_port(id, 8080, Some("10s")).await?;
    client
        .update_sandbox(
            id,
            &sandpit_sdk::types::UpdateSandboxRequest {
                preview: Some(sandpit_sdk::types::PreviewSettings {
                    privacy: sandpit_sdk::types::PreviewPrivacy::Public,
                }),
                ..Default::default()
            },
        )
        .await?;
    let server: std::net::SocketAddr = srv
        .url
        .trim_start_matches("http://")
        .parse()
        .context("server address")?;
    let host = format!("{id}-8080.localhost");
    let http = reqwest::Client::builder().resolve(&host, server).build()?;
    let proxied_url = format!("http://{host}:{}/", server.port());
    let direct_url = format!("http://{sandbox_ip}:8080/");
    let (mut proxied, mut direct) = (Vec::new(), Vec::new());
    for i in 0..n + 5 {
        // Interleaved, so both see the same machine noise; the first 5 warm up.
        for (url, out) in [(&proxied_url, &mut proxied), (&direct_url, &mut direct)] {
            let t = Instant::now();
            let body = http
                .get(url.as_str())
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            let took = t.elapsed();
            anyhow::ensure!(body == "hello\n", "GET {url}: {body:?}");
            if i >= 5 {
                out.push(took);
            }
        }
    }
    let secs = if n >= 50 { 5.0 } else { 2.0 };
    let rps_proxied = requests_per_second(&http, &proxied_url, secs).await?;
    let rps_direct = requests_per_second(&http, &direct_url, secs).await?;
    Ok(PreviewFigures {
        proxied,
        direct,
        rps_proxied,
        rps_direct,
    })
}

struct PreviewFigures {
    proxied: Vec<Duration>,
    direct: Vec<Duration>,
    rps_proxied: f64,
    rps_direct: f64,
}

/// Completed GETs per second of `url` with 16 clients for `secs` seconds.
async fn requests_per_second(http: &reqwest::Client, url: &str, secs: f64) -> anyhow::Result<f64> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let workers = (0..16).map(|_| async move {
        let mut done = 0u64;
        while Instant::now() < until {
            http.get(url)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            done += 1;
        }
        anyhow::Ok(done)
    });
    let mut total = 0;
    for n in futures::future::join_all(workers).await {
        total += n?;
    }
    Ok(total as f64 / secs)
}

/// `n` egress policy replacements on a running sandbox, alternating between two policies:
/// the time until the API answers, by when the new rules are in force.
async fn policy_updates(client: &Client, id: &str, n: usize) -> anyhow::Result<Vec<Duration>> {
    let deny = sandpit_sdk::types::EgressPolicy {
        mode: "deny_all".into(),
        allow_cidrs: vec!["192.0.2.0/24".into()],
        ..Default::default()
    };
    let allow = sandpit_sdk::types::EgressPolicy::default();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let policy = if i % 2 == 0 { &deny } else { &allow };
        let t = Instant::now();
        client.set_egress(id, policy).await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// Milliseconds for the table: two decimals, four below 0.1 ms (placement decisions take µs).
fn ms(v: f64) -> String {
    if v < 0.1 {
        format!("{v:.4}")
    } else {
        format!("{v:.2}")
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "{:<34} {:>5} {:>10} {:>10} {:>10}  {:<22} {:>10} {:>7}  target",
        "benchmark", "n", "p50 ms", "p95 ms", "MB/s", "baseline", "base p50", "ratio"
    );
    for r in rows {
        let ratio = r.baseline_p50_ms.map(|b| r.p50_ms / b);
        println!(
            "{:<34} {:>5} {:>10} {:>10} {:>10} {:<22} {:>10} {:>7}  {}",
            r.name,
            r.n,
            ms(r.p50_ms),
            ms(r.p95_ms),
            r.mb_per_s
                .map(|m| format!("{m:.0}"))
                .or_else(|| r.value.map(|v| format!("{v:.1}")))
                .unwrap_or_default(),
            r.baseline.clone().unwrap_or_default(),
            r.baseline_p50_ms.map(ms).unwrap_or_default(),
            ratio.map(|x| format!("{x:.2}x")).unwrap_or_default(),
            [r.skipped.clone(), r.unit.clone(), r.target.clone()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join("; "),
        );
        if let Some(phases) = &r.phases {
            println!("  ↳ server: {}", phase_line(phases));
        }
    }
    if rows.iter().any(|r| r.phases.is_some()) {
        println!(
            "\n↳ the server's own Server-Timing, median per phase over the row's iterations (ms). \
             `runsc` is the runsc command itself (`runsc run` or `runsc restore`; hibernate's \
             is `checkpoint`, `runsc checkpoint`); every other phase is Sandpit's work around it. \
             `total` is the server's wall time for the call; the row adds the client, HTTP and \
             (create, wake) the first exec. A fork's children and parent restore at once, so its \
             phases can add up to more than its total. The raw baselines run runsc with \
             `--network=none` on a read-only root and no cgroup limits; Sandpit's `runsc` phase \
             also starts gVisor's netstack on the slot's veth, an overlay root over the \
             sandbox's disk image and its cgroup, inside a private mount namespace. `netns` is \
             mostly the kernel's: an nftables transaction commit and the veth pair and \
             namespace (three processes an attach, two a detach)."
        );
    }
}

/// `slot 1.2 · runsc 252.0 (68%) · … · total 370.5`.
fn phase_line(phases: &[(String, f64)]) -> String {
    let total = phases.iter().find(|(n, _)| n == "total").map(|(_, v)| *v);
    phases
        .iter()
        .map(|(name, v)| match total {
            Some(t) if name == "runsc" && t > 0.0 => {
                format!("{name} {v:.1} ({:.0}%)", v / t * 100.0)
            }
            _ => format!("{name} {v:.1}"),
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.only_placement {
        return finish(&placement::bench(args.quick), &args.out);
    }
    let sandpit = args.sandpit.as_deref().context("--sandpit is required")?;
    if args.only_templates {
        let rows = templates::bench(sandpit, &args.platform, args.quick).await?;
        return finish(&rows, &args.out);
    }
    if args.only_fleet {
        let rows = fleet::bench(sandpit, &args.platform, args.quick).await?;
        return finish(&rows, &args.out);
    }
    if let Some(n) = args.density {
        return density::bench(sandpit, &args.platform, n, &args.out).await;
    }
    let (n_create, n_exec, n_files) = if args.quick { (3, 10, 1) } else { (10, 100, 3) };
    let srv =
        TestServer::start_with(sandpit, &[("SANDPIT_PLATFORM", args.platform.as_str())]).await?;
    let client = srv.client();
    let mut rows = Vec::new();

    // Baselines on the same rootfs the server built for the base template.
    let raw = RawRunsc::new(&srv.data_dir.join("templates/base/rootfs"), &args.platform)?;
    let mut raw_run = Vec::new();
    let mut raw_exec = Vec::new();
    for i in 0..n_create {
        let id = format!("benchraw{i:04}");
        raw_run.push(raw.run(&id)?);
        if i == 0 {
            for _ in 0..n_exec.min(30) {
                raw_exec.push(raw.exec_true(&id)?);
            }
        }
        raw.delete(&id);
    }
    let mut raw_restore = Vec::new();
    for i in 0..n_create.min(5) {
        let id = format!("benchrst{i:04}");
        raw.run(&id)?;
        raw_restore.push(raw.checkpoint_restore(&id)?);
        raw.delete(&id);
    }

    // create → first exec, then destroy.
    let mut create = Vec::new();
    let mut create_phases = Vec::new();
    let mut destroy = Vec::new();
    for _ in 0..n_create {
        let (id, took, phases) = create_then_exec(&client).await?;
        create.push(took);
        create_phases.push(phases);
        let t = Instant::now();
        client.destroy_sandbox(&id).await?;
        destroy.push(t.elapsed());
    }
    rows.push(timed_row(
        "create → first exec (no pool)",
        &create,
        &create_phases,
        Some(("runsc run -detach", &raw_run)),
        "≤ 1.2× runsc run",
    ));
    // The peer a user would otherwise pick, on the same rootfs.
    let rootfs = srv.data_dir.join("templates/base/rootfs");
    let mut r = match docker_run_true(&rootfs, n_create)? {
        Ok(runs) => row(
            "docker run --rm true (same rootfs)",
            &runs,
            Some(("runsc run -detach", &raw_run)),
            "",
        ),
        Err(why) => Row {
            skipped: Some(why),
            ..row("docker run --rm true (same rootfs)", &[], None, "")
        },
    };
    r.unit = Some("docker import of the base rootfs; run, exit, remove".into());
    rows.push(r);
    rows.push(row("destroy", &destroy, None, ""));

    // exec round trip and files on one sandbox.
    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            ..Default::default()
        })
        .await?;
    let mut exec = Vec::new();
    for _ in 0..n_exec {
        exec.push(exec_true(&client, &sb.id).await?);
    }
    rows.push(row(
        "exec `true` round trip (HTTP)",
        &exec,
        Some(("runsc exec true", &raw_exec)),
        "p50 ≤ 5 ms",
    ));
    // The floor under it: spawning `true` from a process already inside the sandbox.
    let (batches, per_batch) = if args.quick { (3, 100) } else { (9, 200) };
    let floor = spawn_floor(&client, &sb.id, batches, per_batch).await?;
    let mut r = row("spawn /bin/true inside (floor)", &floor, None, "");
    r.unit = Some(format!(
        "sh loop in the sandbox, fork+exec+wait ×{per_batch} minus an empty loop, /proc/uptime; \
         HTTP exec adds {} ms",
        ms(percentile(&exec, 0.5) - percentile(&floor, 0.5))
    ));
    rows.push(r);

    let size: usize = 100 * 1024 * 1024;
    let chunk = vec![0xA5u8; 1024 * 1024];
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for _ in 0..n_files {
        let body = futures::stream::iter(
            std::iter::repeat_n(chunk.clone(), size / chunk.len()).map(Ok::<_, std::io::Error>),
        );
        let t = Instant::now();
        client
            .upload(&sb.id, "/tmp/bench.bin", reqwest::Body::wrap_stream(body))
            .await?;
        up.push(t.elapsed());
        let t = Instant::now();
        let mut stream = client
            .download(&sb.id, "/tmp/bench.bin")
            .await?
            .bytes_stream();
        let mut n = 0;
        while let Some(c) = stream.next().await {
            n += c?.len();
        }
        anyhow::ensure!(n == size, "downloaded {n} bytes");
        down.push(t.elapsed());
    }
    let mbps = |s: &[Duration]| (size as f64 / 1e6) / (percentile(s, 0.5) / 1000.0);
    let mut r = row("upload 100 MB", &up, None, "≥ 500 MB/s");
    r.mb_per_s = Some(mbps(&up));
    rows.push(r);
    let mut r = row("download 100 MB", &down, None, "");
    r.mb_per_s = Some(mbps(&down));
    rows.push(r);

    // hibernate and wake of an idle sandbox (memory to disk and back). A fresh one: the
    // file sandbox above holds ~200 MB of page cache, which its memory image would carry.
    client.destroy_sandbox(&sb.id).await?;
    let sb = client
        .create_sandbox(&CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            ..Default::default()
        })
        .await?;
    let (mut hib, mut wake) = (Vec::new(), Vec::new());
    let (mut hib_phases, mut wake_phases) = (Vec::new(), Vec::new());
    for _ in 0..n_create.min(5) {
        let t = Instant::now();
        hib_phases.push(client.hibernate_timed(&sb.id).await?.server_timing);
        hib.push(t.elapsed());
        let t = Instant::now();
        wake_phases.push(client.wake_timed(&sb.id).await?.server_timing);
        exec_true(&client, &sb.id).await?;
        wake.push(t.elapsed());
    }
    rows.push(timed_row(
        "hibernate (idle sandbox)",
        &hib,
        &hib_phases,
        None,
        "p50 ≤ 150 ms",
    ));
    rows.push(timed_row(
        "wake → first exec",
        &wake,
        &wake_phases,
        Some(("runsc restore", &raw_restore)),
        "≤ 1.1× runsc restore",
    ));

    // fork: 1 child, then 10 children, from a running parent.
    let (mut fork1, mut fork10) = (Vec::new(), Vec::new());
    let (mut fork1_phases, mut fork10_phases) = (Vec::new(), Vec::new());
    for round in 0..n_files.min(2) {
        for (count, out, phases) in [
            (1u32, &mut fork1, &mut fork1_phases),
            (10, &mut fork10, &mut fork10_phases),
        ] {
            if args.quick && count == 10 && round > 0 {
                continue;
            }
            let t = Instant::now();
            let children = client.fork_timed(&sb.id, count).await?;
            out.push(t.elapsed());
            phases.push(children.server_timing);
            for c in children.value {
                match c {
                    sandpit_sdk::types::ForkResult::Ok(c) => client.destroy_sandbox(&c.id).await?,
                    sandpit_sdk::types::ForkResult::Err(e) => bail!("fork child failed: {e:?}"),
                }
            }
        }
    }
    rows.push(timed_row(
        "fork 1 child (running parent)",
        &fork1,
        &fork1_phases,
        None,
        "≤ 300 ms",
    ));
    rows.push(timed_row(
        "fork 10 children",
        &fork10,
        &fork10_phases,
        None,
        "≤ 2 s",
    ));
    // A small GET through the preview proxy vs straight to the sandbox's address (after the
    // hibernate rows: direct connections may leave endpoints a checkpoint refuses).
    let preview = preview_get(&srv, &client, &sb.id, n_exec).await?;
    rows.push(row(
        "preview GET (proxy, public)",
        &preview.proxied,
        Some(("direct GET sandbox:8080", &preview.direct)),
        "added p50 ≤ 1 ms",
    ));
    let mut r = row(
        "preview requests/s (16 clients)",
        &[],
        None,
        "≥ 0.8× direct",
    );
    r.value = Some(preview.rps_proxied);
    r.unit = Some(format!(
        "req/s; direct {:.0} req/s ({:.2}×)",
        preview.rps_direct,
        preview.rps_proxied / preview.rps_direct
    ));
    rows.push(r);
    let updates = policy_updates(&client, &sb.id, n_exec).await?;
    rows.push(row("egress policy update (running)", &updates, None, ""));
    client.destroy_sandbox(&sb.id).await?;

    // 20 creates at once (empty pool): wall time of the batch.
    let t = Instant::now();
    let creates = (0..20).map(|_| {
        let c = client.clone();
        async move {
            c.create_sandbox_timed(&CreateSandboxRequest {
                template: "base".into(),
                ..Default::default()
            })
            .await
        }
    });
    let made = futures::future::join_all(creates).await;
    let wall = vec![t.elapsed()];
    let mut parallel_phases = Vec::new();
    for sb in made {
        let sb = sb?;
        parallel_phases.push(sb.server_timing);
        client.destroy_sandbox(&sb.value.id).await?;
    }
    rows.push(timed_row(
        "20 parallel creates (wall)",
        &wall,
        &parallel_phases,
        None,
        "≤ 1.5 s",
    ));
    // Density: memory of idle sandboxes (sum of the PSS of their runsc processes).
    let idle_n = if args.quick { 5 } else { 20 };
    let mut idle = Vec::new();
    for _ in 0..idle_n {
        idle.push(
            client
                .create_sandbox(&CreateSandboxRequest {
                    template: "base".into(),
                    ..Default::default()
                })
                .await?
                .id,
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pss = runsc_pss_bytes(&srv.data_dir) as f64 / idle_n as f64;
    let total = mem_total_bytes() as f64;
    let mut r = row(
        &format!("memory per idle sandbox ({idle_n} held)"),
        &[],
        None,
        "≥ 300 held on 24 GiB",
    );
    r.value = Some(pss / 1e6);
    r.unit = Some(format!(
        "MB PSS; ≈ {:.0} fit in {:.0} GiB",
        total / pss,
        total / (1u64 << 30) as f64
    ));
    rows.push(r);
    // Teardown at scale: the server dies (kill -9) holding the idle sandboxes, and `sandpit
    // cleanup` removes them and their network, as after a host's crash.
    let mut srv = srv;
    srv.kill9();
    let t = Instant::now();
    let out = std::process::Command::new(sandpit)
        .args(["cleanup", "--yes"])
        .env("SANDPIT_DATA_DIR", &srv.data_dir)
        .env("SANDPIT_PREFIX", &srv.prefix)
        .env("SANDPIT_POOL", &srv.pool)
        .env("SANDPIT_PLATFORM", &args.platform)
        .output()?;
    let took = t.elapsed();
    if !out.status.success() {
        bail!("sandpit cleanup: {}", String::from_utf8_lossy(&out.stderr));
    }
    let mut r = row(
        &format!("cleanup of {} idle sandboxes (after kill -9)", idle.len()),
        &[took],
        None,
        "1,000 in ≤ 120 s",
    );
    r.unit = Some(format!(
        "ms; {:.0} ms per sandbox, ≈ {:.0} s for 1,000 at this rate",
        took.as_secs_f64() * 1e3 / idle.len() as f64,
        took.as_secs_f64() * 1000.0 / idle.len() as f64
    ));
    rows.push(r);
    drop(srv);

    // A server with a warm pool: create is a hand-out.
    let pooled = TestServer::start_with(
        sandpit,
        &[
            ("SANDPIT_PLATFORM", args.platform.as_str()),
            ("SANDPIT_WARM_POOL", "2"),
        ],
    )
    .await?;
    let pclient = pooled.client();
    let (mut hits, mut hit_phases) = (Vec::new(), Vec::new());
    for _ in 0..n_create {
        wait_pool(&pclient, 2).await?;
        let (id, took, phases) = create_then_exec(&pclient).await?;
        hits.push(took);
        hit_phases.push(phases);
        pclient.destroy_sandbox(&id).await?;
    }
    rows.push(timed_row(
        "create → first exec (pool hit)",
        &hits,
        &hit_phases,
        Some(("runsc restore", &raw_restore)),
        "p50 ≤ 60 ms",
    ));
    drop(pooled);

    // A server whose creates restore the template's boot snapshot (pool empty).
    let snap = TestServer::start_with(
        sandpit,
        &[
            ("SANDPIT_PLATFORM", args.platform.as_str()),
            ("SANDPIT_BOOT_SNAPSHOTS", "true"),
        ],
    )
    .await?;
    let sclient = snap.client();
    let start = Instant::now();
    while !sclient
        .templates()
        .await?
        .iter()
        .any(|t| t.name == "base" && t.boot_snapshot)
    {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("no boot snapshot");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (mut restored, mut restored_phases) = (Vec::new(), Vec::new());
    for _ in 0..n_create {
        let (id, took, phases) = create_then_exec(&sclient).await?;
        restored.push(took);
        restored_phases.push(phases);
        sclient.destroy_sandbox(&id).await?;
    }
    rows.push(timed_row(
        "create → first exec (boot snapshot)",
        &restored,
        &restored_phases,
        Some(("runsc restore", &raw_restore)),
        "≤ 1.0× runsc restore",
    ));

    drop(snap);
    if args.only_lifecycle {
        return finish(&rows, &args.out);
    }
    rows.extend(templates::bench(sandpit, &args.platform, args.quick).await?);
    rows.extend(fleet::bench(sandpit, &args.platform, args.quick).await?);
    rows.extend(placement::bench(args.quick));
    finish(&rows, &args.out)
}

fn finish(rows: &[Row], out: &Path) -> anyhow::Result<()> {
    print_table(rows);
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut json = serde_json::to_vec_pretty(rows)?;
    json.push(b'\n');
    std::fs::write(out, json)?;
    println!("\nwrote {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[(&str, f64)]) -> Vec<(String, f64)> {
        v.iter().map(|(n, x)| (n.to_string(), *x)).collect()
    }

    #[test]
    fn phases_are_medians_in_the_order_they_first_ran() {
        let samples = vec![
            t(&[("slot", 1.0), ("runsc", 200.0), ("total", 300.0)]),
            t(&[("slot", 3.0), ("runsc", 250.0), ("total", 350.0)]),
            // A sample without the header (absent or refused), and one with an extra phase.
            vec![],
            t(&[
                ("slot", 2.0),
                ("copy", 9.0),
                ("runsc", 220.0),
                ("total", 330.0),
            ]),
        ];
        assert_eq!(
            median_phases(&samples).unwrap(),
            t(&[
                ("slot", 2.0),
                ("runsc", 220.0),
                ("copy", 9.0),
                ("total", 330.0)
            ])
        );
        assert_eq!(median_phases(&[vec![], vec![]]), None);
        let line = phase_line(&t(&[("runsc", 50.0), ("total", 200.0)]));
        assert_eq!(line, "runsc 50.0 (25%) · total 200.0");
    }

    #[test]
    fn phases_serialize_as_an_ordered_object() {
        let r = Row {
            phases: Some(t(&[("slot", 1.5), ("agent", 2.0)])),
            ..row("x", &[Duration::from_millis(1)], None, "")
        };
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.contains(r#""phases":{"slot":1.5,"agent":2.0}"#),
            "{json}"
        );
        assert!(
            !serde_json::to_string(&row("y", &[], None, ""))
                .unwrap()
                .contains("phases")
        );
    }
}
