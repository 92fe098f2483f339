//! Frames: a fixed 32-byte little-endian header, then `meta_len` bytes of metadata (a small
//! JSON object: sample ids, refs, specs, offsets), then `payload_len` raw bytes (tensor data).
//!
//! ```text
//! offset  size  field
//!      0     4  magic "FERY"
//!      4     2  version (1)
//!      6     2  op
//!      8     4  flags (bit 0 reply, bit 1 error, bit 2 served from shared memory)
//!     12     8  request id (a reply carries its request's id)
//!     20     4  meta_len     (bounded by Limits::max_meta)
//!     24     8  payload_len  (bounded by Limits::max_payload)
//! ```
//!
//! The header and metadata are read here; the payload is left in the stream so the receiver
//! reads it straight into its destination (a caller's tensor buffer, an arena region), with no
//! intermediate buffer. Every field is checked before anything is allocated: a wrong magic or
//! version, an unknown op or flag, or a length over its bound is an error that names what was
//! wrong, and the connection that sent it is closed by its owner; nothing else is affected.

use ferry_core::{Error, Result};
use std::io::{ErrorKind, IoSlice, Read, Write};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FERY";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 32;

/// The operation a frame asks for (or answers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Op {
    /// Server → client on connect: protocol version and an authentication challenge.
    Hello = 1,
    /// Client → server: the challenge response (the secret itself never crosses the wire).
    Auth = 2,
    /// Put a sample whose tensor bytes follow as the payload (TCP route).
    Put = 3,
    /// Reserve arena regions for a sample (shared-memory route); the client then writes them.
    PutAlloc = 4,
    /// Commit a sample written into reserved regions.
    PutCommit = 5,
    /// Get features: the reply's payload holds their bytes (TCP) or their arena offsets (shm).
    Get = 6,
    /// Release a read lease.
    Release = 7,
    /// Abort (free) a sample.
    Abort = 8,
    /// Abort every sample of the store.
    AbortAll = 9,
    /// Adopt a sample written by another client.
    Adopt = 10,
    /// Describe a sample's features.
    Describe = 11,
    /// Run max-hold GC and retry pending removals.
    Gc = 12,
    /// Drain pending removals.
    Drain = 13,
    /// The store's health map.
    Health = 14,
    /// Liveness and latency probe.
    Ping = 15,
    /// The peer is closing the connection.
    Bye = 16,
    /// Track an external capture attempt.
    TrackExternal = 17,
    /// Free every tracked external attempt not adopted.
    DiscardExternal = 18,
    /// Hand samples the session owns over to the daemon (they outlive the session).
    Disown = 19,
}

impl Op {
    /// Every op, in wire order.
    pub const ALL: [Op; 19] = [
        Op::Hello,
        Op::Auth,
        Op::Put,
        Op::PutAlloc,
        Op::PutCommit,
        Op::Get,
        Op::Release,
        Op::Abort,
        Op::AbortAll,
        Op::Adopt,
        Op::Describe,
        Op::Gc,
        Op::Drain,
        Op::Health,
        Op::Ping,
        Op::Bye,
        Op::TrackExternal,
        Op::DiscardExternal,
        Op::Disown,
    ];

    /// The op with this wire code.
    pub fn from_code(code: u16) -> Option<Op> {
        Op::ALL.into_iter().find(|op| *op as u16 == code)
    }
}

/// Flag bits.
pub mod flags {
    /// The frame answers a request.
    pub const REPLY: u32 = 1;
    /// The reply reports an error (its metadata says which).
    pub const ERROR: u32 = 1 << 1;
    /// The reply was served through shared memory (its payload holds arena offsets).
    pub const SHM: u32 = 1 << 2;
    /// Every bit this version defines.
    pub const KNOWN: u32 = REPLY | ERROR | SHM;
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The operation.
    pub op: Op,
    /// [`flags`] bits.
    pub flags: u32,
    /// Matches a reply to its request.
    pub request_id: u64,
    /// Metadata bytes after the header.
    pub meta_len: u32,
    /// Raw payload bytes after the metadata.
    pub payload_len: u64,
}

/// Bounds a reader enforces before allocating or reading anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest metadata block accepted.
    pub max_meta: u32,
    /// Largest payload accepted (a daemon sets this to its arena capacity).
    pub max_payload: u64,
}

impl Default for Limits {
    fn default() -> Self {
        // Metadata is a few KiB (a ref with its specs); 1 MiB leaves room for batched calls.
        // Payloads default to 64 GiB, above any single sample SpecForge users report.
        Limits { max_meta: 1 << 20, max_payload: 64 << 30 }
    }
}

fn malformed(message: String) -> Error {
    Error::Corrupt { what: "ferry frame from the peer".into(), message }
}

impl Header {
    /// The header's 32 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4..6].copy_from_slice(&VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&(self.op as u16).to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..20].copy_from_slice(&self.request_id.to_le_bytes());
        out[20..24].copy_from_slice(&self.meta_len.to_le_bytes());
        out[24..32].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Decodes and checks a header against `limits`.
    pub fn decode(bytes: &[u8; HEADER_LEN], limits: &Limits) -> Result<Header> {
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i..i + 8]);
            u64::from_le_bytes(b)
        };
        if bytes[0..4] != MAGIC {
            return Err(malformed(format!(
                "bad magic {:?} (expected \"FERY\"): the peer is not a ferry daemon or client, or the stream lost its framing",
                String::from_utf8_lossy(&bytes[0..4])
            )));
        }
        let version = u16_at(4);
        if version != VERSION {
            return Err(malformed(format!(
                "protocol version {version}, this build speaks {VERSION}: run the same ferry version on both ends"
            )));
        }
        let code = u16_at(6);
        let op = Op::from_code(code).ok_or_else(|| malformed(format!("unknown op code {code}")))?;
        let flags = u32_at(8);
        if flags & !flags::KNOWN != 0 {
            return Err(malformed(format!("unknown flag bits {:#x}", flags & !flags::KNOWN)));
        }
        let meta_len = u32_at(20);
        if meta_len > limits.max_meta {
            return Err(malformed(format!(
                "{op:?} metadata of {meta_len} bytes exceeds the limit of {} bytes",
                limits.max_meta
            )));
        }
        let payload_len = u64_at(24);
        if payload_len > limits.max_payload {
            return Err(malformed(format!(
                "{op:?} payload of {payload_len} bytes exceeds the limit of {} bytes",
                limits.max_payload
            )));
        }
        Ok(Header { op, flags, request_id: u64_at(12), meta_len, payload_len })
    }

    /// Whether a flag bit is set.
    pub fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// A frame's header and metadata; its payload (`header.payload_len` bytes) is still in the
/// stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameHead {
    /// The header.
    pub header: Header,
    /// The metadata bytes.
    pub meta: Vec<u8>,
}

/// Reads the next frame's header and metadata. `Ok(None)` when the stream ends cleanly between
/// frames; a stream that ends inside a frame is an error.
pub fn read_head(reader: &mut impl Read, limits: &Limits) -> Result<Option<FrameHead>> {
    let mut bytes = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match reader.read(&mut bytes[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => {
                return Err(malformed(format!("the stream ended {got} bytes into a {HEADER_LEN}-byte frame header")));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading a ferry frame header", &e)),
        }
    }
    let header = Header::decode(&bytes, limits)?;
    // Bounded by `limits.max_meta` (checked in decode) before this allocation.
    let mut meta = vec![0u8; header.meta_len as usize];
    reader.read_exact(&mut meta).map_err(|e| {
        if e.kind() == ErrorKind::UnexpectedEof {
            malformed(format!("the stream ended inside the {} bytes of {:?} metadata", header.meta_len, header.op))
        } else {
            Error::io("reading ferry frame metadata", &e)
        }
    })?;
    Ok(Some(FrameHead { header, meta }))
}

/// Writes one whole frame (header, metadata, then each payload slice in order) with vectored
/// writes, so payload bytes go from their buffers to the socket without being gathered first.
/// `header.meta_len` and `header.payload_len` must match the slices.
pub fn write_head(writer: &mut impl Write, header: &Header, meta: &[u8], payload: &[&[u8]]) -> Result<()> {
    let payload_len: u64 = payload.iter().map(|p| p.len() as u64).sum();
    if header.meta_len as usize != meta.len() || header.payload_len != payload_len {
        return Err(Error::InvalidArgument(format!(
            "frame header says {} metadata and {} payload bytes but {} and {payload_len} were given",
            header.meta_len,
            header.payload_len,
            meta.len()
        )));
    }
    let head = header.encode();
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(2 + payload.len());
    slices.push(IoSlice::new(&head));
    slices.extend([meta].into_iter().chain(payload.iter().copied()).filter(|s| !s.is_empty()).map(IoSlice::new));
    write_all_vectored(writer, &mut slices)
}

/// Writes a frame's header and metadata only: the caller then writes exactly
/// `header.payload_len` payload bytes itself ([`write_all_vectored`]), for a payload produced
/// in pieces (a view gathered through a bounded buffer).
pub fn write_head_only(writer: &mut impl Write, header: &Header, meta: &[u8]) -> Result<()> {
    if header.meta_len as usize != meta.len() {
        return Err(Error::InvalidArgument(format!(
            "frame header says {} metadata bytes but {} were given",
            header.meta_len,
            meta.len()
        )));
    }
    let head = header.encode();
    let mut slices = [IoSlice::new(&head), IoSlice::new(meta)];
    write_all_vectored(writer, &mut slices)
}

/// Writes every slice, in order, with vectored writes.
pub fn write_all_vectored(writer: &mut impl Write, slices: &mut [IoSlice<'_>]) -> Result<()> {
    let mut rest: &mut [IoSlice<'_>] = slices;
    while !rest.is_empty() {
        match writer.write_vectored(rest) {
            Ok(0) => {
                return Err(Error::io(
                    "writing a ferry frame",
                    &std::io::Error::new(ErrorKind::WriteZero, "the peer accepted no more bytes"),
                ));
            }
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("writing a ferry frame", &e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_32_bytes_in_the_documented_layout() {
        let h = Header { op: Op::Get, flags: flags::REPLY | flags::SHM, request_id: 7, meta_len: 3, payload_len: 9 };
        let b = h.encode();
        assert_eq!(&b[0..4], b"FERY");
        assert_eq!(b[4..6], 1u16.to_le_bytes());
        assert_eq!(b[6..8], 6u16.to_le_bytes());
        assert_eq!(b[8..12], 5u32.to_le_bytes());
        assert_eq!(b[12..20], 7u64.to_le_bytes());
        assert_eq!(b[20..24], 3u32.to_le_bytes());
        assert_eq!(b[24..32], 9u64.to_le_bytes());
        assert_eq!(Header::decode(&b, &Limits::default()).unwrap(), h);
    }

    #[test]
    fn op_codes_are_dense_and_round_trip() {
        for (i, op) in Op::ALL.into_iter().enumerate() {
            assert_eq!(op as u16, i as u16 + 1);
            assert_eq!(Op::from_code(op as u16), Some(op));
        }
        assert_eq!(Op::from_code(0), None);
        assert_eq!(Op::from_code(20), None);
    }
}
