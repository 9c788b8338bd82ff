//! The `rbd` volume driver: a Cinder RBD backend's volumes are the images `volume-<id>`
//! of its pools, reached through librbd in this process. It only ever reads a volume
//! unless attached for a restore, and never removes a snapshot it did not make.

use super::client::{IoCtx, RbdError};
use super::connection::{self, Connection, PoolSpec};
use super::device::RbdDevice;
use crate::volume::{
    Access, Attachment, Capabilities, Result, VolumeDriver, VolumeError, VolumeInfo, is_valid_id,
};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::ops::{ControlFlow, Range};
use std::sync::Arc;

/// Cinder's RBD naming (`volume_name_template = volume-%s`).
const VOLUME_PREFIX: &str = "volume-";

fn image_name(volume_id: &str) -> String {
    format!("{VOLUME_PREFIX}{volume_id}")
}

/// A librbd failure as the volume layer's error (errno kept for the FUSE layer).
pub(crate) fn volume_error(e: RbdError) -> VolumeError {
    match e {
        RbdError::Ceph { op, what, errno } => {
            VolumeError::io(op, what, std::io::Error::from_raw_os_error(errno))
        }
        RbdError::Unavailable(load) => VolumeError::io(
            "load",
            load.library.clone(),
            std::io::Error::other(load.to_string()),
        ),
    }
}

/// Not found becomes `NotFound(what)`, anything else keeps its errno.
fn or_not_found(e: RbdError, what: &str) -> VolumeError {
    if e.is_not_found() {
        VolumeError::NotFound(what.to_string())
    } else {
        volume_error(e)
    }
}

/// What `stat` reads from an image: size, allocation (from the object map when it is
/// valid, else the size: librbd could only tell by asking every object), and librbd's
/// modify timestamp. That one is written lazily (at most once per
/// `rbd_mtime_update_interval`, 60 s): a write to an image untouched for longer moves
/// it, a second write within the minute may not. The header object's own mtime cannot
/// stand in: librbd also writes access times there, readers included.
fn stat_image(
    io: &IoCtx,
    pool: &str,
    volume_id: &str,
) -> std::result::Result<VolumeInfo, RbdError> {
    let image = io.open_image_read_only(&image_name(volume_id), None)?;
    let size = image.size()?;
    let allocated = if image.has_valid_fast_diff()? {
        image
            .extents(None, 0..size, true)?
            .iter()
            .filter(|e| e.exists)
            .map(|e| e.len)
            .sum::<u64>()
            .min(size)
    } else {
        size
    };
    let mtime = image.modify_time()?;
    Ok(VolumeInfo {
        id: volume_id.to_string(),
        pool: pool.to_string(),
        size,
        allocated,
        mtime,
    })
}

/// The images of `io` that are Cinder volumes, by volume id.
fn volume_ids(io: &IoCtx) -> std::result::Result<Vec<String>, RbdError> {
    Ok(io
        .list_images()?
        .into_iter()
        .filter_map(|name| {
            name.strip_prefix(VOLUME_PREFIX)
                .filter(|id| is_valid_id(id))
                .map(str::to_string)
        })
        .collect())
}

/// Watchers that are not one of this process's connections: a hypervisor, a mapping,
/// another backupfs.
fn foreign_watchers(image: &super::client::Image) -> std::result::Result<Option<String>, RbdError> {
    let ours = connection::our_instance_ids();
    let others: Vec<String> = image
        .watchers()?
        .into_iter()
        .filter(|w| !ours.contains(&w.client_id))
        .map(|w| format!("client.{} at {}", w.client_id, w.address))
        .collect();
    Ok((!others.is_empty()).then(|| format!("watched by {}", others.join(", "))))
}

pub struct RbdDriver {
    backend: String,
    connection: Arc<Connection>,
    /// The volume pools (a target's pool is the target's own business).
    pools: BTreeMap<String, (PoolSpec, IoCtx)>,
    /// (pool, snapshot name) → the image it belongs to, for the calls that name a
    /// snapshot only (attach, diff). Filled when a snapshot is made.
    snapshots: Mutex<HashMap<(String, String), String>>,
}

impl std::fmt::Debug for RbdDriver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RbdDriver")
            .field("backend", &self.backend)
            .field("connection", &self.connection)
            .finish()
    }
}

impl RbdDriver {
    /// Opens the volume pools of `backend` (name → spec) on `connection`.
    pub fn open(
        backend: &str,
        connection: Arc<Connection>,
        pools: &BTreeMap<String, PoolSpec>,
    ) -> Result<RbdDriver> {
        let mut opened = BTreeMap::new();
        for (name, spec) in pools {
            let io = spec.open(&connection).map_err(volume_error)?;
            opened.insert(name.clone(), (spec.clone(), io));
        }
        Ok(RbdDriver {
            backend: backend.to_string(),
            connection,
            pools: opened,
            snapshots: Mutex::new(HashMap::new()),
        })
    }

    fn io(&self, pool: &str) -> Result<&IoCtx> {
        self.pools
            .get(pool)
            .map(|(_, io)| io)
            .ok_or_else(|| VolumeError::NoPool(format!("{}.{pool}", self.backend)))
    }

    fn device(&self, image: super::client::Image) -> Attachment {
        Attachment::new(RbdDevice::new(image, self.connection.clone()))
    }

    /// The image a snapshot of ours belongs to, as remembered since it was made (the
    /// engine attaches and diffs only snapshots it has just made). Never found by asking
    /// every image for the name: a name read from a record must not reach another image.
    fn snapshot_image(&self, pool: &str, snapshot: &str) -> Option<String> {
        self.snapshots
            .lock()
            .get(&(pool.to_string(), snapshot.to_string()))
            .cloned()
    }
}

impl VolumeDriver for RbdDriver {
    fn list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let io = self.io(pool)?.clone();
        let pool_name = pool.to_string();
        self.connection
            .bounded(&format!("list {}", io.location()), move || {
                let mut volumes = Vec::new();
                for id in volume_ids(&io)? {
                    match stat_image(&io, &pool_name, &id) {
                        Ok(info) => volumes.push(info),
                        // Removed while listing.
                        Err(e) if e.is_not_found() => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(volumes)
            })
            .map_err(volume_error)
    }

    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo> {
        let io = self.io(pool)?.clone();
        let (pool_name, id) = (pool.to_string(), volume_id.to_string());
        self.connection
            .bounded(
                &format!("stat {}/{}", io.location(), image_name(volume_id)),
                move || stat_image(&io, &pool_name, &id),
            )
            .map_err(|e| or_not_found(e, volume_id))
    }

    /// A new image with the cluster's default features and 4 MiB objects, as Cinder's
    /// RBD driver makes them.
    fn create(&self, pool: &str, volume_id: &str, size: u64) -> Result<VolumeInfo> {
        let io = self.io(pool)?;
        io.create_image(
            &image_name(volume_id),
            size,
            &super::client::ImageOptions::default(),
        )
        .map_err(|e| {
            if e.is_exists() {
                VolumeError::Exists(volume_id.to_string())
            } else {
                volume_error(e)
            }
        })?;
        stat_image(io, pool, volume_id).map_err(|e| or_not_found(e, volume_id))
    }

    fn grow(&self, pool: &str, volume_id: &str, size: u64) -> Result<()> {
        let image = self
            .io(pool)?
            .open_image(&image_name(volume_id))
            .map_err(|e| or_not_found(e, volume_id))?;
        if size > image.size().map_err(volume_error)? {
            image.resize(size).map_err(volume_error)?;
        }
        Ok(())
    }

    fn delete(&self, pool: &str, volume_id: &str) -> Result<()> {
        match self.io(pool)?.remove_image(&image_name(volume_id)) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) if e.is_busy() => Err(VolumeError::Busy(format!(
                "volume {volume_id} is open elsewhere or has snapshots: {e}"
            ))),
            Err(e) => Err(volume_error(e)),
        }
    }

    /// librbd's create timestamp of the image.
    fn created(&self, pool: &str, volume_id: &str) -> Result<Option<std::time::SystemTime>> {
        let io = self.io(pool)?.clone();
        let name = image_name(volume_id);
        self.connection
            .bounded(&format!("created {}/{name}", io.location()), move || {
                io.open_image_read_only(&name, None)?.create_time()
            })
            .map(Some)
            .map_err(|e| or_not_found(e, volume_id))
    }

    /// An RBD snapshot of the image (librbd asks the exclusive lock's owner, e.g. QEMU,
    /// to make it: crash-consistent while the VM runs).
    fn snapshot(&self, pool: &str, volume_id: &str, snapshot_name: &str) -> Result<()> {
        let name = image_name(volume_id);
        let image = self
            .io(pool)?
            .open_image(&name)
            .map_err(|e| or_not_found(e, volume_id))?;
        image.create_snapshot(snapshot_name).map_err(volume_error)?;
        self.snapshots
            .lock()
            .insert((pool.to_string(), snapshot_name.to_string()), name);
        Ok(())
    }

    /// Only on the image of the volume the record names, and only a name of ours.
    fn delete_snapshot(&self, pool: &str, volume_id: &str, snapshot_name: &str) -> Result<()> {
        crate::volume::snapnames::refuse_foreign(snapshot_name)?;
        let forget = || {
            self.snapshots
                .lock()
                .remove(&(pool.to_string(), snapshot_name.to_string()));
        };
        // The volume is gone (Cinder's delete removes our snapshots with it).
        let image = match self.io(pool)?.open_image(&image_name(volume_id)) {
            Ok(image) => image,
            Err(e) if e.is_not_found() => {
                forget();
                return Ok(());
            }
            Err(e) => return Err(volume_error(e)),
        };
        match image.remove_snapshot(snapshot_name) {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(volume_error(e)),
        }
        forget();
        Ok(())
    }

    /// Reads open the image read-only (no watch: other clients do not see backupfs). A
    /// restore opens it for writing, refuses it while another client watches it, and
    /// then keeps its exclusive lock: a hypervisor that starts meanwhile cannot write
    /// it (librbd answers its writes EROFS) until the restore ends.
    fn attach(&self, pool: &str, volume_id: &str, access: Access) -> Result<Attachment> {
        let io = self.io(pool)?;
        let name = image_name(volume_id);
        if access != Access::Write {
            let image = io
                .open_image_read_only(&name, None)
                .map_err(|e| or_not_found(e, volume_id))?;
            return Ok(self.device(image));
        }
        let image = io
            .open_image(&name)
            .map_err(|e| or_not_found(e, volume_id))?;
        if let Some(why) = foreign_watchers(&image).map_err(volume_error)? {
            return Err(VolumeError::Busy(why));
        }
        // Only after the check: taking the lock from a running VM would break it.
        let features = image.features().map_err(volume_error)?;
        if features & super::client::FEATURE_EXCLUSIVE_LOCK != 0 {
            image.acquire_exclusive_lock().map_err(|e| {
                if matches!(e.errno(), libc::EBUSY | libc::EROFS | libc::EAGAIN) {
                    VolumeError::Busy(format!("another client keeps its exclusive lock: {e}"))
                } else {
                    volume_error(e)
                }
            })?;
        }
        if let Some(why) = foreign_watchers(&image).map_err(volume_error)? {
            let _ = image.release_lock();
            return Err(VolumeError::Busy(why));
        }
        Ok(self.device(image))
    }

    fn attach_snapshot(&self, pool: &str, snapshot_name: &str) -> Result<Attachment> {
        let name = self
            .snapshot_image(pool, snapshot_name)
            .ok_or_else(|| VolumeError::NotFound(snapshot_name.to_string()))?;
        let image = self
            .io(pool)?
            .open_image_read_only(&name, Some(snapshot_name))
            .map_err(|e| or_not_found(e, snapshot_name))?;
        Ok(self.device(image))
    }

    /// In-use = a watcher other than backupfs: QEMU holds one while a VM has the volume
    /// attached (`rbd status` lists them). A client that died keeps its watch for
    /// `osd_client_watch_timeout` (30 s).
    fn in_use(&self, pool: &str, volume_id: &str) -> Result<Option<String>> {
        let io = self.io(pool)?.clone();
        let name = image_name(volume_id);
        self.connection
            .bounded(&format!("status {}/{name}", io.location()), move || {
                foreign_watchers(&io.open_image_read_only(&name, None)?)
            })
            .map_err(|e| or_not_found(e, volume_id))
    }

    /// `backup.<backup-id>.snap.<unix-seconds>`: Cinder's RBD driver removes snapshots of
    /// that form before it deletes a volume, so a volume backupfs keeps a base on is still
    /// deleted whole (any other snapshot sends it to the RBD trash, its data kept).
    fn snapshot_name(&self, backup_id: &str) -> String {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        crate::volume::snapnames::cinder_style(backup_id, seconds)
    }

    fn capabilities(&self, _pool: &str) -> Capabilities {
        Capabilities {
            snapshots: Ok(()),
            // The RBD target shares data between backups with snapshots of its own
            // images; volumes are not cloned.
            shares_data: false,
        }
    }

    /// Exact: librbd's diff between the snapshots. Where fast-diff is valid the object
    /// maps say which objects changed first, and only those are asked for their exact
    /// extents; discarded ranges count as changed.
    fn changed_extents(
        &self,
        pool: &str,
        from: &str,
        to: &str,
        range: Range<u64>,
    ) -> Result<Option<Vec<Range<u64>>>> {
        let name = self
            .snapshot_image(pool, to)
            .ok_or_else(|| VolumeError::NotFound(to.to_string()))?;
        let image = self
            .io(pool)?
            .open_image_read_only(&name, Some(to))
            .map_err(|e| or_not_found(e, to))?;
        let coarse = if image.has_valid_fast_diff().map_err(volume_error)? {
            image
                .extents(Some(from), range.clone(), true)
                .map_err(|e| or_not_found(e, from))?
                .into_iter()
                .map(|e| e.offset..e.offset + e.len)
                .collect()
        } else {
            vec![range.clone()]
        };
        let mut changed: Vec<Range<u64>> = Vec::new();
        for piece in coarse {
            let piece = piece.start.max(range.start)..piece.end.min(range.end);
            if piece.is_empty() {
                continue;
            }
            image
                .diff_iterate(Some(from), piece, true, false, |extent| {
                    let found = extent.offset..extent.offset + extent.len;
                    match changed.last_mut() {
                        Some(last) if last.end >= found.start => last.end = last.end.max(found.end),
                        _ => changed.push(found),
                    }
                    ControlFlow::Continue(())
                })
                .map_err(|e| or_not_found(e, from))?;
        }
        Ok(Some(changed))
    }

    fn free_space(&self, pool: &str) -> Result<Option<u64>> {
        let (spec, _) = self
            .pools
            .get(pool)
            .ok_or_else(|| VolumeError::NoPool(format!("{}.{pool}", self.backend)))?;
        pool_free_space(&self.connection, &spec.pool).map_err(volume_error)
    }
}

/// What the cluster says can still be written into `pool` (`ceph df`'s MAX AVAIL,
/// which counts replication and the fullest OSD); None when it does not say.
pub(crate) fn pool_free_space(
    connection: &Arc<Connection>,
    pool: &str,
) -> std::result::Result<Option<u64>, RbdError> {
    let cluster = connection.cluster.clone();
    let output = connection.bounded("ceph df", move || {
        cluster.mon_command(r#"{"prefix": "df", "format": "json"}"#)
    })?;
    let Ok(df) = serde_json::from_slice::<serde_json::Value>(&output) else {
        return Ok(None);
    };
    Ok(df["pools"]
        .as_array()
        .and_then(|pools| pools.iter().find(|p| p["name"] == pool))
        .and_then(|p| p["stats"]["max_avail"].as_u64()))
}
