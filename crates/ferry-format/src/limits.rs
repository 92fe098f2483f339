//! Every bound this crate puts on lengths read from a file, in one place, each with its reason.
//!
//! A tensor file is untrusted input: a crafted one must get an error naming what was wrong, never
//! a panic, an overflow, an out-of-bounds read or an absurd allocation. Each length read from
//! disk meets one of these limits before anything is allocated for it. SpecForge's files are far
//! below every limit (a sample is 3-5 tensors; its `data.pkl` is under 1 KiB).

/// Largest `data.pkl` accepted. Torch spends roughly 100-200 pickle bytes per tensor, so this is
/// a dict of about 100 000 tensors; SpecForge writes 3-5 per file.
pub const MAX_PICKLE_BYTES: usize = 16 << 20;

/// Most pickle values created while reading one `data.pkl` (every push counts). Torch creates
/// about 25 per tensor. A value costs the VM at most about 80 bytes (a dict or stack slot plus a
/// small allocation), so with [`MAX_PICKLE_MEMO`] this bounds the VM's memory whatever the
/// input: the worst crafted case `tests/memory.rs` measures takes about 360 MiB (it asserts
/// under 512 MiB), a real torch file under 1 MiB. What pushes cannot bound, the dimension
/// vectors a tensor record builds from one (memoized) tuple and the table entries of names that
/// share one record, is bounded by [`MAX_TENSORS`] and [`MAX_TENSOR_DIMS`].
pub const MAX_PICKLE_VALUES: usize = 1 << 22;

/// Most tensors in one file: tensor records the pickle rebuilds, and entries of any one dict
/// (the tensor map; one record may be shared by several names). Without it a small `data.pkl`
/// could reference one memoized record from millions of dict entries, each becoming its own
/// table entry. Torch files hold at most about 100 000 tensors ([`MAX_PICKLE_BYTES`]);
/// SpecForge writes 3-5. ferry's torch writers refuse more.
pub const MAX_TENSORS: usize = 1 << 17;

/// Most shape and stride entries in one file, counted over every tensor record the pickle
/// rebuilds and again over every name mapped to a tensor (each name gets its own table entry
/// with its own shape and strides). A record's shape and strides are built from tuples that may
/// be memoized, so one pickle push can cost up to 2 x [`MAX_NDIM`] entries; this bounds what they
/// take to about 32 MiB (at most 16 bytes an entry). 100 000 tensors of 4 dimensions count
/// 1.6 million.
pub const MAX_TENSOR_DIMS: usize = 1 << 21;

/// Deepest stack of the pickle VM (values plus marks). Torch's deepest point is one
/// `SETITEMS` batch: 1000 keys and 1000 values, plus a few frames of nesting.
pub const MAX_PICKLE_STACK: usize = 1 << 16;

/// Most memo entries. Torch memoizes about 10 objects per tensor.
pub const MAX_PICKLE_MEMO: usize = 1 << 20;

/// Deepest nesting of pickle tuples. Dropping nested tuples recurses, so unbounded nesting from
/// a crafted file could overflow the thread's stack; torch nests tuples three deep.
pub const MAX_PICKLE_DEPTH: u32 = 32;

/// Longest pickle string (tensor name, storage key, location). Names are identifiers; 1 MiB
/// is generous and keeps one opcode from demanding gigabytes.
pub const MAX_PICKLE_STRING: usize = 1 << 20;

/// Longest `GLOBAL` module or name line. Python identifiers and dotted module paths are short.
pub const MAX_GLOBAL_LINE: usize = 256;

/// Most dimensions of one tensor. Torch's CPU tensors allow 64 at most (CUDA kernels 25).
pub const MAX_NDIM: usize = 64;

/// Most entries in one zip archive. A torch file has 7 entries plus one per storage.
pub const MAX_ZIP_ENTRIES: u64 = 1 << 20;

/// Largest materialised (made contiguous) size of an overlapping view, such as
/// `torch.zeros(1).expand(n)`, whose element count exceeds its storage's; and, per file, the
/// most bytes all such views together may materialise beyond the bytes of their storages. Every
/// other tensor is at most as large as its storage, which lies in the file; without this bound
/// a 2-byte storage with stride 0 could demand terabytes, and many such views in one file could
/// describe (through `specs()`) far more than any one of them.
pub const MAX_EXPANDED_VIEW_BYTES: u64 = 1 << 30;

/// Default bound on the decompressed size of a `.ckpt.gz` (see `OpenOptions`). A `.ckpt.gz` is
/// decompressed whole into memory (gzip cannot be read at random offsets), so this is memory the
/// process commits for one file: 16 GiB is about 80 times the largest SpecForge sample (10-200
/// MB), and small enough that a gzip bomb (DEFLATE reaches about 1000:1, so a 16 MiB file
/// suffices) fails before it exhausts a training node, where several readers run at once next
/// to the model. Larger genuine files raise `OpenOptions::max_decompressed_bytes`.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: u64 = 16 << 30;

/// Bytes read from the start of a file to recognise its content (a tar header's `ustar` magic
/// sits at offset 257).
pub const SNIFF_BYTES: usize = 512;
