//! Records and checksums on an object store: the one encoding of a catalogue, whatever
//! the storage (a directory, a RADOS pool, an S3 bucket). A record is JSON, written whole
//! (`put`); it is read with a size cap, its format checked, its name checked against the
//! backup it says it is, and on a keyed target its MAC (`auth`); the checksums are read
//! with a cap of 8 bytes per block the record names, and checked against the record's
//! digest (and MAC). Only the names differ between catalogues ([`Names`]).

use super::auth::{self, TargetKey};
use super::record::{Checksums, FORMAT_VERSION, Record};
use super::store::ObjectStore;
use super::{Result, TargetError};
use crate::copy::SumKind;
use crate::ids::BackupId;
use std::path::PathBuf;
use std::sync::Arc;

/// The largest record read: a record is a few KiB (its `xattrs` at most 64 KiB); a bigger
/// object under a record's name is damaged, not read.
pub const RECORD_CAP: u64 = 1 << 20;

/// How a catalogue names its objects.
#[derive(Clone, Copy)]
pub struct Names {
    pub record_prefix: &'static str,
    pub record_suffix: &'static str,
    pub sums_prefix: &'static str,
    pub sums_suffix: &'static str,
}

impl Names {
    pub fn record(&self, backup_id: &str) -> String {
        format!("{}{backup_id}{}", self.record_prefix, self.record_suffix)
    }

    pub fn sums(&self, backup_id: &str) -> String {
        format!("{}{backup_id}{}", self.sums_prefix, self.sums_suffix)
    }

    /// The backup a record's name stands for.
    pub fn record_id<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(self.record_prefix)?
            .strip_suffix(self.record_suffix)
            .filter(|id| crate::ids::is_backup_id(id))
    }
}

/// The records and checksums of one target, on its store.
pub struct StoreRecords {
    pub store: Arc<dyn ObjectStore>,
    pub names: Names,
    /// The target key: records and checksums are sealed with it and checked against it.
    pub key: Option<Arc<TargetKey>>,
}

impl StoreRecords {
    /// Where an object is, for messages.
    pub fn path(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("{}/{name}", self.store.describe()))
    }

    pub(super) fn io(&self, op: &'static str, name: &str, source: std::io::Error) -> TargetError {
        TargetError::Io {
            op,
            path: self.path(name),
            source,
        }
    }

    /// The whole object `name` of at most `cap` bytes (None if it does not exist); one that
    /// is not a plain object or is bigger is damaged (`BadRecord`), never read.
    pub fn read_capped(&self, name: &str, cap: u64) -> Result<Option<Vec<u8>>> {
        self.store.get(name, cap).map_err(|e| {
            if crate::volume::dir::is_not_regular(&e) {
                TargetError::BadRecord {
                    path: self.path(name),
                    message: e.to_string(),
                }
            } else if e.raw_os_error() == Some(libc::EFBIG) {
                TargetError::BadRecord {
                    path: self.path(name),
                    message: format!("larger than {cap} bytes"),
                }
            } else {
                self.io("read", name, e)
            }
        })
    }

    /// A record as read, inspected: marked defective (so damaged) when it is not the
    /// record of the backup its name says, cannot check what it serves, or does not
    /// authenticate. NotFound if there is none.
    pub fn load(&self, name: &str) -> Result<Record> {
        let bytes = self
            .read_capped(name, RECORD_CAP)?
            .ok_or_else(|| TargetError::NotFound(name.to_string()))?;
        let mut record = self.parse(name, &bytes)?;
        auth::inspect(&mut record, self.key.as_deref());
        if record.defect.is_none() && name != self.names.record(&record.id) {
            record.defect = Some(format!("the object holds the record of {}", record.id));
        }
        Ok(record)
    }

    fn parse(&self, name: &str, bytes: &[u8]) -> Result<Record> {
        let record: Record = serde_json::from_slice(bytes).map_err(|e| TargetError::BadRecord {
            path: self.path(name),
            message: e.to_string(),
        })?;
        if record.format != FORMAT_VERSION {
            return Err(TargetError::BadRecord {
                path: self.path(name),
                message: format!("unknown format version {}", record.format),
            });
        }
        Ok(record)
    }

    /// Every record, oldest first; unreadable ones are skipped (and logged), ones removed
    /// while listing are gone.
    pub fn records(&self, target: &str) -> Result<Vec<Record>> {
        let names = self
            .store
            .list(self.names.record_prefix)
            .map_err(|e| self.io("list", "", e))?;
        let mut records = Vec::new();
        for name in names {
            if self.names.record_id(&name).is_none() {
                continue;
            }
            match self.load(&name) {
                Ok(record) => records.push(record),
                Err(TargetError::NotFound(_)) => {}
                Err(e) => tracing::warn!("target {target}: skipping unreadable record: {e}"),
            }
        }
        sort(&mut records);
        Ok(records)
    }

    pub fn record(&self, backup_id: &BackupId) -> Result<Record> {
        match self.load(&self.names.record(backup_id)) {
            Err(TargetError::NotFound(_)) => Err(TargetError::NotFound(backup_id.to_string())),
            other => other,
        }
    }

    /// What is stored for `record` (sealed with the key unless found defective), written
    /// whole; the record as stored (its MAC), still damaged if it was.
    pub fn write_record(&self, record: &Record) -> Result<Record> {
        let name = self.names.record(&record.id);
        let written = auth::prepare(record, self.key.as_deref());
        let mut bytes =
            serde_json::to_vec_pretty(&written).map_err(|e| TargetError::BadRecord {
                path: self.path(&name),
                message: e.to_string(),
            })?;
        bytes.push(b'\n');
        self.store
            .put(&name, &bytes)
            .map_err(|e| self.io("write", &name, e))?;
        let mut kept = written;
        kept.defect = record.defect.clone();
        Ok(kept)
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        self.store
            .delete(name)
            .map_err(|e| self.io("remove", name, e))
    }

    pub fn remove_record(&self, backup_id: &BackupId) -> Result<()> {
        self.remove(&self.names.record(backup_id))
    }

    /// Stores the checksums of a backup (sealed with the key); the record's entry for
    /// them, naming `leaves` (its MAC given) if the catalogue keeps leaf sums.
    pub fn write_sums(
        &self,
        backup_id: &BackupId,
        sums: &[crate::copy::sums::Sum],
        kind: SumKind,
        leaves: Option<(String, Option<String>)>,
    ) -> Result<Checksums> {
        let (leaves, leaves_mac) = leaves.map_or((None, None), |(n, m)| (Some(n), m));
        let (bytes, mut entry) = Checksums::encode(sums, kind, self.names.sums(backup_id), leaves);
        entry.mac = self.key.as_ref().map(|key| key.sums_mac(backup_id, &bytes));
        entry.leaves_mac = leaves_mac;
        self.store
            .put(&entry.file, &bytes)
            .map_err(|e| self.io("write", &entry.file, e))?;
        Ok(entry)
    }

    /// The checksums a record names, checked against their digest (and MAC) in the
    /// record; read with a cap of 8 bytes per block it names, and refused unread if that
    /// is more memory than the machine can spare.
    pub fn read_sums(&self, record: &Record) -> Result<Vec<crate::copy::sums::Sum>> {
        let Some(checksums) = &record.checksums else {
            return Ok(Vec::new());
        };
        let name = self.names.sums(&record.id);
        let record_path = || self.path(&self.names.record(&record.id));
        let cap = checksums
            .blocks
            .checked_mul(8)
            .ok_or_else(|| TargetError::BadRecord {
                path: record_path(),
                message: format!("{} checksum blocks", checksums.blocks),
            })?;
        // The sums are held in memory whole (twice while decoded). On a target without a
        // key a record's block count is whatever its writer says: a claim the machine
        // cannot hold is refused, not read (reading it would end the daemon).
        let room = available_memory() / 8;
        if cap > room {
            return Err(TargetError::BadRecord {
                path: record_path(),
                message: format!(
                    "its {} checksum blocks would take {cap} bytes of memory, more than an eighth of what is available ({room} bytes)",
                    checksums.blocks
                ),
            });
        }
        let bytes = self.read_capped(&name, cap)?.ok_or_else(|| {
            self.io(
                "read",
                &name,
                std::io::Error::from_raw_os_error(libc::ENOENT),
            )
        })?;
        if let Some(key) = &self.key
            && !key.sums_check(&record.id, checksums, &bytes)
        {
            return Err(TargetError::BadRecord {
                path: self.path(&name),
                message: "checksums do not match their MAC in the record".to_string(),
            });
        }
        checksums
            .decode(&bytes)
            .ok_or_else(|| TargetError::BadRecord {
                path: self.path(&name),
                message: "checksums do not match their digest in the record".to_string(),
            })
    }

    pub fn remove_sums(&self, backup_id: &BackupId) -> Result<()> {
        self.remove(&self.names.sums(backup_id))
    }
}

/// The records of a catalogue whose daemon is their only writer, read once at open and
/// kept in memory (`ls` never waits for the storage): id → the record, or why it cannot
/// be read (it still owns its data).
pub struct RecordCache {
    names: Names,
    entries:
        parking_lot::Mutex<std::collections::BTreeMap<String, std::result::Result<Record, String>>>,
    /// Bumped by every change made through this cache: a [`RecordCache::reload`] that
    /// began before one is not applied (it would bring back what was just changed).
    generation: std::sync::atomic::AtomicU64,
}

impl RecordCache {
    pub fn new(names: Names) -> RecordCache {
        RecordCache {
            names,
            entries: Default::default(),
            generation: Default::default(),
        }
    }

    fn changed(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Reads every record object again (where other nodes write records too): the cache
    /// becomes what the store holds, unless a change went through the cache meanwhile
    /// (false then; the next reload brings it). A record newly unreadable is logged.
    /// Every readable record as read, oldest first, and whether the cache took them.
    pub fn reload(&self, objects: &StoreRecords, target: &str) -> Result<(Vec<Record>, bool)> {
        let generation = self.generation.load(std::sync::atomic::Ordering::SeqCst);
        let names = objects
            .store
            .list(self.names.record_prefix)
            .map_err(|e| objects.io("list", "", e))?;
        let mut fresh = std::collections::BTreeMap::new();
        for name in names {
            let Some(id) = self.names.record_id(&name) else {
                continue;
            };
            let parsed = match objects.load(&name) {
                Ok(record) => Ok(record),
                Err(TargetError::NotFound(_)) => continue,
                Err(TargetError::BadRecord { message, .. }) => Err(message),
                Err(e) => return Err(e),
            };
            fresh.insert(id.to_string(), parsed);
        }
        let mut records: Vec<Record> = fresh
            .values()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        sort(&mut records);
        let mut entries = self.entries.lock();
        if self.generation.load(std::sync::atomic::Ordering::SeqCst) != generation {
            return Ok((records, false));
        }
        for (id, parsed) in &fresh {
            if let Err(message) = parsed
                && !matches!(entries.get(id), Some(Err(known)) if known == message)
            {
                tracing::warn!(
                    backup_target = target,
                    "skipping unreadable record {}: {message}",
                    self.names.record(id)
                );
            }
        }
        *entries = fresh;
        Ok((records, true))
    }

    /// The record of `backup_id` as just read from the store (`NotFound`: it is gone).
    pub fn update(&self, backup_id: &BackupId, read: &Result<Record>) {
        let mut entries = self.entries.lock();
        match read {
            Ok(record) => {
                entries.insert(backup_id.to_string(), Ok(record.clone()));
            }
            Err(TargetError::NotFound(_)) => {
                entries.remove(backup_id.as_str());
            }
            Err(TargetError::BadRecord { message, .. }) => {
                entries.insert(backup_id.to_string(), Err(message.clone()));
            }
            Err(_) => {}
        }
    }

    /// Reads the record object `name` in (an unreadable one is logged and kept as such;
    /// one gone meanwhile is skipped).
    pub fn load(&mut self, objects: &StoreRecords, target: &str, name: &str) -> Result<()> {
        let Some(id) = self.names.record_id(name) else {
            return Ok(());
        };
        let parsed = match objects.load(name) {
            Ok(record) => Ok(record),
            Err(TargetError::NotFound(_)) => return Ok(()),
            Err(TargetError::BadRecord { message, .. }) => Err(message),
            Err(e) => return Err(e),
        };
        if let Err(message) = &parsed {
            tracing::warn!(
                backup_target = target,
                "skipping unreadable record {name}: {message}"
            );
        }
        self.entries.get_mut().insert(id.to_string(), parsed);
        Ok(())
    }

    /// Inspects every record again with `key` (set after open).
    pub fn inspect(&mut self, key: Option<&TargetKey>) {
        for record in self.entries.get_mut().values_mut().flatten() {
            auth::inspect(record, key);
        }
    }

    /// Every readable record, oldest first.
    pub fn records(&self) -> Vec<Record> {
        let mut records: Vec<Record> = self
            .entries
            .lock()
            .values()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        sort(&mut records);
        records
    }

    pub fn record(&self, backup_id: &BackupId) -> Result<Record> {
        match self.entries.lock().get(backup_id.as_str()) {
            Some(Ok(record)) => Ok(record.clone()),
            Some(Err(message)) => Err(TargetError::BadRecord {
                path: PathBuf::from(self.names.record(backup_id)),
                message: message.clone(),
            }),
            None => Err(TargetError::NotFound(backup_id.to_string())),
        }
    }

    /// The record as stored (see [`StoreRecords::write_record`]).
    pub fn insert(&self, record: Record) {
        self.changed();
        self.entries
            .lock()
            .insert(record.id.to_string(), Ok(record));
    }

    pub fn remove(&self, backup_id: &BackupId) {
        self.changed();
        self.entries.lock().remove(backup_id.as_str());
    }
}

/// Records oldest first (ties by id): the order every listing shows.
pub fn sort(records: &mut [Record]) {
    records.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
}

/// Bytes of memory available now (`MemAvailable`), or 1 GiB when that cannot be read.
fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        })
        .unwrap_or(1 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::targets::store::MemStore;

    const A: &str = "0c1e2f3a-aaaa-4bbb-8ccc-123456789abc";
    const B: &str = "6b0c2f1e-1111-4222-8333-444455556666";
    const NAMES: Names = Names {
        record_prefix: "r.",
        record_suffix: "",
        sums_prefix: "s.",
        sums_suffix: "",
    };

    fn record(id: &str) -> Record {
        serde_json::from_value(serde_json::json!({
            "format": 1, "id": id, "volume_id": "v", "backend": "b", "pool": "p",
            "target": "t", "status": "available", "size": 1 << 20,
            "created_at": "2026-01-01T00:00:00.000Z", "completed_at": null, "name": null,
            "snapshot_used": false, "parent_id": null, "checksums": null, "error": null,
        }))
        .unwrap()
    }

    /// A store that runs `during_list` whenever it is listed.
    struct Meddling {
        inner: Arc<dyn crate::targets::store::ObjectStore>,
        during_list: Box<dyn Fn() + Send + Sync>,
    }

    impl crate::targets::store::ObjectStore for Meddling {
        fn describe(&self) -> String {
            self.inner.describe()
        }
        fn get(&self, name: &str, cap: u64) -> std::io::Result<Option<Vec<u8>>> {
            self.inner.get(name, cap)
        }
        fn put(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
            self.inner.put(name, bytes)
        }
        fn put_if_absent(&self, name: &str, bytes: &[u8]) -> std::io::Result<bool> {
            self.inner.put_if_absent(name, bytes)
        }
        fn delete(&self, name: &str) -> std::io::Result<()> {
            self.inner.delete(name)
        }
        fn list(&self, prefix: &str) -> std::io::Result<Vec<String>> {
            (self.during_list)();
            self.inner.list(prefix)
        }
    }

    #[test]
    fn a_reload_sees_other_writers_records_but_never_undoes_a_change_made_meanwhile() {
        let store: Arc<dyn crate::targets::store::ObjectStore> = Arc::new(MemStore::default());
        let objects = StoreRecords {
            store: store.clone(),
            names: NAMES,
            key: None,
        };
        let cache = RecordCache::new(NAMES);
        // Another node writes A: the reload lists it.
        objects.write_record(&record(A)).unwrap();
        assert!(cache.reload(&objects, "t").unwrap().1);
        let ids = |cache: &RecordCache| -> Vec<String> {
            cache.records().iter().map(|r| r.id.to_string()).collect()
        };
        assert_eq!(ids(&cache), [A]);
        // Another node removes A and writes B: gone and there after the next reload.
        objects.remove(&NAMES.record(A)).unwrap();
        objects.write_record(&record(B)).unwrap();
        assert!(cache.reload(&objects, "t").unwrap().1);
        assert_eq!(ids(&cache), [B]);
        // A change through the cache while a reload reads (here: as it lists) is not
        // undone by what the reload read before it.
        let cache = Arc::new(cache);
        let meddling = Meddling {
            inner: store.clone(),
            during_list: {
                let cache = cache.clone();
                Box::new(move || cache.remove(&BackupId::parse(B).unwrap()))
            },
        };
        let listing = StoreRecords {
            store: Arc::new(meddling),
            names: NAMES,
            key: None,
        };
        let (read, kept) = cache.reload(&listing, "t").unwrap();
        assert!(!kept);
        assert_eq!(read.len(), 1, "what it read is still returned");
        assert!(ids(&cache).is_empty(), "the removal made meanwhile stands");
        assert!(cache.reload(&objects, "t").unwrap().1);
        assert_eq!(ids(&cache), [B]);
        // A record read fresh updates the cache; one found gone leaves it.
        let b = BackupId::parse(B).unwrap();
        objects.remove(&NAMES.record(B)).unwrap();
        cache.update(&b, &objects.record(&b));
        assert!(ids(&cache).is_empty());
    }
}
