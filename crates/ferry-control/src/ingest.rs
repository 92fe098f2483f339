//! Ingest: copy offline feature files into any store and publish their refs (SpecForge's
//! `ingest_offline_features` and the offline producer driver, `SPECFORGE-RUNTIME.md` §7.3-7.5).
//! Every function takes `&dyn FeatureStoreApi`: a store in this process (`dir://`, `mem://`) or
//! a `ferry serve` daemon through its client.
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
//!
//! Holding ([`Hold::UntilConsumed`], SpecForge's Mooncake path): a store whose bytes live only
//! as long as someone frees them (a daemon's arena) must not be left full once the consumer is
//! done. The producer then waits, after `.done`, for `<manifest>.consumed`, and frees what it
//! published: every tracked ref aborted, then one store-wide drain. A consumer failure
//! (`.consumer_failed`), the hold timeout or a stop request fail the attempt like any other
//! error (`.failed` first, then the same cleanup). Without a hold (a shared directory, whose
//! files persist for any later reader) the producer returns after `.done` and frees nothing.
//!
//! Ownership (a daemon client that owns its puts, `ferry_net::Client::connect_owning`; other
//! stores have nothing to hand over): without a hold, every published ref is disowned
//! ([`FeatureStoreApi::disown`]) right after `.done`, so the samples outlive the producer for
//! any later reader; a disown failure fails the attempt like any error after `.done`. With a
//! hold they stay owned: a producer that dies while holding has them freed by the daemon (the
//! consumer's reads then fail, the right outcome for a dead holding producer), and one that
//! lives aborts them after `.consumed` as above. A producer that dies before `.done` leaves
//! nothing behind either way.

use crate::manifest::write_ref_manifest;
use crate::sentinel::{DEFAULT_POLL, OfflineControl};
use crate::signal::StopSignal;
use ferry_core::{Error, JsonMap, Result, SampleId, SampleRef, TensorView};
use ferry_store::offline::{
    FEATURE_FILE_SUFFIXES, OfflineRefOptions, list_feature_files, offline_sample_id, require_raw_keys,
};
use ferry_store::{DrainPolicy, FeatureStoreApi};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether the offline producer keeps its samples until the consumer is done with them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hold {
    /// Return right after `.done`, freeing nothing: the samples stay for any later reader (a
    /// shared directory's files persist; a daemon's are disowned after `.done`, so they outlive
    /// this process).
    #[default]
    None,
    /// After `.done`, wait for `<manifest>.consumed`, then abort every ref this attempt
    /// published and drain the store once. `.consumer_failed`, the timeout or a stop request
    /// fail the attempt instead (`.failed` first, then the same cleanup). The samples stay
    /// owned by an owning daemon session meanwhile, so they die with this process.
    UntilConsumed {
        /// Give up after this long; `None` waits without bound (SpecForge's default, unless
        /// `DISAGG_PRODUCER_HOLD_S` is set).
        timeout: Option<Duration>,
        /// How often the sentinels are checked.
        poll: Duration,
    },
}

impl Hold {
    /// Holds until consumed, checking every [`DEFAULT_POLL`] (SpecForge's 0.25 s).
    pub fn until_consumed(timeout: Option<Duration>) -> Hold {
        Hold::UntilConsumed { timeout, poll: DEFAULT_POLL }
    }
}

/// What the offline producer reports while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProducerEvent<'a> {
    /// A file was put: its on-disk size (the unit of a progress total summed from file sizes).
    FileIngested {
        /// The file's size on disk.
        bytes: u64,
    },
    /// The manifest and `.done` are written; the producer now holds its samples until this
    /// file (`<manifest>.consumed`) appears.
    Holding {
        /// The path awaited.
        consumed: &'a Path,
    },
}

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
    /// Whether the producer holds its samples until consumed ([`run_offline_producer`] only).
    pub hold: Hold,
    /// Once set, workers take no more files and a hold ends: the attempt fails with an
    /// `Interrupted` error (and is cleaned up as any failure).
    pub stop: Option<Arc<StopSignal>>,
}

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions {
            refs: OfflineRefOptions { run_id: "disagg".into(), ..OfflineRefOptions::default() },
            limit: None,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            hold: Hold::None,
            stop: None,
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
    /// Samples freed after the consumer was done ([`Hold::UntilConsumed`]); 0 without a hold.
    pub cleaned_up: usize,
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
fn ingest_one(store: &dyn FeatureStoreApi, path: &Path, index: usize, options: &OfflineRefOptions) -> Result<Ingested> {
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
    let r = store.put(&sample_id, &views, metadata)?;
    // Progress only: a file that cannot be stat'ed after it was read counts as 0 bytes.
    let file_bytes = std::fs::metadata(path).map_or(0, |m| m.len());
    Ok(Ingested { r, tensor_bytes, file_bytes })
}

/// Ingests `files` (in order) into `store` on `options.workers` threads. `on_ref` sees every
/// successful put as it happens (to clean up a partial attempt); `on_progress` gets the on-disk
/// size of each finished file (the unit of a progress total summed from file sizes; for `.gz`
/// files this is less than the tensor bytes put, which [`IngestReport::bytes`] counts). On the
/// first failure (or once `options.stop` is set) the workers stop taking files and the error is
/// returned; refs already put stay in the store (see [`run_offline_producer`] for cleanup).
pub fn ingest_files(
    store: &dyn FeatureStoreApi,
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
                        let ingested = if options.stop.as_deref().is_some_and(StopSignal::is_set) {
                            Err(interrupted(format!("ingesting {}", path.display())))
                        } else {
                            ingest_one(store, path, index, &options.refs)
                        };
                        match ingested {
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
    Ok(IngestReport { refs, bytes: total.load(Ordering::Relaxed) as u64, cleaned_up: 0 })
}

/// The error of a stop request ([`IngestOptions::stop`]): Python's `InterruptedError`.
fn interrupted(context: String) -> Error {
    Error::io(context, &std::io::Error::new(std::io::ErrorKind::Interrupted, "stop requested"))
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
/// `.done`. `on_event` sees each ingested file and the start of a hold. Without a hold, every
/// published ref is then disowned ([`FeatureStoreApi::disown`]; see the module docs), and a
/// disown failure fails the attempt (`.failed`, then cleanup) like any later error.
///
/// With [`Hold::UntilConsumed`] the producer then waits for `<manifest>.consumed` and frees
/// what it published (each tracked ref aborted, then one store-wide drain);
/// [`IngestReport::cleaned_up`] counts the aborts. If that cleanup fails, the attempt fails
/// (after the consumer succeeded): the error says "offline cleanup did not remove every
/// ingested sample" with each cause, and `.failed` records it.
///
/// On failure (including `.consumer_failed`, the hold timeout and a stop request while
/// holding): `.failed` first (`"<ExcType>: <message>"`), then abort exactly the refs this
/// attempt published and drain. If `.failed` cannot be written, or cleanup leaves samples
/// behind, the error is [`Error::FailureHandling`] naming the primary error and every later one,
/// and (after cleanup errors) `.failed` is rewritten with that combined reason.
pub fn run_offline_producer(
    store: &dyn FeatureStoreApi,
    input: &Path,
    control: &OfflineControl,
    options: &IngestOptions,
    on_event: &(dyn Fn(ProducerEvent<'_>) + Sync),
) -> Result<IngestReport, ProducerError> {
    let files = list_feature_files(input).map_err(ProducerError::not_started)?;
    run_offline_producer_on(store, input, &files, control, options, on_event)
}

/// [`run_offline_producer`] over `files`, already listed from `input` with
/// [`list_feature_files`] (a caller that sizes a progress bar lists once and passes the list).
pub fn run_offline_producer_on(
    store: &dyn FeatureStoreApi,
    input: &Path,
    files: &[PathBuf],
    control: &OfflineControl,
    options: &IngestOptions,
    on_event: &(dyn Fn(ProducerEvent<'_>) + Sync),
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
    let on_progress = |bytes: u64| on_event(ProducerEvent::FileIngested { bytes });
    let result = ingest_files(store, files, options, &track, &on_progress).and_then(|report| {
        write_ref_manifest(&report.refs, control.manifest())?;
        control.mark_done()?;
        if options.hold == Hold::None {
            // Nobody frees these samples for the consumer: they must outlive this process.
            // Disowned after `.done`: a crash before the disown frees them with this process's
            // session (a consumer already reading then fails loudly), never leaves them orphaned.
            let ids: Vec<SampleId> = report.refs.iter().map(|r| r.sample_id.clone()).collect();
            store.disown(&ids)?;
        }
        hold(control, options, on_event)?;
        Ok(report)
    });
    let published = published.into_inner().unwrap_or_else(|p| p.into_inner());
    match result {
        Ok(report) if options.hold == Hold::None => Ok(report),
        Ok(report) => clean_up_consumed(store, control, &published, report),
        Err(primary) => Err(fail_attempt(store, control, &published, primary)),
    }
}

/// With a hold: announces it, then waits for `.consumed` (or `.consumer_failed`, the timeout,
/// a stop request).
fn hold(
    control: &OfflineControl,
    options: &IngestOptions,
    on_event: &(dyn Fn(ProducerEvent<'_>) + Sync),
) -> Result<()> {
    let Hold::UntilConsumed { timeout, poll } = options.hold else { return Ok(()) };
    on_event(ProducerEvent::Holding { consumed: &control.consumed_path() });
    // A timeout too large for the clock waits without bound.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    match options.stop.as_deref() {
        Some(stop) => control.wait_for_consumed_or_stop(deadline, poll, stop),
        None => control.wait_for_consumed(deadline, poll),
    }
}

/// Frees what this attempt published: each tracked ref aborted, then one store-wide drain.
/// Returns how many aborts succeeded and every error.
fn clean_up(store: &dyn FeatureStoreApi, published: &[SampleId]) -> (usize, Vec<String>) {
    let mut aborted = 0;
    let mut errors = Vec::new();
    for sample_id in published {
        match store.abort(sample_id) {
            Ok(()) => aborted += 1,
            Err(e) => errors.push(e.to_string()),
        }
    }
    if let Err(e) = store.drain(DrainPolicy::default()) {
        errors.push(e.to_string());
    }
    (aborted, errors)
}

/// The consumer is done: free the held samples. Cleanup errors fail the attempt, recorded in
/// `.failed` (the consumer already succeeded, so `.done` and `.consumed` stay).
fn clean_up_consumed(
    store: &dyn FeatureStoreApi,
    control: &OfflineControl,
    published: &[SampleId],
    report: IngestReport,
) -> Result<IngestReport, ProducerError> {
    let (cleaned_up, errors) = clean_up(store, published);
    if errors.is_empty() {
        return Ok(IngestReport { cleaned_up, ..report });
    }
    let error = Error::Backend {
        backend: "offline".into(),
        operation: "cleanup".into(),
        key: control.manifest().display().to_string(),
        message: format!("offline cleanup did not remove every ingested sample: {}", errors.join("; ")),
    };
    match control.mark_failed(&error.python_reason()) {
        Ok(()) => Err(ProducerError { error, failure_recorded: true }),
        Err(record) => Err(ProducerError {
            error: Error::FailureHandling {
                primary: Box::new(error),
                record_error: Some(record.to_string()),
                cleanup_errors: Vec::new(),
            },
            failure_recorded: false,
        }),
    }
}

/// The attempt failed with `primary`: `.failed` first, then cleanup, then the combined error.
fn fail_attempt(
    store: &dyn FeatureStoreApi,
    control: &OfflineControl,
    published: &[SampleId],
    primary: Error,
) -> ProducerError {
    // `.failed` before any cleanup; a write error must not skip the cleanup.
    let mut record_error = control.mark_failed(&primary.python_reason()).err();
    let mut failure_recorded = record_error.is_none();
    let (_, cleanup_errors) = clean_up(store, published);
    if record_error.is_none() && cleanup_errors.is_empty() {
        return ProducerError { error: primary, failure_recorded };
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
    ProducerError { error, failure_recorded }
}
