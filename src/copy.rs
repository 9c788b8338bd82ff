//! The one copier (the spec's `dd`, done properly): large aligned blocks, reading and
//! writing overlapped on two threads, holes skipped with SEEK_DATA/SEEK_HOLE, all-zero
//! blocks left as holes, checksums per block, progress, cancel and a rate limit.
//! It never allocates more than a few fixed buffers, whatever the size it copies.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

/// The unit of reading and writing.
pub const IO_BLOCK: usize = 4 << 20;
/// The unit of checksums (a divisor of `IO_BLOCK`).
pub const CHECKSUM_BLOCK: u64 = 1 << 20;
/// Runs of zeros at least this long are left as holes instead of written.
const ZERO_GRAIN: usize = 64 << 10;
/// Buffers in flight between the reader and the writer.
const BUFFERS: usize = 3;
/// Dirty data the copier lets the page cache hold for the destination.
const WRITEBACK_WINDOW: u64 = 32 << 20;
const ALIGN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cancelled")]
    Cancelled,
    #[error("read at offset {offset}: {source}")]
    Read { offset: u64, source: std::io::Error },
    #[error("write at offset {offset}: {source}")]
    Write { offset: u64, source: std::io::Error },
    #[error("source ended at {offset}, before the expected size")]
    ShortSource { offset: u64 },
}

impl CopyError {
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            CopyError::Read { source, .. } | CopyError::Write { source, .. } => {
                source.raw_os_error()
            }
            CopyError::Cancelled => Some(libc::ECANCELED),
            CopyError::ShortSource { .. } => Some(libc::EIO),
        }
    }
}

/// Counters another thread may read while a copy runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl Progress {
    pub fn get(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CopyOptions {
    /// The destination range already reads as zeros (a new thin volume): holes need no
    /// discard.
    pub dest_is_zero: bool,
    /// Bytes per second, 0 = unlimited.
    pub bps_limit: u64,
}

#[derive(Debug, Default)]
pub struct CopyOutcome {
    /// One per `CHECKSUM_BLOCK` of the source range; see [`block_sum`].
    pub checksums: Vec<u64>,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// The checksum of one block: 0 for an all-zero block (so holes need no hashing), else
/// xxh3-64 with 0 mapped to 1.
pub fn block_sum(block: &[u8]) -> u64 {
    if is_zero(block) {
        return 0;
    }
    match xxhash_rust::xxh3::xxh3_64(block) {
        0 => 1,
        sum => sum,
    }
}

pub fn is_zero(block: &[u8]) -> bool {
    let chunks = block.chunks_exact(16);
    let tail = chunks.remainder();
    // OR-folding 16-byte words lets the compiler vectorise the loop.
    let folded = chunks.fold(0u128, |acc, c| {
        acc | u128::from_ne_bytes(c.try_into().unwrap_or([0xff; 16]))
    });
    folded == 0 && tail.iter().all(|&b| b == 0)
}

/// A heap buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is plain owned memory, moved between threads whole.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("constant layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for the buffer's lifetime.
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
        let layout = std::alloc::Layout::from_size_align(self.len, ALIGN).expect("constant layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Where the data of a file lies, asked lazily with SEEK_DATA/SEEK_HOLE.
pub struct Extents<'a> {
    file: &'a File,
    end: u64,
    /// The known data extent at or after the last query.
    data: Option<(u64, u64)>,
}

impl<'a> Extents<'a> {
    pub fn new(file: &'a File, end: u64) -> Extents<'a> {
        Extents {
            file,
            end,
            data: None,
        }
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor we borrow.
        let rc = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(err);
        }
        Ok(Some(rc as u64))
    }

    /// The first data extent that ends after `offset`, clipped to the end; None if only
    /// holes remain. A filesystem without SEEK_DATA reports everything as data.
    pub fn next_data(&mut self, offset: u64) -> std::io::Result<Option<(u64, u64)>> {
        // Queries only move forward, so the gap before a cached extent is a known hole.
        if let Some((start, end)) = self.data
            && end > offset
        {
            return Ok(Some((start.max(offset), end)));
        }
        if offset >= self.end {
            return Ok(None);
        }
        let start = match self.seek(offset, libc::SEEK_DATA) {
            Ok(Some(start)) if start < self.end => start,
            Ok(_) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => offset,
            Err(e) => return Err(e),
        };
        let end = match self.seek(start, libc::SEEK_HOLE) {
            Ok(Some(end)) => end.min(self.end),
            Ok(None) => self.end,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.end,
            Err(e) => return Err(e),
        };
        self.data = Some((start, end));
        Ok(Some((start, end)))
    }
}

enum Piece {
    Data {
        offset: u64,
        len: usize,
        buf: AlignedBuf,
    },
    Hole {
        offset: u64,
        len: u64,
    },
}

/// Reads `len` bytes at `offset`, falling back from O_DIRECT when the kernel refuses an
/// unaligned piece (the tail of an odd-sized file).
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
    let mut done = 0;
    let mut retried = false;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !retried => {
                retried = true;
                clear_direct(file)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn clear_direct(file: &File) -> std::io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor we borrow.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_DIRECT) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A range to copy: `len` bytes from `src_offset` of the source to `dst_offset` of the
/// destination.
#[derive(Debug, Clone, Copy)]
pub struct Range {
    pub src_offset: u64,
    pub dst_offset: u64,
    pub len: u64,
}

impl Range {
    pub fn whole(len: u64) -> Range {
        Range {
            src_offset: 0,
            dst_offset: 0,
            len,
        }
    }
}

fn reader(
    src: &File,
    range: Range,
    cancel: &AtomicBool,
    free: Receiver<AlignedBuf>,
    out: SyncSender<std::result::Result<Piece, CopyError>>,
) {
    let end = range.src_offset + range.len;
    let mut extents = Extents::new(src, end);
    let mut offset = range.src_offset;
    while offset < end {
        if cancel.load(Ordering::Relaxed) {
            let _ = out.send(Err(CopyError::Cancelled));
            return;
        }
        let chunk_end = (offset + IO_BLOCK as u64).min(end);
        let next = match extents.next_data(offset) {
            Ok(next) => next,
            Err(source) => {
                let _ = out.send(Err(CopyError::Read { offset, source }));
                return;
            }
        };
        let piece = match next {
            // The whole chunk is a hole: skip it, and any chunks up to the data.
            None => Piece::Hole {
                offset,
                len: end - offset,
            },
            Some((start, _)) if start >= chunk_end => {
                // Round down to a chunk boundary so reads stay aligned.
                let aligned = range.src_offset
                    + (start - range.src_offset) / IO_BLOCK as u64 * IO_BLOCK as u64;
                Piece::Hole {
                    offset,
                    len: aligned.max(chunk_end) - offset,
                }
            }
            Some(_) => {
                let Ok(mut buf) = free.recv() else { return };
                let len = (chunk_end - offset) as usize;
                let want = len.div_ceil(ALIGN) * ALIGN;
                match read_full(src, &mut buf[..want.min(IO_BLOCK)], offset) {
                    Ok(n) if n >= len => {}
                    Ok(n) => {
                        let _ = out.send(Err(CopyError::ShortSource {
                            offset: offset + n as u64,
                        }));
                        return;
                    }
                    Err(source) => {
                        let _ = out.send(Err(CopyError::Read { offset, source }));
                        return;
                    }
                }
                Piece::Data { offset, len, buf }
            }
        };
        offset = match &piece {
            Piece::Data { offset, len, .. } => offset + *len as u64,
            Piece::Hole { offset, len } => offset + len,
        };
        if out.send(Ok(piece)).is_err() {
            return;
        }
    }
}

struct Writer<'a> {
    dst: &'a File,
    options: CopyOptions,
    range: Range,
    outcome: CopyOutcome,
    progress: &'a Progress,
    started: Instant,
    flushed: u64,
    written_since_flush: u64,
    discard: &'a dyn Fn(u64, u64) -> std::io::Result<()>,
}

impl Writer<'_> {
    fn dst_offset(&self, src_offset: u64) -> u64 {
        src_offset - self.range.src_offset + self.range.dst_offset
    }

    fn hole(&mut self, offset: u64, len: u64) -> Result<(), CopyError> {
        if len == 0 {
            return Ok(());
        }
        if !self.options.dest_is_zero {
            let at = self.dst_offset(offset);
            (self.discard)(at, len).map_err(|source| CopyError::Write { offset: at, source })?;
        }
        Ok(())
    }

    fn data(&mut self, offset: u64, block: &[u8]) -> Result<(), CopyError> {
        for sum_block in block.chunks(CHECKSUM_BLOCK as usize) {
            self.outcome.checksums.push(block_sum(sum_block));
        }
        self.outcome.bytes_read += block.len() as u64;
        // Write runs of non-zero grains; leave zero grains as holes.
        let mut pos = 0;
        while pos < block.len() {
            let grain_end = (pos + ZERO_GRAIN).min(block.len());
            if is_zero(&block[pos..grain_end]) {
                let mut zero_end = grain_end;
                while zero_end < block.len() {
                    let next = (zero_end + ZERO_GRAIN).min(block.len());
                    if !is_zero(&block[zero_end..next]) {
                        break;
                    }
                    zero_end = next;
                }
                self.hole(offset + pos as u64, (zero_end - pos) as u64)?;
                pos = zero_end;
                continue;
            }
            let mut run_end = grain_end;
            while run_end < block.len() {
                let next = (run_end + ZERO_GRAIN).min(block.len());
                if is_zero(&block[run_end..next]) {
                    break;
                }
                run_end = next;
            }
            let at = self.dst_offset(offset + pos as u64);
            self.dst
                .write_all_at(&block[pos..run_end], at)
                .map_err(|source| CopyError::Write { offset: at, source })?;
            self.outcome.bytes_written += (run_end - pos) as u64;
            self.written_since_flush += (run_end - pos) as u64;
            pos = run_end;
        }
        if self.written_since_flush >= WRITEBACK_WINDOW {
            self.start_writeback(offset + block.len() as u64);
        }
        Ok(())
    }

    /// Starts writeback of what was written since the last call and waits for the window
    /// before it, so dirty pages stay bounded and the final fdatasync is short.
    fn start_writeback(&mut self, src_end: u64) {
        let end = self.dst_offset(src_end);
        let fd = self.dst.as_raw_fd();
        let start = self.flushed;
        // SAFETY: sync_file_range and fadvise only take integers and a borrowed descriptor;
        // failures only lose the optimisation.
        unsafe {
            libc::sync_file_range(
                fd,
                start as libc::off_t,
                (end - start) as libc::off_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
            if start > 0 {
                libc::sync_file_range(
                    fd,
                    0,
                    start as libc::off_t,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
                libc::posix_fadvise(fd, 0, start as libc::off_t, libc::POSIX_FADV_DONTNEED);
            }
        }
        self.flushed = end;
        self.written_since_flush = 0;
    }

    fn throttle(&self) {
        if self.options.bps_limit == 0 {
            return;
        }
        let due =
            Duration::from_secs_f64(self.outcome.bytes_read as f64 / self.options.bps_limit as f64);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

/// Copies `range` from `src` to `dst`, then fdatasyncs `dst`. `discard(offset, len)`
/// zeroes a destination range (punching a hole where it can); it is only called when
/// `options.dest_is_zero` is false.
pub fn copy(
    src: &File,
    dst: &File,
    range: Range,
    options: CopyOptions,
    progress: &Progress,
    cancel: &AtomicBool,
    discard: &dyn Fn(u64, u64) -> std::io::Result<()>,
) -> Result<CopyOutcome, CopyError> {
    progress.total.store(range.len, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    let (free_tx, free_rx) = sync_channel::<AlignedBuf>(BUFFERS);
    for _ in 0..BUFFERS {
        let _ = free_tx.send(AlignedBuf::new(IO_BLOCK));
    }
    let (piece_tx, piece_rx) = sync_channel(BUFFERS - 1);
    let mut writer = Writer {
        dst,
        options,
        range,
        outcome: CopyOutcome::default(),
        progress,
        started: Instant::now(),
        flushed: range.dst_offset,
        written_since_flush: 0,
        discard,
    };
    let result = std::thread::scope(|scope| {
        // Moved in, so both are dropped when this closure returns, before the scope joins
        // the reader: a reader waiting for a free buffer or a send then wakes and ends.
        let (free_tx, piece_rx) = (free_tx, piece_rx);
        std::thread::Builder::new()
            .name("copy-reader".into())
            .spawn_scoped(scope, || reader(src, range, cancel, free_rx, piece_tx))
            .map_err(|source| CopyError::Read {
                offset: range.src_offset,
                source,
            })?;
        let mut done = 0u64;
        for piece in piece_rx.iter() {
            if cancel.load(Ordering::Relaxed) {
                return Err(CopyError::Cancelled);
            }
            match piece? {
                Piece::Data { offset, len, buf } => {
                    writer.data(offset, &buf[..len])?;
                    done += len as u64;
                    // The reader may have stopped; a failed return only drops the buffer.
                    let _ = free_tx.send(buf);
                }
                Piece::Hole { offset, len } => {
                    writer.hole(offset, len)?;
                    let blocks = (offset + len - range.src_offset).div_ceil(CHECKSUM_BLOCK)
                        - (offset - range.src_offset) / CHECKSUM_BLOCK;
                    writer
                        .outcome
                        .checksums
                        .extend(std::iter::repeat_n(0, blocks as usize));
                    done += len;
                }
            }
            writer.progress.done.store(done, Ordering::Relaxed);
            writer.throttle();
        }
        if done < range.len {
            return Err(CopyError::Cancelled);
        }
        Ok(())
    });
    result?;
    if cancel.load(Ordering::Relaxed) {
        return Err(CopyError::Cancelled);
    }
    dst.sync_data().map_err(|source| CopyError::Write {
        offset: range.dst_offset + range.len,
        source,
    })?;
    Ok(writer.outcome)
}

/// Copies `range` with the kernel's copy_file_range for each data extent (a reflink or a
/// server-side copy where the filesystems offer one, never through our buffers) and
/// `discard` for the holes. Falls back to [`copy`] where the kernel cannot.
pub fn copy_kernel(
    src: &File,
    dst: &File,
    range: Range,
    discard: &dyn Fn(u64, u64) -> std::io::Result<()>,
) -> Result<(), CopyError> {
    let end = range.src_offset + range.len;
    let to_dst = |offset: u64| offset - range.src_offset + range.dst_offset;
    let mut extents = Extents::new(src, end);
    let mut offset = range.src_offset;
    while offset < end {
        let (start, data_end) = match extents
            .next_data(offset)
            .map_err(|source| CopyError::Read { offset, source })?
        {
            Some(extent) => extent,
            None => (end, end),
        };
        if start > offset {
            discard(to_dst(offset), start - offset).map_err(|source| CopyError::Write {
                offset: to_dst(offset),
                source,
            })?;
        }
        let mut at = start;
        while at < data_end {
            let mut off_in = at as libc::loff_t;
            let mut off_out = to_dst(at) as libc::loff_t;
            let want = (data_end - at).min(1 << 30) as usize;
            // SAFETY: copy_file_range on borrowed descriptors with offsets we own.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut off_in,
                    dst.as_raw_fd(),
                    &mut off_out,
                    want,
                    0,
                )
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => {
                        let rest = Range {
                            src_offset: at,
                            dst_offset: to_dst(at),
                            len: end - at,
                        };
                        let options = CopyOptions {
                            dest_is_zero: false,
                            bps_limit: 0,
                        };
                        copy(
                            src,
                            dst,
                            rest,
                            options,
                            &Progress::default(),
                            &AtomicBool::new(false),
                            discard,
                        )?;
                        return Ok(());
                    }
                    Some(libc::EINTR) => continue,
                    _ => {
                        return Err(CopyError::Write {
                            offset: to_dst(at),
                            source: err,
                        });
                    }
                }
            }
            if n == 0 {
                return Err(CopyError::ShortSource { offset: at });
            }
            at += n as u64;
        }
        offset = data_end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sum_of_zeros_is_zero_and_of_data_is_not() {
        assert_eq!(block_sum(&[0u8; 4096]), 0);
        assert_ne!(block_sum(b"backupfs"), 0);
        assert!(is_zero(&[0u8; 17]));
        let mut v = vec![0u8; 100];
        v[99] = 1;
        assert!(!is_zero(&v));
        v[99] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
