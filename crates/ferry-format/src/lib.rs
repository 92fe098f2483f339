//! The tensor files SpecForge users have, read and written by ferry: `torch.save`'s zip format
//! (`.ckpt`), the same gzip-compressed (`.ckpt.gz`), and safetensors.
//!
//! This crate owns file formats and nothing else: no lifecycle, no transport. It reads a file
//! into a table of tensors checked once at open, hands out contiguous tensors as zero-copy views
//! of a read-only mapping, and writes files torch and the safetensors library read back. It
//! must never execute anything a file says: the torch reader is a small pickle VM that knows only
//! the opcodes and globals `torch.save` uses for tensors, and every length read from a file is
//! bounded (see [`limits`]).
//!
//! # What is read
//! * Torch zip: a `dict` or `OrderedDict` of name → tensor (nested containers are an error
//!   naming the key), persistent storage records, storage offsets, strides (non-contiguous
//!   views come back contiguous, copied a contiguous run at a time), storages shared by several
//!   tensors, the ten dtypes of [`ferry_core::DType`], 0-dim and empty tensors. Legacy
//!   (pre-1.6, non-zip) files get a clear error.
//! * `.ckpt.gz`: decompressed into one owned buffer (bounded), then read as a torch zip.
//! * Safetensors, through the reference `safetensors` crate.
//!
//! # What is written
//! * [`write_torch_zip`] / [`torch_zip_bytes`]: byte-identical to what torch 2.15's `torch.save`
//!   writes for a dict of contiguous tensors (same `data.pkl`, records, 64-byte alignment, zip64
//!   end records, serialization id), so `torch.load(path, weights_only=True)` returns them.
//!   Checked against every fixture that is a plain dict of contiguous tensors. Records of 4 GiB
//!   or more, or past 4 GiB, get exactly the zip64 fields torch 2.5.1 writes (compared with a
//!   4.3 GB file torch wrote), and nothing else does; a 4.3 GB file ferry wrote loads in torch
//!   2.5.1 (`writer::over_4_gib_file_loads_in_torch`, run by hand).
//! * [`write_safetensors`]: the reference serializer.
//!
//! # Layout
//! * [`detect`] — [`FileFormat`]: name and content checks.
//! * [`mod@file`] — [`TensorFile`], [`FileTensor`], [`OpenOptions`]; the one `unsafe` (the mapping).
//! * [`limits`] — every bound on lengths read from a file, with its reason.
//! * `zip` — stored-zip directory reading and torch-layout writing.
//! * `pickle` — the restricted pickle VM.
//! * `torch` — torch archives: tensor layouts and the `data.pkl` writer.
//! * `serial_id` — torch's `.data/serialization_id`, reproduced.
//! * `layout` — byte ranges and the strided gather.
//! * `safetensors_io`, `gz` — the other two formats.
//!
//! # Example
//! ```
//! use ferry_core::{DType, TensorView};
//! use ferry_format::{FileFormat, TensorFile, torch_zip_bytes};
//!
//! let ids: Vec<i64> = vec![1, 2, 3];
//! let bytes = torch_zip_bytes(&[("input_ids", TensorView::from_elements(&[3], &ids).unwrap())]).unwrap();
//! let file = TensorFile::from_bytes(bytes, FileFormat::TorchZip, "example").unwrap();
//! let t = file.tensor("input_ids").unwrap();
//! assert!(t.is_borrowed()); // zero-copy
//! assert_eq!((t.dtype(), t.shape()), (DType::Int64, &[3u64][..]));
//! assert!(file.tensor("missing").is_err());
//! ```
#![deny(unsafe_code)] // one exception: `file::map_file`, with its SAFETY argument
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]

#[cfg(target_endian = "big")]
compile_error!("ferry-format maps little-endian tensor bytes directly; big-endian hosts are not supported");

pub mod detect;
pub mod file;
mod gz;
mod layout;
pub mod limits;
mod pickle;
mod safetensors_io;
mod serial_id;
mod torch;
mod zip;

pub use detect::FileFormat;
pub use file::{FileTensor, OpenOptions, TensorFile};

use ferry_core::{Error, Result, TensorView};
use std::io::{BufWriter, Write};
use std::path::Path;

/// The bytes [`write_torch_zip`] writes, with the archive (top-level folder) name torch uses
/// when saving to a buffer: `archive`.
pub fn torch_zip_bytes(tensors: &[(&str, TensorView<'_>)]) -> Result<Vec<u8>> {
    torch_zip_bytes_named("archive", tensors)
}

/// [`torch_zip_bytes`] with a chosen archive name (torch uses the file's stem, e.g. `data_0`).
pub fn torch_zip_bytes_named(archive: &str, tensors: &[(&str, TensorView<'_>)]) -> Result<Vec<u8>> {
    torch::check_archive_name(archive)?;
    torch::check_torch_tensors(tensors)?;
    let total: usize = tensors.iter().map(|(_, v)| v.bytes().len() + 256).sum();
    torch::write_archive(Vec::with_capacity(total + 2048), archive, tensors)
        .map_err(|e| Error::io("building a torch zip in memory", &e))
}

/// Writes `tensors` (in this order) to `path` as `torch.save({name: tensor, ...})` would. The
/// archive name follows torch: the file's base name without its last extension
/// (`data_0.ckpt` → `data_0`). See [`write_safetensors`] for how the file is published.
pub fn write_torch_zip(path: &Path, tensors: &[(&str, TensorView<'_>)]) -> Result<()> {
    write_torch_zip_as(path, tensors, Publish::Replace)
}

/// How a written file takes its final name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publish {
    /// Renamed over whatever file has the name.
    Replace,
    /// Only if no file has the name: otherwise the write fails with an `Io` error of kind
    /// `AlreadyExists` and nothing is left behind (a shared-directory store that must never put
    /// new bytes under a name another writer already published).
    New,
}

/// [`write_torch_zip`], published as `publish` says.
pub fn write_torch_zip_as(path: &Path, tensors: &[(&str, TensorView<'_>)], publish_as: Publish) -> Result<()> {
    torch::check_torch_tensors(tensors)?;
    let archive = torch::archive_name_for(path);
    publish(path, publish_as, |out| torch::write_archive(out, &archive, tensors).map(drop))
}

/// Writes `tensors` to `path` as safetensors, byte-identical to the reference crate's
/// `serialize_to_file` (header from its `Metadata`; tensors ordered by dtype alignment, then
/// name).
///
/// Both writers publish the same way: a temporary file in the target's directory, created with
/// mode `0666 & !umask` like Python's `open` (so other users can read shared feature files),
/// written through a 1 MiB buffer and renamed over `path`, so readers never see a partial file
/// and a reader that has the old file mapped keeps its bytes. The file is not fsynced: like
/// SpecForge's `torch.save`, a crash can lose a just-written file but never expose a torn one
/// under its final name.
pub fn write_safetensors(path: &Path, tensors: &[(&str, TensorView<'_>)]) -> Result<()> {
    write_safetensors_as(path, tensors, Publish::Replace)
}

/// [`write_safetensors`], published as `publish` says.
pub fn write_safetensors_as(path: &Path, tensors: &[(&str, TensorView<'_>)], publish_as: Publish) -> Result<()> {
    torch::check_tensors(tensors)?;
    let (header, order) = safetensors_io::header(tensors)?;
    publish(path, publish_as, |out| {
        out.write_all(&header)?;
        for i in order {
            out.write_all(tensors[i].1.bytes())?;
        }
        Ok(())
    })
}

/// Writes a file through a temporary sibling renamed into place (or, for [`Publish::New`],
/// linked into place only if the name is free: `tempfile`'s `persist_noclobber`).
fn publish(
    path: &Path,
    publish_as: Publish,
    write: impl FnOnce(&mut BufWriter<tempfile::NamedTempFile>) -> std::io::Result<()>,
) -> Result<()> {
    let what = path.display().to_string();
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!(".{file_name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp =
        builder.tempfile_in(dir).map_err(|e| Error::io(format!("creating a temporary file next to {what}"), &e))?;
    let mut out = BufWriter::with_capacity(1 << 20, tmp);
    write(&mut out).map_err(|e| Error::io(format!("writing {what}"), &e))?;
    let tmp = out.into_inner().map_err(|e| Error::io(format!("writing {what}"), e.error()))?;
    match publish_as {
        Publish::Replace => {
            tmp.persist(path).map_err(|e| Error::io(format!("renaming the temporary file to {what}"), &e.error))?;
        }
        Publish::New => {
            // On failure the temporary file is dropped with the error, so nothing is left.
            tmp.persist_noclobber(path)
                .map_err(|e| Error::io(format!("publishing {what} (which must not exist yet)"), &e.error))?;
        }
    }
    Ok(())
}

/// Internal entry points for tests: not part of the API.
#[doc(hidden)]
pub mod internal {
    /// [`crate::torch_zip_bytes`], except that records of `size_limit` bytes or more take zip64
    /// size fields and records whose local header starts at or past `offset_limit` take a zip64
    /// offset field (torch: `0xFFFFFFFF` for both), so tests can get torch's zip64 record layout
    /// without writing 4 GiB.
    ///
    /// Torch reads archives with a lowered `size_limit`. It cannot read a lowered
    /// `offset_limit` that puts an offset sentinel into an archive under 4 GiB: torch <= 2.5
    /// (miniz 2.1.0) bounds each entry with the raw 32-bit offset and rejects it ("invalid
    /// header or archive is corrupted"). Real torch files only have offset fields past 4 GiB.
    pub fn torch_zip_bytes_zip64_limits(
        size_limit: u64,
        offset_limit: u64,
        tensors: &[(&str, ferry_core::TensorView<'_>)],
    ) -> ferry_core::Result<Vec<u8>> {
        crate::torch::check_torch_tensors(tensors)?;
        let limits = crate::zip::Zip64Limits { size: size_limit, offset: offset_limit };
        crate::torch::write_archive_with_zip64_limits(Vec::new(), "archive", tensors, limits)
            .map_err(|e| ferry_core::Error::io("building a torch zip", &e))
    }
}

// An opened file is shared across reader threads.
const _: () = {
    const fn is_send_sync<T: Send + Sync>() {}
    is_send_sync::<TensorFile>();
};
