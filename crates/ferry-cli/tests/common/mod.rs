//! What the multi-process CLI suites share: the `ferry` binary as a command, children waited
//! with deadlines (a hung role fails its test instead of hanging CI), a `ferry serve` daemon
//! killed when the test ends however it ends, and the role outputs (checksums, batches).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long any one role may run in these suites.
pub(crate) const ROLE_DEADLINE: Duration = Duration::from_secs(120);

/// `ferry` with no ambient credential.
pub(crate) fn ferry() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.env_remove("FERRY_AUTH_TOKEN").env_remove("DISAGG_AUTH_TOKEN");
    cmd
}

/// A child killed (and reaped) when the test ends, passed or failed.
pub(crate) struct Guard(Option<Child>);

impl Guard {
    /// Guards `child`.
    pub(crate) fn new(child: Child) -> Guard {
        Guard(Some(child))
    }

    /// The child.
    pub(crate) fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("a guard holds its child until finished")
    }

    /// Whether the child has exited.
    pub(crate) fn exited(&mut self) -> bool {
        self.child().try_wait().unwrap().is_some()
    }

    /// Waits for the child to exit, at most `deadline`; past it the child is killed and the
    /// test fails with its stderr.
    pub(crate) fn finish_within(mut self, what: &str, deadline: Duration) -> Output {
        let end = Instant::now() + deadline;
        loop {
            if self.exited() {
                return self.0.take().unwrap().wait_with_output().unwrap();
            }
            if Instant::now() > end {
                let mut child = self.0.take().unwrap();
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!("{what} did not finish within {deadline:?}; stderr:\n{}", String::from_utf8_lossy(&out.stderr));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// [`Guard::finish_within`] the suite's role deadline.
    pub(crate) fn finish(self, what: &str) -> Output {
        self.finish_within(what, ROLE_DEADLINE)
    }

    /// Kills the child now (SIGKILL: no cleanup, as a crash) and reaps it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `cmd` with stdout and stderr captured, guarded.
pub(crate) fn spawn(mut cmd: Command) -> Guard {
    Guard::new(cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap())
}

/// Waits for a child with the suite's deadline (see [`Guard::finish`]).
pub(crate) fn finish(child: Child, what: &str) -> Output {
    Guard::new(child).finish(what)
}

/// [`Guard::finish`], asserting success.
pub(crate) fn succeed(child: Guard, what: &str) -> Output {
    let out = child.finish(what);
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Runs `cmd` to completion (with the deadline), asserting success.
pub(crate) fn run_ok(cmd: Command, what: &str) -> Output {
    succeed(spawn(cmd), what)
}

/// Waits until `path` exists, failing the test past the deadline.
pub(crate) fn wait_for_file(path: &Path, what: &str) {
    let end = Instant::now() + ROLE_DEADLINE;
    while !path.exists() {
        assert!(Instant::now() < end, "{what}: {} never appeared", path.display());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A `ferry serve` daemon on a Unix socket, killed on drop.
pub(crate) struct Daemon {
    process: Guard,
    /// Its socket.
    pub(crate) socket: PathBuf,
}

impl Daemon {
    /// Starts a daemon with a 256 MiB arena in `dir` and `extra` flags, waiting (with the
    /// deadline) for it to say it is ready.
    pub(crate) fn start(dir: &Path, extra: &[&str]) -> Daemon {
        let socket = dir.join("ferry.sock");
        let mut cmd = ferry();
        cmd.args(["serve", "--socket"]).arg(&socket).args(["--capacity", "256MiB", "--store-id", "node0"]).args(extra);
        let mut process = Guard::new(cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap());
        // Read its stdout on a thread, so the wait for "ready" has a deadline.
        let stdout = process.child().stdout.take().unwrap();
        let (ready, said_ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                if line.is_ok_and(|l| l.contains("ready")) {
                    let _ = ready.send(());
                }
            }
        });
        said_ready.recv_timeout(ROLE_DEADLINE).expect("ferry serve printed ready");
        Daemon { process, socket }
    }

    /// Its store URI.
    pub(crate) fn uri(&self) -> String {
        format!("ferry+unix://{}", self.socket.display())
    }

    /// Its health map, as `ferry status --json` prints it.
    pub(crate) fn health(&self) -> serde_json::Value {
        let mut cmd = ferry();
        cmd.args(["status", &self.uri(), "--json"]);
        let out = run_ok(cmd, "ferry status");
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `(resident samples, resident bytes, pending removals)`.
    pub(crate) fn resident(&self) -> (u64, u64, u64) {
        let h = self.health();
        let field = |name: &str| h[name].as_u64().unwrap_or_else(|| panic!("health has no {name}: {h}"));
        (field("resident_samples"), field("resident_bytes"), field("release_pending"))
    }

    /// Asserts the daemon holds nothing: no samples, no bytes, no pending removals.
    pub(crate) fn assert_empty(&self) {
        assert_eq!(self.resident(), (0, 0, 0), "the daemon still holds something: {}", self.health());
    }

    /// Kills the daemon now (SIGKILL: no cleanup), as a crash.
    pub(crate) fn kill(&mut self) {
        self.process.kill();
    }
}

/// The SpecForge fixtures beside the repository.
pub(crate) fn fixtures() -> PathBuf {
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"));
    assert!(dir.is_dir(), "SpecForge fixtures not found at {}: put shared/ beside the repository", dir.display());
    dir.canonicalize().unwrap()
}

/// `(id, checksum)` of every JSON line of `path`, the id under `id_key`.
fn checksum_lines(path: &Path, id_key: &str) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v[id_key].as_str().unwrap().to_owned(), v["checksum"].as_u64().unwrap())
        })
        .collect()
}

/// The `{"sample_id", "checksum"}` lines a role wrote, in order.
pub(crate) fn checksums(path: &Path) -> Vec<(String, u64)> {
    checksum_lines(path, "sample_id")
}

/// The `{"key", "checksum"}` lines `ferry synth` wrote beside its dump, in index order.
pub(crate) fn generated(dump: &Path) -> Vec<(String, u64)> {
    checksum_lines(&dump.join("checksums.jsonl"), "key")
}

/// A sample's topology-independent key: the index digits at the end of its id
/// (`offline:00000003`, `disagg:00000003` and `online:p00000003` are all `00000003`).
pub(crate) fn key(sample_id: &str) -> String {
    let tail = sample_id.rsplit(':').next().unwrap_or(sample_id);
    tail.trim_start_matches(|c: char| !c.is_ascii_digit()).to_owned()
}

/// [`checksums`] keyed by [`key`], asserting each key always had the same checksum.
pub(crate) fn checksums_by_key(path: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (id, sum) in checksums(path) {
        if let Some(previous) = out.insert(key(&id), sum) {
            assert_eq!(previous, sum, "sample {id} read with two different contents");
        }
    }
    out
}

/// Every regular file under `root` (the store's generation marker aside).
pub(crate) fn files_under(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else { return out };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if path.file_name().is_some_and(|n| n != ".ferry-generation") {
            out.push(path.display().to_string());
        }
    }
    out
}
