//! The catalogue of an RBD target: records and checksums as RADOS objects (through the
//! shared record layer), the one-daemon object lock checked before every write, and the
//! records kept in memory.

use super::*;

/// Records, checksums, the lock and the claim, in RADOS objects. The daemon holding the
/// lock is the only writer, so the records are read once at open and kept in memory:
/// `ls` and `cat` of records never wait for the cluster.
pub struct RbdCatalogue {
    pub(super) target: String,
    pub(super) io: IoCtx,
    pub(super) lock: ObjectLock,
    /// The records and checksums as objects (`records`: one encoding for every store).
    pub(super) objects: StoreRecords,
    pub(super) records: RecordCache,
    pub(super) foreign: Vec<String>,
}

/// The names of an RBD target's catalogue objects.
pub const RADOS_NAMES: Names = Names {
    record_prefix: RECORD_PREFIX,
    record_suffix: "",
    sums_prefix: SUMS_PREFIX,
    sums_suffix: "",
};

impl RbdCatalogue {
    fn locked_out(&self) -> TargetError {
        TargetError::Locked {
            target: self.target.clone(),
            path: PathBuf::from(format!("{}/{LOCK_OBJECT}", self.io.location())),
        }
    }

    fn check_lock(&self) -> Result<()> {
        if self.lock.is_held() {
            Ok(())
        } else {
            Err(self.locked_out())
        }
    }

    fn remove_object(&self, name: &str) -> Result<()> {
        self.check_lock()?;
        self.objects.remove(name)
    }
}

impl Catalogue for RbdCatalogue {
    fn describe(&self) -> String {
        format!("{} (rbd:{})", self.target, self.io.location())
    }

    fn records(&self) -> Result<Vec<Record>> {
        Ok(self.records.records())
    }

    fn record(&self, backup_id: &BackupId) -> Result<Record> {
        self.records.record(backup_id)
    }

    /// `write_full`: the object is replaced whole, atomically.
    fn write_record(&self, record: &Record) -> Result<()> {
        self.check_lock()?;
        // What was stored (its MAC), still damaged in memory if it was.
        let kept = self.objects.write_record(record)?;
        self.records.insert(kept);
        Ok(())
    }

    fn remove_record(&self, backup_id: &BackupId) -> Result<()> {
        self.remove_object(&record_object(backup_id))?;
        self.records.remove(backup_id);
        Ok(())
    }

    fn write_checksums(
        &self,
        backup_id: &BackupId,
        sums: &[crate::copy::sums::Sum],
        kind: crate::copy::SumKind,
        _leaves: bool,
    ) -> Result<Checksums> {
        // No leaf sums kept in RADOS: an incremental reads whole changed blocks.
        self.check_lock()?;
        self.objects.write_sums(backup_id, sums, kind, None)
    }

    fn read_checksums(&self, record: &Record) -> Result<Vec<crate::copy::sums::Sum>> {
        self.objects.read_sums(record)
    }

    fn remove_checksums(&self, backup_id: &BackupId) -> Result<()> {
        self.remove_object(&sums_object(backup_id))
    }

    /// Every object is written whole: a crash leaves no temporary behind.
    fn remove_temporaries(&self) -> Result<()> {
        Ok(())
    }

    fn foreign(&self) -> Vec<String> {
        self.foreign.clone()
    }
}
