//! Open files of the mount. A volume's handle holds its attachment only while the file is
//! in use: `close` (FUSE flush) detaches it at once, so a hypervisor that starts right
//! after `cp` or a backup finds the volume free; a later write through a duplicated
//! descriptor attaches it again.

use super::control::ControlFile;
use super::tree::Node;
use crate::engine::{Engine, EngineError, Image, RestoreSession, VolumeWriter};
use crate::ids::VolumeId;
use crate::volume::Attachment;
use crate::volume::device::BlockDevice;
use parking_lot::Mutex;
use std::sync::Arc;

pub(super) enum Handle {
    /// `request` or `verify`: a write starts work, a read gives its answer.
    Control(ControlFile),
    /// A status file rendered at open (procfs-like, read with direct I/O).
    Text(Vec<u8>),
    Image(Image),
    Volume(VolumeHandle),
    Dir(Vec<(Node, String)>),
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
