//! The `file` driver: a volume is the sparse raw file `volume-<id>` in a pool directory
//! (Cinder's RemoteFS naming); snapshots are reflinks (`FICLONE`) beside it.
//! Every file is opened through the pool's directory descriptor (`pools.rs`, `dir.rs`):
//! a link or a special file named like a volume is no volume.
//! It never writes to a volume file except through an attachment the engine asked for.

use super::device::FileDevice;
use super::dir::Dir;
use super::pools::PoolDirs;
use super::{Access, Attachment, Capabilities, Result, VolumeDriver, VolumeError, VolumeInfo};
use nix::fcntl::OFlag;
use nix::sys::stat::FileStat;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

pub struct FileDriver {
    pools: PoolDirs,
}

impl FileDriver {
    pub fn new(pools: PoolDirs) -> FileDriver {
        FileDriver { pools }
    }

    fn info(pool: &str, volume_id: &str, stat: &FileStat) -> VolumeInfo {
        let mtime = u64::try_from(stat.st_mtime)
            .map(|secs| UNIX_EPOCH + Duration::new(secs, stat.st_mtime_nsec as u32))
            .unwrap_or(UNIX_EPOCH);
        VolumeInfo {
            id: volume_id.to_string(),
            pool: pool.to_string(),
            size: stat.st_size as u64,
            allocated: stat.st_blocks as u64 * 512,
            mtime,
        }
    }
}

/// Opens a volume file with `open` (the pool's guarded open of one name). A stream (a
/// backup's one pass) uses O_DIRECT where the filesystem takes it, so a backup does not
/// push the node's page cache out; it falls back to buffered I/O (tmpfs, some FUSE).
fn open_volume_file(
    access: Access,
    open: impl Fn(OFlag) -> Result<(File, PathBuf)>,
) -> Result<(File, PathBuf)> {
    match access {
        Access::Write => open(OFlag::O_RDWR),
        Access::Read => open(OFlag::O_RDONLY),
        Access::Stream => match open(OFlag::O_RDONLY | OFlag::O_DIRECT) {
            Err(VolumeError::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                open(OFlag::O_RDONLY)
            }
            other => other,
        },
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
    let file = super::dir::open_in(path, OFlag::O_RDONLY)?;
    let mut lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_OFD_GETLK(&mut lock))?;
    if lock.l_type != libc::F_UNLCK as i16 {
        let who = if lock.l_pid > 0 {
            format!("pid {}", lock.l_pid)
        } else {
            "another process".to_string()
        };
        return Ok(Some(format!("locked by {who} (fcntl lock)")));
    }
    // flock locks are invisible to F_OFD_GETLK; probing takes the lock for an instant
    // and lets it go at once (the `Flock` is dropped).
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(_probe) => Ok(None),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            Ok(Some("locked by another process (flock)".to_string()))
        }
        Err((_, e)) => Err(e.into()),
    }
}

// `FICLONE`, `_IOW(0x94, 9, int)`: the source descriptor as its argument.
nix::ioctl_write_int!(ficlone, 0x94, 9);

fn reflink(from: &File, to: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes a descriptor, which stays open for the call.
    unsafe { ficlone(to.as_raw_fd(), from.as_raw_fd() as _) }?;
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

nix::ioctl_read!(fs_ioc_fsgetxattr, b'X', 31, FsXattr);
nix::ioctl_write_ptr!(fs_ioc_fssetxattr, b'X', 32, FsXattr);
const FS_XFLAG_COWEXTSIZE: u32 = 0x0001_0000;

/// Asks XFS to give copy-on-write writes into `file` only the blocks they write. Its
/// default hint preallocates 32 blocks around each one, so an incremental backup that
/// rewrites scattered 4 KiB blocks of a clone held twice the data it changed until the
/// background collector ran. Other filesystems have no such hint; failing costs space
/// only.
fn small_cow_extents(file: &File) {
    let mut attr = FsXattr::default();
    // SAFETY: both ioctls take a pointer to a struct fsxattr we own.
    if unsafe { fs_ioc_fsgetxattr(file.as_raw_fd(), &mut attr) }.is_err() {
        return;
    }
    attr.xflags |= FS_XFLAG_COWEXTSIZE;
    attr.cowextsize = 4096;
    // SAFETY: as above.
    if let Err(e) = unsafe { fs_ioc_fssetxattr(file.as_raw_fd(), &attr) } {
        tracing::debug!("no copy-on-write extent hint: {e}");
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

/// A point-in-time copy of `source` as the new file `dest` in `dir` (O_EXCL, mode 0600),
/// sharing its blocks; on failure nothing is left at `dest`.
pub(crate) fn reflink_copy(source: &File, dir: &Dir, dest: &str) -> std::io::Result<()> {
    let to = dir.create_new(dest, OFlag::O_WRONLY, 0o600)?;
    small_cow_extents(&to);
    if let Err(e) = reflink(source, &to).and_then(|()| to.sync_all()) {
        drop(to);
        let _ = dir.remove(dest);
        return Err(e);
    }
    Ok(())
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

/// The names of reflink probes (a random part follows): a crash can leave one behind,
/// which a target's start-up removes as a temporary of its own.
pub(crate) const REFLINK_PROBE_PREFIX: &str = ".backupfs-reflink-probe-";

/// Clones a 4 KiB probe file in `dir`. The probe's names are unpredictable and made
/// with O_EXCL, so a link planted in the pool cannot turn the probe into a write
/// elsewhere.
pub(crate) fn probe_reflink(dir: &Path) -> std::io::Result<()> {
    let dir = Dir::open(dir)?;
    let (source_name, source) = dir.create_temporary(REFLINK_PROBE_PREFIX, "")?;
    let result = (|| -> std::io::Result<()> {
        std::io::Write::write_all(&mut &source, &[0u8; 4096])?;
        let (dest_name, dest) = dir.create_temporary(REFLINK_PROBE_PREFIX, "")?;
        let cloned = reflink(&source, &dest);
        let _ = dir.remove(&dest_name);
        cloned
    })();
    let _ = dir.remove(&source_name);
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
    match nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_OFD_SETLK(&lock)) {
        Ok(_) => Ok(true),
        Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether the file at `path` is bound to a loop device.
pub(crate) fn on_loop_device(path: &Path) -> std::io::Result<bool> {
    let canonical = path.canonicalize()?;
    Ok(loop_backing_files().contains(&canonical))
}

impl VolumeDriver for FileDriver {
    fn list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        Ok(self
            .pools
            .list_stats(pool)?
            .iter()
            .map(|(id, _, stat)| Self::info(pool, id, stat))
            .collect())
    }

    fn list_ids(&self, pool: &str) -> Result<Vec<String>> {
        self.pools.list_ids(pool)
    }

    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo> {
        let stat = self.pools.stat_object(pool, volume_id)?;
        Ok(Self::info(pool, volume_id, &stat))
    }

    fn create(&self, pool: &str, volume_id: &str, size: u64) -> Result<VolumeInfo> {
        let (file, path) = self.pools.create_object(pool, volume_id)?;
        if let Err(e) = file.set_len(size) {
            // We made it a moment ago (O_EXCL): ours to remove.
            let _ = self.pools.remove_object(pool, volume_id);
            return Err(VolumeError::io("create", path, e));
        }
        let stat =
            nix::sys::stat::fstat(&file).map_err(|e| VolumeError::io("create", &path, e.into()))?;
        Ok(Self::info(pool, volume_id, &stat))
    }

    fn grow(&self, pool: &str, volume_id: &str, size: u64) -> Result<()> {
        let (file, path) = self
            .pools
            .open_object("extend", pool, volume_id, OFlag::O_WRONLY)?;
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
            self.pools
                .open_snapshot(pool, name, OFlag::O_RDONLY)
                .map(|(file, _)| file)
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
        let (file, path) = open_volume_file(access, |flags| {
            self.pools.open_object("attach", pool, volume_id, flags)
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
        let (file, path) = open_volume_file(Access::Stream, |flags| {
            self.pools.open_snapshot(pool, snapshot_name, flags)
        })?;
        Ok(Attachment::new(FileDevice::new(file, path)))
    }

    fn in_use(&self, pool: &str, volume_id: &str) -> Result<Option<String>> {
        let path = self.pools.object_path(pool, volume_id)?;
        // Only a volume is asked about: a link planted under its name is refused here.
        self.pools.stat_object(pool, volume_id)?;
        if on_loop_device(&path).map_err(|e| VolumeError::io("check in-use", &path, e))? {
            return Ok(Some("bound to a loop device".to_string()));
        }
        lock_holder(&path).map_err(|e| VolumeError::io("check in-use", &path, e))
    }

    fn free_space(&self, pool: &str) -> Result<Option<u64>> {
        self.pools.free_space(pool)
    }

    fn overlays(&self, pool: &str, volume_id: &str) -> Result<Vec<String>> {
        self.pools.overlays(pool, volume_id)
    }
}
