//! Writeback behind a restore's sequential writes to a local volume: started every 8 MiB,
//! waited for (and the pages dropped) 32 MiB behind, as the backup copier does, so that a
//! restore through the mount neither piles up dirty pages nor stalls at close.

/// Writeback is started for each this many bytes written in sequence.
const WRITEBACK_PIECE: u64 = 8 << 20;
/// Written data a restore through the mount may keep dirty before it waits for the disk:
/// the writes a window behind the newest are waited for.
const WRITEBACK_WINDOW: u64 = 32 << 20;

/// A run of sequential writes: where it goes on, and what of it is not yet handed to
/// writeback, or not yet waited for.
#[derive(Default)]
pub(super) struct Writeback {
    next: u64,
    kicked: u64,
    waited: u64,
}

/// What a write made due: writeback to start, and a range to wait for and drop.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Kick {
    pub(super) start: std::ops::Range<u64>,
    pub(super) waited: Option<std::ops::Range<u64>>,
}

impl Writeback {
    /// `offset..end` was written. A write elsewhere than where the last ended starts a new
    /// run (writes in another order are left to the kernel).
    pub(super) fn wrote(&mut self, offset: u64, end: u64) -> Option<Kick> {
        if offset != self.next || end < offset {
            *self = Writeback {
                next: end,
                kicked: offset,
                waited: offset,
            };
            return None;
        }
        self.next = end;
        if end - self.kicked < WRITEBACK_PIECE {
            return None;
        }
        let start = self.kicked..end;
        self.kicked = end;
        let behind = end.saturating_sub(WRITEBACK_WINDOW);
        let waited = (behind > self.waited).then(|| {
            let old = self.waited..behind;
            self.waited = behind;
            old
        });
        Some(Kick { start, waited })
    }
}

pub(super) fn sync_range(file: &std::fs::File, range: std::ops::Range<u64>, flags: libc::c_uint) {
    // SAFETY: sync_file_range takes integers and a borrowed descriptor.
    unsafe {
        libc::sync_file_range(
            std::os::fd::AsRawFd::as_raw_fd(file),
            range.start as libc::off64_t,
            (range.end - range.start) as libc::off64_t,
            flags,
        )
    };
}
