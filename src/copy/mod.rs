//! The one copier (the spec's `dd`, done properly), between any two block devices: large
//! aligned chunks, as many in flight as the devices ask for, only the source's data
//! extents read, all-zero pieces left as holes, a checksum per block, progress, cancel and
//! a rate limit. It never holds more than one buffer per request in flight, whatever the
//! size it copies, and it never writes outside the destination range it was given.
//!
//! The public API lives here; `sums` is the checksum scheme, `workers` the threads of a
//! copy, `plan` the incremental planner, `kernel` the copy_file_range path.

mod kernel;
mod plan;
pub mod sums;
mod workers;

pub use kernel::{copy_kernel, copy_unflushed_through};
pub use sums::{
    CHECKSUM_BLOCK, LEAF, LEAF_SUMS_PER_BLOCK_BYTES, LEAVES_PER_BLOCK, SUM_BYTES, Sum, SumKind,
    decode_sums, encode_sums, is_zero, leaf_sums, sum_of_leaves, sums_file_digest,
};

use crate::volume::device::BlockDevice;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use workers::{How, copy_unflushed};

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
    /// One per `CHECKSUM_BLOCK` of the source range, taken as `kind` says.
    pub checksums: Vec<Sum>,
    pub kind: SumKind,
    /// A leaf-sums file was given and every entry the copy wrote went into it.
    pub leaves_whole: bool,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Bytes of the source found to differ from the base (an incremental copy).
    pub changed_bytes: u64,
}

/// What an incremental copy starts from: the destination already reads as the base (a
/// shared copy of it, grown to the source's size), whose checksums these are.
#[derive(Debug, Clone, Copy)]
pub struct Base<'a> {
    /// One per block of the base, as in its record.
    pub sums: &'a [Sum],
    /// The base's size; what lies past it is new.
    pub size: u64,
    /// The ranges of the source that may differ from the base, in order, as the storage
    /// knows them; None: every block is read and compared with the base's checksum, and
    /// only blocks that differ are written.
    pub changed: Option<&'a [std::ops::Range<u64>]>,
    /// How the base's checksums were taken.
    pub kind: SumKind,
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

    fn dst_of(&self, src_offset: u64) -> u64 {
        src_offset - self.src_offset + self.dst_offset
    }
}

/// Copies `range` from `src` to `dst`, then flushes `dst`. Holes of the source become
/// holes of the destination (discarded there unless `options.dest_is_zero`).
pub fn copy(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    range: Range,
    options: CopyOptions,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<CopyOutcome, CopyError> {
    copy_with_leaves(src, dst, range, options, None, progress, cancel)
}

/// [`copy`], writing the leaf sums of each block into `leaves` too, which must read as
/// zeros to begin with (a new file of `LEAF_SUMS_PER_BLOCK_BYTES` per block of the
/// range): holes' entries are left as they are, zero and unallocated. The leaf-sums file
/// is not flushed.
pub fn copy_with_leaves(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    range: Range,
    options: CopyOptions,
    leaves: Option<&File>,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<CopyOutcome, CopyError> {
    let what = How {
        base: None,
        leaves,
        sums: true,
    };
    let outcome = copy_unflushed(src, dst, range, options, what, progress, cancel)?;
    flush(dst, range)?;
    Ok(outcome)
}

/// Updates `dst`, which reads as `base` (a shared copy of an earlier copy of the same
/// source, grown to the source's size), so that it reads as the whole of `src`: only what
/// differs is written. The checksums are the base's with the blocks that may differ
/// taken again from the source (all of them, once, if the base's were taken another
/// way). `leaves`, if given, holds the base's leaf sums (a copy of its file; a new file
/// if the base's are of another kind) and is updated to the new ones. Then flushes `dst`.
#[allow(clippy::too_many_arguments)]
pub fn copy_incremental(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    len: u64,
    base: Base,
    leaves: Option<&File>,
    bps_limit: u64,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<CopyOutcome, CopyError> {
    let options = CopyOptions {
        dest_is_zero: false,
        bps_limit,
    };
    let range = Range::whole(len);
    let what = How {
        base: Some(base),
        leaves,
        sums: true,
    };
    let outcome = copy_unflushed(src, dst, range, options, what, progress, cancel)?;
    flush(dst, range)?;
    Ok(outcome)
}

fn flush(dst: &dyn BlockDevice, range: Range) -> Result<(), CopyError> {
    dst.flush().map_err(|source| CopyError::Write {
        offset: range.dst_offset + range.len,
        source,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::volume::device::memory::{Faults, MemDevice};
    use std::time::Duration;

    pub(super) const MIB: u64 = 1 << 20;

    pub(super) fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).rotate_left(seed as u32) as u8 | 1)
            .collect()
    }

    pub(super) fn copy_all(
        src: &MemDevice,
        dst: &MemDevice,
        options: CopyOptions,
    ) -> Result<CopyOutcome, CopyError> {
        let len = src.size().unwrap();
        copy(
            src,
            dst,
            Range::whole(len),
            options,
            &Progress::default(),
            &AtomicBool::new(false),
        )
    }

    #[test]
    fn a_sparse_source_is_copied_exactly_with_its_holes_and_checksums() {
        let src = MemDevice::new(13 * MIB + 12345);
        src.fill(3 * MIB + 100, &pattern(5000, 1));
        src.fill(7 * MIB, &pattern((2 * MIB) as usize, 2));
        src.fill(13 * MIB, &pattern(12345, 3));
        // Written zeros are data to the source, holes to the copy.
        src.fill(10 * MIB, &vec![0u8; (MIB) as usize]);
        let dst = MemDevice::new(src.size().unwrap());
        let outcome = copy_all(
            &src,
            &dst,
            CopyOptions {
                dest_is_zero: true,
                bps_limit: 0,
            },
        )
        .unwrap();
        assert_eq!(dst.contents(), src.contents());
        let expected: Vec<u64> = src
            .contents()
            .chunks(MIB as usize)
            .map(|b| SumKind::CURRENT.block_sum(b))
            .collect();
        assert_eq!(outcome.checksums, expected);
        assert_eq!(outcome.checksums[0], 0);
        assert_eq!(outcome.checksums[10], 0);
        // Only data reached the destination: its extents are the data grains.
        let stored: u64 = dst
            .data_extents(0..dst.size().unwrap())
            .unwrap()
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        assert!(stored < 3 * MIB, "{stored}");
        assert_eq!(outcome.bytes_written, stored);
        assert!(outcome.bytes_read <= 5 * MIB, "{}", outcome.bytes_read);
    }

    #[test]
    fn a_device_that_cannot_tell_its_extents_is_read_whole_and_zeros_stay_holes() {
        let mut src = MemDevice::new(6 * MIB);
        src.faults = Faults {
            no_extents: true,
            ..Faults::default()
        };
        src.fill(2 * MIB, &pattern(4096, 4));
        let dst = MemDevice::new(6 * MIB);
        let outcome = copy_all(
            &src,
            &dst,
            CopyOptions {
                dest_is_zero: true,
                bps_limit: 0,
            },
        )
        .unwrap();
        assert_eq!(dst.contents(), src.contents());
        assert_eq!(outcome.bytes_read, 6 * MIB);
        assert_eq!(outcome.bytes_written, workers::ZERO_GRAIN as u64);
    }

    #[test]
    fn holes_are_discarded_over_an_old_destination() {
        let src = MemDevice::new(5 * MIB);
        src.fill(MIB, &pattern(MIB as usize, 5));
        let dst = MemDevice::new(5 * MIB);
        dst.fill(0, &pattern((5 * MIB) as usize, 6));
        copy_all(&src, &dst, CopyOptions::default()).unwrap();
        assert_eq!(dst.contents(), src.contents());
        assert!(!dst.discarded.lock().is_empty());
    }

    #[test]
    fn a_short_source_fails_the_copy() {
        let mut src = MemDevice::new(8 * MIB);
        src.fill(0, &pattern((8 * MIB) as usize, 7));
        src.faults.short_at = Some(7 * MIB + 7);
        let dst = MemDevice::new(8 * MIB);
        let e = copy_all(&src, &dst, CopyOptions::default()).unwrap_err();
        assert!(
            matches!(e, CopyError::ShortSource { offset } if offset == 7 * MIB + 7),
            "{e:?}"
        );
    }

    #[test]
    fn errors_at_every_step_fail_the_copy_with_their_cause() {
        let data = pattern((9 * MIB) as usize, 8);
        let faults = [
            Faults {
                read_error_at: Some(6 * MIB + 1),
                ..Faults::default()
            },
            Faults {
                write_error_at: Some(6 * MIB + 3),
                ..Faults::default()
            },
            Faults {
                discard_error: true,
                ..Faults::default()
            },
            Faults {
                flush_error: true,
                ..Faults::default()
            },
        ];
        for (i, fault) in faults.into_iter().enumerate() {
            let mut src = MemDevice::new(9 * MIB);
            src.fill(0, &data[..(4 * MIB) as usize]);
            src.fill(6 * MIB, &data[..(3 * MIB) as usize]);
            let mut dst = MemDevice::new(9 * MIB);
            if i == 0 {
                src.faults = fault;
            } else {
                dst.faults = fault;
            }
            let e = copy_all(&src, &dst, CopyOptions::default()).unwrap_err();
            let errno = e.raw_os_error();
            match i {
                0 => assert!(
                    matches!(e, CopyError::Read { .. }) && errno == Some(libc::EIO),
                    "{e:?}"
                ),
                1 => assert!(
                    matches!(e, CopyError::Write { .. }) && errno == Some(libc::ENOSPC),
                    "{e:?}"
                ),
                _ => assert!(
                    matches!(e, CopyError::Write { .. }) && errno == Some(libc::EIO),
                    "{e:?}"
                ),
            }
        }
    }

    #[test]
    fn a_cancelled_copy_stops_and_says_so() {
        let src = MemDevice::new(64 * MIB);
        src.fill(0, &pattern((64 * MIB) as usize, 9));
        let dst = MemDevice::new(64 * MIB);
        let cancel = AtomicBool::new(false);
        let progress = Progress::default();
        let e = std::thread::scope(|scope| {
            let copying = scope.spawn(|| {
                copy(
                    &src,
                    &dst,
                    Range::whole(64 * MIB),
                    CopyOptions {
                        dest_is_zero: true,
                        bps_limit: 16 * MIB,
                    },
                    &progress,
                    &cancel,
                )
            });
            // (A copy that ends without making progress, a panic say, ends the wait too.)
            while progress.get().0 == 0 && !copying.is_finished() {
                std::thread::sleep(Duration::from_millis(5));
            }
            cancel.store(true, Ordering::Relaxed);
            copying.join().unwrap()
        })
        .unwrap_err();
        assert!(matches!(e, CopyError::Cancelled), "{e:?}");
        assert!(progress.get().0 < 64 * MIB);
    }

    #[test]
    fn a_range_lands_at_its_destination_offset_and_nowhere_else() {
        let src = MemDevice::new(6 * MIB);
        src.fill(0, &pattern((6 * MIB) as usize, 10));
        let dst = MemDevice::new(10 * MIB);
        let before = pattern((10 * MIB) as usize, 11);
        dst.fill(0, &before);
        let range = Range {
            src_offset: MIB + 5,
            dst_offset: 3 * MIB + 1,
            len: 2 * MIB + 77,
        };
        let outcome = copy(
            &src,
            &dst,
            range,
            CopyOptions::default(),
            &Progress::default(),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(outcome.checksums.len(), 3);
        let after = dst.contents();
        let (d0, d1) = (
            range.dst_offset as usize,
            (range.dst_offset + range.len) as usize,
        );
        assert_eq!(&after[..d0], &before[..d0]);
        assert_eq!(&after[d1..], &before[d1..]);
        let s0 = range.src_offset as usize;
        assert_eq!(&after[d0..d1], &src.contents()[s0..s0 + range.len as usize]);
    }

    #[test]
    fn leaf_sums_that_cannot_be_written_do_not_fail_the_copy() {
        let src = MemDevice::new(4 * MIB);
        src.fill(0, &pattern((4 * MIB) as usize, 21));
        let dst = MemDevice::new(4 * MIB);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leaves");
        std::fs::write(&path, b"").unwrap();
        // Open for reading only: every write of leaf sums fails (EBADF).
        let read_only = File::open(&path).unwrap();
        let outcome = copy_with_leaves(
            &src,
            &dst,
            Range::whole(4 * MIB),
            CopyOptions::default(),
            Some(&read_only),
            &Progress::default(),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert_eq!(dst.contents(), src.contents());
        assert!(!outcome.leaves_whole);
        let writable = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let dst = MemDevice::new(4 * MIB);
        let outcome = copy_with_leaves(
            &src,
            &dst,
            Range::whole(4 * MIB),
            CopyOptions::default(),
            Some(&writable),
            &Progress::default(),
            &AtomicBool::new(false),
        )
        .unwrap();
        assert!(outcome.leaves_whole);
    }
}
