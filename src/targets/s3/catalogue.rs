//! Records and checksums of an `s3` target, as objects beside its chunks:
//! `record.<id>` (the record, JSON, MAC'd with the target key as everywhere) and
//! `sums.<id>` (the checksums), each written whole by one PUT, encoded and checked by the
//! record layer every catalogue shares (`targets::records`). Records are kept in memory
//! (`ls` never waits for the gateway) and kept in step with the other nodes that serve the
//! target: `refresh`, in the background (every second while other nodes are about), lists
//! the records with their entity tags (one LIST) and reads again only those that changed,
//! appeared or went; a read-change-write reads its record from the store first (`reload`,
//! under the record's lock), and so does a lookup of a record not in memory or in memory
//! as `creating` or `deleting`. Never removes an object it did not name.

use crate::copy::SumKind;
use crate::ids::BackupId;
use crate::targets::auth::TargetKey;
use crate::targets::catalogue::Catalogue;
use crate::targets::lease::Coordinator;
use crate::targets::record::{Checksums, Record, Status};
use crate::targets::records::{Names, RecordCache, StoreRecords};
use crate::targets::s3::chunks::ChunkBackend;
use crate::targets::store::ObjectStore;
use crate::targets::{Result, TargetError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a change made here is kept from being undone by a listing that began before
/// it (longer than any listing takes).
const LOCAL_CHANGE_KEPT: Duration = Duration::from_secs(120);

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
    lister: Arc<dyn ChunkBackend>,
    /// The records in memory, and what is known of their objects.
    view: Mutex<View>,
    /// One refresh at a time.
    refreshing: Mutex<()>,
    /// This node's part in serving the target with others.
    coordinator: Option<Coordinator>,
}

struct View {
    records: RecordCache,
    /// Every record in memory: the entity tag of its object when read from a listing's
    /// view (None once written here: the next listing reads it once more).
    tags: HashMap<String, Option<String>>,
    /// When records were last written, removed or read again here: a listing that began
    /// before does not undo that.
    local: HashMap<String, Instant>,
}

impl StoreCatalogue {
    /// Reads every record of the store.
    pub fn open(
        target: &str,
        store: Arc<dyn ChunkBackend>,
        key: Option<Arc<TargetKey>>,
        coordinator: Option<Coordinator>,
    ) -> Result<StoreCatalogue> {
        let objects = StoreRecords {
            store: store.clone() as Arc<dyn ObjectStore>,
            names: S3_NAMES,
            key,
        };
        let catalogue = StoreCatalogue {
            target: target.to_string(),
            objects,
            lister: store,
            view: Mutex::new(View {
                records: RecordCache::new(S3_NAMES),
                tags: HashMap::new(),
                local: HashMap::new(),
            }),
            refreshing: Mutex::new(()),
            coordinator,
        };
        catalogue.refresh()?;
        Ok(catalogue)
    }

    /// Brings the records in memory in step with the store: one LIST; a record whose
    /// object is new or changed is read, one whose object went is forgotten (unless this
    /// node changed it after the listing began).
    pub fn refresh(&self) -> Result<()> {
        let _one = self.refreshing.lock();
        let began = Instant::now();
        let listed: HashMap<String, String> = self
            .lister
            .list_tags(RECORD_PREFIX)
            .map_err(store_error(
                "list",
                self.objects.store.as_ref(),
                RECORD_PREFIX,
            ))?
            .into_iter()
            .filter_map(|(name, tag)| Some((S3_NAMES.record_id(&name)?.to_string(), tag)))
            .collect();
        let (changed, gone): (Vec<(String, String)>, Vec<String>) = {
            let mut view = self.view.lock();
            view.local.retain(|_, at| at.elapsed() < LOCAL_CHANGE_KEPT);
            let changed = listed
                .iter()
                .filter(|(id, tag)| view.tags.get(*id).is_none_or(|t| t.as_ref() != Some(*tag)))
                .map(|(id, tag)| (id.clone(), tag.clone()))
                .collect();
            let gone = view
                .tags
                .keys()
                .filter(|id| !listed.contains_key(*id))
                .cloned()
                .collect();
            (changed, gone)
        };
        let untouched = |view: &View, id: &str| view.local.get(id).is_none_or(|at| *at < began);
        for (id, tag) in changed {
            let name = S3_NAMES.record(&id);
            let loaded = self.objects.load(&name);
            let mut view = self.view.lock();
            if !untouched(&view, &id) {
                continue;
            }
            let Ok(backup_id) = BackupId::parse(&id) else {
                continue;
            };
            match loaded {
                Ok(record) => view.records.insert(record),
                Err(TargetError::NotFound(_)) => {
                    view.records.remove(&backup_id);
                    view.tags.remove(&id);
                    continue;
                }
                // Damaged: kept as such (it still owns its data), read by the cache.
                Err(TargetError::BadRecord { .. }) => {
                    view.records.load(&self.objects, &self.target, &name)?
                }
                Err(e) => return Err(e),
            }
            view.tags.insert(id, Some(tag));
        }
        let mut view = self.view.lock();
        for id in gone {
            if untouched(&view, &id)
                && let Ok(backup_id) = BackupId::parse(&id)
            {
                view.records.remove(&backup_id);
                view.tags.remove(&id);
            }
        }
        Ok(())
    }

    /// Notes a change made here, under the view's lock.
    fn changed_here(view: &mut View, id: &str) {
        view.local.insert(id.to_string(), Instant::now());
    }
}

impl Catalogue for StoreCatalogue {
    fn describe(&self) -> String {
        format!("{} ({})", self.target, self.objects.store.describe())
    }

    fn records(&self) -> Result<Vec<Record>> {
        Ok(self.view.lock().records.records())
    }

    /// From memory; one not there, or there as being made or deleted (by another node,
    /// maybe, which may have finished since the last refresh), is read from the store.
    fn record(&self, backup_id: &BackupId) -> Result<Record> {
        match self.view.lock().records.record(backup_id) {
            Err(TargetError::NotFound(_)) => {}
            Ok(record) if matches!(record.status, Status::Creating | Status::Deleting) => {}
            found => return found,
        }
        self.reload(backup_id)?;
        self.view.lock().records.record(backup_id)
    }

    /// Reads the record from the store (another node may have changed it).
    fn reload(&self, backup_id: &BackupId) -> Result<()> {
        let name = S3_NAMES.record(backup_id);
        let loaded = self.objects.load(&name);
        let mut view = self.view.lock();
        Self::changed_here(&mut view, backup_id.as_str());
        match loaded {
            Ok(record) => {
                view.records.insert(record);
                view.tags.insert(backup_id.to_string(), None);
            }
            Err(TargetError::NotFound(_)) => {
                view.records.remove(backup_id);
                view.tags.remove(backup_id.as_str());
            }
            Err(TargetError::BadRecord { .. }) => {
                view.records.load(&self.objects, &self.target, &name)?;
                view.tags.insert(backup_id.to_string(), None);
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        let kept = self.objects.write_record(record)?;
        let mut view = self.view.lock();
        Self::changed_here(&mut view, record.id.as_str());
        view.tags.insert(record.id.to_string(), None);
        view.records.insert(kept);
        Ok(())
    }

    fn remove_record(&self, backup_id: &BackupId) -> Result<()> {
        self.objects.remove_record(backup_id)?;
        let mut view = self.view.lock();
        Self::changed_here(&mut view, backup_id.as_str());
        view.tags.remove(backup_id.as_str());
        view.records.remove(backup_id);
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

    fn coordinator(&self) -> Option<&Coordinator> {
        self.coordinator.as_ref()
    }
}
