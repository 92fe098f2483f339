//! The lifecycle core: every rule of SpecForge's feature stores (`SPECFORGE-RUNTIME.md` §3-§6),
//! implemented once over any [`ByteBackend`].
//!
//! Rules, each tested against every backend by `tests/lifecycle.rs`:
//! 1. Generations are never reused in a store: a process-wide counter, raised by the backend's
//!    `reserve_generation` (which is monotonic across processes for a shared directory). The
//!    generation is part of every object key, so a stale ref or handle can never alias new bytes.
//! 2. `get` takes a read lease atomically with its checks (freed → use-after-free; older than
//!    the live generation → stale ref). The bytes are read after the shard lock is released.
//! 3. `release` drops one lease; the last lease of the live generation frees it, unless the
//!    store retains on release. A stale handle releases nothing.
//! 4. Freeing is "tombstone, then remove": the generation is tombstoned under the shard lock,
//!    so reads are refused from that instant even while a lazy backend still has the bytes;
//!    the physical removal runs after the lock is released.
//! 5. A removal that fails is parked as release-pending; `gc` retries it (forced once the
//!    attempt bound is reached) and `drain` retries it with forced removals, failing loudly with
//!    the pending ids. Nothing is ever dropped silently.
//! 6. A short read is an error, never an uninitialised tail.
//! 7. Admission against the resident-byte budget is atomic; a refused put changes nothing.
//! 8. Max-hold GC frees abandoned samples but never one whose live generation is leased.
//! 9. `adopt` lets a process that did not write a sample free it; external capture attempts
//!    are tracked so a lost capture response cannot leak its objects.
//! 10. With a shared secret, attaching and every data call present the credential.

mod budget;
mod index;
mod maintenance;
mod ref_fields;
mod report;

pub use report::{DrainPolicy, DrainReport, GcReport, Health};

use crate::auth::{AuthPolicy, Secret};
use crate::backend::{ByteBackend, ObjectData, SampleKey};
use crate::clock::{Clock, SystemClock};
use crate::offline::raw_key;
use budget::Budget;
use ferry_core::{
    BufferPool, DType, Error, FeatureHandle, FeatureSpec, Generation, JsonMap, LeaseToken, Result, SampleId, SampleRef,
    StoreId, TargetRepr, TensorBuf, TensorView,
};
use index::{FreeJob, Index, Live, Origin};
use indexmap::IndexMap;
use ref_fields::RefFields;
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How a store is opened.
#[derive(Clone)]
pub struct StoreOptions {
    /// The store namespace; a random 8-hex id when `None` (as SpecForge does).
    pub store_id: Option<StoreId>,
    /// Resident-byte budget; `None` is unbounded.
    pub max_resident_bytes: Option<u64>,
    /// Free samples older than this on `gc` unless leased; `None` disables max-hold GC.
    pub max_hold_age: Option<Duration>,
    /// Release ends only the read lease; the bytes stay (offline, re-iterable data).
    pub retain_on_release: bool,
    /// Non-forced removal attempts before `gc` forces one.
    pub max_release_attempts: u32,
    /// Who may use the store.
    pub auth: AuthPolicy,
    /// The credential this process presents.
    pub credential: Option<Secret>,
    /// Time source.
    pub clock: Arc<dyn Clock>,
    /// Idle bytes kept to recycle the buffers `get` returns.
    pub output_pool_bytes: u64,
    /// Tombstones of settled frees remembered (bounded memory; see `DESIGN.md`).
    pub max_tombstones: usize,
    /// Debug tap: every successful put is also written to `<dump_dir>/<sample_id>.ckpt` (PyTorch
    /// zip, as SpecForge's dump tap writes).
    /// A dump failure is logged, never raised: the store is authoritative.
    pub dump_dir: Option<std::path::PathBuf>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            store_id: None,
            max_resident_bytes: None,
            max_hold_age: None,
            retain_on_release: false,
            max_release_attempts: 3,
            auth: AuthPolicy::open(),
            credential: None,
            clock: Arc::new(SystemClock),
            output_pool_bytes: 1 << 30,
            max_tombstones: 1 << 20,
            dump_dir: None,
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("store_id", &self.store_id)
            .field("max_resident_bytes", &self.max_resident_bytes)
            .field("max_hold_age", &self.max_hold_age)
            .field("retain_on_release", &self.retain_on_release)
            .field("max_release_attempts", &self.max_release_attempts)
            .field("auth_required", &self.auth.required())
            .finish_non_exhaustive()
    }
}

/// Opened offline files kept between a `describe` and the read that follows: enough for a
/// loader's batch per worker (64 samples) ...
const OPEN_FILE_CACHE_ENTRIES: usize = 256;
/// ... holding at most this many decompressed (`.ckpt.gz`) bytes; mapped files cost nothing.
const OPEN_FILE_CACHE_BYTES: u64 = 2 << 30;

/// A random 8-hex store id.
pub fn random_store_id() -> StoreId {
    StoreId::new(uuid::Uuid::new_v4().simple().to_string()[..8].to_owned())
}

/// A removal that failed and waits for `gc` or `drain`.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    names: Vec<String>,
    accounted: u64,
    attempts: u32,
    last_error: String,
}

#[derive(Debug, Default)]
struct Stats {
    force_freed_total: AtomicU64,
    active_leases: AtomicU64,
    lease_counter: AtomicU64,
}

pub(crate) struct Inner {
    store_id: StoreId,
    backend: Box<dyn ByteBackend>,
    options: StoreOptions,
    index: Index,
    budget: Budget,
    generation: AtomicU64,
    pending: Mutex<IndexMap<(SampleId, Generation), Pending>>,
    provisional: Mutex<IndexMap<(SampleId, Generation), Vec<String>>>,
    output_pool: BufferPool,
    open_files: crate::file_read::OpenFileCache,
    stats: Stats,
}

/// One tensor of a two-phase put ([`FeatureStore::begin_put`]): what the caller will write.
#[derive(Debug, Clone, Copy)]
pub struct TensorLayout<'a> {
    /// Feature name.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Shape, row-major.
    pub shape: &'a [u64],
}

/// A put admitted and given a generation, whose bytes the caller writes into the backend under
/// [`PendingPut::key`] before [`PendingPut::commit`]. Dropping it returns the admitted bytes.
pub struct PendingPut<'s> {
    store: &'s FeatureStore,
    sid: SampleId,
    generation: Generation,
    specs: IndexMap<String, FeatureSpec>,
    names: Vec<String>,
    nbytes: u64,
    metadata: JsonMap,
    /// The ref fields, coerced from the metadata before any byte was written.
    fields: RefFields,
    reservation: budget::Reservation<'s>,
}

impl std::fmt::Debug for PendingPut<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingPut")
            .field("sample_id", &self.sid)
            .field("generation", &self.generation)
            .field("nbytes", &self.nbytes)
            .finish_non_exhaustive()
    }
}

impl PendingPut<'_> {
    /// Where the objects go: the store, the sample and its new generation.
    pub fn key(&self) -> SampleKey<'_> {
        SampleKey { store_id: &self.store.inner.store_id, sample_id: &self.sid, generation: self.generation }
    }

    /// The sample.
    pub fn sample_id(&self) -> &SampleId {
        &self.sid
    }

    /// The generation this put will publish.
    pub fn generation(&self) -> Generation {
        self.generation
    }

    /// Bytes the tensors take.
    pub fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// Publishes the written sample: the ref that addresses it. A live older generation is
    /// superseded (freed) as by [`FeatureStore::put`].
    pub fn commit(self) -> SampleRef {
        let store = self.store;
        store.commit_put(self, true)
    }
}

/// A feature store: the lifecycle core over one byte backend. Cheap to clone; clones share
/// state. All methods take `&self` and are safe to call from many threads.
#[derive(Clone)]
pub struct FeatureStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for FeatureStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FeatureStore")
            .field("store_id", &self.inner.store_id)
            .field("backend", &self.inner.backend.kind())
            .finish_non_exhaustive()
    }
}

/// One tensor to read: the backend object name, its size by the ref's spec, and where its
/// bytes go (the whole object, or a prefix of it for [`FeatureStore::get_prefix_into`]).
struct ReadItem<'a> {
    object: &'a str,
    /// The object's size by the ref's spec; `None` for a lazy `file://` ref, whose file is the
    /// only description (its size is then checked against the buffer).
    expected: Option<u64>,
    dst: &'a mut [u8],
}

/// Checks that an object holds exactly the bytes its spec says: fewer is a short read, more
/// means the ref does not describe the object.
fn check_object_len(what: impl FnOnce() -> String, held: u64, expected: u64) -> Result<()> {
    if held < expected {
        return Err(Error::ShortRead { key: what(), got: held, expected });
    }
    if held > expected {
        return Err(Error::Corrupt {
            what: what(),
            message: format!("holds {held} bytes but the ref's spec needs {expected}; the ref does not describe it"),
        });
    }
    Ok(())
}

/// Checks a caller's buffer for a feature of `need` bytes: exactly its size, or for a prefix
/// read at most its size.
fn check_buffer_len(r: &SampleRef, name: &str, len: u64, need: u64, prefix: bool) -> Result<()> {
    if len > need || (len < need && !prefix) {
        return Err(Error::InvalidArgument(format!(
            "get_into: buffer for feature {name:?} of sample {} is {len} bytes; its spec needs {}{need}",
            r.sample_id,
            if prefix { "at most " } else { "" }
        )));
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Guarded maps are updated by single insert/remove calls; a poisoned lock is consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FeatureStore {
    /// Attaches to `backend`. With a secret configured, the credential is checked first.
    pub fn open(backend: impl ByteBackend, options: StoreOptions) -> Result<FeatureStore> {
        Self::open_boxed(Box::new(backend), options)
    }

    /// [`FeatureStore::open`] for an already boxed backend.
    pub fn open_boxed(backend: Box<dyn ByteBackend>, options: StoreOptions) -> Result<FeatureStore> {
        options.auth.check(options.credential.as_ref(), "feature store attach")?;
        if options.max_release_attempts < 1 {
            return Err(Error::InvalidArgument("max_release_attempts must be >= 1".into()));
        }
        let store_id = options.store_id.clone().unwrap_or_else(random_store_id);
        Ok(FeatureStore {
            inner: Arc::new(Inner {
                store_id,
                backend,
                index: Index::new(options.max_tombstones),
                budget: Budget::new(options.max_resident_bytes),
                generation: AtomicU64::new(0),
                pending: Mutex::new(IndexMap::new()),
                provisional: Mutex::new(IndexMap::new()),
                output_pool: BufferPool::new(options.output_pool_bytes),
                open_files: crate::file_read::OpenFileCache::new(OPEN_FILE_CACHE_ENTRIES, OPEN_FILE_CACHE_BYTES),
                stats: Stats::default(),
                options,
            }),
        })
    }

    /// The store id.
    pub fn store_id(&self) -> &StoreId {
        &self.inner.store_id
    }

    /// The backend kind.
    pub fn backend_kind(&self) -> &'static str {
        self.inner.backend.kind()
    }

    /// Whether release keeps the bytes.
    pub fn retains_on_release(&self) -> bool {
        self.inner.options.retain_on_release
    }

    fn check_auth(&self, op: &str) -> Result<()> {
        self.inner.options.auth.check(self.inner.options.credential.as_ref(), op)
    }

    fn now(&self) -> Instant {
        self.inner.options.clock.now()
    }

    // ------------------------------------------------------------------ put

    /// Stores one sample's tensors and returns the ref that addresses them. Reads straight from
    /// the caller's buffers. A full store refuses at once; see [`FeatureStore::put_until`].
    pub fn put(
        &self,
        sample_id: impl Into<SampleId>,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
    ) -> Result<SampleRef> {
        self.put_inner(sample_id.into(), tensors, metadata, None)
    }

    /// [`FeatureStore::put`], waiting until `deadline` for room in the budget (nothing is ever
    /// evicted to make room); then fails with [`Error::OverBudget`] naming the budget.
    pub fn put_until(
        &self,
        sample_id: impl Into<SampleId>,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        deadline: Instant,
    ) -> Result<SampleRef> {
        self.put_inner(sample_id.into(), tensors, metadata, Some(deadline))
    }

    fn put_inner(
        &self,
        sid: SampleId,
        tensors: &[(&str, TensorView<'_>)],
        metadata: JsonMap,
        deadline: Option<Instant>,
    ) -> Result<SampleRef> {
        let layout: Vec<TensorLayout<'_>> =
            tensors.iter().map(|(name, t)| TensorLayout { name, dtype: t.dtype(), shape: t.shape() }).collect();
        let pending = self.begin_put(sid, &layout, metadata, deadline)?;
        let objects: Vec<ObjectData<'_>> =
            tensors.iter().map(|(name, tensor)| ObjectData { name, tensor: *tensor }).collect();
        self.inner.backend.write(pending.key(), &objects)?; // on error the reservation is returned
        self.dump(&pending.sid, &objects);
        Ok(self.commit_put(pending, false))
    }

    /// The debug tap: writes the put's objects to `<dump_dir>/<sample_id>.ckpt`. A failure is
    /// logged, never raised: the store is authoritative.
    fn dump(&self, sid: &SampleId, objects: &[ObjectData<'_>]) {
        let Some(dir) = &self.inner.options.dump_dir else { return };
        // The sample id must be one path component: `..` or `/` must not escape `dir`.
        let dumped = crate::dir::validate_path_component("sample id", sid.as_str()).and_then(|()| {
            let path = dir.join(format!("{sid}.ckpt"));
            crate::dir::write_sample_file(&path, crate::dir::DirFormat::TorchZip, objects)
        });
        if let Err(e) = dumped {
            tracing::warn!(dir = %dir.display(), sample = %sid, error = %e, "feature dump failed; the put stands");
        }
    }

    /// The dump tap for a put the caller wrote itself: its bytes are read back from the
    /// backend (only when the tap is on).
    fn dump_written(&self, pending: &PendingPut<'_>) {
        if self.inner.options.dump_dir.is_none() {
            return;
        }
        let read_back = (|| {
            let mut bufs = Vec::with_capacity(pending.names.len());
            for name in &pending.names {
                let spec = pending
                    .specs
                    .get(name)
                    .ok_or_else(|| Error::NotFound { what: format!("feature {name:?} of sample {}", pending.sid) })?;
                let mut buf = vec![0u8; usize::try_from(spec.nbytes()?).unwrap_or(0)];
                self.inner.backend.read_into(pending.key().object(name), &mut buf)?;
                bufs.push((name.as_str(), spec.dtype()?, spec.shape.clone(), buf));
            }
            Ok::<_, Error>(bufs)
        })();
        match read_back {
            Ok(bufs) => {
                let views: Result<Vec<ObjectData<'_>>> = bufs
                    .iter()
                    .map(|(name, dtype, shape, buf)| {
                        Ok(ObjectData { name, tensor: TensorView::new(*dtype, shape, buf)? })
                    })
                    .collect();
                match views {
                    Ok(views) => self.dump(&pending.sid, &views),
                    Err(e) => tracing::warn!(sample = %pending.sid, error = %e, "feature dump failed; the put stands"),
                }
            }
            Err(e) => tracing::warn!(sample = %pending.sid, error = %e, "feature dump failed; the put stands"),
        }
    }

    /// Starts a put whose bytes the caller writes into the backend itself (the daemon's
    /// shared-memory route, where a client writes straight into a reserved arena region, and its
    /// TCP route, which reads the socket straight into that region). Checks the credential and
    /// the tensors, admits the bytes against the budget (waiting until `deadline`, if any) and
    /// picks the generation. Write every object under [`PendingPut::key`], then
    /// [`PendingPut::commit`]; dropping it instead returns the admitted bytes (the caller removes
    /// whatever it wrote).
    pub fn begin_put(
        &self,
        sid: SampleId,
        layout: &[TensorLayout<'_>],
        mut metadata: JsonMap,
        deadline: Option<Instant>,
    ) -> Result<PendingPut<'_>> {
        self.check_auth("put")?;
        validate_put(&sid, layout)?;
        let fields = RefFields::take(&mut metadata)?;
        let mut nbytes = 0u64;
        for t in layout {
            let n = t.dtype.nbytes_of(t.shape).ok_or_else(|| {
                Error::InvalidArgument(format!("feature {:?} has shape {:?}, whose size overflows", t.name, t.shape))
            })?;
            nbytes = nbytes.checked_add(n).ok_or_else(|| Error::InvalidArgument("put size overflows".into()))?;
        }
        let specs = build_specs(layout, &metadata)?;
        let reservation = self.inner.budget.admit(self.inner.store_id.as_str(), nbytes, deadline)?;
        let generation = self.next_generation(&sid)?;
        Ok(PendingPut {
            store: self,
            names: layout.iter().map(|t| t.name.to_owned()).collect(),
            sid,
            generation,
            specs,
            nbytes,
            metadata,
            fields,
            reservation,
        })
    }

    /// Publishes a written put in the index (see [`FeatureStore::begin_put`]); `tap` runs the
    /// dump tap on the written bytes.
    fn commit_put(&self, pending: PendingPut<'_>, tap: bool) -> SampleRef {
        if tap {
            self.dump_written(&pending);
        }
        let PendingPut { sid, generation, specs, names, nbytes, metadata, fields, reservation, .. } = pending;
        let mut jobs = Vec::new();
        let mut counted_twice = 0;
        {
            let mut shard = self.inner.index.lock(&sid);
            let entry = shard.entry(sid.clone()).or_default();
            reservation.commit();
            if entry.live.as_ref().is_some_and(|l| l.generation > generation) {
                // A concurrent put of the same sample took a newer generation and committed
                // first: it stays live, and ours is superseded at once.
                entry.freed.insert(generation, index::Tomb::Removing);
                jobs.push(FreeJob { sample_id: sid.clone(), generation, names, accounted: nbytes });
            } else if entry.freed.contains_key(&generation) {
                // An abort found our objects in the backend while we wrote and freed them: the
                // abort wins. Its removal accounted nothing, so ours (idempotent) returns the
                // bytes just committed.
                jobs.push(FreeJob { sample_id: sid.clone(), generation, names, accounted: nbytes });
            } else if let Some(live) = entry.live.as_mut().filter(|l| l.generation == generation) {
                // A get of the latest generation (or an adopt) registered ours before this
                // commit: it is ours, not a superseded generation.
                counted_twice = std::mem::replace(&mut live.accounted, nbytes);
                live.origin = Origin::Put;
                live.names = names;
            } else {
                jobs.extend(FreeJob::take_live(&sid, entry)); // the superseded generation
                entry.live =
                    Some(Live { generation, names, accounted: nbytes, since: self.now(), origin: Origin::Put });
            }
        }
        self.inner.budget.release(counted_twice);
        for job in jobs {
            self.run_free(job, false);
        }
        self.build_ref(sid, generation, specs, nbytes, metadata, fields)
    }

    fn next_generation(&self, sid: &SampleId) -> Result<Generation> {
        let proposed = Generation::new(self.inner.generation.fetch_add(1, Ordering::SeqCst) + 1);
        let generation = self.inner.backend.reserve_generation(&self.inner.store_id, sid, proposed)?;
        self.inner.generation.fetch_max(generation.get(), Ordering::SeqCst);
        Ok(generation)
    }

    fn build_ref(
        &self,
        sid: SampleId,
        generation: Generation,
        specs: IndexMap<String, FeatureSpec>,
        nbytes: u64,
        mut metadata: JsonMap,
        fields: RefFields,
    ) -> SampleRef {
        let feature_keys = specs.keys().map(|k| (k.clone(), format!("{sid}/{k}"))).collect();
        metadata.insert("generation".into(), Value::from(generation.get()));
        SampleRef {
            feature_store_uri: self.inner.backend.ref_uri(&self.inner.store_id, &sid, generation),
            run_id: fields.run_id,
            source_task_id: fields.source_task_id,
            feature_keys,
            feature_specs: specs,
            strategy: fields.strategy,
            schema_version: fields.schema_version,
            target_model_version: fields.target_model_version,
            draft_weight_version: fields.draft_weight_version,
            tokenizer_version: fields.tokenizer_version,
            num_tokens: fields.num_tokens,
            estimated_bytes: nbytes as i64,
            metadata,
            sample_id: sid,
        }
    }

    // ------------------------------------------------------------------ get

    /// Reads a sample's features (all of `ref.feature_keys`, or `names`) into fresh aligned
    /// buffers (recycled from this store's output pool), and takes a read lease.
    pub fn get(&self, r: &SampleRef, names: Option<&[&str]>) -> Result<(IndexMap<String, TensorBuf>, FeatureHandle)> {
        let specs = self.specs_for(r)?;
        let wanted: Vec<&str> = match names {
            Some(n) => n.to_vec(),
            None => r.feature_keys.keys().map(String::as_str).collect(),
        };
        let mut bufs = Vec::with_capacity(wanted.len());
        for name in &wanted {
            let spec = spec_of(&specs, r, name)?;
            let len = usize::try_from(spec.nbytes()?)
                .map_err(|_| Error::InvalidArgument(format!("feature {name} too large")))?;
            let buf = self.inner.output_pool.try_take(len).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "cannot allocate {len} bytes for feature {name:?} of sample {} (shape {:?}); the ref's spec is wrong or memory is exhausted",
                    r.sample_id, spec.shape
                ))
            })?;
            bufs.push((spec, buf));
        }
        let handle = {
            let mut items = Vec::with_capacity(wanted.len());
            for (name, (_, buf)) in wanted.iter().zip(bufs.iter_mut()) {
                let expected = buf.len() as u64;
                let object = raw_key(key_of(r, name)?);
                items.push(ReadItem { object, expected: Some(expected), dst: buf.as_mut_slice() });
            }
            self.read(r, &mut items)?
        };
        let mut out = IndexMap::with_capacity(wanted.len());
        for (name, (spec, buf)) in wanted.iter().zip(bufs) {
            out.insert((*name).to_owned(), TensorBuf::new(spec.dtype()?, spec.shape.clone(), buf)?);
        }
        Ok((out, handle))
    }

    /// Reads the named features straight into the caller's buffers (no intermediate copy) and
    /// takes a read lease. Each buffer must be exactly the feature's byte size.
    pub fn get_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        self.get_into_impl(r, dsts, false)
    }

    /// Like [`FeatureStore::get_into`], but each buffer may be shorter than its feature: it
    /// receives the feature's first bytes (a loader cutting sequences to `max_len` reads only the
    /// tokens it keeps). The objects' full sizes are still checked against the specs.
    pub fn get_prefix_into(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])]) -> Result<FeatureHandle> {
        self.get_into_impl(r, dsts, true)
    }

    fn get_into_impl(&self, r: &SampleRef, dsts: &mut [(&str, &mut [u8])], prefix: bool) -> Result<FeatureHandle> {
        // A lazy file:// ref has no specs: its file describes it, and the read checks the
        // buffers against the file directly (one open, no spec map built).
        let lazy_file = r.feature_specs.is_empty() && is_file_ref(r);
        let mut items = Vec::with_capacity(dsts.len());
        for (name, dst) in dsts.iter_mut() {
            let object = raw_key(key_of(r, name)?);
            let expected = if lazy_file {
                None
            } else {
                let need = spec_of(&r.feature_specs, r, name)?.nbytes()?;
                check_buffer_len(r, name, dst.len() as u64, need, prefix)?;
                Some(need)
            };
            items.push(ReadItem { object, expected, dst });
        }
        if lazy_file { self.read_file_ref(r, &mut items, prefix) } else { self.read(r, &mut items) }
    }

    /// The ref's specs, or a lazy `file://` ref's specs read from its file's header.
    /// The file stays in the store's small open-file cache, so the read that follows (or a
    /// loader's `describe` then `get_into`) opens and parses it once.
    fn specs_for<'r>(&self, r: &'r SampleRef) -> Result<Cow<'r, IndexMap<String, FeatureSpec>>> {
        if r.feature_specs.is_empty() && is_file_ref(r) {
            let path = crate::offline::file_ref_path(r)?;
            let file = self.inner.open_files.open(&path, true)?;
            return Ok(Cow::Owned(crate::offline::file_ref_specs_in(r, &path, &file)?));
        }
        Ok(Cow::Borrowed(&r.feature_specs))
    }

    /// Reads the items: from an offline file for `file://` refs, else through the lifecycle.
    fn read(&self, r: &SampleRef, items: &mut [ReadItem<'_>]) -> Result<FeatureHandle> {
        if is_file_ref(r) { self.read_file_ref(r, items, false) } else { self.read_leased(r, items) }
    }

    /// Reads a `file://` ref (read-only offline data): one copy from the mapped (or, for `.gz`,
    /// decompressed) file into each buffer. Nothing is tracked: release is a no-op, so the files
    /// stay for later epochs.
    fn read_file_ref(&self, r: &SampleRef, items: &mut [ReadItem<'_>], prefix: bool) -> Result<FeatureHandle> {
        self.check_auth("get")?;
        let path = crate::offline::file_ref_path(r)?;
        let file = self.inner.open_files.open(&path, false)?;
        if items.iter().any(|i| i.expected.is_none()) {
            crate::offline::require_raw_keys(&file, &path, Some(r.sample_id.as_str()), items.iter().map(|i| i.object))?;
        }
        for item in items.iter_mut() {
            let what = || format!("{}:{}", path.display(), item.object);
            match item.expected {
                Some(expected) => {
                    let held = crate::file_read::copy_tensor_prefix(&file, item.object, item.dst)?;
                    check_object_len(what, held, expected)?;
                }
                None => {
                    let held = file.spec(item.object)?.nbytes()?;
                    check_buffer_len(r, item.object, item.dst.len() as u64, held, prefix)?;
                    crate::file_read::copy_tensor_prefix(&file, item.object, item.dst)?;
                }
            }
        }
        let n = self.inner.stats.lease_counter.fetch_add(1, Ordering::Relaxed);
        Ok(FeatureHandle {
            sample_id: r.sample_id.clone(),
            generation: Generation::UNTRACKED,
            lease_token: LeaseToken::new(format!("{}:0:{n}", r.sample_id)),
        })
    }

    fn check_ref_is_ours(&self, r: &SampleRef) -> Result<()> {
        let expected = self.inner.backend.ref_uri(&self.inner.store_id, &r.sample_id, Generation::UNTRACKED);
        let prefix = |uri: &str| -> String {
            // scheme://store_id/
            let (scheme, rest) = uri.split_once("://").unwrap_or(("", uri));
            format!("{scheme}://{}/", rest.split('/').next().unwrap_or(""))
        };
        if !r.feature_store_uri.starts_with(&prefix(&expected)) {
            return Err(Error::InvalidArgument(format!(
                "ref for sample {} points at {:?}, not at this store ({}); open the store it names",
                r.sample_id,
                r.feature_store_uri,
                prefix(&expected)
            )));
        }
        Ok(())
    }

    fn read_leased(&self, r: &SampleRef, items: &mut [ReadItem<'_>]) -> Result<FeatureHandle> {
        if items.is_empty() {
            return Err(Error::InvalidArgument(format!("get of sample {} names no features", r.sample_id)));
        }
        let backend = &self.inner.backend;
        let ((), handle) = self.lease_with(r, |key| {
            let expected: Vec<Option<u64>> = items.iter().map(|i| i.expected).collect();
            let mut reads: Vec<(&str, &mut [u8])> = items.iter_mut().map(|i| (i.object, &mut *i.dst)).collect();
            let held = backend.read_many(key, &mut reads)?;
            reads.iter().zip(held).zip(expected).try_for_each(|(((object, _), held), expected)| {
                let expected =
                    expected.ok_or_else(|| Error::InvalidArgument(format!("read of {object} without a spec")))?;
                check_object_len(|| key.object(object).to_string(), held as u64, expected)
            })
        })?;
        Ok(handle)
    }

    /// Takes a read lease on the ref's generation with every check `get` makes (credential,
    /// the ref names this store, use-after-free, stale ref) and runs `access` on the sample's
    /// backend key while the lease is held: the daemon uses it to locate and pin the bytes of a
    /// shared-memory read, or to send them down a socket without a copy. If `access` fails the
    /// lease is returned and nothing is freed (a read that finds the bytes gone makes the store
    /// forget them).
    pub fn lease_with<T>(
        &self,
        r: &SampleRef,
        access: impl FnOnce(SampleKey<'_>) -> Result<T>,
    ) -> Result<(T, FeatureHandle)> {
        self.check_auth("get")?;
        self.check_ref_is_ours(r)?;
        let sid = &r.sample_id;
        let generation = match r.generation() {
            Some(g) => g,
            None => self.inner.backend.latest_generation(&self.inner.store_id, sid)?.ok_or_else(|| {
                Error::NotFound { what: format!("sample {sid:?} (ref has no generation and the backend holds none)") }
            })?,
        };
        let handle = self.acquire_lease(sid, generation)?;
        let key = SampleKey { store_id: &self.inner.store_id, sample_id: sid, generation };
        match access(key) {
            Ok(value) => {
                self.observe(r, generation);
                Ok((value, handle))
            }
            Err(e) => {
                // A failed read returns its lease without freeing anything: bad input never
                // loses data. If the bytes vanished (another process freed them), forget them.
                self.unlease(&handle);
                if matches!(e, Error::NotFound { .. }) {
                    self.forget_if_vanished(sid, generation);
                }
                Err(e)
            }
        }
    }

    fn acquire_lease(&self, sid: &SampleId, generation: Generation) -> Result<FeatureHandle> {
        let mut shard = self.inner.index.lock(sid);
        let entry = shard.entry(sid.clone()).or_default();
        let refuse = if entry.freed.contains_key(&generation) {
            Some(Error::UseAfterFree { sample_id: sid.to_string(), generation: generation.get() })
        } else {
            match &entry.live {
                Some(live) if generation < live.generation => Some(Error::StaleRef {
                    sample_id: sid.to_string(),
                    ref_generation: generation.get(),
                    current_generation: live.generation.get(),
                }),
                _ => None,
            }
        };
        if let Some(err) = refuse {
            if entry.is_empty() {
                shard.remove(sid);
            }
            return Err(err);
        }
        let n = self.inner.stats.lease_counter.fetch_add(1, Ordering::Relaxed);
        let token = LeaseToken::new(format!("{sid}:{generation}:{n}"));
        entry.leases.insert(token.clone(), generation);
        self.inner.stats.active_leases.fetch_add(1, Ordering::Relaxed);
        Ok(FeatureHandle { sample_id: sid.clone(), generation, lease_token: token })
    }

    /// Records a generation another process wrote, after reading it, so a consume-once release
    /// here can free it.
    fn observe(&self, r: &SampleRef, generation: Generation) {
        let sid = &r.sample_id;
        let job = {
            let mut shard = self.inner.index.lock(sid);
            let Some(entry) = shard.get_mut(sid) else { return };
            if entry.freed.contains_key(&generation) || entry.live.as_ref().is_some_and(|l| l.generation >= generation)
            {
                return;
            }
            // A newer generation than the one this store knew (another process re-put the
            // sample): the older one is superseded, exactly as by a re-put here.
            let job = FreeJob::take_live(sid, entry);
            entry.live = Some(Live {
                generation,
                names: r.feature_keys.values().map(|k| raw_key(k).to_owned()).collect(),
                accounted: 0,
                since: self.now(),
                origin: Origin::Observed,
            });
            job
        };
        if let Some(job) = job {
            self.run_free(job, false);
        }
    }

    /// Drops a lease without freeing.
    fn unlease(&self, handle: &FeatureHandle) {
        let sid = &handle.sample_id;
        let mut shard = self.inner.index.lock(sid);
        let Some(entry) = shard.get_mut(sid) else { return };
        if entry.leases.remove(&handle.lease_token).is_some() {
            self.inner.stats.active_leases.fetch_sub(1, Ordering::Relaxed);
        }
        if entry.is_empty() {
            shard.remove(sid);
        }
    }

    /// Forgets an unleased live generation whose objects are all gone from the backend (another
    /// process consumed or aborted it). Probes the names this store recorded, never the ref's,
    /// so a bad ref cannot make the store forget bytes that still exist.
    fn forget_if_vanished(&self, sid: &SampleId, generation: Generation) {
        let names = {
            let shard = self.inner.index.lock(sid);
            match shard.get(sid).and_then(|e| e.live.as_ref().filter(|_| !e.leased(generation))) {
                Some(live) if live.generation == generation => live.names.clone(),
                _ => return,
            }
        };
        let key = SampleKey { store_id: &self.inner.store_id, sample_id: sid, generation };
        if !names.iter().all(|n| matches!(self.inner.backend.exists(key.object(n)), Ok(false))) {
            return;
        }
        let released = {
            let mut shard = self.inner.index.lock(sid);
            let Some(entry) = shard.get_mut(sid) else { return };
            let vanished = entry.live.as_ref().is_some_and(|l| l.generation == generation) && !entry.leased(generation);
            let released = if vanished { entry.live.take().map_or(0, |l| l.accounted) } else { 0 };
            if entry.is_empty() {
                shard.remove(sid);
            }
            released
        };
        self.inner.budget.release(released);
    }

    // ------------------------------------------------------------------ release / abort

    /// Drops one read lease. The last lease of the live generation frees the sample unless the
    /// store retains on release. Idempotent; a stale or unknown handle is a no-op. A removal
    /// that fails is parked for `gc`/`drain`, never lost.
    pub fn release(&self, handle: &FeatureHandle) -> Result<()> {
        self.check_auth("release")?;
        let sid = &handle.sample_id;
        let job = {
            let mut shard = self.inner.index.lock(sid);
            let Some(entry) = shard.get_mut(sid) else { return Ok(()) };
            let Some(generation) = entry.leases.remove(&handle.lease_token) else { return Ok(()) };
            self.inner.stats.active_leases.fetch_sub(1, Ordering::Relaxed);
            let job = if self.inner.options.retain_on_release
                || entry.live.as_ref().is_none_or(|l| l.generation != generation)
                || entry.leased(generation)
            {
                None
            } else {
                FreeJob::take_live(sid, entry)
            };
            if entry.is_empty() {
                shard.remove(sid);
            }
            job
        };
        if let Some(job) = job {
            self.run_free(job, false);
        }
        Ok(())
    }

    /// Frees a sample now, whatever its leases (failed put, terminal drop, durable ack). Not
    /// blocked by `retain_on_release`. A sample this process never tracked is looked up in the
    /// backend (so a shared directory's files go too). Idempotent.
    pub fn abort(&self, sample_id: &SampleId) -> Result<()> {
        self.check_auth("abort")?;
        let job = {
            let mut shard = self.inner.index.lock(sample_id);
            self.take_for_abort(&mut shard, sample_id)
        };
        let job = match job {
            Some(job) => Some(job),
            None => self.untracked_job(sample_id)?,
        };
        if let Some(job) = job {
            self.run_free(job, false);
        }
        Ok(())
    }

    /// [`FeatureStore::abort`] of one generation: frees the sample (its leases dropped, a
    /// failed removal parked as pending) only while `generation` is still its live generation
    /// in this store's index, and returns whether it did. A sample freed meanwhile, superseded
    /// by a newer put of the same id, or never tracked is left alone: an owner freeing what it
    /// put (a daemon ending a session) never frees someone else's newer sample.
    pub fn abort_generation(&self, sample_id: &SampleId, generation: Generation) -> Result<bool> {
        self.check_auth("abort")?;
        let job = {
            let mut shard = self.inner.index.lock(sample_id);
            let live = shard.get(sample_id).and_then(|e| e.live.as_ref()).map(|l| l.generation);
            if live != Some(generation) {
                return Ok(false);
            }
            self.take_for_abort(&mut shard, sample_id)
        };
        if let Some(job) = job {
            self.run_free(job, false);
        }
        Ok(true)
    }

    /// Under the shard lock: drops every lease of the sample and tombstones its live
    /// generation; returns the removal to run once the lock is released.
    fn take_for_abort(&self, shard: &mut index::Shard, sample_id: &SampleId) -> Option<FreeJob> {
        let entry = shard.get_mut(sample_id)?;
        let dropped = entry.leases.len() as u64;
        entry.leases.clear();
        self.inner.stats.active_leases.fetch_sub(dropped, Ordering::Relaxed);
        let job = FreeJob::take_live(sample_id, entry);
        if entry.is_empty() {
            shard.remove(sample_id);
        }
        job
    }

    /// The live generation of a sample this store tracks (put, adopted, or read through it),
    /// if any: `None` once it is freed, and for a sample it never tracked. An index lookup, no
    /// backend I/O.
    pub fn live_generation(&self, sample_id: &SampleId) -> Option<Generation> {
        let shard = self.inner.index.lock(sample_id);
        shard.get(sample_id).and_then(|e| e.live.as_ref()).map(|l| l.generation)
    }

    /// A free job for a sample this process does not track but the backend holds.
    fn untracked_job(&self, sid: &SampleId) -> Result<Option<FreeJob>> {
        let Some(generation) = self.inner.backend.latest_generation(&self.inner.store_id, sid)? else {
            return Ok(None);
        };
        let key = SampleKey { store_id: &self.inner.store_id, sample_id: sid, generation };
        let names = self.inner.backend.object_names(key)?.unwrap_or_default();
        let mut shard = self.inner.index.lock(sid);
        let entry = shard.entry(sid.clone()).or_default();
        if entry.freed.contains_key(&generation) || entry.live.is_some() {
            return Ok(None); // someone else decided meanwhile
        }
        entry.freed.insert(generation, index::Tomb::Removing);
        Ok(Some(FreeJob { sample_id: sid.clone(), generation, names, accounted: 0 }))
    }

    /// Frees every sample this store tracks; returns how many.
    pub fn abort_all(&self) -> Result<usize> {
        let mut ids = Vec::new();
        self.inner.index.for_each_shard(|shard| {
            ids.extend(shard.iter().filter(|(_, e)| e.live.is_some()).map(|(sid, _)| sid.clone()));
        });
        for sid in &ids {
            self.abort(sid)?;
        }
        Ok(ids.len())
    }

    /// Runs one physical removal decided earlier; a failure parks it as pending.
    fn run_free(&self, job: FreeJob, force: bool) -> bool {
        let key = SampleKey { store_id: &self.inner.store_id, sample_id: &job.sample_id, generation: job.generation };
        match self.inner.backend.remove(key, &job.names, force) {
            Ok(_) => {
                self.settle(&job.sample_id, job.generation, job.accounted);
                true
            }
            Err(e) => {
                tracing::warn!(store = %self.inner.store_id, sample = %job.sample_id, generation = %job.generation, error = %e, "removal failed; parked as release-pending");
                lock(&self.inner.pending).insert(
                    (job.sample_id, job.generation),
                    Pending { names: job.names, accounted: job.accounted, attempts: 0, last_error: e.to_string() },
                );
                false
            }
        }
    }

    fn settle(&self, sid: &SampleId, generation: Generation, accounted: u64) {
        self.inner.index.settle(sid, generation);
        self.inner.budget.release(accounted);
    }

    // ------------------------------------------------------------------ adopt / external

    /// Registers a sample written elsewhere (a capture server, another rank) so this store can
    /// free it with `release`, `abort` or `gc`. The ref must carry its generation.
    pub fn adopt(&self, r: &SampleRef) -> Result<()> {
        self.check_auth("adopt")?;
        let generation = r.generation().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "adopt of sample {} needs metadata.generation (or a generation= URI); this ref has none",
                r.sample_id
            ))
        })?;
        let sid = &r.sample_id;
        let bytes = u64::try_from(r.estimated_bytes).unwrap_or(0);
        let names: Vec<String> = r.feature_keys.values().map(|k| raw_key(k).to_owned()).collect();
        let (job, added) = {
            let mut shard = self.inner.index.lock(sid);
            let entry = shard.entry(sid.clone()).or_default();
            if entry.freed.contains_key(&generation) {
                return Err(Error::UseAfterFree { sample_id: sid.to_string(), generation: generation.get() });
            }
            match &mut entry.live {
                Some(live) if live.generation > generation => {
                    return Err(Error::StaleRef {
                        sample_id: sid.to_string(),
                        ref_generation: generation.get(),
                        current_generation: live.generation.get(),
                    });
                }
                Some(live) if live.generation == generation => {
                    let added = if live.origin == Origin::Observed { bytes } else { 0 };
                    if live.origin == Origin::Observed {
                        live.origin = Origin::Adopted;
                        live.accounted = bytes;
                    }
                    (None, added)
                }
                _ => {
                    let job = FreeJob::take_live(sid, entry);
                    entry.live =
                        Some(Live { generation, names, accounted: bytes, since: self.now(), origin: Origin::Adopted });
                    (job, bytes)
                }
            }
        };
        self.inner.budget.add_resident(added);
        lock(&self.inner.provisional).shift_remove(&(sid.clone(), generation));
        if let Some(job) = job {
            self.run_free(job, false);
        }
        Ok(())
    }

    /// Records that an external writer may have written these objects (a capture request whose
    /// response may be lost), so [`FeatureStore::discard_external_attempts`] can reclaim them.
    pub fn track_external_attempt(
        &self,
        sample_id: &SampleId,
        generation: Generation,
        feature_names: &[&str],
    ) -> Result<()> {
        let mut names: Vec<String> = Vec::new();
        for n in feature_names {
            if !names.iter().any(|m| m == n) {
                names.push((*n).to_owned());
            }
        }
        if names.is_empty() {
            return Err(Error::InvalidArgument(format!("external attempt for {sample_id} names no features")));
        }
        lock(&self.inner.provisional).insert((sample_id.clone(), generation), names);
        Ok(())
    }

    /// Frees every external attempt that was never adopted; returns how many were discarded.
    /// An attempt whose sample is tracked at another generation is left alone and reported.
    pub fn discard_external_attempts(&self) -> Result<usize> {
        let attempts: Vec<_> = lock(&self.inner.provisional).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut errors = Vec::new();
        let mut discarded = 0;
        for ((sid, generation), names) in attempts {
            let job = {
                let mut shard = self.inner.index.lock(&sid);
                let entry = shard.entry(sid.clone()).or_default();
                match &entry.live {
                    Some(live) if live.generation != generation => {
                        errors.push(format!("{sid}: tracked at generation {} not {generation}", live.generation));
                        continue;
                    }
                    Some(_) => FreeJob::take_live(&sid, entry),
                    None if entry.freed.contains_key(&generation) => None,
                    None => {
                        entry.freed.insert(generation, index::Tomb::Removing);
                        Some(FreeJob { sample_id: sid.clone(), generation, names, accounted: 0 })
                    }
                }
            };
            if let Some(job) = job
                && !self.run_free(job, false)
            {
                errors.push(format!("{sid}: removal failed (pending)"));
                continue;
            }
            lock(&self.inner.provisional).shift_remove(&(sid, generation));
            discarded += 1;
        }
        if !errors.is_empty() {
            return Err(Error::Backend {
                backend: self.inner.backend.kind().into(),
                operation: "discard external attempts".into(),
                key: self.inner.store_id.to_string(),
                message: format!("could not discard all provisional external captures: {}", errors.join("; ")),
            });
        }
        Ok(discarded)
    }

    // ------------------------------------------------------------------ describe

    /// The specs of a sample's features: the ref's own, or for a lazy offline (`file://`) ref
    /// whose specs are empty, those of the file (read from its header, not its data). Loaders
    /// call this to size batch buffers before reading into them with `get_into`.
    pub fn describe(&self, r: &SampleRef) -> Result<IndexMap<String, FeatureSpec>> {
        self.check_auth("describe")?;
        if r.feature_specs.is_empty() && !is_file_ref(r) {
            return Err(Error::InvalidArgument(format!(
                "ref for sample {} has no feature specs and is not a file:// ref; nothing describes its tensors",
                r.sample_id
            )));
        }
        Ok(self.specs_for(r)?.into_owned())
    }

    // ------------------------------------------------------------------ health

    /// A snapshot of the store's lifecycle state.
    pub fn health(&self) -> Health {
        let now = self.now();
        let mut live = 0u64;
        let mut ages = Vec::new();
        self.inner.index.for_each_shard(|shard| {
            for entry in shard.values() {
                if let Some(l) = entry.live.as_ref().filter(|l| l.origin != Origin::Observed) {
                    live += 1;
                    ages.push(now.saturating_duration_since(l.since).as_secs_f64());
                }
            }
        });
        let pending = lock(&self.inner.pending).len() as u64;
        let budget = self.inner.budget.snapshot();
        Health {
            store_id: self.inner.store_id.to_string(),
            backend: self.inner.backend.kind().to_owned(),
            resident_samples: live + pending,
            active_leases: self.inner.stats.active_leases.load(Ordering::Relaxed),
            resident_bytes: budget.resident,
            reserved_bytes: budget.reserved,
            max_resident_bytes: self.inner.budget.cap,
            release_pending: pending,
            oldest_age_s: ages.iter().copied().fold(0.0, f64::max),
            avg_age_s: if ages.is_empty() { 0.0 } else { ages.iter().sum::<f64>() / ages.len() as f64 },
            force_freed_total: self.inner.stats.force_freed_total.load(Ordering::Relaxed),
            auth_required: self.inner.options.auth.required(),
            provisional_external: lock(&self.inner.provisional).len() as u64,
            retain_on_release: self.inner.options.retain_on_release,
            backend_usage: self.inner.backend.usage(&self.inner.store_id).ok().flatten(),
        }
    }

    /// Statistics of the pool that recycles the buffers `get` returns.
    pub fn output_pool_stats(&self) -> ferry_core::buffer::PoolStats {
        self.inner.output_pool.stats()
    }
}

fn validate_put(sid: &SampleId, tensors: &[TensorLayout<'_>]) -> Result<()> {
    if tensors.is_empty() {
        return Err(Error::InvalidArgument("put requires at least one tensor".into()));
    }
    if sid.as_str().is_empty() {
        return Err(Error::InvalidArgument("put requires a non-empty sample id".into()));
    }
    let mut seen = HashSet::new();
    for TensorLayout { name, .. } in tensors {
        if name.is_empty() || name.contains('/') {
            return Err(Error::InvalidArgument(format!("feature name {name:?} must be non-empty and contain no '/'")));
        }
        if !seen.insert(*name) {
            return Err(Error::InvalidArgument(format!("feature {name:?} appears twice in one put")));
        }
    }
    Ok(())
}

/// Specs from the tensors; the target feature gets `target_repr` and `vocab_map_version` from
/// the metadata, as SpecForge's stores do.
fn build_specs(tensors: &[TensorLayout<'_>], metadata: &JsonMap) -> Result<IndexMap<String, FeatureSpec>> {
    let mut specs: IndexMap<String, FeatureSpec> =
        tensors.iter().map(|t| (t.name.to_owned(), FeatureSpec::new(t.name, t.shape.to_vec(), t.dtype))).collect();
    if let Some(repr) = metadata.get("target_repr").and_then(Value::as_str) {
        let repr = TargetRepr::parse(repr).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "metadata.target_repr {repr:?} is not one of logits, pruned_logits, hidden_state"
            ))
        })?;
        let target = metadata.get("target_feature_name").and_then(Value::as_str).unwrap_or("target");
        if let Some(spec) = specs.get_mut(target) {
            spec.target_repr = Some(repr);
            if let Some(v) = metadata.get("vocab_map_version").filter(|v| truthy(v)) {
                spec.target_meta.insert("vocab_map_version".into(), v.clone());
            }
        }
    }
    Ok(specs)
}

/// Python truthiness of a JSON value.
fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn spec_of<'s>(specs: &'s IndexMap<String, FeatureSpec>, r: &SampleRef, name: &str) -> Result<&'s FeatureSpec> {
    specs.get(name).ok_or_else(|| {
        if r.feature_keys.contains_key(name) {
            Error::InvalidArgument(format!(
                "ref for sample {} has no spec for feature {name:?}; only file:// refs can be read without specs",
                r.sample_id
            ))
        } else {
            Error::NotFound { what: format!("feature {name:?} of sample {}", r.sample_id) }
        }
    })
}

fn is_file_ref(r: &SampleRef) -> bool {
    r.scheme() == Some("file")
}

fn key_of<'r>(r: &'r SampleRef, name: &str) -> Result<&'r str> {
    r.feature_keys
        .get(name)
        .map(String::as_str)
        .ok_or_else(|| Error::NotFound { what: format!("feature {name:?} of sample {}", r.sample_id) })
}
