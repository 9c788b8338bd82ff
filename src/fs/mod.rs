//! The FUSE layer: maps the mounted tree onto engine calls. It owns no storage logic,
//! answers slow work (attaching, detaching, zeroing, deleting, server-side copies) from a
//! bounded pool of threads and waits for jobs by callback, so the session's threads
//! always answer `ls` and `cat jobs`; a panic in a handler never takes the mount down.

mod control;
mod core;
mod errno;
mod handles;
mod inodes;
mod pool;
mod store;
pub mod tree;

use crate::engine::image::CheckedImage;
use crate::engine::{Engine, EngineError};
use crate::volume::device::{AlignedBuf, BlockDevice};
use control::{Control, ControlFile};
use core::Core;
use errno::errno;
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen,
    ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use handles::{Attached, Handle, Limits, Table, VolumeHandle, process_of};
use inodes::Inodes;
use std::ffi::OsStr;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;
use tracing::{debug, error, info, warn};
use tree::{Modes, Node};

/// Largest piece of a server-side copy answered at once (the reply counts in u32).
const COPY_RANGE_MAX: u64 = 1 << 30;
const XATTR_PREFIX: &str = "user.backupfs.";
/// A volume's note about restores: "incomplete: <reason> (<time>)".
const VOLUME_RESTORE_XATTR: &str = "user.backupfs.restore";
/// Threads for slow requests (see `pool`).
const SLOW_THREADS: usize = 8;

/// An image read's buffer (a request is at most 1 MiB): one transparent huge page.
const READ_BUFFER_LEN: usize = 2 << 20;

thread_local! {
    /// The buffer image reads are served from, one per session thread.
    static READ_BUFFER: std::cell::RefCell<Option<AlignedBuf>> =
        const { std::cell::RefCell::new(None) };
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
                pool: pool::Pool::new(SLOW_THREADS)?,
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
            Ok(Node::Latest(t, v)) => match self.core.engine.records(&t) {
                Ok(records) => match tree::latest_backup(&records, &v) {
                    Some(id) => reply.data(format!("../../{id}.img").as_bytes()),
                    None => reply.error(Errno::ENOENT),
                },
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
        let (pid, uid) = (req.pid(), req.uid());
        guard("open", || {
            let core = &self.core;
            let node = match core.node(ino) {
                Ok(node) => node,
                Err(e) => return reply.error(e),
            };
            // Before any work: an open past the caps must not attach a volume first.
            let exporting = core.holds_export(&node);
            let slot = match core.reserve(uid, exporting, || format!("{node:?}")) {
                Ok(slot) => slot,
                Err(e) => return reply.error(e),
            };
            let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
            match &node {
                Node::Request(t) | Node::Verify(t) => {
                    let kind = if matches!(node, Node::Request(_)) {
                        Control::Request
                    } else {
                        Control::Verify
                    };
                    let fh = core.open_handle(slot, Handle::Control(ControlFile::new(kind, t)));
                    reply.opened(
                        fh,
                        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
                    );
                }
                Node::Jobs(_) | Node::Record(..) | Node::Restores | Node::MetricsFile
                    if writing =>
                {
                    warn!("write to a status file refused (EACCES)");
                    reply.error(Errno::EACCES)
                }
                Node::Restores => {
                    let mut text = String::new();
                    for restore in core.engine.restores() {
                        text.push_str(&restore.line());
                        text.push('\n');
                    }
                    let fh = core.open_handle(slot, Handle::Text(text.into_bytes()));
                    reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
                }
                // Reads every record of every target, at each scrape.
                Node::MetricsFile => self.slow("open", move |core| {
                    let text = core.engine.metrics().into_bytes();
                    let fh = core.open_handle(slot, Handle::Text(text));
                    reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
                }),
                Node::Jobs(t) => {
                    let mut text = String::new();
                    for job in core.engine.jobs(Some(t)) {
                        text.push_str(&job.line());
                        text.push('\n');
                    }
                    let fh = core.open_handle(slot, Handle::Text(text.into_bytes()));
                    reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
                }
                Node::Record(t, id) => match core.engine.record(t, id) {
                    Ok(record) => {
                        let fh = core.open_handle(slot, Handle::Text(tree::record_json(&record)));
                        reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
                    }
                    Err(e) => reply.error(errno(&e)),
                },
                Node::Image(..) if writing => {
                    warn!("write to a backup image refused (EROFS)");
                    reply.error(Errno::EROFS)
                }
                // Reads the checksums (megabytes for a large backup).
                Node::Image(t, id) => {
                    let (t, id) = (t.clone(), id.clone());
                    self.slow("open", move |core| match core.engine.open_image(&t, &id) {
                        Ok(image) => {
                            let fh =
                                core.open_handle_with(slot, Handle::Image(image), |fh, handle| {
                                    // A restore this process feeds is judged by this image.
                                    if let Handle::Image(image) = handle {
                                        core.engine.image_opened(fh, image, pid);
                                    }
                                });
                            // Images never change: pages the daemon checked may stay cached.
                            reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE);
                        }
                        Err(e) => reply.error(errno(&e)),
                    })
                }
                // Attaching can take long (a qcow2 export starts a process).
                Node::Volume(b, v) => {
                    let (b, v) = (b.clone(), v.clone());
                    self.slow("open", move |core| {
                        core.open_volume(&b, &v, flags, process_of(pid), slot, reply)
                    })
                }
                _ => reply.error(Errno::EISDIR),
            }
        })
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
        guard("read", || {
            let core = &self.core;
            let handle = match core.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            match handle.as_ref() {
                Handle::Control(control) => reply.data(&control.read(offset, size)),
                Handle::Text(bytes) => {
                    let start = (offset as usize).min(bytes.len());
                    let end = start.saturating_add(size as usize).min(bytes.len());
                    reply.data(&bytes[start..end])
                }
                Handle::Dir(_) => reply.error(Errno::EISDIR),
                Handle::Image(image) => READ_BUFFER.with(|cell| {
                    let mut slot = cell.borrow_mut();
                    // One aligned buffer per session thread: the backing file may be read
                    // with O_DIRECT, and the buffer is not zeroed for every request. One
                    // huge page: the O_DIRECT read into it is a few segments, and the
                    // kernel pins it once per reply instead of per 4 KiB page (cold cat
                    // 1.0 s instead of 1.5 s for 1 GiB, a restore's daemon CPU -25 %;
                    // contrib/bench/README.md, issue 28). The four threads keep 8 MiB.
                    if slot.as_ref().is_none_or(|b| b.len() < size as usize) {
                        *slot = AlignedBuf::new((size as usize).max(READ_BUFFER_LEN)).ok();
                    }
                    let Some(buf) = slot.as_mut() else {
                        return reply.error(Errno::ENOMEM);
                    };
                    let buf = &mut buf[..size as usize];
                    let mut checked = Vec::new();
                    match image.read_at_with(buf, offset, &mut |at, data| checked.push((at, data)))
                    {
                        Ok(n) => reply.data(&buf[..n]),
                        Err(e) => {
                            // Before the answer: the restore this reader feeds (ending once
                            // it gives up) must find it.
                            core.engine.image_read_failed(fh.0, req.pid(), &e);
                            return reply
                                .error(refuse(&format!("read of backup {}", image.backup_id), &e));
                        }
                    }
                    // After the answer: the pages of the read were locked until then.
                    for (at, data) in checked {
                        core.stores.offer(ino.0, at, data);
                    }
                }),
                Handle::Volume(volume) => {
                    let attached = match volume.attached(&core.engine) {
                        Ok(attached) => attached,
                        Err(e) => return reply.error(refuse("read of a volume", &e)),
                    };
                    let device = match attached.device() {
                        Ok(device) => device,
                        Err(e) => return reply.error(errno(&e)),
                    };
                    let mut buf = vec![0u8; size as usize];
                    match device.read_at(&mut buf, offset) {
                        Ok(done) => reply.data(&buf[..done]),
                        Err(e) => {
                            warn!(
                                "read of volume {}/{} at {offset} failed: {e}",
                                volume.backend, volume.volume_id
                            );
                            reply.error(Errno::from(e))
                        }
                    }
                }
            }
        })
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
        guard("write", || {
            let core = &self.core;
            let handle = match core.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            match handle.as_ref() {
                Handle::Control(control) => control.write(core, data.to_vec(), reply),
                Handle::Volume(volume) => {
                    let result = volume.writer(&core.engine).and_then(|writer| {
                        writer.took_part(req.pid());
                        writer.write_at(offset, data)
                    });
                    match result {
                        Ok(n) => reply.written(n as u32),
                        Err(e) => reply.error(refuse(
                            &format!("write to volume {}/{}", volume.backend, volume.volume_id),
                            &e,
                        )),
                    }
                }
                Handle::Image(_) => reply.error(Errno::EROFS),
                _ => reply.error(Errno::EBADF),
            }
        })
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        let Ok(handle) = self.core.handle(fh) else {
            return reply.ok();
        };
        if !matches!(handle.as_ref(), Handle::Volume(_)) {
            return reply.ok();
        }
        let pid = req.pid();
        // close(2) waits for this: once the opener's close returns, the volume is free
        // (no lock, no export) for a hypervisor that starts right away.
        self.slow("flush", move |_| {
            let Handle::Volume(volume) = handle.as_ref() else {
                return reply.ok();
            };
            let process = process_of(pid);
            if !volume.closed_by_opener(process) {
                return reply.ok();
            }
            let synced = match volume.detach() {
                Some(Attached::Write(writer)) => writer.sync(),
                _ => Ok(()),
            };
            // The restore's outcome is known before the opener's close returns, unless
            // the opener still holds a duplicate (`dd` opens its output, moves it to
            // descriptor 1 and closes the first): then it goes on, and is judged when
            // the last one is closed.
            if !core::holds_volume_open(process, &volume.backend, &volume.volume_id) {
                volume.finish_restore();
            }
            match synced {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(refuse(
                    &format!("close of volume {}/{}", volume.backend, volume.volume_id),
                    &e,
                )),
            }
        })
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
        self.slow("fsync", move |core| match core.handle(fh).as_deref() {
            Ok(Handle::Volume(volume)) if volume.writable => {
                match volume.writer(&core.engine).and_then(|w| w.sync()) {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(errno(&e)),
                }
            }
            Ok(_) => reply.ok(),
            Err(e) => reply.error(*e),
        })
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
            for (i, (node, name)) in entries.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(node.ino()), i as u64 + 1, node.kind(), name) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.handles.remove(fh.0);
        reply.ok();
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
        guard("getxattr", || {
            let node = self.core.node(ino);
            if let Ok(Node::Volume(b, v)) = &node {
                // A volume's note: a restore that left it incomplete.
                if name.to_str() != Some(VOLUME_RESTORE_XATTR) {
                    return reply.error(Errno::NO_XATTR);
                }
                return match self.core.engine.volume_note(b, v) {
                    Ok(Some(note)) => reply_xattr(note.as_bytes(), size, reply),
                    Ok(None) => reply.error(Errno::NO_XATTR),
                    Err(e) => reply.error(errno(&e)),
                };
            }
            let Ok(Node::Image(t, id)) = node else {
                return reply.error(Errno::NO_XATTR);
            };
            // An image carries `user.*` attributes only. `ls -l` asks every file for
            // `security.selinux` and `system.posix_acl_access`: answered without reading
            // the record (issue 28).
            let Some(name) = name.to_str().filter(|n| n.starts_with("user.")) else {
                return reply.error(Errno::NO_XATTR);
            };
            let record = match self.core.engine.record(&t, &id) {
                Ok(record) => record,
                Err(e) => return reply.error(errno(&e)),
            };
            let value = match name.strip_prefix(XATTR_PREFIX) {
                Some(field) => record
                    .scalar_fields()
                    .into_iter()
                    .find(|(k, _)| *k == field)
                    .map(|(_, v)| v),
                None => record.xattrs.get(name).cloned(),
            };
            match value {
                Some(value) => reply_xattr(value.as_bytes(), size, reply),
                None => reply.error(Errno::NO_XATTR),
            }
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guard("listxattr", || {
            let node = self.core.node(ino);
            if let Ok(Node::Volume(b, v)) = &node {
                let names = match self.core.engine.volume_note(b, v) {
                    Ok(Some(_)) => format!("{VOLUME_RESTORE_XATTR}\0").into_bytes(),
                    _ => Vec::new(),
                };
                return reply_xattr(&names, size, reply);
            }
            let Ok(Node::Image(t, id)) = node else {
                return reply_xattr(&[], size, reply);
            };
            let record = match self.core.engine.record(&t, &id) {
                Ok(record) => record,
                Err(e) => return reply.error(errno(&e)),
            };
            let mut names = Vec::new();
            for (field, _) in record.scalar_fields() {
                names.extend_from_slice(XATTR_PREFIX.as_bytes());
                names.extend_from_slice(field.as_bytes());
                names.push(0);
            }
            for name in record.xattrs.keys() {
                names.extend_from_slice(name.as_bytes());
                names.push(0);
            }
            reply_xattr(&names, size, reply)
        })
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
        let slot = match self
            .core
            .reserve(req.uid(), false, || format!("new file {name:?}"))
        {
            Ok(slot) => slot,
            Err(e) => return reply.error(e),
        };
        let name = name.to_owned();
        let pid = req.pid();
        self.slow("create", move |core| {
            match core.create_volume(parent, &name) {
                Ok((backend, volume_id, writer)) => {
                    writer.took_part(pid);
                    let node = Node::Volume(backend.clone(), volume_id.clone());
                    match core.attr(&node, 0) {
                        Ok(mut attr) => {
                            attr.ino = INodeNo(core.inodes.lookup(&node));
                            let fh = core.open_handle(
                                slot,
                                Handle::Volume(VolumeHandle::new(
                                    &backend,
                                    &volume_id,
                                    Attached::Write(writer),
                                    process_of(pid),
                                )),
                            );
                            reply.created(
                                &tree::ttl(&node),
                                &attr,
                                Generation(0),
                                fh,
                                FopenFlags::FOPEN_DIRECT_IO,
                            );
                        }
                        Err(e) => reply.error(errno(&e)),
                    }
                }
                Err(e) => reply.error(e),
            }
        })
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
        let pid = req.pid();
        self.slow("fallocate", move |core| {
            let handle = match core.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            let Handle::Volume(volume) = handle.as_ref() else {
                warn!("fallocate refused (EBADF): only volumes open for writing");
                return reply.error(Errno::EBADF);
            };
            let writer = match volume.writer(&core.engine) {
                Ok(writer) => writer,
                Err(e) => return reply.error(refuse("fallocate", &e)),
            };
            writer.took_part(pid);
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let result = if mode == punch {
                writer.discard(offset, length)
            } else if mode == 0 {
                // Thin volumes allocate on write; only the size matters.
                writer.set_size(writer.size().max(offset + length))
            } else if mode == libc::FALLOC_FL_KEEP_SIZE {
                Ok(())
            } else {
                warn!("fallocate mode {mode:#x} refused (EOPNOTSUPP)");
                return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
            };
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(refuse("fallocate", &e)),
            }
        })
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
        guard("lseek", || {
            let core = &self.core;
            let handle = match core.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            let attached;
            let checked;
            let device: &dyn BlockDevice = match handle.as_ref() {
                // Where data is comes from the checksums: data the store lost to a hole
                // is data, whose reads fail their check.
                Handle::Image(image) => {
                    checked = CheckedImage(image);
                    &checked
                }
                Handle::Volume(volume) => {
                    attached = match volume.attached(&core.engine) {
                        Ok(attached) => attached,
                        Err(e) => return reply.error(errno(&e)),
                    };
                    match attached.device() {
                        Ok(device) => device,
                        Err(e) => return reply.error(errno(&e)),
                    }
                }
                _ => return reply.error(Errno::EINVAL),
            };
            let Ok(offset) = u64::try_from(offset) else {
                return reply.error(Errno::ENXIO);
            };
            // The kernel sends only SEEK_DATA and SEEK_HOLE (it answers the others).
            let found = match whence {
                libc::SEEK_DATA => device.seek_data(offset),
                libc::SEEK_HOLE => device.seek_hole(offset),
                _ => return reply.error(Errno::EINVAL),
            };
            match found {
                Ok(Some(at)) => reply.offset(at as i64),
                Ok(None) => reply.error(Errno::ENXIO),
                Err(e) => reply.error(Errno::from(e)),
            }
        })
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
        let pid = req.pid();
        self.slow("copy_file_range", move |core| {
            let (Ok(input), Ok(out)) = (core.handle(fh_in), core.handle(fh_out)) else {
                return reply.error(Errno::EBADF);
            };
            // Only image → volume is ours; otherwise the kernel falls back to reading and
            // writing.
            let (Handle::Image(image), Handle::Volume(volume)) = (input.as_ref(), out.as_ref())
            else {
                return reply.error(Errno::EXDEV);
            };
            let result = volume.writer(&core.engine).and_then(|writer| {
                writer.took_part(pid);
                writer.copy_from_backup(image, offset_in, offset_out, len.min(COPY_RANGE_MAX))
            });
            match result {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(refuse("server-side copy", &e)),
            }
        })
    }
}

fn reply_xattr(value: &[u8], size: u32, reply: ReplyXattr) {
    if size == 0 {
        reply.size(value.len() as u32)
    } else if (size as usize) < value.len() {
        reply.error(Errno::ERANGE)
    } else {
        reply.data(value)
    }
}
