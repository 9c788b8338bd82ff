//! Verification: a job that reads a whole backup and checks every block against the
//! checksum taken while it was copied. It runs on the job workers, so verifies and
//! backups together never exceed `max_parallel_jobs`. It only writes the record.

use super::job::{Failure, JobSubject, pause_point};
use super::*;
use crate::ids::BackupId;
use crate::targets::record::Status;
use std::time::Instant;
use tracing::error;

impl Inner {
    pub(super) fn start_verify(&self, target_name: &str, backup_id: &BackupId) -> Result<Arc<Job>> {
        let target = self.target(target_name)?;
        let record = target.record(backup_id)?;
        if record.status != Status::Available {
            return Err(EngineError::NotFound(format!(
                "backup {backup_id} is {}",
                record.status.as_str()
            )));
        }
        if let Some(refused) = crate::targets::untrusted(&record) {
            return Err(refused.into());
        }
        if record.checksums.is_none() {
            return Err(EngineError::NotPermitted(format!(
                "backup {backup_id} has no checksums to verify against"
            )));
        }
        let job = Arc::new(Job::new(
            JobKind::Verify,
            JobSubject {
                backup_id: record.id.clone(),
                volume_id: record.volume_id.clone(),
                backend: record.backend.clone(),
                pool: record.pool.clone(),
                target: target_name.to_string(),
                name: record.name.clone(),
                size: record.size,
                incremental: false,
            },
        ));
        self.enqueue(&job)?;
        Ok(job)
    }

    pub(super) fn run_verify(&self, job: &Job) {
        job.set_phase(Phase::Verifying);
        pause_point("verifying", &job.cancel);
        let failure = self.verify(job).err().map(Failure::of);
        let result = match failure.as_ref().and_then(|f| f.cause.as_deref()) {
            None => "good",
            Some(EngineError::Damaged { .. }) => "damaged",
            Some(_) => "failed",
        };
        self.counters.verify_ended(&job.target, result);
        job.finish(failure);
    }

    fn verify(&self, job: &Job) -> Result<()> {
        if job.is_cancelled() {
            return Err(EngineError::Interrupted);
        }
        let target = self.target(&job.target)?;
        let image = self.open_image(&job.target, &job.backup_id)?;
        let started = Instant::now();
        let bad = image.damaged_blocks(&job.progress, &job.cancel)?;
        {
            let _updating = self.updating(target.as_ref(), &job.backup_id)?;
            let mut record = target.record(&job.backup_id)?;
            if record.status != Status::Available {
                return Err(EngineError::NotFound(format!(
                    "backup {} is {} now",
                    job.backup_id,
                    record.status.as_str()
                )));
            }
            record.verified_at = Some(now());
            record.damaged_blocks = Some(bad.clone());
            target.write_record(&record)?;
        }
        if bad.is_empty() {
            info!(
                backup_target = job.target,
                backup_id = %job.backup_id,
                seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
                "backup verified: every block matches its checksum"
            );
            Ok(())
        } else {
            let e = image::damaged(&job.backup_id, &bad);
            error!(
                backup_target = job.target,
                backup_id = %job.backup_id,
                "verify: {e}; restore from another backup and check the target's storage"
            );
            Err(e)
        }
    }
}
