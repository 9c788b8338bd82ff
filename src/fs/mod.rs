//! The FUSE layer: maps the mounted tree onto engine calls. It owns no storage logic,
//! answers slow work (attaching, detaching, zeroing, deleting, server-side copies) from a
//! bounded pool of threads and waits for jobs by callback, so the session's threads
//! always answer `ls` and `cat jobs`; a panic in a handler never takes the mount down.

mod control;
mod core;
mod errno;
mod handles;
mod inodes;
mod io;
mod listing;
mod open;
mod pool;
mod store;
pub mod tree;
mod xattrs;

use crate::engine::{Engine, EngineError};
use core::Core;
use errno::errno;
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use handles::{Handle, Limits, Table};
use inodes::Inodes;
use std::ffi::OsStr;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;
use tracing::{debug, error, info, warn};
use tree::{Modes, Node};

/// Threads for slow requests (see `pool`).
const SLOW_THREADS: usize = 8;
/// Threads for reads of images and volumes (see `pool`): as many reads in flight as the
/// session had threads before it handed them over, each with its read buffer.
const READ_THREADS: usize = 4;

/// Entries of a listing past which its release gives freed memory back to the system.
const LARGE_LISTING: usize = 10_000;

/// Returns the free memory of every malloc arena to the system (glibc keeps what its
/// threads freed: start-up reads every record, a listing of a target every id).
fn give_back_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe { libc::malloc_trim(0) };
}

/// Runs a handler; a panic is logged and the dropped reply answers EIO.
fn guard(op: &str, f: impl FnOnce()) {
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(f)) {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        error!("bug: {op} handler panicked ({what}); answered EIO");
    }
}

/// Logs a refusal once and returns its errno.
fn refuse(op: &str, e: &EngineError) -> Errno {
    let code = errno(e);
    warn!("{op} refused ({}): {e}", errno::name(code));
    code
}

pub struct BackupFs {
    core: Arc<Core>,
}

impl BackupFs {
    pub fn new(engine: Arc<Engine>) -> std::io::Result<BackupFs> {
        let gid = engine.config().admin_gid();
        let modes = Modes {
            gid: gid.unwrap_or(0),
            group_read: gid.is_some(),
        };
        let (limits, nofile) = Limits::of_process();
        info!(
            "open files of the mount capped at {} in all, {} per user other than root and {} for those users together (RLIMIT_NOFILE {nofile}); of images of qcow2 targets {} per user other than root and {} together",
            limits.total,
            limits.per_user,
            limits.users,
            limits.exporting_per_user,
            limits.exporting_users
        );
        Ok(BackupFs {
            core: Arc::new(Core {
                engine,
                inodes: Inodes::default(),
                handles: Table::new(limits),
                modes,
                mounted_at: SystemTime::now(),
                pool: pool::Pool::new("fuse-slow", SLOW_THREADS)?,
                reads: pool::Pool::new("fuse-read", READ_THREADS)?,
                stores: store::StoreQueue::new()?,
            }),
        })
    }

    /// Where the session's notifier goes once the session exists (pushing checked
    /// blocks into the kernel's cache needs it).
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.core.stores.notifier_slot()
    }

    /// Runs `f` with the shared core on a slow-request thread, guarded against panics.
    fn slow(&self, op: &'static str, f: impl FnOnce(&Arc<Core>) + Send + 'static) {
        let core = self.core.clone();
        self.core.pool.run(move || guard(op, || f(&core)));
    }
}

impl Filesystem for BackupFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for wanted in [
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_MAX_PAGES,
            // Listings hand over each entry's attributes with its name (`readdirplus`):
            // `ls -l` then asks nothing per entry. AUTO: the kernel asks for them only for
            // the first batch of a listing and once its entries are looked at, so a plain
            // `ls` costs what plain READDIR costs.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
        ] {
            if config.add_capabilities(wanted).is_err() {
                debug!("kernel lacks {wanted:?}");
            }
        }
        // No passthrough: every read of a backup must come through the daemon, which
        // checks it against its checksums.
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        // Start-up (recovery) read every record of every target, and freed them.
        self.core.pool.run(give_back_memory);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guard("lookup", || {
            let core = &self.core;
            let parent = match core.node(parent) {
                Ok(parent) => parent,
                Err(e) => return reply.error(e),
            };
            let Some(name) = name.to_str() else {
                if matches!(parent, Node::Backend(_)) {
                    warn!("lookup refused (EINVAL): {name:?} is not a valid volume id");
                    return reply.error(Errno::EINVAL);
                }
                return reply.error(Errno::ENOENT);
            };
            match tree::child(&core.engine, &parent, name) {
                Ok((node, record)) => core.reply_entry(&node, record, reply),
                Err(EngineError::Invalid(reason)) => {
                    warn!("lookup refused (EINVAL): {reason}");
                    reply.error(Errno::EINVAL)
                }
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guard("getattr", || match self.core.node(ino) {
            Ok(node) => self.core.reply_attr(&node, ino.0, reply),
            Err(e) => reply.error(e),
        })
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let pid = req.pid();
        guard("setattr", || {
            let node = match self.core.node(ino) {
                Ok(node) => node,
                Err(e) => return reply.error(e),
            };
            if mode.is_some() || uid.is_some() || gid.is_some() {
                warn!("chmod/chown refused (EPERM): modes are set by backupfs");
                return reply.error(Errno::EPERM);
            }
            // Timestamps are ours; touching them is accepted and ignored.
            let Some(size) = size else {
                return self.core.reply_attr(&node, ino.0, reply);
            };
            match &node {
                // `echo x > request` truncates first: nothing to do.
                Node::Request(_) | Node::Verify(_) | Node::Jobs(_) => {
                    self.core.reply_attr(&node, ino.0, reply)
                }
                Node::Image(..) | Node::Record(..) => {
                    warn!("truncate refused (EROFS): backups and records are read-only");
                    reply.error(Errno::EROFS)
                }
                // Zeroing a volume's tail can take long (written zeros without hole punch).
                Node::Volume(..) => self.slow("setattr", move |core| {
                    match core.set_size(&node, size, fh, pid) {
                        Ok(()) => core.reply_attr(&node, ino.0, reply),
                        Err(e) => reply.error(e),
                    }
                }),
                _ => {
                    warn!("truncate refused (EISDIR): not a file");
                    reply.error(Errno::EISDIR)
                }
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guard("readlink", || match self.core.node(ino) {
            Ok(Node::Latest(t, v)) => match self.core.engine.latest_backup(&t, &v) {
                Ok(Some(id)) => reply.data(format!("../../{id}.img").as_bytes()),
                Ok(None) => reply.error(Errno::ENOENT),
                Err(e) => reply.error(errno(&e)),
            },
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        })
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG {
            warn!("mknod {name:?} refused (EPERM): only regular files (new volumes)");
            return reply.error(Errno::EPERM);
        }
        let name = name.to_owned();
        self.slow("mknod", move |core| {
            match core.create_volume(parent, &name) {
                Ok((backend, volume_id, writer)) => {
                    drop(writer);
                    core.reply_entry(&Node::Volume(backend, volume_id), None, reply);
                }
                Err(e) => reply.error(e),
            }
        })
    }

    fn mkdir(
        &self,
        _req: &Request,
        _p: INodeNo,
        name: &OsStr,
        _m: u32,
        _u: u32,
        reply: ReplyEntry,
    ) {
        warn!("mkdir {name:?} refused (EPERM): the tree is fixed");
        reply.error(Errno::EPERM);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_string_lossy().into_owned();
        self.slow("unlink", move |core| {
            let parent = match core.node(parent) {
                Ok(parent) => parent,
                Err(e) => return reply.error(e),
            };
            match core.unlink(&parent, &name) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(refuse(&format!("rm {name}"), &e)),
            }
        })
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        warn!("rmdir {name:?} refused (EPERM): the tree is fixed");
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        warn!("symlink {name:?} refused (EPERM): the tree is fixed");
        reply.error(Errno::EPERM);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        name: &OsStr,
        reply: ReplyEntry,
    ) {
        warn!("link {name:?} refused (EPERM): names are chosen by backupfs");
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        warn!("rename of {name:?} refused (EPERM): names are chosen by backupfs");
        reply.error(Errno::EPERM);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.open_node(req, ino, flags, reply)
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.read_file(req, ino, fh, offset, size, reply)
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.write_file(req, fh, offset, data, reply)
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.flush_file(req, fh, reply)
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let handle = self.core.handles.remove(fh.0);
        if let Some(Handle::Image(_)) = handle.as_deref() {
            self.core.engine.image_closed(fh.0);
        }
        reply.ok();
        // Dropping the last handle of a volume detaches it, which may wait for a process.
        if let Some(handle) = handle {
            self.core.pool.run(move || drop(handle));
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync_file(fh, reply)
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let uid = req.uid();
        guard("opendir", || {
            let core = &self.core;
            let node = match core.node(ino) {
                Ok(node) => node,
                Err(e) => return reply.error(e),
            };
            let slot = match core.reserve(uid, false, || format!("{node:?}")) {
                Ok(slot) => slot,
                Err(e) => return reply.error(e),
            };
            match tree::children(&core.engine, &node) {
                Ok(entries) => {
                    let fh = core.open_handle(slot, Handle::Dir(entries));
                    reply.opened(fh, FopenFlags::empty());
                }
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        guard("readdir", || {
            let handle = match self.core.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            let Handle::Dir(entries) = handle.as_ref() else {
                return reply.error(Errno::ENOTDIR);
            };
            // Plain readdir gives the kernel no reference: it looks names up before use.
            for i in offset as usize..entries.len() {
                let Some((node, name)) = entries.get(i) else {
                    break;
                };
                if reply.add(INodeNo(node.ino()), i as u64 + 1, node.kind(), name) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.list_plus(fh, offset, reply)
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let handle = self.core.handles.remove(fh.0);
        reply.ok();
        // A listing of many backups left megabytes free in this thread's malloc arena,
        // which glibc keeps: given back (issue 28).
        if let Some(Handle::Dir(listing)) = handle.as_deref()
            && listing.len() > LARGE_LISTING
        {
            drop(handle);
            self.core.pool.run(give_back_memory);
        }
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Every change backupfs makes to its catalogue is durable before it answers.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let (name, value) = (name.to_string_lossy().into_owned(), value.to_vec());
        self.slow("setxattr", move |core| {
            match core.set_xattr(ino, &name, Some(value), flags) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = name.to_string_lossy().into_owned();
        self.slow("removexattr", move |core| {
            match core.set_xattr(ino, &name, None, 0) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            }
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.get_xattr(ino, name, size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.list_xattrs(ino, size, reply)
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.create_file(req, parent, name, reply)
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // Shells probe every descriptor for a terminal (TCGETS): not one.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.fallocate_volume(req, fh, offset, length, mode, reply)
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.seek_file(fh, offset, whence, reply)
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        self.copy_range(req, (fh_in, offset_in), (fh_out, offset_out), len, reply)
    }
}
