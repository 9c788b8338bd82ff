//! The catalogue of an RBD target: records and checksums as RADOS objects (through the
//! shared record layer) that every node serving the target writes, the shared lock
//! checked before every write, and a listing of the records kept a moment old.

use super::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// How old a listing may be before it is read again, in the background: `ls` answers
/// from the last one meanwhile.
const LISTING_AGE: Duration = Duration::from_secs(1);
/// How old a listing may be before `ls` waits for it to be read again (a node idle for a
/// while): a backup another node made is listed within 5 s.
const LISTING_MAX_AGE: Duration = Duration::from_secs(3);

/// Records, checksums, the lock and the node's coordination, in RADOS objects. Other
/// nodes write records too: a decision (a delete, a verify, an xattr, a takeover) reads
/// the record from RADOS (under its lock, which the engine takes); a listing answers from
/// the records as read at most a few seconds ago, so `ls` and `cat` of records seldom
/// wait for the cluster.
pub struct RbdCatalogue {
    pub(super) target: String,
    pub(super) io: IoCtx,
    pub(super) lock: ObjectLock,
    pub(super) listing: Arc<Listing>,
    pub(super) coordinator: Coordinator,
    pub(super) foreign: Vec<String>,
}

/// The records as last read, and how to read them again.
pub struct Listing {
    pub(super) target: String,
    /// The records and checksums as objects (`records`: one encoding for every store).
    pub(super) objects: StoreRecords,
    pub(super) records: RecordCache,
    /// When the records were last read whole (None: not yet).
    pub(super) refreshed: Mutex<Option<Instant>>,
    pub(super) refreshing: AtomicBool,
}

impl Listing {
    /// Reads every record again: every readable one, oldest first.
    pub(super) fn refresh(&self) -> Result<Vec<Record>> {
        let started = Instant::now();
        let (records, kept) = self.records.reload(&self.objects, &self.target)?;
        if kept {
            *self.refreshed.lock() = Some(started);
        }
        Ok(records)
    }

    /// Makes the listing fresh enough: read again now if it is older than
    /// [`LISTING_MAX_AGE`] (or was never read), in the background if older than
    /// [`LISTING_AGE`].
    fn fresh_enough(self: &Arc<Self>) -> Result<()> {
        let age = self.refreshed.lock().map(|at| at.elapsed());
        match age {
            Some(age) if age < LISTING_AGE => Ok(()),
            Some(age) if age < LISTING_MAX_AGE => {
                if !self.refreshing.swap(true, Ordering::SeqCst) {
                    let listing = self.clone();
                    let spawned = std::thread::Builder::new()
                        .name("rbd-listing".to_string())
                        .spawn(move || {
                            if let Err(e) = listing.refresh() {
                                tracing::warn!(
                                    backup_target = listing.target,
                                    "cannot read the catalogue: {e}"
                                );
                            }
                            listing.refreshing.store(false, Ordering::SeqCst);
                        });
                    if spawned.is_err() {
                        self.refreshing.store(false, Ordering::SeqCst);
                    }
                }
                Ok(())
            }
            _ => self.refresh().map(drop),
        }
    }
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

    /// Our shared hold of the target's lock is still renewed: no daemon of an earlier
    /// version (which would serve the target alone) can have taken it meanwhile.
    fn check_lock(&self) -> Result<()> {
        if self.lock.is_held() {
            Ok(())
        } else {
            Err(self.locked_out())
        }
    }

    fn objects(&self) -> &StoreRecords {
        &self.listing.objects
    }

    fn remove_object(&self, name: &str) -> Result<()> {
        self.check_lock()?;
        self.objects().remove(name)
    }
}

impl Catalogue for RbdCatalogue {
    fn describe(&self) -> String {
        format!("{} (rbd:{})", self.target, self.io.location())
    }

    /// As RADOS holds them now (and the listing with them).
    fn records(&self) -> Result<Vec<Record>> {
        self.listing.refresh()
    }

    /// As RADOS holds it now.
    fn record(&self, backup_id: &BackupId) -> Result<Record> {
        let read = self.objects().record(backup_id);
        self.listing.records.update(backup_id, &read);
        read
    }

    fn listed_records(&self) -> Result<Vec<Record>> {
        self.listing.fresh_enough()?;
        Ok(self.listing.records.records())
    }

    fn listed_record(&self, backup_id: &BackupId) -> Result<Record> {
        self.listing.fresh_enough()?;
        match self.listing.records.record(backup_id) {
            Err(TargetError::NotFound(_)) => self.record(backup_id),
            known => known,
        }
    }

    /// `write_full`: the object is replaced whole, atomically.
    fn write_record(&self, record: &Record) -> Result<()> {
        self.check_lock()?;
        // What was stored (its MAC), still damaged in memory if it was.
        let kept = self.objects().write_record(record)?;
        self.listing.records.insert(kept);
        Ok(())
    }

    fn remove_record(&self, backup_id: &BackupId) -> Result<()> {
        self.remove_object(&record_object(backup_id))?;
        self.listing.records.remove(backup_id);
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
        self.objects().write_sums(backup_id, sums, kind, None)
    }

    fn read_checksums(&self, record: &Record) -> Result<Vec<crate::copy::sums::Sum>> {
        self.objects().read_sums(record)
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

    fn coordinator(&self) -> Option<&Coordinator> {
        Some(&self.coordinator)
    }
}
