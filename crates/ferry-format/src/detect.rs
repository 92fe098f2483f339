//! [`FileFormat`]: which of the three formats a file is, decided by its name and checked against
//! its first bytes, so a misnamed file gets an error saying what it really holds.

use ferry_core::{Error, Result};
use std::fmt;
use std::io::Read;
use std::path::Path;

use crate::limits::SNIFF_BYTES;

/// The message every legacy (non-zip) torch file gets. Tests match on it.
pub(crate) const LEGACY_MESSAGE: &str = "legacy (pre-1.6) torch.save format is not supported; re-save it with torch >= 1.6 (torch.save's default zip format)";

/// A tensor file format ferry reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileFormat {
    /// `torch.save`'s zip format (torch >= 1.6): `.ckpt`, `.pt`, `.pth`.
    TorchZip,
    /// A torch zip file compressed with gzip as a whole: `.ckpt.gz` (any `.gz`).
    TorchZipGz,
    /// Hugging Face safetensors: `.safetensors`.
    Safetensors,
}

impl FileFormat {
    /// The format a file's name says it has, without opening it.
    pub fn from_name(path: &Path) -> Result<FileFormat> {
        let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if name.ends_with(".safetensors") {
            Ok(FileFormat::Safetensors)
        } else if name.ends_with(".gz") {
            Ok(FileFormat::TorchZipGz)
        } else if name.ends_with(".ckpt") || name.ends_with(".pt") || name.ends_with(".pth") {
            Ok(FileFormat::TorchZip)
        } else {
            Err(Error::InvalidArgument(format!(
                "cannot tell the tensor format of {} from its name: expected .ckpt/.pt/.pth (torch zip), .ckpt.gz/.gz (gzip'd torch zip) or .safetensors",
                path.display()
            )))
        }
    }

    /// The format of the file at `path`: decided by its name, then checked against its first
    /// bytes (zip `PK\x03\x04`, gzip `1f 8b`, a safetensors header). A name and content that
    /// disagree give [`Error::Corrupt`] saying what the content is; a legacy (pre-1.6, non-zip)
    /// torch file gives [`Error::Corrupt`] saying so.
    pub fn detect(path: &Path) -> Result<FileFormat> {
        let format = FileFormat::from_name(path)?;
        let what = path.display().to_string();
        let (mut file, _) = crate::file::open_regular(path, &what)?;
        let mut head = Vec::with_capacity(SNIFF_BYTES);
        (&mut file)
            .take(SNIFF_BYTES as u64)
            .read_to_end(&mut head)
            .map_err(|e| Error::io(format!("reading tensor file {what}"), &e))?;
        check_content(format, &head, &what)?;
        Ok(format)
    }

    /// Short name used in messages.
    pub const fn name(self) -> &'static str {
        match self {
            FileFormat::TorchZip => "torch zip (.ckpt)",
            FileFormat::TorchZipGz => "gzip'd torch zip (.ckpt.gz)",
            FileFormat::Safetensors => "safetensors",
        }
    }
}

impl fmt::Display for FileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the first bytes of a file look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Content {
    Zip,
    Gzip,
    /// A pickle stream (torch < 1.6 `_legacy_save`) or a tar archive (older still).
    LegacyTorch,
    Safetensors,
    Empty,
    Unknown,
}

impl Content {
    fn describe(self) -> &'static str {
        match self {
            Content::Zip => "a zip archive (torch .ckpt)",
            Content::Gzip => "gzip-compressed data (.gz)",
            Content::LegacyTorch => "a legacy torch file",
            Content::Safetensors => "a safetensors file",
            Content::Empty => "empty (0 bytes)",
            Content::Unknown => "none of the supported formats",
        }
    }
}

/// Recognises a file's content from its first bytes (at most [`SNIFF_BYTES`] are looked at).
pub(crate) fn sniff(head: &[u8]) -> Content {
    if head.is_empty() {
        return Content::Empty;
    }
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return Content::Zip;
    }
    if head.starts_with(&[0x1f, 0x8b]) {
        return Content::Gzip;
    }
    // A safetensors header: u64 length, then the JSON object. Checked before the pickle test:
    // a header length such as 0x280 starts with the bytes 80 02, like a pickle's PROTO 2.
    if let Some(n) = head.get(..8) {
        let mut len = [0u8; 8];
        len.copy_from_slice(n);
        let n = u64::from_le_bytes(len);
        if n >= 2 && head.get(8) == Some(&b'{') {
            return Content::Safetensors;
        }
    }
    // Legacy torch.save: a pickle stream (PROTO opcode first), or a tar archive.
    if head.len() >= 2 && head[0] == 0x80 && (1..=5).contains(&head[1]) {
        return Content::LegacyTorch;
    }
    if head.get(257..262) == Some(b"ustar") {
        return Content::LegacyTorch;
    }
    Content::Unknown
}

/// Checks that `head` (the first bytes of the file) is what `format` says.
pub(crate) fn check_content(format: FileFormat, head: &[u8], what: &str) -> Result<()> {
    let content = sniff(head);
    let ok = matches!(
        (format, content),
        (FileFormat::TorchZip, Content::Zip)
            | (FileFormat::TorchZipGz, Content::Gzip)
            | (FileFormat::Safetensors, Content::Safetensors)
    );
    if ok {
        return Ok(());
    }
    if content == Content::LegacyTorch {
        return Err(Error::Corrupt { what: format!("torch file {what}"), message: LEGACY_MESSAGE.to_owned() });
    }
    if content == Content::Unknown && head.len() < 8 {
        return Err(Error::Corrupt {
            what: format!("tensor file {what}"),
            message: format!("only {} bytes: too short for {format} (truncated?)", head.len()),
        });
    }
    let hint = match content {
        Content::Zip => "; name it .ckpt",
        Content::Gzip => "; name it .ckpt.gz",
        Content::Safetensors => "; name it .safetensors",
        _ => "",
    };
    Err(Error::Corrupt {
        what: format!("tensor file {what}"),
        message: format!("named as {format} but its content is {}{hint}", content.describe()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_formats() {
        for (name, want) in [
            ("a/data_0.ckpt", FileFormat::TorchZip),
            ("x.PT", FileFormat::TorchZip),
            ("data_2.ckpt.gz", FileFormat::TorchZipGz),
            ("x.gz", FileFormat::TorchZipGz),
            ("s.safetensors", FileFormat::Safetensors),
        ] {
            assert_eq!(FileFormat::from_name(Path::new(name)).unwrap(), want, "{name}");
        }
        let err = FileFormat::from_name(Path::new("x.npy")).unwrap_err().to_string();
        assert!(err.contains("x.npy") && err.contains(".safetensors"), "{err}");
    }

    #[test]
    fn content_mismatch_is_named() {
        let err = check_content(FileFormat::TorchZip, &[0x1f, 0x8b, 8, 0], "f.ckpt").unwrap_err().to_string();
        assert!(err.contains("gzip-compressed") && err.contains(".ckpt.gz"), "{err}");
        let err = check_content(FileFormat::Safetensors, b"PK\x03\x04rest", "f.safetensors").unwrap_err().to_string();
        assert!(err.contains("zip archive"), "{err}");
        let err = check_content(FileFormat::TorchZip, &[0x80, 2, 0x8a, 10], "old.ckpt").unwrap_err().to_string();
        assert!(err.contains("legacy (pre-1.6)"), "{err}");
        let err = check_content(FileFormat::TorchZip, &[], "e.ckpt").unwrap_err().to_string();
        assert!(err.contains("empty"), "{err}");
        // A safetensors header of 0x280 bytes starts like a pickle's PROTO 2.
        let mut st = vec![0x80, 0x02, 0, 0, 0, 0, 0, 0, b'{'];
        st.resize(700, b' ');
        assert_eq!(sniff(&st), Content::Safetensors);
    }
}
