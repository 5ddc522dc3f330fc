//! Terminals: a real pty in a real sandbox, over the v1 API's WebSocket and through
//! `sandpit sandbox shell` in a real terminal (tmux), across hibernate and wake.

use std::process::Command;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use sandpit_sdk::Client;
use sandpit_sdk::types::{
    CreateSandboxRequest, SandboxMode, SandboxStatus, TerminalCreateRequest, TerminalMessage,
    TokenCreateRequest,
};
use sandpit_test_support::{TestServer, wait_until};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::{assert_api_err, create, server};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long any expected output may take to show.
const WAIT: Duration = Duration::from_secs(30);

/// One attached client: everything it received so far.
pub(crate) struct Viewer {
    ws: Ws,
    seen: Vec<u8>,
    pub(crate) exit: Option<i32>,
    errors: Vec<String>,
    close: Option<(u16, String)>,
}

impl Viewer {
    pub(crate) async fn attach(client: &Client, id: &str, tid: &str, replay: bool) -> Viewer {
        Viewer::try_attach(client, id, tid, replay)
            .await
            .unwrap_or_else(|e| panic!("attach {tid}: {e}"))
    }

    /// Attach, or the HTTP status of the refusal.
    async fn try_attach(
        client: &Client,
        id: &str,
        tid: &str,
        replay: bool,
    ) -> Result<Viewer, String> {
        let mut req = client
            .terminal_attach_url(id, tid, replay)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", client.token()).parse().unwrap(),
        );
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Viewer {
                ws,
                seen: Vec::new(),
                exit: None,
                errors: Vec::new(),
                close: None,
            }),
            Err(tungstenite::Error::Http(resp)) => Err(format!(
                "{} {}",
                resp.status().as_u16(),
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    pub(crate) async fn type_(&mut self, text: &str) {
        self.ws
            .send(Message::Binary(text.as_bytes().to_vec().into()))
            .await
            .unwrap();
    }

    async fn control(&mut self, json: &str) {
        self.ws.send(Message::Text(json.into())).await.unwrap();
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.seen).into_owned()
    }

    /// Read until `done` holds for what arrived (or the socket closed), at most [`WAIT`].
    async fn read_until(&mut self, what: &str, done: impl Fn(&Viewer) -> bool) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            if self.close.is_some() {
                panic!(
                    "closed while waiting for {what}: {:?}\n{}",
                    self.close,
                    self.text()
                );
            }
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no {what} within {WAIT:?}; seen:\n{}", self.text()));
            match next {
                Some(Ok(Message::Binary(b))) => self.seen.extend_from_slice(&b),
                Some(Ok(Message::Text(t))) => match serde_json::from_str(&t).unwrap() {
                    TerminalMessage::Exit { exit_code } => self.exit = Some(exit_code),
                    TerminalMessage::Error { code, .. } => self.errors.push(code),
                    other => panic!("unexpected {other:?}"),
                },
                Some(Ok(Message::Close(f))) => {
                    self.close = Some(
                        f.map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new())),
                    );
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    self.close.get_or_insert((1006, String::new()));
                }
            }
            if self.close.is_some() && done(self) {
                break;
            }
        }
    }

    /// Read until the output holds `needle`.
    pub(crate) async fn expect(&mut self, needle: &str) {
        self.read_until(needle, |v| v.text().contains(needle)).await;
    }

    /// Read until the socket closes; its close code.
    pub(crate) async fn closed(&mut self) -> u16 {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.close.is_none() {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("not closed within {WAIT:?}; seen:\n{}", self.text()),
                Ok(Some(Ok(Message::Binary(b)))) => self.seen.extend_from_slice(&b),
                Ok(Some(Ok(Message::Text(t)))) => {
                    if let Ok(TerminalMessage::Exit { exit_code }) = serde_json::from_str(&t) {
                        self.exit = Some(exit_code);
                    }
                }
                Ok(Some(Ok(Message::Close(f)))) => {
                    self.close = Some(
                        f.map(|f| (u16::from(f.code), f.reason.to_string()))
                            .unwrap_or((1005, String::new())),
                    );
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(_)) | None) => self.close = Some((1006, String::new())),
            }
        }
        self.close.as_ref().unwrap().0
    }
}

async fn persistent(client: &Client) -> String {
    create(
        client,
        CreateSandboxRequest {
            template: "base".into(),
            mode: SandboxMode::Persistent,
            idle_timeout: Some("30m".into()),
            ..Default::default()
        },
    )
    .await
    .id
}

/// Type into a login shell on a pty, see it echo and answer; resize; two viewers; detach and
/// replay; hibernate with a viewer attached (it is cut, not blocking the checkpoint), wake,
/// and find the same shell with its history; `exit 3` reaches every viewer.
#[tokio::test]
async fn terminal_is_a_real_pty_that_survives_hibernate() {
    let srv = server().await;
    let client = srv.client();
    let id = persistent(&client).await;

    let t = client
        .create_terminal(
            &id,
            &TerminalCreateRequest {
                id: Some("main".into()),
                cols: Some(90),
                rows: Some(20),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (t.id.as_str(), t.cols, t.rows, t.exit_code),
        ("main", 90, 20, None)
    );
    let list = client.list_terminals(&id).await.unwrap();
    assert_eq!(list.len(), 1);

    let mut a = Viewer::attach(&client, &id, "main", true).await;
    a.type_("echo $((6*7))\r").await;
    // The pty echoes what was typed, and the shell answers.
    a.expect("echo $((6*7))").await;
    a.expect("42").await;
    a.type_("tty\r").await;
    a.expect("/dev/pts/").await;
    a.type_("echo size $(stty size)\r").await;
    a.expect("size 20 90").await;

    // Resized through the API, then through the WebSocket.
    client.resize_terminal(&id, "main", 100, 30).await.unwrap();
    a.type_("echo size $(stty size)\r").await;
    a.expect("size 30 100").await;
    a.control(r#"{"type":"resize","cols":120,"rows":40}"#).await;
    a.type_("echo size $(stty size)\r").await;
    a.expect("size 40 120").await;

    // A second viewer sees what the first one types, and the first what the second types.
    let mut b = Viewer::attach(&client, &id, "main", false).await;
    a.type_("echo tw''o-viewers\r").await;
    a.expect("two-viewers").await;
    b.expect("two-viewers").await;
    b.type_("echo fr''om-b\r").await;
    a.expect("from-b").await;

    // Detach and reattach: the replay holds the earlier output.
    drop(a);
    let mut a = Viewer::attach(&client, &id, "main", true).await;
    a.expect("42").await;
    a.expect("from-b").await;
    drop(a);

    // Hibernate with a viewer attached: the viewer is cut (1012), the checkpoint succeeds.
    a_marker(&mut b, "before-hibernate").await;
    let slept = client.hibernate(&id).await.unwrap();
    assert_eq!(slept.status, SandboxStatus::Suspended);
    assert_eq!(b.closed().await, 1012, "{:?}", b.close);

    // Reattaching wakes the sandbox; the replay shows the shell's history and the shell
    // (the same process, its variables kept) goes on.
    let mut c = Viewer::attach(&client, &id, "main", true).await;
    assert_eq!(
        client.get_sandbox(&id).await.unwrap().status,
        SandboxStatus::Running
    );
    c.expect("42").await;
    c.expect("before-hibernate").await;
    c.type_("echo again $((40+3)) $KEPT\r").await;
    c.expect("again 43 kept-in-memory").await;
    let after = client.list_terminals(&id).await.unwrap();
    assert_eq!(after[0].pid, t.pid, "the same process after the wake");

    // A second viewer and `exit 3`: both hear the exit code, then a normal close.
    let mut d = Viewer::attach(&client, &id, "main", false).await;
    c.type_("exit 3\r").await;
    assert_eq!(c.closed().await, 1000);
    assert_eq!(d.closed().await, 1000);
    assert_eq!((c.exit, d.exit), (Some(3), Some(3)));
    let list = client.list_terminals(&id).await.unwrap();
    assert_eq!(list[0].exit_code, Some(3));
    // Attaching to an exited terminal replays it and reports the exit at once.
    let mut e = Viewer::attach(&client, &id, "main", true).await;
    assert_eq!(e.closed().await, 1000);
    assert_eq!(e.exit, Some(3));
    assert!(e.text().contains("again 43"));

    client.kill_terminal(&id, "main").await.unwrap();
    assert!(client.list_terminals(&id).await.unwrap().is_empty());
    assert_api_err(
        client.kill_terminal(&id, "main").await,
        404,
        "terminal_not_found",
    );

    // A command on a terminal: its exit code, and kill of a running one.
    let cmd = client
        .create_terminal(
            &id,
            &TerminalCreateRequest {
                command: Some("read line; exit $line".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut v = Viewer::attach(&client, &id, &cmd.id, true).await;
    v.type_("9\r").await;
    assert_eq!(v.closed().await, 1000);
    assert_eq!(v.exit, Some(9));
    let sleeper = client
        .create_terminal(
            &id,
            &TerminalCreateRequest {
                argv: Some(vec!["sleep".into(), "1000".into()]),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut v = Viewer::attach(&client, &id, &sleeper.id, true).await;
    client.kill_terminal(&id, &sleeper.id).await.unwrap();
    assert_eq!(v.closed().await, 1000);
    assert_eq!(v.exit, Some(128 + 9));
}

/// Set a variable in the shell and print a marker, through viewer `v`.
async fn a_marker(v: &mut Viewer, marker: &str) {
    let (head, tail) = marker.split_at(3);
    v.type_(&format!("KEPT=kept-in-memory; echo {head}''{tail}\r"))
        .await;
    v.expect(marker).await;
}

/// Malformed ids and sizes, unknown terminals, another workspace's sandbox, plain HTTP on the
/// WebSocket route, an oversized message and bad control messages: each is a clear refusal
/// and changes nothing.
#[tokio::test]
async fn terminal_refuses_hostile_input() {
    let srv = server().await;
    let client = srv.client();
    let id = create(&client, crate::base()).await.id;
    let t = client
        .create_terminal(&id, &TerminalCreateRequest::default())
        .await
        .unwrap();

    assert_api_err(
        client.kill_terminal(&id, "../x").await,
        400,
        "invalid_terminal_id",
    );
    assert_api_err(
        client.resize_terminal(&id, "../x", 80, 24).await,
        400,
        "invalid_terminal_id",
    );
    for (c, r) in [(0, 24), (99999, 24), (80, 0)] {
        assert_api_err(
            client.resize_terminal(&id, &t.id, c, r).await,
            400,
            "invalid_terminal_size",
        );
        assert_api_err(
            client
                .create_terminal(
                    &id,
                    &TerminalCreateRequest {
                        cols: Some(c),
                        rows: Some(r),
                        ..Default::default()
                    },
                )
                .await,
            400,
            "invalid_terminal_size",
        );
    }
    for bad in [
        TerminalCreateRequest {
            id: Some("../x".into()),
            ..Default::default()
        },
        TerminalCreateRequest {
            command: Some("sh".into()),
            argv: Some(vec!["sh".into()]),
            ..Default::default()
        },
        TerminalCreateRequest {
            cwd: Some("relative".into()),
            ..Default::default()
        },
    ] {
        let r = client.create_terminal(&id, &bad).await;
        assert_eq!(
            r.as_ref()
                .err()
                .and_then(|e| e.status())
                .map(|s| s.as_u16()),
            Some(400),
            "{bad:?}: {r:?}"
        );
    }
    assert_api_err(
        client
            .create_terminal(
                &id,
                &TerminalCreateRequest {
                    id: Some(t.id.clone()),
                    ..Default::default()
                },
            )
            .await,
        409,
        "terminal_exists",
    );
    assert_api_err(
        client.resize_terminal(&id, "nosuch", 80, 24).await,
        404,
        "terminal_not_found",
    );
    let refused = Viewer::try_attach(&client, &id, "nosuch", true).await.err();
    assert!(
        refused
            .as_deref()
            .is_some_and(|r| r.starts_with("404") && r.contains("terminal_not_found")),
        "{refused:?}"
    );
    let refused = Viewer::try_attach(&client, &id, "../x", true).await.err();
    assert!(
        refused.as_deref().is_some_and(|r| r.starts_with("400")),
        "{refused:?}"
    );
    // Plain HTTP on the WebSocket route.
    let resp = client
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{id}/terminals/{}/attach", t.id),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    assert!(resp.text().await.unwrap().contains("websocket_required"));

    // Another workspace's token sees nothing of this sandbox's terminals (403, as every
    // /v1 sandbox route answers for another workspace's sandbox) and changes nothing.
    let admin = srv.client();
    let ws_b = admin.create_workspace("tenant-b").await.unwrap();
    let tok_b = admin
        .create_token(&ws_b.id, &TokenCreateRequest::default())
        .await
        .unwrap();
    let b = srv.client_with(tok_b.token.as_deref().unwrap());
    assert_api_err(b.list_terminals(&id).await, 403, "forbidden");
    assert_api_err(b.kill_terminal(&id, &t.id).await, 403, "forbidden");
    assert_api_err(
        b.create_terminal(&id, &TerminalCreateRequest::default())
            .await,
        403,
        "forbidden",
    );
    let refused = Viewer::try_attach(&b, &id, &t.id, true).await.err();
    assert!(
        refused.as_deref().is_some_and(|r| r.starts_with("403")),
        "{refused:?}"
    );

    // Bad control messages are refused on the socket; the attachment goes on.
    let mut v = Viewer::attach(&client, &id, &t.id, true).await;
    v.control(r#"{"type":"resize","cols":0,"rows":10}"#).await;
    v.control("not json").await;
    v.read_until("two refusals", |v| v.errors.len() >= 2).await;
    assert_eq!(v.errors, ["invalid_terminal_size", "invalid_message"]);
    v.type_("echo st''ill-here $(stty size)\r").await;
    v.expect("still-here 24 80").await;

    // A message over 1 MiB closes that socket with 1009; the terminal is unharmed.
    let _ =
        v.ws.send(Message::Binary(vec![b'x'; (1 << 20) + 1].into()))
            .await;
    assert_eq!(v.closed().await, 1009, "{:?}", v.close);
    let mut v = Viewer::attach(&client, &id, &t.id, false).await;
    v.type_("echo al''ive\r").await;
    v.expect("alive").await;

    // Nothing of the above changed the terminals.
    let list = client.list_terminals(&id).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].id.as_str(), list[0].cols, list[0].rows),
        (t.id.as_str(), 80, 24)
    );
}

/// A tmux session on its own socket, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs");
        assert!(
            out.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", "t"])
    }

    fn keys(&self, text: &str) {
        self.run(&["send-keys", "-t", "t", "-l", text]);
        self.run(&["send-keys", "-t", "t", "Enter"]);
    }

    /// Wait until the screen holds a line equal to `line` (trimmed).
    async fn wait_line(&self, line: &str) {
        wait_until(WAIT, &format!("the line {line:?} on screen"), || async {
            self.screen()
                .lines()
                .any(|l| l.trim() == line)
                .then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; screen:\n{}", self.screen()));
    }

    /// Wait until the CLI's exit status shows (after the remote prompt, if it left one).
    async fn wait_exit(&self, code: i32) {
        let want = format!("cli-exit={code}");
        wait_until(WAIT, &format!("{want} on screen"), || async {
            self.screen()
                .lines()
                .any(|l| l.trim_end().ends_with(&want))
                .then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}; screen:\n{}", self.screen()));
    }

    /// The pane's size as `stty size` prints it.
    fn size(&self) -> String {
        self.run(&[
            "display-message",
            "-p",
            "-t",
            "t",
            "#{pane_height} #{pane_width}",
        ])
        .trim()
        .to_string()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["-L", &self.socket, "kill-server"])
            .output();
    }
}

/// `sandpit sandbox shell` as a person uses it: in a terminal (tmux), typing, reading the
/// screen, resizing the window, leaving with `exit 7` (the CLI's exit status), being killed
/// with SIGTERM (the local terminal is restored both times), and reattaching with
/// `--terminal`, which replays the screen.
#[tokio::test]
async fn cli_shell_in_a_real_terminal() {
    if Command::new("tmux").arg("-V").output().is_err() {
        eprintln!("SKIPPED: tmux is not installed (scripts/install-deps installs it)");
        return;
    }
    let srv: TestServer = server().await;
    let client = srv.client();
    let id = persistent(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let tmux = Tmux {
        socket: format!("sandpit-test-{}", std::process::id()),
    };
    tmux.run(&[
        "-f",
        "/dev/null",
        "new-session",
        "-d",
        "-s",
        "t",
        "-x",
        "100",
        "-y",
        "30",
        "-e",
        &format!("SANDPIT_URL={}", srv.url),
        "-e",
        &format!("SANDPIT_TOKEN={}", srv.token),
        "-e",
        "PS1=local$ ",
        "/bin/sh",
    ]);
    tmux.run(&["set-option", "-t", "t", "status", "off"]);
    let before = dir.path().join("tty.before");
    let bin = crate::bin().display().to_string();
    let shell = format!("{bin} sandbox shell {id}; echo cli-exit=$?");
    tmux.keys(&format!("stty -g > {}; {shell}", before.display()));

    tmux.keys("echo $((6*7))");
    tmux.wait_line("42").await;
    tmux.keys("echo size $(stty size)");
    tmux.wait_line(&format!("size {}", tmux.size())).await;

    // The window grows: the CLI follows SIGWINCH.
    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    assert_eq!(tmux.size(), "40 120");
    // SIGWINCH reaches the CLI at some point after the resize: ask until the answer has
    // the new size.
    let deadline = tokio::time::Instant::now() + WAIT;
    for n in 1.. {
        tmux.keys(&format!("echo m{n} $(stty size)"));
        let want = format!("m{n} 40 120");
        let seen = wait_until(Duration::from_secs(2), "the size line", || async {
            tmux.screen()
                .lines()
                .any(|l| l.trim() == want)
                .then_some(())
        })
        .await;
        if seen.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the remote terminal never took the new size; screen:\n{}",
            tmux.screen()
        );
    }

    // `exit 7` ends the CLI with status 7, and the local terminal is as it was.
    tmux.keys("exit 7");
    tmux.wait_exit(7).await;
    assert!(
        client.list_terminals(&id).await.unwrap().is_empty(),
        "the CLI removes the terminal it started once it exited"
    );
    let restored = format!(
        "stty -g | cmp -s - {} && echo tty-restored",
        before.display()
    );
    tmux.keys(&restored);
    tmux.wait_line("tty-restored").await;

    // A second session, killed with SIGTERM: the terminal is restored, the remote shell
    // lives on, and `--terminal` reattaches to it with its screen replayed.
    tmux.keys(&shell);
    tmux.keys("echo $((5*5))");
    tmux.wait_line("25").await;
    // Hibernated under the CLI: it says so, and the next line typed wakes the sandbox and
    // reaches the same shell.
    client.hibernate(&id).await.unwrap();
    wait_until(WAIT, "the suspend notice", || async {
        tmux.screen()
            .contains("the sandbox was suspended")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}; screen:\n{}", tmux.screen()));
    tmux.keys("echo $((8*8))");
    tmux.wait_line("64").await;
    let running = client
        .list_terminals(&id)
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.exit_code.is_none())
        .expect("the second shell runs");
    let pane_pid = tmux.run(&["display-message", "-p", "-t", "t", "#{pane_pid}"]);
    let cli = Command::new("pgrep")
        .args(["-P", pane_pid.trim()])
        .output()
        .unwrap();
    let cli_pid = String::from_utf8_lossy(&cli.stdout).trim().to_string();
    assert!(!cli_pid.is_empty(), "the CLI runs under the pane's shell");
    Command::new("kill")
        .args(["-TERM", &cli_pid])
        .status()
        .unwrap();
    tmux.wait_exit(143).await;
    tmux.keys(&restored);
    tmux.wait_line("tty-restored").await;
    tmux.keys("clear");
    wait_until(WAIT, "a clear screen", || async {
        (!tmux.screen().contains("25")).then_some(())
    })
    .await
    .unwrap();
    tmux.keys(&format!(
        "{bin} sandbox shell {id} --terminal {}; echo cli-exit=$?",
        running.id
    ));
    tmux.wait_line("25").await;
    tmux.keys("exit 0");
    tmux.wait_exit(0).await;

    // Piped stdin: no raw mode, bytes pass through, the end of input ends the shell.
    let out = Command::new(crate::bin())
        .args(["sandbox", "shell", &id])
        .env("SANDPIT_URL", &srv.url)
        .env("SANDPIT_TOKEN", &srv.token)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"echo pi''ped $((2+3)); exit 4\n")?;
            child.wait_with_output()
        })
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("piped 5"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
