//! Newtype ids, so a sample id, a store id and a generation can never be confused.

use serde::{Deserialize, Serialize};
use std::borrow::Borrow;
use std::fmt;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Wraps a string.
            pub fn new(s: impl Into<String>) -> Self {
                Self(s.into())
            }
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }
        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

string_id!(
    /// Identifies one training sample across the whole pipeline (`"<run_id>:<task_id>"` online,
    /// `"<run_id>:<8-digit index>"` offline).
    SampleId
);
string_id!(
    /// Identifies one feature store namespace; every object key starts with it.
    StoreId
);
string_id!(
    /// The opaque token of one read lease, required to release it.
    LeaseToken
);

/// The generation of a sample in a store. Every put takes a new one, never reused within a
/// store, so a stale ref or handle can never alias newer bytes. 0 means "not tracked"
/// (read-only offline files).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Generation(u64);

impl Generation {
    /// The generation of untracked, read-only data.
    pub const UNTRACKED: Generation = Generation(0);

    /// Wraps a raw generation number.
    pub const fn new(raw: u64) -> Self {
        Generation(raw)
    }
    /// The raw number (as written in keys, URIs and `metadata.generation`).
    pub const fn get(self) -> u64 {
        self.0
    }
    /// The generation after this one.
    pub const fn next(self) -> Self {
        Generation(self.0 + 1)
    }
}

impl fmt::Display for Generation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
