//! The shared-directory backend (`dir://<root>`): one file per sample generation on a POSIX
//! directory that several processes (or nodes, over a shared mount) see.
//!
//! Layout (SpecForge's `SharedDirFeatureStore` naming):
//!
//! ```text
//! <root>/<store_id>/<sample_id>.g<generation>.safetensors   a sample generation (ferry writes)
//! <root>/<store_id>/<sample_id>.g<generation>.ckpt          a sample generation (SpecForge writes; PyTorch zip)
//! <root>/<store_id>/<final name>.<32 hex>.tmp               a write in progress, renamed over the final name
//! <root>/<store_id>/.ferry-generation                       store-wide generation high-water mark (flock'd)
//! ```
//!
//! ferry writes safetensors (the reference layout, readable by every framework) rather than
//! PyTorch zip archives; SpecForge's `.ckpt` files are recognised by name, and reading them needs
//! the PyTorch zip reader (issue 3). Until then a `.ckpt` sample gets an error that says so.
//!
//! Generations: SpecForge derives a sample's next generation from the files on disk
//! (`max + 1`), which reuses generation 1 once a consumed sample's file is gone, so a stale ref
//! could alias new bytes. ferry keeps a store-wide high-water mark in `.ferry-generation`,
//! updated under an exclusive `flock`, seeded once per process from the largest generation on
//! disk: generations are monotonic across every process that shares the directory.
//!
//! Copies: `write` streams each tensor from the caller's buffer into the file (one copy, into the
//! page cache); `read_into` reads with `pread` straight into the caller's buffer (one copy). No
//! fsync: a crash loses only samples that were never acknowledged, which the producer re-creates.

use crate::backend::{BackendUsage, ByteBackend, ObjectData, ObjectKey, Removal, SampleKey};
use ferry_core::{DType, Error, Generation, Result, SampleId, StoreId};
use std::borrow::Cow;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Extension of files ferry writes.
pub const SAFETENSORS_EXT: &str = "safetensors";
/// Extension of files SpecForge writes (PyTorch zip).
pub const CKPT_EXT: &str = "ckpt";
/// Name of the generation high-water-mark file.
pub const GENERATION_FILE: &str = ".ferry-generation";
/// Largest safetensors header accepted (the reference library's own limit): a corrupt length
/// must not make us allocate gigabytes.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Longest file name most POSIX file systems accept.
const MAX_FILE_NAME: usize = 255;

/// Checks that `id` can be one path component.
pub fn validate_path_component(what: &str, id: &str) -> Result<()> {
    if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{what} {id:?} cannot name a file in a shared directory (empty, '.', '..', or contains '/' or NUL)"
        )));
    }
    if id.len() + 48 > MAX_FILE_NAME {
        return Err(Error::InvalidArgument(format!(
            "{what} {:?}... is {} bytes; shared-directory file names allow at most {} bytes",
            &id[..id.len().min(32)],
            id.len(),
            MAX_FILE_NAME - 48
        )));
    }
    Ok(())
}

/// Parses `<sid>.g<gen>.<ext>` (SpecForge's regex `^(?P<sid>.+)\.g(?P<gen>\d+)\.ckpt$`, greedy
/// on the sample id), for both extensions.
pub fn parse_sample_file_name(name: &str) -> Option<(&str, Generation, &str)> {
    let (stem, ext) = name.rsplit_once('.')?;
    if ext != SAFETENSORS_EXT && ext != CKPT_EXT {
        return None;
    }
    let (sid, digits) = stem.rsplit_once(".g")?;
    if sid.is_empty() || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((sid, Generation::new(digits.parse().ok()?), ext))
}

fn st_dtype(dtype: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match dtype {
        DType::Float32 => S::F32,
        DType::Float64 => S::F64,
        DType::Float16 => S::F16,
        DType::BFloat16 => S::BF16,
        DType::Int64 => S::I64,
        DType::Int32 => S::I32,
        DType::Int16 => S::I16,
        DType::Int8 => S::I8,
        DType::UInt8 => S::U8,
        DType::Bool => S::BOOL,
    }
}

/// Writes one sample generation as a safetensors file at `path`: to `<path>.<32 hex>.tmp`
/// first, then renamed over `path`, so readers never see a partial file.
pub fn write_safetensors_atomically(path: &Path, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
    let tmp = PathBuf::from(format!("{}.{}.tmp", path.display(), uuid::Uuid::new_v4().simple()));
    let backend_err = |op: &str, key: &Path, message: String| Error::Backend {
        backend: "shared_dir".into(),
        operation: op.into(),
        key: key.display().to_string(),
        message,
    };
    let views: Vec<StView<'_>> =
        objects.iter().map(|o| StView(o.tensor, o.tensor.shape().iter().map(|d| *d as usize).collect())).collect();
    let info = std::collections::HashMap::from([
        ("format".to_owned(), "ferry".to_owned()),
        ("sample_id".to_owned(), sample.sample_id.to_string()),
        ("generation".to_owned(), sample.generation.to_string()),
    ]);
    let result = safetensors::serialize_to_file(objects.iter().map(|o| o.name).zip(views.iter()), Some(info), &tmp)
        .map_err(|e| backend_err("write", &tmp, e.to_string()))
        .and_then(|()| fs::rename(&tmp, path).map_err(|e| backend_err("rename", path, e.to_string())));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// A tensor as the safetensors writer sees it: borrowed bytes, no copy.
struct StView<'a>(ferry_core::TensorView<'a>, Vec<usize>);

impl safetensors::View for &StView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        st_dtype(self.0.dtype())
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.0.bytes())
    }
    fn data_len(&self) -> usize {
        self.0.bytes().len()
    }
}

/// A parsed safetensors header: where each tensor's bytes start in the file.
struct Header {
    meta: safetensors::tensor::Metadata,
    /// File offset of the data section.
    data_start: u64,
}

impl Header {
    fn read(file: &mut File, path: &Path) -> Result<Header> {
        let corrupt =
            |message: String| Error::Corrupt { what: format!("safetensors file {}", path.display()), message };
        let mut len = [0u8; 8];
        file.read_exact(&mut len).map_err(|e| corrupt(format!("cannot read the 8-byte header length: {e}")))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER_BYTES {
            return Err(corrupt(format!("header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header).map_err(|e| corrupt(format!("header of {n} bytes is truncated: {e}")))?;
        let meta: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| corrupt(format!("invalid header: {e}")))?;
        Ok(Header { meta, data_start: 8 + n })
    }
}

/// Reads into `dst` at `offset` until it is full or the file ends; returns the bytes read.
fn read_full_at(file: &File, dst: &mut [u8], mut offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < dst.len() {
        match file.read_at(&mut dst[done..], offset) {
            Ok(0) => break, // truncated: the core reports a short read
            Ok(n) => {
                done += n;
                offset += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A shared POSIX directory of sample files.
pub struct SharedDirBackend {
    root: PathBuf,
    /// Store ids whose generation mark this process has seeded from the files on disk.
    seeded: Mutex<std::collections::HashSet<StoreId>>,
}

impl SharedDirBackend {
    /// A backend over `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| Error::io(format!("creating store root {}", root.display()), &e))?;
        Ok(SharedDirBackend { root, seeded: Mutex::new(std::collections::HashSet::new()) })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<store_id>`, created if missing.
    pub fn store_dir(&self, store_id: &StoreId) -> Result<PathBuf> {
        validate_path_component("store id", store_id.as_str())?;
        let dir = self.root.join(store_id.as_str());
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("creating store directory {}", dir.display()), &e))?;
        Ok(dir)
    }

    /// Path of a sample generation's file with the given extension.
    pub fn sample_path(&self, sample: SampleKey<'_>, ext: &str) -> Result<PathBuf> {
        validate_path_component("sample id", sample.sample_id.as_str())?;
        validate_path_component("store id", sample.store_id.as_str())?;
        Ok(self.root.join(sample.store_id.as_str()).join(format!("{}.g{}.{ext}", sample.sample_id, sample.generation)))
    }

    fn io_err(&self, op: &str, key: impl ToString, e: &std::io::Error) -> Error {
        Error::Backend {
            backend: "shared_dir".into(),
            operation: op.into(),
            key: key.to_string(),
            message: e.to_string(),
        }
    }

    /// Opens the sample file; a SpecForge `.ckpt` twin gets an error naming the missing reader.
    fn open_sample(&self, object: ObjectKey<'_>) -> Result<(File, PathBuf)> {
        let path = self.sample_path(object.sample, SAFETENSORS_EXT)?;
        match File::open(&path) {
            Ok(f) => Ok((f, path)),
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let ckpt = self.sample_path(object.sample, CKPT_EXT)?;
                if ckpt.exists() {
                    return Err(Error::Corrupt {
                        what: format!("sample file {}", ckpt.display()),
                        message: "SpecForge writes PyTorch zip (.ckpt) sample files; reading them needs ferry's PyTorch reader, which this build does not have yet".into(),
                    });
                }
                Err(Error::NotFound { what: format!("object {object}") })
            }
            Err(e) => Err(self.io_err("open", path.display(), &e)),
        }
    }

    /// Every sample file in the store directory: (sample id, generation, path, size).
    fn scan(&self, store_id: &StoreId) -> Result<Vec<(String, Generation, PathBuf, u64)>> {
        let dir = self.store_dir(store_id)?;
        let entries = fs::read_dir(&dir).map_err(|e| self.io_err("list", dir.display(), &e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io_err("list", dir.display(), &e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some((sid, generation, _)) = parse_sample_file_name(name) {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                out.push((sid.to_owned(), generation, entry.path(), size));
            }
        }
        Ok(out)
    }
}

impl ByteBackend for SharedDirBackend {
    fn kind(&self) -> &'static str {
        "shared_dir"
    }

    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        self.store_dir(sample.store_id)?;
        write_safetensors_atomically(&self.sample_path(sample, SAFETENSORS_EXT)?, sample, objects)
    }

    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        let mut reads = [(object.name, dst)];
        Ok(self.read_many(object.sample, &mut reads)?[0])
    }

    fn read_many(&self, sample: SampleKey<'_>, reads: &mut [(&str, &mut [u8])]) -> Result<Vec<usize>> {
        let Some((first, _)) = reads.first() else { return Ok(Vec::new()) };
        let (mut file, path) = self.open_sample(sample.object(first))?;
        let header = Header::read(&mut file, &path)?;
        let mut counts = Vec::with_capacity(reads.len());
        for (name, dst) in reads.iter_mut() {
            let object = sample.object(name);
            let info = header.meta.info(name).ok_or_else(|| Error::NotFound { what: format!("object {object}") })?;
            let (start, end) = info.data_offsets;
            let len = end - start;
            if len > dst.len() {
                return Err(Error::Corrupt {
                    what: format!("object {object}"),
                    message: format!(
                        "holds {len} bytes but its spec needs {}; the ref does not describe this file",
                        dst.len()
                    ),
                });
            }
            counts.push(
                read_full_at(&file, &mut dst[..len], header.data_start + start as u64)
                    .map_err(|e| self.io_err("read", path.display(), &e))?,
            );
        }
        Ok(counts)
    }

    fn remove(&self, sample: SampleKey<'_>, _names: &[String], _force: bool) -> Result<Removal> {
        for ext in [SAFETENSORS_EXT, CKPT_EXT] {
            let path = self.sample_path(sample, ext)?;
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(self.io_err("remove", path.display(), &e)),
            }
        }
        Ok(Removal::Removed)
    }

    fn exists(&self, object: ObjectKey<'_>) -> Result<bool> {
        Ok(self.size(object)?.is_some())
    }

    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>> {
        let (mut file, path) = match self.open_sample(object) {
            Ok(f) => f,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let header = Header::read(&mut file, &path)?;
        Ok(header.meta.info(object.name).map(|i| (i.data_offsets.1 - i.data_offsets.0) as u64))
    }

    fn reserve_generation(
        &self,
        store_id: &StoreId,
        _sample_id: &SampleId,
        proposed: Generation,
    ) -> Result<Generation> {
        let dir = self.store_dir(store_id)?;
        let path = dir.join(GENERATION_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| self.io_err("open", path.display(), &e))?;
        file.lock().map_err(|e| self.io_err("lock", path.display(), &e))?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|e| self.io_err("read", path.display(), &e))?;
        let mut high = text.trim().parse::<u64>().ok();
        let mut seeded = self.seeded.lock().map_err(|_| Error::InvalidArgument("generation lock poisoned".into()))?;
        if high.is_none() || !seeded.contains(store_id) {
            // First use of this store in this process, or an unreadable mark: trust the files
            // on disk too.
            let on_disk = self.scan(store_id)?.into_iter().map(|(_, g, _, _)| g.get()).max().unwrap_or(0);
            high = Some(high.unwrap_or(0).max(on_disk));
            seeded.insert(store_id.clone());
        }
        let next = high.unwrap_or(0).checked_add(1).ok_or_else(|| Error::Backend {
            backend: "shared_dir".into(),
            operation: "reserve generation".into(),
            key: path.display().to_string(),
            message: "the store has reached the largest generation (u64::MAX); a file or the mark is corrupt".into(),
        })?;
        let generation = proposed.get().max(next);
        file.set_len(0).map_err(|e| self.io_err("truncate", path.display(), &e))?;
        file.seek(SeekFrom::Start(0)).map_err(|e| self.io_err("seek", path.display(), &e))?;
        file.write_all(format!("{generation}\n").as_bytes()).map_err(|e| self.io_err("write", path.display(), &e))?;
        // Dropping the file releases the lock.
        Ok(Generation::new(generation))
    }

    fn latest_generation(&self, store_id: &StoreId, sample_id: &SampleId) -> Result<Option<Generation>> {
        Ok(self.scan(store_id)?.into_iter().filter(|(sid, ..)| sid == sample_id.as_str()).map(|(_, g, ..)| g).max())
    }

    fn object_names(&self, sample: SampleKey<'_>) -> Result<Option<Vec<String>>> {
        let path = self.sample_path(sample, SAFETENSORS_EXT)?;
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io_err("open", path.display(), &e)),
        };
        Ok(Some(Header::read(&mut file, &path)?.meta.offset_keys()))
    }

    fn ref_uri(&self, store_id: &StoreId, sample_id: &SampleId, _generation: Generation) -> String {
        format!("disagg://{store_id}/{sample_id}")
    }

    fn usage(&self, store_id: &StoreId) -> Result<Option<BackendUsage>> {
        let files = self.scan(store_id)?;
        let samples: std::collections::HashSet<&str> = files.iter().map(|(sid, ..)| sid.as_str()).collect();
        Ok(Some(BackendUsage { samples: samples.len() as u64, bytes: files.iter().map(|f| f.3).sum() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_parse_like_specforge_regex() {
        assert_eq!(parse_sample_file_name("run0:task0.g1.ckpt"), Some(("run0:task0", Generation::new(1), "ckpt")));
        assert_eq!(parse_sample_file_name("a.g1.g22.safetensors"), Some(("a.g1", Generation::new(22), "safetensors")));
        assert_eq!(parse_sample_file_name("a.g1.ckpt.0123abcd.tmp"), None);
        assert_eq!(parse_sample_file_name("a.gx.ckpt"), None);
        assert_eq!(parse_sample_file_name(".g1.ckpt"), None);
    }

    #[test]
    fn path_components_are_validated() {
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(validate_path_component("sample id", bad).is_err(), "{bad:?}");
        }
        assert!(validate_path_component("sample id", "run0:task0").is_ok());
        assert!(validate_path_component("sample id", &"x".repeat(300)).is_err());
    }
}
