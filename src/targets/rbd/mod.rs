//! A target in a Ceph pool (or RBD namespace) of its own: backups are snapshots of RBD
//! images, one image per series of backups of a volume, and the catalogue (claim marker,
//! records, checksums, the one-daemon lock) is RADOS objects beside them, each written
//! whole. It writes into a pool only while it is empty or carries our marker, and removes
//! only images, snapshots and objects of its own names that a record owns.
//!
//! Layout (see ARCHITECTURE.md, "On disk"):
//! - `backupfs.target`: the claim marker (JSON, as `claim::Marker`), made exclusively;
//! - `backupfs.lock`: holds the advisory lock `backupfs` (renewed every 10 s, expires
//!   after 30 s) that one daemon per target takes;
//! - `backupfs.record.<id>`, `backupfs.sums.<id>`: the record and its checksums;
//! - images `backupfs-series-<first backup id>`: a backup is the image's snapshot
//!   `backup-<id>`; the image's head holds the newest backup of the series (its metadata
//!   `backupfs.head` names it, set before the head is written), and an incremental
//!   backup writes only what changed into the head before its own snapshot is taken.

use super::catalogue::Catalogue;
use super::claim::{ClaimError, Marker, PoolState};
use super::record::{Checksums, Record, rfc3339};
use super::records::{Names, RecordCache, StoreRecords};
use super::store::RadosStore;
use super::{BackupTarget, NewData, Result, TargetError};
use crate::ids::BackupId;
use crate::volume::Attachment;
use crate::volume::rbd::client::{Image, ImageOptions, IoCtx, ObjectLock, RbdError};
use crate::volume::rbd::connection::{Connection, PoolSpec};
use crate::volume::rbd::device::RbdDevice;
use crate::volume::rbd::driver::{pool_free_space, volume_error};
pub use catalogue::RADOS_NAMES;
use catalogue::RbdCatalogue;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

mod catalogue;

pub const MARKER_OBJECT: &str = "backupfs.target";
const LOCK_OBJECT: &str = "backupfs.lock";
const LOCK_NAME: &str = "backupfs";
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

/// Takes the snapshot of the backup the head of `image` holds, if it has none yet; that
/// backup's id. Call with the series lock held and no backup writing the head: the head
/// then holds an available backup not settled yet, or the data of a failed one whose
/// removal failed too (kept: its removal, retried, takes the snapshot with it).
fn snapshot_held(image: &Image) -> Result<Option<String>> {
    let Some(head) = image.metadata_get(HEAD_KEY).map_err(target_error)? else {
        return Ok(None);
    };
    let snapshot = snapshot_name(&head);
    if !image.snapshot_exists(&snapshot).map_err(target_error)? {
        image.create_snapshot(&snapshot).map_err(target_error)?;
    }
    Ok(Some(head))
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

/// Whether an object name is one of ours (catalogue, lock, marker).
fn is_ours(name: &str) -> bool {
    name == MARKER_OBJECT
        || name == LOCK_OBJECT
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
/// a trashed image still has objects) and no RADOS object besides RBD's pool objects
/// and our lock. Writes nothing.
pub fn inspect(io: &IoCtx, target: &str) -> std::result::Result<PoolState, ClaimError> {
    if let Some(marker) = read_marker(io)? {
        if marker.target != target {
            return Err(ClaimError::OtherTarget {
                owner: marker.target,
                created_at: marker.created_at,
            });
        }
        return Ok(PoolState::Claimed(marker));
    }
    let mut found: Vec<String> = io
        .list_images()
        .map_err(claim_io)?
        .into_iter()
        .map(|name| format!("image {name}"))
        .collect();
    let objects = io.list_objects("").map_err(claim_io)?;
    found.extend(
        objects
            .into_iter()
            .filter(|name| name != LOCK_OBJECT && !RBD_POOL_OBJECTS.contains(&name.as_str()))
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

/// This process, as a lock cookie (see `lease::holder_cookie`): a daemon on this machine
/// can tell that the holder is dead (after `kill -9`) and break its lock.
fn lock_cookie() -> String {
    super::lease::holder_cookie()
}

fn holder_is_dead(cookie: &str) -> bool {
    super::lease::holder_is_dead(cookie)
}

/// Backups as snapshots of series images in an RBD pool of their own.
pub struct RbdTarget {
    name: String,
    connection: Arc<Connection>,
    spec: PoolSpec,
    io: IoCtx,
    catalogue: RbdCatalogue,
    /// backup id → the series image holding its data (a snapshot, or the head while it
    /// is written). Changed only under the series' lock.
    members: Mutex<HashMap<String, String>>,
    /// One lock per series image: making, sealing and removing backups of one series
    /// never interleave.
    series_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Series whose head a backup is writing now: not a base for another one meanwhile.
    writing: Mutex<HashSet<String>>,
}

impl RbdTarget {
    /// Opens `spec` as target `name`: refuses a pool that is not ours (writing nothing),
    /// takes the one-daemon lock (breaking it only when its holder is a dead process of
    /// this very machine), claims the pool if it is empty, reads the catalogue.
    pub fn open(name: &str, connection: Arc<Connection>, spec: &PoolSpec) -> Result<RbdTarget> {
        let io = spec.open(&connection).map_err(target_error)?;
        let refused = |source| TargetError::Claim {
            path: PathBuf::from(format!("rbd:{spec}")),
            source,
        };
        let state = inspect(&io, name).map_err(refused)?;
        let lock = take_lock(&io, name)?;
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
            store: Arc::new(RadosStore::new(io.clone())),
            names: RADOS_NAMES,
            key: None,
        };
        let mut records = RecordCache::new(RADOS_NAMES);
        let mut foreign = Vec::new();
        for object in io.list_objects("").map_err(target_error)? {
            if RADOS_NAMES.record_id(&object).is_some() {
                records.load(&objects, name, &object)?;
            } else if !is_ours(&object) && !object.starts_with("rbd_") {
                foreign.push(format!("object {object}"));
            }
        }
        let mut members = HashMap::new();
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
            let mut ids: Vec<String> = image
                .snapshots()
                .map_err(target_error)?
                .iter()
                .filter_map(|s| backup_of_snapshot(&s.name).map(str::to_string))
                .collect();
            match image.metadata_get(HEAD_KEY).map_err(target_error)? {
                Some(head) => ids.push(head),
                // Made, but cut short before the head was named: its first backup's.
                None if ids.is_empty() => ids.push(first.to_string()),
                None => {}
            }
            for id in ids {
                members.entry(id).or_insert_with(|| image_name.clone());
            }
        }
        Ok(RbdTarget {
            name: name.to_string(),
            connection,
            spec: spec.clone(),
            io: io.clone(),
            catalogue: RbdCatalogue {
                target: name.to_string(),
                io,
                lock,
                objects,
                records,
                foreign,
            },
            members: Mutex::new(members),
            series_locks: Mutex::new(HashMap::new()),
            writing: Mutex::new(HashSet::new()),
        })
    }

    /// Seals what it writes with `key` and trusts only what checks against it (see
    /// `target::auth`): the records read at open are inspected again with it.
    pub fn with_key(mut self, key: Option<Arc<super::auth::TargetKey>>) -> RbdTarget {
        self.catalogue.records.inspect(key.as_deref());
        self.catalogue.objects.key = key;
        self
    }

    fn series_lock(&self, image: &str) -> Arc<Mutex<()>> {
        self.series_locks
            .lock()
            .entry(image.to_string())
            .or_default()
            .clone()
    }

    fn image_of(&self, backup_id: &str) -> Option<String> {
        self.members.lock().get(backup_id).cloned()
    }

    fn attachment(&self, image: Image) -> Attachment {
        Attachment::new(RbdDevice::new(image, self.connection.clone()))
    }

    /// Takes the snapshot of the backup the head of `image_name` holds, if it has none
    /// yet ([`snapshot_held`]); whether `backup_id`'s snapshot exists now. Not while a backup
    /// writes the head. Call with the series lock held.
    fn snapshot_head(&self, image_name: &str, backup_id: &BackupId) -> Result<bool> {
        if self.writing.lock().contains(image_name) {
            return Ok(false);
        }
        let Some(image) = self.open_existing(image_name)? else {
            return Ok(false);
        };
        snapshot_held(&image)?;
        image
            .snapshot_exists(&snapshot_name(backup_id))
            .map_err(target_error)
    }

    /// The image for writing; None if it is gone.
    fn open_existing(&self, image_name: &str) -> Result<Option<Image>> {
        match self.io.open_image(image_name) {
            Ok(image) => Ok(Some(image)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(target_error(e)),
        }
    }

    /// Continues the series of `base` with `backup_id`: the head is made to read as the
    /// base (it already does unless a later backup wrote it: then it is rolled back to
    /// the base's snapshot), named as `backup_id`'s before that, and grown. None when
    /// the base cannot be shared (its snapshot is gone, the head is being written, the
    /// volume shrank).
    fn extend_series(
        &self,
        image_name: &str,
        base: &BackupId,
        backup_id: &BackupId,
        size: u64,
    ) -> Result<Option<Attachment>> {
        if self.writing.lock().contains(image_name) {
            return Ok(None);
        }
        let Some(image) = self.open_existing(image_name)? else {
            return Ok(None);
        };
        // The backup the head holds (the base, or a later one about to be rolled back
        // over) keeps its data as a snapshot first, if it has none yet.
        let head = snapshot_held(&image)?;
        let head_is_base = head.as_deref() == Some(base.as_str());
        let base_snapshot = snapshot_name(base);
        let Some(base_size) = image
            .snapshots()
            .map_err(target_error)?
            .into_iter()
            .find(|s| s.name == base_snapshot)
            .map(|snapshot| snapshot.size)
        else {
            return Ok(None);
        };
        if size < base_size {
            return Ok(None);
        }
        self.writing.lock().insert(image_name.to_string());
        let prepared = (|| -> std::result::Result<(), RbdError> {
            // Named first: from here a crash leaves a head that recovery rolls back.
            image.metadata_set(HEAD_KEY, backup_id.as_str())?;
            self.members
                .lock()
                .insert(backup_id.to_string(), image_name.to_string());
            if !head_is_base {
                image.rollback_to_snapshot(&base_snapshot)?;
            }
            if size > image.size()? {
                image.resize(size)?;
            }
            Ok(())
        })();
        if let Err(e) = prepared {
            self.writing.lock().remove(image_name);
            return Err(target_error(e));
        }
        Ok(Some(self.attachment(image)))
    }

    /// Fences off any other client that still writes the image, then waits (bounded)
    /// until no client but this process watches it. Only this daemon writes a target (it
    /// holds the target's lock), so another writer is a daemon that died (`kill -9`: its
    /// watch and exclusive lock linger for ~30 s, and librbd refuses to remove or roll
    /// back the image meanwhile) or lost the target: its lock is broken, which blocklists
    /// it, and the OSDs drop its watch.
    fn fence_other_writers(&self, image_name: &str) {
        let ours = crate::volume::rbd::connection::our_instance_ids();
        let others = |image: &Image| {
            image
                .watchers()
                .map(|watchers| watchers.iter().any(|w| !ours.contains(&w.client_id)))
                .unwrap_or(false)
        };
        let Ok(image) = self.io.open_image_read_only(image_name, None) else {
            return;
        };
        if !others(&image) {
            return;
        }
        // Breaking a lock needs a handle that may write.
        let owners = self
            .io
            .open_image(image_name)
            .and_then(|writable| Ok((writable.lock_owners()?, writable)));
        match owners {
            Ok((owners, writable)) => {
                let owner_id = |owner: &str| {
                    owner
                        .strip_prefix("client.")
                        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                        .and_then(|id| id.parse::<u64>().ok())
                };
                for owner in owners
                    .into_iter()
                    .filter(|o| owner_id(o).is_none_or(|id| !ours.contains(&id)))
                {
                    tracing::warn!(
                        backup_target = self.name,
                        "{image_name}: breaking the exclusive lock of {owner}, a writer that is not this daemon (it died, or lost the target)"
                    );
                    if let Err(e) = writable.break_lock(&owner) {
                        tracing::warn!(backup_target = self.name, "{e}");
                    }
                }
            }
            Err(e) => tracing::warn!(backup_target = self.name, "{e}"),
        }
        let deadline = Instant::now() + WATCH_EXPIRY;
        while others(&image) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Takes the target's lock; a holder that is a dead process of this machine (a daemon
/// killed with -9 leaves its lock for 30 s) is broken first.
fn take_lock(io: &IoCtx, target: &str) -> Result<ObjectLock> {
    let description = format!(
        "backupfs target {target}, pid {} on {}",
        std::process::id(),
        crate::config::host_name()
    );
    let locked = || TargetError::Locked {
        target: target.to_string(),
        path: PathBuf::from(format!("{}/{LOCK_OBJECT}", io.location())),
    };
    for attempt in 0..2 {
        match io.lock_exclusive_as(
            LOCK_OBJECT,
            LOCK_NAME,
            &lock_cookie(),
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
                    return Err(locked());
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
            Err(e) if e.is_busy() => return Err(locked()),
            Err(e) => return Err(target_error(e)),
        }
    }
    Err(locked())
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
            && let Some(image_name) = self.image_of(base)
        {
            let lock = self.series_lock(&image_name);
            let _series = lock.lock();
            if let Some(attachment) = self.extend_series(&image_name, base, backup_id, size)? {
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
        let lock = self.series_lock(&image_name);
        let _series = lock.lock();
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
        self.writing.lock().insert(image_name);
        Ok(NewData {
            attachment: self.attachment(image),
            shared: false,
        })
    }

    /// The head holds the backup's data from now on, and no backup is writing it: a later
    /// backup may continue the series (which snapshots this one first).
    fn finish_data(&self, backup_id: &BackupId) -> Result<()> {
        let image_name = self
            .image_of(backup_id)
            .ok_or_else(|| TargetError::NotFound(backup_id.to_string()))?;
        let lock = self.series_lock(&image_name);
        let _series = lock.lock();
        self.writing.lock().remove(&image_name);
        Ok(())
    }

    /// The snapshot that is the backup from now on (later backups of the series write the
    /// head, never it), taken after the backup is available: its id comes from the
    /// monitors, which batch such changes (`paxos_propose_interval`, 1 s by default), and
    /// a backup waiting for it took 0.1-1 s longer (contrib/bench/README.md).
    fn settle_data(&self, backup_id: &BackupId) -> Result<()> {
        let Some(image_name) = self.image_of(backup_id) else {
            return Ok(());
        };
        let lock = self.series_lock(&image_name);
        let _series = lock.lock();
        self.snapshot_head(&image_name, backup_id).map(drop)
    }

    /// Read-only at the backup's snapshot (no watch, no lock: other clients do not see
    /// it), taken first if the head still holds the backup; a backup being written is
    /// read from the head.
    fn open_data(&self, backup_id: &BackupId) -> Result<Attachment> {
        let missing = || TargetError::NotFound(backup_id.to_string());
        let image_name = self.image_of(backup_id).ok_or_else(missing)?;
        let at_snapshot = || {
            self.io
                .open_image_read_only(&image_name, Some(&snapshot_name(backup_id)))
        };
        match at_snapshot() {
            Ok(image) => return Ok(self.attachment(image)),
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(target_error(e)),
        }
        // Available but not snapshotted yet (just made, or the daemon stopped first): the
        // snapshot is taken now, so that no reader holds the head that the next backup
        // of the series writes.
        {
            let lock = self.series_lock(&image_name);
            let _series = lock.lock();
            if self.snapshot_head(&image_name, backup_id)? {
                return at_snapshot()
                    .map(|image| self.attachment(image))
                    .map_err(target_error);
            }
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
    /// series image goes.
    fn remove_data(&self, backup_id: &BackupId) -> Result<()> {
        let image_name = match self.image_of(backup_id) {
            Some(name) => name,
            None => return Ok(()),
        };
        let lock = self.series_lock(&image_name);
        let _series = lock.lock();
        self.fence_other_writers(&image_name);
        let Some(image) = self.open_existing(&image_name)? else {
            self.members.lock().remove(backup_id.as_str());
            return Ok(());
        };
        let snapshot = snapshot_name(backup_id);
        if image.snapshot_exists(&snapshot).map_err(target_error)? {
            image.remove_snapshot(&snapshot).map_err(target_error)?;
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
    }

    fn data_ids(&self) -> Result<Vec<String>> {
        let mut ids: Vec<String> = self.members.lock().keys().cloned().collect();
        ids.sort();
        Ok(ids)
    }

    /// What the copy wrote for it (the record's `stored_bytes`): an RBD snapshot's own
    /// share of the data is only known by diffing it against its neighbours, and the
    /// mount asks for this at every `stat`.
    fn allocated(&self, backup_id: &BackupId) -> Result<u64> {
        Ok(self.catalogue.record(backup_id)?.stored_bytes)
    }

    fn free_space(&self) -> Result<Option<u64>> {
        pool_free_space(&self.connection, &self.spec.pool).map_err(target_error)
    }
}
