//! The writers: random tensors of every dtype (0-dim and empty included) survive
//! `torch_zip_bytes` / `write_torch_zip` / `write_safetensors` and come back identical; the output
//! is a zip Python's `zipfile` and `pickletools` accept and CPython's unpickler reads as the same
//! tensors; and a directory for a real `torch.load` check can be written on demand.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use common::{data_for, raw_entries, read_twin};
use ferry_core::{DType, TensorView};
use ferry_format::{FileFormat, TensorFile, torch_zip_bytes, write_safetensors, write_torch_zip};
use proptest::prelude::*;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::process::Command;

/// An owned tensor for building views.
#[derive(Debug, Clone)]
struct Owned {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    bytes: Vec<u8>,
}

impl Owned {
    fn new(name: &str, dtype: DType, shape: &[u64], seed: u64) -> Owned {
        let numel = shape.iter().product::<u64>() as usize;
        Owned { name: name.to_owned(), dtype, shape: shape.to_vec(), bytes: data_for(dtype, numel, seed) }
    }
    fn view(&self) -> TensorView<'_> {
        TensorView::new(self.dtype, &self.shape, &self.bytes).unwrap()
    }
}

fn views(ts: &[Owned]) -> Vec<(&str, TensorView<'_>)> {
    ts.iter().map(|t| (t.name.as_str(), t.view())).collect()
}

/// Reads back every tensor and compares with what was written, in order.
fn assert_same(file: &TensorFile, ts: &[Owned], ordered: bool) {
    assert_eq!(file.len(), ts.len());
    if ordered {
        assert_eq!(file.names().collect::<Vec<_>>(), ts.iter().map(|t| t.name.as_str()).collect::<Vec<_>>());
    }
    for t in ts {
        let got = file.tensor(&t.name).unwrap();
        assert!(got.is_borrowed(), "{} should be zero-copy", t.name);
        assert_eq!((got.dtype(), got.shape()), (t.dtype, t.shape.as_slice()), "{}", t.name);
        assert_eq!(got.bytes(), &t.bytes[..], "{}", t.name);
    }
}

fn every_dtype_with_edge_shapes() -> Vec<Owned> {
    let mut ts = Vec::new();
    for (i, dtype) in DType::ALL.into_iter().enumerate() {
        let seed = i as u64 + 1;
        ts.push(Owned::new(&format!("{dtype}_2x3"), dtype, &[2, 3], seed));
        ts.push(Owned::new(&format!("{dtype}_scalar"), dtype, &[], seed + 100));
        ts.push(Owned::new(&format!("{dtype}_empty"), dtype, &[0, 4], seed + 200));
    }
    ts.push(Owned::new("hidden_state", DType::BFloat16, &[1, 37, 64], 7));
    ts.push(Owned::new("input_ids", DType::Int64, &[37], 8));
    ts.push(Owned::new("5d", DType::Float16, &[2, 1, 3, 1, 2], 9));
    ts.push(Owned::new("emoji ✓ name", DType::UInt8, &[3], 10));
    ts.push(Owned::new("storage", DType::Float32, &[1], 11)); // collides with torch's pickle literals
    ts.push(Owned::new("cpu", DType::Float32, &[1], 12));
    ts
}

#[test]
fn every_dtype_round_trips_through_torch_zip() {
    let ts = every_dtype_with_edge_shapes();
    let bytes = torch_zip_bytes(&views(&ts)).unwrap();
    for (name, range) in raw_entries(&bytes) {
        assert!(name.starts_with("archive/"), "{name}");
        assert_eq!(range.start % 64, 0, "{name} is not 64-byte aligned");
    }
    let file = TensorFile::from_bytes(bytes, FileFormat::TorchZip, "round trip").unwrap();
    assert_same(&file, &ts, true);
    file.verify_checksums().unwrap();
}

#[test]
fn files_round_trip_through_both_writers() {
    let ts = every_dtype_with_edge_shapes();
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("data_7.ckpt");
    write_torch_zip(&ckpt, &views(&ts)).unwrap();
    let file = TensorFile::open(&ckpt).unwrap();
    assert!(file.is_mapped());
    assert_same(&file, &ts, true);
    // torch names the archive after the file's stem.
    let raw = std::fs::read(&ckpt).unwrap();
    assert!(raw_entries(&raw).iter().all(|(n, _)| n.starts_with("data_7/")));
    // Only the target file is left behind (the temporary file was renamed).
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    let st = dir.path().join("data_7.safetensors");
    write_safetensors(&st, &views(&ts)).unwrap();
    let file = TensorFile::open(&st).unwrap();
    assert_same(&file, &ts, false);
    // And the reference reader agrees.
    let reference = read_twin(&st);
    assert_eq!(reference.len(), ts.len());
    for (name, plain) in reference {
        let t = ts.iter().find(|t| t.name == name).unwrap();
        assert_eq!((plain.dtype, plain.shape, plain.bytes), (t.dtype, t.shape.clone(), t.bytes.clone()), "{name}");
    }
}

#[test]
fn zip64_fields_are_read_back() {
    let ts = every_dtype_with_edge_shapes();
    let bytes = ferry_format::internal::torch_zip_bytes_zip64_limits(64, 64, &views(&ts)).unwrap();
    let file = TensorFile::from_bytes(bytes, FileFormat::TorchZip, "zip64").unwrap();
    assert_same(&file, &ts, true);
}

// ---------------------------------------------------------------------------------------------
// Torch's zip64 layout.
//
// Observed on a real torch 2.5.1 file (`torch.save({"x": torch.zeros(2**31 + 2**20,
// dtype=torch.int16)}, "big.ckpt")`, 4_297_065_660 bytes; records data.pkl, byteorder, data/0,
// version, .data/serialization_id), by reading its headers with `struct`:
//
// * data.pkl at 0 and byteorder at 252: no zip64 fields at all (torch only adds them where
//   needed, `size >= 0xFFFFFFFF || offset >= 0xFFFFFFFF` in `getPadding` and in miniz).
// * data/0 (4_297_064_448 bytes, local header at 342): local extra `01 00 10 00` + u64 size +
//   u64 0 (compressed size not known yet), then the `FB` padding field; central sizes both
//   0xFFFFFFFF with extra `01 00 10 00` + u64 size + u64 size, offset 342 in the 32-bit field;
//   data descriptor `PK\7\8` crc u64 size u64 size (24 bytes).
// * version (2 bytes, local header at 4_297_064_920) and .data/serialization_id: local extra
//   `01 00 08 00` + u64 offset, then `FB`; central sizes real, offset 0xFFFFFFFF, extra
//   `01 00 08 00` + u64 offset; data descriptor also 24 bytes (u64 sizes): miniz widens the
//   descriptor whenever the record has a zip64 extra, not only when its size needs it.
// * Local headers: version needed 0, flags 0x0808, method 0, time/date 0, crc and both sizes 0.
//   Central headers: made-by 0, needed 0, same flags, no padding field, comment 0, disk 0,
//   attributes 0. Data starts on a 64-byte boundary.
// * End: zip64 end record right after the central directory (size 44, made-by 0x031E, needed
//   0x002D, disks 0/0, entries, central directory size and offset as u64), its locator right
//   after (disk 0, offset of the zip64 record, 1 disk), then the classic end record with the
//   entry count, the central directory size, and its offset clamped to 0xFFFFFFFF
//   (4_297_065_216 → 0xFFFFFFFF). The torch 2.5.1 files in tests/data/torch-2.5.1 (all small)
//   have the same zip64 end record and locator: torch always writes them.
//
// And what torch 2.5.1 reads (miniz 2.1.0, `mz_zip_reader_read_central_dir`): zip64 size fields
// in an archive of any size; but a central entry whose 32-bit offset is the 0xFFFFFFFF sentinel
// and whose compressed size is not is bounded with the raw sentinel (`offset32 + 30 + size <=
// archive size`), so offset fields only load in archives of 4 GiB or more ("invalid header or
// archive is corrupted" otherwise; checked with torch 2.5.1).

/// What [`check_torch_layout`] found for one record.
#[derive(Debug, Clone, PartialEq)]
struct LaidOut {
    name: String,
    offset: u64,
    size: u64,
    /// The record has zip64 size fields / a zip64 offset field.
    zip64_size: bool,
    zip64_offset: bool,
}

const SENTINEL32: u32 = u32::MAX;
const TORCH_ZIP64_LIMIT: u64 = 0xFFFF_FFFF;

/// Little-endian field reader over a header.
struct Le<'a>(&'a [u8], usize);

impl Le<'_> {
    fn u16(&mut self) -> u16 {
        let v = u16::from_le_bytes(self.0[self.1..self.1 + 2].try_into().unwrap());
        self.1 += 2;
        v
    }
    fn u32(&mut self) -> u32 {
        let v = u32::from_le_bytes(self.0[self.1..self.1 + 4].try_into().unwrap());
        self.1 += 4;
        v
    }
    fn u64(&mut self) -> u64 {
        let v = u64::from_le_bytes(self.0[self.1..self.1 + 8].try_into().unwrap());
        self.1 += 8;
        v
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let v = &self.0[self.1..self.1 + n];
        self.1 += n;
        v
    }
}

/// Checks every header and end record of a torch zip archive of `len` bytes against the layout
/// torch 2.5.1 writes (above), with zip64 size fields expected exactly on records of
/// `size_limit` bytes or more and offset fields exactly on records at or past `offset_limit`
/// (torch: 0xFFFFFFFF for both). `read_at(offset, n)` returns `n` bytes of the archive, so a
/// file of several GiB need not be read whole. Data bytes are not read.
fn check_torch_layout(
    read_at: &mut dyn FnMut(u64, usize) -> Vec<u8>,
    len: u64,
    size_limit: u64,
    offset_limit: u64,
) -> Vec<LaidOut> {
    // Classic end record: the last 22 bytes (no comment).
    let eocd_at = len - 22;
    let eocd = read_at(eocd_at, 22);
    let mut e = Le(&eocd, 0);
    assert_eq!(e.u32(), 0x0605_4b50, "end record signature");
    assert_eq!((e.u16(), e.u16()), (0, 0), "end record disks");
    let (n_disk16, n_total16, cd_size32, cd_offset32, comment) = (e.u16(), e.u16(), e.u32(), e.u32(), e.u16());
    assert_eq!(comment, 0);
    // Zip64 locator right before it, pointing at the zip64 end record right before that.
    let locator = read_at(eocd_at - 20, 20);
    let mut l = Le(&locator, 0);
    assert_eq!(l.u32(), 0x0706_4b50, "zip64 locator signature");
    assert_eq!(l.u32(), 0, "zip64 locator disk");
    let z_at = l.u64();
    assert_eq!(l.u32(), 1, "zip64 locator disk count");
    assert_eq!(z_at, eocd_at - 20 - 56, "zip64 end record sits right before its locator");
    let zip64 = read_at(z_at, 56);
    let mut z = Le(&zip64, 0);
    assert_eq!(z.u32(), 0x0606_4b50, "zip64 end record signature");
    assert_eq!(z.u64(), 44, "zip64 end record size");
    assert_eq!((z.u16(), z.u16()), (0x031E, 0x002D), "zip64 end record versions (made by, needed)");
    assert_eq!((z.u32(), z.u32()), (0, 0), "zip64 end record disks");
    let (n_disk, n_total, cd_size, cd_offset) = (z.u64(), z.u64(), z.u64(), z.u64());
    assert_eq!(n_disk, n_total);
    assert_eq!(cd_offset + cd_size, z_at, "zip64 end record follows the central directory");
    assert_eq!(u64::from(n_disk16), n_total.min(0xFFFF));
    assert_eq!(u64::from(n_total16), n_total.min(0xFFFF));
    assert_eq!(u64::from(cd_size32), cd_size.min(TORCH_ZIP64_LIMIT));
    assert_eq!(u64::from(cd_offset32), cd_offset.min(TORCH_ZIP64_LIMIT), "end record offset, clamped");

    let cd_len = usize::try_from(cd_size).unwrap();
    let central = read_at(cd_offset, cd_len);
    let mut c = Le(&central, 0);
    let mut out = Vec::new();
    let mut expected_offset = 0u64; // records are written back to back from offset 0
    for _ in 0..n_total {
        assert_eq!(c.u32(), 0x0201_4b50, "central header signature");
        assert_eq!((c.u16(), c.u16()), (0, 0), "central versions (made by, needed)");
        let flags = c.u16();
        assert_eq!(c.u16(), 0, "method: stored");
        assert_eq!(c.u32(), 0, "time and date");
        let crc = c.u32();
        let (csize32, usize32, name_len, extra_len) = (c.u32(), c.u32(), c.u16(), c.u16());
        assert_eq!((c.u16(), c.u16(), c.u16(), c.u32()), (0, 0, 0, 0), "comment, disk, attributes");
        let offset32 = c.u32();
        let name = String::from_utf8(c.take(name_len.into()).to_vec()).unwrap();
        let extra = c.take(extra_len.into()).to_vec();

        let zip64_size = usize32 == SENTINEL32;
        let zip64_offset = offset32 == SENTINEL32;
        assert_eq!(csize32 == SENTINEL32, zip64_size, "{name}: both sizes or neither are sentinels");
        let mut x = Le(&extra, 0);
        let (mut size, mut offset) = (u64::from(usize32), u64::from(offset32));
        if zip64_size || zip64_offset {
            // Exactly one extra field, zip64 (id 1), holding only the values the 32-bit fields
            // could not: size and compressed size (equal: stored), then the offset.
            let body_len = 16 * usize::from(zip64_size) + 8 * usize::from(zip64_offset);
            assert_eq!((x.u16(), usize::from(x.u16())), (1, body_len), "{name}: central zip64 field");
            if zip64_size {
                size = x.u64();
                assert_eq!(x.u64(), size, "{name}: central zip64 compressed size");
            }
            if zip64_offset {
                offset = x.u64();
            }
        }
        assert_eq!(x.1, extra.len(), "{name}: central extra holds nothing else (no padding)");
        assert_eq!(zip64_size, size >= size_limit, "{name}: zip64 size fields iff size {size} >= {size_limit}");
        assert_eq!(zip64_offset, offset >= offset_limit, "{name}: zip64 offset iff offset {offset} >= {offset_limit}");
        assert_eq!(csize32, usize32, "{name}: stored");
        assert_eq!(offset, expected_offset, "{name}: records are contiguous");
        assert_eq!(flags, if size > 0 { 0x0808 } else { 0x0800 }, "{name}: flags (utf-8, data descriptor)");

        // Local header: no sizes or crc (they follow the data), zip64 field first, then `FB`.
        let fixed = read_at(offset, 30);
        let variable = usize::from(Le(&fixed, 26).u16()) + usize::from(Le(&fixed, 28).u16());
        let local = [fixed, read_at(offset + 30, variable)].concat();
        let mut h = Le(&local, 0);
        assert_eq!(h.u32(), 0x0403_4b50, "{name}: local header signature");
        assert_eq!(h.u16(), 0, "{name}: local version needed");
        assert_eq!(h.u16(), flags, "{name}: local flags");
        assert_eq!((h.u16(), h.u32()), (0, 0), "{name}: local method, time and date");
        assert_eq!((h.u32(), h.u32(), h.u32()), (0, 0, 0), "{name}: local crc and sizes are 0");
        assert_eq!(h.u16(), name_len, "{name}: local name length");
        let local_extra_len = usize::from(h.u16());
        assert_eq!(h.take(name_len.into()), name.as_bytes(), "{name}: local name");
        let extra_start = h.1;
        if zip64_size || zip64_offset {
            let body = 16 * usize::from(zip64_size) + 8 * usize::from(zip64_offset);
            assert_eq!((h.u16(), usize::from(h.u16())), (1, body), "{name}: local zip64 field");
            if zip64_size {
                assert_eq!((h.u64(), h.u64()), (size, 0), "{name}: local zip64 size, compressed size 0");
            }
            if zip64_offset {
                assert_eq!(h.u64(), offset, "{name}: local zip64 offset");
            }
        }
        assert_eq!(h.take(2), b"FB", "{name}: padding field");
        let pad = usize::from(h.u16());
        assert!(pad < 64, "{name}: padding {pad} is minimal");
        assert!(h.take(pad).iter().all(|&b| b == b'Z'), "{name}: padding bytes");
        assert_eq!(h.1 - extra_start, local_extra_len, "{name}: local extra is zip64 + padding only");
        let data_start = offset + h.1 as u64;
        assert_eq!(data_start % 64, 0, "{name}: data is 64-byte aligned");

        // Data descriptor, widened to u64 sizes whenever the record has a zip64 field.
        let mut next = data_start + size;
        if size > 0 {
            let wide = zip64_size || zip64_offset;
            let descriptor = read_at(next, if wide { 24 } else { 16 });
            let mut d = Le(&descriptor, 0);
            assert_eq!((d.u32(), d.u32()), (0x0807_4b50, crc), "{name}: descriptor signature and crc");
            if wide {
                assert_eq!((d.u64(), d.u64()), (size, size), "{name}: 64-bit descriptor sizes");
            } else {
                assert_eq!((u64::from(d.u32()), u64::from(d.u32())), (size, size), "{name}: descriptor sizes");
            }
            next += descriptor.len() as u64;
        }
        expected_offset = next;
        out.push(LaidOut { name, offset, size, zip64_size, zip64_offset });
    }
    assert_eq!(c.1, cd_len, "central directory holds exactly its entries");
    assert_eq!(expected_offset, cd_offset, "central directory follows the last record");
    out
}

fn check_bytes(bytes: &[u8], size_limit: u64, offset_limit: u64) -> Vec<LaidOut> {
    let mut read_at = |at: u64, n: usize| bytes[at as usize..at as usize + n].to_vec();
    check_torch_layout(&mut read_at, bytes.len() as u64, size_limit, offset_limit)
}

/// (name without the archive folder, zip64 size fields, zip64 offset field) per record.
fn zip64_kinds(records: &[LaidOut]) -> Vec<(String, bool, bool)> {
    records.iter().map(|r| (r.name.split_once('/').unwrap().1.to_owned(), r.zip64_size, r.zip64_offset)).collect()
}

#[test]
fn the_layout_checker_accepts_torch_2_5_1_files() {
    // The checker encodes torch's layout: the files real torch wrote pass it unchanged.
    let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/torch-2.5.1"));
    let mut empty_records = 0;
    for name in ["dtypes.ckpt", "views.ckpt", "eagle3.ckpt"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let records = check_bytes(&bytes, TORCH_ZIP64_LIMIT, TORCH_ZIP64_LIMIT);
        assert!(records.iter().all(|r| !r.zip64_size && !r.zip64_offset), "{name}");
        empty_records += records.iter().filter(|r| r.size == 0).count();
    }
    assert!(empty_records > 0, "views.ckpt's empty storage checks the 0x0800 flags of empty records");
}

#[test]
fn the_layout_checker_accepts_torchs_zip64_file() {
    // Every byte but the tensor data of the 4_297_065_660-byte file torch 2.5.1 wrote (see
    // above), extracted with `struct`: the checker passes it, zip64 fields where torch put them.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/torch-2.5.1/big_zip64_headers.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let segments: Vec<(u64, Vec<u8>)> = json["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let hex = s[1].as_str().unwrap();
            let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            (s[0].as_u64().unwrap(), bytes)
        })
        .collect();
    let mut read_at = |at: u64, n: usize| {
        let (start, bytes) = segments
            .iter()
            .find(|(start, b)| *start <= at && at + n as u64 <= start + b.len() as u64)
            .unwrap_or_else(|| panic!("bytes {at}..+{n} of torch's file were not recorded"));
        let from = (at - start) as usize;
        bytes[from..from + n].to_vec()
    };
    let len = json["file_len"].as_u64().unwrap();
    let records = check_torch_layout(&mut read_at, len, TORCH_ZIP64_LIMIT, TORCH_ZIP64_LIMIT);
    assert_eq!(
        zip64_kinds(&records),
        [
            ("data.pkl".to_owned(), false, false),
            ("byteorder".to_owned(), false, false),
            ("data/0".to_owned(), true, false),
            ("version".to_owned(), false, true),
            (".data/serialization_id".to_owned(), false, true),
        ]
    );
    assert_eq!(records[2].size, 4_297_064_448);
}

#[test]
fn zip64_layout_matches_torch() {
    let eagle3 = vec![
        Owned::new("input_ids", DType::Int64, &[512], 1),
        Owned::new("loss_mask", DType::Int64, &[512], 2),
        Owned::new("aux_hidden_state", DType::BFloat16, &[1, 512, 3 * 256], 3),
        Owned::new("hidden_state", DType::BFloat16, &[1, 64, 256], 4),
        Owned::new("empty", DType::Float32, &[0], 5),
    ];

    // Sizes below 4 GiB: no zip64 fields anywhere, only the (always written) zip64 end records.
    let plain = torch_zip_bytes(&views(&eagle3)).unwrap();
    let records = check_bytes(&plain, TORCH_ZIP64_LIMIT, TORCH_ZIP64_LIMIT);
    assert!(records.iter().all(|r| !r.zip64_size && !r.zip64_offset));

    // Torch's >4 GiB file in miniature: a record too big for 32 bits (data/0), after which every
    // record starts past the 32-bit range (data/1, version, serialization id).
    let big = vec![Owned::new("x", DType::Int16, &[4096], 6), Owned::new("tail", DType::Int64, &[3], 7)];
    let limit = 8192; // data/0 is 8192 bytes and ends past offset 8192
    let bytes = ferry_format::internal::torch_zip_bytes_zip64_limits(limit, limit, &views(&big)).unwrap();
    let records = check_bytes(&bytes, limit, limit);
    let kinds = zip64_kinds(&records);
    let kind = |n: &str| kinds.iter().find(|k| k.0 == n).map(|k| (k.1, k.2)).unwrap();
    assert_eq!(kind("data.pkl"), (false, false)); // torch: data.pkl at 0, no zip64
    assert_eq!(kind("byteorder"), (false, false)); // torch: byteorder at 252, no zip64
    assert_eq!(kind("data/0"), (true, false)); // torch: data/0, size fields only
    assert_eq!(kind("data/1"), (false, true));
    assert_eq!(kind("version"), (false, true)); // torch: version, offset field only
    assert_eq!(kind(".data/serialization_id"), (false, true)); // torch: the same
    let file = TensorFile::from_bytes(bytes, FileFormat::TorchZip, "zip64 miniature").unwrap();
    assert_same(&file, &big, true);
    file.verify_checksums().unwrap();

    // A record that needs both: size fields, then the offset, in one zip64 field (miniz's order).
    let bytes = ferry_format::internal::torch_zip_bytes_zip64_limits(64, 64, &views(&eagle3)).unwrap();
    let records = check_bytes(&bytes, 64, 64);
    assert!(records.iter().any(|r| r.zip64_size && r.zip64_offset));
    let file = TensorFile::from_bytes(bytes, FileFormat::TorchZip, "zip64 both").unwrap();
    assert_same(&file, &eagle3, true);
    file.verify_checksums().unwrap();

    // The variant torch 2.5.1 loads below 4 GiB (torch_check_directory's zip64_fields.ckpt):
    // size fields on every record of 64 bytes or more, no offset fields.
    let bytes = ferry_format::internal::torch_zip_bytes_zip64_limits(64, TORCH_ZIP64_LIMIT, &views(&eagle3)).unwrap();
    let records = check_bytes(&bytes, 64, TORCH_ZIP64_LIMIT);
    assert!(records.iter().all(|r| !r.zip64_offset));
    assert_eq!(zip64_kinds(&records).iter().filter(|k| k.1).count(), 5, "data.pkl and data/0..3");
    let file = TensorFile::from_bytes(bytes, FileFormat::TorchZip, "zip64 sizes").unwrap();
    assert_same(&file, &eagle3, true);
}

/// A real file past 4 GiB, written by `write_torch_zip` and checked against torch's layout, read
/// back by ferry and (with `FERRY_TORCH_PYTHON` naming a python that has torch) by
/// `torch.load(mmap=True)`. Needs about 4.3 GB of disk (in `FERRY_BIG_DIR`, default the system
/// temporary directory) and of memory; the file is deleted afterwards. With
/// `FERRY_TORCH_BIG_CKPT` naming a >4 GiB file torch wrote, that file is put through the same
/// layout check first; with `FERRY_TORCH_LOAD_FULL` set, torch also loads it without `mmap`
/// (reading all of it: about 11 GB peak for the python process). Run:
///
/// `FERRY_TORCH_PYTHON=/path/to/python cargo test --release -p ferry-format --test writer -- --ignored --nocapture over_4_gib`
#[test]
#[ignore = "writes a 4.3 GB file; run by hand"]
fn over_4_gib_file_loads_in_torch() {
    use std::io::{Read, Seek, SeekFrom};
    let file_reader = |path: &Path| {
        let mut f = std::fs::File::open(path).unwrap();
        move |at: u64, n: usize| {
            let mut buf = vec![0u8; n];
            f.seek(SeekFrom::Start(at)).unwrap();
            f.read_exact(&mut buf).unwrap();
            buf
        }
    };
    if let Some(theirs) = std::env::var_os("FERRY_TORCH_BIG_CKPT") {
        let path = Path::new(&theirs);
        let len = std::fs::metadata(path).unwrap().len();
        let records = check_torch_layout(&mut file_reader(path), len, TORCH_ZIP64_LIMIT, TORCH_ZIP64_LIMIT);
        eprintln!("torch's {}: {:?}", path.display(), zip64_kinds(&records));
        assert!(records.iter().any(|r| r.zip64_size) && records.iter().any(|r| r.zip64_offset));
    }

    let numel: u64 = (1 << 31) + (1 << 20); // 4_297_064_448 bytes of int16, as in torch's file
    let mut big = vec![0u8; usize::try_from(numel * 2).unwrap()];
    big[..2].copy_from_slice(&7i16.to_le_bytes());
    let n = big.len();
    big[n - 2..].copy_from_slice(&(-3i16).to_le_bytes());
    let tail: Vec<u8> = [11i64, 22, 33].iter().flat_map(|v| v.to_le_bytes()).collect();
    let base = std::env::var_os("FERRY_BIG_DIR").map_or_else(std::env::temp_dir, Into::into);
    let dir = tempfile::tempdir_in(base).unwrap();
    let path = dir.path().join("big.ckpt");
    let shape = [numel];
    let tensors = [
        ("x", TensorView::new(DType::Int16, &shape, &big).unwrap()),
        ("tail", TensorView::new(DType::Int64, &[3], &tail).unwrap()),
    ];
    let started = std::time::Instant::now();
    write_torch_zip(&path, &tensors).unwrap();
    drop(big);
    let len = std::fs::metadata(&path).unwrap().len();
    eprintln!("wrote {len} bytes in {:?}", started.elapsed());
    assert!(len > 1 << 32);

    let records = check_torch_layout(&mut file_reader(&path), len, TORCH_ZIP64_LIMIT, TORCH_ZIP64_LIMIT);
    let kinds = zip64_kinds(&records);
    eprintln!("ferry's: {kinds:?}");
    let kind = |n: &str| kinds.iter().find(|k| k.0 == n).map(|k| (k.1, k.2)).unwrap();
    assert_eq!(kind("data/0"), (true, false));
    assert_eq!(kind("data/1"), (false, true));
    assert_eq!(kind("version"), (false, true));
    assert_eq!(kind(".data/serialization_id"), (false, true));

    let file = TensorFile::open(&path).unwrap();
    let x = file.tensor("x").unwrap();
    assert!(x.is_borrowed());
    assert_eq!((x.dtype(), x.shape()), (DType::Int16, &[numel][..]));
    assert_eq!(
        (&x.bytes()[..2], &x.bytes()[x.bytes().len() - 2..]),
        (&7i16.to_le_bytes()[..], &(-3i16).to_le_bytes()[..])
    );
    assert_eq!(file.tensor("tail").unwrap().bytes(), &tail[..]);
    drop(file);

    if let Some(python) = std::env::var_os("FERRY_TORCH_PYTHON") {
        let script = r#"
import sys, time, torch
t = time.time()
d = torch.load(sys.argv[1], weights_only=True, mmap=True)
x, tail = d["x"], d["tail"]
assert list(d) == ["x", "tail"], list(d)
assert x.dtype == torch.int16 and x.shape == (2**31 + 2**20,), (x.dtype, x.shape)
assert int(x[0]) == 7 and int(x[-1]) == -3 and int(x[1]) == 0 and int(x[2**31]) == 0
assert int(x[::4099].abs().sum()) == 7
assert tail.tolist() == [11, 22, 33], tail
print(f"torch {torch.__version__}: torch.load(mmap=True) ok in {time.time() - t:.1f}s")
if sys.argv[2] == "1":
    t = time.time()
    d = torch.load(sys.argv[1], weights_only=True)  # reads every record (miniz checks CRCs)
    assert int(d["x"][0]) == 7 and int(d["x"][-1]) == -3 and not bool(d["x"][1:-1].any())
    print(f"torch.load (no mmap) ok in {time.time() - t:.1f}s")
import zipfile
sizes = {i.filename: i.file_size for i in zipfile.ZipFile(sys.argv[1]).infolist()}
assert sizes["big/data/0"] == 2 * x.numel(), sizes
print("python zipfile reads the zip64 directory")
"#;
        let full = if std::env::var_os("FERRY_TORCH_LOAD_FULL").is_some() { "1" } else { "0" };
        let out = Command::new(python).arg("-c").arg(script).arg(&path).arg(full).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        eprintln!("{stdout}");
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    } else {
        eprintln!("note: FERRY_TORCH_PYTHON not set; skipped torch.load");
    }
}

#[test]
fn more_than_one_pickle_batch_round_trips() {
    let ts: Vec<Owned> = (0..2001).map(|i| Owned::new(&format!("t{i}"), DType::Int16, &[2], i)).collect();
    let file = TensorFile::from_bytes(torch_zip_bytes(&views(&ts)).unwrap(), FileFormat::TorchZip, "many").unwrap();
    assert_same(&file, &ts, true);
}

fn tensor_strategy() -> impl Strategy<Value = (DType, Vec<u64>, u64)> {
    (prop::sample::select(DType::ALL.to_vec()), prop::collection::vec(0u64..5, 0..5), any::<u64>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_tensors_round_trip(specs in prop::collection::vec(tensor_strategy(), 0..8)) {
        let ts: Vec<Owned> = specs
            .iter()
            .enumerate()
            .map(|(i, (dtype, shape, seed))| Owned::new(&format!("t{i}_{dtype}"), *dtype, shape, *seed))
            .collect();
        let bytes = torch_zip_bytes(&views(&ts)).unwrap();
        let file = TensorFile::from_bytes(bytes, FileFormat::TorchZip, "random").unwrap();
        assert_same(&file, &ts, true);
        let dir = tempfile::tempdir().unwrap();
        let st = dir.path().join("r.safetensors");
        write_safetensors(&st, &views(&ts)).unwrap();
        assert_same(&TensorFile::open(&st).unwrap(), &ts, false);
    }
}

fn python3() -> Option<&'static str> {
    Command::new("python3").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "python3")
}

/// Python's `zipfile` opens our output (and verifies every CRC-32) and `pickletools.dis` walks
/// `data.pkl`.
#[test]
fn python_zipfile_and_pickletools_accept_the_output() {
    let Some(python) = python3() else {
        eprintln!("note: python3 not found; skipping the zipfile/pickletools check");
        return;
    };
    let ts = every_dtype_with_edge_shapes();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("check.ckpt");
    write_torch_zip(&path, &views(&ts)).unwrap();
    let script = r#"
import sys, zipfile, pickletools, io
z = zipfile.ZipFile(sys.argv[1])
assert z.testzip() is None, "CRC mismatch"
names = z.namelist()
assert names[0] == "check/data.pkl", names
out = io.StringIO()
pickletools.dis(z.read("check/data.pkl"), out=out)
print(len(names), "entries;", len(out.getvalue().splitlines()), "pickle ops")
"#;
    let out = Command::new(python).arg("-c").arg(script).arg(&path).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes the files `torch_load_check.py` checks, plus `expected.json`.
fn write_check_directory(dir: &Path) {
    let mut expected = serde_json::Map::new();
    let mut record = |file: &str, ts: &[Owned]| {
        let mut m = serde_json::Map::new();
        for t in ts {
            m.insert(
                t.name.clone(),
                serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "sha256": sha256_hex(&t.bytes)}),
            );
        }
        expected.insert(file.to_owned(), serde_json::Value::Object(m));
    };
    let all = every_dtype_with_edge_shapes();
    write_torch_zip(&dir.join("every_dtype.ckpt"), &views(&all)).unwrap();
    record("every_dtype.ckpt", &all);
    write_safetensors(&dir.join("every_dtype.safetensors"), &views(&all)).unwrap();
    record("every_dtype.safetensors", &all);

    let eagle3 = vec![
        Owned::new("input_ids", DType::Int64, &[512], 1),
        Owned::new("loss_mask", DType::Int64, &[512], 2),
        Owned::new("aux_hidden_state", DType::BFloat16, &[1, 512, 3 * 256], 3),
        Owned::new("hidden_state", DType::BFloat16, &[1, 512, 256], 4),
    ];
    write_torch_zip(&dir.join("data_0.ckpt"), &views(&eagle3)).unwrap();
    record("data_0.ckpt", &eagle3);

    let many: Vec<Owned> = (0..1001).map(|i| Owned::new(&format!("t{i}"), DType::Float32, &[2], i)).collect();
    write_torch_zip(&dir.join("many.ckpt"), &views(&many)).unwrap();
    record("many.ckpt", &many);

    let one = vec![Owned::new("only", DType::Float16, &[3, 3], 5)];
    write_torch_zip(&dir.join("single.ckpt"), &views(&one)).unwrap();
    record("single.ckpt", &one);

    let empty: Vec<Owned> = Vec::new();
    write_torch_zip(&dir.join("empty_dict.ckpt"), &views(&empty)).unwrap();
    record("empty_dict.ckpt", &empty);

    // Zip64 size fields on every record of 64 bytes or more, as a file's records of 4 GiB or
    // more have them. Not offset fields: torch 2.5.1 refuses those in an archive under 4 GiB
    // (see `zip64_layout_matches_torch`); `over_4_gib_file_loads_in_torch` covers them.
    let z64 = ferry_format::internal::torch_zip_bytes_zip64_limits(64, TORCH_ZIP64_LIMIT, &views(&eagle3)).unwrap();
    std::fs::write(dir.join("zip64_fields.ckpt"), z64).unwrap();
    record("zip64_fields.ckpt", &eagle3);

    let json = serde_json::to_string_pretty(&serde_json::Value::Object(expected)).unwrap();
    std::fs::write(dir.join("expected.json"), json).unwrap();
}

/// Writes the `torch.load` check directory into `$FERRY_WRITE_TORCH_CHECK_DIR` when set (for a
/// machine with torch: `python3 crates/ferry-format/tests/torch_load_check.py "$DIR"`), and in
/// every run checks a temporary copy with the standard-library unpickler when python3 exists.
#[test]
fn torch_check_directory() {
    if let Some(dir) = std::env::var_os("FERRY_WRITE_TORCH_CHECK_DIR") {
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).unwrap();
        write_check_directory(dir);
        eprintln!(
            "wrote the torch.load check files to {}; run: python3 crates/ferry-format/tests/torch_load_check.py {}",
            dir.display(),
            dir.display()
        );
    }
    let Some(python) = python3() else {
        eprintln!("note: python3 not found; skipping the unpickler check");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    write_check_directory(tmp.path());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/torch_load_check.py");
    let out = Command::new(python).arg(script).arg(tmp.path()).arg("--no-torch").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("7 files checked with stdlib unpickler: ok"), "{stdout}");
}

/// A test-side `safetensors::View` over an owned tensor.
struct RefView<'a>(&'a Owned, Vec<usize>);

impl safetensors::View for &RefView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        use safetensors::Dtype as D;
        match self.0.dtype {
            DType::Float32 => D::F32,
            DType::Float64 => D::F64,
            DType::Float16 => D::F16,
            DType::BFloat16 => D::BF16,
            DType::Int64 => D::I64,
            DType::Int32 => D::I32,
            DType::Int16 => D::I16,
            DType::Int8 => D::I8,
            DType::UInt8 => D::U8,
            DType::Bool => D::BOOL,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.0.bytes)
    }
    fn data_len(&self) -> usize {
        self.0.bytes.len()
    }
}

/// `write_safetensors` writes exactly the reference serializer's bytes, and both writers create
/// files with the permissions `File::create` would (not the 0600 of a bare temporary file).
#[test]
fn safetensors_bytes_match_the_reference_and_files_are_shareable() {
    let ts = every_dtype_with_edge_shapes();
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("x.safetensors");
    write_safetensors(&st, &views(&ts)).unwrap();
    let refs: Vec<RefView<'_>> = ts.iter().map(|t| RefView(t, t.shape.iter().map(|&d| d as usize).collect())).collect();
    let reference = safetensors::serialize(ts.iter().zip(&refs).map(|(t, v)| (t.name.as_str(), v)), None).unwrap();
    assert!(std::fs::read(&st).unwrap() == reference, "bytes differ from safetensors::serialize");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let ckpt = dir.path().join("x.ckpt");
        write_torch_zip(&ckpt, &views(&ts)).unwrap();
        let probe = dir.path().join("probe");
        std::fs::File::create(&probe).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&st), mode(&probe));
        assert_eq!(mode(&ckpt), mode(&probe));
    }
}
