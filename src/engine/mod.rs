//! The engine: the job queue, the generic attach-and-copy backup pipeline (written once,
//! against the `VolumeDriver` primitives), verification, restores, deletion and crash
//! recovery. It knows nothing of FUSE; it never leaves a partial backup or a snapshot
//! behind, and it removes only what a record says it made.

mod backup;
mod delete;
pub mod error;
pub mod image;
pub mod job;
mod metrics;
mod nodes;
#[cfg(any(test, feature = "testing"))]
pub mod parts;
mod provenance;
mod recovery;
pub mod request;
mod restore;
mod retention;
mod state_lock;
mod verify;
mod xattrs;

use crate::config::Config;
use crate::ids::{BackupId, VolumeId};
use crate::targets::BackupTarget;
use crate::targets::record::{Record, rfc3339};
use crate::volume::{Access, Attachment, VolumeDriver, VolumeError, VolumeInfo};
use parking_lot::{Condvar, Mutex};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tracing::info;

pub use error::{EngineError, Result};
pub use image::BackupImage;
pub use job::{Failure, Job, JobKind, JobStatus, Phase};
pub use request::BackupRequest;
pub use restore::{RESTORE_NOTE, RestoreSession, RestoreState, RestoreStatus, VolumeWriter};
use state_lock::{SERVING, take_state_lock};
#[cfg(test)]
use state_lock::{is_backupfs_mount, unescape_octal};
pub use xattrs::XattrMode;

/// How long ended jobs stay listed in `jobs`.
const ENDED_JOB_TTL: Duration = Duration::from_secs(2 * 3600);
/// How often leftovers whose removal failed (temporary snapshots, deletions) are retried.
const JANITOR_PERIOD: Duration = Duration::from_secs(60);

struct Backend {
    driver: Arc<dyn VolumeDriver>,
    /// Pools that serve volumes (not those a target holds backups in).
    volume_pools: Vec<String>,
}

/// Why a volume may not be used by another backup or restore right now.
#[derive(Clone)]
enum Busy {
    Backup,
    /// A restore is being opened (attaching can take a while): others wait their turn.
    Opening,
    Restore(Weak<VolumeWriter>),
}

#[derive(Default)]
struct State {
    /// Queued, running and recently ended jobs, oldest first.
    jobs: Vec<Arc<Job>>,
    queue: VecDeque<Arc<Job>>,
    /// (backend, volume id) → what holds it.
    busy: HashMap<(String, String), Busy>,
    /// Backups accepted and not ended, each holding part of its target's free space
    /// (`Job::still_reserved`), so that two requests that each fit but not together are
    /// not both accepted.
    reservations: Vec<Arc<Job>>,
    stopping: bool,
}

struct Inner {
    config: Config,
    /// Held for the daemon's lifetime: one daemon per state directory. While the daemon
    /// serves, it holds `serving <mountpoint>` (see `take_state_lock`).
    state_lock: nix::fcntl::Flock<File>,
    backends: BTreeMap<String, Backend>,
    /// The devices requests name (`device=<path>`), as the backend `@device`.
    devices: Backend,
    targets: BTreeMap<String, Arc<dyn BackupTarget>>,
    state: Mutex<State>,
    /// Wakes the workers: a job was queued, or the daemon is stopping.
    work: Condvar,
    /// Wakes the janitor when the daemon is stopping.
    stop: Condvar,
    sums: image::SumsCache,
    blocks: Arc<image::BlockCache>,
    /// Serialises read-change-write of records outside the job that owns them (verify,
    /// delete, the janitor), so none writes back a record another has just changed.
    record_updates: Mutex<()>,
    /// Restores through the mount, running and recently ended.
    restores: Mutex<Vec<Arc<restore::RestoreTrack>>>,
    /// Who read which images through the mount: what restores are judged by.
    provenance: provenance::Provenance,
    counters: metrics::Counters,
}

/// A record held for a read-change-write (`Inner::updating`).
struct Updating<'a> {
    _local: parking_lot::MutexGuard<'a, ()>,
    _remote: Option<crate::targets::lease::RecordLock<'a>>,
}

/// The engine; cheap to share (`Arc` inside).
pub struct Engine {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// The snapshot name of records made before they named their snapshot (they say only
/// `snapshot_used`); new snapshots are named by their driver (`snapshot_name`).
fn legacy_snapshot_name(backup_id: &str) -> String {
    crate::volume::snapnames::legacy(backup_id)
}

fn now() -> String {
    rfc3339(SystemTime::now())
}

impl Engine {
    /// Opens every backend and target (claiming target pools), recovers what a crash left,
    /// starts the workers.
    pub fn start(config: Config) -> Result<Engine> {
        let state_lock = take_state_lock(&config)?;
        let opened = crate::registry::open(&config)?;
        let backends = opened
            .backends
            .into_iter()
            .map(|(name, backend)| {
                let backend = Backend {
                    driver: backend.driver,
                    volume_pools: backend.volume_pools,
                };
                (name, backend)
            })
            .collect();
        Engine::assemble(config, state_lock, backends, opened.targets)
    }

    /// The engine over opened backends and targets (from the configuration, or from parts
    /// a test chose): recovers what the records say a crash left, lets go of this node's
    /// claims from before, lists recent jobs, starts the workers, the janitor and, where
    /// other nodes may serve a target, the nodes' round.
    fn assemble(
        config: Config,
        state_lock: nix::fcntl::Flock<File>,
        backends: BTreeMap<String, Backend>,
        targets: BTreeMap<String, Arc<dyn BackupTarget>>,
    ) -> Result<Engine> {
        let inner = Arc::new(Inner {
            backends,
            devices: Backend {
                driver: Arc::new(crate::volume::block::DeviceDriver::default()),
                volume_pools: Vec::new(),
            },
            targets,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
            stop: Condvar::new(),
            sums: image::SumsCache::default(),
            blocks: Arc::new(image::BlockCache::default()),
            record_updates: Mutex::new(()),
            restores: Mutex::new(Vec::new()),
            provenance: provenance::Provenance::default(),
            counters: metrics::Counters::default(),
            config,
            state_lock,
        });
        inner.recover();
        // The claims this node's previous run left go before the tree is served.
        inner.coordinate();
        inner.list_recent_jobs();
        let spawn = |name: String, run: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(run)
                .map_err(|source| EngineError::io("start a worker thread", source))
        };
        let mut threads = Vec::new();
        for i in 0..inner.config.max_parallel_jobs {
            let worker = inner.clone();
            threads.push(spawn(
                format!("job-worker-{i}"),
                Box::new(move || worker.worker()),
            )?);
        }
        let janitor = inner.clone();
        threads.push(spawn(
            "janitor".to_string(),
            Box::new(move || janitor.janitor()),
        )?);
        if inner
            .targets
            .values()
            .any(|t| t.catalogue().coordinator().is_some())
        {
            let coordinator = inner.clone();
            threads.push(spawn(
                "nodes".to_string(),
                Box::new(move || coordinator.coordinator_loop()),
            )?);
        }
        Ok(Engine {
            inner,
            threads: Mutex::new(threads),
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

    /// Queues a check of a whole backup against its checksums; the job fails with
    /// `Damaged` naming the bad blocks. The result is kept in the record.
    pub fn start_verify(&self, target: &str, backup_id: &BackupId) -> Result<Arc<Job>> {
        self.inner.start_verify(target, backup_id)
    }

    /// The queued, running and recently ended jobs of a target (all targets with None).
    pub fn jobs(&self, target: Option<&str>) -> Vec<JobStatus> {
        let mut state = self.inner.state.lock();
        state.jobs.retain(|job| match job.ended_at() {
            None => true,
            // An ended verify leaves its result in the record.
            Some(_) if job.kind == JobKind::Verify => false,
            Some(t) => t.elapsed() < ENDED_JOB_TTL,
        });
        state
            .jobs
            .iter()
            .filter(|job| target.is_none_or(|t| t == job.target))
            .map(|job| job.status())
            .collect()
    }

    fn target(&self, target: &str) -> Result<&Arc<dyn BackupTarget>> {
        self.inner.target(target)
    }

    /// Restores through the mount, running and ended in the last two hours, oldest first.
    pub fn restores(&self) -> Vec<RestoreStatus> {
        let mut restores = self.inner.restores.lock();
        restores.retain(|r| !r.expired());
        restores.iter().map(|r| r.status()).collect()
    }

    /// Whether a restore of the volume is running in this daemon.
    pub fn restoring(&self, backend: &str, volume_id: &str) -> bool {
        self.inner.restores.lock().iter().any(|r| {
            let status = r.status();
            status.state == RestoreState::Restoring
                && status.backend == backend
                && status.volume_id == volume_id
        })
    }

    /// The note a volume carries about restores (an incomplete one), if any.
    pub fn volume_note(&self, backend: &str, volume_id: &VolumeId) -> Result<Option<String>> {
        let backend_entry = self.inner.backend(backend)?;
        let info = self.inner.find_on(backend, volume_id)?;
        let note = backend_entry
            .driver
            .note(&info.pool, volume_id, RESTORE_NOTE)?;
        // A restore noted in progress that this daemon does not run was cut off when an
        // earlier backupfs stopped.
        Ok(note.map(|note| {
            if note.starts_with("in progress") && !self.restoring(backend, volume_id) {
                format!("incomplete: interrupted (a restore {note} when backupfs stopped)")
            } else {
                note
            }
        }))
    }

    /// The metrics, in the Prometheus text format.
    pub fn metrics(&self) -> String {
        self.inner.metrics()
    }

    /// Every record of the target, as a listing sees them (each read whole).
    pub fn records(&self, target: &str) -> Result<Vec<Record>> {
        Ok(self.target(target)?.listed_records()?)
    }

    /// The newest sound backup of a volume on the target (`by-volume/<volume-id>/latest.img`),
    /// a moment old at most, as a listing.
    pub fn latest_backup(&self, target: &str, volume_id: &VolumeId) -> Result<Option<BackupId>> {
        let newest = self.target(target)?.newest_sound(volume_id, None, false)?;
        Ok(newest.map(|record| record.id))
    }

    /// The volumes that have a sound backup on the target (`by-volume/`), sorted: one
    /// record read per volume, not one per backup.
    pub fn volumes_backed_up(&self, target: &str) -> Result<Vec<VolumeId>> {
        Ok(self.target(target)?.volumes_with_sound_backups()?)
    }

    /// What a listing of the target shows of each record, in the order of `records`.
    pub fn listing(&self, target: &str) -> Result<crate::targets::catalogue::Listing> {
        Ok(self.target(target)?.listing()?)
    }

    pub fn record(&self, target: &str, backup_id: &BackupId) -> Result<Record> {
        Ok(self.target(target)?.listed_record(backup_id)?)
    }

    /// An available backup's image, for reading; its blocks are checked against their
    /// checksums each time they are read from storage (unless `verify_reads = false`).
    pub fn open_image(&self, target: &str, backup_id: &BackupId) -> Result<BackupImage> {
        self.inner.open_image(target, backup_id)
    }

    /// A backup image was opened through the mount as `handle` by thread `tid`: a restore
    /// its process feeds is judged by how far it got into the image.
    pub fn image_opened(&self, handle: u64, image: &BackupImage, tid: u32) {
        self.inner.provenance.image_opened(
            handle,
            image.backup_id.as_str(),
            image.last_data_block(),
            provenance::Process::of_thread(tid),
        );
    }

    pub fn image_closed(&self, handle: u64) {
        self.inner.provenance.image_closed(handle);
    }

    /// A read of an image (`handle`) by thread `tid` was answered with `error`: a restore
    /// its process feeds fails.
    pub fn image_read_failed(&self, handle: u64, tid: u32, error: &EngineError) {
        self.inner.provenance.read_failed(
            handle,
            provenance::Process::of_thread(tid),
            &error.reason(),
        );
    }

    pub fn image_allocated(&self, target: &str, backup_id: &BackupId) -> Result<u64> {
        Ok(self.target(target)?.allocated(backup_id)?)
    }

    /// Deletes an available or failed backup: its data, checksums and record.
    pub fn delete_backup(&self, target: &str, backup_id: &BackupId) -> Result<()> {
        self.inner.delete_backup(target, backup_id)
    }

    /// Sets (None: removes) an operator's `user.*` attribute of an available backup.
    pub fn set_xattr(
        &self,
        target: &str,
        backup_id: &BackupId,
        name: &str,
        value: Option<String>,
        mode: XattrMode,
    ) -> Result<()> {
        self.inner.set_xattr(target, backup_id, name, value, mode)
    }

    /// Removes the record of a failed backup.
    pub fn delete_record(&self, target: &str, backup_id: &BackupId) -> Result<()> {
        self.inner.delete_record(target, backup_id)
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

    pub fn volume(&self, backend: &str, volume_id: &VolumeId) -> Result<VolumeInfo> {
        self.inner.find_on(backend, volume_id)
    }

    pub fn open_volume_read(&self, backend_name: &str, volume_id: &VolumeId) -> Result<Attachment> {
        let backend = self.inner.backend(backend_name)?;
        let info = self.inner.find_on(backend_name, volume_id)?;
        Ok(backend.driver.attach(&info.pool, volume_id, Access::Read)?)
    }

    /// Opens an existing volume for a restore. Refused while it is in-use or has a backup
    /// queued or running. `truncate` zeroes it first (O_TRUNC: volumes never shrink).
    /// Writers of one volume share its restore.
    pub fn open_restore(
        &self,
        backend: &str,
        volume_id: &VolumeId,
        truncate: bool,
    ) -> Result<Arc<VolumeWriter>> {
        let info = self.inner.find_on(backend, volume_id)?;
        let writer = restore::claim_restore(&self.inner, backend, &info, None)?;
        if truncate {
            writer.set_size(0)?;
        }
        Ok(writer)
    }

    /// Opens a volume again for a restore that let its writer go (a closed duplicate of
    /// its descriptor), so that what follows counts for the same restore.
    pub fn reopen_restore(
        &self,
        backend: &str,
        volume_id: &VolumeId,
        session: Arc<RestoreSession>,
    ) -> Result<Arc<VolumeWriter>> {
        let info = self.inner.find_on(backend, volume_id)?;
        restore::claim_restore(&self.inner, backend, &info, Some(session))
    }

    /// Creates a new, empty volume to restore into (in the backend's first volume pool).
    pub fn create_volume(
        &self,
        backend_name: &str,
        volume_id: &VolumeId,
    ) -> Result<Arc<VolumeWriter>> {
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
            pool,
            volume_id = %volume_id,
            "volume created for a restore"
        );
        restore::claim_restore(&self.inner, backend_name, &info, None)
    }

    /// Notes in the state lock that this daemon serves `mountpoint`: a second daemon
    /// given the same state_dir is then refused at once instead of waiting for the lock.
    pub fn note_serving(&self, mountpoint: &Path) {
        let text = format!("{SERVING}{}\n", mountpoint.display());
        let written = self.inner.state_lock.set_len(0).and_then(|()| {
            std::os::unix::fs::FileExt::write_all_at(&*self.inner.state_lock, text.as_bytes(), 0)
        });
        if let Err(e) = written {
            tracing::debug!("cannot note the mountpoint in the state lock: {e}");
        }
    }

    /// Cancels every job, waits until each one is cleaned up as after a crash (queued
    /// ones recorded `error` too), and stops the workers.
    pub fn shutdown(&self) {
        // From now on this daemon is stopping: a new one may wait for its lock.
        let _ = self.inner.state_lock.set_len(0);
        {
            let mut state = self.inner.state.lock();
            state.stopping = true;
            for job in &state.jobs {
                job.cancel.store(true, Ordering::Relaxed);
            }
            self.inner.work.notify_all();
            self.inner.stop.notify_all();
        }
        for thread in self.threads.lock().drain(..) {
            let _ = thread.join();
        }
        // Every job has ended and let go of its claims: the node leaves its targets, so
        // that its next start need not wait for its heartbeat to lapse.
        for target in self.inner.targets.values() {
            if let Some(coordinator) = target.catalogue().coordinator() {
                coordinator.leave();
            }
        }
    }
}

impl Inner {
    fn target(&self, target: &str) -> Result<&Arc<dyn BackupTarget>> {
        self.targets
            .get(target)
            .ok_or_else(|| EngineError::NotFound(format!("no target {target}")))
    }

    /// Holds a backup's record for a read-change-write: the other nodes that serve the
    /// target wait (the record's lock on the target, taken first), and so do this daemon's
    /// other changes of records (`record_updates`).
    fn updating<'a>(
        &'a self,
        target: &'a dyn BackupTarget,
        backup_id: &str,
    ) -> Result<Updating<'a>> {
        let remote = match target.catalogue().coordinator() {
            Some(coordinator) => Some(coordinator.lock_record(backup_id).map_err(|e| match e {
                crate::targets::lease::LeaseError::Busy(why) => EngineError::Busy(why),
                other => {
                    EngineError::io("lock the record", std::io::Error::other(other.to_string()))
                }
            })?),
            None => None,
        };
        let updating = Updating {
            _local: self.record_updates.lock(),
            _remote: remote,
        };
        // What is changed is the record as stored now, not a copy kept in memory.
        if let Ok(id) = BackupId::parse(backup_id) {
            target.catalogue().reload(&id)?;
        }
        Ok(updating)
    }

    fn backend(&self, backend: &str) -> Result<&Backend> {
        if backend == crate::volume::block::DEVICE_BACKEND {
            return Ok(&self.devices);
        }
        self.backends
            .get(backend)
            .ok_or_else(|| EngineError::NotFound(format!("no backend {backend}")))
    }

    fn find_on(&self, backend_name: &str, volume_id: &VolumeId) -> Result<VolumeInfo> {
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
    fn find_anywhere(&self, volume_id: &VolumeId) -> Result<(String, VolumeInfo)> {
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

    fn open_image(&self, target_name: &str, backup_id: &BackupId) -> Result<BackupImage> {
        let target = self.target(target_name)?;
        let record = target.record(backup_id)?;
        if record.status != crate::targets::record::Status::Available {
            return Err(EngineError::NotFound(format!(
                "backup {backup_id} is {}",
                record.status.as_str()
            )));
        }
        if let Some(refused) = crate::targets::untrusted(&record) {
            // The one line of this refusal: the FUSE layer answers opens with the errno only.
            tracing::warn!(
                backup_target = target_name,
                "backup {backup_id} not served: {refused}"
            );
            return Err(refused.into());
        }
        let attachment = target.open_data(backup_id)?;
        let kind = match &record.checksums {
            None => crate::copy::SumKind::CURRENT,
            Some(checksums) => {
                crate::copy::SumKind::from_name(&checksums.algorithm).ok_or_else(|| {
                    EngineError::io(
                        format!(
                            "backup {backup_id}: unknown checksum algorithm {:?}",
                            checksums.algorithm
                        ),
                        std::io::Error::from_raw_os_error(libc::EIO),
                    )
                })?
            }
        };
        let sums = self
            .sums
            .get(backup_id, || Ok(target.read_checksums(&record)?))?;
        Ok(BackupImage::new(
            backup_id,
            record.size,
            record.stored_bytes,
            attachment,
            sums,
            kind,
            self.config.verify_reads,
            self.blocks.clone(),
        ))
    }

    /// Queues a job (the workers take it in order), unless the daemon is stopping.
    fn enqueue(&self, job: &Arc<Job>) -> Result<()> {
        let mut state = self.state.lock();
        if state.stopping {
            return Err(EngineError::Busy("backupfs is stopping".to_string()));
        }
        state.jobs.push(job.clone());
        state.queue.push_back(job.clone());
        self.work.notify_one();
        Ok(())
    }

    fn worker(&self) {
        loop {
            let job = {
                let mut state = self.state.lock();
                loop {
                    // Queued jobs are taken even when stopping: each is recorded as
                    // interrupted rather than left `creating` until the next start.
                    if let Some(job) = state.queue.pop_front() {
                        break job;
                    }
                    if state.stopping {
                        return;
                    }
                    self.work.wait(&mut state);
                }
            };
            match job.kind {
                JobKind::Backup => self.run_backup(&job),
                JobKind::Verify => self.run_verify(&job),
            }
        }
    }

    /// Forgets the listing of a backup's jobs (it was deleted).
    fn forget_jobs(&self, backup_id: &BackupId) {
        self.state
            .lock()
            .jobs
            .retain(|job| job.backup_id != *backup_id || job.ended_at().is_none());
    }

    /// Whether a job of this daemon is working on `backup_id` right now.
    fn is_running(&self, backup_id: &BackupId) -> bool {
        self.state
            .lock()
            .jobs
            .iter()
            .any(|job| job.backup_id == *backup_id && job.ended_at().is_none())
    }

    /// Runs [`Inner::coordinate`] six times per lease until the daemon stops.
    fn coordinator_loop(&self) {
        let period = self.config.lease() / 6;
        loop {
            self.coordinate();
            let mut state = self.state.lock();
            // A stopping daemon's jobs still record how they ended: their claims are kept
            // alive until they have.
            let done = |state: &State| {
                state.stopping && state.jobs.iter().all(|job| job.ended_at().is_some())
            };
            if !done(&state) {
                let wait = if state.stopping {
                    Duration::from_millis(100)
                } else {
                    period
                };
                self.stop.wait_for(&mut state, wait);
            }
            if done(&state) {
                return;
            }
        }
    }

    /// Retries, now and then, the removals that failed (a temporary snapshot, the rest of
    /// a deletion), so that nothing backupfs made is forgotten while it still exists.
    fn janitor(&self) {
        loop {
            {
                let mut state = self.state.lock();
                if !state.stopping {
                    self.stop.wait_for(&mut state, JANITOR_PERIOD);
                }
                if state.stopping {
                    return;
                }
            }
            for (name, target) in &self.targets {
                self.finish_leftovers(name, target.as_ref());
            }
        }
    }
}

#[cfg(test)]
mod tests;
