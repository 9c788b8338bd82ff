//! Backup targets: where backups are stored and read back. A target is its catalogue (one
//! record per backup, beside the data, written atomically) and its data. `VolumeTarget`
//! is the spec's generic target: each backup is a volume in a backend's pool. Targets
//! never copy data, and remove only what a record names.

pub mod auth;
pub mod catalogue;
pub mod claim;
pub mod lease;
pub mod listing;
pub mod rbd;
pub mod record;
pub mod records;
pub mod s3;
pub mod store;

use crate::copy::SumKind;
use crate::ids::BackupId;
use crate::volume::{Access, Attachment, VolumeDriver, VolumeError};
use catalogue::Catalogue;
use listing::Listed;
use record::{Checksums, Record};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `[targets.<name>]` of kind `pool` (the default, the spec's generic target): the
/// backups are kept in a pool of a volume backend (`VolumeTarget`; `RbdTarget` on an
/// `rbd` backend).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolTargetConfig {
    pub backend: String,
    pub pool: String,
}

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("backup {0} not found")]
    NotFound(String),
    #[error("target {target} is in use by another backupfs (lock {path})")]
    Locked { target: String, path: PathBuf },
    #[error(
        "target {target} is in use by another backupfs as node {node} (its heartbeat {path} is alive): every daemon that serves a target needs a node name of its own (`node`)"
    )]
    NodeTaken {
        target: String,
        node: String,
        path: PathBuf,
    },
    #[error(
        "target {target} is served by a backupfs of an earlier version, which lets one daemon alone serve a target (it holds the lock {path}): stop it, then start backupfs of this version on every node that serves the target"
    )]
    ServedAlone { target: String, path: PathBuf },
    #[error("record {path}: {message}")]
    BadRecord { path: PathBuf, message: String },
    #[error("pool {path} {source}")]
    Claim {
        path: PathBuf,
        source: claim::ClaimError,
    },
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TargetError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> TargetError {
        TargetError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            TargetError::Io { source, .. } => source.raw_os_error(),
            TargetError::Volume(v) => v.raw_os_error(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, TargetError>;

pub(crate) const LOCK_FILE: &str = ".backupfs.lock";

/// The refusal to serve or verify a record found defective (see `auth`): the record is
/// damaged, whatever its data holds. The caller logs it (once).
pub fn untrusted(record: &Record) -> Option<TargetError> {
    let defect = record.defect.as_ref()?;
    Some(TargetError::BadRecord {
        path: PathBuf::from(record_file_name(&record.id)),
        message: format!("damaged: {defect}"),
    })
}

pub(crate) fn record_file_name(backup_id: &str) -> String {
    format!("backup-{backup_id}.json")
}

pub(crate) fn leaves_file_name(backup_id: &str) -> String {
    format!("backup-{backup_id}.leaves")
}

/// Stores backups and reads them back. Every target looks the same on the mount: a
/// catalogue of records and, per available backup, a readable raw image. The catalogue's
/// operations are offered here too, so callers need not reach for it.
pub trait BackupTarget: Send + Sync {
    fn name(&self) -> &str;
    fn catalogue(&self) -> &dyn Catalogue;

    /// A new backup's data, attached for writing: all zeros, or, given a `base` backup and
    /// a target that can share data, a shared copy of the base's data (same bytes, no
    /// space used) that the caller updates with what changed.
    fn create_data(
        &self,
        backup_id: &BackupId,
        size: u64,
        base: Option<&BackupId>,
    ) -> Result<NewData>;
    /// Makes a backup's written data final, before its record says `available`: nothing
    /// writes it any more.
    fn finish_data(&self, _backup_id: &BackupId) -> Result<()> {
        Ok(())
    }
    /// Work on an available backup's data that nobody waits for, done once its requester
    /// has the answer. A target that keeps backups as snapshots takes the snapshot here
    /// (an RBD snapshot's id comes from the monitors: up to a second); until it has, the
    /// backup's data stays where it was written, and whatever touches it first takes the
    /// snapshot instead. A failure costs nothing: the next touch tries again.
    fn settle_data(&self, _backup_id: &BackupId) -> Result<()> {
        Ok(())
    }
    /// The stored data, attached for reading.
    fn open_data(&self, backup_id: &BackupId) -> Result<Attachment>;
    /// Removes the stored data of a backup (not its checksums); gone already is fine.
    fn remove_data(&self, backup_id: &BackupId) -> Result<()>;
    /// IDs of the backups whose data is stored.
    fn data_ids(&self) -> Result<Vec<String>>;
    /// Bytes of data really stored for a backup.
    fn allocated(&self, backup_id: &BackupId) -> Result<u64>;
    /// Bytes free for new backups; None when the storage cannot tell.
    fn free_space(&self) -> Result<Option<u64>>;
    /// Whether `create_data` with a base can share the base's data, so that an
    /// incremental backup stores only what changed.
    fn shares_data(&self) -> bool {
        false
    }

    fn records(&self) -> Result<Vec<Record>> {
        self.catalogue().records()
    }

    fn listing(&self) -> Result<catalogue::Listing> {
        self.catalogue().listing()
    }

    fn record(&self, backup_id: &BackupId) -> Result<Record> {
        self.catalogue().record(backup_id)
    }

    /// The records of `volume_id` whose listing entries pass `wanted`, newest first
    /// ([`Listed::recency`]). A listing names the candidates by a key of the volume id
    /// ([`listing::volume_key`]), so that only those are read, each compared with
    /// `volume_id`: a volume's backups cost what they are, not what the target holds
    /// (issue 28). `fresh`: as the storage holds them now (for a decision, as
    /// [`BackupTarget::records`]), else a moment old at most (for `ls`, as
    /// `listed_records`). Stops once `enough` says so of what it found.
    fn volume_records(
        &self,
        volume_id: &crate::ids::VolumeId,
        fresh: bool,
        wanted: &dyn Fn(&Listed) -> bool,
        enough: &dyn Fn(&[Record]) -> bool,
    ) -> Result<Vec<Record>> {
        let listing = if fresh {
            self.catalogue().fresh_listing()?
        } else {
            self.listing()?
        };
        let key = listing::volume_key(volume_id.as_str());
        let mut candidates: Vec<&Listed> = listing
            .iter()
            .filter(|l| l.volume == key && wanted(l))
            .collect();
        candidates.sort_unstable_by(|a, b| b.recency().cmp(&a.recency()));
        let mut found = Vec::new();
        for listed in candidates {
            if enough(&found) {
                break;
            }
            match self.listed_entry(listed, fresh)? {
                Some(record) if record.volume_id == *volume_id => found.push(record),
                // Another volume's key.
                _ => {}
            }
        }
        Ok(found)
    }

    /// The record of a listing entry, read (`fresh`: from the storage); None when it is
    /// gone since the listing or cannot be trusted (skipped, as by `records`).
    fn listed_entry(&self, listed: &Listed, fresh: bool) -> Result<Option<Record>> {
        let read = if fresh {
            self.record(&listed.id)
        } else {
            self.listed_record(&listed.id)
        };
        match read {
            Ok(record) => Ok(Some(record)),
            Err(TargetError::NotFound(_) | TargetError::BadRecord { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The volumes with a sound backup here (`by-volume/`), sorted, as a listing a moment
    /// old sees them: one record read per volume (its newest), not one per backup. Two
    /// volumes whose ids share a key show as the one with the newest backup.
    fn volumes_with_sound_backups(&self) -> Result<Vec<crate::ids::VolumeId>> {
        let listing = self.listing()?;
        let mut sound: Vec<&Listed> = listing.iter().filter(|l| l.is_sound()).collect();
        // By volume key, newest first within each.
        sound.sort_unstable_by(|a, b| (a.volume, b.recency()).cmp(&(b.volume, a.recency())));
        let mut volumes = Vec::new();
        let mut named: Option<u64> = None;
        for listed in sound {
            if named == Some(listed.volume) {
                continue;
            }
            if let Some(record) = self.listed_entry(listed, false)?
                && record.is_sound()
                && listing::volume_key(record.volume_id.as_str()) == listed.volume
            {
                named = Some(listed.volume);
                volumes.push(record.volume_id);
            }
        }
        volumes.sort();
        volumes.dedup();
        Ok(volumes)
    }

    /// The newest sound backup (available, no damage found) of `volume_id`, of `backend`
    /// if given: an incremental's parent, `by-volume/<volume-id>/latest.img`.
    fn newest_sound(
        &self,
        volume_id: &crate::ids::VolumeId,
        backend: Option<&str>,
        fresh: bool,
    ) -> Result<Option<Record>> {
        let fits = |r: &Record| r.is_sound() && backend.is_none_or(|b| r.backend == b);
        let found = self.volume_records(volume_id, fresh, &Listed::is_sound, &|found| {
            found.iter().any(fits)
        })?;
        Ok(found.into_iter().find(|r| fits(r)))
    }

    /// For a listing, a moment old at most (see `Catalogue::listed_records`).
    fn listed_records(&self) -> Result<Vec<Record>> {
        self.catalogue().listed_records()
    }

    fn listed_record(&self, backup_id: &BackupId) -> Result<Record> {
        self.catalogue().listed_record(backup_id)
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        self.catalogue().write_record(record)
    }

    fn remove_record(&self, backup_id: &BackupId) -> Result<()> {
        self.catalogue().remove_record(backup_id)
    }

    fn write_checksums(
        &self,
        backup_id: &BackupId,
        sums: &[crate::copy::sums::Sum],
        kind: SumKind,
        leaves: bool,
    ) -> Result<Checksums> {
        self.catalogue()
            .write_checksums(backup_id, sums, kind, leaves)
    }

    fn create_leaves(
        &self,
        backup_id: &BackupId,
        base: Option<&Record>,
        blocks: u64,
    ) -> Result<Option<std::fs::File>> {
        self.catalogue().create_leaves(backup_id, base, blocks)
    }

    fn read_checksums(&self, record: &Record) -> Result<Vec<crate::copy::sums::Sum>> {
        self.catalogue().read_checksums(record)
    }

    /// Removes the data and checksums of a backup (its record stays); gone is fine.
    fn remove_data_and_checksums(&self, backup_id: &BackupId) -> Result<()> {
        self.remove_data(backup_id)?;
        self.catalogue().remove_checksums(backup_id)
    }

    /// What is stored here that no record owns (an operator's files, data whose record is
    /// gone): never removed, named in the log at start-up.
    fn strays(&self) -> Result<Vec<String>> {
        let mut strays = self.catalogue().foreign();
        // The listing's ids first (no read of 100,000 records at every start: issue 28);
        // a record it does not show may still be there, unreadable: read to tell.
        let listing = self.listing()?;
        let mut listed: Vec<&str> = listing.iter().map(|l| l.id.as_str()).collect();
        listed.sort_unstable();
        for id in self.data_ids()? {
            let owned = listed.binary_search(&id.as_str()).is_ok()
                || BackupId::parse(&id)
                    .map(|id| !matches!(self.record(&id), Err(TargetError::NotFound(_))))
                    .unwrap_or(false);
            if !owned {
                strays.push(format!("the data of backup {id}"));
            }
        }
        Ok(strays)
    }
}

/// A new backup's data, attached for writing.
pub struct NewData {
    pub attachment: Attachment,
    /// Whether it starts as a shared copy of the base (else it reads as zeros).
    pub shared: bool,
}

/// The spec's generic target: a pool of a volume backend that holds backups only, with
/// its catalogue beside them.
pub struct VolumeTarget {
    name: String,
    driver: Arc<dyn VolumeDriver>,
    pool: String,
    catalogue: Box<dyn Catalogue>,
}

impl VolumeTarget {
    pub fn new(
        name: &str,
        driver: Arc<dyn VolumeDriver>,
        pool: &str,
        catalogue: Box<dyn Catalogue>,
    ) -> VolumeTarget {
        VolumeTarget {
            name: name.to_string(),
            driver,
            pool: pool.to_string(),
            catalogue,
        }
    }
}

impl BackupTarget for VolumeTarget {
    fn name(&self) -> &str {
        &self.name
    }

    fn catalogue(&self) -> &dyn Catalogue {
        self.catalogue.as_ref()
    }

    fn create_data(
        &self,
        backup_id: &BackupId,
        size: u64,
        base: Option<&BackupId>,
    ) -> Result<NewData> {
        let shared = match base {
            Some(base) => self
                .driver
                .clone_volume(&self.pool, base, backup_id)?
                .is_some(),
            None => false,
        };
        if !shared {
            self.driver.create(&self.pool, backup_id, size)?;
        }
        let attachment = self.driver.attach(&self.pool, backup_id, Access::Write)?;
        if shared {
            attachment.device.grow(size).map_err(|e| {
                TargetError::io("grow", Path::new(&attachment.device.describe()), e)
            })?;
        }
        Ok(NewData { attachment, shared })
    }

    fn open_data(&self, backup_id: &BackupId) -> Result<Attachment> {
        // Image reads come as whole 1 MiB blocks (checked, then kept in the kernel's cache
        // of the image): read past the backing file's cache, so data is not cached twice.
        match self.driver.attach(&self.pool, backup_id, Access::Stream) {
            Err(VolumeError::NotFound(_)) => Err(TargetError::NotFound(backup_id.to_string())),
            other => Ok(other?),
        }
    }

    fn remove_data(&self, backup_id: &BackupId) -> Result<()> {
        Ok(self.driver.delete(&self.pool, backup_id)?)
    }

    fn data_ids(&self) -> Result<Vec<String>> {
        Ok(self.driver.list_ids(&self.pool)?)
    }

    fn allocated(&self, backup_id: &BackupId) -> Result<u64> {
        Ok(self.driver.stat(&self.pool, backup_id)?.allocated)
    }

    fn free_space(&self) -> Result<Option<u64>> {
        Ok(self.driver.free_space(&self.pool)?)
    }

    fn shares_data(&self) -> bool {
        self.driver.capabilities(&self.pool).shares_data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::memory::MemDriver;
    use std::time::Duration;

    const A: &str = "0c1e2f3a-aaaa-4bbb-8ccc-123456789abc";
    const B: &str = "6b0c2f1e-1111-4222-8333-444455556666";
    const C: &str = "7d0c2f1e-1111-4222-8333-444455556666";

    #[test]
    fn strays_are_the_data_no_record_owns_and_an_unreadable_record_still_owns_its_data() {
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let catalogue =
            catalogue::DirCatalogue::open("t", &pool, "n", Duration::from_secs(30)).unwrap();
        let driver = MemDriver::new(&["b"]);
        for id in [A, B, C] {
            driver.create("b", id, 1 << 20).unwrap();
        }
        let record: Record = serde_json::from_value(serde_json::json!({
            "format": 1, "id": A, "volume_id": "v", "backend": "x", "pool": "p",
            "target": "t", "status": "available", "size": 1 << 20,
            "created_at": "2026-01-01T00:00:00.000Z", "completed_at": null, "name": null,
            "snapshot_used": false, "parent_id": null, "checksums": null, "error": null,
        }))
        .unwrap();
        catalogue.write_record(&record).unwrap();
        std::fs::write(pool.join(catalogue::DIR_NAMES.record(C)), b"{ not a record").unwrap();
        let target = VolumeTarget::new("t", driver, "b", Box::new(catalogue));
        assert_eq!(
            target.strays().unwrap(),
            [format!("the data of backup {B}")],
            "A is listed, C's record is there but cannot be read"
        );
    }

    #[test]
    fn a_volumes_newest_sound_backup_is_found_among_its_own_records_only() {
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let catalogue =
            catalogue::DirCatalogue::open("t", &pool, "n", Duration::from_secs(30)).unwrap();
        let ids = [
            A,
            B,
            C,
            "8e0c2f1e-1111-4222-8333-444455556666",
            "9f0c2f1e-1111-4222-8333-444455556666",
        ];
        // (volume, backend, status, hour completed, damaged)
        let made = [
            ("v", "x", "available", 1, false),
            ("v", "x", "available", 2, true),
            ("v", "y", "available", 3, false),
            ("v", "x", "error", 4, false),
            ("w", "x", "available", 5, false),
        ];
        for (id, (volume, backend, status, hour, damaged)) in ids.iter().zip(made) {
            let at = format!("2026-01-01T0{hour}:00:00.000Z");
            let record: Record = serde_json::from_value(serde_json::json!({
                "format": 1, "id": id, "volume_id": volume, "backend": backend, "pool": "p",
                "target": "t", "status": status, "size": 1 << 20, "created_at": at,
                "completed_at": at, "name": null, "snapshot_used": false, "parent_id": null,
                "checksums": { "algorithm": "xxh3-64", "block_size": crate::copy::CHECKSUM_BLOCK,
                    "blocks": (1u64 << 20).div_ceil(crate::copy::CHECKSUM_BLOCK),
                    "file": format!("backup-{id}.sums"), "digest": "0" },
                "error": null,
                "damaged_blocks": if damaged { serde_json::json!([3]) } else { serde_json::json!(null) },
            }))
            .unwrap();
            catalogue.write_record(&record).unwrap();
        }
        let target = VolumeTarget::new("t", MemDriver::new(&["b"]), "b", Box::new(catalogue));
        let v = crate::ids::VolumeId::parse("v").unwrap();
        let newest = |volume: &crate::ids::VolumeId, backend: Option<&str>, fresh: bool| {
            target
                .newest_sound(volume, backend, fresh)
                .unwrap()
                .map(|r| r.id.to_string())
        };
        for fresh in [true, false] {
            // Not the damaged one, not the failed one, not another backend's.
            assert_eq!(newest(&v, Some("x"), fresh).as_deref(), Some(A));
            assert_eq!(newest(&v, None, fresh).as_deref(), Some(C));
            assert_eq!(newest(&v, Some("z"), fresh), None);
            let w = crate::ids::VolumeId::parse("w").unwrap();
            assert_eq!(newest(&w, None, fresh).as_deref(), Some(ids[4]));
            let u = crate::ids::VolumeId::parse("u").unwrap();
            assert_eq!(newest(&u, None, fresh), None);
        }
        let all: Vec<String> = target
            .volume_records(&v, true, &|_| true, &|_| false)
            .unwrap()
            .into_iter()
            .map(|r| r.id.to_string())
            .collect();
        assert_eq!(all, [ids[3], C, B, A], "v's records, newest first");
        let volumes: Vec<String> = target
            .volumes_with_sound_backups()
            .unwrap()
            .into_iter()
            .map(|v| v.to_string())
            .collect();
        assert_eq!(volumes, ["v", "w"]);
    }
}
