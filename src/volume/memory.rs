//! An in-memory volume driver for tests (`cfg(test)` or the `testing` feature): pools of
//! sparse [`MemDevice`]s with snapshots, clones and a storage-side change map, so the
//! engine's whole pipeline runs in milliseconds without root, loop devices or FUSE. It
//! fails on command (EIO on a read or a write, a removal refused) and can hold an
//! operation until released, to stop the engine at a chosen step. It never touches disk.

use super::device::memory::MemDevice;
use super::device::{BlockDevice, IoHints};
use super::{
    Access, Attachment, Capabilities, Result, VolumeDriver, VolumeError, VolumeInfo, snapnames,
};
use parking_lot::{Condvar, Mutex};
use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

const PAGE: u64 = 4096;
const NONE: u64 = u64::MAX;

/// Failures a pool's devices give on command (each a test's switch; EIO unless said).
#[derive(Default)]
pub struct Faults {
    /// A read of a range holding this offset fails (`u64::MAX`: none).
    read_error_at: AtomicU64Opt,
    /// A write of a range holding this offset fails.
    write_error_at: AtomicU64Opt,
    /// `delete_snapshot` fails.
    delete_snapshot_error: AtomicBool,
    /// `delete` fails.
    delete_error: AtomicBool,
}

/// An `Option<u64>` in an atomic (`u64::MAX` is None).
struct AtomicU64Opt(AtomicU64);

impl Default for AtomicU64Opt {
    fn default() -> Self {
        AtomicU64Opt(AtomicU64::new(NONE))
    }
}

impl AtomicU64Opt {
    fn set(&self, value: Option<u64>) {
        self.0.store(value.unwrap_or(NONE), Ordering::SeqCst);
    }

    fn hits(&self, range: &Range<u64>) -> bool {
        let at = self.0.load(Ordering::SeqCst);
        at != NONE && range.contains(&at)
    }
}

impl Faults {
    /// Reads of a range holding `offset` fail with EIO from now on (None: they work).
    pub fn fail_reads_at(&self, offset: Option<u64>) {
        self.read_error_at.set(offset);
    }

    /// Writes of a range holding `offset` fail with EIO from now on (None: they work).
    pub fn fail_writes_at(&self, offset: Option<u64>) {
        self.write_error_at.set(offset);
    }

    pub fn fail_delete_snapshot(&self, fail: bool) {
        self.delete_snapshot_error.store(fail, Ordering::SeqCst);
    }

    pub fn fail_delete(&self, fail: bool) {
        self.delete_error.store(fail, Ordering::SeqCst);
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// An operation held until the test lets it go: `reached` says it got there (the
/// engine is then stopped at that step, as a crash would find it), `release` lets it on.
#[derive(Default)]
pub struct Hold {
    state: Mutex<(bool, bool)>,
    changed: Condvar,
}

impl Hold {
    /// Waits until the held operation is reached; false after `timeout`.
    pub fn wait_reached(&self, timeout: Duration) -> bool {
        let mut state = self.state.lock();
        let deadline = std::time::Instant::now() + timeout;
        while !state.0 {
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                return state.0;
            }
        }
        true
    }

    pub fn release(&self) {
        self.state.lock().1 = true;
        self.changed.notify_all();
    }

    fn arrive(&self) {
        let mut state = self.state.lock();
        state.0 = true;
        self.changed.notify_all();
        while !state.1 {
            self.changed.wait(&mut state);
        }
    }
}

/// Where an operation can be held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldPoint {
    /// A read of a device of `pool` at or past `offset`.
    Read { pool: String, offset: u64 },
    /// `delete` of anything in `pool`.
    Delete { pool: String },
    /// `delete_snapshot` of a snapshot in `pool` (held before anything is removed).
    DeleteSnapshot { pool: String },
}

struct Stored {
    device: Arc<MemDevice>,
    mtime: Mutex<SystemTime>,
    created: SystemTime,
}

impl Stored {
    fn new(device: MemDevice) -> Arc<Stored> {
        let now = SystemTime::now();
        Arc::new(Stored {
            device: Arc::new(device),
            mtime: Mutex::new(now),
            created: now,
        })
    }

    /// A copy of its bytes and holes as they are now.
    fn copy(&self) -> MemDevice {
        let copy = MemDevice::new(0);
        *copy.data.lock() = self.device.data.lock().clone();
        *copy.pages.lock() = self.device.pages.lock().clone();
        copy
    }
}

#[derive(Default)]
struct Pool {
    volumes: BTreeMap<String, Arc<Stored>>,
    /// Snapshot name → (volume, its bytes when taken).
    snapshots: BTreeMap<String, (String, Arc<Stored>)>,
    /// Volume → why it is in use.
    in_use: BTreeMap<String, String>,
    faults: Arc<Faults>,
}

/// The in-memory driver. Pools exist once named (`pool`); every object of a pool is a
/// [`MemDevice`]. Snapshots and clones are copies; changes between two snapshots are
/// found by comparing their pages (exact, as a storage's own map would be at best).
pub struct MemDriver {
    pools: Mutex<BTreeMap<String, Pool>>,
    holds: Arc<Holds>,
    /// Whether pools can share data (`clone_volume`) and tell changes (`changed_extents`).
    shares_data: bool,
    free_space: Mutex<Option<u64>>,
}

impl MemDriver {
    /// A driver whose pools make snapshots, clones (incremental backups store only what
    /// changed) and tell what changed between two snapshots.
    pub fn new(pools: &[&str]) -> Arc<MemDriver> {
        Self::with_sharing(pools, true)
    }

    /// As [`new`](Self::new); `shares_data = false`: no clones, no change map.
    pub fn with_sharing(pools: &[&str], shares_data: bool) -> Arc<MemDriver> {
        Arc::new(MemDriver {
            pools: Mutex::new(
                pools
                    .iter()
                    .map(|name| (name.to_string(), Pool::default()))
                    .collect(),
            ),
            holds: Arc::default(),
            shares_data,
            free_space: Mutex::new(None),
        })
    }

    /// A driver holding a copy of everything this one holds now (volumes, snapshots),
    /// as storage would be found after a crash at this instant; faults and holds are not
    /// copied.
    pub fn fork(&self) -> Arc<MemDriver> {
        let pools = self.pools.lock();
        let copy = |stored: &Arc<Stored>| {
            let new = Stored::new(stored.copy());
            *new.mtime.lock() = *stored.mtime.lock();
            new
        };
        let forked = pools
            .iter()
            .map(|(name, pool)| {
                let volumes = pool
                    .volumes
                    .iter()
                    .map(|(id, stored)| (id.clone(), copy(stored)))
                    .collect();
                let snapshots = pool
                    .snapshots
                    .iter()
                    .map(|(name, (volume, stored))| (name.clone(), (volume.clone(), copy(stored))))
                    .collect();
                let pool = Pool {
                    volumes,
                    snapshots,
                    in_use: pool.in_use.clone(),
                    faults: Arc::default(),
                };
                (name.clone(), pool)
            })
            .collect();
        Arc::new(MemDriver {
            pools: Mutex::new(forked),
            holds: Arc::default(),
            shares_data: self.shares_data,
            free_space: Mutex::new(*self.free_space.lock()),
        })
    }

    /// The switches of `pool`'s failures.
    pub fn faults(&self, pool: &str) -> Arc<Faults> {
        self.pools
            .lock()
            .get(pool)
            .map(|p| p.faults.clone())
            .unwrap_or_default()
    }

    /// Holds the next operation at `point` until the returned hold is released.
    pub fn hold(&self, point: HoldPoint) -> Arc<Hold> {
        let hold = Arc::new(Hold::default());
        self.holds.0.lock().push((point, hold.clone()));
        hold
    }

    /// A volume holding `bytes` at `offset` of `size` (the rest holes).
    pub fn put_volume(&self, pool: &str, volume_id: &str, size: u64, writes: &[(u64, &[u8])]) {
        let device = MemDevice::new(size);
        for (offset, bytes) in writes {
            device.fill(*offset, bytes);
        }
        self.pools
            .lock()
            .entry(pool.to_string())
            .or_default()
            .volumes
            .insert(volume_id.to_string(), Stored::new(device));
    }

    /// Writes into a volume as a guest would (its mtime moves).
    pub fn write(&self, pool: &str, volume_id: &str, offset: u64, bytes: &[u8]) {
        let stored = self.stored(pool, volume_id).expect("no such volume");
        stored.device.fill(offset, bytes);
        *stored.mtime.lock() = SystemTime::now() + Duration::from_nanos(1);
    }

    /// Cuts a volume (or a backup's data) short, as a damaged store may hand it back.
    pub fn truncate(&self, pool: &str, name: &str, size: u64) {
        let stored = self.stored(pool, name).expect("no such volume");
        stored.device.data.lock().truncate(size as usize);
        stored
            .device
            .pages
            .lock()
            .truncate(size.div_ceil(PAGE) as usize);
    }

    /// The bytes of a volume (or a backup's data), None if there is none.
    pub fn contents(&self, pool: &str, name: &str) -> Option<Vec<u8>> {
        self.stored(pool, name).map(|s| s.device.contents())
    }

    /// The names of a pool's snapshots.
    pub fn snapshots(&self, pool: &str) -> Vec<String> {
        self.pools
            .lock()
            .get(pool)
            .map(|p| p.snapshots.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Marks a volume used (by a hypervisor, say) or not.
    pub fn set_in_use(&self, pool: &str, volume_id: &str, why: Option<&str>) {
        let mut pools = self.pools.lock();
        let pool = pools.entry(pool.to_string()).or_default();
        match why {
            Some(why) => pool.in_use.insert(volume_id.to_string(), why.to_string()),
            None => pool.in_use.remove(volume_id),
        };
    }

    /// Bytes free in every pool (None: unknown).
    pub fn set_free_space(&self, free: Option<u64>) {
        *self.free_space.lock() = free;
    }

    fn stored(&self, pool: &str, volume_id: &str) -> Option<Arc<Stored>> {
        self.pools.lock().get(pool)?.volumes.get(volume_id).cloned()
    }

    fn with_pool<T>(&self, pool: &str, f: impl FnOnce(&mut Pool) -> Result<T>) -> Result<T> {
        let mut pools = self.pools.lock();
        let pool = pools
            .get_mut(pool)
            .ok_or_else(|| VolumeError::NoPool(pool.to_string()))?;
        f(pool)
    }

    fn info(pool: &str, volume_id: &str, stored: &Stored) -> VolumeInfo {
        let pages = stored.device.pages.lock().iter().filter(|&&p| p).count() as u64;
        VolumeInfo {
            id: volume_id.to_string(),
            pool: pool.to_string(),
            size: stored.device.data.lock().len() as u64,
            allocated: pages * PAGE,
            mtime: *stored.mtime.lock(),
        }
    }

    fn attachment(
        &self,
        pool: &str,
        name: &str,
        stored: Arc<Stored>,
        writable: bool,
    ) -> Attachment {
        let faults = self.faults(pool);
        Attachment::new(MemVolume {
            name: format!("memory:{pool}/{name}"),
            pool: pool.to_string(),
            stored,
            faults,
            writable,
            holds: self.holds.clone(),
        })
    }
}

/// The operations held until released.
#[derive(Default)]
struct Holds(Mutex<Vec<(HoldPoint, Arc<Hold>)>>);

impl Holds {
    /// Holds the caller if an operation `at` is to be held (each hold once).
    fn pass(&self, at: impl Fn(&HoldPoint) -> bool) {
        let hold = {
            let mut holds = self.0.lock();
            let Some(i) = holds.iter().position(|(point, _)| at(point)) else {
                return;
            };
            holds.remove(i).1
        };
        hold.arrive();
    }
}

fn not_found(name: &str) -> VolumeError {
    VolumeError::NotFound(name.to_string())
}

impl VolumeDriver for MemDriver {
    fn list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        self.with_pool(pool, |p| {
            Ok(p.volumes
                .iter()
                .map(|(id, stored)| Self::info(pool, id, stored))
                .collect())
        })
    }

    fn stat(&self, pool: &str, volume_id: &str) -> Result<VolumeInfo> {
        self.with_pool(pool, |p| {
            let stored = p
                .volumes
                .get(volume_id)
                .ok_or_else(|| not_found(volume_id))?;
            Ok(Self::info(pool, volume_id, stored))
        })
    }

    fn create(&self, pool: &str, volume_id: &str, size: u64) -> Result<VolumeInfo> {
        self.with_pool(pool, |p| {
            if p.volumes.contains_key(volume_id) {
                return Err(VolumeError::Exists(volume_id.to_string()));
            }
            let stored = Stored::new(MemDevice::new(size));
            let info = Self::info(pool, volume_id, &stored);
            p.volumes.insert(volume_id.to_string(), stored);
            Ok(info)
        })
    }

    fn grow(&self, pool: &str, volume_id: &str, size: u64) -> Result<()> {
        let stored = self
            .stored(pool, volume_id)
            .ok_or_else(|| not_found(volume_id))?;
        stored
            .device
            .grow(size)
            .map_err(|e| VolumeError::io("grow", volume_id, e))
    }

    fn delete(&self, pool: &str, volume_id: &str) -> Result<()> {
        self.holds
            .pass(|at| matches!(at, HoldPoint::Delete { pool: p } if p == pool));
        self.with_pool(pool, |p| {
            if p.faults.delete_error.load(Ordering::SeqCst) {
                return Err(VolumeError::io("delete", volume_id, eio()));
            }
            p.volumes.remove(volume_id);
            Ok(())
        })
    }

    fn snapshot(&self, pool: &str, volume_id: &str, snapshot_name: &str) -> Result<()> {
        self.with_pool(pool, |p| {
            let stored = p
                .volumes
                .get(volume_id)
                .ok_or_else(|| not_found(volume_id))?;
            if p.snapshots.contains_key(snapshot_name) {
                return Err(VolumeError::Exists(snapshot_name.to_string()));
            }
            let copy = Stored::new(stored.copy());
            p.snapshots
                .insert(snapshot_name.to_string(), (volume_id.to_string(), copy));
            Ok(())
        })
    }

    fn delete_snapshot(&self, pool: &str, volume_id: &str, snapshot_name: &str) -> Result<()> {
        snapnames::refuse_foreign(snapshot_name)?;
        self.holds
            .pass(|at| matches!(at, HoldPoint::DeleteSnapshot { pool: p } if p == pool));
        self.with_pool(pool, |p| {
            if p.faults.delete_snapshot_error.load(Ordering::SeqCst) {
                return Err(VolumeError::io("delete snapshot", snapshot_name, eio()));
            }
            // Only a snapshot of the volume the caller names.
            if p.snapshots
                .get(snapshot_name)
                .is_some_and(|(of, _)| of == volume_id)
            {
                p.snapshots.remove(snapshot_name);
            }
            Ok(())
        })
    }

    fn attach(&self, pool: &str, volume_id: &str, access: Access) -> Result<Attachment> {
        let stored = self.with_pool(pool, |p| {
            if access == Access::Write
                && let Some(why) = p.in_use.get(volume_id)
            {
                return Err(VolumeError::Busy(why.clone()));
            }
            p.volumes
                .get(volume_id)
                .cloned()
                .ok_or_else(|| not_found(volume_id))
        })?;
        Ok(self.attachment(pool, volume_id, stored, access == Access::Write))
    }

    fn attach_snapshot(&self, pool: &str, snapshot_name: &str) -> Result<Attachment> {
        let stored = self.with_pool(pool, |p| {
            p.snapshots
                .get(snapshot_name)
                .map(|(_, stored)| stored.clone())
                .ok_or_else(|| not_found(snapshot_name))
        })?;
        Ok(self.attachment(pool, snapshot_name, stored, false))
    }

    fn in_use(&self, pool: &str, volume_id: &str) -> Result<Option<String>> {
        self.with_pool(pool, |p| Ok(p.in_use.get(volume_id).cloned()))
    }

    fn capabilities(&self, _pool: &str) -> Capabilities {
        Capabilities {
            snapshots: Ok(()),
            shares_data: self.shares_data,
        }
    }

    fn changed_extents(
        &self,
        pool: &str,
        from: &str,
        to: &str,
        range: Range<u64>,
    ) -> Result<Option<Vec<Range<u64>>>> {
        if !self.shares_data {
            return Ok(None);
        }
        let (from, to) = self.with_pool(pool, |p| {
            let get = |name: &str| {
                p.snapshots
                    .get(name)
                    .map(|(_, stored)| stored.device.contents())
                    .ok_or_else(|| not_found(name))
            };
            Ok((get(from)?, get(to)?))
        })?;
        let mut changed: Vec<Range<u64>> = Vec::new();
        let mut page = range.start / PAGE * PAGE;
        while page < range.end {
            let piece = page as usize..((page + PAGE).min(range.end) as usize);
            let old = from
                .get(piece.start..piece.end.min(from.len()))
                .unwrap_or(&[]);
            let new = to.get(piece.start..piece.end.min(to.len())).unwrap_or(&[]);
            if old != new {
                let piece = page.max(range.start)..(page + PAGE).min(range.end);
                match changed.last_mut() {
                    Some(last) if last.end == piece.start => last.end = piece.end,
                    _ => changed.push(piece),
                }
            }
            page += PAGE;
        }
        Ok(Some(changed))
    }

    fn clone_volume(
        &self,
        pool: &str,
        source_id: &str,
        new_id: &str,
    ) -> Result<Option<VolumeInfo>> {
        if !self.shares_data {
            return Ok(None);
        }
        self.with_pool(pool, |p| {
            let source = p
                .volumes
                .get(source_id)
                .ok_or_else(|| not_found(source_id))?;
            if p.volumes.contains_key(new_id) {
                return Err(VolumeError::Exists(new_id.to_string()));
            }
            let stored = Stored::new(source.copy());
            let info = Self::info(pool, new_id, &stored);
            p.volumes.insert(new_id.to_string(), stored);
            Ok(Some(info))
        })
    }

    fn created(&self, pool: &str, volume_id: &str) -> Result<Option<SystemTime>> {
        let stored = self
            .stored(pool, volume_id)
            .ok_or_else(|| not_found(volume_id))?;
        Ok(Some(stored.created))
    }

    fn free_space(&self, _pool: &str) -> Result<Option<u64>> {
        Ok(*self.free_space.lock())
    }
}

/// An attached volume, snapshot or backup: its stored bytes, with the pool's faults and
/// holds in front.
struct MemVolume {
    name: String,
    pool: String,
    stored: Arc<Stored>,
    faults: Arc<Faults>,
    writable: bool,
    holds: Arc<Holds>,
}

impl BlockDevice for MemVolume {
    fn describe(&self) -> String {
        self.name.clone()
    }

    fn size(&self) -> io::Result<u64> {
        self.stored.device.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let range = offset..offset + buf.len().max(1) as u64;
        self.holds.pass(|at| {
            matches!(at, HoldPoint::Read { pool, offset: from } if *pool == self.pool && range.end > *from)
        });
        if self.faults.read_error_at.hits(&range) {
            return Err(eio());
        }
        self.stored.device.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        if self
            .faults
            .write_error_at
            .hits(&(offset..offset + buf.len() as u64))
        {
            return Err(eio());
        }
        self.stored.device.write_at(buf, offset)?;
        *self.stored.mtime.lock() = SystemTime::now();
        Ok(())
    }

    fn grow(&self, size: u64) -> io::Result<()> {
        self.stored.device.grow(size)
    }

    fn flush(&self) -> io::Result<()> {
        self.stored.device.flush()
    }

    fn discard(&self, range: Range<u64>) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::from_raw_os_error(libc::EROFS));
        }
        self.stored.device.discard(range)
    }

    fn data_extents(&self, range: Range<u64>) -> io::Result<Vec<Range<u64>>> {
        self.stored.device.data_extents(range)
    }

    fn hints(&self) -> IoHints {
        self.stored.device.hints()
    }
}
