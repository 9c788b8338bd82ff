//! The `qcow2` driver: a volume is the qcow2 image `volume-<id>` in a pool directory,
//! made and grown with `qemu-img`; attaching gives its guest-visible raw contents through
//! a `qemu-storage-daemon` FUSE export. Snapshots are reflinks of the image file.
//! It never reads or writes qcow2 structures itself beyond the header's size field.

mod export;

use super::device::FileDevice;
use super::file::{lock_holder, on_loop_device};
use super::pools::{PoolDirs, object_file_name};
use super::{Access, Attachment, Capabilities, Result, VolumeDriver, VolumeError, VolumeInfo};
use export::{Exports, Mode};
use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const QEMU_IMG: &str = "qemu-img";
/// qcow2 sizes are whole sectors.
const SECTOR: u64 = 512;
/// The largest qcow2 cluster: a range aligned to it is aligned to whole clusters of any
/// image, which is what a qsd export can punch as holes.
const MAX_CLUSTER: u64 = 2 << 20;

/// The guest-visible size from a qcow2 header (version 2 or 3: magic, version, backing
/// file offset and length, cluster bits, then the size, all big-endian). None when
/// `header` (at least its first 32 bytes) is not a qcow2 header.
pub fn virtual_size(header: &[u8]) -> Option<u64> {
    let field = |at: usize, len: usize| header.get(at..at + len);
    if field(0, 4)? != b"QFI\xfb" {
        return None;
    }
    let version = u32::from_be_bytes(field(4, 4)?.try_into().ok()?);
    if !(2..=3).contains(&version) {
        return None;
    }
    Some(u64::from_be_bytes(field(24, 8)?.try_into().ok()?))
}

pub struct Qcow2Driver {
    pools: PoolDirs,
    exports: Arc<Exports>,
    next_temp: AtomicU64,
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
            next_temp: AtomicU64::new(0),
        })
    }

    /// What a listing shows of one image; `NotFound` when it is not a qcow2 image.
    fn info(pool: &str, volume_id: &str, path: &Path) -> Result<VolumeInfo> {
        let not_found = || VolumeError::NotFound(volume_id.to_string());
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => not_found(),
            _ => VolumeError::io("stat", path, e),
        })?;
        let meta = file
            .metadata()
            .map_err(|e| VolumeError::io("stat", path, e))?;
        if !meta.is_file() {
            return Err(not_found());
        }
        let mut header = [0u8; 32];
        let size = match file.read_exact_at(&mut header, 0) {
            Ok(()) => virtual_size(&header),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
            Err(e) => return Err(VolumeError::io("read qcow2 header", path, e)),
        };
        // A qcow2 pool holds qcow2 images only: probing another format would let a guest
        // that wrote a qcow2 header into a raw volume choose what we open.
        let size = size.ok_or_else(|| {
            tracing::debug!("{} is not a qcow2 image: not a volume", path.display());
            not_found()
        })?;
        Ok(VolumeInfo {
            id: volume_id.to_string(),
            pool: pool.to_string(),
            size,
            allocated: meta.blocks() * 512,
            mtime: meta.modified().unwrap_or(std::time::UNIX_EPOCH),
        })
    }

    /// Exports an image (a volume or a snapshot) and opens its raw view.
    fn attach_image(&self, image: &Path, volume_id: &str, access: Access) -> Result<Attachment> {
        let image = image.canonicalize().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VolumeError::NotFound(volume_id.to_string()),
            _ => VolumeError::io("attach", image, e),
        })?;
        let mode = Mode {
            writable: access == Access::Write,
            direct: access == Access::Stream && takes_o_direct(&image),
        };
        let export = self
            .exports
            .get(&image, mode)
            .map_err(|e| VolumeError::io("attach", &image, e))?;
        let file = open_export(&export.mountpoint, access)
            .map_err(|e| VolumeError::io("attach", &export.mountpoint, e))?;
        Ok(Attachment {
            device: Box::new(FileDevice::exported(file, &export.mountpoint, MAX_CLUSTER)),
            keep_alive: Some(Box::new(export)),
        })
    }
}

/// Runs `qemu-img <args>`; its error output becomes the error.
fn qemu_img(op: &'static str, path: &Path, args: &[&OsStr]) -> Result<()> {
    let output = Command::new(QEMU_IMG)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| VolumeError::io(op, path, e))?;
    if !output.status.success() {
        return Err(VolumeError::io(
            op,
            path,
            std::io::Error::other(format!(
                "{QEMU_IMG} {}: {}",
                args.first()
                    .map(|a| a.to_string_lossy())
                    .unwrap_or_default(),
                String::from_utf8_lossy(&output.stderr).trim()
            )),
        ));
    }
    Ok(())
}

fn round_up(size: u64, to: u64) -> u64 {
    size.div_ceil(to) * to
}

/// Whether qsd can read this image with O_DIRECT (not on tmpfs, for one).
fn takes_o_direct(image: &Path) -> bool {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(image)
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
    fn list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let mut volumes = Vec::new();
        for (id, path) in self.pools.list(pool)? {
            // Gone since readdir, or not a qcow2 image: not listed.
            match Self::info(pool, &id, &path) {
                Ok(info) => volumes.push(info),
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(volumes)
    }

    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo> {
        let path = self.pools.object_path(pool, volume_id)?;
        Self::info(pool, volume_id, &path)
    }

    fn create(&self, pool: &str, volume_id: &str, size: u64) -> Result<VolumeInfo> {
        let path = self.pools.object_path(pool, volume_id)?;
        // qemu-img create overwrites: the image is made under a hidden name and linked into
        // place, which fails rather than replace a volume that exists.
        let temp = self.pools.dir(pool)?.join(format!(
            ".{}.creating-{}-{}",
            object_file_name(self.pools.role(pool)?, volume_id),
            std::process::id(),
            self.next_temp.fetch_add(1, Ordering::Relaxed)
        ));
        let size_arg = round_up(size, SECTOR).to_string();
        let made = qemu_img(
            "create",
            &path,
            &[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                temp.as_os_str(),
                size_arg.as_ref(),
            ],
        )
        .and_then(|()| {
            std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| VolumeError::io("create", &temp, e))?;
            std::fs::hard_link(&temp, &path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    VolumeError::Exists(volume_id.to_string())
                } else {
                    VolumeError::io("create", &path, e)
                }
            })
        });
        let _ = std::fs::remove_file(&temp);
        made?;
        Self::info(pool, volume_id, &path)
    }

    fn grow(&self, pool: &str, volume_id: &str, size: u64) -> Result<()> {
        let path = self.pools.object_path(pool, volume_id)?;
        let current = Self::info(pool, volume_id, &path)?.size;
        let size = round_up(size, SECTOR);
        if size <= current {
            return Ok(());
        }
        let image = path
            .canonicalize()
            .map_err(|e| VolumeError::io("extend", &path, e))?;
        // While we write into the volume our qsd holds it (and its locks, and its idea of
        // the size): it must do the resize, through its export.
        if let Some(export) = self.exports.writable(&image) {
            let view = OpenOptions::new()
                .write(true)
                .open(&export.mountpoint)
                .map_err(|e| VolumeError::io("extend", &export.mountpoint, e))?;
            return view
                .set_len(size)
                .map_err(|e| VolumeError::io("extend", &path, e));
        }
        let size_arg = size.to_string();
        qemu_img(
            "extend",
            &path,
            &[
                "resize".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                path.as_os_str(),
                size_arg.as_ref(),
            ],
        )
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
        // Only what a listing shows is exported (a qcow2 image, never a probed format).
        Self::info(pool, volume_id, &path)?;
        self.attach_image(&path, volume_id, access)
    }

    fn attach_snapshot(&self, pool: &str, snapshot_name: &str) -> Result<Attachment> {
        let path = self.pools.snapshot_path(pool, snapshot_name)?;
        Self::info(pool, snapshot_name, &path)?;
        self.attach_image(&path, snapshot_name, Access::Stream)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, size: u64) -> Vec<u8> {
        let mut h = b"QFI\xfb".to_vec();
        h.extend(version.to_be_bytes());
        h.extend([0u8; 12]);
        h.extend(16u32.to_be_bytes());
        h.extend(size.to_be_bytes());
        h
    }

    #[test]
    fn the_size_comes_from_a_qcow2_header_only() {
        assert_eq!(virtual_size(&header(3, 1 << 30)), Some(1 << 30));
        assert_eq!(virtual_size(&header(2, 512)), Some(512));
        assert_eq!(virtual_size(&header(4, 512)), None);
        assert_eq!(virtual_size(&header(3, 512)[..31]), None);
        let mut raw = header(3, 512);
        raw[0] = b'X';
        assert_eq!(virtual_size(&raw), None);
        assert_eq!(virtual_size(&[]), None);
    }

    #[test]
    fn sizes_round_up_to_sectors() {
        assert_eq!(round_up(0, SECTOR), 0);
        assert_eq!(round_up(1, SECTOR), 512);
        assert_eq!(round_up(512, SECTOR), 512);
        assert_eq!(round_up(513, SECTOR), 1024);
    }
}
