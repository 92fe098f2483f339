//! The shared-directory backend (`dir://<root>`): one file per sample generation on a POSIX
//! directory that several processes (or nodes, over a shared mount) see.
//!
//! Layout (SpecForge's `SharedDirFeatureStore` naming):
//!
//! ```text
//! <root>/<store_id>/<sample_id>.g<generation>.ckpt          PyTorch zip (torch.save format): ferry's default, and SpecForge's
//! <root>/<store_id>/<sample_id>.g<generation>.safetensors   safetensors, when the backend is set to write it
//! <root>/<store_id>/<final name>.<32 hex>.tmp               a write in progress, renamed over the final name
//! <root>/<store_id>/.ferry-generation                       store-wide generation high-water mark (flock'd)
//! ```
//!
//! ferry writes PyTorch zip by default so that a SpecForge consumer (`SharedDirFeatureStore`,
//! `torch.load(..., weights_only=True)`) reads what a ferry producer wrote; safetensors is the
//! choice for ferry-only deployments that want a format every framework reads. Both are read,
//! whichever wrote them, through `ferry_format::TensorFile` (a read-only mapping).
//!
//! Generations: SpecForge derives a sample's next generation from the files on disk
//! (`max + 1`), which reuses generation 1 once a consumed sample's file is gone, so a stale ref
//! could alias new bytes. ferry keeps a store-wide high-water mark in `.ferry-generation`,
//! updated under an exclusive `flock`, seeded once per process and store from the largest
//! generation on disk: generations are monotonic across every process sharing the directory
//! that keeps the mark. A writer that does not keep it (SpecForge's `SharedDirFeatureStore`
//! numbers a re-put from the sample's own files) cannot make ferry reuse its generation: the
//! reservation steps over any file of the sample at the proposed generation (two `stat`s), and
//! the file is published only if its name is free (`link`, never a rename over it), so a ref
//! that is already out never reads new bytes.
//!
//! Superseded files: a put frees the generation this process's index knows (the lifecycle
//! core's job). With [`Supersede::Scan`] (`dir://<root>?supersede=scan`) a put also removes
//! every older generation file of its sample, whoever wrote it, as SpecForge's put does: for
//! stores where several processes, or SpecForge, re-put the same sample ids, so that their
//! stale refs are refused and no old file leaks. It costs one listing of the store directory per
//! put, which grows with the directory (about 70 ms at 100k files), so it is off by default: an
//! ingest of a whole dump into one directory never re-puts.
//!
//! Copies: `write` streams each tensor from the caller's buffer into the file (one copy, into the
//! page cache); `read_many` maps the file and copies each tensor once into the caller's buffer.
//! No fsync: a crash loses only samples that were never acknowledged, which the producer
//! re-creates.

use crate::backend::{BackendUsage, ByteBackend, ObjectData, ObjectKey, Removal, SampleKey};
use ferry_core::{Error, Generation, Result, SampleId, StoreId};
use ferry_format::Publish;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Extension of safetensors sample files.
pub const SAFETENSORS_EXT: &str = "safetensors";
/// Extension of PyTorch zip sample files (what SpecForge writes and reads).
pub const CKPT_EXT: &str = "ckpt";

/// The file format a shared-directory backend writes (it reads both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirFormat {
    /// PyTorch zip (`.ckpt`), readable by SpecForge's Python consumers. The default.
    #[default]
    TorchZip,
    /// safetensors (`.safetensors`).
    Safetensors,
}

impl DirFormat {
    /// The file extension.
    pub fn extension(self) -> &'static str {
        match self {
            DirFormat::TorchZip => CKPT_EXT,
            DirFormat::Safetensors => SAFETENSORS_EXT,
        }
    }

    /// Parses `ckpt` / `torch` or `safetensors`.
    pub fn parse(s: &str) -> Result<DirFormat> {
        match s {
            "ckpt" | "torch" | "torch_zip" => Ok(DirFormat::TorchZip),
            "safetensors" => Ok(DirFormat::Safetensors),
            other => Err(Error::InvalidArgument(format!(
                "unknown shared-directory format {other:?}: use ckpt (PyTorch zip, the default) or safetensors"
            ))),
        }
    }
}
/// What a put does about older generation files of its sample that this process's index does
/// not know (written by another process, or by SpecForge).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Supersede {
    /// Leave them (their writers free them): a put costs O(1) directory operations.
    #[default]
    Own,
    /// List the store directory and remove them, and number the put above them: one listing per
    /// put. SpecForge's behaviour.
    Scan,
}

impl Supersede {
    /// Parses `own` or `scan`.
    pub fn parse(s: &str) -> Result<Supersede> {
        match s {
            "own" => Ok(Supersede::Own),
            "scan" => Ok(Supersede::Scan),
            other => Err(Error::InvalidArgument(format!(
                "unknown supersede mode {other:?}: use own (the default: a put frees what this process wrote) or \
                 scan (a put removes every older generation file of its sample, as SpecForge's does)"
            ))),
        }
    }
}

/// Name of the generation high-water-mark file.
pub const GENERATION_FILE: &str = ".ferry-generation";
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

/// Writes one sample generation's objects to `path` in `format` (temp file + rename inside
/// `ferry_format`), so readers never see a partial file.
pub fn write_sample_file(path: &Path, format: DirFormat, objects: &[ObjectData<'_>]) -> Result<()> {
    write_sample_file_as(path, format, objects, Publish::Replace)
}

/// [`write_sample_file`], published as `publish` says ([`Publish::New`]: only under a free name).
pub fn write_sample_file_as(
    path: &Path,
    format: DirFormat,
    objects: &[ObjectData<'_>],
    publish: Publish,
) -> Result<()> {
    let tensors: Vec<(&str, ferry_core::TensorView<'_>)> = objects.iter().map(|o| (o.name, o.tensor)).collect();
    match format {
        DirFormat::TorchZip => ferry_format::write_torch_zip_as(path, &tensors, publish),
        DirFormat::Safetensors => ferry_format::write_safetensors_as(path, &tensors, publish),
    }
}

/// A shared POSIX directory of sample files.
pub struct SharedDirBackend {
    root: PathBuf,
    format: DirFormat,
    supersede: Supersede,
    /// Store ids whose generation mark this process has seeded from the files on disk.
    seeded: Mutex<std::collections::HashSet<StoreId>>,
}

impl SharedDirBackend {
    /// A backend over `root` (created if missing).
    pub fn new(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(|e| Error::io(format!("creating store root {}", root.display()), &e))?;
        Ok(SharedDirBackend {
            root,
            format: DirFormat::default(),
            supersede: Supersede::default(),
            seeded: Mutex::new(std::collections::HashSet::new()),
        })
    }

    /// The same backend, writing `format`.
    pub fn with_format(mut self, format: DirFormat) -> Self {
        self.format = format;
        self
    }

    /// The same backend, handling other writers' older generation files as `supersede` says.
    pub fn with_supersede(mut self, supersede: Supersede) -> Self {
        self.supersede = supersede;
        self
    }

    /// The format this backend writes.
    pub fn format(&self) -> DirFormat {
        self.format
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

    /// The extensions a sample generation's file may have: this store's format first.
    fn extensions(&self) -> [&'static str; 2] {
        match self.format {
            DirFormat::TorchZip => [CKPT_EXT, SAFETENSORS_EXT],
            DirFormat::Safetensors => [SAFETENSORS_EXT, CKPT_EXT],
        }
    }

    /// Opens a sample generation's file (this store's format first, then the other); a missing
    /// file is `NotFound`. No existence check first: the open itself tells.
    fn open_sample(&self, sample: SampleKey<'_>) -> Result<ferry_format::TensorFile> {
        for ext in self.extensions() {
            match ferry_format::TensorFile::open(&self.sample_path(sample, ext)?) {
                Err(Error::Io { kind: ErrorKind::NotFound, .. }) => continue,
                other => return other,
            }
        }
        Err(Error::NotFound { what: format!("sample file {sample}") })
    }

    /// This sample's files in the store directory: (generation, path). One directory listing;
    /// names are matched on their `<sample_id>.g` prefix before being parsed.
    fn sample_files(&self, store_id: &StoreId, sample_id: &SampleId) -> Result<Vec<(Generation, PathBuf)>> {
        let mut out = Vec::new();
        self.list(store_id, Some(&format!("{sample_id}.g")), |sid, generation, entry| {
            if sid == sample_id.as_str() {
                out.push((generation, entry.path()));
            }
        })?;
        Ok(out)
    }

    /// Every sample file in the store directory: (sample id, generation, path, size).
    fn scan(&self, store_id: &StoreId) -> Result<Vec<(String, Generation, PathBuf, u64)>> {
        let mut out = Vec::new();
        self.list(store_id, None, |sid, generation, entry| {
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((sid.to_owned(), generation, entry.path(), size));
        })?;
        Ok(out)
    }

    /// Lists the store directory once, calling `found(sample id, generation, entry)` for every
    /// sample file whose name starts with `prefix` (all of them for `None`).
    fn list(
        &self,
        store_id: &StoreId,
        prefix: Option<&str>,
        mut found: impl FnMut(&str, Generation, &fs::DirEntry),
    ) -> Result<()> {
        let dir = self.store_dir(store_id)?;
        let entries = fs::read_dir(&dir).map_err(|e| self.io_err("list", dir.display(), &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| self.io_err("list", dir.display(), &e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if prefix.is_some_and(|p| !name.starts_with(p)) {
                continue;
            }
            if let Some((sid, generation, _)) = parse_sample_file_name(name) {
                found(sid, generation, &entry);
            }
        }
        Ok(())
    }
}

impl ByteBackend for SharedDirBackend {
    fn kind(&self) -> &'static str {
        "shared_dir"
    }

    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        self.store_dir(sample.store_id)?;
        let path = self.sample_path(sample, self.format.extension())?;
        match write_sample_file_as(&path, self.format, objects, Publish::New) {
            Err(Error::Io { kind: ErrorKind::AlreadyExists, .. }) => {
                // Another writer published this very generation between the reservation and now
                // (one that does not keep the mark): never rename over it.
                return Err(Error::Backend {
                    backend: "shared_dir".into(),
                    operation: "write".into(),
                    key: path.display().to_string(),
                    message: format!(
                        "generation {} of sample {} was published by another writer that does not keep {GENERATION_FILE} \
                         (SpecForge's SharedDirFeatureStore?) while this put was writing it; nothing was replaced: \
                         retry the put",
                        sample.generation, sample.sample_id
                    ),
                });
            }
            other => other?,
        }
        if self.supersede == Supersede::Scan {
            // The new generation is published; older files of the sample are unreachable through
            // any index now, so removing them is best effort: a failure is logged, not the put's.
            match self.sample_files(sample.store_id, sample.sample_id) {
                Ok(files) => {
                    for (generation, old) in files.into_iter().filter(|(g, _)| *g < sample.generation) {
                        match fs::remove_file(&old) {
                            Ok(()) => {}
                            Err(e) if e.kind() == ErrorKind::NotFound => {}
                            Err(e) => tracing::warn!(file = %old.display(), %generation, error = %e,
                                "could not remove a superseded generation file; the put stands"),
                        }
                    }
                }
                Err(e) => tracing::warn!(sample = %sample, error = %e,
                    "could not list superseded generation files; the put stands"),
            }
        }
        Ok(())
    }

    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        let mut reads = [(object.name, dst)];
        Ok(self.read_many(object.sample, &mut reads)?[0])
    }

    fn read_many(&self, sample: SampleKey<'_>, reads: &mut [(&str, &mut [u8])]) -> Result<Vec<usize>> {
        if reads.is_empty() {
            return Ok(Vec::new());
        }
        let file = self.open_sample(sample)?;
        let mut counts = Vec::with_capacity(reads.len());
        for (name, dst) in reads.iter_mut() {
            let object = sample.object(name);
            let held = match crate::file_read::copy_tensor_prefix(&file, name, dst) {
                Ok(held) => held,
                Err(Error::NotFound { .. }) => return Err(Error::NotFound { what: format!("object {object}") }),
                Err(e) => return Err(e),
            };
            counts.push(usize::try_from(held).unwrap_or(usize::MAX));
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
        let file = match self.open_sample(object.sample) {
            Ok(f) => f,
            Err(Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        match file.spec(object.name) {
            Ok(spec) => Ok(Some(spec.nbytes()?)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn reserve_generation(&self, store_id: &StoreId, sample_id: &SampleId, proposed: Generation) -> Result<Generation> {
        let dir = self.store_dir(store_id)?;
        let path = dir.join(GENERATION_FILE);
        // Scan mode numbers the put above every file of the sample (SpecForge's max + 1 rule
        // for writers that do not keep the mark); listed before taking the store-wide lock, so
        // other writers do not queue behind the listing.
        let sample_high = match self.supersede {
            Supersede::Scan => {
                self.sample_files(store_id, sample_id)?.into_iter().map(|(g, _)| g.get()).max().unwrap_or(0)
            }
            Supersede::Own => 0,
        };
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
        let exhausted = || Error::Backend {
            backend: "shared_dir".into(),
            operation: "reserve generation".into(),
            key: path.display().to_string(),
            message: "the store has reached the largest generation (u64::MAX); a file or the mark is corrupt".into(),
        };
        let next = high.unwrap_or(0).max(sample_high).checked_add(1).ok_or_else(exhausted)?;
        let mut generation = proposed.get().max(next);
        // Step over a generation of this sample that a writer without the mark already took.
        while self.extensions().iter().any(|ext| {
            let key = SampleKey { store_id, sample_id, generation: Generation::new(generation) };
            self.sample_path(key, ext).is_ok_and(|p| p.exists())
        }) {
            generation = generation.checked_add(1).ok_or_else(exhausted)?;
        }
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
        match self.open_sample(sample) {
            Ok(file) => Ok(Some(file.names().map(str::to_owned).collect())),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
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
