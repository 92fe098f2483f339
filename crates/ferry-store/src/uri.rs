//! Store URIs: which backend a store lives in. `mem://[store_id]` (this process's memory) and
//! `dir://<root>` (a shared directory). `file://` (read-only offline files), `ferry://`,
//! `ferry+unix://` (the node daemon) and `mooncake://` are reserved for the backends that
//! later issues add; naming one today is an error that says so.

use crate::dir::{DirFormat, SharedDirBackend, Supersede};
use crate::lifecycle::{FeatureStore, StoreOptions};
use crate::mem::MemoryBackend;
use ferry_core::{Error, Result, StoreId};
use std::path::PathBuf;

/// A parsed store URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUri {
    /// `mem://` or `mem://<store_id>`.
    Memory {
        /// Store id from the URI, if given.
        store_id: Option<StoreId>,
    },
    /// `dir://<root>[?format=ckpt|safetensors][&supersede=own|scan]` (absolute or relative path).
    SharedDir {
        /// The root directory.
        root: PathBuf,
        /// The format new samples are written in (both are read).
        format: DirFormat,
        /// What a put does about other writers' older generation files.
        supersede: Supersede,
    },
}

impl StoreUri {
    /// Parses a store URI; unknown or not-yet-available schemes get an error naming them.
    pub fn parse(uri: &str) -> Result<StoreUri> {
        let (scheme, rest) = uri.split_once("://").ok_or_else(|| {
            Error::InvalidArgument(format!("store URI {uri:?} has no scheme; use mem://[store_id] or dir://<root>"))
        })?;
        match scheme {
            "mem" => {
                let id = rest.split(['/', '?']).next().unwrap_or("");
                Ok(StoreUri::Memory { store_id: (!id.is_empty()).then(|| StoreId::new(id)) })
            }
            "dir" if rest.is_empty() => Err(Error::InvalidArgument(
                "dir:// needs a root directory: use dir://<root>, or mem:// for this process's memory".into(),
            )),
            "dir" => {
                let (root, query) = rest.split_once('?').unwrap_or((rest, ""));
                let mut format = DirFormat::default();
                let mut supersede = Supersede::default();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    match pair.split_once('=') {
                        Some(("format", value)) => format = DirFormat::parse(value)?,
                        Some(("supersede", value)) => supersede = Supersede::parse(value)?,
                        _ => {
                            return Err(Error::InvalidArgument(format!(
                                "unknown dir:// option {pair:?} in {uri:?}; the options are format=ckpt|safetensors and supersede=own|scan"
                            )));
                        }
                    }
                }
                Ok(StoreUri::SharedDir { root: PathBuf::from(root), format, supersede })
            }
            "file" | "ferry" | "ferry+unix" | "mooncake" => Err(Error::InvalidArgument(format!(
                "store URI scheme {scheme}:// is not available in this build yet; use mem:// or dir://<root>"
            ))),
            other => Err(Error::InvalidArgument(format!(
                "unknown store URI scheme {other:?} in {uri:?}; use mem://[store_id] or dir://<root>"
            ))),
        }
    }
}

/// Opens the store a URI names. A store id in the URI wins over `options.store_id`.
pub fn open_store(uri: &str, mut options: StoreOptions) -> Result<FeatureStore> {
    match StoreUri::parse(uri)? {
        StoreUri::Memory { store_id } => {
            if store_id.is_some() {
                options.store_id = store_id;
            }
            FeatureStore::open(MemoryBackend::default(), options)
        }
        StoreUri::SharedDir { root, format, supersede } => {
            FeatureStore::open(SharedDirBackend::new(root)?.with_format(format).with_supersede(supersede), options)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_parse_or_say_what_to_use() {
        assert_eq!(StoreUri::parse("mem://abc").unwrap(), StoreUri::Memory { store_id: Some(StoreId::new("abc")) });
        assert_eq!(StoreUri::parse("mem://").unwrap(), StoreUri::Memory { store_id: None });
        assert_eq!(
            StoreUri::parse("dir:///tmp/x").unwrap(),
            StoreUri::SharedDir { root: "/tmp/x".into(), format: DirFormat::TorchZip, supersede: Supersede::Own }
        );
        assert_eq!(
            StoreUri::parse("dir:///tmp/x?format=safetensors").unwrap(),
            StoreUri::SharedDir { root: "/tmp/x".into(), format: DirFormat::Safetensors, supersede: Supersede::Own }
        );
        assert_eq!(
            StoreUri::parse("dir:///tmp/x?supersede=scan&format=ckpt").unwrap(),
            StoreUri::SharedDir { root: "/tmp/x".into(), format: DirFormat::TorchZip, supersede: Supersede::Scan }
        );
        assert!(StoreUri::parse("dir:///tmp/x?fmt=ckpt").unwrap_err().to_string().contains("format=ckpt|safetensors"));
        assert!(StoreUri::parse("dir:///tmp/x?supersede=all").unwrap_err().to_string().contains("own"));
        for bad in ["dir://", "s3://b", "nope", "mooncake://x"] {
            let err = StoreUri::parse(bad).unwrap_err().to_string();
            assert!(err.contains("mem://"), "{bad}: {err}");
        }
    }
}
