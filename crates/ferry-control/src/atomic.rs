//! Atomic replacement of small control files: write a temp file beside the target, flush,
//! fsync, rename over the target. Readers see the old file or the new one, never a partial one.

use ferry_core::{Error, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through `tmp` (same directory), with fsync before the rename.
pub fn write_via(path: &Path, tmp: &Path, bytes: &[u8]) -> Result<()> {
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(tmp)?;
        file.write_all(bytes)?;
        file.flush()?;
        file.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(tmp);
        Error::io(format!("writing {}", path.display()), &e)
    })
}

/// A control file's temp name: SpecForge's `<path>.tmp.<pid>` plus `.<thread>`.
pub fn pid_temp(path: &Path) -> PathBuf {
    // The thread too: two ranks of one process may write the same sidecar at once.
    PathBuf::from(format!("{}.tmp.{}.{}", path.display(), std::process::id(), thread_tag()))
}

/// A number unique to the calling thread (for temp names).
pub fn thread_tag() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    std::thread::current().id().hash(&mut hasher);
    hasher.finish()
}

/// Creates the directory `path` will live in, if it has one.
pub fn ensure_parent(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(format!("creating {}", parent.display()), &e))?;
    }
    Ok(())
}

/// Writes a control file atomically through its temp name ([`pid_temp`]), creating the parent directory.
pub fn write_control_file(path: &Path, bytes: &[u8]) -> Result<()> {
    ensure_parent(path)?;
    write_via(path, &pid_temp(path), bytes)
}
