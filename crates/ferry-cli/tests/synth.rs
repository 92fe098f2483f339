//! `ferry synth`: an offline dump in SpecForge's layout whose files hold the strategy's raw keys
//! and shapes, listed in index order, with one canonical checksum per sample that the files'
//! bytes reproduce.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry")).args(args).env_remove("RUST_LOG").output().expect("ferry runs")
}

fn synth(out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["synth", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let run = ferry(&args);
    let (stdout, stderr) = (String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert_eq!(run.status.code(), Some(0), "ferry {args:?}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    stdout.into_owned()
}

/// Every `.ckpt` below `root`, in lexicographic order (as `list_feature_files` sorts).
fn ckpt_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "ckpt") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// `ferry inspect --json` of a tensor file: name → (dtype, shape).
fn inspect(path: &Path) -> Vec<(String, String, Vec<u64>)> {
    let run = ferry(&["inspect", "--json", path.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let v: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    v.as_object()
        .unwrap()
        .iter()
        .map(|(name, e)| {
            let shape = e["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
            (name.clone(), e["dtype"].as_str().unwrap().to_owned(), shape)
        })
        .collect()
}

/// The canonical checksum (the CLI's `canonical_checksum`): CRC-32 of names and bytes sorted by
/// name, `attention_mask` left out, beside the total length.
fn canonical(mut features: Vec<(&str, &[u8])>) -> u64 {
    features.retain(|(n, _)| *n != "attention_mask");
    features.sort_by_key(|(n, _)| *n);
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0u64;
    for (name, bytes) in features {
        crc.update(name.as_bytes());
        crc.update(bytes);
        len += (name.len() + bytes.len()) as u64;
    }
    (len << 32) | u64::from(crc.finalize())
}

fn i64s(bytes: &[u8]) -> Vec<i64> {
    bytes.chunks_exact(8).map(|w| i64::from_le_bytes(w.try_into().unwrap())).collect()
}

#[test]
fn synth_writes_an_eagle3_dump_in_index_order_whose_bytes_give_the_checksums() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("dump");
    let flags = ["--samples", "6", "--seed", "3", "--seq-len", "24", "--min-seq-len", "5", "--hidden", "8"];
    let summary = synth(&out, &flags);
    assert!(summary.contains("wrote 6 eagle3 sample files") && summary.contains("checksums.jsonl"), "{summary}");
    let again = ferry(&[&["synth", out.to_str().unwrap()][..], &flags].concat());
    assert_eq!(again.status.code(), Some(1), "a second dump into the same folder is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not empty"));

    let files = ckpt_files(&out);
    let names: Vec<String> = files.iter().map(|p| p.strip_prefix(&out).unwrap().display().to_string()).collect();
    let want: Vec<String> = (0..6).map(|i| format!("rows_00000000-00001000/data_{i:08}.ckpt")).collect();
    assert_eq!(names, want, "one file per sample, in index order");
    let sums = common::generated(&out);
    assert_eq!(
        sums.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        (0..6).map(|i| format!("{i:08}")).collect::<Vec<_>>()
    );

    let mut lengths = Vec::new();
    for (file, (_, sum)) in files.iter().zip(&sums) {
        let tensors = inspect(file);
        let mut keys: Vec<&str> = tensors.iter().map(|(n, _, _)| n.as_str()).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["aux_hidden_state", "hidden_state", "input_ids", "loss_mask"], "{}", file.display());
        let get = |name: &str| tensors.iter().find(|(n, _, _)| n == name).unwrap().clone();
        let l = get("input_ids").2[0];
        assert!((5..=24).contains(&l), "L = {l}");
        lengths.push(l);
        assert_eq!(get("input_ids"), ("input_ids".into(), "int64".into(), vec![l]));
        assert_eq!(get("loss_mask"), ("loss_mask".into(), "int64".into(), vec![l]));
        assert_eq!(get("hidden_state"), ("hidden_state".into(), "bfloat16".into(), vec![1, l, 8]));
        assert_eq!(get("aux_hidden_state"), ("aux_hidden_state".into(), "bfloat16".into(), vec![1, l, 24]));

        let f = ferry_format::TensorFile::open(file).unwrap();
        let bytes = |name: &str| f.tensor(name).unwrap().bytes().to_vec();
        let mask = i64s(&bytes("loss_mask"));
        assert_eq!(mask.last(), Some(&0), "the last token has no loss");
        assert!(mask[..l as usize / 4].iter().all(|&m| m == 0), "the prompt has no loss: {mask:?}");
        // Under the batch's names (SpecForge's offline EAGLE3 renames), the file's bytes give
        // the recorded checksum.
        let (aux, hidden, ids, mask_bytes) =
            (bytes("aux_hidden_state"), bytes("hidden_state"), bytes("input_ids"), bytes("loss_mask"));
        let batch = vec![
            ("hidden_state", &aux[..]),
            ("target", &hidden[..]),
            ("input_ids", &ids[..]),
            ("loss_mask", &mask_bytes[..]),
        ];
        assert_eq!(canonical(batch), *sum, "{}", file.display());
    }
    assert!(lengths.iter().any(|&l| l != lengths[0]), "lengths vary: {lengths:?}");
}

#[test]
fn synth_writes_dflash_files_and_the_same_seed_gives_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--samples", "3", "--seed", "9", "--strategy", "dflash", "--seq-len", "12", "--hidden", "4"];
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let summary = synth(&a, &[&flags[..], &["--layers", "2", "--workers", "2"]].concat());
    assert!(summary.contains("wrote 3 dflash sample files"), "{summary}");
    synth(&b, &[&flags[..], &["--layers", "2", "--workers", "1"]].concat());
    assert_eq!(common::generated(&a), common::generated(&b), "same seed, same samples, whatever the writers");
    assert_eq!(common::generated(&a).len(), 3);
    for file in ckpt_files(&a) {
        let mut tensors = inspect(&file);
        tensors.sort();
        assert_eq!(
            tensors,
            [
                ("hidden_states".into(), "bfloat16".into(), vec![1, 12, 8]),
                ("input_ids".into(), "int64".into(), vec![1, 12]),
                ("loss_mask".into(), "int64".into(), vec![1, 12]),
            ]
        );
        let fa = ferry_format::TensorFile::open(&file).unwrap();
        let fb = ferry_format::TensorFile::open(&b.join(file.strip_prefix(&a).unwrap())).unwrap();
        for name in ["hidden_states", "input_ids", "loss_mask"] {
            assert_eq!(fa.tensor(name).unwrap().bytes(), fb.tensor(name).unwrap().bytes(), "{name}");
        }
    }
    let c = dir.path().join("c");
    synth(&c, &["--samples", "3", "--seed", "10", "--strategy", "dflash", "--seq-len", "12", "--hidden", "4"]);
    assert_ne!(common::generated(&a), common::generated(&c), "another seed (and K) gives other samples");
}

#[test]
fn synth_rejects_bad_shapes_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let out = out.to_str().unwrap();
    for (args, want) in [
        (vec!["--samples", "2", "--seq-len", "8", "--min-seq-len", "9"], "--min-seq-len 9 is more than --seq-len 8"),
        (vec!["--samples", "2", "--layers", "3"], "--layers 3 applies to --strategy dflash only"),
        (vec!["--samples", "2", "--min-seq-len", "0"], "--min-seq-len"),
        (vec!["--samples", "2", "--strategy", "medusa"], "medusa"),
    ] {
        let run = ferry(&[&["synth", out][..], &args].concat());
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(matches!(run.status.code(), Some(1 | 2)), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: want {want:?} in\n{stderr}");
    }
    assert!(!Path::new(out).exists(), "nothing written on a bad command line");
}
