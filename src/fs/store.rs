//! Pushing checked blocks into the kernel's page cache (FUSE_NOTIFY_STORE): when a small
//! read made the daemon read and check a whole 1 MiB block, the rest of that block is
//! handed to the kernel too, so the next small reads in it (a filesystem inside a backup,
//! read 4 KiB at a time) never come back. Only checked data is ever stored. A thread of
//! its own does it, after the read was answered (the kernel locks the pages of a read in
//! flight), and drops work rather than queue it without bound: it is only a cache.

use crate::volume::device::AlignedBuf;
use fuser::{INodeNo, Notifier};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use tracing::debug;

/// Blocks waiting to be stored, at most: each holds a checked 1 MiB block, so this bounds
/// the memory the queue keeps (8 MiB; 32 was 32 MiB more at the peak, issue 28). The
/// four read threads each offer one block per read, which the store thread passes on
/// in a fraction of the time the read took.
const QUEUED: usize = 8;

type Store = (u64, u64, Arc<AlignedBuf>);

pub struct StoreQueue {
    sender: SyncSender<Store>,
    notifier: Arc<OnceLock<Notifier>>,
}

impl StoreQueue {
    pub fn new() -> std::io::Result<StoreQueue> {
        let (sender, receiver) = sync_channel::<Store>(QUEUED);
        let notifier: Arc<OnceLock<Notifier>> = Arc::new(OnceLock::new());
        let worker = notifier.clone();
        std::thread::Builder::new()
            .name("fuse-store".into())
            .spawn(move || run(receiver, worker))?;
        Ok(StoreQueue { sender, notifier })
    }

    /// Where the session's notifier goes once the session exists.
    pub fn notifier_slot(&self) -> Arc<OnceLock<Notifier>> {
        self.notifier.clone()
    }

    /// The session's notifier, once the session exists.
    pub fn notifier(&self) -> Option<&Notifier> {
        self.notifier.get()
    }

    /// Offers a checked block of inode `ino` at `offset` to the kernel's cache.
    pub fn offer(&self, ino: u64, offset: u64, data: Arc<AlignedBuf>) {
        if self.notifier.get().is_none() {
            return;
        }
        match self.sender.try_send((ino, offset, data)) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => debug!("the store thread is gone"),
        }
    }
}

fn run(receiver: Receiver<Store>, notifier: Arc<OnceLock<Notifier>>) {
    for (ino, offset, data) in receiver {
        let Some(notifier) = notifier.get() else {
            continue;
        };
        // An inode the kernel has forgotten (ENOENT) simply is not cached.
        if let Err(e) = notifier.store(INodeNo(ino), offset, &data) {
            debug!("notify store of inode {ino:#x} at {offset}: {e}");
        }
    }
}
