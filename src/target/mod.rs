//! Backup targets: where backups are stored and read back, with their catalogue (one
//! record per backup, beside the data, written atomically). `VolumeTarget` is the spec's
//! generic target: each backup is a volume in a backend's pool. Targets never copy data.

pub mod claim;
pub mod record;

use crate::volume::{Access, Attachment, VolumeDriver, VolumeError};
use record::{FORMAT_VERSION, Record};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("backup {0} not found")]
    NotFound(String),
    #[error("target {target} is in use by another backupfs (lock {path})")]
    Locked { target: String, path: PathBuf },
    #[error("record {path}: {message}")]
    BadRecord { path: PathBuf, message: String },
    #[error("pool {path} {source}")]
    Claim {
        path: PathBuf,
        source: claim::ClaimError,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TargetError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> TargetError {
        TargetError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            TargetError::Io { source, .. } => source.raw_os_error(),
            TargetError::Volume(v) => v.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, TargetError>;

/// Stores backups and reads them back. Every target looks the same on the mount: a
/// catalogue of records and, per available backup, a readable raw image.
pub trait BackupTarget: Send + Sync {
    fn name(&self) -> &str;
    /// Storage identity of where backups go (for the same-storage rule and logs).
    fn describe(&self) -> String;

    fn records(&self) -> Result<Vec<Record>>;
    fn record(&self, backup_id: &str) -> Result<Record>;
    /// Durably replaces the record (temporary file, fsync, rename, fsync of the directory).
    fn write_record(&self, record: &Record) -> Result<()>;
    fn remove_record(&self, backup_id: &str) -> Result<()>;
    /// Removes temporary files a crash left in the middle of a record write.
    fn remove_temporaries(&self) -> Result<()>;

    /// A new, all-zero data volume for a backup, attached for writing.
    fn create_data(&self, backup_id: &str, size: u64) -> Result<Attachment>;
    /// The stored data, attached for reading.
    fn open_data(&self, backup_id: &str) -> Result<Attachment>;
    /// Removes the data (and checksums) of a backup; gone already is fine.
    fn delete_data(&self, backup_id: &str) -> Result<()>;
    /// Files in the target that no record owns and that backupfs does not otherwise
    /// know (an operator's, or data whose record is gone): left in place, for the log.
    fn strays(&self) -> Result<Vec<String>>;
    fn allocated(&self, backup_id: &str) -> Result<u64>;

    fn write_checksums(&self, backup_id: &str, sums: &[u64]) -> Result<record::Checksums>;
    fn read_checksums(&self, record: &Record) -> Result<Vec<u64>>;

    fn free_space(&self) -> Result<u64>;
}

/// The spec's generic target: a pool of a volume backend that holds backups only.
pub struct VolumeTarget {
    name: String,
    driver: Arc<dyn VolumeDriver>,
    pool: String,
    /// Where the catalogue lives: the pool's directory.
    dir: PathBuf,
    /// Held for the daemon's lifetime: one daemon per target.
    _lock: File,
}

pub(crate) const LOCK_FILE: &str = ".backupfs.lock";

pub(crate) fn record_file_name(backup_id: &str) -> String {
    format!("backup-{backup_id}.json")
}

pub(crate) fn sums_file_name(backup_id: &str) -> String {
    format!("backup-{backup_id}.sums")
}

impl VolumeTarget {
    /// Opens a target pool: refuses one that is not ours (see `claim`), takes the
    /// one-daemon-per-target lock, then claims the pool (migrating an earlier backupfs's
    /// layout) if it is not claimed yet.
    pub fn open(
        name: &str,
        driver: Arc<dyn VolumeDriver>,
        pool: &str,
        dir: &Path,
    ) -> Result<VolumeTarget> {
        let refused = |source| TargetError::Claim {
            path: dir.to_path_buf(),
            source,
        };
        claim::inspect(dir, name).map_err(refused)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| TargetError::io("open lock", &lock_path, e))?;
        // SAFETY: flock on a descriptor we own; released when the file closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
            return Err(TargetError::Locked {
                target: name.to_string(),
                path: lock_path,
            });
        }
        claim::claim(dir, name).map_err(refused)?;
        Ok(VolumeTarget {
            name: name.to_string(),
            driver,
            pool: pool.to_string(),
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    fn record_path(&self, backup_id: &str) -> PathBuf {
        self.dir.join(record_file_name(backup_id))
    }

    fn read_record_file(path: &Path) -> Result<Record> {
        let text = std::fs::read(path).map_err(|e| TargetError::io("read", path, e))?;
        let record: Record = serde_json::from_slice(&text).map_err(|e| TargetError::BadRecord {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if record.format != FORMAT_VERSION {
            return Err(TargetError::BadRecord {
                path: path.to_path_buf(),
                message: format!("unknown format version {}", record.format),
            });
        }
        Ok(record)
    }

    fn sync_dir(&self) -> Result<()> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| TargetError::io("fsync", &self.dir, e))
    }

    /// Writes `bytes` to `name` in the pool directory: temporary file, fsync, rename,
    /// fsync of the directory. A crash leaves the old file or the new one, never half.
    fn write_atomic(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.join(name);
        // Unique per write: two writers of one record never share a temporary file.
        static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self
            .dir
            .join(format!(".{name}.{}.{n}.tmp", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        if let Err(e) = write() {
            let _ = std::fs::remove_file(&tmp);
            return Err(TargetError::io("write", &path, e));
        }
        self.sync_dir()
    }
}

impl BackupTarget for VolumeTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn describe(&self) -> String {
        format!(
            "pool {}/{} ({})",
            self.driver.backend(),
            self.pool,
            self.dir.display()
        )
    }

    fn records(&self) -> Result<Vec<Record>> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| TargetError::io("list", &self.dir, e))?;
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if !(name.starts_with("backup-") && name.ends_with(".json")) {
                continue;
            }
            match Self::read_record_file(&entry.path()) {
                Ok(record) => records.push(record),
                // A record removed while listing is simply gone.
                Err(TargetError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("target {}: skipping unreadable record: {e}", self.name),
            }
        }
        records.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        Ok(records)
    }

    fn record(&self, backup_id: &str) -> Result<Record> {
        if !crate::volume::is_valid_id(backup_id) {
            return Err(TargetError::NotFound(backup_id.to_string()));
        }
        match Self::read_record_file(&self.record_path(backup_id)) {
            Err(TargetError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Err(TargetError::NotFound(backup_id.to_string()))
            }
            other => other,
        }
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(record).map_err(|e| TargetError::BadRecord {
            path: self.record_path(&record.id),
            message: e.to_string(),
        })?;
        bytes.push(b'\n');
        self.write_atomic(&record_file_name(&record.id), &bytes)
    }

    fn remove_record(&self, backup_id: &str) -> Result<()> {
        let path = self.record_path(backup_id);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(TargetError::io("remove", &path, e)),
        }
    }

    fn remove_temporaries(&self) -> Result<()> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|e| TargetError::io("list", &self.dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if (name.starts_with(".backup-") && name.ends_with(".tmp"))
                || claim::is_marker_temporary(&name)
            {
                tracing::warn!(
                    target = self.name,
                    "removing {name} left by an interrupted write"
                );
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn create_data(&self, backup_id: &str, size: u64) -> Result<Attachment> {
        self.driver.create(&self.pool, backup_id, size)?;
        Ok(self.driver.attach(&self.pool, backup_id, Access::Write)?)
    }

    fn open_data(&self, backup_id: &str) -> Result<Attachment> {
        // Image reads are served in small pieces: buffered reads (and readahead) suit
        // them better than O_DIRECT.
        match self.driver.attach(&self.pool, backup_id, Access::Read) {
            Err(VolumeError::NotFound(_)) => Err(TargetError::NotFound(backup_id.to_string())),
            other => Ok(other?),
        }
    }

    fn delete_data(&self, backup_id: &str) -> Result<()> {
        self.driver.delete(&self.pool, backup_id)?;
        let sums = self.dir.join(sums_file_name(backup_id));
        match std::fs::remove_file(&sums) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(TargetError::io("remove", &sums, e)),
        }
    }

    fn strays(&self) -> Result<Vec<String>> {
        let mut strays = claim::foreign_files(&self.dir);
        for data in self.driver.list(&self.pool)? {
            if matches!(self.record(&data.id), Err(TargetError::NotFound(_))) {
                strays.push(crate::volume::pools::object_file_name(
                    crate::volume::pools::PoolRole::Backups,
                    &data.id,
                ));
            }
        }
        Ok(strays)
    }

    fn allocated(&self, backup_id: &str) -> Result<u64> {
        Ok(self.driver.stat(&self.pool, backup_id)?.allocated)
    }

    fn write_checksums(&self, backup_id: &str, sums: &[u64]) -> Result<record::Checksums> {
        let bytes: Vec<u8> = sums.iter().flat_map(|s| s.to_le_bytes()).collect();
        let name = sums_file_name(backup_id);
        self.write_atomic(&name, &bytes)?;
        Ok(record::Checksums {
            algorithm: "xxh3-64".to_string(),
            block_size: crate::copy::CHECKSUM_BLOCK,
            blocks: sums.len() as u64,
            file: name,
            digest: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)),
        })
    }

    fn read_checksums(&self, record: &Record) -> Result<Vec<u64>> {
        let Some(checksums) = &record.checksums else {
            return Ok(Vec::new());
        };
        let path = self.dir.join(sums_file_name(&record.id));
        let bytes = std::fs::read(&path).map_err(|e| TargetError::io("read", &path, e))?;
        let digest = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes));
        if digest != checksums.digest || bytes.len() as u64 != checksums.blocks * 8 {
            return Err(TargetError::BadRecord {
                path,
                message: "checksum file does not match its digest in the record".to_string(),
            });
        }
        Ok(bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    fn free_space(&self) -> Result<u64> {
        Ok(self.driver.free_space(&self.pool)?)
    }
}
