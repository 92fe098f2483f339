//! Where a tensor's bytes are in a file once its header has been checked, and the strided gather
//! that makes a non-contiguous tensor contiguous.

use ferry_core::DType;
use std::ops::Range;

/// A tensor found in a file: dtype, shape, and where its bytes are.
#[derive(Debug, Clone)]
pub(crate) struct TensorEntry {
    pub(crate) dtype: DType,
    pub(crate) shape: Vec<u64>,
    pub(crate) layout: Layout,
}

/// Where a tensor's bytes lie in the file buffer. Every range was checked against the buffer's
/// length and every strided index against its storage when the file was opened.
#[derive(Debug, Clone)]
pub(crate) enum Layout {
    /// Row-major bytes, exactly `numel * dtype.size()` of them: borrowed as they are.
    Contiguous(Range<usize>),
    /// A view into a storage (transposed, expanded, ...), gathered on read. Offsets and strides
    /// count elements.
    Strided { storage: Range<usize>, offset: usize, strides: Vec<usize>, shape: Vec<usize> },
}

/// Row-major strides of `shape`, as torch computes them for a contiguous tensor: a dimension of
/// size 0 counts as 1 (`c10::contiguous_strides`).
pub(crate) fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut strides = vec![0u64; shape.len()];
    let mut acc = 1u64;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.saturating_mul(d.max(1));
    }
    strides
}

/// Whether `strides` lay `shape` out row-major, as torch's `is_contiguous` decides it: dimensions
/// of size 1 may have any stride, and an empty tensor is contiguous.
pub(crate) fn is_contiguous(shape: &[u64], strides: &[u64]) -> bool {
    if shape.contains(&0) {
        return true;
    }
    let mut expected = 1u64;
    for (&d, &s) in shape.iter().zip(strides).rev() {
        if d == 1 {
            continue;
        }
        if s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}

/// Copies the elements of a strided view of `storage` into `dst`, row-major. `dst.len()` must be
/// `numel * elem` and every index must lie in `storage` (checked when the file was opened); a
/// violation returns `false` rather than panicking.
///
/// Adjacent dimensions that are contiguous with each other are merged first, so the copy moves
/// the longest contiguous run at a time: a slice along an outer dimension copies whole rows with
/// `memcpy`; only a view whose innermost stride is not 1 (a transpose) copies element by element.
pub(crate) fn gather(
    storage: &[u8],
    elem: usize,
    shape: &[usize],
    strides: &[usize],
    offset: usize,
    dst: &mut [u8],
) -> bool {
    if shape.contains(&0) {
        return dst.is_empty();
    }
    // (size, stride) innermost first, without size-1 dimensions, merged where contiguous.
    let mut dims: Vec<(usize, usize)> = Vec::with_capacity(shape.len());
    for (&size, &stride) in shape.iter().zip(strides).rev() {
        if size == 1 {
            continue;
        }
        match dims.last_mut() {
            Some((inner_size, inner_stride)) if inner_stride.checked_mul(*inner_size) == Some(stride) => {
                *inner_size *= size;
            }
            _ => dims.push((size, stride)),
        }
    }
    let (run_elems, outer) = match dims.first() {
        Some(&(size, 1)) => (size, &dims[1..]),
        _ => (1, &dims[..]),
    };
    let Some(run) = run_elems.checked_mul(elem) else { return false };
    let mut index = vec![0usize; outer.len()];
    let mut src = offset;
    let mut out = 0usize;
    loop {
        let Some(from) = src.checked_mul(elem) else { return false };
        let (Some(s), Some(d)) = (storage.get(from..from.saturating_add(run)), dst.get_mut(out..out + run)) else {
            return false;
        };
        d.copy_from_slice(s);
        out += run;
        // Odometer over the outer dimensions, innermost first.
        let mut k = 0;
        loop {
            let Some(&(size, stride)) = outer.get(k) else {
                return out == dst.len();
            };
            index[k] += 1;
            src += stride;
            if index[k] < size {
                break;
            }
            src -= stride * size;
            index[k] = 0;
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Element-by-element reference.
    fn naive(storage: &[u8], elem: usize, shape: &[usize], strides: &[usize], offset: usize) -> Vec<u8> {
        let numel: usize = shape.iter().product();
        let mut out = Vec::with_capacity(numel * elem);
        for flat in 0..numel {
            let mut rem = flat;
            let mut src = offset;
            for d in (0..shape.len()).rev() {
                src += (rem % shape[d]) * strides[d];
                rem /= shape[d];
            }
            out.extend_from_slice(&storage[src * elem..(src + 1) * elem]);
        }
        out
    }

    #[test]
    fn gather_matches_naive_for_views() {
        let storage: Vec<u8> = (0..=255u8).cycle().take(4 * 200).collect();
        let cases: &[(&[usize], &[usize], usize)] = &[
            (&[6, 8], &[1, 6], 0),        // transpose
            (&[2, 4], &[8, 1], 17),       // slice with offset
            (&[3, 2, 5], &[20, 5, 1], 3), // contiguous inner block
            (&[3, 4], &[10, 1], 0),       // rows of a wider matrix
            (&[4, 3], &[0, 1], 2),        // expanded
            (&[2, 1, 3], &[3, 99, 1], 0), // size-1 dim with odd stride
            (&[], &[], 7),                // 0-dim
            (&[5, 0], &[1, 1], 0),        // empty
        ];
        for &(shape, strides, offset) in cases {
            let numel: usize = shape.iter().product();
            let mut dst = vec![0u8; numel * 4];
            assert!(gather(&storage, 4, shape, strides, offset, &mut dst), "{shape:?} {strides:?}");
            assert_eq!(dst, naive(&storage, 4, shape, strides, offset), "{shape:?} {strides:?}");
        }
    }

    #[test]
    fn out_of_range_views_fail_without_panicking() {
        let storage = [0u8; 16];
        let mut dst = [0u8; 16];
        assert!(!gather(&storage, 4, &[4], &[2], 0, &mut dst));
        assert!(!gather(&storage, 4, &[2], &[usize::MAX], 0, &mut dst[..8]));
    }

    #[test]
    fn contiguity_follows_torch() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[7, 1]));
        assert!(is_contiguous(&[0, 3], &[9, 9]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
        assert_eq!(contiguous_strides(&[0, 4]), [4, 1]);
        assert_eq!(contiguous_strides(&[2, 0, 3]), [3, 3, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<u64>::new());
    }
}
