//! The job model: one backup or verify job, shared by the queue, its worker, the `jobs`
//! listing and whoever waits for it. Waiting never needs a thread: a waiter leaves a
//! callback that the worker calls when the job ends.

use super::error::EngineError;
use crate::copy::Progress;
use crate::ids::{BackupId, VolumeId};
use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::warn;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    Backup,
    /// A check of a whole backup against its checksums.
    Verify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Snapshotting,
    Copying,
    Finishing,
    Verifying,
    Available,
    Error,
}

impl Phase {
    pub fn ended(self) -> bool {
        matches!(self, Phase::Available | Phase::Error)
    }
}

/// Why a job failed: the one-line reason, and the error itself while the daemon that ran
/// the job lives (jobs listed again after a restart know only the reason).
#[derive(Debug, Clone)]
pub struct Failure {
    pub reason: String,
    pub cause: Option<Arc<EngineError>>,
}

impl Failure {
    pub fn of(error: EngineError) -> Failure {
        Failure {
            reason: error.reason(),
            cause: Some(Arc::new(error)),
        }
    }
}

type Waiter = Box<dyn FnOnce(Result<(), &Failure>) + Send>;

struct JobState {
    phase: Phase,
    failure: Option<Failure>,
    ended_at: Option<Instant>,
    waiters: Vec<Waiter>,
}

/// One job.
pub struct Job {
    pub kind: JobKind,
    pub backup_id: BackupId,
    pub volume_id: VolumeId,
    pub backend: String,
    pub pool: String,
    pub target: String,
    pub name: Option<String>,
    pub size: u64,
    /// A backup that copies only what changed since its volume's newest backup.
    pub incremental: bool,
    state: Mutex<JobState>,
    ended: Condvar,
    pub progress: Progress,
    pub cancel: AtomicBool,
    /// Bytes of the target's free space a backup was granted when it was accepted: what
    /// it may store (see `still_reserved`).
    pub reserved: AtomicU64,
    /// A backup's claim on its volume, on a target that several nodes serve.
    pub claim: std::sync::OnceLock<Arc<crate::targets::lease::Claim>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("kind", &self.kind)
            .field("backup_id", &self.backup_id)
            .field("volume_id", &self.volume_id)
            .finish()
    }
}

/// What a job is about: the backup, its volume and where both are.
#[derive(Debug, Clone)]
pub struct JobSubject {
    pub backup_id: BackupId,
    pub volume_id: VolumeId,
    pub backend: String,
    pub pool: String,
    pub target: String,
    pub name: Option<String>,
    pub size: u64,
    pub incremental: bool,
}

impl Job {
    pub fn new(kind: JobKind, subject: JobSubject) -> Job {
        Job::with_phase(kind, subject, Phase::Queued, None, None)
    }

    /// A job that has already ended (listed again from its record after a restart).
    pub fn ended(subject: JobSubject, failure: Option<Failure>, age: Duration) -> Job {
        let phase = if failure.is_some() {
            Phase::Error
        } else {
            Phase::Available
        };
        let ended_at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let job = Job::with_phase(JobKind::Backup, subject, phase, failure, Some(ended_at));
        job.progress.total.store(job.size, Ordering::Relaxed);
        job
    }

    fn with_phase(
        kind: JobKind,
        subject: JobSubject,
        phase: Phase,
        failure: Option<Failure>,
        ended_at: Option<Instant>,
    ) -> Job {
        Job {
            kind,
            backup_id: subject.backup_id,
            volume_id: subject.volume_id,
            backend: subject.backend,
            pool: subject.pool,
            target: subject.target,
            name: subject.name,
            size: subject.size,
            incremental: subject.incremental,
            state: Mutex::new(JobState {
                phase,
                failure,
                ended_at,
                waiters: Vec::new(),
            }),
            ended: Condvar::new(),
            progress: Progress::default(),
            cancel: AtomicBool::new(false),
            reserved: AtomicU64::new(0),
            claim: std::sync::OnceLock::new(),
        }
    }

    pub fn phase(&self) -> Phase {
        self.state.lock().phase
    }

    pub fn set_phase(&self, phase: Phase) {
        self.state.lock().phase = phase;
    }

    pub fn ended_at(&self) -> Option<Instant> {
        self.state.lock().ended_at
    }

    /// What is left of the job's reservation: the part of the volume it has not copied
    /// yet (what it copied already takes the target's space, so it is no longer
    /// reserved); nothing once the job has ended.
    pub fn still_reserved(&self) -> u64 {
        if self.ended_at().is_some() {
            return 0;
        }
        let reserved = self.reserved.load(Ordering::Relaxed);
        let (done, total) = self.progress.get();
        if total == 0 {
            return reserved;
        }
        let left = total.saturating_sub(done) as u128;
        (reserved as u128 * left / total as u128) as u64
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// Calls `waiter` once the job has ended (at once if it has), from whichever thread
    /// ends it. The waiter must not block.
    pub fn on_end(&self, waiter: impl FnOnce(Result<(), &Failure>) + Send + 'static) {
        let mut state = self.state.lock();
        if !state.phase.ended() {
            state.waiters.push(Box::new(waiter));
            return;
        }
        let failure = state.failure.clone();
        drop(state);
        waiter(failure.as_ref().map_or(Ok(()), Err));
    }

    /// Blocks until the job has ended.
    pub fn wait(&self) -> Result<(), Failure> {
        let mut state = self.state.lock();
        while !state.phase.ended() {
            self.ended.wait(&mut state);
        }
        state.failure.clone().map_or(Ok(()), Err)
    }

    /// Ends the job and calls its waiters.
    pub fn finish(&self, failure: Option<Failure>) {
        let mut state = self.state.lock();
        state.phase = if failure.is_some() {
            Phase::Error
        } else {
            Phase::Available
        };
        state.failure = failure.clone();
        state.ended_at = Some(Instant::now());
        let waiters = std::mem::take(&mut state.waiters);
        self.ended.notify_all();
        drop(state);
        for waiter in waiters {
            waiter(failure.as_ref().map_or(Ok(()), Err));
        }
    }

    pub fn status(&self) -> JobStatus {
        let state = self.state.lock();
        let (done, total) = self.progress.get();
        JobStatus {
            kind: self.kind,
            backup_id: self.backup_id.clone(),
            volume_id: self.volume_id.clone(),
            target: self.target.clone(),
            phase: state.phase,
            done: if state.phase == Phase::Available {
                self.size
            } else {
                done
            },
            total: if total == 0 { self.size } else { total },
            error: state.failure.as_ref().map(|f| f.reason.clone()),
        }
    }
}

/// A line of `jobs`.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub kind: JobKind,
    pub backup_id: BackupId,
    pub volume_id: VolumeId,
    pub target: String,
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
    pub error: Option<String>,
}

impl JobStatus {
    pub fn state(&self) -> &'static str {
        match (self.kind, self.phase) {
            (JobKind::Verify, Phase::Queued) => "verify-queued",
            (JobKind::Verify, Phase::Available) => "verified",
            (JobKind::Verify, Phase::Error) => "verify-failed",
            (_, Phase::Queued) => "queued",
            (_, Phase::Snapshotting) => "snapshotting",
            (_, Phase::Copying) => "copying",
            (_, Phase::Finishing) => "finishing",
            (_, Phase::Verifying) => "verifying",
            (_, Phase::Available) => "available",
            (_, Phase::Error) => "error",
        }
    }

    /// `<backup-id> <volume-id> <state> <done>/<total>[ <error>]`, always one line.
    pub fn line(&self) -> String {
        super::error::status_line(
            self.backup_id.as_str(),
            self.volume_id.as_str(),
            self.state(),
            (self.done, self.total),
            self.error.as_deref(),
        )
    }
}

/// A test hook: with `BACKUPFS_TEST_PAUSE=<point>[,<point>...]` in the daemon's
/// environment, a job holds still at those points so a test can act exactly there: until
/// it is cancelled, or, with `BACKUPFS_TEST_RELEASE=<file>`, until that file exists,
/// cancelled or not (a test can then see jobs queued behind it, or the daemon while it
/// stops, for as long as it needs). Points: `started` (a worker took the job),
/// `snapshotting` (snapshot made, copy not started), `finishing` (data copied, record not
/// yet available), `settling` (available and answered, data not settled yet),
/// `verifying`, `deleting` (a deletion's record says `deleting`, nothing is removed yet;
/// also a deletion by `keep_last`).
pub fn pause_point(point: &str, cancel: &AtomicBool) {
    let Ok(points) = std::env::var("BACKUPFS_TEST_PAUSE") else {
        return;
    };
    if !points.split(',').any(|p| p == point) {
        return;
    }
    let release = std::env::var_os("BACKUPFS_TEST_RELEASE").map(std::path::PathBuf::from);
    warn!("BACKUPFS_TEST_PAUSE: job holding at {point}");
    while !release
        .as_ref()
        .map_or_else(|| cancel.load(Ordering::Relaxed), |file| file.exists())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn subject() -> JobSubject {
        JobSubject {
            backup_id: BackupId::parse("0c1e2f3a-aaaa-4bbb-8ccc-123456789abc").unwrap(),
            volume_id: VolumeId::parse("v").unwrap(),
            backend: "be".into(),
            pool: "p".into(),
            target: "t".into(),
            name: None,
            size: 10,
            incremental: false,
        }
    }

    #[test]
    fn waiters_are_called_once_whether_before_or_after_the_end() {
        let job = Job::new(JobKind::Backup, subject());
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        job.on_end(move |r| {
            assert!(r.is_err());
            c.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(calls.load(Ordering::Relaxed), 0);
        job.finish(Some(Failure::of(EngineError::NotFound("gone".into()))));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        let c = calls.clone();
        job.on_end(move |r| {
            assert_eq!(r.unwrap_err().reason, "gone");
            c.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        assert!(job.wait().is_err());
    }

    #[test]
    fn a_jobs_line_is_one_line_whatever_its_error() {
        let job = Job::new(JobKind::Backup, subject());
        job.finish(Some(Failure {
            reason: "qemu-img: a\nb".into(),
            cause: None,
        }));
        let line = job.status().line();
        assert_eq!(
            line,
            "0c1e2f3a-aaaa-4bbb-8ccc-123456789abc v error 0/10 qemu-img: a; b"
        );
        let verify = Job::new(JobKind::Verify, subject());
        assert_eq!(
            verify.status().line(),
            "0c1e2f3a-aaaa-4bbb-8ccc-123456789abc v verify-queued 0/10"
        );
    }
}
