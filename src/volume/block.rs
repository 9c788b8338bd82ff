//! The `block` driver: a volume is a block device named `volume-<id>` in a pool
//! directory, or a symbolic link there to one (what Cinder's LVM driver keeps in
//! `/dev/<volume_group>/`, or links an operator makes to LUNs attached by other means).
//! Here the link is the point, but only its final target is ever opened: the name is
//! resolved to a real path, that path opened with O_NOFOLLOW, and the descriptor must be
//! a block device (fstat, and the device number resolved); anything else is skipped with
//! one log line. Devices have no snapshots, cannot be created or grown, and keep no
//! notes: a backup reads the device in place, which is why an in-use device (mounted,
//! held by another driver, or opened exclusively elsewhere) is refused.

use super::device::{AlignedBuf, BlockDevice, IoHints};
use super::dir::Dir;
use super::pools::{PoolDirs, PoolRole, object_file_name, object_id};
use super::{Access, Attachment, Result, VolumeDriver, VolumeError, VolumeInfo, is_valid_id};
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// `BLKGETSIZE64`, `_IOR(0x12, 114, size_t)` of <linux/fs.h>: the device's size in bytes.
nix::ioctl_read!(blkgetsize64, 0x12, 114, u64);
// `BLKZEROOUT`, `_IO(0x12, 127)` though it reads two u64 (start, length): zero a byte
// range (the kernel writes zeros where the device has no faster way).
nix::ioctl_write_ptr_bad!(blkzeroout, nix::request_code_none!(0x12, 127), [u64; 2]);
/// O_DIRECT wants buffers, offsets and lengths in whole logical blocks; a page covers
/// every logical block size in use (512 B, 4 KiB).
const DIRECT_ALIGN: u64 = 4096;
/// Range ioctls and fallocate on a block device take whole 512-byte sectors.
const SECTOR: u64 = 512;

/// The size of the open block device `file` (BLKGETSIZE64).
pub fn device_size(file: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into the variable we own.
    unsafe { blkgetsize64(file.as_raw_fd(), &mut size) }?;
    Ok(size)
}

/// Why a path is not served as a block device (for the one log line).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotBlock(pub String);

fn not_block(why: impl Into<String>) -> io::Error {
    io::Error::other(NotBlock(why.into()))
}

/// Whether `e` says a name did not resolve to a block device.
pub fn is_not_block(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<NotBlock>())
}

fn kind_of(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits()) {
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFCHR => "a character device",
        _ => "of an unknown type",
    }
}

fn is_blk(mode: u32) -> bool {
    mode & SFlag::S_IFMT.bits() == SFlag::S_IFBLK.bits()
}

/// A block device found behind a path, open.
pub struct Opened {
    pub file: File,
    /// The device node's real path (all links resolved).
    pub path: PathBuf,
    pub rdev: u64,
    pub mtime: SystemTime,
}

/// Opens the block device `path` names (a link to it is followed: all of them resolved
/// first, then only the final node opened, with O_NOFOLLOW). O_NONBLOCK for the open
/// (a FIFO swapped in cannot hang it), cleared once fstat says block device. `exclusive`
/// adds O_EXCL: the kernel then refuses the open while the device is mounted, claimed
/// by another driver (device-mapper, md) or opened O_EXCL elsewhere (EBUSY).
pub fn open_device(path: &Path, flags: OFlag, exclusive: bool) -> io::Result<Opened> {
    let real = std::fs::canonicalize(path)?;
    let stat = nix::sys::stat::lstat(&real).map_err(nix_io)?;
    if !is_blk(stat.st_mode) {
        return Err(not_block(format!(
            "resolves to {} ({}), not a block device",
            real.display(),
            kind_of(stat.st_mode)
        )));
    }
    let mut flags = flags | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    flags |= OFlag::O_NOCTTY;
    if exclusive {
        flags |= OFlag::O_EXCL;
    }
    let fd = match nix::fcntl::open(&real, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(nix::Error::ELOOP) => {
            return Err(not_block(format!(
                "{} became a symbolic link",
                real.display()
            )));
        }
        Err(e) => return Err(nix_io(e)),
    };
    let file = File::from(fd);
    let opened = nix::sys::stat::fstat(&file).map_err(nix_io)?;
    // Checked on the descriptor: a node swapped in after the look is never used.
    if !is_blk(opened.st_mode) || opened.st_rdev != stat.st_rdev {
        return Err(not_block(format!(
            "{} changed while it was opened ({})",
            real.display(),
            kind_of(opened.st_mode)
        )));
    }
    set_nonblock(&file, false)?;
    let mtime = u64::try_from(opened.st_mtime)
        .map(|secs| UNIX_EPOCH + Duration::new(secs, opened.st_mtime_nsec as u32))
        .unwrap_or(UNIX_EPOCH);
    Ok(Opened {
        file,
        path: real,
        rdev: opened.st_rdev,
        mtime,
    })
}

fn nix_io(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

fn set_nonblock(file: &File, on: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, fcntl};
    let mut flags = OFlag::from_bits_retain(fcntl(file, FcntlArg::F_GETFL)?);
    flags.set(OFlag::O_NONBLOCK, on);
    fcntl(file, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// `major:minor` of a device number, as sysfs and mountinfo write it.
fn dev_name(rdev: u64) -> String {
    format!("{}:{}", libc::major(rdev), libc::minor(rdev))
}

/// Why something outside backupfs uses block device `rdev`, from what the kernel shows
/// without opening it: a filesystem of it, or of one of its partitions, mounted (in any
/// mount namespace we can see), or holders in sysfs (device-mapper, md, bcache on top
/// of it or of a partition). A partition's user matters as much as the disk's: a backup
/// of the disk would read that filesystem while it changes, and an O_EXCL open of the
/// whole disk does not see a partition's claim.
pub fn used_by_others(rdev: u64) -> Option<String> {
    let name = dev_name(rdev);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut devices = vec![(name.clone(), String::new())];
    devices.extend(partitions(&name));
    for (dev, label) in &devices {
        if let Some(line) = mountinfo
            .lines()
            .find(|line| line.split(' ').nth(2) == Some(dev.as_str()))
        {
            let at = line.split(' ').nth(4).unwrap_or("?");
            return Some(format!("{label}mounted at {at}"));
        }
        let holders = PathBuf::from(format!("/sys/dev/block/{dev}/holders"));
        if let Ok(entries) = std::fs::read_dir(&holders) {
            let names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !names.is_empty() {
                return Some(format!("{label}held by {}", names.join(", ")));
            }
        }
    }
    None
}

/// The partitions of disk `name` (`major:minor`) as sysfs lists them: (their
/// `major:minor`, "partition <name> ").
fn partitions(name: &str) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(format!("/sys/dev/block/{name}")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.path().join("partition").exists())
        .filter_map(|e| {
            let dev = std::fs::read_to_string(e.path().join("dev")).ok()?;
            let label = format!("partition {} ", e.file_name().to_string_lossy());
            Some((dev.trim().to_string(), label))
        })
        .collect()
}

/// Whether an O_EXCL open of `path` fails with EBUSY: another exclusive opener (a
/// mount, a device-mapper table, a process with O_EXCL). The probe holds the device for
/// an instant only.
pub fn exclusively_held(path: &Path) -> io::Result<bool> {
    match open_device(path, OFlag::O_RDONLY, true) {
        Ok(_) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(true),
        Err(e) => Err(e),
    }
}

/// The devices backupfs holds open O_EXCL itself (a backup, a restore), by device
/// number: its own hold is no "in use".
#[derive(Default, Clone)]
pub struct Holds(Arc<Mutex<HashMap<u64, usize>>>);

impl Holds {
    fn take(&self, rdev: u64) -> Hold {
        *self.0.lock().entry(rdev).or_default() += 1;
        Hold {
            holds: self.clone(),
            rdev,
        }
    }

    fn held(&self, rdev: u64) -> bool {
        self.0.lock().contains_key(&rdev)
    }
}

/// One of our exclusive opens: let go when the attachment is dropped (after its device).
struct Hold {
    holds: Holds,
    rdev: u64,
}

impl Drop for Hold {
    fn drop(&mut self) {
        let mut map = self.holds.0.lock();
        if let Some(n) = map.get_mut(&self.rdev) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.rdev);
            }
        }
    }
}

/// An open block device. A device cannot grow: a write past its end fails with ENOSPC
/// (as the kernel's own block device does), growing it with EPERM.
pub struct RawBlockDevice {
    file: File,
    path: PathBuf,
    size: u64,
    /// Opened with O_DIRECT: reads that are not whole aligned blocks go through a bounce
    /// buffer.
    direct: bool,
}

impl RawBlockDevice {
    pub fn new(file: File, path: PathBuf, direct: bool) -> io::Result<RawBlockDevice> {
        let size = device_size(&file)?;
        Ok(RawBlockDevice {
            file,
            path,
            size,
            direct,
        })
    }

    fn aligned(buf: &[u8], offset: u64) -> bool {
        (buf.as_ptr() as u64 | buf.len() as u64 | offset).is_multiple_of(DIRECT_ALIGN)
    }

    /// Reads with pread until `buf` is full or the device ends.
    fn pread_all(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Writes zeros over `range` (the unaligned edges of a discard).
    fn write_zeros(&self, range: Range<u64>) -> io::Result<()> {
        let zeros = vec![0u8; (range.end - range.start).min(1 << 20) as usize];
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

/// Zeroes whole sectors: a deallocating zeroout first (fallocate PUNCH_HOLE on a block
/// device: a thin LV gives its blocks back, and reads of them are zeros, guaranteed),
/// then BLKZEROOUT (the kernel writes zeros where the device has no faster way).
fn zero_sectors(file: &File, range: &Range<u64>) -> io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    let len = range.end - range.start;
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, punch, range.start as libc::off_t, len as libc::off_t) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let span: [u64; 2] = [range.start, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) from the array we own.
    unsafe { blkzeroout(file.as_raw_fd(), &span) }?;
    Ok(())
}

impl BlockDevice for RawBlockDevice {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if offset >= self.size || buf.is_empty() {
            return Ok(0);
        }
        let want = (buf.len() as u64).min(self.size - offset) as usize;
        if !self.direct || Self::aligned(&buf[..want], offset) {
            return self.pread_all(&mut buf[..want], offset);
        }
        // O_DIRECT takes whole aligned blocks only: read the blocks around the piece.
        let start = offset / DIRECT_ALIGN * DIRECT_ALIGN;
        let end = (offset + want as u64).div_ceil(DIRECT_ALIGN) * DIRECT_ALIGN;
        let mut bounce = AlignedBuf::new((end - start) as usize)?;
        let got = self.pread_all(&mut bounce, start)?;
        let skip = (offset - start) as usize;
        let n = got.saturating_sub(skip).min(want);
        buf[..n].copy_from_slice(&bounce[skip..skip + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if offset + buf.len() as u64 > self.size {
            tracing::warn!(
                "{}: a write up to {} is past the device's end ({}): refused, a block volume cannot grow",
                self.path.display(),
                offset + buf.len() as u64,
                self.size
            );
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.file.write_all_at(buf, offset)
    }

    fn grow(&self, size: u64) -> io::Result<()> {
        if size <= self.size {
            return Ok(());
        }
        tracing::warn!(
            "{}: growing it to {size} bytes refused: a block volume has the size of its device ({}); grow it with its storage's tools (lvextend)",
            self.path.display(),
            self.size
        );
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_all()
    }

    fn discard(&self, range: Range<u64>) -> io::Result<()> {
        let range = range.start.min(self.size)..range.end.min(self.size);
        if range.is_empty() {
            return Ok(());
        }
        let inner = range.start.div_ceil(SECTOR) * SECTOR..range.end / SECTOR * SECTOR;
        if inner.start >= inner.end {
            return self.write_zeros(range);
        }
        self.write_zeros(range.start..inner.start)?;
        zero_sectors(&self.file, &inner)?;
        self.write_zeros(inner.end..range.end)
    }

    fn hints(&self) -> IoHints {
        // Direct reads of a device go at its speed with a few large requests in flight
        // (dd's one 1 MiB request at a time is what Cinder does).
        IoHints {
            request_size: 4 << 20,
            queue_depth: 4,
        }
    }
}

/// What the `block` driver asks of its pool directories beyond every pool's rules
/// (config.rs): backups are files, so a pool of devices holds none; and its links choose
/// the devices backupfs reads and restores into, so whoever may add one could have the
/// node's own disks backed up (and readable to `admin_group`) or written over.
pub const DIR_RULES: crate::config::DirRules = crate::config::DirRules {
    no_backups: Some(
        "(devices): it cannot hold backups; give the target a pool of a \"file\", \"qcow2\" or \"rbd\" backend",
    ),
    root_only: Some(
        "a block pool's links choose the devices backupfs reads and writes, so only root may change it (as /dev/<volume_group>/ is)",
    ),
};

pub struct BlockDriver {
    pools: PoolDirs,
    holds: Holds,
    /// Names skipped as no block device, logged once per name for the daemon's life.
    skipped: Mutex<HashSet<PathBuf>>,
}

impl BlockDriver {
    pub fn new(pools: PoolDirs) -> BlockDriver {
        BlockDriver {
            pools,
            holds: Holds::default(),
            skipped: Mutex::default(),
        }
    }

    /// The pool entry of volume `id`: the name in the pool directory (never opened by
    /// this path: see [`open_device`]).
    fn entry(&self, pool: &str, id: &str) -> Result<(Dir, String)> {
        if !is_valid_id(id) {
            return Err(VolumeError::NotFound(id.to_string()));
        }
        let dir = self.pools.dir(pool)?;
        let dir = match Dir::open(dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(VolumeError::NotFound(id.to_string()));
            }
            Err(e) => return Err(VolumeError::io("open pool", dir, e)),
        };
        Ok((dir, object_file_name(PoolRole::Volumes, id)))
    }

    /// What a failed open of volume `id` at `path` means: a name that is gone, or that
    /// does not resolve to a block device (logged: once per name when `quiet`), is no
    /// volume.
    fn refused(
        &self,
        op: &'static str,
        id: &str,
        path: PathBuf,
        e: io::Error,
        quiet: bool,
    ) -> VolumeError {
        if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENXIO) {
            // A link to a device that is gone, a loop device with no file: no volume.
            return VolumeError::NotFound(id.to_string());
        }
        if is_not_block(&e) {
            if !quiet || self.skipped.lock().insert(path.clone()) {
                tracing::warn!("{} {e}: not a volume, skipped ({op})", path.display());
            }
            return VolumeError::NotFound(id.to_string());
        }
        if e.raw_os_error() == Some(libc::EBUSY) {
            return VolumeError::Busy(format!(
                "volume {id} ({}) is open exclusively elsewhere (mounted, or claimed by another driver or process)",
                path.display()
            ));
        }
        VolumeError::io(op, path, e)
    }

    fn open(
        &self,
        op: &'static str,
        pool: &str,
        id: &str,
        flags: OFlag,
        exclusive: bool,
        quiet: bool,
    ) -> Result<Opened> {
        let (dir, name) = self.entry(pool, id)?;
        // The entry itself first: a name that is gone is no volume, quietly.
        if let Err(e) = dir.stat(&name) {
            return Err(self.refused(op, id, dir.join(&name), e, quiet));
        }
        open_device(&dir.join(&name), flags, exclusive)
            .map_err(|e| self.refused(op, id, dir.join(&name), e, quiet))
    }

    fn info(pool: &str, id: &str, opened: &Opened) -> Result<VolumeInfo> {
        let size =
            device_size(&opened.file).map_err(|e| VolumeError::io("size", &opened.path, e))?;
        Ok(VolumeInfo {
            id: id.to_string(),
            pool: pool.to_string(),
            size,
            // A device cannot say what it holds (no SEEK_DATA): all of it, as far as the
            // space a backup needs goes; the copy itself stores only its data.
            allocated: size,
            mtime: opened.mtime,
        })
    }

    fn refuse(&self, op: &str, pool: &str, id: &str) -> VolumeError {
        let why = format!(
            "cannot {op} volume {id} in block pool {}/{pool}: a block volume is a device made by its storage (lvcreate, lvextend, the array's tools), never by backupfs",
            self.pools.backend()
        );
        tracing::warn!("{why}");
        VolumeError::Refused(why)
    }
}

impl VolumeDriver for BlockDriver {
    fn list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let dir_path = self.pools.dir(pool)?;
        let dir = Dir::open(dir_path).map_err(|e| VolumeError::io("open pool", dir_path, e))?;
        let names = dir
            .names()
            .map_err(|e| VolumeError::io("list", dir.path(), e))?;
        let mut found = Vec::new();
        for name in names {
            let Some(id) = object_id(PoolRole::Volumes, &name) else {
                continue;
            };
            match self.open("list", pool, id, OFlag::O_RDONLY, false, true) {
                Ok(opened) => found.push(Self::info(pool, id, &opened)?),
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => tracing::warn!("{}: {e}: not listed", dir.join(&name).display()),
            }
        }
        found.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(found)
    }

    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo> {
        let opened = self.open("stat", pool, volume_id, OFlag::O_RDONLY, false, true)?;
        Self::info(pool, volume_id, &opened)
    }

    fn create(&self, pool: &str, volume_id: &str, _size: u64) -> Result<VolumeInfo> {
        Err(self.refuse("create", pool, volume_id))
    }

    fn grow(&self, pool: &str, volume_id: &str, _size: u64) -> Result<()> {
        Err(self.refuse("grow", pool, volume_id))
    }

    fn delete(&self, pool: &str, volume_id: &str) -> Result<()> {
        Err(self.refuse("delete", pool, volume_id))
    }

    fn snapshot(&self, pool: &str, _volume_id: &str, _snapshot_name: &str) -> Result<()> {
        Err(VolumeError::SnapshotUnsupported(format!(
            "block pool {}/{pool} has no snapshots",
            self.pools.backend()
        )))
    }

    // Nothing to delete: no snapshot is ever made here (recovery may still ask).
    fn delete_snapshot(&self, _pool: &str, _volume_id: &str, snapshot_name: &str) -> Result<()> {
        super::snapnames::refuse_foreign(snapshot_name)
    }

    fn attach(&self, pool: &str, volume_id: &str, access: Access) -> Result<Attachment> {
        let (flags, exclusive, direct) = access_mode(access);
        let opened = self.open("attach", pool, volume_id, flags, exclusive, false)?;
        attach_opened(&self.holds, volume_id, opened, exclusive, direct)
    }

    fn attach_snapshot(&self, _pool: &str, snapshot_name: &str) -> Result<Attachment> {
        Err(VolumeError::NotFound(snapshot_name.to_string()))
    }

    fn in_use(&self, pool: &str, volume_id: &str) -> Result<Option<String>> {
        let opened = self.open(
            "check in-use",
            pool,
            volume_id,
            OFlag::O_RDONLY,
            false,
            true,
        )?;
        in_use_opened(&self.holds, opened)
    }
}

/// How an attachment opens a device (flags, O_EXCL, O_DIRECT). Stream (a backup's pass)
/// and Write (a restore) hold the device O_EXCL for the attachment's life: nothing can
/// mount or claim it meanwhile. A plain read (through the mount) holds nothing, as
/// reading a file volume locks nothing.
fn access_mode(access: Access) -> (OFlag, bool, bool) {
    match access {
        Access::Read => (OFlag::O_RDONLY, false, false),
        Access::Stream => (OFlag::O_RDONLY | OFlag::O_DIRECT, true, true),
        Access::Write => (OFlag::O_RDWR, true, false),
    }
}

/// The attachment of an opened device. An exclusive one is refused while the device is
/// mounted or has holders: the O_EXCL open already fails then, these checks say why
/// (and cover a claim the kernel does not make exclusive).
fn attach_opened(
    holds: &Holds,
    volume_id: &str,
    opened: Opened,
    exclusive: bool,
    direct: bool,
) -> Result<Attachment> {
    if exclusive && let Some(why) = used_by_others(opened.rdev) {
        return Err(VolumeError::Busy(format!(
            "volume {volume_id} is in-use ({why})"
        )));
    }
    let hold = exclusive.then(|| holds.take(opened.rdev));
    let device = RawBlockDevice::new(opened.file, opened.path.clone(), direct)
        .map_err(|e| VolumeError::io("size", &opened.path, e))?;
    Ok(Attachment {
        device: Box::new(device),
        keep_alive: hold.map(|h| Box::new(h) as Box<dyn Send + Sync>),
    })
}

/// Why something outside backupfs uses an opened device: mounted, held in sysfs, or
/// open O_EXCL elsewhere (not by backupfs itself).
fn in_use_opened(holds: &Holds, opened: Opened) -> Result<Option<String>> {
    if let Some(why) = used_by_others(opened.rdev) {
        return Ok(Some(why));
    }
    // Our own exclusive hold (a backup or restore running) is no use by others.
    if holds.held(opened.rdev) {
        return Ok(None);
    }
    drop(opened.file);
    match exclusively_held(&opened.path) {
        Ok(true) => Ok(Some("open exclusively by another process".to_string())),
        Ok(false) => Ok(None),
        Err(e) => Err(VolumeError::io("check in-use", &opened.path, e)),
    }
}

/// The name of the engine's backend for the devices a request names (`device=<path>`):
/// not a valid configured backend name (it starts with `@`), so never one of theirs.
pub const DEVICE_BACKEND: &str = "@device";

/// The block devices a request names by path (`device=<path>`: what Cinder attached to
/// this node). Its "pool" is the device's real path (resolved when the request came);
/// it has the one volume the request named there. Read only: nothing is created, grown,
/// snapshotted or restored here.
#[derive(Default)]
pub struct DeviceDriver {
    holds: Holds,
}

impl DeviceDriver {
    /// The device at `path` (absolute; links resolved) as volume `volume_id`, its pool
    /// the real path. An error for which `is_not_block` holds, or NotFound, or ENXIO,
    /// says the path is no block device.
    pub fn resolve(path: &Path, volume_id: &str) -> io::Result<VolumeInfo> {
        if !path.is_absolute() {
            return Err(not_block("is not an absolute path"));
        }
        let opened = open_device(path, OFlag::O_RDONLY, false)?;
        let size = device_size(&opened.file)?;
        let pool = opened
            .path
            .to_str()
            .ok_or_else(|| not_block("resolves to a path that is not UTF-8"))?
            .to_string();
        Ok(VolumeInfo {
            id: volume_id.to_string(),
            pool,
            size,
            allocated: size,
            mtime: opened.mtime,
        })
    }

    fn open(&self, pool: &str, volume_id: &str, flags: OFlag, exclusive: bool) -> Result<Opened> {
        open_device(Path::new(pool), flags, exclusive).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENXIO)
                || is_not_block(&e)
            {
                tracing::warn!("device {pool} of volume {volume_id}: {e}");
                VolumeError::NotFound(volume_id.to_string())
            } else if e.raw_os_error() == Some(libc::EBUSY) {
                VolumeError::Busy(format!(
                    "device {pool} of volume {volume_id} is open exclusively elsewhere (mounted, or claimed by another driver or process)"
                ))
            } else {
                VolumeError::io("open device", pool, e)
            }
        })
    }

    fn refuse(op: &str, pool: &str, volume_id: &str) -> VolumeError {
        let why = format!(
            "cannot {op} volume {volume_id} on device {pool}: a device named by a request is only read"
        );
        tracing::warn!("{why}");
        VolumeError::Refused(why)
    }
}

impl VolumeDriver for DeviceDriver {
    // Devices named by requests are in no listing: the mount shows none.
    fn list(&self, _pool: &str) -> Result<Vec<VolumeInfo>> {
        Ok(Vec::new())
    }

    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo> {
        let opened = self.open(pool, volume_id, OFlag::O_RDONLY, false)?;
        BlockDriver::info(pool, volume_id, &opened)
    }

    fn create(&self, pool: &str, volume_id: &str, _size: u64) -> Result<VolumeInfo> {
        Err(Self::refuse("create", pool, volume_id))
    }

    fn grow(&self, pool: &str, volume_id: &str, _size: u64) -> Result<()> {
        Err(Self::refuse("grow", pool, volume_id))
    }

    fn delete(&self, pool: &str, volume_id: &str) -> Result<()> {
        Err(Self::refuse("delete", pool, volume_id))
    }

    fn snapshot(&self, pool: &str, _volume_id: &str, _snapshot_name: &str) -> Result<()> {
        Err(VolumeError::SnapshotUnsupported(format!(
            "device {pool} has no snapshots"
        )))
    }

    fn delete_snapshot(&self, _pool: &str, _volume_id: &str, snapshot_name: &str) -> Result<()> {
        super::snapnames::refuse_foreign(snapshot_name)
    }

    fn attach(&self, pool: &str, volume_id: &str, access: Access) -> Result<Attachment> {
        if access == Access::Write {
            return Err(Self::refuse("write", pool, volume_id));
        }
        let (flags, exclusive, direct) = access_mode(access);
        let opened = self.open(pool, volume_id, flags, exclusive)?;
        attach_opened(&self.holds, volume_id, opened, exclusive, direct)
    }

    fn attach_snapshot(&self, _pool: &str, snapshot_name: &str) -> Result<Attachment> {
        Err(VolumeError::NotFound(snapshot_name.to_string()))
    }

    fn in_use(&self, pool: &str, volume_id: &str) -> Result<Option<String>> {
        let opened = self.open(pool, volume_id, OFlag::O_RDONLY, false)?;
        in_use_opened(&self.holds, opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_that_is_no_block_device_is_refused_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let link = dir.path().join("volume-a");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        for path in [&file, &link] {
            let err = open_device(path, OFlag::O_RDONLY, false).err().unwrap();
            assert!(is_not_block(&err), "{err}");
        }
        let err = open_device(&dir.path().join("gone"), OFlag::O_RDONLY, false)
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
