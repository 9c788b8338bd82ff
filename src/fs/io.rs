//! What open files answer: reads (every image block checked on its way out), writes
//! and truncates of a volume being restored, flush at the opener's close, fsync,
//! fallocate, SEEK_DATA/SEEK_HOLE and server-side copies from an image into a volume.
//! Nothing here touches storage but through the engine's handles.

use super::core;
use super::errno::errno;
use super::handles::{Attached, Handle, process_of};
use super::{BackupFs, guard, refuse};
use crate::engine::image::CheckedImage;
use crate::volume::device::{AlignedBuf, BlockDevice};
use fuser::{Errno, FileHandle, INodeNo, ReplyData, ReplyEmpty, ReplyLseek, ReplyWrite, Request};
use tracing::warn;

/// Largest piece of a server-side copy answered at once (the reply counts in u32).
const COPY_RANGE_MAX: u64 = 1 << 30;

/// An image read's buffer (a request is at most 1 MiB): one transparent huge page.
const READ_BUFFER_LEN: usize = 2 << 20;

thread_local! {
    /// The buffer image reads are served from, one per read thread.
    static READ_BUFFER: std::cell::RefCell<Option<AlignedBuf>> =
        const { std::cell::RefCell::new(None) };
}

impl BackupFs {
    pub(super) fn read_file(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
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
                // Reads wait on storage: they are answered from the read pool, so that
                // the session's threads are free for what must not queue behind them (a
                // restore's `cp` has one write in flight, and waited for a thread while
                // all four read its source: 0.6 ms a write, issue 28).
                Handle::Image(_) | Handle::Volume(_) => {
                    let (core, pid) = (core.clone(), req.pid());
                    self.core.reads.run(move || {
                        guard("read", || {
                            read_storage(&core, &handle, pid, ino, fh, offset, size, reply)
                        })
                    });
                }
            }
        })
    }

    pub(super) fn write_file(
        &self,
        req: &Request,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
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

    pub(super) fn flush_file(&self, req: &Request, fh: FileHandle, reply: ReplyEmpty) {
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

    pub(super) fn fsync_file(&self, fh: FileHandle, reply: ReplyEmpty) {
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

    pub(super) fn fallocate_volume(
        &self,
        req: &Request,
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

    pub(super) fn seek_file(&self, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
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

    /// `len` bytes from (image handle, offset) `from` into (volume handle, offset) `to`.
    pub(super) fn copy_range(
        &self,
        req: &Request,
        from: (FileHandle, u64),
        to: (FileHandle, u64),
        len: u64,
        reply: ReplyWrite,
    ) {
        let ((fh_in, offset_in), (fh_out, offset_out)) = (from, to);
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

/// A read of an image (every block checked on its way out) or of a volume, on the read
/// pool.
#[allow(clippy::too_many_arguments)]
fn read_storage(
    core: &std::sync::Arc<core::Core>,
    handle: &Handle,
    pid: u32,
    ino: INodeNo,
    fh: FileHandle,
    offset: u64,
    size: u32,
    reply: ReplyData,
) {
    match handle {
        Handle::Image(image) => READ_BUFFER.with(|cell| {
            let mut slot = cell.borrow_mut();
            // One aligned buffer per read thread: the backing file may be read with
            // O_DIRECT, and the buffer is not zeroed for every request. One huge page: the
            // O_DIRECT read into it is a few segments, and the kernel pins it once per
            // reply instead of per 4 KiB page (contrib/bench/README.md, issue 28). The
            // four threads keep 8 MiB.
            if slot.as_ref().is_none_or(|b| b.len() < size as usize) {
                *slot = AlignedBuf::new((size as usize).max(READ_BUFFER_LEN)).ok();
            }
            let Some(buf) = slot.as_mut() else {
                return reply.error(Errno::ENOMEM);
            };
            let buf = &mut buf[..size as usize];
            let mut checked = Vec::new();
            match image.read_at_with(buf, offset, &mut |at, data| checked.push((at, data))) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => {
                    // Before the answer: the restore this reader feeds (ending once it
                    // gives up) must find it.
                    core.engine.image_read_failed(fh.0, pid, &e);
                    return reply.error(refuse(&format!("read of backup {}", image.backup_id), &e));
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
        // Only images and volumes are sent here.
        _ => reply.error(Errno::EIO),
    }
}
