//! Writeback behind a restore's sequential writes to a local volume: started every 8 MiB,
//! and the pages already written back dropped 32 MiB behind, so that a restore through the
//! mount neither stalls at close nor pushes the node's page cache out. Unlike the backup
//! copier it never waits for the disk: the writer is the operator's `cp`, one write at a
//! time.

/// Writeback is started for each this many bytes written in sequence.
const WRITEBACK_PIECE: u64 = 8 << 20;
/// How far behind the newest write the pages written back are dropped from the page cache.
const WRITEBACK_WINDOW: u64 = 32 << 20;

/// A run of sequential writes: where it goes on, and what of it is not yet handed to
/// writeback, or not yet dropped.
#[derive(Default)]
pub(super) struct Writeback {
    next: u64,
    kicked: u64,
    dropped: u64,
}

/// What a write made due: writeback to start, and a range to wait for and drop.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Kick {
    pub(super) start: std::ops::Range<u64>,
    pub(super) dropped: Option<std::ops::Range<u64>>,
}

impl Writeback {
    /// `offset..end` was written. A write elsewhere than where the last ended starts a new
    /// run (writes in another order are left to the kernel).
    pub(super) fn wrote(&mut self, offset: u64, end: u64) -> Option<Kick> {
        if offset != self.next || end < offset {
            *self = Writeback {
                next: end,
                kicked: offset,
                dropped: offset,
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
        let dropped = (behind > self.dropped).then(|| {
            let old = self.dropped..behind;
            self.dropped = behind;
            old
        });
        Some(Kick { start, dropped })
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
