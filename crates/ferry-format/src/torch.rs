//! `torch.save`'s zip format (torch >= 1.6): reading an archive into checked tensor layouts, and
//! writing one byte-identical to what torch 2.15 writes for a dict of contiguous tensors.
//!
//! An archive holds, under one top-level folder (torch names it after the file's stem, or
//! `archive` when saving to a buffer): `data.pkl` (the pickled object, whose tensors refer to
//! storages by key through persistent ids), `data/<key>` (each storage's raw little-endian
//! bytes, 64-byte aligned), `byteorder`, `version`, `.format_version`, `.storage_alignment` and
//! `.data/serialization_id`.

use ferry_core::{DType, Error, Result, TensorView};
use indexmap::IndexMap;
use std::collections::HashMap;
use std::io::Write;

use crate::layout::{Layout, TensorEntry, contiguous_strides, is_contiguous};
use crate::limits::{MAX_EXPANDED_VIEW_BYTES, MAX_PICKLE_STRING, MAX_TENSOR_DIMS, MAX_TENSORS};
use crate::pickle::{self, STORAGE_CLASSES};
use crate::zip::{self, Zip64Limits, ZipEntry, ZipWriter};

fn corrupt(what: &str, message: impl Into<String>) -> Error {
    Error::Corrupt { what: format!("torch file {what}"), message: message.into() }
}

/// A parsed torch archive: its zip entries and its tensors, in the pickled dict's order.
pub(crate) struct TorchArchive {
    pub(crate) entries: Vec<ZipEntry>,
    pub(crate) tensors: IndexMap<String, TensorEntry>,
}

/// Parses a torch zip archive held in `bytes`: the central directory, `data.pkl`, and every
/// tensor's extent against its storage.
pub(crate) fn parse(bytes: &[u8], what: &str) -> Result<TorchArchive> {
    let entries = zip::read_entries(bytes, what)?;
    let mut pickles = entries
        .iter()
        .filter(|e| e.name.strip_suffix("/data.pkl").is_some_and(|prefix| !prefix.is_empty() && !prefix.contains('/')));
    let Some(pkl) = pickles.next() else {
        // Names come from the file: printed quoted and escaped, never raw.
        let names: Vec<&str> = entries.iter().take(8).map(|e| e.name.as_str()).collect();
        return Err(corrupt(
            what,
            format!("no <archive>/data.pkl entry: not a torch.save zip file (entries: {names:?})"),
        ));
    };
    if let Some(other) = pickles.next() {
        return Err(corrupt(
            what,
            format!("two top-level folders hold data.pkl ({:?} and {:?})", pkl.name, other.name),
        ));
    }
    let prefix = &pkl.name[..pkl.name.len() - "data.pkl".len()];
    let by_name: HashMap<&str, &ZipEntry> = entries.iter().map(|e| (e.name.as_str(), e)).collect();

    if let Some(order) = by_name.get(format!("{prefix}byteorder").as_str()) {
        let value = &bytes[order.data.clone()];
        if value != b"little" {
            return Err(corrupt(
                what,
                format!(
                    "byteorder is {:?}: only little-endian torch files are supported",
                    String::from_utf8_lossy(&value[..value.len().min(16)])
                ),
            ));
        }
    }

    let records = pickle::load_tensor_map(&bytes[pkl.data.clone()], what)?;
    let mut tensors = IndexMap::with_capacity(records.len());
    // Bytes that overlapping views would materialise beyond their storages, over the whole file.
    let mut expanded = 0u64;
    for (name, record) in records {
        let entry = layout(&by_name, prefix, &name, &record, &mut expanded, what)?;
        tensors.insert(name, entry);
    }
    Ok(TorchArchive { entries, tensors })
}

/// Checks one tensor record against its storage and decides where its bytes are.
fn layout(
    by_name: &HashMap<&str, &ZipEntry>,
    prefix: &str,
    name: &str,
    record: &pickle::TensorRecord,
    expanded: &mut u64,
    what: &str,
) -> Result<TensorEntry> {
    let storage = &record.storage;
    let dtype = storage.dtype;
    let elem = dtype.size() as u64;
    let key = format!("{prefix}data/{}", storage.key);
    // The key comes from the file: messages print it quoted and escaped.
    let skey = format!("data/{}", storage.key);
    let Some(entry) = by_name.get(key.as_str()) else {
        return Err(corrupt(what, format!("storage {skey:?} of tensor {name:?} is missing from the archive")));
    };
    let declared = storage.numel.checked_mul(elem).filter(|&b| b <= entry.data.len() as u64).ok_or_else(|| {
        corrupt(
            what,
            format!(
                "storage {skey:?} of tensor {name:?} holds {} bytes but its record declares {} {dtype} elements",
                entry.data.len(),
                storage.numel
            ),
        )
    })?;
    // `declared` fits in the entry, which fits in `bytes`.
    let storage_range = entry.data.start..entry.data.start + declared as usize;
    let shape = record.shape.clone();
    let numel = ferry_core::contracts::checked_numel(&shape).ok_or_else(|| {
        corrupt(what, format!("tensor {name:?} has shape {shape:?}, whose element count overflows 64 bits"))
    })?;
    let describe =
        || format!("tensor {name:?} (shape {shape:?}, stride {:?}, storage offset {})", record.strides, record.offset);
    if numel == 0 {
        if record.offset > storage.numel {
            return Err(corrupt(
                what,
                format!("{} starts past the end of its storage {skey:?} ({} elements)", describe(), storage.numel),
            ));
        }
        let start = storage_range.start;
        return Ok(TensorEntry { dtype, shape, layout: Layout::Contiguous(start..start) });
    }
    // Highest element index the view touches.
    let reach = shape
        .iter()
        .zip(&record.strides)
        .try_fold(record.offset, |acc, (&d, &s)| (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x)));
    if reach.is_none_or(|r| r >= storage.numel) {
        return Err(corrupt(
            what,
            format!(
                "{} reaches past the end of its storage {skey:?}, which holds {} elements: the storage is shorter than the tensor's shape",
                describe(),
                storage.numel
            ),
        ));
    }
    // The offset and every touched index are below `storage.numel`, whose bytes lie in `bytes`.
    let offset = record.offset as usize;
    if is_contiguous(&shape, &record.strides) {
        // A contiguous view touches exactly `numel` consecutive elements, all in the storage.
        let start = storage_range.start + offset * elem as usize;
        let len = (numel * elem) as usize;
        return Ok(TensorEntry { dtype, shape, layout: Layout::Contiguous(start..start + len) });
    }
    // Only an overlapping view (a zero stride, as from `expand`) has more elements than its
    // storage; bound what materialising it may allocate, per view and per file.
    if numel > storage.numel {
        let Some(bytes) = numel.checked_mul(elem).filter(|&b| b <= MAX_EXPANDED_VIEW_BYTES) else {
            return Err(corrupt(
                what,
                format!(
                    "{} is an overlapping view of {numel} elements over a storage of {}; materialising more than {MAX_EXPANDED_VIEW_BYTES} bytes from such a view is refused",
                    describe(),
                    storage.numel
                ),
            ));
        };
        // `declared < bytes`: the view holds more elements than its storage.
        *expanded = expanded.saturating_add(bytes - declared);
        if *expanded > MAX_EXPANDED_VIEW_BYTES {
            return Err(corrupt(
                what,
                format!(
                    "{} is an overlapping view that brings the bytes this file's overlapping views materialise beyond their storages to more than {MAX_EXPANDED_VIEW_BYTES} (the MAX_EXPANDED_VIEW_BYTES limit, per file)",
                    describe()
                ),
            ));
        }
    }
    let to_usize = |v: u64| {
        usize::try_from(v).map_err(|_| corrupt(what, format!("{} does not fit this host's address space", describe())))
    };
    let shape_us = shape.iter().map(|&d| to_usize(d)).collect::<Result<Vec<_>>>()?;
    let strides_us = record.strides.iter().map(|&s| to_usize(s)).collect::<Result<Vec<_>>>()?;
    Ok(TensorEntry {
        dtype,
        shape,
        layout: Layout::Strided { storage: storage_range, offset, strides: strides_us, shape: shape_us },
    })
}

fn storage_class(dtype: DType) -> &'static str {
    STORAGE_CLASSES.iter().find(|(_, d)| *d == dtype).map_or("FloatStorage", |(name, _)| name)
}

/// Emits `data.pkl` the way CPython's C pickler (protocol 2) emits it for `torch.save` of a
/// plain dict of contiguous tensors, one storage each.
///
/// Memo identity follows CPython: the constants `'storage'` and `'cpu'`, each class, and tensor
/// names are shared objects (names as identifier literals are interned, as SpecForge's are), so
/// their repeats are `BINGET`s; storage keys (`str(n)`), tuples, `OrderedDict()` instances and
/// tensors are fresh objects.
struct PickleWriter {
    out: Vec<u8>,
    memo_len: u32,
    shared: HashMap<String, u32>,
}

impl PickleWriter {
    fn put(&mut self) {
        let idx = self.memo_len;
        if idx < 256 {
            self.out.push(b'q');
            self.out.push(idx as u8);
        } else {
            self.out.push(b'r');
            self.out.extend_from_slice(&idx.to_le_bytes());
        }
        self.memo_len += 1;
    }

    fn get(&mut self, idx: u32) {
        if idx < 256 {
            self.out.push(b'h');
            self.out.push(idx as u8);
        } else {
            self.out.push(b'j');
            self.out.extend_from_slice(&idx.to_le_bytes());
        }
    }

    fn unicode(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    /// A string or global that is one shared object: written once, then fetched from the memo.
    fn shared(&mut self, key: &str, emit: impl FnOnce(&mut Self)) {
        if let Some(&idx) = self.shared.get(key) {
            self.get(idx);
        } else {
            emit(self);
            self.shared.insert(key.to_owned(), self.memo_len);
            self.put();
        }
    }

    fn shared_str(&mut self, s: &str) {
        self.shared(&format!("s:{s}"), |w| w.unicode(s));
    }

    fn global(&mut self, module: &str, name: &str) {
        self.shared(&format!("g:{module}.{name}"), |w| {
            w.out.push(b'c');
            w.out.extend_from_slice(module.as_bytes());
            w.out.push(b'\n');
            w.out.extend_from_slice(name.as_bytes());
            w.out.push(b'\n');
        });
    }

    /// `save_long`: the shortest of BININT1, BININT2, BININT, then LONG1.
    fn int(&mut self, v: u64) {
        if v <= 0xff {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if v <= 0xffff {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= 0x7fff_ffff {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as u32).to_le_bytes());
        } else {
            // encode_long: (bit_length // 8) + 1 little-endian two's-complement bytes.
            let n = (64 - v.leading_zeros() as usize) / 8 + 1;
            self.out.extend_from_slice(&[0x8a, n as u8]);
            let wide = u128::from(v).to_le_bytes();
            self.out.extend_from_slice(&wide[..n]);
        }
    }

    fn int_tuple(&mut self, values: &[u64]) {
        match values.len() {
            0 => self.out.push(b')'), // the empty tuple is a singleton: never memoized
            n @ 1..=3 => {
                for &v in values {
                    self.int(v);
                }
                self.out.push(0x84 + n as u8);
                self.put();
            }
            _ => {
                self.out.push(b'(');
                for &v in values {
                    self.int(v);
                }
                self.out.push(b't');
                self.put();
            }
        }
    }

    fn tensor(&mut self, storage_key: &str, view: &TensorView<'_>) {
        let numel = view.shape().iter().product::<u64>();
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.out.push(b'(');
        // persistent id: ('storage', torch.<X>Storage, key, 'cpu', numel)
        self.out.push(b'(');
        self.shared_str("storage");
        self.global("torch", storage_class(view.dtype()));
        self.unicode(storage_key);
        self.put();
        self.shared_str("cpu");
        self.int(numel);
        self.out.push(b't');
        self.put();
        self.out.push(b'Q');
        self.int(0); // storage offset
        self.int_tuple(view.shape());
        self.int_tuple(&contiguous_strides(view.shape()));
        self.out.push(0x89); // requires_grad=False
        self.global("collections", "OrderedDict");
        self.out.extend_from_slice(b")R"); // OrderedDict(): backward hooks
        self.put();
        self.out.push(b't');
        self.put();
        self.out.push(b'R');
        self.put();
    }
}

/// CPython's `BATCHSIZE` for dict items.
const PICKLE_BATCH: usize = 1000;

/// The `data.pkl` torch 2.15 writes for `torch.save({name: tensor, ...})` of contiguous
/// tensors, storage `i` holding tensor `i`.
pub(crate) fn data_pkl(tensors: &[(&str, TensorView<'_>)]) -> Vec<u8> {
    let mut w = PickleWriter { out: Vec::with_capacity(64 + tensors.len() * 200), memo_len: 0, shared: HashMap::new() };
    w.out.extend_from_slice(&[0x80, 2, b'}']);
    w.put();
    let item = |w: &mut PickleWriter, i: usize, name: &str, view: &TensorView<'_>| {
        w.shared_str(name);
        w.tensor(&i.to_string(), view);
    };
    if tensors.len() == 1 {
        let (name, view) = &tensors[0];
        item(&mut w, 0, name, view);
        w.out.push(b's');
    } else if !tensors.is_empty() {
        // batch_dict_exact: MARK ... SETITEMS per batch, and one more (empty) batch when the
        // last one was full.
        let mut i = 0;
        loop {
            w.out.push(b'(');
            let batch_end = (i + PICKLE_BATCH).min(tensors.len());
            let full = batch_end - i == PICKLE_BATCH;
            while i < batch_end {
                let (name, view) = &tensors[i];
                item(&mut w, i, name, view);
                i += 1;
            }
            w.out.push(b'u');
            if !full {
                break;
            }
        }
    }
    w.out.push(b'.');
    w.out
}

/// Checks what the writers need: unique names that ferry's reader accepts back (at most
/// [`MAX_PICKLE_STRING`] bytes).
pub(crate) fn check_tensors(tensors: &[(&str, TensorView<'_>)]) -> Result<()> {
    let mut seen = std::collections::HashSet::with_capacity(tensors.len());
    for (name, _) in tensors {
        if name.len() > MAX_PICKLE_STRING {
            return Err(Error::InvalidArgument(format!(
                "tensor name of {} bytes is longer than the {MAX_PICKLE_STRING} bytes ferry reads back (MAX_PICKLE_STRING)",
                name.len()
            )));
        }
        if !seen.insert(*name) {
            return Err(Error::InvalidArgument(format!("tensor name {name:?} appears twice")));
        }
    }
    Ok(())
}

/// [`check_tensors`], plus what ferry's torch reader accepts back: at most [`MAX_TENSORS`]
/// tensors and [`MAX_TENSOR_DIMS`] shape and stride entries (each tensor's counted twice, as the
/// reader counts its record and its name).
pub(crate) fn check_torch_tensors(tensors: &[(&str, TensorView<'_>)]) -> Result<()> {
    check_tensors(tensors)?;
    if tensors.len() > MAX_TENSORS {
        return Err(Error::InvalidArgument(format!(
            "{} tensors: ferry's torch reader accepts at most {MAX_TENSORS} in one file (MAX_TENSORS)",
            tensors.len()
        )));
    }
    let dims: usize = tensors.iter().map(|(_, v)| 4 * v.shape().len()).sum();
    if dims > MAX_TENSOR_DIMS {
        return Err(Error::InvalidArgument(format!(
            "the tensors' shapes and strides count {dims} entries as ferry's torch reader counts them; it accepts at most {MAX_TENSOR_DIMS} in one file (MAX_TENSOR_DIMS)"
        )));
    }
    Ok(())
}

/// Checks an archive (top-level folder) name.
pub(crate) fn check_archive_name(archive: &str) -> Result<()> {
    if archive.is_empty() || archive.contains(['/', '\\', '\0']) {
        return Err(Error::InvalidArgument(format!(
            "torch archive name {archive:?} must be non-empty without '/', '\\' or NUL"
        )));
    }
    Ok(())
}

/// Writes the whole archive to `out`, exactly as torch does (record order, padding, data
/// descriptors, zip64 end records, serialization id).
pub(crate) fn write_archive<W: Write>(out: W, archive: &str, tensors: &[(&str, TensorView<'_>)]) -> std::io::Result<W> {
    write_archive_with_zip64_limits(out, archive, tensors, Zip64Limits::TORCH)
}

/// [`write_archive`] with the zip64 thresholds lowered (tests only; see [`Zip64Limits`]).
pub(crate) fn write_archive_with_zip64_limits<W: Write>(
    out: W,
    archive: &str,
    tensors: &[(&str, TensorView<'_>)],
    limits: Zip64Limits,
) -> std::io::Result<W> {
    let mut zw = ZipWriter::with_zip64_limits(out, archive, limits);
    zw.add("data.pkl", &data_pkl(tensors))?;
    zw.add(".format_version", b"1")?;
    zw.add(".storage_alignment", zip::DATA_ALIGNMENT.to_string().as_bytes())?;
    zw.add("byteorder", b"little")?;
    for (i, (_, view)) in tensors.iter().enumerate() {
        zw.add(&format!("data/{i}"), view.bytes())?;
    }
    zw.add("version", b"3\n")?;
    let id = crate::serial_id::serialization_id(&zw.names, zw.combined_crc);
    zw.add(".data/serialization_id", id.as_bytes())?;
    zw.finish()
}

/// The archive name torch gives a file: its base name without the last extension
/// (`caffe2::serialize::basename`), or `archive` where that would be empty.
pub(crate) fn archive_name_for(path: &std::path::Path) -> String {
    let full = path.to_string_lossy();
    let base = full.rsplit(['/', '\\']).next().unwrap_or("");
    let stem = match base.rfind('.') {
        Some(dot) => &base[..dot],
        None => base,
    };
    if check_archive_name(stem).is_ok() { stem.to_owned() } else { "archive".to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_follow_torch() {
        use std::path::Path;
        assert_eq!(archive_name_for(Path::new("/a/b/data_0.ckpt")), "data_0");
        assert_eq!(archive_name_for(Path::new("x.g1.ckpt.tmp")), "x.g1.ckpt");
        assert_eq!(archive_name_for(Path::new("noext")), "noext");
        assert_eq!(archive_name_for(Path::new("/d/.ckpt")), "archive");
    }

    #[test]
    fn long_ints_use_minimal_long1() {
        let mut w = PickleWriter { out: Vec::new(), memo_len: 0, shared: HashMap::new() };
        w.int(0x8000_0000);
        assert_eq!(w.out, [0x8a, 5, 0, 0, 0, 0x80, 0]);
        w.out.clear();
        w.int(u64::MAX);
        assert_eq!(w.out, [0x8a, 9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0]);
    }

    #[test]
    fn batches_of_a_thousand() {
        let data = [0u8; 4];
        let views: Vec<(String, TensorView<'_>)> =
            (0..2001).map(|i| (format!("t{i}"), TensorView::new(DType::Float32, &[1], &data).unwrap())).collect();
        let refs: Vec<(&str, TensorView<'_>)> = views.iter().map(|(n, v)| (n.as_str(), *v)).collect();
        let pkl = data_pkl(&refs);
        let map = pickle::load_tensor_map(&pkl, "t").unwrap();
        assert_eq!(map.len(), 2001);
        assert_eq!(map[2000].0, "t2000");
        assert_eq!(map[2000].1.storage.key.as_ref(), "2000");
    }
}
