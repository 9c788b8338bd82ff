//! Start-up recovery: what a crash or a stop left behind is found through the records on
//! each target and cleaned, so nothing half-made survives a restart. It never touches a
//! backup that is `available`, nor any source volume.

use super::job::{Failure, JobSubject};
use super::retention::{cleanup, remove_snapshot};
use super::*;
use crate::targets::record::Status;
use tracing::{error, warn};

impl Inner {
    /// Start-up: records left `creating` become `error` and lose their partial data and
    /// snapshot; `deleting` ones are finished; temporary snapshots still named go.
    pub(super) fn recover(&self) {
        for (name, target) in &self.targets {
            let records = match needing_care(target.as_ref()) {
                Ok(records) => records,
                Err(e) => {
                    error!(backup_target = name, "cannot read the catalogue: {e}");
                    continue;
                }
            };
            for record in &records {
                // Another node's backups are its own (or, if it is gone, taken over once
                // its claim lapses: `reap`).
                if !self.made_here(record) {
                    continue;
                }
                let mut record = record.clone();
                let driver = self
                    .backends
                    .get(&record.backend)
                    .map(|b| b.driver.as_ref());
                match record.status {
                    Status::Creating => {
                        if let Some(driver) = driver {
                            cleanup(target.as_ref(), driver, &mut record);
                        } else if let Err(e) = target.remove_data_and_checksums(&record.id) {
                            error!(backup_id = %record.id, "cannot remove partial data: {e}");
                        }
                        record.status = Status::Error;
                        record.completed_at = Some(now());
                        record.error = Some(
                            "interrupted: backupfs stopped while the backup was being made"
                                .to_string(),
                        );
                        match target.write_record(&record) {
                            Ok(()) => warn!(
                                backup_target = name,
                                backup_id = %record.id,
                                volume_id = %record.volume_id,
                                "interrupted backup recorded as error; its partial data is removed"
                            ),
                            Err(e) => {
                                error!(backup_id = %record.id, "cannot record interruption: {e}")
                            }
                        }
                    }
                    Status::Deleting => {}
                    Status::Available | Status::Error => {
                        // Records of earlier versions only say `snapshot_used`: the
                        // snapshot is looked for (and, if it cannot go, named from now on).
                        let named = record.temporary_snapshot.is_some();
                        // (A base kept for incremental backups is not a leftover.)
                        if record.snapshot_used
                            && !named
                            && record.base_snapshot.is_none()
                            && record.node.is_none()
                        {
                            record.temporary_snapshot = Some(legacy_snapshot_name(&record.id));
                        }
                        if let Some(driver) = driver
                            && record.temporary_snapshot.is_some()
                        {
                            // Written when the name came or went.
                            let removed = remove_snapshot(driver, &mut record);
                            if named == removed
                                && let Err(e) = target.write_record(&record)
                            {
                                error!(backup_id = %record.id, "cannot update record: {e}");
                            }
                        }
                    }
                }
            }
            // Deletions cut short are finished as the janitor finishes them (over the
            // records as read above: each is read again before it changes).
            self.finish_leftovers_of(name, target.as_ref(), &records);
            if let Err(e) = target.catalogue().remove_temporaries() {
                error!(backup_target = name, "cannot remove temporary files: {e}");
            }
            // Only what a record says backupfs made is ever removed: anything else here
            // (an operator's file, data whose record was removed by hand) stays.
            match target.strays() {
                Ok(strays) if !strays.is_empty() => warn!(
                    backup_target = name,
                    "leaving {} files in place that no backup record owns: {}",
                    strays.len(),
                    strays.join(", ")
                ),
                Ok(_) => {}
                Err(e) => error!(backup_target = name, "cannot list the target: {e}"),
            }
        }
    }

    /// Whether this node made the backup (records from before nodes had names count as
    /// this node's).
    pub(super) fn made_here(&self, record: &Record) -> bool {
        record
            .node
            .as_ref()
            .is_none_or(|node| *node == self.config.node_name())
    }

    /// A round of the nodes' coordination, on every target other nodes serve too: renews
    /// this node's heartbeat and claims, stops the jobs whose claim lapsed, and takes over
    /// the backups of claims that stopped changing for a whole lease.
    pub(super) fn coordinate(&self) {
        for (name, target) in &self.targets {
            let Some(coordinator) = target.catalogue().coordinator() else {
                continue;
            };
            for claim in coordinator.renew() {
                let jobs = self.state.lock().jobs.clone();
                for job in jobs.iter().filter(|j| *j.backup_id == *claim.backup_id) {
                    if job.ended_at().is_none() && !job.is_cancelled() {
                        error!(
                            backup_target = name,
                            backup_id = %job.backup_id,
                            "this node's claim on the backup lapsed: stopping it (another node takes it over)"
                        );
                        job.cancel.store(true, Ordering::Relaxed);
                    }
                }
            }
            let stale = match coordinator.stale() {
                Ok(stale) => stale,
                Err(e) => {
                    warn!(
                        backup_target = name,
                        "cannot read the claims of other nodes: {e}"
                    );
                    continue;
                }
            };
            for stale in stale {
                if self.reap(name, target.as_ref(), coordinator, &stale) {
                    coordinator.forget(&stale);
                }
            }
        }
    }

    /// Records `error` the backup of a claim this node took over, and removes its partial
    /// data and temporary snapshot (the record names them). False if that is to be tried
    /// again (the claim stays).
    fn reap(
        &self,
        name: &str,
        target: &dyn BackupTarget,
        coordinator: &crate::targets::lease::Coordinator,
        stale: &crate::targets::lease::Stale,
    ) -> bool {
        let Some(id) = stale
            .beat
            .backup_id
            .as_deref()
            .and_then(|id| BackupId::parse(id).ok())
        else {
            return true;
        };
        // Only the backup the claim is about, looked at before anything is decided: a
        // claim planted under another volume's name never makes a backup in progress of
        // a live node go.
        let ours = |record: &Record| {
            stale.object == crate::targets::lease::claim_object(&record.backend, &record.volume_id)
        };
        match target.record(&id) {
            Ok(record) if record.status == Status::Creating && !ours(&record) => {
                warn!(
                    backup_target = name,
                    backup_id = %id,
                    "{} names backup {id}, which is a backup of volume {} on {}: left alone",
                    stale.object,
                    record.volume_id,
                    record.backend
                );
                return true;
            }
            Ok(_) | Err(crate::targets::TargetError::NotFound(_)) => {}
            Err(e) => {
                warn!(backup_target = name, backup_id = %id, "cannot read the record of a backup to take over: {e}");
                return false;
            }
        }
        if !coordinator.take_over(stale) {
            return false;
        }
        let Ok(_updating) = self.updating(target, &id) else {
            return false;
        };
        let mut record = match target.record(&id) {
            Ok(record) if record.status == Status::Creating && ours(&record) => record,
            // Ended already (its node decided, then died), or never recorded.
            Ok(_) | Err(crate::targets::TargetError::NotFound(_)) => return true,
            Err(e) => {
                warn!(backup_target = name, backup_id = %id, "cannot read the record of a backup to take over: {e}");
                return false;
            }
        };
        match self.backends.get(&record.backend) {
            Some(backend) => cleanup(target, backend.driver.as_ref(), &mut record),
            None => {
                if let Err(e) = target.remove_data_and_checksums(&record.id) {
                    error!(backup_id = %record.id, "cannot remove partial data: {e}");
                }
            }
        }
        record.status = Status::Error;
        record.completed_at = Some(now());
        record.error = Some(format!(
            "interrupted: node {} stopped renewing its claim on the backup (killed, paused or cut off); node {} took it over",
            stale.beat.node,
            self.config.node_name()
        ));
        match target.write_record(&record) {
            Ok(()) => {
                warn!(
                    backup_target = name,
                    backup_id = %record.id,
                    volume_id = %record.volume_id,
                    node = stale.beat.node,
                    "took over the backup of a node whose claim lapsed: recorded as error, its partial data removed"
                );
                true
            }
            Err(e) => {
                error!(backup_id = %record.id, "cannot record the takeover: {e}");
                false
            }
        }
    }

    /// After a restart, `jobs` still lists the backups that ended within the last hours,
    /// rebuilt from the catalogue (the records are the truth; nothing else is kept).
    pub(super) fn list_recent_jobs(&self) {
        let now = SystemTime::now();
        let mut recent: Vec<Arc<Job>> = Vec::new();
        for target in self.targets.values() {
            // The listing first (it reads a record once, then only when its file
            // changes), and whole records only for what ended recently.
            let Ok(listed) = target.listing() else {
                continue;
            };
            let ended_recently = listed.iter().filter(|l| {
                matches!(l.status, Status::Available | Status::Error)
                    && now.duration_since(l.completed).unwrap_or(Duration::ZERO) < ENDED_JOB_TTL
            });
            let records = ended_recently.filter_map(|l| target.record(&l.id).ok());
            for record in records.filter(|r| self.made_here(r)) {
                let ended = match record.status {
                    Status::Available => Phase::Available,
                    Status::Error => Phase::Error,
                    _ => continue,
                };
                let age = now
                    .duration_since(record.completed_time())
                    .unwrap_or(Duration::ZERO);
                if age >= ENDED_JOB_TTL {
                    continue;
                }
                let failure = (ended == Phase::Error).then(|| Failure {
                    reason: record.error.clone().unwrap_or_default(),
                    cause: None,
                });
                let subject = JobSubject {
                    backup_id: record.id.clone(),
                    volume_id: record.volume_id.clone(),
                    backend: record.backend.clone(),
                    pool: record.pool.clone(),
                    target: record.target.clone(),
                    name: record.name.clone(),
                    size: record.size,
                    incremental: record.parent_id.is_some(),
                };
                recent.push(Arc::new(Job::ended(subject, failure, age)));
            }
        }
        recent.sort_by_key(|job| job.ended_at());
        self.state.lock().jobs = recent;
    }
}

/// The records start-up and the janitor may have work for ([`Record::needs_care`]), read
/// whole, oldest first: the rest are only listed (at 100,000 backups, holding every record
/// whole would cost seconds and a hundred MiB on every round).
pub(super) fn needing_care(target: &dyn BackupTarget) -> crate::targets::Result<Vec<Record>> {
    let listed = target.listing()?;
    Ok(listed
        .iter()
        .filter(|l| l.needs_care)
        .filter_map(|l| match target.record(&l.id) {
            Ok(record) => Some(record),
            // Gone since the listing: nothing left to do.
            Err(crate::targets::TargetError::NotFound(_)) => None,
            Err(e) => {
                warn!(backup_id = %l.id, "skipping an unreadable record: {e}");
                None
            }
        })
        .collect())
}
