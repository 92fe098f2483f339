//! Batch validation before any fetch (`SPECFORGE-RUNTIME.md` §12.2).
//!
//! Every check looks only at the refs, so a batch that fails takes no lease and reads no byte.
//! Each failure is [`Error::InvalidArgument`] naming the offending samples and values:
//! * every ref's `strategy` equals the loader's;
//! * one `schema_version` in the batch;
//! * one `metadata.target_repr` value (absent counts as a value of its own);
//! * among refs that carry specs, identical spec name sets;
//! * per spec, the same dtype and rank as in the first spec-bearing ref.
//!
//! Refs without specs (lazy offline refs) skip the spec checks; the collation plan checks their
//! described shapes before any read.

use ferry_core::{Error, Result, SampleRef};
use indexmap::IndexMap;
use serde_json::Value;

/// Groups refs by a key, keeping first-seen order; renders `value: [ids]` groups.
fn grouped<K: std::hash::Hash + Eq + std::fmt::Display>(refs: &[SampleRef], key: impl Fn(&SampleRef) -> K) -> String {
    let mut groups: IndexMap<K, Vec<&str>> = IndexMap::new();
    for r in refs {
        groups.entry(key(r)).or_default().push(r.sample_id.as_str());
    }
    groups.iter().map(|(k, ids)| format!("{k}: [{}]", ids.join(", "))).collect::<Vec<_>>().join("; ")
}

fn distinct<K: std::hash::Hash + Eq>(refs: &[SampleRef], key: impl Fn(&SampleRef) -> K) -> usize {
    refs.iter().map(key).collect::<std::collections::HashSet<_>>().len()
}

/// The `metadata.target_repr` value as JSON text, or `absent` (a value of its own).
fn target_repr_of(r: &SampleRef) -> String {
    r.metadata.get("target_repr").map_or_else(|| "absent".to_owned(), Value::to_string)
}

/// Runs the §12.2 checks on one batch of refs.
pub(crate) fn validate_batch(strategy: &str, refs: &[SampleRef]) -> Result<()> {
    let wrong: Vec<String> =
        refs.iter().filter(|r| r.strategy != strategy).map(|r| format!("{} ({:?})", r.sample_id, r.strategy)).collect();
    if !wrong.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "batch has refs of another strategy than the loader's {strategy:?}: {}",
            wrong.join(", ")
        )));
    }
    if distinct(refs, |r| r.schema_version) > 1 {
        return Err(Error::InvalidArgument(format!(
            "batch mixes schema versions: {}",
            grouped(refs, |r| r.schema_version)
        )));
    }
    if distinct(refs, target_repr_of) > 1 {
        return Err(Error::InvalidArgument(format!(
            "batch mixes metadata.target_repr values: {}",
            grouped(refs, target_repr_of)
        )));
    }
    let mut spec_bearing = refs.iter().filter(|r| !r.feature_specs.is_empty());
    let Some(first) = spec_bearing.next() else { return Ok(()) };
    for r in spec_bearing {
        let same_names = r.feature_specs.len() == first.feature_specs.len()
            && r.feature_specs.keys().all(|k| first.feature_specs.contains_key(k));
        if !same_names {
            return Err(Error::InvalidArgument(format!(
                "batch mixes feature sets: sample {} has {:?} but sample {} has {:?}",
                first.sample_id,
                first.feature_specs.keys().collect::<Vec<_>>(),
                r.sample_id,
                r.feature_specs.keys().collect::<Vec<_>>()
            )));
        }
        for (name, spec) in &r.feature_specs {
            let Some(reference) = first.feature_specs.get(name) else { continue };
            if spec.dtype != reference.dtype || spec.shape.len() != reference.shape.len() {
                return Err(Error::InvalidArgument(format!(
                    "feature {name:?} is {} with rank {} in sample {} but {} with rank {} in sample {}",
                    reference.dtype,
                    reference.shape.len(),
                    first.sample_id,
                    spec.dtype,
                    spec.shape.len(),
                    r.sample_id
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::{DType, FeatureSpec};

    fn sample_ref(id: &str) -> SampleRef {
        let mut r: SampleRef = ferry_core::json::sample_ref_from_str(&format!(
            r#"{{"sample_id":"{id}","run_id":"r","source_task_id":null,"feature_store_uri":"mem://x/{id}",
               "feature_keys":{{"input_ids":"{id}/input_ids"}},"feature_specs":{{}},"strategy":"eagle3"}}"#
        ))
        .unwrap();
        r.feature_specs.insert("input_ids".into(), FeatureSpec::new("input_ids", vec![8], DType::Int64));
        r
    }

    #[test]
    fn a_uniform_batch_passes() {
        validate_batch("eagle3", &[sample_ref("a"), sample_ref("b")]).unwrap();
    }

    #[test]
    fn wrong_strategy_names_the_sample() {
        let mut b = sample_ref("b");
        b.strategy = "dflash".into();
        let err = validate_batch("eagle3", &[sample_ref("a"), b]).unwrap_err().to_string();
        assert!(err.contains("b (\"dflash\")"), "{err}");
    }

    #[test]
    fn absent_target_repr_counts_as_a_value() {
        let mut a = sample_ref("a");
        a.metadata.insert("target_repr".into(), "hidden_state".into());
        let err = validate_batch("eagle3", &[a, sample_ref("b")]).unwrap_err().to_string();
        assert!(err.contains("\"hidden_state\": [a]; absent: [b]"), "{err}");
    }

    #[test]
    fn spec_checks_skip_spec_less_refs_and_compare_dtype_and_rank() {
        let mut lazy = sample_ref("lazy");
        lazy.feature_specs.clear();
        validate_batch("eagle3", &[sample_ref("a"), lazy]).unwrap();
        let mut b = sample_ref("b");
        b.feature_specs.insert("input_ids".into(), FeatureSpec::new("input_ids", vec![1, 8], DType::Int64));
        let err = validate_batch("eagle3", &[sample_ref("a"), b]).unwrap_err().to_string();
        assert!(err.contains("rank 1 in sample a but int64 with rank 2 in sample b"), "{err}");
        let mut c = sample_ref("c");
        c.feature_specs.insert("extra".into(), FeatureSpec::new("extra", vec![1], DType::Int64));
        let err = validate_batch("eagle3", &[sample_ref("a"), c]).unwrap_err().to_string();
        assert!(err.contains("mixes feature sets"), "{err}");
    }
}
