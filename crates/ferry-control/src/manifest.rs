//! The offline ref manifest (SpecForge's `write_ref_manifest` / `read_ref_manifest`):
//! `{"schema_version": 1, "refs": [<ref>, ...]}` in Python's default JSON spacing, written to
//! `<path>.tmp` and renamed, so readers never see a partial manifest.

use crate::atomic::write_via;
use ferry_core::json::{self, JsonStyle};
use ferry_core::{Error, Result, SampleRef};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The manifest format version this build writes and reads.
pub const MANIFEST_SCHEMA_VERSION: i64 = 1;

#[derive(Serialize)]
struct ManifestOut<'a> {
    schema_version: i64,
    refs: &'a [SampleRef],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestIn {
    schema_version: i64,
    refs: Vec<SampleRef>,
}

/// The manifest's bytes, exactly as SpecForge's Python writes them.
pub fn manifest_bytes(refs: &[SampleRef]) -> Result<String> {
    json::to_string(&ManifestOut { schema_version: MANIFEST_SCHEMA_VERSION, refs }, JsonStyle::Spaced)
}

/// Writes the manifest atomically (`<path>.tmp` then rename), creating the parent directory.
pub fn write_ref_manifest(refs: &[SampleRef], path: &Path) -> Result<()> {
    crate::atomic::ensure_parent(path)?;
    let tmp = PathBuf::from(format!("{}.tmp", path.display()));
    write_via(path, &tmp, manifest_bytes(refs)?.as_bytes())
}

/// Reads a manifest. Unlike SpecForge, the format version is checked: a manifest from a newer
/// writer is refused rather than misread.
pub fn read_ref_manifest(path: &Path) -> Result<Vec<SampleRef>> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::io(format!("reading manifest {}", path.display()), &e))?;
    let manifest: ManifestIn = json::from_str(&text, &format!("manifest {}", path.display()))?;
    if manifest.schema_version != MANIFEST_SCHEMA_VERSION {
        return Err(Error::Corrupt {
            what: format!("manifest {}", path.display()),
            message: format!(
                "schema_version {} is not supported (this build reads {MANIFEST_SCHEMA_VERSION})",
                manifest.schema_version
            ),
        });
    }
    Ok(manifest.refs)
}
