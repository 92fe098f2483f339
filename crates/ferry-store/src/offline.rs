//! Offline refs (SpecForge's `offline_reader.py`, `SPECFORGE-RUNTIME.md` §7.1-7.2): list the
//! feature files under a path in a deterministic order and build one `file://` ref per file.
//!
//! Lazy by default: assembling refs opens no file (a dump of tens of TB lists in milliseconds);
//! specs stay empty and `FeatureStore::describe` / `get` read each file's header when a loader
//! reaches it. Validated refs open every file once to fill specs, `num_tokens` and
//! `estimated_bytes`, and fail on a missing key.
//!
//! Sample ids are `"<run_id>:<index as 8 digits>"` and the file order is the lexicographic order
//! of absolute paths (so `rows_10-12` sorts before `rows_2-4`, exactly as SpecForge does).

use ferry_core::{Error, FeatureSpec, JsonMap, Result, SCHEMA_VERSION, SampleRef};
use indexmap::IndexMap;
use serde_json::Value;
use std::path::{Component, Path, PathBuf};

/// Names of files that hold one sample's features.
pub const FEATURE_FILE_SUFFIXES: [&str; 3] = [".ckpt", ".ckpt.gz", ".safetensors"];

/// SpecForge's default offline EAGLE3 raw keys, in its order.
pub const EAGLE3_OFFLINE_KEYS: [&str; 4] = ["input_ids", "loss_mask", "hidden_state", "aux_hidden_state"];

/// How offline refs are built (SpecForge's `OfflineManifestReader` arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct OfflineRefOptions {
    /// Run id, also the sample id prefix.
    pub run_id: String,
    /// Draft strategy (`eagle3`, `dflash`, ...).
    pub strategy: String,
    /// Raw keys each file must hold; each becomes a feature of the same name.
    pub feature_keys: Vec<String>,
    /// `metadata.ttt_length`.
    pub ttt_length: i64,
    /// `metadata.max_len`.
    pub max_len: i64,
    /// `metadata.target_repr`.
    pub target_repr: String,
    /// Target model version.
    pub target_model_version: String,
    /// Tokenizer version.
    pub tokenizer_version: String,
    /// Draft weight version.
    pub draft_weight_version: Option<String>,
}

impl Default for OfflineRefOptions {
    fn default() -> Self {
        OfflineRefOptions {
            run_id: "offline".into(),
            strategy: "eagle3".into(),
            feature_keys: EAGLE3_OFFLINE_KEYS.iter().map(|k| (*k).to_owned()).collect(),
            ttt_length: 7,
            max_len: 2048,
            target_repr: "hidden_state".into(),
            target_model_version: "unknown".into(),
            tokenizer_version: "unknown".into(),
            draft_weight_version: None,
        }
    }
}

/// An absolute, lexically normalised path (Python's `os.path.abspath`: `.` and `..` are folded,
/// symlinks are not resolved).
pub fn absolute_path(path: &Path) -> Result<PathBuf> {
    let abs = std::path::absolute(path).map_err(|e| Error::io(format!("resolving {}", path.display()), &e))?;
    let mut out = PathBuf::new();
    for component in abs.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

fn is_feature_file(name: &str) -> bool {
    FEATURE_FILE_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The feature files at `path`: the file itself, or every feature file below a directory
/// (recursively, not following symlinked directories, as `os.walk` does by default), as
/// absolute paths in lexicographic order. A directory without feature files gives an empty list.
pub fn list_feature_files(path: &Path) -> Result<Vec<PathBuf>> {
    let root = absolute_path(path)?;
    let meta = std::fs::metadata(&root).map_err(|e| Error::io(format!("reading {}", root.display()), &e))?;
    if !meta.is_dir() {
        return Ok(vec![root]);
    }
    let mut files = Vec::new();
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(format!("listing {}", dir.display()), &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(format!("listing {}", dir.display()), &e))?;
            // `file_type` does not follow symlinks: like `os.walk` (followlinks=False), a link to
            // a directory is not descended into (a `ln -s .. up` would loop), while a link to a
            // file (or a dangling one) is listed as a file.
            let kind = entry.file_type().map_err(|e| Error::io(format!("reading {}", entry.path().display()), &e))?;
            let path = entry.path();
            if kind.is_dir() {
                stack.push(path);
            } else if entry.file_name().to_str().is_some_and(is_feature_file) && !(kind.is_symlink() && path.is_dir()) {
                files.push(path);
            }
        }
    }
    // Byte order of the UTF-8 path equals Python's code-point order of `sorted()`.
    files.sort_by(|a, b| a.as_os_str().as_encoded_bytes().cmp(b.as_os_str().as_encoded_bytes()));
    Ok(files)
}

/// The sample id of file `index`.
pub fn offline_sample_id(run_id: &str, index: usize) -> String {
    format!("{run_id}:{index:08}")
}

/// A lazy `file://` ref for `path` (absolute), the `index`-th file: no file is opened.
pub fn lazy_offline_ref(path: &Path, index: usize, options: &OfflineRefOptions) -> SampleRef {
    let mut metadata = JsonMap::new();
    metadata.insert("format".into(), Value::from(format!("offline_{}", options.strategy)));
    metadata.insert("target_repr".into(), Value::from(options.target_repr.clone()));
    metadata.insert("schema_version".into(), Value::from(SCHEMA_VERSION));
    metadata.insert("ttt_length".into(), Value::from(options.ttt_length));
    metadata.insert("max_len".into(), Value::from(options.max_len));
    metadata.insert("file_index".into(), Value::from(index));
    SampleRef {
        sample_id: offline_sample_id(&options.run_id, index).into(),
        run_id: options.run_id.clone(),
        source_task_id: None,
        feature_store_uri: format!("file://{}", path.display()),
        feature_keys: options.feature_keys.iter().map(|k| (k.clone(), k.clone())).collect(),
        feature_specs: IndexMap::new(),
        strategy: options.strategy.clone(),
        schema_version: SCHEMA_VERSION,
        target_model_version: options.target_model_version.clone(),
        draft_weight_version: options.draft_weight_version.clone(),
        tokenizer_version: options.tokenizer_version.clone(),
        num_tokens: 0,
        estimated_bytes: 0,
        metadata,
    }
}

/// The path a `file://` ref names.
pub fn file_ref_path(r: &SampleRef) -> Result<PathBuf> {
    r.feature_store_uri.strip_prefix("file://").map(PathBuf::from).ok_or_else(|| {
        Error::InvalidArgument(format!("ref for sample {} is not a file:// ref: {}", r.sample_id, r.feature_store_uri))
    })
}

/// The specs of a `file://` ref's features, read from the file's header (no tensor data), in
/// the order of the ref's `feature_keys`. A missing raw key names every missing key.
pub fn file_ref_specs(r: &SampleRef) -> Result<IndexMap<String, FeatureSpec>> {
    let path = file_ref_path(r)?;
    let file = ferry_format::TensorFile::open(&path)?;
    file_ref_specs_in(r, &path, &file)
}

/// [`file_ref_specs`] of a file already opened (`path` names it in errors).
pub(crate) fn file_ref_specs_in(
    r: &SampleRef,
    path: &Path,
    file: &ferry_format::TensorFile,
) -> Result<IndexMap<String, FeatureSpec>> {
    require_raw_keys(file, path, Some(r.sample_id.as_str()), r.feature_keys.values().map(|k| raw_key(k)))?;
    r.feature_keys
        .iter()
        .map(|(name, key)| {
            let mut spec = file.spec(raw_key(key))?;
            spec.name = name.clone();
            Ok((name.clone(), spec))
        })
        .collect()
}

/// Checks that an offline feature file holds every raw key; a missing one is
/// [`Error::MissingFeatureKeys`] naming all that are missing and what the file holds (SpecForge's
/// `KeyError` "... missing required offline feature keys [...]").
pub fn require_raw_keys<'k>(
    file: &ferry_format::TensorFile,
    path: &Path,
    sample_id: Option<&str>,
    keys: impl IntoIterator<Item = &'k str>,
) -> Result<()> {
    let missing: Vec<String> = keys.into_iter().filter(|k| file.spec(k).is_err()).map(str::to_owned).collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(Error::MissingFeatureKeys {
        path: path.display().to_string(),
        sample_id: sample_id.map(str::to_owned),
        missing,
        present: file.names().map(str::to_owned).collect(),
    })
}

/// The raw key of a feature key (SpecForge takes the segment after the last `/`).
pub fn raw_key(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// A validated ref: specs, `num_tokens` (elements of `input_ids`) and `estimated_bytes` filled
/// from the file.
pub fn validate_offline_ref(mut r: SampleRef) -> Result<SampleRef> {
    let specs = file_ref_specs(&r)?;
    r.num_tokens = specs.get("input_ids").and_then(FeatureSpec::numel).map_or(0, |n| n as i64);
    let bytes = specs.values().map(FeatureSpec::nbytes).try_fold(0u64, |acc, b| b.map(|b| acc.saturating_add(b)))?;
    r.estimated_bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
    r.feature_specs = specs;
    Ok(r)
}

/// One ref per feature file under `path`: lazy, or validated when `validate` is set.
pub fn offline_refs(path: &Path, options: &OfflineRefOptions, validate: bool) -> Result<Vec<SampleRef>> {
    let files = list_feature_files(path)?;
    files
        .iter()
        .enumerate()
        .map(|(i, file)| {
            let r = lazy_offline_ref(file, i, options);
            if validate { validate_offline_ref(r) } else { Ok(r) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_path_folds_dots_like_python_abspath() {
        assert_eq!(absolute_path(Path::new("/a/./b/../c")).unwrap(), PathBuf::from("/a/c"));
    }

    #[test]
    fn sample_ids_are_eight_digits() {
        assert_eq!(offline_sample_id("offline", 3), "offline:00000003");
        assert_eq!(offline_sample_id("r", 123_456_789), "r:123456789");
    }

    #[test]
    fn listing_is_lexicographic_and_recursive() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["rows_2-4/data_2.ckpt.gz", "rows_10-12/data_10.ckpt", "rows_0-2/data_0.ckpt", "x/y.safetensors"] {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"").unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), b"").unwrap();
        let files = list_feature_files(dir.path()).unwrap();
        let rel: Vec<_> = files.iter().map(|f| f.strip_prefix(dir.path()).unwrap().to_str().unwrap()).collect();
        assert_eq!(
            rel,
            ["rows_0-2/data_0.ckpt", "rows_10-12/data_10.ckpt", "rows_2-4/data_2.ckpt.gz", "x/y.safetensors"]
        );
    }
}
