//! The qcow2 header check: what backupfs reads of an image before it lets QEMU open it.
//! A header is a request from whoever wrote the image; one that would make QEMU open
//! another file (a backing file, an external data file) or that QEMU would read by rules
//! backupfs does not know is refused. It never follows what a header names.

use std::fs::File;
use std::os::unix::fs::FileExt;

const MAGIC: &[u8; 4] = b"QFI\xfb";
/// The header extension naming an external data file ("DATA").
const EXT_DATA_FILE: u32 = 0x4441_5441;
const EXT_END: u32 = 0;

/// Incompatible feature bits (qcow2 version 3). QEMU refuses an image with a bit it does
/// not know; so does backupfs, with the bits QEMU 10 knows as its list. `dirty` passes: it
/// is what a hypervisor stopped with lazy refcounts leaves, and QEMU repairs the refcounts
/// of that same file. `corrupt` passes for reading (QEMU reads such an image, and a copy
/// is the best thing to have before a repair); writers are refused (QEMU would too).
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

/// QEMU's bounds on cluster_bits (512 B to 2 MiB clusters).
const MIN_CLUSTER_BITS: u32 = 9;
const MAX_CLUSTER_BITS: u32 = 21;
/// The fixed part of a version 3 header; version 2's is 72 bytes.
const V3_HEADER_LENGTH: u64 = 104;
const V2_HEADER_LENGTH: u64 = 72;
/// How much of the image one read takes (every lookup checks the header, on NFS too): a
/// page holds the header and extensions of every image qemu-img makes (they end near
/// 0x200); a longer table costs more reads, never a wrong answer.
const WINDOW: u64 = 4 << 10;

/// A header that passed the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The guest-visible size.
    pub size: u64,
    /// QEMU found its metadata inconsistent: it opens the image read-only only.
    pub corrupt: bool,
}

/// Why a file is not an image backupfs hands to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// No qcow2 magic: not a qcow2 image at all.
    #[error("not a qcow2 image")]
    NotQcow2,
    #[error("qcow2 version {0} (backupfs knows versions 2 and 3)")]
    Version(u32),
    #[error("its header names a backing file; backupfs opens no file a header names")]
    BackingFile,
    #[error("its header names an external data file; backupfs opens no file a header names")]
    DataFile,
    #[error("incompatible qcow2 features {0:#x} that backupfs does not know")]
    UnknownFeatures(u64),
    #[error("malformed qcow2 header: {0}")]
    Malformed(&'static str),
    #[error("cannot read its qcow2 header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads and checks the header of the image open as `file` (a descriptor backupfs opened
/// itself, so what is checked is what it then hands to QEMU).
pub fn check(file: &File) -> Result<Header, HeaderError> {
    check_bytes(&mut Window::new(file))
}

/// Bytes of the image by offset, read a window at a time. Bytes past the end of the file
/// read as zeros, as QEMU's file driver reads them.
trait Source {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize>;
}

impl Source for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
}

impl Source for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

struct Window<'a, S: Source + ?Sized> {
    source: &'a S,
    start: u64,
    bytes: Vec<u8>,
}

impl<'a, S: Source + ?Sized> Window<'a, S> {
    fn new(source: &'a S) -> Self {
        Window {
            source,
            start: 0,
            bytes: Vec::new(),
        }
    }

    /// `N` bytes at `offset`.
    fn get<const N: usize>(&mut self, offset: u64) -> std::io::Result<[u8; N]> {
        let end = offset + N as u64;
        if offset < self.start || end > self.start + self.bytes.len() as u64 {
            self.start = offset;
            self.bytes = vec![0; WINDOW as usize];
            let mut filled = 0;
            while filled < self.bytes.len() {
                match self
                    .source
                    .read_at(&mut self.bytes[filled..], offset + filled as u64)
                {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let at = (offset - self.start) as usize;
        let mut out = [0u8; N];
        out.copy_from_slice(&self.bytes[at..at + N]);
        Ok(out)
    }

    fn u32(&mut self, offset: u64) -> std::io::Result<u32> {
        Ok(u32::from_be_bytes(self.get(offset)?))
    }

    fn u64(&mut self, offset: u64) -> std::io::Result<u64> {
        Ok(u64::from_be_bytes(self.get(offset)?))
    }
}

/// The check, on the rules QEMU 10's qcow2 driver opens an image by (block/qcow2.c:
/// qcow2_do_open, qcow2_read_extensions): at least as strict on everything that could
/// make it open another file.
fn check_bytes<S: Source + ?Sized>(image: &mut Window<'_, S>) -> Result<Header, HeaderError> {
    if &image.get::<4>(0)? != MAGIC {
        return Err(HeaderError::NotQcow2);
    }
    let version = image.u32(4)?;
    if !(2..=3).contains(&version) {
        return Err(HeaderError::Version(version));
    }
    if image.u64(8)? != 0 {
        return Err(HeaderError::BackingFile);
    }
    let cluster_bits = image.u32(20)?;
    if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(HeaderError::Malformed("cluster size out of range"));
    }
    let cluster_size = 1u64 << cluster_bits;
    let size = image.u64(24)?;
    let (incompatible, header_length) = if version == 2 {
        (0, V2_HEADER_LENGTH)
    } else {
        (image.u64(72)?, u64::from(image.u32(100)?))
    };
    if version == 3 && !(V3_HEADER_LENGTH..=cluster_size).contains(&header_length) {
        return Err(HeaderError::Malformed("header length out of range"));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(HeaderError::DataFile);
    }
    let unknown = incompatible & !INCOMPAT_KNOWN;
    if unknown != 0 {
        return Err(HeaderError::UnknownFeatures(unknown));
    }
    // QEMU reads extensions up to the end of the first cluster (the backing file name
    // would end them earlier, but there is none). A data file extension is refused even
    // without its feature bit: it names a file, and nothing good comes of keeping it.
    let mut offset = header_length;
    while offset < cluster_size {
        let kind = image.u32(offset)?;
        let len = u64::from(image.u32(offset + 4)?);
        offset += 8;
        if offset > cluster_size || len > cluster_size - offset {
            return Err(HeaderError::Malformed(
                "a header extension runs past the first cluster",
            ));
        }
        match kind {
            EXT_END => break,
            EXT_DATA_FILE => return Err(HeaderError::DataFile),
            _ => {}
        }
        offset += len.div_ceil(8) * 8;
    }
    Ok(Header {
        size,
        corrupt: incompatible & INCOMPAT_CORRUPT != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header of a 1 GiB image with 64 KiB clusters, then `extensions`
    /// (type, data) and the end extension.
    fn image(incompatible: u64, extensions: &[(u32, &[u8])]) -> Vec<u8> {
        let mut h = MAGIC.to_vec();
        h.extend(3u32.to_be_bytes());
        h.extend(0u64.to_be_bytes()); // backing file offset
        h.extend(0u32.to_be_bytes()); // backing file size
        h.extend(16u32.to_be_bytes()); // cluster bits
        h.extend((1u64 << 30).to_be_bytes());
        h.resize(72, 0);
        h.extend(incompatible.to_be_bytes());
        h.extend([0u8; 16]); // compatible, autoclear
        h.extend(4u32.to_be_bytes()); // refcount order
        h.extend(112u32.to_be_bytes()); // header length
        h.resize(112, 0);
        for (kind, data) in extensions {
            h.extend(kind.to_be_bytes());
            h.extend((data.len() as u32).to_be_bytes());
            h.extend(*data);
            h.resize(h.len().div_ceil(8) * 8, 0);
        }
        h.extend([0u8; 8]);
        h
    }

    fn checked(bytes: &[u8]) -> Result<Header, HeaderError> {
        check_bytes(&mut Window::new(bytes))
    }

    #[test]
    fn a_plain_image_passes_with_its_size() {
        let features = (0x6803_f857, &b"feature table"[..]);
        let header = checked(&image(INCOMPAT_DIRTY, &[features])).unwrap();
        assert_eq!(
            header,
            Header {
                size: 1 << 30,
                corrupt: false
            }
        );
        assert!(checked(&image(INCOMPAT_CORRUPT, &[])).unwrap().corrupt);
        // Version 2: no feature fields, extensions right after 72 bytes.
        let mut v2 = image(0, &[]);
        v2[7] = 2;
        v2.truncate(72);
        assert_eq!(checked(&v2).unwrap().size, 1 << 30);
    }

    #[test]
    fn headers_naming_other_files_are_refused() {
        let mut backing = image(0, &[]);
        backing[15] = 0x70;
        assert!(matches!(checked(&backing), Err(HeaderError::BackingFile)));
        assert!(matches!(
            checked(&image(INCOMPAT_DATA_FILE, &[])),
            Err(HeaderError::DataFile)
        ));
        // The extension alone, behind another, without the feature bit.
        let extensions = [(0x1234_5678, &b"x"[..]), (EXT_DATA_FILE, &b"/victim"[..])];
        assert!(matches!(
            checked(&image(0, &extensions)),
            Err(HeaderError::DataFile)
        ));
    }

    #[test]
    fn unknown_features_versions_and_bad_layouts_are_refused() {
        assert!(matches!(
            checked(&image(1 << 5 | INCOMPAT_DIRTY, &[])),
            Err(HeaderError::UnknownFeatures(0x20))
        ));
        let mut v4 = image(0, &[]);
        v4[7] = 4;
        assert!(matches!(checked(&v4), Err(HeaderError::Version(4))));
        let mut huge = image(0, &[]);
        huge[23] = 30;
        assert!(matches!(checked(&huge), Err(HeaderError::Malformed(_))));
        let mut long = image(0, &[]);
        long[116..120].copy_from_slice(&u32::MAX.to_be_bytes());
        long[112..116].copy_from_slice(&1u32.to_be_bytes());
        assert!(matches!(checked(&long), Err(HeaderError::Malformed(_))));
        assert!(matches!(checked(b"QFI"), Err(HeaderError::NotQcow2)));
        assert!(matches!(checked(b""), Err(HeaderError::NotQcow2)));
    }

    #[test]
    fn extensions_past_the_first_window_are_read() {
        // 100 KiB of an unknown extension (25 windows), then the data file name: past the first cluster
        // of 64 KiB clusters, inside one of 2 MiB.
        let big = vec![7u8; 100 << 10];
        let extensions = [(0x1111_1111, &big[..]), (EXT_DATA_FILE, &b"/v"[..])];
        let mut image = image(0, &extensions);
        assert!(matches!(checked(&image), Err(HeaderError::Malformed(_))));
        image[23] = 21;
        assert!(matches!(checked(&image), Err(HeaderError::DataFile)));
    }
}
