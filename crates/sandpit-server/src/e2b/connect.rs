//! The Connect protocol (v1, JSON codec) as envd speaks it: unary calls are a JSON body in,
//! a JSON body out; server streams take one 5-byte-framed message and answer with framed
//! messages and an end-of-stream frame (flag 0x02).

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// Flag of the end-of-stream frame.
pub const END_STREAM: u8 = 0x02;
/// Largest request message read (envd requests are small).
pub const MAX_MESSAGE: usize = 1 << 20;
/// The content type of a server stream's request and answer.
pub const STREAM_TYPE: &str = "application/connect+json";

/// A Connect error: a code name (`not_found`, …) and a message.
#[derive(Debug, Clone)]
pub struct ConnectError {
    pub code: &'static str,
    pub message: String,
}

impl ConnectError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        ConnectError {
            code,
            message: message.into(),
        }
    }

    pub fn json(&self) -> Value {
        json!({"code": self.code, "message": self.message})
    }

    /// The HTTP status of a unary answer carrying this error (Connect's mapping).
    pub fn status(&self) -> StatusCode {
        match self.code {
            "invalid_argument" | "failed_precondition" | "out_of_range" => StatusCode::BAD_REQUEST,
            "unauthenticated" => StatusCode::UNAUTHORIZED,
            "permission_denied" => StatusCode::FORBIDDEN,
            "not_found" => StatusCode::NOT_FOUND,
            "already_exists" | "aborted" => StatusCode::CONFLICT,
            "resource_exhausted" => StatusCode::TOO_MANY_REQUESTS,
            "unimplemented" => StatusCode::NOT_IMPLEMENTED,
            "unavailable" => StatusCode::SERVICE_UNAVAILABLE,
            "deadline_exceeded" => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// From an error the rest of the server made.
    pub fn from_api(e: &crate::error::ApiError) -> Self {
        let code = match e.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_argument",
            StatusCode::UNAUTHORIZED => "unauthenticated",
            StatusCode::FORBIDDEN => "permission_denied",
            StatusCode::NOT_FOUND => "not_found",
            StatusCode::CONFLICT if e.code == "already_exists" => "already_exists",
            StatusCode::CONFLICT => "failed_precondition",
            StatusCode::TOO_MANY_REQUESTS | StatusCode::INSUFFICIENT_STORAGE => {
                "resource_exhausted"
            }
            StatusCode::NOT_IMPLEMENTED => "unimplemented",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => "unavailable",
            _ => "internal",
        };
        ConnectError::new(code, e.message.clone())
    }
}

impl From<crate::error::ApiError> for ConnectError {
    fn from(e: crate::error::ApiError) -> Self {
        ConnectError::from_api(&e)
    }
}

impl IntoResponse for ConnectError {
    /// As a unary answer.
    fn into_response(self) -> Response {
        (self.status(), axum::Json(self.json())).into_response()
    }
}

/// A unary answer.
pub fn unary(value: Value) -> Response {
    axum::Json(value).into_response()
}

/// One frame: flags, big-endian length, the JSON message.
pub fn frame(flags: u8, value: &Value) -> Bytes {
    let body = serde_json::to_vec(value).expect("JSON values serialize");
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(flags);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// The end-of-stream frame, with the error if the call failed.
pub fn end_frame(error: Option<&ConnectError>) -> Bytes {
    frame(
        END_STREAM,
        &match error {
            Some(e) => json!({"error": e.json()}),
            None => json!({}),
        },
    )
}

/// What a client asked of a server stream's timing: keep-alive messages every
/// `Keepalive-Ping-Interval` seconds (default 50, 1 s to 1 h) and an end after
/// `Connect-Timeout-Ms` (1 ms to 24 h; none when absent).
pub struct StreamTiming {
    pub keepalive: Duration,
    pub deadline: Option<Duration>,
}

impl StreamTiming {
    pub fn of(headers: &HeaderMap) -> StreamTiming {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        StreamTiming {
            keepalive: Duration::from_secs(
                number("keepalive-ping-interval")
                    .unwrap_or(50)
                    .clamp(1, 3600),
            ),
            deadline: number("connect-timeout-ms")
                .map(|ms| Duration::from_millis(ms.clamp(1, 86_400_000))),
        }
    }
}

/// A server stream's answer: the frames `rx` yields, as they come.
pub fn stream_body(rx: tokio::sync::mpsc::Receiver<Result<Bytes, Infallible>>) -> Response {
    let mut resp = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_TYPE));
    resp
}

/// A stream answer that fails at once (Connect streams answer errors in the end frame,
/// with HTTP 200).
pub fn stream_error(e: &ConnectError) -> Response {
    let mut resp = axum::body::Body::from(end_frame(Some(e))).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(STREAM_TYPE));
    resp
}

/// The one message of a server stream's request: exactly one uncompressed frame of at most
/// [`MAX_MESSAGE`] bytes (the caller bounds the body read).
pub fn stream_request(body: &[u8]) -> Result<&[u8], ConnectError> {
    let bad = |m: &str| ConnectError::new("invalid_argument", m);
    if body.len() < 5 {
        return Err(bad("the request is not one Connect envelope"));
    }
    let flags = body[0];
    if flags & 0x01 != 0 {
        return Err(ConnectError::new(
            "unimplemented",
            "compressed messages are not supported",
        ));
    }
    if flags != 0 {
        return Err(bad("unexpected envelope flags"));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_MESSAGE {
        return Err(ConnectError::new(
            "resource_exhausted",
            "the message is too large",
        ));
    }
    if body.len() != 5 + len {
        return Err(bad("the request is not exactly one Connect envelope"));
    }
    Ok(&body[5..])
}

/// Parse a request message (an object).
pub fn parse<T: serde::de::DeserializeOwned>(msg: &[u8]) -> Result<T, ConnectError> {
    if msg.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ConnectError::new(
            "invalid_argument",
            "the message must be a JSON object",
        ));
    }
    serde_json::from_slice(msg)
        .map_err(|e| ConnectError::new("invalid_argument", format!("invalid message: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_are_bounded_and_exact() {
        let ok = frame(0, &json!({"a": 1}));
        assert_eq!(stream_request(&ok).unwrap(), br#"{"a":1}"#);
        // Too short, extra bytes, a length past the body or the bound, compressed, end flag.
        assert!(stream_request(&[0, 0, 0]).is_err());
        let mut extra = ok.to_vec();
        extra.push(b' ');
        assert!(stream_request(&extra).is_err());
        assert!(stream_request(&[0, 0, 0, 0, 9, b'{']).is_err());
        let huge = [0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            stream_request(&huge).unwrap_err().code,
            "resource_exhausted"
        );
        let mut compressed = ok.to_vec();
        compressed[0] = 1;
        assert_eq!(
            stream_request(&compressed).unwrap_err().code,
            "unimplemented"
        );
        let mut end = ok.to_vec();
        end[0] = END_STREAM;
        assert!(stream_request(&end).is_err());
        // Messages must be objects.
        assert!(parse::<Value>(b"[1]").is_err());
        assert!(parse::<Value>(b" {}").is_ok());
        let e = end_frame(Some(&ConnectError::new("not_found", "x")));
        assert_eq!(e[0], END_STREAM);
        assert_eq!(
            serde_json::from_slice::<Value>(&e[5..]).unwrap()["error"]["code"],
            "not_found"
        );
    }
}
