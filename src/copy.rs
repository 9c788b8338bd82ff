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

/// The unit of reading and writing: a chunk.
pub const IO_BLOCK: usize = 2 << 20;
/// The unit of checksums (a divisor of `IO_BLOCK`).
pub const CHECKSUM_BLOCK: u64 = 1 << 20;
/// Runs of zeros at least this long are left as holes instead of written.
const ZERO_GRAIN: usize = 64 << 10;
/// Reader threads, so several reads are in flight (one sequential O_DIRECT stream
/// leaves the disk idle between requests).
const READERS: usize = 2;
/// Buffers each reader fills ahead of the writer.
const BUFFERS_PER_READER: usize = 2;
/// Dirty data the copier lets the page cache hold for the destination.
const WRITEBACK_WINDOW: u64 = 32 << 20;

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
    // 4 KiB at a time, OR-folded so the compiler vectorises it, stopping at the first
    // piece with data: random data costs one piece, zeros the whole scan.
    block.chunks(4096).all(|piece| {
        let words = piece.chunks_exact(16);
        let tail = words.remainder();
        let folded = words.fold(0u128, |acc, w| {
            acc | u128::from_ne_bytes(w.try_into().unwrap_or([0xff; 16]))
        });
        folded == 0 && tail.iter().all(|&b| b == 0)
    })
}

/// An anonymous mapping aligned for O_DIRECT. Its pages come zeroed from the kernel and go
/// back to it when the copy ends, so a finished copy leaves no memory behind.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain owned memory, moved between threads whole.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    fn new(len: usize) -> std::io::Result<AlignedBuf> {
        // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(raw.cast::<u8>())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(AlignedBuf { ptr, len })
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
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
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
    /// A chunk whose bytes are in `buf` (data read, holes between extents zeroed).
    Data {
        offset: u64,
        len: usize,
        buf: AlignedBuf,
    },
    /// A chunk with no data at all.
    Hole { offset: u64, len: u64 },
}

/// Reads `buf.len()` bytes at `offset` (fewer at the end of the file), falling back from
/// O_DIRECT when the kernel refuses an unaligned piece (the tail of an odd-sized file).
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

    fn chunks(&self) -> u64 {
        self.len.div_ceil(IO_BLOCK as u64)
    }

    /// Source offset and length of chunk `index`.
    fn chunk(&self, index: u64) -> (u64, u64) {
        let start = index * IO_BLOCK as u64;
        (
            self.src_offset + start,
            (self.len - start).min(IO_BLOCK as u64),
        )
    }
}

const PAGE: u64 = 4096;

/// Fills `buf` with chunk `[offset, offset+len)`: only the data extents are read (4 KiB
/// aligned, as O_DIRECT wants), the holes between them are zeroed in memory.
fn fill_chunk(
    src: &File,
    extents: &mut Extents,
    buf: &mut [u8],
    offset: u64,
    len: u64,
) -> Result<bool, CopyError> {
    let end = offset + len;
    let mut pos = offset;
    let mut any_data = false;
    while pos < end {
        let next = extents.next_data(pos).map_err(|source| CopyError::Read {
            offset: pos,
            source,
        })?;
        let Some((data_start, data_end)) = next.filter(|(start, _)| *start < end) else {
            if any_data {
                buf[(pos - offset) as usize..len as usize].fill(0);
            }
            break;
        };
        let read_start = (data_start / PAGE * PAGE).max(pos);
        let read_end = data_end.div_ceil(PAGE).saturating_mul(PAGE).min(end);
        if !any_data {
            // Zero what came before the first data only once we know the chunk has data.
            buf[..(read_start - offset) as usize].fill(0);
            any_data = true;
        } else {
            buf[(pos - offset) as usize..(read_start - offset) as usize].fill(0);
        }
        let slot = &mut buf[(read_start - offset) as usize..];
        let want = ((read_end - read_start).div_ceil(PAGE) * PAGE).min(slot.len() as u64) as usize;
        let got =
            read_full(src, &mut slot[..want], read_start).map_err(|source| CopyError::Read {
                offset: read_start,
                source,
            })?;
        if (got as u64) < data_end.min(end) - read_start {
            return Err(CopyError::ShortSource {
                offset: read_start + got as u64,
            });
        }
        if got < want {
            slot[got..want].fill(0);
        }
        pos = read_end;
    }
    Ok(any_data)
}

/// One of `READERS` reader threads: reads chunks `first, first + READERS, ...` into its
/// own buffers, so several reads are in flight while the writer works.
#[allow(clippy::too_many_arguments)]
fn reader(
    src: &File,
    range: Range,
    first: u64,
    cancel: &AtomicBool,
    free: Receiver<AlignedBuf>,
    out: SyncSender<(u64, Result<Piece, CopyError>)>,
) {
    let mut extents = Extents::new(src, range.src_offset + range.len);
    let mut index = first;
    // A buffer that held only a hole is kept for the next chunk.
    let mut spare: Option<AlignedBuf> = None;
    while index < range.chunks() {
        if cancel.load(Ordering::Relaxed) {
            let _ = out.send((index, Err(CopyError::Cancelled)));
            return;
        }
        let (offset, len) = range.chunk(index);
        let mut buf = match spare.take() {
            Some(buf) => buf,
            None => match free.recv() {
                Ok(buf) => buf,
                Err(_) => return,
            },
        };
        let piece = match fill_chunk(src, &mut extents, &mut buf, offset, len) {
            Ok(true) => Ok(Piece::Data {
                offset,
                len: len as usize,
                buf,
            }),
            Ok(false) => {
                spare = Some(buf);
                Ok(Piece::Hole { offset, len })
            }
            Err(e) => Err(e),
        };
        let failed = piece.is_err();
        if out.send((index, piece)).is_err() || failed {
            return;
        }
        index += READERS as u64;
    }
}

struct Writer<'a> {
    dst: &'a File,
    options: CopyOptions,
    range: Range,
    outcome: CopyOutcome,
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
        if len == 0 || self.options.dest_is_zero {
            return Ok(());
        }
        let at = self.dst_offset(offset);
        (self.discard)(at, len).map_err(|source| CopyError::Write { offset: at, source })
    }

    fn write(&mut self, block: &[u8], offset: u64) -> Result<(), CopyError> {
        let at = self.dst_offset(offset);
        self.dst
            .write_all_at(block, at)
            .map_err(|source| CopyError::Write { offset: at, source })?;
        self.outcome.bytes_written += block.len() as u64;
        self.written_since_flush += block.len() as u64;
        Ok(())
    }

    fn data(&mut self, offset: u64, block: &[u8]) -> Result<(), CopyError> {
        self.outcome.bytes_read += block.len() as u64;
        // One pass to find the zero grains; the checksums and the writes use it.
        let grains: Vec<bool> = block.chunks(ZERO_GRAIN).map(is_zero).collect();
        let per_sum = (CHECKSUM_BLOCK as usize) / ZERO_GRAIN;
        for (i, sum_block) in block.chunks(CHECKSUM_BLOCK as usize).enumerate() {
            let zero = grains[i * per_sum..].iter().take(per_sum).all(|&z| z);
            self.outcome.checksums.push(if zero {
                0
            } else {
                match xxhash_rust::xxh3::xxh3_64(sum_block) {
                    0 => 1,
                    sum => sum,
                }
            });
        }
        // Write runs of data grains; leave runs of zero grains as holes.
        let mut grain = 0;
        while grain < grains.len() {
            let zero = grains[grain];
            let run = grains[grain..].iter().take_while(|&&z| z == zero).count();
            let start = grain * ZERO_GRAIN;
            let end = ((grain + run) * ZERO_GRAIN).min(block.len());
            if zero {
                self.hole(offset + start as u64, (end - start) as u64)?;
            } else {
                self.write(&block[start..end], offset + start as u64)?;
            }
            grain += run;
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
            if start > self.range.dst_offset {
                let from = self.range.dst_offset as libc::off_t;
                let len = (start - self.range.dst_offset) as libc::off_t;
                libc::sync_file_range(
                    fd,
                    from,
                    len,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER,
                );
                libc::posix_fadvise(fd, from, len, libc::POSIX_FADV_DONTNEED);
            }
        }
        self.flushed = end;
        self.written_since_flush = 0;
    }

    /// Sleeps until the rate limit allows the bytes read so far, in short slices so a
    /// cancel (SIGTERM) is not held up by a low limit.
    fn throttle(&self, cancel: &AtomicBool) {
        if self.options.bps_limit == 0 {
            return;
        }
        let due =
            Duration::from_secs_f64(self.outcome.bytes_read as f64 / self.options.bps_limit as f64);
        while !cancel.load(Ordering::Relaxed) {
            let elapsed = self.started.elapsed();
            if due <= elapsed {
                break;
            }
            std::thread::sleep((due - elapsed).min(Duration::from_millis(100)));
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
    let mut writer = Writer {
        dst,
        options,
        range,
        outcome: CopyOutcome::default(),
        started: Instant::now(),
        flushed: range.dst_offset,
        written_since_flush: 0,
        discard,
    };
    let chunks = range.chunks();
    std::thread::scope(|scope| -> Result<(), CopyError> {
        let (piece_tx, piece_rx) = sync_channel(READERS * BUFFERS_PER_READER);
        let mut pools = Vec::new();
        for first in 0..READERS as u64 {
            let (free_tx, free_rx) = sync_channel::<AlignedBuf>(BUFFERS_PER_READER);
            for _ in 0..BUFFERS_PER_READER {
                let buf = AlignedBuf::new(IO_BLOCK).map_err(|source| CopyError::Read {
                    offset: range.src_offset,
                    source,
                })?;
                let _ = free_tx.send(buf);
            }
            pools.push(free_tx);
            let out = piece_tx.clone();
            std::thread::Builder::new()
                .name("copy-reader".into())
                .spawn_scoped(scope, move || {
                    reader(src, range, first, cancel, free_rx, out)
                })
                .map_err(|source| CopyError::Read {
                    offset: range.src_offset,
                    source,
                })?;
        }
        drop(piece_tx);
        // Pieces arrive in any order; they are written in order. Returning drops the
        // channels, which wakes and ends any reader still waiting on them.
        let mut waiting: std::collections::BTreeMap<u64, Piece> = Default::default();
        let mut next = 0u64;
        let mut done = 0u64;
        while next < chunks {
            let piece = match waiting.remove(&next) {
                Some(piece) => piece,
                None => {
                    let Ok((index, piece)) = piece_rx.recv() else {
                        return Err(CopyError::Cancelled);
                    };
                    let piece = piece?;
                    if index != next {
                        waiting.insert(index, piece);
                        continue;
                    }
                    piece
                }
            };
            if cancel.load(Ordering::Relaxed) {
                return Err(CopyError::Cancelled);
            }
            match piece {
                Piece::Data { offset, len, buf } => {
                    writer.data(offset, &buf[..len])?;
                    done += len as u64;
                    // The reader may have stopped; a failed return only drops the buffer.
                    let _ = pools[(next % READERS as u64) as usize].send(buf);
                }
                Piece::Hole { offset, len } => {
                    writer.hole(offset, len)?;
                    writer.outcome.checksums.extend(std::iter::repeat_n(
                        0,
                        len.div_ceil(CHECKSUM_BLOCK) as usize,
                    ));
                    done += len;
                }
            }
            progress.done.store(done, Ordering::Relaxed);
            writer.throttle(cancel);
            next += 1;
        }
        Ok(())
    })?;
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
