//! The FUSE layer: maps the mounted tree onto engine calls. It owns no storage logic,
//! answers slow work (waiting for a job, server-side copies) from worker threads, and
//! never lets a panic in a handler take the mount down.

mod errno;
pub mod tree;

use crate::engine::request::{self, USAGE};
use crate::engine::{Engine, EngineError, Image, VolumeWriter};
use crate::volume::Attachment;
use errno::errno;
use fuser::BackingId;
use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;
use tracing::{debug, error, warn};
use tree::{Modes, Node};

/// Largest piece of a server-side copy answered at once (the reply counts in u32).
const COPY_RANGE_MAX: u64 = 1 << 30;
const XATTR_PREFIX: &str = "user.backupfs.";

/// What an open file handle is.
enum Handle {
    /// `request` or `verify`: a write starts work, a read gives its answer.
    Control {
        kind: Control,
        target: String,
        answer: Arc<Mutex<Option<Answer>>>,
    },
    /// A status file rendered at open (procfs-like, read with direct I/O).
    Text(Vec<u8>),
    Image {
        image: Image,
        /// Set when the kernel reads this open file straight from the backing file.
        _backing: Option<Arc<BackingId>>,
        ino: u64,
    },
    VolumeRead {
        attachment: Attachment,
    },
    VolumeWrite {
        writer: Arc<VolumeWriter>,
    },
    Dir(Vec<(Node, String)>),
}

/// The answer to the last write through a control file. It is read from the offset of
/// the first read after it (`exec 3<>request; echo id >&3; read -r id <&3` reads at the
/// position the write left), so any shared file position works.
struct Answer {
    text: String,
    base: Option<u64>,
}

impl Answer {
    fn new(text: String) -> Option<Answer> {
        Some(Answer { text, base: None })
    }

    fn read(&mut self, offset: u64, size: u32) -> &[u8] {
        let base = *self.base.get_or_insert(offset);
        let start = (offset.saturating_sub(base) as usize).min(self.text.len());
        let end = start.saturating_add(size as usize).min(self.text.len());
        &self.text.as_bytes()[start..end]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Control {
    Request,
    Verify,
}

const VERIFY_USAGE: &str = "\
usage: echo <backup-id> > verify
  reads the whole backup and checks every block against its checksum; the write
  fails with EIO if any block is damaged. Reading the same open file then gives
  \"ok <backup-id>\" or \"damaged <backup-id> <block,...>\"; the result is also kept
  in the record (verified_at, damaged_blocks).
";

impl Handle {
    fn data_file(&self) -> Option<&File> {
        match self {
            Handle::Image { image, .. } => Some(image.file()),
            Handle::VolumeRead { attachment } => Some(&attachment.file),
            Handle::VolumeWrite { writer } => writer.file().ok(),
            _ => None,
        }
    }
}

/// How an image inode's open files are read; the kernel does not mix the two on one
/// inode, so the first open decides until the last one closes.
enum ImageMode {
    /// Through the daemon, which checks blocks against their checksums.
    Checked(usize),
    /// Straight from the backing file: the image is verified (or verification is off).
    Passthrough(std::sync::Weak<BackingId>, usize),
}

pub struct BackupFs {
    engine: Arc<Engine>,
    /// Whether the kernel agreed to passthrough in `init`.
    passthrough: bool,
    image_modes: Mutex<HashMap<u64, ImageMode>>,
    nodes: RwLock<HashMap<u64, Node>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    modes: Modes,
    mounted_at: SystemTime,
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
    warn!(
        "{op} refused ({}): {e}",
        std::io::Error::from_raw_os_error(code.code())
    );
    code
}

impl BackupFs {
    pub fn new(engine: Arc<Engine>) -> BackupFs {
        let config = engine.config();
        let gid = config.admin_gid();
        let modes = Modes {
            gid: gid.unwrap_or(0),
            group_read: gid.is_some(),
        };
        let mut nodes = HashMap::new();
        nodes.insert(tree::ROOT, Node::Root);
        BackupFs {
            engine,
            passthrough: false,
            image_modes: Mutex::new(HashMap::new()),
            nodes: RwLock::new(nodes),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            modes,
            mounted_at: SystemTime::now(),
        }
    }

    fn node(&self, ino: INodeNo) -> Result<Node, Errno> {
        self.nodes.read().get(&ino.0).cloned().ok_or(Errno::ENOENT)
    }

    fn remember(&self, node: &Node) {
        self.nodes
            .write()
            .entry(node.ino())
            .or_insert_with(|| node.clone());
    }

    fn handle(&self, fh: FileHandle) -> Result<Arc<Handle>, Errno> {
        self.handles.lock().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn open_handle(&self, handle: Handle) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Arc::new(handle));
        FileHandle(fh)
    }

    fn attr(&self, node: &Node) -> Result<FileAttr, EngineError> {
        let (size, blocks, mtime) = match node {
            Node::Image(t, id) => {
                let record = self.engine.record(t, id)?;
                let allocated = self.engine.image_allocated(t, id)?;
                (record.size, allocated / 512, record.completed_time())
            }
            Node::Record(t, id) => {
                let record = self.engine.record(t, id)?;
                let size = tree::record_json(&record).len() as u64;
                (size, 0, record.completed_time())
            }
            Node::Volume(b, v) => {
                let info = self.engine.volume(b, v)?;
                (info.size, info.allocated / 512, info.mtime)
            }
            Node::Latest(t, v) => {
                let id = tree::latest_backup(&self.engine.records(t)?, v)
                    .ok_or_else(|| EngineError::NotFound(format!("no backup of {v}")))?;
                (format!("../../{id}.img").len() as u64, 0, self.mounted_at)
            }
            _ => (0, 0, self.mounted_at),
        };
        Ok(tree::attr(node, &self.modes, size, blocks, mtime))
    }

    fn reply_attr(&self, node: &Node, reply: ReplyAttr) {
        match self.attr(node) {
            Ok(attr) => reply.attr(&tree::ttl(node), &attr),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write_verify(
        &self,
        target: &str,
        answer: &Arc<Mutex<Option<Answer>>>,
        data: &[u8],
        reply: ReplyWrite,
    ) {
        let line = std::str::from_utf8(data).unwrap_or("");
        let backup_id = line
            .strip_suffix('\n')
            .unwrap_or(line)
            .trim_end_matches(' ')
            .to_string();
        if !crate::target::record::is_backup_id(&backup_id) {
            warn!(
                target,
                "verify refused (EINVAL): {line:?} is not a backup id"
            );
            return reply.error(Errno::EINVAL);
        }
        let (engine, target, answer) = (self.engine.clone(), target.to_string(), answer.clone());
        let written = data.len() as u32;
        let spawned = std::thread::Builder::new()
            .name("verify".into())
            .spawn(move || match engine.verify_backup(&target, &backup_id) {
                Ok(()) => {
                    *answer.lock() = Answer::new(format!("ok {backup_id}\n"));
                    reply.written(written)
                }
                Err(e) => {
                    if let EngineError::Damaged { blocks, .. } = &e {
                        let list: Vec<String> = blocks.iter().map(u64::to_string).collect();
                        *answer.lock() =
                            Answer::new(format!("damaged {backup_id} {}\n", list.join(",")));
                    }
                    reply.error(refuse(&format!("verify of {backup_id}"), &e))
                }
            });
        if let Err(e) = spawned {
            error!("cannot start a thread to verify a backup: {e}");
        }
    }

    fn write_request(
        &self,
        target: &str,
        answer: &Arc<Mutex<Option<Answer>>>,
        data: &[u8],
        reply: ReplyWrite,
    ) {
        let parsed = match request::parse(data) {
            Ok(parsed) => parsed,
            Err(reason) => {
                warn!(target, "request refused (EINVAL): {reason}");
                return reply.error(Errno::EINVAL);
            }
        };
        let job = match self.engine.start_backup(target, &parsed) {
            Ok(job) => job,
            Err(e) => return reply.error(refuse(&format!("backup of {}", parsed.volume_id), &e)),
        };
        *answer.lock() = Answer::new(format!("{}\n", job.backup_id));
        let written = data.len() as u32;
        if !parsed.wait {
            return reply.written(written);
        }
        let engine = self.engine.clone();
        let spawned = std::thread::Builder::new()
            .name("request-wait".into())
            .spawn(move || match engine.wait(&job) {
                Ok(()) => reply.written(written),
                Err(e) => reply.error(errno(&e)),
            });
        if let Err(e) = spawned {
            error!("cannot start a thread to wait for a backup: {e}");
        }
    }

    fn open_volume(&self, backend: &str, volume_id: &str, flags: OpenFlags, reply: ReplyOpen) {
        let result = match flags.acc_mode() {
            OpenAccMode::O_RDONLY => self
                .engine
                .open_volume_read(backend, volume_id)
                .map(|attachment| Handle::VolumeRead { attachment }),
            _ => self
                .engine
                .open_restore(backend, volume_id, flags.0 & libc::O_TRUNC != 0)
                .map(|writer| Handle::VolumeWrite { writer }),
        };
        match result {
            Ok(handle) => {
                let fh = self.open_handle(handle);
                // Volumes change behind our back (a hypervisor may write them): no caching.
                reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
            }
            Err(e) => reply.error(refuse(&format!("open of volume {backend}/{volume_id}"), &e)),
        }
    }

    fn do_setattr(
        &self,
        node: &Node,
        size: Option<u64>,
        fh: Option<FileHandle>,
    ) -> Result<(), Errno> {
        let Some(size) = size else { return Ok(()) };
        match node {
            // `echo x > request` truncates first: nothing to do.
            Node::Request(_) | Node::Verify(_) | Node::Jobs(_) => Ok(()),
            Node::Volume(b, v) => {
                let open = fh.and_then(|fh| self.handle(fh).ok());
                let result = match open.as_deref() {
                    Some(Handle::VolumeWrite { writer }) => writer.set_size(size),
                    _ => self
                        .engine
                        .open_restore(b, v, false)
                        .and_then(|writer| writer.set_size(size)),
                };
                result.map_err(|e| refuse(&format!("truncate of volume {b}/{v}"), &e))
            }
            Node::Image(..) | Node::Record(..) => {
                warn!("truncate refused (EROFS): backups and records are read-only");
                Err(Errno::EROFS)
            }
            _ => {
                warn!("truncate refused (EISDIR): not a file");
                Err(Errno::EISDIR)
            }
        }
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
        // Passthrough lets verified images be read at the backing filesystem's speed.
        self.passthrough = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(1).is_ok();
        debug!("passthrough: {}", self.passthrough);
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        guard("lookup", || {
            let parent = match self.node(parent) {
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
            let node = match tree::child(&self.engine, &parent, name) {
                Ok(node) => node,
                Err(EngineError::Invalid(reason)) => {
                    warn!("lookup refused (EINVAL): {reason}");
                    return reply.error(Errno::EINVAL);
                }
                Err(e) => return reply.error(errno(&e)),
            };
            match self.attr(&node) {
                Ok(attr) => {
                    self.remember(&node);
                    reply.entry(&tree::ttl(&node), &attr, Generation(0));
                }
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        guard("getattr", || match self.node(ino) {
            Ok(node) => self.reply_attr(&node, reply),
            Err(e) => reply.error(e),
        })
    }

    fn setattr(
        &self,
        _req: &Request,
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
        guard("setattr", || {
            let node = match self.node(ino) {
                Ok(node) => node,
                Err(e) => return reply.error(e),
            };
            if mode.is_some() || uid.is_some() || gid.is_some() {
                warn!("chmod/chown refused (EPERM): modes are set by backupfs");
                return reply.error(Errno::EPERM);
            }
            // Timestamps are ours; touching them is accepted and ignored.
            match self.do_setattr(&node, size, fh) {
                Ok(()) => self.reply_attr(&node, reply),
                Err(e) => reply.error(e),
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        guard("readlink", || match self.node(ino) {
            Ok(Node::Latest(t, v)) => match self.engine.records(&t) {
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
        guard("mknod", || {
            if mode & libc::S_IFMT != libc::S_IFREG {
                warn!("mknod {name:?} refused (EPERM): only regular files (new volumes)");
                return reply.error(Errno::EPERM);
            }
            match self.create_volume(parent, name) {
                Ok((node, writer)) => {
                    drop(writer);
                    match self.attr(&node) {
                        Ok(attr) => reply.entry(&tree::ttl(&node), &attr, Generation(0)),
                        Err(e) => reply.error(errno(&e)),
                    }
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
        guard("unlink", || {
            let parent = match self.node(parent) {
                Ok(parent) => parent,
                Err(e) => return reply.error(e),
            };
            let name = name.to_string_lossy();
            let result = match &parent {
                Node::Target(_)
                    if name
                        .strip_suffix(".img")
                        .or_else(|| name.strip_suffix(".json"))
                        .is_some_and(|id| !crate::target::record::is_backup_id(id)) =>
                {
                    Err(EngineError::Invalid(format!(
                        "{name} is not a backup's file"
                    )))
                }
                Node::Target(t) => {
                    if let Some(id) = name.strip_suffix(".img") {
                        self.engine.delete_backup(t, id)
                    } else if let Some(id) = name.strip_suffix(".json") {
                        self.engine.delete_record(t, id)
                    } else {
                        Err(EngineError::NotPermitted(format!(
                            "{name} cannot be removed"
                        )))
                    }
                }
                Node::Backend(b) => Err(EngineError::NotPermitted(format!(
                    "volumes are never deleted through backupfs ({b}/{name})"
                ))),
                _ => Err(EngineError::NotPermitted(format!(
                    "{name} cannot be removed"
                ))),
            };
            match result {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(refuse(&format!("rm {name}"), &e)),
            }
        })
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        warn!("rmdir {name:?} refused (EPERM): the tree is fixed");
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

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        guard("open", || {
            let node = match self.node(ino) {
                Ok(node) => node,
                Err(e) => return reply.error(e),
            };
            let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
            match &node {
                Node::Request(t) | Node::Verify(t) => {
                    let fh = self.open_handle(Handle::Control {
                        kind: if matches!(node, Node::Request(_)) {
                            Control::Request
                        } else {
                            Control::Verify
                        },
                        target: t.clone(),
                        answer: Arc::new(Mutex::new(None)),
                    });
                    reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
                }
                Node::Jobs(_) | Node::Record(..) if writing => {
                    warn!("write to a status file refused (EACCES)");
                    reply.error(Errno::EACCES)
                }
                Node::Jobs(t) => {
                    let mut text = String::new();
                    for job in self.engine.jobs(Some(t)) {
                        text.push_str(&job.line());
                        text.push('\n');
                    }
                    let fh = self.open_handle(Handle::Text(text.into_bytes()));
                    reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
                }
                Node::Record(t, id) => match self.engine.record(t, id) {
                    Ok(record) => {
                        let fh = self.open_handle(Handle::Text(tree::record_json(&record)));
                        reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO);
                    }
                    Err(e) => reply.error(errno(&e)),
                },
                Node::Image(..) if writing => {
                    warn!("write to a backup image refused (EROFS)");
                    reply.error(Errno::EROFS)
                }
                Node::Image(t, id) => match self.engine.open_image(t, id) {
                    Ok(image) => self.open_image(ino.0, image, reply),
                    Err(e) => reply.error(errno(&e)),
                },
                Node::Volume(b, v) => self.open_volume(b, v, flags, reply),
                _ => reply.error(Errno::EISDIR),
            }
        })
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        guard("read", || {
            let handle = match self.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            let slice = |bytes: &[u8]| {
                let start = (offset as usize).min(bytes.len());
                let end = start.saturating_add(size as usize).min(bytes.len());
                bytes[start..end].to_vec()
            };
            match handle.as_ref() {
                Handle::Control { kind, answer, .. } => match answer.lock().as_mut() {
                    Some(answer) => reply.data(answer.read(offset, size)),
                    None => reply.data(&slice(match kind {
                        Control::Request => USAGE.as_bytes(),
                        Control::Verify => VERIFY_USAGE.as_bytes(),
                    })),
                },
                Handle::Text(bytes) => reply.data(&slice(bytes)),
                Handle::Dir(_) => reply.error(Errno::EISDIR),
                Handle::Image { image, .. } => {
                    let mut buf = vec![0u8; size as usize];
                    match image.read_at(&mut buf, offset) {
                        Ok(n) => reply.data(&buf[..n]),
                        Err(e) => {
                            reply.error(refuse(&format!("read of backup {}", image.backup_id), &e))
                        }
                    }
                }
                other => {
                    let Some(file) = other.data_file() else {
                        return reply.error(Errno::EBADF);
                    };
                    let mut buf = vec![0u8; size as usize];
                    let mut done = 0;
                    while done < buf.len() {
                        match file.read_at(&mut buf[done..], offset + done as u64) {
                            Ok(0) => break,
                            Ok(n) => done += n,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => {
                                warn!("read at {offset} failed: {e}");
                                return reply.error(Errno::from(e));
                            }
                        }
                    }
                    reply.data(&buf[..done])
                }
            }
        })
    }

    fn write(
        &self,
        _req: &Request,
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
            let handle = match self.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            match handle.as_ref() {
                Handle::Control {
                    kind: Control::Request,
                    target,
                    answer,
                } => self.write_request(target, answer, data, reply),
                Handle::Control {
                    kind: Control::Verify,
                    target,
                    answer,
                } => self.write_verify(target, answer, data, reply),
                Handle::VolumeWrite { writer } => match writer.write_at(offset, data) {
                    Ok(n) => reply.written(n as u32),
                    Err(e) => reply.error(refuse(
                        &format!("write to volume {}", writer.volume_id()),
                        &e,
                    )),
                },
                Handle::Image { .. } => reply.error(Errno::EROFS),
                _ => reply.error(Errno::EBADF),
            }
        })
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
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
        // Dropping the handle detaches the volume and ends a restore's claim.
        let handle = self.handles.lock().remove(&fh.0);
        if let Some(Handle::Image { ino, .. }) = handle.as_deref() {
            let mut modes = self.image_modes.lock();
            let last = match modes.get_mut(ino) {
                Some(ImageMode::Checked(n)) | Some(ImageMode::Passthrough(_, n)) => {
                    *n -= 1;
                    *n == 0
                }
                None => false,
            };
            if last {
                modes.remove(ino);
            }
        }
        drop(handle);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        guard("fsync", || match self.handle(fh).as_deref() {
            Ok(Handle::VolumeWrite { writer }) => {
                let writer = writer.clone();
                let spawned = std::thread::Builder::new()
                    .name("fsync".into())
                    .spawn(move || match writer.sync() {
                        Ok(()) => reply.ok(),
                        Err(e) => reply.error(errno(&e)),
                    });
                if let Err(e) = spawned {
                    error!("cannot start a thread for fsync: {e}");
                }
            }
            Ok(_) => reply.ok(),
            Err(e) => reply.error(*e),
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        guard("opendir", || {
            let node = match self.node(ino) {
                Ok(node) => node,
                Err(e) => return reply.error(e),
            };
            match tree::children(&self.engine, &node) {
                Ok(entries) => {
                    let fh = self.open_handle(Handle::Dir(entries));
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
            let handle = match self.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            let Handle::Dir(entries) = handle.as_ref() else {
                return reply.error(Errno::ENOTDIR);
            };
            for (i, (node, name)) in entries.iter().enumerate().skip(offset as usize) {
                if name != "." && name != ".." {
                    self.remember(node);
                }
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
        self.handles.lock().remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        guard("getxattr", || {
            let Ok(Node::Image(t, id)) = self.node(ino) else {
                return reply.error(Errno::NO_XATTR);
            };
            let Some(field) = name.to_str().and_then(|n| n.strip_prefix(XATTR_PREFIX)) else {
                return reply.error(Errno::NO_XATTR);
            };
            let record = match self.engine.record(&t, &id) {
                Ok(record) => record,
                Err(e) => return reply.error(errno(&e)),
            };
            let Some((_, value)) = record
                .scalar_fields()
                .into_iter()
                .find(|(k, _)| *k == field)
            else {
                return reply.error(Errno::NO_XATTR);
            };
            reply_xattr(value.as_bytes(), size, reply)
        })
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        guard("listxattr", || {
            let Ok(Node::Image(t, id)) = self.node(ino) else {
                return reply_xattr(&[], size, reply);
            };
            let record = match self.engine.record(&t, &id) {
                Ok(record) => record,
                Err(e) => return reply.error(errno(&e)),
            };
            let mut names = Vec::new();
            for (field, _) in record.scalar_fields() {
                names.extend_from_slice(XATTR_PREFIX.as_bytes());
                names.extend_from_slice(field.as_bytes());
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
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        guard("create", || match self.create_volume(parent, name) {
            Ok((node, writer)) => match self.attr(&node) {
                Ok(attr) => {
                    let fh = self.open_handle(Handle::VolumeWrite { writer });
                    reply.created(
                        &tree::ttl(&node),
                        &attr,
                        Generation(0),
                        fh,
                        FopenFlags::FOPEN_DIRECT_IO,
                    );
                }
                Err(e) => reply.error(errno(&e)),
            },
            Err(e) => reply.error(e),
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
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        guard("fallocate", || {
            let handle = match self.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            let Handle::VolumeWrite { writer } = handle.as_ref() else {
                warn!("fallocate refused (EBADF): only volumes open for writing");
                return reply.error(Errno::EBADF);
            };
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
            let handle = match self.handle(fh) {
                Ok(handle) => handle,
                Err(e) => return reply.error(e),
            };
            let Some(file) = handle.data_file() else {
                return reply.error(Errno::EINVAL);
            };
            // SAFETY: lseek on a descriptor the handle owns.
            let rc = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
            if rc < 0 {
                reply.error(Errno::from(std::io::Error::last_os_error()))
            } else {
                reply.offset(rc)
            }
        })
    }

    fn copy_file_range(
        &self,
        _req: &Request,
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
        guard("copy_file_range", || {
            let (Ok(input), Ok(out)) = (self.handle(fh_in), self.handle(fh_out)) else {
                return reply.error(Errno::EBADF);
            };
            // Only image → volume is ours; otherwise the kernel falls back to reading and
            // writing.
            let (Handle::Image { .. }, Handle::VolumeWrite { writer }) =
                (input.as_ref(), out.as_ref())
            else {
                return reply.error(Errno::EXDEV);
            };
            let writer = writer.clone();
            let len = len.min(COPY_RANGE_MAX);
            let spawned = std::thread::Builder::new()
                .name("copy-range".into())
                .spawn(move || {
                    let Handle::Image { image, .. } = input.as_ref() else {
                        return reply.error(Errno::EXDEV);
                    };
                    match writer.copy_from_backup(image, offset_in, offset_out, len) {
                        Ok(n) => reply.written(n as u32),
                        Err(e) => reply.error(refuse("server-side copy", &e)),
                    }
                });
            if let Err(e) = spawned {
                error!("cannot start a thread for a server-side copy: {e}");
            }
        })
    }
}

impl BackupFs {
    /// Opens an image: straight from the backing file when every block is known good
    /// (or checks are off) and the kernel can, else through the daemon's checked reads.
    fn open_image(&self, ino: u64, image: Image, reply: ReplyOpen) {
        let mut modes = self.image_modes.lock();
        let backing = match modes.get_mut(&ino) {
            Some(ImageMode::Checked(n)) => {
                *n += 1;
                None
            }
            Some(ImageMode::Passthrough(weak, n)) => match weak.upgrade() {
                Some(backing) => {
                    *n += 1;
                    Some(backing)
                }
                None => None,
            },
            None if self.passthrough && image.fully_checked() => {
                match reply.open_backing(image.file()) {
                    Ok(backing) => {
                        let backing = Arc::new(backing);
                        modes.insert(ino, ImageMode::Passthrough(Arc::downgrade(&backing), 1));
                        Some(backing)
                    }
                    Err(e) => {
                        debug!("passthrough refused ({e}); reading through the daemon");
                        modes.insert(ino, ImageMode::Checked(1));
                        None
                    }
                }
            }
            None => {
                modes.insert(ino, ImageMode::Checked(1));
                None
            }
        };
        drop(modes);
        let fh = self.open_handle(Handle::Image {
            image,
            _backing: backing.clone(),
            ino,
        });
        match backing {
            Some(backing) => reply.opened_passthrough(fh, FopenFlags::empty(), &backing),
            // Images never change: keep their pages across opens.
            None => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn create_volume(
        &self,
        parent: INodeNo,
        name: &OsStr,
    ) -> Result<(Node, Arc<VolumeWriter>), Errno> {
        let parent = self.node(parent)?;
        let Node::Backend(backend) = parent else {
            warn!(
                "create {name:?} refused (EPERM): files are created only under volumes/<backend>/"
            );
            return Err(Errno::EPERM);
        };
        let Some(name) = name.to_str().filter(|n| crate::volume::is_valid_id(n)) else {
            warn!("create {name:?} refused (EINVAL): not a valid volume id");
            return Err(Errno::EINVAL);
        };
        let writer = self
            .engine
            .create_volume(&backend, name)
            .map_err(|e| refuse(&format!("create of volume {backend}/{name}"), &e))?;
        let node = Node::Volume(backend, name.to_string());
        self.remember(&node);
        Ok((node, writer))
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
