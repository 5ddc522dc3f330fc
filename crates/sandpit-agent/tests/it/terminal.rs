//! Terminals (protocol version 3) over TCP, driven with the host helpers of
//! `sandpit_agent_proto::client`. Every wait reads output until an expected string shows,
//! with a timeout; markers are computed by the shell (`echo A$((1+1))B` prints `A2B`) so the
//! terminal's echo of the typed line never matches them.

use std::time::Duration;

use sandpit_agent_proto::client::{self, TerminalEvent};
use sandpit_agent_proto::{
    AgentErrorCode, ExitStatus, FrameKind, MAX_TERMINALS, Op, ProtoError, TerminalCreate,
    TerminalInfo, TerminalList, TerminalSize, write_frame, write_json,
};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{Agent, err_of, read_until_terminal};

/// How long any expected output may take.
const WAIT: Duration = Duration::from_secs(15);

/// One attachment. A task reads its events (so waiting with a timeout never cuts a frame in
/// half); dropping it detaches with a reset.
struct Viewer {
    events: mpsc::UnboundedReceiver<Result<TerminalEvent, ProtoError>>,
    reader: JoinHandle<()>,
    wr: OwnedWriteHalf,
    seen: Vec<u8>,
    /// Stderr of a terminal on pipes.
    err: Vec<u8>,
    exit: Option<ExitStatus>,
}

impl Drop for Viewer {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Viewer {
    async fn attach(agent: &Agent, id: &str, replay: bool) -> (Viewer, TerminalInfo) {
        let mut s = TcpStream::connect(agent.addr).await.unwrap();
        // Detaching resets, as the host does.
        s.set_zero_linger().unwrap();
        let info = client::terminal_attach(&mut s, id, replay).await.unwrap();
        let (mut rd, wr) = s.into_split();
        let (tx, events) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            loop {
                let event = client::read_terminal_event(&mut rd).await;
                let end = event.is_err();
                if tx.send(event).is_err() || end {
                    return;
                }
            }
        });
        let viewer = Viewer {
            events,
            reader,
            wr,
            seen: Vec::new(),
            err: Vec::new(),
            exit: None,
        };
        (viewer, info)
    }

    /// The next event, or the error that ended the attachment.
    async fn event(&mut self) -> Result<TerminalEvent, ProtoError> {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .unwrap_or_else(|_| panic!("no output in time; so far: {:?}", self.text()))
            .expect("the reader reports before it ends")
    }

    async fn type_(&mut self, line: &str) {
        client::send_input(&mut self.wr, line.as_bytes())
            .await
            .unwrap();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Read the next event into `seen` / `exit`.
    async fn next(&mut self) {
        match self.event().await.unwrap() {
            TerminalEvent::Output(bytes) => self.seen.extend_from_slice(&bytes),
            TerminalEvent::Stderr(bytes) => self.err.extend_from_slice(&bytes),
            TerminalEvent::Exit(exit) => self.exit = Some(exit),
        }
    }

    /// Read until `needle` was output.
    async fn wait_for(&mut self, needle: &str) {
        while !self.text().contains(needle) {
            assert!(
                self.exit.is_none(),
                "exited before {needle:?} showed: {:?}",
                self.text()
            );
            self.next().await;
        }
    }

    /// Read until the exit.
    async fn wait_exit(&mut self) -> ExitStatus {
        while self.exit.is_none() {
            self.next().await;
        }
        self.exit.clone().unwrap()
    }
}

fn sh(id: &str, cols: u16, rows: u16) -> TerminalCreate {
    TerminalCreate {
        id: Some(id.into()),
        argv: Some(vec!["/bin/sh".into()]),
        cols,
        rows,
        ..Default::default()
    }
}

async fn create(agent: &Agent, req: TerminalCreate) -> TerminalInfo {
    agent.ok(Op::TerminalCreate(req)).await
}

async fn list(agent: &Agent) -> Vec<TerminalInfo> {
    agent.ok::<TerminalList>(Op::TerminalList).await.terminals
}

#[tokio::test]
async fn a_shell_on_a_real_pty() {
    let agent = Agent::start();
    let info = create(&agent, sh("main", 100, 40)).await;
    assert_eq!(
        (info.id.as_str(), info.cols, info.rows, info.exit_code),
        ("main", 100, 40, None)
    );
    assert!(info.pid > 1);
    assert_eq!(info.argv, ["/bin/sh"]);
    let (mut v, attached) = Viewer::attach(&agent, "main", true).await;
    assert_eq!(attached.pid, info.pid);

    v.type_("echo $((6*7))\n").await;
    v.wait_for("42").await;
    // The terminal echoed the typed line (a pipe would not).
    assert!(v.text().contains("echo $((6*7))"), "{:?}", v.text());

    v.type_("tty; echo T$((1+1))T\n").await;
    v.wait_for("T2T").await;
    let text = v.text();
    let tty = text
        .split("/dev/pts/")
        .nth(1)
        .unwrap_or_else(|| panic!("no /dev/pts/N in {text:?}"));
    assert!(tty.starts_with(|c: char| c.is_ascii_digit()), "{text:?}");

    v.type_("echo $TERM; stty size\n").await;
    v.wait_for("xterm-256color").await;
    v.wait_for("40 100").await;

    // Resize without being attached, then through the attachment.
    let _: serde_json::Value = agent
        .ok(Op::TerminalResize {
            id: "main".into(),
            cols: 120,
            rows: 50,
        })
        .await;
    v.type_("stty size\n").await;
    v.wait_for("50 120").await;
    client::send_resize(&mut v.wr, TerminalSize { cols: 90, rows: 30 })
        .await
        .unwrap();
    v.type_("stty size\n").await;
    v.wait_for("30 90").await;
    let listed = list(&agent).await;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].cols, listed[0].rows), (90, 30));

    // Job control: the shell is a session leader with a controlling terminal, so a
    // foreground job gets ^C and the shell survives.
    // ^C flushes pending input, so the marker line is typed after it; a ^C that came before
    // the shell started `sleep` is tried again.
    v.type_("sleep 1000\n").await;
    v.wait_for("sleep 1000").await;
    for _ in 0..20 {
        v.type_("\x03echo C$((2+2))C\n").await;
        let shown = tokio::time::timeout(Duration::from_millis(500), v.wait_for("C4C")).await;
        if shown.is_ok() {
            return;
        }
    }
    panic!("^C did not interrupt sleep: {:?}", v.text());
}

#[tokio::test]
async fn viewers_share_output_and_replay_after_reattach() {
    let agent = Agent::start();
    create(&agent, sh("shared", 80, 24)).await;
    let (mut a, _) = Viewer::attach(&agent, "shared", false).await;
    let (mut b, _) = Viewer::attach(&agent, "shared", false).await;

    a.type_("echo X$((2+3))Y\n").await;
    a.wait_for("X5Y").await;
    b.wait_for("X5Y").await;
    b.type_("echo P$((3+4))Q\n").await;
    a.wait_for("P7Q").await;
    b.wait_for("P7Q").await;

    // Detach both: the terminal keeps running.
    drop((a, b));
    let listed = list(&agent).await;
    assert_eq!(listed[0].exit_code, None);

    let (mut c, _) = Viewer::attach(&agent, "shared", true).await;
    c.wait_for("X5Y").await;
    c.wait_for("P7Q").await;
    let (mut d, _) = Viewer::attach(&agent, "shared", false).await;
    d.type_("echo Z$((1+8))Z\n").await;
    d.wait_for("Z9Z").await;
    c.wait_for("Z9Z").await;
    // Without replay, nothing from before the attachment.
    assert!(!d.text().contains("X5Y"), "{:?}", d.text());
}

#[tokio::test]
async fn exit_code_reaches_every_viewer_and_stays_listed() {
    let agent = Agent::start();
    create(&agent, sh("ex", 80, 24)).await;
    let (mut a, _) = Viewer::attach(&agent, "ex", false).await;
    let (mut b, _) = Viewer::attach(&agent, "ex", false).await;
    a.type_("echo E$((0+1))E; exit 3\n").await;
    let exit = a.wait_exit().await;
    assert_eq!((exit.exit_code, exit.signal), (3, None));
    assert!(a.text().contains("E1E"), "{:?}", a.text());
    assert_eq!(b.wait_exit().await.exit_code, 3);
    assert!(b.text().contains("E1E"), "{:?}", b.text());

    // Exited: still listed with its code; an attachment replays, then gets the exit.
    let listed = list(&agent).await;
    assert_eq!(listed[0].exit_code, Some(3));
    let (mut c, info) = Viewer::attach(&agent, "ex", true).await;
    assert_eq!(info.exit_code, Some(3));
    assert_eq!(c.wait_exit().await.exit_code, 3);
    assert!(c.text().contains("E1E"), "{:?}", c.text());
    // Input and resize after the exit are harmless.
    let _: serde_json::Value = agent
        .ok(Op::TerminalResize {
            id: "ex".into(),
            cols: 10,
            rows: 10,
        })
        .await;

    let _: serde_json::Value = agent
        .ok(Op::TerminalKill {
            id: "ex".into(),
            signal: None,
        })
        .await;
    assert!(list(&agent).await.is_empty());
}

#[tokio::test]
async fn kill_and_signal() {
    let agent = Agent::start();
    let sleep = |id: &str| TerminalCreate {
        id: Some(id.into()),
        argv: Some(vec!["sleep".into(), "1000".into()]),
        cols: 80,
        rows: 24,
        ..Default::default()
    };
    // A signal: the terminal stays listed with the exit.
    create(&agent, sleep("term")).await;
    let (mut v, _) = Viewer::attach(&agent, "term", false).await;
    let _: serde_json::Value = agent
        .ok(Op::TerminalKill {
            id: "term".into(),
            signal: Some(15),
        })
        .await;
    let exit = v.wait_exit().await;
    assert_eq!((exit.exit_code, exit.signal), (143, Some(15)));
    assert_eq!(list(&agent).await[0].exit_code, Some(143));

    // A signal through the attachment.
    create(&agent, sleep("int")).await;
    let (mut v, _) = Viewer::attach(&agent, "int", false).await;
    client::send_signal(&mut v.wr, 2).await.unwrap();
    assert_eq!(v.wait_exit().await.signal, Some(2));

    // No signal: killed and removed at once; the viewer still gets the exit.
    create(&agent, sleep("gone")).await;
    let (mut v, _) = Viewer::attach(&agent, "gone", false).await;
    let _: serde_json::Value = agent
        .ok(Op::TerminalKill {
            id: "gone".into(),
            signal: None,
        })
        .await;
    assert_eq!(v.wait_exit().await.exit_code, 137);
    let ids: Vec<String> = list(&agent).await.into_iter().map(|t| t.id).collect();
    assert_eq!(ids, ["int", "term"]);
    // The id is free again.
    create(&agent, sleep("gone")).await;
}

#[tokio::test]
async fn default_shell_id_and_scrollback_bound() {
    let agent = Agent::start();
    let info = create(
        &agent,
        TerminalCreate {
            cols: 80,
            rows: 24,
            scrollback_bytes: Some(64 * 1024),
            env: vec![("GREETING".into(), "hi there".into())],
            ..Default::default()
        },
    )
    .await;
    // The agent picked the id; the login shell runs as one (`-bash`, `-sh`).
    assert!(info.id.starts_with('t'), "{info:?}");
    assert!(info.argv[0].starts_with('-'), "{info:?}");
    let (mut v, _) = Viewer::attach(&agent, &info.id, false).await;
    v.type_("echo \"$0:$GREETING\"\n").await;
    v.wait_for(&format!("{}:hi there", info.argv[0])).await;

    // Far more output than the scrollback: a replay sends at most its size, ending with
    // the latest output.
    v.type_("seq 1 40000; echo D$((5*5))D\n").await;
    v.wait_for("D25D").await;
    let (mut r, _) = Viewer::attach(&agent, &info.id, true).await;
    r.wait_for("D25D").await;
    assert!(r.seen.len() <= 64 * 1024, "{}", r.seen.len());
    assert!(r.text().contains("39999\r\n40000\r\n"));
}

#[tokio::test]
async fn hostile_requests_are_refused_clearly() {
    let agent = Agent::start();
    let err = |op| agent.err(op);
    let mut bad_id = sh("../x", 80, 24);
    assert_eq!(
        err(Op::TerminalCreate(bad_id.clone())).await,
        AgentErrorCode::BadRequest
    );
    bad_id.id = Some("x".repeat(65));
    assert_eq!(
        err(Op::TerminalCreate(bad_id)).await,
        AgentErrorCode::BadRequest
    );
    for (cols, rows) in [(5000, 24), (80, 0), (0, 0), (1001, 1)] {
        assert_eq!(
            err(Op::TerminalCreate(sh("s", cols, rows))).await,
            AgentErrorCode::BadRequest,
            "{cols}x{rows}"
        );
    }
    for bytes in [0, 1, 64 << 20] {
        let req = TerminalCreate {
            scrollback_bytes: Some(bytes),
            ..sh("s", 80, 24)
        };
        assert_eq!(
            err(Op::TerminalCreate(req)).await,
            AgentErrorCode::BadRequest
        );
    }
    let both = TerminalCreate {
        shell: Some("true".into()),
        ..sh("s", 80, 24)
    };
    assert_eq!(
        err(Op::TerminalCreate(both)).await,
        AgentErrorCode::BadRequest
    );
    let missing = TerminalCreate {
        argv: Some(vec!["/nonexistent/program".into()]),
        ..sh("s", 80, 24)
    };
    assert_eq!(
        err(Op::TerminalCreate(missing)).await,
        AgentErrorCode::SpawnFailed
    );
    // Cols beyond u16 do not even parse.
    let mut s = TcpStream::connect(agent.addr).await.unwrap();
    write_frame(
        &mut s,
        FrameKind::Request,
        br#"{"v":3,"op":"terminal_resize","id":"s","cols":70000,"rows":1}"#,
    )
    .await
    .unwrap();
    let f = read_until_terminal(&mut s, false).await;
    assert_eq!(err_of(&f[0]).unwrap().code, AgentErrorCode::BadRequest);

    for id in ["nope", "../x", ""] {
        let want = if id == "nope" {
            AgentErrorCode::NotFound
        } else {
            AgentErrorCode::BadRequest
        };
        let attach = Op::TerminalAttach {
            id: id.into(),
            replay: true,
        };
        assert_eq!(err(attach).await, want, "{id:?}");
        let kill = Op::TerminalKill {
            id: id.into(),
            signal: None,
        };
        assert_eq!(err(kill).await, want, "{id:?}");
        let resize = Op::TerminalResize {
            id: id.into(),
            cols: 80,
            rows: 24,
        };
        assert_eq!(err(resize).await, want, "{id:?}");
    }

    create(&agent, sh("s", 80, 24)).await;
    assert_eq!(
        err(Op::TerminalCreate(sh("s", 80, 24))).await,
        AgentErrorCode::AlreadyExists
    );
    let huge = Op::TerminalResize {
        id: "s".into(),
        cols: 1001,
        rows: 24,
    };
    assert_eq!(err(huge).await, AgentErrorCode::BadRequest);
    let bad_signal = Op::TerminalKill {
        id: "s".into(),
        signal: Some(999),
    };
    assert_eq!(err(bad_signal).await, AgentErrorCode::BadRequest);

    // A bad resize on an attachment ends that attachment, not the terminal.
    let (mut v, _) = Viewer::attach(&agent, "s", false).await;
    write_json(
        &mut v.wr,
        FrameKind::Resize,
        &TerminalSize { cols: 0, rows: 0 },
    )
    .await
    .unwrap();
    // The shell's prompt may come first.
    loop {
        match v.event().await {
            Ok(TerminalEvent::Output(_)) => {}
            Err(ProtoError::Refused(e)) => {
                assert_eq!(e.code, AgentErrorCode::BadRequest);
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let (mut v, _) = Viewer::attach(&agent, "s", false).await;
    v.type_("echo O$((4+4))K\n").await;
    v.wait_for("O8K").await;
}

#[tokio::test]
async fn terminals_are_bounded() {
    let agent = Agent::start();
    for i in 0..MAX_TERMINALS {
        let req = TerminalCreate {
            argv: Some(vec!["sleep".into(), "1000".into()]),
            cols: 80,
            rows: 24,
            ..Default::default()
        };
        let info = create(&agent, req).await;
        assert_eq!(info.id, format!("t{}", i + 1));
    }
    assert_eq!(
        agent.err(Op::TerminalCreate(sh("one-more", 80, 24))).await,
        AgentErrorCode::TooManyTerminals
    );
    // Removing one makes room.
    let _: serde_json::Value = agent
        .ok(Op::TerminalKill {
            id: "t1".into(),
            signal: None,
        })
        .await;
    create(&agent, sh("one-more", 80, 24)).await;
    assert_eq!(list(&agent).await.len(), MAX_TERMINALS);
}

/// A terminal on pipes (version 6).
fn piped(id: &str, shell: &str, stdin: bool) -> TerminalCreate {
    TerminalCreate {
        id: Some(id.into()),
        shell: Some(shell.into()),
        cols: 80,
        rows: 24,
        pipes: true,
        stdin,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_process_on_pipes_keeps_stdout_and_stderr_apart() {
    let agent = Agent::start();
    // Output written before anyone attached is replayed, each stream from its own scrollback;
    // no pty: stdin is not a terminal.
    let info = create(
        &agent,
        piped(
            "p1",
            "echo O$((1+1))K; echo E$((2+2))R >&2; [ -t 0 ] || echo notty; exit 7",
            false,
        ),
    )
    .await;
    assert!(info.pipes);
    let (mut v, _) = Viewer::attach(&agent, "p1", true).await;
    let exit = v.wait_exit().await;
    assert_eq!(exit.exit_code, 7);
    assert_eq!(v.text(), "O2K\nnotty\n");
    assert_eq!(String::from_utf8_lossy(&v.err), "E4R\n");
    // Exited, it stays listed until removed, like any terminal.
    let listed = list(&agent).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].exit_code, Some(7));
    assert!(listed[0].pipes);

    // stdin: typed bytes reach the process (`read` takes a line unbuffered); StdinClose
    // ends its input.
    create(
        &agent,
        piped("p2", "read l; echo \"got $l\"; cat; echo done >&2", true),
    )
    .await;
    let (mut v, _) = Viewer::attach(&agent, "p2", true).await;
    v.type_("hello\nworld\n").await;
    v.wait_for("got hello").await;
    write_frame(&mut v.wr, FrameKind::StdinClose, &[])
        .await
        .unwrap();
    assert_eq!(v.wait_exit().await.exit_code, 0);
    assert_eq!(v.text(), "got hello\nworld\n");
    assert_eq!(String::from_utf8_lossy(&v.err), "done\n");

    // Without stdin the process reads /dev/null: it ends at once; input is dropped.
    create(&agent, piped("p3", "cat; echo eof", false)).await;
    let (mut v, _) = Viewer::attach(&agent, "p3", true).await;
    v.type_("ignored\n").await;
    assert_eq!(v.wait_exit().await.exit_code, 0);
    assert_eq!(v.text(), "eof\n");

    // A long-running process survives a detach and is signalled by its group.
    create(&agent, piped("p4", "echo up; sleep 1000", false)).await;
    let (mut v, _) = Viewer::attach(&agent, "p4", true).await;
    v.wait_for("up").await;
    drop(v);
    let (mut v, _) = Viewer::attach(&agent, "p4", true).await;
    v.wait_for("up").await;
    let _: serde_json::Value = agent
        .ok(Op::TerminalKill {
            id: "p4".into(),
            signal: Some(15),
        })
        .await;
    let exit = v.wait_exit().await;
    assert_eq!(exit.signal, Some(15));

    // Pipes need a command: no login shell.
    let no_cmd = TerminalCreate {
        id: Some("p5".into()),
        cols: 80,
        rows: 24,
        pipes: true,
        ..Default::default()
    };
    assert_eq!(
        agent.err(Op::TerminalCreate(no_cmd)).await,
        AgentErrorCode::BadRequest
    );
}
