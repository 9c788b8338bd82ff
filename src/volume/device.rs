//! Block devices: what an attachment gives the engine to read and write, whatever the
//! storage (a local file, a qcow2 export, an RBD image). A few positioned operations and
//! explicit capabilities; the fast paths of a local file (O_DIRECT, SEEK_DATA,
//! copy_file_range, reflinks) are reached only through `local_file()`, where there is one.
//! A device never decides policy (what to copy, what to check): the engine does.

use nix::fcntl::FallocateFlags;
use nix::unistd::Whence;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// How a device likes to be driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoHints {
    /// The request size that reaches the device's speed (bytes; a multiple of 1 MiB).
    pub request_size: usize,
    /// How many requests to keep in flight.
    pub queue_depth: usize,
}

impl Default for IoHints {
    fn default() -> Self {
        IoHints {
            request_size: 2 << 20,
            queue_depth: 2,
        }
    }
}

/// A volume, snapshot or backup attached to this node.
pub trait BlockDevice: Send + Sync {
    /// What it is, for messages (a path, an image name).
    fn describe(&self) -> String;

    fn size(&self) -> io::Result<u64>;

    /// Reads up to `buf.len()` bytes at `offset`: fewer only at the end of the device.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Writes all of `buf` at `offset`; a write past the end grows the device.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// [`write_at`](Self::write_at), returning only once the device is done with `buf`.
    /// A device that writes behind its caller (RBD) copies the buffer for `write_at`;
    /// a caller that keeps enough writes going by itself (the copier's workers) spares
    /// that copy and the memory it holds with this.
    fn write_at_waiting(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }

    /// Grows the device to `size`; never shrinks it.
    fn grow(&self, size: u64) -> io::Result<()>;

    /// Makes what was written durable.
    fn flush(&self) -> io::Result<()>;

    /// Makes `range` read as zeros, freeing the space where the device can, with the
    /// device's own alignment rules (what it cannot free, it zeroes).
    fn discard(&self, range: Range<u64>) -> io::Result<()>;

    /// The parts of `range` that may hold data, in order; the rest reads as zeros. A
    /// device that cannot tell says "all of it".
    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        Ok(if range.is_empty() {
            vec![]
        } else {
            vec![range]
        })
    }

    fn hints(&self) -> IoHints {
        IoHints::default()
    }

    /// The local file behind the device, for the fast paths that need one.
    fn local_file(&self) -> Option<&File> {
        None
    }

    /// `lseek(SEEK_DATA)`: the first offset at or after `offset` that may hold data; None
    /// when only holes follow (ENXIO).
    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        let size = self.size()?;
        if offset >= size {
            return Ok(None);
        }
        Ok(self
            .data_extents(offset..size)?
            .first()
            .map(|extent| extent.start.max(offset)))
    }

    /// `lseek(SEEK_HOLE)`: the first offset at or after `offset` in a hole (the end of
    /// the device counts as one); None past the end (ENXIO).
    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        let size = self.size()?;
        if offset >= size {
            return Ok(None);
        }
        let mut at = offset;
        for extent in self.data_extents(offset..size)? {
            if extent.start > at {
                break;
            }
            at = at.max(extent.end);
        }
        Ok(Some(at.min(size)))
    }
}

/// An anonymous mapping aligned for O_DIRECT. Its pages come zeroed from the kernel and go
/// back to it when the copy ends, so a finished copy leaves no memory behind.
///
/// A buffer of 2 MiB or more is aligned to 2 MiB and asks for transparent huge pages: an
/// O_DIRECT request into it is a few physically contiguous segments instead of one per
/// 4 KiB page, so a loop device (128 segments of at most 64 KiB) and a virtio disk (254
/// segments) take it in one or two requests instead of four or more, and the checksum
/// pass walks it with 512 times fewer TLB entries (measured: contrib/bench/README.md,
/// "Where a checksum incremental's time goes").
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
    /// The mapping's length (`len`, rounded up to whole huge pages for a big buffer).
    mapped: usize,
}

// SAFETY: the mapping is plain owned memory: moved between threads whole, and shared
// only as `&[u8]` (writing needs `&mut`).
unsafe impl Send for AlignedBuf {}
// SAFETY: as above; shared references give read-only access.
unsafe impl Sync for AlignedBuf {}

/// The size of a transparent huge page on x86-64 and of the PMD on most 64-bit machines.
const HUGE_PAGE: usize = 2 << 20;

impl AlignedBuf {
    pub fn new(len: usize) -> std::io::Result<AlignedBuf> {
        let huge = len >= HUGE_PAGE;
        let mapped = if huge {
            len.div_ceil(HUGE_PAGE) * HUGE_PAGE
        } else {
            len.max(1)
        };
        // A huge buffer is mapped one huge page longer, then trimmed to an aligned start.
        let reserve = if huge { mapped + HUGE_PAGE } else { mapped };
        // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut start = raw as usize;
        if huge {
            let aligned = start.next_multiple_of(HUGE_PAGE);
            // SAFETY: both pieces lie inside the mapping just made and nothing refers to
            // them; madvise only gives a hint (a kernel without THP refuses it: 4 KiB
            // pages then, which is only slower).
            unsafe {
                if aligned > start {
                    libc::munmap(raw, aligned - start);
                }
                let tail = aligned + mapped;
                if tail < start + reserve {
                    libc::munmap(tail as *mut libc::c_void, start + reserve - tail);
                }
                libc::madvise(aligned as *mut libc::c_void, mapped, libc::MADV_HUGEPAGE);
            }
            start = aligned;
        }
        let ptr = std::ptr::NonNull::new(start as *mut u8)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(AlignedBuf { ptr, len, mapped })
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping is valid for len bytes for the buffer's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped) };
    }
}

/// How a file device makes a range read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroRule {
    /// Punch a hole anywhere (a filesystem's file).
    PunchHole,
    /// Free only whole clusters of this size (a qcow2 export): the aligned middle is
    /// punched, the partial ends are zeroed.
    WholeClusters(u64),
}

/// A device that is a file: a volume file, a backup's data, a qcow2 export's raw view.
pub struct FileDevice {
    file: File,
    path: PathBuf,
    zero: ZeroRule,
    /// Writes past the end need the file grown first (a qcow2 export has a fixed size).
    fixed_size: bool,
    /// Sizes are whole multiples of this (qcow2: sectors of 512 bytes).
    size_unit: u64,
    hints: IoHints,
    /// The last run of data `data_extents` found (from SEEK_DATA to SEEK_HOLE). SEEK_HOLE
    /// walks every extent up to the next hole, so on a fragmented dense file asking it
    /// again for each chunk cost time quadratic in the extents (16k extents in 1 GiB:
    /// 0.41 s for one pass of 2 MiB chunks); a chunk inside this run needs no lseek.
    /// Only data is remembered: a hole read as data still reads as zeros.
    known_data: parking_lot::Mutex<Range<u64>>,
}

impl FileDevice {
    pub fn new(file: File, path: impl Into<PathBuf>) -> FileDevice {
        FileDevice {
            file,
            path: path.into(),
            zero: ZeroRule::PunchHole,
            fixed_size: false,
            size_unit: 1,
            // 4 requests of 4 MiB: 16 MiB in flight keeps the disk busy while a worker
            // checksums what it read (faster than 4 of 2 MiB or 8 of 2 MiB: measured in
            // contrib/bench/README.md, "Where a checksum incremental's time goes").
            hints: IoHints {
                request_size: 4 << 20,
                queue_depth: 4,
            },
            known_data: parking_lot::Mutex::new(0..0),
        }
    }

    /// A file whose size changes only by truncate, to whole sectors, and that frees whole
    /// clusters only (a qemu-storage-daemon export of a qcow2 image).
    pub fn exported(file: File, path: impl Into<PathBuf>, cluster: u64) -> FileDevice {
        FileDevice {
            zero: ZeroRule::WholeClusters(cluster),
            fixed_size: true,
            size_unit: 512,
            ..FileDevice::new(file, path)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lseek(&self, offset: u64, whence: Whence) -> io::Result<Option<u64>> {
        match nix::unistd::lseek(&self.file, offset as libc::off_t, whence) {
            Ok(at) => Ok(Some(at as u64)),
            Err(nix::errno::Errno::ENXIO) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl BlockDevice for FileDevice {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        let mut retried = false;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // O_DIRECT refuses an unaligned piece (the tail of an odd-sized file):
                // the rest is read through the page cache.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !retried => {
                    retried = true;
                    clear_direct(&self.file)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.fixed_size {
            self.grow(offset + buf.len() as u64)?;
        }
        self.file.write_all_at(buf, offset)
    }

    fn grow(&self, size: u64) -> io::Result<()> {
        if size > self.size()? {
            self.file
                .set_len(size.div_ceil(self.size_unit) * self.size_unit)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, range: Range<u64>) -> io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        *self.known_data.lock() = 0..0;
        match self.zero {
            ZeroRule::PunchHole => zero_range(&self.file, range),
            ZeroRule::WholeClusters(cluster) => {
                let start = range.start.div_ceil(cluster) * cluster;
                let stop = range.end / cluster * cluster;
                if start < stop {
                    zero_range(&self.file, start..stop)?;
                    zero_in_place(&self.file, range.start..start)?;
                    zero_in_place(&self.file, stop..range.end)
                } else {
                    zero_in_place(&self.file, range)
                }
            }
        }
    }

    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        let mut extents = Vec::new();
        let mut at = range.start;
        while at < range.end {
            let known = self.known_data.lock().clone();
            if known.contains(&at) {
                let end = known.end.min(range.end);
                extents.push(at..end);
                at = end;
                continue;
            }
            let start = match self.lseek(at, Whence::SeekData) {
                Ok(Some(start)) if start < range.end => start,
                Ok(_) => break,
                // No SEEK_DATA here: everything may be data.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    extents.push(at..range.end);
                    break;
                }
                Err(e) => return Err(e),
            };
            let end = match self.lseek(start, Whence::SeekHole) {
                Ok(Some(end)) => {
                    *self.known_data.lock() = start..end;
                    end.min(range.end)
                }
                Ok(None) => range.end,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => range.end,
                Err(e) => return Err(e),
            };
            if end <= start {
                break;
            }
            extents.push(start..end);
            at = end;
        }
        Ok(extents)
    }

    fn hints(&self) -> IoHints {
        self.hints
    }

    fn local_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn seek_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.lseek(offset, Whence::SeekData)
    }

    fn seek_hole(&self, offset: u64) -> io::Result<Option<u64>> {
        self.lseek(offset, Whence::SeekHole)
    }
}

fn clear_direct(file: &File) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    fcntl(file, FcntlArg::F_SETFL(flags.difference(OFlag::O_DIRECT)))?;
    Ok(())
}

fn fallocate(file: &File, mode: FallocateFlags, range: &Range<u64>) -> io::Result<()> {
    nix::fcntl::fallocate(
        file,
        mode,
        range.start as libc::off_t,
        (range.end - range.start) as libc::off_t,
    )?;
    Ok(())
}

fn punch_hole(file: &File, range: &Range<u64>) -> io::Result<()> {
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        range,
    )
}

fn zero_fill(file: &File, range: &Range<u64>) -> io::Result<()> {
    fallocate(
        file,
        FallocateFlags::FALLOC_FL_ZERO_RANGE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        range,
    )
}

/// Writes zeros over `range`, 1 MiB at a time (where nothing better is offered).
fn write_zeros(file: &File, range: Range<u64>) -> io::Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = range.start;
    while at < range.end {
        let n = (range.end - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Zeroes a range: a hole where one can be punched, else FALLOC_FL_ZERO_RANGE, else
/// written zeros.
pub fn zero_range(file: &File, range: Range<u64>) -> io::Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    for zero in [punch_hole, zero_fill] {
        match zero(file, &range) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(e) => return Err(e),
        }
    }
    write_zeros(file, range)
}

/// Zeroes a range without asking for a hole (the partial clusters of an export).
fn zero_in_place(file: &File, range: Range<u64>) -> io::Result<()> {
    if range.is_empty() {
        return Ok(());
    }
    match zero_fill(file, &range) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => write_zeros(file, range),
        other => other,
    }
}

/// An in-memory device for tests: sparse (4 KiB pages that were never written are holes)
/// and able to fail on purpose at a chosen offset.
#[cfg(any(test, feature = "testing"))]
pub mod memory {
    use super::*;
    use parking_lot::Mutex;

    const PAGE: u64 = 4096;

    #[derive(Default, Clone)]
    pub struct Faults {
        /// A read of a range containing this offset fails with EIO.
        pub read_error_at: Option<u64>,
        /// Reads stop short here, as if the device ended.
        pub short_at: Option<u64>,
        /// A write of a range containing this offset fails with ENOSPC.
        pub write_error_at: Option<u64>,
        /// Discards fail with EIO.
        pub discard_error: bool,
        /// Flush fails with EIO.
        pub flush_error: bool,
        /// data_extents says "all data" (a device that cannot tell).
        pub no_extents: bool,
    }

    pub struct MemDevice {
        pub data: Mutex<Vec<u8>>,
        /// One per page: whether it was written (else a hole).
        pub pages: Mutex<Vec<bool>>,
        pub faults: Faults,
        pub hints: IoHints,
        pub discarded: Mutex<Vec<Range<u64>>>,
        pub writes: Mutex<u64>,
    }

    impl MemDevice {
        pub fn new(size: u64) -> MemDevice {
            MemDevice {
                data: Mutex::new(vec![0; size as usize]),
                pages: Mutex::new(vec![false; size.div_ceil(PAGE) as usize]),
                faults: Faults::default(),
                hints: IoHints {
                    request_size: 2 << 20,
                    queue_depth: 3,
                },
                discarded: Mutex::new(Vec::new()),
                writes: Mutex::new(0),
            }
        }

        /// A device holding `bytes` at `offset` (its pages become data).
        pub fn fill(&self, offset: u64, bytes: &[u8]) {
            self.data.lock()[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
            let mut pages = self.pages.lock();
            for page in offset / PAGE..(offset + bytes.len() as u64).div_ceil(PAGE) {
                pages[page as usize] = true;
            }
        }

        pub fn contents(&self) -> Vec<u8> {
            self.data.lock().clone()
        }
    }

    fn hits(range: &Range<u64>, at: Option<u64>) -> bool {
        at.is_some_and(|at| range.contains(&at))
    }

    impl BlockDevice for MemDevice {
        fn describe(&self) -> String {
            "memory".into()
        }

        fn size(&self) -> io::Result<u64> {
            Ok(self.data.lock().len() as u64)
        }

        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let data = self.data.lock();
            let mut end = (offset + buf.len() as u64).min(data.len() as u64);
            if let Some(short) = self.faults.short_at {
                end = end.min(short.max(offset));
            }
            if hits(&(offset..end.max(offset + 1)), self.faults.read_error_at) {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let n = end.saturating_sub(offset) as usize;
            buf[..n].copy_from_slice(&data[offset as usize..offset as usize + n]);
            Ok(n)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let end = offset + buf.len() as u64;
            if hits(&(offset..end), self.faults.write_error_at) {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.grow(end)?;
            self.fill(offset, buf);
            *self.writes.lock() += 1;
            Ok(())
        }

        fn grow(&self, size: u64) -> io::Result<()> {
            let mut data = self.data.lock();
            if size > data.len() as u64 {
                data.resize(size as usize, 0);
                self.pages
                    .lock()
                    .resize(size.div_ceil(PAGE) as usize, false);
            }
            Ok(())
        }

        fn flush(&self) -> io::Result<()> {
            if self.faults.flush_error {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Ok(())
        }

        fn discard(&self, range: Range<u64>) -> io::Result<()> {
            if self.faults.discard_error {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            self.data.lock()[range.start as usize..range.end as usize].fill(0);
            let mut pages = self.pages.lock();
            for page in range.start.div_ceil(PAGE)..range.end / PAGE {
                pages[page as usize] = false;
            }
            self.discarded.lock().push(range);
            Ok(())
        }

        fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
            if self.faults.no_extents {
                return Ok(vec![range]);
            }
            let pages = self.pages.lock();
            let mut extents: Vec<Range<u64>> = Vec::new();
            for page in range.start / PAGE..range.end.div_ceil(PAGE) {
                if !pages.get(page as usize).copied().unwrap_or(false) {
                    continue;
                }
                let piece = (page * PAGE).max(range.start)..((page + 1) * PAGE).min(range.end);
                match extents.last_mut() {
                    Some(last) if last.end == piece.start => last.end = piece.end,
                    _ => extents.push(piece),
                }
            }
            Ok(extents)
        }

        fn hints(&self) -> IoHints {
            self.hints
        }
    }
}

#[cfg(test)]
mod tests {
    use super::memory::MemDevice;
    use super::*;

    #[test]
    fn a_big_buffer_is_aligned_to_huge_pages_and_every_buffer_starts_zeroed() {
        for len in [0, 1, 4096, 1 << 20, HUGE_PAGE, 3 << 20, 4 << 20] {
            let mut buf = AlignedBuf::new(len).unwrap();
            assert_eq!(buf.len(), len);
            let at = buf.as_ptr() as usize;
            assert_eq!(at % 4096, 0, "{len}: page-aligned for O_DIRECT");
            if len >= HUGE_PAGE {
                assert_eq!(at % HUGE_PAGE, 0, "{len}: huge-page aligned");
            }
            assert!(buf.iter().all(|&b| b == 0), "{len}");
            // The whole length is ours to write.
            buf.fill(0xa5);
            assert!(buf.iter().all(|&b| b == 0xa5));
        }
    }

    /// A new empty file in a temporary directory (kept while the first value lives).
    fn scratch_file() -> (tempfile::TempDir, std::path::PathBuf, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (dir, path, file)
    }

    #[test]
    fn file_devices_report_holes_and_zero_ranges() {
        let (_dir, path, file) = scratch_file();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[7u8; 4096], 3 << 20).unwrap();
        let device = FileDevice::new(file, &path);
        let extents = device.data_extents(0..8 << 20).unwrap();
        assert_eq!(extents.len(), 1, "{extents:?}");
        assert!(extents[0].contains(&(3 << 20)));
        assert_eq!(device.seek_data(0).unwrap(), Some(extents[0].start));
        assert_eq!(device.seek_hole(3 << 20).unwrap(), Some(extents[0].end));
        device.discard((3 << 20) + 100..(3 << 20) + 200).unwrap();
        let mut buf = [1u8; 4096];
        assert_eq!(device.read_at(&mut buf, 3 << 20).unwrap(), 4096);
        assert!(buf[100..200].iter().all(|&b| b == 0));
        assert_eq!(buf[99], 7);
        assert_eq!(buf[200], 7);
        // Reads stop at the end; writes past it grow the file.
        let mut tail = [0u8; 10];
        assert_eq!(device.read_at(&mut tail, (8 << 20) - 4).unwrap(), 4);
        device.write_at(b"end", 9 << 20).unwrap();
        assert_eq!(device.size().unwrap(), (9 << 20) + 3);
    }

    #[test]
    fn chunk_by_chunk_extents_are_the_files_also_after_a_hole_is_punched() {
        let (_dir, path, file) = scratch_file();
        file.set_len(16 << 20).unwrap();
        file.write_all_at(&vec![7u8; 3 << 20], 1 << 20).unwrap();
        file.write_all_at(&vec![7u8; 1 << 20], 10 << 20).unwrap();
        let device = FileDevice::new(file, &path);
        let whole = device.data_extents(0..16 << 20).unwrap();
        // The same, asked 512 KiB at a time (the later chunks of a run of data answered
        // from what the first one found), then merged.
        let mut pieces: Vec<Range<u64>> = Vec::new();
        for at in (0..16u64 << 20).step_by(512 << 10) {
            for extent in device.data_extents(at..at + (512 << 10)).unwrap() {
                match pieces.last_mut() {
                    Some(last) if last.end == extent.start => last.end = extent.end,
                    _ => pieces.push(extent),
                }
            }
        }
        assert_eq!(pieces, whole);
        assert!(whole.iter().any(|e| e.contains(&(2 << 20))));
        assert!(!whole.iter().any(|e| e.contains(&(6 << 20))));
        // A hole punched through the device is seen at once.
        device.discard(1 << 20..4 << 20).unwrap();
        let after = device.data_extents(1 << 20..4 << 20).unwrap();
        assert!(after.is_empty(), "{after:?}");
    }

    #[test]
    fn a_fixed_size_device_grows_before_a_write_past_its_end_and_zeroes_partial_clusters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![9u8; 3 << 16]).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let device = FileDevice::exported(file, &path, 1 << 16);
        device.discard(100..(2 << 16) + 5).unwrap();
        let mut buf = vec![0u8; 3 << 16];
        device.read_at(&mut buf, 0).unwrap();
        assert!(buf[..100].iter().all(|&b| b == 9));
        assert!(buf[100..(2 << 16) + 5].iter().all(|&b| b == 0));
        assert!(buf[(2 << 16) + 5..].iter().all(|&b| b == 9));
        device.write_at(b"x", 4 << 16).unwrap();
        assert_eq!(device.size().unwrap(), (4 << 16) + 512, "whole sectors");
    }

    #[test]
    fn the_generic_seeks_follow_the_extents() {
        let device = MemDevice::new(64 << 10);
        device.fill(8 << 10, &[1; 4096]);
        device.fill(12 << 10, &[1; 4096]);
        device.fill(40 << 10, &[1; 100]);
        assert_eq!(device.seek_data(0).unwrap(), Some(8 << 10));
        assert_eq!(device.seek_hole(8 << 10).unwrap(), Some(16 << 10));
        assert_eq!(device.seek_hole(0).unwrap(), Some(0));
        assert_eq!(device.seek_data(17 << 10).unwrap(), Some(40 << 10));
        assert_eq!(device.seek_hole(40 << 10).unwrap(), Some(44 << 10));
        assert_eq!(device.seek_data(50 << 10).unwrap(), None);
        assert_eq!(device.seek_hole(64 << 10).unwrap(), None);
    }
}
