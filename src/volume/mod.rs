//! Volume drivers: the storage primitives of a Cinder volume backend (list, create,
//! grow, delete, snapshot, attach, in-use state) and the block devices their attachments
//! give. The generic backup is written once in the engine against these; a driver never
//! calls the engine or the FUSE layer.

pub mod block;
pub mod device;
pub mod dir;
pub mod fiemap;
pub mod file;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod pools;
pub mod qcow2;
pub mod rbd;
pub mod snapnames;

use device::BlockDevice;
use std::path::PathBuf;
use std::time::SystemTime;

pub use crate::ids::is_valid_id;

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
    /// Something outside backupfs holds the volume (a lock, a loop device).
    #[error("{0}")]
    Busy(String),
    /// An image backupfs will not hand to its tools: what it holds could make them open
    /// another file of the host (a qcow2 header naming one, say).
    #[error("{0}")]
    Refused(String),
    /// A snapshot name that is not of a form backupfs makes (`snapnames`): never removed.
    #[error("snapshot {0:?} is not of a form backupfs makes")]
    NotOurSnapshot(String),
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

/// A volume (or snapshot, or backup) attached to this node: the device the node reads
/// or writes, and whatever keeps it attached. Detaching is dropping it (through
/// [`VolumeDriver::detach`]): the device goes first, then what kept it alive.
pub struct Attachment {
    pub device: Box<dyn BlockDevice>,
    /// An export process, an open image: dropped last.
    pub keep_alive: Option<Box<dyn Send + Sync>>,
}

impl Attachment {
    pub fn new(device: impl BlockDevice + 'static) -> Attachment {
        Attachment {
            device: Box::new(device),
            keep_alive: None,
        }
    }
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("device", &self.device.describe())
            .finish()
    }
}

/// What a driver can do in a pool, asked for explicitly rather than assumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Whether `snapshot` works here; the reason when it cannot.
    pub snapshots: std::result::Result<(), String>,
    /// Whether `clone_volume` can make a volume that shares its data with another here
    /// (reflinks, RBD clones): what lets an incremental backup store only what changed.
    pub shares_data: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            snapshots: Err("this driver makes no snapshots".to_string()),
            shares_data: false,
        }
    }
}

/// The primitives of one volume backend (ten, and a few provided on top). Pools are named
/// by the configuration; which of them serve volumes and which hold backups is the
/// configuration's (the driver names objects by its pools' roles). The generic backup is
/// written once, in the engine, against these.
pub trait VolumeDriver: Send + Sync {
    fn list(&self, pool: &str) -> Result<Vec<VolumeInfo>>;
    /// The ids [`VolumeDriver::list`] would give, where the driver can tell them without
    /// looking at each volume (a pool of 100,000 backups: issue 28).
    fn list_ids(&self, pool: &str) -> Result<Vec<String>> {
        Ok(self.list(pool)?.into_iter().map(|v| v.id).collect())
    }
    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo>;
    /// Creates an empty (all-zero, thin) volume; `Exists` if the ID is taken.
    fn create(&self, pool: &str, volume_id: &str, size: u64) -> Result<VolumeInfo>;
    /// Grows a volume that is not attached; never shrinks it.
    fn grow(&self, pool: &str, volume_id: &str, size: u64) -> Result<()>;
    /// Deletes a volume; deleting one that is gone is not an error.
    fn delete(&self, pool: &str, volume_id: &str) -> Result<()>;
    /// A point-in-time copy of a volume that may be attached and read.
    fn snapshot(&self, pool: &str, volume_id: &str, snapshot_name: &str) -> Result<()>;
    /// Deletes snapshot `snapshot_name` of volume `volume_id` (the volume a record names),
    /// and only a name of a form backupfs makes (`NotOurSnapshot` otherwise: names come
    /// from records, which others may write). Deleting a snapshot that is gone, or one of
    /// a volume that is gone, is not an error (recovery calls this blindly).
    fn delete_snapshot(&self, pool: &str, volume_id: &str, snapshot_name: &str) -> Result<()>;
    /// Attaches a volume. For `Access::Write` the driver holds the volume the way a
    /// hypervisor would see it (a lock), and fails with `Busy` if something else uses it.
    fn attach(&self, pool: &str, volume_id: &str, access: Access) -> Result<Attachment>;
    fn attach_snapshot(&self, pool: &str, snapshot_name: &str) -> Result<Attachment>;
    /// `Some(reason)` when something outside backupfs uses the volume (a hypervisor, a
    /// loop device, a lock holder).
    fn in_use(&self, pool: &str, volume_id: &str) -> Result<Option<String>>;

    fn capabilities(&self, _pool: &str) -> Capabilities {
        Capabilities::default()
    }

    /// The name of the snapshot backup `backup_id` takes of a volume (kept in its record,
    /// which is what later calls name it by); always one `snapnames::is_ours` accepts.
    fn snapshot_name(&self, backup_id: &str) -> String {
        snapnames::legacy(backup_id)
    }

    /// The parts of `range` that may differ between two snapshots of one volume (`from`
    /// taken before `to`), from the storage's own bookkeeping (extent maps, object maps);
    /// None when the driver cannot tell, and the caller reads everything and compares
    /// checksums. It must never leave out a changed byte: when in doubt, a range is
    /// changed. A snapshot that is gone is `NotFound`.
    fn changed_extents(
        &self,
        _pool: &str,
        _from: &str,
        _to: &str,
        _range: std::ops::Range<u64>,
    ) -> Result<Option<Vec<std::ops::Range<u64>>>> {
        Ok(None)
    }

    /// A new volume `new_id` that reads exactly as `source_id` and shares its data
    /// (a reflink, a clone); None where this pool cannot share data.
    fn clone_volume(
        &self,
        _pool: &str,
        _source_id: &str,
        _new_id: &str,
    ) -> Result<Option<VolumeInfo>> {
        Ok(None)
    }

    /// When the volume was made, where the storage keeps that; None when it does not. A
    /// volume made after a backup of its ID began is another volume (deleted and made
    /// again): that backup is no parent of its next one.
    fn created(&self, _pool: &str, _volume_id: &str) -> Result<Option<SystemTime>> {
        Ok(None)
    }

    /// Bytes free for new data in the pool; None when the storage cannot tell.
    fn free_space(&self, _pool: &str) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Files beside the volume that hold newer data than it: Cinder's RemoteFS snapshot
    /// overlays `volume-<id>.<snapshot-id>`, which take the volume's writes once a Cinder
    /// snapshot exists. A backup reads `volume-<id>` only, which then holds the data as
    /// it was when the first snapshot was taken.
    fn overlays(&self, _pool: &str, _volume_id: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// A note kept with a volume on its storage (`key` = "restore": a restore in progress,
    /// or one that left the volume incomplete), so that it outlives the daemon; None
    /// removes it. Storage that cannot keep notes ignores them.
    fn set_note(
        &self,
        _pool: &str,
        _volume_id: &str,
        _key: &str,
        _value: Option<&str>,
    ) -> Result<()> {
        Ok(())
    }

    /// The note `key` of a volume, if any.
    fn note(&self, _pool: &str, _volume_id: &str, _key: &str) -> Result<Option<String>> {
        Ok(None)
    }

    fn detach(&self, attachment: Attachment) -> Result<()> {
        drop(attachment);
        Ok(())
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
