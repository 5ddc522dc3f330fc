//! Typed host-side helpers for the terminal operations (version 3), over any stream (a
//! `TcpStream` to the agent, or a half of one).
//!
//! Each helper sends one request on a fresh connection the caller opened, as the protocol
//! wants one operation per connection; closing it (with a reset, see the crate docs) stays the
//! caller's job. An `Error` frame becomes [`ProtoError::Refused`].
//!
//! An attachment: [`terminal_attach`] sends the request and reads the `Started` frame; then
//! the caller (typically after `into_split`) reads [`TerminalEvent`]s with
//! [`read_terminal_event`] and writes with [`send_input`], [`send_resize`] and
//! [`send_signal`], until [`TerminalEvent::Exit`] or until it closes the connection, which
//! detaches and leaves the terminal running.

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::{
    ExitStatus, Frame, FrameKind, Op, ProtoError, Request, SignalRequest, TerminalCreate,
    TerminalInfo, TerminalList, TerminalSize, WatchBatch, WatchEvent, WatchRequest, read_frame,
    write_frame, write_json,
};

/// What an attachment receives after its `Started` frame.
#[derive(Debug, Clone, PartialEq)]
pub enum TerminalEvent {
    /// Output bytes (replayed scrollback first, then live): the pty's, or stdout on pipes.
    Output(Vec<u8>),
    /// Stderr bytes of a terminal on pipes (version 6), replayed first like `Output`.
    Stderr(Vec<u8>),
    /// The process exited; the attachment is over.
    Exit(ExitStatus),
}

/// Send `op` as the request frame.
pub async fn send_request<W: AsyncWrite + Unpin>(w: &mut W, op: Op) -> Result<(), ProtoError> {
    write_json(w, FrameKind::Request, &Request::new(op)).await
}

/// Send `op` and read its single `Ok` answer.
pub async fn call<S, T>(s: &mut S, op: Op) -> Result<T, ProtoError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: for<'de> Deserialize<'de>,
{
    send_request(s, op).await?;
    let frame = read_frame(s).await?;
    expect(&frame, FrameKind::Ok)
}

/// Start a terminal.
pub async fn terminal_create<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    req: TerminalCreate,
) -> Result<TerminalInfo, ProtoError> {
    call(s, Op::TerminalCreate(req)).await
}

/// The agent's terminals, sorted by id.
pub async fn terminal_list<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<Vec<TerminalInfo>, ProtoError> {
    let list: TerminalList = call(s, Op::TerminalList).await?;
    Ok(list.terminals)
}

/// Signal a terminal's process group, or (`signal` absent) kill and remove it.
pub async fn terminal_kill<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    id: &str,
    signal: Option<i32>,
) -> Result<(), ProtoError> {
    let op = Op::TerminalKill {
        id: id.to_string(),
        signal,
    };
    call::<_, serde_json::Value>(s, op).await.map(drop)
}

/// Resize a terminal without being attached.
pub async fn terminal_resize<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    id: &str,
    size: TerminalSize,
) -> Result<(), ProtoError> {
    let op = Op::TerminalResize {
        id: id.to_string(),
        cols: size.cols,
        rows: size.rows,
    };
    call::<_, serde_json::Value>(s, op).await.map(drop)
}

/// Attach to a terminal: send the request, read the `Started` frame. Output follows (see
/// [`read_terminal_event`]).
pub async fn terminal_attach<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    id: &str,
    replay: bool,
) -> Result<TerminalInfo, ProtoError> {
    let op = Op::TerminalAttach {
        id: id.to_string(),
        replay,
    };
    send_request(s, op).await?;
    let frame = read_frame(s).await?;
    expect(&frame, FrameKind::Started)
}

/// The next event of an attachment.
pub async fn read_terminal_event<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<TerminalEvent, ProtoError> {
    let frame = read_frame(r).await?;
    match frame.kind {
        FrameKind::Stdout => Ok(TerminalEvent::Output(frame.payload)),
        FrameKind::Stderr => Ok(TerminalEvent::Stderr(frame.payload)),
        FrameKind::Exit => Ok(TerminalEvent::Exit(frame.parse()?)),
        _ => Err(refusal_or_unexpected(&frame)),
    }
}

/// Type into an attached terminal. Splits `bytes` into frames of at most
/// [`crate::MAX_FRAME_LEN`].
pub async fn send_input<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> Result<(), ProtoError> {
    for chunk in bytes.chunks(crate::MAX_FRAME_LEN) {
        write_frame(w, FrameKind::Stdin, chunk).await?;
    }
    Ok(())
}

/// Resize an attached terminal.
pub async fn send_resize<W: AsyncWrite + Unpin>(
    w: &mut W,
    size: TerminalSize,
) -> Result<(), ProtoError> {
    write_json(w, FrameKind::Resize, &size).await
}

/// Close the stdin of an attached terminal on pipes (version 6; a pty ignores it).
pub async fn send_stdin_close<W: AsyncWrite + Unpin>(w: &mut W) -> Result<(), ProtoError> {
    write_frame(w, FrameKind::StdinClose, &[]).await
}

/// Signal an attached terminal's process group.
pub async fn send_signal<W: AsyncWrite + Unpin>(w: &mut W, signal: i32) -> Result<(), ProtoError> {
    write_json(w, FrameKind::Signal, &SignalRequest { signal }).await
}

/// Start a watch (version 4): send the request, read the `Started` frame. Batches follow
/// (see [`read_watch_batch`]).
pub async fn watch<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    req: WatchRequest,
) -> Result<(), ProtoError> {
    send_request(s, Op::Watch(req)).await?;
    let frame = read_frame(s).await?;
    expect::<serde_json::Value>(&frame, FrameKind::Started).map(drop)
}

/// The next batch of a watch; `None` once the watched path is gone (`End`).
pub async fn read_watch_batch<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<WatchEvent>>, ProtoError> {
    let frame = read_frame(r).await?;
    match frame.kind {
        FrameKind::Events => Ok(Some(frame.parse::<WatchBatch>()?.events)),
        FrameKind::End => Ok(None),
        _ => Err(refusal_or_unexpected(&frame)),
    }
}

/// Parse `frame` if it is of kind `want`; an `Error` frame is a refusal.
fn expect<T: for<'de> Deserialize<'de>>(frame: &Frame, want: FrameKind) -> Result<T, ProtoError> {
    if frame.kind == want {
        frame.parse()
    } else {
        Err(refusal_or_unexpected(frame))
    }
}

fn refusal_or_unexpected(frame: &Frame) -> ProtoError {
    if frame.kind == FrameKind::Error {
        match frame.parse() {
            Ok(err) => ProtoError::Refused(err),
            Err(e) => e,
        }
    } else {
        ProtoError::UnexpectedFrame(frame.kind as u8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentError, AgentErrorCode};

    #[tokio::test]
    async fn refusals_and_unexpected_frames_are_errors() {
        let err = AgentError {
            code: AgentErrorCode::NotFound,
            message: "no terminal x".into(),
        };
        let mut buf = Vec::new();
        write_json(&mut buf, FrameKind::Error, &err).await.unwrap();
        write_frame(&mut buf, FrameKind::Data, b"x").await.unwrap();
        write_frame(&mut buf, FrameKind::Stdout, b"hi")
            .await
            .unwrap();
        let mut r = &buf[..];
        match read_terminal_event(&mut r).await {
            Err(ProtoError::Refused(e)) => assert_eq!(e, err),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            read_terminal_event(&mut r).await,
            Err(ProtoError::UnexpectedFrame(5))
        ));
        assert_eq!(
            read_terminal_event(&mut r).await.unwrap(),
            TerminalEvent::Output(b"hi".to_vec())
        );
    }
}
