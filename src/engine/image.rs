//! Reading a backup image back, with its checksums: every block is checked against the
//! record's checksum each time it leaves the backing store (`verify_reads`), so data that
//! rotted on disk after an earlier good read is still caught. A damaged block is never
//! handed out: the read fails with EIO. Checked blocks may be served again from memory
//! (a small cache here, and the kernel's page cache of the image), never unchecked bytes.

use super::error::{EngineError, Result};
use crate::copy::{CHECKSUM_BLOCK, Progress, SumKind};
use crate::ids::BackupId;
use crate::volume::Attachment;
use crate::volume::device::{AlignedBuf, BlockDevice};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::error;

/// Checksum lists kept in memory, most recently used first: bounded, so a daemon that
/// serves thousands of backups over months does not keep them all.
const SUMS_CACHED: usize = 64;
/// Checked 1 MiB blocks kept for reads that cover a block in part (a filesystem inside an
/// image reads 4 KiB at a time): each such block is read and checked once, not per piece.
const BLOCKS_CACHED: usize = 16;

/// The checksums of recently opened backups.
#[derive(Default)]
pub(super) struct SumsCache {
    entries: Mutex<VecDeque<(String, Arc<Vec<crate::copy::sums::Sum>>)>>,
}

impl SumsCache {
    pub(super) fn get(
        &self,
        backup_id: &str,
        load: impl FnOnce() -> Result<Vec<crate::copy::sums::Sum>>,
    ) -> Result<Arc<Vec<crate::copy::sums::Sum>>> {
        {
            let mut entries = self.entries.lock();
            if let Some(at) = entries.iter().position(|(id, _)| id == backup_id) {
                let entry = entries.remove(at).expect("position is in range");
                let sums = entry.1.clone();
                entries.push_front(entry);
                return Ok(sums);
            }
        }
        let sums = Arc::new(load()?);
        let mut entries = self.entries.lock();
        entries.retain(|(id, _)| id != backup_id);
        entries.push_front((backup_id.to_string(), sums.clone()));
        entries.truncate(SUMS_CACHED);
        Ok(sums)
    }

    pub(super) fn forget(&self, backup_id: &str) {
        self.entries.lock().retain(|(id, _)| id != backup_id);
        // Checked blocks of a deleted backup are of no use to anyone.
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

/// (backup id, block number) and the block's checked bytes.
type CachedBlock = ((String, u64), Arc<AlignedBuf>);

/// Whole blocks that were read and found good, most recently used first, of images open
/// now: the last close of an image drops its blocks, so the daemon does not carry up to
/// 16 MiB from its last reads into whatever it does next (issue 28: the peak RSS of
/// concurrent backups after a restore).
#[derive(Default)]
pub(super) struct BlockCache {
    blocks: Mutex<VecDeque<CachedBlock>>,
    /// Blocks being read now, for reads that cover them in part: a second such read
    /// waits for the first instead of reading the block again. A reader whose requests
    /// are not aligned to blocks (the kernel's readahead after a 512 KiB start) covers
    /// every block with two requests answered at once by two threads (issue 29: each
    /// block was read, decrypted from the chunk cache and checked twice).
    reading: Mutex<std::collections::HashMap<(String, u64), Arc<Reading>>>,
    /// How many `BackupImage`s of each backup are open.
    open: Mutex<std::collections::HashMap<String, usize>>,
}

/// A block being read: done once its reader put it in the cache or gave up.
#[derive(Default)]
struct Reading {
    done: Mutex<bool>,
    ready: parking_lot::Condvar,
}

/// Held by the one reader of a block; dropping it wakes the others.
struct ReadingClaim<'a> {
    cache: &'a BlockCache,
    key: (String, u64),
    reading: Arc<Reading>,
}

impl Drop for ReadingClaim<'_> {
    fn drop(&mut self) {
        self.cache.reading.lock().remove(&self.key);
        *self.reading.done.lock() = true;
        self.reading.ready.notify_all();
    }
}

impl BlockCache {
    /// The claim to read `block`, or None after waiting for another reader of it
    /// (then look in the cache again: it failed if the block is not there).
    fn claim(&self, backup_id: &str, block: u64) -> Option<ReadingClaim<'_>> {
        let key = (backup_id.to_string(), block);
        let theirs = {
            let mut reading = self.reading.lock();
            match reading.get(&key) {
                Some(r) => r.clone(),
                None => {
                    let r = Arc::new(Reading::default());
                    reading.insert(key.clone(), r.clone());
                    return Some(ReadingClaim {
                        cache: self,
                        key,
                        reading: r,
                    });
                }
            }
        };
        let mut done = theirs.done.lock();
        while !*done {
            theirs.ready.wait(&mut done);
        }
        None
    }

    fn get(&self, backup_id: &str, block: u64) -> Option<Arc<AlignedBuf>> {
        let mut blocks = self.blocks.lock();
        let at = blocks
            .iter()
            .position(|((id, b), _)| *b == block && id == backup_id)?;
        let entry = blocks.remove(at)?;
        let data = entry.1.clone();
        blocks.push_front(entry);
        Some(data)
    }

    fn put(&self, backup_id: &str, block: u64, data: Arc<AlignedBuf>) {
        let mut blocks = self.blocks.lock();
        blocks.retain(|((id, b), _)| !(*b == block && id == backup_id));
        blocks.push_front(((backup_id.to_string(), block), data));
        blocks.truncate(BLOCKS_CACHED);
    }

    pub(super) fn forget(&self, backup_id: &str) {
        self.blocks.lock().retain(|((id, _), _)| id != backup_id);
    }

    fn opened(&self, backup_id: &str) {
        *self.open.lock().entry(backup_id.to_string()).or_default() += 1;
    }

    fn closed(&self, backup_id: &str) {
        let mut open = self.open.lock();
        let last = match open.get_mut(backup_id) {
            Some(count) if *count > 1 => {
                *count -= 1;
                false
            }
            _ => true,
        };
        if last {
            open.remove(backup_id);
            // Under the lock of the counts: an open of the same backup now waits, and
            // finds no block of the closed one to take for its own.
            self.forget(backup_id);
        }
    }
}

/// An open backup image.
pub struct BackupImage {
    pub backup_id: BackupId,
    pub size: u64,
    /// Bytes of data really stored (the rest are holes).
    pub stored_bytes: u64,
    attachment: Attachment,
    /// One per CHECKSUM_BLOCK; empty when the record has none (nothing to check against).
    sums: Arc<Vec<crate::copy::sums::Sum>>,
    /// How they were taken.
    kind: SumKind,
    verify: bool,
    blocks: Arc<BlockCache>,
}

impl Drop for BackupImage {
    fn drop(&mut self) {
        self.blocks.closed(self.backup_id.as_str());
    }
}

impl BackupImage {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        backup_id: &BackupId,
        size: u64,
        stored_bytes: u64,
        attachment: Attachment,
        sums: Arc<Vec<crate::copy::sums::Sum>>,
        kind: SumKind,
        verify: bool,
        blocks: Arc<BlockCache>,
    ) -> BackupImage {
        let verify = verify && !sums.is_empty();
        blocks.opened(backup_id.as_str());
        BackupImage {
            backup_id: backup_id.clone(),
            size,
            stored_bytes,
            attachment,
            sums,
            kind,
            verify,
            blocks,
        }
    }

    /// The device the backup's data is read from.
    pub fn device(&self) -> &dyn BlockDevice {
        self.attachment.device.as_ref()
    }

    /// Where the image's last block holding data starts, from its checksums (a nonzero
    /// block sum: a block with a nonzero byte); None when it holds none or has no
    /// checksums. A whole restore of it writes something at or past this offset, even one
    /// that skips zeros (`cp --sparse=always`).
    pub fn last_data_block(&self) -> Option<u64> {
        self.sums
            .iter()
            .rposition(|&sum| sum != 0)
            .map(|block| block as u64 * CHECKSUM_BLOCK)
    }

    fn block_range(&self, block: u64) -> (u64, u64) {
        let start = block * CHECKSUM_BLOCK;
        (start, (start + CHECKSUM_BLOCK).min(self.size))
    }

    fn expected(&self, block: u64) -> Result<u64> {
        self.sums.get(block as usize).copied().ok_or_else(|| {
            EngineError::io(
                format!(
                    "backup {} has no checksum for block {block}",
                    self.backup_id
                ),
                std::io::Error::from_raw_os_error(libc::EIO),
            )
        })
    }

    fn check(&self, block: u64, data: &[u8]) -> Result<()> {
        if self.kind.block_sum(data) != self.expected(block)? {
            return Err(self.report_damage(block));
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset`; the image's size bounds every read.
    fn read_exact(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let read = self.device().read_at(buf, offset).and_then(|n| {
            if n < buf.len() {
                Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
            } else {
                Ok(())
            }
        });
        read.map_err(|source| EngineError::io(format!("read backup {}", self.backup_id), source))
    }

    /// One whole block, read and checked, and whether it was just read (or taken from
    /// the checked blocks in memory). Read into an aligned buffer: the backing file may be
    /// open with O_DIRECT.
    fn checked_block(&self, block: u64) -> Result<(Arc<AlignedBuf>, bool)> {
        // Once another reader of the block finished, it is in the cache; if that reader
        // failed, this one reads it itself (and fails or succeeds on its own).
        let mut waited = false;
        let _claim = loop {
            if let Some(data) = self.blocks.get(&self.backup_id, block) {
                return Ok((data, false));
            }
            if waited {
                break None;
            }
            match self.blocks.claim(&self.backup_id, block) {
                Some(claim) => {
                    // Put in the cache between the look and the claim.
                    if let Some(data) = self.blocks.get(&self.backup_id, block) {
                        return Ok((data, false));
                    }
                    break Some(claim);
                }
                None => waited = true,
            }
        };
        let (start, end) = self.block_range(block);
        let mut data = AlignedBuf::new((end - start) as usize)
            .map_err(|source| EngineError::io(format!("read backup {}", self.backup_id), source))?;
        self.read_exact(&mut data, start)?;
        self.check(block, &data)?;
        let data = Arc::new(data);
        self.blocks.put(&self.backup_id, block, data.clone());
        Ok((data, true))
    }

    /// Reads like pread; every byte it returns has been checked against its block's
    /// checksum on its way out of the backing store. Whole blocks are checked from the
    /// data just read; a block covered in part is read whole and checked once.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        self.read_at_with(buf, offset, &mut |_, _| {})
    }

    /// `read_at`, and each whole block it had to read and check to serve a part of it is
    /// given to `checked` (offset, data), so the caller may keep it (the kernel's cache).
    pub fn read_at_with(
        &self,
        buf: &mut [u8],
        offset: u64,
        checked: &mut dyn FnMut(u64, Arc<AlignedBuf>),
    ) -> Result<usize> {
        let len = (buf.len() as u64).min(self.size.saturating_sub(offset));
        let buf = &mut buf[..len as usize];
        if len == 0 {
            return Ok(0);
        }
        if !self.verify {
            self.read_exact(buf, offset)?;
            return Ok(buf.len());
        }
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / CHECKSUM_BLOCK;
            let (start, block_end) = self.block_range(block);
            if pos == start && block_end <= end {
                // A run of whole blocks: one read, then a check per block.
                let mut run_end = block_end;
                while run_end < end {
                    let next = (run_end + CHECKSUM_BLOCK).min(self.size);
                    if next > end {
                        break;
                    }
                    run_end = next;
                }
                let run = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
                self.read_exact(run, pos)?;
                for (i, data) in run.chunks(CHECKSUM_BLOCK as usize).enumerate() {
                    self.check(block + i as u64, data)?;
                }
                pos = run_end;
            } else {
                let (data, fresh) = self.checked_block(block)?;
                let piece_end = block_end.min(end);
                buf[(pos - offset) as usize..(piece_end - offset) as usize]
                    .copy_from_slice(&data[(pos - start) as usize..(piece_end - start) as usize]);
                if fresh {
                    checked(start, data);
                }
                pos = piece_end;
            }
        }
        Ok(len as usize)
    }

    /// Checks the blocks covering `[offset, offset+len)` (before the kernel copies them
    /// for a restore): a hole needs no read, it must be a zero block.
    pub fn verify_range(&self, offset: u64, len: u64) -> Result<()> {
        if !self.verify || len == 0 || offset >= self.size {
            return Ok(());
        }
        let first = offset / CHECKSUM_BLOCK;
        let last = (offset + len - 1).min(self.size - 1) / CHECKSUM_BLOCK;
        let mut buf = self.block_buffer()?;
        for block in first..=last {
            if !self.block_is_good(block, &mut buf)? {
                return Err(self.report_damage(block));
            }
        }
        Ok(())
    }

    fn block_buffer(&self) -> Result<AlignedBuf> {
        AlignedBuf::new(CHECKSUM_BLOCK as usize)
            .map_err(|source| EngineError::io(format!("read backup {}", self.backup_id), source))
    }

    fn block_is_good(&self, block: u64, buf: &mut AlignedBuf) -> Result<bool> {
        let (start, end) = self.block_range(block);
        let expected = self.expected(block)?;
        let extents = self
            .device()
            .data_extents(start..end)
            .map_err(|source| EngineError::io(format!("read backup {}", self.backup_id), source))?;
        if extents.is_empty() {
            return Ok(expected == 0);
        }
        let data = &mut buf[..(end - start) as usize];
        self.read_exact(data, start)?;
        Ok(self.kind.block_sum(data) == expected)
    }

    /// Reads every block and returns the damaged ones (by index); progress counts bytes.
    pub fn damaged_blocks(&self, progress: &Progress, cancel: &AtomicBool) -> Result<Vec<u64>> {
        progress.total.store(self.size, Ordering::Relaxed);
        let mut bad = Vec::new();
        let mut buf = self.block_buffer()?;
        for block in 0..self.sums.len() as u64 {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Interrupted);
            }
            if !self.block_is_good(block, &mut buf)? {
                bad.push(block);
            }
            progress
                .done
                .store(self.block_range(block).1, Ordering::Relaxed);
        }
        Ok(bad)
    }

    fn report_damage(&self, block: u64) -> EngineError {
        error!(
            backup_id = %self.backup_id,
            block,
            offset = block * CHECKSUM_BLOCK,
            "backup data is damaged: block does not match its checksum; reads of it fail with EIO (check the storage, then restore from another backup)"
        );
        damaged(&self.backup_id, &[block])
    }
}

pub(super) fn damaged(backup_id: &BackupId, blocks: &[u64]) -> EngineError {
    EngineError::Damaged {
        backup_id: backup_id.to_string(),
        blocks: blocks.to_vec(),
    }
}

/// An image as a read-only device whose every read is checked: a restore copies from it
/// in one pass (read, check, write) where the kernel cannot copy the backing file itself.
/// Its data extents are the blocks whose checksum says they hold data, whatever the
/// backing store says: a block that lost its data to a hole is read, and fails its check.
pub struct CheckedImage<'a>(pub &'a BackupImage);

impl CheckedImage<'_> {
    fn read_only() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::EROFS)
    }
}

impl BlockDevice for CheckedImage<'_> {
    fn describe(&self) -> String {
        format!("backup {}", self.0.backup_id)
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.0.size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.0.read_at(buf, offset).map_err(|e| match e {
            EngineError::Io { source, .. } => source,
            // Damage was logged and recorded where it was found.
            other => std::io::Error::other(other.to_string()),
        })
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> std::io::Result<()> {
        Err(Self::read_only())
    }

    fn grow(&self, _size: u64) -> std::io::Result<()> {
        Err(Self::read_only())
    }

    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn discard(&self, _range: std::ops::Range<u64>) -> std::io::Result<()> {
        Err(Self::read_only())
    }

    fn data_extents(
        &self,
        range: std::ops::Range<u64>,
    ) -> std::io::Result<Vec<std::ops::Range<u64>>> {
        let image = self.0;
        if !image.verify {
            return image.device().data_extents(range);
        }
        let end = range.end.min(image.size);
        let mut extents: Vec<std::ops::Range<u64>> = Vec::new();
        if range.start >= end {
            return Ok(extents);
        }
        let mut block = range.start / CHECKSUM_BLOCK;
        while block * CHECKSUM_BLOCK < end {
            let (start, block_end) = image.block_range(block);
            if image.sums.get(block as usize).is_none_or(|&sum| sum != 0) {
                let piece = start.max(range.start)..block_end.min(end);
                match extents.last_mut() {
                    Some(last) if last.end == piece.start => last.end = piece.end,
                    _ => extents.push(piece),
                }
            }
            block += 1;
        }
        Ok(extents)
    }

    fn hints(&self) -> crate::volume::device::IoHints {
        self.0.device().hints()
    }

    fn seek_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        let image = self.0;
        if !image.verify {
            return image.device().seek_data(offset);
        }
        if offset >= image.size {
            return Ok(None);
        }
        let first = offset / CHECKSUM_BLOCK;
        // A block without a checksum (a damaged record) counts as data: its read fails.
        Ok((first..image.size.div_ceil(CHECKSUM_BLOCK))
            .find(|&b| image.sums.get(b as usize).is_none_or(|&sum| sum != 0))
            .map(|b| (b * CHECKSUM_BLOCK).max(offset)))
    }

    fn seek_hole(&self, offset: u64) -> std::io::Result<Option<u64>> {
        let image = self.0;
        if !image.verify {
            return image.device().seek_hole(offset);
        }
        if offset >= image.size {
            return Ok(None);
        }
        let first = offset / CHECKSUM_BLOCK;
        Ok(Some(
            (first..image.size.div_ceil(CHECKSUM_BLOCK))
                .find(|&b| image.sums.get(b as usize) == Some(&0))
                .map_or(image.size, |b| (b * CHECKSUM_BLOCK).max(offset)),
        ))
    }
}

#[cfg(test)]
mod tests;
