//! [`TensorFile`] (an opened tensor file: its bytes, mapped or owned, and its checked tensor
//! table) and [`FileTensor`] (one tensor, borrowed from those bytes where it is contiguous).
//!
//! This module holds the crate's only `unsafe`: mapping the file (`map_file`, whose SAFETY
//! comment records why ferry accepts mapping files other processes could truncate).

use ferry_core::{AlignedBuf, DType, Error, FeatureSpec, Result, TensorBuf, TensorView};
use indexmap::IndexMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::detect::{self, FileFormat};
use crate::layout::{self, Layout, TensorEntry};
use crate::limits::{DEFAULT_MAX_DECOMPRESSED_BYTES, SNIFF_BYTES};
use crate::zip::ZipEntry;
use crate::{gz, safetensors_io, torch};

/// How [`TensorFile::open_with`] opens a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    /// Map the file read-only instead of reading it into memory (default `true`). Mapping is
    /// what makes contiguous tensors zero-copy. It assumes files are replaced by rename, never
    /// truncated in place: truncating a mapped file under a reader kills the reader with SIGBUS.
    /// Set `false` where that cannot be ruled out.
    pub map: bool,
    /// Largest decompressed size accepted for a `.ckpt.gz` (default 16 GiB; see
    /// [`crate::limits::DEFAULT_MAX_DECOMPRESSED_BYTES`]).
    pub max_decompressed_bytes: u64,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions { map: true, max_decompressed_bytes: DEFAULT_MAX_DECOMPRESSED_BYTES }
    }
}

/// The bytes of an opened file.
enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Backing {
    fn bytes(&self) -> &[u8] {
        match self {
            Backing::Mapped(map) => map,
            Backing::Owned(v) => v,
        }
    }
}

/// Maps `file` (of `len` bytes, `len > 0`) read-only.
///
/// This is the crate's one `unsafe` operation, and the opt-in decision STYLE.md (item 19) asks to
/// make once: ferry maps tensor files because that is what makes reading zero-copy.
#[allow(unsafe_code)]
fn map_file(file: &File, len: u64, what: &str) -> Result<memmap2::Mmap> {
    let len = usize::try_from(len).map_err(|_| {
        Error::InvalidArgument(format!("tensor file {what} ({len} bytes) is too large to map on this host"))
    })?;
    // SAFETY: `Mmap::map` is unsafe because the mapping aliases a file that other processes can
    // change while we hold `&[u8]` into it. ferry accepts that risk for tensor files, knowingly:
    // * Every writer in the SpecForge/ferry flow (torch.save's callers, ferry's `write_*`, the
    //   shared-dir store) writes a temporary file and renames it into place, so a published file
    //   is never modified in place; a rename or unlink leaves our mapping on the old inode, intact
    //   (tested: `mapping_survives_replacement_by_rename`).
    // * If a third party does truncate the file in place, touching a page past the new end raises
    //   SIGBUS and kills the process: a loud failure, never wrong tensor bytes returned as good.
    //   If it rewrites bytes in place, readers may see the new bytes; all structure (offsets,
    //   lengths) was parsed and checked once at open and is never re-read from the mapping, so
    //   no index derived from the file can go out of bounds.
    // * The length is fixed at map time; every range we slice was checked against it.
    // Callers that cannot rule out in-place truncation use `OpenOptions { map: false, .. }`,
    // which reads the file into memory instead.
    let map = unsafe { memmap2::MmapOptions::new().len(len).map(file) }
        .map_err(|e| Error::io(format!("mapping tensor file {what}"), &e))?;
    Ok(map)
}

/// Opens `path` for reading after checking that it is (or links to) a regular file, and returns
/// it with its length. A FIFO, socket or device (`/dev/zero`) reports length 0 or none and may
/// produce data forever or block, so it is refused before it is opened; the opened file is
/// checked again, in case the path was replaced in between (a path swapped for a FIFO in that
/// window can still block the open: only the first check prevents that).
pub(crate) fn open_regular(path: &Path, what: &str) -> Result<(File, u64)> {
    let io = |action: &str, e: &std::io::Error| Error::io(format!("{action} tensor file {what}"), e);
    let not_regular = |meta: &std::fs::Metadata| {
        Error::InvalidArgument(format!(
            "tensor file {what} is not a regular file (it is {}); ferry reads only regular files",
            kind_of(meta)
        ))
    };
    // Follows symlinks, like the open below.
    let meta = std::fs::metadata(path).map_err(|e| io("opening", &e))?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let file = File::open(path).map_err(|e| io("opening", &e))?;
    let meta = file.metadata().map_err(|e| io("inspecting", &e))?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    Ok((file, meta.len()))
}

/// What a non-regular file is, in words.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
    }
    "another kind of file"
}

/// An opened tensor file: a read-only mapping (or an owned buffer, for `.ckpt.gz` and
/// [`TensorFile::from_bytes`]) plus the table of its tensors, checked once at open.
///
/// Opening parses only headers (zip directory, `data.pkl`, safetensors header); tensor bytes are
/// not touched until [`TensorFile::tensor`].
pub struct TensorFile {
    path: Option<PathBuf>,
    what: String,
    format: FileFormat,
    backing: Backing,
    tensors: IndexMap<String, TensorEntry>,
    /// Zip entries of torch files (for [`TensorFile::verify_checksums`]).
    zip_entries: Vec<ZipEntry>,
}

impl std::fmt::Debug for TensorFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorFile")
            .field("what", &self.what)
            .field("format", &self.format)
            .field("mapped", &matches!(self.backing, Backing::Mapped(_)))
            .field("tensors", &self.tensors.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// One tensor read from a [`TensorFile`]: borrowed from the file's bytes when it is stored
/// contiguously, otherwise gathered into an owned, 64-byte aligned buffer.
#[derive(Debug)]
pub struct FileTensor<'a> {
    dtype: DType,
    shape: &'a [u64],
    data: TensorData<'a>,
}

#[derive(Debug)]
enum TensorData<'a> {
    Borrowed(TensorView<'a>),
    Owned(TensorBuf),
}

impl FileTensor<'_> {
    /// The tensor as a contiguous view (of the file's bytes, or of the gathered copy).
    pub fn view(&self) -> TensorView<'_> {
        match &self.data {
            TensorData::Borrowed(v) => *v,
            TensorData::Owned(t) => t.view(),
        }
    }
    /// `true` when the bytes are the file's own (zero-copy), `false` when they were gathered
    /// from a non-contiguous view.
    pub fn is_borrowed(&self) -> bool {
        matches!(self.data, TensorData::Borrowed(_))
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape, row-major.
    pub fn shape(&self) -> &[u64] {
        self.shape
    }
    /// The raw little-endian bytes, `numel * dtype.size()` of them.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::Borrowed(v) => v.bytes(),
            TensorData::Owned(t) => t.bytes(),
        }
    }
    /// An owned copy (no copy if the bytes were already gathered).
    pub fn into_owned(self) -> Result<TensorBuf> {
        match self.data {
            TensorData::Owned(t) => Ok(t),
            TensorData::Borrowed(v) => {
                let buf = try_alloc(v.bytes().len(), "copying a tensor")?;
                let mut t = TensorBuf::new(v.dtype(), v.shape().to_vec(), buf)?;
                t.bytes_mut().copy_from_slice(v.bytes());
                Ok(t)
            }
        }
    }
}

fn try_alloc(len: usize, context: &str) -> Result<AlignedBuf> {
    AlignedBuf::try_zeroed(len).ok_or_else(|| Error::Io {
        context: context.to_owned(),
        kind: ErrorKind::OutOfMemory,
        message: format!("cannot allocate {len} bytes"),
    })
}

impl TensorFile {
    /// Opens `path`, whose format is decided by its name and checked against its content
    /// (see [`FileFormat::detect`]), with default [`OpenOptions`].
    pub fn open(path: &Path) -> Result<TensorFile> {
        TensorFile::open_with(path, &OpenOptions::default())
    }

    /// Opens `path` with `options`.
    pub fn open_with(path: &Path, options: &OpenOptions) -> Result<TensorFile> {
        let format = FileFormat::from_name(path)?;
        let what = path.display().to_string();
        let io = |action: &str, e: &std::io::Error| Error::io(format!("{action} tensor file {what}"), e);
        let (mut file, len) = open_regular(path, &what)?;
        let backing = if format == FileFormat::TorchZipGz {
            let mut head = Vec::with_capacity(SNIFF_BYTES);
            (&mut file).take(SNIFF_BYTES as u64).read_to_end(&mut head).map_err(|e| io("reading", &e))?;
            detect::check_content(format, &head, &what)?;
            let hint = if len >= 4 {
                let mut t = [0u8; 4];
                file.seek(SeekFrom::End(-4)).and_then(|_| file.read_exact(&mut t)).map_err(|e| io("reading", &e))?;
                gz::trailer_size(&t)
            } else {
                None
            };
            file.seek(SeekFrom::Start(0)).map_err(|e| io("reading", &e))?;
            // Never more than the length seen at open, whatever the file does meanwhile.
            let reader = std::io::BufReader::with_capacity(1 << 20, file.take(len));
            Backing::Owned(gz::decompress(reader, len, hint, options.max_decompressed_bytes, &what)?)
        } else if options.map && len > 0 {
            Backing::Mapped(map_file(&file, len, &what)?)
        } else {
            let mut v = Vec::new();
            v.try_reserve_exact(usize::try_from(len).unwrap_or(usize::MAX)).map_err(|_| Error::Io {
                context: format!("reading tensor file {what}"),
                kind: ErrorKind::OutOfMemory,
                message: format!("cannot allocate {len} bytes"),
            })?;
            file.take(len).read_to_end(&mut v).map_err(|e| io("reading", &e))?;
            Backing::Owned(v)
        };
        TensorFile::parse(Some(path.to_path_buf()), what, format, backing)
    }

    /// Parses a file's bytes held in memory (tests, fuzzing, or bytes from elsewhere). A
    /// [`FileFormat::TorchZipGz`] buffer is decompressed with the default limit. `what` names
    /// the bytes in errors.
    pub fn from_bytes(bytes: Vec<u8>, format: FileFormat, what: &str) -> Result<TensorFile> {
        TensorFile::from_bytes_with(bytes, format, what, &OpenOptions::default())
    }

    /// [`TensorFile::from_bytes`] with options (only `max_decompressed_bytes` applies).
    pub fn from_bytes_with(
        bytes: Vec<u8>,
        format: FileFormat,
        what: &str,
        options: &OpenOptions,
    ) -> Result<TensorFile> {
        let backing = if format == FileFormat::TorchZipGz {
            detect::check_content(format, &bytes[..bytes.len().min(SNIFF_BYTES)], what)?;
            let hint = gz::trailer_size(&bytes);
            Backing::Owned(gz::decompress(&bytes[..], bytes.len() as u64, hint, options.max_decompressed_bytes, what)?)
        } else {
            Backing::Owned(bytes)
        };
        TensorFile::parse(None, what.to_owned(), format, backing)
    }

    fn parse(path: Option<PathBuf>, what: String, format: FileFormat, backing: Backing) -> Result<TensorFile> {
        let bytes = backing.bytes();
        // After gzip, the content must be a torch zip.
        let inner = if format == FileFormat::TorchZipGz { FileFormat::TorchZip } else { format };
        detect::check_content(inner, &bytes[..bytes.len().min(SNIFF_BYTES)], &what).map_err(|e| match e {
            Error::Corrupt { what: w, message } if format == FileFormat::TorchZipGz => {
                Error::Corrupt { what: w, message: format!("after gzip decompression: {message}") }
            }
            other => other,
        })?;
        let (tensors, zip_entries) = match inner {
            FileFormat::Safetensors => (safetensors_io::parse(bytes, &what)?, Vec::new()),
            _ => {
                let archive = torch::parse(bytes, &what)?;
                (archive.tensors, archive.entries)
            }
        };
        Ok(TensorFile { path, what, format, backing, tensors, zip_entries })
    }

    /// The path the file was opened from (`None` for [`TensorFile::from_bytes`]).
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The file's format.
    pub fn format(&self) -> FileFormat {
        self.format
    }

    /// `true` when the bytes are a mapping of the file (contiguous tensors are then zero-copy
    /// views of the page cache).
    pub fn is_mapped(&self) -> bool {
        matches!(self.backing, Backing::Mapped(_))
    }

    /// Tensor names in the file's own order: the pickled dict's insertion order for torch files,
    /// the header's order for safetensors.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.tensors.get(name).ok_or_else(|| {
            // Names come from the file: printed quoted and escaped, never raw.
            let have: Vec<&str> = self.names().take(8).collect();
            let more = if self.len() > 8 { ", ..." } else { "" };
            Error::NotFound { what: format!("tensor {name:?} in {} (it holds: {have:?}{more})", self.what) }
        })
    }

    /// The dtype and shape of `name`, without touching its bytes.
    pub fn spec(&self, name: &str) -> Result<FeatureSpec> {
        let e = self.entry(name)?;
        Ok(FeatureSpec::new(name, e.shape.clone(), e.dtype))
    }

    /// Every tensor's spec, in the file's order.
    pub fn specs(&self) -> IndexMap<String, FeatureSpec> {
        self.tensors.iter().map(|(n, e)| (n.clone(), FeatureSpec::new(n.as_str(), e.shape.clone(), e.dtype))).collect()
    }

    fn internal(&self, message: &str) -> Error {
        Error::Corrupt { what: format!("tensor file {}", self.what), message: message.to_owned() }
    }

    /// The tensor `name`: borrowed from the file's bytes (zero-copy) when stored contiguously,
    /// gathered into a contiguous copy otherwise. [`Error::NotFound`] names the key and the file.
    pub fn tensor(&self, name: &str) -> Result<FileTensor<'_>> {
        let e = self.entry(name)?;
        let bytes = self.backing.bytes();
        let data = match &e.layout {
            Layout::Contiguous(range) => {
                let slice = bytes.get(range.clone()).ok_or_else(|| self.internal("tensor range outside the file"))?;
                TensorData::Borrowed(TensorView::new(e.dtype, &e.shape, slice)?)
            }
            Layout::Strided { .. } => {
                let mut buf = try_alloc(self.nbytes(e)?, &format!("reading tensor {name:?} from {}", self.what))?;
                self.gather_into(e, &mut buf)?;
                TensorData::Owned(TensorBuf::new(e.dtype, e.shape.clone(), buf)?)
            }
        };
        Ok(FileTensor { dtype: e.dtype, shape: &e.shape, data })
    }

    /// Copies the tensor `name`, made contiguous, into `dst`, which must be exactly its size.
    pub fn read_into(&self, name: &str, dst: &mut [u8]) -> Result<()> {
        let e = self.entry(name)?;
        let nbytes = self.nbytes(e)?;
        if dst.len() != nbytes {
            return Err(Error::InvalidArgument(format!(
                "tensor {name:?} of {} is {nbytes} bytes; the destination holds {}",
                self.what,
                dst.len()
            )));
        }
        match &e.layout {
            Layout::Contiguous(range) => {
                let slice = self
                    .backing
                    .bytes()
                    .get(range.clone())
                    .ok_or_else(|| self.internal("tensor range outside the file"))?;
                dst.copy_from_slice(slice);
                Ok(())
            }
            Layout::Strided { .. } => self.gather_into(e, dst),
        }
    }

    fn nbytes(&self, e: &TensorEntry) -> Result<usize> {
        e.dtype
            .nbytes_of(&e.shape)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.internal("tensor size overflows"))
    }

    fn gather_into(&self, e: &TensorEntry, dst: &mut [u8]) -> Result<()> {
        let Layout::Strided { storage, offset, strides, shape } = &e.layout else {
            return Err(self.internal("gather of a contiguous tensor"));
        };
        let src = self.backing.bytes().get(storage.clone()).ok_or_else(|| self.internal("storage outside the file"))?;
        if layout::gather(src, e.dtype.size(), shape, strides, *offset, dst) {
            Ok(())
        } else {
            Err(self.internal("strided view reaches outside its storage"))
        }
    }

    /// Verifies the CRC-32 of every zip entry of a torch file against its bytes (one pass over
    /// the whole file). Reading never does this: it would cost a full read of every tensor and
    /// defeat zero-copy. Safetensors files carry no checksums; this returns `Ok` for them.
    pub fn verify_checksums(&self) -> Result<()> {
        let bytes = self.backing.bytes();
        for entry in &self.zip_entries {
            let data = bytes.get(entry.data.clone()).ok_or_else(|| self.internal("zip entry outside the file"))?;
            let crc = crc32fast::hash(data);
            if crc != entry.crc32 {
                return Err(Error::Corrupt {
                    what: format!("torch file {}", self.what),
                    message: format!(
                        "entry {:?} has CRC-32 {crc:08x}, the directory records {:08x}",
                        entry.name, entry.crc32
                    ),
                });
            }
        }
        Ok(())
    }
}
