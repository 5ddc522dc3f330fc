//! `/v1/sandboxes/{id}/terminals`: processes on a pseudo-terminal inside a sandbox, kept by
//! its agent, attached over a WebSocket.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Largest terminal width and height (in characters).
pub const MAX_TERMINAL_DIM: u32 = 1000;
/// Width of a terminal whose create names none.
pub const DEFAULT_TERMINAL_COLS: u32 = 80;
/// Height of a terminal whose create names none.
pub const DEFAULT_TERMINAL_ROWS: u32 = 24;

/// `POST /v1/sandboxes/{id}/terminals`. Without `command` and `argv`, the sandbox user's
/// login shell runs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct TerminalCreateRequest {
    /// `[A-Za-z0-9_-]{1,64}`; the sandbox picks one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub id: Option<String>,
    /// A shell command line (`/bin/sh -c`). At most one of `command` and `argv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// A program and its arguments, run without a shell.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub argv: Option<Vec<String>>,
    /// Working directory (default: the template's `WORKDIR`, else the user's home).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Added to the sandbox's environment (`TERM` is `xterm-256color` unless set here).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Width, 1 to 1000 (default 80).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub cols: Option<u32>,
    /// Height, 1 to 1000 (default 24).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 1000)]
    pub rows: Option<u32>,
}

/// `POST /v1/sandboxes/{id}/terminals/{terminal_id}/resize`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TerminalResizeRequest {
    #[schema(minimum = 1, maximum = 1000)]
    pub cols: u32,
    #[schema(minimum = 1, maximum = 1000)]
    pub rows: u32,
}

/// One terminal.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Terminal {
    pub id: String,
    /// Process id inside the sandbox (also its session and process group).
    pub pid: u32,
    /// What runs (cut to its first 4 KiB).
    pub argv: Vec<String>,
    pub cols: u16,
    pub rows: u16,
    /// Set once the process exited: its exit code, `128 + signal` when killed by a signal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// RFC 3339.
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct TerminalList {
    pub terminals: Vec<Terminal>,
}

#[derive(Debug, Clone, Serialize, Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct TerminalAttachQuery {
    /// Send the terminal's scrollback (up to 256 KiB of its latest output) before live
    /// output. Default true.
    pub replay: Option<bool>,
}

/// A text (JSON) message on a terminal's WebSocket. Bytes typed and output travel as binary
/// messages; these carry the rest. From the client: `resize`. From the server: `exit` (then
/// the server closes), `error` (a control message it refused; the attachment goes on).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TerminalMessage {
    Resize { cols: u32, rows: u32 },
    Exit { exit_code: i32 },
    Error { code: String, message: String },
}

/// Check a terminal's size: both dimensions 1 to [`MAX_TERMINAL_DIM`].
pub fn validate_terminal_size(cols: u32, rows: u32) -> Result<(u16, u16), String> {
    let ok = |d: u32| (1..=MAX_TERMINAL_DIM).contains(&d);
    if ok(cols) && ok(rows) {
        Ok((cols as u16, rows as u16))
    } else {
        Err(format!(
            "terminal size {cols}x{rows} is outside 1x1 to {MAX_TERMINAL_DIM}x{MAX_TERMINAL_DIM}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bounded() {
        assert_eq!(validate_terminal_size(80, 24), Ok((80, 24)));
        assert_eq!(validate_terminal_size(1000, 1), Ok((1000, 1)));
        for (c, r) in [(0, 24), (80, 0), (1001, 24), (99999, 99999), (u32::MAX, 1)] {
            assert!(validate_terminal_size(c, r).is_err(), "{c}x{r}");
        }
    }

    #[test]
    fn control_messages_are_tagged() {
        let m: TerminalMessage =
            serde_json::from_str(r#"{"type":"resize","cols":100,"rows":30}"#).unwrap();
        assert_eq!(
            m,
            TerminalMessage::Resize {
                cols: 100,
                rows: 30
            }
        );
        assert_eq!(
            serde_json::to_string(&TerminalMessage::Exit { exit_code: 3 }).unwrap(),
            r#"{"type":"exit","exit_code":3}"#
        );
    }
}
