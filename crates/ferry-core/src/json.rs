//! SpecForge-compatible JSON: what Python's `json.dumps` writes, byte for byte.
//!
//! SpecForge writes refs in two spellings: compact (`separators=(",", ":")`, channel and inbox
//! lines) and default-spaced (`", "` and `": "`, manifests and SQLite `ref_json`). Both use
//! Python's defaults otherwise, which differ from serde_json's:
//!
//! * `ensure_ascii=True`: every character outside printable ASCII (`0x20..=0x7e`) is written as
//!   `\uXXXX` (lowercase hex, surrogate pairs above the BMP); `\n \r \t \b \f \" \\` keep their
//!   short escapes.
//! * floats use Python's `repr`: shortest round-trip digits, `1.0` not `1`, exponent form when
//!   the decimal exponent is below -4 or at least 16 (`1e-05`, `1e+16`); non-finite floats are
//!   written `NaN`, `Infinity`, `-Infinity` as Python does.
//! * numbers held in a `serde_json::Value` (kept as text by serde_json's `arbitrary_precision`)
//!   are written as Python writes them after `json.loads`: integers keep every digit (Python
//!   ints are unbounded; `-0` becomes `0`), anything with a fraction or exponent is a float and
//!   goes through `repr` (`1.10` -> `1.1`, `1e-5` -> `1e-05`, `1e400` -> `Infinity`). Object key
//!   order is preserved (`preserve_order`).
//!
//! Reading accepts both spellings (any whitespace), rejects unknown keys and applies defaults
//! for missing defaulted keys (see [`crate::contracts`]).

use crate::{Error, Result, SampleRef};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::io;

/// Which separators to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonStyle {
    /// `json.dumps(x, separators=(",", ":"))`: channel and inbox lines.
    Compact,
    /// `json.dumps(x)`: manifests and the SQLite ledger's `ref_json`.
    Spaced,
}

/// A serde_json formatter that writes what Python's `json.dumps` writes.
#[derive(Debug, Clone, Copy)]
pub struct PythonFormatter {
    style: JsonStyle,
}

impl PythonFormatter {
    /// A formatter for the given separators.
    pub fn new(style: JsonStyle) -> Self {
        PythonFormatter { style }
    }

    fn item_separator(&self) -> &'static [u8] {
        match self.style {
            JsonStyle::Compact => b",",
            JsonStyle::Spaced => b", ",
        }
    }
}

impl serde_json::ser::Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(self.item_separator()) }
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if first { Ok(()) } else { w.write_all(self.item_separator()) }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(match self.style {
            JsonStyle::Compact => b":",
            JsonStyle::Spaced => b": ",
        })
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(python_float_repr(value).as_bytes())
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        self.write_f64(w, f64::from(value))
    }

    fn write_number_str<W: ?Sized + io::Write>(&mut self, w: &mut W, value: &str) -> io::Result<()> {
        // serde_json keeps a Value's number as text (its own spelling for Rust-made floats,
        // e.g. `1e-5`); Python re-reads it as an int or a float and writes that.
        if value.contains(['.', 'e', 'E']) {
            match value.parse::<f64>() {
                Ok(f) => w.write_all(python_float_repr(f).as_bytes()),
                Err(_) => w.write_all(value.as_bytes()),
            }
        } else if value == "-0" {
            w.write_all(b"0")
        } else {
            w.write_all(value.as_bytes())
        }
    }

    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        // serde_json hands us runs that need no JSON escape; Python's ensure_ascii still
        // escapes everything outside printable ASCII (including DEL, 0x7f).
        let bytes = fragment.as_bytes();
        let mut start = 0;
        for (i, ch) in fragment.char_indices() {
            if (' '..='~').contains(&ch) {
                continue;
            }
            w.write_all(&bytes[start..i])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            start = i + ch.len_utf8();
        }
        w.write_all(&bytes[start..])
    }
}

/// Python's `repr(float)`, which `json.dumps` uses for floats.
pub fn python_float_repr(value: f64) -> String {
    if value.is_nan() {
        return "NaN".to_owned();
    }
    if value.is_infinite() {
        return if value > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    // Rust's `{:e}` gives the shortest digits that round-trip, like Python's repr.
    let sci = format!("{:e}", value.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if value.is_sign_negative() { "-" } else { "" };
    // Python: value = 0.d1d2... x 10^decpt; exponent form when decpt <= -4 or decpt > 16.
    let decpt = exp + 1;
    if decpt <= -4 || decpt > 16 {
        let (head, tail) = digits.split_at(1);
        let frac = if tail.is_empty() { String::new() } else { format!(".{tail}") };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        return format!("{sign}{head}{frac}e{exp_sign}{:02}", exp.unsigned_abs());
    }
    let n = digits.len() as i32;
    if decpt <= 0 {
        format!("{sign}0.{}{digits}", "0".repeat((-decpt) as usize))
    } else if decpt < n {
        let (int, frac) = digits.split_at(decpt as usize);
        format!("{sign}{int}.{frac}")
    } else {
        format!("{sign}{digits}{}.0", "0".repeat((decpt - n) as usize))
    }
}

/// Serializes `value` as Python's `json.dumps` would, in the given style.
pub fn to_string<T: Serialize + ?Sized>(value: &T, style: JsonStyle) -> Result<String> {
    let mut out = Vec::with_capacity(2048);
    to_writer(&mut out, value, style)?;
    // The formatter writes only ASCII.
    String::from_utf8(out).map_err(|e| Error::InvalidArgument(format!("non-UTF-8 JSON output: {e}")))
}

/// Serializes `value` into `writer` as Python's `json.dumps` would.
pub fn to_writer<W: io::Write, T: Serialize + ?Sized>(writer: W, value: &T, style: JsonStyle) -> Result<()> {
    let mut ser = serde_json::Serializer::with_formatter(writer, PythonFormatter::new(style));
    value
        .serialize(&mut ser)
        .map_err(|e| Error::Json { context: "serializing JSON".to_owned(), message: e.to_string() })
}

/// Parses a JSON document into `T`; errors name `context` and serde's position and field.
pub fn from_str<T: DeserializeOwned>(text: &str, context: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| Error::Json { context: context.to_owned(), message: e.to_string() })
}

/// Parses one SampleRef from JSON (compact or spaced).
pub fn sample_ref_from_str(text: &str) -> Result<SampleRef> {
    from_str(text, "SampleRef JSON")
}

/// Serializes one SampleRef as SpecForge does: compact for channel lines, spaced for
/// manifests and the ledger.
pub fn sample_ref_to_string(r: &SampleRef, style: JsonStyle) -> Result<String> {
    to_string(r, style)
}

/// Python's `json.dumps(x)` (default separators `", "` and `": "`) rebuilt from the output of
/// `json.dumps(x, separators=(",", ":"))`: the same document with a space after every `,` and
/// `:` outside strings. `None` when `compact` is not such output (whitespace outside strings,
/// non-ASCII, an unterminated string); the caller then parses and serializes instead. It lets a
/// ledger store SpecForge's spaced form of a channel record without building the ref.
pub fn respace_compact(compact: &str) -> Option<String> {
    if !compact.is_ascii() {
        return None;
    }
    let bytes = compact.as_bytes();
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 8);
    let mut at = 0;
    while at < bytes.len() {
        // Outside a string: copy up to the next string, `,` or `:`.
        let Some(next) = memchr::memchr3(b'"', b',', b':', &bytes[at..]) else {
            let tail = &bytes[at..];
            if tail.iter().any(u8::is_ascii_whitespace) {
                return None;
            }
            out.extend_from_slice(tail);
            break;
        };
        let chunk = &bytes[at..at + next];
        if chunk.iter().any(u8::is_ascii_whitespace) {
            return None;
        }
        out.extend_from_slice(chunk);
        at += next;
        match bytes[at] {
            b'"' => {
                // A string: copy through its closing quote, stepping over escapes.
                let start = at;
                at += 1;
                loop {
                    let rest = &bytes[at..];
                    let stop = memchr::memchr2(b'"', b'\\', rest)?;
                    at += stop;
                    if bytes[at] == b'\\' {
                        at += 2;
                        if at > bytes.len() {
                            return None;
                        }
                    } else {
                        at += 1;
                        break;
                    }
                }
                out.extend_from_slice(&bytes[start..at]);
            }
            separator => {
                out.push(separator);
                out.push(b' ');
                at += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn respacing_compact_output_gives_the_spaced_output() {
        let value = json!({
            "a": [1, 2.5, "x, y: z", {"b\"c": "\\", "d": null}],
            "e": "caf\u{e9} \n tab\t",
            "f": {"g": true, "h": []},
        });
        let compact = to_string(&value, JsonStyle::Compact).unwrap();
        assert_eq!(respace_compact(&compact).unwrap(), to_string(&value, JsonStyle::Spaced).unwrap());
        for not_compact in ["{\"a\": 1}", "{\"a\":1}\n", "{\"a\":\"unterminated}", "{\"a\":\"é\"}"] {
            assert_eq!(respace_compact(not_compact), None, "{not_compact}");
        }
    }

    #[test]
    fn float_repr_matches_python() {
        // Each right-hand side is what CPython 3.11 prints for repr(x).
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (-2.5, "-2.5"),
            (0.1, "0.1"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (123.456, "123.456"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (123456789012345680.0, "1.2345678901234568e+17"),
            (1e100, "1e+100"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (0.3333333333333333, "0.3333333333333333"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, want) in cases {
            assert_eq!(python_float_repr(*x), *want, "repr({x:e})");
        }
    }

    #[test]
    fn separators_and_ascii_escapes_match_python() {
        let v = json!({"a": [1, 2.0, "é😀\u{7f}\n\"\\\u{1}"], "b": null, "c": true});
        // json.dumps(v) and json.dumps(v, separators=(",", ":")) in CPython 3.11.
        assert_eq!(
            to_string(&v, JsonStyle::Spaced).unwrap(),
            r#"{"a": [1, 2.0, "\u00e9\ud83d\ude00\u007f\n\"\\\u0001"], "b": null, "c": true}"#
        );
        assert_eq!(
            to_string(&v, JsonStyle::Compact).unwrap(),
            r#"{"a":[1,2.0,"\u00e9\ud83d\ude00\u007f\n\"\\\u0001"],"b":null,"c":true}"#
        );
    }

    #[test]
    fn numbers_are_written_as_python_rewrites_them() {
        // json.dumps(json.loads(text)) in CPython 3.11.
        let text = r#"{"x": 1e-05, "y": 12345678901234567890123, "z": 1.10, "w": -0, "v": 1E5, "u": 1e400}"#;
        let v: serde_json::Value = from_str(text, "test").expect("valid JSON");
        assert_eq!(
            to_string(&v, JsonStyle::Spaced).expect("serializes"),
            r#"{"x": 1e-05, "y": 12345678901234567890123, "z": 1.1, "w": 0, "v": 100000.0, "u": Infinity}"#
        );
        // Floats made in Rust: serde_json spells them `1e-5`, `1.5e-7`; Python does not.
        let v = serde_json::json!([1e-5, 1.5e-7, 1e16, 3.0, -0.0]);
        assert_eq!(to_string(&v, JsonStyle::Compact).expect("serializes"), "[1e-05,1.5e-07,1e+16,3.0,-0.0]");
    }
}
