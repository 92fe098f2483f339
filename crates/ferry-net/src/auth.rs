//! Connection authentication: a challenge-response over the shared secret, both ways, so the
//! secret never crosses the wire and a client can tell a daemon that knows the secret from an
//! impostor.
//!
//! 1. The daemon's `Hello` carries a fresh 32-byte random `challenge`.
//! 2. The client answers `HMAC-SHA256(secret, "ferry-v1 client" || challenge || client_nonce)`
//!    with its own fresh `client_nonce`.
//! 3. The daemon checks it in constant time and proves itself with
//!    `HMAC-SHA256(secret, "ferry-v1 daemon" || client_nonce || challenge)`.
//!
//! Nonces are single-use per connection, so a recorded exchange cannot be replayed on another
//! connection. A wrong answer gets an `AuthFailed` error reply and the connection closes.

use ferry_core::{Error, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const CLIENT_LABEL: &[u8] = b"ferry-v1 client";
const DAEMON_LABEL: &[u8] = b"ferry-v1 daemon";

/// A fresh random nonce, hex-encoded (32 bytes).
pub fn nonce() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Backend {
        backend: "os".into(),
        operation: "random".into(),
        key: String::new(),
        message: format!("no random bytes for an authentication nonce: {e}"),
    })?;
    Ok(hex(&bytes))
}

fn mac(secret: &[u8], label: &[u8], a: &str, b: &str) -> Result<HmacSha256> {
    let mut mac = HmacSha256::new_from_slice(secret)
        .map_err(|_| Error::InvalidArgument("the shared secret cannot key HMAC-SHA256".into()))?;
    mac.update(label);
    mac.update(a.as_bytes());
    mac.update(b"|");
    mac.update(b.as_bytes());
    Ok(mac)
}

/// The client's answer to `challenge`.
pub fn client_response(secret: &[u8], challenge: &str, client_nonce: &str) -> Result<String> {
    Ok(hex(&mac(secret, CLIENT_LABEL, challenge, client_nonce)?.finalize().into_bytes()))
}

/// The daemon's proof for `client_nonce`.
pub fn daemon_proof(secret: &[u8], challenge: &str, client_nonce: &str) -> Result<String> {
    Ok(hex(&mac(secret, DAEMON_LABEL, client_nonce, challenge)?.finalize().into_bytes()))
}

/// Checks a client's answer in constant time.
pub fn verify_client(secret: &[u8], challenge: &str, client_nonce: &str, response: &str) -> Result<bool> {
    let Some(bytes) = unhex(response) else { return Ok(false) };
    Ok(mac(secret, CLIENT_LABEL, challenge, client_nonce)?.verify_slice(&bytes).is_ok())
}

/// Checks the daemon's proof in constant time.
pub fn verify_daemon(secret: &[u8], challenge: &str, client_nonce: &str, proof: &str) -> Result<bool> {
    let Some(bytes) = unhex(proof) else { return Ok(false) };
    Ok(mac(secret, DAEMON_LABEL, client_nonce, challenge)?.verify_slice(&bytes).is_ok())
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 128 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_verify_only_with_the_same_secret_challenge_and_nonce() {
        let (challenge, cn) = (nonce().unwrap(), nonce().unwrap());
        assert_eq!(challenge.len(), 64);
        assert_ne!(challenge, cn);
        let r = client_response(b"s3cret", &challenge, &cn).unwrap();
        assert!(verify_client(b"s3cret", &challenge, &cn, &r).unwrap());
        assert!(!verify_client(b"wrong", &challenge, &cn, &r).unwrap());
        assert!(!verify_client(b"s3cret", &nonce().unwrap(), &cn, &r).unwrap());
        assert!(!verify_client(b"s3cret", &challenge, &cn, "zz").unwrap());
        assert!(!verify_client(b"s3cret", &challenge, &cn, "").unwrap());
        // The daemon's proof is not the client's answer (no reflection).
        let p = daemon_proof(b"s3cret", &challenge, &cn).unwrap();
        assert_ne!(p, r);
        assert!(verify_daemon(b"s3cret", &challenge, &cn, &p).unwrap());
        assert!(!verify_daemon(b"s3cret", &challenge, &cn, &r).unwrap());
    }
}
