//! Reading a backup image back, with its checksums: every block is checked against the
//! record's checksum the first time it is read (`verify_reads`), and `verify` checks a
//! whole image. A damaged block is never handed out: the read fails with EIO.

use super::{EngineError, Result};
use crate::copy::{CHECKSUM_BLOCK, block_sum};
use crate::volume::Attachment;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tracing::error;

/// What is known about one backup's blocks, shared by every open of its image.
pub(super) struct ImageState {
    /// One per CHECKSUM_BLOCK; empty when the record has none (verification is skipped).
    sums: Vec<u64>,
    /// A bit per block that has been read and found good.
    verified: Vec<AtomicU64>,
}

impl ImageState {
    pub(super) fn new(sums: Vec<u64>) -> ImageState {
        let words = sums.len().div_ceil(64);
        ImageState {
            sums,
            verified: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn is_verified(&self, block: usize) -> bool {
        self.verified[block / 64].load(Ordering::Relaxed) & (1 << (block % 64)) != 0
    }

    fn set_verified(&self, block: usize, good: bool) {
        let bit = 1 << (block % 64);
        if good {
            self.verified[block / 64].fetch_or(bit, Ordering::Relaxed);
        } else {
            self.verified[block / 64].fetch_and(!bit, Ordering::Relaxed);
        }
    }
}

/// Per-backup image states, so a block checked once is not checked again.
#[derive(Default)]
pub(super) struct ImageCache {
    states: Mutex<HashMap<String, Arc<ImageState>>>,
}

impl ImageCache {
    pub(super) fn get(
        &self,
        backup_id: &str,
        load: impl FnOnce() -> Result<Vec<u64>>,
    ) -> Result<Arc<ImageState>> {
        if let Some(state) = self.states.lock().get(backup_id) {
            return Ok(state.clone());
        }
        let state = Arc::new(ImageState::new(load()?));
        Ok(self
            .states
            .lock()
            .entry(backup_id.to_string())
            .or_insert(state)
            .clone())
    }

    pub(super) fn forget(&self, backup_id: &str) {
        self.states.lock().remove(backup_id);
    }
}

/// An open backup image.
pub struct Image {
    pub backup_id: String,
    pub size: u64,
    attachment: Attachment,
    state: Arc<ImageState>,
    verify: bool,
}

/// True when `[offset, offset+len)` of the file is all hole.
fn is_hole(file: &File, offset: u64, len: u64) -> bool {
    // SAFETY: lseek on a descriptor we borrow.
    let next = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, libc::SEEK_DATA) };
    if next < 0 {
        // ENXIO: no data after offset.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    next as u64 >= offset + len
}

impl Image {
    pub(super) fn new(
        backup_id: &str,
        size: u64,
        attachment: Attachment,
        state: Arc<ImageState>,
        verify: bool,
    ) -> Image {
        let verify = verify && !state.sums.is_empty();
        Image {
            backup_id: backup_id.to_string(),
            size,
            attachment,
            state,
            verify,
        }
    }

    pub fn file(&self) -> &File {
        &self.attachment.file
    }

    fn block_len(&self, block: usize) -> u64 {
        let start = block as u64 * CHECKSUM_BLOCK;
        CHECKSUM_BLOCK.min(self.size.saturating_sub(start))
    }

    /// Checks one block against its checksum; true if good.
    fn check_block(&self, block: usize, buf: &mut Vec<u8>) -> Result<bool> {
        let start = block as u64 * CHECKSUM_BLOCK;
        let len = self.block_len(block);
        let expected = self.state.sums[block];
        let actual = if is_hole(self.file(), start, len) {
            0
        } else {
            buf.resize(len as usize, 0);
            self.file()
                .read_exact_at(buf, start)
                .map_err(|source| EngineError::Io {
                    op: format!("read backup {} block {block}", self.backup_id),
                    source,
                })?;
            block_sum(buf)
        };
        Ok(actual == expected)
    }

    /// Verifies the not yet verified blocks covering `[offset, offset+len)`.
    pub fn verify_range(&self, offset: u64, len: u64) -> Result<()> {
        if !self.verify || len == 0 || offset >= self.size {
            return Ok(());
        }
        let first = (offset / CHECKSUM_BLOCK) as usize;
        let last = ((offset + len - 1).min(self.size - 1) / CHECKSUM_BLOCK) as usize;
        let mut buf = Vec::new();
        for block in first..=last.min(self.state.sums.len().saturating_sub(1)) {
            if self.state.is_verified(block) {
                continue;
            }
            let good = self.check_block(block, &mut buf)?;
            if !good {
                return Err(self.report_damage(block));
            }
            self.state.set_verified(block, true);
        }
        Ok(())
    }

    /// Reads like pread; every block it returns data of has been checked. Blocks the
    /// read covers whole are checked from the data just read (no second read); blocks it
    /// covers in part are read whole once.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let len = (buf.len() as u64).min(self.size.saturating_sub(offset));
        let done = self.read_raw(&mut buf[..len as usize], offset)?;
        if !self.verify || done == 0 {
            return Ok(done);
        }
        let end = offset + done as u64;
        let first = offset.div_ceil(CHECKSUM_BLOCK);
        let mut whole = first;
        while whole < self.state.sums.len() as u64 {
            let start = whole * CHECKSUM_BLOCK;
            let block_end = start + self.block_len(whole as usize);
            if block_end > end {
                break;
            }
            let block = whole as usize;
            if !self.state.is_verified(block) {
                let data = &buf[(start - offset) as usize..(block_end - offset) as usize];
                if block_sum(data) != self.state.sums[block] {
                    return Err(self.report_damage(block));
                }
                self.state.set_verified(block, true);
            }
            whole += 1;
        }
        // The partly covered blocks at either end.
        if offset < first * CHECKSUM_BLOCK {
            self.verify_range(offset, 1)?;
        }
        if whole * CHECKSUM_BLOCK < end {
            self.verify_range(end - 1, 1)?;
        }
        Ok(done)
    }

    fn report_damage(&self, block: usize) -> EngineError {
        error!(
            backup_id = self.backup_id,
            block,
            offset = block as u64 * CHECKSUM_BLOCK,
            "backup data is damaged: block does not match its checksum; reads of it fail with EIO (check the storage, then restore from another backup)"
        );
        damaged(&self.backup_id, &[block as u64])
    }

    fn read_raw(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let len = buf.len() as u64;
        let mut done = 0;
        while (done as u64) < len {
            match self
                .file()
                .read_at(&mut buf[done..len as usize], offset + done as u64)
            {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(EngineError::Io {
                        op: format!("read backup {}", self.backup_id),
                        source,
                    });
                }
            }
        }
        Ok(done)
    }

    /// Reads every block and returns the damaged ones (by index).
    pub fn damaged_blocks(&self) -> Result<Vec<u64>> {
        let mut bad = Vec::new();
        let mut buf = Vec::new();
        for block in 0..self.state.sums.len() {
            let good = self.check_block(block, &mut buf)?;
            self.state.set_verified(block, good);
            if !good {
                bad.push(block as u64);
            }
        }
        Ok(bad)
    }

    /// True when reads need no more checks: every block has been found good, or reads
    /// are not checked at all.
    pub fn fully_checked(&self) -> bool {
        if !self.verify {
            return true;
        }
        let blocks = self.state.sums.len();
        (0..blocks).all(|block| self.state.is_verified(block))
    }

    pub fn has_checksums(&self) -> bool {
        !self.state.sums.is_empty()
    }
}

pub(super) fn damaged(backup_id: &str, blocks: &[u64]) -> EngineError {
    EngineError::Damaged {
        backup_id: backup_id.to_string(),
        blocks: blocks.to_vec(),
    }
}
