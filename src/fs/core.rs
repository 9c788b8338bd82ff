//! What every FUSE handler shares (the engine, the inode and handle tables, the slow
//! pool) and the work behind the handlers that is more than a dispatch: attributes,
//! opening volumes, truncates, creating volumes, unlink, attributes of images. It turns
//! engine errors into errnos through `errno` only, and never touches storage itself.

use super::errno::errno;
use super::handles::{Attached, Handle, Slot, Table, VolumeHandle};
use super::inodes::Inodes;
use super::tree::{self, Modes, Node};
use super::xattrs::XATTR_PREFIX;
use super::{pool, refuse};
use crate::engine::{Engine, EngineError};
use crate::ids::{BackupId, VolumeId};
use crate::targets::record::Record;
use fuser::{
    Errno, FileAttr, FileHandle, FopenFlags, Generation, INodeNo, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyEntry, ReplyOpen,
};
use std::ffi::OsStr;
use std::sync::Arc;
use std::time::SystemTime;
use tracing::warn;

/// What every handler shares; slow work takes a clone of it to another thread.
pub(crate) struct Core {
    pub(super) engine: Arc<Engine>,
    pub(super) inodes: Inodes,
    pub(super) handles: Table,
    pub(super) modes: Modes,
    pub(super) mounted_at: SystemTime,
    pub(super) pool: pool::Pool,
    /// Reads of images and volumes (they wait on storage).
    pub(super) reads: pool::Pool,
    pub(super) stores: super::store::StoreQueue,
}

impl Core {
    pub(super) fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.inodes.get(ino.0).ok_or(Errno::ENOENT)
    }

    pub(super) fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.get(fh.0).ok_or(Errno::EBADF)
    }

    /// Whether opening `node` starts (or shares) a qcow2 export: an image of a target
    /// kept on a `qcow2` backend.
    pub(super) fn holds_export(&self, node: &Node) -> bool {
        let Node::Image(target, _) = node else {
            return false;
        };
        let config = self.engine.config();
        config
            .targets
            .get(target)
            .and_then(|t| t.pool_target())
            .and_then(|t| config.backends.get(&t.backend))
            .is_some_and(|b| b.driver.holds_export())
    }

    /// Room for one more open file of `uid` (holding a qcow2 export if `exporting`), or
    /// EMFILE (logged) past the caps.
    pub(super) fn reserve(
        &self,
        uid: u32,
        exporting: bool,
        what: impl FnOnce() -> String,
    ) -> Result<Slot, Errno> {
        self.handles.reserve(uid, exporting).map_err(|e| {
            let code = super::errno::limit(&e);
            let what = what();
            warn!("open of {what} refused ({}): {e}", super::errno::name(code));
            code
        })
    }

    pub(super) fn open_handle(&self, slot: Slot, handle: Handle) -> FileHandle {
        FileHandle(self.handles.insert(slot, handle))
    }

    /// Opens a handle and runs `noted` with its number before any request can use it.
    pub(super) fn open_handle_with(
        &self,
        slot: Slot,
        handle: Handle,
        noted: impl FnOnce(u64, &Handle),
    ) -> FileHandle {
        FileHandle(self.handles.insert_with(slot, handle, noted))
    }

    pub(super) fn attr(&self, node: &Node, ino: u64) -> Result<FileAttr, EngineError> {
        self.attr_with(node, ino, None).map(|(attr, _)| attr)
    }

    /// The attributes of `node` and how long the kernel may keep them, from `record`
    /// when the caller has just read the node's record (a lookup, a directory listing),
    /// else from a fresh read.
    pub(super) fn attr_with(
        &self,
        node: &Node,
        ino: u64,
        record: Option<Record>,
    ) -> Result<(FileAttr, std::time::Duration), EngineError> {
        let mut ttl = tree::ttl(node);
        let (size, blocks, mtime) = match node {
            Node::Image(t, id) => {
                let record = match record {
                    Some(record) => record,
                    None => self.engine.record(t, id)?,
                };
                let allocated = self.engine.image_allocated(t, id)?;
                (record.size, allocated / 512, record.completed_time())
            }
            Node::Record(t, id) => {
                let record = match record {
                    Some(record) => record,
                    None => self.engine.record(t, id)?,
                };
                ttl = tree::record_ttl(&record);
                let size = tree::record_json(&record).len() as u64;
                (size, 0, record.completed_time())
            }
            Node::Volume(b, v) => {
                let info = self.engine.volume(b, v)?;
                (info.size, info.allocated / 512, info.mtime)
            }
            Node::Latest(t, v) => {
                let id = self
                    .engine
                    .latest_backup(t, v)?
                    .ok_or_else(|| EngineError::NotFound(format!("no backup of {v}")))?;
                (format!("../../{id}.img").len() as u64, 0, self.mounted_at)
            }
            _ => (0, 0, self.mounted_at),
        };
        Ok((tree::attr(node, ino, &self.modes, size, blocks, mtime), ttl))
    }

    pub(super) fn reply_attr(&self, node: &Node, ino: u64, reply: ReplyAttr) {
        match self.attr_with(node, ino, None) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Answers a lookup of `node` (`record`: its record, if the lookup read it): the
    /// kernel takes a reference to it.
    pub(super) fn reply_entry(&self, node: &Node, record: Option<Record>, reply: ReplyEntry) {
        match self.attr_with(node, 0, record) {
            Ok((mut attr, ttl)) => {
                attr.ino = INodeNo(self.inodes.lookup(node));
                reply.entry_with_ttls(&ttl, &tree::entry_ttl(node, ttl), &attr, Generation(0));
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    pub(super) fn open_volume(
        &self,
        backend: &str,
        volume_id: &VolumeId,
        flags: OpenFlags,
        opener: u32,
        slot: Slot,
        reply: ReplyOpen,
    ) {
        let result = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => self
                .engine
                .open_volume_read(backend, volume_id)
                .map(|attachment| Attached::Read(Arc::new(attachment))),
            _ => self
                .engine
                .open_restore(backend, volume_id, flags.0 & libc::O_TRUNC != 0)
                .map(Attached::Write),
        };
        match result {
            Ok(attached) => {
                if let Attached::Write(writer) = &attached {
                    writer.took_part(opener);
                }
                let fh = self.open_handle(
                    slot,
                    Handle::Volume(VolumeHandle::new(backend, volume_id, attached, opener)),
                );
                // Volumes change behind our back (a hypervisor may write them): no caching.
                reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
            }
            Err(e) => reply.error(refuse(&format!("open of volume {backend}/{volume_id}"), &e)),
        }
    }

    pub(super) fn set_size(
        &self,
        node: &Node,
        size: u64,
        fh: Option<FileHandle>,
        thread: u32,
    ) -> Result<(), Errno> {
        let Node::Volume(b, v) = node else {
            return Ok(());
        };
        let open = fh.and_then(|fh| self.handle(fh).ok());
        let result = match open.as_deref() {
            Some(Handle::Volume(volume)) if volume.writable => {
                volume.writer(&self.engine).and_then(|writer| {
                    writer.took_part(thread);
                    writer.set_size(size)
                })
            }
            // A truncate by path (`truncate -s`): a restore of its own, for the moment.
            _ => self.engine.open_restore(b, v, false).and_then(|writer| {
                writer.took_part(thread);
                writer.set_size(size)
            }),
        };
        result.map_err(|e| refuse(&format!("truncate of volume {b}/{v}"), &e))
    }

    /// A new volume under `volumes/<backend>/`: (backend, volume id, its writer).
    pub(super) fn create_volume(
        &self,
        parent: INodeNo,
        name: &OsStr,
    ) -> Result<(String, VolumeId, Arc<crate::engine::VolumeWriter>), Errno> {
        let parent = self.node(parent)?;
        let Node::Backend(backend) = parent else {
            warn!(
                "create {name:?} refused (EPERM): files are created only under volumes/<backend>/"
            );
            return Err(Errno::EPERM);
        };
        let Some(volume_id) = name.to_str().and_then(|n| VolumeId::parse(n).ok()) else {
            warn!("create {name:?} refused (EINVAL): not a valid volume id");
            return Err(Errno::EINVAL);
        };
        let writer = self
            .engine
            .create_volume(&backend, &volume_id)
            .map_err(|e| refuse(&format!("create of volume {backend}/{volume_id}"), &e))?;
        Ok((backend, volume_id, writer))
    }

    pub(super) fn unlink(&self, parent: &Node, name: &str) -> Result<(), EngineError> {
        match parent {
            Node::Target(t) => {
                let (stem, image) = match (name.strip_suffix(".img"), name.strip_suffix(".json")) {
                    (Some(stem), _) => (stem, true),
                    (None, Some(stem)) => (stem, false),
                    (None, None) => {
                        return Err(EngineError::NotPermitted(format!(
                            "{name} cannot be removed"
                        )));
                    }
                };
                let id = BackupId::parse(stem).map_err(|e| EngineError::Invalid(e.to_string()))?;
                let result = if image {
                    self.engine.delete_backup(t, &id)
                } else {
                    self.engine.delete_record(t, &id)
                };
                // The kernel drops the name removed; the record's, when an image goes,
                // is checked at its next stat (which then fails).
                self.record_changed(t, &id);
                result
            }
            Node::Backend(b) => Err(EngineError::NotPermitted(format!(
                "volumes are never deleted through backupfs ({b}/{name})"
            ))),
            _ => Err(EngineError::NotPermitted(format!(
                "{name} cannot be removed"
            ))),
        }
    }
}

impl Core {
    /// The record of backup `id` in target `t` changed (an attribute set, its job ended,
    /// the backup deleted): the kernel forgets the record's attributes it keeps
    /// ([`tree::record_ttl`]), so the next `stat` asks. Does not wait for anything.
    pub(super) fn record_changed(&self, t: &str, id: &BackupId) {
        let Some(notifier) = self.stores.notifier() else {
            return;
        };
        let ino = Node::Record(t.to_string(), id.clone()).ino();
        // ENOENT: the kernel holds nothing of it.
        let _ = notifier.inval_inode(INodeNo(ino), -1, 0);
    }

    /// Sets (or with None removes) an operator's extended attribute of a backup image;
    /// the `user.backupfs.*` ones are the record's own and read-only.
    pub(super) fn set_xattr(
        &self,
        ino: INodeNo,
        name: &str,
        value: Option<Vec<u8>>,
        flags: i32,
    ) -> Result<(), Errno> {
        let Ok(Node::Image(t, id)) = self.node(ino) else {
            warn!("setxattr {name} refused (EOPNOTSUPP): only backup images carry attributes");
            return Err(Errno::from_i32(libc::EOPNOTSUPP));
        };
        if name.starts_with(XATTR_PREFIX) {
            warn!("setxattr {name} refused (EPERM): the record's own fields are read-only");
            return Err(Errno::EPERM);
        }
        if !name.starts_with("user.") {
            warn!("setxattr {name} refused (EOPNOTSUPP): only user.* attributes");
            return Err(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let value = match value {
            Some(bytes) => Some(String::from_utf8(bytes).map_err(|_| {
                warn!("setxattr {name} refused (EINVAL): values are UTF-8 text");
                Errno::EINVAL
            })?),
            None => None,
        };
        let mode = match flags {
            0 => crate::engine::XattrMode::Any,
            libc::XATTR_CREATE => crate::engine::XattrMode::Create,
            libc::XATTR_REPLACE => crate::engine::XattrMode::Replace,
            _ => return Err(Errno::EINVAL),
        };
        let result = self
            .engine
            .set_xattr(&t, &id, name, value, mode)
            .map_err(|e| refuse(&format!("setxattr {name} of {id}"), &e));
        self.record_changed(&t, &id);
        result
    }
}

/// Whether `process` holds a descriptor of the volume's node of this mount (its path ends
/// as the node's and its inode number is the node's), as /proc shows it now. readlink and
/// fdinfo never send a request to the mount.
pub(super) fn holds_volume_open(process: u32, backend: &str, volume_id: &VolumeId) -> bool {
    let ino = Node::Volume(backend.to_string(), volume_id.clone()).ino();
    let suffix = format!("/volumes/{backend}/{volume_id}");
    let Ok(fds) = std::fs::read_dir(format!("/proc/{process}/fd")) else {
        return false; // Gone, or exiting: its descriptors are being closed.
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|path| path.to_string_lossy().ends_with(&suffix))
            && std::fs::read_to_string(format!(
                "/proc/{process}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .is_ok_and(|info| {
                info.lines()
                    .filter_map(|line| line.strip_prefix("ino:"))
                    .any(|n| n.trim().parse() == Ok(ino))
            })
    })
}
