//! The engine: the job queue, the generic attach-and-copy backup pipeline (written once,
//! against the `VolumeDriver` primitives), restores, and crash recovery at start-up.
//! It knows nothing of FUSE; it never leaves a partial backup or a snapshot behind.

pub mod image;
mod recovery;
pub mod request;
mod restore;

use crate::config::{Config, DriverKind};
use crate::copy::{self, CopyError, CopyOptions, Progress, Range};
use crate::target::record::{Record, Status, rfc3339};
use crate::target::{BackupTarget, TargetError, VolumeTarget};
use crate::volume::file::FileDriver;
use crate::volume::qcow2::Qcow2Driver;
use crate::volume::{Access, Attachment, VolumeDriver, VolumeError, VolumeInfo, is_valid_id};
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};
use tracing::{error, info, warn};

pub use image::Image;
pub use request::BackupRequest;
pub use restore::VolumeWriter;
use restore::claim_restore;

/// How long ended jobs stay listed in `jobs`.
const ENDED_JOB_TTL: Duration = Duration::from_secs(2 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    NotPermitted(String),
    /// A job ended in error; `errno` is the OS error behind it (EIO when there was none).
    #[error("backup {backup_id} failed: {reason}")]
    JobFailed {
        backup_id: String,
        errno: i32,
        reason: String,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Copy(#[from] CopyError),
    /// Stored data that does not match its checksums.
    #[error("backup {backup_id} is damaged: blocks {} (of 1 MiB) do not match their checksums", blocks.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))]
    Damaged { backup_id: String, blocks: Vec<u64> },
    #[error("{op}: {source}")]
    Io { op: String, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, EngineError>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Snapshotting,
    Copying,
    Finishing,
    Available,
    Error,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Snapshotting => "snapshotting",
            Phase::Copying => "copying",
            Phase::Finishing => "finishing",
            Phase::Available => "available",
            Phase::Error => "error",
        }
    }

    fn ended(self) -> bool {
        matches!(self, Phase::Available | Phase::Error)
    }
}

#[derive(Debug)]
struct JobState {
    phase: Phase,
    /// (errno, reason) of a failed job.
    error: Option<(i32, String)>,
    ended_at: Option<Instant>,
}

/// One backup job, shared by the queue, its worker and whoever waits for it.
#[derive(Debug)]
pub struct Job {
    pub backup_id: String,
    pub volume_id: String,
    pub backend: String,
    pub pool: String,
    pub target: String,
    pub name: Option<String>,
    pub size: u64,
    state: Mutex<JobState>,
    ended: Condvar,
    progress: Progress,
    cancel: AtomicBool,
}

/// A line of `jobs`.
#[derive(Debug, Clone)]
pub struct JobStatus {
    pub backup_id: String,
    pub volume_id: String,
    pub target: String,
    pub phase: Phase,
    pub done: u64,
    pub total: u64,
    pub error: Option<String>,
}

impl JobStatus {
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} {} {} {}/{}",
            self.backup_id,
            self.volume_id,
            self.phase.as_str(),
            self.done,
            self.total
        );
        if let Some(error) = &self.error {
            line.push(' ');
            line.push_str(error);
        }
        line
    }
}

struct Backend {
    driver: Arc<dyn VolumeDriver>,
    /// Pools that serve volumes (not those a target holds backups in).
    volume_pools: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Busy {
    Backup,
    Restore(usize),
}

#[derive(Default)]
struct State {
    jobs: Vec<Arc<Job>>,
    queue: VecDeque<Arc<Job>>,
    busy: HashMap<(String, String), Busy>,
    stopping: bool,
}

struct Inner {
    config: Config,
    /// Held for the daemon's lifetime: one daemon per state directory.
    _state_lock: File,
    backends: BTreeMap<String, Backend>,
    targets: BTreeMap<String, Arc<dyn BackupTarget>>,
    state: Mutex<State>,
    work: Condvar,
    images: image::ImageCache,
    /// Serialises read-change-write of records outside the job that owns them (verify,
    /// delete), so neither writes back a record the other has just changed or removed.
    record_updates: Mutex<()>,
}

/// The engine; cheap to share (`Arc` inside).
pub struct Engine {
    inner: Arc<Inner>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// A test hook: with `BACKUPFS_TEST_PAUSE=<point>` in the daemon's environment, a job
/// holds still at that point (until cancelled) so a test can kill the daemon exactly
/// there. Points: `snapshotting` (snapshot made, copy not started) and `finishing` (data
/// copied, record not yet available). With `BACKUPFS_TEST_RELEASE=<file>` as well, it
/// holds until that file exists instead, cancelled or not: a test can then see jobs queued
/// behind it, and the daemon while it is stopping, for as long as it needs.
fn pause_point(point: &str, cancel: &AtomicBool) {
    if std::env::var("BACKUPFS_TEST_PAUSE").is_ok_and(|v| v == point) {
        warn!("BACKUPFS_TEST_PAUSE: job holding at {point}");
        let release = std::env::var_os("BACKUPFS_TEST_RELEASE").map(std::path::PathBuf::from);
        while !release
            .as_ref()
            .map_or_else(|| cancel.load(Ordering::Relaxed), |file| file.exists())
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn snapshot_name(backup_id: &str) -> String {
    format!("snapshot-backupfs-{backup_id}")
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

impl Engine {
    /// Opens every backend and target, recovers what a crash left, starts the workers.
    pub fn start(config: Config) -> Result<Engine> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| EngineError::Io {
            op: format!("create state_dir {}", config.state_dir.display()),
            source,
        })?;
        let lock_path = config.state_dir.join("backupfs.lock");
        let state_lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| EngineError::Io {
                op: format!("open {}", lock_path.display()),
                source,
            })?;
        // SAFETY: flock on a descriptor we own; released when it closes.
        if unsafe {
            libc::flock(
                std::os::fd::AsRawFd::as_raw_fd(&state_lock),
                libc::LOCK_EX | libc::LOCK_NB,
            )
        } < 0
        {
            return Err(EngineError::Busy(format!(
                "state_dir {} is in use by another backupfs (lock {})",
                config.state_dir.display(),
                lock_path.display()
            )));
        }
        let mut backends = BTreeMap::new();
        for (name, backend) in &config.backends {
            let driver: Arc<dyn VolumeDriver> = match backend.driver {
                DriverKind::File => Arc::new(FileDriver::new(name, backend.pools.clone())),
                DriverKind::Qcow2 => Arc::new(Qcow2Driver::new(name, backend.pools.clone())?),
            };
            let volume_pools = backend
                .pools
                .keys()
                .filter(|pool| !config.is_target_pool(name, pool))
                .cloned()
                .collect();
            backends.insert(
                name.clone(),
                Backend {
                    driver,
                    volume_pools,
                },
            );
        }
        let mut targets: BTreeMap<String, Arc<dyn BackupTarget>> = BTreeMap::new();
        for (name, target) in &config.targets {
            let backend = &backends[&target.backend];
            let dir = &config.backends[&target.backend].pools[&target.pool];
            let opened = VolumeTarget::open(name, backend.driver.clone(), &target.pool, dir)?;
            targets.insert(name.clone(), Arc::new(opened));
        }
        let inner = Arc::new(Inner {
            backends,
            targets,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            images: image::ImageCache::default(),
            record_updates: Mutex::new(()),
            config,
            _state_lock: state_lock,
        });
        inner.recover();
        inner.list_recent_jobs();
        let workers = (0..inner.config.max_parallel_jobs)
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("backup-worker-{i}"))
                    .spawn(move || inner.worker())
                    .map_err(|source| EngineError::Io {
                        op: "start worker".to_string(),
                        source,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Engine {
            inner,
            workers: Mutex::new(workers),
        })
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn target_names(&self) -> Vec<String> {
        self.inner.targets.keys().cloned().collect()
    }

    pub fn backend_names(&self) -> Vec<String> {
        self.inner.backends.keys().cloned().collect()
    }

    /// Accepts a backup request: validates it, writes the `creating` record and queues
    /// the job. Refusals change nothing.
    pub fn start_backup(&self, target: &str, request: &BackupRequest) -> Result<Arc<Job>> {
        self.inner.start_backup(target, request)
    }

    /// Blocks until the job has ended; the job's failure as an error.
    pub fn wait(&self, job: &Job) -> Result<()> {
        let mut state = job.state.lock();
        while !state.phase.ended() {
            job.ended.wait(&mut state);
        }
        match &state.error {
            None => Ok(()),
            Some((errno, reason)) => Err(EngineError::JobFailed {
                backup_id: job.backup_id.clone(),
                errno: *errno,
                reason: reason.clone(),
            }),
        }
    }

    pub fn jobs(&self, target: Option<&str>) -> Vec<JobStatus> {
        let mut state = self.inner.state.lock();
        state.jobs.retain(|job| {
            job.state
                .lock()
                .ended_at
                .is_none_or(|t| t.elapsed() < ENDED_JOB_TTL)
        });
        state
            .jobs
            .iter()
            .filter(|job| target.is_none_or(|t| t == job.target))
            .map(|job| {
                let s = job.state.lock();
                let (done, total) = job.progress.get();
                JobStatus {
                    backup_id: job.backup_id.clone(),
                    volume_id: job.volume_id.clone(),
                    target: job.target.clone(),
                    phase: s.phase,
                    done: if s.phase == Phase::Available {
                        job.size
                    } else {
                        done
                    },
                    total: if total == 0 { job.size } else { total },
                    error: s.error.as_ref().map(|(_, reason)| reason.clone()),
                }
            })
            .collect()
    }

    fn target(&self, target: &str) -> Result<&Arc<dyn BackupTarget>> {
        self.inner.target(target)
    }

    pub fn records(&self, target: &str) -> Result<Vec<Record>> {
        Ok(self.target(target)?.records()?)
    }

    pub fn record(&self, target: &str, backup_id: &str) -> Result<Record> {
        Ok(self.target(target)?.record(backup_id)?)
    }

    /// The data of an available backup, for reading.
    /// An available backup's image, for reading; its blocks are checked against their
    /// checksums as they are read (unless `verify_reads = false`).
    pub fn open_image(&self, target_name: &str, backup_id: &str) -> Result<Image> {
        let target = self.target(target_name)?;
        let record = target.record(backup_id)?;
        if record.status != Status::Available {
            return Err(EngineError::NotFound(format!(
                "backup {backup_id} is {}",
                record.status.as_str()
            )));
        }
        let attachment = target.open_data(backup_id)?;
        let state = self
            .inner
            .images
            .get(backup_id, || Ok(target.read_checksums(&record)?))?;
        Ok(Image::new(
            backup_id,
            record.size,
            attachment,
            state,
            self.inner.config.verify_reads,
        ))
    }

    /// Reads a whole backup and checks every block; the result is kept in the record.
    /// Fails with `Damaged` naming the bad blocks.
    pub fn verify_backup(&self, target_name: &str, backup_id: &str) -> Result<()> {
        let target = self.target(target_name)?;
        let image = self.open_image(target_name, backup_id)?;
        if !image.has_checksums() {
            return Err(EngineError::NotPermitted(format!(
                "backup {backup_id} has no checksums to verify against"
            )));
        }
        let started = Instant::now();
        let bad = image.damaged_blocks()?;
        let _updating = self.inner.record_updates.lock();
        let mut record = target.record(backup_id)?;
        if record.status != Status::Available {
            return Err(EngineError::NotFound(format!(
                "backup {backup_id} is {} now",
                record.status.as_str()
            )));
        }
        record.verified_at = Some(now());
        record.damaged_blocks = Some(bad.clone());
        target.write_record(&record)?;
        if bad.is_empty() {
            info!(
                target = target_name,
                backup_id,
                seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
                "backup verified: every block matches its checksum"
            );
            Ok(())
        } else {
            let e = image::damaged(backup_id, &bad);
            error!(
                target = target_name,
                backup_id,
                "verify: {e}; restore from another backup and check the target's storage"
            );
            Err(e)
        }
    }

    pub fn image_allocated(&self, target: &str, backup_id: &str) -> Result<u64> {
        Ok(self.target(target)?.allocated(backup_id)?)
    }

    /// Deletes an available or failed backup: its data, checksums and record.
    pub fn delete_backup(&self, target_name: &str, backup_id: &str) -> Result<()> {
        let target = self.target(target_name)?;
        let _updating = self.inner.record_updates.lock();
        let mut record = target.record(backup_id)?;
        if record.status == Status::Creating {
            return Err(EngineError::Busy(format!(
                "backup {backup_id} is still being made"
            )));
        }
        let children: Vec<String> = target
            .records()?
            .into_iter()
            .filter(|r| r.parent_id.as_deref() == Some(backup_id))
            .map(|r| r.id)
            .collect();
        if !children.is_empty() {
            return Err(EngineError::Busy(format!(
                "backup {backup_id} is the parent of {}",
                children.join(", ")
            )));
        }
        // Mark first: a crash from here on finishes the deletion at the next start.
        record.status = Status::Deleting;
        target.write_record(&record)?;
        self.inner.images.forget(backup_id);
        target.delete_data(backup_id)?;
        target.remove_record(backup_id)?;
        info!(target = target_name, backup_id, "backup deleted");
        Ok(())
    }

    /// Removes the record of a failed backup.
    pub fn delete_record(&self, target_name: &str, backup_id: &str) -> Result<()> {
        let target = self.target(target_name)?;
        let _updating = self.inner.record_updates.lock();
        let record = target.record(backup_id)?;
        if record.status != Status::Error {
            return Err(EngineError::NotPermitted(format!(
                "backup {backup_id} is {}: only records of failed backups are removed this way (rm the .img to delete a backup)",
                record.status.as_str()
            )));
        }
        target.delete_data(backup_id)?;
        target.remove_record(backup_id)?;
        info!(
            target = target_name,
            backup_id, "record of failed backup removed"
        );
        Ok(())
    }

    pub fn volumes(&self, backend: &str) -> Result<Vec<VolumeInfo>> {
        let backend = self.inner.backend(backend)?;
        let mut all: Vec<VolumeInfo> = Vec::new();
        for pool in &backend.volume_pools {
            for volume in backend.driver.list(pool)? {
                if !all.iter().any(|v| v.id == volume.id) {
                    all.push(volume);
                }
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    pub fn volume(&self, backend: &str, volume_id: &str) -> Result<VolumeInfo> {
        self.inner.find_on(backend, volume_id)
    }

    pub fn open_volume_read(&self, backend_name: &str, volume_id: &str) -> Result<Attachment> {
        let backend = self.inner.backend(backend_name)?;
        let info = self.inner.find_on(backend_name, volume_id)?;
        Ok(backend.driver.attach(&info.pool, volume_id, Access::Read)?)
    }

    /// Opens an existing volume for a restore. Refused while it is in-use or has a backup
    /// queued or running. `truncate` zeroes it first (O_TRUNC: volumes never shrink).
    pub fn open_restore(
        &self,
        backend: &str,
        volume_id: &str,
        truncate: bool,
    ) -> Result<Arc<VolumeWriter>> {
        let info = self.inner.find_on(backend, volume_id)?;
        let writer = claim_restore(&self.inner, backend, &info)?;
        if truncate {
            writer.set_size(0)?;
        }
        Ok(writer)
    }

    /// Creates a new, empty volume to restore into (in the backend's first volume pool).
    pub fn create_volume(&self, backend_name: &str, volume_id: &str) -> Result<Arc<VolumeWriter>> {
        if !is_valid_id(volume_id) {
            return Err(EngineError::Invalid(format!(
                "{volume_id:?} is not a valid volume id"
            )));
        }
        let backend = self.inner.backend(backend_name)?;
        if self.inner.find_on(backend_name, volume_id).is_ok() {
            return Err(EngineError::Exists(format!(
                "volume {volume_id} already exists on {backend_name}"
            )));
        }
        let pool = backend.volume_pools.first().ok_or_else(|| {
            EngineError::NotPermitted(format!("backend {backend_name} has no volume pool"))
        })?;
        let info = backend
            .driver
            .create(pool, volume_id, 0)
            .map_err(|e| match e {
                VolumeError::Exists(_) => EngineError::Exists(format!(
                    "volume {volume_id} already exists on {backend_name}"
                )),
                other => other.into(),
            })?;
        info!(
            backend = backend_name,
            pool, volume_id, "volume created for a restore"
        );
        claim_restore(&self.inner, backend_name, &info)
    }

    /// Restores a whole backup onto a volume of any backend (creating it when missing).
    pub fn restore(
        &self,
        target: &str,
        backup_id: &str,
        backend: &str,
        volume_id: &str,
    ) -> Result<()> {
        let record = self.record(target, backup_id)?;
        let writer = match self.open_restore(backend, volume_id, false) {
            Ok(writer) => writer,
            Err(EngineError::NotFound(_)) => self.create_volume(backend, volume_id)?,
            Err(e) => return Err(e),
        };
        let image = self.open_image(target, backup_id)?;
        let copied = writer.copy_from_backup(&image, 0, 0, record.size)?;
        if copied != record.size {
            return Err(EngineError::Io {
                op: format!("restore of {backup_id}"),
                source: std::io::Error::from_raw_os_error(libc::EIO),
            });
        }
        writer.sync()
    }

    /// Cancels every job, waits until each one is cleaned up as after a crash, and stops
    /// the workers.
    pub fn shutdown(&self) {
        {
            let mut state = self.inner.state.lock();
            state.stopping = true;
            for job in &state.jobs {
                job.cancel.store(true, Ordering::Relaxed);
            }
            self.inner.work.notify_all();
        }
        for worker in self.workers.lock().drain(..) {
            let _ = worker.join();
        }
    }
}

impl Inner {
    fn target(&self, target: &str) -> Result<&Arc<dyn BackupTarget>> {
        self.targets
            .get(target)
            .ok_or_else(|| EngineError::NotFound(format!("no target {target}")))
    }

    fn backend(&self, backend: &str) -> Result<&Backend> {
        self.backends
            .get(backend)
            .ok_or_else(|| EngineError::NotFound(format!("no backend {backend}")))
    }

    fn find_on(&self, backend_name: &str, volume_id: &str) -> Result<VolumeInfo> {
        if !is_valid_id(volume_id) {
            return Err(EngineError::Invalid(format!(
                "{volume_id:?} is not a valid volume id"
            )));
        }
        let backend = self.backend(backend_name)?;
        backend
            .driver
            .find(&backend.volume_pools, volume_id)
            .map_err(|e| match e {
                VolumeError::NotFound(_) => EngineError::NotFound(format!(
                    "no volume {volume_id} on backend {backend_name}"
                )),
                other => other.into(),
            })
    }

    /// The backend holding a volume, searched in name order.
    fn find_anywhere(&self, volume_id: &str) -> Result<(String, VolumeInfo)> {
        for name in self.backends.keys() {
            match self.find_on(name, volume_id) {
                Ok(info) => return Ok((name.clone(), info)),
                Err(EngineError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(EngineError::NotFound(format!(
            "no volume {volume_id} on any backend"
        )))
    }

    fn start_backup(&self, target_name: &str, request: &BackupRequest) -> Result<Arc<Job>> {
        let target = self.target(target_name)?;
        let (backend_name, info) = self.find_anywhere(&request.volume_id)?;
        let backend = self.backend(&backend_name)?;
        let key = (backend_name.clone(), info.id.clone());
        if let Some(busy) = self.state.lock().busy.get(&key) {
            return Err(EngineError::Busy(match busy {
                Busy::Backup => {
                    format!("volume {} already has a backup queued or running", info.id)
                }
                Busy::Restore(_) => format!("volume {} is being restored", info.id),
            }));
        }
        if let Some(why) = backend.driver.in_use(&info.pool, &info.id)?
            && let Err(reason) = backend.driver.snapshot_support(&info.pool)
        {
            return Err(EngineError::Busy(format!(
                "volume {} is in-use ({why}) and cannot be snapshotted: {reason}",
                info.id
            )));
        }
        let free = target.free_space()?;
        if info.allocated > free {
            return Err(EngineError::NoSpace(format!(
                "target {target_name} has {free} bytes free, volume {} holds {} bytes",
                info.id, info.allocated
            )));
        }
        let backup_id = uuid::Uuid::new_v4().to_string();
        let record = Record {
            format: crate::target::record::FORMAT_VERSION,
            id: backup_id.clone(),
            volume_id: info.id.clone(),
            backend: backend_name.clone(),
            pool: info.pool.clone(),
            target: target_name.to_string(),
            status: Status::Creating,
            size: info.size,
            created_at: now(),
            completed_at: None,
            name: request.name.clone(),
            snapshot_used: false,
            parent_id: None,
            checksums: None,
            error: None,
            stored_bytes: 0,
            verified_at: None,
            damaged_blocks: None,
        };
        let job = Arc::new(Job {
            backup_id,
            volume_id: info.id.clone(),
            backend: backend_name,
            pool: info.pool.clone(),
            target: target_name.to_string(),
            name: request.name.clone(),
            size: info.size,
            state: Mutex::new(JobState {
                phase: Phase::Queued,
                error: None,
                ended_at: None,
            }),
            ended: Condvar::new(),
            progress: Progress::default(),
            cancel: AtomicBool::new(false),
        });
        let mut state = self.state.lock();
        if state.stopping {
            return Err(EngineError::Busy("backupfs is stopping".to_string()));
        }
        // Checked again under the lock: two requests may race past the first check.
        if state.busy.contains_key(&key) {
            return Err(EngineError::Busy(format!(
                "volume {} already has a backup queued or running",
                info.id
            )));
        }
        // Reserve the volume, then write the record without holding the engine's lock
        // (two fsyncs: `jobs` and restores must not wait for them).
        state.busy.insert(key.clone(), Busy::Backup);
        drop(state);
        // The record comes first, so a crash from here on is found and cleaned at start-up.
        if let Err(e) = target.write_record(&record) {
            self.state.lock().busy.remove(&key);
            return Err(e.into());
        }
        let mut state = self.state.lock();
        state.jobs.push(job.clone());
        state.queue.push_back(job.clone());
        self.work.notify_one();
        drop(state);
        info!(
            backup_id = job.backup_id,
            volume_id = job.volume_id,
            backend = job.backend,
            target = target_name,
            size = job.size,
            "backup queued"
        );
        Ok(job)
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut state = self.state.lock();
                loop {
                    if let Some(job) = state.queue.pop_front() {
                        break job;
                    }
                    if state.stopping {
                        return;
                    }
                    self.work.wait(&mut state);
                }
            };
            self.run(&job);
        }
    }

    fn set_phase(job: &Job, phase: Phase) {
        job.state.lock().phase = phase;
    }

    /// Runs one job to its end and records the outcome.
    fn run(&self, job: &Job) {
        let started = Instant::now();
        info!(
            backup_id = job.backup_id,
            volume_id = job.volume_id,
            target = job.target,
            size = job.size,
            "backup started"
        );
        let outcome = if job.cancel.load(Ordering::Relaxed) {
            Err(EngineError::Io {
                op: "interrupted".to_string(),
                source: std::io::Error::from_raw_os_error(libc::ECANCELED),
            })
        } else {
            self.backup(job)
        };
        let (phase, error) = match outcome {
            Ok(stored) => {
                let secs = started.elapsed().as_secs_f64();
                info!(
                    backup_id = job.backup_id,
                    volume_id = job.volume_id,
                    target = job.target,
                    bytes = job.size,
                    stored_bytes = stored,
                    seconds = format!("{secs:.2}"),
                    mib_per_s = format!("{:.1}", job.size as f64 / secs.max(1e-6) / 1048576.0),
                    "backup available"
                );
                (Phase::Available, None)
            }
            Err(e) => {
                let errno = errno_of(&e);
                let reason = failure_reason(&e);
                error!(
                    backup_id = job.backup_id,
                    volume_id = job.volume_id,
                    target = job.target,
                    "backup failed: {reason}; the source volume is untouched, request a new backup once the cause is fixed"
                );
                (Phase::Error, Some((errno, reason)))
            }
        };
        {
            let mut state = self.state.lock();
            state
                .busy
                .remove(&(job.backend.clone(), job.volume_id.clone()));
        }
        let mut state = job.state.lock();
        state.phase = phase;
        state.error = error;
        state.ended_at = Some(Instant::now());
        job.ended.notify_all();
    }

    /// The generic pipeline: snapshot if in-use → create the destination → attach both →
    /// copy → detach → record `available` → delete the snapshot. Any failure removes the
    /// partial destination and the snapshot and records `error`.
    fn backup(&self, job: &Job) -> Result<u64> {
        let target = self.target(&job.target)?;
        let backend = self.backend(&job.backend)?;
        let mut record = target.record(&job.backup_id)?;
        let result = self.backup_steps(job, target.as_ref(), backend, &mut record);
        if result.is_err() {
            cleanup(target.as_ref(), backend.driver.as_ref(), &record);
            record.status = Status::Error;
            record.completed_at = Some(now());
            record.error = result.as_ref().err().map(failure_reason);
            if let Err(e) = target.write_record(&record) {
                error!(backup_id = job.backup_id, "cannot record the failure: {e}");
            }
        }
        result
    }

    fn backup_steps(
        &self,
        job: &Job,
        target: &dyn BackupTarget,
        backend: &Backend,
        record: &mut Record,
    ) -> Result<u64> {
        let driver = backend.driver.as_ref();
        let snapshot = snapshot_name(&job.backup_id);
        let in_use = driver.in_use(&job.pool, &job.volume_id)?;
        let source = if let Some(why) = &in_use {
            Self::set_phase(job, Phase::Snapshotting);
            record.snapshot_used = true;
            // Recorded before the snapshot exists, so recovery knows to look for it.
            target.write_record(record)?;
            info!(
                backup_id = job.backup_id,
                volume_id = job.volume_id,
                "volume is in-use ({why}): backing up from a temporary snapshot"
            );
            driver
                .snapshot(&job.pool, &job.volume_id, &snapshot)
                .map_err(|e| match e {
                    VolumeError::SnapshotUnsupported(reason) => EngineError::Busy(format!(
                        "volume {} is in-use ({why}) and cannot be snapshotted: {reason}",
                        job.volume_id
                    )),
                    other => other.into(),
                })?;
            pause_point("snapshotting", &job.cancel);
            driver.attach_snapshot(&job.pool, &snapshot)?
        } else {
            driver.attach(&job.pool, &job.volume_id, Access::Stream)?
        };
        Self::set_phase(job, Phase::Copying);
        let size = source
            .file
            .metadata()
            .map_err(|source| EngineError::Io {
                op: "stat source".to_string(),
                source,
            })?
            .len();
        let destination = target.create_data(&job.backup_id, size)?;
        let options = CopyOptions {
            dest_is_zero: true,
            bps_limit: self.config.copy_bps_limit,
        };
        let outcome = copy::copy(
            &source.file,
            &destination.file,
            Range::whole(size),
            options,
            &job.progress,
            &job.cancel,
            &|_, _| Ok(()),
        )?;
        driver.detach(source)?;
        drop(destination);
        if in_use.is_none()
            && let Some(why) = driver.in_use(&job.pool, &job.volume_id)?
        {
            return Err(EngineError::Busy(format!(
                "volume {} was attached during the copy ({why}); the copy may be inconsistent, request the backup again",
                job.volume_id
            )));
        }
        Self::set_phase(job, Phase::Finishing);
        pause_point("finishing", &job.cancel);
        if job.cancel.load(Ordering::Relaxed) {
            return Err(CopyError::Cancelled.into());
        }
        record.checksums = Some(target.write_checksums(&job.backup_id, &outcome.checksums)?);
        record.size = size;
        record.stored_bytes = outcome.bytes_written;
        record.status = Status::Available;
        record.completed_at = Some(now());
        target.write_record(record)?;
        if record.snapshot_used
            && let Err(e) = driver.delete_snapshot(&job.pool, &snapshot)
        {
            // The backup is good; the snapshot is removed at the next start.
            warn!(
                backup_id = job.backup_id,
                "cannot delete temporary snapshot {snapshot}: {e}"
            );
        }
        Ok(outcome.bytes_written)
    }

    fn release_restore(&self, key: &(String, String)) {
        let mut state = self.state.lock();
        match state.busy.get(key).copied() {
            Some(Busy::Restore(n)) if n > 1 => {
                state.busy.insert(key.clone(), Busy::Restore(n - 1));
            }
            Some(Busy::Restore(_)) => {
                state.busy.remove(key);
            }
            _ => {}
        }
    }
}

/// Removes what a failed or interrupted backup left: its partial data and its snapshot.
fn cleanup(target: &dyn BackupTarget, driver: &dyn VolumeDriver, record: &Record) {
    if let Err(e) = target.delete_data(&record.id) {
        error!(
            backup_id = record.id,
            "cannot remove partial backup data: {e}"
        );
    }
    if record.snapshot_used
        && let Err(e) = driver.delete_snapshot(&record.pool, &snapshot_name(&record.id))
    {
        error!(
            backup_id = record.id,
            "cannot delete temporary snapshot: {e}"
        );
    }
}

/// What a failed job's record and `jobs` line say.
fn failure_reason(e: &EngineError) -> String {
    if errno_of(e) == libc::ECANCELED {
        "interrupted: backupfs stopped during the backup".to_string()
    } else {
        e.to_string()
    }
}

/// The OS error behind an engine error, for jobs that fail; EIO when there is none.
fn errno_of(e: &EngineError) -> i32 {
    match e {
        EngineError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        EngineError::Copy(c) => c.raw_os_error().unwrap_or(libc::EIO),
        EngineError::Volume(v) => v.raw_os_error().unwrap_or(match v {
            VolumeError::SnapshotUnsupported(_) => libc::EOPNOTSUPP,
            _ => libc::EIO,
        }),
        EngineError::Target(t) => t.raw_os_error().unwrap_or(libc::EIO),
        EngineError::Busy(_) => libc::EBUSY,
        EngineError::NoSpace(_) => libc::ENOSPC,
        EngineError::JobFailed { errno, .. } => *errno,
        _ => libc::EIO,
    }
}
