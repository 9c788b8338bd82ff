//! Records and checksums of an `s3` target, as objects beside its chunks:
//! `record.<id>` (the record, JSON, MAC'd with the target key as everywhere) and
//! `sums.<id>` (the checksums), each written whole by one PUT, encoded and checked by the
//! record layer every catalogue shares (`targets::records`). Records are read once at
//! open and kept in memory (`ls` never waits for the gateway); this daemon is the only
//! writer of its records. Never removes an object it did not name.

use crate::copy::SumKind;
use crate::ids::BackupId;
use crate::targets::auth::TargetKey;
use crate::targets::catalogue::Catalogue;
use crate::targets::record::{Checksums, Record};
use crate::targets::records::{Names, RecordCache, StoreRecords};
use crate::targets::store::ObjectStore;
use crate::targets::{Result, TargetError};
use std::path::PathBuf;
use std::sync::Arc;

pub const RECORD_PREFIX: &str = "record.";
pub const SUMS_PREFIX: &str = "sums.";

/// The names of an s3 target's catalogue objects.
pub const S3_NAMES: Names = Names {
    record_prefix: RECORD_PREFIX,
    record_suffix: "",
    sums_prefix: SUMS_PREFIX,
    sums_suffix: "",
};

/// A target error for a store failure, keeping its errno (ETIMEDOUT matters).
pub fn store_error(
    op: &'static str,
    store: &dyn ObjectStore,
    name: &str,
) -> impl FnOnce(std::io::Error) -> TargetError {
    let path = PathBuf::from(format!("{}{name}", store.describe()));
    move |source| TargetError::Io { op, path, source }
}

pub struct StoreCatalogue {
    target: String,
    objects: StoreRecords,
    records: RecordCache,
}

impl StoreCatalogue {
    /// Reads every record of the store.
    pub fn open(
        target: &str,
        store: Arc<dyn ObjectStore>,
        key: Option<Arc<TargetKey>>,
    ) -> Result<StoreCatalogue> {
        let objects = StoreRecords {
            store,
            names: S3_NAMES,
            key,
        };
        let mut records = RecordCache::new(S3_NAMES);
        let names = objects.store.list(RECORD_PREFIX).map_err(store_error(
            "list",
            objects.store.as_ref(),
            RECORD_PREFIX,
        ))?;
        for name in names {
            records.load(&objects, target, &name)?;
        }
        Ok(StoreCatalogue {
            target: target.to_string(),
            objects,
            records,
        })
    }
}

impl Catalogue for StoreCatalogue {
    fn describe(&self) -> String {
        format!("{} ({})", self.target, self.objects.store.describe())
    }

    fn records(&self) -> Result<Vec<Record>> {
        Ok(self.records.records())
    }

    fn record(&self, backup_id: &BackupId) -> Result<Record> {
        self.records.record(backup_id)
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        let kept = self.objects.write_record(record)?;
        self.records.insert(kept);
        Ok(())
    }

    fn remove_record(&self, backup_id: &BackupId) -> Result<()> {
        self.objects.remove_record(backup_id)?;
        self.records.remove(backup_id);
        Ok(())
    }

    fn write_checksums(
        &self,
        backup_id: &BackupId,
        sums: &[crate::copy::sums::Sum],
        kind: SumKind,
        _leaves: bool,
    ) -> Result<Checksums> {
        // No leaf sums kept: an incremental compares whole blocks' checksums.
        self.objects.write_sums(backup_id, sums, kind, None)
    }

    fn read_checksums(&self, record: &Record) -> Result<Vec<crate::copy::sums::Sum>> {
        self.objects.read_sums(record)
    }

    fn remove_checksums(&self, backup_id: &BackupId) -> Result<()> {
        self.objects.remove_sums(backup_id)
    }

    /// Every object is written whole by one PUT: a crash leaves no temporary.
    fn remove_temporaries(&self) -> Result<()> {
        Ok(())
    }

    fn foreign(&self) -> Vec<String> {
        Vec::new()
    }
}
