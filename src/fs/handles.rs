//! Open files of the mount. A volume's handle holds its attachment only while the file is
//! in use: `close` (FUSE flush) detaches it at once, so a hypervisor that starts right
//! after `cp` or a backup finds the volume free; a later write through a duplicated
//! descriptor attaches it again. Open files are counted per user and in all, and an open
//! beyond the caps is refused before any work is done for it.

use super::control::ControlFile;
use crate::engine::{BackupImage, Engine, EngineError, RestoreSession, VolumeWriter};
use crate::ids::VolumeId;
use crate::volume::Attachment;
use crate::volume::device::BlockDevice;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub(super) enum Handle {
    /// `request` or `verify`: a write starts work, a read gives its answer.
    Control(ControlFile),
    /// A status file rendered at open (procfs-like, read with direct I/O).
    Text(Vec<u8>),
    Image(BackupImage),
    Volume(VolumeHandle),
    Dir(super::tree::Listing),
}

/// What a volume handle has attached.
#[derive(Clone)]
pub(super) enum Attached {
    Read(Arc<Attachment>),
    Write(Arc<VolumeWriter>),
}

impl Attached {
    pub(super) fn device(&self) -> Result<&dyn BlockDevice, EngineError> {
        match self {
            Attached::Read(attachment) => Ok(attachment.device.as_ref()),
            Attached::Write(writer) => writer.device(),
        }
    }
}

pub(super) struct VolumeHandle {
    pub backend: String,
    pub volume_id: VolumeId,
    pub writable: bool,
    /// The process that opened the file: its close lets the volume go. (A child that
    /// inherited the descriptor closes it too, at exec or exit: that is not the end.)
    opener: u32,
    attached: Mutex<Option<Attached>>,
    /// The restore a writable handle's changes count for, across re-attachments: it ends
    /// when the handle is released.
    session: Option<Arc<RestoreSession>>,
}

/// The process (thread group) of a thread the kernel names in a request.
pub(super) fn process_of(pid: u32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Tgid:"))
                .and_then(|tgid| tgid.trim().parse().ok())
        })
        .unwrap_or(pid)
}

impl VolumeHandle {
    pub(super) fn new(
        backend: &str,
        volume_id: &VolumeId,
        attached: Attached,
        opener: u32,
    ) -> VolumeHandle {
        let session = match &attached {
            Attached::Write(writer) => Some(writer.session()),
            Attached::Read(_) => None,
        };
        VolumeHandle {
            backend: backend.to_string(),
            volume_id: volume_id.clone(),
            writable: session.is_some(),
            opener,
            attached: Mutex::new(Some(attached)),
            session,
        }
    }

    /// Whether a close by `process` is the opener's.
    pub(super) fn closed_by_opener(&self, process: u32) -> bool {
        process == self.opener
    }

    /// The attachment, attaching again if a close let it go.
    pub(super) fn attached(&self, engine: &Engine) -> Result<Attached, EngineError> {
        if let Some(attached) = self.attached.lock().as_ref() {
            return Ok(attached.clone());
        }
        let attached = if let Some(session) = &self.session {
            Attached::Write(engine.reopen_restore(
                &self.backend,
                &self.volume_id,
                session.clone(),
            )?)
        } else {
            Attached::Read(Arc::new(
                engine.open_volume_read(&self.backend, &self.volume_id)?,
            ))
        };
        let mut slot = self.attached.lock();
        Ok(slot.get_or_insert(attached).clone())
    }

    pub(super) fn writer(&self, engine: &Engine) -> Result<Arc<VolumeWriter>, EngineError> {
        match self.attached(engine)? {
            Attached::Write(writer) => Ok(writer),
            Attached::Read(_) => Err(EngineError::io(
                "write",
                std::io::Error::from_raw_os_error(libc::EBADF),
            )),
        }
    }

    /// Ends the handle's restore now (its opener closed the file): logged, listed and
    /// noted on the volume. A later write through a duplicated descriptor resumes it.
    pub(super) fn finish_restore(&self) {
        if let Some(session) = &self.session {
            session.finish();
        }
    }

    /// Lets the attachment go (the caller drops it, off the session's threads: detaching
    /// a qcow2 export waits for qemu-storage-daemon).
    pub(super) fn detach(&self) -> Option<Attached> {
        self.attached.lock().take()
    }
}

/// Descriptors kept back from the handle and export budgets for everything else the
/// daemon holds: pools, targets, locks, the FUSE device, librados' sockets.
const RESERVED_DESCRIPTORS: u64 = 256;
/// Beyond this many open files the daemon's memory (a checksum table per image), not its
/// descriptors, is what runs out.
const MAX_HANDLES: usize = 4096;

/// How many files of the mount may be open at once: in all, and per user other than
/// root. Each open file may hold up to two descriptors of the daemon (an image's data and
/// its sums; a volume's device), so both follow from RLIMIT_NOFILE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub total: usize,
    /// What users other than root may hold together: root (Cinder, the operator) always
    /// keeps the rest, however many users fill theirs.
    pub users: usize,
    pub per_user: usize,
    /// Of the open files that hold a qcow2 export (images of a `qcow2` target), what
    /// users other than root may hold together and each: backups need exports too.
    pub exporting_users: usize,
    pub exporting_per_user: usize,
}

impl Limits {
    /// The caps for a soft RLIMIT_NOFILE of `nofile` and at most `exports` qcow2 exports
    /// (docs/operating.md, "limits").
    pub(crate) fn for_descriptors(nofile: u64, exports: usize) -> Limits {
        let spare =
            usize::try_from(nofile.saturating_sub(RESERVED_DESCRIPTORS) / 2).unwrap_or(MAX_HANDLES);
        let total = spare.clamp(8, MAX_HANDLES);
        Limits {
            total,
            users: total - total / 4,
            // Six users at their cap fill the users' share: one never locks out the rest.
            per_user: (total / 8).max(2),
            exporting_users: (exports / 2).max(1),
            exporting_per_user: (exports / 8).max(1),
        }
    }

    /// The caps for this process's soft RLIMIT_NOFILE.
    pub(crate) fn of_process() -> (Limits, u64) {
        use nix::sys::resource::{Resource, getrlimit};
        // The usual default if the call fails (it cannot for this resource).
        let nofile = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
        let exports = crate::volume::qcow2::max_live_exports();
        (Limits::for_descriptors(nofile, exports), nofile)
    }
}

/// Why an open was refused for want of room (EMFILE).
#[derive(Debug, thiserror::Error)]
pub(crate) enum LimitError {
    #[error("{open} files of the mount are open, the most it serves at once")]
    Total { open: usize },
    #[error(
        "users other than root have {open} files of the mount open, the most they may together"
    )]
    Users { open: usize },
    #[error("uid {uid} has {open} files of the mount open, the most one user other than root may")]
    PerUser { uid: u32, open: usize },
    #[error(
        "users other than root have {open} images of qcow2 targets open (each holds a qcow2 export), the most they may together"
    )]
    ExportingUsers { open: usize },
    #[error(
        "uid {uid} has {open} images of qcow2 targets open (each holds a qcow2 export), the most one user other than root may"
    )]
    ExportingPerUser { uid: u32, open: usize },
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_uid: HashMap<u32, usize>,
    /// Open files of users other than root that hold a qcow2 export.
    exporting_users: usize,
    exporting_per_uid: HashMap<u32, usize>,
}

/// The open files, counted per user against the `Limits`.
pub(super) struct Table {
    handles: Mutex<HashMap<u64, (Arc<Handle>, Slot)>>,
    counts: Arc<Mutex<Counts>>,
    limits: Limits,
    next_fh: AtomicU64,
}

/// Room for one open file, taken before the work of the open (attaching a volume may
/// start a process) and given back when dropped, whether the open succeeded or not.
pub(super) struct Slot {
    counts: Arc<Mutex<Counts>>,
    uid: u32,
    /// Counted among the files that hold a qcow2 export.
    exporting: bool,
}

/// One less in `map[uid]`, forgetting users with none.
fn decrement(map: &mut HashMap<u32, usize>, uid: u32) {
    if let Some(open) = map.get_mut(&uid) {
        *open = open.saturating_sub(1);
        if *open == 0 {
            map.remove(&uid);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        counts.total = counts.total.saturating_sub(1);
        decrement(&mut counts.per_uid, self.uid);
        if self.exporting {
            counts.exporting_users = counts.exporting_users.saturating_sub(1);
            decrement(&mut counts.exporting_per_uid, self.uid);
        }
    }
}

impl Table {
    pub(super) fn new(limits: Limits) -> Table {
        Table {
            handles: Mutex::new(HashMap::new()),
            counts: Arc::new(Mutex::new(Counts::default())),
            limits,
            next_fh: AtomicU64::new(1),
        }
    }

    /// Room for one more open file of `uid`, one that holds a qcow2 export if
    /// `exporting`; root is held to the total only.
    pub(super) fn reserve(&self, uid: u32, exporting: bool) -> Result<Slot, LimitError> {
        let mut counts = self.counts.lock();
        if counts.total >= self.limits.total {
            return Err(LimitError::Total { open: counts.total });
        }
        let open = counts.per_uid.get(&uid).copied().unwrap_or(0);
        if uid != 0 {
            let users = counts.total - counts.per_uid.get(&0).copied().unwrap_or(0);
            if users >= self.limits.users {
                return Err(LimitError::Users { open: users });
            }
            if open >= self.limits.per_user {
                return Err(LimitError::PerUser { uid, open });
            }
        }
        let exporting = exporting && uid != 0;
        let exporting_open = counts.exporting_per_uid.get(&uid).copied().unwrap_or(0);
        if exporting {
            if counts.exporting_users >= self.limits.exporting_users {
                return Err(LimitError::ExportingUsers {
                    open: counts.exporting_users,
                });
            }
            if exporting_open >= self.limits.exporting_per_user {
                return Err(LimitError::ExportingPerUser {
                    uid,
                    open: exporting_open,
                });
            }
            counts.exporting_users += 1;
            counts.exporting_per_uid.insert(uid, exporting_open + 1);
        }
        counts.total += 1;
        counts.per_uid.insert(uid, open + 1);
        Ok(Slot {
            counts: self.counts.clone(),
            uid,
            exporting,
        })
    }

    /// Puts `handle` in the room `slot` holds, until `remove`.
    pub(super) fn insert(&self, slot: Slot, handle: Handle) -> u64 {
        self.insert_with(slot, handle, |_, _| {})
    }

    /// Inserts a handle, running `noted` with its number before any request can use it.
    pub(super) fn insert_with(
        &self,
        slot: Slot,
        handle: Handle,
        noted: impl FnOnce(u64, &Handle),
    ) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        noted(fh, &handle);
        self.handles.lock().insert(fh, (Arc::new(handle), slot));
        fh
    }

    pub(super) fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        self.handles
            .lock()
            .get(&fh)
            .map(|(handle, _)| handle.clone())
    }

    /// Takes a released file out; its room is free again at once.
    pub(super) fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        let removed = self.handles.lock().remove(&fh);
        removed.map(|(handle, _slot)| handle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_descriptor_limit() {
        assert_eq!(
            Limits::for_descriptors(1024, 48),
            Limits {
                total: 384,
                users: 288,
                per_user: 48,
                exporting_users: 24,
                exporting_per_user: 6
            }
        );
        assert_eq!(
            Limits::for_descriptors(320, 4),
            Limits {
                total: 32,
                users: 24,
                per_user: 4,
                exporting_users: 2,
                exporting_per_user: 1
            }
        );
        // Tiny or huge limits still give a usable, bounded table.
        assert_eq!(Limits::for_descriptors(0, 1).total, 8);
        assert_eq!(Limits::for_descriptors(0, 1).per_user, 2);
        assert_eq!(Limits::for_descriptors(u64::MAX, 64).total, MAX_HANDLES);
    }

    #[test]
    fn per_user_cap_spares_root_and_rooms_come_back() {
        let table = Table::new(Limits {
            total: 5,
            users: 4,
            per_user: 2,
            exporting_users: 1,
            exporting_per_user: 1,
        });
        let first = table.reserve(1000, false).unwrap();
        let _second = table.reserve(1000, false).unwrap();
        assert!(matches!(
            table.reserve(1000, false),
            Err(LimitError::PerUser { uid: 1000, open: 2 })
        ));
        // Another user and root still get room, root past the per-user cap.
        let _other = table.reserve(1001, false).unwrap();
        let _root = [
            table.reserve(0, false).unwrap(),
            table.reserve(0, false).unwrap(),
        ];
        assert!(matches!(
            table.reserve(0, false),
            Err(LimitError::Total { open: 5 })
        ));
        // A released file (or a failed open) gives its room back.
        let fh = table.insert(first, Handle::Text(Vec::new()));
        assert!(table.remove(fh).is_some());
        let _again = table.reserve(1000, false).unwrap();
    }

    #[test]
    fn users_together_leave_roots_share() {
        let table = Table::new(Limits {
            total: 8,
            users: 6,
            per_user: 2,
            exporting_users: 1,
            exporting_per_user: 1,
        });
        let _users: Vec<Slot> = (1000..1003)
            .flat_map(|uid| {
                [
                    table.reserve(uid, false).unwrap(),
                    table.reserve(uid, false).unwrap(),
                ]
            })
            .collect();
        // A fourth user finds the users' share full; root still opens.
        assert!(matches!(
            table.reserve(1003, false),
            Err(LimitError::Users { open: 6 })
        ));
        let _root = [
            table.reserve(0, false).unwrap(),
            table.reserve(0, false).unwrap(),
        ];
        assert!(matches!(
            table.reserve(0, false),
            Err(LimitError::Total { open: 8 })
        ));
    }

    #[test]
    fn users_hold_a_share_of_the_qcow2_exports() {
        let table = Table::new(Limits {
            total: 100,
            users: 75,
            per_user: 12,
            exporting_users: 3,
            exporting_per_user: 2,
        });
        let a = [
            table.reserve(1000, true).unwrap(),
            table.reserve(1000, true).unwrap(),
        ];
        assert!(matches!(
            table.reserve(1000, true),
            Err(LimitError::ExportingPerUser { uid: 1000, open: 2 })
        ));
        // Files without an export are not held back; another user gets the rest.
        let _plain = table.reserve(1000, false).unwrap();
        let _b = table.reserve(1001, true).unwrap();
        assert!(matches!(
            table.reserve(1002, true),
            Err(LimitError::ExportingUsers { open: 3 })
        ));
        // Root is held by the export cap itself, not by the users' share.
        let _root = [
            table.reserve(0, true).unwrap(),
            table.reserve(0, true).unwrap(),
        ];
        drop(a);
        let _again = table.reserve(1002, true).unwrap();
    }
}
