//! `.ckpt.gz`: a torch zip file gzip-compressed as a whole (SpecForge's offline dumps may be).
//!
//! Decompression streams into one owned buffer that the torch reader then borrows from, so the
//! tensors themselves are not copied again. Gzip (DEFLATE) cannot be decompressed in parallel:
//! each block's back-references reach into the previous 32 KiB of output. Only a multi-member
//! file (several gzip streams concatenated, as `pigz --independent` or a split-and-compress tool
//! writes) could be split; ferry decompresses members in sequence with `zlib-rs`, about as fast
//! as one core allows.

use ferry_core::{Error, Result};
use flate2::read::MultiGzDecoder;
use std::io::{ErrorKind, Read};

/// Decompression reads this much at a time.
const CHUNK: usize = 1 << 20;
/// DEFLATE's best compression ratio is about 1032:1; a size hint beyond that is a lie.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// Decompresses a whole gzip stream (all members) from `input`, refusing to produce more than
/// `max_bytes`. `size_hint` (from the gzip trailer, if known) only pre-sizes the buffer.
pub(crate) fn decompress(
    input: impl Read,
    compressed_len: u64,
    size_hint: Option<u64>,
    max_bytes: u64,
    what: &str,
) -> Result<Vec<u8>> {
    let corrupt = |message: String| Error::Corrupt { what: format!("gzip file {what}"), message };
    let mut out: Vec<u8> = Vec::new();
    if let Some(hint) = size_hint {
        let hint = hint.min(compressed_len.saturating_mul(MAX_DEFLATE_RATIO)).min(max_bytes);
        // Only a hint: a failed reservation just means growing later.
        let _ = out.try_reserve_exact(usize::try_from(hint).unwrap_or(0));
    }
    let mut decoder = MultiGzDecoder::new(input);
    loop {
        let len = out.len();
        if len as u64 > max_bytes {
            return Err(corrupt(format!(
                "decompresses to more than {max_bytes} bytes (the limit; raise OpenOptions::max_decompressed_bytes if this file is genuine)"
            )));
        }
        if out.capacity() - len < CHUNK {
            out.try_reserve(CHUNK.max(len / 2)).map_err(|_| Error::Io {
                context: format!("decompressing gzip file {what}"),
                kind: ErrorKind::OutOfMemory,
                message: format!("cannot grow the buffer beyond {len} bytes"),
            })?;
        }
        out.resize(len + CHUNK, 0);
        let n = loop {
            match decoder.read(&mut out[len..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::InvalidInput | ErrorKind::InvalidData | ErrorKind::UnexpectedEof
                    ) =>
                {
                    out.truncate(len);
                    return Err(corrupt(format!("gzip stream is corrupt or truncated after {len} bytes: {e}")));
                }
                Err(e) => {
                    out.truncate(len);
                    return Err(Error::io(format!("reading gzip file {what}"), &e));
                }
            }
        };
        out.truncate(len + n);
        if n == 0 {
            break;
        }
    }
    if out.len() as u64 > max_bytes {
        return Err(corrupt(format!("decompresses to more than {max_bytes} bytes (the limit)")));
    }
    out.shrink_to_fit();
    Ok(out)
}

/// The uncompressed size modulo 2^32 recorded in a gzip trailer, as a buffer-size hint.
pub(crate) fn trailer_size(bytes: &[u8]) -> Option<u64> {
    let t = bytes.get(bytes.len().checked_sub(4)?..)?;
    Some(u64::from(u32::from_le_bytes([t[0], t[1], t[2], t[3]])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn round_trip_multi_member_and_limit() {
        let a: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut both = gz(&a);
        both.extend(gz(b"tail"));
        let out = decompress(&both[..], both.len() as u64, trailer_size(&both), u64::MAX, "t").unwrap();
        assert_eq!(out.len(), a.len() + 4);
        assert_eq!(&out[..a.len()], &a[..]);
        let err = decompress(&both[..], both.len() as u64, None, 1000, "t").unwrap_err().to_string();
        assert!(err.contains("more than 1000 bytes"), "{err}");
        let cut = &both[..both.len() / 3];
        let err = decompress(cut, cut.len() as u64, None, u64::MAX, "t").unwrap_err().to_string();
        assert!(err.contains("corrupt or truncated"), "{err}");
    }
}
