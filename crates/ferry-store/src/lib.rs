//! ferry's feature store: the `FeatureStore` API implemented once, as a lifecycle core over
//! pluggable byte backends, so every backend gets the same guarantees from one tested piece.
//!
//! SpecForge implements its store lifecycle (generations, leases, use-after-free refusal,
//! release-pending retries, drains, budgets, max-hold GC, adoption, auth) separately in each
//! backend, and the copies drift. Here a backend is five byte operations ([`ByteBackend`]); the
//! rules live in [`FeatureStore`].
//!
//! # Layout
//! * [`lifecycle`] — [`FeatureStore`], the lifecycle core (see its module doc for the rules).
//! * [`api`] — [`FeatureStoreApi`], the store's calls as a trait (local core or daemon client).
//! * [`backend`] — the [`ByteBackend`] trait and object keys.
//! * [`offline`] — `file://` refs for offline feature files (lazy or validated).
//! * [`mem`] — the in-memory backend (`mem://`), with pooled buffers.
//! * [`dir`] — the shared-directory backend (`dir://<root>`), SpecForge's file naming.
//! * [`auth`] — the shared-secret gate.
//! * [`clock`] — injectable time.
//! * [`uri`] — store URIs.
//! * [`bench`] — the reference store-vs-memcpy measurement.
//! * [`testing`] — a fault-injecting backend for tests.
//!
//! # Example
//! ```
//! use ferry_core::{DType, JsonMap, TensorView};
//! use ferry_store::{open_store, StoreOptions};
//!
//! let store = open_store("mem://demo", StoreOptions::default()).unwrap();
//! let ids: Vec<i64> = vec![1, 2, 3, 4];
//! let r = store.put("run0:task0", &[("input_ids", TensorView::from_elements(&[4], &ids).unwrap())], JsonMap::new()).unwrap();
//! let mut out = vec![0u8; 32];
//! let handle = store.get_into(&r, &mut [("input_ids", &mut out[..])]).unwrap();
//! store.release(&handle).unwrap(); // consume-once: the last lease frees the sample
//! assert!(store.get_into(&r, &mut [("input_ids", &mut out[..])]).is_err());
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod backend;
pub mod bench;
pub mod clock;
pub mod dir;
mod file_read;
pub mod lifecycle;
pub mod mem;
pub mod offline;
pub mod testing;
pub mod uri;

pub use api::FeatureStoreApi;
pub use auth::{AuthPolicy, Secret};
pub use backend::{ByteBackend, ObjectKey, Removal, SampleKey};
pub use clock::{Clock, ManualClock, SystemClock};
pub use dir::SharedDirBackend;
pub use lifecycle::{DrainPolicy, DrainReport, FeatureStore, GcReport, Health, PendingPut, StoreOptions, TensorLayout};
pub use mem::MemoryBackend;
pub use uri::{StoreUri, open_store};
