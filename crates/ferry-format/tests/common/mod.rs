//! Shared helpers: where the fixtures are, which files have twins, and reading a twin with the
//! reference `safetensors` crate (independently of ferry's reader).

#![allow(dead_code, unreachable_pub, clippy::unwrap_used)] // test helpers: a failed setup step should panic

use ferry_core::DType;
use std::path::{Path, PathBuf};

/// The shared, read-only fixture folder.
pub fn fixtures() -> PathBuf {
    let dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/fixtures"));
    assert!(
        dir.join("README.md").is_file(),
        "fixture folder {} is missing: ferry-format's tests need the shared SpecForge fixtures there",
        dir.display()
    );
    dir
}

/// The folders whose tensor files have `expected/` twins.
pub const TENSOR_FOLDERS: [&str; 4] =
    ["torch-zip-edge", "specforge-offline-eagle3", "specforge-offline-dflash", "specforge-control/shared_dir"];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Every tensor file in the fixture folders, with its path relative to the fixture root.
pub fn tensor_files() -> Vec<(PathBuf, String)> {
    let root = fixtures();
    let mut files = Vec::new();
    for folder in TENSOR_FOLDERS {
        walk(&root.join(folder), &mut files);
    }
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
            (p, rel)
        })
        .collect()
}

/// The `expected/` twin of a fixture file.
pub fn twin(rel: &str) -> PathBuf {
    fixtures().join("expected").join(format!("{rel}.safetensors"))
}

/// A tensor as the reference reader sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plain {
    pub dtype: DType,
    pub shape: Vec<u64>,
    pub bytes: Vec<u8>,
}

/// Reads a safetensors file with the `safetensors` crate alone.
pub fn read_twin(path: &Path) -> Vec<(String, Plain)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Plain)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            use safetensors::Dtype as D;
            let dtype = match v.dtype() {
                D::F32 => DType::Float32,
                D::F64 => DType::Float64,
                D::F16 => DType::Float16,
                D::BF16 => DType::BFloat16,
                D::I64 => DType::Int64,
                D::I32 => DType::Int32,
                D::I16 => DType::Int16,
                D::I8 => DType::Int8,
                D::U8 => DType::UInt8,
                D::BOOL => DType::Bool,
                other => panic!("twin {} has dtype {other:?}", path.display()),
            };
            let shape = v.shape().iter().map(|&d| d as u64).collect();
            (name, Plain { dtype, shape, bytes: v.data().to_vec() })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Deterministic pseudo-random bytes (xorshift), for tests that need data but no `rand`.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Bytes that are a valid value of `dtype` in every element (bools are 0 or 1).
pub fn data_for(dtype: DType, numel: usize, seed: u64) -> Vec<u8> {
    let mut b = noise(seed, numel * dtype.size());
    if dtype == DType::Bool {
        b.iter_mut().for_each(|x| *x &= 1);
    }
    b
}

/// Minimal central-directory walk for comparing raw entries (independent of ferry's reader):
/// (name, data range) per entry.
pub fn raw_entries(bytes: &[u8]) -> Vec<(String, std::ops::Range<usize>)> {
    let le16 = |p: usize| u16::from_le_bytes([bytes[p], bytes[p + 1]]) as usize;
    let le32 = |p: usize| u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
    let eocd = (0..bytes.len() - 21).rev().find(|&p| bytes[p..p + 4] == [0x50, 0x4b, 5, 6]).unwrap();
    let (count, mut p) = (le16(eocd + 10), le32(eocd + 16));
    let mut out = Vec::new();
    for _ in 0..count {
        let (size, n, m, k, off) = (le32(p + 24), le16(p + 28), le16(p + 30), le16(p + 32), le32(p + 42));
        let name = String::from_utf8(bytes[p + 46..p + 46 + n].to_vec()).unwrap();
        let start = off + 30 + le16(off + 26) + le16(off + 28);
        out.push((name, start..start + size));
        p += 46 + n + m + k;
    }
    out
}

/// A plain stored zip (no alignment, no data descriptors) of `entries`, with `method` written
/// into every header: a second, independent zip writer for crafting test archives.
pub fn zip_stored(entries: &[(&str, &[u8])], method: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32fast::hash(data);
        let header = |sig: u32, central_fields: bool, buf: &mut Vec<u8>| {
            buf.extend_from_slice(&sig.to_le_bytes());
            if central_fields {
                buf.extend_from_slice(&20u16.to_le_bytes());
            }
            buf.extend_from_slice(&20u16.to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes());
            buf.extend_from_slice(&method.to_le_bytes());
            buf.extend_from_slice(&0u32.to_le_bytes());
            buf.extend_from_slice(&crc.to_le_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes());
            if central_fields {
                buf.extend_from_slice(&[0u8; 6]); // comment length, disk, internal attributes
                buf.extend_from_slice(&0u32.to_le_bytes());
                buf.extend_from_slice(&offset.to_le_bytes());
            }
            buf.extend_from_slice(name.as_bytes());
        };
        header(0x0403_4b50, false, &mut out);
        out.extend_from_slice(data);
        header(0x0201_4b50, true, &mut central);
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// Crafted `data.pkl` pieces (protocol 2) for tests of hostile files.
pub mod pkl {
    /// `BINUNICODE s`.
    pub fn str(s: &str) -> Vec<u8> {
        let mut p = vec![b'X'];
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
        p
    }

    /// An int below 2^63: `BININT1`, `BININT`, or `LONG1` with 8 bytes.
    pub fn int(v: u64) -> Vec<u8> {
        assert!(v < 1 << 63);
        if v < 256 {
            vec![b'K', v as u8]
        } else if v < 1 << 31 {
            let mut p = vec![b'J'];
            p.extend_from_slice(&(v as u32).to_le_bytes());
            p
        } else {
            let mut p = vec![0x8a, 8];
            p.extend_from_slice(&v.to_le_bytes());
            p
        }
    }

    /// `MARK ints TUPLE`.
    pub fn tuple(values: &[u64]) -> Vec<u8> {
        let mut p = vec![b'('];
        for &v in values {
            p.extend(int(v));
        }
        p.push(b't');
        p
    }

    /// `_rebuild_tensor_v2` (not called): the callable.
    pub const REBUILD: &[u8] = b"ctorch._utils\n_rebuild_tensor_v2\n";

    /// The argument tuple of a float32 tensor record over storage `key` of `numel` elements.
    pub fn args(key: &str, numel: u64, shape: &[u64], strides: &[u64]) -> Vec<u8> {
        let mut p = b"((".to_vec();
        p.extend(str("storage"));
        p.extend_from_slice(b"ctorch\nFloatStorage\n");
        p.extend(str(key));
        p.extend(str("cpu"));
        p.extend(int(numel));
        p.extend_from_slice(b"tQ");
        p.extend(int(0));
        p.extend(tuple(shape));
        p.extend(tuple(strides));
        p.extend_from_slice(b"\x89ccollections\nOrderedDict\n)Rt");
        p
    }

    /// A whole tensor record: `REBUILD args REDUCE`.
    pub fn tensor(key: &str, numel: u64, shape: &[u64], strides: &[u64]) -> Vec<u8> {
        let mut p = REBUILD.to_vec();
        p.extend(args(key, numel, shape, strides));
        p.push(b'R');
        p
    }

    /// The `i`th of 94^4 distinct 4-character names.
    pub fn short_name(mut i: usize) -> String {
        (0..4)
            .map(|_| {
                let c = char::from(b'!' + (i % 94) as u8);
                i /= 94;
                c
            })
            .collect()
    }

    /// `{name_0: t, ..., name_{n-1}: t}` with one tensor record, memoized once and fetched with
    /// `BINGET` for every further name (SETITEMS batches of 1000): 8 bytes a name.
    pub fn shared_tensor_dict(record: &[u8], n: usize) -> Vec<u8> {
        let mut p = b"\x80\x02}q\x00".to_vec();
        p.extend(str(&short_name(0)));
        p.extend_from_slice(record);
        p.extend_from_slice(b"q\x01s");
        let mut i = 1;
        while i < n {
            p.push(b'(');
            for _ in 0..1000.min(n - i) {
                p.extend_from_slice(&[0x8c, 4]);
                p.extend_from_slice(short_name(i).as_bytes());
                p.extend_from_slice(b"h\x01");
                i += 1;
            }
            p.push(b'u');
        }
        p.push(b'.');
        p
    }
}
