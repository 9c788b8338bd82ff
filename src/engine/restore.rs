//! Restores: a volume opened for writing through the mount. While a writer lives the
//! volume refuses backups; writes, truncates and server-side copies of backup images go
//! through it. It never writes a volume that something outside backupfs uses.

use super::*;

/// Marks a volume as being restored and attaches it for writing; refused while a backup of
/// it is queued or running, or while something outside backupfs uses it.
pub(super) fn claim_restore(
    inner: &Arc<Inner>,
    backend_name: &str,
    info: &VolumeInfo,
) -> Result<Arc<VolumeWriter>> {
    let backend = inner.backend(backend_name)?;
    let key = (backend_name.to_string(), info.id.clone());
    {
        let mut state = inner.state.lock();
        let claimed = match state.busy.get(&key).copied() {
            Some(Busy::Backup) => {
                return Err(EngineError::Busy(format!(
                    "volume {} has a backup queued or running",
                    info.id
                )));
            }
            Some(Busy::Restore(n)) => Busy::Restore(n + 1),
            None => Busy::Restore(1),
        };
        state.busy.insert(key.clone(), claimed);
    }
    // From here the claim is released by the writer's Drop, also on the error paths.
    let mut writer = VolumeWriter {
        inner: inner.clone(),
        driver: backend.driver.clone(),
        key,
        pool: info.pool.clone(),
        size: AtomicU64::new(info.size),
        attachment: None,
        resize: Mutex::new(()),
        written: AtomicU64::new(0),
        copied: AtomicU64::new(0),
        opened: Instant::now(),
    };
    if let Some(why) = backend.driver.in_use(&info.pool, &info.id)? {
        return Err(EngineError::Busy(format!(
            "volume {} is in-use ({why})",
            info.id
        )));
    }
    writer.attachment = Some(backend.driver.attach(&info.pool, &info.id, Access::Write)?);
    Ok(Arc::new(writer))
}

/// A volume open for a restore. While it lives, the volume refuses backups.
pub struct VolumeWriter {
    inner: Arc<Inner>,
    driver: Arc<dyn VolumeDriver>,
    key: (String, String),
    pool: String,
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
        self.inner.release_restore(&self.key);
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
    pub fn volume_id(&self) -> &str {
        &self.key.1
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// The attached volume, for reads through the same handle.
    pub fn file(&self) -> Result<&File> {
        Ok(&self.attachment()?.file)
    }

    fn attachment(&self) -> Result<&Attachment> {
        self.attachment.as_ref().ok_or_else(|| EngineError::Io {
            op: "restore".to_string(),
            source: std::io::Error::from_raw_os_error(libc::EBADF),
        })
    }

    fn grow_to(&self, end: u64) -> Result<()> {
        if end <= self.size() {
            return Ok(());
        }
        let _guard = self.resize.lock();
        if end > self.size() {
            self.driver.extend(&self.pool, self.volume_id(), end)?;
            self.size.fetch_max(end, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<usize> {
        let end = offset + data.len() as u64;
        let grows = self.driver.grows_on_write();
        if !grows {
            self.grow_to(end)?;
        }
        let attachment = self.attachment()?;
        attachment
            .file
            .write_all_at(data, offset)
            .map_err(|source| EngineError::Io {
                op: format!("write {}", attachment.path.display()),
                source,
            })?;
        if grows {
            // A restore of a new volume writes past the end all along: no extend per write.
            self.size.fetch_max(end, Ordering::Relaxed);
        }
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
        self.driver
            .discard(self.attachment()?, size, current - size)?;
        Ok(())
    }

    /// Zeroes a range inside the volume (a hole where the storage can).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let end = (offset + len).min(self.size());
        if end > offset {
            self.driver
                .discard(self.attachment()?, offset, end - offset)?;
        }
        Ok(())
    }

    /// Server-side copy of `len` bytes of a backup image into this volume: the kernel's
    /// copy_file_range for data (a reflink where both sit on one filesystem), discards
    /// for holes. Returns the bytes copied (short at the image's end).
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
        // Damaged data is never restored silently.
        image.verify_range(offset_in, len)?;
        self.grow_to(offset_out + len)?;
        let attachment = self.attachment()?;
        let range = Range {
            src_offset: offset_in,
            dst_offset: offset_out,
            len,
        };
        let discard = |offset, len| crate::volume::file::zero_range(&attachment.file, offset, len);
        copy::copy_kernel(image.file(), &attachment.file, range, &discard)?;
        self.copied.fetch_add(len, Ordering::Relaxed);
        Ok(len)
    }

    pub fn sync(&self) -> Result<()> {
        let attachment = self.attachment()?;
        attachment
            .file
            .sync_data()
            .map_err(|source| EngineError::Io {
                op: format!("fsync {}", attachment.path.display()),
                source,
            })
    }
}
