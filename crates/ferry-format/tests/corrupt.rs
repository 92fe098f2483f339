//! Crafted and damaged files each fail with a specific error naming what was wrong, and never
//! panic: truncations, bad opcodes, disallowed globals, storages shorter than their tensors,
//! nested containers, absurd declared sizes.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use common::{fixtures, pkl, raw_entries, zip_stored};
use ferry_core::{DType, Error, TensorView};
use ferry_format::{FileFormat, OpenOptions, TensorFile, torch_zip_bytes};

fn eagle3() -> Vec<u8> {
    std::fs::read(fixtures().join("specforge-offline-eagle3/rows_0-2/data_0.ckpt")).unwrap()
}

/// Opens `bytes` as a torch zip and reads every tensor; returns the first error's message.
fn error_of(bytes: Vec<u8>, format: FileFormat) -> String {
    let result = TensorFile::from_bytes(bytes, format, "crafted").and_then(|f| {
        for name in f.names() {
            f.tensor(name)?;
        }
        Ok(())
    });
    match result {
        Ok(()) => panic!("crafted file was accepted"),
        Err(e @ (Error::Corrupt { .. } | Error::NotFound { .. } | Error::Io { .. })) => e.to_string(),
        Err(other) => panic!("unexpected error kind: {other:?}"),
    }
}

fn torch_err(bytes: Vec<u8>) -> String {
    error_of(bytes, FileFormat::TorchZip)
}

fn assert_has(msg: &str, fragments: &[&str]) {
    for f in fragments {
        assert!(msg.contains(f), "expected {f:?} in: {msg}");
    }
}

/// Replaces `from` with `to` (same length) inside the `data.pkl` entry of a stored archive.
fn patch_pickle(mut bytes: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let range = raw_entries(&bytes).into_iter().find(|(n, _)| n.ends_with("/data.pkl")).unwrap().1;
    let pkl = &mut bytes[range];
    let at = pkl.windows(from.len()).position(|w| w == from).unwrap_or_else(|| panic!("{from:?} not in data.pkl"));
    pkl[at..at + to.len()].copy_from_slice(to);
    bytes
}

/// An archive holding `pickle` as `archive/data.pkl` plus the given storages.
fn with_pickle(pickle: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    let mut entries: Vec<(String, &[u8])> = vec![("archive/data.pkl".to_owned(), pickle)];
    entries.extend(storages.iter().map(|(k, d)| (format!("archive/data/{k}"), *d)));
    let refs: Vec<(&str, &[u8])> = entries.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    zip_stored(&refs, 0)
}

/// `{name: tensor}` with one float32 tensor over storage "0": `persid_numel` elements declared,
/// `size`/`stride` tuples and storage offset as given (raw pickle fragments).
fn tensor_pickle(name: &str, persid_numel: &[u8], offset: &[u8], size: &[u8], stride: &[u8]) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x00".to_vec();
    p.push(b'X');
    p.extend_from_slice(&(name.len() as u32).to_le_bytes());
    p.extend_from_slice(name.as_bytes());
    p.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpu");
    p.extend_from_slice(persid_numel);
    p.extend_from_slice(b"tQ");
    p.extend_from_slice(offset);
    p.extend_from_slice(size);
    p.extend_from_slice(stride);
    p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)RtRs.");
    p
}

#[test]
fn crafted_tensor_pickle_is_accepted_as_a_baseline() {
    let pkl = tensor_pickle("t", b"K\x04", b"K\x00", b"K\x04\x85", b"K\x01\x85");
    let f = TensorFile::from_bytes(with_pickle(&pkl, &[("0", &[0u8; 16])]), FileFormat::TorchZip, "ok").unwrap();
    assert_eq!(f.tensor("t").unwrap().shape(), &[4]);
}

#[test]
fn truncated_archives_fail_at_every_cut() {
    let bytes = eagle3();
    let len = bytes.len();
    for cut in
        [0, 1, 3, 4, 21, 22, 30, 64, 500, 1000, len / 2, len - 200, len - 100, len - 60, len - 23, len - 22, len - 1]
    {
        let msg = torch_err(bytes[..cut].to_vec());
        let specific =
            ["truncated", "too short", "no end-of-central-directory", "empty", "zip64", "bad signature", "runs past"];
        assert!(specific.iter().any(|f| msg.contains(f)), "cut {cut}: {msg}");
    }
}

#[test]
fn unsupported_opcode_is_named() {
    // The BINPUT right after EMPTY_DICT becomes BUILD.
    let msg = torch_err(patch_pickle(eagle3(), b"}q\x00(", b"}b\x00("));
    assert_has(&msg, &["unsupported pickle opcode BUILD (0x62)", "data.pkl", "crafted"]);
    let msg = torch_err(patch_pickle(eagle3(), b"}q\x00(", b"}\x81\x00("));
    assert_has(&msg, &["NEWOBJ"]);
}

#[test]
fn storage_shorter_than_its_shape() {
    // input_ids: size (5,) -> (6,) over a 5-element storage.
    let msg = torch_err(patch_pickle(eagle3(), b"QK\x00K\x05\x85", b"QK\x00K\x06\x85"));
    assert_has(&msg, &["\"input_ids\"", "storage is shorter than the tensor's shape", "data/0"]);
    // An offset that pushes a view past the end.
    let pkl = tensor_pickle("t", b"K\x04", b"K\x02", b"K\x03\x85", b"K\x01\x85");
    let msg = torch_err(with_pickle(&pkl, &[("0", &[0u8; 16])]));
    assert_has(&msg, &["\"t\"", "storage is shorter"]);
    // The storage record declares more elements than its entry holds.
    let msg = torch_err(patch_pickle(eagle3(), b"cpuq\x06K\x05t", b"cpuq\x06K\x06t"));
    assert_has(&msg, &["holds 40 bytes but its record declares 6 int64 elements"]);
    // The entry is missing altogether.
    let pkl = tensor_pickle("t", b"K\x04", b"K\x00", b"K\x04\x85", b"K\x01\x85");
    let msg = torch_err(with_pickle(&pkl, &[]));
    assert_has(&msg, &["storage \"data/0\" of tensor \"t\" is missing"]);
}

#[test]
fn disallowed_globals_are_refused_before_anything_runs() {
    let pkl = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00echoq\x01\x85q\x02Rq\x03.";
    let msg = torch_err(with_pickle(pkl, &[]));
    assert_has(&msg, &["disallowed global \"os.system\"", "ferry only rebuilds tensors"]);
    let pkl = b"\x80\x02X\x08\x00\x00\x00builtinsX\x04\x00\x00\x00eval\x93.";
    assert_has(&torch_err(with_pickle(pkl, &[])), &["disallowed global \"builtins.eval\""]);
    let pkl = b"\x80\x02ctorch\nComplexFloatStorage\n.";
    assert_has(&torch_err(with_pickle(pkl, &[])), &["torch.ComplexFloatStorage", "complex64", "not support"]);
}

#[test]
fn nested_containers_name_the_key() {
    let pkl = b"\x80\x02}q\x00X\x05\x00\x00\x00outer}q\x01s.";
    assert_has(&torch_err(with_pickle(pkl, &[])), &["key \"outer\"", "a dict", "nested containers are not supported"]);
    let pkl = b"\x80\x02}q\x00X\x04\x00\x00\x00list]q\x01s.";
    assert_has(&torch_err(with_pickle(pkl, &[])), &["key \"list\"", "a list"]);
    let pkl = b"\x80\x02}q\x00X\x01\x00\x00\x00nNs.";
    assert_has(&torch_err(with_pickle(pkl, &[])), &["key \"n\"", "None, not a tensor"]);
    let pkl = b"\x80\x02]q\x00.";
    assert_has(&torch_err(with_pickle(pkl, &[])), &["a list, not a dict of tensors"]);
}

#[test]
fn huge_declared_sizes_are_refused_without_allocating() {
    let storage = [0u8; 16];
    // numel 2^62 in the persistent id: overflows bytes, far beyond the entry.
    let pkl = tensor_pickle("t", b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40", b"K\x00", b"K\x04\x85", b"K\x01\x85");
    assert_has(
        &torch_err(with_pickle(&pkl, &[("0", &storage)])),
        &["holds 16 bytes but its record declares 4611686018427387904"],
    );
    // A shape whose element count overflows 64 bits.
    let big = b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x40";
    let mut size = big.to_vec();
    size.extend_from_slice(big);
    size.push(0x86);
    let pkl = tensor_pickle("t", b"K\x04", b"K\x00", &size, b"K\x01K\x01\x86");
    assert_has(&torch_err(with_pickle(&pkl, &[("0", &storage)])), &["overflows 64 bits"]);
    // An expanded view (stride 0) claiming 2^40 elements from a 4-element storage.
    let pkl = tensor_pickle("t", b"K\x04", b"K\x00", b"\x8a\x06\x00\x00\x00\x00\x00\x01\x85", b"K\x00\x85");
    assert_has(&torch_err(with_pickle(&pkl, &[("0", &storage)])), &["overlapping view", "refused"]);
    // A 4 GiB string.
    let pkl = b"\x80\x02}X\xff\xff\xff\xff";
    assert_has(&torch_err(with_pickle(pkl, &[])), &["4294967295", "exceeds"]);
    // A zip directory declaring 65535 entries in a few bytes.
    let mut bytes = eagle3();
    let n = bytes.len();
    bytes[n - 12..n - 10].copy_from_slice(&u16::MAX.to_le_bytes());
    bytes[n - 14..n - 12].copy_from_slice(&u16::MAX.to_le_bytes());
    // (torch files carry zip64 end records, which win; break the locator so the classic record counts)
    bytes[n - 42] ^= 0xff;
    assert_has(&torch_err(bytes), &["zip64"]);
    let mut small = zip_stored(&[("a/data.pkl", b"\x80\x02}.")], 0);
    let m = small.len();
    small[m - 12..m - 10].copy_from_slice(&5000u16.to_le_bytes());
    small[m - 14..m - 12].copy_from_slice(&5000u16.to_le_bytes());
    assert_has(&torch_err(small), &["declares 5000 entries but its central directory is only"]);
    // An entry whose declared size runs past the end of the file.
    let mut z = zip_stored(&[("a/data.pkl", b"\x80\x02}.")], 0);
    let cd = raw_central_offset(&z);
    z[cd + 20..cd + 24].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    z[cd + 24..cd + 28].copy_from_slice(&0x7fff_fff0u32.to_le_bytes());
    assert_has(&torch_err(z), &["run past the end of the archive"]);
}

fn raw_central_offset(z: &[u8]) -> usize {
    let n = z.len();
    u32::from_le_bytes(z[n - 6..n - 2].try_into().unwrap()) as usize
}

#[test]
fn archive_level_problems_are_named() {
    let msg = torch_err(zip_stored(&[("a/other", b"x")], 0));
    assert_has(&msg, &["no <archive>/data.pkl entry", "a/other"]);
    let msg = torch_err(zip_stored(&[("a/data.pkl", b"\x80\x02}."), ("b/data.pkl", b"\x80\x02}.")], 0));
    assert_has(&msg, &["two top-level folders"]);
    let msg = torch_err(zip_stored(&[("a/data.pkl", b"\x80\x02}.")], 8));
    assert_has(&msg, &["compressed (method 8)"]);
    let msg = torch_err(zip_stored(&[("a/data.pkl", b"\x80\x02}."), ("a/byteorder", b"big")], 0));
    assert_has(&msg, &["only little-endian"]);
    let msg = torch_err(zip_stored(&[("a/data.pkl", b"\x80\x02}."), ("a/data.pkl", b"\x80\x02}.")], 0));
    assert_has(&msg, &["appears twice"]);
    let pkl = b"\x80\x02}q\x00(X\x01\x00\x00\x00aNX\x01\x00\x00\x00aNu.";
    assert!(torch_err(with_pickle(pkl, &[])).contains("not a tensor"));
}

#[test]
fn other_formats_fail_specifically() {
    // A gzip stream cut short.
    let gz = std::fs::read(fixtures().join("specforge-offline-eagle3/rows_2-4/data_2.ckpt.gz")).unwrap();
    let msg = error_of(gz[..gz.len() / 2].to_vec(), FileFormat::TorchZipGz);
    assert_has(&msg, &["gzip", "corrupt or truncated"]);
    // Over the decompression limit.
    let err = TensorFile::from_bytes_with(
        gz.clone(),
        FileFormat::TorchZipGz,
        "gz",
        &OpenOptions { max_decompressed_bytes: 100, ..OpenOptions::default() },
    )
    .unwrap_err()
    .to_string();
    assert_has(&err, &["more than 100 bytes"]);
    // gzip of something that is not a torch zip.
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut e, b"plain text, not a zip").unwrap();
    let msg = error_of(e.finish().unwrap(), FileFormat::TorchZipGz);
    assert_has(&msg, &["after gzip decompression"]);
    // Safetensors header damage.
    let st = std::fs::read(common::twin("specforge-offline-eagle3/rows_0-2/data_0.ckpt")).unwrap();
    let msg = error_of(st[..st.len() - 1].to_vec(), FileFormat::Safetensors);
    assert_has(&msg, &["safetensors", "invalid"]);
    let mut bad = st.clone();
    bad[9] = b'!';
    assert!(TensorFile::from_bytes(bad, FileFormat::Safetensors, "st").is_err());
}

#[test]
fn writer_rejects_bad_arguments() {
    let d = [0u8; 4];
    let v = TensorView::new(DType::Float32, &[1], &d).unwrap();
    let err = torch_zip_bytes(&[("x", v), ("x", v)]).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("appears twice"), "{err}");
    let err = ferry_format::torch_zip_bytes_named("a/b", &[("x", v)]).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
}

/// A ones tuple of `n` (shape or strides of a size-1 tensor of `n` dimensions).
fn ones(n: usize) -> Vec<u64> {
    vec![1; n]
}

#[test]
fn one_memoized_record_under_many_names_is_bounded() {
    use ferry_format::limits::{MAX_TENSOR_DIMS, MAX_TENSORS};
    let storage = [0u8; 4];
    // More names than MAX_TENSORS, all the same 1-dimensional record.
    let record = pkl::tensor("0", 1, &[1], &[1]);
    let pickle = pkl::shared_tensor_dict(&record, MAX_TENSORS + 1);
    assert_has(&torch_err(with_pickle(&pickle, &[("0", &storage)])), &["MAX_TENSORS", &MAX_TENSORS.to_string()]);
    // Up to the limit is fine (and the record is shared, not copied).
    let pickle = pkl::shared_tensor_dict(&record, 1000);
    let f = TensorFile::from_bytes(with_pickle(&pickle, &[("0", &storage)]), FileFormat::TorchZip, "ok").unwrap();
    assert_eq!(f.len(), 1000);
    // A 64-dimensional record under 20 000 names: 2.56 million shape and stride entries.
    let record = pkl::tensor("0", 1, &ones(64), &ones(64));
    let pickle = pkl::shared_tensor_dict(&record, 20_000);
    assert_has(
        &torch_err(with_pickle(&pickle, &[("0", &storage)])),
        &["MAX_TENSOR_DIMS", &MAX_TENSOR_DIMS.to_string()],
    );
}

/// `{callable: args}`, then `n` tensor records rebuilt from the memoized callable and arguments
/// (kept alive as keys and values of the same dict; `n` even).
fn many_rebuilds(args: &[u8], n: usize) -> Vec<u8> {
    let mut p = b"\x80\x02}q\x00".to_vec();
    p.extend_from_slice(pkl::REBUILD);
    p.extend_from_slice(b"q\x01");
    p.extend_from_slice(args);
    p.extend_from_slice(b"q\x02s");
    let mut i = 0;
    while i < n {
        p.push(b'(');
        for _ in 0..1000.min(n - i) {
            p.extend_from_slice(b"h\x01h\x02R");
            i += 1;
        }
        p.push(b'u');
    }
    p.push(b'.');
    p
}

#[test]
fn records_rebuilt_from_memoized_arguments_are_bounded() {
    use ferry_format::limits::MAX_TENSORS;
    let storage = [0u8; 4];
    // Each REDUCE builds a record's shape and strides from one memoized tuple.
    let args = pkl::args("0", 1, &ones(64), &ones(64));
    let msg = torch_err(with_pickle(&many_rebuilds(&args, 20_000), &[("0", &storage)]));
    assert_has(&msg, &["MAX_TENSOR_DIMS"]);
    let args = pkl::args("0", 1, &[], &[]);
    let msg = torch_err(with_pickle(&many_rebuilds(&args, MAX_TENSORS + 2), &[("0", &storage)]));
    assert_has(&msg, &["MAX_TENSORS", "tensor records"]);
}

#[test]
fn overlapping_views_are_bounded_per_file() {
    use ferry_format::limits::MAX_EXPANDED_VIEW_BYTES;
    let storage = [0u8; 4];
    // Each view materialises exactly the per-view limit (2^28 float32 elements, stride 0).
    let n = MAX_EXPANDED_VIEW_BYTES / 4;
    let dict = |count: usize| {
        let mut p = b"\x80\x02}q\x00(".to_vec();
        for i in 0..count {
            p.extend(pkl::str(&format!("e{i}")));
            p.extend(pkl::tensor("0", 1, &[n], &[0]));
        }
        p.extend_from_slice(b"u.");
        with_pickle(&p, &[("0", &storage)])
    };
    let one = TensorFile::from_bytes(dict(1), FileFormat::TorchZip, "one").unwrap();
    assert_eq!(one.spec("e0").unwrap().shape, [n]);
    let err = TensorFile::from_bytes(dict(64), FileFormat::TorchZip, "many").unwrap_err().to_string();
    assert_has(&err, &["\"e1\"", "overlapping view", "MAX_EXPANDED_VIEW_BYTES", "per file"]);
}

#[cfg(unix)]
#[test]
fn non_regular_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero.ckpt");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    let folder = dir.path().join("folder.ckpt");
    std::fs::create_dir(&folder).unwrap();
    let fifo = dir.path().join("fifo.ckpt.gz");
    let have_fifo = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
    let mut cases = vec![(zero, "a character device"), (folder, "a directory")];
    if have_fifo {
        cases.push((fifo, "a FIFO"));
    }
    for (path, kind) in cases {
        for options in [OpenOptions::default(), OpenOptions { map: false, ..OpenOptions::default() }] {
            let err = TensorFile::open_with(&path, &options).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
            assert_has(&err.to_string(), &["not a regular file", kind]);
        }
        assert_has(&FileFormat::detect(&path).unwrap_err().to_string(), &["not a regular file"]);
    }
    // A symlink to a regular file is followed.
    let real = dir.path().join("real.ckpt");
    std::fs::write(&real, eagle3()).unwrap();
    let link = dir.path().join("link.ckpt");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert!(TensorFile::open(&link).is_ok());
}

/// The central-directory entry of `name` in a `zip_stored` archive.
fn central_entry(z: &[u8], name: &str) -> usize {
    let mut at = raw_central_offset(z);
    loop {
        let name_len = u16::from_le_bytes([z[at + 28], z[at + 29]]) as usize;
        if &z[at + 46..at + 46 + name_len] == name.as_bytes() {
            return at;
        }
        at += 46 + name_len;
    }
}

fn set_size(z: &mut [u8], name: &str, size: u32) {
    let at = central_entry(z, name);
    z[at + 20..at + 24].copy_from_slice(&size.to_le_bytes());
    z[at + 24..at + 28].copy_from_slice(&size.to_le_bytes());
}

#[test]
fn overlapping_zip_entries_are_refused() {
    let pkl = pkl::shared_tensor_dict(&pkl::tensor("0", 1, &[1], &[1]), 1);
    let base = with_pickle(&pkl, &[("0", &[0u8; 4])]);
    let cd = raw_central_offset(&base);
    // data.pkl's size grown over the storage's record (up to the central directory).
    let mut z = base.clone();
    let pkl_start = 30 + "archive/data.pkl".len();
    set_size(&mut z, "archive/data.pkl", (cd - pkl_start) as u32);
    assert_has(&torch_err(z), &["\"archive/data.pkl\"", "\"archive/data/0\"", "overlap"]);
    // The last entry's data running into the central directory.
    let mut z = base.clone();
    set_size(&mut z, "archive/data/0", 40);
    assert_has(&torch_err(z), &["\"archive/data/0\"", "runs into the central directory"]);
    assert!(TensorFile::from_bytes(base, FileFormat::TorchZip, "ok").unwrap().verify_checksums().is_ok());
}

#[test]
fn gzip_nul_padding_after_the_last_member_is_accepted() {
    let gz = std::fs::read(fixtures().join("specforge-offline-eagle3/rows_2-4/data_2.ckpt.gz")).unwrap();
    let plain = TensorFile::from_bytes(gz.clone(), FileFormat::TorchZipGz, "gz").unwrap();
    let mut padded = gz.clone();
    padded.extend([0u8; 4096]);
    let f = TensorFile::from_bytes(padded.clone(), FileFormat::TorchZipGz, "padded").unwrap();
    assert_eq!(f.specs(), plain.specs());
    for name in plain.names() {
        assert_eq!(f.tensor(name).unwrap().bytes(), plain.tensor(name).unwrap().bytes());
    }
    // Through a file, too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("padded.ckpt.gz");
    std::fs::write(&path, &padded).unwrap();
    assert_eq!(TensorFile::open(&path).unwrap().specs(), plain.specs());
    // Only NULs: anything else after the last member is not a gzip header.
    padded.extend_from_slice(b"junk");
    assert_has(&error_of(padded, FileFormat::TorchZipGz), &["gzip", "corrupt"]);
    assert_eq!(OpenOptions::default().max_decompressed_bytes, 16 << 30);
}

/// The error of a writer call that must fail (without printing the bytes it wrote otherwise).
fn write_err(result: ferry_core::Result<Vec<u8>>) -> Error {
    match result {
        Ok(bytes) => panic!("the writer accepted the tensors ({} bytes written)", bytes.len()),
        Err(e) => e,
    }
}

#[test]
fn writers_refuse_what_the_reader_would_refuse() {
    use ferry_format::limits::{MAX_PICKLE_STRING, MAX_TENSORS};
    let d = [0u8; 4];
    let v = TensorView::new(DType::Float32, &[1], &d).unwrap();
    let long = "n".repeat(MAX_PICKLE_STRING + 1);
    let err = write_err(torch_zip_bytes(&[(long.as_str(), v)]));
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_has(&err.to_string(), &["MAX_PICKLE_STRING", &(MAX_PICKLE_STRING + 1).to_string()]);
    // The longest accepted name reads back.
    let longest = &long[..MAX_PICKLE_STRING];
    let bytes = torch_zip_bytes(&[(longest, v)]).unwrap();
    assert!(TensorFile::from_bytes(bytes, FileFormat::TorchZip, "ok").unwrap().tensor(longest).is_ok());
    // More tensors than the reader accepts.
    let names: Vec<String> = (0..=MAX_TENSORS).map(|i| format!("t{i}")).collect();
    let many: Vec<(&str, TensorView<'_>)> = names.iter().map(|n| (n.as_str(), v)).collect();
    assert_has(&write_err(torch_zip_bytes(&many)).to_string(), &["MAX_TENSORS"]);
    // More shape and stride entries than it accepts.
    let shape = vec![1u64; 64];
    let wide = TensorView::new(DType::Float32, &shape, &d).unwrap();
    let many: Vec<(&str, TensorView<'_>)> = names[..9000].iter().map(|n| (n.as_str(), wide)).collect();
    assert_has(&write_err(torch_zip_bytes(&many)).to_string(), &["MAX_TENSOR_DIMS"]);
}

#[test]
fn names_from_the_file_are_escaped_in_messages() {
    let evil = "x\n\u{1b}[2J\rcorrupt";
    let mut messages = Vec::new();
    // A STACK_GLOBAL module and name.
    let mut p = b"\x80\x02".to_vec();
    p.extend(pkl::str(evil));
    p.extend(pkl::str(evil));
    p.extend_from_slice(b"\x93.");
    messages.push((torch_err(with_pickle(&p, &[])), "disallowed global"));
    let mut p = b"\x80\x02".to_vec();
    p.extend(pkl::str("torch"));
    p.extend(pkl::str(&format!("{evil}Storage")));
    p.extend_from_slice(b"\x93.");
    messages.push((torch_err(with_pickle(&p, &[])), "unsupported storage class"));
    // Zip entry names, storage keys and tensor names.
    messages.push((torch_err(zip_stored(&[(&format!("a/{evil}"), b"x")], 0)), "no <archive>/data.pkl"));
    let pickle = pkl::shared_tensor_dict(&pkl::tensor(evil, 1, &[1], &[1]), 1);
    messages.push((torch_err(with_pickle(&pickle, &[])), "is missing"));
    let mut p = b"\x80\x02}q\x00".to_vec();
    p.extend(pkl::str(evil));
    p.extend(pkl::tensor("0", 1, &[1], &[1]));
    p.extend_from_slice(b"s.");
    let f = TensorFile::from_bytes(with_pickle(&p, &[("0", &[0u8; 4])]), FileFormat::TorchZip, "ok").unwrap();
    messages.push((f.tensor("absent").unwrap_err().to_string(), "it holds"));
    for (msg, what) in messages {
        assert_has(&msg, &[what, "x\\n\\u{1b}[2J\\rcorrupt"]);
        assert!(!msg.contains(['\u{1b}', '\n', '\r']), "{msg:?}");
    }
}
