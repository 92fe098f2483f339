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
/// about 40 per tensor; the cap keeps the VM's memory at a few tens of MiB whatever the input.
pub const MAX_PICKLE_VALUES: usize = 1 << 22;

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
/// `torch.zeros(1).expand(n)`, whose element count exceeds its storage's. Every other tensor is
/// at most as large as its storage, which lies in the file; without this bound a 2-byte storage
/// with stride 0 could demand terabytes.
pub const MAX_EXPANDED_VIEW_BYTES: u64 = 1 << 30;

/// Default bound on the decompressed size of a `.ckpt.gz` (see `OpenOptions`): larger than any
/// SpecForge sample (10-200 MB) by two orders of magnitude, and small enough to stop a gzip bomb
/// before it exhausts a node's memory.
pub const DEFAULT_MAX_DECOMPRESSED_BYTES: u64 = 64 << 30;

/// Bytes read from the start of a file to recognise its content (a tar header's `ustar` magic
/// sits at offset 257).
pub const SNIFF_BYTES: usize = 512;
