//! Test fixtures: start a real `sandpit serve` with its own data directory, prefix and
//! address pool (so tests run in parallel without touching each other), kill and restart
//! it, count what it left on the host, and poll with [`wait_until`].
#![cfg_attr(
    test,
    allow(
        clippy::disallowed_methods,
        reason = "unit tests build host-side fixtures by path"
    )
)]
#![expect(
    clippy::disallowed_methods,
    reason = "the test harness's own temp dirs and host state"
)]

pub mod registry;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sandpit_sdk::Client;

/// Poll `check` until it returns `Some`, or fail after `limit`.
pub async fn wait_until<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The workspace root (two levels above this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// A file a stopped or suspended sandbox wrote, read from the host (`path` is absolute in the
/// sandbox): from its disk image with `debugfs` (the disk is not mounted then), or from the
/// plain upper layer of a sandbox without a disk. `None` if it is not there.
pub fn read_stopped_sandbox_file(sandbox_dir: &Path, path: &str) -> Option<String> {
    let image = sandbox_dir.join("disk.img");
    if !image.exists() {
        return std::fs::read_to_string(
            sandbox_dir.join("upper").join(path.trim_start_matches('/')),
        )
        .ok();
    }
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat /upper{path}"))
        .arg(&image)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    (out.status.success() && !out.stdout.is_empty())
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The static agent: `SANDPIT_AGENT_BIN`, or the output of `scripts/build-agent`.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SANDPIT_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let p = workspace_root().join("target/x86_64-unknown-linux-gnu/release/sandpit-agent");
    assert!(
        p.exists(),
        "no static agent at {}: run scripts/build-agent (the test command does)",
        p.display()
    );
    p
}

/// A /24 pool and a prefix reserved for one test process by a lock file.
struct Reservation {
    index: u32,
    lock: PathBuf,
}

impl Reservation {
    fn take() -> Reservation {
        let dir = std::env::temp_dir().join("sandpit-test-pools");
        std::fs::create_dir_all(&dir).expect("pool lock dir");
        let start = std::process::id() % 200;
        for i in 0..200u32 {
            let index = (start + i) % 200;
            let lock = dir.join(index.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&lock)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    let _ = write!(f, "{}", std::process::id());
                    return Reservation { index, lock };
                }
                Err(_) => {
                    // Reclaim the lock of a test process that died.
                    let pid = std::fs::read_to_string(&lock).unwrap_or_default();
                    let alive = pid
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists());
                    if !alive {
                        let _ = std::fs::remove_file(&lock);
                    }
                }
            }
        }
        panic!("no free test pool reservation");
    }
}

/// Clean up after test processes that were killed mid-run (a timeout, a cancelled CI job):
/// their `TestServer` never ran its cleanup, so their sandboxes would run until the machine
/// stops. Each test directory names its owner; for every one whose owner is dead, `sandpit
/// cleanup` removes its sandboxes and network objects, then the directory goes.
fn reap_abandoned_servers(bin: &Path) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with("sandpit-test-")
        {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(entry.path().join("owner")) else {
            continue;
        };
        let mut fields = owner.split_whitespace();
        let (Some(pid), Some(prefix), Some(pool)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let _ = Command::new(bin)
            .args(["cleanup", "--yes"])
            .env("SANDPIT_DATA_DIR", entry.path().join("data"))
            .env("SANDPIT_PREFIX", prefix)
            .env("SANDPIT_POOL", pool)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(entry.path());
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.lock);
    }
}

/// A PostgreSQL database made for one test server. `SANDPIT_E2E_POSTGRES` names the
/// server (a base URL without a database, e.g. `postgres://postgres@127.0.0.1:54329`, as
/// `scripts/lib/postgres.sh` exports for the store suite); each test server gets its own
/// database, dropped with it, so parallel tests never share rows.
pub struct TestDatabase {
    pub url: String,
    base: String,
    name: String,
}

impl TestDatabase {
    fn create_if_asked() -> anyhow::Result<Option<TestDatabase>> {
        let Ok(base) = std::env::var("SANDPIT_E2E_POSTGRES") else {
            return Ok(None);
        };
        let base = base.trim_end_matches('/').to_string();
        let name = format!("sandpit_e2e_{}", uuid::Uuid::new_v4().simple());
        psql(&base, &format!("CREATE DATABASE {name}"))?;
        Ok(Some(TestDatabase {
            url: format!("{base}/{name}"),
            base,
            name,
        }))
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = psql(
            &self.base,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Run one statement on the PostgreSQL server's `postgres` database.
fn psql(base: &str, sql: &str) -> anyhow::Result<()> {
    let out = Command::new("psql")
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(format!("{base}/postgres"))
        .args(["-c", sql])
        .output()
        .context("running psql (the postgresql-client package)")?;
    if !out.status.success() {
        bail!("psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A running server for one test.
pub struct TestServer {
    /// The reservation index: the pool is `10.213.<index>.0/24`, the prefix `t<index>`.
    /// Tests that need more private addresses derive them from it, so that parallel test
    /// processes never collide.
    pub index: u32,
    pub url: String,
    /// `http://<metrics listener>`: `GET {metrics_url}/metrics` scrapes the server.
    pub metrics_url: String,
    pub token: String,
    pub prefix: String,
    pub pool: String,
    pub data_dir: PathBuf,
    bin: PathBuf,
    /// The subcommand that runs it: `serve`, or `node`.
    command: &'static str,
    extra_env: Vec<(String, String)>,
    /// The PostgreSQL database of this server (created for it, dropped with it) when the
    /// tests run on PostgreSQL (`SANDPIT_E2E_POSTGRES`); `None`: the SQLite default.
    pub database: Option<TestDatabase>,
    /// The CA that signed the server's certificate when it serves HTTPS
    /// ([`TestServer::start_tls`]); `url` is then `https://`.
    pub tls_ca: Option<PathBuf>,
    child: Option<Child>,
    _tmp: tempfile::TempDir,
    _reservation: Reservation,
}

impl TestServer {
    /// Start `bin serve` with a fresh data directory.
    pub async fn start(bin: &Path) -> anyhow::Result<TestServer> {
        Self::start_with(bin, &[]).await
    }

    /// Start with extra environment (e.g. `SANDPIT_UPLOAD_LIMIT`).
    pub async fn start_with(bin: &Path, env: &[(&str, &str)]) -> anyhow::Result<TestServer> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_with_index_env(bin, |_| env).await
    }

    /// Start with extra environment computed from the reservation index (see
    /// [`TestServer::index`]), for settings that name test-private addresses.
    pub async fn start_with_index_env(
        bin: &Path,
        env: impl FnOnce(u32) -> Vec<(String, String)>,
    ) -> anyhow::Result<TestServer> {
        Self::start_command(bin, "serve", env).await
    }

    /// Start `bin serve --tls-cert cert --tls-key key` (through `SANDPIT_TLS_CERT`/`_KEY`)
    /// with extra environment. The harness trusts `ca` for its own requests (the health
    /// check); [`TestServer::client`] does not (it speaks to `url` with the system's roots).
    pub async fn start_tls(
        bin: &Path,
        cert: &Path,
        key: &Path,
        ca: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<TestServer> {
        let mut env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        env.push(("SANDPIT_TLS_CERT".into(), cert.display().to_string()));
        env.push(("SANDPIT_TLS_KEY".into(), key.display().to_string()));
        Self::start_full(bin, "serve", |_| env, Some(ca.to_path_buf())).await
    }

    /// Start `bin serve` with extra environment (its own TLS settings among them), its
    /// clients trusting `ca` (which must exist before the start).
    pub async fn start_trusting(
        bin: &Path,
        ca: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<TestServer> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start_full(bin, "serve", |_| env, Some(ca.to_path_buf())).await
    }

    /// Start `bin <command>` (`serve` or `node`) with extra environment computed from the
    /// reservation index.
    pub async fn start_command(
        bin: &Path,
        command: &'static str,
        env: impl FnOnce(u32) -> Vec<(String, String)>,
    ) -> anyhow::Result<TestServer> {
        Self::start_full(bin, command, env, None).await
    }

    async fn start_full(
        bin: &Path,
        command: &'static str,
        env: impl FnOnce(u32) -> Vec<(String, String)>,
        tls_ca: Option<PathBuf>,
    ) -> anyhow::Result<TestServer> {
        reap_abandoned_servers(bin);
        let reservation = Reservation::take();
        let tmp = tempfile::Builder::new().prefix("sandpit-test-").tempdir()?;
        let database = TestDatabase::create_if_asked()?;
        let mut server = TestServer {
            index: reservation.index,
            url: String::new(),
            metrics_url: String::new(),
            token: format!("sp_test_{}", std::process::id()),
            prefix: format!("t{}", reservation.index),
            pool: format!("10.213.{}.0/24", reservation.index),
            data_dir: tmp.path().join("data"),
            bin: bin.to_path_buf(),
            command,
            extra_env: env(reservation.index),
            database,
            tls_ca,
            child: None,
            _tmp: tmp,
            _reservation: reservation,
        };
        // Who owns this directory, for `reap_abandoned_servers` if this process is killed.
        std::fs::write(
            server._tmp.path().join("owner"),
            format!("{} {} {}", std::process::id(), server.prefix, server.pool),
        )?;
        server.spawn().await?;
        Ok(server)
    }

    /// Start the server on a free port. The port is found by binding and letting go, so
    /// another process may take it before the server binds it: then (the server exits
    /// saying so) another port is tried, a few times.
    async fn spawn(&mut self) -> anyhow::Result<()> {
        let mut tries = 0;
        loop {
            let log_before = self.log().len();
            match self.spawn_once().await {
                Err(_)
                    if tries < 3 && self.log()[log_before..].contains("Address already in use") =>
                {
                    tries += 1;
                    eprintln!("test server: its port was taken before it bound it; trying another");
                }
                other => return other,
            }
        }
    }

    async fn spawn_once(&mut self) -> anyhow::Result<()> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self._tmp.path().join("server.log"))?;
        // The server dies with the test process (setpriv sets its parent-death signal), so a
        // killed test leaves no server behind; its sandboxes are reaped by the next test.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(&self.bin)
            .arg(self.command)
            .env("SANDPIT_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "SANDPIT_METRICS_LISTEN",
                format!("127.0.0.1:{metrics_port}"),
            )
            .env("SANDPIT_DATA_DIR", &self.data_dir)
            .env("SANDPIT_PREFIX", &self.prefix)
            .env("SANDPIT_POOL", &self.pool)
            .env("SANDPIT_BOOTSTRAP_TOKEN", &self.token)
            .env("SANDPIT_AGENT_BIN", agent_bin())
            .env("SANDPIT_REAPER_INTERVAL", "200ms")
            // Tests count sandboxes and leaks; a test that wants the pool sets it.
            .env("SANDPIT_WARM_POOL", "0")
            // Small disks keep a test's fill quick; sparse images cost nothing until written.
            .env("SANDPIT_DISK_LIMIT", "256M")
            // A CI machine may have less free than the production reserve; the limits test
            // sets one of its own.
            .env("SANDPIT_MIN_FREE_DISK", "0")
            .env("RUST_LOG", "info,sandpit_server=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(db) = &self.database {
            cmd.env("SANDPIT_DATABASE", &db.url);
        }
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        self.child = Some(child);
        self.metrics_url = format!("http://127.0.0.1:{metrics_port}");
        let http = match &self.tls_ca {
            None => {
                self.url = format!("http://127.0.0.1:{port}");
                reqwest::Client::new()
            }
            Some(ca) => {
                self.url = format!("https://127.0.0.1:{port}");
                let pem = std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?;
                reqwest::Client::builder()
                    .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
                    .build()?
            }
        };
        let health = format!("{}/healthz", self.url);
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(&health).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "server exited with {status} during start; log:\n{}",
                    self.log()
                );
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("server did not become healthy; log:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._tmp.path().join("server.log")).unwrap_or_default()
    }

    /// A client with the bootstrap (admin) token.
    pub fn client(&self) -> Client {
        Client::new(&self.url, &self.token)
    }

    pub fn client_with(&self, token: &str) -> Client {
        Client::new(&self.url, token)
    }

    /// SIGKILL the server, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop gracefully (SIGTERM) and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    /// Set an environment variable for the next (re)start.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.extra_env.retain(|(k, _)| k != key);
        self.extra_env.push((key.to_string(), value.to_string()));
    }

    /// Start again on the same data directory.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// Whether the server process has exited on its own (it was started and is gone).
    pub fn has_exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    /// The server process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The server process's resident memory in bytes (from `/proc`), while it runs.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    }

    /// Host objects this server's prefix owns right now.
    pub fn leaks(&self) -> Leaks {
        Leaks::of(&self.prefix, &self.data_dir)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            // The test failed: its server's log is the first thing to read.
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("---- server log (last {} lines) ----", tail.len());
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
        // A create the server had under way goes on without it (`runsc run` outlives it) and
        // could finish after the cleanup below: kill every runsc process of this data
        // directory first (positive pids only), until none is left.
        let pattern = format!("runsc.*{}/", self.data_dir.display());
        for _ in 0..50 {
            let found = Command::new("pkill")
                .args(["-KILL", "-f", &pattern])
                .status()
                .is_ok_and(|s| s.success());
            if !found {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        // Remove everything the server may have left, whatever state the test ended in.
        let _ = Command::new(&self.bin)
            .args(["cleanup", "--yes"])
            .env("SANDPIT_DATA_DIR", &self.data_dir)
            .env("SANDPIT_PREFIX", &self.prefix)
            .env("SANDPIT_POOL", &self.pool)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// What exists on the host under one server's names.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leaks {
    pub netns: Vec<String>,
    pub links: Vec<String>,
    pub runsc: Vec<String>,
    pub mounts: Vec<String>,
    pub sandbox_dirs: Vec<String>,
    pub processes: Vec<String>,
    /// Per-sandbox nftables chains (`slot_<n>`) left in the server's table.
    pub nft_chains: Vec<String>,
    /// Loop devices backed by a file in the data directory (sandbox disks).
    pub loop_devices: Vec<String>,
}

impl Leaks {
    pub fn of(prefix: &str, data_dir: &Path) -> Leaks {
        let sh = |cmd: &str| -> String {
            Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                .unwrap_or_default()
        };
        let lines = |s: String| {
            s.lines()
                .map(str::to_string)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
        };
        let data = data_dir.display();
        Leaks {
            netns: lines(sh(&format!(
                "ip netns list | awk '{{print $1}}' | grep '^{prefix}-' || true"
            ))),
            links: lines(sh(&format!(
                "ip -o link show | awk -F': ' '{{print $2}}' | cut -d@ -f1 | grep '^{prefix}[hs][0-9]' || true"
            ))),
            runsc: lines(sh(&format!(
                "runsc --root {data}/runsc list -quiet 2>/dev/null || true"
            ))),
            mounts: lines(sh(&format!(
                "grep ' {data}/' /proc/mounts | awk '{{print $2}}' || true"
            ))),
            sandbox_dirs: lines(sh(&format!("ls {data}/sandboxes 2>/dev/null || true"))),
            processes: lines(sh(&format!(
                "pgrep -af 'runsc.*{data}/' | grep -v pgrep || true"
            ))),
            nft_chains: lines(sh(&format!(
                "nft list table inet sandpit_{prefix} 2>/dev/null | grep -oE 'chain slot_[0-9]+' | cut -d' ' -f2 || true"
            ))),
            loop_devices: lines(sh(&format!("losetup -a | grep '({data}/' || true"))),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Leaks::default()
    }
}
