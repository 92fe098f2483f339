//! The zip container of torch files: reading the central directory of a stored-only archive
//! (entry name → byte range in the file, never a copy), and writing one exactly the way torch's
//! `PyTorchStreamWriter` (miniz, `MZ_ZIP_FLAG_WRITE_ZIP64`) lays it out.
//!
//! Why not the `zip` crate: ferry needs only stored entries and their offsets. The `zip` crate
//! (9.x, maintained) reads through `Read + Seek`, pulls in every compression codec by default,
//! and its fuzz history is not ours to bound; the subset below is about 300 lines, slices the
//! mapping directly, and bounds every length it reads.
//!
//! Layout torch writes (all integers little-endian), per record:
//!
//! ```text
//! local header (30 B)  "PK\3\4" ver=0 flags=0x0808 (0x0800 if empty) method=0 time=0 date=0
//!                      crc=0 csize=0 usize=0 name_len extra_len
//! name                 "<archive>/<record>"
//! [zip64 extra]        id 1: [usize, csize=0] if size >= 0xFFFFFFFF, then [offset] if offset >= 0xFFFFFFFF
//! padding extra        "FB" u16 n, then n 'Z' bytes, so that the data starts on a 64-byte boundary
//! data                 stored (uncompressed)
//! [data descriptor]    "PK\7\8" crc csize usize: u32 sizes, or u64 sizes when the record has a
//!                      zip64 extra (for a large offset too); none for empty records
//! ```
//!
//! then the central directory (one 46-byte header per record: real crc; sizes, or 0xFFFFFFFF
//! for both with `[usize, csize]` in a zip64 extra; offset, or 0xFFFFFFFF with `[offset]` in
//! it; no padding extra), a zip64 end-of-central-directory record and its locator (always, even
//! for small archives), and the classic end record with values clamped to 0xFFFF / 0xFFFFFFFF.
//!
//! Checked against real torch 2.5.1 output, including a 4.3 GB file
//! (`tests/data/torch-2.5.1/big_zip64_headers.json` holds its header bytes;
//! `tests/writer.rs` explains what was observed). Zip64 fields appear exactly where torch's
//! `getPadding` and miniz put them: size or offset at or above 0xFFFFFFFF, never otherwise.
//! That matters for readers: torch 2.5.1's miniz (2.1.0) rejects an offset sentinel in an
//! archive under 4 GiB (see [`Zip64Limits`]).

use ferry_core::{Error, Result};
use std::io::{self, Write};
use std::ops::Range;

use crate::limits::MAX_ZIP_ENTRIES;

const LOCAL_SIG: u32 = 0x0403_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const EOCD_SIG: u32 = 0x0605_4b50;
const ZIP64_EOCD_SIG: u32 = 0x0606_4b50;
const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
const DESCRIPTOR_SIG: u32 = 0x0807_4b50;

const LOCAL_HEADER_LEN: usize = 30;
const CENTRAL_HEADER_LEN: usize = 46;
const EOCD_LEN: usize = 22;
const ZIP64_EOCD_LEN: usize = 56;
const ZIP64_LOCATOR_LEN: usize = 20;
/// The classic end record may be followed by a comment of at most this many bytes.
const MAX_COMMENT: usize = 0xFFFF;
/// Sizes and offsets at or above this are stored in a zip64 extra field.
const ZIP64_LIMIT: u64 = 0xFFFF_FFFF;
/// Alignment of every record's data (torch's `kFieldAlignment`).
pub(crate) const DATA_ALIGNMENT: u64 = 64;

/// General-purpose flag bits.
const FLAG_ENCRYPTED: u16 = 1;
const FLAG_DESCRIPTOR: u16 = 1 << 3;
const FLAG_UTF8: u16 = 1 << 11;

/// One stored entry: its name and where its bytes lie in the archive.
#[derive(Debug, Clone)]
pub(crate) struct ZipEntry {
    pub(crate) name: String,
    pub(crate) data: Range<usize>,
    pub(crate) crc32: u32,
}

fn corrupt(what: &str, message: impl Into<String>) -> Error {
    Error::Corrupt { what: format!("torch zip {what}"), message: message.into() }
}

/// Little-endian reads that fail instead of panicking.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn at(bytes: &'a [u8], pos: usize) -> Self {
        Cursor { bytes, pos }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        let s = self.take(2)?;
        Some(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        let s = self.take(4)?;
        Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let s = self.take(8)?;
        let mut b = [0u8; 8];
        b.copy_from_slice(s);
        Some(u64::from_le_bytes(b))
    }
}

fn to_usize(v: u64, what: &str, field: &str) -> Result<usize> {
    usize::try_from(v).map_err(|_| corrupt(what, format!("{field} {v} does not fit this host's address space")))
}

/// Where the central directory is and how many entries it declares.
struct Directory {
    offset: u64,
    size: u64,
    entries: u64,
    /// Start of the end records (the central directory must end at or before it).
    end: usize,
}

fn find_directory(bytes: &[u8], what: &str) -> Result<Directory> {
    if bytes.len() < EOCD_LEN {
        return Err(corrupt(what, format!("{} bytes is too short for a zip archive (file truncated?)", bytes.len())));
    }
    // The end record is the last 22 bytes plus an optional comment; search backwards.
    let last = bytes.len() - EOCD_LEN;
    let first = last.saturating_sub(MAX_COMMENT);
    let mut found = None;
    for pos in (first..=last).rev() {
        let mut c = Cursor::at(bytes, pos);
        if c.u32() != Some(EOCD_SIG) {
            continue;
        }
        let mut c = Cursor::at(bytes, pos + 20);
        if let Some(comment) = c.u16()
            && pos + EOCD_LEN + usize::from(comment) == bytes.len()
        {
            found = Some(pos);
            break;
        }
    }
    let Some(eocd) = found else {
        return Err(corrupt(what, "no end-of-central-directory record found (file truncated or not a zip archive)"));
    };
    let mut c = Cursor::at(bytes, eocd + 4);
    let (disk, cd_disk, n_disk, n_total) = (c.u16(), c.u16(), c.u16(), c.u16());
    let (cd_size, cd_offset) = (c.u32(), c.u32());
    let (Some(disk), Some(cd_disk), Some(n_disk), Some(n_total), Some(cd_size), Some(cd_offset)) =
        (disk, cd_disk, n_disk, n_total, cd_size, cd_offset)
    else {
        return Err(corrupt(what, "truncated end-of-central-directory record"));
    };
    let mut dir = Directory { offset: cd_offset.into(), size: cd_size.into(), entries: n_total.into(), end: eocd };

    // A zip64 locator right before the end record points at the zip64 end record, which holds
    // the real 64-bit values (torch always writes both).
    let locator =
        eocd.checked_sub(ZIP64_LOCATOR_LEN).filter(|&p| Cursor::at(bytes, p).u32() == Some(ZIP64_LOCATOR_SIG));
    if let Some(loc) = locator {
        let mut c = Cursor::at(bytes, loc + 4);
        let (Some(zdisk), Some(z_offset), Some(disks)) = (c.u32(), c.u64(), c.u32()) else {
            return Err(corrupt(what, "truncated zip64 end-of-central-directory locator"));
        };
        if zdisk != 0 || disks > 1 {
            return Err(corrupt(what, format!("multi-disk zip archives are not supported ({disks} disks)")));
        }
        let z = to_usize(z_offset, what, "zip64 end record offset")?;
        if z.checked_add(ZIP64_EOCD_LEN).is_none_or(|e| e > loc) {
            return Err(corrupt(what, format!("zip64 end record offset {z_offset} lies past its locator at {loc}")));
        }
        let mut c = Cursor::at(bytes, z);
        if c.u32() != Some(ZIP64_EOCD_SIG) {
            return Err(corrupt(what, format!("no zip64 end-of-central-directory record at offset {z_offset}")));
        }
        let _record_size = c.u64();
        let _versions = c.u32();
        let (Some(d), Some(cd_d), Some(n_d), Some(n_t), Some(size), Some(offset)) =
            (c.u32(), c.u32(), c.u64(), c.u64(), c.u64(), c.u64())
        else {
            return Err(corrupt(what, "truncated zip64 end-of-central-directory record"));
        };
        if d != 0 || cd_d != 0 || n_d != n_t {
            return Err(corrupt(what, "multi-disk zip archives are not supported"));
        }
        dir = Directory { offset, size, entries: n_t, end: z };
    } else {
        if disk != 0 || cd_disk != 0 || n_disk != n_total {
            return Err(corrupt(what, "multi-disk zip archives are not supported"));
        }
        if cd_size == u32::MAX || cd_offset == u32::MAX || n_total == u16::MAX {
            return Err(corrupt(what, "end record needs zip64 values but there is no zip64 locator"));
        }
    }
    Ok(dir)
}

/// Reads the central directory of a stored-only zip archive held in `bytes`. Every entry's data
/// range is checked to lie within `bytes`; names are UTF-8 and unique; records (local header and
/// data) do not overlap each other or the central directory, so no entry aliases another's bytes
/// and the entries' data together is at most the archive's size.
pub(crate) fn read_entries(bytes: &[u8], what: &str) -> Result<Vec<ZipEntry>> {
    let dir = find_directory(bytes, what)?;
    let start = to_usize(dir.offset, what, "central directory offset")?;
    let size = to_usize(dir.size, what, "central directory size")?;
    let end = start.checked_add(size).filter(|&e| e <= dir.end).ok_or_else(|| {
        corrupt(
            what,
            format!("central directory ({} bytes at offset {}) runs past the end records", dir.size, dir.offset),
        )
    })?;
    if dir.entries > MAX_ZIP_ENTRIES {
        return Err(corrupt(what, format!("declares {} entries; at most {MAX_ZIP_ENTRIES} are accepted", dir.entries)));
    }
    if dir.entries.saturating_mul(CENTRAL_HEADER_LEN as u64) > dir.size {
        return Err(corrupt(
            what,
            format!("declares {} entries but its central directory is only {} bytes", dir.entries, dir.size),
        ));
    }
    // Bounded by the two checks above.
    let mut entries: Vec<ZipEntry> = Vec::with_capacity(dir.entries as usize);
    let mut names = std::collections::HashSet::with_capacity(dir.entries as usize);
    // (local header offset, data end, entry index) of every record, for the overlap check.
    let mut records: Vec<(usize, usize, usize)> = Vec::with_capacity(dir.entries as usize);
    let mut c = Cursor::at(bytes, start);
    for index in 0..dir.entries {
        let header = c.pos;
        let truncated = || corrupt(what, format!("central directory entry {index} is truncated"));
        if header + CENTRAL_HEADER_LEN > end || c.u32() != Some(CENTRAL_SIG) {
            return Err(corrupt(
                what,
                format!("central directory entry {index} at offset {header} has a bad signature"),
            ));
        }
        let _made_by = c.u16().ok_or_else(truncated)?;
        let _needed = c.u16().ok_or_else(truncated)?;
        let flags = c.u16().ok_or_else(truncated)?;
        let method = c.u16().ok_or_else(truncated)?;
        let _time_date = c.u32().ok_or_else(truncated)?;
        let crc32 = c.u32().ok_or_else(truncated)?;
        let mut csize = u64::from(c.u32().ok_or_else(truncated)?);
        let mut usize_ = u64::from(c.u32().ok_or_else(truncated)?);
        let name_len = usize::from(c.u16().ok_or_else(truncated)?);
        let extra_len = usize::from(c.u16().ok_or_else(truncated)?);
        let comment_len = usize::from(c.u16().ok_or_else(truncated)?);
        let disk = c.u16().ok_or_else(truncated)?;
        let _attrs = c.take(6).ok_or_else(truncated)?;
        let mut offset = u64::from(c.u32().ok_or_else(truncated)?);
        if c.pos + name_len + extra_len + comment_len > end {
            return Err(truncated());
        }
        let name_bytes = c.take(name_len).ok_or_else(truncated)?;
        let extra = c.take(extra_len).ok_or_else(truncated)?;
        c.take(comment_len).ok_or_else(truncated)?;
        let name = std::str::from_utf8(name_bytes)
            .map_err(|_| corrupt(what, format!("central directory entry {index} has a name that is not UTF-8")))?
            .to_owned();

        // Zip64 extra field: the 64-bit values of the fields that hold 0xFFFFFFFF, in order.
        let mut e = Cursor::at(extra, 0);
        while e.pos + 4 <= extra.len() {
            let (Some(id), Some(len)) = (e.u16(), e.u16()) else { break };
            let Some(body) = e.take(usize::from(len)) else {
                return Err(corrupt(what, format!("entry {name:?} has a truncated extra field")));
            };
            if id != 1 {
                continue;
            }
            let mut z = Cursor::at(body, 0);
            let bad = || corrupt(what, format!("entry {name:?} has a short zip64 extra field"));
            if usize_ == ZIP64_LIMIT {
                usize_ = z.u64().ok_or_else(bad)?;
            }
            if csize == ZIP64_LIMIT {
                csize = z.u64().ok_or_else(bad)?;
            }
            if offset == ZIP64_LIMIT {
                offset = z.u64().ok_or_else(bad)?;
            }
        }

        if flags & FLAG_ENCRYPTED != 0 {
            return Err(corrupt(what, format!("entry {name:?} is encrypted")));
        }
        if method != 0 {
            return Err(corrupt(
                what,
                format!("entry {name:?} is compressed (method {method}); torch writes stored (uncompressed) entries"),
            ));
        }
        if csize != usize_ {
            return Err(corrupt(what, format!("stored entry {name:?} has compressed size {csize} != size {usize_}")));
        }
        if disk != 0 {
            return Err(corrupt(
                what,
                format!("entry {name:?} is on disk {disk}; multi-disk archives are not supported"),
            ));
        }

        // The local header says where the data starts (its name and extra lengths may differ
        // from the central directory's: torch pads only the local one).
        let local = to_usize(offset, what, "local header offset")?;
        let mut l = Cursor::at(bytes, local);
        if l.u32() != Some(LOCAL_SIG) {
            return Err(corrupt(what, format!("entry {name:?}: no local header at offset {offset}")));
        }
        let local_truncated = || corrupt(what, format!("entry {name:?}: truncated local header at offset {offset}"));
        l.take(22).ok_or_else(local_truncated)?;
        let l_name_len = usize::from(l.u16().ok_or_else(local_truncated)?);
        let l_extra_len = usize::from(l.u16().ok_or_else(local_truncated)?);
        let l_name = l.take(l_name_len).ok_or_else(local_truncated)?;
        if l_name != name_bytes {
            return Err(corrupt(what, format!("entry {name:?}: local header names a different file")));
        }
        l.take(l_extra_len).ok_or_else(local_truncated)?;
        let data_start = l.pos;
        let len = to_usize(usize_, what, "entry size")?;
        let data_end = data_start.checked_add(len).filter(|&e| e <= bytes.len()).ok_or_else(|| {
            corrupt(
                what,
                format!(
                    "entry {name:?}: {usize_} bytes at offset {data_start} run past the end of the archive ({} bytes; truncated?)",
                    bytes.len()
                ),
            )
        })?;
        if !names.insert(name.clone()) {
            return Err(corrupt(what, format!("entry {name:?} appears twice")));
        }
        records.push((local, data_end, entries.len()));
        entries.push(ZipEntry { name, data: data_start..data_end, crc32 });
    }
    check_disjoint(&entries, &mut records, start, what)?;
    Ok(entries)
}

/// Refuses records (`(local header offset, data end, entry index)`) that overlap each other or
/// run into the central directory at `directory`: a crafted archive could otherwise point a
/// storage at `data.pkl`'s bytes, or many entries at the same bytes (which would also make
/// checksum verification quadratic).
fn check_disjoint(
    entries: &[ZipEntry],
    records: &mut [(usize, usize, usize)],
    directory: usize,
    what: &str,
) -> Result<()> {
    records.sort_unstable();
    let name = |i: usize| entries.get(i).map_or("?", |e| e.name.as_str());
    for pair in records.windows(2) {
        let [(a_start, a_end, a), (b_start, b_end, b)] = *pair else { continue };
        if b_start < a_end {
            return Err(corrupt(
                what,
                format!(
                    "entries {:?} (bytes {a_start}..{a_end}) and {:?} (bytes {b_start}..{b_end}) overlap",
                    name(a),
                    name(b)
                ),
            ));
        }
    }
    if let Some(&(last_start, last_end, last)) = records.last()
        && last_end > directory
    {
        return Err(corrupt(
            what,
            format!(
                "entry {:?} (bytes {last_start}..{last_end}) runs into the central directory at offset {directory}",
                name(last)
            ),
        ));
    }
    Ok(())
}

/// libstdc++/boost `hash_combine`, as torch's `c10::hash_combine` computes it on 64-bit hosts.
pub(crate) fn hash_combine(seed: u64, value: u64) -> u64 {
    seed ^ value.wrapping_add(0x9e37_79b9).wrapping_add(seed << 6).wrapping_add(seed >> 2)
}

/// Writes a zip archive record by record the way miniz does for torch, tracking what torch's
/// serialization id needs (record names in write order, the combined CRC of data descriptors).
pub(crate) struct ZipWriter<W: Write> {
    out: W,
    pos: u64,
    archive: String,
    central: Vec<u8>,
    records: u64,
    /// Record names (without the archive prefix), in write order.
    pub(crate) names: Vec<String>,
    /// `combined_uncomp_crc32_` of `PyTorchStreamWriter`.
    pub(crate) combined_crc: u64,
    /// When records take zip64 fields ([`Zip64Limits::TORCH`]; tests lower them).
    limits: Zip64Limits,
}

/// The thresholds at which a record gets zip64 fields: its size, or its local header's offset,
/// at or above them. Torch uses `0xFFFFFFFF` for both (`size >= MZ_UINT32_MAX ||
/// cursor >= MZ_UINT32_MAX` in `getPadding` and in miniz's `mz_zip_writer_add_mem_ex_v2`).
///
/// Tests lower them to get zip64 records without writing 4 GiB. Only a lowered `size` gives an
/// archive torch can read: torch <= 2.5 (miniz 2.1.0) checks every central directory entry whose
/// 32-bit compressed size is not the `0xFFFFFFFF` sentinel with the raw 32-bit local header
/// offset, `offset32 + 30 + size <= archive size`, which the offset sentinel `0xFFFFFFFF` passes
/// only in an archive of 4 GiB or more (which every archive that needs an offset field is). A lowered
/// `offset` is for checking ferry's own layout and reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Zip64Limits {
    /// Records of at least this many bytes take zip64 size fields.
    pub(crate) size: u64,
    /// Records whose local header starts at or past this offset take a zip64 offset field.
    pub(crate) offset: u64,
}

impl Zip64Limits {
    /// Torch's thresholds: `0xFFFFFFFF` for both.
    pub(crate) const TORCH: Zip64Limits = Zip64Limits { size: ZIP64_LIMIT, offset: ZIP64_LIMIT };
}

impl<W: Write> ZipWriter<W> {
    pub(crate) fn with_zip64_limits(out: W, archive: &str, limits: Zip64Limits) -> Self {
        ZipWriter {
            out,
            pos: 0,
            archive: archive.to_owned(),
            central: Vec::new(),
            records: 0,
            names: Vec::new(),
            combined_crc: 0,
            limits,
        }
    }

    /// One `m_pWrite` call of miniz: torch's write callback folds the CRC of anything that
    /// starts like a data descriptor into its serialization id, and so do we.
    fn write_call(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.len() >= 8 && buf[..4] == DESCRIPTOR_SIG.to_le_bytes() {
            let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
            self.combined_crc = hash_combine(self.combined_crc, u64::from(crc));
        }
        self.out.write_all(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Appends one stored record `<archive>/<name>` holding `data`.
    pub(crate) fn add(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
        let full = format!("{}/{name}", self.archive);
        let name_len = u16::try_from(full.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("zip entry name {full:?} is too long")))?;
        let cursor = self.pos;
        let size = data.len() as u64;
        let crc = crc32fast::hash(data);
        let big_size = size >= self.limits.size;
        let big_offset = cursor >= self.limits.offset;

        let mut zip64_local = Vec::new();
        if big_size || big_offset {
            let mut body = Vec::new();
            if big_size {
                body.extend_from_slice(&size.to_le_bytes());
                body.extend_from_slice(&0u64.to_le_bytes());
            }
            if big_offset {
                body.extend_from_slice(&cursor.to_le_bytes());
            }
            zip64_local.extend_from_slice(&1u16.to_le_bytes());
            zip64_local.extend_from_slice(&(body.len() as u16).to_le_bytes());
            zip64_local.extend_from_slice(&body);
        }
        // torch's detail::getPadding: pad so that the data starts on a 64-byte boundary.
        let start = cursor + (LOCAL_HEADER_LEN as u64) + u64::from(name_len) + 4 + zip64_local.len() as u64;
        let pad = (DATA_ALIGNMENT - start % DATA_ALIGNMENT) % DATA_ALIGNMENT;
        let mut padding = Vec::with_capacity(4 + pad as usize);
        padding.extend_from_slice(b"FB");
        padding.extend_from_slice(&(pad as u16).to_le_bytes());
        padding.resize(4 + pad as usize, b'Z');
        let extra_len = (zip64_local.len() + padding.len()) as u16;

        let flags = if size > 0 { FLAG_UTF8 | FLAG_DESCRIPTOR } else { FLAG_UTF8 };
        let mut local = Vec::with_capacity(LOCAL_HEADER_LEN);
        local.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes()); // version needed
        local.extend_from_slice(&flags.to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes()); // method: stored
        local.extend_from_slice(&0u32.to_le_bytes()); // time, date
        local.extend_from_slice(&[0u8; 12]); // crc, sizes: in the data descriptor
        local.extend_from_slice(&name_len.to_le_bytes());
        local.extend_from_slice(&extra_len.to_le_bytes());
        self.write_call(&local)?;
        self.write_call(full.as_bytes())?;
        if !zip64_local.is_empty() {
            self.write_call(&zip64_local)?;
        }
        self.write_call(&padding)?;
        debug_assert_eq!(self.pos % DATA_ALIGNMENT, 0);
        if !data.is_empty() {
            self.write_call(data)?;
            let mut descriptor = Vec::with_capacity(24);
            descriptor.extend_from_slice(&DESCRIPTOR_SIG.to_le_bytes());
            descriptor.extend_from_slice(&crc.to_le_bytes());
            if zip64_local.is_empty() {
                descriptor.extend_from_slice(&(size as u32).to_le_bytes());
                descriptor.extend_from_slice(&(size as u32).to_le_bytes());
            } else {
                descriptor.extend_from_slice(&size.to_le_bytes());
                descriptor.extend_from_slice(&size.to_le_bytes());
            }
            self.write_call(&descriptor)?;
        }

        // Central directory header.
        let mut zip64_central = Vec::new();
        if big_size || big_offset {
            let mut body = Vec::new();
            if big_size {
                body.extend_from_slice(&size.to_le_bytes());
                body.extend_from_slice(&size.to_le_bytes());
            }
            if big_offset {
                body.extend_from_slice(&cursor.to_le_bytes());
            }
            zip64_central.extend_from_slice(&1u16.to_le_bytes());
            zip64_central.extend_from_slice(&(body.len() as u16).to_le_bytes());
            zip64_central.extend_from_slice(&body);
        }
        let c = &mut self.central;
        c.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes()); // made by
        c.extend_from_slice(&0u16.to_le_bytes()); // needed
        c.extend_from_slice(&flags.to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes()); // method
        c.extend_from_slice(&0u32.to_le_bytes()); // time, date
        c.extend_from_slice(&crc.to_le_bytes());
        let size32 = if big_size { u32::MAX } else { size as u32 };
        c.extend_from_slice(&size32.to_le_bytes());
        c.extend_from_slice(&size32.to_le_bytes());
        c.extend_from_slice(&name_len.to_le_bytes());
        c.extend_from_slice(&(zip64_central.len() as u16).to_le_bytes());
        c.extend_from_slice(&0u16.to_le_bytes()); // comment
        c.extend_from_slice(&0u16.to_le_bytes()); // disk
        c.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        c.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        let offset32 = if big_offset { u32::MAX } else { cursor as u32 };
        c.extend_from_slice(&offset32.to_le_bytes());
        c.extend_from_slice(full.as_bytes());
        c.extend_from_slice(&zip64_central);

        self.records += 1;
        self.names.push(name.to_owned());
        Ok(())
    }

    /// Writes the central directory and the end records; returns the sink.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        let cd_offset = self.pos;
        let cd_size = self.central.len() as u64;
        let central = std::mem::take(&mut self.central);
        self.write_call(&central)?;

        let zip64_at = self.pos;
        let mut end = Vec::with_capacity(ZIP64_EOCD_LEN + ZIP64_LOCATOR_LEN + EOCD_LEN);
        end.extend_from_slice(&ZIP64_EOCD_SIG.to_le_bytes());
        end.extend_from_slice(&((ZIP64_EOCD_LEN - 12) as u64).to_le_bytes());
        end.extend_from_slice(&0x031Eu16.to_le_bytes()); // made by: Unix, 3.0 (miniz's constant)
        end.extend_from_slice(&0x002Du16.to_le_bytes()); // needed: 4.5 (zip64)
        end.extend_from_slice(&0u32.to_le_bytes());
        end.extend_from_slice(&0u32.to_le_bytes());
        end.extend_from_slice(&self.records.to_le_bytes());
        end.extend_from_slice(&self.records.to_le_bytes());
        end.extend_from_slice(&cd_size.to_le_bytes());
        end.extend_from_slice(&cd_offset.to_le_bytes());
        end.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
        end.extend_from_slice(&0u32.to_le_bytes());
        end.extend_from_slice(&zip64_at.to_le_bytes());
        end.extend_from_slice(&1u32.to_le_bytes());
        end.extend_from_slice(&EOCD_SIG.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        let n16 = self.records.min(u64::from(u16::MAX)) as u16;
        end.extend_from_slice(&n16.to_le_bytes());
        end.extend_from_slice(&n16.to_le_bytes());
        end.extend_from_slice(&(cd_size.min(ZIP64_LIMIT) as u32).to_le_bytes());
        end.extend_from_slice(&(cd_offset.min(ZIP64_LIMIT) as u32).to_le_bytes());
        end.extend_from_slice(&0u16.to_le_bytes());
        self.write_call(&end)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(limit: u64, records: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = ZipWriter::with_zip64_limits(Vec::new(), "arch", Zip64Limits { size: limit, offset: limit });
        for (name, data) in records {
            w.add(name, data).unwrap();
        }
        w.finish().unwrap()
    }

    #[test]
    fn round_trip_with_alignment_and_empty_records() {
        let bytes = archive(ZIP64_LIMIT, &[("a", b"hello"), ("empty", b""), ("data/0", &[7u8; 100])]);
        let entries = read_entries(&bytes, "t").unwrap();
        let names: Vec<_> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["arch/a", "arch/empty", "arch/data/0"]);
        for e in &entries {
            assert_eq!(e.data.start % 64, 0, "{}", e.name);
            assert_eq!(e.crc32, crc32fast::hash(&bytes[e.data.clone()]));
        }
        assert_eq!(&bytes[entries[0].data.clone()], b"hello");
        assert!(entries[1].data.is_empty());
    }

    #[test]
    fn zip64_fields_round_trip() {
        // A tiny zip64 threshold forces zip64 extra fields for sizes and offsets.
        let bytes = archive(16, &[("small", b"abc"), ("big", &[1u8; 40]), ("later", b"xy")]);
        let entries = read_entries(&bytes, "t").unwrap();
        assert_eq!(&bytes[entries[1].data.clone()], &[1u8; 40]);
        assert_eq!(&bytes[entries[2].data.clone()], b"xy");
        for e in &entries {
            assert_eq!(e.data.start % 64, 0, "{}", e.name);
        }
    }

    #[test]
    fn descriptor_lookalike_data_is_folded_into_the_id_crc() {
        let mut w = ZipWriter::with_zip64_limits(Vec::new(), "a", Zip64Limits::TORCH);
        let data = [0x50, 0x4b, 0x07, 0x08, 1, 0, 0, 0, 9];
        w.add("x", &data).unwrap();
        let expect = hash_combine(hash_combine(0, 1), u64::from(crc32fast::hash(&data)));
        assert_eq!(w.combined_crc, expect);
    }

    #[test]
    fn truncations_fail_cleanly() {
        let bytes = archive(ZIP64_LIMIT, &[("a", b"hello"), ("b", &[3u8; 200])]);
        for cut in [0, 1, 21, 22, 64, 100, bytes.len() / 2, bytes.len() - 23, bytes.len() - 1] {
            let err = read_entries(&bytes[..cut], "t").unwrap_err().to_string();
            assert!(err.contains("truncated") || err.contains("too short") || err.contains("no end"), "{cut}: {err}");
        }
    }
}
