//! Opening: each node of the tree as a handle (control files, status texts, images,
//! volumes attached on the slow pool), room under the open-file caps taken first, and
//! `create`, which makes a new volume to restore into.

use super::control::{Control, ControlFile};
use super::errno::errno;
use super::handles::{Attached, Handle, VolumeHandle, process_of};
use super::tree::{self, Node};
use super::{BackupFs, guard};
use fuser::{
    Errno, FopenFlags, Generation, INodeNo, OpenAccMode, OpenFlags, ReplyCreate, ReplyOpen, Request,
};
use std::ffi::OsStr;
use tracing::warn;

impl BackupFs {
    pub(super) fn open_node(
        &self,
        req: &Request,
        ino: INodeNo,
        flags: OpenFlags,
        reply: ReplyOpen,
    ) {
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

    pub(super) fn create_file(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
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
}
