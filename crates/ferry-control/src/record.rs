//! [`RefRecord`]: a ref as a channel carries it, one compact JSON record, with only what the
//! distributor needs read out of it (the sample id and the prompt task). The distributor
//! commits, de-duplicates and dispatches records without building a [`SampleRef`] (reading the
//! id costs about a fifth of parsing the whole ref); the ranks parse every ref in full, so a
//! record that is valid JSON but not a valid ref fails the rank that reads it, with the record's
//! position, instead of the distributor. The distributor still checks each record's keys:
//! an unknown or a missing key is refused there, as a full parse would refuse it.

use ferry_core::json::{JsonStyle, respace_compact, sample_ref_from_str, sample_ref_to_string};
use ferry_core::{Error, Result, SampleId, SampleRef};
use serde::de::IgnoredAny;
use std::borrow::Cow;

/// One ref record: its id, its prompt task, and its compact JSON text (no newline).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefRecord {
    /// The sample id.
    pub sample_id: SampleId,
    /// The prompt task it came from.
    pub source_task_id: Option<String>,
    /// The record as written.
    pub line: Box<str>,
}

/// A record's keys, checked as [`SampleRef`] checks them (no unknown key, every required one
/// present), with only the id and the prompt task read; the values of the other keys are
/// checked as JSON, not as the ref's types (the ranks' full parse does that).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the `IgnoredAny` fields exist to be checked, not read
struct Head<'a> {
    #[serde(borrow)]
    sample_id: Cow<'a, str>,
    /// Required, and may be null (as in [`SampleRef`]).
    #[serde(deserialize_with = "required_nullable")]
    source_task_id: Option<String>,
    run_id: IgnoredAny,
    feature_store_uri: IgnoredAny,
    feature_keys: IgnoredAny,
    feature_specs: IgnoredAny,
    strategy: IgnoredAny,
    #[serde(default)]
    schema_version: Option<IgnoredAny>,
    #[serde(default)]
    target_model_version: Option<IgnoredAny>,
    #[serde(default)]
    draft_weight_version: Option<IgnoredAny>,
    #[serde(default)]
    tokenizer_version: Option<IgnoredAny>,
    #[serde(default)]
    num_tokens: Option<IgnoredAny>,
    #[serde(default)]
    estimated_bytes: Option<IgnoredAny>,
    #[serde(default)]
    metadata: Option<IgnoredAny>,
}

/// A key that must be present but may be null (serde makes a missing `Option` `None`
/// otherwise).
fn required_nullable<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Option<String>, D::Error> {
    serde::Deserialize::deserialize(d)
}

impl RefRecord {
    /// Reads the id and prompt task out of a record, checking it is one well-formed JSON object
    /// with a non-empty `sample_id`. `context` names where it came from, for errors.
    pub fn parse(line: String, context: &str) -> Result<RefRecord> {
        let (sample_id, source_task_id) = Self::head(&line, context)?;
        Ok(RefRecord { sample_id, source_task_id, line: line.into_boxed_str() })
    }

    /// The id and prompt task of a record, with [`RefRecord::parse`]'s checks.
    pub fn head(line: &str, context: &str) -> Result<(SampleId, Option<String>)> {
        let head: Head<'_> = serde_json::from_str(line)
            .map_err(|e| Error::Json { context: format!("ref record {context}"), message: e.to_string() })?;
        if head.sample_id.is_empty() {
            return Err(Error::Json { context: format!("ref record {context}"), message: "empty sample_id".into() });
        }
        Ok((SampleId::new(head.sample_id.into_owned()), head.source_task_id))
    }

    /// The record of a ref (its compact JSON).
    pub fn from_ref(r: &SampleRef) -> Result<RefRecord> {
        Ok(RefRecord {
            sample_id: r.sample_id.clone(),
            source_task_id: r.source_task_id.clone(),
            line: sample_ref_to_string(r, JsonStyle::Compact)?.into_boxed_str(),
        })
    }

    /// The whole ref (a full parse).
    pub fn to_ref(&self) -> Result<SampleRef> {
        sample_ref_from_str(&self.line)
    }

    /// SpecForge's spaced JSON of the ref (what its SQLite ledger stores): respaced from the
    /// compact record when it is Python's compact output, else parsed and serialized.
    pub fn spaced_json(&self) -> Result<String> {
        match respace_compact(&self.line) {
            Some(spaced) => Ok(spaced),
            None => sample_ref_to_string(&self.to_ref()?, JsonStyle::Spaced),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_its_id_and_task_and_refuses_what_is_not_a_ref_object() {
        let rest = r#""run_id":"r","feature_store_uri":"mem://x","feature_keys":{},"feature_specs":{},"strategy":"e""#;
        let line = format!(r#"{{"sample_id":"run0:t\"1","source_task_id":"t1",{rest},"metadata":{{"x":[1]}}}}"#);
        let r = RefRecord::parse(line.clone(), "t").unwrap();
        assert_eq!((r.sample_id.as_str(), r.source_task_id.as_deref()), ("run0:t\"1", Some("t1")));
        assert_eq!(&*r.line, line);
        let none = RefRecord::parse(format!(r#"{{"sample_id":"a","source_task_id":null,{rest}}}"#), "t").unwrap();
        assert_eq!(none.source_task_id, None);
        let bad = [
            format!(r#"{{"sample_id":"","source_task_id":null,{rest}}}"#),
            format!(r#"{{"sample_id":"a","source_task_id":null,{rest},"typo":1}}"#),
            format!(r#"{{"sample_id":"a",{rest}}}"#),
            r#"{"sample_id":"a""#.to_owned(),
            "[1]".to_owned(),
            format!(r#"{{"sample_id":"a","source_task_id":null,{rest}}} x"#),
        ];
        for line in bad {
            assert!(RefRecord::parse(line.clone(), "t").is_err(), "{line}");
        }
    }
}
