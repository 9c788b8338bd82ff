//! Restores: a volume opened for writing through the mount. While a writer lives the
//! volume refuses backups, and it holds the volume the way a hypervisor would see it (the
//! driver's write lock, a qcow2 export with QEMU's locks); dropping the last writer frees
//! the volume at once. It never writes a volume that something outside backupfs uses.

use super::image::CheckedImage;
use super::provenance::Process;
use super::*;
use crate::copy::{self, Range};
use crate::volume::device::BlockDevice;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Instant;
use tracing::{error, warn};
use writeback::{Kick, Writeback, sync_range};

/// The note a volume carries (an extended attribute `user.backupfs.restore` of its file):
/// a restore in progress, or one that left it incomplete; none once a restore succeeded.
pub const RESTORE_NOTE: &str = "restore";
/// How long ended restores stay listed in `restores`.
const ENDED_RESTORE_TTL: Duration = Duration::from_secs(2 * 3600);
/// Threads of a restore's writers looked up in /proc, at most: a restore is judged by the
/// processes of the first ones (a process with more threads is one of them already).
const MAX_WRITER_THREADS: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreState {
    Restoring,
    Restored,
    Failed,
}

impl RestoreState {
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreState::Restoring => "restoring",
            RestoreState::Restored => "restored",
            RestoreState::Failed => "failed",
        }
    }
}

/// A line of `restores`.
#[derive(Debug, Clone)]
pub struct RestoreStatus {
    pub backend: String,
    pub volume_id: String,
    pub state: RestoreState,
    pub done: u64,
    /// The size of the image being copied in (0 when not known: plain writes).
    pub total: u64,
    pub error: Option<String>,
}

impl RestoreStatus {
    /// `<backend> <volume-id> <state> <done>/<total>[ <error>]`, one line.
    pub fn line(&self) -> String {
        super::error::status_line(
            &self.backend,
            &self.volume_id,
            self.state.as_str(),
            (self.done, self.total),
            self.error.as_deref(),
        )
    }
}

/// What is known of one restore, while it runs and for a while after.
#[derive(Debug)]
pub(super) struct RestoreTrack {
    status: Mutex<RestoreStatus>,
    ended_at: Mutex<Option<Instant>>,
}

impl RestoreTrack {
    pub(super) fn status(&self) -> RestoreStatus {
        self.status.lock().clone()
    }

    pub(super) fn expired(&self) -> bool {
        self.ended_at
            .lock()
            .is_some_and(|t| t.elapsed() >= ENDED_RESTORE_TTL)
    }
}

/// Largest piece of a server-side copy checked and then copied at once: the kernel copies
/// what was just checked, while it is still in the page cache.
const CHECKED_COPY_PIECE: u64 = 64 << 20;

/// Marks a volume as being restored and attaches it for writing; refused while a backup of
/// it is queued or running, or while something outside backupfs uses it. Writers of the
/// same volume share one restore (one attachment, one lock).
pub(super) fn claim_restore(
    inner: &Arc<Inner>,
    backend_name: &str,
    info: &VolumeInfo,
    session: Option<Arc<RestoreSession>>,
) -> Result<Arc<VolumeWriter>> {
    let backend = inner.backend(backend_name)?;
    let key = (backend_name.to_string(), info.id.clone());
    {
        let mut state = inner.state.lock();
        if state.stopping {
            return Err(EngineError::Busy("backupfs is stopping".to_string()));
        }
        match state.busy.get(&key) {
            Some(Busy::Backup) => {
                return Err(EngineError::Busy(format!(
                    "volume {} has a backup queued or running",
                    info.id
                )));
            }
            Some(Busy::Opening) => {
                return Err(EngineError::Busy(format!(
                    "volume {} is being opened for a restore",
                    info.id
                )));
            }
            Some(Busy::Restore(writer)) => {
                if let Some(writer) = writer.upgrade() {
                    return Ok(writer);
                }
            }
            None => {}
        }
        state.busy.insert(key.clone(), Busy::Opening);
    }
    let opened = attach_for_restore(backend, info);
    let mut state = inner.state.lock();
    match opened {
        Ok(attachment) => {
            let session = session.unwrap_or_else(|| {
                Arc::new(RestoreSession {
                    inner: inner.clone(),
                    driver: backend.driver.clone(),
                    key: key.clone(),
                    pool: info.pool.clone(),
                    written: AtomicU64::new(0),
                    copied: AtomicU64::new(0),
                    image_size: AtomicU64::new(0),
                    reached: AtomicU64::new(0),
                    copied_from: Mutex::new(None),
                    writers: Mutex::new(Writers::default()),
                    last_writer: AtomicU32::new(u32::MAX),
                    failure: Mutex::new(None),
                    track: Mutex::new(None),
                    opened: Instant::now(),
                })
            });
            let writer = Arc::new(VolumeWriter {
                size: AtomicU64::new(info.size),
                attachment: Some(attachment),
                resize: Mutex::new(()),
                writeback: Mutex::new(Writeback::default()),
                session,
            });
            state
                .busy
                .insert(key, Busy::Restore(Arc::downgrade(&writer)));
            Ok(writer)
        }
        Err(e) => {
            state.busy.remove(&key);
            Err(e)
        }
    }
}

fn attach_for_restore(backend: &Backend, info: &VolumeInfo) -> Result<Attachment> {
    if let Some(why) = backend.driver.in_use(&info.pool, &info.id)? {
        return Err(EngineError::Busy(format!(
            "volume {} is in-use ({why})",
            info.id
        )));
    }
    // The driver takes its write lock and checks again under it (a hypervisor may have
    // started in between).
    backend
        .driver
        .attach(&info.pool, &info.id, Access::Write)
        .map_err(|e| match e {
            VolumeError::Busy(why) => {
                EngineError::Busy(format!("volume {} is in-use ({why})", info.id))
            }
            other => other.into(),
        })
}

/// A volume open for a restore. While it lives, the volume refuses backups and is held
/// the way a hypervisor sees it.
pub struct VolumeWriter {
    size: AtomicU64,
    attachment: Option<Attachment>,
    /// Serialises size changes (writes past the end, truncates).
    resize: Mutex<()>,
    /// Where the writes through the mount have got to, for starting writeback behind them.
    writeback: Mutex<Writeback>,
    /// The restore this writer's changes belong to (it may outlive the writer); also
    /// which volume, on which driver.
    session: Arc<RestoreSession>,
}

/// One restore, as the operator sees it: listed in `restores`, noted on the volume while
/// it runs, and when it ends, whether it left the volume complete. It lives as long as
/// whoever writes it (a file handle may let its writer go and take a new one: a process
/// that duplicated the descriptor and closed one copy), and ends when the last goes.
pub struct RestoreSession {
    inner: Arc<Inner>,
    driver: Arc<dyn VolumeDriver>,
    key: (String, String),
    pool: String,
    written: AtomicU64,
    copied: AtomicU64,
    /// The size of the image copied in server-side (0: not known): the total in
    /// `restores`.
    image_size: AtomicU64,
    /// The end of the furthest byte written or copied: a restore that fed on an image and
    /// never reached its last data block ended short.
    reached: AtomicU64,
    /// The image copied in server-side: (backup id, start of its last data block).
    copied_from: Mutex<Option<(String, u64)>>,
    /// Who opened and changed the volume: what its data came from is judged by them.
    writers: Mutex<Writers>,
    /// The thread `took_part` saw last: a copy's writes come from one thread, so each
    /// write after its first needs no lock (FUSE writes pass here).
    last_writer: AtomicU32,
    /// The first thing that went wrong: the volume is incomplete.
    failure: Mutex<Option<String>>,
    /// Listed in `restores` from the first change on.
    track: Mutex<Option<Arc<RestoreTrack>>>,
    opened: Instant,
}

/// The processes that opened or changed a restore's volume.
#[derive(Default)]
struct Writers {
    threads: HashSet<u32>,
    processes: Vec<Process>,
}

impl Drop for VolumeWriter {
    fn drop(&mut self) {
        // Detached first (locks released, exports stopped), then the volume is free for
        // backups: nobody can find it claimed and yet held.
        if let Some(attachment) = self.attachment.take()
            && let Err(e) = self.session.driver.detach(attachment)
        {
            warn!(
                volume_id = self.session.key.1,
                "detach after a restore: {e}"
            );
            self.session.fail(&format!("detach: {e}"));
        }
        let mut state = self.session.inner.state.lock();
        if let Some(Busy::Restore(writer)) = state.busy.get(&self.session.key)
            && std::ptr::eq(writer.as_ptr(), self)
        {
            state.busy.remove(&self.session.key);
        }
    }
}

impl Drop for RestoreSession {
    fn drop(&mut self) {
        self.finish();
    }
}

impl RestoreSession {
    /// The restore ends (its opener closed the volume, or the last file is gone): its
    /// outcome is logged, listed and noted on the volume before the close returns. More
    /// changes through a duplicated descriptor resume it.
    pub fn finish(&self) {
        let track = self.track.lock().clone();
        if track
            .as_ref()
            .is_some_and(|track| track.ended_at.lock().is_some())
        {
            return;
        }
        // Judged anew at each end (a resumed restore may reach further), after the
        // failures of its own I/O, which stay.
        let judged = self.judge(track.is_some());
        let failure = self.failure.lock().clone().or(judged);
        let track = match track {
            Some(track) => track,
            // Opened and closed without a change, and nothing went wrong: no restore.
            None if failure.is_none() => return,
            // Refused before it changed anything (no room, the image's first read failed):
            // a failed restore all the same, listed and noted on the volume.
            None => self.listed(),
        };
        let (written, copied) = (
            self.written.load(Ordering::Relaxed),
            self.copied.load(Ordering::Relaxed),
        );
        let secs = self.opened.elapsed().as_secs_f64();
        let note = match &failure {
            None => {
                info!(
                    backend = self.key.0,
                    volume_id = self.key.1,
                    bytes_written = written,
                    bytes_copied_server_side = copied,
                    seconds = format!("{secs:.2}"),
                    "restore into volume ended"
                );
                None
            }
            Some(reason) => {
                error!(
                    backend = self.key.0,
                    volume_id = self.key.1,
                    bytes_written = written,
                    bytes_copied_server_side = copied,
                    "restore into volume failed: {reason}; the volume is incomplete, restore it again"
                );
                Some(format!("incomplete: {reason} ({})", now()))
            }
        };
        if let Err(e) = self
            .driver
            .set_note(&self.pool, &self.key.1, RESTORE_NOTE, note.as_deref())
        {
            warn!(
                volume_id = self.key.1,
                "cannot note the restore's outcome on the volume: {e}"
            );
        }
        let state = if failure.is_some() {
            RestoreState::Failed
        } else {
            RestoreState::Restored
        };
        {
            let mut status = track.status.lock();
            status.state = state;
            status.done = written + copied;
            status.error = failure;
        }
        *track.ended_at.lock() = Some(Instant::now());
        self.inner.counters.restore_ended(state);
    }

    /// Judges what the restore's data came from: an image read that failed for a process
    /// that fed it fails it; so does a restore that `changed` the volume and never wrote
    /// into the last data block of the image it fed on (cut off, killed, `head -c`). The
    /// last data block (not the image's end) is the bar, so a restore that skips zeros
    /// (`cp --sparse=always`) and ends on a hole is whole.
    fn judge(&self, changed: bool) -> Option<String> {
        let writers = self.writers.lock().processes.clone();
        let findings = self.inner.provenance.judge(&writers, self.opened);
        if findings.failure.is_some() || !changed {
            return findings.failure;
        }
        let copied_from = self.copied_from.lock().clone();
        let bar = [findings.last_data_block, copied_from]
            .into_iter()
            .flatten()
            .min_by_key(|(_, at)| *at);
        let reached = self.reached.load(Ordering::Relaxed);
        match bar {
            Some((backup_id, at)) if reached <= at => Some(format!(
                "ended short: its writes ended at byte {reached}, before the last data of \
                 backup {backup_id} (the block at byte {at})"
            )),
            _ => None,
        }
    }

    /// A process (by one of its threads, as FUSE names it) opened or changed the volume.
    pub fn took_part(&self, thread: u32) {
        if self.last_writer.swap(thread, Ordering::Relaxed) == thread {
            return;
        }
        {
            let mut writers = self.writers.lock();
            if writers.threads.len() >= MAX_WRITER_THREADS || !writers.threads.insert(thread) {
                return;
            }
        }
        // Outside the lock: /proc is read for the process's pipes.
        let process = Process::of_thread(thread);
        let mut writers = self.writers.lock();
        if !writers.processes.contains(&process) {
            writers.processes.push(process);
        }
    }

    /// The restore's line in `restores`, made on its first change (or when it ends,
    /// refused before any).
    fn listed(&self) -> Arc<RestoreTrack> {
        let mut track = self.track.lock();
        track
            .get_or_insert_with(|| {
                let new = Arc::new(RestoreTrack {
                    status: Mutex::new(RestoreStatus {
                        backend: self.key.0.clone(),
                        volume_id: self.key.1.clone(),
                        state: RestoreState::Restoring,
                        done: 0,
                        total: self.image_size.load(Ordering::Relaxed),
                        error: None,
                    }),
                    ended_at: Mutex::new(None),
                });
                self.inner.restores.lock().push(new.clone());
                new
            })
            .clone()
    }

    /// A change begins: the restore is listed, and the volume noted as being restored
    /// (the note stays if backupfs dies before the end).
    fn begin(&self) {
        let track = self.track.lock();
        if let Some(existing) = track.as_ref() {
            // Resumed after its opener's close: the same restore, running again.
            let mut ended_at = existing.ended_at.lock();
            if ended_at.take().is_none() {
                return;
            }
            let mut status = existing.status.lock();
            status.state = RestoreState::Restoring;
            status.error = None;
        } else {
            drop(track);
            self.listed();
        }
        let note = format!("in progress since {}", now());
        if let Err(e) = self
            .driver
            .set_note(&self.pool, &self.key.1, RESTORE_NOTE, Some(&note))
        {
            warn!(
                volume_id = self.key.1,
                "cannot note the restore on the volume: {e}"
            );
        }
    }

    /// Something went wrong: the volume is incomplete (the first reason is kept).
    fn fail(&self, reason: &str) {
        self.failure
            .lock()
            .get_or_insert_with(|| reason.to_string());
    }

    /// Runs a change of the volume: listed, progress counted, a failure remembered.
    fn change<T>(&self, done: impl FnOnce() -> Result<T>) -> Result<T> {
        self.begin();
        let result = done();
        if let Err(e) = &result {
            self.fail(&e.reason());
        }
        if let Some(track) = self.track.lock().as_ref() {
            let mut status = track.status.lock();
            status.done =
                self.written.load(Ordering::Relaxed) + self.copied.load(Ordering::Relaxed);
            status.total = self.image_size.load(Ordering::Relaxed);
        }
        result
    }

    fn changed(&self) -> bool {
        self.written.load(Ordering::Relaxed) + self.copied.load(Ordering::Relaxed) > 0
    }
}

impl VolumeWriter {
    pub fn backend(&self) -> &str {
        &self.session.key.0
    }

    /// The restore this writer's changes count for.
    pub fn session(&self) -> Arc<RestoreSession> {
        self.session.clone()
    }

    /// A process (by one of its threads) opened or changed the volume: the restore is
    /// judged by what that process read.
    pub fn took_part(&self, thread: u32) {
        self.session.took_part(thread);
    }

    pub fn volume_id(&self) -> &str {
        &self.session.key.1
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// The attached volume, for reads through the same handle.
    pub fn device(&self) -> Result<&dyn BlockDevice> {
        Ok(self.attachment()?.device.as_ref())
    }

    fn attachment(&self) -> Result<&Attachment> {
        self.attachment.as_ref().ok_or_else(|| {
            EngineError::io("restore", std::io::Error::from_raw_os_error(libc::EBADF))
        })
    }

    fn io_error(&self, op: &str, source: std::io::Error) -> EngineError {
        EngineError::io(
            format!("{op} volume {}/{}", self.backend(), self.volume_id()),
            source,
        )
    }

    fn grow_to(&self, end: u64) -> Result<()> {
        if end <= self.size() {
            return Ok(());
        }
        let _guard = self.resize.lock();
        if end > self.size() {
            self.device()?
                .grow(end)
                .map_err(|e| self.io_error("grow", e))?;
            self.size.fetch_max(end, Ordering::Relaxed);
        }
        Ok(())
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<usize> {
        self.session.change(|| self.write_data(offset, data))
    }

    fn write_data(&self, offset: u64, data: &[u8]) -> Result<usize> {
        let end = offset + data.len() as u64;
        // The device grows by itself when written past its end.
        self.device()?
            .write_at(data, offset)
            .map_err(|e| self.io_error("write", e))?;
        self.size.fetch_max(end, Ordering::Relaxed);
        self.write_behind(offset, end);
        self.session.reached.fetch_max(end, Ordering::Relaxed);
        self.session
            .written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(data.len())
    }

    /// A restore by `cp` or `dd` writes a local volume front to back, 1 MiB at a time, into
    /// its page cache: without help all of it is written back at the close (the opener's
    /// `close` waits for that), after the copy. Behind a run of sequential writes the
    /// writeback of each 8 MiB written is started at once, and the piece a window back is
    /// dropped from the page cache as far as it is written back: the disk works while the
    /// copy goes on, and a restore does not push the node's cache out (issue 28). No write
    /// waits for the disk here: `cp` has one write in flight, so a wait stalled its reads
    /// too (a tenth of the writes took 3-8 ms, 0.4 s of a 1 GiB restore); dirty pages are
    /// bounded by the kernel's dirty limits, as for any writer of a local file.
    /// Failures only lose the optimisation; the flush at the end still reports errors.
    fn write_behind(&self, offset: u64, end: u64) {
        let Some(file) = self.device().ok().and_then(|device| device.local_file()) else {
            return;
        };
        let Some(Kick { start, dropped }) = self.writeback.lock().wrote(offset, end) else {
            return;
        };
        sync_range(file, start, libc::SYNC_FILE_RANGE_WRITE);
        if let Some(old) = dropped {
            // SAFETY: fadvise takes integers and a borrowed descriptor.
            unsafe {
                libc::posix_fadvise(
                    std::os::fd::AsRawFd::as_raw_fd(file),
                    old.start as libc::off_t,
                    (old.end - old.start) as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                )
            };
        }
    }

    /// Volumes never shrink: a smaller size zeroes everything past it and keeps the size;
    /// a larger one extends the volume.
    pub fn set_size(&self, size: u64) -> Result<()> {
        self.session.change(|| self.resize_to(size))
    }

    fn resize_to(&self, size: u64) -> Result<()> {
        let current = self.size();
        if size >= current {
            return self.grow_to(size);
        }
        let _guard = self.resize.lock();
        self.device()?
            .discard(size..current)
            .map_err(|e| self.io_error("zero", e))
    }

    /// Zeroes a range inside the volume (a hole where the storage can).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.session.change(|| self.zero(offset, len))
    }

    fn zero(&self, offset: u64, len: u64) -> Result<()> {
        let end = (offset + len).min(self.size());
        if end > offset {
            self.device()?
                .discard(offset..end)
                .map_err(|e| self.io_error("zero", e))?;
        }
        Ok(())
    }

    /// Server-side copy of `len` bytes of a backup image into this volume: each piece is
    /// checked against its checksums, then copied by the kernel's copy_file_range (a
    /// reflink where both sit on one filesystem) where both are local files, by the
    /// generic copier otherwise; holes are discarded with the volume's own rules. Returns
    /// the bytes copied (short at the image's end).
    /// The image is the one the caller has open, so a backup deleted meanwhile stays
    /// readable to the end of the copy, as any open file does.
    pub fn copy_from_backup(
        &self,
        image: &BackupImage,
        offset_in: u64,
        offset_out: u64,
        len: u64,
    ) -> Result<u64> {
        if !self.session.changed() {
            self.session
                .image_size
                .fetch_max(image.size, Ordering::Relaxed);
            // The whole image is coming: a restore that cannot fit fails before it writes
            // (and is a failed restore, though it changed nothing).
            if let Err(e) = self.check_room(image) {
                self.session.fail(&e.reason());
                return Err(e);
            }
        }
        if let Some(at) = image.last_data_block() {
            let mut copied_from = self.session.copied_from.lock();
            if copied_from.as_ref().is_none_or(|(_, first)| at < *first) {
                *copied_from = Some((image.backup_id.to_string(), at));
            }
        }
        self.session
            .change(|| self.copy_in(image, offset_in, offset_out, len))
    }

    /// Whether the volume's pool can take the image's data (beyond what the volume holds).
    fn check_room(&self, image: &BackupImage) -> Result<()> {
        let Some(free) = self.session.driver.free_space(&self.session.pool)? else {
            return Ok(());
        };
        let held = self
            .session
            .driver
            .stat(&self.session.pool, &self.session.key.1)
            .map(|info| info.allocated)
            .unwrap_or(0);
        let needed = image.stored_bytes.saturating_sub(held);
        if needed > free {
            let e = EngineError::NoSpace(format!(
                "volume {}/{}: backup {} holds {} bytes of data, the pool has {free} bytes free",
                self.session.key.0, self.session.key.1, image.backup_id, image.stored_bytes
            ));
            return Err(e);
        }
        Ok(())
    }

    fn copy_in(
        &self,
        image: &BackupImage,
        offset_in: u64,
        offset_out: u64,
        len: u64,
    ) -> Result<u64> {
        let len = len.min(image.size.saturating_sub(offset_in));
        if len == 0 {
            return Ok(0);
        }
        self.grow_to(offset_out + len)?;
        let device = self.device()?;
        if !same_filesystem(image.device(), device) {
            // The kernel cannot copy between them (EXDEV, or no file on one side): one
            // pass through our buffers, each block checked as it is read.
            let range = Range {
                src_offset: offset_in,
                dst_offset: offset_out,
                len,
            };
            copy::copy_unflushed_through(&CheckedImage(image), device, range)?;
            self.session.copied.fetch_add(len, Ordering::Relaxed);
            self.session
                .reached
                .fetch_max(offset_out + len, Ordering::Relaxed);
            return Ok(len);
        }
        let piece_at = |done: u64| (len - done).min(CHECKED_COPY_PIECE);
        // The kernel may reflink or copy within the filesystem: each piece is checked
        // before it is copied (damaged data is never restored silently), the next one
        // while this one copies.
        image.verify_range(offset_in, piece_at(0))?;
        let mut done = 0;
        while done < len {
            let piece = piece_at(done);
            let next = done + piece;
            let range = Range {
                src_offset: offset_in + done,
                dst_offset: offset_out + done,
                len: piece,
            };
            let (copied, checked) = std::thread::scope(|scope| {
                let checker = (next < len)
                    .then(|| scope.spawn(|| image.verify_range(offset_in + next, piece_at(next))));
                let copied = copy::copy_kernel(image.device(), device, range);
                (copied, checker.map(|checker| checker.join()))
            });
            copied?;
            match checked {
                Some(Ok(checked)) => checked?,
                Some(Err(panic)) => std::panic::resume_unwind(panic),
                None => {}
            }
            done = next;
            self.session.copied.fetch_add(piece, Ordering::Relaxed);
            self.session
                .reached
                .fetch_max(offset_out + done, Ordering::Relaxed);
        }
        Ok(len)
    }

    /// Makes what was written durable; a failure fails the restore (writes the storage
    /// accepted may still be lost: the volume is not known to hold them).
    pub fn sync(&self) -> Result<()> {
        let synced = self
            .device()
            .and_then(|device| device.flush().map_err(|e| self.io_error("flush", e)));
        if let Err(e) = &synced {
            self.session.fail(&e.reason());
        }
        synced
    }
}

/// Whether both devices are local files on one filesystem, where copy_file_range can
/// share or copy data without it passing through the daemon.
fn same_filesystem(a: &dyn BlockDevice, b: &dyn BlockDevice) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.local_file(), b.local_file()) {
        (Some(a), Some(b)) => match (a.metadata(), b.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev(),
            _ => false,
        },
        _ => false,
    }
}

mod writeback;

#[cfg(test)]
mod tests;
