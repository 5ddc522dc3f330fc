//! The agent gateway at `pitcher_url`: a WebSocket speaking the CodeSandbox agent
//! ("pitcher") protocol as `@codesandbox/sdk` does, msgpack frames of
//! `{id, method, params}` answered by `{id, method, status, result}` or
//! `{id, method, status, error: {code, message, data}}`, and notifications
//! `{method, params}`. An empty text frame is the SDK's ping; it is answered in kind.
//!
//! The gateway runs in the server and turns each call into operations of our own agent
//! (`sandpit_control::agent`), one short connection at a time under the sandbox's read lock,
//! so a connected client never holds up hibernation. The one long-lived agent connection is
//! the attachment to a `TERMINAL` shell (a pty in the agent) the client opened or typed into:
//! it is registered in the sandbox's live connections, like a preview connection, so a
//! suspend cuts it instead of waiting for it. When the sandbox stops running (hibernated,
//! shut down, deleted), the client gets a `system/hibernate` notification and the socket
//! closes; `POST /vm/{id}/start` then hands out a fresh token to reconnect with.

use crate::csb_store::CsbTables;
use sandpit_control::Status;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use rmpv::Value;
use sandpit_agent_proto::client::TerminalEvent;
use sandpit_agent_proto::{AgentErrorCode, EntryKind, TerminalSize};
use sandpit_control::agent_terminal::TerminalAttachment;
use sandpit_control::live::ConnGuard;
use tokio::sync::{Mutex, OwnedRwLockReadGuard, mpsc};

use super::rest::{GATEWAY_VERSION, WORKSPACE_PATH};
use super::shells::{self, ShellMeta};
use super::tasks;
use super::watch;
use crate::auth::hash_token;
use crate::error::ApiError;
use crate::extract::GatewaySandbox;
use crate::lifecycle;
use crate::server::Server;
use crate::util::{new_id, now_ms};
use sandpit_control::agent::{AgentClient, AgentFailure};

/// Where the gateway listens: `<prefix>/<sandbox id>?token=…`.
pub const PATH_PREFIX: &str = crate::forward::GATEWAY_PATH_PREFIX;

/// Pitcher error codes the gateway uses (`pitcher-protocol/errors`).
mod code {
    pub const CRITICAL_ERROR: i64 = 0;
    pub const FEATURE_UNAVAILABLE: i64 = 1;
    pub const NO_ACCESS: i64 = 2;
    pub const INVALID_PATH: i64 = 101;
    pub const RAWFS_ERROR: i64 = 102;
    pub const SHELL_NOT_FOUND: i64 = 204;
    pub const TASK_NOT_FOUND: i64 = 601;
}

/// Largest file `fs/readFile` returns (it is held in memory, then sent in one message).
pub const MAX_READ_FILE_BYTES: u64 = 32 << 20;

/// How often the gateway compares the listening ports.
const PORT_POLL: Duration = Duration::from_secs(1);

pub fn router() -> Router<Arc<Server>> {
    // The SDK connects to `<pitcher_url>/?token=…`: with the trailing slash.
    Router::new()
        .route(
            &format!("{PATH_PREFIX}/{{id}}"),
            axum::routing::get(connect),
        )
        .route(
            &format!("{PATH_PREFIX}/{{id}}/"),
            axum::routing::get(connect),
        )
}

/// Who is connected: the sandbox and what the token allows.
#[derive(Debug, Clone)]
struct Session {
    sandbox: String,
    write: bool,
    client_id: String,
    /// A session's Linux user (`POST /vm/{id}/sessions`): its shells run as that user.
    username: Option<String>,
    /// `http(s)://<host>` as the client reached the server (for download links).
    http_base: String,
}

async fn connect(
    State(server): State<Arc<Server>>,
    // The token and the sandbox are checked before anything else (see `crate::extract`).
    gw: GatewaySandbox,
    headers: axum::http::HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let GatewaySandbox {
        token,
        grant: t,
        row,
    } = gw;
    let id = row.id.clone();
    if row.status != Status::Running {
        return Err(ApiError::conflict(
            "sandbox_not_running",
            "the sandbox is not running; start it with POST /vm/{id}/start",
        ));
    }
    // The token is checked first, so a plain request learns nothing about the sandbox.
    let ws = ws.map_err(|_| {
        ApiError::bad_request("websocket_required", "connect with a WebSocket upgrade")
    })?;
    // A session token opens one connection (seed 000: single use).
    if t.single_use
        && !server
            .store
            .csb()
            .consume_agent_token(&hash_token(&token))
            .await?
    {
        return Err(ApiError::unauthorized(
            "this session token was used already",
        ));
    }
    let session = Session {
        sandbox: id.to_string(),
        write: t.permission == "write",
        client_id: new_id("client"),
        username: t.username,
        http_base: super::rest::ws_base(&headers).replacen("ws", "http", 1),
    };
    Ok(ws
        .max_message_size(64 << 20)
        .on_upgrade(move |socket| serve(server, session, socket))
        .into_response())
}

/// What one connection follows: shells (and how much of their output it has sent) and the
/// last port list it reported.
#[derive(Default)]
struct Follow {
    shells: HashMap<String, Followed>,
    ports: Option<Vec<u16>>,
    /// `fs/watch`es of an agent without inotify watches (older than protocol version 4),
    /// followed by polling.
    watches: HashMap<String, super::watch::Watch>,
    /// `fs/watch`es on the agent's inotify watches, by watch id.
    inotify_watches: HashMap<String, WatchRelay>,
    /// Setup step results last reported; `setup_done` once setup finished (or has no steps).
    setup_seen: Option<Vec<Option<i32>>>,
    setup_done: bool,
    /// `TERMINAL` shells this connection is attached to (see [`relay_terminal`]).
    terminals: HashMap<String, Attached>,
}

/// An attachment to a terminal shell: its relay task takes input from `tx` and ends when
/// `tx` is dropped.
struct Attached {
    tx: mpsc::Sender<TermInput>,
    /// The size last sent through it.
    size: Option<TerminalSize>,
    relay: tokio::task::JoinHandle<()>,
}

/// The relay of one inotify `fs/watch` ([`relay_watch`]); dropping it ends the watch.
struct WatchRelay(tokio::task::JoinHandle<()>);

impl Drop for WatchRelay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

enum TermInput {
    Bytes(Vec<u8>),
    Resize(TerminalSize),
}

/// What waits for a call's reply to be sent: the relays of terminals the call attached.
#[derive(Default)]
struct Gate(std::sync::Mutex<Vec<tokio::sync::oneshot::Sender<()>>>);

impl Gate {
    fn wait(&self) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.lock().expect("gate poisoned").push(tx);
        rx
    }

    fn open(&self) {
        for tx in self.0.lock().expect("gate poisoned").drain(..) {
            let _ = tx.send(());
        }
    }
}

struct Followed {
    sent: u64,
    carry: Vec<u8>,
    exited: bool,
}

struct Conn {
    server: Arc<Server>,
    session: Session,
    out: mpsc::Sender<Message>,
    follow: Mutex<Follow>,
    /// Counts the client's messages: a terminal's relay waits for the next one after the
    /// reply that attached it (see [`relay_terminal`]).
    inbound: tokio::sync::watch::Sender<u64>,
}

async fn serve(server: Arc<Server>, session: Session, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(256);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
        let _ = sink.close().await;
    });
    let conn = Arc::new(Conn {
        server,
        session,
        inbound: tokio::sync::watch::Sender::new(0),
        out: tx,
        follow: Mutex::new(Follow::default()),
    });
    let poller = tokio::spawn(poll(conn.clone()));
    while let Some(msg) = stream.next().await {
        let Ok(msg) = msg else { break };
        match msg {
            Message::Binary(bytes) => {
                conn.inbound.send_modify(|n| *n += 1);
                let conn = conn.clone();
                tokio::spawn(async move { conn.handle(&bytes).await });
            }
            // The SDK's ping is an empty text frame; any frame back counts as its pong.
            Message::Text(_) => {
                let _ = conn.out.send(Message::Text("".into())).await;
            }
            Message::Close(_) => break,
            _ => {}
        }
    }
    poller.abort();
    drop(conn);
    let _ = writer.await;
}

/// The poller: new shell output and exits, port changes, and the end of the sandbox's run.
async fn poll(conn: Arc<Conn>) {
    let mut since_ports = Duration::ZERO;
    let mut since_watch = Duration::ZERO;
    loop {
        tokio::time::sleep(shells::POLL).await;
        since_ports += shells::POLL;
        since_watch += shells::POLL;
        let Some((agent, _guard)) = conn.agent(false).await else {
            conn.notify("system/hibernate", map(vec![])).await;
            let _ = conn.out.send(Message::Close(None)).await;
            return;
        };
        let ids: Vec<String> = conn.follow.lock().await.shells.keys().cloned().collect();
        for id in ids {
            if let Err(e) = conn.pump_shell(&agent, &id).await {
                tracing::debug!(sandbox = %conn.session.sandbox, shell = %id, error = ?e, "polling a shell");
            }
        }
        if since_watch >= watch::WATCH_POLL {
            since_watch = Duration::ZERO;
            conn.pump_watches(&agent).await;
        }
        if since_ports >= PORT_POLL {
            since_ports = Duration::ZERO;
            conn.pump_setup(&agent).await;
            if let Ok(list) = conn.ports(&agent).await {
                let numbers: Vec<u16> = list.iter().map(|(p, _)| *p).collect();
                let mut f = conn.follow.lock().await;
                let changed = f.ports.as_ref().is_some_and(|old| *old != numbers);
                f.ports = Some(numbers);
                drop(f);
                if changed {
                    conn.notify("port/changed", map(vec![("list", ports_value(&list))]))
                        .await;
                }
            }
        }
    }
}

/// A pitcher error.
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
    errno: Option<i64>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            errno: None,
        }
    }
}

impl From<AgentFailure> for RpcError {
    fn from(f: AgentFailure) -> Self {
        match f {
            AgentFailure::Refused(e) => {
                let errno = match e.code {
                    AgentErrorCode::NotFound => 2,
                    AgentErrorCode::PermissionDenied => 13,
                    AgentErrorCode::AlreadyExists => 17,
                    AgentErrorCode::NotDirectory => 20,
                    AgentErrorCode::IsDirectory => 21,
                    AgentErrorCode::InvalidPath => 22,
                    AgentErrorCode::NotEmpty => 39,
                    AgentErrorCode::NoSpace => 28,
                    AgentErrorCode::NotRegularFile => 22,
                    _ => 5,
                };
                RpcError {
                    code: code::RAWFS_ERROR,
                    message: e.message,
                    errno: Some(errno),
                }
            }
            AgentFailure::TooLarge { limit } => {
                RpcError::new(code::RAWFS_ERROR, format!("larger than {limit} bytes"))
            }
            other => {
                tracing::warn!(error = ?other, "agent gateway: agent operation failed");
                RpcError::new(code::CRITICAL_ERROR, "the sandbox's agent did not answer")
            }
        }
    }
}

fn rawfs(errno: i64, message: impl Into<String>) -> RpcError {
    RpcError {
        code: code::RAWFS_ERROR,
        message: message.into(),
        errno: Some(errno),
    }
}

type RpcResult = Result<Value, RpcError>;

fn map(pairs: Vec<(&str, Value)>) -> Value {
    Value::Map(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn get_str(v: &Value, key: &str) -> Option<String> {
    get(v, key).and_then(Value::as_str).map(str::to_string)
}

fn need_str(v: &Value, key: &str) -> Result<String, RpcError> {
    get_str(v, key).ok_or_else(|| RpcError::new(code::CRITICAL_ERROR, format!("{key} is required")))
}

fn get_bool(v: &Value, key: &str) -> Option<bool> {
    get(v, key).and_then(Value::as_bool)
}

/// A path as the SDK gives it: relative ones are in the workspace.
fn resolve(path: &str) -> Result<String, RpcError> {
    let full = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("{WORKSPACE_PATH}/{path}")
    };
    sandpit_agent_proto::normalize_path(&full)
        .map_err(|e| RpcError::new(code::INVALID_PATH, e.message))
}

fn kind_number(k: EntryKind) -> i64 {
    if k == EntryKind::Dir { 1 } else { 0 }
}

fn ports_value(list: &[(u16, String)]) -> Value {
    Value::Array(
        list.iter()
            .map(|(p, url)| {
                map(vec![
                    ("port", Value::from(*p)),
                    ("url", Value::from(url.as_str())),
                ])
            })
            .collect(),
    )
}

async fn send_value(out: &mpsc::Sender<Message>, v: &Value) -> bool {
    let mut buf = Vec::new();
    rmpv::encode::write_value(&mut buf, v).is_ok()
        && out.send(Message::Binary(buf.into())).await.is_ok()
}

/// Send a notification; false once the connection's writer is gone.
async fn notify(out: &mpsc::Sender<Message>, method: &str, params: Value) -> bool {
    send_value(
        out,
        &map(vec![("method", Value::from(method)), ("params", params)]),
    )
    .await
}

/// A shell's `size` parameter (`{cols, rows}`), checked; `None` when absent.
fn size_param(p: &Value) -> Result<Option<TerminalSize>, RpcError> {
    let Some(size) = get(p, "size").filter(|v| !v.is_nil()) else {
        return Ok(None);
    };
    let dim = |key: &str| {
        get(size, key)
            .and_then(Value::as_u64)
            .and_then(|d| u16::try_from(d).ok())
            .unwrap_or(0)
    };
    TerminalSize {
        cols: dim("cols"),
        rows: dim("rows"),
    }
    .validate()
    .map(Some)
    .map_err(|e| RpcError::new(code::CRITICAL_ERROR, e.message))
}

/// A terminal operation's failure: an unknown terminal is an unknown shell.
fn shell_failure(f: AgentFailure) -> RpcError {
    match f {
        AgentFailure::Refused(e) if e.code == AgentErrorCode::NotFound => {
            RpcError::new(code::SHELL_NOT_FOUND, "no such shell")
        }
        f => f.into(),
    }
}

/// How long a terminal's relay waits for the client's next message after the reply that
/// attached it (see [`relay_terminal`]).
const RELAY_AFTER_REPLY: Duration = Duration::from_millis(500);

/// Relay one terminal shell's attachment: output as `shell/out` (whole UTF-8 sequences),
/// its exit as `shell/exit`, input and resizes from `input`. Ends at the exit, when `input`
/// is dropped (the client closed the shell or went away), when either connection breaks, or
/// when a suspend cuts the sandbox's live connections; the agent connection is reset before
/// the registration goes, and the terminal itself goes on in the agent.
async fn relay_terminal(
    out: mpsc::Sender<Message>,
    id: String,
    mut attachment: TerminalAttachment,
    live: ConnGuard,
    mut input: mpsc::Receiver<TermInput>,
    gate: tokio::sync::oneshot::Receiver<()>,
    mut inbound: tokio::sync::watch::Receiver<u64>,
) {
    let cancel = live.cancel_token();
    // Opened or dropped once the call that attached has answered.
    tokio::select! {
        _ = gate => {}
        _ = cancel.cancelled() => return,
    }
    // The SDK registers its listeners for a new shell only after it has read the reply, and
    // its WebSocket library hands over every message of one read at once, synchronously: a
    // command's output and exit that arrive with the reply are lost and `commands.run`
    // never returns. After reading the reply the SDK sends a message of its own
    // (`shell/rename`, `shell/open`), so the relay starts at the client's next message, or
    // after half a second.
    inbound.borrow_and_update();
    tokio::select! {
        _ = tokio::time::timeout(RELAY_AFTER_REPLY, inbound.changed()) => {}
        _ = cancel.cancelled() => return,
    }
    {
        let (mut reader, mut writer) = attachment.split();
        let reading = async {
            let mut carry = Vec::new();
            loop {
                match reader.next().await {
                    Ok(TerminalEvent::Output(bytes) | TerminalEvent::Stderr(bytes)) => {
                        let text = shells::utf8_chunk(&mut carry, &bytes);
                        let params = map(vec![
                            ("shellId", Value::from(id.as_str())),
                            ("out", Value::from(text)),
                        ]);
                        if !notify(&out, "shell/out", params).await {
                            return;
                        }
                    }
                    Ok(TerminalEvent::Exit(status)) => {
                        let params = map(vec![
                            ("shellId", Value::from(id.as_str())),
                            ("shellType", Value::from("TERMINAL")),
                            ("exitCode", Value::from(status.exit_code)),
                        ]);
                        notify(&out, "shell/exit", params).await;
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(shell = %id, error = ?e, "agent gateway: terminal attachment ended");
                        return;
                    }
                }
            }
        };
        let writing = async {
            while let Some(cmd) = input.recv().await {
                let sent = match cmd {
                    TermInput::Bytes(b) => writer.input(&b).await,
                    TermInput::Resize(size) => writer.resize(size).await,
                };
                if sent.is_err() {
                    return;
                }
            }
        };
        tokio::select! {
            _ = reading => {}
            _ = writing => {}
            _ = cancel.cancelled() => {}
        }
    }
    drop(attachment);
    drop(live);
}

/// Relay one inotify `fs/watch` as `fs/watchEvent` notifications, once `gate` opens (after
/// the reply that carries the watch id, so the SDK knows the id when events arrive). Ends
/// when dropped (`fs/unwatch`, or the connection ends), when the watched path goes, when the
/// agent connection breaks, or when a suspend cuts the sandbox's live connections; the agent
/// connection is reset before the registration goes. An `overflow` or `limit` event, which
/// the SDK has no type for, is a `change` of the watched path.
async fn relay_watch(
    out: mpsc::Sender<Message>,
    id: String,
    root: String,
    live: ConnGuard,
    w: sandpit_control::agent_watch::AgentWatch,
    gate: tokio::sync::oneshot::Receiver<()>,
) {
    let cancel = live.cancel_token();
    // Declared after `live`, so dropped (and reset) before it, however this task ends.
    let mut w = w;
    tokio::select! {
        _ = gate => {}
        _ = cancel.cancelled() => return,
    }
    loop {
        let batch = tokio::select! {
            b = w.next() => b,
            _ = cancel.cancelled() => return,
        };
        let events = match batch {
            Ok(Some(events)) => events,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(watch = %id, error = ?e, "agent gateway: watch ended");
                return;
            }
        };
        let list: Vec<Value> = events
            .into_iter()
            .map(|e| {
                use sandpit_agent_proto::WatchEventKind as K;
                let (kind, path) = match e.kind {
                    K::Add => ("add", e.path),
                    K::Change => ("change", e.path),
                    K::Remove => ("remove", e.path),
                    K::Overflow | K::Limit => ("change", root.clone()),
                };
                map(vec![
                    ("paths", Value::Array(vec![Value::from(path)])),
                    ("type", Value::from(kind)),
                ])
            })
            .collect();
        let params = map(vec![
            ("watchId", Value::from(id.as_str())),
            ("events", Value::Array(list)),
        ]);
        if !notify(&out, "fs/watchEvent", params).await {
            return;
        }
    }
}

fn shell_dto(s: &ShellMeta, status: &str, exit: Option<i32>, buffer: Option<Vec<String>>) -> Value {
    let mut pairs = vec![
        ("shellId", Value::from(s.id.as_str())),
        ("name", Value::from(s.name.as_str())),
        ("status", Value::from(status)),
        ("shellType", Value::from(s.shell_type.as_str())),
        ("startCommand", Value::from(s.command.as_str())),
        ("ownerUsername", Value::from(s.owner.as_str())),
        ("isSystemShell", Value::from(s.is_system)),
    ];
    if let Some(code) = exit {
        pairs.push(("exitCode", Value::from(code)));
    }
    if let Some(b) = buffer {
        pairs.push((
            "buffer",
            Value::Array(b.into_iter().map(Value::from).collect()),
        ));
    }
    map(pairs)
}

fn status_of(exited: bool, code: Option<i32>) -> &'static str {
    match (exited, code) {
        (false, _) => "RUNNING",
        (true, Some(0)) => "FINISHED",
        (true, _) => "ERROR",
    }
}

impl Conn {
    /// The sandbox's agent with its read lock, while it runs; `None` once it does not.
    /// `touch` records activity (client calls do; the poller does not, so an idle client
    /// does not keep a sandbox awake: the SDK's keep-alive is `system/update`).
    async fn agent(&self, touch: bool) -> Option<(AgentClient, OwnedRwLockReadGuard<()>)> {
        let id = &self.session.sandbox;
        let guard = self.server.lock_of(id).read_owned().await;
        let row = self.server.store.sandboxes.get(id).await.ok()??;
        if row.status != Status::Running {
            return None;
        }
        if touch {
            let _ = self.server.store.sandboxes.touch(id, now_ms()).await;
        }
        lifecycle::agent_of(&self.server, &row).map(|a| (a, guard))
    }

    /// Who files written through the gateway belong to: the template's `USER` (root when it
    /// has none).
    async fn default_user(&self) -> Result<Option<String>, RpcError> {
        let id = &self.session.sandbox;
        let row = self.server.store.sandboxes.get(id).await;
        let user = match row {
            Ok(Some(row)) => sandpit_control::node::images::default_user(&self.server, &row).await,
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        user.map_err(|e| {
            tracing::warn!(sandbox = %id, error = %e, "the template's user is unknown");
            RpcError::new(
                code::CRITICAL_ERROR,
                "the sandbox's template cannot be read",
            )
        })
    }

    async fn send_value(&self, v: &Value) {
        send_value(&self.out, v).await;
    }

    async fn notify(&self, method: &str, params: Value) {
        notify(&self.out, method, params).await;
    }

    /// Attach this connection to terminal shell `id` (once), replaying its scrollback: its
    /// output and exit then reach the client as `shell/out` and `shell/exit`, once `gate`
    /// opens (after the reply to the call that attached, so the SDK knows the shell before
    /// its output arrives). Call with the sandbox's read lock held (the attachment is
    /// registered as a live connection, which must not race a suspend).
    async fn attach_terminal(
        &self,
        agent: &AgentClient,
        id: &str,
        gate: &Gate,
    ) -> Result<(), RpcError> {
        // Held across the attach so that two calls never attach twice.
        let mut follow = self.follow.lock().await;
        if follow.terminals.get(id).is_some_and(|a| !a.tx.is_closed()) {
            return Ok(());
        }
        let live = self.server.previews.register(&self.session.sandbox);
        let (_, attachment) = agent
            .terminal_attach(id, true)
            .await
            .map_err(shell_failure)?;
        let (tx, rx) = mpsc::channel(64);
        let relay = tokio::spawn(relay_terminal(
            self.out.clone(),
            id.to_string(),
            attachment,
            live,
            rx,
            gate.wait(),
            self.inbound.subscribe(),
        ));
        follow.terminals.insert(
            id.to_string(),
            Attached {
                tx,
                size: None,
                relay,
            },
        );
        Ok(())
    }

    /// Stop following terminal shell `id` and wait until its relay ended, so a kill that
    /// follows is not reported to the client as the shell's exit.
    async fn detach_terminal(&self, id: &str) {
        let attached = self.follow.lock().await.terminals.remove(id);
        if let Some(Attached { tx, relay, .. }) = attached {
            drop(tx);
            let _ = tokio::time::timeout(Duration::from_secs(5), relay).await;
        }
    }

    /// Send to an attached terminal shell, resizing it first if `size` is new. False when
    /// its attachment has ended (the process exited, or the connection was cut).
    async fn to_terminal(
        &self,
        id: &str,
        input: Option<Vec<u8>>,
        size: Option<TerminalSize>,
    ) -> bool {
        let mut follow = self.follow.lock().await;
        let Some(att) = follow.terminals.get_mut(id) else {
            return false;
        };
        let mut sends = Vec::new();
        if let Some(size) = size.filter(|s| att.size != Some(*s)) {
            att.size = Some(size);
            sends.push(TermInput::Resize(size));
        }
        sends.extend(input.map(TermInput::Bytes));
        let tx = att.tx.clone();
        drop(follow);
        for s in sends {
            if tx.send(s).await.is_err() {
                self.follow.lock().await.terminals.remove(id);
                return false;
            }
        }
        true
    }

    async fn handle(&self, bytes: &[u8]) {
        let Ok(msg) = rmpv::decode::read_value(&mut &bytes[..]) else {
            tracing::debug!("agent gateway: undecodable frame");
            return;
        };
        let Some(id) = get(&msg, "id").cloned() else {
            return; // notifications from the client: none are needed
        };
        let method = get_str(&msg, "method").unwrap_or_default();
        let params = get(&msg, "params").cloned().unwrap_or(Value::Nil);
        let gate = Gate::default();
        let reply = match self.call(&method, &params, &gate).await {
            Ok(result) => map(vec![
                ("id", id),
                ("method", Value::from(method.as_str())),
                ("status", Value::from(0)),
                ("result", result),
            ]),
            Err(e) => {
                let mut err = vec![
                    ("code", Value::from(e.code)),
                    ("message", Value::from(e.message.as_str())),
                ];
                if let Some(errno) = e.errno {
                    err.push(("data", map(vec![("errno", Value::from(errno))])));
                }
                map(vec![
                    ("id", id),
                    ("method", Value::from(method.as_str())),
                    ("status", Value::from(1)),
                    ("error", map(err)),
                ])
            }
        };
        self.send_value(&reply).await;
        gate.open();
    }

    fn user(&self) -> &str {
        self.session.username.as_deref().unwrap_or("root")
    }

    fn need_write(&self) -> Result<(), RpcError> {
        if self.session.write {
            Ok(())
        } else {
            Err(RpcError::new(
                code::NO_ACCESS,
                "this session is read-only (the token lacks sandbox_edit_code)",
            ))
        }
    }

    async fn live_agent(&self) -> Result<(AgentClient, OwnedRwLockReadGuard<()>), RpcError> {
        self.agent(true)
            .await
            .ok_or_else(|| RpcError::new(code::CRITICAL_ERROR, "the sandbox is not running"))
    }

    async fn call(&self, method: &str, p: &Value, gate: &Gate) -> RpcResult {
        match method {
            "client/join" => {
                if let Some((agent, _g)) = self.agent(true).await
                    && let Err(e) = tasks::on_join(&agent).await
                {
                    tracing::warn!(sandbox = %self.session.sandbox, error = ?e, "starting setup and tasks");
                }
                Ok(self.join(p))
            }
            "system/update" => {
                let _ = self.live_agent().await?;
                Ok(map(vec![]))
            }
            "setup/get" | "setup/init" => {
                let (agent, _g) = self.live_agent().await?;
                let progress = setup_value(tasks::progress(&agent).await?.as_ref());
                Ok(progress)
            }
            m if m.starts_with("task/") => self.task(m, p).await,
            "port/list" => {
                let (agent, _g) = self.live_agent().await?;
                let list = self.ports(&agent).await?;
                self.follow.lock().await.ports = Some(list.iter().map(|(p, _)| *p).collect());
                Ok(map(vec![("list", ports_value(&list))]))
            }
            m if m.starts_with("shell/") => self.shell(m, p, gate).await,
            m if m.starts_with("fs/") => self.fs(m, p, gate).await,
            other => Err(unsupported(other)),
        }
    }

    fn join(&self, p: &Value) -> Value {
        let protocol = get(p, "clientInfo")
            .and_then(|c| get_str(c, "protocolVersion"))
            .unwrap_or_default();
        let app = get(p, "clientInfo")
            .and_then(|c| get_str(c, "appId"))
            .unwrap_or_else(|| "sdk".into());
        let permission = if self.session.write { "write" } else { "read" };
        map(vec![
            (
                "client",
                map(vec![
                    ("clientId", Value::from(self.session.client_id.as_str())),
                    ("username", Value::from(self.user())),
                    ("name", Value::from(self.user())),
                    ("avatarUrl", Value::Nil),
                    ("color", Value::from("#4b9cd3")),
                    ("appId", Value::from(app.as_str())),
                ]),
            ),
            ("workspacePath", Value::from(WORKSPACE_PATH)),
            ("version", Value::from(GATEWAY_VERSION)),
            ("protocolVersion", Value::from(protocol.as_str())),
            ("latestPitcherVersion", Value::from(GATEWAY_VERSION)),
            ("capabilities", map(vec![])),
            (
                "permissions",
                map(vec![("permission", Value::from(permission))]),
            ),
            ("isProtected", Value::from(false)),
            // Reconnecting goes through `POST /vm/{id}/start`, which hands out a new token;
            // this one names the client for the log.
            (
                "reconnectToken",
                Value::from(self.session.client_id.as_str()),
            ),
        ])
    }

    /// Listening ports a client can reach (not the agent's, not loopback-only), with their
    /// preview host.
    async fn ports(&self, agent: &AgentClient) -> Result<Vec<(u16, String)>, RpcError> {
        let list = agent.list_ports().await?;
        let mut out: Vec<(u16, String)> = list
            .ports
            .iter()
            .filter(|p| p.port != sandpit_agent_proto::AGENT_PORT)
            .filter(|p| p.address != "127.0.0.1" && p.address != "::1")
            .map(|p| {
                (
                    p.port,
                    format!(
                        "{}-{}.{}",
                        self.session.sandbox, p.port, self.server.cfg.preview_domain
                    ),
                )
            })
            .collect();
        out.dedup_by_key(|(p, _)| *p);
        Ok(out)
    }

    /// Send what a followed shell wrote since last time, and its exit once.
    async fn pump_shell(&self, agent: &AgentClient, id: &str) -> Result<(), RpcError> {
        // A shell whose exit was sent costs nothing more.
        if self
            .follow
            .lock()
            .await
            .shells
            .get(id)
            .is_none_or(|f| f.exited)
        {
            return Ok(());
        }
        let Some((len, exited)) = shells::progress(agent, id).await? else {
            self.follow.lock().await.shells.remove(id);
            return Ok(());
        };
        let sent = match self.follow.lock().await.shells.get(id) {
            Some(f) if f.exited => return Ok(()),
            Some(f) => f.sent,
            None => return Ok(()),
        };
        if len > sent {
            let bytes = shells::output_from(agent, id, sent).await?;
            let text = {
                let mut f = self.follow.lock().await;
                let Some(entry) = f.shells.get_mut(id) else {
                    return Ok(());
                };
                entry.sent = sent + bytes.len() as u64;
                shells::utf8_chunk(&mut entry.carry, &bytes)
            };
            if !text.is_empty() {
                self.notify(
                    "shell/out",
                    map(vec![
                        ("shellId", Value::from(id)),
                        ("out", Value::from(text)),
                    ]),
                )
                .await;
            }
        }
        if exited {
            // Output written before the exit file appeared is in `out` already; send the rest
            // first.
            let (len, _) = shells::progress(agent, id).await?.unwrap_or((0, true));
            let sent = self
                .follow
                .lock()
                .await
                .shells
                .get(id)
                .map(|f| f.sent)
                .unwrap_or(len);
            if len > sent {
                return Ok(()); // the next round sends it, then the exit
            }
            let code = shells::exit_code(agent, id).await?.unwrap_or(1);
            let shell_type = shells::state(agent, id)
                .await?
                .map(|s| s.meta.shell_type)
                .unwrap_or_else(|| "TERMINAL".into());
            if let Some(f) = self.follow.lock().await.shells.get_mut(id) {
                f.exited = true;
            }
            self.notify(
                "shell/exit",
                map(vec![
                    ("shellId", Value::from(id)),
                    ("shellType", Value::from(shell_type.as_str())),
                    ("exitCode", Value::from(code)),
                ]),
            )
            .await;
        }
        Ok(())
    }

    /// Send `setup/progress` when a setup step finished, until setup is done.
    async fn pump_setup(&self, agent: &AgentClient) {
        if self.follow.lock().await.setup_done {
            return;
        }
        let progress = match tasks::progress(agent).await {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = ?e, "reading setup progress");
                return;
            }
        };
        let Some(p) = progress else {
            self.follow.lock().await.setup_done = true;
            return;
        };
        let codes: Vec<Option<i32>> = p.steps.iter().map(|s| s.2).collect();
        let changed = {
            let mut f = self.follow.lock().await;
            let changed = f.setup_seen.as_ref() != Some(&codes);
            f.setup_seen = Some(codes);
            f.setup_done = p.finished;
            changed
        };
        if changed {
            self.notify("setup/progress", setup_value(Some(&p))).await;
        }
    }

    /// List every watched tree and send what changed.
    async fn pump_watches(&self, agent: &AgentClient) {
        let watches: Vec<(String, watch::Watch)> = self
            .follow
            .lock()
            .await
            .watches
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (id, w) in watches {
            let now = match watch::snapshot(agent, &w.path, w.recursive, &w.excludes).await {
                Ok(n) => n,
                Err(AgentFailure::Refused(_)) => Default::default(), // the root went away
                Err(e) => {
                    tracing::debug!(error = ?e, "listing a watched tree");
                    continue;
                }
            };
            let events = watch::diff(&w.seen, &now);
            if let Some(entry) = self.follow.lock().await.watches.get_mut(&id) {
                entry.seen = now;
            } else {
                continue; // unwatched meanwhile
            }
            if events.is_empty() {
                continue;
            }
            let list = events
                .into_iter()
                .map(|e| {
                    map(vec![
                        (
                            "paths",
                            Value::Array(e.paths.into_iter().map(Value::from).collect()),
                        ),
                        ("type", Value::from(e.kind)),
                    ])
                })
                .collect();
            self.notify(
                "fs/watchEvent",
                map(vec![
                    ("watchId", Value::from(id.as_str())),
                    ("events", Value::Array(list)),
                ]),
            )
            .await;
        }
    }

    async fn follow_shell(&self, id: &str, from: u64, exited: bool) {
        self.follow.lock().await.shells.insert(
            id.to_string(),
            Followed {
                sent: from,
                carry: Vec::new(),
                exited,
            },
        );
    }

    /// A task as the SDK shows it, with its shell if it ran.
    async fn task_value(
        &self,
        agent: &AgentClient,
        id: &str,
        def: &tasks::TaskDef,
    ) -> Result<Value, RpcError> {
        let sid = tasks::shell_id(id);
        let shell = match shells::state(agent, &sid).await? {
            Some(s) => {
                let code = if s.exited {
                    shells::exit_code(agent, &sid).await?
                } else {
                    None
                };
                shell_dto(&s.meta, status_of(s.exited, code), code, None)
            }
            None => Value::Nil,
        };
        let mut pairs = vec![
            ("id", Value::from(id)),
            (
                "name",
                Value::from(def.name.clone().unwrap_or_else(|| id.to_string())),
            ),
            ("command", Value::from(def.command.as_str())),
            ("runAtStart", Value::from(def.run_at_start)),
            ("shell", shell),
            ("ports", Value::Array(vec![])),
        ];
        if let Some(port) = def
            .preview
            .as_ref()
            .and_then(|p| p.get("port"))
            .and_then(|p| p.as_u64())
        {
            pairs.push(("preview", map(vec![("port", Value::from(port))])));
        }
        Ok(map(pairs))
    }

    async fn task(&self, method: &str, p: &Value) -> RpcResult {
        let (agent, _g) = self.live_agent().await?;
        let (config, errors) = tasks::load(&agent).await?;
        let find = |p: &Value| -> Result<(String, tasks::TaskDef), RpcError> {
            let id = need_str(p, "taskId")?;
            let def =
                config.tasks.get(&id).cloned().ok_or_else(|| {
                    RpcError::new(code::TASK_NOT_FOUND, format!("no task {id:?}"))
                })?;
            Ok((id, def))
        };
        match method {
            "task/list" => {
                let mut list = Vec::new();
                for (id, def) in &config.tasks {
                    list.push((
                        Value::from(id.as_str()),
                        self.task_value(&agent, id, def).await?,
                    ));
                }
                let setup = config
                    .setup_tasks
                    .iter()
                    .map(|s| {
                        map(vec![
                            ("name", Value::from(s.name())),
                            ("command", Value::from(s.command())),
                        ])
                    })
                    .collect();
                Ok(map(vec![
                    ("tasks", Value::Map(list)),
                    ("setupTasks", Value::Array(setup)),
                    (
                        "validationErrors",
                        Value::Array(errors.into_iter().map(Value::from).collect()),
                    ),
                ]))
            }
            "task/run" => {
                self.need_write()?;
                let (id, def) = find(p)?;
                if !tasks::start_task(&agent, &id, &def).await? {
                    return Err(RpcError::new(
                        code::CRITICAL_ERROR,
                        "the task could not be started",
                    ));
                }
                let sid = tasks::shell_id(&id);
                self.follow_shell(&sid, 0, false).await;
                let v = self.task_value(&agent, &id, &def).await?;
                self.notify("task/update", v.clone()).await;
                Ok(v)
            }
            "task/stop" => {
                self.need_write()?;
                let (id, def) = find(p)?;
                shells::terminate(&agent, &tasks::shell_id(&id)).await?;
                let v = self.task_value(&agent, &id, &def).await?;
                self.notify("task/update", v.clone()).await;
                Ok(v)
            }
            other => Err(unsupported(other)),
        }
    }

    async fn shell(&self, method: &str, p: &Value, gate: &Gate) -> RpcResult {
        let (agent, _g) = self.live_agent().await?;
        match method {
            "shell/create" => {
                self.need_write()?;
                let command = get_str(p, "command").unwrap_or_else(|| "bash".into());
                let cwd = get_str(p, "cwd").unwrap_or_else(|| WORKSPACE_PATH.into());
                let cwd = resolve(&cwd)?;
                let shell_type = match get_str(p, "type").as_deref() {
                    Some("COMMAND") => "COMMAND",
                    _ => "TERMINAL",
                };
                // A session's shells run as its user, with its home and environment.
                // Without one, as the template's `USER` (its user part: `su` takes a name).
                let user = match &self.session.username {
                    Some(u) => Some(u.clone()),
                    None => self
                        .default_user()
                        .await?
                        .map(|u| u.split(':').next().unwrap_or_default().to_string()),
                };
                let run = match &user {
                    Some(u) => format!(
                        "exec su -s /bin/sh {} -c {}",
                        sh_quote(u),
                        sh_quote(&command)
                    ),
                    None => command.clone(),
                };
                let meta = ShellMeta {
                    id: crate::util::random_hex(8),
                    name: command.clone(),
                    shell_type: shell_type.into(),
                    command: run,
                    owner: self.user().into(),
                    is_system: get_bool(p, "isSystemShell").unwrap_or(false),
                    pty: shell_type == "TERMINAL",
                };
                if meta.pty {
                    let size = size_param(p)?.unwrap_or(TerminalSize { cols: 80, rows: 24 });
                    let started = shells::start_terminal(&agent, &meta, &cwd, size).await;
                    if !matches!(started, Ok(true)) {
                        let _ = shells::terminate(&agent, &meta.id).await;
                        started.map_err(shell_failure)?;
                        return Err(RpcError::new(
                            code::CRITICAL_ERROR,
                            "the terminal could not be started",
                        ));
                    }
                    // Followed from the start (commands run on terminals too, and wait for
                    // their output and exit); nothing is sent before this reply.
                    self.attach_terminal(&agent, &meta.id, gate).await?;
                    return Ok(shell_dto(&meta, "RUNNING", None, Some(Vec::new())));
                }
                if !shells::start(&agent, &meta, &cwd).await? {
                    let _ = shells::terminate(&agent, &meta.id).await;
                    return Err(RpcError::new(
                        code::CRITICAL_ERROR,
                        "the shell could not be started",
                    ));
                }
                self.follow_shell(&meta.id, 0, false).await;
                Ok(shell_dto(&meta, "RUNNING", None, Some(Vec::new())))
            }
            "shell/open" => {
                let id = need_str(p, "shellId")?;
                let s = shells::state(&agent, &id)
                    .await?
                    .ok_or_else(|| RpcError::new(code::SHELL_NOT_FOUND, "no such shell"))?;
                if s.meta.pty {
                    if let Some(size) = size_param(p)? {
                        agent
                            .terminal_resize(&id, size)
                            .await
                            .map_err(shell_failure)?;
                    }
                    let code = if s.exited {
                        shells::exit_code(&agent, &id).await?
                    } else {
                        None
                    };
                    // Its scrollback follows as `shell/out` (the attachment replays it).
                    self.attach_terminal(&agent, &id, gate).await?;
                    return Ok(shell_dto(
                        &s.meta,
                        status_of(s.exited, code),
                        code,
                        Some(Vec::new()),
                    ));
                }
                // The end of its output (a shell may have written gigabytes); the poller
                // follows from there.
                let start = s.out_len.saturating_sub(shells::MAX_OUTPUT_READ);
                let all = shells::output_from(&agent, &id, start).await?;
                let code = if s.exited {
                    shells::exit_code(&agent, &id).await?
                } else {
                    None
                };
                self.follow_shell(&id, start + all.len() as u64, s.exited)
                    .await;
                let text = String::from_utf8_lossy(&all).into_owned();
                Ok(shell_dto(
                    &s.meta,
                    status_of(s.exited, code),
                    code,
                    Some(vec![text]),
                ))
            }
            "shell/list" => {
                let mut out = Vec::new();
                for s in shells::list(&agent).await? {
                    let code = if s.exited {
                        shells::exit_code(&agent, &s.meta.id).await?
                    } else {
                        None
                    };
                    out.push(shell_dto(&s.meta, status_of(s.exited, code), code, None));
                }
                Ok(map(vec![("shells", Value::Array(out))]))
            }
            "shell/in" => {
                self.need_write()?;
                let id = need_str(p, "shellId")?;
                let input = need_str(p, "input")?;
                let size = size_param(p)?;
                if self
                    .to_terminal(&id, Some(input.as_bytes().to_vec()), size)
                    .await
                {
                    return Ok(Value::Nil);
                }
                if let Some(s) = shells::state(&agent, &id).await?
                    && s.meta.pty
                {
                    if s.exited {
                        return Err(RpcError::new(
                            code::SHELL_NOT_FOUND,
                            "no such running shell",
                        ));
                    }
                    self.attach_terminal(&agent, &id, gate).await?;
                    if !self.to_terminal(&id, Some(input.into_bytes()), size).await {
                        return Err(RpcError::new(
                            code::SHELL_NOT_FOUND,
                            "no such running shell",
                        ));
                    }
                    return Ok(Value::Nil);
                }
                if !shells::input(&agent, &id, input.into_bytes()).await? {
                    return Err(RpcError::new(
                        code::SHELL_NOT_FOUND,
                        "no such running shell",
                    ));
                }
                Ok(Value::Nil)
            }
            "shell/terminate" => {
                self.need_write()?;
                let id = need_str(p, "shellId")?;
                let s = shells::state(&agent, &id)
                    .await?
                    .ok_or_else(|| RpcError::new(code::SHELL_NOT_FOUND, "no such shell"))?;
                self.detach_terminal(&id).await;
                shells::terminate(&agent, &id).await?;
                self.follow.lock().await.shells.remove(&id);
                self.notify(
                    "shell/terminate",
                    map(vec![
                        ("shellId", Value::from(id.as_str())),
                        ("author", Value::from(self.session.client_id.as_str())),
                    ]),
                )
                .await;
                Ok(shell_dto(&s.meta, "KILLED", None, None))
            }
            "shell/rename" => {
                self.need_write()?;
                let id = need_str(p, "shellId")?;
                let name = need_str(p, "name")?;
                if !shells::rename(&agent, &id, &name).await? {
                    return Err(RpcError::new(code::SHELL_NOT_FOUND, "no such shell"));
                }
                Ok(Value::Nil)
            }
            "shell/restart" => {
                self.need_write()?;
                let id = need_str(p, "shellId")?;
                let s = shells::state(&agent, &id)
                    .await?
                    .ok_or_else(|| RpcError::new(code::SHELL_NOT_FOUND, "no such shell"))?;
                self.detach_terminal(&id).await;
                shells::terminate(&agent, &id).await?;
                let started = if s.meta.pty {
                    let size = TerminalSize { cols: 80, rows: 24 };
                    shells::start_terminal(&agent, &s.meta, WORKSPACE_PATH, size).await?
                } else {
                    shells::start(&agent, &s.meta, WORKSPACE_PATH).await?
                };
                if !started {
                    return Err(RpcError::new(
                        code::CRITICAL_ERROR,
                        "the shell could not be restarted",
                    ));
                }
                if s.meta.pty {
                    self.attach_terminal(&agent, &id, gate).await?;
                } else {
                    self.follow_shell(&id, 0, false).await;
                }
                self.notify(
                    "shell/restart",
                    map(vec![("shellId", Value::from(id.as_str()))]),
                )
                .await;
                Ok(Value::Nil)
            }
            "shell/resize" => {
                let id = need_str(p, "shellId")?;
                let Some(size) = size_param(p)? else {
                    return Err(RpcError::new(code::CRITICAL_ERROR, "size is required"));
                };
                if self.to_terminal(&id, None, Some(size)).await {
                    return Ok(Value::Nil);
                }
                // Not attached here: a terminal shell is resized directly; a pipe shell has
                // no size.
                match shells::state(&agent, &id).await? {
                    Some(s) if s.meta.pty => {
                        agent
                            .terminal_resize(&id, size)
                            .await
                            .map_err(shell_failure)?;
                        Ok(Value::Nil)
                    }
                    Some(_) => Ok(Value::Nil),
                    None => Err(RpcError::new(code::SHELL_NOT_FOUND, "no such shell")),
                }
            }
            "shell/close" => {
                let id = need_str(p, "shellId")?;
                let mut f = self.follow.lock().await;
                f.shells.remove(&id);
                f.terminals.remove(&id);
                Ok(Value::Nil)
            }
            other => Err(unsupported(other)),
        }
    }

    async fn fs(&self, method: &str, p: &Value, gate: &Gate) -> RpcResult {
        let (agent, _g) = self.live_agent().await?;
        match method {
            "fs/readFile" => {
                let path = resolve(&need_str(p, "path")?)?;
                // Into the server's memory: bounded, and only a regular file (a device or a
                // FIFO never ends).
                let (info, content) = agent
                    .read_bounded(&path, 0, MAX_READ_FILE_BYTES + 1)
                    .await?;
                if info.size > MAX_READ_FILE_BYTES || content.len() as u64 > MAX_READ_FILE_BYTES {
                    return Err(rawfs(
                        27,
                        format!(
                            "{path} is larger than {MAX_READ_FILE_BYTES} bytes; download it instead"
                        ),
                    ));
                }
                Ok(map(vec![("content", Value::Binary(content))]))
            }
            "fs/writeFile" => {
                self.need_write()?;
                let path = resolve(&need_str(p, "path")?)?;
                let content = match get(p, "content") {
                    Some(Value::Binary(b)) => b.clone(),
                    Some(Value::String(s)) => s.as_bytes().to_vec(),
                    _ => return Err(RpcError::new(code::CRITICAL_ERROR, "content is required")),
                };
                let create = get_bool(p, "create").unwrap_or(true);
                let overwrite = get_bool(p, "overwrite").unwrap_or(true);
                let exists = match agent.stat(&path).await {
                    Ok(_) => true,
                    Err(AgentFailure::Refused(e)) if e.code == AgentErrorCode::NotFound => false,
                    Err(e) => return Err(e.into()),
                };
                if exists && !overwrite {
                    return Err(rawfs(17, format!("{path} exists")));
                }
                if !exists && !create {
                    return Err(rawfs(2, format!("{path} does not exist")));
                }
                let body =
                    futures::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(content))]);
                let owner = self.default_user().await?;
                agent
                    .write_file(&path, owner.as_deref(), body, self.server.cfg.upload_limit)
                    .await?;
                Ok(map(vec![]))
            }
            "fs/readdir" => {
                let path = resolve(&need_str(p, "path")?)?;
                let listing = agent.list_dir(&path).await?;
                let entries = listing
                    .entries
                    .iter()
                    .map(|e| {
                        map(vec![
                            ("name", Value::from(e.name.as_str())),
                            ("type", Value::from(kind_number(e.info.kind))),
                            ("isSymlink", Value::from(e.info.kind == EntryKind::Symlink)),
                        ])
                    })
                    .collect();
                Ok(map(vec![("entries", Value::Array(entries))]))
            }
            "fs/stat" => {
                let path = resolve(&need_str(p, "path")?)?;
                let info = agent.stat(&path).await?;
                let ms = info.mtime * 1000;
                Ok(map(vec![
                    ("type", Value::from(kind_number(info.kind))),
                    ("isSymlink", Value::from(info.kind == EntryKind::Symlink)),
                    ("size", Value::from(info.size)),
                    ("mtime", Value::from(ms)),
                    ("ctime", Value::from(ms)),
                    ("atime", Value::from(ms)),
                ]))
            }
            "fs/mkdir" => {
                self.need_write()?;
                let path = resolve(&need_str(p, "path")?)?;
                let owner = self.default_user().await?;
                agent
                    .make_dir(
                        &path,
                        get_bool(p, "recursive").unwrap_or(false),
                        owner.as_deref(),
                    )
                    .await?;
                Ok(map(vec![]))
            }
            "fs/remove" => {
                self.need_write()?;
                let path = resolve(&need_str(p, "path")?)?;
                agent
                    .remove(&path, get_bool(p, "recursive").unwrap_or(false))
                    .await?;
                Ok(map(vec![]))
            }
            "fs/download" => {
                let path = resolve(&get_str(p, "path").unwrap_or_else(|| WORKSPACE_PATH.into()))?;
                agent.stat(&path).await?;
                let link = super::download::mint(&self.server, &self.session.sandbox, &path)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %crate::error::DisplayChain(&e), "minting a download link");
                        RpcError::new(code::CRITICAL_ERROR, "could not make a download link")
                    })?;
                Ok(map(vec![(
                    "downloadUrl",
                    Value::from(format!("{}{link}", self.session.http_base)),
                )]))
            }
            "fs/watch" => {
                let path = resolve(&need_str(p, "path")?)?;
                let recursive = get_bool(p, "recursive").unwrap_or(false);
                let excludes: Vec<String> = get(p, "excludes")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                let req = sandpit_agent_proto::WatchRequest {
                    path: path.clone(),
                    recursive,
                    excludes: excludes.clone(),
                }
                .validate()
                .map_err(|e| rawfs(22, e.message))?;
                let id = crate::util::random_hex(8);
                // Registered under the read lock this call holds, like a terminal attachment.
                let live = self.server.previews.register(&self.session.sandbox);
                match agent.watch(req).await {
                    Ok(w) => {
                        let relay = tokio::spawn(relay_watch(
                            self.out.clone(),
                            id.clone(),
                            path,
                            live,
                            w,
                            gate.wait(),
                        ));
                        self.follow
                            .lock()
                            .await
                            .inotify_watches
                            .insert(id.clone(), WatchRelay(relay));
                    }
                    // An agent older than inotify watches (a sandbox restored from an old
                    // snapshot): follow the tree by polling, which misses changes that keep
                    // a file's size and modification second.
                    Err(AgentFailure::Refused(e))
                        if e.code == AgentErrorCode::UnsupportedVersion =>
                    {
                        drop(live);
                        let seen = watch::snapshot(&agent, &path, recursive, &excludes).await?;
                        self.follow.lock().await.watches.insert(
                            id.clone(),
                            watch::Watch {
                                path,
                                recursive,
                                excludes,
                                seen,
                            },
                        );
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok(map(vec![("watchId", Value::from(id))]))
            }
            "fs/unwatch" => {
                let id = need_str(p, "watchId")?;
                let mut follow = self.follow.lock().await;
                follow.watches.remove(&id);
                follow.inotify_watches.remove(&id);
                Ok(map(vec![]))
            }
            "fs/rename" | "fs/copy" => {
                self.need_write()?;
                let from = resolve(&need_str(p, "from")?)?;
                let to = resolve(&need_str(p, "to")?)?;
                let overwrite = get_bool(p, "overwrite").unwrap_or(false);
                agent.stat(&from).await?;
                match agent.stat(&to).await {
                    Ok(_) if !overwrite => return Err(rawfs(17, format!("{to} exists"))),
                    Ok(_) | Err(AgentFailure::Refused(_)) => {}
                    Err(e) => return Err(e.into()),
                }
                let argv: Vec<String> = if method == "fs/rename" {
                    vec!["mv".into(), "-f".into(), "--".into(), from, to]
                } else if get_bool(p, "recursive").unwrap_or(false) {
                    vec!["cp".into(), "-Rf".into(), "--".into(), from, to]
                } else {
                    vec!["cp".into(), "-f".into(), "--".into(), from, to]
                };
                let (status, err) = agent
                    .run_for_stderr(argv, std::time::Duration::from_secs(60))
                    .await?;
                if status.exit_code != 0 {
                    return Err(rawfs(5, String::from_utf8_lossy(&err).trim().to_string()));
                }
                Ok(map(vec![]))
            }
            other => Err(unsupported(other)),
        }
    }
}

/// The answer to a method the gateway does not implement.
fn unsupported(method: &str) -> RpcError {
    RpcError::new(
        code::FEATURE_UNAVAILABLE,
        format!("{method} is not supported by Sandpit's agent gateway"),
    )
}

/// `text` as one single-quoted shell word.
fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// Setup progress as the SDK reads it. Without setup steps: one finished step, because the
/// SDK waits for a progress notification when the step list is empty.
fn setup_value(p: Option<&tasks::Progress>) -> Value {
    let Some(p) = p else {
        return map(vec![
            ("state", Value::from("FINISHED")),
            (
                "steps",
                Value::Array(vec![map(vec![
                    ("name", Value::from("Sandpit")),
                    ("command", Value::from("true")),
                    ("shellId", Value::Nil),
                    ("finishStatus", Value::from("SUCCEEDED")),
                ])]),
            ),
            ("currentStepIndex", Value::from(0)),
        ]);
    };
    let done = p.steps.iter().filter(|s| s.2.is_some()).count();
    let steps = p
        .steps
        .iter()
        .map(|(name, command, code)| {
            map(vec![
                ("name", Value::from(name.as_str())),
                ("command", Value::from(command.as_str())),
                ("shellId", Value::from(tasks::SETUP_SHELL)),
                (
                    "finishStatus",
                    match code {
                        None => Value::Nil,
                        Some(0) => Value::from("SUCCEEDED"),
                        Some(_) => Value::from("FAILED"),
                    },
                ),
            ])
        })
        .collect();
    map(vec![
        (
            "state",
            Value::from(if p.finished {
                "FINISHED"
            } else {
                "IN_PROGRESS"
            }),
        ),
        ("steps", Value::Array(steps)),
        (
            "currentStepIndex",
            Value::from(done.min(p.steps.len().saturating_sub(1))),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_in_the_workspace() {
        assert_eq!(resolve("a/b.txt").unwrap(), "/project/sandbox/a/b.txt");
        assert_eq!(resolve("/etc/x").unwrap(), "/etc/x");
        assert!(
            resolve("/a/../../etc").is_ok_and(|p| !p.contains(".."))
                || resolve("/a/../../etc").is_err()
        );
    }

    #[test]
    fn shell_words_are_quoted() {
        assert_eq!(sh_quote("echo 'a' b"), "'echo '\\''a'\\'' b'");
    }

    #[test]
    fn messages_round_trip_through_msgpack() {
        let v = map(vec![
            ("id", Value::from(3)),
            ("method", Value::from("fs/readFile")),
            ("params", map(vec![("path", Value::from("x"))])),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &v).unwrap();
        let back = rmpv::decode::read_value(&mut &buf[..]).unwrap();
        assert_eq!(get_str(&back, "method").as_deref(), Some("fs/readFile"));
        assert_eq!(
            get_str(get(&back, "params").unwrap(), "path").as_deref(),
            Some("x")
        );
    }
}
