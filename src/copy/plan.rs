//! The incremental planner: which blocks and 64 KiB leaves of the source may differ from
//! the base (changed ranges, checksums, leaf sums); only what differs is written. It never
//! trusts a leaf-sums entry that does not make the base's checksum of its block.

use super::sums::{
    LEAF, LEAF_SUMS_PER_BLOCK_BYTES, LEAVES_PER_BLOCK, SUM_BYTES, Sum, SumKind, decode_sum,
    decode_sums, encode_sums_into, flat_sum, sum_of_leaves,
};
use super::workers::Shared;
use super::{Base, CHECKSUM_BLOCK, CopyError};
use std::sync::atomic::Ordering;

impl Base<'_> {
    /// Whether block `block` (source range `start..end`) may differ from the base.
    fn touched(&self, block: u64, start: u64, end: u64) -> bool {
        if end > self.size || block >= self.sums.len() as u64 {
            return true;
        }
        self.changed.is_none() || self.changed_in(start, end).next().is_some()
    }

    /// The changed ranges that meet `start..end`, clipped to it (none when the ranges
    /// are not known).
    fn changed_in(&self, start: u64, end: u64) -> impl Iterator<Item = std::ops::Range<u64>> {
        let changed = self.changed.unwrap_or_default();
        let first = changed.partition_point(|r| r.end <= start);
        changed[first..]
            .iter()
            .take_while(move |r| r.start < end)
            .map(move |r| r.start.max(start)..r.end.min(end))
    }
}

/// How an incremental copy reads a block.
enum Plan {
    /// Not at all: the base cannot differ there.
    Keep,
    /// The base's leaf sums, and which leaves to read (those a changed range touches).
    Leaves([Sum; LEAVES_PER_BLOCK], [bool; LEAVES_PER_BLOCK]),
    /// Whole: its checksum needs all of it.
    Whole,
}

/// The runs of consecutive indexes in `0..n` for which `set` holds, in order.
fn runs(n: usize, set: impl Fn(usize) -> bool) -> impl Iterator<Item = std::ops::Range<usize>> {
    let mut i = 0;
    std::iter::from_fn(move || {
        while i < n && !set(i) {
            i += 1;
        }
        let start = i;
        while i < n && set(i) {
            i += 1;
        }
        (start < i).then_some(start..i)
    })
}

impl Shared<'_> {
    /// The base's leaf sums of `block` (`n` leaves), if the leaf-sums file holds them and
    /// they make the base's checksum of the block: a damaged or missing entry only costs
    /// a read of the whole block.
    fn base_leaves(&self, base: &Base, block: u64, n: usize) -> Option<[Sum; LEAVES_PER_BLOCK]> {
        let file = self.how.leaves?;
        if base.kind != SumKind::Leaves {
            return None;
        }
        let expected = *base.sums.get(block as usize)?;
        let mut bytes = [0u8; LEAVES_PER_BLOCK * SUM_BYTES];
        std::os::unix::fs::FileExt::read_exact_at(
            file,
            &mut bytes,
            block * LEAF_SUMS_PER_BLOCK_BYTES,
        )
        .ok()?;
        let mut leaves = [0; LEAVES_PER_BLOCK];
        for (leaf, sum) in leaves.iter_mut().zip(decode_sums(&bytes)) {
            *leaf = sum;
        }
        (sum_of_leaves(&leaves[..n]) == expected).then_some(leaves)
    }

    /// An incremental chunk: the destination holds the base; blocks the base cannot differ
    /// from keep its checksums unread. Of a block that may differ, only the leaves a
    /// changed range touches are read when the base's leaf sums are at hand (the others'
    /// sums are the base's); otherwise the whole block is read (its checksum needs all of
    /// it). Only what differs is written: the changed ranges, or with no ranges known, the
    /// blocks whose checksum differs from the base's.
    pub(super) fn update_chunk(
        &self,
        base: Base,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), CopyError> {
        let len = buf.len() as u64;
        let first_block = offset / CHECKSUM_BLOCK;
        let block_range = |b: u64| {
            let start = b * CHECKSUM_BLOCK;
            (start, (start + CHECKSUM_BLOCK).min(offset + len))
        };
        let plans: Vec<Plan> = (first_block..first_block + len.div_ceil(CHECKSUM_BLOCK))
            .map(|b| {
                let (start, end) = block_range(b);
                self.plan(&base, b, start, end)
            })
            .collect();
        // Each run of blocks read whole is read at once, each run of changed leaves too.
        for run in runs(plans.len(), |i| matches!(plans[i], Plan::Whole)) {
            let (start, _) = block_range(first_block + run.start as u64);
            let (_, end) = block_range(first_block + run.end as u64 - 1);
            self.read_span(offset, buf, start, end)?;
        }
        for (i, plan) in plans.iter().enumerate() {
            let Plan::Leaves(_, read) = plan else {
                continue;
            };
            let (start, end) = block_range(first_block + i as u64);
            for leaves in runs(LEAVES_PER_BLOCK, |l| read[l]) {
                let from = start + leaves.start as u64 * LEAF;
                let to = (start + leaves.end as u64 * LEAF).min(end);
                self.read_span(offset, buf, from, to)?;
            }
        }
        for (i, plan) in plans.iter().enumerate() {
            let block = first_block + i as u64;
            let (start, end) = block_range(block);
            let data = &buf[(start - offset) as usize..(end - offset) as usize];
            self.update_block(&base, block, start, data, plan)?;
        }
        Ok(())
    }

    /// How an incremental reads `block` (source `start..end`).
    fn plan(&self, base: &Base, block: u64, start: u64, end: u64) -> Plan {
        // A base whose checksums were taken another way (made before leaf sums): every
        // block is read once, for checksums of the new kind; still only what changed is
        // written.
        if base.kind != SumKind::CURRENT {
            return Plan::Whole;
        }
        if !base.touched(block, start, end) {
            return Plan::Keep;
        }
        if base.changed.is_none() || end > base.size {
            return Plan::Whole;
        }
        let n = (end - start).div_ceil(LEAF) as usize;
        let Some(leaves) = self.base_leaves(base, block, n) else {
            return Plan::Whole;
        };
        let mut read = [false; LEAVES_PER_BLOCK];
        for range in base.changed_in(start, end) {
            let from = (range.start - start) / LEAF;
            let to = (range.end - start).div_ceil(LEAF);
            read[from as usize..to as usize].fill(true);
        }
        Plan::Leaves(leaves, read)
    }

    /// An incremental's block, read as `plan` said: its checksum (and leaf sums) taken or
    /// kept, and what differs from the base written.
    fn update_block(
        &self,
        base: &Base,
        block: u64,
        start: u64,
        data: &[u8],
        plan: &Plan,
    ) -> Result<(), CopyError> {
        let end = start + data.len() as u64;
        let n = data.len().div_ceil(LEAF as usize);
        let migrate = base.kind != SumKind::CURRENT;
        // Comparing by checksums: the base's leaf sums (read before this block's entry is
        // rewritten) tell which 64 KiB of a block that differs need writing.
        let base_leaves = match (plan, base.changed) {
            (Plan::Whole, None) if !migrate && end <= base.size => self.base_leaves(base, block, n),
            _ => None,
        };
        let mut leaves = Vec::new();
        let sum = match plan {
            Plan::Keep => {
                self.sums[block as usize].store(base.sums[block as usize], Ordering::Relaxed);
                return Ok(());
            }
            Plan::Whole => self.block_sum(data, &mut leaves),
            Plan::Leaves(old, read) => {
                let mut sums = *old;
                for (l, leaf) in data.chunks(LEAF as usize).enumerate() {
                    if read[l] {
                        sums[l] = flat_sum(leaf);
                    }
                }
                encode_sums_into(&mut leaves, &sums);
                sum_of_leaves(&sums[..n])
            }
        };
        self.sums[block as usize].store(sum, Ordering::Relaxed);
        let new_leaf = |l: usize| decode_sum(leaves.get(l * SUM_BYTES..).unwrap_or_default());
        // The file holds the base's entries: an unchanged block's are not rewritten (no
        // write per MiB, and the file keeps sharing its parent's blocks).
        let entry_kept = base_leaves.is_some_and(|old| {
            leaves.len() == LEAVES_PER_BLOCK * SUM_BYTES
                && (0..LEAVES_PER_BLOCK).all(|l| old[l] == new_leaf(l))
        });
        if !entry_kept {
            self.write_leaves(block, &leaves);
        }
        if migrate && !base.touched(block, start, end) {
            return Ok(());
        }
        if base.changed.is_some() {
            for range in base.changed_in(start, end) {
                let piece = &data[(range.start - start) as usize..(range.end - start) as usize];
                self.write_changed(range.start, piece)?;
            }
            return Ok(());
        }
        let base_way = if migrate {
            base.kind.block_sum(data)
        } else {
            sum
        };
        if end <= base.size && base.sums.get(block as usize) == Some(&base_way) {
            return Ok(());
        }
        let Some(old) = base_leaves else {
            return self.write_changed(start, data);
        };
        for run in runs(n, |l| old[l] != new_leaf(l)) {
            let from = run.start * LEAF as usize;
            let to = (run.end * LEAF as usize).min(data.len());
            self.write_changed(start + from as u64, &data[from..to])?;
        }
        Ok(())
    }

    /// Writes a piece that differs from the base, and counts it as changed.
    fn write_changed(&self, offset: u64, piece: &[u8]) -> Result<(), CopyError> {
        self.write_data(offset, piece)?;
        self.changed_bytes
            .fetch_add(piece.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{MIB, pattern};
    use super::super::*;
    use crate::volume::device::BlockDevice;
    use crate::volume::device::memory::MemDevice;
    use std::fs::File;
    use std::sync::atomic::AtomicBool;

    /// A base, a source that differs from it in a few places (one turned to zeros, one
    /// past the base's end), and a destination that is a copy of the base.
    fn incremental_case(
        kind: SumKind,
    ) -> (
        MemDevice,
        MemDevice,
        Vec<u64>,
        u64,
        Vec<std::ops::Range<u64>>,
    ) {
        let base_len = 10 * MIB;
        let base = MemDevice::new(base_len);
        base.fill(0, &pattern(base_len as usize, 13));
        let sums: Vec<u64> = base
            .contents()
            .chunks(MIB as usize)
            .map(|b| kind.block_sum(b))
            .collect();
        let src = MemDevice::new(12 * MIB + 100);
        src.fill(0, &base.contents());
        let changed = vec![
            (MIB + 4096)..(MIB + 3 * 4096),
            (5 * MIB - 100)..(5 * MIB + 200),
            (7 * MIB)..(7 * MIB + (64 << 10)),
            (11 * MIB)..(11 * MIB + 5000),
        ];
        src.fill(changed[0].start, &pattern(2 * 4096, 14));
        src.fill(changed[1].start, &pattern(300, 15));
        src.fill(changed[2].start, &[0u8; 64 << 10]);
        src.fill(changed[3].start, &pattern(5000, 16));
        let dst = MemDevice::new(base_len);
        dst.fill(0, &base.contents());
        dst.grow(src.size().unwrap()).unwrap();
        (src, dst, sums, base_len, changed)
    }

    #[test]
    fn an_incremental_copy_writes_only_the_changed_ranges_and_gives_whole_checksums() {
        let (src, dst, sums, base_len, changed) = incremental_case(SumKind::Leaves);
        let len = src.size().unwrap();
        let base = Base {
            sums: &sums,
            size: base_len,
            changed: Some(&changed),
            kind: SumKind::Leaves,
        };
        let outcome = incremental(&src, &dst, len, base, None);
        assert_eq!(dst.contents(), src.contents());
        let full: Vec<u64> = src
            .contents()
            .chunks(MIB as usize)
            .map(|b| SumKind::CURRENT.block_sum(b))
            .collect();
        assert_eq!(outcome.checksums, full);
        // Only the blocks the ranges touch (and those past the base) were read.
        assert!(
            outcome.bytes_read <= 6 * MIB + 100,
            "{}",
            outcome.bytes_read
        );
        let changed_len: u64 = changed.iter().map(|r| r.end - r.start).sum();
        assert_eq!(outcome.changed_bytes, changed_len);
        // The zeroed range became a hole; the written bytes are about the changed ones.
        assert!(
            outcome.bytes_written <= changed_len + 4 * (super::super::workers::ZERO_GRAIN as u64),
            "{}",
            outcome.bytes_written
        );
        assert!(!dst.discarded.lock().is_empty());
    }

    /// `copy_incremental` of the whole of `src` over `dst`, no rate limit.
    fn incremental(
        src: &MemDevice,
        dst: &MemDevice,
        len: u64,
        base: Base,
        leaves: Option<&File>,
    ) -> CopyOutcome {
        copy_incremental(
            src,
            dst,
            len,
            base,
            leaves,
            0,
            &Progress::default(),
            &AtomicBool::new(false),
        )
        .unwrap()
    }

    fn contents(file: &File) -> Vec<u8> {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &*file, &mut bytes).unwrap();
        bytes
    }

    /// The leaf sums a full copy of `device` writes.
    fn leaves_of(device: &MemDevice) -> Vec<u8> {
        let file = tempfile::tempfile().unwrap();
        let len = device.size().unwrap();
        let dst = MemDevice::new(len);
        copy_with_leaves(
            device,
            &dst,
            Range::whole(len),
            CopyOptions::default(),
            Some(&file),
            &Progress::default(),
            &AtomicBool::new(false),
        )
        .unwrap();
        let mut bytes = contents(&file);
        bytes.resize(
            (len.div_ceil(CHECKSUM_BLOCK) * LEAF_SUMS_PER_BLOCK_BYTES) as usize,
            0,
        );
        bytes
    }

    #[test]
    fn with_the_bases_leaf_sums_an_incremental_copy_reads_only_the_changed_leaves() {
        let (src, dst, sums, base_len, changed) = incremental_case(SumKind::Leaves);
        let len = src.size().unwrap();
        let base_device = MemDevice::new(base_len);
        base_device.fill(0, &dst.contents()[..base_len as usize]);
        let full_sums: Vec<u64> = src
            .contents()
            .chunks(MIB as usize)
            .map(|b| SumKind::Leaves.block_sum(b))
            .collect();
        for damaged_entry in [false, true] {
            let dst = MemDevice::new(base_len);
            dst.fill(0, &base_device.contents());
            dst.grow(len).unwrap();
            let mut base_leaves = leaves_of(&base_device);
            if damaged_entry {
                // Block 1's entries rot: that block is read whole instead.
                base_leaves[(LEAF_SUMS_PER_BLOCK_BYTES + 3) as usize] ^= 1;
            }
            let file = tempfile::tempfile().unwrap();
            std::os::unix::fs::FileExt::write_all_at(&file, &base_leaves, 0).unwrap();
            let base = Base {
                sums: &sums,
                size: base_len,
                changed: Some(&changed),
                kind: SumKind::Leaves,
            };
            let outcome = incremental(&src, &dst, len, base, Some(&file));
            assert_eq!(dst.contents(), src.contents());
            assert_eq!(outcome.checksums, full_sums);
            assert_eq!(
                contents(&file),
                leaves_of(&src),
                "the new leaf sums are the source's"
            );
            // Four leaves in the base's blocks (one range straddles two blocks), and the
            // data past the base's end (5000 bytes, in whole pages); block 1 whole if its
            // entry rotted.
            let rest = if damaged_entry { MIB - LEAF } else { 0 };
            let expected = 4 * LEAF + 2 * 4096 + rest;
            assert_eq!(
                outcome.bytes_read, expected,
                "damaged entry: {damaged_entry}"
            );
        }
    }

    #[test]
    fn compared_by_checksums_with_the_bases_leaf_sums_only_differing_leaves_are_written() {
        let (src, dst, sums, base_len, _) = incremental_case(SumKind::Leaves);
        let len = src.size().unwrap();
        let base_device = MemDevice::new(base_len);
        base_device.fill(0, &dst.contents()[..base_len as usize]);
        let file = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &leaves_of(&base_device), 0).unwrap();
        let base = Base {
            sums: &sums,
            size: base_len,
            changed: None,
            kind: SumKind::Leaves,
        };
        let outcome = incremental(&src, &dst, len, base, Some(&file));
        assert_eq!(dst.contents(), src.contents());
        assert_eq!(contents(&file), leaves_of(&src));
        // Four leaves differ in the base's blocks; what lies past the base is new.
        assert_eq!(outcome.changed_bytes, 4 * LEAF + (len - base_len));
        assert!(outcome.bytes_read >= base_len, "{}", outcome.bytes_read);
    }

    #[test]
    fn an_incremental_copy_without_ranges_compares_checksums_and_writes_whole_changed_blocks() {
        // A parent made before leaf sums: blocks are compared its way, and the new
        // checksums are taken the current way.
        let (src, dst, sums, base_len, _) = incremental_case(SumKind::Flat);
        let len = src.size().unwrap();
        let base = Base {
            sums: &sums,
            size: base_len,
            changed: None,
            kind: SumKind::Flat,
        };
        let outcome = incremental(&src, &dst, len, base, None);
        assert_eq!(dst.contents(), src.contents());
        assert_eq!(outcome.kind, SumKind::Leaves);
        let full: Vec<u64> = src
            .contents()
            .chunks(MIB as usize)
            .map(|b| SumKind::Leaves.block_sum(b))
            .collect();
        assert_eq!(outcome.checksums, full);
        // Blocks 1, 4, 5, 7 differ, and the two past the base's end are new.
        assert_eq!(outcome.changed_bytes, 4 * MIB + (2 * MIB + 100));
        // Every block with data is read (the holes past the base are not).
        assert!(outcome.bytes_read >= base_len, "{}", outcome.bytes_read);
    }

    /// A base of `size` bytes (its pattern, then zeros from `zeros_from`), its checksums,
    /// and a copy of it grown to `len` as the destination of an incremental.
    fn base_case(size: u64, zeros_from: u64, len: u64) -> (MemDevice, Vec<u64>, MemDevice) {
        let base = MemDevice::new(size);
        base.fill(0, &pattern(zeros_from as usize, 21));
        base.fill(zeros_from, &vec![0u8; (size - zeros_from) as usize]);
        let sums: Vec<u64> = base
            .contents()
            .chunks(MIB as usize)
            .map(|b| SumKind::CURRENT.block_sum(b))
            .collect();
        let dst = MemDevice::new(size);
        dst.fill(0, &base.contents());
        dst.grow(len).unwrap();
        (base, sums, dst)
    }

    /// A source that reads as `base` grown to `len`, with `changes` (offset, length)
    /// written over it.
    fn changed_source(base: &MemDevice, len: u64, changes: &[(u64, u64)]) -> MemDevice {
        let src = MemDevice::new(len);
        src.fill(0, &base.contents());
        for (i, &(at, n)) in changes.iter().enumerate() {
            src.fill(at, &pattern(n as usize, 30 + i as u8));
        }
        src
    }

    fn block_sums(device: &MemDevice) -> Vec<u64> {
        device
            .contents()
            .chunks(MIB as usize)
            .map(|b| SumKind::CURRENT.block_sum(b))
            .collect()
    }

    #[test]
    fn an_incremental_copy_reads_exactly_the_blocks_its_changes_touch_and_no_neighbour() {
        // Chunks are 2 MiB (MemDevice's request size): a change in block 2 is followed by
        // unchanged block 3 in its chunk; a change starts exactly where block 6 ends; the
        // last block (9) ends exactly at the base's end and is unchanged. No leaf sums:
        // a block a change touches is read whole, and only those.
        let (base, sums, dst) = base_case(10 * MIB, 10 * MIB, 10 * MIB);
        let changes = [(2 * MIB + 4096, 8192), (7 * MIB, LEAF)];
        let src = changed_source(&base, 10 * MIB, &changes);
        let ranges: Vec<_> = changes.iter().map(|&(at, n)| at..at + n).collect();
        let outcome = incremental(
            &src,
            &dst,
            10 * MIB,
            Base {
                sums: &sums,
                size: 10 * MIB,
                changed: Some(&ranges),
                kind: SumKind::CURRENT,
            },
            None,
        );
        assert_eq!(dst.contents(), src.contents());
        assert_eq!(outcome.checksums, block_sums(&src));
        assert_eq!(outcome.bytes_read, 2 * MIB, "blocks 2 and 7, nothing else");
        assert_eq!(outcome.changed_bytes, 8192 + LEAF);
    }

    #[test]
    fn with_leaf_sums_a_change_in_the_block_ending_at_the_bases_end_reads_only_its_leaf() {
        let (base, sums, dst) = base_case(10 * MIB, 10 * MIB, 10 * MIB);
        let file = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &leaves_of(&base), 0).unwrap();
        let changes = [(9 * MIB + 5 * LEAF + 100, 300)];
        let src = changed_source(&base, 10 * MIB, &changes);
        let ranges: Vec<_> = changes.iter().map(|&(at, n)| at..at + n).collect();
        let outcome = incremental(
            &src,
            &dst,
            10 * MIB,
            Base {
                sums: &sums,
                size: 10 * MIB,
                changed: Some(&ranges),
                kind: SumKind::CURRENT,
            },
            Some(&file),
        );
        assert_eq!(dst.contents(), src.contents());
        assert_eq!(outcome.checksums, block_sums(&src));
        assert_eq!(contents(&file), leaves_of(&src));
        assert_eq!(
            outcome.bytes_read, LEAF,
            "one leaf of block 9, not the block"
        );
    }

    #[test]
    fn a_base_of_no_whole_blocks_grown_by_a_hole_gets_the_checksum_of_its_grown_last_block() {
        // A file volume of 10 MiB + 100 bytes, grown (sparse) to 11 MiB: the extent maps
        // of the two snapshots differ nowhere (a hole is a hole), so no range is changed,
        // yet block 10 is now a whole block and its checksum is no longer the base's.
        let size = 10 * MIB + 100;
        let (base, sums, dst) = base_case(size, size, 11 * MIB);
        let src = changed_source(&base, 11 * MIB, &[]);
        let outcome = incremental(
            &src,
            &dst,
            11 * MIB,
            Base {
                sums: &sums,
                size,
                changed: Some(&[]),
                kind: SumKind::CURRENT,
            },
            None,
        );
        assert_eq!(dst.contents(), src.contents());
        assert_ne!(sums[10], block_sums(&src)[10], "the case needs a new sum");
        assert_eq!(outcome.checksums, block_sums(&src));
        assert_eq!(outcome.changed_bytes, 0);
    }

    #[test]
    fn compared_by_checksums_everything_from_a_short_last_block_of_the_base_on_is_new() {
        // The base's last block is 100 bytes of zeros (its leaf sums are zeros, and make
        // its checksum); the volume grew, with data in that block past the base's end.
        let size = 10 * MIB + 100;
        let (base, sums, dst) = base_case(size, 10 * MIB, 12 * MIB);
        let file = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, &leaves_of(&base), 0).unwrap();
        let src = changed_source(&base, 12 * MIB, &[(10 * MIB + 3 * LEAF, 5000)]);
        let outcome = incremental(
            &src,
            &dst,
            12 * MIB,
            Base {
                sums: &sums,
                size,
                changed: None,
                kind: SumKind::CURRENT,
            },
            Some(&file),
        );
        assert_eq!(dst.contents(), src.contents());
        assert_eq!(outcome.checksums, block_sums(&src));
        assert_eq!(contents(&file), leaves_of(&src));
        // Blocks 10 and 11 lie (partly) past the base: written and counted whole, never
        // compared leaf by leaf with what the base's short block held.
        assert_eq!(outcome.changed_bytes, 2 * MIB);
    }

    #[test]
    fn compared_by_checksums_an_unchanged_blocks_leaf_sums_entry_is_not_rewritten() {
        // The leaf-sums file keeps the base's entries where a block is unchanged (no
        // write, and its blocks stay shared with the parent's): given a file that cannot
        // be written, an incremental of an unchanged volume still has whole leaf sums.
        // The last block is short (10 MiB + 100 bytes).
        let size = 10 * MIB + 100;
        let (base, sums, dst) = base_case(size, size, size);
        let scratch = tempfile::tempdir().unwrap();
        let path = scratch.path().join("leaves");
        std::fs::write(&path, leaves_of(&base)).unwrap();
        let read_only = File::open(&path).unwrap();
        let src = changed_source(&base, size, &[]);
        let outcome = incremental(
            &src,
            &dst,
            size,
            Base {
                sums: &sums,
                size,
                changed: None,
                kind: SumKind::CURRENT,
            },
            Some(&read_only),
        );
        assert_eq!(dst.contents(), src.contents());
        assert_eq!(outcome.checksums, sums);
        assert_eq!(outcome.changed_bytes, 0);
        assert!(outcome.leaves_whole, "an entry was rewritten");
        // The same with one changed leaf: its entry must be written, and cannot be.
        let src = changed_source(&base, size, &[(4 * MIB + LEAF, 10)]);
        let outcome = incremental(
            &src,
            &dst,
            size,
            Base {
                sums: &sums,
                size,
                changed: None,
                kind: SumKind::CURRENT,
            },
            Some(&read_only),
        );
        assert_eq!(dst.contents(), src.contents());
        assert!(!outcome.leaves_whole, "a changed entry was kept");
    }
}
