//! Records and checksums of an `s3` target, as objects beside its chunks:
//! `record.<id>` (the record, JSON, MAC'd with the target key as everywhere) and
//! `sums.<id>` (the checksums), each written whole by one PUT. Written against the
//! `ObjectStore` interface only, so that the shared catalogue built over that interface
//! can replace it. Records are read once at open and kept in memory (`ls` never waits
//! for the gateway); this daemon is the only writer of its records. Never removes an
//! object it did not name.

use crate::copy::SumKind;
use crate::ids::BackupId;
use crate::targets::auth::{self, TargetKey};
use crate::targets::catalogue::{Catalogue, RECORD_CAP};
use crate::targets::record::{Checksums, FORMAT_VERSION, Record};
use crate::targets::store::ObjectStore;
use crate::targets::{Result, TargetError};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub const RECORD_PREFIX: &str = "record.";
pub const SUMS_PREFIX: &str = "sums.";

pub fn record_object(backup_id: &str) -> String {
    format!("{RECORD_PREFIX}{backup_id}")
}

pub fn sums_object(backup_id: &str) -> String {
    format!("{SUMS_PREFIX}{backup_id}")
}

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
    store: Arc<dyn ObjectStore>,
    key: Option<Arc<TargetKey>>,
    /// id → the record, or why it cannot be read (it still owns its data).
    records: Mutex<BTreeMap<String, std::result::Result<Record, String>>>,
}

impl StoreCatalogue {
    /// Reads every record of the store.
    pub fn open(
        target: &str,
        store: Arc<dyn ObjectStore>,
        key: Option<Arc<TargetKey>>,
    ) -> Result<StoreCatalogue> {
        let mut records = BTreeMap::new();
        let names = store.list(RECORD_PREFIX).map_err(store_error(
            "list",
            store.as_ref(),
            RECORD_PREFIX,
        ))?;
        for name in names {
            let Some(id) = name.strip_prefix(RECORD_PREFIX) else {
                continue;
            };
            if !crate::ids::is_backup_id(id) {
                continue;
            }
            let parsed = match store.get(&name, RECORD_CAP) {
                Ok(Some(bytes)) => parse_record(&name, &bytes, key.as_deref()),
                Ok(None) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                    Err(format!("larger than {RECORD_CAP} bytes"))
                }
                Err(e) => return Err(store_error("read", store.as_ref(), &name)(e)),
            };
            if let Err(message) = &parsed {
                tracing::warn!(
                    backup_target = target,
                    "skipping unreadable record {name}: {message}"
                );
            }
            records.insert(id.to_string(), parsed);
        }
        Ok(StoreCatalogue {
            target: target.to_string(),
            store,
            key,
            records: Mutex::new(records),
        })
    }

    fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.store
            .put(name, bytes)
            .map_err(store_error("write", self.store.as_ref(), name))
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.store
            .delete(name)
            .map_err(store_error("remove", self.store.as_ref(), name))
    }
}

fn parse_record(
    name: &str,
    bytes: &[u8],
    key: Option<&TargetKey>,
) -> std::result::Result<Record, String> {
    let mut record: Record = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    if record.format != FORMAT_VERSION {
        return Err(format!("unknown format version {}", record.format));
    }
    if record_object(&record.id) != name {
        return Err(format!("holds the record of {}", record.id));
    }
    auth::inspect(&mut record, key);
    Ok(record)
}

impl Catalogue for StoreCatalogue {
    fn describe(&self) -> String {
        format!("{} ({})", self.target, self.store.describe())
    }

    fn records(&self) -> Result<Vec<Record>> {
        let mut records: Vec<Record> = self
            .records
            .lock()
            .values()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        records.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        Ok(records)
    }

    fn record(&self, backup_id: &BackupId) -> Result<Record> {
        match self.records.lock().get(backup_id.as_str()) {
            Some(Ok(record)) => Ok(record.clone()),
            Some(Err(message)) => Err(TargetError::BadRecord {
                path: PathBuf::from(record_object(backup_id)),
                message: message.clone(),
            }),
            None => Err(TargetError::NotFound(backup_id.to_string())),
        }
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        let name = record_object(&record.id);
        let written = auth::prepare(record, self.key.as_deref());
        let mut bytes =
            serde_json::to_vec_pretty(&written).map_err(|e| TargetError::BadRecord {
                path: PathBuf::from(&name),
                message: e.to_string(),
            })?;
        bytes.push(b'\n');
        self.put(&name, &bytes)?;
        let mut kept = written;
        kept.defect = record.defect.clone();
        self.records.lock().insert(record.id.to_string(), Ok(kept));
        Ok(())
    }

    fn remove_record(&self, backup_id: &BackupId) -> Result<()> {
        self.delete(&record_object(backup_id))?;
        self.records.lock().remove(backup_id.as_str());
        Ok(())
    }

    fn write_checksums(
        &self,
        backup_id: &BackupId,
        sums: &[u64],
        kind: SumKind,
        _leaves: bool,
    ) -> Result<Checksums> {
        // No leaf sums kept: an incremental compares whole blocks' checksums.
        let (bytes, mut entry) = Checksums::encode(sums, kind, sums_object(backup_id), None);
        entry.mac = self.key.as_ref().map(|key| key.sums_mac(backup_id, &bytes));
        self.put(&entry.file, &bytes)?;
        Ok(entry)
    }

    fn read_checksums(&self, record: &Record) -> Result<Vec<u64>> {
        let Some(checksums) = &record.checksums else {
            return Ok(Vec::new());
        };
        let name = sums_object(&record.id);
        let damaged = |message: String| TargetError::BadRecord {
            path: PathBuf::from(&name),
            message,
        };
        let cap = checksums
            .blocks
            .checked_mul(8)
            .ok_or_else(|| damaged(format!("{} checksum blocks", checksums.blocks)))?;
        let bytes = match self.store.get(&name, cap) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Err(damaged("missing".to_string())),
            Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                return Err(damaged(format!("larger than {cap} bytes")));
            }
            Err(e) => return Err(store_error("read", self.store.as_ref(), &name)(e)),
        };
        if let Some(key) = &self.key
            && !key.sums_check(&record.id, checksums, &bytes)
        {
            return Err(damaged(
                "checksum object does not match its MAC in the record".to_string(),
            ));
        }
        checksums.decode(&bytes).ok_or_else(|| {
            damaged("checksum object does not match its digest in the record".to_string())
        })
    }

    fn remove_checksums(&self, backup_id: &BackupId) -> Result<()> {
        self.delete(&sums_object(backup_id))
    }

    /// Every object is written whole by one PUT: a crash leaves no temporary.
    fn remove_temporaries(&self) -> Result<()> {
        Ok(())
    }

    fn foreign(&self) -> Vec<String> {
        Vec::new()
    }
}
