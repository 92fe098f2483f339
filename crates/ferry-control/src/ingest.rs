//! Ingest: copy offline feature files into any store and publish their refs (SpecForge's
//! `ingest_offline_features` and the offline producer driver, `SPECFORGE-RUNTIME.md` §7.3-7.5).
//!
//! Files are processed by a pool of worker threads (both cores of a small node): each opens
//! its file (a read-only mapping, or one decompressed buffer for `.gz`) and `put`s the
//! strategy's tensors straight from those bytes, with no intermediate copy. Refs come out in
//! file order whatever order the workers finish in.
//!
//! Failure is exact: every successful put is reported to `on_ref` as it happens, so the
//! producer driver can abort precisely what it published (and nothing else), after writing
//! `.failed` first (`"<ExcType>: <message>"`, as SpecForge writes it), so a consumer is never
//! left waiting, even if the process dies mid-cleanup. If `.failed` cannot be written, cleanup
//! still runs and the returned error says so.

use crate::manifest::write_ref_manifest;
use crate::sentinel::OfflineControl;
use ferry_core::{Error, JsonMap, Result, SampleId, SampleRef, TensorView};
use ferry_store::offline::{
    FEATURE_FILE_SUFFIXES, OfflineRefOptions, list_feature_files, offline_sample_id, require_raw_keys,
};
use ferry_store::{DrainPolicy, FeatureStore};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// How ingest runs.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Ref options: run id (SpecForge's ingest default is `disagg`), strategy, raw keys,
    /// `ttt_length`, `max_len`, `target_repr`.
    pub refs: OfflineRefOptions,
    /// Ingest only the first `limit` files.
    pub limit: Option<usize>,
    /// Worker threads (at least 1).
    pub workers: usize,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            refs: OfflineRefOptions { run_id: "disagg".into(), ..OfflineRefOptions::default() },
            limit: None,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

/// What an ingest did.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestReport {
    /// The published refs, in file order.
    pub refs: Vec<SampleRef>,
    /// Tensor bytes put.
    pub bytes: u64,
}

/// What one file's ingest did.
struct Ingested {
    r: SampleRef,
    /// Tensor bytes put.
    tensor_bytes: u64,
    /// The file's size on disk (the progress unit).
    file_bytes: u64,
}

/// Puts one file's features.
fn ingest_one(store: &FeatureStore, path: &Path, index: usize, options: &OfflineRefOptions) -> Result<Ingested> {
    let file = ferry_format::TensorFile::open(path)?;
    let sample_id = offline_sample_id(&options.run_id, index);
    require_raw_keys(&file, path, Some(&sample_id), options.feature_keys.iter().map(String::as_str))?;
    let tensors =
        options.feature_keys.iter().map(|k| file.tensor(k)).collect::<Result<Vec<ferry_format::FileTensor<'_>>>>()?;
    let views: Vec<(&str, TensorView<'_>)> =
        options.feature_keys.iter().map(String::as_str).zip(tensors.iter().map(|t| t.view())).collect();
    let num_tokens = views.iter().find(|(k, _)| *k == "input_ids").map_or(0, |(_, v)| {
        v.shape().iter().product::<u64>() // validated by TensorView::new: cannot overflow
    });
    let mut metadata = JsonMap::new();
    metadata.insert("run_id".into(), Value::from(options.run_id.clone()));
    metadata.insert("strategy".into(), Value::from(options.strategy.clone()));
    metadata.insert("format".into(), Value::from(format!("offline_{}", options.strategy)));
    metadata.insert("target_repr".into(), Value::from(options.target_repr.clone()));
    metadata.insert("ttt_length".into(), Value::from(options.ttt_length));
    metadata.insert("max_len".into(), Value::from(options.max_len));
    metadata.insert("num_tokens".into(), Value::from(num_tokens));
    metadata.insert("file_index".into(), Value::from(index));
    let tensor_bytes = views.iter().map(|(_, v)| v.nbytes()).sum();
    let r = store.put(sample_id, &views, metadata)?;
    // Progress only: a file that cannot be stat'ed after it was read counts as 0 bytes.
    let file_bytes = std::fs::metadata(path).map_or(0, |m| m.len());
    Ok(Ingested { r, tensor_bytes, file_bytes })
}

/// Ingests `files` (in order) into `store` on `options.workers` threads. `on_ref` sees every
/// successful put as it happens (to clean up a partial attempt); `on_progress` gets the on-disk
/// size of each finished file (the unit of a progress total summed from file sizes; for `.gz`
/// files this is less than the tensor bytes put, which [`IngestReport::bytes`] counts). On the first failure the workers stop taking files and the error is
/// returned; refs already put stay in the store (see [`run_offline_producer`] for cleanup).
pub fn ingest_files(
    store: &FeatureStore,
    files: &[PathBuf],
    options: &IngestOptions,
    on_ref: &(dyn Fn(&SampleRef) + Sync),
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<IngestReport> {
    let files = &files[..options.limit.map_or(files.len(), |l| l.min(files.len()))];
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let results: Mutex<Vec<Option<SampleRef>>> = Mutex::new(vec![None; files.len()]);
    let first_error: Mutex<Option<(usize, Error)>> = Mutex::new(None);
    let total = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for worker in 0..options.workers.max(1).min(files.len().max(1)) {
            let (next, stop, results, first_error, total) = (&next, &stop, &results, &first_error, &total);
            let spawned =
                std::thread::Builder::new().name(format!("ferry-ingest-{worker}")).spawn_scoped(scope, move || {
                    while !stop.load(Ordering::SeqCst) {
                        let index = next.fetch_add(1, Ordering::SeqCst);
                        let Some(path) = files.get(index) else { break };
                        match ingest_one(store, path, index, &options.refs) {
                            Ok(Ingested { r, tensor_bytes, file_bytes }) => {
                                on_ref(&r);
                                on_progress(file_bytes);
                                total.fetch_add(tensor_bytes as usize, Ordering::Relaxed);
                                if let Ok(mut results) = results.lock() {
                                    results[index] = Some(r);
                                }
                            }
                            Err(e) => {
                                stop.store(true, Ordering::SeqCst);
                                let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                                if slot.as_ref().is_none_or(|(i, _)| index < *i) {
                                    *slot = Some((index, e));
                                }
                            }
                        }
                    }
                });
            if let Err(e) = spawned {
                stop.store(true, Ordering::SeqCst);
                *first_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((0, Error::io("spawning an ingest worker", &e)));
            }
        }
    });
    if let Some((_, e)) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let refs = results.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().flatten().collect();
    Ok(IngestReport { refs, bytes: total.load(Ordering::Relaxed) as u64 })
}

/// Why the offline producer failed, and whether this attempt recorded it in `.failed`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProducerError {
    /// The error.
    pub error: Error,
    /// `true` when this attempt wrote `<manifest>.failed` (so it holds this failure's reason).
    /// `false` when the attempt never started (bad input, claim refused: any `.failed` there
    /// belongs to an earlier attempt) or writing `.failed` failed (then `error` says why).
    pub failure_recorded: bool,
}

impl ProducerError {
    fn not_started(error: Error) -> Self {
        ProducerError { error, failure_recorded: false }
    }
}

impl fmt::Display for ProducerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for ProducerError {}

impl From<ProducerError> for Error {
    fn from(e: ProducerError) -> Self {
        e.error
    }
}

/// The offline producer (SpecForge's driver): list the feature files under `input` (none is an
/// error, before anything is claimed), claim the attempt, ingest them, write the manifest, then
/// `.done`.
///
/// On failure: `.failed` first (`"<ExcType>: <message>"`), then abort exactly the refs this
/// attempt published and drain. If `.failed` cannot be written, or cleanup leaves samples
/// behind, the error is [`Error::FailureHandling`] naming the primary error and every later one,
/// and (after cleanup errors) `.failed` is rewritten with that combined reason.
pub fn run_offline_producer(
    store: &FeatureStore,
    input: &Path,
    control: &OfflineControl,
    options: &IngestOptions,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<IngestReport, ProducerError> {
    let files = list_feature_files(input).map_err(ProducerError::not_started)?;
    run_offline_producer_on(store, input, &files, control, options, on_progress)
}

/// [`run_offline_producer`] over `files`, already listed from `input` with
/// [`list_feature_files`] (a caller that sizes a progress bar lists once and passes the list).
pub fn run_offline_producer_on(
    store: &FeatureStore,
    input: &Path,
    files: &[PathBuf],
    control: &OfflineControl,
    options: &IngestOptions,
    on_progress: &(dyn Fn(u64) + Sync),
) -> Result<IngestReport, ProducerError> {
    if files.is_empty() {
        return Err(ProducerError::not_started(Error::InvalidArgument(format!(
            "no feature files under {}: looked for names ending in {}",
            input.display(),
            FEATURE_FILE_SUFFIXES.join(", ")
        ))));
    }
    control.claim_producer().map_err(ProducerError::not_started)?;
    let published: Mutex<Vec<SampleId>> = Mutex::new(Vec::new());
    let track = |r: &SampleRef| published.lock().unwrap_or_else(|p| p.into_inner()).push(r.sample_id.clone());
    let result = ingest_files(store, files, options, &track, on_progress).and_then(|report| {
        write_ref_manifest(&report.refs, control.manifest())?;
        control.mark_done()?;
        Ok(report)
    });
    let primary = match result {
        Ok(report) => return Ok(report),
        Err(primary) => primary,
    };
    // `.failed` before any cleanup; a write error must not skip the cleanup.
    let mut record_error = control.mark_failed(&primary.python_reason()).err();
    let mut failure_recorded = record_error.is_none();
    let published = published.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut cleanup_errors: Vec<String> =
        published.iter().filter_map(|sid| store.abort(sid).err()).map(|e| e.to_string()).collect();
    if let Err(e) = store.drain(DrainPolicy::default()) {
        cleanup_errors.push(e.to_string());
    }
    if record_error.is_none() && cleanup_errors.is_empty() {
        return Err(ProducerError { error: primary, failure_recorded });
    }
    let rewrite = !cleanup_errors.is_empty();
    let mut error = Error::FailureHandling {
        primary: Box::new(primary),
        record_error: record_error.as_ref().map(Error::to_string),
        cleanup_errors,
    };
    if rewrite {
        // The combined reason replaces the primary one, so `.failed` says cleanup was incomplete.
        match control.mark_failed(&error.python_reason()) {
            Ok(()) => failure_recorded = true,
            Err(e) if record_error.is_none() => {
                record_error = Some(e);
                if let Error::FailureHandling { record_error: slot, .. } = &mut error {
                    *slot = record_error.as_ref().map(Error::to_string);
                }
            }
            Err(_) => {} // the first write error is already reported
        }
    }
    Err(ProducerError { error, failure_recorded })
}
