//! What opening a crafted file allocates, measured with a counting global allocator: a small
//! `data.pkl` must not make `open` allocate gigabytes (the bounds in `ferry_format::limits`).
//!
//! One test function, so no other test allocates while it measures.

#![allow(clippy::unwrap_used)] // test helpers: a failed setup step should panic

mod common;

use common::{pkl, zip_stored};
use ferry_format::limits::{MAX_PICKLE_MEMO, MAX_PICKLE_VALUES};
use ferry_format::{FileFormat, TensorFile};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn add(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: forwards every call to `System`, only counting sizes.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        add(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as a new block plus the old one until it is freed (a copying realloc).
        add(new_size);
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const MIB: usize = 1 << 20;

/// Peak bytes allocated (beyond the input) while opening `pickle` as a torch file's `data.pkl`,
/// and the error message, if any.
fn open_peak(pickle: &[u8]) -> (usize, Option<String>) {
    let bytes = zip_stored(&[("archive/data.pkl", pickle), ("archive/data/0", &[0u8; 4])], 0);
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = TensorFile::from_bytes(bytes, FileFormat::TorchZip, "crafted").map(drop);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    (peak, result.err().map(|e| e.to_string()))
}

#[test]
fn crafted_pickles_allocate_boundedly() {
    // The reported amplification: one memoized 64-dimensional record under 2 million names
    // (a 15 MiB data.pkl). Before the bounds, opening it allocated about 3.5 GB.
    let record = pkl::tensor("0", 1, &[1; 64], &[1; 64]);
    let pickle = pkl::shared_tensor_dict(&record, 2_000_000);
    assert!(pickle.len() < 16 * MIB);
    let (peak, err) = open_peak(&pickle);
    eprintln!("shared record: {} MiB", peak / MIB);
    assert!(peak < 256 * MIB, "shared record: peak {} MiB", peak / MIB);
    let err = err.unwrap();
    assert!(err.contains("MAX_TENSOR"), "{err}");

    // Records rebuilt from memoized arguments, not kept in the result.
    let mut p = b"\x80\x02}q\x00".to_vec();
    p.extend_from_slice(pkl::REBUILD);
    p.extend_from_slice(b"q\x01");
    p.extend(pkl::args("0", 1, &[1; 64], &[1; 64]));
    p.extend_from_slice(b"q\x02s");
    for _ in 0..1000 {
        p.push(b'(');
        p.extend(b"h\x01h\x02R".repeat(1000));
        p.push(b'u');
    }
    p.push(b'.');
    let (peak, err) = open_peak(&p);
    assert!(err.unwrap().contains("MAX_TENSOR_DIMS"));
    eprintln!("rebuilt records: {} MiB", peak / MIB);
    assert!(peak < 256 * MIB, "rebuilt records: peak {} MiB", peak / MIB);

    // The VM's own worst case, bounded by MAX_PICKLE_VALUES and MAX_PICKLE_MEMO: as many dict
    // items as pushes allow (spread over dicts of 100 000), each value its own allocation (an
    // empty tuple), with a full memo of them.
    let mut p = b"\x80\x02}".to_vec();
    let pairs = (MAX_PICKLE_VALUES - 64) / 2;
    for i in 0..pairs {
        if i % 100_000 == 99_999 {
            p.push(b'}');
        }
        p.push(b')');
        if i < MAX_PICKLE_MEMO {
            p.push(b'r');
            p.extend_from_slice(&(i as u32).to_le_bytes());
        }
        p.extend_from_slice(b")s");
    }
    p.push(b'.');
    let (peak, err) = open_peak(&p);
    let err = err.unwrap();
    assert!(err.contains("not a str"), "{err}");
    eprintln!("VM worst case: {} MiB", peak / MIB);
    assert!(peak < 512 * MIB, "VM worst case: {} MiB", peak / MIB);
}
