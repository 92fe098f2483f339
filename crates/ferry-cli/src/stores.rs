//! What every role shares about store URIs: telling a node daemon's URI from a store this
//! process opens, connecting to a daemon (producers own their puts there, see
//! `ferry_net::Client::connect_owning`), and the seconds flags the roles take.

use anyhow::{Context, Result};
use ferry_net::Client;
use ferry_store::FeatureStoreApi;
use std::sync::Arc;
use std::time::Duration;

/// Whether `uri` names a `ferry serve` daemon rather than a store this process opens.
pub(crate) fn is_daemon_uri(uri: &str) -> bool {
    uri.starts_with("ferry://") || uri.starts_with("ferry+unix://")
}

/// Connects to the daemon at `uri`. With `owning`, the client owns its puts: the daemon frees
/// what this process put and never handed over (disowned) if the process dies, so a crashed
/// producer leaves nothing behind.
pub(crate) fn connect(uri: &str, owning: bool) -> Result<Arc<dyn FeatureStoreApi>> {
    let client = if owning { Client::connect_owning(uri) } else { Client::connect(uri) };
    Ok(client.with_context(|| format!("connecting to {uri}"))?.into())
}

/// A `--flag <seconds>` value as a duration: a positive, finite number.
pub(crate) fn seconds(s: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("{flag} must be a positive number of seconds, got {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_must_be_positive_and_finite() {
        assert_eq!(seconds(1.5, "--x").unwrap(), Duration::from_millis(1500));
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let err = seconds(bad, "--idle-timeout").unwrap_err().to_string();
            assert!(err.contains("--idle-timeout must be a positive number of seconds"), "{err}");
        }
        assert!(is_daemon_uri("ferry+unix:///run/ferry.sock") && is_daemon_uri("ferry://node0:7420"));
        assert!(!is_daemon_uri("dir:///mnt/features"));
    }
}
