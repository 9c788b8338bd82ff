//! The kernel-copy path: copy_file_range for each data extent between two local files (a
//! reflink or a server-side copy), the generic copier elsewhere or where the kernel cannot.
//! It never flushes the destination (a restore's pieces follow one another).

use super::workers::{How, copy_unflushed};
use super::{CopyError, CopyOptions, Progress, Range};
use crate::volume::device::BlockDevice;
use nix::errno::Errno;
use std::sync::atomic::AtomicBool;

/// Copies `range` with the kernel's copy_file_range for each data extent (a reflink or a
/// server-side copy where the filesystems offer one, never through our buffers) and the
/// destination's discard for the holes, when both devices are local files; otherwise, and
/// where the kernel cannot, through [`super::copy`]. The destination is not flushed.
pub fn copy_kernel(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    range: Range,
) -> Result<(), CopyError> {
    let (Some(src_file), Some(dst_file)) = (src.local_file(), dst.local_file()) else {
        return generic_rest(src, dst, range, range.src_offset);
    };
    let end = range.src_offset + range.len;
    let extents = src
        .data_extents(range.src_offset..end)
        .map_err(|source| CopyError::Read {
            offset: range.src_offset,
            source,
        })?;
    let mut offset = range.src_offset;
    for extent in extents.iter().cloned().chain(std::iter::once(end..end)) {
        if extent.start > offset {
            let at = range.dst_of(offset);
            dst.discard(at..at + (extent.start - offset))
                .map_err(|source| CopyError::Write { offset: at, source })?;
        }
        let mut at = extent.start;
        while at < extent.end {
            let mut off_in = at as i64;
            let mut off_out = range.dst_of(at) as i64;
            let want = (extent.end - at).min(1 << 30) as usize;
            let copied = nix::fcntl::copy_file_range(
                src_file,
                Some(&mut off_in),
                dst_file,
                Some(&mut off_out),
                want,
            );
            let n = match copied {
                Ok(n) => n,
                Err(Errno::EXDEV | Errno::EOPNOTSUPP | Errno::EINVAL | Errno::ENOSYS) => {
                    return generic_rest(src, dst, range, at);
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    return Err(CopyError::Write {
                        offset: range.dst_of(at),
                        source: e.into(),
                    });
                }
            };
            if n == 0 {
                return Err(CopyError::ShortSource { offset: at });
            }
            at += n as u64;
        }
        offset = offset.max(extent.end);
    }
    Ok(())
}

/// Copies `range` through the generic copier (never the kernel's copy), not flushed.
pub fn copy_unflushed_through(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    range: Range,
) -> Result<(), CopyError> {
    generic_rest(src, dst, range, range.src_offset)
}

/// The rest of `range` from source offset `from`, through the generic copier, not
/// flushed (as the kernel's copy is not): a restore's pieces follow one another while
/// the last one's writes are still in flight; the volume is flushed at fsync and close.
/// No checksums are taken (nobody asks for them).
fn generic_rest(
    src: &dyn BlockDevice,
    dst: &dyn BlockDevice,
    range: Range,
    from: u64,
) -> Result<(), CopyError> {
    let rest = Range {
        src_offset: from,
        dst_offset: range.dst_of(from),
        len: range.src_offset + range.len - from,
    };
    copy_unflushed(
        src,
        dst,
        rest,
        CopyOptions::default(),
        How {
            base: None,
            leaves: None,
            sums: false,
        },
        &Progress::default(),
        &AtomicBool::new(false),
    )
    .map(drop)
}
