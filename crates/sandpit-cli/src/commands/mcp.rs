//! `sandpit mcp`: MCP over stdio (newline-delimited JSON-RPC), for agents that launch their
//! tools as local processes. It holds no tools of its own: each message read from stdin is
//! POSTed to the server's `/mcp` endpoint with the user's token, and each answer written to
//! stdout as one line. Nothing else goes to stdout; diagnostics go to stderr.
//!
//! Messages are handled concurrently (a long `run_command` does not hold up a `ping`), at
//! most [`MAX_IN_FLIGHT`] at once; answers are written whole, one per line, in the order
//! they come back. A line longer than [`MAX_LINE`] is refused without being buffered.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc};

use super::sandbox::Conn;

/// Longest message line read from stdin (a `write_file` carries the file in it; the server
/// takes at most 8 MiB).
pub const MAX_LINE: usize = 9 << 20;
/// Largest answer read from the server.
pub const MAX_ANSWER: usize = 64 << 20;
/// Messages forwarded at once.
pub const MAX_IN_FLIGHT: usize = 16;

#[derive(clap::Args)]
pub struct McpArgs {
    #[command(flatten)]
    conn: Conn,
}

pub async fn run(args: McpArgs) -> anyhow::Result<u8> {
    let endpoint = format!("{}/mcp", args.conn.url().trim_end_matches('/'));
    let token = args.conn.token()?.to_string();
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("HTTP client")?;
    let bridge = Arc::new(Bridge {
        http,
        endpoint,
        token,
    });
    eprintln!("sandpit mcp: forwarding stdio to {}", bridge.endpoint);

    let (tx, mut rx) = mpsc::channel::<String>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = rx.recv().await {
            stdout.write_all(line.as_bytes()).await?;
            stdout.write_all(b"\n").await?;
            stdout.flush().await?;
        }
        anyhow::Ok(())
    });

    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin());
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let line = match read_line(&mut stdin, MAX_LINE)
            .await
            .context("read stdin")?
        {
            Line::Eof => break,
            Line::TooLong => {
                let err = error(
                    Value::Null,
                    -32600,
                    format!("a message line exceeds {MAX_LINE} bytes"),
                );
                if tx.send(err.to_string()).await.is_err() {
                    break;
                }
                continue;
            }
            Line::Text(l) => l,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let permit = slots.clone().acquire_owned().await.context("semaphore")?;
        let (bridge, tx) = (bridge.clone(), tx.clone());
        tasks.spawn(async move {
            if let Some(answer) = bridge.forward(line).await {
                let _ = tx.send(answer).await;
            }
            drop(permit);
        });
        // Reap finished tasks so the set does not grow with the session.
        while tasks.try_join_next().is_some() {}
    }
    // stdin closed: finish what is in flight, then stop.
    while tasks.join_next().await.is_some() {}
    drop(tx);
    writer.await.context("stdout writer")??;
    Ok(0)
}

struct Bridge {
    http: reqwest::Client,
    endpoint: String,
    token: String,
}

impl Bridge {
    /// POST one message; the line to write back, if any (none for a notification).
    async fn forward(&self, line: Vec<u8>) -> Option<String> {
        // The request's id, to answer it even when the server cannot.
        let id = serde_json::from_slice::<Value>(&line)
            .ok()
            .and_then(|v| v.get("method").and(v.get("id")).cloned());
        let resp = self
            .http
            .post(&self.endpoint)
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                reqwest::header::ACCEPT,
                "application/json, text/event-stream",
            )
            .body(line)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                eprintln!("sandpit mcp: {}: {e}", self.endpoint);
                return id.map(|id| {
                    error(
                        id,
                        -32603,
                        format!("the Sandpit server is out of reach: {e}"),
                    )
                    .to_string()
                });
            }
        };
        let status = resp.status();
        let body = match read_bounded(resp, MAX_ANSWER).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("sandpit mcp: reading the answer: {e:#}");
                return id.map(|id| error(id, -32603, format!("{e:#}")).to_string());
            }
        };
        if body.is_empty() {
            // 202 for a notification or a response; anything else has nothing to pass on.
            if !status.is_success() {
                eprintln!("sandpit mcp: the server answered HTTP {status}");
                return id.map(|id| {
                    error(id, -32603, format!("the server answered HTTP {status}")).to_string()
                });
            }
            return None;
        }
        match serde_json::from_slice::<Value>(&body) {
            Ok(mut answer) => {
                // An error the server gave before reading the request (a bad token, say)
                // has no id: give it the request's, so the client can match it.
                if let (Some(id), Some(obj)) = (&id, answer.as_object_mut())
                    && obj.get("id").is_some_and(Value::is_null)
                    && obj.contains_key("error")
                {
                    obj.insert("id".into(), id.clone());
                }
                if !status.is_success() {
                    eprintln!("sandpit mcp: the server answered HTTP {status}: {answer}");
                }
                Some(answer.to_string())
            }
            Err(_) => {
                eprintln!("sandpit mcp: the server answered HTTP {status} with a non-JSON body");
                id.map(|id| {
                    error(id, -32603, format!("the server answered HTTP {status}")).to_string()
                })
            }
        }
    }
}

fn error(id: Value, code: i64, message: String) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

async fn read_bounded(mut resp: reqwest::Response, limit: usize) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    while let Some(chunk) = resp.chunk().await.context("the answer broke off")? {
        anyhow::ensure!(
            buf.len() + chunk.len() <= limit,
            "the answer exceeds {limit} bytes"
        );
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

/// The next line without its newline, never buffering more than `max` bytes of it (a
/// longer one is read through and dropped).
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if too_long {
                Line::TooLong
            } else if buf.is_empty() {
                Line::Eof
            } else {
                Line::Text(buf)
            });
        }
        let (part, found) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], Some(i)),
            None => (chunk, None),
        };
        if !too_long {
            if buf.len() + part.len() > max {
                too_long = true;
                buf = Vec::new();
            } else {
                buf.extend_from_slice(part);
            }
        }
        let used = found.map_or(chunk.len(), |i| i + 1);
        r.consume(used);
        if found.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Text(buf)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_bounded() {
        let input = b"{\"a\":1}\r\nxxxxxxxxxxxx\nlast".to_vec();
        let mut r = tokio::io::BufReader::with_capacity(4, &input[..]);
        let mut seen = Vec::new();
        loop {
            match read_line(&mut r, 8).await.expect("reads") {
                Line::Eof => break,
                Line::TooLong => seen.push("<too long>".to_string()),
                Line::Text(t) => seen.push(String::from_utf8(t).expect("utf8")),
            }
        }
        assert_eq!(seen, ["{\"a\":1}\r", "<too long>", "last"]);
    }
}
