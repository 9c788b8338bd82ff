//! What changed between two reflinked copies of a file (btrfs, XFS), from their extent
//! maps (FS_IOC_FIEMAP, synced first): a range is unchanged only where both copies map
//! it to the same physical bytes (or where both have a hole). Anything else (a new
//! extent, delayed allocation, unwritten or encoded extents, an unknown address) counts
//! as changed: this never leaves out a changed byte, it may include unchanged ones.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

// `FS_IOC_FIEMAP`, `_IOWR('f', 11, struct fiemap)`: the code carries the size of the
// header (32 bytes), the buffer holds `EXTENTS_PER_CALL` extents after it.
nix::ioctl_readwrite_bad!(
    fs_ioc_fiemap,
    nix::request_code_readwrite!(b'f', 11, 32),
    Fiemap
);
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
/// Extents whose physical address says nothing reliable about their bytes.
const UNRELIABLE: u32 = 0x2 // UNKNOWN
    | 0x4 // DELALLOC
    | 0x8 // ENCODED
    | 0x80 // DATA_ENCRYPTED
    | 0x100 // NOT_ALIGNED
    | 0x200 // DATA_INLINE
    | 0x400 // DATA_TAIL
    | 0x800; // UNWRITTEN
const EXTENTS_PER_CALL: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS_PER_CALL],
}

/// One mapped extent of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    /// Its physical address identifies its bytes.
    pub reliable: bool,
}

/// The mapped extents of `file` overlapping `range`, in order.
pub fn extents(file: &File, range: Range<u64>) -> io::Result<Vec<Extent>> {
    let mut found = Vec::new();
    let mut start = range.start;
    while start < range.end {
        let mut map = Box::new(Fiemap {
            start,
            length: range.end - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: EXTENTS_PER_CALL as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
        });
        // SAFETY: FS_IOC_FIEMAP reads the header and fills up to extent_count extents of
        // the buffer we own, which has room for exactly that many.
        unsafe { fs_ioc_fiemap(file.as_raw_fd(), &mut *map) }?;
        let mapped = (map.mapped_extents as usize).min(EXTENTS_PER_CALL);
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for e in &map.extents[..mapped] {
            found.push(Extent {
                logical: e.logical,
                physical: e.physical,
                length: e.length,
                reliable: e.flags & UNRELIABLE == 0,
            });
            last |= e.flags & FIEMAP_EXTENT_LAST != 0;
        }
        let end = map.extents[mapped - 1].logical + map.extents[mapped - 1].length;
        if last || end <= start {
            break;
        }
        start = end;
    }
    Ok(found)
}

/// The parts of `range` where `new` may differ from `base`, in order and merged.
pub fn changed(base: &File, new: &File, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
    let (old, new) = (extents(base, range.clone())?, extents(new, range.clone())?);
    Ok(diff(&old, &new, range))
}

/// The extent covering `at`, if any (extents are sorted and do not overlap).
fn covering(extents: &[Extent], at: u64) -> Option<&Extent> {
    let i = extents.partition_point(|e| e.logical + e.length <= at);
    extents.get(i).filter(|e| e.logical <= at)
}

/// The pure part of [`changed`]: compares two extent maps over `range`.
pub fn diff(old: &[Extent], new: &[Extent], range: Range<u64>) -> Vec<Range<u64>> {
    let mut points: Vec<u64> = vec![range.start, range.end];
    for e in old.iter().chain(new) {
        for p in [e.logical, e.logical.saturating_add(e.length)] {
            if range.contains(&p) {
                points.push(p);
            }
        }
    }
    points.sort_unstable();
    points.dedup();
    let mut changed: Vec<Range<u64>> = Vec::new();
    for pair in points.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        let same = match (covering(old, a), covering(new, a)) {
            (None, None) => true,
            (Some(o), Some(n)) => {
                o.reliable
                    && n.reliable
                    && o.physical.checked_add(a - o.logical)
                        == n.physical.checked_add(a - n.logical)
            }
            _ => false,
        };
        if same {
            continue;
        }
        match changed.last_mut() {
            Some(last) if last.end == a => last.end = b,
            _ => changed.push(a..b),
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(logical: u64, physical: u64, length: u64) -> Extent {
        Extent {
            logical,
            physical,
            length,
            reliable: true,
        }
    }

    #[test]
    fn shared_extents_are_unchanged_and_moved_ones_changed() {
        // The new copy rewrote 64 KiB at 1 MiB (new physical place) and appended 4 KiB.
        let old = [e(0, 1000 << 20, 4 << 20)];
        let new = [
            e(0, 1000 << 20, 1 << 20),
            e(1 << 20, 5000 << 20, 64 << 10),
            e(
                (1 << 20) + (64 << 10),
                (1001 << 20) + (64 << 10),
                (3 << 20) - (64 << 10),
            ),
            e(4 << 20, 6000 << 20, 4096),
        ];
        assert_eq!(
            diff(&old, &new, 0..(8 << 20)),
            vec![
                (1 << 20)..((1 << 20) + (64 << 10)),
                (4 << 20)..((4 << 20) + 4096)
            ]
        );
    }

    #[test]
    fn holes_punched_or_filled_and_unreliable_extents_are_changed() {
        let old = [e(0, 100, 8192), e(16384, 900, 4096)];
        let mut delalloc = e(16384, 900, 4096);
        delalloc.reliable = false;
        // A hole punched in the old data; the same place, but delayed: unknown.
        let new = [e(0, 100, 4096), delalloc, e(40960, 7, 4096)];
        assert_eq!(
            diff(&old, &new, 0..65536),
            vec![4096..8192, 16384..20480, 40960..45056]
        );
        // Both holes: unchanged.
        assert!(diff(&[], &[], 0..65536).is_empty());
    }

    #[test]
    fn a_physical_shift_inside_an_extent_is_a_change() {
        let old = [e(0, 1 << 30, 1 << 20)];
        let new = [e(0, (1 << 30) + 4096, 1 << 20)];
        assert_eq!(diff(&old, &new, 0..(1 << 20)), vec![0..(1 << 20)]);
    }
}
