//! The one seam where a channel's appends touch the filesystem ([`AppendFs`]), so tests can
//! inject the failures SpecForge's suite injects (a write that stops halfway, an fsync error)
//! against the real publish logic instead of a copy of it.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens files for appending.
pub trait AppendFs: Send + Sync + std::fmt::Debug {
    /// Opens `path` for appending, creating it (mode 0644) if missing.
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>>;
}

/// A file opened for appending.
pub trait AppendFile {
    /// Writes some of `buf`, returning how many bytes reached the kernel (0 = no progress).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    /// Flushes the file to stable storage (fsync).
    fn sync(&mut self) -> io::Result<()>;
}

/// The real filesystem.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealFs;

struct RealFile(std::fs::File);

impl AppendFs for RealFs {
    fn open_append(&self, path: &Path) -> io::Result<Box<dyn AppendFile>> {
        let file = OpenOptions::new().append(true).create(true).mode(0o644).open(path)?;
        Ok(Box::new(RealFile(file)))
    }
}

impl AppendFile for RealFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}
