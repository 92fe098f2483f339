//! `.ckpt.gz`: a torch zip file gzip-compressed as a whole (SpecForge's offline dumps may be).
//!
//! Decompression streams into one owned buffer that the torch reader then borrows from, so the
//! tensors themselves are not copied again. Gzip (DEFLATE) cannot be decompressed in parallel:
//! each block's back-references reach into the previous 32 KiB of output. Only a multi-member
//! file (several gzip streams concatenated, as `pigz --independent` or a split-and-compress tool
//! writes) could be split; ferry decompresses members in sequence with `zlib-rs`, about as fast
//! as one core allows.

use ferry_core::{Error, Result};
use flate2::bufread::GzDecoder;
use std::io::{self, BufRead, ErrorKind, Read};

/// Decompression grows (and zero-initialises) the output this much at a time.
const CHUNK: usize = 1 << 20;
/// DEFLATE's best compression ratio is about 1032:1; a size hint beyond that is a lie.
const MAX_DEFLATE_RATIO: u64 = 1032;

/// The gzip members of a stream, one after another, as Python's `gzip` reads them: NUL bytes
/// after a member (padding, as tape and block-device tools add) are skipped, and anything else
/// must be the next member's header.
enum Members<R: BufRead> {
    /// Inside a member.
    Member(Box<GzDecoder<R>>),
    /// Between members: skipping NULs.
    Between(R),
    /// Past the end of the input.
    Done,
    /// Only while a state is being replaced.
    Taken,
}

impl<R: BufRead> Read for Members<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self {
                Members::Member(decoder) => {
                    // A member's end (`Ok(0)`) comes after its CRC and size were checked.
                    let n = decoder.read(buf)?;
                    if n > 0 {
                        return Ok(n);
                    }
                    if let Members::Member(decoder) = std::mem::replace(self, Members::Taken) {
                        *self = Members::Between(decoder.into_inner());
                    }
                }
                Members::Between(input) => {
                    let available = input.fill_buf()?;
                    if available.is_empty() {
                        *self = Members::Done;
                        continue;
                    }
                    let zeros = available.iter().take_while(|&&b| b == 0).count();
                    let more = zeros < available.len();
                    input.consume(zeros);
                    if more && let Members::Between(input) = std::mem::replace(self, Members::Taken) {
                        *self = Members::Member(Box::new(GzDecoder::new(input)));
                    }
                }
                Members::Done | Members::Taken => return Ok(0),
            }
        }
    }
}

/// Decompresses a whole gzip stream (all members, NUL padding after a member skipped) from
/// `input`, refusing to produce more than `max_bytes`. `size_hint` (from the gzip trailer, if
/// known) only pre-sizes the buffer.
pub(crate) fn decompress(
    input: impl BufRead,
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
    let mut decoder = Members::Member(Box::new(GzDecoder::new(input)));
    // `out[..filled]` holds output; `out[filled..]` is zeroed space not yet written. Safe Rust
    // cannot decompress into uninitialised memory (`Read::read_buf` is unstable, and
    // `read_to_end` zeroes its spare capacity too), so each byte is zeroed once, a chunk ahead,
    // and never again after a short read.
    let mut filled = 0usize;
    loop {
        if filled as u64 > max_bytes {
            return Err(corrupt(format!(
                "decompresses to more than {max_bytes} bytes (the limit; raise OpenOptions::max_decompressed_bytes if this file is genuine)"
            )));
        }
        if filled == out.len() {
            if out.capacity() - filled < CHUNK {
                out.try_reserve(CHUNK.max(filled / 2)).map_err(|_| Error::Io {
                    context: format!("decompressing gzip file {what}"),
                    kind: ErrorKind::OutOfMemory,
                    message: format!("cannot grow the buffer beyond {filled} bytes"),
                })?;
            }
            out.resize(filled + CHUNK, 0);
        }
        let n = match decoder.read(&mut out[filled..]) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::InvalidData | ErrorKind::UnexpectedEof) =>
            {
                return Err(corrupt(format!("gzip stream is corrupt or truncated after {filled} bytes: {e}")));
            }
            Err(e) => return Err(Error::io(format!("reading gzip file {what}"), &e)),
        };
        if n == 0 {
            break;
        }
        filled += n;
    }
    // No `shrink_to_fit`: it could copy a multi-GiB buffer to return at most a chunk, or the
    // unused part of a wrong size hint, which was never touched.
    out.truncate(filled);
    if out.len() as u64 > max_bytes {
        return Err(corrupt(format!("decompresses to more than {max_bytes} bytes (the limit)")));
    }
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

    #[test]
    fn nul_padding_after_a_member_is_skipped_like_pythons_gzip() {
        let mut padded = gz(b"first");
        padded.extend([0u8; 1000]);
        let out = decompress(&padded[..], padded.len() as u64, None, u64::MAX, "t").unwrap();
        assert_eq!(out, b"first");
        // Between members too, as Python's gzip reads it.
        padded.extend(gz(b" second"));
        padded.extend([0u8; 3]);
        let out = decompress(&padded[..], padded.len() as u64, None, u64::MAX, "t").unwrap();
        assert_eq!(out, b"first second");
        // Anything but NULs after a member must be a gzip header.
        padded.extend(b"\0\0junk");
        let err = decompress(&padded[..], padded.len() as u64, None, u64::MAX, "t").unwrap_err().to_string();
        assert!(err.contains("corrupt or truncated"), "{err}");
        // A small BufReader splits the padding and headers across buffer refills.
        let mut padded = gz(b"x");
        padded.extend([0u8; 100]);
        padded.extend(gz(b"y"));
        let reader = std::io::BufReader::with_capacity(7, &padded[..]);
        assert_eq!(decompress(reader, padded.len() as u64, None, u64::MAX, "t").unwrap(), b"xy");
    }
}
