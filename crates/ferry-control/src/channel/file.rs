//! [`FileRefChannel`]: the ref channel as a JSONL file plus sidecars on a shared mount,
//! byte-compatible with SpecForge's `StreamingRefChannel` and `InboxChannel` (§8, §9.1).
//!
//! Records are compact JSON refs, one per `\n`-terminated line, appended with `O_APPEND`. A
//! record counts as published once all of its bytes reached the kernel; fsync follows. A reader
//! keeps a byte offset and a buffered partial line, so a record torn by a crashed writer is never
//! parsed: it stays buffered until its newline arrives, which for a crashed writer is never.
//!
//! One writer per channel (SpecForge's rule): a writer whose append stopped midway refuses
//! further appends, because bytes appended after a torn record would join it into one corrupt
//! line; the producer must [`RefSink::fail`] the channel instead.

use super::io::{AppendFs, RealFs};
use super::sidecar::{self, CLOSED, CONSUMER_DONE, CONSUMER_FAILED, FAILED};
use super::{RefSink, RefSource};
use crate::record::RefRecord;
use ferry_core::json::{JsonStyle, sample_ref_from_str, sample_ref_to_string};
use ferry_core::{Error, Result, SampleRef};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// What a channel file is: a producer → consumer channel, or a per-rank inbox written by the
/// ref distributor (whose failure readers see as "ref-distributor died").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelRole {
    /// `refs.jsonl` between the producer pool and consumer rank 0.
    Channel,
    /// `inbox-rank<r>.jsonl`, written by the distributor.
    Inbox,
}

/// What tells one channel file from another at the same path: inode numbers are reused at
/// once on many filesystems, so the birth time (where the filesystem records one) joins them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    born: Option<std::time::SystemTime>,
}

/// A record a reader refused, with its bytes (put back, never lost).
type Refused = Box<(Error, Vec<u8>)>;

/// SpecForge's prefix of an inbox failure.
const DISTRIBUTOR_DIED: &str = "ref-distributor died:\n";

/// A ref channel (or inbox) file. Both halves ([`RefSink`], [`RefSource`]) on one type, as in
/// SpecForge; one instance per process per role.
#[derive(Debug)]
pub struct FileRefChannel {
    path: PathBuf,
    role: ChannelRole,
    fs: Arc<dyn AppendFs>,
    writer: Mutex<Writer>,
    reader: Mutex<Reader>,
    consumed: Mutex<u64>,
}

#[derive(Debug, Default)]
struct Writer {
    /// Records this instance appended whole.
    published: u64,
    /// An append stopped inside a record: the file ends with a fragment.
    torn: bool,
}

#[derive(Debug, Default)]
struct Reader {
    /// The channel file while records are flowing. A read that finds nothing new closes it, so
    /// the next poll opens it again: on NFS an open revalidates the file (close-to-open
    /// consistency), where a descriptor kept open could miss appends until its attribute cache
    /// expires. SpecForge opens the file on every poll.
    file: Option<File>,
    /// The (device, inode) of the file this reader follows: a channel replaced under a reader
    /// (an inbox recreated by a new distributor) is an error, never a silent restart.
    identity: Option<FileIdentity>,
    /// A reused read buffer.
    scratch: Vec<u8>,
    /// Bytes of the file consumed into `partial` / `lines`.
    offset: u64,
    /// The trailing fragment after the last newline read.
    partial: Vec<u8>,
    /// Complete, non-blank lines not yet returned, with their byte offsets.
    lines: VecDeque<(u64, Vec<u8>)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FileRefChannel {
    /// A channel at `path` (created by the first append; a missing file reads as empty).
    pub fn open(path: impl Into<PathBuf>) -> FileRefChannel {
        FileRefChannel::with_fs(path, ChannelRole::Channel, Arc::new(RealFs))
    }

    /// The inbox of `rank` in `inbox_dir`: `<inbox_dir>/inbox-rank<rank>.jsonl`.
    pub fn inbox(inbox_dir: &Path, rank: usize) -> FileRefChannel {
        FileRefChannel::with_fs(Self::inbox_path(inbox_dir, rank), ChannelRole::Inbox, Arc::new(RealFs))
    }

    /// The path of `rank`'s inbox.
    pub fn inbox_path(inbox_dir: &Path, rank: usize) -> PathBuf {
        inbox_dir.join(format!("inbox-rank{rank}.jsonl"))
    }

    /// A channel whose appends go through `fs` (fault-injection tests).
    pub fn with_fs(path: impl Into<PathBuf>, role: ChannelRole, fs: Arc<dyn AppendFs>) -> FileRefChannel {
        FileRefChannel {
            path: path.into(),
            role,
            fs,
            writer: Mutex::new(Writer::default()),
            reader: Mutex::new(Reader::default()),
            consumed: Mutex::new(0),
        }
    }

    /// The channel file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What this channel is.
    pub fn role(&self) -> ChannelRole {
        self.role
    }

    /// Deletes the channel file and every sidecar (inboxes are ephemeral: a new distributor
    /// starts them afresh).
    pub fn remove_files(&self) -> Result<()> {
        let mut paths = vec![self.path.clone()];
        for suffix in [
            CLOSED,
            FAILED,
            sidecar::CONSUMED_COUNT,
            ".consumed_count.tmp",
            CONSUMER_DONE,
            CONSUMER_FAILED,
            sidecar::CONSUMER_QUANTUM,
        ] {
            paths.push(sidecar::sidecar(&self.path, suffix));
        }
        for path in paths {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {}", path.display()), &e)),
            }
        }
        Ok(())
    }

    fn record(r: &SampleRef) -> Result<String> {
        let mut line = sample_ref_to_string(r, JsonStyle::Compact)?;
        line.push('\n');
        Ok(line)
    }

    fn append_error(&self, e: &std::io::Error) -> Error {
        Error::io(format!("appending to ref channel {}", self.path.display()), e)
    }

    fn refuse_if_torn(&self, writer: &Writer) -> Result<()> {
        if writer.torn {
            return Err(Error::Protocol {
                context: self.path.display().to_string(),
                message: "an earlier append stopped inside a record; appending more would corrupt the channel. \
                          Fail the channel (the producer's `fail`) and start a fresh attempt"
                    .into(),
            });
        }
        Ok(())
    }

    /// Writes `payload` (whole records), counting each record once its last byte is written.
    fn append(&self, writer: &mut Writer, payload: &[u8], record_ends: &[usize]) -> Result<()> {
        self.refuse_if_torn(writer)?;
        let mut file = self.fs.open_append(&self.path).map_err(|e| self.append_error(&e))?;
        let mut written = 0usize;
        let mut counted = 0usize;
        let result = loop {
            if written == payload.len() {
                break Ok(());
            }
            match file.write(&payload[written..]) {
                Ok(0) => {
                    break Err(self
                        .append_error(&std::io::Error::new(std::io::ErrorKind::WriteZero, "append made no progress")));
                }
                Ok(n) => {
                    written += n;
                    while counted < record_ends.len() && record_ends[counted] <= written {
                        counted += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(self.append_error(&e)),
            }
        };
        writer.published += counted as u64;
        if result.is_err() {
            let boundary = counted.checked_sub(1).map_or(0, |i| record_ends[i]);
            writer.torn = written > boundary;
            return result;
        }
        // The records are published; a failed fsync is still reported.
        file.sync().map_err(|e| Error::io(format!("fsync of ref channel {}", self.path.display()), &e))
    }

    /// Reads new bytes into the line queue, a chunk at a time through a reused buffer (a
    /// backlog of megabytes never becomes one transient allocation).
    fn read_new(&self, reader: &mut Reader) -> Result<()> {
        const CHUNK: usize = 256 << 10;
        if reader.file.is_none() {
            let file = match File::open(&self.path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && reader.identity.is_none() => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(self.replaced("was deleted")),
                Err(e) => return Err(Error::io(format!("opening ref channel {}", self.path.display()), &e)),
            };
            let meta =
                file.metadata().map_err(|e| Error::io(format!("reading ref channel {}", self.path.display()), &e))?;
            let identity = FileIdentity { dev: meta.dev(), ino: meta.ino(), born: meta.created().ok() };
            // A new inode, or (inode numbers are reused) a file shorter than what was read.
            if reader.identity.is_some_and(|known| known != identity) || meta.len() < reader.offset {
                return Err(self.replaced("was replaced by another file"));
            }
            reader.identity = Some(identity);
            reader.file = Some(file);
        }
        if reader.scratch.len() < CHUNK {
            reader.scratch = vec![0u8; CHUNK];
        }
        loop {
            let Reader { file: Some(file), scratch, offset, partial, lines, .. } = &mut *reader else { return Ok(()) };
            let n = match file.read_at(scratch, *offset) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io(format!("reading ref channel {}", self.path.display()), &e)),
            };
            if n == 0 {
                reader.file = None;
                return Ok(());
            }
            // The file offset of the first byte of `partial`.
            let mut line_start = *offset - partial.len() as u64;
            *offset += n as u64;
            let mut rest = &scratch[..n];
            while let Some(end) = memchr::memchr(b'\n', rest) {
                let line = if partial.is_empty() {
                    rest[..end].to_vec()
                } else {
                    let mut whole = std::mem::take(partial);
                    whole.extend_from_slice(&rest[..end]);
                    whole
                };
                if !line.trim_ascii().is_empty() {
                    lines.push_back((line_start, line));
                }
                line_start = *offset - (rest.len() - end - 1) as u64;
                rest = &rest[end + 1..];
            }
            partial.extend_from_slice(rest);
        }
    }

    fn replaced(&self, what: &str) -> Error {
        Error::Protocol {
            context: format!("ref channel {}", self.path.display()),
            message: format!(
                "the file this reader was following {what}; a new attempt recreated it, so this reader belongs to an \
                 attempt that has ended (open a new reader)"
            ),
        }
    }

    /// Takes up to `max` queued records and reads each with `read`; everything from the first
    /// record `read` refuses (it hands the bytes back) returns to the front of the queue (bad
    /// input never loses data): the records before it are returned now, the error on the next
    /// poll.
    fn take<T>(
        &self,
        max: Option<usize>,
        read: impl Fn(u64, Vec<u8>) -> std::result::Result<T, Refused>,
    ) -> Result<Vec<T>> {
        let mut reader = lock(&self.reader);
        self.read_new(&mut reader)?;
        let take = max.unwrap_or(usize::MAX).min(reader.lines.len());
        let mut out = Vec::with_capacity(take);
        let mut failure = None;
        while out.len() < take {
            let Some((offset, line)) = reader.lines.pop_front() else { break };
            match read(offset, line) {
                Ok(item) => out.push(item),
                Err(refused) => {
                    let (e, line) = *refused;
                    reader.lines.push_front((offset, line));
                    failure = Some(e);
                    break;
                }
            }
        }
        match failure {
            Some(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    fn parse(&self, offset: u64, line: &[u8]) -> Result<SampleRef> {
        let corrupt = |message: String| Error::Corrupt {
            what: format!("ref channel {} record at byte {offset}", self.path.display()),
            message,
        };
        let text = std::str::from_utf8(line).map_err(|e| corrupt(format!("not UTF-8: {e}")))?;
        sample_ref_from_str(text).map_err(|e| corrupt(e.to_string()))
    }
}

impl RefSink for FileRefChannel {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn publish(&self, r: &SampleRef) -> Result<()> {
        let line = Self::record(r)?;
        let mut writer = lock(&self.writer);
        self.append(&mut writer, line.as_bytes(), &[line.len()])
    }

    fn publish_batch(&self, refs: &[SampleRef]) -> Result<()> {
        if refs.is_empty() {
            return Ok(());
        }
        let mut payload = String::new();
        let mut ends = Vec::with_capacity(refs.len());
        for r in refs {
            payload.push_str(&Self::record(r)?);
            ends.push(payload.len());
        }
        let mut writer = lock(&self.writer);
        self.append(&mut writer, payload.as_bytes(), &ends)
    }

    fn publish_lines(&self, lines: &[&str]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut payload = String::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
        let mut ends = Vec::with_capacity(lines.len());
        for line in lines {
            if line.contains('\n') {
                return Err(Error::InvalidArgument(format!(
                    "a ref record for {} spans several lines",
                    self.path.display()
                )));
            }
            payload.push_str(line);
            payload.push('\n');
            ends.push(payload.len());
        }
        let mut writer = lock(&self.writer);
        self.append(&mut writer, payload.as_bytes(), &ends)
    }

    fn published(&self) -> u64 {
        lock(&self.writer).published
    }

    fn close(&self) -> Result<()> {
        sidecar::write_synced(&self.path, CLOSED, "")
    }

    fn fail(&self, reason: &str) -> Result<()> {
        let default = match self.role {
            ChannelRole::Channel => "producer failed",
            ChannelRole::Inbox => "ref-distributor failed",
        };
        sidecar::write_synced(&self.path, FAILED, if reason.is_empty() { default } else { reason })
    }

    fn consumed_remote(&self) -> Result<u64> {
        sidecar::read_counter(&self.path)
    }

    fn consumer_failure(&self) -> Result<Option<String>> {
        sidecar::read_failure(&self.path, CONSUMER_FAILED)
    }

    fn consumer_stopped(&self) -> Result<bool> {
        Ok(sidecar::exists(&self.path, CONSUMER_DONE) || sidecar::exists(&self.path, CONSUMER_FAILED))
    }

    fn consumer_quantum(&self) -> Result<Option<u64>> {
        sidecar::read_quantum(&self.path)
    }
}

impl RefSource for FileRefChannel {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn upstream(&self) -> &'static str {
        match self.role {
            ChannelRole::Channel => "producer",
            ChannelRole::Inbox => "ref-distributor",
        }
    }

    fn poll(&self, max: Option<usize>) -> Result<Vec<SampleRef>> {
        self.take(max, |offset, line| self.parse(offset, &line).map_err(|e| Box::new((e, line))))
    }

    fn poll_records(&self, max: Option<usize>) -> Result<Vec<RefRecord>> {
        self.take(max, |offset, line| {
            let context = format!("{} at byte {offset}", self.path.display());
            let text = match String::from_utf8(line) {
                Ok(text) => text,
                Err(e) => {
                    let message = format!("not UTF-8: {}", e.utf8_error());
                    let error = Error::Corrupt { what: format!("ref channel {context}"), message };
                    return Err(Box::new((error, e.into_bytes())));
                }
            };
            match RefRecord::head(&text, &context) {
                Ok((sample_id, source_task_id)) => {
                    Ok(RefRecord { sample_id, source_task_id, line: text.into_boxed_str() })
                }
                Err(e) => Err(Box::new((e, text.into_bytes()))),
            }
        })
    }

    fn is_closed(&self) -> Result<bool> {
        if self.role == ChannelRole::Inbox
            && let Some(e) = self.failure_error()?
        {
            return Err(e);
        }
        Ok(sidecar::exists(&self.path, CLOSED))
    }

    fn failure(&self) -> Result<Option<String>> {
        let text = sidecar::read_failure(&self.path, FAILED)?;
        Ok(match self.role {
            ChannelRole::Channel => text,
            ChannelRole::Inbox => text.map(|t| format!("{DISTRIBUTOR_DIED}{t}")),
        })
    }

    fn mark_consumed(&self, n: u64) -> Result<()> {
        // The in-memory count is authoritative and published as an absolute value, so the
        // trainer's ack thread and a prefetch failure path may both call this.
        let mut consumed = lock(&self.consumed);
        *consumed += n;
        sidecar::write_counter(&self.path, *consumed)
    }

    fn seed_consumed(&self) -> Result<u64> {
        let mut consumed = lock(&self.consumed);
        *consumed = sidecar::read_counter_strict(&self.path)?;
        Ok(*consumed)
    }

    fn consumed(&self) -> u64 {
        *lock(&self.consumed)
    }

    fn mark_consumer_done(&self) -> Result<()> {
        sidecar::write_synced(&self.path, CONSUMER_DONE, "")
    }

    fn mark_consumer_failed(&self, reason: &str) -> Result<()> {
        sidecar::write_synced(&self.path, CONSUMER_FAILED, if reason.is_empty() { "consumer failed" } else { reason })
    }

    fn publish_consumer_quantum(&self, quantum: u64, allow_existing: bool) -> Result<()> {
        if quantum < 1 {
            return Err(Error::InvalidArgument(format!("consumer quantum must be at least 1, got {quantum}")));
        }
        if sidecar::create_quantum(&self.path, quantum)? {
            return Ok(());
        }
        let existing = sidecar::read_quantum(&self.path)?;
        match existing {
            Some(q) if allow_existing && q == quantum => Ok(()),
            Some(q) if allow_existing => Err(Error::InvalidArgument(format!(
                "consumer quantum changed across resume for {}: the channel holds {q}, this attempt needs {quantum} \
                 (dp_size x batch_size x accumulation must stay the same to resume)",
                self.path.display()
            ))),
            _ => Err(Error::InvalidArgument(format!(
                "{} already holds a consumer quantum ({}); every online attempt requires a fresh reference channel",
                self.path.display(),
                existing.map_or_else(|| "unreadable".to_owned(), |q| q.to_string())
            ))),
        }
    }
}
