//! Tokens: how they are made and what the store keeps of them. Every token (API, preview,
//! agent gateway, download link) is a prefix and 256 random bits in hex; only its SHA-256 is
//! stored, so a database leak leaks no usable token.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Tokens start with this, so leaked ones are easy to find with secret scanners.
pub const TOKEN_PREFIX: &str = "sp_";

/// Preview tokens start with this (they open previews, nothing else).
pub const PREVIEW_TOKEN_PREFIX: &str = "spp_";

/// A fresh random API token: the prefix and 256 random bits in hex.
pub fn generate_token() -> String {
    generate_token_with(TOKEN_PREFIX)
}

/// A fresh random token with the given prefix and 256 random bits in hex.
pub fn generate_token_with(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// What the store keeps instead of the token.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_prefixed_and_stored_as_hashes() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert!(
            a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64,
            "{a}"
        );
        assert!(generate_token_with(PREVIEW_TOKEN_PREFIX).starts_with("spp_"));
        let h = hash_token(&a);
        assert_eq!(h.len(), 64);
        assert!(
            !h.contains(&a[TOKEN_PREFIX.len()..]),
            "the hash is not the token"
        );
        assert_eq!(h, hash_token(&a), "stable");
        // SHA-256 of "abc", a known answer.
        assert_eq!(
            hash_token("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
