//! Where a restore's data came from: which processes opened backup images through the
//! mount, which of them were handed an error for a read, and the pipes between them and a
//! restore's writers. A restore is judged by it when it ends; it never refuses a request.

use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// How long image uses and read failures are remembered (as long as `restores` lists).
const KEPT: Duration = Duration::from_secs(2 * 3600);
/// At most this many closed image uses and read failures of root's processes are
/// remembered, and as many of other users' (admin_group): memory stays bounded whatever
/// readers do, and no other user can push root's out (only root restores).
const MAX_KEPT: usize = 1024;

/// A process (thread group) and the pipes it held when it was seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    /// 0: not known (the thread was gone before /proc could say).
    pub tgid: u32,
    /// Runs as root (real uid 0); false when not known.
    root: bool,
    /// Pipes whose write end it held (pipefs inode numbers).
    pipes_out: Vec<u64>,
    /// Pipes whose read end it held.
    pipes_in: Vec<u64>,
}

impl Process {
    /// The process of thread `tid` (FUSE requests carry the caller's thread id), and its
    /// pipes, as /proc shows them now; just the thread id if /proc cannot tell.
    pub fn of_thread(tid: u32) -> Process {
        let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|value| value.split_whitespace().next())
                .and_then(|value| value.parse::<u32>().ok())
        };
        let tgid = field("Tgid:").unwrap_or(tid);
        let mut process = Process {
            tgid,
            root: field("Uid:") == Some(0),
            ..Process::default()
        };
        if tgid == 0 {
            return process;
        }
        let Ok(fds) = std::fs::read_dir(format!("/proc/{tgid}/fd")) else {
            return process;
        };
        for fd in fds.flatten() {
            // readlink and fdinfo never enter a filesystem (no FUSE request to ourselves).
            let Some(pipe) = std::fs::read_link(fd.path())
                .ok()
                .and_then(|target| pipe_inode(&target.to_string_lossy()))
            else {
                continue;
            };
            let info = std::fs::read_to_string(format!(
                "/proc/{tgid}/fdinfo/{}",
                fd.file_name().to_string_lossy()
            ))
            .unwrap_or_default();
            match fd_access_mode(&info) {
                Some(libc::O_RDONLY) => process.pipes_in.push(pipe),
                Some(libc::O_WRONLY) => process.pipes_out.push(pipe),
                // Not known (it closed meanwhile) or both: count it both ways.
                _ => {
                    process.pipes_in.push(pipe);
                    process.pipes_out.push(pipe);
                }
            }
        }
        process
    }

    /// Whether what `self` read may be what `writer` wrote: the same process, or `self`
    /// holds the write end of a pipe whose read end `writer` holds (`cat img | dd of=vol`).
    /// Two processes that merely share where they write (a shell's captured stderr) are
    /// not linked: neither reads what the other writes.
    fn feeds(&self, writer: &Process) -> bool {
        (self.tgid != 0 && self.tgid == writer.tgid) || self.feeds_by_pipe(writer)
    }

    fn feeds_by_pipe(&self, writer: &Process) -> bool {
        self.pipes_out.iter().any(|p| writer.pipes_in.contains(p))
    }
}

/// `pipe:[12345]` → 12345.
fn pipe_inode(link: &str) -> Option<u64> {
    link.strip_prefix("pipe:[")?.strip_suffix(']')?.parse().ok()
}

/// The access mode of a descriptor from its fdinfo (`flags:` in octal).
fn fd_access_mode(fdinfo: &str) -> Option<i32> {
    let flags = fdinfo
        .lines()
        .find_map(|line| line.strip_prefix("flags:"))?
        .trim();
    i32::from_str_radix(flags, 8)
        .ok()
        .map(|f| f & libc::O_ACCMODE)
}

/// A backup image open through the mount.
#[derive(Debug, Clone)]
struct ImageUse {
    /// The mount's handle number (reused once closed: `opened` tells the uses apart).
    handle: u64,
    opened: Instant,
    backup_id: String,
    /// Where the image's last block holding data starts (None: no data, or no checksums
    /// to tell).
    last_data_block: Option<u64>,
    opener: Process,
    closed: Option<Instant>,
}

/// An image read answered with an error.
#[derive(Debug, Clone)]
struct ReadFailure {
    at: Instant,
    /// The image handle read through.
    handle: u64,
    backup_id: String,
    reason: String,
    /// The process that asked, and the one that opened the image (they share the open
    /// file: a child that inherited it, or the same).
    reader: Process,
    opener: Process,
}

/// What a restore's writers had to do with backup images.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Findings {
    /// A read of an image that fed the restore failed: why.
    pub failure: Option<String>,
    /// The image that fed the restore whose last data block starts first: (backup id,
    /// offset). A restore that wrote nothing at or past it ended short.
    pub last_data_block: Option<(String, u64)>,
}

#[derive(Default)]
pub(super) struct Provenance {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Open image handles of the mount, by handle number.
    open: HashMap<u64, ImageUse>,
    closed: VecDeque<ImageUse>,
    failures: VecDeque<ReadFailure>,
}

impl Provenance {
    pub(super) fn image_opened(
        &self,
        handle: u64,
        backup_id: &str,
        last_data_block: Option<u64>,
        opener: Process,
    ) {
        self.state.lock().open.insert(
            handle,
            ImageUse {
                handle,
                opened: Instant::now(),
                backup_id: backup_id.to_string(),
                last_data_block,
                opener,
                closed: None,
            },
        );
    }

    pub(super) fn image_closed(&self, handle: u64) {
        let mut state = self.state.lock();
        if let Some(mut used) = state.open.remove(&handle) {
            used.closed = Some(Instant::now());
            state.closed.push_back(used);
            prune(&mut state.closed, |u| u.closed, |u| u.opener.root);
        }
    }

    pub(super) fn read_failed(&self, handle: u64, reader: Process, reason: &str) {
        let mut state = self.state.lock();
        let (backup_id, opener) = match state.open.get(&handle) {
            Some(used) => (used.backup_id.clone(), used.opener.clone()),
            None => (String::new(), reader.clone()),
        };
        state.failures.push_back(ReadFailure {
            at: Instant::now(),
            handle,
            backup_id,
            reason: reason.to_string(),
            reader,
            opener,
        });
        prune(&mut state.failures, |f| Some(f.at), |f| f.reader.root);
    }

    /// What fed a restore that began at `since` and whose writers (its openers and every
    /// process that changed it) are `writers`. A read failure counts if one of the writers
    /// was handed it (or shares the image's open file with the one that was) since the
    /// restore began, or earlier through an image file still open when the restore began
    /// (a tool that reads the whole image before it opens the volume), or if the process
    /// handed it holds a pipe into a writer (then also just before: `cat` may fail before
    /// `dd` opens the volume). An image counts if such a process held it open while the
    /// restore ran.
    pub(super) fn judge(&self, writers: &[Process], since: Instant) -> Findings {
        let state = self.state.lock();
        let mut findings = Findings::default();
        for failure in &state.failures {
            // The image file the failed read went through, still open when the restore
            // began (the use of that handle that was open at the failure).
            let held = || {
                state.open.values().chain(state.closed.iter()).any(|used| {
                    used.handle == failure.handle
                        && used.opened <= failure.at
                        && used.closed.is_none_or(|closed| closed >= since)
                })
            };
            let linked = writers.iter().any(|w| {
                let same = [&failure.reader, &failure.opener]
                    .iter()
                    .any(|p| p.tgid != 0 && p.tgid == w.tgid);
                (same && (failure.at >= since || held()))
                    || failure.reader.feeds_by_pipe(w)
                    || failure.opener.feeds_by_pipe(w)
            });
            if linked {
                findings.failure = Some(format!(
                    "a read of backup {} that fed it failed ({})",
                    failure.backup_id, failure.reason
                ));
                break;
            }
        }
        let used = state.open.values().chain(state.closed.iter());
        for image in used {
            if image.closed.is_some_and(|closed| closed < since)
                || !writers.iter().any(|w| image.opener.feeds(w))
            {
                continue;
            }
            if let Some(at) = image.last_data_block
                && findings
                    .last_data_block
                    .as_ref()
                    .is_none_or(|(_, first)| at < *first)
            {
                findings.last_data_block = Some((image.backup_id.clone(), at));
            }
        }
        findings
    }
}

/// Forgets the oldest entries of root's, or of other users', past `MAX_KEPT` each, and
/// those older than `KEPT`.
fn prune<T>(
    entries: &mut VecDeque<T>,
    at: impl Fn(&T) -> Option<Instant>,
    root: impl Fn(&T) -> bool,
) {
    for class in [true, false] {
        let mut excess = entries
            .iter()
            .filter(|e| root(e) == class)
            .count()
            .saturating_sub(MAX_KEPT);
        while excess > 0 {
            let Some(oldest) = entries.iter().position(|e| root(e) == class) else {
                break;
            };
            entries.remove(oldest);
            excess -= 1;
        }
    }
    while entries
        .front()
        .and_then(&at)
        .is_some_and(|t| t.elapsed() > KEPT)
    {
        entries.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(tgid: u32, pipes_out: &[u64], pipes_in: &[u64]) -> Process {
        Process {
            tgid,
            root: false,
            pipes_out: pipes_out.to_vec(),
            pipes_in: pipes_in.to_vec(),
        }
    }

    #[test]
    fn other_users_failures_never_push_roots_out() {
        let provenance = Provenance::default();
        let root_dd = Process {
            root: true,
            ..process(40, &[], &[])
        };
        let since = Instant::now();
        provenance.image_opened(1, "bad", Some(0), root_dd.clone());
        provenance.read_failed(1, root_dd.clone(), "EIO");
        for i in 0..3 * MAX_KEPT as u64 {
            let reader = process(41, &[], &[]);
            provenance.image_opened(100 + i, "bad", Some(0), reader.clone());
            provenance.read_failed(100 + i, reader, "EIO");
            provenance.image_closed(100 + i);
        }
        let state = provenance.state.lock();
        assert_eq!(state.failures.len(), MAX_KEPT + 1, "bounded all the same");
        assert_eq!(state.closed.len(), MAX_KEPT);
        drop(state);
        let found = provenance.judge(&[root_dd], since);
        assert!(found.failure.unwrap().contains("backup bad"));
    }

    #[test]
    fn parses_pipes_and_access_modes() {
        assert_eq!(pipe_inode("pipe:[4242]"), Some(4242));
        assert_eq!(pipe_inode("socket:[4242]"), None);
        assert_eq!(pipe_inode("/dev/null"), None);
        assert_eq!(
            fd_access_mode("pos:\t0\nflags:\t02000001\nmnt_id:\t15\n"),
            Some(libc::O_WRONLY)
        );
        assert_eq!(fd_access_mode("flags:\t0100000\n"), Some(libc::O_RDONLY));
        assert_eq!(fd_access_mode("pos: 0\n"), None);
    }

    #[test]
    fn a_failure_counts_for_the_same_process_only_after_the_restore_began() {
        let provenance = Provenance::default();
        let cp = process(10, &[], &[]);
        provenance.image_opened(1, "old", Some(0), cp.clone());
        provenance.read_failed(1, cp.clone(), "EIO");
        provenance.image_closed(1);
        std::thread::sleep(Duration::from_millis(2));
        let since = Instant::now();
        assert_eq!(
            provenance.judge(std::slice::from_ref(&cp), since).failure,
            None
        );
        // The same handle number, reused by a later open: not the image that failed.
        provenance.image_opened(1, "new", Some(0), cp.clone());
        assert_eq!(
            provenance.judge(std::slice::from_ref(&cp), since).failure,
            None
        );
        provenance.read_failed(1, cp.clone(), "EIO");
        assert!(provenance.judge(&[cp], since).failure.is_some());
    }

    #[test]
    fn a_failure_through_an_image_still_open_when_the_restore_began_counts() {
        let provenance = Provenance::default();
        // A tool reads the whole image (one read fails), then opens the volume.
        let tool = process(11, &[], &[]);
        provenance.image_opened(1, "bad", Some(0), tool.clone());
        provenance.read_failed(1, tool.clone(), "EIO");
        std::thread::sleep(Duration::from_millis(2));
        let since = Instant::now();
        let found = provenance.judge(std::slice::from_ref(&tool), since);
        assert!(found.failure.unwrap().contains("backup bad"));
        // Also once it closed the image during the restore.
        provenance.image_closed(1);
        assert!(provenance.judge(&[tool], since).failure.is_some());
    }

    #[test]
    fn a_failure_counts_through_a_pipe_but_not_a_shared_output() {
        let provenance = Provenance::default();
        // cat holds the write end of pipe 7 (its stdout) and of the shell's captured
        // stderr 9; dd holds pipe 7's read end, and also writes to 9.
        let cat = process(20, &[7, 9], &[]);
        let dd = process(21, &[9], &[7]);
        let other = process(22, &[9], &[]);
        provenance.image_opened(1, "bad", Some(4 << 20), cat.clone());
        provenance.read_failed(1, cat.clone(), "EIO");
        provenance.image_closed(1);
        std::thread::sleep(Duration::from_millis(2));
        // dd opened the volume after cat failed and exited: a pipe links them all the same.
        let since = Instant::now();
        let found = provenance.judge(&[dd], since);
        assert!(found.failure.unwrap().contains("backup bad"));
        assert_eq!(found.last_data_block, None, "closed before: not judged");
        assert_eq!(provenance.judge(&[other], since), Findings::default());
    }

    #[test]
    fn the_first_last_data_block_of_the_images_that_fed_a_restore_is_the_bar() {
        let provenance = Provenance::default();
        let tool = process(30, &[], &[]);
        let since = Instant::now();
        provenance.image_opened(1, "a", Some(8 << 20), tool.clone());
        provenance.image_opened(2, "b", Some(2 << 20), tool.clone());
        provenance.image_opened(3, "empty", None, tool.clone());
        provenance.image_opened(4, "elsewhere", Some(0), process(31, &[], &[]));
        provenance.image_closed(1);
        assert_eq!(
            provenance.judge(&[tool], since).last_data_block,
            Some(("b".to_string(), 2 << 20))
        );
    }

    #[test]
    fn an_image_closed_before_the_restore_began_does_not_count() {
        let provenance = Provenance::default();
        let tool = process(40, &[], &[]);
        provenance.image_opened(1, "a", Some(0), tool.clone());
        provenance.image_closed(1);
        std::thread::sleep(Duration::from_millis(2));
        let since = Instant::now();
        assert_eq!(provenance.judge(&[tool], since), Findings::default());
    }

    #[test]
    fn this_process_is_seen_with_its_pipes() {
        let (reader, writer) = std::io::pipe().unwrap();
        let me = Process::of_thread(std::process::id());
        assert_eq!(me.tgid, std::process::id());
        assert!(me.feeds(&me));
        assert!(!me.pipes_in.is_empty() && !me.pipes_out.is_empty());
        drop((reader, writer));
    }
}
