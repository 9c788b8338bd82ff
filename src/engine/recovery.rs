//! Start-up recovery: what a crash or a stop left behind is found through the records on
//! each target and cleaned, so nothing half-made survives a restart. It never touches a
//! backup that is `available`, nor any source volume.

use super::*;

impl Inner {
    /// Start-up: records left `creating` become `error` and lose their partial data and
    /// snapshot; `deleting` ones are finished; stray snapshots of ended backups go.
    pub(super) fn recover(&self) {
        for (name, target) in &self.targets {
            let records = match target.records() {
                Ok(records) => records,
                Err(e) => {
                    error!(target = name, "cannot read the catalogue: {e}");
                    continue;
                }
            };
            for mut record in records {
                let driver = self
                    .backends
                    .get(&record.backend)
                    .map(|b| b.driver.as_ref());
                match record.status {
                    Status::Creating => {
                        if let Some(driver) = driver {
                            cleanup(target.as_ref(), driver, &record);
                        } else if let Err(e) = target.delete_data(&record.id) {
                            error!(backup_id = record.id, "cannot remove partial data: {e}");
                        }
                        record.status = Status::Error;
                        record.completed_at = Some(now());
                        record.error = Some(
                            "interrupted: backupfs stopped while the backup was being made"
                                .to_string(),
                        );
                        match target.write_record(&record) {
                            Ok(()) => warn!(
                                target = name,
                                backup_id = record.id,
                                volume_id = record.volume_id,
                                "interrupted backup recorded as error; its partial data is removed"
                            ),
                            Err(e) => {
                                error!(backup_id = record.id, "cannot record interruption: {e}")
                            }
                        }
                    }
                    Status::Deleting => {
                        let done = target
                            .delete_data(&record.id)
                            .and_then(|()| target.remove_record(&record.id));
                        match done {
                            Ok(()) => info!(
                                target = name,
                                backup_id = record.id,
                                "finished an interrupted deletion"
                            ),
                            Err(e) => error!(backup_id = record.id, "cannot finish deletion: {e}"),
                        }
                    }
                    Status::Available | Status::Error => {
                        if record.snapshot_used
                            && let Some(driver) = driver
                            && let Err(e) =
                                driver.delete_snapshot(&record.pool, &snapshot_name(&record.id))
                        {
                            error!(
                                backup_id = record.id,
                                "cannot delete temporary snapshot: {e}"
                            );
                        }
                    }
                }
            }
            // Data no record owns can only be a leftover; nothing can read it. A record
            // that exists but cannot be read (damaged, newer format, EIO) still owns it.
            if let Err(e) = target.remove_temporaries() {
                error!(target = name, "cannot remove temporary files: {e}");
            }
            if let Ok(ids) = target.data_ids() {
                for id in ids {
                    if matches!(target.record(&id), Err(TargetError::NotFound(_))) {
                        warn!(
                            target = name,
                            "removing stray data volume-{id} that has no record"
                        );
                        if let Err(e) = target.delete_data(&id) {
                            error!(target = name, "cannot remove stray data {id}: {e}");
                        }
                    }
                }
            }
        }
    }

    /// After a restart, `jobs` still lists the backups that ended within the last hours,
    /// rebuilt from the catalogue (the records are the truth; nothing else is kept).
    pub(super) fn list_recent_jobs(&self) {
        let now = SystemTime::now();
        let mut recent: Vec<Arc<Job>> = Vec::new();
        for target in self.targets.values() {
            let Ok(records) = target.records() else {
                continue;
            };
            for record in records {
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
                let progress = Progress::default();
                progress.total.store(record.size, Ordering::Relaxed);
                recent.push(Arc::new(Job {
                    backup_id: record.id.clone(),
                    volume_id: record.volume_id.clone(),
                    backend: record.backend.clone(),
                    pool: record.pool.clone(),
                    target: record.target.clone(),
                    name: record.name.clone(),
                    size: record.size,
                    state: Mutex::new(JobState {
                        phase: ended,
                        error: record.error.clone().map(|reason| (libc::EIO, reason)),
                        ended_at: Some(
                            Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
                        ),
                    }),
                    ended: Condvar::new(),
                    progress,
                    cancel: AtomicBool::new(false),
                }));
            }
        }
        recent.sort_by_key(|job| job.state.lock().ended_at);
        self.state.lock().jobs = recent;
    }
}
