//! Reader vectors real torch 2.5.1 wrote (`tests/data/torch-2.5.1`): every dtype, views
//! (transposed, sliced, shared storage, 0-dim, empty, strided step) and an EAGLE3-shaped dict.
//! `expected.json` records, per file and tensor, what torch itself reported: dtype, shape and
//! the SHA-256 of the tensor's contiguous little-endian bytes. ferry must read every tensor to
//! exactly that, mapped or not.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

use ferry_format::{OpenOptions, TensorFile};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::Path;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/torch-2.5.1");

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(Path::new(DIR).join("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_torch_2_5_1_vector_reads_to_what_torch_reported() {
    let expected = expected();
    assert!(expected["torch"].as_str().unwrap().starts_with("2.5.1"), "{}", expected["torch"]);
    let files = expected["files"].as_object().unwrap();
    assert!(!files.is_empty());

    // Every tensor file in the folder has expectations (so no vector is silently skipped).
    let on_disk: BTreeSet<String> = std::fs::read_dir(DIR)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".ckpt"))
        .collect();
    assert_eq!(on_disk, files.keys().cloned().collect::<BTreeSet<_>>());

    let mut checked = 0;
    for (file_name, tensors) in files {
        let tensors = tensors.as_object().unwrap();
        let path = Path::new(DIR).join(file_name);
        for options in [OpenOptions::default(), OpenOptions { map: false, ..OpenOptions::default() }] {
            let file = TensorFile::open_with(&path, &options).unwrap_or_else(|e| panic!("{file_name}: {e}"));
            file.verify_checksums().unwrap_or_else(|e| panic!("{file_name}: {e}"));
            // Exactly the tensors torch saved: all present, nothing extra.
            let got: BTreeSet<&str> = file.names().collect();
            let want: BTreeSet<&str> = tensors.keys().map(String::as_str).collect();
            assert_eq!(got, want, "{file_name}: tensor names");
            for (name, want) in tensors {
                let t = file.tensor(name).unwrap_or_else(|e| panic!("{file_name}: {name}: {e}"));
                let shape: Vec<u64> = want["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
                assert_eq!(t.dtype().name(), want["dtype"].as_str().unwrap(), "{file_name}: {name} dtype");
                assert_eq!(t.shape(), shape.as_slice(), "{file_name}: {name} shape");
                let numel: u64 = shape.iter().product();
                assert_eq!(t.bytes().len() as u64, numel * t.dtype().size() as u64, "{file_name}: {name} length");
                assert_eq!(sha256_hex(t.bytes()), want["sha256"].as_str().unwrap(), "{file_name}: {name} bytes");
                let mut copy = vec![0u8; t.bytes().len()];
                file.read_into(name, &mut copy).unwrap();
                assert_eq!(copy, t.bytes(), "{file_name}: {name} read_into");
                checked += 1;
            }
        }
    }
    // 10 dtypes + 7 views + 4 EAGLE3 tensors, each read mapped and unmapped.
    assert_eq!(checked, 2 * 21);
}

#[test]
fn views_share_and_gather_as_torch_laid_them_out() {
    // As torch 2.5.1 reports them after loading views.ckpt (shape, stride, storage offset), all
    // but `scalar` and `empty` over one 240-byte float32 storage:
    //   transposed [10, 6] (1, 10) 0, sliced [3, 7] (10, 1) 23, step [6, 4] (10, 3) 0:
    //     non-contiguous, so ferry gathers (copies) them;
    //   shared_a [10] (1,) 0, shared_b [2, 10] (10, 1) 10: contiguous, so ferry borrows them,
    //     from the same storage bytes.
    let file = TensorFile::open(&Path::new(DIR).join("views.ckpt")).unwrap();
    for name in ["transposed", "sliced", "step"] {
        assert!(!file.tensor(name).unwrap().is_borrowed(), "{name} is non-contiguous in torch's file");
    }
    for name in ["shared_a", "shared_b", "scalar", "empty"] {
        assert!(file.tensor(name).unwrap().is_borrowed(), "{name} is contiguous in torch's file");
    }
    let (a, b) = (file.tensor("shared_a").unwrap(), file.tensor("shared_b").unwrap());
    assert_eq!(
        b.bytes().as_ptr(),
        a.bytes().as_ptr().wrapping_add(10 * 4),
        "shared_b starts 10 floats into shared_a's storage"
    );
}
