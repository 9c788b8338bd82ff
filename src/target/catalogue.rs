//! The catalogue of a target: one record per backup and its checksums, kept beside the
//! data on the target's own storage (so a second node that mounts it sees the same
//! backups), every change atomic. `DirCatalogue` keeps it in a pool directory; a store
//! without files (an RBD pool) keeps it in objects. A catalogue holds its target's lock
//! and claim for as long as it is open, and removes only the files it names.

use super::auth::{self, TargetKey};
use super::claim;
use super::record::{Checksums, FORMAT_VERSION, Record};
use super::{LOCK_FILE, Result, TargetError, leaves_file_name, record_file_name, sums_file_name};
use crate::copy::SumKind;
use crate::ids::BackupId;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How long a start waits for a lock held by another backupfs: one that was just
/// unmounted takes a moment to exit and let go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Takes an exclusive flock on `file`, waiting up to 10 s (and saying so) while another
/// process holds it. False if it is still held then.
pub fn lock_waiting(file: &File, path: &Path) -> bool {
    let try_lock =
        // SAFETY: flock on a descriptor we borrow; released when the file closes.
        || unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if try_lock() {
        return true;
    }
    tracing::warn!(
        "{} is held by another backupfs (one that is still stopping?): waiting up to {} s",
        path.display(),
        LOCK_WAIT.as_secs()
    );
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if try_lock() {
            return true;
        }
    }
    false
}

/// Records and checksums of one target.
pub trait Catalogue: Send + Sync {
    /// Where it lives, for messages.
    fn describe(&self) -> String;
    /// Every record, oldest first; unreadable ones are skipped (and logged).
    fn records(&self) -> Result<Vec<Record>>;
    fn record(&self, backup_id: &BackupId) -> Result<Record>;
    /// Replaces the record durably and atomically: a crash leaves the old or the new one.
    fn write_record(&self, record: &Record) -> Result<()>;
    fn remove_record(&self, backup_id: &BackupId) -> Result<()>;
    /// Stores the checksums of a backup (before its record says `available`), taken as
    /// `kind` says; `leaves`: the file [`Catalogue::create_leaves`] gave is complete and
    /// flushed, and the record should name it.
    fn write_checksums(
        &self,
        backup_id: &BackupId,
        sums: &[u64],
        kind: SumKind,
        leaves: bool,
    ) -> Result<Checksums>;
    /// A file for the leaf sums of a new backup of `blocks` blocks, holding `base`'s if it
    /// has them (an incremental backup starts from them); None where the catalogue keeps
    /// no leaf sums (the next incremental then reads whole blocks).
    fn create_leaves(
        &self,
        _backup_id: &BackupId,
        _base: Option<&Record>,
        _blocks: u64,
    ) -> Result<Option<File>> {
        Ok(None)
    }
    /// The checksums a record names, checked against their digest in the record.
    fn read_checksums(&self, record: &Record) -> Result<Vec<u64>>;
    /// Gone already is fine.
    fn remove_checksums(&self, backup_id: &BackupId) -> Result<()>;
    /// Removes what a crash left in the middle of a write (temporary names only the
    /// catalogue makes).
    fn remove_temporaries(&self) -> Result<()>;
    /// What is stored there that the catalogue did not make (an operator's files): left
    /// in place, named in the log.
    fn foreign(&self) -> Vec<String>;
}

/// A catalogue in a pool directory: `backup-<id>.json` and `backup-<id>.sums`, each
/// written as a temporary file, fsynced, renamed, and the directory fsynced; and
/// `backup-<id>.leaves`, written in place while the backup is made (its record names it
/// only once it is complete).
pub struct DirCatalogue {
    target: String,
    dir: PathBuf,
    /// Held while open: one daemon per target.
    _lock: File,
    /// The target key: records and checksums are sealed with it and checked against it.
    key: Option<Arc<TargetKey>>,
}

impl DirCatalogue {
    /// Opens a pool directory as `target`'s catalogue: refuses one that is not ours (see
    /// `claim`), takes the one-daemon-per-target lock, then claims the pool (migrating an
    /// earlier backupfs's layout) if it is not claimed yet.
    pub fn open(target: &str, dir: &Path) -> Result<DirCatalogue> {
        let refused = |source| TargetError::Claim {
            path: dir.to_path_buf(),
            source,
        };
        claim::inspect(dir, target).map_err(refused)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| TargetError::io("open lock", &lock_path, e))?;
        if !lock_waiting(&lock, &lock_path) {
            return Err(TargetError::Locked {
                target: target.to_string(),
                path: lock_path,
            });
        }
        claim::claim(dir, target).map_err(refused)?;
        Ok(DirCatalogue {
            target: target.to_string(),
            dir: dir.to_path_buf(),
            _lock: lock,
            key: None,
        })
    }

    /// Seals what it writes with `key` and trusts only what checks against it (see
    /// `target::auth`); without one, records are not authenticated.
    pub fn with_key(mut self, key: Option<Arc<TargetKey>>) -> DirCatalogue {
        self.key = key;
        self
    }

    /// A record as read, inspected: marked defective (so damaged) when it is not the
    /// record of the backup its name says, cannot check what it serves, or does not
    /// authenticate.
    fn load_record(&self, path: &Path) -> Result<Record> {
        let mut record = Self::read_record_file(path)?;
        auth::inspect(&mut record, self.key.as_deref());
        let named = path.file_name().and_then(|n| n.to_str());
        if record.defect.is_none() && named != Some(&record_file_name(&record.id)) {
            record.defect = Some(format!("the file holds the record of {}", record.id));
        }
        Ok(record)
    }

    fn record_path(&self, backup_id: &BackupId) -> PathBuf {
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

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => self.sync_dir(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(TargetError::io("remove", &path, e)),
        }
    }
}

impl Catalogue for DirCatalogue {
    fn describe(&self) -> String {
        format!("{} ({})", self.target, self.dir.display())
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
            match self.load_record(&entry.path()) {
                Ok(record) => records.push(record),
                // A record removed while listing is simply gone.
                Err(TargetError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("target {}: skipping unreadable record: {e}", self.target)
                }
            }
        }
        records.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        Ok(records)
    }

    fn record(&self, backup_id: &BackupId) -> Result<Record> {
        match self.load_record(&self.record_path(backup_id)) {
            Err(TargetError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Err(TargetError::NotFound(backup_id.to_string()))
            }
            other => other,
        }
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        let record = &auth::prepare(record, self.key.as_deref());
        let mut bytes = serde_json::to_vec_pretty(record).map_err(|e| TargetError::BadRecord {
            path: self.record_path(&record.id),
            message: e.to_string(),
        })?;
        bytes.push(b'\n');
        self.write_atomic(&record_file_name(&record.id), &bytes)
    }

    fn remove_record(&self, backup_id: &BackupId) -> Result<()> {
        self.remove(&record_file_name(backup_id))
    }

    fn write_checksums(
        &self,
        backup_id: &BackupId,
        sums: &[u64],
        kind: SumKind,
        leaves: bool,
    ) -> Result<Checksums> {
        if !leaves {
            // Cut short (a full disk): no record will name it, nothing will read it.
            self.remove(&leaves_file_name(backup_id))?;
        }
        let leaves = leaves.then(|| leaves_file_name(backup_id));
        let (bytes, mut entry) = Checksums::encode(sums, kind, sums_file_name(backup_id), leaves);
        if let Some(key) = &self.key {
            entry.mac = Some(key.sums_mac(backup_id, &bytes));
            if let Some(name) = entry.leaves.clone() {
                // Complete and flushed (the caller says so): what the next backup starts from.
                let path = self.dir.join(&name);
                let expected = sums.len() as u64 * crate::copy::LEAF_SUMS_PER_BLOCK_BYTES;
                match read_regular(&path, expected) {
                    Ok(leaves) if leaves.len() as u64 == expected => {
                        entry.leaves_mac = Some(key.leaves_mac(backup_id, &leaves));
                    }
                    // Not what this backup wrote: no record names it, the next backup
                    // reads changed blocks whole.
                    found => {
                        tracing::warn!(
                            backup_id = %backup_id,
                            "leaf sums not kept: {} is not the file this backup wrote ({})",
                            path.display(),
                            match found {
                                Ok(bytes) => format!("{} bytes", bytes.len()),
                                Err(e) => e.to_string(),
                            }
                        );
                        entry.leaves = None;
                        self.remove(&name)?;
                    }
                }
            }
        }
        self.write_atomic(&entry.file, &bytes)?;
        Ok(entry)
    }

    fn create_leaves(
        &self,
        backup_id: &BackupId,
        base: Option<&Record>,
        blocks: u64,
    ) -> Result<Option<File>> {
        let path = self.dir.join(leaves_file_name(backup_id));
        // The base's file, if its record names it (by the one name we give it). Without
        // it the new file starts as zeros: entries of blocks not read fail their check
        // (unless the block is all zeros, whose entries are zeros), so the next backups
        // read those blocks whole and the chain mends itself.
        let base_file = base.and_then(|base| {
            let name = leaves_file_name(&base.id);
            if base.checksums.as_ref()?.leaves.as_ref()? != &name {
                return None;
            }
            match File::open(self.dir.join(&name)) {
                Ok(file) => Some(file),
                Err(e) => {
                    tracing::warn!(
                        backup_id = %backup_id,
                        "leaf sums of {} cannot be read ({e}): its changed blocks are read whole",
                        base.id
                    );
                    None
                }
            }
        });
        let make = || -> std::io::Result<File> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            if let (Some(base_file), Some(key), Some(base)) = (&base_file, &self.key, base) {
                // On a keyed target the parent's leaf sums are read whole and checked
                // against their MAC, and the checked bytes written: xxh3 is no defence
                // against a writer of the target who forges them.
                copy_checked_leaves(key, base, base_file, &file, backup_id)?;
            } else if let Some(base_file) = &base_file {
                // copy_file_range: a reflink where the filesystem has them, instant.
                if let Err(e) = std::io::copy(&mut &*base_file, &mut &file) {
                    tracing::warn!(
                        backup_id = %backup_id,
                        "leaf sums of the parent not copied ({e}): its changed blocks are read whole"
                    );
                    file.set_len(0)?;
                }
            }
            file.set_len(blocks * crate::copy::LEAF_SUMS_PER_BLOCK_BYTES)?;
            Ok(file)
        };
        // No directory fsync: the name matters once a record names it, and the checksums'
        // rename before that fsyncs this directory.
        match make() {
            Ok(file) => Ok(Some(file)),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(TargetError::io("write", &path, e))
            }
        }
    }

    fn read_checksums(&self, record: &Record) -> Result<Vec<u64>> {
        let Some(checksums) = &record.checksums else {
            return Ok(Vec::new());
        };
        let path = self.dir.join(sums_file_name(&record.id));
        let bytes = std::fs::read(&path).map_err(|e| TargetError::io("read", &path, e))?;
        if let Some(key) = &self.key
            && !key.sums_check(&record.id, checksums, &bytes)
        {
            return Err(TargetError::BadRecord {
                path,
                message: "checksum file does not match its MAC in the record".to_string(),
            });
        }
        checksums
            .decode(&bytes)
            .ok_or_else(|| TargetError::BadRecord {
                path,
                message: "checksum file does not match its digest in the record".to_string(),
            })
    }

    fn remove_checksums(&self, backup_id: &BackupId) -> Result<()> {
        self.remove(&leaves_file_name(backup_id))?;
        self.remove(&sums_file_name(backup_id))
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
                    target = self.target,
                    "removing {name} left by an interrupted write"
                );
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn foreign(&self) -> Vec<String> {
        claim::foreign_files(&self.dir)
    }
}

/// Copies the parent's leaf sums into a new backup's file if they check against the MAC
/// in the parent's record; otherwise the new file starts as zeros (its changed blocks are
/// then read whole), as for a parent without leaf sums.
fn copy_checked_leaves(
    key: &TargetKey,
    base: &Record,
    base_file: &File,
    file: &File,
    backup_id: &BackupId,
) -> std::io::Result<()> {
    use std::io::Read;
    let Some(checksums) = &base.checksums else {
        return Ok(());
    };
    // The one size the parent's file can have: a bigger one is not read whole.
    let expected = checksums.blocks * crate::copy::LEAF_SUMS_PER_BLOCK_BYTES;
    let mut bytes = Vec::new();
    (&mut &*base_file)
        .take(expected + 1)
        .read_to_end(&mut bytes)?;
    if !key.leaves_check(&base.id, checksums, &bytes) {
        tracing::warn!(
            backup_id = %backup_id,
            "leaf sums of {} do not match their MAC in its record: its changed blocks are read whole",
            base.id
        );
        return Ok(());
    }
    (&mut &*file).write_all(&bytes)
}

/// Reads a regular file whole, at most `limit` bytes and one more (so a longer one is told
/// apart), without following a link or blocking on a FIFO at its name.
fn read_regular(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.file_type().is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}
