//! Safetensors files, through the reference `safetensors` crate: its header validation for
//! reading (ferry keeps the header's own key order), its serializer for writing.

use ferry_core::{DType, Error, Result, TensorView};
use indexmap::IndexMap;
use safetensors::{Dtype, SafeTensors};

use crate::layout::{Layout, TensorEntry};

fn corrupt(what: &str, message: impl Into<String>) -> Error {
    Error::Corrupt { what: format!("safetensors file {what}"), message: message.into() }
}

fn to_ferry(dtype: Dtype, name: &str, what: &str) -> Result<DType> {
    Ok(match dtype {
        Dtype::BOOL => DType::Bool,
        Dtype::U8 => DType::UInt8,
        Dtype::I8 => DType::Int8,
        Dtype::I16 => DType::Int16,
        Dtype::F16 => DType::Float16,
        Dtype::BF16 => DType::BFloat16,
        Dtype::I32 => DType::Int32,
        Dtype::F32 => DType::Float32,
        Dtype::F64 => DType::Float64,
        Dtype::I64 => DType::Int64,
        other => {
            return Err(corrupt(
                what,
                format!(
                    "tensor {name:?} has dtype {other:?}, which ferry does not support (supported: F32, F64, F16, BF16, I64, I32, I16, I8, U8, BOOL)"
                ),
            ));
        }
    })
}

fn to_safetensors(dtype: DType) -> Dtype {
    match dtype {
        DType::Float32 => Dtype::F32,
        DType::Float64 => Dtype::F64,
        DType::Float16 => Dtype::F16,
        DType::BFloat16 => Dtype::BF16,
        DType::Int64 => Dtype::I64,
        DType::Int32 => Dtype::I32,
        DType::Int16 => Dtype::I16,
        DType::Int8 => Dtype::I8,
        DType::UInt8 => Dtype::U8,
        DType::Bool => Dtype::BOOL,
    }
}

/// Parses a safetensors file held in `bytes`; tensors come back in the header's key order.
pub(crate) fn parse(bytes: &[u8], what: &str) -> Result<IndexMap<String, TensorEntry>> {
    let (header_len, metadata) =
        SafeTensors::read_metadata(bytes).map_err(|e| corrupt(what, format!("invalid safetensors file: {e}")))?;
    // `read_metadata` checked that 8 + header_len + data length == bytes.len().
    let data_start = 8 + header_len;
    // The crate keeps tensors by offset; the header's own order is the file's order.
    let order: IndexMap<String, serde::de::IgnoredAny> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| corrupt(what, format!("invalid safetensors header: {e}")))?;
    let mut tensors = IndexMap::with_capacity(order.len());
    for name in order.keys().filter(|k| k.as_str() != "__metadata__") {
        let Some(info) = metadata.info(name) else {
            return Err(corrupt(what, format!("header key {name:?} has no tensor info")));
        };
        let dtype = to_ferry(info.dtype, name, what)?;
        let (start, end) = info.data_offsets;
        let range = data_start + start..data_start + end;
        let shape = info.shape.iter().map(|&d| d as u64).collect();
        tensors.insert(name.clone(), TensorEntry { dtype, shape, layout: Layout::Contiguous(range) });
    }
    if tensors.len() != metadata.tensors().len() {
        return Err(corrupt(what, "the header lists a tensor twice"));
    }
    Ok(tensors)
}

/// The header bytes (length prefix included) the reference serializer writes for `tensors`, and
/// the indices of the tensors in the order their data follows it.
///
/// This is `safetensors::serialize`'s own `prepare` step, done with the crate's public pieces
/// (its dtype order, `Metadata` and its JSON form), so that ferry can stream the data into a
/// file it creates itself: the crate's `serialize_to_file` creates its temporary file with mode
/// 0600, which would make shared feature files unreadable to other users.
pub(crate) fn header(tensors: &[(&str, TensorView<'_>)]) -> Result<(Vec<u8>, Vec<usize>)> {
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    // Descending dtype alignment, then name: the crate's order.
    order.sort_by(|&l, &r| {
        let ((ln, lv), (rn, rv)) = (&tensors[l], &tensors[r]);
        to_safetensors(rv.dtype()).cmp(&to_safetensors(lv.dtype())).then(ln.cmp(rn))
    });
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    for (name, v) in order.iter().map(|&i| &tensors[i]) {
        let shape = v
            .shape()
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|_| Error::InvalidArgument(format!("tensor {name:?} shape does not fit this host")))?;
        let end = offset + v.bytes().len();
        infos.push((
            (*name).to_owned(),
            safetensors::tensor::TensorInfo { dtype: to_safetensors(v.dtype()), shape, data_offsets: (offset, end) },
        ));
        offset = end;
    }
    let invalid = |e: &dyn std::fmt::Display| Error::InvalidArgument(format!("cannot build a safetensors header: {e}"));
    let metadata = safetensors::tensor::Metadata::new(None, infos).map_err(|e| invalid(&e))?;
    let mut json = serde_json::to_vec(&metadata).map_err(|e| invalid(&e))?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    Ok((out, order))
}
