//! The backup pipeline's part in serving a target with other nodes (see
//! `targets::lease`): whether this node still holds a backup's claim, deciding how a
//! backup ended, letting the claim go, and holding an incremental's parent. Where no other
//! node serves the target (no coordinator), each of them lets the backup go on.

use super::*;
use crate::targets::record::Record;

impl Inner {
    /// Whether this node may still write for the backup: true where no other node serves
    /// the target.
    pub(super) fn still_holds(&self, job: &Job) -> Result<()> {
        match job.claim.get() {
            Some(claim) if !claim.valid(self.config.lease()) => Err(EngineError::Busy(format!(
                "backup {}: this node's claim lapsed (another node may have taken it over)",
                job.backup_id
            ))),
            _ => Ok(()),
        }
    }

    /// Decides, for good, how the backup ends (`available` or `error`): false if another
    /// node took it over (it then records the outcome). True where no other node serves
    /// the target.
    pub(super) fn decide(
        &self,
        target: &dyn BackupTarget,
        job: &Job,
        outcome: &str,
    ) -> Result<bool> {
        match (job.claim.get(), target.catalogue().coordinator()) {
            (Some(claim), Some(coordinator)) => coordinator
                .decide(claim, outcome)
                .map_err(|e| EngineError::io("record how the backup ended", e)),
            _ => Ok(true),
        }
    }

    /// Lets go of the backup's claim on its volume, once its record is written.
    pub(super) fn release_claim(&self, target: &dyn BackupTarget, job: &Job) {
        if let (Some(claim), Some(coordinator)) =
            (job.claim.get(), target.catalogue().coordinator())
        {
            coordinator.release(claim);
        }
    }

    /// Names the parent in the backup's claim, so that no node deletes it meanwhile, then
    /// checks it is still there (a delete elsewhere marks it `deleting` before it looks at
    /// the claims): a parent that went makes the backup full.
    pub(super) fn hold_parent(
        &self,
        target: &dyn BackupTarget,
        job: &Job,
        parent: Option<Record>,
    ) -> Result<Option<Record>> {
        let (Some(claim), Some(coordinator)) = (job.claim.get(), target.catalogue().coordinator())
        else {
            return Ok(parent);
        };
        let Some(parent) = parent else {
            return Ok(None);
        };
        coordinator
            .set_parent(claim, Some(&parent.id))
            .map_err(|e| EngineError::Busy(e.to_string()))?;
        let again = target
            .catalogue()
            .reload(&parent.id)
            .and_then(|()| target.record(&parent.id));
        match again {
            Ok(again) if again.is_sound() => Ok(Some(again)),
            _ => {
                info!(
                    backup_id = %job.backup_id,
                    parent_id = %parent.id,
                    "incremental: the parent was deleted meanwhile: full backup"
                );
                let _ = coordinator.set_parent(claim, None);
                Ok(None)
            }
        }
    }
}
