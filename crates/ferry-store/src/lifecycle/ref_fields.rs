//! The ref fields a put takes from its metadata, coerced as SpecForge's stores coerce them.
//!
//! SpecForge builds a put's `SampleRef` with `int(metadata.get("num_tokens", 0))`,
//! `str(metadata.get("run_id", "unknown"))`, `int(metadata.get("schema_version", 1))` and
//! `str(...)` of the two version strings, so `num_tokens=5.0`, `"7"` or `True` and a numeric
//! `run_id` all make a ref. ferry applies the same conversions ([`py_int`], [`py_str`]: Python's
//! `int()` and `str()` on JSON values) before any byte is written, and refuses what Python
//! would refuse (`int("abc")`, `int(None)`) with an error naming the field, instead of silently
//! substituting a default. `num_tokens` leaves the metadata with its order otherwise kept
//! (SpecForge's `{k: v for k, v in metadata.items() if k != "num_tokens"}`).

use ferry_core::{Error, JsonMap, Result};
use serde_json::Value;

/// The ref fields of one put, taken out of (or read from) its metadata.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RefFields {
    pub run_id: String,
    pub source_task_id: Option<String>,
    pub strategy: String,
    pub schema_version: i64,
    pub target_model_version: String,
    pub draft_weight_version: Option<String>,
    pub tokenizer_version: String,
    pub num_tokens: i64,
}

impl RefFields {
    /// Reads the fields from `metadata` and removes `num_tokens` from it (keeping the order of
    /// the other keys), as SpecForge's put does.
    pub(crate) fn take(metadata: &mut JsonMap) -> Result<RefFields> {
        let text = |key: &str, default: &str| -> Result<String> {
            metadata.get(key).map_or_else(|| Ok(default.to_owned()), |v| py_str(key, v))
        };
        // SpecForge passes these two through as they are; a ref holds them as strings, so a
        // non-string is refused rather than dropped.
        let optional_text = |key: &str| -> Result<Option<String>> {
            match metadata.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => {
                    Err(Error::InvalidArgument(format!("metadata {key:?} must be a string or null, got {other}")))
                }
            }
        };
        let strategy = match metadata.get("strategy") {
            None => "eagle3".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(Error::InvalidArgument(format!("metadata \"strategy\" must be a string, got {other}")));
            }
        };
        let fields = RefFields {
            run_id: text("run_id", "unknown")?,
            source_task_id: optional_text("source_task_id")?,
            strategy,
            schema_version: metadata
                .get("schema_version")
                .map_or(Ok(ferry_core::SCHEMA_VERSION), |v| py_int("schema_version", v))?,
            target_model_version: text("target_model_version", "unknown")?,
            draft_weight_version: optional_text("draft_weight_version")?,
            tokenizer_version: text("tokenizer_version", "unknown")?,
            num_tokens: metadata.get("num_tokens").map_or(Ok(0), |v| py_int("num_tokens", v))?,
        };
        metadata.shift_remove("num_tokens");
        Ok(fields)
    }
}

/// Python's `int(value)` for a JSON value, as an `i64`: integers as they are, booleans as 0/1,
/// finite floats truncated toward zero, strings of an optionally signed decimal integer (outer
/// whitespace and single underscores between digits allowed, as Python allows). Anything else
/// (`null`, `"5.0"`, `"abc"`, `NaN`, lists, objects, or a value outside `i64`) is refused.
pub(crate) fn py_int(field: &str, value: &Value) -> Result<i64> {
    let refused = |why: &str| {
        Error::InvalidArgument(format!(
            "metadata {field:?} = {value} is not an integer ({why}); SpecForge's put applies int() to it"
        ))
    };
    match value {
        Value::Bool(b) => Ok(i64::from(*b)),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i)
            } else if n.is_u64() {
                Err(refused("out of the 64-bit signed range"))
            } else {
                let f = n.as_f64().ok_or_else(|| refused("not a number"))?;
                let t = f.trunc();
                // i64::MAX as f64 rounds up to 2^63, so `<` keeps the cast in range.
                if t.is_finite() && t >= i64::MIN as f64 && t < i64::MAX as f64 {
                    Ok(t as i64)
                } else {
                    Err(refused("out of the 64-bit signed range"))
                }
            }
        }
        Value::String(s) => parse_py_int_literal(s).ok_or_else(|| refused("not a decimal integer string")),
        Value::Null => Err(refused("null")),
        Value::Array(_) | Value::Object(_) => Err(refused("a list or an object")),
    }
}

/// `int(s)` for a string: `[ws][+|-]digits[ws]`, digits separated by single underscores.
fn parse_py_int_literal(s: &str) -> Option<i64> {
    let s = s.trim();
    let (negative, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') || digits.contains("__") {
        return None;
    }
    let mut value: i128 = 0;
    for c in digits.chars() {
        match c {
            '_' => continue,
            // Python's int() takes any Unicode decimal digit; ASCII is what metadata carries.
            '0'..='9' => value = value.checked_mul(10)?.checked_add(i128::from(c as u8 - b'0'))?,
            _ => return None,
        }
        if value > i128::from(i64::MAX) + 1 {
            return None;
        }
    }
    let value = if negative { -value } else { value };
    i64::try_from(value).ok()
}

/// Python's `str(value)` for a JSON scalar: strings as they are, integers in decimal, floats
/// as Python's `repr` (shortest round trip: `5.0`, `0.1`, `1e+16`, `1e-05`), booleans `True` /
/// `False`, `null` as `None`. Lists and objects are refused (Python would print its own repr,
/// which no reader of a ref expects).
pub(crate) fn py_str(field: &str, value: &Value) -> Result<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(true) => Ok("True".to_owned()),
        Value::Bool(false) => Ok("False".to_owned()),
        Value::Null => Ok("None".to_owned()),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i.to_string())
            } else if let Some(u) = n.as_u64() {
                Ok(u.to_string())
            } else {
                n.as_f64()
                    .map(py_float_repr)
                    .ok_or_else(|| Error::InvalidArgument(format!("metadata {field:?} = {value} is not a number")))
            }
        }
        Value::Array(_) | Value::Object(_) => Err(Error::InvalidArgument(format!(
            "metadata {field:?} must be a string (or a number or boolean, converted with str()), got {value}"
        ))),
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation when the
/// decimal exponent is in `-4..16` (with `.0` for an integral value), else as `d.ddde+XX`.
pub(crate) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    // Rust's `{:e}` prints the shortest round-trip digits: "-1.2345e-7", "5e0".
    let sci = format!("{f:e}");
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
        } else if point as usize >= digits.len() {
            format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
        } else {
            let (int, frac) = digits.split_at(point as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() { String::new() } else { format!(".{rest}") };
        let esign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exponent.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn int_follows_python() {
        for (v, want) in [
            (json!(5), 5),
            (json!(-3), -3),
            (json!(5.9), 5),
            (json!(-5.9), -5),
            (json!(true), 1),
            (json!(false), 0),
            (json!("7"), 7),
            (json!(" -12 "), -12),
            (json!("+1_000"), 1000),
            (json!("9223372036854775807"), i64::MAX),
            (json!("-9223372036854775808"), i64::MIN),
        ] {
            assert_eq!(py_int("f", &v).unwrap(), want, "{v}");
        }
        for v in [
            json!(null),
            json!("5.0"),
            json!("abc"),
            json!(""),
            json!("1__0"),
            json!("_1"),
            json!("9223372036854775808"),
            json!(u64::MAX),
            json!(1e300),
            json!([1]),
            json!({}),
        ] {
            let err = py_int("num_tokens", &v).unwrap_err().to_string();
            assert!(err.contains("num_tokens") && err.contains("int()"), "{v}: {err}");
        }
    }

    #[test]
    fn str_follows_python() {
        for (v, want) in [
            (json!("r0"), "r0"),
            (json!(7), "7"),
            (json!(u64::MAX), "18446744073709551615"),
            (json!(true), "True"),
            (json!(null), "None"),
            (json!(5.0), "5.0"),
            (json!(0.1), "0.1"),
            (json!(-2.5), "-2.5"),
            (json!(1e16), "1e+16"),
            (json!(1.5e16), "1.5e+16"),
            (json!(123456789012345.6), "123456789012345.6"),
            (json!(1e15), "1000000000000000.0"),
            (json!(0.0001), "0.0001"),
            (json!(0.00001), "1e-05"),
            (json!(-1.25e-7), "-1.25e-07"),
            (json!(1e100), "1e+100"),
        ] {
            assert_eq!(py_str("f", &v).unwrap(), want, "{v}");
        }
        assert!(py_str("run_id", &json!([1])).unwrap_err().to_string().contains("run_id"));
    }

    #[test]
    fn take_removes_num_tokens_and_keeps_the_order() {
        let mut m: JsonMap =
            serde_json::from_value(json!({"run_id": 7, "num_tokens": "4", "a": 1, "b": 2, "c": 3})).unwrap();
        let f = RefFields::take(&mut m).unwrap();
        assert_eq!((f.run_id.as_str(), f.num_tokens), ("7", 4));
        assert_eq!(m.keys().collect::<Vec<_>>(), ["run_id", "a", "b", "c"]);
        assert_eq!(f.schema_version, ferry_core::SCHEMA_VERSION);
        assert_eq!((f.strategy.as_str(), f.tokenizer_version.as_str()), ("eagle3", "unknown"));
    }

    #[test]
    fn bad_fields_are_refused_by_name() {
        for bad in [json!({"num_tokens": null}), json!({"strategy": 3}), json!({"source_task_id": 4})] {
            let mut m: JsonMap = serde_json::from_value(bad.clone()).unwrap();
            assert!(RefFields::take(&mut m).is_err(), "{bad}");
        }
    }
}
