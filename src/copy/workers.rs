//! One copy's workers and what they share: chunks from a counter, reads of data extents,
//! holes for zeros, the rate limit, writeback, and the buffers all copies share. A worker
//! never holds more than one buffer, nor writes outside the destination range it was given.

use super::sums::{
    LEAF_SUMS_PER_BLOCK_BYTES, LEAVES_PER_BLOCK, Sum, SumKind, encode_sums_into, is_zero,
    leaf_sums, sum_of_leaves,
};
use super::{Base, CHECKSUM_BLOCK, CopyError, CopyOptions, CopyOutcome, Progress, Range};
use crate::volume::device::{AlignedBuf, BlockDevice};
use parking_lot::Mutex;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Runs of zeros at least this long are left as holes instead of written.
pub(super) const ZERO_GRAIN: usize = 64 << 10;
/// At most this many requests in flight, whatever a device asks for.
const MAX_DEPTH: usize = 16;
/// Written data a local destination may hold dirty in the page cache, per copy.
const WRITEBACK_WINDOW: u64 = 32 << 20;
/// O_DIRECT wants reads of whole pages.
const PAGE: u64 = 4096;
/// Buffer memory copies running at once share: a lone copy gets every request its devices
/// ask for (an RBD device: 12 x 4 MiB), a copy started beside others what is left, and
/// at least one request. Four file copies at once hold 16 + 8 + 4 + 4 MiB, the daemon
/// stays under 64 MiB resident, and the disk they share still has 8 requests in flight.
const SHARED_BUFFERS: usize = 24 << 20;

/// The buffer bytes the copies running now hold.
static BUFFERS_HELD: Mutex<usize> = Mutex::new(0);

/// A copy's share of [`SHARED_BUFFERS`]: how many requests of `chunk` bytes it may keep in
/// flight. Given back when dropped.
struct BufferShare {
    bytes: usize,
}

impl BufferShare {
    fn take(wanted: usize, chunk: usize) -> BufferShare {
        let mut held = BUFFERS_HELD.lock();
        let bytes = granted(*held, wanted * chunk, chunk);
        *held += bytes;
        BufferShare { bytes }
    }

    fn requests(&self, chunk: usize) -> usize {
        self.bytes / chunk
    }
}

impl Drop for BufferShare {
    fn drop(&mut self) {
        let mut held = BUFFERS_HELD.lock();
        *held = held.saturating_sub(self.bytes);
    }
}

/// What a copy asking for `wanted` bytes of buffers (whole chunks) gets while others hold
/// `held`: all of it alone, else what is left of [`SHARED_BUFFERS`] in whole chunks, and
/// one chunk at least.
fn granted(held: usize, wanted: usize, chunk: usize) -> usize {
    if held == 0 {
        return wanted;
    }
    let left = SHARED_BUFFERS.saturating_sub(held) / chunk * chunk;
    left.clamp(chunk, wanted.max(chunk))
}

/// What the workers of one copy share.
pub(super) struct Shared<'a> {
    pub(super) src: &'a dyn BlockDevice,
    pub(super) dst: &'a dyn BlockDevice,
    pub(super) range: Range,
    pub(super) options: CopyOptions,
    pub(super) chunk: u64,
    pub(super) chunks: u64,
    pub(super) next: AtomicU64,
    /// One `Sum` per block, filled by whichever worker copies the block (a `Sum` wider
    /// than 64 bits needs another cell than an atomic).
    pub(super) sums: Vec<AtomicU64>,
    pub(super) bytes_read: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    pub(super) changed_bytes: AtomicU64,
    pub(super) how: How<'a>,
    /// A write of leaf sums failed: they are not whole.
    pub(super) leaves_failed: AtomicBool,
    pub(super) progress: &'a Progress,
    pub(super) cancel: &'a AtomicBool,
    /// Set when any worker failed: the others stop at their next chunk.
    pub(super) failed: AtomicBool,
    pub(super) error: Mutex<Option<CopyError>>,
    pub(super) started: Instant,
    /// Bytes read and bytes written so far, for the rate limit: like the cgroup limits
    /// Cinder's `volume_copy_bps_limit` sets, each direction has the limit of its own, and
    /// holes and unchanged blocks, which are neither read nor written, cost nothing.
    pub(super) read_scheduled: AtomicU64,
    pub(super) write_scheduled: AtomicU64,
}

impl Shared<'_> {
    fn fail(&self, e: CopyError) {
        self.failed.store(true, Ordering::Relaxed);
        let mut error = self.error.lock();
        // The first real error explains the failure; cancellations follow from it.
        if error.is_none() || matches!(*error, Some(CopyError::Cancelled)) {
            *error = Some(e);
        }
    }

    fn stopped(&self) -> bool {
        self.failed.load(Ordering::Relaxed) || self.cancel.load(Ordering::Relaxed)
    }

    /// Waits until the rate limit allows `len` more bytes in the direction `scheduled`
    /// counts, in short slices so that a cancel (SIGTERM) is not held up by a low limit.
    fn throttle(&self, scheduled: &AtomicU64, len: u64) {
        if self.options.bps_limit == 0 {
            return;
        }
        let before = scheduled.fetch_add(len, Ordering::Relaxed);
        let due = Duration::from_secs_f64(before as f64 / self.options.bps_limit as f64);
        while !self.stopped() {
            let elapsed = self.started.elapsed();
            if due <= elapsed {
                break;
            }
            std::thread::sleep((due - elapsed).min(Duration::from_millis(100)));
        }
    }

    /// Source offset and length of chunk `index`.
    fn chunk_range(&self, index: u64) -> (u64, u64) {
        let start = index * self.chunk;
        (
            self.range.src_offset + start,
            (self.range.len - start).min(self.chunk),
        )
    }

    /// Copies chunk `index` through `buf`.
    fn copy_chunk(&self, index: u64, buf: &mut [u8]) -> Result<(), CopyError> {
        let (offset, len) = self.chunk_range(index);
        if self.stopped() {
            return Err(CopyError::Cancelled);
        }
        let buf = &mut buf[..len as usize];
        if let Some(base) = self.how.base {
            self.update_chunk(base, offset, buf)?;
            self.writeback(index);
            self.progress.done.fetch_add(len, Ordering::Relaxed);
            return Ok(());
        }
        let extents = self
            .src
            .data_extents(offset..offset + len)
            .map_err(|source| CopyError::Read { offset, source })?;
        if extents.is_empty() {
            self.hole(offset, len)?;
        } else {
            self.read(offset, buf, &extents)?;
            self.write_data(offset, buf)?;
        }
        let first_block = (offset - self.range.src_offset) / CHECKSUM_BLOCK;
        let mut leaves = Vec::new();
        for (i, block) in buf.chunks(CHECKSUM_BLOCK as usize).enumerate() {
            // A hole chunk's buffer is not read: its blocks are zero, and so are their
            // leaf sums, which the leaf-sums file already holds.
            let sum = if !self.how.sums || extents.is_empty() {
                0
            } else {
                self.block_sum(block, &mut leaves)
            };
            self.sums[first_block as usize + i].store(sum, Ordering::Relaxed);
        }
        self.write_leaves(first_block, &leaves);
        self.writeback(index);
        self.progress.done.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// A block's checksum as this copy takes them; with a leaf-sums file, its leaves'
    /// sums are appended to `leaves`.
    pub(super) fn block_sum(&self, block: &[u8], leaves: &mut Vec<u8>) -> Sum {
        if self.how.leaves.is_none() {
            return SumKind::CURRENT.block_sum(block);
        }
        let mut sums = [0; LEAVES_PER_BLOCK];
        let n = leaf_sums(block, &mut sums);
        encode_sums_into(leaves, &sums);
        sum_of_leaves(&sums[..n])
    }

    /// Writes the leaf sums of the blocks from `first_block` on. They only make the next
    /// incremental cheaper: a failure is logged once and the copy goes on (its outcome
    /// then says the leaf sums are not whole).
    pub(super) fn write_leaves(&self, first_block: u64, leaves: &[u8]) {
        let Some(file) = self.how.leaves else {
            return;
        };
        if leaves.is_empty() || self.leaves_failed.load(Ordering::Relaxed) {
            return;
        }
        let at = first_block * LEAF_SUMS_PER_BLOCK_BYTES;
        if let Err(e) = std::os::unix::fs::FileExt::write_all_at(file, leaves, at)
            && !self.leaves_failed.swap(true, Ordering::Relaxed)
        {
            tracing::warn!("leaf sums not kept ({e}): the next incremental reads whole blocks");
        }
    }

    /// Reads source `start..end` into its place in `buf` (the chunk at `offset`).
    pub(super) fn read_span(
        &self,
        offset: u64,
        buf: &mut [u8],
        start: u64,
        end: u64,
    ) -> Result<(), CopyError> {
        let extents = self
            .src
            .data_extents(start..end)
            .map_err(|source| CopyError::Read {
                offset: start,
                source,
            })?;
        let slot = &mut buf[(start - offset) as usize..(end - offset) as usize];
        self.read(start, slot, &extents)
    }

    /// Fills `buf` (the chunk at `offset`) from the source: the data extents are read
    /// (widened to whole pages, as O_DIRECT wants), the gaps between them are zeroed.
    fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        extents: &[std::ops::Range<u64>],
    ) -> Result<(), CopyError> {
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        for extent in extents {
            let start = (extent.start / PAGE * PAGE).max(pos);
            let stop = extent.end.div_ceil(PAGE).saturating_mul(PAGE).min(end);
            if start >= stop {
                continue;
            }
            buf[(pos - offset) as usize..(start - offset) as usize].fill(0);
            let slot = &mut buf[(start - offset) as usize..(stop - offset) as usize];
            self.throttle(&self.read_scheduled, stop - start);
            let got = self
                .src
                .read_at(slot, start)
                .map_err(|source| CopyError::Read {
                    offset: start,
                    source,
                })?;
            self.bytes_read.fetch_add(got as u64, Ordering::Relaxed);
            if (got as u64) < extent.end.min(end) - start {
                return Err(CopyError::ShortSource {
                    offset: start + got as u64,
                });
            }
            slot[got..].fill(0);
            pos = stop;
        }
        buf[(pos - offset) as usize..].fill(0);
        Ok(())
    }

    /// Writes the runs of data grains of a chunk; runs of zero grains become holes.
    pub(super) fn write_data(&self, offset: u64, block: &[u8]) -> Result<(), CopyError> {
        let mut grains = block.chunks(ZERO_GRAIN).map(is_zero).enumerate().peekable();
        while let Some((first, zero)) = grains.next() {
            let mut last = first;
            while let Some(&(i, z)) = grains.peek() {
                if z != zero {
                    break;
                }
                last = i;
                grains.next();
            }
            let start = first * ZERO_GRAIN;
            let end = ((last + 1) * ZERO_GRAIN).min(block.len());
            if zero {
                self.hole(offset + start as u64, (end - start) as u64)?;
            } else {
                let at = self.range.dst_of(offset + start as u64);
                self.throttle(&self.write_scheduled, (end - start) as u64);
                self.dst
                    .write_at_waiting(&block[start..end], at)
                    .map_err(|source| CopyError::Write { offset: at, source })?;
                self.bytes_written
                    .fetch_add((end - start) as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn hole(&self, offset: u64, len: u64) -> Result<(), CopyError> {
        if len == 0 || self.options.dest_is_zero {
            return Ok(());
        }
        let at = self.range.dst_of(offset);
        self.dst
            .discard(at..at + len)
            .map_err(|source| CopyError::Write { offset: at, source })
    }

    /// Keeps a local destination's dirty pages bounded: starts writeback of the chunk just
    /// written, waits for the one a window back and drops it from the page cache (a backup
    /// must not push the node's working set out). Failures only lose the optimisation.
    fn writeback(&self, index: u64) {
        let Some(file) = self.dst.local_file() else {
            return;
        };
        let (offset, len) = self.chunk_range(index);
        sync_range(
            file,
            self.range.dst_of(offset),
            len,
            libc::SYNC_FILE_RANGE_WRITE,
        );
        let lag = (WRITEBACK_WINDOW / self.chunk).max(1);
        if index >= lag {
            let (old, old_len) = self.chunk_range(index - lag);
            let at = self.range.dst_of(old);
            sync_range(
                file,
                at,
                old_len,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            );
            let _ = nix::fcntl::posix_fadvise(
                file,
                at as libc::off_t,
                old_len as libc::off_t,
                nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            );
        }
    }

    fn worker(&self) {
        let mut buf = match AlignedBuf::new(self.chunk as usize) {
            Ok(buf) => buf,
            Err(source) => {
                return self.fail(CopyError::Read {
                    offset: self.range.src_offset,
                    source,
                });
            }
        };
        loop {
            if self.stopped() {
                return;
            }
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.chunks {
                return;
            }
            if let Err(e) = self.copy_chunk(index, &mut buf) {
                return self.fail(e);
            }
        }
    }
}

fn sync_range(file: &File, offset: u64, len: u64, flags: libc::c_uint) {
    // SAFETY: sync_file_range takes integers and a borrowed descriptor.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            flags,
        )
    };
}

/// What a copy starts from and which checksums it takes (always `SumKind::CURRENT`).
#[derive(Clone, Copy)]
pub(super) struct How<'a> {
    pub(super) base: Option<Base<'a>>,
    /// Where the leaf sums go (`LEAF_SUMS_PER_BLOCK_BYTES` per block of the range); for
    /// an incremental copy it already holds the base's, which are read back from it.
    pub(super) leaves: Option<&'a File>,
    /// Whether the caller wants the checksums (a restore's pieces were checked as they
    /// were read: hashing them again would only cost CPU).
    pub(super) sums: bool,
}

/// [`super::copy`] or [`super::copy_incremental`] without the final flush: what the destination keeps
/// in flight (an RBD device's writes) goes on behind the caller.
pub(super) fn copy_unflushed(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    range: Range,
    options: CopyOptions,
    how: How,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<CopyOutcome, CopyError> {
    progress.total.store(range.len, Ordering::Relaxed);
    progress.done.store(0, Ordering::Relaxed);
    let (src_hints, dst_hints) = (src.hints(), dst.hints());
    let chunk = (src_hints.request_size.max(dst_hints.request_size) as u64)
        .div_ceil(CHECKSUM_BLOCK)
        .max(1)
        * CHECKSUM_BLOCK;
    let chunks = range.len.div_ceil(chunk);
    let wanted = src_hints
        .queue_depth
        .max(dst_hints.queue_depth)
        .clamp(1, MAX_DEPTH)
        .min(chunks.max(1) as usize);
    let share = BufferShare::take(wanted, chunk as usize);
    let workers = share.requests(chunk as usize);
    let shared = Shared {
        src,
        dst,
        range,
        options,
        chunk,
        chunks,
        next: AtomicU64::new(0),
        sums: (0..range.len.div_ceil(CHECKSUM_BLOCK))
            .map(|_| AtomicU64::new(0))
            .collect(),
        bytes_read: AtomicU64::new(0),
        bytes_written: AtomicU64::new(0),
        changed_bytes: AtomicU64::new(0),
        how,
        leaves_failed: AtomicBool::new(false),
        progress,
        cancel,
        failed: AtomicBool::new(false),
        error: Mutex::new(None),
        started: Instant::now(),
        read_scheduled: AtomicU64::new(0),
        write_scheduled: AtomicU64::new(0),
    };
    std::thread::scope(|scope| {
        for _ in 1..workers {
            let spawned = std::thread::Builder::new()
                .name("copy".into())
                .spawn_scoped(scope, || shared.worker());
            if let Err(source) = spawned {
                shared.fail(CopyError::Read {
                    offset: range.src_offset,
                    source,
                });
            }
        }
        // This thread is a worker too.
        shared.worker();
    });
    if let Some(e) = shared.error.lock().take() {
        return Err(e);
    }
    if cancel.load(Ordering::Relaxed) {
        return Err(CopyError::Cancelled);
    }
    Ok(CopyOutcome {
        checksums: shared
            .sums
            .iter()
            .map(|s| s.load(Ordering::Relaxed))
            .collect(),
        kind: SumKind::CURRENT,
        leaves_whole: how.leaves.is_some() && !shared.leaves_failed.load(Ordering::Relaxed),
        bytes_read: shared.bytes_read.load(Ordering::Relaxed),
        bytes_written: shared.bytes_written.load(Ordering::Relaxed),
        changed_bytes: shared.changed_bytes.load(Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MIB, copy_all, pattern};
    use super::super::*;
    use super::*;
    use crate::volume::device::memory::MemDevice;

    #[test]
    fn copies_at_once_share_the_buffers_and_each_gets_one_request_at_least() {
        const MIB: usize = 1 << 20;
        // Alone: everything asked for, even beyond the shared amount (an RBD copy).
        assert_eq!(granted(0, 48 * MIB, 4 * MIB), 48 * MIB);
        assert_eq!(granted(0, 16 * MIB, 4 * MIB), 16 * MIB);
        // Four file copies, one after the other.
        assert_eq!(granted(16 * MIB, 16 * MIB, 4 * MIB), 8 * MIB);
        assert_eq!(granted(24 * MIB, 16 * MIB, 4 * MIB), 4 * MIB);
        assert_eq!(granted(28 * MIB, 16 * MIB, 4 * MIB), 4 * MIB);
        // Never more than asked for, and whole requests only.
        assert_eq!(granted(4 * MIB, 8 * MIB, 4 * MIB), 8 * MIB);
        assert_eq!(granted(15 * MIB, 16 * MIB, 2 * MIB), 8 * MIB);
    }

    #[test]
    fn the_rate_limit_counts_bytes_moved_not_holes_walked() {
        // Issue 23: at 40 MB/s a 1 GiB volume holding 8 MiB took 26.7 s. Here 256 MiB
        // holding 1 MiB at 2 MiB/s: 128 s if the holes counted, half a second if not.
        let src = MemDevice::new(256 * MIB);
        src.fill(100 * MIB, &pattern(MIB as usize, 13));
        let dst = MemDevice::new(256 * MIB);
        let started = Instant::now();
        let outcome = copy_all(
            &src,
            &dst,
            CopyOptions {
                dest_is_zero: true,
                bps_limit: 2 * MIB,
            },
        )
        .unwrap();
        assert_eq!(outcome.bytes_read, MIB);
        assert_eq!(dst.contents(), src.contents());
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn the_rate_limit_holds() {
        let src = MemDevice::new(8 * MIB);
        src.fill(0, &pattern((8 * MIB) as usize, 12));
        let dst = MemDevice::new(8 * MIB);
        let started = Instant::now();
        copy_all(
            &src,
            &dst,
            CopyOptions {
                dest_is_zero: true,
                bps_limit: 20 * MIB,
            },
        )
        .unwrap();
        // 8 MiB at 20 MiB/s: the last chunk may start after 6 MiB went, at 0.3 s.
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }
}
