//! Reading tensors out of opened tensor files, shared by every file-backed read path (`dir://`
//! samples and `file://` offline refs), and the small cache of opened offline files that lets a
//! loader describe a lazy ref and then read it with one open of its file.
//!
//! Why a cache: a lazy `file://` ref carries no specs, so a loader first asks the store to
//! describe it (to size and pad its batch), then reads it. Without the cache each of those steps
//! opens and parses the file again, and a `.ckpt.gz` is decompressed again. The cache keeps the
//! file a `describe` opened until the read that follows takes it out; it is bounded in entries
//! and in decompressed bytes (mapped files cost no memory of their own), and evicts the oldest
//! entry first, so a describe that is never followed by a read cannot pin memory for long.

use ferry_core::{Error, Result};
use ferry_format::TensorFile;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Copies tensor `name` of `file` (made contiguous) into `dst`, which may be shorter than the
/// tensor (it then receives the tensor's first bytes). Returns the tensor's full size, which the
/// caller checks against the ref's spec. A strided tensor read whole is gathered straight into
/// `dst`; only a strided prefix goes through a contiguous copy first.
pub(crate) fn copy_tensor_prefix(file: &TensorFile, name: &str, dst: &mut [u8]) -> Result<u64> {
    let held = file.spec(name)?.nbytes()?;
    let want = dst.len() as u64;
    if want == held {
        file.read_into(name, dst)?;
    } else if want < held {
        let tensor = file.tensor(name)?;
        let src = tensor.view().bytes();
        let n = dst.len();
        dst.copy_from_slice(src.get(..n).ok_or_else(|| Error::Corrupt {
            what: format!("tensor {name:?}"),
            message: format!("holds {} bytes, fewer than its header says ({held})", src.len()),
        })?);
    }
    // want > held: nothing copied; the caller reports the short object.
    Ok(held)
}

/// What identifies one version of a file on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileIdentity {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
}

fn identity(path: &Path) -> Option<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    Some(FileIdentity { len: meta.len(), modified: meta.modified().ok(), inode: meta.ino() })
}

struct Entry {
    path: PathBuf,
    identity: FileIdentity,
    file: Arc<TensorFile>,
    owned_bytes: u64,
}

/// A bounded cache of opened offline files, keyed by path and checked against the file's
/// identity (length, mtime, inode), so a file replaced on disk is opened afresh.
pub(crate) struct OpenFileCache {
    entries: Mutex<VecDeque<Entry>>,
    max_entries: usize,
    max_owned_bytes: u64,
}

impl OpenFileCache {
    /// A cache of at most `max_entries` files holding at most `max_owned_bytes` of decompressed
    /// bytes between them.
    pub(crate) fn new(max_entries: usize, max_owned_bytes: u64) -> Self {
        OpenFileCache { entries: Mutex::new(VecDeque::new()), max_entries, max_owned_bytes }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Entry>> {
        // Each critical section is a single push or removal: a poisoned queue is consistent.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file at `path`: the cached one if it is still the same file on disk (kept in the
    /// cache when `keep`, taken out otherwise), else freshly opened (and cached when `keep`).
    pub(crate) fn open(&self, path: &Path, keep: bool) -> Result<Arc<TensorFile>> {
        let current = identity(path);
        {
            let mut entries = self.lock();
            if let Some(i) = entries.iter().position(|e| e.path == path) {
                let fresh = current.as_ref() == Some(&entries[i].identity);
                let entry = entries.remove(i);
                if let Some(entry) = entry.filter(|_| fresh) {
                    let file = Arc::clone(&entry.file);
                    if keep {
                        entries.push_back(entry);
                    }
                    return Ok(file);
                }
            }
        }
        let file = Arc::new(TensorFile::open(path)?);
        if keep && let Some(identity) = current {
            let owned_bytes = if file.is_mapped() { 0 } else { file_owned_bytes(&file) };
            if owned_bytes <= self.max_owned_bytes && self.max_entries > 0 {
                let mut entries = self.lock();
                entries.push_back(Entry { path: path.to_owned(), identity, file: Arc::clone(&file), owned_bytes });
                let mut total: u64 = entries.iter().map(|e| e.owned_bytes).sum();
                while entries.len() > self.max_entries || total > self.max_owned_bytes {
                    match entries.pop_front() {
                        Some(old) => total -= old.owned_bytes,
                        None => break,
                    }
                }
            }
        }
        Ok(file)
    }

    /// Files held now (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Bytes an unmapped (decompressed) file holds: the sum of its tensors' sizes is a close lower
/// bound of its buffer.
fn file_owned_bytes(file: &TensorFile) -> u64 {
    file.specs().values().filter_map(|s| s.nbytes().ok()).fold(0u64, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::TensorView;

    fn write(path: &Path, values: &[i64]) {
        ferry_format::write_torch_zip(
            path,
            &[("x", TensorView::from_elements(&[values.len() as u64], values).unwrap())],
        )
        .unwrap();
    }

    #[test]
    fn a_kept_file_is_reused_once_then_taken_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ckpt");
        write(&path, &[1, 2, 3]);
        let cache = OpenFileCache::new(4, 1 << 20);
        let first = cache.open(&path, true).unwrap();
        assert_eq!(cache.len(), 1);
        let second = cache.open(&path, false).unwrap();
        assert!(Arc::ptr_eq(&first, &second), "the read must reuse the file the describe opened");
        assert_eq!(cache.len(), 0, "the read takes the file out");
        let third = cache.open(&path, false).unwrap();
        assert!(!Arc::ptr_eq(&first, &third));
    }

    #[test]
    fn a_replaced_file_is_opened_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ckpt");
        write(&path, &[1, 2, 3]);
        let cache = OpenFileCache::new(4, 1 << 20);
        cache.open(&path, true).unwrap();
        let tmp = dir.path().join("b.ckpt");
        write(&tmp, &[7, 8, 9, 10]);
        std::fs::rename(&tmp, &path).unwrap();
        let file = cache.open(&path, false).unwrap();
        assert_eq!(file.spec("x").unwrap().shape, vec![4]);
    }

    #[test]
    fn the_cache_is_bounded_in_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = OpenFileCache::new(2, 1 << 20);
        for i in 0..5 {
            let path = dir.path().join(format!("{i}.ckpt"));
            write(&path, &[i]);
            cache.open(&path, true).unwrap();
        }
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn prefix_copies_take_the_first_bytes_and_report_the_full_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.ckpt");
        write(&path, &[1, 2, 3, 4]);
        let file = TensorFile::open(&path).unwrap();
        let mut two = [0u8; 16];
        assert_eq!(copy_tensor_prefix(&file, "x", &mut two).unwrap(), 32);
        assert_eq!(two[..8], 1i64.to_le_bytes());
        assert_eq!(two[8..], 2i64.to_le_bytes());
        let mut all = [0u8; 32];
        assert_eq!(copy_tensor_prefix(&file, "x", &mut all).unwrap(), 32);
        assert_eq!(all[24..], 4i64.to_le_bytes());
    }
}
