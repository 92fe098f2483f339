//! The in-memory backend (`mem://`): objects in a map, buffers recycled through a
//! [`BufferPool`] so steady-state puts copy into warm, already-faulted memory.
//!
//! Copies: `write` copies each tensor once into a pooled buffer; `read_into` copies once into
//! the caller's buffer. The map lock is held only to insert, look up (cloning an `Arc`) or
//! remove; copies run outside it, so reads of different samples proceed in parallel and a
//! removal racing a read never frees bytes under it.

use crate::backend::{BackendUsage, ByteBackend, ObjectData, ObjectKey, Removal, SampleKey};
use ferry_core::{AlignedBuf, BufferPool, Error, Generation, Result, SampleId, StoreId};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Python's `urllib.parse.quote(s, safe="")`: everything but `A-Za-z0-9_.-~` is escaped.
const PY_QUOTE_NO_SAFE: &AsciiSet = &NON_ALPHANUMERIC.remove(b'_').remove(b'.').remove(b'-').remove(b'~');

/// Percent-encodes a sample id as SpecForge's `mem://` URIs do.
pub fn quote_sample_id(sample_id: &str) -> String {
    utf8_percent_encode(sample_id, PY_QUOTE_NO_SAFE).to_string()
}

/// Default cap on idle pooled bytes for a memory backend.
pub const DEFAULT_POOL_BYTES: u64 = 1 << 30;

#[derive(Default)]
struct Objects {
    /// (store, sample, generation) -> objects by name.
    samples: HashMap<(StoreId, SampleId, Generation), HashMap<String, Arc<AlignedBuf>>>,
    bytes: u64,
}

/// Objects held in this process's memory.
pub struct MemoryBackend {
    objects: RwLock<Objects>,
    pool: BufferPool,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        MemoryBackend::new(DEFAULT_POOL_BYTES)
    }
}

impl MemoryBackend {
    /// A backend keeping at most `max_pooled_bytes` of idle buffers for reuse.
    pub fn new(max_pooled_bytes: u64) -> Self {
        MemoryBackend { objects: RwLock::new(Objects::default()), pool: BufferPool::new(max_pooled_bytes) }
    }

    /// The buffer pool (for stats).
    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    fn poisoned(op: &str) -> Error {
        Error::Backend {
            backend: "memory".into(),
            operation: op.into(),
            key: String::new(),
            message: "object map lock poisoned by a panic in another thread".into(),
        }
    }

    fn lookup(&self, object: ObjectKey<'_>) -> Result<Option<Arc<AlignedBuf>>> {
        let objects = self.objects.read().map_err(|_| Self::poisoned("read"))?;
        let key = (object.sample.store_id.clone(), object.sample.sample_id.clone(), object.sample.generation);
        Ok(objects.samples.get(&key).and_then(|m| m.get(object.name)).cloned())
    }

    /// Test seam: replace an object's bytes with its first `keep` bytes (simulates truncation).
    pub fn truncate_object(&self, object: ObjectKey<'_>, keep: usize) -> Result<()> {
        let mut objects = self.objects.write().map_err(|_| Self::poisoned("truncate"))?;
        let key = (object.sample.store_id.clone(), object.sample.sample_id.clone(), object.sample.generation);
        let map = objects.samples.get_mut(&key).ok_or_else(|| Error::NotFound { what: object.to_string() })?;
        let old = map.get(object.name).ok_or_else(|| Error::NotFound { what: object.to_string() })?;
        let keep = keep.min(old.len());
        let cut = Arc::new(AlignedBuf::copy_from(&old[..keep]));
        let removed = (old.len() - keep) as u64;
        map.insert(object.name.to_owned(), cut);
        objects.bytes -= removed;
        Ok(())
    }
}

impl ByteBackend for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn write(&self, sample: SampleKey<'_>, objects: &[ObjectData<'_>]) -> Result<()> {
        // Copy outside the lock, then publish every object at once (all or nothing).
        let mut staged = HashMap::with_capacity(objects.len());
        let mut bytes = 0u64;
        for object in objects {
            let src = object.tensor.bytes();
            let mut buf = self.pool.take(src.len());
            buf.copy_from_slice(src);
            bytes += src.len() as u64;
            staged.insert(object.name.to_owned(), Arc::new(buf));
        }
        let mut map = self.objects.write().map_err(|_| Self::poisoned("write"))?;
        let key = (sample.store_id.clone(), sample.sample_id.clone(), sample.generation);
        if let Some(old) = map.samples.insert(key, staged) {
            map.bytes -= old.values().map(|b| b.len() as u64).sum::<u64>();
        }
        map.bytes += bytes;
        Ok(())
    }

    fn read_into(&self, object: ObjectKey<'_>, dst: &mut [u8]) -> Result<usize> {
        let buf = self.lookup(object)?.ok_or_else(|| Error::NotFound { what: format!("object {object}") })?;
        let n = buf.len().min(dst.len());
        dst[..n].copy_from_slice(&buf[..n]);
        Ok(buf.len())
    }

    fn remove(&self, sample: SampleKey<'_>, names: &[String], _force: bool) -> Result<Removal> {
        let mut map = self.objects.write().map_err(|_| Self::poisoned("remove"))?;
        let key = (sample.store_id.clone(), sample.sample_id.clone(), sample.generation);
        let mut freed = Vec::new();
        if let Some(objects) = map.samples.get_mut(&key) {
            for name in names {
                if let Some(buf) = objects.remove(name) {
                    freed.push(buf);
                }
            }
            if objects.is_empty() {
                map.samples.remove(&key);
            }
        }
        map.bytes -= freed.iter().map(|b| b.len() as u64).sum::<u64>();
        drop(map);
        drop(freed); // buffers return to the pool outside the lock (unless a reader holds one)
        Ok(Removal::Removed)
    }

    fn exists(&self, object: ObjectKey<'_>) -> Result<bool> {
        Ok(self.lookup(object)?.is_some())
    }

    fn size(&self, object: ObjectKey<'_>) -> Result<Option<u64>> {
        Ok(self.lookup(object)?.map(|b| b.len() as u64))
    }

    fn latest_generation(&self, store_id: &StoreId, sample_id: &SampleId) -> Result<Option<Generation>> {
        let map = self.objects.read().map_err(|_| Self::poisoned("list"))?;
        Ok(map.samples.keys().filter(|(s, id, _)| s == store_id && id == sample_id).map(|(_, _, g)| *g).max())
    }

    fn object_names(&self, sample: SampleKey<'_>) -> Result<Option<Vec<String>>> {
        let map = self.objects.read().map_err(|_| Self::poisoned("list"))?;
        let key = (sample.store_id.clone(), sample.sample_id.clone(), sample.generation);
        Ok(map.samples.get(&key).map(|m| m.keys().cloned().collect()))
    }

    fn ref_uri(&self, store_id: &StoreId, sample_id: &SampleId, generation: Generation) -> String {
        format!("mem://{store_id}/{}?generation={generation}", quote_sample_id(sample_id.as_str()))
    }

    fn usage(&self, store_id: &StoreId) -> Result<Option<BackendUsage>> {
        let map = self.objects.read().map_err(|_| Self::poisoned("usage"))?;
        let mut usage = BackendUsage::default();
        for ((s, _, _), objects) in &map.samples {
            if s == store_id {
                usage.samples += 1;
                usage.bytes += objects.values().map(|b| b.len() as u64).sum::<u64>();
            }
        }
        Ok(Some(usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_matches_python_quote_with_no_safe_chars() {
        // urllib.parse.quote("run0:task/1 é~_.-", safe="")
        assert_eq!(quote_sample_id("run0:task/1 é~_.-"), "run0%3Atask%2F1%20%C3%A9~_.-");
    }
}
