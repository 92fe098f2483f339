//! [`RefRecord`]: a ref as a channel carries it, one compact JSON record, with only what the
//! distributor needs read out of it (the sample id and the prompt task). The distributor
//! commits, de-duplicates and dispatches records without building a [`SampleRef`]: checking a
//! record as a parse would check it costs about a third of building the ref, and a record it
//! accepts always parses as a ref later (at a rank, or when a restart reads the ledger back).

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

/// A record checked as [`SampleRef`]'s deserializer checks it (the same keys, required or
/// defaulted; the same value types, down to each feature spec) without building it: strings
/// are borrowed where they need no unescaping and maps are walked, not collected. Only the id
/// and the prompt task are kept. A record this accepts therefore parses as a `SampleRef` later
/// (a rank's full parse, a restart's reconciliation), so no record can poison the ledger.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // the fields other than the id and the task exist to be checked, not read
struct Head<'a> {
    #[serde(borrow)]
    sample_id: Cow<'a, str>,
    /// Required, and may be null (as in [`SampleRef`]).
    #[serde(deserialize_with = "required_nullable")]
    source_task_id: Option<String>,
    #[serde(borrow)]
    run_id: Cow<'a, str>,
    #[serde(borrow)]
    feature_store_uri: Cow<'a, str>,
    feature_keys: MapOf<StrValue>,
    feature_specs: MapOf<SpecCheck>,
    #[serde(borrow)]
    strategy: Cow<'a, str>,
    // Defaulted keys: absent is fine, `null` is not (except where the ref's field is optional).
    #[serde(default)]
    schema_version: i64,
    #[serde(default)]
    target_model_version: StrValue,
    #[serde(borrow, default)]
    draft_weight_version: Option<Cow<'a, str>>,
    #[serde(default)]
    tokenizer_version: StrValue,
    #[serde(default)]
    num_tokens: i64,
    #[serde(default)]
    estimated_bytes: i64,
    #[serde(default)]
    metadata: MapOf<IgnoredAny>,
}

/// A feature spec, checked as [`ferry_core::FeatureSpec`] checks it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SpecCheck {
    name: StrValue,
    shape: SeqOf<u64>,
    dtype: StrValue,
    #[serde(default)]
    device_hint: Option<StrValue>,
    #[serde(default)]
    required: bool,
    #[serde(default)]
    target_repr: Option<ferry_core::TargetRepr>,
    #[serde(default)]
    target_meta: MapOf<IgnoredAny>,
}

/// A JSON string, checked and dropped (no allocation unless it has escapes).
#[derive(Default)]
struct StrValue;

impl<'de> serde::Deserialize<'de> for StrValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let _: Cow<'de, str> = serde::Deserialize::deserialize(d)?;
        Ok(StrValue)
    }
}

/// A JSON object with string keys and values of `V`, walked without being collected.
struct MapOf<V>(std::marker::PhantomData<V>);

impl<V> Default for MapOf<V> {
    fn default() -> Self {
        MapOf(std::marker::PhantomData)
    }
}

impl<'de, V: serde::Deserialize<'de>> serde::Deserialize<'de> for MapOf<V> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Walk<V>(std::marker::PhantomData<V>);
        impl<'de, V: serde::Deserialize<'de>> serde::de::Visitor<'de> for Walk<V> {
            type Value = MapOf<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
                while map.next_entry::<StrValue, V>()?.is_some() {}
                Ok(MapOf(std::marker::PhantomData))
            }
        }
        d.deserialize_map(Walk(std::marker::PhantomData))
    }
}

/// A JSON array of `T`, walked without being collected.
struct SeqOf<T>(std::marker::PhantomData<T>);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for SeqOf<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Walk<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Walk<T> {
            type Value = SeqOf<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON array")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Self::Value, A::Error> {
                while seq.next_element::<T>()?.is_some() {}
                Ok(SeqOf(std::marker::PhantomData))
            }
        }
        d.deserialize_seq(Walk(std::marker::PhantomData))
    }
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
        // Values of the wrong type are refused as a full parse refuses them.
        let spec = r#"{"name":"x","shape":[2],"dtype":"int64"}"#;
        let ok = format!(
            r#"{{"sample_id":"a","source_task_id":null,"run_id":"r","feature_store_uri":"u","feature_keys":{{"x":"k"}},"feature_specs":{{"x":{spec}}},"strategy":"e","num_tokens":4}}"#
        );
        assert!(RefRecord::parse(ok.clone(), "t").is_ok());
        for (from, to) in [
            (r#""num_tokens":4"#, r#""num_tokens":"four""#),
            (r#""num_tokens":4"#, r#""num_tokens":4.0"#),
            (r#""num_tokens":4"#, r#""num_tokens":null"#),
            (r#""num_tokens":4"#, r#""metadata":null"#),
            (r#""run_id":"r""#, r#""run_id":null"#),
            (r#""feature_keys":{"x":"k"}"#, r#""feature_keys":{"x":1}"#),
            (r#""shape":[2]"#, r#""shape":["2"]"#),
            (r#""shape":[2]"#, r#""shape":[-2]"#),
            (r#""dtype":"int64""#, r#""dtype":"int64","target_repr":"pixels""#),
            (r#""dtype":"int64""#, r#""dtype":"int64","colour":1"#),
        ] {
            let line = ok.replacen(from, to, 1);
            assert!(sample_ref_from_str(&line).is_err(), "the full parse refuses {line}");
            assert!(RefRecord::parse(line.clone(), "t").is_err(), "so must the record check: {line}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever one byte of a real ref record is changed to, the record check accepts it
        /// exactly when the full parse does (an empty `sample_id` aside, which it also refuses).
        #[test]
        fn the_record_check_agrees_with_the_full_parse(at in 0usize..2000, byte in proptest::prelude::any::<u8>()) {
            let text = std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/fixtures/specforge-control/refs.jsonl"
            ))
            .unwrap();
            let mut line = text.lines().next().unwrap().as_bytes().to_vec();
            let at = at % line.len();
            line[at] = byte;
            let Ok(line) = String::from_utf8(line) else { return Ok(()) };
            let full = sample_ref_from_str(&line);
            let checked = RefRecord::head(&line, "t");
            let empty_id = full.as_ref().is_ok_and(|r| r.sample_id.as_str().is_empty());
            proptest::prop_assert_eq!(checked.is_ok(), full.is_ok() && !empty_id, "{}", line);
        }
    }
}
