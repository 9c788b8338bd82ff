//! The `qcow2` driver: a volume is the qcow2 image `volume-<id>` in a pool directory,
//! made with `qemu-img`; attaching (and growing) goes through a `qemu-storage-daemon` FUSE
//! export of its guest-visible raw contents. Snapshots are reflinks of the image file.
//! It never writes qcow2 structures itself, and never hands QEMU an image whose header it
//! has not checked (header.rs) on a descriptor of its own: QEMU gets that descriptor, its
//! format pinned and `backing: null`, so no header makes it open another file.

mod export;
mod header;

/// How many qemu-storage-daemon exports run at once, at most: the FUSE layer gives users
/// other than root a share of them.
pub use export::live_cap as max_live_exports;

use super::device::FileDevice;
use super::file::{lock_holder, on_loop_device};
use super::pools::{PoolDirs, object_file_name};
use super::{Access, Attachment, Capabilities, Result, VolumeDriver, VolumeError, VolumeInfo};
use export::{ExportError, Exports, Mode};
use header::HeaderError;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat};
use nix::sys::stat::{Mode as FileMode, fchmod};
use nix::unistd::{UnlinkatFlags, linkat, unlinkat};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

const QEMU_IMG: &str = "qemu-img";
/// qcow2 sizes are whole sectors.
const SECTOR: u64 = 512;
/// The largest qcow2 cluster: a range aligned to it is aligned to whole clusters of any
/// image, which is what a qsd export can punch as holes.
const MAX_CLUSTER: u64 = 2 << 20;

/// How many refusals are remembered as logged before the memory starts over.
const LOGGED_REFUSALS: usize = 1024;

pub struct Qcow2Driver {
    pools: PoolDirs,
    exports: Arc<Exports>,
    /// Refusals already logged, by image state (device, inode, ctime) and reason: one log
    /// line per refused image however often it is looked up (`ls -l` does, every time).
    logged: Mutex<HashSet<RefusalKey>>,
}

/// An image's device, inode and ctime (seconds, nanoseconds), and the refusal's text.
type RefusalKey = (u64, u64, i64, i64, String);

/// An image file as backupfs opened it, and what its header said.
struct Image {
    path: PathBuf,
    file: File,
    info: VolumeInfo,
    header: std::result::Result<header::Header, HeaderError>,
}

impl Qcow2Driver {
    /// Checks that the QEMU tools are there and opens the export directory, cleaning what a
    /// crashed daemon left in it.
    pub fn new(pools: PoolDirs) -> Result<Qcow2Driver> {
        for tool in [QEMU_IMG, export::QSD] {
            let found = Command::new(tool)
                .arg("--version")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if let Err(e) = found {
                return Err(VolumeError::io(
                    "find the qcow2 driver's tools (Debian: qemu-utils, qemu-system-common)",
                    tool,
                    e,
                ));
            }
        }
        let base = export::runtime_base();
        let exports =
            Exports::open(&base).map_err(|e| VolumeError::io("open qcow2 exports", &base, e))?;
        Ok(Qcow2Driver {
            pools,
            exports,
            logged: Mutex::new(HashSet::new()),
        })
    }

    /// Opens one image and reads its header; `NotFound` when it is not a qcow2 image. A
    /// header the check refuses still gives an `Image` (listed, with size 0): using it is
    /// what `checked` refuses.
    fn open_image(&self, pool: &str, volume_id: &str, path: &Path) -> Result<Image> {
        let not_found = || VolumeError::NotFound(volume_id.to_string());
        // Relative to the pool's directory (volume/dir.rs): no link is followed (the name
        // must be the image itself), and a FIFO or device planted under a volume's name is
        // neither opened nor waited on. Logged once per name by the pool's listing.
        let file = super::dir::open_in(path, nix::fcntl::OFlag::O_RDONLY).map_err(|e| {
            if super::dir::is_not_regular(&e) {
                tracing::debug!("{} {e}: not a volume", path.display());
                return not_found();
            }
            match e.kind() {
                std::io::ErrorKind::NotFound => not_found(),
                _ => VolumeError::io("stat", path, e),
            }
        })?;
        let meta = file
            .metadata()
            .map_err(|e| VolumeError::io("stat", path, e))?;
        if !meta.is_file() {
            return Err(not_found());
        }
        let header = match header::check(&file) {
            // A qcow2 pool holds qcow2 images only: probing another format would let a
            // guest that wrote a qcow2 header into a raw volume choose what we open.
            Err(HeaderError::NotQcow2) => {
                tracing::debug!("{} is not a qcow2 image: not a volume", path.display());
                return Err(not_found());
            }
            Err(HeaderError::Io(e)) => return Err(VolumeError::io("read qcow2 header", path, e)),
            checked => checked,
        };
        Ok(Image {
            path: path.to_path_buf(),
            info: VolumeInfo {
                id: volume_id.to_string(),
                pool: pool.to_string(),
                size: header.as_ref().map_or(0, |h| h.size),
                allocated: meta.blocks() * 512,
                mtime: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
            },
            file,
            header,
        })
    }

    /// Refuses an image QEMU must not open (for writing, when `write`): its header names
    /// another file, uses features backupfs does not know, or (for writing) QEMU marked
    /// it corrupt. Logged once per image state.
    fn checked(&self, image: &Image, write: bool) -> Result<()> {
        let reason = match &image.header {
            Ok(header) if write && header.corrupt => {
                "QEMU marked it corrupt and opens it read-only only (`qemu-img check -r all` repairs it)".to_string()
            }
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        };
        let message = format!("qcow2 image {} refused: {reason}", image.path.display());
        self.log_refusal(&image.file, &message);
        Err(VolumeError::Refused(message))
    }

    fn log_refusal(&self, file: &File, message: &str) {
        let first = file.metadata().map_or(true, |meta| {
            let key = (
                meta.dev(),
                meta.ino(),
                meta.ctime(),
                meta.ctime_nsec(),
                message.to_string(),
            );
            let mut logged = self.logged.lock();
            if logged.len() >= LOGGED_REFUSALS {
                logged.clear();
            }
            logged.insert(key)
        });
        if first {
            tracing::warn!("{message}");
        } else {
            tracing::debug!("{message}");
        }
    }

    /// Checks an image and exports it (a volume, a snapshot or a backup image), and opens
    /// its raw view.
    fn attach_checked(
        &self,
        pool: &str,
        volume_id: &str,
        path: &Path,
        access: Access,
    ) -> Result<Attachment> {
        let image = self.open_image(pool, volume_id, path)?;
        self.checked(&image, access == Access::Write)?;
        let canonical = image.path.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VolumeError::NotFound(volume_id.to_string()),
            _ => VolumeError::io("attach", &image.path, e),
        })?;
        let mode = Mode {
            writable: access == Access::Write,
            direct: access == Access::Stream && takes_o_direct(&image.file),
        };
        let export = self
            .exports
            .get(&canonical, &image.file, mode)
            .map_err(|e| match e {
                ExportError::Io(e) => VolumeError::io("attach", &canonical, e),
                ExportError::Foreign(message) => {
                    self.log_refusal(&image.file, &message);
                    VolumeError::Refused(message)
                }
            })?;
        let file = open_export(&export.mountpoint, access)
            .map_err(|e| VolumeError::io("attach", &export.mountpoint, e))?;
        Ok(Attachment {
            device: Box::new(FileDevice::exported(file, &export.mountpoint, MAX_CLUSTER)),
            keep_alive: Some(Box::new(export)),
        })
    }
}

/// Makes a new, empty qcow2 image of `size` in `file` (qemu-img writes the descriptor it
/// is handed, whatever the file's name has become).
fn qemu_img_create(file: &File, path: &Path, size: u64) -> Result<()> {
    let size_arg = size.to_string();
    let mut command = Command::new(QEMU_IMG);
    command
        .args(["create", "-q", "-f", "qcow2"])
        .arg(export::handed_over(file))
        .arg(&size_arg)
        .stdin(Stdio::null());
    export::hand_over(&mut command, file);
    let output = command
        .output()
        .map_err(|e| VolumeError::io("create", path, e))?;
    if !output.status.success() {
        return Err(VolumeError::io(
            "create",
            path,
            std::io::Error::other(format!(
                "{QEMU_IMG} create: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
        ));
    }
    Ok(())
}

fn round_up(size: u64, to: u64) -> u64 {
    size.div_ceil(to) * to
}

/// Whether qsd can read this image with O_DIRECT (not on tmpfs, for one): tried on the
/// same inode, reopened the way qsd opens it.
fn takes_o_direct(image: &File) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", image.as_raw_fd()))
        .is_ok()
}

/// Opens the raw view. A stream (a backup's one pass) bypasses the page cache where it can.
fn open_export(path: &Path, access: Access) -> std::io::Result<File> {
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

impl VolumeDriver for Qcow2Driver {
    /// Every qcow2 image of the pool, also those whose header is refused (size 0): `ls`
    /// shows them, and looking one up says why it is refused.
    fn list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let mut volumes = Vec::new();
        for (id, path) in self.pools.list(pool)? {
            // Gone since readdir, or not a qcow2 image: not listed.
            match self.open_image(pool, &id, &path) {
                Ok(image) => volumes.push(image.info),
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(volumes)
    }

    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo> {
        let path = self.pools.object_path(pool, volume_id)?;
        let image = self.open_image(pool, volume_id, &path)?;
        self.checked(&image, false)?;
        Ok(image.info)
    }

    fn create(&self, pool: &str, volume_id: &str, size: u64) -> Result<VolumeInfo> {
        let dir_path = self.pools.dir(pool)?;
        let name = object_file_name(self.pools.role(pool)?, volume_id);
        let path = dir_path.join(&name);
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dir_path)
            .map_err(|e| VolumeError::io("create", dir_path, e))?;
        // qemu-img create overwrites: the image is made in a file created here (O_EXCL,
        // under a name nobody can plant in advance), written through its descriptor, and
        // linked into place, which fails rather than replace a volume that exists.
        let temp_name = format!(".{name}.creating-{}", uuid::Uuid::new_v4().simple());
        let temp = openat(
            &dir,
            temp_name.as_str(),
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            FileMode::from_bits_truncate(0o600),
        )
        .map(File::from)
        .map_err(|e| VolumeError::io("create", dir_path.join(&temp_name), e.into()))?;
        let made = fchmod(&temp, FileMode::from_bits_truncate(0o600))
            .map_err(|e| VolumeError::io("create", &path, e.into()))
            .and_then(|()| qemu_img_create(&temp, &path, round_up(size, SECTOR)))
            .and_then(|()| {
                let by_descriptor = format!("/proc/self/fd/{}", temp.as_raw_fd());
                linkat(
                    AT_FDCWD,
                    by_descriptor.as_str(),
                    &dir,
                    name.as_str(),
                    AtFlags::AT_SYMLINK_FOLLOW,
                )
                .map_err(|e| match e {
                    nix::errno::Errno::EEXIST => VolumeError::Exists(volume_id.to_string()),
                    e => VolumeError::io("create", &path, e.into()),
                })
            });
        let _ = unlinkat(&dir, temp_name.as_str(), UnlinkatFlags::NoRemoveDir);
        made?;
        self.stat(pool, volume_id)
    }

    /// Through a writable export, like any write: the resize goes through the same checked
    /// and pinned open (and through the export a restore of ours may already hold, which
    /// has the image's locks and its own idea of the size).
    fn grow(&self, pool: &str, volume_id: &str, size: u64) -> Result<()> {
        let attachment = self.attach(pool, volume_id, Access::Write)?;
        attachment
            .device
            .grow(round_up(size, SECTOR))
            .map_err(|e| VolumeError::io("extend", attachment.device.describe(), e))
    }

    fn delete(&self, pool: &str, volume_id: &str) -> Result<()> {
        self.pools.remove_object(pool, volume_id)
    }

    /// A reflink of the image file: an atomic copy of its bytes, made without the
    /// hypervisor that holds the image. It is what a power cut at that instant would have
    /// left: everything the guest has flushed is in it (qcow2 orders its metadata writes
    /// for that). An internal snapshot would need the image lock the hypervisor holds; an
    /// external overlay would need the hypervisor to switch to it (QMP), which is Nova's.
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
        self.attach_checked(pool, volume_id, &path, access)
    }

    fn attach_snapshot(&self, pool: &str, snapshot_name: &str) -> Result<Attachment> {
        let path = self.pools.snapshot_path(pool, snapshot_name)?;
        self.attach_checked(pool, snapshot_name, &path, Access::Stream)
    }

    fn in_use(&self, pool: &str, volume_id: &str) -> Result<Option<String>> {
        let path = self.pools.object_path(pool, volume_id)?;
        let canonical = path
            .canonicalize()
            .map_err(|e| VolumeError::io("check in-use", &path, e))?;
        if on_loop_device(&canonical).map_err(|e| VolumeError::io("check in-use", &path, e))? {
            return Ok(Some("bound to a loop device".to_string()));
        }
        // Our own writer holds QEMU's image locks, which are OFD locks that name no pid;
        // while it does, no hypervisor can hold the image.
        if self.exports.holds_writable(&canonical) {
            return Ok(None);
        }
        lock_holder(&path)
            .map(|holder| holder.map(|why| why.replace("fcntl lock", "QEMU image lock")))
            .map_err(|e| VolumeError::io("check in-use", &path, e))
    }

    fn free_space(&self, pool: &str) -> Result<Option<u64>> {
        self.pools.free_space(pool)
    }

    fn overlays(&self, pool: &str, volume_id: &str) -> Result<Vec<String>> {
        self.pools.overlays(pool, volume_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_sectors() {
        assert_eq!(round_up(0, SECTOR), 0);
        assert_eq!(round_up(1, SECTOR), 512);
        assert_eq!(round_up(512, SECTOR), 512);
        assert_eq!(round_up(513, SECTOR), 1024);
    }
}
