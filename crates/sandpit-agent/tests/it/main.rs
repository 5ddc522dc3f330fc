//! Integration tests: run the real agent binary on loopback and drive it with the wire codec.
#![allow(
    clippy::disallowed_methods,
    reason = "integration tests build host-side fixtures and read host state by path"
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sandpit_agent_proto::{
    AgentError, AgentErrorCode, DATA_CHUNK, DirListing, EntryKind, ExecRequest, ExecStarted,
    ExitStatus, FileInfo, Frame, FrameKind, Op, PROTOCOL_VERSION, PingReply, Request,
    SignalRequest, WriteReply, read_frame, write_frame, write_json,
};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

mod terminal;
mod watch;

/// A running agent, killed on drop.
struct Agent {
    child: Child,
    addr: SocketAddr,
}

impl Agent {
    fn start() -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sandpit-agent"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("SANDPIT_AGENT_ALLOW_LOOPBACK", "1")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start agent");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Agent { child, addr }
    }

    /// Open a connection and send `op`.
    async fn open(&self, op: Op) -> TcpStream {
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        write_json(&mut s, FrameKind::Request, &Request::new(op))
            .await
            .unwrap();
        s
    }

    /// Send `op`, collect frames up to the terminal one, close like the host does.
    async fn call(&self, op: Op) -> Vec<Frame> {
        let read_file = matches!(op, Op::ReadFile { .. } | Op::ReadRegular { .. });
        let mut s = self.open(op).await;
        let frames = read_until_terminal(&mut s, read_file).await;
        close(s);
        frames
    }

    /// Send `op`, expect a single `Ok` and parse it.
    async fn ok<T: for<'de> serde::Deserialize<'de>>(&self, op: Op) -> T {
        let frames = self.call(op).await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        assert_eq!(frames[0].kind, FrameKind::Ok, "{:?}", err_of(&frames[0]));
        frames[0].parse().unwrap()
    }

    /// Send `op`, expect a single `Error` and return its code.
    async fn err(&self, op: Op) -> AgentErrorCode {
        let frames = self.call(op).await;
        assert_eq!(frames.len(), 1, "{frames:?}");
        err_of(&frames[0]).expect("an error frame").code
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn err_of(f: &Frame) -> Option<AgentError> {
    (f.kind == FrameKind::Error).then(|| f.parse().unwrap())
}

/// Close with a reset, as the host does.
fn close(s: TcpStream) {
    s.set_zero_linger().unwrap();
    drop(s);
}

async fn read_until_terminal(s: &mut TcpStream, read_file: bool) -> Vec<Frame> {
    let mut frames = Vec::new();
    loop {
        let f = tokio::time::timeout(Duration::from_secs(20), read_frame(s))
            .await
            .expect("agent answers in time")
            .unwrap();
        let kind = f.kind;
        frames.push(f);
        match kind {
            FrameKind::Exit | FrameKind::End | FrameKind::Error => return frames,
            FrameKind::Ok if !read_file => return frames,
            _ => {}
        }
    }
}

/// Output of an exec.
#[derive(Debug)]
struct Output {
    pid: u32,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: ExitStatus,
}

fn output(frames: &[Frame]) -> Output {
    assert_eq!(
        frames[0].kind,
        FrameKind::Started,
        "{:?}",
        err_of(&frames[0])
    );
    let pid = frames[0].parse::<ExecStarted>().unwrap().pid;
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    for f in &frames[1..frames.len() - 1] {
        assert!(f.payload.len() <= 64 * 1024);
        match f.kind {
            FrameKind::Stdout => stdout.extend_from_slice(&f.payload),
            FrameKind::Stderr => stderr.extend_from_slice(&f.payload),
            k => panic!("unexpected {k:?}"),
        }
    }
    let last = frames.last().unwrap();
    assert_eq!(last.kind, FrameKind::Exit);
    Output {
        pid,
        stdout,
        stderr,
        exit: last.parse().unwrap(),
    }
}

fn shell(cmd: &str) -> ExecRequest {
    ExecRequest {
        shell: Some(cmd.into()),
        ..Default::default()
    }
}

async fn exec(agent: &Agent, req: ExecRequest) -> Output {
    output(&agent.call(Op::Exec(req)).await)
}

/// Whether `pid` is gone (or a zombie nobody reaped yet).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn read_pid_file(path: &std::path::Path) -> u32 {
    eventually("pid file", || {
        std::fs::read_to_string(path).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn p(path: &std::path::Path) -> String {
    path.to_str().unwrap().to_string()
}

#[tokio::test]
async fn ping() {
    let agent = Agent::start();
    let reply: PingReply = agent.ok(Op::Ping).await;
    assert_eq!(reply.protocol, PROTOCOL_VERSION);
    assert_eq!(reply.agent_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn bad_and_newer_requests() {
    let agent = Agent::start();
    // Garbled JSON.
    let mut s = TcpStream::connect(agent.addr).await.unwrap();
    write_frame(&mut s, FrameKind::Request, b"{nope")
        .await
        .unwrap();
    let f = read_until_terminal(&mut s, false).await;
    assert_eq!(err_of(&f[0]).unwrap().code, AgentErrorCode::BadRequest);
    close(s);
    // Not a request frame.
    let mut s = TcpStream::connect(agent.addr).await.unwrap();
    write_frame(&mut s, FrameKind::Data, b"x").await.unwrap();
    let f = read_until_terminal(&mut s, false).await;
    assert_eq!(err_of(&f[0]).unwrap().code, AgentErrorCode::BadRequest);
    close(s);
    // Unknown frame kind.
    let mut s = TcpStream::connect(agent.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &[99, 0, 0, 0, 0])
        .await
        .unwrap();
    let f = read_until_terminal(&mut s, false).await;
    assert_eq!(err_of(&f[0]).unwrap().code, AgentErrorCode::BadRequest);
    close(s);
    // A newer protocol version.
    let mut s = TcpStream::connect(agent.addr).await.unwrap();
    write_frame(&mut s, FrameKind::Request, br#"{"v":99,"op":"teleport"}"#)
        .await
        .unwrap();
    let f = read_until_terminal(&mut s, false).await;
    assert_eq!(
        err_of(&f[0]).unwrap().code,
        AgentErrorCode::UnsupportedVersion
    );
    close(s);
    // The agent still serves afterwards.
    let _: PingReply = agent.ok(Op::Ping).await;
}

#[tokio::test]
async fn exec_shell_streams_and_exits() {
    let agent = Agent::start();
    let out = exec(&agent, shell("echo hi; echo err >&2; exit 3")).await;
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(
        (out.exit.exit_code, out.exit.signal, out.exit.timed_out),
        (3, None, false)
    );
    assert!(out.pid > 1);
}

#[tokio::test]
async fn exec_argv() {
    let agent = Agent::start();
    let req = ExecRequest {
        argv: Some(vec![
            "printf".into(),
            "%s-%s".into(),
            "a b".into(),
            "c".into(),
        ]),
        ..Default::default()
    };
    let out = exec(&agent, req).await;
    assert_eq!(out.stdout, b"a b-c");
    assert_eq!(out.exit.exit_code, 0);
}

#[tokio::test]
async fn exec_children_get_default_sigpipe() {
    let agent = Agent::start();
    let out = exec(&agent, shell("yes | head -n 2")).await;
    assert_eq!(out.stdout, b"y\ny\n");
    assert_eq!(out.exit.exit_code, 0);
}

#[tokio::test]
async fn exec_large_output_is_chunked_and_drained() {
    let agent = Agent::start();
    let out = exec(&agent, shell("head -c 3000000 /dev/zero; echo tail >&2")).await;
    assert_eq!(out.stdout.len(), 3_000_000);
    assert_eq!(out.stderr, b"tail\n");
}

#[tokio::test]
async fn exec_timeout_kills_the_process_group() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    let started = Instant::now();
    let out = exec(
        &agent,
        ExecRequest {
            timeout_ms: Some(300),
            ..shell(&format!("sleep 30 & echo $! > {}; sleep 30", p(&pidfile)))
        },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(out.exit.timed_out);
    assert_eq!((out.exit.exit_code, out.exit.signal), (137, Some(9)));
    assert!(out.exit.duration_ms >= 300);
    let bg = read_pid_file(&pidfile).await;
    eventually("background sleep killed", || dead(bg)).await;
}

#[tokio::test]
async fn exec_background_grandchild_does_not_hang() {
    let agent = Agent::start();
    let started = Instant::now();
    let out = exec(&agent, shell("sleep 100 & echo done")).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(out.stdout, b"done\n");
    assert_eq!(out.exit.exit_code, 0);
    // Clean up the survivor. Not with kill(1): procps-ng 4.0's `kill -9 -PGID` signals -1.
    let pgid = rustix::process::Pid::from_raw(out.pid as i32).filter(|p| !p.is_init());
    let _ = rustix::process::kill_process_group(pgid.unwrap(), rustix::process::Signal::KILL);
}

#[tokio::test]
async fn exec_stdin_round_trip() {
    let agent = Agent::start();
    let mut s = agent
        .open(Op::Exec(ExecRequest {
            argv: Some(vec!["cat".into()]),
            stdin: true,
            ..Default::default()
        }))
        .await;
    write_frame(&mut s, FrameKind::Stdin, b"hello ")
        .await
        .unwrap();
    write_frame(&mut s, FrameKind::Stdin, b"world")
        .await
        .unwrap();
    write_frame(&mut s, FrameKind::StdinClose, b"")
        .await
        .unwrap();
    let out = output(&read_until_terminal(&mut s, false).await);
    close(s);
    assert_eq!(out.stdout, b"hello world");
    assert_eq!(out.exit.exit_code, 0);
}

#[tokio::test]
async fn exec_without_stdin_reads_dev_null() {
    let agent = Agent::start();
    let out = exec(&agent, shell("cat; echo rc=$?")).await;
    assert_eq!(out.stdout, b"rc=0\n");
}

#[tokio::test]
async fn exec_signal_reaches_the_group() {
    let agent = Agent::start();
    let mut s = agent.open(Op::Exec(shell("sleep 30"))).await;
    let started = read_frame(&mut s).await.unwrap();
    assert_eq!(started.kind, FrameKind::Started);
    let sig = Frame::json(FrameKind::Signal, &SignalRequest { signal: 15 });
    write_frame(&mut s, FrameKind::Signal, &sig.payload)
        .await
        .unwrap();
    let mut frames = vec![started];
    frames.extend(read_until_terminal(&mut s, false).await);
    close(s);
    let out = output(&frames);
    assert_eq!((out.exit.exit_code, out.exit.signal), (143, Some(15)));
    assert!(!out.exit.timed_out);
}

#[tokio::test]
async fn exec_dropped_connection_kills_the_process_group() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("bg.pid");
    let mut s = agent
        .open(Op::Exec(shell(&format!(
            "sleep 30 & echo $! > {}; sleep 30",
            p(&pidfile)
        ))))
        .await;
    let started = read_frame(&mut s).await.unwrap();
    let leader = started.parse::<ExecStarted>().unwrap().pid;
    let bg = read_pid_file(&pidfile).await;
    close(s);
    eventually("leader killed", || dead(leader)).await;
    eventually("background sleep killed", || dead(bg)).await;
}

#[tokio::test]
async fn exec_env_and_cwd() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let out = exec(
        &agent,
        ExecRequest {
            cwd: Some(p(dir.path())),
            env: vec![("FOO".into(), "bar baz".into())],
            ..shell("echo \"$FOO\"; pwd -P; test -n \"$PATH\" && echo path-ok")
        },
    )
    .await;
    let expected = format!(
        "bar baz\n{}\npath-ok\n",
        p(&dir.path().canonicalize().unwrap())
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
}

#[tokio::test]
async fn exec_spawn_failures() {
    let agent = Agent::start();
    let code = agent
        .err(Op::Exec(ExecRequest {
            argv: Some(vec!["/nonexistent/program".into()]),
            ..Default::default()
        }))
        .await;
    assert_eq!(code, AgentErrorCode::SpawnFailed);
    let code = agent
        .err(Op::Exec(ExecRequest {
            cwd: Some("/nonexistent/dir".into()),
            ..shell("true")
        }))
        .await;
    assert_eq!(code, AgentErrorCode::SpawnFailed);
    let code = agent.err(Op::Exec(ExecRequest::default())).await;
    assert_eq!(code, AgentErrorCode::BadRequest);
}

async fn write_file(agent: &Agent, path: &str, mode: Option<u32>, data: &[u8]) -> Vec<Frame> {
    let mut s = agent
        .open(Op::WriteFile {
            path: path.into(),
            mode,
            create_parents: true,
            owner: None,
        })
        .await;
    for chunk in data.chunks(DATA_CHUNK) {
        write_frame(&mut s, FrameKind::Data, chunk).await.unwrap();
    }
    write_frame(&mut s, FrameKind::End, b"").await.unwrap();
    let frames = read_until_terminal(&mut s, false).await;
    close(s);
    frames
}

#[tokio::test]
async fn write_then_read_5mb() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = format!("{}/sub/dir/big.bin", p(dir.path()));
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let frames = write_file(&agent, &path, None, &data).await;
    assert_eq!(frames[0].kind, FrameKind::Ok, "{:?}", err_of(&frames[0]));
    assert_eq!(frames[0].parse::<WriteReply>().unwrap().size, 5_000_000);

    let frames = agent.call(Op::ReadFile { path: path.clone() }).await;
    assert_eq!(frames[0].kind, FrameKind::Ok);
    let info: FileInfo = frames[0].parse().unwrap();
    assert_eq!(
        (info.kind, info.size, info.mode),
        (EntryKind::File, 5_000_000, 0o644)
    );
    assert_eq!(frames.last().unwrap().kind, FrameKind::End);
    let mut hash = Sha256::new();
    for f in &frames[1..frames.len() - 1] {
        assert_eq!(f.kind, FrameKind::Data);
        assert!(f.payload.len() <= DATA_CHUNK);
        hash.update(&f.payload);
    }
    assert_eq!(hash.finalize(), Sha256::digest(&data));

    // Overwrite with an explicit mode; nothing else is left in the directory.
    let frames = write_file(&agent, &path, Some(0o755), b"small").await;
    assert_eq!(frames[0].kind, FrameKind::Ok);
    let info: FileInfo = agent.ok(Op::Stat { path: path.clone() }).await;
    assert_eq!((info.size, info.mode), (5, 0o755));
    let listing: DirListing = agent
        .ok(Op::ListDir {
            path: format!("{}/sub/dir", p(dir.path())),
        })
        .await;
    let names: Vec<_> = listing.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["big.bin"]);
    // Writing over a directory or to / fails.
    let frames = write_file(&agent, &format!("{}/sub", p(dir.path())), None, b"x").await;
    assert_eq!(
        err_of(&frames[0]).unwrap().code,
        AgentErrorCode::IsDirectory
    );
    let frames = write_file(&agent, "/", None, b"x").await;
    assert_eq!(
        err_of(&frames[0]).unwrap().code,
        AgentErrorCode::InvalidPath
    );
}

/// Version 2's bounded read: a window of a regular file, and a FIFO or device refused at
/// once (a version-1 `ReadFile` of a FIFO would block until a writer came).
#[tokio::test]
async fn read_regular_reads_a_window_and_refuses_special_files() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = format!("{}/f.bin", p(dir.path()));
    let data: Vec<u8> = (0..600_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let frames = agent
        .call(Op::ReadRegular {
            path: path.clone(),
            offset: 1000,
            limit: 300_000,
        })
        .await;
    let info: FileInfo = frames[0].parse().unwrap();
    assert_eq!((info.kind, info.size), (EntryKind::File, 600_000));
    assert_eq!(frames.last().unwrap().kind, FrameKind::End);
    let got: Vec<u8> = frames[1..frames.len() - 1]
        .iter()
        .flat_map(|f| f.payload.clone())
        .collect();
    assert_eq!(got, data[1000..301_000]);
    // Past the end: nothing, then End.
    let frames = agent
        .call(Op::ReadRegular {
            path: path.clone(),
            offset: 700_000,
            limit: 10,
        })
        .await;
    assert_eq!(frames.len(), 2, "{frames:?}");

    let fifo = format!("{}/fifo", p(dir.path()));
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(
        agent
            .err(Op::ReadRegular {
                path: p(dir.path()),
                offset: 0,
                limit: 10,
            })
            .await,
        AgentErrorCode::IsDirectory
    );
    for special in [fifo.as_str(), "/dev/zero"] {
        assert_eq!(
            agent
                .err(Op::ReadRegular {
                    path: special.to_string(),
                    offset: 0,
                    limit: 10,
                })
                .await,
            AgentErrorCode::NotRegularFile,
            "{special}"
        );
    }
    // The request carries version 2; version-1 requests are still answered.
    assert_eq!(
        Request::new(Op::ReadRegular {
            path: path.clone(),
            offset: 0,
            limit: 1
        })
        .v,
        2
    );
    let frames = agent.call(Op::ReadFile { path }).await;
    assert_eq!(frames.last().unwrap().kind, FrameKind::End);
}

#[tokio::test]
async fn write_dropped_connection_leaves_nothing() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let path = format!("{}/f.txt", p(dir.path()));
    let mut s = agent
        .open(Op::WriteFile {
            path: path.clone(),
            mode: None,
            create_parents: false,
            owner: None,
        })
        .await;
    write_frame(&mut s, FrameKind::Data, &[1u8; 100_000])
        .await
        .unwrap();
    // Wait until the temporary file exists, then drop the connection.
    eventually("temp file created", || {
        std::fs::read_dir(dir.path()).unwrap().count() == 1
    })
    .await;
    close(s);
    eventually("temp file removed", || {
        std::fs::read_dir(dir.path()).unwrap().count() == 0
    })
    .await;
}

#[tokio::test]
async fn dirs_stat_and_remove() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let base = p(dir.path());
    let mk = |path: String, recursive| Op::MakeDir {
        path,
        recursive,
        owner: None,
    };
    let _: serde_json::Value = agent.ok(mk(format!("{base}/a/b"), true)).await;
    assert_eq!(
        agent.err(mk(format!("{base}/a/b"), false)).await,
        AgentErrorCode::AlreadyExists
    );
    assert_eq!(
        agent.err(mk(format!("{base}/x/y"), false)).await,
        AgentErrorCode::NotFound
    );
    std::fs::write(format!("{base}/a/file"), b"abc").unwrap();
    std::os::unix::fs::symlink("b", format!("{base}/a/link")).unwrap();

    let listing: DirListing = agent
        .ok(Op::ListDir {
            path: format!("{base}/a/"),
        })
        .await;
    let got: Vec<_> = listing
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.info.kind))
        .collect();
    assert_eq!(
        got,
        [
            ("b", EntryKind::Dir),
            ("file", EntryKind::File),
            ("link", EntryKind::Symlink)
        ]
    );
    let info: FileInfo = agent
        .ok(Op::Stat {
            path: format!("{base}/a/link"),
        })
        .await;
    assert_eq!(info.kind, EntryKind::Dir);
    let info: FileInfo = agent
        .ok(Op::Stat {
            path: format!("{base}/a/file"),
        })
        .await;
    assert_eq!((info.kind, info.size), (EntryKind::File, 3));
    assert!(info.mtime > 1_600_000_000);

    let rm = |path: String, recursive| Op::Remove { path, recursive };
    assert_eq!(
        agent.err(rm(format!("{base}/a"), false)).await,
        AgentErrorCode::NotEmpty
    );
    let _: serde_json::Value = agent.ok(rm(format!("{base}/a/link"), false)).await;
    let _: serde_json::Value = agent.ok(rm(format!("{base}/a/file"), false)).await;
    let _: serde_json::Value = agent.ok(rm(format!("{base}/a"), true)).await;
    assert!(!dir.path().join("a").exists());
    assert_eq!(
        agent.err(rm(format!("{base}/a"), true)).await,
        AgentErrorCode::NotFound
    );
    assert_eq!(
        agent.err(rm("/".into(), true)).await,
        AgentErrorCode::InvalidPath
    );
}

#[tokio::test]
async fn path_errors() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    for bad in ["relative/path", "/tmp/../etc/passwd", ""] {
        for op in [
            Op::ReadFile { path: bad.into() },
            Op::Stat { path: bad.into() },
            Op::ListDir { path: bad.into() },
            Op::Remove {
                path: bad.into(),
                recursive: false,
            },
            Op::MakeDir {
                path: bad.into(),
                recursive: true,
                owner: None,
            },
        ] {
            assert_eq!(agent.err(op).await, AgentErrorCode::InvalidPath, "{bad:?}");
        }
    }
    let missing = format!("{}/missing", p(dir.path()));
    assert_eq!(
        agent
            .err(Op::ReadFile {
                path: missing.clone()
            })
            .await,
        AgentErrorCode::NotFound
    );
    assert_eq!(
        agent.err(Op::Stat { path: missing }).await,
        AgentErrorCode::NotFound
    );
    assert_eq!(
        agent
            .err(Op::ReadFile {
                path: p(dir.path())
            })
            .await,
        AgentErrorCode::IsDirectory
    );
}
