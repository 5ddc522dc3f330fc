//! `sandpit sandbox shell <id> [-- cmd...]`: an interactive terminal in a sandbox.
//!
//! Creates a terminal (the login shell, or `cmd`) of the local terminal's size and attaches
//! to it over a WebSocket. When stdin is a terminal it is put in raw mode (every key goes to
//! the sandbox, Ctrl-C included) and restored on every way out: the guard is dropped on
//! return, on an error and on a panic, and SIGTERM, SIGHUP and SIGQUIT end the session
//! through the same return. SIGWINCH sends the new size. When stdin is not a terminal, its
//! bytes are passed through as typed (the remote terminal echoes them) and its end is sent
//! as the terminal's EOF character (Ctrl-D).
//!
//! The exit code is the remote process's; a terminal this command started is removed once
//! its process exited (one it left running, killed by a signal, stays for `--terminal`). If the sandbox is suspended meanwhile the server
//! closes the socket (1012); the shell reattaches at the next key, which wakes the sandbox,
//! and the terminal is where it was.

use std::io::Write;
use std::os::fd::AsFd;

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use rustix::termios::{self, OptionalActions, Termios};
use sandpit_sdk::Client;
use sandpit_sdk::types::{TerminalCreateRequest, TerminalMessage};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The close code the server sends when the sandbox is suspending (1012, service restart).
const CLOSE_SUSPENDED: u16 = 1012;

/// What to attach to.
pub struct ShellArgs {
    pub id: String,
    /// An existing terminal (else a new one is created).
    pub terminal: Option<String>,
    /// argv of a new terminal (empty: the login shell).
    pub command: Vec<String>,
}

/// Run the session; returns the remote exit code.
pub async fn run(client: Client, args: ShellArgs) -> anyhow::Result<u8> {
    let stdin = std::io::stdin();
    let interactive = termios::isatty(stdin.as_fd());
    let (cols, rows) = window_size().unwrap_or((80, 24));
    let created = args.terminal.is_none();
    let tid = match args.terminal {
        Some(t) => t,
        None => {
            let req = TerminalCreateRequest {
                argv: (!args.command.is_empty()).then_some(args.command),
                cols: Some(cols),
                rows: Some(rows),
                ..Default::default()
            };
            client.create_terminal(&args.id, &req).await?.id
        }
    };
    let mut ws = connect(&client, &args.id, &tid, true).await?;
    if interactive {
        // An attached terminal may have another size (a second viewer, `--terminal`).
        send_size(&mut ws).await?;
    }
    // Restores the local terminal when dropped, whichever way this function returns.
    let raw_mode = if interactive {
        Some(RawMode::enter()?)
    } else {
        None
    };
    let end = session(&client, &args.id, &tid, ws, interactive).await?;
    drop(raw_mode);
    match end {
        End::Exited(code) => {
            // A terminal this command started and saw end is of no more use: remove it (an
            // agent holds at most 64). One it attached to, or left running, stays.
            if created {
                let _ = client.kill_terminal(&args.id, &tid).await;
            }
            Ok(code.clamp(0, 255) as u8)
        }
        End::Signalled(code) => Ok(code),
    }
}

/// How a session ended.
enum End {
    /// The remote process exited with this code.
    Exited(i32),
    /// A signal ended this command (the exit status to give); the terminal runs on.
    Signalled(u8),
}

async fn session(
    client: &Client,
    id: &str,
    tid: &str,
    ws: Ws,
    interactive: bool,
) -> anyhow::Result<End> {
    let mut input = stdin_reader();
    let mut winch = signal(SignalKind::window_change())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut quit = signal(SignalKind::quit())?;
    let mut ws = Some(ws);
    let mut exit_code: Option<i32> = None;
    // Until stdin ends; its end is sent once, as the terminal's EOF character.
    let mut stdin_open = true;
    let mut stdout = std::io::stdout();
    loop {
        let Some(socket) = ws.as_mut() else {
            // Detached by a suspend: reattach at the next input (which wakes the sandbox), or
            // at once when there is no more input to wait for.
            let bytes = if stdin_open {
                tokio::select! {
                    bytes = input.recv() => Some(bytes.unwrap_or_else(|| {
                        stdin_open = false;
                        vec![0x04]
                    })),
                    _ = term.recv() => return Ok(End::Signalled(128 + 15)),
                    _ = hup.recv() => return Ok(End::Signalled(128 + 1)),
                    _ = quit.recv() => return Ok(End::Signalled(128 + 3)),
                }
            } else {
                None
            };
            let mut socket = connect(client, id, tid, false).await?;
            if interactive {
                send_size(&mut socket).await?;
            }
            if let Some(bytes) = bytes {
                socket.send(Message::Binary(bytes.into())).await?;
            }
            ws = Some(socket);
            continue;
        };
        tokio::select! {
            msg = socket.next() => match msg {
                Some(Ok(Message::Binary(bytes))) => {
                    stdout.write_all(&bytes)?;
                    stdout.flush()?;
                }
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<TerminalMessage>(&text) {
                    Ok(TerminalMessage::Exit { exit_code: code }) => exit_code = Some(code),
                    Ok(TerminalMessage::Error { code, message }) => {
                        notice(interactive, &format!("server refused a message: {code}: {message}"));
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(frame))) => {
                    if let Some(code) = exit_code {
                        return Ok(End::Exited(code));
                    }
                    match frame {
                        Some(f) if u16::from(f.code) == CLOSE_SUSPENDED => {
                            notice(interactive, "the sandbox was suspended (or forked); type to reattach, which wakes it");
                            ws = None;
                        }
                        Some(f) => bail!("the server closed the terminal: {} ({})", f.reason, u16::from(f.code)),
                        None => bail!("the server closed the terminal"),
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    if let Some(code) = exit_code {
                        return Ok(End::Exited(code));
                    }
                    return Err(e).context("the terminal's connection broke");
                }
                None => match exit_code {
                    Some(code) => return Ok(End::Exited(code)),
                    None => bail!("the terminal's connection ended"),
                },
            },
            bytes = input.recv(), if stdin_open => {
                // The end of a piped stdin is the terminal's EOF character.
                let bytes = bytes.unwrap_or_else(|| {
                    stdin_open = false;
                    vec![0x04]
                });
                socket.send(Message::Binary(bytes.into())).await?;
            }
            _ = winch.recv() => {
                if interactive {
                    send_size(socket).await?;
                }
            }
            _ = term.recv() => return Ok(End::Signalled(128 + 15)),
            _ = hup.recv() => return Ok(End::Signalled(128 + 1)),
            _ = quit.recv() => return Ok(End::Signalled(128 + 3)),
        }
    }
}

/// Connect to a terminal's WebSocket; an HTTP refusal becomes the server's error message.
async fn connect(client: &Client, id: &str, tid: &str, replay: bool) -> anyhow::Result<Ws> {
    let url = client.terminal_attach_url(id, tid, replay);
    if url.starts_with("wss://") {
        bail!(
            "this CLI attaches over ws:// only; reach the server over http:// (e.g. through an SSH tunnel)"
        );
    }
    let mut req = url.as_str().into_client_request()?;
    req.headers_mut().insert(
        "authorization",
        format!("Bearer {}", client.token())
            .parse()
            .context("the token is not a valid header value")?,
    );
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let message = serde_json::from_str::<sandpit_sdk::types::ErrorBody>(&body)
                .map(|b| format!("{}: {}", b.error.code, b.error.message))
                .unwrap_or_else(|_| body.into_owned());
            bail!("{}: {message}", resp.status())
        }
        Err(e) => Err(e).with_context(|| format!("connecting to {url}")),
    }
}

/// Send the local terminal's size, if it has one.
async fn send_size(ws: &mut Ws) -> anyhow::Result<()> {
    if let Some((cols, rows)) = window_size() {
        let msg = serde_json::to_string(&TerminalMessage::Resize { cols, rows })?;
        ws.send(Message::Text(msg.into())).await?;
    }
    Ok(())
}

/// The local terminal's size (of stdout, else stdin), if either is a terminal.
fn window_size() -> Option<(u32, u32)> {
    let ws = termios::tcgetwinsize(std::io::stdout().as_fd())
        .or_else(|_| termios::tcgetwinsize(std::io::stdin().as_fd()))
        .ok()?;
    (ws.ws_col > 0 && ws.ws_row > 0).then_some((u32::from(ws.ws_col), u32::from(ws.ws_row)))
}

/// Stdin's bytes, read on a thread of their own: a blocking read cannot be cancelled, and
/// a tokio blocking task would keep the runtime from shutting down until the next key.
/// `None` once stdin ended.
fn stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// A line for the user, readable in raw mode too.
fn notice(interactive: bool, text: &str) {
    let end = if interactive { "\r\n" } else { "\n" };
    eprint!("{end}[sandpit: {text}]{end}");
}

/// Raw mode on stdin, restored on drop.
struct RawMode {
    saved: Termios,
}

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        // `Now`, not `Flush`: keys typed ahead of the session are kept for it.
        termios::tcsetattr(stdin.as_fd(), OptionalActions::Now, &raw)
            .context("setting raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin().as_fd(), OptionalActions::Now, &self.saved);
    }
}
