//! The catalogue of a target: one record per backup and its checksums, kept beside the
//! data on the target's own storage (so a second node that mounts it sees the same
//! backups), every change atomic. `DirCatalogue` keeps it in a pool directory; a store
//! without files (an RBD pool) keeps it in objects. A catalogue holds its target's lock
//! and claim for as long as it is open, and removes only the files it names. Others can
//! write a target's directory: every file in it is opened relative to the directory's
//! descriptor, never through a link, never a FIFO or device (`volume/dir.rs`), what is
//! read whole has a size cap, and temporary files have unpredictable names.

use super::auth::TargetKey;
use super::claim;
use super::lease::{Coordinator, LeaseError};
use super::listing::{Identity, ListingCache};
pub use super::listing::{Listed, Listing};
use super::record::{Checksums, Record};
pub use super::records::RECORD_CAP;
use super::records::{Names, StoreRecords};
use super::store::{DirStore, ObjectStore};
use super::{Result, TargetError, leaves_file_name};
use crate::copy::SumKind;
use crate::ids::BackupId;
use crate::volume::dir::Dir;
use nix::fcntl::OFlag;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How old a temporary file must be before a node that serves the target with others
/// takes it for a crash's leftover: no write takes that long.
const TEMPORARY_AGE: Duration = Duration::from_secs(600);

/// Records and checksums of one target.
pub trait Catalogue: Send + Sync {
    /// Where it lives, for messages.
    fn describe(&self) -> String;
    /// Every record, oldest first; unreadable ones are skipped (and logged).
    fn records(&self) -> Result<Vec<Record>>;
    /// What a listing of the target shows of every record (id, status), in the order of
    /// [`Catalogue::records`], without holding every record whole (a directory
    /// catalogue's is shared by every caller while the target is unchanged: see
    /// [`ListingCache`]); a moment old at most where other nodes write (as
    /// [`Catalogue::listed_records`]).
    fn listing(&self) -> Result<Listing> {
        Ok(Arc::new(
            self.listed_records()?.into_iter().map(Listed::of).collect(),
        ))
    }
    /// [`Catalogue::listing`] as the storage holds the records now, as
    /// [`Catalogue::records`] reads them: for a decision.
    fn fresh_listing(&self) -> Result<Listing> {
        Ok(Arc::new(
            self.records()?.into_iter().map(Listed::of).collect(),
        ))
    }
    fn record(&self, backup_id: &BackupId) -> Result<Record>;
    /// Reads the record from the storage again, where the catalogue keeps records in
    /// memory (another node may have changed it): before a read-change-write, under the
    /// record's lock, and before an incremental relies on its parent.
    fn reload(&self, _backup_id: &BackupId) -> Result<()> {
        Ok(())
    }
    /// [`Catalogue::records`] for a listing (`ls` of the mount): where other nodes write
    /// the catalogue too, a catalogue may answer from what it read a moment ago (at most
    /// a few seconds), so that a listing need not wait for the storage. Never for a
    /// decision: those read [`Catalogue::records`].
    fn listed_records(&self) -> Result<Vec<Record>> {
        self.records()
    }
    /// [`Catalogue::record`] for a listing or a lookup (see `listed_records`); one not
    /// known yet is read from the storage.
    fn listed_record(&self, backup_id: &BackupId) -> Result<Record> {
        self.record(backup_id)
    }
    /// Replaces the record durably and atomically: a crash leaves the old or the new one.
    fn write_record(&self, record: &Record) -> Result<()>;
    fn remove_record(&self, backup_id: &BackupId) -> Result<()>;
    /// Stores the checksums of a backup (before its record says `available`), taken as
    /// `kind` says; `leaves`: the file [`Catalogue::create_leaves`] gave is complete and
    /// flushed, and the record should name it.
    fn write_checksums(
        &self,
        backup_id: &BackupId,
        sums: &[crate::copy::sums::Sum],
        kind: SumKind,
        leaves: bool,
    ) -> Result<Checksums>;
    /// A file for the leaf sums of a new backup of `blocks` blocks, holding `base`'s if it
    /// has them (an incremental backup starts from them); None where the catalogue keeps
    /// no leaf sums (the next incremental then reads whole blocks).
    fn create_leaves(
        &self,
        _backup_id: &BackupId,
        _base: Option<&Record>,
        _blocks: u64,
    ) -> Result<Option<File>> {
        Ok(None)
    }
    /// The checksums a record names, checked against their digest in the record.
    fn read_checksums(&self, record: &Record) -> Result<Vec<crate::copy::sums::Sum>>;
    /// Gone already is fine.
    fn remove_checksums(&self, backup_id: &BackupId) -> Result<()>;
    /// Removes what a crash left in the middle of a write (temporary names only the
    /// catalogue makes).
    fn remove_temporaries(&self) -> Result<()>;
    /// What is stored there that the catalogue did not make (an operator's files): left
    /// in place, named in the log.
    fn foreign(&self) -> Vec<String>;
    /// This node's part in serving the target with others; None where one daemon serves
    /// the target alone (it holds the target's lock).
    fn coordinator(&self) -> Option<&Coordinator> {
        None
    }
}

/// A catalogue in a pool directory: `backup-<id>.json` and `backup-<id>.sums` (objects
/// of a [`DirStore`]: each written as a temporary file, fsynced, renamed, and the
/// directory fsynced; see `records`), and `backup-<id>.leaves`, written in place while the
/// backup is made (its record names it only once it is complete).
pub struct DirCatalogue {
    target: String,
    dir: PathBuf,
    records: StoreRecords,
    /// This node's part in serving the target with other nodes (its heartbeat, claims).
    coordinator: Coordinator,
    listed: ListingCache,
}

/// The names of a directory catalogue's objects.
pub const DIR_NAMES: Names = Names {
    record_prefix: "backup-",
    record_suffix: ".json",
    sums_prefix: "backup-",
    sums_suffix: ".sums",
};

impl DirCatalogue {
    /// Opens a pool directory as `target`'s catalogue, as node `node`: refuses one that is
    /// not ours (see `claim`), joins the nodes that serve it (refused while another live
    /// daemon serves it under the same node name), then claims the pool (migrating an
    /// earlier backupfs's layout) if it is not claimed yet.
    pub fn open(target: &str, dir: &Path, node: &str, lease: Duration) -> Result<DirCatalogue> {
        let refused = |source| TargetError::Claim {
            path: dir.to_path_buf(),
            source,
        };
        claim::inspect(dir, target).map_err(refused)?;
        let store: Arc<dyn ObjectStore> =
            Arc::new(DirStore::open(dir).map_err(|e| TargetError::io("open", dir, e))?);
        let coordinator = Coordinator::join(store.clone(), node, lease).map_err(|e| match e {
            LeaseError::NodeTaken { object, node } => TargetError::NodeTaken {
                target: target.to_string(),
                node,
                path: PathBuf::from(object),
            },
            other => TargetError::io("join", dir, std::io::Error::other(other.to_string())),
        })?;
        claim::claim(dir, target).map_err(refused)?;
        Ok(DirCatalogue {
            target: target.to_string(),
            dir: dir.to_path_buf(),
            records: StoreRecords {
                store,
                names: DIR_NAMES,
                key: None,
            },
            coordinator,
            listed: ListingCache::default(),
        })
    }

    /// Seals what it writes with `key` and trusts only what checks against it.
    pub fn with_key(mut self, key: Option<Arc<TargetKey>>) -> DirCatalogue {
        self.records.key = key;
        self
    }

    fn open_dir(&self) -> Result<Dir> {
        Dir::open(&self.dir).map_err(|e| TargetError::io("open", &self.dir, e))
    }
}

impl Catalogue for DirCatalogue {
    fn describe(&self) -> String {
        format!("{} ({})", self.target, self.dir.display())
    }

    fn records(&self) -> Result<Vec<Record>> {
        self.records.records(&self.target)
    }

    /// The listing is as fresh as a read of every record: a record file that changed is
    /// another file (see [`ListingCache`]).
    fn fresh_listing(&self) -> Result<Listing> {
        self.listing()
    }

    fn listing(&self) -> Result<Listing> {
        let dir = self.open_dir()?;
        // Ids, not names: 36 bytes in place each, no string per record (issue 28).
        let mut ids = Vec::new();
        dir.for_each_name(|name| {
            if let Some(id) = DIR_NAMES
                .record_id(name)
                .and_then(|id| BackupId::parse(id).ok())
            {
                ids.push(id);
            }
        })
        .map_err(|e| TargetError::io("list", &self.dir, e))?;
        // Gone meanwhile, or not a file (the read says why): as `records` does.
        let stat = |id: &BackupId| {
            dir.stat(&DIR_NAMES.record(id))
                .ok()
                .map(|stat| Identity::of(&stat))
        };
        let mut read = |id: &BackupId| match self.records.load(&DIR_NAMES.record(id)) {
            Ok(record) => Some(Listed::of(record)),
            Err(TargetError::NotFound(_)) => None,
            Err(e) => {
                tracing::warn!("target {}: skipping unreadable record: {e}", self.target);
                None
            }
        };
        Ok(self.listed.list(ids, &stat, &mut read))
    }

    fn record(&self, backup_id: &BackupId) -> Result<Record> {
        self.records.record(backup_id)
    }

    fn write_record(&self, record: &Record) -> Result<()> {
        self.records.write_record(record).map(drop)
    }

    fn remove_record(&self, backup_id: &BackupId) -> Result<()> {
        self.records.remove_record(backup_id)
    }

    fn write_checksums(
        &self,
        backup_id: &BackupId,
        sums: &[crate::copy::sums::Sum],
        kind: SumKind,
        leaves: bool,
    ) -> Result<Checksums> {
        let name = leaves_file_name(backup_id);
        if !leaves {
            // Cut short (a full disk): no record will name it, nothing will read it.
            self.records.remove(&name)?;
            return self.records.write_sums(backup_id, sums, kind, None);
        }
        let Some(key) = &self.records.key else {
            return self
                .records
                .write_sums(backup_id, sums, kind, Some((name, None)));
        };
        // Complete and flushed (the caller says so): what the next backup starts from.
        let expected = sums.len() as u64 * crate::copy::LEAF_SUMS_PER_BLOCK_BYTES;
        let leaves = match self.records.read_capped(&name, expected) {
            Ok(Some(bytes)) if bytes.len() as u64 == expected => {
                Some((name, Some(key.leaves_mac(backup_id, &bytes))))
            }
            // Not what this backup wrote: no record names it, the next backup reads
            // changed blocks whole.
            found => {
                tracing::warn!(
                    backup_id = %backup_id,
                    "leaf sums not kept: {name} is not the file this backup wrote ({})",
                    match found {
                        Ok(Some(bytes)) => format!("{} bytes", bytes.len()),
                        Ok(None) => "gone".to_string(),
                        Err(e) => e.to_string(),
                    }
                );
                self.records.remove(&name)?;
                None
            }
        };
        self.records.write_sums(backup_id, sums, kind, leaves)
    }

    fn create_leaves(
        &self,
        backup_id: &BackupId,
        base: Option<&Record>,
        blocks: u64,
    ) -> Result<Option<File>> {
        let dir = self.open_dir()?;
        let name = leaves_file_name(backup_id);
        let path = dir.join(&name);
        // The base's file, if its record names it (by the one name we give it). Without
        // it the new file starts as zeros: entries of blocks not read fail their check
        // (unless the block is all zeros, whose entries are zeros), so the next backups
        // read those blocks whole and the chain mends itself.
        let base_file = base.and_then(|base| {
            let name = leaves_file_name(&base.id);
            if base.checksums.as_ref()?.leaves.as_ref()? != &name {
                return None;
            }
            match dir.open_file(&name, OFlag::O_RDONLY) {
                Ok(file) => Some(file),
                Err(e) => {
                    tracing::warn!(
                        backup_id = %backup_id,
                        "leaf sums of {} cannot be read ({e}): its changed blocks are read whole",
                        base.id
                    );
                    None
                }
            }
        });
        let make = || -> std::io::Result<File> {
            // A new file: whatever has the name already (a link, a leftover) goes first,
            // and is never written through.
            let file = match dir.create_new(&name, OFlag::O_RDWR, 0o600) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    dir.remove(&name)?;
                    dir.create_new(&name, OFlag::O_RDWR, 0o600)?
                }
                other => other?,
            };
            if let (Some(base_file), Some(key), Some(base)) = (&base_file, &self.records.key, base)
            {
                // On a keyed target the parent's leaf sums are read whole and checked
                // against their MAC, and the checked bytes written: xxh3 is no defence
                // against a writer of the target who forges them.
                copy_checked_leaves(key, base, base_file, &file, backup_id)?;
            } else if let Some(base_file) = &base_file {
                // copy_file_range: a reflink where the filesystem has them, instant.
                if let Err(e) = std::io::copy(&mut &*base_file, &mut &file) {
                    tracing::warn!(
                        backup_id = %backup_id,
                        "leaf sums of the parent not copied ({e}): its changed blocks are read whole"
                    );
                    file.set_len(0)?;
                }
            }
            file.set_len(blocks * crate::copy::LEAF_SUMS_PER_BLOCK_BYTES)?;
            Ok(file)
        };
        // No directory fsync: the name matters once a record names it, and the checksums'
        // rename before that fsyncs this directory.
        match make() {
            Ok(file) => Ok(Some(file)),
            Err(e) => {
                let _ = dir.remove(&name);
                Err(TargetError::io("write", &path, e))
            }
        }
    }

    fn read_checksums(&self, record: &Record) -> Result<Vec<crate::copy::sums::Sum>> {
        self.records.read_sums(record)
    }

    fn remove_checksums(&self, backup_id: &BackupId) -> Result<()> {
        self.records.remove(&leaves_file_name(backup_id))?;
        self.records.remove_sums(backup_id)
    }

    fn remove_temporaries(&self) -> Result<()> {
        let dir = self.open_dir()?;
        let names = dir
            .names_where(claim::is_temporary)
            .map_err(|e| TargetError::io("list", &self.dir, e))?;
        // Another node may be in the middle of a write: with others about, only what is
        // too old to be a write in flight goes.
        let alone = !self.coordinator.others_present();
        let old = |name: &str| {
            dir.stat(name).is_ok_and(|stat| {
                let changed =
                    std::time::UNIX_EPOCH + Duration::from_secs(stat.st_ctime.max(0) as u64);
                changed.elapsed().is_ok_and(|age| age > TEMPORARY_AGE)
            })
        };
        for name in names {
            // A node joining right now writes its heartbeat before anything else: what
            // looks like its temporary may be in flight, alone or not.
            let fresh_ok = alone && !super::lease::is_coordination(&name);
            if fresh_ok || old(&name) {
                tracing::warn!(
                    backup_target = self.target,
                    "removing {name} left by an interrupted write"
                );
                // unlinkat: a link under such a name goes, never what it points at.
                let _ = dir.remove(&name);
            }
        }
        Ok(())
    }

    fn coordinator(&self) -> Option<&Coordinator> {
        Some(&self.coordinator)
    }

    fn foreign(&self) -> Vec<String> {
        claim::foreign_files(&self.dir)
    }
}

/// Copies the parent's leaf sums into a new backup's file if they check against the MAC
/// in the parent's record; otherwise the new file starts as zeros (its changed blocks are
/// then read whole), as for a parent without leaf sums.
fn copy_checked_leaves(
    key: &TargetKey,
    base: &Record,
    base_file: &File,
    file: &File,
    backup_id: &BackupId,
) -> std::io::Result<()> {
    use std::io::Read;
    let Some(checksums) = &base.checksums else {
        return Ok(());
    };
    // The one size the parent's file can have: a bigger one is not read whole.
    let expected = checksums.blocks * crate::copy::LEAF_SUMS_PER_BLOCK_BYTES;
    let mut bytes = Vec::new();
    (&mut &*base_file)
        .take(expected + 1)
        .read_to_end(&mut bytes)?;
    if !key.leaves_check(&base.id, checksums, &bytes) {
        tracing::warn!(
            backup_id = %backup_id,
            "leaf sums of {} do not match their MAC in its record: its changed blocks are read whole",
            base.id
        );
        return Ok(());
    }
    (&mut &*file).write_all(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0c1e2f3a-aaaa-4bbb-8ccc-123456789abc";
    const B: &str = "6b0c2f1e-1111-4222-8333-444455556666";

    fn record(id: &str) -> Record {
        serde_json::from_value(serde_json::json!({
            "format": 1, "id": id, "volume_id": "v", "backend": "b", "pool": "p",
            "target": "t", "status": "available", "size": 3 << 20,
            "created_at": "2026-01-01T00:00:00.000Z", "completed_at": null, "name": null,
            "snapshot_used": false, "parent_id": null, "checksums": null, "error": null,
        }))
        .unwrap()
    }

    fn damaged(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Err(TargetError::BadRecord { message, .. }) => message,
            other => panic!("not damaged: {other:?}"),
        }
    }

    #[test]
    fn a_listing_follows_each_record_file_as_it_is_replaced_removed_or_made() {
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let catalogue = DirCatalogue::open("t", &pool, "n", Duration::from_secs(30)).unwrap();
        let statuses = || -> Vec<(String, super::super::record::Status)> {
            let listed = catalogue.listing().unwrap();
            let full: Vec<Listed> = catalogue
                .records()
                .unwrap()
                .into_iter()
                .map(Listed::of)
                .collect();
            assert_eq!(*listed, full, "the listing shows what the records say");
            let again = catalogue.listing().unwrap();
            assert!(
                Arc::ptr_eq(&listed, &again),
                "unchanged: the same listing, shared"
            );
            listed
                .iter()
                .map(|l| (l.id.to_string(), l.status))
                .collect()
        };
        use super::super::record::Status::*;
        let mut a = record(A);
        catalogue.write_record(&a).unwrap();
        assert_eq!(statuses(), [(A.to_string(), Available)]);
        // Replaced by this daemon, and behind its back (another node, in place: the
        // ctime moves), the next listing reads it again.
        a.status = Error;
        catalogue.write_record(&a).unwrap();
        assert_eq!(statuses(), [(A.to_string(), Error)]);
        let text = std::fs::read_to_string(pool.join(DIR_NAMES.record(A))).unwrap();
        std::fs::write(
            pool.join(DIR_NAMES.record(A)),
            text.replace("\"error\"", "\"deleting\""),
        )
        .unwrap();
        assert_eq!(statuses(), [(A.to_string(), Deleting)]);
        let mut b = record(B);
        b.created_at = "2025-01-01T00:00:00.000Z".to_string();
        catalogue.write_record(&b).unwrap();
        assert_eq!(
            statuses(),
            [(B.to_string(), Available), (A.to_string(), Deleting)],
            "oldest first"
        );
        catalogue.remove_record(&a.id).unwrap();
        assert_eq!(statuses(), [(B.to_string(), Available)]);
        assert_eq!(catalogue.listed.files(), 1, "A forgotten");
    }

    #[test]
    fn a_record_claiming_more_checksums_than_memory_can_hold_is_damaged_not_read() {
        // A writer of an unkeyed target planted a record of 2^33 blocks and a sparse 64 GiB
        // sums file: reading it whole ended the daemon (out of memory).
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let catalogue = DirCatalogue::open("t", &pool, "n", Duration::from_secs(30)).unwrap();
        let mut claim = record(A);
        let mut sums = catalogue
            .write_checksums(&claim.id, &[1, 2, 3], SumKind::CURRENT, false)
            .unwrap();
        sums.blocks = 1 << 33;
        claim.size = 1 << 53;
        claim.checksums = Some(sums);
        File::options()
            .write(true)
            .open(pool.join(DIR_NAMES.sums(A)))
            .unwrap()
            .set_len(1 << 36)
            .unwrap();
        let message = damaged(catalogue.read_checksums(&claim));
        assert!(message.contains("bytes of memory"), "{message}");
    }

    #[test]
    fn records_and_sums_that_are_links_fifos_or_too_big_are_damaged_and_never_read() {
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let host = scratch.path().join("host");
        std::fs::write(&host, b"{}").unwrap();
        let catalogue = DirCatalogue::open("t", &pool, "n", Duration::from_secs(30)).unwrap();
        let mut good = record(A);
        let sums = catalogue
            .write_checksums(&good.id, &[1, 2, 3], SumKind::CURRENT, false)
            .unwrap();
        good.checksums = Some(sums);
        catalogue.write_record(&good).unwrap();
        assert_eq!(catalogue.read_checksums(&good).unwrap(), [1, 2, 3]);

        // Sums longer than the record's 3 blocks (sparse: 1 GiB would be slow to read).
        let sums_file = File::options()
            .write(true)
            .open(pool.join(DIR_NAMES.sums(A)))
            .unwrap();
        sums_file.set_len(1 << 30).unwrap();
        assert_eq!(
            damaged(catalogue.read_checksums(&good)),
            "larger than 24 bytes"
        );

        let b = BackupId::parse(B).unwrap();
        let other = pool.join(DIR_NAMES.record(B));
        type Plant = fn(&Path);
        let plants: [(&str, Plant); 3] = [
            ("a symbolic link", |p| {
                std::os::unix::fs::symlink("../host", p).unwrap()
            }),
            ("a FIFO", |p| {
                nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap()
            }),
            ("big", |p| {
                File::create(p).unwrap().set_len(RECORD_CAP + 1).unwrap()
            }),
        ];
        for (what, plant) in plants {
            plant(&other);
            let message = damaged(catalogue.record(&b));
            assert!(
                message.contains(what) || message == format!("larger than {RECORD_CAP} bytes"),
                "{what}: {message}"
            );
            let listed: Vec<String> = catalogue
                .records()
                .unwrap()
                .iter()
                .map(|r| r.id.to_string())
                .collect();
            assert_eq!(listed, [A], "{what}");
            std::fs::remove_file(&other).unwrap();
        }

        // A link at a temporary's name is swept as a name; its target stays.
        let tmp = pool.join(format!(".{}.1.0.tmp", DIR_NAMES.record(A)));
        std::os::unix::fs::symlink(&host, &tmp).unwrap();
        catalogue.write_record(&good).unwrap();
        catalogue.remove_temporaries().unwrap();
        assert!(std::fs::symlink_metadata(&tmp).is_err());
        assert_eq!(std::fs::read(&host).unwrap(), b"{}");
    }
}
