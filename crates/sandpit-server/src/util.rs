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

/// HMAC-SHA256 (RFC 2104) of `message` under `key`: the relay's request signatures
/// (`forward.rs`) and webhooks' `Sandpit-Signature` (`webhooks.rs`).
pub(crate) fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&sha2::Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = sha2::Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    sha2::Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        assert_eq!(
            hex::encode(hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        assert_eq!(
            hex::encode(hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }
}
