//! What a backup leaves behind once it is available, and what a failed one must not:
//! one base snapshot per volume (older bases go), `keep_last`, and the removal of a failed
//! or interrupted backup's partial data and temporary snapshot, as its record names them.

use super::*;
use crate::targets::record::{Record, Status};
use tracing::{error, warn};

impl Inner {
    /// One base per volume and target: once `record` keeps its snapshot as the base, the
    /// older ones go (named as temporary first, so that a crash cannot forget them).
    pub(super) fn drop_older_bases(&self, target: &dyn BackupTarget, record: &Record) {
        // The volume's records that keep a base, not the whole catalogue (issue 28).
        if let Ok(records) = target.volume_records(&record.volume_id, true, &|l| l.base, &|_| false)
        {
            self.drop_older_bases_of(target, record, &records);
        }
    }

    /// [`drop_older_bases`](Self::drop_older_bases) among `records` (the catalogue as
    /// just listed; each is read again before it changes).
    pub(super) fn drop_older_bases_of(
        &self,
        target: &dyn BackupTarget,
        record: &Record,
        records: &[Record],
    ) {
        let Ok(driver) = self.backend(&record.backend).map(|b| b.driver.clone()) else {
            return;
        };
        for older in records {
            if older.id == record.id
                || older.volume_id != record.volume_id
                || older.backend != record.backend
                || older.base_snapshot.is_none()
            {
                continue;
            }
            let Ok(_updating) = self.updating(target, &older.id) else {
                continue;
            };
            let Ok(mut older) = target.record(&older.id) else {
                continue;
            };
            let Some(base) = older.base_snapshot.take() else {
                continue;
            };
            older.temporary_snapshot = Some(base);
            if let Err(e) = target.write_record(&older) {
                warn!(backup_id = %older.id, "cannot update record: {e}");
                continue;
            }
            if remove_snapshot(driver.as_ref(), &mut older)
                && let Err(e) = target.write_record(&older)
            {
                warn!(backup_id = %older.id, "cannot update record: {e}");
            }
        }
    }

    /// `keep_last`: the volume's oldest available backups beyond N are deleted, each
    /// logged.
    pub(super) fn apply_retention(&self, target: &dyn BackupTarget, record: &Record) {
        let keep = self
            .config
            .targets
            .get(target.name())
            .map_or(0, |t| t.keep_last as usize);
        if keep == 0 {
            return;
        }
        // The volume's available backups, not the whole catalogue (issue 28).
        let Ok(records) = target.volume_records(
            &record.volume_id,
            true,
            &|l| l.status == Status::Available,
            &|_| false,
        ) else {
            return;
        };
        let mut backups: Vec<Record> = records
            .into_iter()
            .filter(|r| {
                // A damaged record (a forged one) neither counts nor is deleted here.
                r.status == Status::Available
                    && r.defect.is_none()
                    && r.volume_id == record.volume_id
                    && r.backend == record.backend
            })
            .collect();
        backups.sort_by_key(|r| std::cmp::Reverse(r.completed_time()));
        for old in backups.into_iter().skip(keep) {
            match self.delete_backup(target.name(), &old.id) {
                Ok(()) => info!(
                    backup_target = target.name(),
                    backup_id = %old.id,
                    volume_id = %old.volume_id,
                    keep_last = keep,
                    "retention: deleted the volume's backup beyond keep_last"
                ),
                Err(e) => warn!(backup_id = %old.id, "retention: cannot delete: {e}"),
            }
        }
    }
}

/// Removes what a failed or interrupted backup left, as its record names it: its partial
/// data and its temporary snapshot (which stays named in the record if it cannot go).
pub(super) fn cleanup(target: &dyn BackupTarget, driver: &dyn VolumeDriver, record: &mut Record) {
    if let Err(e) = target.remove_data_and_checksums(&record.id) {
        error!(
            backup_id = %record.id,
            "cannot remove partial backup data: {e}"
        );
    }
    remove_snapshot(driver, record);
}

/// Removes a record's temporary snapshot, if it names one; clears the name once it is gone.
/// Records of earlier versions say only `snapshot_used`: their snapshot is looked for too.
/// Only a snapshot of the record's own volume whose name is one backupfs makes for this
/// very backup is removed: a record may have been written by someone else. A name that is
/// not is dropped from the record (nothing of ours to wait for), with one warning.
pub(super) fn remove_snapshot(driver: &dyn VolumeDriver, record: &mut Record) -> bool {
    // A record that cannot be trusted (a forged one) names nothing for us to delete: its
    // name is dropped, whatever it says stays.
    if let Some(defect) = &record.defect {
        if let Some(name) = record.temporary_snapshot.take() {
            warn!(
                backup_id = %record.id,
                "not deleting snapshot {name}: the record naming it is damaged ({defect})"
            );
        }
        return true;
    }
    let name = match (&record.temporary_snapshot, record.snapshot_used) {
        (Some(name), _) => name.clone(),
        (None, true) if record.status == Status::Creating => legacy_snapshot_name(&record.id),
        _ => return true,
    };
    let refused = if crate::volume::snapnames::backup_id_of(&name) != Some(record.id.as_str()) {
        Some(VolumeError::NotOurSnapshot(name.clone()))
    } else {
        driver
            .delete_snapshot(&record.pool, &record.volume_id, &name)
            .err()
    };
    match refused {
        None => {
            record.temporary_snapshot = None;
            true
        }
        Some(VolumeError::NotOurSnapshot(_)) => {
            warn!(
                backup_id = %record.id,
                volume_id = %record.volume_id,
                "not deleting snapshot {name:?}: the record names a snapshot backupfs did not make for this backup; it is left alone and no longer named"
            );
            record.temporary_snapshot = None;
            true
        }
        Some(e) => {
            error!(
                backup_id = %record.id,
                "cannot delete temporary snapshot {name} (retried later): {e}"
            );
            record.temporary_snapshot = Some(name);
            false
        }
    }
}
