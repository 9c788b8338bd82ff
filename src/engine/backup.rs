//! The generic backup pipeline of the spec, written once against the driver primitives:
//! accept (checks, `creating` record) → snapshot if in-use → attach → copy → detach →
//! checksums → record `available` → remove the snapshot. Any failure removes the partial
//! data and the snapshot, and records `error`; the source volume is only ever read.

use super::job::{Failure, JobSubject, pause_point};
use super::retention::{cleanup, remove_snapshot};
use super::*;
use crate::copy::{self, CopyOptions, Range};
use crate::ids::BackupId;
use crate::targets::TargetError;
use crate::targets::record::{FORMAT_VERSION, Record, Status};
use std::sync::atomic::AtomicBool;
use std::time::Instant;
use tracing::{error, warn};

/// The block device a request names (`device=<path>`) as volume `volume_id`: an absolute
/// path resolving to a block device, else `Invalid` (EINVAL).
fn named_device(volume_id: &crate::ids::VolumeId, path: &str) -> Result<VolumeInfo> {
    use crate::volume::block::{DeviceDriver, is_not_block};
    DeviceDriver::resolve(std::path::Path::new(path), volume_id.as_str()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound
            || e.raw_os_error() == Some(libc::ENXIO)
            || is_not_block(&e)
        {
            EngineError::Invalid(format!(
                "device={path} of volume {volume_id}: {e}: not a block device"
            ))
        } else {
            EngineError::io(format!("open device={path}"), e)
        }
    })
}

/// How often a copy of a volume that was idle at its start checks that it still is.
const IN_USE_POLL: Duration = Duration::from_millis(200);

impl Inner {
    pub(super) fn start_backup(
        &self,
        target_name: &str,
        request: &BackupRequest,
    ) -> Result<Arc<Job>> {
        let target = self.target(target_name)?;
        let (backend_name, info) = match &request.device {
            Some(path) => (
                crate::volume::block::DEVICE_BACKEND.to_string(),
                named_device(&request.volume_id, path)?,
            ),
            None => self.find_anywhere(&request.volume_id)?,
        };
        let backend = self.backend(&backend_name)?;
        let key = (backend_name.clone(), info.id.clone());
        {
            let state = self.state.lock();
            if state.stopping {
                return Err(EngineError::Busy("backupfs is stopping".to_string()));
            }
            if let Some(busy) = state.busy.get(&key) {
                return Err(busy_error(busy, &info.id));
            }
        }
        if let Some(why) = backend.driver.in_use(&info.pool, &info.id)?
            && let Err(reason) = backend.driver.capabilities(&info.pool).snapshots
        {
            return Err(EngineError::Busy(format!(
                "volume {} is in-use ({why}) and cannot be snapshotted: {reason}",
                info.id
            )));
        }
        match backend.driver.overlays(&info.pool, &info.id) {
            Ok(overlays) if !overlays.is_empty() => warn!(
                volume_id = %info.id,
                "volume {} has snapshot overlays beside it ({}): the backup holds volume-{} as it was when the first was made, not the newer data in them (a Cinder snapshot of a RemoteFS volume; Cinder's own backup of it uses a temporary snapshot, which is fine)",
                info.id,
                overlays.join(", "),
                info.id
            ),
            Ok(_) => {}
            Err(e) => warn!(volume_id = %info.id, "cannot look for snapshot overlays: {e}"),
        }
        let needed = self.space_needed(target.as_ref(), request, &backend_name, &info);
        let free = target.free_space()?;
        let backup_id = BackupId::new();
        let record = Record {
            format: FORMAT_VERSION,
            id: backup_id.clone(),
            volume_id: request.volume_id.clone(),
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
            temporary_snapshot: None,
            base_snapshot: None,
            changed_bytes: None,
            changes_found_by: None,
            device: request.device.clone(),
            node: Some(self.config.node_name()),
            xattrs: Default::default(),
            mac: None,
            defect: None,
        };
        let job = Arc::new(Job::new(
            JobKind::Backup,
            JobSubject {
                backup_id,
                volume_id: request.volume_id.clone(),
                backend: backend_name,
                pool: info.pool.clone(),
                target: target_name.to_string(),
                name: request.name.clone(),
                size: info.size,
                incremental: request.incremental,
            },
        ));
        {
            // Checked again under the lock: two requests may race past the first check.
            let mut state = self.state.lock();
            if let Some(busy) = state.busy.get(&key) {
                return Err(busy_error(busy, &info.id));
            }
            // The space check and the reservation under one lock: two requests that each
            // fit but not together are not both accepted.
            state.reservations.retain(|j| j.ended_at().is_none());
            let reserved: u64 = state
                .reservations
                .iter()
                .filter(|j| j.target == target_name)
                .map(|j| j.still_reserved())
                .sum();
            if let Some(free) = free
                && needed.saturating_add(reserved) > free
            {
                return Err(EngineError::NoSpace(format!(
                    "target {target_name} has {free} bytes free, {reserved} of them reserved by backups already accepted; the backup of volume {} needs {needed} bytes",
                    info.id
                )));
            }
            job.reserved.store(needed, Ordering::Relaxed);
            state.reservations.push(job.clone());
            // Reserve the volume, then write the record without holding the engine's lock
            // (two fsyncs: `jobs` and restores must not wait for them).
            state.busy.insert(key.clone(), Busy::Backup);
        }
        // On a target other nodes serve too, the volume is claimed there: one node at a
        // time backs it up.
        if let Some(coordinator) = target.catalogue().coordinator() {
            match coordinator.claim(&key.0, &key.1, &job.backup_id) {
                Ok(claim) => {
                    let _ = job.claim.set(claim);
                }
                Err(e) => {
                    let mut state = self.state.lock();
                    state.busy.remove(&key);
                    state.reservations.retain(|j| !Arc::ptr_eq(j, &job));
                    return Err(match e {
                        crate::targets::lease::LeaseError::Busy(why) => EngineError::Busy(why),
                        other => EngineError::io(
                            "claim the volume",
                            std::io::Error::other(other.to_string()),
                        ),
                    });
                }
            }
        }
        // The record comes first, so a crash from here on is found and cleaned at start-up.
        let queued = target
            .write_record(&record)
            .map_err(EngineError::from)
            .and_then(|()| self.enqueue(&job));
        if let Err(e) = queued {
            {
                let mut state = self.state.lock();
                state.busy.remove(&key);
                state.reservations.retain(|j| !Arc::ptr_eq(j, &job));
            }
            // Refused (the daemon began to stop meanwhile): the record we just wrote goes,
            // and the refusal changes nothing.
            if let Err(remove) = target.remove_record(&job.backup_id) {
                error!(
                    backup_id = %job.backup_id,
                    "cannot remove the record of a refused backup: {remove}"
                );
            }
            self.release_claim(target.as_ref(), &job);
            return Err(e);
        }
        info!(
            backup_id = %job.backup_id,
            volume_id = %job.volume_id,
            backend = job.backend,
            backup_target = target_name,
            size = job.size,
            "backup queued"
        );
        Ok(job)
    }

    /// Runs one backup job to its end (also one cancelled before it started) and records
    /// the outcome.
    pub(super) fn run_backup(&self, job: &Job) {
        let started = Instant::now();
        pause_point("started", &job.cancel);
        if !job.is_cancelled() {
            info!(
                backup_id = %job.backup_id,
                volume_id = %job.volume_id,
                backup_target = job.target,
                size = job.size,
                "backup started"
            );
        }
        let outcome = self.backup(job);
        let written = *outcome.as_ref().unwrap_or(&0);
        let failure = match outcome {
            Ok(stored) => {
                let secs = started.elapsed().as_secs_f64();
                info!(
                    backup_id = %job.backup_id,
                    volume_id = %job.volume_id,
                    backup_target = job.target,
                    bytes = job.size,
                    stored_bytes = stored,
                    seconds = format!("{secs:.2}"),
                    mib_per_s = format!("{:.1}", job.size as f64 / secs.max(1e-6) / 1048576.0),
                    "backup available"
                );
                None
            }
            Err(e) => {
                let failure = Failure::of(e);
                error!(
                    backup_id = %job.backup_id,
                    volume_id = %job.volume_id,
                    backup_target = job.target,
                    "backup failed: {}; the source volume is untouched, request a new backup once the cause is fixed",
                    failure.reason
                );
                Some(failure)
            }
        };
        if let Ok(target) = self.target(&job.target) {
            self.release_claim(target.as_ref(), job);
        }
        self.state
            .lock()
            .busy
            .remove(&(job.backend.clone(), job.volume_id.to_string()));
        let available = failure.is_none();
        self.counters.backup_ended(&job.target, available, written);
        job.finish(failure);
        if available {
            pause_point("settling", &job.cancel);
        }
        if available
            && let Ok(target) = self.target(&job.target)
            && let Err(e) = target.settle_data(&job.backup_id)
        {
            warn!(backup_id = %job.backup_id, "backup available; its data is settled later ({e})");
        }
    }

    /// The pipeline, and on failure its cleanup and the `error` record.
    fn backup(&self, job: &Job) -> Result<u64> {
        let target = self.target(&job.target)?;
        let backend = self.backend(&job.backend)?;
        let mut record = target.record(&job.backup_id)?;
        let result = if job.is_cancelled() {
            Err(EngineError::Interrupted)
        } else {
            self.backup_steps(job, target.as_ref(), backend, &mut record)
        };
        if let Err(e) = &result {
            // Taken over by another node (this one was paused or cut off past its lease):
            // that node records the failure and removes the partial data. Else the data
            // goes first (on a full target, that makes room for the decision and record).
            let taken_over = || {
                warn!(
                    backup_id = %job.backup_id,
                    "another node took this backup over: it records the outcome, not this one"
                );
                Err(EngineError::Busy(format!(
                    "backup {} was taken over by another node after this node's claim lapsed ({})",
                    job.backup_id,
                    e.reason()
                )))
            };
            if self.still_holds(job).is_err() {
                return taken_over();
            }
            cleanup(target.as_ref(), backend.driver.as_ref(), &mut record);
            // (A decision that cannot be stored leaves the claim this node's: the failure
            // is recorded as ever.)
            if matches!(self.decide(target.as_ref(), job, "error"), Ok(false)) {
                return taken_over();
            }
            record.status = Status::Error;
            record.completed_at = Some(now());
            record.error = Some(e.reason());
            if let Err(e) = target.write_record(&record) {
                error!(backup_id = %job.backup_id, "cannot record the failure: {e}");
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
        // Named by the driver (on RBD it carries the time): the record keeps the name.
        let snapshot = driver.snapshot_name(&job.backup_id);
        let in_use = driver.in_use(&job.pool, &job.volume_id)?;
        let before = driver.stat(&job.pool, &job.volume_id)?;
        // An incremental backup reads a snapshot where it can: the snapshot is kept as the
        // base of the next one, whose changes the storage can then tell.
        // (Asked only then: on file pools the answer is a reflink probe.)
        let from_snapshot = in_use.is_some()
            || (job.incremental && driver.capabilities(&job.pool).snapshots.is_ok());
        let parent = if job.incremental {
            self.parent_of(target, job)
                .filter(|parent| !made_after(job, driver, parent))
        } else {
            None
        };
        let parent = self.hold_parent(target, job, parent)?;
        let source = if from_snapshot {
            job.set_phase(Phase::Snapshotting);
            record.snapshot_used = true;
            record.temporary_snapshot = Some(snapshot.clone());
            // Recorded before the snapshot exists, so recovery knows to look for it.
            self.still_holds(job)?;
            target.write_record(record)?;
            match &in_use {
                Some(why) => info!(
                    backup_id = %job.backup_id,
                    volume_id = %job.volume_id,
                    "volume is in-use ({why}): backing up from a temporary snapshot"
                ),
                None => info!(
                    backup_id = %job.backup_id,
                    volume_id = %job.volume_id,
                    "incremental backup: reading a snapshot, kept as the base of the next one"
                ),
            }
            driver
                .snapshot(&job.pool, &job.volume_id, &snapshot)
                .map_err(|e| match (e, &in_use) {
                    (VolumeError::SnapshotUnsupported(reason), Some(why)) => {
                        EngineError::Busy(format!(
                            "volume {} is in-use ({why}) and cannot be snapshotted: {reason}",
                            job.volume_id
                        ))
                    }
                    (other, _) => other.into(),
                })?;
            pause_point("snapshotting", &job.cancel);
            driver.attach_snapshot(&job.pool, &snapshot)?
        } else {
            driver.attach(&job.pool, &job.volume_id, Access::Stream)?
        };
        job.set_phase(Phase::Copying);
        let size = source
            .device
            .size()
            .map_err(|e| EngineError::io(format!("size of {}", source.device.describe()), e))?;
        let (destination, parent) = self.new_data(target, job, size, parent)?;
        // A volume read in place could mix old and new data should anything attach it
        // meanwhile: it is watched, and the backup fails.
        let stop_copy = AtomicBool::new(false);
        let attached: Mutex<Option<String>> = Mutex::new(None);
        let copying = AtomicBool::new(true);
        let copied = std::thread::scope(|scope| {
            let watcher = (!from_snapshot).then(|| {
                scope.spawn(|| {
                    while copying.load(Ordering::Relaxed) {
                        if job.is_cancelled() {
                            stop_copy.store(true, Ordering::Relaxed);
                        }
                        if let Ok(Some(why)) = driver.in_use(&job.pool, &job.volume_id) {
                            *attached.lock() = Some(why);
                            stop_copy.store(true, Ordering::Relaxed);
                            return;
                        }
                        // Woken at once when the copy ends: the backup must not wait
                        // out the poll.
                        std::thread::park_timeout(IN_USE_POLL);
                    }
                })
            });
            let cancel = if from_snapshot {
                &job.cancel
            } else {
                &stop_copy
            };
            let result = self.copy_data(
                job,
                target,
                driver,
                &source,
                &destination,
                size,
                parent.as_ref(),
                from_snapshot.then_some(snapshot.as_str()),
                cancel,
            );
            copying.store(false, Ordering::Relaxed);
            if let Some(watcher) = &watcher {
                watcher.thread().unpark();
            }
            result
        });
        driver.detach(source)?;
        drop(destination);
        if let Some(why) = attached.lock().take() {
            return Err(EngineError::Busy(format!(
                "volume {} was attached during the copy ({why}); the copy may be inconsistent, request the backup again",
                job.volume_id
            )));
        }
        if job.is_cancelled() {
            return Err(EngineError::Interrupted);
        }
        let (outcome, found_by, leaves) = copied?;
        if !from_snapshot {
            if let Some(why) = driver.in_use(&job.pool, &job.volume_id)? {
                return Err(EngineError::Busy(format!(
                    "volume {} was attached during the copy ({why}); the copy may be inconsistent, request the backup again",
                    job.volume_id
                )));
            }
            let after = driver.stat(&job.pool, &job.volume_id)?;
            if after.mtime != before.mtime || after.size != before.size {
                return Err(EngineError::Busy(format!(
                    "volume {} was written during the copy; the copy may be inconsistent, request the backup again",
                    job.volume_id
                )));
            }
        }
        job.set_phase(Phase::Finishing);
        pause_point("finishing", &job.cancel);
        if job.is_cancelled() {
            return Err(EngineError::Interrupted);
        }
        // Nothing more is written (checksums, the record) for a backup another node may
        // have taken over.
        self.still_holds(job)?;
        // Nothing writes the data any more (an RBD target snapshots it once the backup is
        // available: `settle_data`).
        target.finish_data(&job.backup_id)?;
        record.checksums = Some(target.write_checksums(
            &job.backup_id,
            &outcome.checksums,
            outcome.kind,
            leaves,
        )?);
        record.size = size;
        record.stored_bytes = outcome.bytes_written;
        record.parent_id = parent.as_ref().map(|p| p.id.clone());
        record.changed_bytes = parent.as_ref().map(|_| outcome.changed_bytes);
        record.changes_found_by = found_by.map(str::to_string);
        record.status = Status::Available;
        record.completed_at = Some(now());
        let keep_base = job.incremental && from_snapshot;
        if keep_base {
            // The snapshot becomes the base of the next incremental backup, in the same
            // atomic write that makes the backup available.
            record.base_snapshot = record.temporary_snapshot.take();
        }
        if !self.decide(target, job, "available")? {
            return Err(EngineError::Busy(format!(
                "backup {}: this node's claim lapsed before the backup was recorded",
                job.backup_id
            )));
        }
        target.write_record(record)?;
        if keep_base {
            self.drop_older_bases(target, record);
        } else if record.temporary_snapshot.is_some() && remove_snapshot(driver, record) {
            // The backup is available: another node (an operator's xattr) may have
            // changed the record meanwhile, so it is read again under its lock.
            let updated = self.updating(target, &job.backup_id).and_then(|_updating| {
                let mut stored = target.record(&job.backup_id)?;
                stored.temporary_snapshot = None;
                Ok(target.write_record(&stored)?)
            });
            if let Err(e) = updated {
                // The snapshot is gone; the janitor finds it gone and says so.
                warn!(backup_id = %job.backup_id, "cannot update the record: {e}");
            }
        }
        self.apply_retention(target, record);
        Ok(outcome.bytes_written)
    }

    /// The target space a backup request needs up front: what the volume holds, unless
    /// it is an incremental backup that will share its parent's data (a reflink target,
    /// an RBD series), which stores only what changed. That is not known before the copy
    /// has found it, so such a request is accepted without a reservation, and a copy
    /// that then runs out of space fails and removes its partial data like any other.
    fn space_needed(
        &self,
        target: &dyn BackupTarget,
        request: &BackupRequest,
        backend: &str,
        info: &VolumeInfo,
    ) -> u64 {
        if !request.incremental || !target.shares_data() {
            return info.allocated;
        }
        let has_parent = target
            .newest_sound(&request.volume_id, Some(backend), true)
            .is_ok_and(|parent| parent.is_some());
        if has_parent { 0 } else { info.allocated }
    }

    /// The parent of an incremental backup: the newest available backup of the same volume
    /// (same backend) on this target that no verify found damaged.
    fn parent_of(&self, target: &dyn BackupTarget, job: &Job) -> Option<Record> {
        // Read are the volume's newest backups only, not the whole catalogue (issue 28).
        // The job's own record is `creating`: never sound.
        let parent = match target.newest_sound(&job.volume_id, Some(&job.backend), true) {
            Ok(parent) => parent,
            Err(e) => {
                warn!(backup_id = %job.backup_id, "incremental: cannot read the catalogue ({e}): full backup");
                return None;
            }
        };
        if parent.is_none() {
            info!(
                backup_id = %job.backup_id,
                volume_id = %job.volume_id,
                "incremental: no available backup of the volume on this target yet: full backup"
            );
        }
        parent
    }

    /// The new backup's data: a shared copy of the parent's where the target can share
    /// data, else empty (and the backup is a full one).
    fn new_data(
        &self,
        target: &dyn BackupTarget,
        job: &Job,
        size: u64,
        parent: Option<Record>,
    ) -> Result<(Attachment, Option<Record>)> {
        // A node resumed after a pause past its lease makes no data another node has
        // already cleaned up for it (an RBD series head it would write over).
        self.still_holds(job)?;
        let Some(parent) = parent else {
            return Ok((
                target.create_data(&job.backup_id, size, None)?.attachment,
                None,
            ));
        };
        match target.create_data(&job.backup_id, size, Some(&parent.id)) {
            Ok(new) if new.shared => Ok((new.attachment, Some(parent))),
            Ok(new) => {
                info!(
                    backup_id = %job.backup_id,
                    "incremental: target {} cannot share data (no reflinks): full backup",
                    job.target
                );
                Ok((new.attachment, None))
            }
            // The parent went away meanwhile (deleted): a full backup.
            Err(TargetError::NotFound(_) | TargetError::Volume(VolumeError::NotFound(_))) => {
                info!(backup_id = %job.backup_id, "incremental: parent {} is gone: full backup", parent.id);
                Ok((
                    target.create_data(&job.backup_id, size, None)?.attachment,
                    None,
                ))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Copies the source into the new data: whole, or for an incremental backup only what
    /// changed since the parent. Returns the outcome, how changes were found, and whether
    /// the backup's leaf sums were written whole (and flushed).
    #[allow(clippy::too_many_arguments)]
    fn copy_data(
        &self,
        job: &Job,
        target: &dyn BackupTarget,
        driver: &dyn VolumeDriver,
        source: &Attachment,
        destination: &Attachment,
        size: u64,
        parent: Option<&Record>,
        snapshot: Option<&str>,
        cancel: &AtomicBool,
    ) -> Result<(copy::CopyOutcome, Option<&'static str>, bool)> {
        let bps_limit = self.config.copy_bps_limit;
        let (src, dst) = (source.device.as_ref(), destination.device.as_ref());
        let blocks = size.div_ceil(copy::CHECKSUM_BLOCK);
        // Leaf sums are what makes the next incremental cheap, never a reason to fail.
        let leaves_file = |base: Option<&Record>| match target.create_leaves(
            &job.backup_id,
            base,
            blocks,
        ) {
            Ok(file) => file,
            Err(e) => {
                warn!(backup_id = %job.backup_id, "leaf sums not kept ({e}): the next incremental reads whole blocks");
                None
            }
        };
        let full = |dest_is_zero: bool| -> Result<(copy::CopyOutcome, bool)> {
            let options = CopyOptions {
                dest_is_zero,
                bps_limit,
            };
            let leaves = leaves_file(None);
            let outcome = copy::copy_with_leaves(
                src,
                dst,
                Range::whole(size),
                options,
                leaves.as_ref(),
                &job.progress,
                cancel,
            )?;
            let kept = flushed(job, leaves, &outcome);
            Ok((outcome, kept))
        };
        let Some(parent) = parent else {
            let (outcome, leaves) = full(true)?;
            return Ok((outcome, None, leaves));
        };
        // The destination reads as the parent's data; its checksums come with it.
        let kind = parent
            .checksums
            .as_ref()
            .and_then(|c| copy::SumKind::from_name(&c.algorithm));
        let sums = match (target.read_checksums(parent), kind) {
            (Ok(sums), Some(kind)) if parent.size <= size => (sums, kind),
            (other, _) => {
                if let Err(e) = other {
                    warn!(backup_id = %job.backup_id, "incremental: the parent's checksums cannot be read ({e}): copying everything");
                }
                let (outcome, leaves) = full(false)?;
                return Ok((outcome, Some("checksums"), leaves));
            }
        };
        let (sums, kind) = sums;
        let changed =
            snapshot.and_then(|snapshot| self.changes_since(job, driver, parent, snapshot, size));
        let found_by = if changed.is_some() {
            "snapshot-diff"
        } else {
            "checksums"
        };
        let base = copy::Base {
            sums: &sums,
            size: parent.size,
            changed: changed.as_deref(),
            kind,
        };
        // The parent's leaf sums to start from; or, for a parent made before them (whose
        // blocks are then all read), a new file.
        let leaves = if kind == copy::SumKind::CURRENT {
            leaves_file(Some(parent))
        } else {
            info!(backup_id = %job.backup_id, "incremental: the parent's checksums are {}: reading every block once for {}", kind.name(), copy::SumKind::CURRENT.name());
            leaves_file(None)
        };
        let outcome = copy::copy_incremental(
            src,
            dst,
            size,
            base,
            leaves.as_ref(),
            bps_limit,
            &job.progress,
            cancel,
        )?;
        info!(
            backup_id = %job.backup_id,
            parent_id = %parent.id,
            changed_bytes = outcome.changed_bytes,
            bytes_read = outcome.bytes_read,
            found_by,
            "incremental backup copied"
        );
        let kept = flushed(job, leaves, &outcome);
        Ok((outcome, Some(found_by), kept))
    }

    /// What changed in the volume (its new `snapshot`) since the parent's base snapshot,
    /// as the storage tells it; None (read everything, compare checksums) when it cannot,
    /// or the base is gone (removed by hand; or the volume was deleted, which on RBD takes
    /// our snapshots along, and made again with its ID).
    fn changes_since(
        &self,
        job: &Job,
        driver: &dyn VolumeDriver,
        parent: &Record,
        snapshot: &str,
        size: u64,
    ) -> Option<Vec<std::ops::Range<u64>>> {
        let base = parent
            .base_snapshot
            .as_deref()
            .filter(|_| parent.pool == job.pool)?;
        match driver.changed_extents(&job.pool, base, snapshot, 0..size) {
            Ok(changed) => changed,
            Err(e) => {
                warn!(
                    backup_id = %job.backup_id,
                    "incremental: cannot tell what changed since snapshot {base} ({e}): reading everything"
                );
                None
            }
        }
    }
}

/// Whether the volume was made after `parent` began (deleted and made again with its ID;
/// Cinder's RBD delete takes our base snapshot along): nothing of the parent is this
/// volume's, so the backup is full. Where the storage does not say, the parent stands.
fn made_after(job: &Job, driver: &dyn VolumeDriver, parent: &Record) -> bool {
    let began = crate::targets::record::parse_rfc3339(&parent.created_at);
    match (driver.created(&job.pool, &job.volume_id), began) {
        (Ok(Some(created)), Some(began)) if created > began => {
            info!(
                backup_id = %job.backup_id,
                volume_id = %job.volume_id,
                parent_id = %parent.id,
                "incremental: the volume was made after its newest backup began (deleted and made again): full backup"
            );
            true
        }
        _ => false,
    }
}

fn busy_error(busy: &Busy, volume_id: &str) -> EngineError {
    EngineError::Busy(match busy {
        Busy::Backup => format!("volume {volume_id} already has a backup queued or running"),
        Busy::Opening | Busy::Restore(_) => format!("volume {volume_id} is being restored"),
    })
}

/// Flushes a backup's leaf-sums file if the copy wrote it whole; whether the record may
/// name it.
fn flushed(job: &Job, leaves: Option<std::fs::File>, outcome: &copy::CopyOutcome) -> bool {
    let Some(file) = leaves.filter(|_| outcome.leaves_whole) else {
        return false;
    };
    match file.sync_data() {
        Ok(()) => true,
        Err(e) => {
            warn!(backup_id = %job.backup_id, "leaf sums not kept ({e}): the next incremental reads whole blocks");
            false
        }
    }
}
