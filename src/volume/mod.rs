//! Volume drivers: the storage primitives of a Cinder volume backend (list, create,
//! extend, delete, snapshot, attach, in-use state). The generic backup is written once in
//! the engine against these; a driver never calls the engine or the FUSE layer.

pub mod file;
pub mod qcow2;
pub mod rbd;

use std::fs::File;
use std::path::PathBuf;
use std::time::SystemTime;

/// The name rule of DESIGN.md §1 "names" for volume IDs (and for backend, pool and target
/// names, which become directory names in the mount): 1 to 128 of `[A-Za-z0-9._-]`,
/// starting with a letter or digit. Anything else never reaches a driver or a path.
pub fn is_valid_id(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {0} not found")]
    NotFound(String),
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("pool {0} is not configured")]
    NoPool(String),
    #[error("cannot snapshot: {0}")]
    SnapshotUnsupported(String),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl VolumeError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        VolumeError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The OS error behind this failure, when there is one (ENOSPC matters to callers).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            VolumeError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, VolumeError>;

/// What a listing knows about one volume.
#[derive(Debug, Clone)]
pub struct VolumeInfo {
    pub id: String,
    pub pool: String,
    pub size: u64,
    /// Bytes really allocated on the storage.
    pub allocated: u64,
    pub mtime: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Small reads served to users: through the page cache.
    Read,
    /// One sequential pass of a copy: bypassing the page cache where the storage allows.
    Stream,
    Write,
}

/// A volume (or snapshot) attached to this node: a descriptor the node reads or writes.
/// Detaching is dropping it through [`VolumeDriver::detach`].
pub struct Attachment {
    pub file: File,
    pub path: PathBuf,
    /// Whatever keeps the attachment alive (an export process, a mapping); dropped last,
    /// on detach.
    pub keep_alive: Option<Box<dyn Send + Sync>>,
}

impl Attachment {
    pub fn plain(file: File, path: PathBuf) -> Attachment {
        Attachment {
            file,
            path,
            keep_alive: None,
        }
    }
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("path", &self.path)
            .finish()
    }
}

/// The primitives of one volume backend. Pools are named by the configuration; which of
/// them serve volumes and which hold backups is the engine's business.
pub trait VolumeDriver: Send + Sync {
    fn backend(&self) -> &str;
    fn pools(&self) -> Vec<String>;

    fn list(&self, pool: &str) -> Result<Vec<VolumeInfo>>;
    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo>;
    /// Creates an empty (all-zero, thin) volume; `Exists` if the ID is taken.
    fn create(&self, pool: &str, volume_id: &str, size: u64) -> Result<VolumeInfo>;
    /// Grows a volume; never shrinks it.
    fn extend(&self, pool: &str, volume_id: &str, size: u64) -> Result<()>;
    /// Deletes a volume; deleting one that is gone is not an error.
    fn delete(&self, pool: &str, volume_id: &str) -> Result<()>;

    /// A point-in-time copy of a volume that may be attached and read.
    fn snapshot(&self, pool: &str, volume_id: &str, snapshot_name: &str) -> Result<()>;
    /// Deleting a snapshot that is gone is not an error (recovery calls this blindly).
    fn delete_snapshot(&self, pool: &str, snapshot_name: &str) -> Result<()>;
    /// Whether `snapshot` can work in this pool; the reason when it cannot.
    fn snapshot_support(&self, pool: &str) -> std::result::Result<(), String>;

    fn attach(&self, pool: &str, volume_id: &str, access: Access) -> Result<Attachment>;
    fn attach_snapshot(&self, pool: &str, snapshot_name: &str) -> Result<Attachment>;
    fn detach(&self, attachment: Attachment) -> Result<()> {
        drop(attachment);
        Ok(())
    }

    /// `Some(reason)` when something outside backupfs uses the volume (a hypervisor, a
    /// loop device, a lock holder).
    fn in_use(&self, pool: &str, volume_id: &str) -> Result<Option<String>>;

    /// Bytes free for new data in the pool.
    fn free_space(&self, pool: &str) -> Result<u64>;

    /// Zeroes `len` bytes at `offset` of an attached volume, as holes where possible.
    fn discard(&self, attachment: &Attachment, offset: u64, len: u64) -> Result<()>;

    /// True when a write past the end of an attachment grows the volume by itself (a plain
    /// file), so writers need not call `extend` first.
    fn grows_on_write(&self) -> bool {
        false
    }

    /// Finds a volume in any of `pools`.
    fn find(&self, pools: &[String], volume_id: &str) -> Result<VolumeInfo> {
        for pool in pools {
            match self.stat(pool, volume_id) {
                Ok(info) => return Ok(info),
                Err(VolumeError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(VolumeError::NotFound(volume_id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_name_rule() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("0c1e2f3a-aaaa-bbbb-cccc-123456789abc"));
        assert!(is_valid_id("vol_1.raw"));
        assert!(is_valid_id(&"x".repeat(128)));
        assert!(!is_valid_id(&"x".repeat(129)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(".hidden"));
        assert!(!is_valid_id("-x"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("../a"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("é"));
        assert!(!is_valid_id("a\0b"));
    }
}
