//! The shared-secret gate (SpecForge's `AuthPolicy`, B9): when a store is configured with a
//! secret, attaching to it and every data call present a credential, compared in constant time.
//! The secret is never printed.

use ferry_core::{Error, Result};
use subtle::ConstantTimeEq;

/// A shared secret. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    /// The secret from an environment variable; unset or empty means none (SpecForge's
    /// `DISAGG_AUTH_TOKEN` convention).
    pub fn from_env(var: &str) -> Option<Secret> {
        std::env::var(var).ok().filter(|s| !s.is_empty()).map(Secret)
    }

    /// The secret's bytes (for challenge-response in the network layer).
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Who may use a store: anyone (no secret), or holders of the secret.
#[derive(Debug, Clone, Default)]
pub struct AuthPolicy {
    token: Option<Secret>,
}

impl AuthPolicy {
    /// Open to everyone.
    pub fn open() -> Self {
        AuthPolicy { token: None }
    }

    /// Requires `token`.
    pub fn require(token: Secret) -> Self {
        AuthPolicy { token: Some(token) }
    }

    /// Whether a credential is required.
    pub fn required(&self) -> bool {
        self.token.is_some()
    }

    /// Checks a presented credential. Equal-length comparisons take constant time; only the
    /// length of a wrong credential can leak through timing.
    pub fn check(&self, presented: Option<&Secret>, context: &str) -> Result<()> {
        let Some(token) = &self.token else { return Ok(()) };
        let ok = presented.is_some_and(|p| bool::from(p.expose().ct_eq(token.expose())));
        if ok { Ok(()) } else { Err(Error::AuthFailed { context: context.to_owned() }) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_accepts_only_the_secret_and_never_prints_it() {
        let policy = AuthPolicy::require(Secret::new("s3cret"));
        assert!(policy.check(Some(&Secret::new("s3cret")), "attach").is_ok());
        assert!(matches!(policy.check(Some(&Secret::new("wrong")), "attach"), Err(Error::AuthFailed { .. })));
        assert!(matches!(policy.check(None, "attach"), Err(Error::AuthFailed { .. })));
        assert!(AuthPolicy::open().check(None, "attach").is_ok());
        assert!(!format!("{policy:?}").contains("s3cret"));
    }
}
