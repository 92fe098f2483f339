//! The sidecar files beside a channel (SpecForge §8.1): their names, and how each is written and
//! read. Every sidecar is `<channel path><suffix>`; the writes are atomic (a temp file renamed
//! over the target) so a reader sees the old content or the new, never a torn one.

use crate::atomic;
use ferry_core::{Error, Result};
use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Clean end of stream (empty file).
pub const CLOSED: &str = ".closed";
/// Producer (or distributor) failure text.
pub const FAILED: &str = ".failed";
/// Cumulative refs consumed (decimal).
pub const CONSUMED_COUNT: &str = ".consumed_count";
/// The consumer finished (empty file).
pub const CONSUMER_DONE: &str = ".consumer_done";
/// Consumer failure text.
pub const CONSUMER_FAILED: &str = ".consumer_failed";
/// The consumer's dispatch quantum (decimal, ≥ 1), written once per attempt.
pub const CONSUMER_QUANTUM: &str = ".consumer_quantum";

/// What an empty failure file reads as.
pub const UNKNOWN_FAILURE: &str = "unknown remote failure";

/// `<path><suffix>`.
pub fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes a sidecar atomically with fsync, through `<sidecar>.tmp.<pid>`.
pub fn write_synced(path: &Path, suffix: &str, content: &str) -> Result<()> {
    let target = sidecar(path, suffix);
    atomic::write_via(&target, &atomic::pid_temp(&target), content.as_bytes())
}

/// Whether a sidecar exists.
pub fn exists(path: &Path, suffix: &str) -> bool {
    sidecar(path, suffix).exists()
}

/// A failure sidecar's text: `None` if missing, stripped, empty read as [`UNKNOWN_FAILURE`].
pub fn read_failure(path: &Path, suffix: &str) -> Result<Option<String>> {
    let target = sidecar(path, suffix);
    match std::fs::read(&target) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let text = text.trim();
            Ok(Some(if text.is_empty() { UNKNOWN_FAILURE.to_owned() } else { text.to_owned() }))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", target.display()), &e)),
    }
}

/// The consumed counter: missing, empty or unparsable reads as 0 (as SpecForge reads it).
pub fn read_counter(path: &Path) -> Result<u64> {
    match read_counter_strict(path) {
        Err(Error::Corrupt { .. }) => Ok(0),
        other => other,
    }
}

/// The counter for seeding a restarted consumer: missing or empty is 0, anything else must be
/// a number (a restart must never rewind the counter because a read went wrong).
pub fn read_counter_strict(path: &Path) -> Result<u64> {
    let target = sidecar(path, CONSUMED_COUNT);
    match std::fs::read_to_string(&target) {
        Ok(text) if text.trim().is_empty() => Ok(0),
        Ok(text) => text.trim().parse().map_err(|_| Error::Corrupt {
            what: target.display().to_string(),
            message: format!("consumed counter {:?} is not a number; fix or remove it before resuming", text.trim()),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) if e.kind() == io::ErrorKind::InvalidData => Err(Error::Corrupt {
            what: target.display().to_string(),
            message: "consumed counter is not UTF-8; fix or remove it before resuming".into(),
        }),
        Err(e) => Err(Error::io(format!("reading {}", target.display()), &e)),
    }
}

/// Publishes the counter's absolute value through
/// `<path>.consumed_count.tmp.<pid>.<thread>` and a rename (no fsync, as SpecForge: the
/// counter is advisory backpressure, and a restart re-derives it from the ledger).
pub fn write_counter(path: &Path, value: u64) -> Result<()> {
    let target = sidecar(path, CONSUMED_COUNT);
    let tmp = atomic::pid_temp(&target);
    let result = std::fs::write(&tmp, value.to_string()).and_then(|()| std::fs::rename(&tmp, &target));
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("writing {}", target.display()), &e)
    })
}

/// Creates the quantum sidecar exclusively (write + fsync). `Ok(false)` if it already exists.
pub fn create_quantum(path: &Path, quantum: u64) -> Result<bool> {
    let target = sidecar(path, CONSUMER_QUANTUM);
    let file = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&target);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(Error::io(format!("creating {}", target.display()), &e)),
    };
    file.write_all(quantum.to_string().as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| Error::io(format!("writing {}", target.display()), &e))?;
    Ok(true)
}

/// The quantum sidecar: `None` if missing (or still empty, while its writer writes it); not an
/// integer or below 1 is a protocol error.
pub fn read_quantum(path: &Path) -> Result<Option<u64>> {
    let target = sidecar(path, CONSUMER_QUANTUM);
    let text = match std::fs::read_to_string(&target) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("reading {}", target.display()), &e)),
    };
    // The consumer creates the file, then writes it: a reader can see it empty for an instant.
    // Empty means "not yet published"; only content that is not a quantum is an error.
    if text.trim().is_empty() {
        return Ok(None);
    }
    let invalid = |what: &str| Error::Protocol {
        context: target.display().to_string(),
        message: format!("invalid consumer quantum {:?}: {what}", text.trim()),
    };
    let value: i64 = text.trim().parse().map_err(|_| invalid("not an integer"))?;
    if value < 1 {
        return Err(invalid("must be at least 1"));
    }
    Ok(Some(value as u64))
}
