//! Element types of features, named as SpecForge names them (torch dtype names without the
//! `torch.` prefix), with their sizes in bytes.

use crate::{Error, Result};
use std::fmt;

/// An element type a feature tensor can have.
/// Deliberately exhaustive: adding a dtype must be handled by every match in the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE 754 binary32.
    Float32,
    /// IEEE 754 binary64.
    Float64,
    /// IEEE 754 binary16.
    Float16,
    /// bfloat16 (the upper 16 bits of a float32).
    BFloat16,
    /// Signed 64-bit integer.
    Int64,
    /// Signed 32-bit integer.
    Int32,
    /// Signed 16-bit integer.
    Int16,
    /// Signed 8-bit integer.
    Int8,
    /// Unsigned 8-bit integer.
    UInt8,
    /// Boolean, one byte per element (0 or 1).
    Bool,
}

impl DType {
    /// Every dtype, in a stable order.
    pub const ALL: [DType; 10] = [
        DType::Float32,
        DType::Float64,
        DType::Float16,
        DType::BFloat16,
        DType::Int64,
        DType::Int32,
        DType::Int16,
        DType::Int8,
        DType::UInt8,
        DType::Bool,
    ];

    /// Size of one element in bytes.
    pub const fn size(self) -> usize {
        match self {
            DType::Float64 | DType::Int64 => 8,
            DType::Float32 | DType::Int32 => 4,
            DType::Float16 | DType::BFloat16 | DType::Int16 => 2,
            DType::Int8 | DType::UInt8 | DType::Bool => 1,
        }
    }

    /// Bytes of a contiguous tensor of this dtype and `shape`; `None` if that overflows 64 bits.
    pub fn nbytes_of(self, shape: &[u64]) -> Option<u64> {
        crate::contracts::checked_numel(shape)?.checked_mul(self.size() as u64)
    }

    /// The SpecForge / torch name (`"bfloat16"`, `"int64"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DType::Float32 => "float32",
            DType::Float64 => "float64",
            DType::Float16 => "float16",
            DType::BFloat16 => "bfloat16",
            DType::Int64 => "int64",
            DType::Int32 => "int32",
            DType::Int16 => "int16",
            DType::Int8 => "int8",
            DType::UInt8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// Parses a SpecForge dtype string. A `torch.` prefix is accepted (it is what
    /// `str(tensor.dtype)` gives); anything unknown is [`Error::UnknownDtype`].
    pub fn parse(name: &str) -> Result<DType> {
        let bare = name.strip_prefix("torch.").unwrap_or(name);
        DType::ALL.into_iter().find(|d| d.name() == bare).ok_or_else(|| Error::UnknownDtype { dtype: name.to_owned() })
    }

    /// SpecForge's `estimate_bytes` element size: the real size, and 4 for an unknown dtype.
    pub fn estimate_size(name: &str) -> usize {
        DType::parse(name).map_or(4, DType::size)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust element type with a fixed [`DType`], for typed views of tensor bytes.
pub trait Element: bytemuck::Pod {
    /// The dtype whose bytes this type reinterprets.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => { $(impl Element for $t { const DTYPE: DType = DType::$d; })* };
}
element!(f32 => Float32, f64 => Float64, half::f16 => Float16, half::bf16 => BFloat16,
         i64 => Int64, i32 => Int32, i16 => Int16, i8 => Int8, u8 => UInt8);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_specforge_table() {
        let expected = [
            ("float32", 4),
            ("float64", 8),
            ("float16", 2),
            ("bfloat16", 2),
            ("int64", 8),
            ("int32", 4),
            ("int16", 2),
            ("int8", 1),
            ("uint8", 1),
            ("bool", 1),
        ];
        for (name, size) in expected {
            assert_eq!(DType::parse(name).map(DType::size), Ok(size), "{name}");
            assert_eq!(DType::parse(name).map(DType::name), Ok(name));
        }
    }

    #[test]
    fn torch_prefix_accepted_unknown_rejected_with_name() {
        assert_eq!(DType::parse("torch.bfloat16"), Ok(DType::BFloat16));
        let err = DType::parse("complex64").unwrap_err();
        assert!(err.to_string().contains("\"complex64\""), "{err}");
        assert_eq!(DType::estimate_size("complex64"), 4);
    }
}
