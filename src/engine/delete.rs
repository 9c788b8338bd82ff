//! Deleting backups, and finishing removals that failed earlier. Everything removed here
//! is named by a record: the backup's data and checksums, the record itself, and a
//! temporary snapshot the record still names. A record stays (`deleting`) until all of
//! that is gone, so nothing backupfs made is forgotten while it exists.

use super::retention::remove_snapshot;
use super::*;
use crate::ids::BackupId;
use crate::targets::record::Status;
use tracing::{error, warn};

impl Inner {
    pub(super) fn delete_backup(&self, target_name: &str, backup_id: &BackupId) -> Result<()> {
        let target = self.target(target_name)?;
        let _updating = self.updating(target.as_ref(), backup_id)?;
        let record = target.record(backup_id)?;
        match record.status {
            Status::Creating => Err(EngineError::Busy(format!(
                "backup {backup_id} is still being made"
            ))),
            Status::Deleting => Err(EngineError::NotFound(format!(
                "backup {backup_id} is being deleted"
            ))),
            Status::Available | Status::Error => {
                self.delete(target_name, target.as_ref(), record)?;
                info!(backup_target = target_name, backup_id = %backup_id, "backup deleted");
                Ok(())
            }
        }
    }

    pub(super) fn delete_record(&self, target_name: &str, backup_id: &BackupId) -> Result<()> {
        let target = self.target(target_name)?;
        let _updating = self.updating(target.as_ref(), backup_id)?;
        let record = target.record(backup_id)?;
        if record.status != Status::Error {
            return Err(EngineError::NotPermitted(format!(
                "backup {backup_id} is {}: only records of failed backups are removed this way (rm the .img to delete a backup)",
                record.status.as_str()
            )));
        }
        self.delete(target_name, target.as_ref(), record)?;
        info!(
            backup_target = target_name,
            backup_id = %backup_id,
            "record of failed backup removed"
        );
        Ok(())
    }

    /// Marks the record `deleting` (a crash from there on is finished at the next start),
    /// then removes what it names. Call with `record_updates` held.
    fn delete(
        &self,
        target_name: &str,
        target: &dyn BackupTarget,
        mut record: Record,
    ) -> Result<()> {
        let before = record.status;
        record.status = Status::Deleting;
        target.write_record(&record)?;
        // A backup in progress on any node that builds on this one names it in its claim
        // (before it checks that this record is still available): marked first, looked
        // second, so that of a delete and such a backup at least one sees the other.
        if let Some(coordinator) = target.catalogue().coordinator() {
            let in_use = coordinator
                .parents_in_use()
                .map_err(|e| EngineError::io("read the claims of backups in progress", e));
            let in_use = match in_use {
                Ok(parents) => parents.contains(record.id.as_str()),
                Err(e) => {
                    record.status = before;
                    target.write_record(&record)?;
                    return Err(e);
                }
            };
            if in_use {
                record.status = before;
                target.write_record(&record)?;
                return Err(EngineError::Busy(format!(
                    "backup {} is the parent of an incremental backup in progress",
                    record.id
                )));
            }
        }
        // Nothing cancels a deletion: a test holding it here (kill -9 mid-deletion)
        // releases it with BACKUPFS_TEST_RELEASE, or kills the daemon.
        super::job::pause_point("deleting", &std::sync::atomic::AtomicBool::new(false));
        self.sums.forget(&record.id);
        self.blocks.forget(&record.id);
        self.forget_jobs(&record.id);
        self.finish_deletion(target_name, target, record)
    }

    /// Removes the data, the snapshot and then the record of a `deleting` record. What
    /// cannot be removed now keeps the record, for the janitor to retry.
    fn finish_deletion(
        &self,
        target_name: &str,
        target: &dyn BackupTarget,
        mut record: Record,
    ) -> Result<()> {
        target.remove_data_and_checksums(&record.id)?;
        if let Some(driver) = self.backends.get(&record.backend).map(|b| &b.driver) {
            // The temporary snapshot, then the base kept for incremental backups.
            let mut gone = remove_snapshot(driver.as_ref(), &mut record);
            if gone && let Some(base) = record.base_snapshot.take() {
                record.temporary_snapshot = Some(base);
                gone = remove_snapshot(driver.as_ref(), &mut record);
            }
            if !gone {
                target.write_record(&record)?;
                warn!(
                    backup_target = target_name,
                    backup_id = %record.id,
                    "backup data removed; its record stays (deleting) until its snapshot can be removed"
                );
                return Ok(());
            }
        }
        target.remove_record(&record.id)?;
        if let Some(coordinator) = target.catalogue().coordinator() {
            coordinator.forget_end(&record.id);
        }
        Ok(())
    }

    /// The janitor's round for one target: finishes deletions and removes temporary
    /// snapshots that an earlier attempt could not, for jobs that are not running.
    pub(super) fn finish_leftovers(&self, target_name: &str, target: &dyn BackupTarget) {
        match super::recovery::needing_care(target) {
            Ok(records) => self.finish_leftovers_of(target_name, target, &records),
            Err(e) => warn!(
                backup_target = target_name,
                "cannot read the catalogue: {e}"
            ),
        }
    }

    /// [`finish_leftovers`](Self::finish_leftovers) over `records`: the records that need
    /// care ([`Record::needs_care`]: every one this round acts on), as read once for the
    /// whole round; each is read again, under its lock, before anything changes.
    pub(super) fn finish_leftovers_of(
        &self,
        target_name: &str,
        target: &dyn BackupTarget,
        records: &[Record],
    ) {
        for record in records {
            // A temporary snapshot of another node's backup is that node's to remove (it
            // does so right after the backup ends).
            let pending = record.status == Status::Deleting
                || (record.temporary_snapshot.is_some()
                    && record.status != Status::Creating
                    && self.made_here(record));
            if !pending || self.is_running(&record.id) {
                continue;
            }
            let Ok(_updating) = self.updating(target, &record.id) else {
                continue;
            };
            // Read again under the lock: a delete may have just changed it.
            let Ok(mut record) = target.record(&record.id) else {
                continue;
            };
            match record.status {
                Status::Deleting => {
                    match self.finish_deletion(target_name, target, record.clone()) {
                        Ok(()) if target.record(&record.id).is_err() => info!(
                            backup_target = target_name,
                            backup_id = %record.id,
                            "finished an earlier deletion"
                        ),
                        Ok(()) => {}
                        Err(e) => error!(
                            backup_target = target_name,
                            backup_id = %record.id,
                            "cannot finish deletion: {e}"
                        ),
                    }
                }
                Status::Available | Status::Error if record.temporary_snapshot.is_some() => {
                    let Some(driver) = self.backends.get(&record.backend).map(|b| &b.driver) else {
                        continue;
                    };
                    if remove_snapshot(driver.as_ref(), &mut record) {
                        match target.write_record(&record) {
                            Ok(()) => info!(
                                backup_target = target_name,
                                backup_id = %record.id,
                                "removed a temporary snapshot left by an earlier failure"
                            ),
                            Err(e) => error!(backup_id = %record.id, "cannot update record: {e}"),
                        }
                    }
                }
                _ => {}
            }
        }
        self.keep_one_base_per_volume(target, records);
        self.drop_bases_of_gone_volumes(target_name, target, records);
    }

    /// A base snapshot whose volume is gone will never be used: on file and qcow2 pools
    /// its file would stay beside where the volume was, forever (Cinder's RBD driver
    /// removes ours with the volume; the record then only forgets the name).
    fn drop_bases_of_gone_volumes(
        &self,
        target_name: &str,
        target: &dyn BackupTarget,
        records: &[Record],
    ) {
        for record in records {
            if record.base_snapshot.is_none() || self.is_running(&record.id) {
                continue;
            }
            let Some(driver) = self.backends.get(&record.backend).map(|b| &b.driver) else {
                continue;
            };
            let volume = (record.backend.clone(), record.volume_id.to_string());
            if self.state.lock().busy.contains_key(&volume) {
                continue;
            }
            // Only a volume the storage says is not there; any other failure proves nothing.
            if !matches!(
                driver.stat(&record.pool, &record.volume_id),
                Err(VolumeError::NotFound(_))
            ) {
                continue;
            }
            let Ok(_updating) = self.updating(target, &record.id) else {
                continue;
            };
            let Ok(mut record) = target.record(&record.id) else {
                continue;
            };
            let Some(base) = record.base_snapshot.take() else {
                continue;
            };
            // Named temporary first, so that a crash cannot forget it.
            record.temporary_snapshot = Some(base.clone());
            if let Err(e) = target.write_record(&record) {
                error!(backup_id = %record.id, "cannot update record: {e}");
                continue;
            }
            if remove_snapshot(driver.as_ref(), &mut record) {
                match target.write_record(&record) {
                    Ok(()) => info!(
                        backup_target = target_name,
                        backup_id = %record.id,
                        volume_id = %record.volume_id,
                        "the volume is gone: its base snapshot {base} is removed"
                    ),
                    Err(e) => error!(backup_id = %record.id, "cannot update record: {e}"),
                }
            }
        }
    }

    /// After a crash between a new base and the removal of the old one, a volume may have
    /// two: the newest stays.
    fn keep_one_base_per_volume(&self, target: &dyn BackupTarget, records: &[Record]) {
        let mut newest: std::collections::HashMap<(String, String), &Record> = Default::default();
        for record in records {
            // A record that cannot be trusted never makes a real base look old.
            if record.base_snapshot.is_none()
                || record.defect.is_some()
                || record.status != Status::Available
                || self.is_running(&record.id)
            {
                continue;
            }
            let key = (record.backend.clone(), record.volume_id.to_string());
            if newest
                .get(&key)
                .is_none_or(|n| n.completed_time() < record.completed_time())
            {
                newest.insert(key, record);
            }
        }
        for record in newest.values() {
            self.drop_older_bases_of(target, record, records);
        }
    }
}
