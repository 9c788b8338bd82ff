//! An open RBD image as a block device: positioned reads and writes that several copier
//! threads issue at once, writes kept in flight behind the caller (bounded; their errors
//! come back at the next write or flush), extents from librbd's diff (the object map when
//! fast-diff is valid), zeroing that stays thin. It never waits on a cluster known to be
//! stalled, and closing never holds up its caller for long.

use super::client::{Image, PendingWrite, RbdError};
use super::connection::Connection;
use crate::volume::device::{BlockDevice, IoHints};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::io;
use std::ops::{ControlFlow, Range};
use std::sync::Arc;
use std::sync::mpsc;

/// One RADOS object of a Cinder image (4 MiB): the request size that reaches the
/// cluster's speed without splitting.
pub const REQUEST_SIZE: usize = 4 << 20;
/// Requests in flight: the copier's workers, each with one 4 MiB request (a read, or a
/// zero-copy write it waits for) and librados' buffer for a read's reply. Chosen by
/// measuring 8, 12 and 16 with contrib/bench/rbd_backupfs.sh: more were no faster and
/// held more memory (contrib/bench/README.md, "backupfs with an `rbd` backend").
pub const QUEUE_DEPTH: usize = 12;
/// Writes kept in flight behind the callers (each holds its buffer until done).
pub const WRITES_BEHIND: usize = 4;

/// The io::Error for a failed librbd call: its errno, so that the FUSE layer and a
/// failed job answer with it; the full message is logged here.
pub(crate) fn io_error(e: RbdError) -> io::Error {
    tracing::warn!("{e}");
    io::Error::from_raw_os_error(e.errno())
}

/// An image (head or snapshot) opened for a backup, a restore or reads through the mount.
pub struct RbdDevice {
    image: Option<Arc<Image>>,
    connection: Arc<Connection>,
    describe: String,
    /// Serialises growing (writes past the end from several threads).
    resize: Mutex<()>,
    /// Extents from the object map (whole objects) rather than asking every object.
    fast_diff: bool,
    /// A read-only image's allocation map, read once from its object map (a request
    /// per copier chunk otherwise): nothing this device does changes it, and a writer
    /// elsewhere makes a backup of the head fail as in-use anyway.
    map: std::sync::OnceLock<Vec<Range<u64>>>,
    read_only: bool,
    /// Writes submitted and not yet waited for, oldest first.
    behind: Mutex<VecDeque<PendingWrite>>,
    /// The errno of a write that failed after its caller had gone on: the next write or
    /// flush reports it.
    failed: Mutex<Option<i32>>,
    /// Buffers of finished writes, for the next ones (4 MiB each: no mapping per write).
    spare: Mutex<Vec<Vec<u8>>>,
}

impl RbdDevice {
    pub fn new(image: Image, connection: Arc<Connection>) -> RbdDevice {
        let fast_diff = image.has_valid_fast_diff().unwrap_or(false);
        let read_only = image.is_read_only();
        RbdDevice {
            map: std::sync::OnceLock::new(),
            read_only,
            describe: format!("rbd:{}", image.describe()),
            image: Some(Arc::new(image)),
            connection,
            resize: Mutex::new(()),
            fast_diff,
            behind: Mutex::new(VecDeque::new()),
            failed: Mutex::new(None),
            spare: Mutex::new(Vec::new()),
        }
    }

    /// Waits for one write that was in flight; a failure is kept for the caller's next
    /// write or flush (and logged here, with its offset).
    fn settle(&self, write: PendingWrite) {
        match write.wait() {
            Ok(buffer) => {
                let mut spare = self.spare.lock();
                if spare.len() < WRITES_BEHIND {
                    spare.push(buffer);
                }
            }
            Err(e) => {
                let errno = e.errno();
                tracing::warn!("{e}");
                self.failed.lock().get_or_insert(errno);
            }
        }
    }

    /// Waits for every write in flight (before anything that must see them: reads,
    /// extents, zeroing, flush, close).
    fn drain(&self) {
        loop {
            let Some(write) = self.behind.lock().pop_front() else {
                return;
            };
            self.settle(write);
        }
    }

    /// Before a write of `len` bytes at `offset`: reports an earlier write's failure,
    /// grows the image to take it, and waits for pending writes it overlaps (librbd does
    /// not order requests in flight). False for an empty write: nothing to do.
    fn ready_to_write(&self, offset: u64, len: usize) -> io::Result<bool> {
        if len == 0 {
            return Ok(false);
        }
        let end = offset + len as u64;
        self.take_failure()?;
        self.grow(end)?;
        let overlaps = self
            .behind
            .lock()
            .iter()
            .any(|w| w.range().start < end && offset < w.range().end);
        if overlaps {
            self.drain();
            self.take_failure()?;
        }
        Ok(true)
    }

    /// The failure of an earlier write, once.
    fn take_failure(&self) -> io::Result<()> {
        match self.failed.lock().take() {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    /// The open image, shared: a write in flight holds it too, so that it is not closed
    /// under the write.
    fn image(&self) -> io::Result<&Arc<Image>> {
        self.image
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }

    /// Fails at once while the cluster is known not to answer; else counts the request
    /// as one that must be answered soon.
    fn probe(&self, what: &str) -> io::Result<super::connection::Probe<'_>> {
        self.connection
            .probe(&format!("{what} {}", self.describe))
            .map_err(io_error)
    }
}

impl Drop for RbdDevice {
    /// Closing an image that was written releases its lock and its watch: with a stalled
    /// cluster that takes up to three OSD timeouts. The caller (a FUSE close, a job) waits
    /// at most the quick limit; the close finishes in the background.
    fn drop(&mut self) {
        self.drain();
        if let Some(errno) = self.failed.lock().take() {
            tracing::warn!(
                "{}: a write failed after its caller went on ({}), and nobody flushed",
                self.describe,
                io::Error::from_raw_os_error(errno)
            );
        }
        let Some(image) = self.image.take() else {
            return;
        };
        let (done, finished) = mpsc::channel::<()>();
        let what = self.describe.clone();
        let spawned = std::thread::Builder::new()
            .name("rbd-close".to_string())
            .spawn(move || {
                drop(image);
                let _ = done.send(());
            });
        match spawned {
            Ok(_) => {
                if finished
                    .recv_timeout(self.connection.quick_limit())
                    .is_err()
                {
                    tracing::warn!("closing {what} goes on in the background: the cluster is slow");
                }
            }
            Err(e) => tracing::warn!("cannot start a thread to close {what}: {e}"),
        }
    }
}

impl BlockDevice for RbdDevice {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn size(&self) -> io::Result<u64> {
        self.image()?.size().map_err(io_error)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.drain();
        let image = self.image()?;
        let size = image.size().map_err(io_error)?;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let len = (size - offset).min(buf.len() as u64) as usize;
        let _probe = self.probe("read")?;
        let mut done = 0;
        while done < len {
            let n = image
                .read_at(&mut buf[done..len], offset + done as u64)
                .map_err(io_error)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// Returns once the write is submitted (and at most `WRITES_BEHIND` are in flight):
    /// librbd does not order requests in flight, so one that overlaps a pending write
    /// waits for all of them first.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.ready_to_write(offset, buf.len())? {
            return Ok(());
        }
        let _probe = self.probe("write")?;
        let mut buffer = self.spare.lock().pop().unwrap_or_default();
        buffer.clear();
        buffer.extend_from_slice(buf);
        let write = self
            .image()?
            .submit_write(offset, buffer)
            .map_err(io_error)?;
        let oldest = {
            let mut behind = self.behind.lock();
            behind.push_back(write);
            if behind.len() > WRITES_BEHIND {
                behind.pop_front()
            } else {
                None
            }
        };
        if let Some(oldest) = oldest {
            self.settle(oldest);
        }
        self.take_failure()
    }

    /// Zero-copy: librbd sends `buf` itself, and the call returns once it is written.
    fn write_at_waiting(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.ready_to_write(offset, buf.len())? {
            return Ok(());
        }
        let _probe = self.probe("write")?;
        self.image()?.write_waiting(buf, offset).map_err(io_error)
    }

    fn grow(&self, size: u64) -> io::Result<()> {
        let image = self.image()?;
        if size <= image.size().map_err(io_error)? {
            return Ok(());
        }
        let _resizing = self.resize.lock();
        if size > image.size().map_err(io_error)? {
            image.resize(size).map_err(io_error)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.drain();
        self.take_failure()?;
        let _probe = self.probe("flush")?;
        self.image()?.flush().map_err(io_error)
    }

    /// librbd's write-zeroes: whole objects are removed, partial ones zeroed, so the
    /// range reads as zeros whatever its alignment (a plain discard may skip pieces
    /// smaller than `rbd_discard_granularity_bytes`).
    fn discard(&self, range: Range<u64>) -> io::Result<()> {
        if range.is_empty() {
            return Ok(());
        }
        self.drain();
        self.take_failure()?;
        let image = self.image()?;
        let size = image.size().map_err(io_error)?;
        let end = range.end.min(size);
        if end <= range.start {
            return Ok(());
        }
        image
            .write_zeroes(range.start, end - range.start)
            .map_err(io_error)
    }

    /// Without fast-diff librbd asks every object of the range (one small request each);
    /// with it, the object map answers, a whole object at a time (read once for a
    /// read-only image).
    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        if range.is_empty() {
            return Ok(Vec::new());
        }
        if self.read_only && self.fast_diff {
            let map = match self.map.get() {
                Some(map) => map,
                None => {
                    let size = self.size()?;
                    let whole = self.allocated(0..size)?;
                    self.map.get_or_init(|| whole)
                }
            };
            return Ok(map
                .iter()
                .filter(|e| e.end > range.start && e.start < range.end)
                .map(|e| e.start.max(range.start)..e.end.min(range.end))
                .collect());
        }
        self.drain();
        self.allocated(range)
    }

    fn hints(&self) -> IoHints {
        IoHints {
            request_size: REQUEST_SIZE,
            queue_depth: QUEUE_DEPTH,
        }
    }
}

impl RbdDevice {
    /// librbd's allocation map of `range`, merged.
    fn allocated(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        let image = self.image()?;
        let _probe = self.probe("map")?;
        let mut extents: Vec<Range<u64>> = Vec::new();
        image
            .diff_iterate(None, range.clone(), true, self.fast_diff, |extent| {
                if extent.exists {
                    let piece =
                        extent.offset.max(range.start)..(extent.offset + extent.len).min(range.end);
                    if !piece.is_empty() {
                        match extents.last_mut() {
                            Some(last) if last.end >= piece.start => {
                                last.end = last.end.max(piece.end)
                            }
                            _ => extents.push(piece),
                        }
                    }
                }
                ControlFlow::Continue(())
            })
            .map_err(io_error)?;
        Ok(extents)
    }
}
