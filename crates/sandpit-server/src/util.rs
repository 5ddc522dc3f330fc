//! Small helpers: ids and clocks (the control layer's), and what the HTTP edge parses.

pub use sandpit_control::util::{
    new_id, new_sandbox_id, now_ms, parse_rfc3339, random_hex, rfc3339,
};

/// An `expires_at` a client set: RFC 3339, in the future.
pub(crate) fn parse_expiry(text: &str) -> Result<i64, crate::error::ApiError> {
    let at = parse_rfc3339(text).ok_or_else(|| {
        crate::error::ApiError::bad_request(
            "invalid_expires_at",
            "expires_at must be an RFC 3339 timestamp",
        )
    })?;
    if at <= now_ms() {
        return Err(crate::error::ApiError::bad_request(
            "invalid_expires_at",
            "expires_at cannot be in the past",
        ));
    }
    Ok(at)
}
