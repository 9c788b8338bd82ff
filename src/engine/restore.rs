//! Restores: a volume opened for writing through the mount. While a writer lives the
//! volume refuses backups, and it holds the volume the way a hypervisor would see it (the
//! driver's write lock, a qcow2 export with QEMU's locks); dropping the last writer frees
//! the volume at once. It never writes a volume that something outside backupfs uses.

use super::*;
use crate::copy::{self, Range};
use crate::volume::device::BlockDevice;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// Largest piece of a server-side copy checked and then copied at once: the kernel copies
/// what was just checked, while it is still in the page cache.
const CHECKED_COPY_PIECE: u64 = 64 << 20;

/// Marks a volume as being restored and attaches it for writing; refused while a backup of
/// it is queued or running, or while something outside backupfs uses it. Writers of the
/// same volume share one restore (one attachment, one lock).
pub(super) fn claim_restore(
    inner: &Arc<Inner>,
    backend_name: &str,
    info: &VolumeInfo,
) -> Result<Arc<VolumeWriter>> {
    let backend = inner.backend(backend_name)?;
    let key = (backend_name.to_string(), info.id.clone());
    {
        let mut state = inner.state.lock();
        if state.stopping {
            return Err(EngineError::Busy("backupfs is stopping".to_string()));
        }
        match state.busy.get(&key) {
            Some(Busy::Backup) => {
                return Err(EngineError::Busy(format!(
                    "volume {} has a backup queued or running",
                    info.id
                )));
            }
            Some(Busy::Opening) => {
                return Err(EngineError::Busy(format!(
                    "volume {} is being opened for a restore",
                    info.id
                )));
            }
            Some(Busy::Restore(writer)) => {
                if let Some(writer) = writer.upgrade() {
                    return Ok(writer);
                }
            }
            None => {}
        }
        state.busy.insert(key.clone(), Busy::Opening);
    }
    let opened = attach_for_restore(backend, info);
    let mut state = inner.state.lock();
    match opened {
        Ok(attachment) => {
            let writer = Arc::new(VolumeWriter {
                inner: inner.clone(),
                driver: backend.driver.clone(),
                key: key.clone(),
                size: AtomicU64::new(info.size),
                attachment: Some(attachment),
                resize: Mutex::new(()),
                written: AtomicU64::new(0),
                copied: AtomicU64::new(0),
                opened: Instant::now(),
            });
            state
                .busy
                .insert(key, Busy::Restore(Arc::downgrade(&writer)));
            Ok(writer)
        }
        Err(e) => {
            state.busy.remove(&key);
            Err(e)
        }
    }
}

fn attach_for_restore(backend: &Backend, info: &VolumeInfo) -> Result<Attachment> {
    if let Some(why) = backend.driver.in_use(&info.pool, &info.id)? {
        return Err(EngineError::Busy(format!(
            "volume {} is in-use ({why})",
            info.id
        )));
    }
    // The driver takes its write lock and checks again under it (a hypervisor may have
    // started in between).
    backend
        .driver
        .attach(&info.pool, &info.id, Access::Write)
        .map_err(|e| match e {
            VolumeError::Busy(why) => {
                EngineError::Busy(format!("volume {} is in-use ({why})", info.id))
            }
            other => other.into(),
        })
}

/// A volume open for a restore. While it lives, the volume refuses backups.
pub struct VolumeWriter {
    inner: Arc<Inner>,
    driver: Arc<dyn VolumeDriver>,
    key: (String, String),
    size: AtomicU64,
    attachment: Option<Attachment>,
    /// Serialises size changes (writes past the end, truncates).
    resize: Mutex<()>,
    written: AtomicU64,
    copied: AtomicU64,
    opened: Instant,
}

impl Drop for VolumeWriter {
    fn drop(&mut self) {
        // Detached first (locks released, exports stopped), then the volume is free for
        // backups: nobody can find it claimed and yet held.
        if let Some(attachment) = self.attachment.take()
            && let Err(e) = self.driver.detach(attachment)
        {
            tracing::warn!(volume_id = self.key.1, "detach after a restore: {e}");
        }
        {
            let mut state = self.inner.state.lock();
            if let Some(Busy::Restore(writer)) = state.busy.get(&self.key)
                && std::ptr::eq(writer.as_ptr(), self)
            {
                state.busy.remove(&self.key);
            }
        }
        let (written, copied) = (
            self.written.load(Ordering::Relaxed),
            self.copied.load(Ordering::Relaxed),
        );
        if written + copied > 0 {
            let secs = self.opened.elapsed().as_secs_f64();
            info!(
                backend = self.key.0,
                volume_id = self.key.1,
                bytes_written = written,
                bytes_copied_server_side = copied,
                seconds = format!("{secs:.2}"),
                "restore into volume ended"
            );
        }
    }
}

impl VolumeWriter {
    pub fn backend(&self) -> &str {
        &self.key.0
    }

    pub fn volume_id(&self) -> &str {
        &self.key.1
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// The attached volume, for reads through the same handle.
    pub fn device(&self) -> Result<&dyn BlockDevice> {
        Ok(self.attachment()?.device.as_ref())
    }

    fn attachment(&self) -> Result<&Attachment> {
        self.attachment.as_ref().ok_or_else(|| {
            EngineError::io("restore", std::io::Error::from_raw_os_error(libc::EBADF))
        })
    }

    fn io_error(&self, op: &str, source: std::io::Error) -> EngineError {
        EngineError::io(
            format!("{op} volume {}/{}", self.backend(), self.volume_id()),
            source,
        )
    }

    fn grow_to(&self, end: u64) -> Result<()> {
        if end <= self.size() {
            return Ok(());
        }
        let _guard = self.resize.lock();
        if end > self.size() {
            self.device()?
                .grow(end)
                .map_err(|e| self.io_error("grow", e))?;
            self.size.fetch_max(end, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<usize> {
        let end = offset + data.len() as u64;
        // The device grows by itself when written past its end.
        self.device()?
            .write_at(data, offset)
            .map_err(|e| self.io_error("write", e))?;
        self.size.fetch_max(end, Ordering::Relaxed);
        self.written.fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data.len())
    }

    /// Volumes never shrink: a smaller size zeroes everything past it and keeps the size;
    /// a larger one extends the volume.
    pub fn set_size(&self, size: u64) -> Result<()> {
        let current = self.size();
        if size >= current {
            return self.grow_to(size);
        }
        let _guard = self.resize.lock();
        self.device()?
            .discard(size..current)
            .map_err(|e| self.io_error("zero", e))
    }

    /// Zeroes a range inside the volume (a hole where the storage can).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let end = (offset + len).min(self.size());
        if end > offset {
            self.device()?
                .discard(offset..end)
                .map_err(|e| self.io_error("zero", e))?;
        }
        Ok(())
    }

    /// Server-side copy of `len` bytes of a backup image into this volume: each piece is
    /// checked against its checksums, then copied by the kernel's copy_file_range (a
    /// reflink where both sit on one filesystem) where both are local files, by the
    /// generic copier otherwise; holes are discarded with the volume's own rules. Returns
    /// the bytes copied (short at the image's end).
    /// The image is the one the caller has open, so a backup deleted meanwhile stays
    /// readable to the end of the copy, as any open file does.
    pub fn copy_from_backup(
        &self,
        image: &Image,
        offset_in: u64,
        offset_out: u64,
        len: u64,
    ) -> Result<u64> {
        let len = len.min(image.size.saturating_sub(offset_in));
        if len == 0 {
            return Ok(0);
        }
        self.grow_to(offset_out + len)?;
        let device = self.device()?;
        let piece_at = |done: u64| (len - done).min(CHECKED_COPY_PIECE);
        // Damaged data is never restored silently: each piece is checked before it is
        // copied, the next one while this one copies (so that the image's reads and a
        // network volume's writes overlap).
        image.verify_range(offset_in, piece_at(0))?;
        let mut done = 0;
        while done < len {
            let piece = piece_at(done);
            let next = done + piece;
            let range = Range {
                src_offset: offset_in + done,
                dst_offset: offset_out + done,
                len: piece,
            };
            let (copied, checked) = std::thread::scope(|scope| {
                let checker = (next < len)
                    .then(|| scope.spawn(|| image.verify_range(offset_in + next, piece_at(next))));
                let copied = copy::copy_kernel(image.device(), device, range);
                (copied, checker.map(|checker| checker.join()))
            });
            copied?;
            match checked {
                Some(Ok(checked)) => checked?,
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                None => {}
            }
            done = next;
            self.copied.fetch_add(piece, Ordering::Relaxed);
        }
        Ok(len)
    }

    pub fn sync(&self) -> Result<()> {
        self.device()?
            .flush()
            .map_err(|e| self.io_error("flush", e))
    }
}
