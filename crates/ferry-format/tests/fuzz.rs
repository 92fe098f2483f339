//! A bounded mutation fuzzer that runs under `cargo test`: every fixture (torch zips, the
//! `.ckpt.gz`, the safetensors twins) is damaged by random byte flips, truncations and
//! insertions, biased towards the headers and `data.pkl`, where the parsing happens; opening it
//! and reading every tensor must return `Ok` or `Err`, never panic. Panics are caught only to
//! report which mutation caused them (proptest then shrinks it).
//!
//! Sized to finish in a few seconds in a debug build; for longer runs set `PROPTEST_CASES`.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use common::{tensor_files, twin};
use ferry_format::{FileFormat, TensorFile};
use proptest::prelude::*;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::OnceLock;

struct Seed {
    name: String,
    format: FileFormat,
    bytes: Vec<u8>,
}

fn seeds() -> &'static [Seed] {
    static SEEDS: OnceLock<Vec<Seed>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let mut out = Vec::new();
        for (path, rel) in tensor_files() {
            let format = FileFormat::from_name(&path).unwrap();
            out.push(Seed { name: rel.clone(), format, bytes: std::fs::read(&path).unwrap() });
            let twin = twin(&rel);
            out.push(Seed {
                name: format!("{rel} twin"),
                format: FileFormat::Safetensors,
                bytes: std::fs::read(twin).unwrap(),
            });
        }
        out
    })
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR the byte at a position (a fraction of the length, biased by region) with a value.
    Flip {
        region: u8,
        at: f64,
        xor: u8,
    },
    /// Overwrite a byte with an "interesting" value.
    Set {
        region: u8,
        at: f64,
        value: u8,
    },
    Truncate {
        at: f64,
    },
    Insert {
        region: u8,
        at: f64,
        bytes: Vec<u8>,
    },
}

fn position(len: usize, region: u8, at: f64) -> usize {
    if len == 0 {
        return 0;
    }
    // Region 0: anywhere. 1: the first 700 bytes (local headers, data.pkl, the safetensors
    // header). 2: the last 800 bytes (central directory, end records).
    let (lo, hi) = match region % 3 {
        0 => (0, len),
        1 => (0, len.min(700)),
        _ => (len.saturating_sub(800), len),
    };
    (lo + ((hi - lo) as f64 * at) as usize).min(len - 1)
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    match m {
        Mutation::Flip { region, at, xor } => {
            let p = position(bytes.len(), *region, *at);
            if let Some(b) = bytes.get_mut(p) {
                *b ^= xor | 1;
            }
        }
        Mutation::Set { region, at, value } => {
            let p = position(bytes.len(), *region, *at);
            if let Some(b) = bytes.get_mut(p) {
                *b = *value;
            }
        }
        Mutation::Truncate { at } => {
            let p = (bytes.len() as f64 * at) as usize;
            bytes.truncate(p);
        }
        Mutation::Insert { region, at, bytes: ins } => {
            let p = position(bytes.len(), *region, *at);
            bytes.splice(p..p, ins.iter().copied());
        }
    }
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop::sample::select(vec![0x00u8, 0x01, 0x7f, 0x80, 0xff, b'(', b'.', b'q', b'h', b'K', 0x8a]);
    prop_oneof![
        4 => (any::<u8>(), 0.0..1.0f64, any::<u8>()).prop_map(|(region, at, xor)| Mutation::Flip { region, at, xor }),
        3 => (any::<u8>(), 0.0..1.0f64, interesting).prop_map(|(region, at, value)| Mutation::Set { region, at, value }),
        1 => (0.0..1.0f64).prop_map(|at| Mutation::Truncate { at }),
        1 => (any::<u8>(), 0.0..1.0f64, prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(region, at, bytes)| Mutation::Insert { region, at, bytes }),
    ]
}

/// Everything a reader does with a file.
fn exercise(bytes: Vec<u8>, format: FileFormat) {
    let Ok(file) = TensorFile::from_bytes(bytes, format, "fuzz") else { return };
    let _ = file.specs();
    let _ = file.verify_checksums();
    let names: Vec<String> = file.names().map(str::to_owned).collect();
    for name in &names {
        if let Ok(t) = file.tensor(name) {
            let v = t.view();
            assert_eq!(v.bytes().len() as u64, v.shape().iter().product::<u64>() * v.dtype().size() as u64);
            let mut dst = vec![0u8; v.bytes().len()];
            file.read_into(name, &mut dst).unwrap();
            assert_eq!(dst, v.bytes());
        }
    }
}

/// Cases per run: 3000 (about a second in a debug build), or `PROPTEST_CASES`.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(3000)
}

proptest! {
    #![proptest_config(ProptestConfig { max_shrink_iters: 2000, ..ProptestConfig::with_cases(cases()) })]

    #[test]
    fn mutated_fixtures_never_panic(
        seed in 0usize..1000,
        mutations in prop::collection::vec(mutation(), 1..6),
    ) {
        let seeds = seeds();
        let s = &seeds[seed % seeds.len()];
        let mut bytes = s.bytes.clone();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| exercise(bytes, s.format)));
        prop_assert!(outcome.is_ok(), "reading {} mutated by {:?} panicked", s.name, mutations);
    }
}

/// Mutations of the torch zips wrapped in gzip take the `.ckpt.gz` path after decompression.
#[test]
fn mutated_zip_inside_gzip_never_panics() {
    let seeds = seeds();
    let zips: Vec<&Seed> = seeds.iter().filter(|s| s.format == FileFormat::TorchZip).collect();
    for (i, s) in zips.iter().enumerate() {
        for cut in [s.bytes.len() / 3, s.bytes.len() - 30] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            std::io::Write::write_all(&mut e, &s.bytes[..cut]).unwrap();
            let gz = e.finish().unwrap();
            assert!(TensorFile::from_bytes(gz, FileFormat::TorchZipGz, &format!("gz{i}")).is_err());
        }
    }
}
