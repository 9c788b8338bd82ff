//! Asynchronous requests on an open image: an [`AioQueue`] of reads and writes finished
//! in submission order, and a [`PendingWrite`] on its own. No buffer is ever freed, and
//! no image closed, while librbd may still use it.

use super::ffi::{self, Api};
use super::image::Image;
use super::{RbdError, Result, check};
use std::collections::VecDeque;
use std::ffi::c_int;
use std::ops::Range;
use std::sync::Arc;

/// What an asynchronous request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioKind {
    Read,
    Write,
    Discard,
    WriteZeroes,
}

/// A finished request, with its buffer handed back (filled, for a read) for reuse.
pub struct AioDone {
    pub kind: AioKind,
    pub offset: u64,
    pub len: u64,
    /// Bytes read or written (a read at the end of the image may be short).
    pub bytes: u64,
    /// The request's buffer (empty for discard and write-zeroes).
    pub buffer: Vec<u8>,
}

impl std::fmt::Debug for AioDone {
    /// Without the buffer's bytes: megabytes of them help nobody in a message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AioDone")
            .field("kind", &self.kind)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("bytes", &self.bytes)
            .field("buffer_len", &self.buffer.len())
            .finish()
    }
}

/// One request in flight: the completion and the buffer librbd reads from or writes
/// into until it completes.
struct InFlight {
    api: &'static Api,
    completion: ffi::CompletionHandle,
    kind: AioKind,
    offset: u64,
    len: u64,
    buffer: Vec<u8>,
}

impl InFlight {
    /// Waits for completion; the return value.
    fn wait(&mut self) -> isize {
        // SAFETY: a valid completion of a submitted request; waiting is idempotent.
        unsafe {
            (self.api.rbd_aio_wait_for_complete)(self.completion);
            (self.api.rbd_aio_get_return_value)(self.completion)
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The buffer must not be freed while librbd may still touch it: wait first
        // (bounded by rados_osd_op_timeout), then release the completion.
        self.wait();
        // SAFETY: complete, and released exactly once.
        unsafe { (self.api.rbd_aio_release)(self.completion) };
    }
}

// SAFETY: a completion may be waited for and released from any thread (librbd's
// completions are thread-safe), and the buffer is plain owned memory.
unsafe impl Send for InFlight {}

impl Image {
    /// Submits one asynchronous request; the returned InFlight keeps the buffer (and the
    /// completion) until librbd has finished with it.
    fn submit(
        &self,
        kind: AioKind,
        offset: u64,
        len: u64,
        mut buffer: Vec<u8>,
        op_flags: c_int,
    ) -> Result<InFlight> {
        let data = buffer.as_mut_ptr();
        // SAFETY: the buffer's heap memory does not move when the Vec is moved into the
        // InFlight, which keeps it until the request has completed (its Drop waits).
        unsafe { self.submit_at(kind, offset, len, data, buffer, op_flags) }
    }

    /// Submits one asynchronous request on the memory at `data` (`len` bytes; reads write
    /// it, writes read it); the InFlight keeps `keep` and the completion until librbd is
    /// done.
    ///
    /// # Safety
    /// `data` must stay valid for `len` bytes until the returned InFlight has been waited
    /// for or dropped (its Drop waits).
    unsafe fn submit_at(
        &self,
        kind: AioKind,
        offset: u64,
        len: u64,
        data: *mut u8,
        keep: Vec<u8>,
        op_flags: c_int,
    ) -> Result<InFlight> {
        let api = self.api();
        let mut completion: ffi::CompletionHandle = std::ptr::null_mut();
        // SAFETY: no callback; librbd writes the new completion through the pointer.
        let rc =
            unsafe { (api.rbd_aio_create_completion)(std::ptr::null_mut(), None, &mut completion) };
        check(rc.into(), "create completion", || self.describe())?;
        let handle = self.handle;
        let size = usize::try_from(len)
            .map_err(|_| RbdError::ceph("submit", self.describe(), libc::EINVAL))?;
        // SAFETY: valid image and completion; `data` stays valid until the request has
        // completed (the caller's promise).
        let rc = unsafe {
            match kind {
                AioKind::Read => {
                    (api.rbd_aio_read2)(handle, offset, size, data.cast(), completion, op_flags)
                }
                AioKind::Write => {
                    (api.rbd_aio_write2)(handle, offset, size, data.cast(), completion, op_flags)
                }
                AioKind::Discard => (api.rbd_aio_discard)(handle, offset, len, completion),
                AioKind::WriteZeroes => {
                    (api.rbd_aio_write_zeroes)(handle, offset, size, completion, 0, 0)
                }
            }
        };
        if rc < 0 {
            // Not submitted: nothing will complete it, release it here.
            // SAFETY: created above, never submitted, released once.
            unsafe { (api.rbd_aio_release)(completion) };
            return Err(RbdError::ceph("submit", self.describe(), -rc));
        }
        Ok(InFlight {
            api,
            completion,
            kind,
            offset,
            len,
            buffer: keep,
        })
    }

    /// Writes all of `buf` at `offset` (within the image's size) without copying it
    /// (with zero-copy writes, which the connection allows, librbd sends the caller's
    /// memory) and returns once the request is done.
    pub fn write_waiting(&self, buf: &[u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        // SAFETY: librbd only reads a write's memory, and the request is waited for
        // (also on an early return: InFlight's Drop waits) before the borrow ends.
        let mut request = unsafe {
            self.submit_at(
                AioKind::Write,
                offset,
                len,
                buf.as_ptr().cast_mut(),
                Vec::new(),
                0,
            )?
        };
        let rc = request.wait();
        check(rc as i64, "write", || {
            format!("{} at {offset}+{len}", self.describe())
        })
        .map(drop)
    }

    /// Starts writing all of `buffer` at `offset` (within the image's size) and returns
    /// at once; the write keeps its buffer until it is waited for (or dropped, which
    /// waits). With zero-copy writes (the connection allows them) librbd sends the
    /// buffer itself: it must not change meanwhile, which owning it guarantees. The
    /// write holds the image too (hence `Arc`): it outlives no handle it was sent on.
    pub fn submit_write(self: &Arc<Self>, offset: u64, buffer: Vec<u8>) -> Result<PendingWrite> {
        let len = buffer.len() as u64;
        Ok(PendingWrite {
            request: self.submit(AioKind::Write, offset, len, buffer, 0)?,
            image: Arc::clone(self),
        })
    }
}

/// A write in flight on its own (see [`Image::submit_write`]): it keeps its image open
/// until it has been waited for, by [`PendingWrite::wait`] or on drop.
pub struct PendingWrite {
    // Fields drop in order: the request (whose Drop waits for librbd) before the image
    // it was sent on, so the image is never closed under it.
    request: InFlight,
    image: Arc<Image>,
}

impl std::fmt::Debug for PendingWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "write {}+{} to {}",
            self.request.offset,
            self.request.len,
            self.image.describe()
        )
    }
}

impl PendingWrite {
    /// The range it writes.
    pub fn range(&self) -> Range<u64> {
        self.request.offset..self.request.offset + self.request.len
    }

    /// Waits until it is done: its buffer back (for reuse), or its error.
    pub fn wait(mut self) -> Result<Vec<u8>> {
        let rc = self.request.wait();
        let (offset, len) = (self.request.offset, self.request.len);
        check(rc as i64, "write", || {
            format!("{} at {offset}+{len}", self.image.describe())
        })?;
        Ok(std::mem::take(&mut self.request.buffer))
    }
}

/// Up to `depth` asynchronous requests in flight on one image, finished in submission
/// order: a copier submits reads (or writes) of large blocks and takes results from
/// the oldest. Every submit on a full queue first waits for the oldest request and
/// returns it; if that request failed, its error is returned and nothing new is
/// submitted. Dropping the queue waits for whatever is still in flight (each request
/// is bounded by `rados_osd_op_timeout`), so no buffer is freed under librbd.
pub struct AioQueue<'a> {
    image: &'a Image,
    depth: usize,
    in_flight: VecDeque<InFlight>,
    /// librados op flags (fadvise hints) for reads and writes.
    op_flags: c_int,
}

impl<'a> AioQueue<'a> {
    pub fn new(image: &'a Image, depth: usize) -> AioQueue<'a> {
        AioQueue {
            image,
            depth: depth.max(1),
            in_flight: VecDeque::with_capacity(depth.max(1)),
            op_flags: 0,
        }
    }

    /// Marks the reads and writes as one sequential pass that will not be read again
    /// soon (a backup or a restore): the OSDs are told not to keep the data cached.
    pub fn sequential(mut self) -> AioQueue<'a> {
        self.op_flags =
            ffi::LIBRADOS_OP_FLAG_FADVISE_SEQUENTIAL | ffi::LIBRADOS_OP_FLAG_FADVISE_NOCACHE;
        self
    }

    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.in_flight.len() >= self.depth
    }

    /// Reads `buffer.len()` bytes at `offset` into `buffer`.
    pub fn read(&mut self, offset: u64, buffer: Vec<u8>) -> Result<Option<AioDone>> {
        let len = buffer.len() as u64;
        self.submit(AioKind::Read, offset, len, buffer)
    }

    /// Writes all of `buffer` at `offset` (within the image's size).
    pub fn write(&mut self, offset: u64, buffer: Vec<u8>) -> Result<Option<AioDone>> {
        let len = buffer.len() as u64;
        self.submit(AioKind::Write, offset, len, buffer)
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<Option<AioDone>> {
        self.submit(AioKind::Discard, offset, len, Vec::new())
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<Option<AioDone>> {
        self.submit(AioKind::WriteZeroes, offset, len, Vec::new())
    }

    /// Waits for the oldest request; None when nothing is in flight.
    pub fn wait_oldest(&mut self) -> Option<Result<AioDone>> {
        let mut request = self.in_flight.pop_front()?;
        let rc = request.wait();
        let what = || {
            format!(
                "{} at {}+{}",
                self.image.describe(),
                request.offset,
                request.len
            )
        };
        let op = match request.kind {
            AioKind::Read => "read",
            AioKind::Write => "write",
            AioKind::Discard => "discard",
            AioKind::WriteZeroes => "write zeroes",
        };
        Some(check(rc as i64, op, what).map(|bytes| AioDone {
            kind: request.kind,
            offset: request.offset,
            len: request.len,
            // librbd returns 0 for a successful write or discard: it did it all.
            bytes: if request.kind == AioKind::Read {
                bytes
            } else {
                request.len
            },
            buffer: std::mem::take(&mut request.buffer),
        }))
    }

    /// Waits for everything in flight; the first failure, after all have ended.
    pub fn drain(&mut self) -> Result<Vec<AioDone>> {
        let mut done = Vec::with_capacity(self.in_flight.len());
        let mut first_error = None;
        while let Some(result) = self.wait_oldest() {
            match result {
                Ok(d) => done.push(d),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    fn submit(
        &mut self,
        kind: AioKind,
        offset: u64,
        len: u64,
        buffer: Vec<u8>,
    ) -> Result<Option<AioDone>> {
        let made_room = if self.is_full() {
            self.wait_oldest().transpose()?
        } else {
            None
        };
        let request = self
            .image
            .submit(kind, offset, len, buffer, self.op_flags)?;
        self.in_flight.push_back(request);
        Ok(made_room)
    }
}
