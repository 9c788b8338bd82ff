//! The `file` driver: a volume is the sparse raw file `volume-<id>` in a pool directory
//! (Cinder's RemoteFS naming); snapshots are reflinks (`FICLONE`) beside it.
//! It never writes to a volume file except through an attachment the engine asked for.

use super::device::FileDevice;
use super::pools::PoolDirs;
use super::{Access, Attachment, Capabilities, Result, VolumeDriver, VolumeError, VolumeInfo};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub struct FileDriver {
    pools: PoolDirs,
}

impl FileDriver {
    pub fn new(pools: PoolDirs) -> FileDriver {
        FileDriver { pools }
    }

    fn info(pool: &str, volume_id: &str, meta: &std::fs::Metadata) -> VolumeInfo {
        VolumeInfo {
            id: volume_id.to_string(),
            pool: pool.to_string(),
            size: meta.len(),
            allocated: meta.blocks() * 512,
            mtime: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        }
    }
}

/// Opens a volume file. A stream (a backup's one pass) uses O_DIRECT where the
/// filesystem takes it, so a backup does not push the node's page cache out; it falls
/// back to buffered I/O (tmpfs, some FUSE).
fn open_volume_file(path: &Path, access: Access) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true);
    match access {
        Access::Write => return options.write(true).open(path),
        Access::Read => return options.open(path),
        Access::Stream => {}
    }
    match options.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => Ok(file),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => options.open(path),
        Err(e) => Err(e),
    }
}

/// Every loop device's backing file, as the kernel names it.
pub(crate) fn loop_backing_files() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter_map(|e| std::fs::read_to_string(e.path().join("loop/backing_file")).ok())
        .map(|s| PathBuf::from(s.trim_end().trim_end_matches(" (deleted)")))
        .collect()
}

/// The first process holding a POSIX or OFD lock that conflicts with a write lock on the
/// whole file (QEMU's image locks are OFD locks on single bytes), or a flock.
pub(crate) fn lock_holder(path: &Path) -> std::io::Result<Option<String>> {
    let file = File::open(path)?;
    let mut lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_GETLK reads and writes the flock struct we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lock.l_type != libc::F_UNLCK as i16 {
        let who = if lock.l_pid > 0 {
            format!("pid {}", lock.l_pid)
        } else {
            "another process".to_string()
        };
        return Ok(Some(format!("locked by {who} (fcntl lock)")));
    }
    // flock locks are invisible to F_OFD_GETLK; probing takes the lock for an instant
    // and lets it go when the descriptor closes.
    // SAFETY: plain syscall on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Ok(Some("locked by another process (flock)".to_string()));
        }
        return Err(err);
    }
    Ok(None)
}

fn reflink(from: &File, to: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its argument.
    let rc = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// struct fsxattr of <linux/fs.h>.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801C_581F;
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401C_5820;
const FS_XFLAG_COWEXTSIZE: u32 = 0x0001_0000;

/// Asks XFS to give copy-on-write writes into `file` only the blocks they write. Its
/// default hint preallocates 32 blocks around each one, so an incremental backup that
/// rewrites scattered 4 KiB blocks of a clone held twice the data it changed until the
/// background collector ran. Other filesystems have no such hint; failing costs space
/// only.
fn small_cow_extents(file: &File) {
    let mut attr = FsXattr::default();
    // SAFETY: both ioctls take a pointer to a struct fsxattr we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSGETXATTR as _, &mut attr) };
    if rc < 0 {
        return;
    }
    attr.xflags |= FS_XFLAG_COWEXTSIZE;
    attr.cowextsize = 4096;
    // SAFETY: as above.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FSSETXATTR as _, &attr) };
    if rc < 0 {
        tracing::debug!(
            "no copy-on-write extent hint: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The errors FICLONE gives where the filesystem has no reflinks (ext4, tmpfs, across
/// filesystems), as opposed to real I/O errors.
pub(crate) fn is_no_reflink(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY)
    )
}

/// A point-in-time copy of `source` as the new file `dest` (mode 0600), sharing its
/// blocks; on failure nothing is left at `dest`.
pub(crate) fn reflink_copy(source: &Path, dest: &Path) -> std::io::Result<()> {
    let from = File::open(source)?;
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)?;
    small_cow_extents(&to);
    if let Err(e) = reflink(&from, &to).and_then(|()| to.sync_all()) {
        drop(to);
        let _ = std::fs::remove_file(dest);
        return Err(e);
    }
    Ok(())
}

/// Whether `dir` can hold reflink snapshots: clones a small probe file there.
/// Snapshots a volume file as a reflink beside it (both drivers keep volumes as files).
pub(crate) fn reflink_snapshot(
    backend: &str,
    pool: &str,
    volume_id: &str,
    source_path: &Path,
    snapshot_path: &Path,
) -> Result<()> {
    reflink_copy(source_path, snapshot_path).map_err(|e| {
        if is_no_reflink(&e) {
            VolumeError::SnapshotUnsupported(format!(
                "pool {backend}/{pool} ({}) has no reflinks: {e}",
                snapshot_path.parent().unwrap_or(Path::new("")).display()
            ))
        } else if e.kind() == std::io::ErrorKind::NotFound {
            VolumeError::NotFound(volume_id.to_string())
        } else {
            VolumeError::io("snapshot", snapshot_path, e)
        }
    })
}

/// Deletes a volume file; one that is gone already is fine.
pub(crate) fn remove_volume_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VolumeError::io("delete", path, e)),
    }
}

/// Removes a reflinked snapshot file; one that is gone already is fine (recovery calls
/// this blindly).
pub(crate) fn remove_snapshot_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VolumeError::io("delete snapshot", path, e)),
    }
}

/// Whether a pool directory can hold reflink snapshots, as `snapshot_support` says it.
pub(crate) fn reflink_support(
    backend: &str,
    pool: &str,
    dir: &Path,
) -> std::result::Result<(), String> {
    probe_reflink(dir).map_err(|e| {
        format!(
            "pool {backend}/{pool} ({}) cannot make reflink snapshots: {e}",
            dir.display()
        )
    })
}

pub(crate) fn probe_reflink(dir: &Path) -> std::io::Result<()> {
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = |suffix: &str| {
        dir.join(format!(
            ".backupfs-reflink-probe-{}-{n}{suffix}",
            std::process::id()
        ))
    };
    let (a, b) = (probe("a"), probe("b"));
    let result = (|| -> std::io::Result<()> {
        let source = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&a)?;
        std::io::Write::write_all(&mut &source, &[0u8; 4096])?;
        let dest = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&b)?;
        reflink(&source, &dest)
    })();
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    result
}

/// Takes an OFD write lock on the whole file, the lock QEMU checks before it opens an
/// image: while a restore writes a volume, no hypervisor can start on it. The lock goes
/// with the descriptor. False when another process holds a conflicting lock.
pub(crate) fn lock_for_write(file: &File) -> std::io::Result<bool> {
    let lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads the flock struct we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
            return Ok(false);
        }
        return Err(err);
    }
    Ok(true)
}

/// Whether the file at `path` is bound to a loop device.
pub(crate) fn on_loop_device(path: &Path) -> std::io::Result<bool> {
    let canonical = path.canonicalize()?;
    Ok(loop_backing_files().contains(&canonical))
}

impl VolumeDriver for FileDriver {
    fn list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let mut volumes = Vec::new();
        for (id, path) in self.pools.list(pool)? {
            // A volume deleted between readdir and stat simply is not listed.
            if let Ok(meta) = std::fs::metadata(&path)
                && meta.is_file()
            {
                volumes.push(Self::info(pool, &id, &meta));
            }
        }
        Ok(volumes)
    }

    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo> {
        let path = self.pools.object_path(pool, volume_id)?;
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Self::info(pool, volume_id, &meta)),
            Ok(_) => Err(VolumeError::NotFound(volume_id.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(VolumeError::NotFound(volume_id.to_string()))
            }
            Err(e) => Err(VolumeError::io("stat", path, e)),
        }
    }

    fn create(&self, pool: &str, volume_id: &str, size: u64) -> Result<VolumeInfo> {
        let path = self.pools.object_path(pool, volume_id)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    VolumeError::Exists(volume_id.to_string())
                } else {
                    VolumeError::io("create", &path, e)
                }
            })?;
        if let Err(e) = file.set_len(size) {
            // We made it a moment ago (create_new): ours to remove.
            let _ = std::fs::remove_file(&path);
            return Err(VolumeError::io("create", path, e));
        }
        let meta = file
            .metadata()
            .map_err(|e| VolumeError::io("create", &path, e))?;
        Ok(Self::info(pool, volume_id, &meta))
    }

    fn grow(&self, pool: &str, volume_id: &str, size: u64) -> Result<()> {
        let path = self.pools.object_path(pool, volume_id)?;
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(|e| VolumeError::io("extend", &path, e))?;
        let current = file
            .metadata()
            .map_err(|e| VolumeError::io("extend", &path, e))?
            .len();
        if size > current {
            file.set_len(size)
                .map_err(|e| VolumeError::io("extend", &path, e))?;
        }
        Ok(())
    }

    fn delete(&self, pool: &str, volume_id: &str) -> Result<()> {
        self.pools.remove_object(pool, volume_id)
    }

    fn snapshot(&self, pool: &str, volume_id: &str, snapshot_name: &str) -> Result<()> {
        self.pools.reflink_snapshot(pool, volume_id, snapshot_name)
    }

    // Snapshots are files named by backup, not by volume: the name's form is the check.
    fn delete_snapshot(&self, pool: &str, _volume_id: &str, snapshot_name: &str) -> Result<()> {
        super::snapnames::refuse_foreign(snapshot_name)?;
        self.pools.remove_snapshot(pool, snapshot_name)
    }

    fn capabilities(&self, pool: &str) -> Capabilities {
        self.pools.reflink_capabilities(pool)
    }

    /// From the two reflinked snapshot files' extent maps: where they still share
    /// physical blocks, nothing changed.
    fn changed_extents(
        &self,
        pool: &str,
        from: &str,
        to: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Vec<std::ops::Range<u64>>>> {
        let open = |name: &str| {
            let path = self.pools.snapshot_path(pool, name)?;
            File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => VolumeError::NotFound(name.to_string()),
                _ => VolumeError::io("open snapshot", &path, e),
            })
        };
        let (base, new) = (open(from)?, open(to)?);
        match super::fiemap::changed(&base, &new, range) {
            Ok(changed) => Ok(Some(changed)),
            // No extent maps here: the caller compares checksums instead.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOTTY)) => Ok(None),
            Err(e) => Err(VolumeError::io("map extents", to, e)),
        }
    }

    fn set_note(&self, pool: &str, volume_id: &str, key: &str, value: Option<&str>) -> Result<()> {
        self.pools.set_note(pool, volume_id, key, value)
    }

    fn note(&self, pool: &str, volume_id: &str, key: &str) -> Result<Option<String>> {
        self.pools.note(pool, volume_id, key)
    }

    fn clone_volume(
        &self,
        pool: &str,
        source_id: &str,
        new_id: &str,
    ) -> Result<Option<VolumeInfo>> {
        if !self.pools.reflink_object(pool, source_id, new_id)? {
            return Ok(None);
        }
        self.stat(pool, new_id).map(Some)
    }

    fn attach(&self, pool: &str, volume_id: &str, access: Access) -> Result<Attachment> {
        let path = self.pools.object_path(pool, volume_id)?;
        let file = open_volume_file(&path, access).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                VolumeError::NotFound(volume_id.to_string())
            } else {
                VolumeError::io("attach", &path, e)
            }
        })?;
        if access == Access::Write {
            // Locked first, then checked: a hypervisor that starts from here on finds the
            // lock, and one that came before is found by the check.
            if !lock_for_write(&file).map_err(|e| VolumeError::io("lock", &path, e))? {
                return Err(VolumeError::Busy(format!(
                    "volume {volume_id} is locked by another process"
                )));
            }
            if on_loop_device(&path).map_err(|e| VolumeError::io("check in-use", &path, e))? {
                return Err(VolumeError::Busy(format!(
                    "volume {volume_id} is bound to a loop device"
                )));
            }
        }
        Ok(Attachment::new(FileDevice::new(file, path)))
    }

    fn attach_snapshot(&self, pool: &str, snapshot_name: &str) -> Result<Attachment> {
        let path = self.pools.snapshot_path(pool, snapshot_name)?;
        let file = open_volume_file(&path, Access::Stream)
            .map_err(|e| VolumeError::io("attach", &path, e))?;
        Ok(Attachment::new(FileDevice::new(file, path)))
    }

    fn in_use(&self, pool: &str, volume_id: &str) -> Result<Option<String>> {
        let path = self.pools.object_path(pool, volume_id)?;
        if on_loop_device(&path).map_err(|e| VolumeError::io("check in-use", &path, e))? {
            return Ok(Some("bound to a loop device".to_string()));
        }
        lock_holder(&path).map_err(|e| VolumeError::io("check in-use", &path, e))
    }

    fn free_space(&self, pool: &str) -> Result<Option<u64>> {
        self.pools.free_space(pool)
    }
}
