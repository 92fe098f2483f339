//! The sentinel files of SpecForge's offline disaggregated protocol (`SPECFORGE-RUNTIME.md`
//! §7.5), beside the manifest:
//!
//! ```text
//! <manifest>.producer_claim   exclusive-create, "pid=<pid>\n", fsynced: one producer per attempt
//! <manifest>                  the refs (written before .done)
//! <manifest>.done             producer success
//! <manifest>.failed           producer failure, "<ExcType>: <message>" (written BEFORE any cleanup)
//! <manifest>.consumed         consumer (rank 0) success
//! <manifest>.consumer_failed  consumer failure, "<reason>"
//! ```
//!
//! Existence is the signal; content is the reason. Every write goes through a temp file, fsync
//! and rename, so a reader never sees a half-written reason.
//!
//! Waits poll the file system ([`DEFAULT_POLL`], SpecForge's 0.25 s): a present failure file
//! ends a wait at once with its reason and its path, an explicit deadline with
//! [`Error::Timeout`] naming the awaited path, and (for [`wait_for_or_stop`]) a set
//! [`StopSignal`] with an `Interrupted` I/O error. Without a deadline a wait is unbounded, as
//! SpecForge's are.

use crate::atomic::write_control_file;
use crate::signal::StopSignal;
use ferry_core::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often waits re-check the file system (SpecForge's 0.25 s).
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

/// The control files of one offline attempt, named after its manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfflineControl {
    manifest: PathBuf,
}

impl OfflineControl {
    /// The control files beside `manifest`.
    pub fn new(manifest: impl Into<PathBuf>) -> Self {
        OfflineControl { manifest: manifest.into() }
    }

    /// The manifest path.
    pub fn manifest(&self) -> &Path {
        &self.manifest
    }

    fn sidecar(&self, suffix: &str) -> PathBuf {
        PathBuf::from(format!("{}{suffix}", self.manifest.display()))
    }

    /// `<manifest>.producer_claim`.
    pub fn claim_path(&self) -> PathBuf {
        self.sidecar(".producer_claim")
    }
    /// `<manifest>.done`.
    pub fn done_path(&self) -> PathBuf {
        self.sidecar(".done")
    }
    /// `<manifest>.failed`.
    pub fn failed_path(&self) -> PathBuf {
        self.sidecar(".failed")
    }
    /// `<manifest>.consumed`.
    pub fn consumed_path(&self) -> PathBuf {
        self.sidecar(".consumed")
    }
    /// `<manifest>.consumer_failed`.
    pub fn consumer_failed_path(&self) -> PathBuf {
        self.sidecar(".consumer_failed")
    }

    /// Claims the attempt for this producer process. Refused if the manifest or any artifact of
    /// an earlier attempt exists: a new attempt needs a fresh manifest path.
    pub fn claim_producer(&self) -> Result<()> {
        let artifacts = [
            self.manifest.clone(),
            self.claim_path(),
            self.done_path(),
            self.consumed_path(),
            self.failed_path(),
            self.consumer_failed_path(),
        ];
        if let Some(existing) = artifacts.iter().find(|p| p.exists()) {
            return Err(Error::InvalidArgument(format!(
                "{} holds artifacts from an existing attempt ({} exists); use a fresh manifest path or remove them",
                self.manifest.display(),
                existing.display()
            )));
        }
        crate::atomic::ensure_parent(&self.manifest)?;
        let path = self.claim_path();
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::InvalidArgument(format!("{} was claimed by another producer meanwhile", path.display()))
            } else {
                Error::io(format!("claiming {}", path.display()), &e)
            }
        })?;
        file.write_all(format!("pid={}\n", std::process::id()).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| Error::io(format!("writing {}", path.display()), &e))
    }

    /// Producer success (after the manifest is written).
    pub fn mark_done(&self) -> Result<()> {
        write_control_file(&self.done_path(), b"")
    }

    /// Producer failure with its reason.
    pub fn mark_failed(&self, reason: &str) -> Result<()> {
        write_control_file(&self.failed_path(), reason.as_bytes())
    }

    /// Consumer success.
    pub fn mark_consumed(&self) -> Result<()> {
        write_control_file(&self.consumed_path(), b"")
    }

    /// Consumer failure with its reason.
    pub fn mark_consumer_failed(&self, reason: &str) -> Result<()> {
        write_control_file(&self.consumer_failed_path(), reason.as_bytes())
    }

    /// The producer's failure reason, if it failed.
    pub fn failure(&self) -> Option<String> {
        read_reason(&self.failed_path())
    }

    /// The consumer's failure reason, if it failed.
    pub fn consumer_failure(&self) -> Option<String> {
        read_reason(&self.consumer_failed_path())
    }

    /// Waits for the producer's `.done`, failing at once if `.failed` appears, and at
    /// `deadline` if given (`None` waits without bound, as SpecForge's consumer does).
    pub fn wait_for_done(&self, deadline: Option<Instant>, poll: Duration) -> Result<()> {
        wait_for(&self.done_path(), Some(&self.failed_path()), deadline, poll)
    }

    /// Waits for the consumer's `.consumed`, failing at once on `.consumer_failed` (the error
    /// names that file and its reason), and at `deadline` if given.
    pub fn wait_for_consumed(&self, deadline: Option<Instant>, poll: Duration) -> Result<()> {
        wait_for(&self.consumed_path(), Some(&self.consumer_failed_path()), deadline, poll)
    }

    /// [`OfflineControl::wait_for_consumed`] that also ends as soon as `stop` is set (see
    /// [`wait_for_or_stop`]).
    pub fn wait_for_consumed_or_stop(
        &self,
        deadline: Option<Instant>,
        poll: Duration,
        stop: &StopSignal,
    ) -> Result<()> {
        wait_for_or_stop(&self.consumed_path(), Some(&self.consumer_failed_path()), deadline, poll, stop)
    }
}

/// The reason given when a failure sidecar exists but says nothing readable.
pub const UNKNOWN_FAILURE: &str = "unknown remote failure";

/// A sidecar's reason: `None` when the file does not exist. Presence is decided by existence
/// alone (as SpecForge's `os.path.exists`), so a sidecar that is not UTF-8 or cannot be read
/// still signals the failure: its bytes are decoded lossily, and an unreadable or empty sidecar
/// reads `"unknown remote failure"`.
pub fn read_reason(path: &Path) -> Option<String> {
    if !path.exists() {
        return None;
    }
    let text = std::fs::read(path).map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned()).unwrap_or_default();
    Some(if text.is_empty() { UNKNOWN_FAILURE.to_owned() } else { text })
}

/// Waits until `path` exists. A present `failure` file fails the wait with its reason (the
/// error names the failure file too); past `deadline` the wait fails with [`Error::Timeout`]
/// naming the path.
pub fn wait_for(path: &Path, failure: Option<&Path>, deadline: Option<Instant>, poll: Duration) -> Result<()> {
    wait(path, failure, deadline, poll, None)
}

/// [`wait_for`] that also ends as soon as `stop` is set (a Ctrl-C while a producer holds its
/// samples): an [`Error::Io`] of kind `Interrupted` naming the path. The awaited file wins
/// over a failure file, and both over the stop signal and the deadline.
pub fn wait_for_or_stop(
    path: &Path,
    failure: Option<&Path>,
    deadline: Option<Instant>,
    poll: Duration,
    stop: &StopSignal,
) -> Result<()> {
    wait(path, failure, deadline, poll, Some(stop))
}

fn wait(
    path: &Path,
    failure: Option<&Path>,
    deadline: Option<Instant>,
    poll: Duration,
    stop: Option<&StopSignal>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if path.exists() {
            return Ok(());
        }
        if let Some((failure, reason)) = failure.and_then(|f| read_reason(f).map(|r| (f, r))) {
            return Err(Error::Backend {
                backend: "control".into(),
                operation: "wait".into(),
                key: path.display().to_string(),
                message: format!("remote role failed while waiting: {reason} (from {})", failure.display()),
            });
        }
        if stop.is_some_and(StopSignal::is_set) {
            return Err(Error::io(
                format!("waiting for {}", path.display()),
                &std::io::Error::new(std::io::ErrorKind::Interrupted, "stop requested"),
            ));
        }
        let now = Instant::now();
        let nap = match deadline {
            Some(deadline) if now >= deadline => {
                return Err(Error::Timeout {
                    what: path.display().to_string(),
                    waited_ms: now.duration_since(start).as_millis() as u64,
                });
            }
            Some(deadline) => poll.min(deadline - now),
            None => poll,
        };
        match stop {
            Some(stop) => {
                stop.wait_timeout(nap);
            }
            None => std::thread::sleep(nap),
        }
    }
}
