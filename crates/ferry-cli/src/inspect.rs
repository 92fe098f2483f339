//! `ferry inspect ref`: read, validate and summarise SampleRefs.
//!
//! Input is either JSON lines (a ref channel such as `refs.jsonl`, an inbox file; compact or
//! spaced) or a manifest (`{"schema_version": 1, "refs": [...]}`, SpecForge's
//! `write_ref_manifest`). The whole input is tried as one JSON object with a `refs` key first;
//! anything else is read as JSON lines.
//!
//! Every ref is validated with `ferry_core::json` (unknown keys, missing required keys and wrong
//! types are errors); the first invalid record stops the command with an error naming its line
//! (or its index in a manifest) and what was wrong. Blank lines are skipped. A last line without
//! a final newline is a torn record (a writer crashed or is still appending): like SpecForge's
//! channel reader, it is never parsed; a warning says it was skipped.
//!
//! Output: one summary line per ref and a footer, or with `--json` each ref re-serialized the way
//! SpecForge writes it (compact as in channels, or `--spaced` as in manifests and the ledger),
//! one per line. A compact line SpecForge wrote comes back byte for byte.

use crate::args::InspectArgs;
use crate::measure::fmt_bytes;
use anyhow::{Context, Result, anyhow, bail};
use ferry_core::contracts::estimate_bytes;
use ferry_core::{JsonStyle, SampleRef, json};
use serde_json::Value;
use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::PathBuf;

/// What `ferry inspect ref` will do.
#[derive(Debug)]
pub(crate) struct Plan {
    /// `None` reads stdin.
    file: Option<PathBuf>,
    /// `None` prints summaries; otherwise re-emit JSON in this style.
    json: Option<JsonStyle>,
}

impl Plan {
    /// Builds the plan (clap already checked that `--spaced` comes with `--json`).
    pub(crate) fn from_args(args: InspectArgs) -> Plan {
        let file = (args.file.as_os_str() != "-").then_some(args.file);
        let json = args.json.then_some(if args.spaced { JsonStyle::Spaced } else { JsonStyle::Compact });
        Plan { file, json }
    }

    fn source_name(&self) -> String {
        self.file.as_ref().map_or_else(|| "<stdin>".to_owned(), |p| p.display().to_string())
    }
}

/// Where a ref came from, for summaries and errors.
#[derive(Debug, Clone, Copy)]
enum Origin {
    /// 1-based line of a JSON-lines file.
    Line(usize),
    /// 0-based index in a manifest's `refs` array.
    ManifestRef(usize),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Line(n) => write!(f, "line {n}"),
            Origin::ManifestRef(i) => write!(f, "refs[{i}]"),
        }
    }
}

/// Runs the command, writing to `out`.
pub(crate) fn run(plan: &Plan, out: &mut dyn Write) -> Result<()> {
    if let Some(path) = plan.file.as_deref().filter(|p| is_tensor_file(p)) {
        return inspect_tensor_file(path, plan.json.is_some(), out);
    }
    let source = plan.source_name();
    let bytes = read_input(plan).with_context(|| format!("reading {source}"))?;
    let (refs, manifest_version) = match as_manifest(&bytes) {
        Some(manifest) => {
            let (refs, version) = manifest_refs(manifest).with_context(|| format!("{source}: not a valid manifest"))?;
            (refs, Some(version))
        }
        None => (jsonl_refs(&bytes, &source)?, None),
    };
    let refs: Vec<(Origin, SampleRef)> = refs
        .into_iter()
        .map(|(origin, text)| {
            let r = json::sample_ref_from_str(&text)
                .map_err(|e| anyhow!("{}", within_record(&e.to_string())))
                .with_context(|| format!("{source}: {origin} is not a valid SampleRef"))?;
            Ok((origin, r))
        })
        .collect::<Result<_>>()?;

    if let Some(style) = plan.json {
        for (origin, r) in &refs {
            let text = json::sample_ref_to_string(r, style).with_context(|| format!("{source}: {origin}"))?;
            writeln!(out, "{text}")?;
        }
        return Ok(());
    }
    for (origin, r) in &refs {
        writeln!(out, "{origin}: {}", summary(r))?;
    }
    let distinct: HashSet<&str> = refs.iter().map(|(_, r)| r.sample_id.as_str()).collect();
    let total: i64 = refs.iter().map(|(_, r)| r.estimated_bytes).sum();
    let kind = match manifest_version {
        Some(v) => format!("manifest (schema_version {v})"),
        None => "JSON lines".to_owned(),
    };
    writeln!(
        out,
        "{} ref{} ({} distinct sample id{}) in {kind}, {} estimated",
        refs.len(),
        if refs.len() == 1 { "" } else { "s" },
        distinct.len(),
        if distinct.len() == 1 { "" } else { "s" },
        fmt_bytes(u64::try_from(total).unwrap_or(0)),
    )?;
    Ok(())
}

fn read_input(plan: &Plan) -> Result<Vec<u8>> {
    match &plan.file {
        Some(path) => Ok(std::fs::read(path)?),
        None => {
            let mut bytes = Vec::new();
            std::io::stdin().lock().read_to_end(&mut bytes)?;
            Ok(bytes)
        }
    }
}

/// The input as a manifest object, if it is one JSON object with a `refs` key.
fn as_manifest(bytes: &[u8]) -> Option<serde_json::Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) if map.contains_key("refs") => Some(map),
        _ => None,
    }
}

/// The refs of a manifest, each as compact JSON text for the strict reader, and its
/// `schema_version` (not checked, as SpecForge's `read_ref_manifest` does not).
fn manifest_refs(mut manifest: serde_json::Map<String, Value>) -> Result<(Vec<(Origin, String)>, String)> {
    let version = manifest.get("schema_version").map_or_else(|| "missing".to_owned(), Value::to_string);
    for key in manifest.keys().filter(|k| *k != "refs" && *k != "schema_version") {
        tracing::warn!("manifest key {key:?} is not one SpecForge writes; ignored");
    }
    let Some(Value::Array(refs)) = manifest.remove("refs") else {
        bail!("\"refs\" must be an array of SampleRef objects");
    };
    let refs = refs
        .iter()
        .enumerate()
        .map(|(i, v)| Ok((Origin::ManifestRef(i), json::to_string(v, JsonStyle::Compact)?)))
        .collect::<Result<_>>()?;
    Ok((refs, version))
}

/// The complete, non-blank lines of a JSON-lines input. A torn last line (no final newline) is
/// skipped with a warning.
fn jsonl_refs(bytes: &[u8], source: &str) -> Result<Vec<(Origin, String)>> {
    let mut lines: Vec<&[u8]> = bytes.split(|b| *b == b'\n').collect();
    // `split` yields one segment after the last newline: empty for a well-formed file.
    let tail = lines.pop().unwrap_or_default();
    if !tail.trim_ascii().is_empty() {
        tracing::warn!(
            "{source}: line {}: skipping a torn trailing record ({} bytes, no final newline): the writer crashed or is still appending",
            lines.len() + 1,
            tail.len()
        );
    }
    let mut refs = Vec::new();
    for (i, line) in lines.into_iter().enumerate() {
        if line.trim_ascii().is_empty() {
            continue;
        }
        let origin = Origin::Line(i + 1);
        let text = std::str::from_utf8(line).with_context(|| format!("{source}: {origin} is not UTF-8"))?;
        refs.push((origin, text.to_owned()));
    }
    Ok(refs)
}

/// serde positions are relative to the one record parsed; say so instead of `line 1`.
fn within_record(message: &str) -> String {
    match message.rsplit_once(" at line 1 column ") {
        Some((head, col)) if col.bytes().all(|b| b.is_ascii_digit()) => {
            format!("{head} (at column {col} of the record)")
        }
        _ => message.to_owned(),
    }
}

/// `run0:task0 generation=1 disagg://fixture/run0:task0 eagle3 [input_ids (4) int64, ...] 320 B`.
fn summary(r: &SampleRef) -> String {
    let generation = r.generation().map_or_else(|| "?".to_owned(), |g| g.to_string());
    let features: Vec<String> = r
        .feature_keys
        .keys()
        .map(|name| match r.feature_specs.get(name) {
            Some(spec) => format!("{name} {} {}", crate::sample::shape_text(&spec.shape), spec.dtype),
            None => format!("{name} (no spec)"),
        })
        .collect();
    let mut bytes = fmt_bytes(u64::try_from(r.estimated_bytes).unwrap_or(0));
    let from_specs = estimate_bytes(r.feature_specs.values());
    if !r.feature_specs.is_empty() && i64::try_from(from_specs).ok() != Some(r.estimated_bytes) {
        bytes.push_str(&format!(" (specs say {})", fmt_bytes(from_specs)));
    }
    format!(
        "{} generation={generation} {} {} [{}] {bytes}",
        r.sample_id,
        r.feature_store_uri,
        r.strategy,
        features.join(", ")
    )
}

/// Whether `path` names a tensor file rather than refs: any name ferry-format reads
/// (`.ckpt`/`.pt`/`.pth`, `.gz`, `.safetensors`), decided by ferry-format itself.
fn is_tensor_file(path: &std::path::Path) -> bool {
    ferry_format::FileFormat::from_name(path).is_ok()
}

/// `ferry inspect FILE`: every tensor's dtype, shape and size (and with `--json` the SHA-256 of
/// its contiguous little-endian bytes), in the file's order.
fn inspect_tensor_file(path: &std::path::Path, json: bool, out: &mut dyn Write) -> Result<()> {
    use sha2::{Digest, Sha256};
    let file = ferry_format::TensorFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut entries = serde_json::Map::new();
    let mut total = 0u64;
    let mut rows = Vec::new();
    for name in file.names() {
        let tensor = file.tensor(name).with_context(|| format!("{}: tensor {name:?}", path.display()))?;
        let view = tensor.view();
        total += view.nbytes();
        if json {
            let digest = Sha256::digest(view.bytes());
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            entries.insert(
                name.to_owned(),
                serde_json::json!({"dtype": view.dtype().name(), "shape": view.shape(), "nbytes": view.nbytes(), "sha256": hex}),
            );
        } else {
            let storage = if tensor.is_borrowed() { "mapped" } else { "copied (strided or compressed)" };
            rows.push(format!(
                "  {name:<24} {:<9} {:<20} {:>12}  {storage}",
                view.dtype().name(),
                format!("{:?}", view.shape()),
                fmt_bytes(view.nbytes())
            ));
        }
    }
    if json {
        writeln!(out, "{}", json::to_string(&Value::Object(entries), JsonStyle::Spaced)?)?;
        return Ok(());
    }
    writeln!(out, "{}: {} tensors, {}", path.display(), file.len(), fmt_bytes(total))?;
    for row in rows {
        writeln!(out, "{row}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_positions_are_rewritten_to_the_record() {
        assert_eq!(
            within_record("unknown field `x` at line 1 column 12"),
            "unknown field `x` (at column 12 of the record)"
        );
        assert_eq!(within_record("EOF while parsing"), "EOF while parsing");
    }

    #[test]
    fn torn_tail_and_blank_lines_are_skipped() {
        let refs = jsonl_refs(b"{\"a\":1}\n\n  \n{\"b\":2}\n{\"c\"", "t").unwrap();
        let lines: Vec<String> = refs.iter().map(|(o, t)| format!("{o}={t}")).collect();
        assert_eq!(lines, ["line 1={\"a\":1}", "line 4={\"b\":2}"]);
    }

    #[test]
    fn tensor_files_are_every_name_ferry_format_reads() {
        for name in ["a.ckpt", "a.pt", "a.PTH", "a.ckpt.gz", "a.safetensors"] {
            assert!(is_tensor_file(std::path::Path::new(name)), "{name}");
        }
        for name in ["refs.jsonl", "manifest.json", "x.pt.json"] {
            assert!(!is_tensor_file(std::path::Path::new(name)), "{name}");
        }
    }

    #[test]
    fn manifest_is_detected_only_as_one_object_with_refs() {
        assert!(as_manifest(br#"{"schema_version": 1, "refs": []}"#).is_some());
        assert!(as_manifest(b"{\"sample_id\":\"s\"}\n").is_none());
        assert!(as_manifest(b"{\"refs\":[]}\n{\"refs\":[]}\n").is_none());
    }
}
