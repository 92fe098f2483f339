//! Owned tensors ([`TensorBuf`]) and borrowed ones ([`TensorView`]): a dtype, a row-major shape
//! and exactly `numel * dtype.size()` little-endian bytes. No strides: everything ferry stores
//! and moves is contiguous.

use crate::{AlignedBuf, DType, Element, Error, FeatureSpec, Result};

/// Byte length of a contiguous tensor, or `None` if it overflows.
fn check_len(what: &str, dtype: DType, shape: &[u64], len: usize) -> Result<()> {
    let Some(want) = dtype.nbytes_of(shape) else {
        return Err(Error::InvalidArgument(format!("{what}: shape {shape:?} of {dtype} overflows 64 bits")));
    };
    if want != len as u64 {
        return Err(Error::InvalidArgument(format!(
            "{what}: {len} bytes do not match shape {shape:?} of {dtype} ({want} bytes)"
        )));
    }
    Ok(())
}

/// A borrowed contiguous tensor: what `put` reads from, with no copy until the backend.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    dtype: DType,
    shape: &'a [u64],
    data: &'a [u8],
}

impl<'a> TensorView<'a> {
    /// A view of `data` as a tensor; the length must match the shape and dtype exactly.
    pub fn new(dtype: DType, shape: &'a [u64], data: &'a [u8]) -> Result<Self> {
        check_len("tensor view", dtype, shape, data.len())?;
        Ok(TensorView { dtype, shape, data })
    }

    /// A view of typed elements.
    pub fn from_elements<T: Element>(shape: &'a [u64], data: &'a [T]) -> Result<Self> {
        TensorView::new(T::DTYPE, shape, bytemuck::cast_slice(data))
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape.
    pub fn shape(&self) -> &'a [u64] {
        self.shape
    }
    /// The raw bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }
    /// Byte length.
    pub fn nbytes(&self) -> u64 {
        self.data.len() as u64
    }
    /// The spec this view satisfies, under `name`.
    pub fn spec(&self, name: &str) -> FeatureSpec {
        FeatureSpec::new(name, self.shape.to_vec(), self.dtype)
    }
}

/// An owned contiguous tensor in an aligned buffer.
#[derive(Debug)]
pub struct TensorBuf {
    dtype: DType,
    shape: Vec<u64>,
    buf: AlignedBuf,
}

impl TensorBuf {
    /// Wraps a buffer; its length must match the shape and dtype.
    pub fn new(dtype: DType, shape: Vec<u64>, buf: AlignedBuf) -> Result<Self> {
        check_len("tensor buffer", dtype, &shape, buf.len())?;
        Ok(TensorBuf { dtype, shape, buf })
    }

    /// A zeroed tensor for `spec` (fails on an unknown dtype).
    pub fn zeroed_for(spec: &FeatureSpec) -> Result<Self> {
        let dtype = spec.dtype()?;
        let len = usize::try_from(spec.nbytes()?)
            .map_err(|_| Error::InvalidArgument(format!("feature {} is too large for this host", spec.name)))?;
        TensorBuf::new(dtype, spec.shape.clone(), AlignedBuf::zeroed(len))
    }

    /// A tensor holding a copy of typed elements.
    pub fn from_elements<T: Element>(shape: Vec<u64>, data: &[T]) -> Result<Self> {
        TensorBuf::new(T::DTYPE, shape, AlignedBuf::copy_from(bytemuck::cast_slice(data)))
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Shape.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }
    /// The raw bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
    /// The raw bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
    /// A borrowed view.
    pub fn view(&self) -> TensorView<'_> {
        TensorView { dtype: self.dtype, shape: &self.shape, data: &self.buf }
    }
    /// The elements as `T`; fails if `T` is not this tensor's dtype.
    pub fn as_elements<T: Element>(&self) -> Result<&[T]> {
        if T::DTYPE != self.dtype {
            return Err(Error::InvalidArgument(format!("tensor is {}, not {}", self.dtype, T::DTYPE)));
        }
        // Aligned to 64 and sized by check_len, so the cast cannot fail.
        bytemuck::try_cast_slice(&self.buf)
            .map_err(|e| Error::InvalidArgument(format!("cannot view tensor bytes as {}: {e}", T::DTYPE)))
    }
    /// The underlying buffer.
    pub fn into_buffer(self) -> AlignedBuf {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn view_length_must_match_shape() {
        let data = [0u8; 12];
        assert!(TensorView::new(DType::Float32, &[3], &data).is_ok());
        let err = TensorView::new(DType::Float32, &[2, 2], &data).unwrap_err();
        assert!(err.to_string().contains("12 bytes do not match shape [2, 2] of float32 (16 bytes)"));
    }

    #[test]
    fn typed_round_trip_through_bytes() {
        let vals = [bf16::from_f32(1.5), bf16::from_f32(-2.0)];
        let t = TensorBuf::from_elements(vec![1, 2], &vals).unwrap();
        assert_eq!(t.bytes(), &[0xc0, 0x3f, 0x00, 0xc0]); // little-endian bf16
        assert_eq!(t.as_elements::<bf16>().unwrap(), &vals);
        assert!(t.as_elements::<f32>().is_err());
    }
}
