//! A target in a Ceph pool (or RBD namespace) of its own: backups are snapshots of RBD
//! images, one image per series of backups of a volume, and the catalogue (claim marker,
//! records, checksums, the nodes' coordination objects) is RADOS objects beside them, each
//! written whole. Several daemons (nodes) serve it at once (`lease`). It writes into a
//! pool only while it is empty or carries our marker, and removes only images, snapshots
//! and objects of its own names that a record owns.
//!
//! Layout (see ARCHITECTURE.md, "On disk"):
//! - `backupfs.target`: the claim marker (JSON, as `claim::Marker`), made exclusively;
//! - `backupfs.lock`: the advisory lock `backupfs`, which every daemon of this version
//!   holds shared (tag `backupfs-nodes`, renewed every 10 s, expires after 30 s), and an
//!   earlier version held exclusively (one daemon per target): the two exclude each other;
//! - `backupfs.node.*`, `backupfs.claim.*`, `backupfs.end.*`, `backupfs.lock.<id>`: the
//!   nodes' heartbeats, claims, decisions and record (and series) locks (`lease`); no
//!   listing by one of their prefixes sees `backupfs.lock` (no dot after it);
//! - `backupfs.record.<id>`, `backupfs.sums.<id>`: the record and its checksums;
//! - images `backupfs-series-<first backup id>`: a backup is the image's snapshot
//!   `backup-<id>`; the image's head holds the newest backup of the series (its metadata
//!   `backupfs.head` names it, set before the head is written), and an incremental
//!   backup writes only what changed into the head before its own snapshot is taken.
//!   Changes of a series' head, snapshots and metadata hold the series' lock
//!   (`backupfs.lock.backupfs-series-<id>`, every node's); writes into the head do not
//!   (the volume's claim makes its holder the series' only writer).

use super::catalogue::Catalogue;
use super::claim::{ClaimError, Marker, PoolState};
use super::lease::{Coordinator, LeaseError};
use super::record::{Checksums, Record, rfc3339};
use super::records::{Names, RecordCache, StoreRecords};
use super::store::{ObjectStore, RadosStore};
use super::{BackupTarget, NewData, Result, TargetError};
use crate::ids::BackupId;
use crate::volume::Attachment;
use crate::volume::rbd::client::{Image, ImageOptions, IoCtx, ObjectLock, RbdError};
use crate::volume::rbd::connection::{Connection, PoolSpec};
use crate::volume::rbd::device::RbdDevice;
use crate::volume::rbd::driver::{pool_free_space, volume_error};
pub use catalogue::RADOS_NAMES;
use catalogue::{Listing, RbdCatalogue};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

mod catalogue;
mod series;

pub const MARKER_OBJECT: &str = "backupfs.target";
const LOCK_OBJECT: &str = "backupfs.lock";
const LOCK_NAME: &str = "backupfs";
/// The tag every daemon of this version holds the lock with (shared).
const LOCK_TAG: &str = "backupfs-nodes";
/// How long the lock outlives a daemon that died without releasing it.
const LOCK_DURATION: Duration = Duration::from_secs(30);
const RECORD_PREFIX: &str = "backupfs.record.";
const SUMS_PREFIX: &str = "backupfs.sums.";
const SERIES_PREFIX: &str = "backupfs-series-";
const SNAPSHOT_PREFIX: &str = "backup-";
const HEAD_KEY: &str = "backupfs.head";
/// claim::Marker's format.
const MARKER_FORMAT: u32 = 1;
/// How many names a refusal shows.
const NAMED: usize = 5;
/// How long a removal waits for another client's watch to go (a fenced client's at once,
/// a dead reader's after `osd_client_watch_timeout`, 30 s).
const WATCH_EXPIRY: Duration = Duration::from_secs(45);
/// RBD's pool-level objects (`rbd pool init`, a namespace, the trash): present in a pool
/// that holds no image.
const RBD_POOL_OBJECTS: [&str; 7] = [
    "rbd_directory",
    "rbd_info",
    "rbd_trash",
    "rbd_children",
    "rbd_mirroring",
    "rbd_namespace",
    "rbd_task",
];

fn record_object(backup_id: &str) -> String {
    format!("{RECORD_PREFIX}{backup_id}")
}

fn sums_object(backup_id: &str) -> String {
    format!("{SUMS_PREFIX}{backup_id}")
}

fn series_image(first_backup_id: &str) -> String {
    format!("{SERIES_PREFIX}{first_backup_id}")
}

fn snapshot_name(backup_id: &str) -> String {
    format!("{SNAPSHOT_PREFIX}{backup_id}")
}

fn backup_of_snapshot(name: &str) -> Option<&str> {
    name.strip_prefix(SNAPSHOT_PREFIX)
        .filter(|id| crate::ids::is_backup_id(id))
}

fn target_error(e: RbdError) -> TargetError {
    TargetError::Volume(volume_error(e))
}

fn claim_io(e: RbdError) -> ClaimError {
    ClaimError::Io(e.into())
}

/// Whether an object name is one of ours (catalogue, lock, marker, coordination).
fn is_ours(name: &str) -> bool {
    name == MARKER_OBJECT
        || name == LOCK_OBJECT
        || super::lease::is_coordination(name)
        || name
            .strip_prefix(RECORD_PREFIX)
            .or_else(|| name.strip_prefix(SUMS_PREFIX))
            .is_some_and(crate::ids::is_backup_id)
}

/// The marker of a pool, if it has one; never writes.
pub fn read_marker(io: &IoCtx) -> std::result::Result<Option<Marker>, ClaimError> {
    let bytes = match io.read_object(MARKER_OBJECT) {
        Ok(bytes) => bytes,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(claim_io(e)),
    };
    let marker: Marker =
        serde_json::from_slice(&bytes).map_err(|e| ClaimError::BadMarker(e.to_string()))?;
    if marker.format != MARKER_FORMAT {
        return Err(ClaimError::BadMarker(format!(
            "unknown format {}",
            marker.format
        )));
    }
    Ok(Some(marker))
}

/// What the pool (namespace) of `io` is for target `target`: claimed by it, or empty;
/// a pool claimed by another target or holding anything that is neither ours nor RBD's
/// own pool-level bookkeeping is refused. "Empty" means: no RBD image (trash included:
/// a trashed image still has objects) and no RADOS object besides RBD's pool objects,
/// our lock and the nodes' coordination objects (nodes that start at once on an empty
/// pool write their heartbeats before one of them claims it). Writes nothing.
pub fn inspect(io: &IoCtx, target: &str) -> std::result::Result<PoolState, ClaimError> {
    let claimed = |marker: Marker| {
        if marker.target != target {
            return Err(ClaimError::OtherTarget {
                owner: marker.target,
                created_at: marker.created_at,
            });
        }
        Ok(PoolState::Claimed(marker))
    };
    if let Some(marker) = read_marker(io)? {
        return claimed(marker);
    }
    let mut found: Vec<String> = io
        .list_images()
        .map_err(claim_io)?
        .into_iter()
        .map(|name| format!("image {name}"))
        .collect();
    let objects = io.list_objects("").map_err(claim_io)?;
    // Claimed by another node between the two looks (nodes starting at once): read.
    if objects.iter().any(|name| name == MARKER_OBJECT)
        && let Some(marker) = read_marker(io)?
    {
        return claimed(marker);
    }
    found.extend(
        objects
            .into_iter()
            .filter(|name| {
                name != LOCK_OBJECT
                    && !super::lease::is_coordination(name)
                    && !RBD_POOL_OBJECTS.contains(&name.as_str())
            })
            .map(|name| format!("object {name}")),
    );
    if found.is_empty() {
        return Ok(PoolState::Empty);
    }
    Err(ClaimError::Foreign {
        total: found.len(),
        files: found.into_iter().take(NAMED).collect(),
    })
}

fn holder_is_dead(cookie: &str) -> bool {
    super::lease::holder_is_dead(cookie)
}

/// backup id → the series image holding its data (a snapshot, or the head while it is
/// written), as the pool says: every series image's snapshots and head.
fn scan_members(io: &IoCtx) -> Result<(HashMap<String, String>, Vec<String>)> {
    let mut members = HashMap::new();
    let mut foreign = Vec::new();
    for image_name in io.list_images().map_err(target_error)? {
        let Some(first) = image_name.strip_prefix(SERIES_PREFIX) else {
            foreign.push(format!("image {image_name}"));
            continue;
        };
        let image = match io.open_image_read_only(&image_name, None) {
            Ok(image) => image,
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(target_error(e)),
        };
        let mut ids: Vec<String> = match image.snapshots() {
            Ok(snapshots) => snapshots
                .iter()
                .filter_map(|s| backup_of_snapshot(&s.name).map(str::to_string))
                .collect(),
            // Removed by another node meanwhile.
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(target_error(e)),
        };
        match image.metadata_get(HEAD_KEY) {
            Ok(Some(head)) => ids.push(head),
            // Made, but cut short before the head was named: its first backup's.
            Ok(None) if ids.is_empty() => ids.push(first.to_string()),
            Ok(None) => {}
            Err(e) if e.is_not_found() => continue,
            Err(e) => return Err(target_error(e)),
        }
        for id in ids {
            members.entry(id).or_insert_with(|| image_name.clone());
        }
    }
    Ok((members, foreign))
}

/// Backups as snapshots of series images in an RBD pool of their own.
pub struct RbdTarget {
    name: String,
    connection: Arc<Connection>,
    spec: PoolSpec,
    io: IoCtx,
    catalogue: RbdCatalogue,
    /// backup id → the series image holding its data (a snapshot, or the head while it
    /// is written). A backup's image never changes; one not known here (made by another
    /// node) is looked for in the pool.
    members: Mutex<HashMap<String, String>>,
    /// One lock per series image: making, sealing and removing backups of one series
    /// never interleave in this daemon (the series' lock object does it across nodes).
    series_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Series whose head a backup of this daemon is writing now: not a base for another
    /// one meanwhile.
    writing: Mutex<HashSet<String>>,
}

impl RbdTarget {
    /// Opens `spec` as target `name`, as node `node`: refuses a pool that is not ours
    /// (writing nothing) and one an earlier version serves alone; joins the nodes that
    /// serve it (refused while another live daemon serves it under the same node name),
    /// claims the pool if it is empty, reads the catalogue.
    pub fn open(
        name: &str,
        connection: Arc<Connection>,
        spec: &PoolSpec,
        node: &str,
        lease: Duration,
    ) -> Result<RbdTarget> {
        let io = spec.open(&connection).map_err(target_error)?;
        let refused = |source| TargetError::Claim {
            path: PathBuf::from(format!("rbd:{spec}")),
            source,
        };
        let state = inspect(&io, name).map_err(refused)?;
        let lock = take_lock(&io, name)?;
        let store: Arc<dyn ObjectStore> = Arc::new(RadosStore::new(io.clone()));
        let coordinator = Coordinator::join(store.clone(), node, lease).map_err(|e| match e {
            LeaseError::NodeTaken { object, node } => TargetError::NodeTaken {
                target: name.to_string(),
                node,
                path: PathBuf::from(object),
            },
            other => TargetError::Io {
                op: "join",
                path: PathBuf::from(format!("rbd:{spec}")),
                source: std::io::Error::other(other.to_string()),
            },
        })?;
        if state == PoolState::Empty {
            let marker = Marker {
                format: MARKER_FORMAT,
                target: name.to_string(),
                id: uuid::Uuid::new_v4().to_string(),
                created_at: rfc3339(SystemTime::now()),
            };
            let mut bytes = serde_json::to_vec_pretty(&marker)
                .map_err(|e| refused(ClaimError::Io(std::io::Error::other(e))))?;
            bytes.push(b'\n');
            match io.create_object(MARKER_OBJECT, &bytes) {
                Ok(()) => tracing::info!(backup_target = name, "claimed rbd:{spec} for backups"),
                // Another node claimed it first: fine if for this very target.
                Err(e) if e.is_exists() => {
                    inspect(&io, name).map_err(refused)?;
                }
                Err(e) => return Err(refused(claim_io(e))),
            }
        }
        let objects = StoreRecords {
            store,
            names: RADOS_NAMES,
            key: None,
        };
        let records = RecordCache::new(RADOS_NAMES);
        let mut foreign = Vec::new();
        for object in io.list_objects("").map_err(target_error)? {
            if !is_ours(&object)
                && RADOS_NAMES.record_id(&object).is_none()
                && !object.starts_with("rbd_")
            {
                foreign.push(format!("object {object}"));
            }
        }
        let (members, foreign_images) = scan_members(&io)?;
        foreign.extend(foreign_images);
        Ok(RbdTarget {
            name: name.to_string(),
            connection,
            spec: spec.clone(),
            io: io.clone(),
            catalogue: RbdCatalogue {
                target: name.to_string(),
                io,
                lock,
                listing: Arc::new(Listing {
                    target: name.to_string(),
                    objects,
                    records,
                    refreshed: Mutex::new(None),
                    refreshing: std::sync::atomic::AtomicBool::new(false),
                }),
                coordinator,
                foreign,
            },
            members: Mutex::new(members),
            series_locks: Mutex::new(HashMap::new()),
            writing: Mutex::new(HashSet::new()),
        })
    }

    /// Seals what it writes with `key` and trusts only what checks against it (see
    /// `target::auth`).
    pub fn with_key(mut self, key: Option<Arc<super::auth::TargetKey>>) -> RbdTarget {
        // Not shared yet: the catalogue is first read when it is first listed.
        if let Some(listing) = Arc::get_mut(&mut self.catalogue.listing) {
            listing.objects.key = key;
        }
        self
    }
}

/// Takes the target's lock, shared with the other daemons of this version: refused
/// (`ServedAlone`) while a daemon of an earlier version holds it exclusively, and such a
/// daemon started later is refused by our holders. An exclusive holder that is a dead
/// process of this machine (killed with -9: its lock stays for 30 s) is broken first.
fn take_lock(io: &IoCtx, target: &str) -> Result<ObjectLock> {
    let description = format!(
        "backupfs target {target}, pid {} on {}",
        std::process::id(),
        crate::config::host_name()
    );
    let alone = || TargetError::ServedAlone {
        target: target.to_string(),
        path: PathBuf::from(format!("{}/{LOCK_OBJECT}", io.location())),
    };
    for attempt in 0..2 {
        match io.lock_shared_as(
            LOCK_OBJECT,
            LOCK_NAME,
            &super::lease::holder_cookie(),
            LOCK_TAG,
            &description,
            LOCK_DURATION,
        ) {
            Ok(lock) => return Ok(lock),
            Err(e) if e.is_busy() && attempt == 0 => {
                let lockers = io.lockers(LOCK_OBJECT, LOCK_NAME).map_err(target_error)?;
                let dead: Vec<_> = lockers
                    .iter()
                    .filter(|l| holder_is_dead(&l.cookie))
                    .collect();
                if dead.is_empty() || dead.len() != lockers.len() {
                    return Err(alone());
                }
                for locker in dead {
                    tracing::warn!(
                        target,
                        "breaking the lock of a backupfs of this machine that is gone ({} {})",
                        locker.client,
                        locker.cookie
                    );
                    match io.break_lock(LOCK_OBJECT, LOCK_NAME, &locker.client, &locker.cookie) {
                        Err(e) if !e.is_not_found() => return Err(target_error(e)),
                        _ => {}
                    }
                }
            }
            Err(e) if e.is_busy() => return Err(alone()),
            Err(e) => return Err(target_error(e)),
        }
    }
    Err(alone())
}

impl BackupTarget for RbdTarget {
    fn name(&self) -> &str {
        &self.name
    }

    /// An incremental backup continues its parent's series image.
    fn shares_data(&self) -> bool {
        true
    }

    fn catalogue(&self) -> &dyn Catalogue {
        &self.catalogue
    }

    /// With a `base` of this target the new backup continues the base's series (only
    /// what changed is written, into the head the base left); otherwise it starts a new
    /// series image, thin, reading as zeros.
    fn create_data(
        &self,
        backup_id: &BackupId,
        size: u64,
        base: Option<&BackupId>,
    ) -> Result<NewData> {
        if let Some(base) = base
            && let Some(image_name) = self.image_of(base)?
        {
            let extended = self.with_series(&image_name, || {
                self.extend_series(&image_name, base, backup_id, size)
            })?;
            if let Some(attachment) = extended {
                return Ok(NewData {
                    attachment,
                    shared: true,
                });
            }
            tracing::info!(
                backup_target = self.name,
                backup_id = %backup_id,
                "base {base} cannot be shared here: a new series"
            );
        }
        let image_name = series_image(backup_id);
        let image = self.with_series(&image_name, || {
            self.io
                .create_image(&image_name, size, &ImageOptions::default())
                .map_err(target_error)?;
            self.members
                .lock()
                .insert(backup_id.to_string(), image_name.clone());
            let image = self.io.open_image(&image_name).map_err(target_error)?;
            image
                .metadata_set(HEAD_KEY, backup_id.as_str())
                .map_err(target_error)?;
            self.writing.lock().insert(image_name.clone());
            Ok(image)
        })?;
        Ok(NewData {
            attachment: self.attachment(image),
            shared: false,
        })
    }

    /// The head holds the backup's data from now on, and no backup is writing it: a later
    /// backup may continue the series (which snapshots this one first).
    fn finish_data(&self, backup_id: &BackupId) -> Result<()> {
        let image_name = self
            .image_of(backup_id)?
            .ok_or_else(|| TargetError::NotFound(backup_id.to_string()))?;
        self.writing.lock().remove(&image_name);
        Ok(())
    }

    /// The snapshot that is the backup from now on (later backups of the series write the
    /// head, never it), taken after the backup is available: its id comes from the
    /// monitors, which batch such changes (`paxos_propose_interval`, 1 s by default), and
    /// a backup waiting for it took 0.1-1 s longer (contrib/bench/README.md).
    fn settle_data(&self, backup_id: &BackupId) -> Result<()> {
        let Some(image_name) = self.image_of(backup_id)? else {
            return Ok(());
        };
        self.with_series(&image_name, || self.snapshot_head(&image_name, backup_id))
            .map(drop)
    }

    /// Read-only at the backup's snapshot (no watch, no lock: other clients do not see
    /// it), taken first if the head still holds the backup; a backup being written is
    /// read from the head.
    fn open_data(&self, backup_id: &BackupId) -> Result<Attachment> {
        let missing = || TargetError::NotFound(backup_id.to_string());
        let image_name = self.image_of(backup_id)?.ok_or_else(missing)?;
        let at_snapshot = || {
            self.io
                .open_image_read_only(&image_name, Some(&snapshot_name(backup_id)))
        };
        match at_snapshot() {
            Ok(image) => return Ok(self.attachment(image)),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(target_error(e)),
        }
        // Available but not snapshotted yet (just made, on this node or another, or the
        // daemon stopped first): the snapshot is taken now, so that no reader holds the
        // head that the next backup of the series writes.
        if self.with_series(&image_name, || self.snapshot_head(&image_name, backup_id))? {
            return at_snapshot()
                .map(|image| self.attachment(image))
                .map_err(target_error);
        }
        // A backup still being written is read from the head.
        let image = self
            .io
            .open_image_read_only(&image_name, None)
            .map_err(|e| {
                if e.is_not_found() {
                    missing()
                } else {
                    target_error(e)
                }
            })?;
        if image
            .metadata_get(HEAD_KEY)
            .map_err(target_error)?
            .as_deref()
            != Some(backup_id.as_str())
        {
            return Err(missing());
        }
        Ok(self.attachment(image))
    }

    /// Removes the backup's snapshot; data other backups of the series share stays
    /// (RADOS frees what no snapshot uses any more). When the head held this backup, it
    /// is rolled back to the series' newest remaining backup, or, with none left, the
    /// series image goes. A writer left by a node that died or was fenced is cut off
    /// first; a live node that writes the head meanwhile (an incremental from an older
    /// backup of the series) is left alone: its head is not this backup's.
    fn remove_data(&self, backup_id: &BackupId) -> Result<()> {
        let Some(image_name) = self.image_of(backup_id)? else {
            return Ok(());
        };
        self.fence_other_writers(&image_name, backup_id);
        self.with_series(&image_name, || {
            let Some(image) = self.open_existing(&image_name)? else {
                self.members.lock().remove(backup_id.as_str());
                return Ok(());
            };
            let snapshot = snapshot_name(backup_id);
            if image.snapshot_exists(&snapshot).map_err(target_error)? {
                match image.remove_snapshot(&snapshot) {
                    Err(e) if !e.is_not_found() => return Err(target_error(e)),
                    _ => {}
                }
            }
            let head = image.metadata_get(HEAD_KEY).map_err(target_error)?;
            if head.is_none() || head.as_deref() == Some(backup_id.as_str()) {
                let remaining: Vec<String> = image
                    .snapshots()
                    .map_err(target_error)?
                    .iter()
                    .filter_map(|s| backup_of_snapshot(&s.name).map(str::to_string))
                    .collect();
                match remaining.last() {
                    Some(newest) => {
                        image
                            .rollback_to_snapshot(&snapshot_name(newest))
                            .map_err(target_error)?;
                        image.metadata_set(HEAD_KEY, newest).map_err(target_error)?;
                    }
                    None => {
                        drop(image);
                        match self.io.remove_image(&image_name) {
                            Err(e) if !e.is_not_found() => return Err(target_error(e)),
                            _ => {}
                        }
                        self.members.lock().retain(|_, image| *image != image_name);
                    }
                }
                self.writing.lock().remove(&image_name);
            }
            self.members.lock().remove(backup_id.as_str());
            Ok(())
        })
    }

    /// As the pool says now (other nodes make and remove backups too).
    fn data_ids(&self) -> Result<Vec<String>> {
        let (found, _) = scan_members(&self.io)?;
        let mut ids: Vec<String> = found.keys().cloned().collect();
        *self.members.lock() = found;
        ids.sort();
        Ok(ids)
    }

    /// What the copy wrote for it (the record's `stored_bytes`): an RBD snapshot's own
    /// share of the data is only known by diffing it against its neighbours, and the
    /// mount asks for this at every `stat`.
    fn allocated(&self, backup_id: &BackupId) -> Result<u64> {
        Ok(self.catalogue.listed_record(backup_id)?.stored_bytes)
    }

    fn free_space(&self) -> Result<Option<u64>> {
        pool_free_space(&self.connection, &self.spec.pool).map_err(target_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_old_lock_object_and_the_nodes_objects_are_ours_and_apart() {
        for name in [
            LOCK_OBJECT,
            MARKER_OBJECT,
            "backupfs.node.a",
            "backupfs.claim.ceph.v1",
            "backupfs.end.0c1e2f3a-aaaa-4bbb-8ccc-123456789abc",
            "backupfs.lock.0c1e2f3a-aaaa-4bbb-8ccc-123456789abc",
            "backupfs.lock.backupfs-series-0c1e2f3a-aaaa-4bbb-8ccc-123456789abc",
        ] {
            assert!(is_ours(name), "{name}");
        }
        assert!(!is_ours("backupfs.lockx"));
        assert!(!is_ours("someones-object"));
        // A listing of the record locks' prefix never sees the old lock object.
        assert!(!LOCK_OBJECT.starts_with(super::super::lease::LOCK_PREFIX));
        assert!(!super::super::lease::is_coordination(LOCK_OBJECT));
    }
}
