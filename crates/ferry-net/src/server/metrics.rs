//! The daemon's counters and their Prometheus text exposition (`/metrics`).
//!
//! A dozen atomics updated on the request path and rendered on demand: small enough that a
//! metrics facade with a global recorder would add more than it saves, and a daemon-local set
//! keeps two daemons in one process (tests) apart. Gauges that the store already knows
//! (resident bytes, leases, pending removals) are read from its health map at render time.

use crate::wire::Route;
use ferry_store::Health;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const ROUTES: [Route; 3] = [Route::Shm, Route::Tcp, Route::Unix];

fn route_index(route: Route) -> usize {
    match route {
        Route::Shm => 0,
        Route::Tcp => 1,
        Route::Unix => 2,
    }
}

/// Counters of one daemon.
#[derive(Debug, Default)]
pub struct Metrics {
    puts: [AtomicU64; 3],
    gets: [AtomicU64; 3],
    put_bytes: [AtomicU64; 3],
    get_bytes: [AtomicU64; 3],
    admit_wait_ns: AtomicU64,
    admit_waits: AtomicU64,
    connections_total: AtomicU64,
    auth_failures: AtomicU64,
    malformed_frames: AtomicU64,
    orphans_freed: AtomicU64,
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// Arena occupancy, if the daemon has one.
#[derive(Debug, Clone, Copy, Default)]
pub struct ArenaGauge {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Bytes allocated (including regions waiting for a pin to go).
    pub used: u64,
    /// The largest free extent.
    pub largest_free: u64,
}

impl Metrics {
    pub(crate) fn put(&self, route: Route, bytes: u64) {
        self.puts[route_index(route)].fetch_add(1, Ordering::Relaxed);
        self.put_bytes[route_index(route)].fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn get(&self, route: Route, bytes: u64) {
        self.gets[route_index(route)].fetch_add(1, Ordering::Relaxed);
        self.get_bytes[route_index(route)].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Time a put spent waiting for room (budget and arena).
    pub(crate) fn admit_wait(&self, waited: Duration) {
        self.admit_waits.fetch_add(1, Ordering::Relaxed);
        self.admit_wait_ns.fetch_add(u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub(crate) fn connection(&self) {
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn malformed_frame(&self) {
        self.malformed_frames.fetch_add(1, Ordering::Relaxed);
    }

    /// Samples freed because the session that owned them ended without disowning them.
    pub(crate) fn orphans_freed(&self, samples: u64) {
        self.orphans_freed.fetch_add(samples, Ordering::Relaxed);
    }

    /// Counts an error reply by its Python exception class.
    pub(crate) fn error(&self, error: &ferry_core::Error) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(error.python_exception()).or_default() += 1;
    }

    /// Puts served over `route`.
    pub fn puts(&self, route: Route) -> u64 {
        self.puts[route_index(route)].load(Ordering::Relaxed)
    }

    /// Gets served over `route`.
    pub fn gets(&self, route: Route) -> u64 {
        self.gets[route_index(route)].load(Ordering::Relaxed)
    }

    /// Connections refused for a wrong or missing secret.
    pub fn auth_failures(&self) -> u64 {
        self.auth_failures.load(Ordering::Relaxed)
    }

    /// Samples freed because the session that owned them ended without disowning them.
    pub fn orphaned_samples_freed(&self) -> u64 {
        self.orphans_freed.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition (version 0.0.4) of every counter and gauge.
    pub fn render(&self, health: &Health, connections: usize, arena: Option<ArenaGauge>) -> String {
        let mut out = String::with_capacity(4096);
        let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let by_route = |c: &[AtomicU64; 3]| -> Vec<(String, f64)> {
            ROUTES
                .iter()
                .map(|r| (format!("{{route=\"{}\"}}", r.name()), c[route_index(*r)].load(Ordering::Relaxed) as f64))
                .collect()
        };
        let one = |v: u64| vec![(String::new(), v as f64)];
        family("ferry_resident_bytes", "gauge", "Bytes of samples the daemon holds.", &one(health.resident_bytes));
        family("ferry_resident_samples", "gauge", "Samples the daemon holds.", &one(health.resident_samples));
        family("ferry_reserved_bytes", "gauge", "Bytes admitted for puts still writing.", &one(health.reserved_bytes));
        family(
            "ferry_capacity_bytes",
            "gauge",
            "The resident-byte budget (0 when unbounded).",
            &one(health.max_resident_bytes.unwrap_or(0)),
        );
        family("ferry_active_leases", "gauge", "Read leases held by clients.", &one(health.active_leases));
        family(
            "ferry_pending_removals",
            "gauge",
            "Removals that failed and wait for gc or drain.",
            &one(health.release_pending),
        );
        family("ferry_connections", "gauge", "Client connections open now.", &one(connections as u64));
        family(
            "ferry_connections_total",
            "counter",
            "Client connections accepted.",
            &one(self.connections_total.load(Ordering::Relaxed)),
        );
        family("ferry_puts_total", "counter", "Puts committed, by route.", &by_route(&self.puts));
        family("ferry_gets_total", "counter", "Gets served, by route.", &by_route(&self.gets));
        family("ferry_put_bytes_total", "counter", "Bytes put, by route.", &by_route(&self.put_bytes));
        family("ferry_get_bytes_total", "counter", "Bytes served by gets, by route.", &by_route(&self.get_bytes));
        family(
            "ferry_full_store_wait_seconds_total",
            "counter",
            "Time puts spent waiting for room in a full store.",
            &[(String::new(), self.admit_wait_ns.load(Ordering::Relaxed) as f64 / 1e9)],
        );
        family(
            "ferry_full_store_waits_total",
            "counter",
            "Puts that had to wait for room.",
            &one(self.admit_waits.load(Ordering::Relaxed)),
        );
        let errors: Vec<(String, f64)> = self
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), *n as f64))
            .collect();
        family("ferry_errors_total", "counter", "Error replies, by Python exception class.", &errors);
        family(
            "ferry_auth_failures_total",
            "counter",
            "Connections refused for a wrong or missing secret.",
            &one(self.auth_failures.load(Ordering::Relaxed)),
        );
        family(
            "ferry_malformed_frames_total",
            "counter",
            "Connections closed for a malformed frame.",
            &one(self.malformed_frames.load(Ordering::Relaxed)),
        );
        family(
            "ferry_orphaned_samples_freed_total",
            "counter",
            "Samples freed because the client session that owned them ended without disowning them.",
            &one(self.orphans_freed.load(Ordering::Relaxed)),
        );
        if let Some(arena) = arena {
            family("ferry_arena_capacity_bytes", "gauge", "Shared-memory arena size.", &one(arena.capacity));
            family("ferry_arena_used_bytes", "gauge", "Arena bytes allocated.", &one(arena.used));
            family("ferry_arena_largest_free_bytes", "gauge", "Largest free arena extent.", &one(arena.largest_free));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_is_valid_prometheus_text() {
        let m = Metrics::default();
        m.put(Route::Shm, 100);
        m.get(Route::Tcp, 50);
        m.error(&ferry_core::Error::InvalidArgument("x".into()));
        let health = Health {
            store_id: "s".into(),
            backend: "arena".into(),
            resident_samples: 1,
            active_leases: 2,
            resident_bytes: 100,
            reserved_bytes: 0,
            max_resident_bytes: Some(1000),
            release_pending: 0,
            oldest_age_s: 0.0,
            avg_age_s: 0.0,
            force_freed_total: 0,
            auth_required: false,
            provisional_external: 0,
            retain_on_release: false,
            backend_usage: None,
        };
        let text = m.render(&health, 3, Some(ArenaGauge { capacity: 1000, used: 100, largest_free: 900 }));
        assert!(text.contains("ferry_puts_total{route=\"shm\"} 1\n"), "{text}");
        assert!(text.contains("ferry_get_bytes_total{route=\"tcp\"} 50\n"), "{text}");
        assert!(text.contains("ferry_errors_total{kind=\"ValueError\"} 1\n"), "{text}");
        assert!(text.contains("ferry_resident_bytes 100\n"), "{text}");
        assert!(text.contains("ferry_arena_used_bytes 100\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(name.starts_with("ferry_"), "{line}");
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
