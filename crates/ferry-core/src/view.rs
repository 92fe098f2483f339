//! Views of a stored tensor: a [`ViewSpec`] names part of a tensor (a narrow along one
//! dimension; a tensor-parallel shard is one), and its [`ViewPlan`] says which byte ranges of
//! the canonical row-major bytes make up the view's dense row-major bytes, in order.
//!
//! The holder of the bytes (the node daemon) derives the view where the bytes are and ships
//! only the view's bytes, as TensorCast's source-side views do: a trainer rank asking for its
//! sequence shard, or an inference server for its tensor-parallel slice of new draft weights,
//! moves `1/N` of the tensor, not all of it, and nobody repacks. A narrow is a run of
//! `outer` equal contiguous ranges (one per index of the dimensions before `dim`), so the plan
//! is four numbers and every copy is a `memcpy` of a whole run, never an element loop; runs
//! that touch are coalesced (a narrow of the first dimension is one range).

use crate::{DType, Error, FeatureSpec, Result, SampleRef};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// Part of one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ViewSpec {
    /// `length` indices of dimension `dim` from `start` (torch's `tensor.narrow(dim, start,
    /// length)`), every other dimension whole.
    Narrow {
        /// The dimension narrowed.
        dim: u32,
        /// The first index kept.
        start: u64,
        /// How many indices are kept (at least one).
        length: u64,
    },
}

impl ViewSpec {
    /// A narrow.
    pub fn narrow(dim: u32, start: u64, length: u64) -> ViewSpec {
        ViewSpec::Narrow { dim, start, length }
    }

    /// Shard `index` of `count` equal shards of dimension `dim`, whose size is `dim_size`
    /// (a tensor-parallel slice: column-parallel weights shard dimension 0, row-parallel ones
    /// dimension 1). The dimension must split evenly, as tensor-parallel layers require.
    pub fn shard(dim: u32, index: u64, count: u64, dim_size: u64) -> Result<ViewSpec> {
        if count == 0 || index >= count {
            return Err(Error::InvalidArgument(format!("shard {index} of {count}: the index must be below the count")));
        }
        if !dim_size.is_multiple_of(count) {
            return Err(Error::InvalidArgument(format!(
                "dimension {dim} has {dim_size} indices, which {count} shards cannot split evenly"
            )));
        }
        let length = dim_size / count;
        Ok(ViewSpec::Narrow { dim, start: index * length, length })
    }

    /// A stable identity of the view, for logs and caches (`narrow(1,512,256)`).
    pub fn view_id(&self) -> String {
        match self {
            ViewSpec::Narrow { dim, start, length } => format!("narrow({dim},{start},{length})"),
        }
    }

    /// This view of feature `name` of sample `r`, planned against `specs` (the ref's own, or a
    /// store's description of it), before anything is read: `NotFound` for a feature the
    /// sample does not have, `InvalidArgument` naming the feature for one without a spec (a
    /// lazy `file://` ref: describe it first) or a view that does not fit its shape.
    pub fn plan_feature(&self, r: &SampleRef, specs: &IndexMap<String, FeatureSpec>, name: &str) -> Result<ViewPlan> {
        let Some(spec) = specs.get(name) else {
            return Err(if r.feature_keys.contains_key(name) {
                Error::InvalidArgument(format!(
                    "a view of feature {name:?} of sample {} needs its spec (shape and dtype), which the ref \
                     lacks (a lazy file:// ref: describe it first)",
                    r.sample_id
                ))
            } else {
                Error::NotFound { what: format!("feature {name:?} of sample {}", r.sample_id) }
            });
        };
        self.plan(spec.dtype()?, &spec.shape).map_err(|e| match e {
            Error::InvalidArgument(m) => {
                Error::InvalidArgument(format!("feature {name:?} of sample {}: {m}", r.sample_id))
            }
            other => other,
        })
    }

    /// The byte ranges of a tensor of `dtype` and `shape` that make up this view, checked
    /// against the shape (a dimension that does not exist, a range past its end, an empty view
    /// and a size that overflows are errors naming the tensor's shape).
    pub fn plan(&self, dtype: DType, shape: &[u64]) -> Result<ViewPlan> {
        let ViewSpec::Narrow { dim, start, length } = *self;
        let bad = |why: String| {
            Error::InvalidArgument(format!("view {} of a tensor of shape {shape:?}: {why}", self.view_id()))
        };
        let d = usize::try_from(dim).map_err(|_| bad("no such dimension".into()))?;
        let Some(&size) = shape.get(d) else {
            return Err(bad(format!("the tensor has {} dimensions", shape.len())));
        };
        if length == 0 {
            return Err(bad("a view must keep at least one index".into()));
        }
        if start.checked_add(length).is_none_or(|end| end > size) {
            return Err(bad(format!("dimension {dim} has {size} indices")));
        }
        let overflow = || bad("its size overflows".into());
        let outer = shape[..d].iter().try_fold(1u64, |acc, &n| acc.checked_mul(n)).ok_or_else(overflow)?;
        let inner =
            shape[d + 1..].iter().try_fold(dtype.size() as u64, |acc, &n| acc.checked_mul(n)).ok_or_else(overflow)?;
        let run = length.checked_mul(inner).ok_or_else(overflow)?;
        let stride = size.checked_mul(inner).ok_or_else(overflow)?;
        let nbytes = outer.checked_mul(run).ok_or_else(overflow)?;
        // The whole tensor's size too: every range offset is below it.
        outer.checked_mul(stride).ok_or_else(overflow)?;
        let mut view_shape = shape.to_vec();
        view_shape[d] = length;
        // Runs that touch (the whole dimension, or one run) are one range.
        let (run, runs, stride) = if outer <= 1 || run == stride { (nbytes, 1, nbytes) } else { (run, outer, stride) };
        Ok(ViewPlan { shape: view_shape, nbytes, first: start * inner, run, runs, stride })
    }
}

/// Where a view's bytes lie in its tensor's canonical bytes: `runs` ranges of `run` bytes,
/// the first at `first`, each `stride` bytes after the one before. Concatenated in order they
/// are the view's dense row-major bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViewPlan {
    /// The view's shape.
    pub shape: Vec<u64>,
    /// The view's size in bytes (`run * runs`).
    pub nbytes: u64,
    /// Offset of the first range in the canonical bytes.
    pub first: u64,
    /// Bytes per range.
    pub run: u64,
    /// Number of ranges.
    pub runs: u64,
    /// Distance between the starts of two consecutive ranges.
    pub stride: u64,
}

impl ViewPlan {
    /// The canonical byte ranges `(offset, len)` in view order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0..self.runs).map(move |i| (self.first + i * self.stride, self.run))
    }

    /// The view's bytes within `canonical` (the whole tensor's bytes), one slice per range,
    /// for vectored writes: nothing is copied.
    pub fn slices<'a>(&self, canonical: &'a [u8]) -> Result<Vec<&'a [u8]>> {
        self.ranges()
            .map(|(offset, len)| {
                let (start, end) = self.bounds(offset, len, canonical.len())?;
                Ok(&canonical[start..end])
            })
            .collect()
    }

    /// Copies the view out of `canonical` into `dst`, which must be exactly the view's size:
    /// one `memcpy` per range.
    pub fn gather(&self, canonical: &[u8], dst: &mut [u8]) -> Result<()> {
        if dst.len() as u64 != self.nbytes {
            return Err(Error::InvalidArgument(format!(
                "a view of shape {:?} is {} bytes; the buffer is {}",
                self.shape,
                self.nbytes,
                dst.len()
            )));
        }
        let run = usize::try_from(self.run).map_err(|_| Error::InvalidArgument("view range too large".into()))?;
        if run == 0 {
            return Ok(());
        }
        for ((offset, len), out) in self.ranges().zip(dst.chunks_exact_mut(run)) {
            let (start, end) = self.bounds(offset, len, canonical.len())?;
            out.copy_from_slice(&canonical[start..end]);
        }
        Ok(())
    }

    /// The bytes of the canonical tensor the plan reads past (`first` to the end of the last
    /// range): what a holder must have for the plan to apply.
    pub fn canonical_extent(&self) -> u64 {
        if self.runs == 0 {
            return 0;
        }
        // Saturating: a plan built by hand with absurd fields reads as reaching past anything.
        (self.runs - 1).saturating_mul(self.stride).saturating_add(self.first).saturating_add(self.run)
    }

    fn bounds(&self, offset: u64, len: u64, have: usize) -> Result<(usize, usize)> {
        let end = offset.checked_add(len).filter(|&end| end <= have as u64).ok_or_else(|| Error::Corrupt {
            what: format!("view of shape {:?}", self.shape),
            message: format!("bytes {offset}..{} lie past the tensor's {have} bytes", offset.saturating_add(len)),
        })?;
        Ok((offset as usize, end as usize))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The view by definition: element by element, row-major.
    fn naive(canonical: &[u8], shape: &[u64], item: usize, dim: usize, start: u64, length: u64) -> Vec<u8> {
        let count: u64 = shape.iter().product();
        let mut out = Vec::new();
        for flat in 0..count {
            let mut rest = flat;
            let mut index = vec![0u64; shape.len()];
            for (i, &n) in shape.iter().enumerate().rev() {
                index[i] = rest % n;
                rest /= n;
            }
            if index[dim] >= start && index[dim] < start + length {
                let at = flat as usize * item;
                out.extend_from_slice(&canonical[at..at + item]);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn a_plan_gathers_exactly_the_narrowed_elements(
            shape in proptest::collection::vec(1u64..6, 1..5),
            dim_pick in 0usize..8,
            a in 0u64..6,
            b in 0u64..6,
            dtype in prop_oneof![Just(DType::UInt8), Just(DType::BFloat16), Just(DType::Float32), Just(DType::Int64)],
        ) {
            let dim = dim_pick % shape.len();
            let size = shape[dim];
            let start = a % size;
            let length = 1 + b % (size - start);
            let item = dtype.size();
            let total = shape.iter().product::<u64>() as usize * item;
            let canonical: Vec<u8> = (0..total).map(|i| (i * 7 + 3) as u8).collect();
            let plan = ViewSpec::narrow(dim as u32, start, length).plan(dtype, &shape).unwrap();
            let want = naive(&canonical, &shape, item, dim, start, length);
            let mut got = vec![0u8; plan.nbytes as usize];
            plan.gather(&canonical, &mut got).unwrap();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(plan.slices(&canonical).unwrap().concat(), want);
            prop_assert!(plan.canonical_extent() <= total as u64);
            let mut view_shape = shape.clone();
            view_shape[dim] = length;
            prop_assert_eq!(plan.shape, view_shape);
        }
    }

    #[test]
    fn a_narrow_of_the_first_dimension_or_a_whole_one_is_one_range() {
        let plan = ViewSpec::narrow(0, 2, 3).plan(DType::Float32, &[8, 4]).unwrap();
        assert_eq!((plan.first, plan.run, plan.runs), (32, 48, 1));
        let plan = ViewSpec::narrow(1, 0, 4).plan(DType::Float32, &[8, 4]).unwrap();
        assert_eq!((plan.first, plan.run, plan.runs), (0, 128, 1));
        let plan = ViewSpec::narrow(1, 1, 2).plan(DType::Float32, &[8, 4]).unwrap();
        assert_eq!((plan.first, plan.run, plan.runs, plan.stride), (4, 8, 8, 16));
    }

    #[test]
    fn shards_split_evenly_or_not_at_all() {
        assert_eq!(ViewSpec::shard(1, 3, 4, 4096).unwrap(), ViewSpec::narrow(1, 3072, 1024));
        for (index, count, size) in [(4, 4, 4096), (0, 0, 4096), (0, 3, 4096)] {
            assert!(ViewSpec::shard(0, index, count, size).is_err(), "{index} of {count} over {size}");
        }
    }

    #[test]
    fn bad_views_name_the_shape() {
        for (spec, want) in [
            (ViewSpec::narrow(2, 0, 1), "has 2 dimensions"),
            (ViewSpec::narrow(1, 3, 2), "has 4 indices"),
            (ViewSpec::narrow(0, 0, 0), "at least one index"),
            (ViewSpec::narrow(0, u64::MAX, 2), "has 8 indices"),
        ] {
            let err = spec.plan(DType::Float32, &[8, 4]).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("[8, 4]"), "{err}");
        }
        let err = ViewSpec::narrow(0, 0, 1).plan(DType::Float32, &[u64::MAX, 4]).unwrap_err().to_string();
        assert!(err.contains("overflows"), "{err}");
        // The view fits in 64 bits but the whole tensor does not.
        let err = ViewSpec::narrow(1, 0, 1).plan(DType::UInt8, &[1 << 33, 1 << 33]).unwrap_err().to_string();
        assert!(err.contains("overflows"), "{err}");
        let plan = ViewSpec::narrow(1, 0, 2).plan(DType::Float32, &[8, 4]).unwrap();
        assert!(plan.gather(&[0u8; 64], &mut [0u8; 64]).is_err(), "a short canonical tensor is corrupt");
        assert!(plan.gather(&[0u8; 128], &mut [0u8; 8]).is_err(), "a wrong-sized buffer is refused");
    }

    #[test]
    fn the_wire_form_is_tagged_and_strict() {
        let json = serde_json::to_string(&ViewSpec::narrow(1, 2, 3)).unwrap();
        assert_eq!(json, r#"{"kind":"narrow","dim":1,"start":2,"length":3}"#);
        assert!(serde_json::from_str::<ViewSpec>(r#"{"kind":"narrow","dim":1,"start":2,"length":3,"x":1}"#).is_err());
        assert!(serde_json::from_str::<ViewSpec>(r#"{"kind":"transpose","dim0":0,"dim1":1}"#).is_err());
    }
}
