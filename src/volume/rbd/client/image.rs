//! An open RBD image (head or snapshot): size, plain reads and writes, extents from
//! librbd's diff, snapshots, watchers, metadata, deep copies. It never closes the image
//! while a request of its own is in flight, nor hands out librbd's memory.

use super::callback::{CallbackState, diff_callback, progress_callback};
use super::ffi::{self, Api};
use super::ioctx::{ImageOptions, ImageStat, IoCtx, OptionsHandle};
use super::{
    FEATURE_FAST_DIFF, FLAG_FAST_DIFF_INVALID, FLAG_OBJECT_MAP_INVALID, RbdError, Result, c_string,
    check, owned_string,
};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void};
use std::ops::{ControlFlow, Range};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One of an image's snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub id: u64,
    pub name: String,
    pub size: u64,
}

/// A client watching an image (QEMU while a VM uses it, `rbd watch`, any open of the
/// image for writing, ours included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watcher {
    pub address: String,
    /// The client's global id: `client.<id>` in `rbd status`.
    pub client_id: u64,
    pub cookie: u64,
}

/// A range of an image, and whether it holds data (false: known to read as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub exists: bool,
}

/// An open RBD image (head or snapshot), closed on drop.
pub struct Image {
    pub(super) handle: ffi::ImageHandle,
    ioctx: IoCtx,
    name: String,
    snapshot: Option<String>,
    read_only: bool,
}

// SAFETY: librbd serialises operations on an image handle internally (QEMU and rbd-nbd
// submit I/O on one image from several threads); the handle is closed only in Drop,
// which has it exclusively.
unsafe impl Send for Image {}
// SAFETY: as above.
unsafe impl Sync for Image {}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open*, closed exactly once; no AioQueue can outlive the
        // borrow of this image and a PendingWrite holds an Arc of it, so no request is
        // in flight.
        let rc = unsafe { (self.api().rbd_close)(self.handle) };
        if rc < 0 {
            tracing::warn!(
                "close {}: {}",
                self.describe(),
                std::io::Error::from_raw_os_error(-rc)
            );
        }
    }
}
impl Image {
    /// Takes charge of a handle `rbd_open*` returned: closed when the image is dropped.
    pub(super) fn opened(
        handle: ffi::ImageHandle,
        ioctx: IoCtx,
        name: &str,
        snapshot: Option<&str>,
        read_only: bool,
    ) -> Image {
        Image {
            handle,
            ioctx,
            name: name.to_string(),
            snapshot: snapshot.map(str::to_string),
            read_only,
        }
    }

    pub(super) fn api(&self) -> &'static Api {
        self.ioctx.api()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The snapshot this image was opened at (None: the head).
    pub fn snapshot(&self) -> Option<&str> {
        self.snapshot.as_deref()
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn ioctx(&self) -> &IoCtx {
        &self.ioctx
    }

    /// `pool[/namespace]/name[@snapshot]`, for messages.
    pub fn describe(&self) -> String {
        match &self.snapshot {
            Some(snapshot) => format!("{}@{snapshot}", self.ioctx.path(&self.name)),
            None => self.ioctx.path(&self.name),
        }
    }

    fn check(&self, rc: i64, op: &'static str) -> Result<u64> {
        check(rc, op, || self.describe())
    }

    pub fn size(&self) -> Result<u64> {
        let mut size = 0u64;
        // SAFETY: valid image; writes one u64.
        let rc = unsafe { (self.api().rbd_get_size)(self.handle, &mut size) };
        self.check(rc.into(), "get size")?;
        Ok(size)
    }

    pub fn stat(&self) -> Result<ImageStat> {
        // SAFETY: ImageInfo is plain old data; all-zero is a valid value.
        let mut info: ffi::ImageInfo = unsafe { std::mem::zeroed() };
        // SAFETY: valid image; librbd writes at most size_of::<ImageInfo>() bytes.
        let rc = unsafe {
            (self.api().rbd_stat)(
                self.handle,
                &mut info,
                std::mem::size_of::<ffi::ImageInfo>(),
            )
        };
        self.check(rc.into(), "stat")?;
        Ok(ImageStat {
            size: info.size,
            object_size: info.obj_size,
            objects: info.num_objs,
            order: info.order.clamp(0, 63) as u8,
        })
    }

    /// Feature bits (`FEATURE_*`).
    pub fn features(&self) -> Result<u64> {
        let mut features = 0u64;
        // SAFETY: valid image; writes one u64.
        let rc = unsafe { (self.api().rbd_get_features)(self.handle, &mut features) };
        self.check(rc.into(), "get features")?;
        Ok(features)
    }

    /// Image flags (`FLAG_*`).
    pub fn flags(&self) -> Result<u64> {
        let mut flags = 0u64;
        // SAFETY: valid image; writes one u64.
        let rc = unsafe { (self.api().rbd_get_flags)(self.handle, &mut flags) };
        self.check(rc.into(), "get flags")?;
        Ok(flags)
    }

    /// Whether `diff_iterate` with `whole_object` is answered from the object map (no
    /// per-object requests): fast-diff enabled and not flagged invalid.
    pub fn has_valid_fast_diff(&self) -> Result<bool> {
        Ok(self.features()? & FEATURE_FAST_DIFF != 0
            && self.flags()? & (FLAG_FAST_DIFF_INVALID | FLAG_OBJECT_MAP_INVALID) == 0)
    }

    /// The image's id (what its RADOS objects are named after: `rbd_header.<id>`).
    pub fn id(&self) -> Result<String> {
        let mut buf = vec![0 as c_char; 128];
        // SAFETY: valid image; the buffer is writable for its length, librbd
        // NUL-terminates.
        let rc = unsafe { (self.api().rbd_get_id)(self.handle, buf.as_mut_ptr(), buf.len()) };
        self.check(rc.into(), "get id")?;
        // SAFETY: NUL-terminated within the buffer.
        Ok(unsafe { owned_string(buf.as_ptr()) })
    }

    /// librbd's modification time of the image. librbd updates it lazily (at most once
    /// per `rbd_mtime_update_interval`, 60 s by default), so it may lag a write.
    pub fn modify_time(&self) -> Result<SystemTime> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid image; writes one timespec.
        let rc = unsafe { (self.api().rbd_get_modify_timestamp)(self.handle, &mut ts) };
        self.check(rc.into(), "get modify timestamp")?;
        Ok(UNIX_EPOCH
            + Duration::from_secs(ts.tv_sec.max(0) as u64)
            + Duration::from_nanos(ts.tv_nsec.clamp(0, 999_999_999) as u64))
    }

    /// When the image was created (by the creating client's clock).
    pub fn create_time(&self) -> Result<SystemTime> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid image; writes one timespec.
        let rc = unsafe { (self.api().rbd_get_create_timestamp)(self.handle, &mut ts) };
        self.check(rc.into(), "get create timestamp")?;
        Ok(UNIX_EPOCH
            + Duration::from_secs(ts.tv_sec.max(0) as u64)
            + Duration::from_nanos(ts.tv_nsec.clamp(0, 999_999_999) as u64))
    }

    /// Takes the image's exclusive lock and keeps it: unlike the lock librbd takes by
    /// itself for a write, this one is not handed over when another client asks for it
    /// (its writes fail instead), until [`release_lock`](Self::release_lock) or close.
    /// `EINVAL` when the image has no exclusive-lock feature; `EBUSY`/`EROFS` when
    /// another client owns the lock and keeps it.
    pub fn acquire_exclusive_lock(&self) -> Result<()> {
        // SAFETY: valid image.
        let rc =
            unsafe { (self.api().rbd_lock_acquire)(self.handle, ffi::RBD_LOCK_MODE_EXCLUSIVE) };
        self.check(rc.into(), "acquire exclusive lock").map(|_| ())
    }

    pub fn release_lock(&self) -> Result<()> {
        // SAFETY: valid image.
        let rc = unsafe { (self.api().rbd_lock_release)(self.handle) };
        self.check(rc.into(), "release exclusive lock").map(|_| ())
    }

    /// The clients that own the image's exclusive lock (`client.<id> ...` strings, as
    /// librbd names them); empty when nobody does.
    pub fn lock_owners(&self) -> Result<Vec<String>> {
        let mut capacity = 4usize;
        loop {
            let mut mode: c_int = 0;
            let mut owners: Vec<*mut c_char> = vec![std::ptr::null_mut(); capacity];
            let mut count = capacity;
            // SAFETY: room for `count` pointers; librbd fills them with strings it
            // allocates, freed by the cleanup call below.
            let rc = unsafe {
                (self.api().rbd_lock_get_owners)(
                    self.handle,
                    &mut mode,
                    owners.as_mut_ptr(),
                    &mut count,
                )
            };
            if rc == -libc::ERANGE {
                capacity = count.max(capacity * 2);
                continue;
            }
            if rc == -libc::ENOENT {
                return Ok(Vec::new());
            }
            self.check(rc.into(), "get lock owners")?;
            let count = count.min(capacity);
            let names = owners[..count]
                .iter()
                // SAFETY: NUL-terminated strings librbd allocated, valid until cleanup.
                .map(|&owner| unsafe { owned_string(owner) })
                .collect();
            // SAFETY: frees exactly what rbd_lock_get_owners allocated, once.
            unsafe { (self.api().rbd_lock_get_owners_cleanup)(owners.as_mut_ptr(), count) };
            return Ok(names);
        }
    }

    /// Breaks the exclusive lock of `owner` (from [`lock_owners`](Self::lock_owners)),
    /// which also blocklists that client (`rbd_blocklist_on_break_lock`), so that the
    /// OSDs drop its watches at once: for a client known to be dead or fenced off.
    pub fn break_lock(&self, owner: &str) -> Result<()> {
        let c_owner = c_string("break lock", owner)?;
        // SAFETY: valid image and owner string.
        let rc = unsafe {
            (self.api().rbd_lock_break)(self.handle, ffi::RBD_LOCK_MODE_EXCLUSIVE, c_owner.as_ptr())
        };
        check(rc.into(), "break lock", || {
            format!("{} owned by {owner}", self.describe())
        })
        .map(|_| ())
    }

    /// Makes the head read exactly as snapshot `name` (and its size). librbd does it
    /// object by object inside the cluster: the time grows with the image's object count.
    pub fn rollback_to_snapshot(&self, name: &str) -> Result<()> {
        let c_name = c_string("roll back to snapshot", name)?;
        // SAFETY: valid image and name.
        let rc = unsafe { (self.api().rbd_snap_rollback)(self.handle, c_name.as_ptr()) };
        check(rc.into(), "roll back to snapshot", || {
            format!("{}@{name}", self.describe())
        })
        .map(|_| ())
    }

    /// Changes the size. librbd is told never to shrink (`EINVAL` if `size` is smaller);
    /// growing is the caller's only use.
    pub fn resize(&self, size: u64) -> Result<()> {
        // SAFETY: valid image; no progress callback.
        let rc = unsafe {
            (self.api().rbd_resize2)(self.handle, size, false, None, std::ptr::null_mut())
        };
        self.check(rc.into(), "resize").map(|_| ())
    }

    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the image.
    /// Holes read as zeros. `EINVAL` when `offset` is past the end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        // SAFETY: valid image; the buffer is writable for its length.
        let rc = unsafe {
            (self.api().rbd_read)(self.handle, offset, buf.len(), buf.as_mut_ptr().cast())
        };
        self.check(rc as i64, "read").map(|n| n as usize)
    }

    /// Writes all of `buf` at `offset`; `EINVAL` past the end (images do not grow by
    /// writing: `resize` first).
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = &buf[done..];
            // SAFETY: valid image; the buffer is readable for its length.
            let rc = unsafe {
                (self.api().rbd_write)(
                    self.handle,
                    offset + done as u64,
                    rest.len(),
                    rest.as_ptr().cast(),
                )
            };
            let n = self.check(rc as i64, "write")? as usize;
            if n == 0 {
                return Err(RbdError::ceph("write", self.describe(), libc::EIO));
            }
            done += n;
        }
        Ok(())
    }

    /// Releases the range: whole objects are deleted, parts of objects zeroed or
    /// truncated; reads give zeros afterwards.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // SAFETY: valid image.
        let rc = unsafe { (self.api().rbd_discard)(self.handle, offset, len) };
        self.check(rc.into(), "discard").map(|_| ())
    }

    /// Zeroes the range (thin: like discard, but guaranteed to read as zeros even where
    /// a discard would leave a partial object alone).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        // librbd takes a size_t length: split huge ranges.
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(1 << 30) as usize;
            // SAFETY: valid image; no flags.
            let rc = unsafe { (self.api().rbd_write_zeroes)(self.handle, offset + done, n, 0, 0) };
            self.check(rc as i64, "write zeroes")?;
            done += n as u64;
        }
        Ok(())
    }

    /// Makes everything written so far durable in the cluster.
    pub fn flush(&self) -> Result<()> {
        // SAFETY: valid image.
        let rc = unsafe { (self.api().rbd_flush)(self.handle) };
        self.check(rc.into(), "flush").map(|_| ())
    }

    /// Calls `callback` for each changed (or, without `from_snapshot`, allocated) range
    /// within `range`, in order, between `from_snapshot` and the version this image was
    /// opened at. `exists == false` marks a range known to read as zeros now (discarded
    /// since the snapshot). `whole_object` reports whole objects and, with a valid
    /// fast-diff, is answered from the object map alone; without it ranges are exact
    /// but every object is asked. `include_parent` also reports data a clone shares
    /// with its parent. The callback may stop early with `ControlFlow::Break`.
    /// Without `from_snapshot`, RADOS knows no holes inside an object: an object with
    /// data is reported from its start to its size, even if written only in the middle.
    pub fn diff_iterate<F>(
        &self,
        from_snapshot: Option<&str>,
        range: Range<u64>,
        include_parent: bool,
        whole_object: bool,
        callback: F,
    ) -> Result<()>
    where
        F: FnMut(Extent) -> ControlFlow<()> + Send,
    {
        // librbd asserts (aborting the process) when a fast-diff range reaches past
        // the image's end, or is empty: clamp it to the version opened here.
        let range = range.start..range.end.min(self.size()?);
        if range.is_empty() {
            return Ok(());
        }
        let c_from = from_snapshot.map(|s| c_string("diff", s)).transpose()?;
        let from_ptr = c_from.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let state = CallbackState::new(callback);
        // SAFETY: valid image; `state` outlives the call and the callback matches F;
        // librbd calls it only before rbd_diff_iterate2 returns.
        let rc = unsafe {
            (self.api().rbd_diff_iterate2)(
                self.handle,
                from_ptr,
                range.start,
                range.end.saturating_sub(range.start),
                include_parent as u8,
                whole_object as u8,
                Some(diff_callback::<F>),
                &state as *const CallbackState<F> as *mut c_void,
            )
        };
        state.finish(rc, "diff", || self.describe())
    }

    /// All of `diff_iterate`'s extents, merged where adjacent with the same `exists`.
    pub fn extents(
        &self,
        from_snapshot: Option<&str>,
        range: Range<u64>,
        whole_object: bool,
    ) -> Result<Vec<Extent>> {
        let mut extents = Vec::new();
        self.diff_iterate(from_snapshot, range, true, whole_object, |extent| {
            push_merged(&mut extents, extent);
            ControlFlow::Continue(())
        })?;
        Ok(extents)
    }

    // ---- snapshots

    /// Makes a snapshot of the head. Works while another client (QEMU) holds the
    /// exclusive lock: librbd asks the owner to make it.
    pub fn create_snapshot(&self, name: &str) -> Result<()> {
        let c_name = c_string("create snapshot", name)?;
        // SAFETY: valid image and name.
        let rc = unsafe { (self.api().rbd_snap_create)(self.handle, c_name.as_ptr()) };
        check(rc.into(), "create snapshot", || {
            format!("{}@{name}", self.describe())
        })
        .map(|_| ())
    }

    /// Removes a snapshot; `ENOENT` when it is gone.
    pub fn remove_snapshot(&self, name: &str) -> Result<()> {
        let c_name = c_string("remove snapshot", name)?;
        // SAFETY: valid image and name.
        let rc = unsafe { (self.api().rbd_snap_remove)(self.handle, c_name.as_ptr()) };
        check(rc.into(), "remove snapshot", || {
            format!("{}@{name}", self.describe())
        })
        .map(|_| ())
    }

    pub fn snapshot_exists(&self, name: &str) -> Result<bool> {
        let c_name = c_string("look up snapshot", name)?;
        let mut exists = false;
        // SAFETY: valid image and name; writes one bool.
        let rc = unsafe { (self.api().rbd_snap_exists)(self.handle, c_name.as_ptr(), &mut exists) };
        self.check(rc.into(), "look up snapshot")?;
        Ok(exists)
    }

    /// The image's snapshots, oldest first.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let mut capacity: c_int = 16;
        loop {
            let mut infos: Vec<ffi::SnapInfo> = Vec::with_capacity(capacity as usize);
            let mut max = capacity;
            // SAFETY: room for `max` entries (librbd needs one more than the count for
            // its end marker, and says so with ERANGE); names freed by snap_list_end.
            let rc =
                unsafe { (self.api().rbd_snap_list)(self.handle, infos.as_mut_ptr(), &mut max) };
            if rc == -libc::ERANGE {
                capacity = max.max(capacity * 2);
                continue;
            }
            let count = self.check(rc.into(), "list snapshots")? as usize;
            // SAFETY: librbd initialised `count` entries (plus the end marker).
            unsafe { infos.set_len(count) };
            let snapshots = infos
                .iter()
                .map(|info| Snapshot {
                    id: info.id,
                    // SAFETY: NUL-terminated names owned by the list until list_end.
                    name: unsafe { owned_string(info.name) },
                    size: info.size,
                })
                .collect();
            // SAFETY: frees the names of a successful rbd_snap_list, once.
            unsafe { (self.api().rbd_snap_list_end)(infos.as_mut_ptr()) };
            return Ok(snapshots);
        }
    }

    // ---- watchers

    /// Every client watching the image, this connection included when it has the
    /// image open for writing.
    pub fn watchers(&self) -> Result<Vec<Watcher>> {
        let mut capacity = 8usize;
        loop {
            let mut list: Vec<ffi::ImageWatcher> = Vec::with_capacity(capacity);
            let mut count = capacity;
            // SAFETY: room for `count` entries; addresses freed by the cleanup below.
            let rc = unsafe {
                (self.api().rbd_watchers_list)(self.handle, list.as_mut_ptr(), &mut count)
            };
            if rc == -libc::ERANGE {
                capacity = count.max(capacity * 2);
                continue;
            }
            self.check(rc.into(), "list watchers")?;
            // SAFETY: librbd initialised `count` (<= capacity) entries.
            unsafe { list.set_len(count) };
            let watchers = list
                .iter()
                .map(|w| Watcher {
                    // SAFETY: NUL-terminated address owned by the list until cleanup.
                    address: unsafe { owned_string(w.addr) },
                    client_id: w.id as u64,
                    cookie: w.cookie,
                })
                .collect();
            // SAFETY: frees what rbd_watchers_list allocated, once.
            unsafe { (self.api().rbd_watchers_list_cleanup)(list.as_mut_ptr(), count) };
            return Ok(watchers);
        }
    }

    /// Watchers other than this connection: someone else has the image open (QEMU, a
    /// mapping, another backupfs, or another `Cluster` of this very process). A client
    /// that died keeps its watch until the OSD times it out (`osd_client_watch_timeout`,
    /// 30 s): after a crash, backupfs' own old watch shows here for that long.
    pub fn foreign_watchers(&self) -> Result<Vec<Watcher>> {
        let ours = self.ioctx.cluster().instance_id();
        let mut watchers = self.watchers()?;
        watchers.retain(|w| w.client_id != ours);
        Ok(watchers)
    }

    // ---- image metadata (key/value pairs kept in the image header)

    pub fn metadata_get(&self, key: &str) -> Result<Option<String>> {
        let c_key = c_string("get metadata", key)?;
        let mut capacity = 256usize;
        loop {
            let mut buf = vec![0 as c_char; capacity];
            let mut len = capacity;
            // SAFETY: valid image; the buffer is writable for `len` bytes.
            let rc = unsafe {
                (self.api().rbd_metadata_get)(
                    self.handle,
                    c_key.as_ptr(),
                    buf.as_mut_ptr(),
                    &mut len,
                )
            };
            match rc {
                rc if rc == -libc::ERANGE => capacity = len.max(capacity * 2),
                rc if rc == -libc::ENOENT => return Ok(None),
                rc => {
                    check(rc.into(), "get metadata", || {
                        format!("{} key {key}", self.describe())
                    })?;
                    // SAFETY: NUL-terminated by librbd within the buffer.
                    return Ok(Some(unsafe { owned_string(buf.as_ptr()) }));
                }
            }
        }
    }

    pub fn metadata_set(&self, key: &str, value: &str) -> Result<()> {
        let c_key = c_string("set metadata", key)?;
        let c_value = c_string("set metadata", value)?;
        // SAFETY: valid image and strings.
        let rc =
            unsafe { (self.api().rbd_metadata_set)(self.handle, c_key.as_ptr(), c_value.as_ptr()) };
        check(rc.into(), "set metadata", || {
            format!("{} key {key}", self.describe())
        })
        .map(|_| ())
    }

    /// Removes a key; `ENOENT` when there is none.
    pub fn metadata_remove(&self, key: &str) -> Result<()> {
        let c_key = c_string("remove metadata", key)?;
        // SAFETY: valid image and key.
        let rc = unsafe { (self.api().rbd_metadata_remove)(self.handle, c_key.as_ptr()) };
        check(rc.into(), "remove metadata", || {
            format!("{} key {key}", self.describe())
        })
        .map(|_| ())
    }

    /// Every key and value. librbd also keeps its own per-image configuration here,
    /// under keys starting with `conf_`.
    pub fn metadata_list(&self) -> Result<BTreeMap<String, String>> {
        let (mut keys_cap, mut values_cap) = (4096usize, 4096usize);
        loop {
            let mut keys = vec![0 as c_char; keys_cap];
            let mut values = vec![0 as c_char; values_cap];
            let (mut keys_len, mut values_len) = (keys_cap, values_cap);
            // SAFETY: valid image; both buffers writable for their stated lengths; an
            // empty start key and max 0 ask for everything.
            let rc = unsafe {
                (self.api().rbd_metadata_list)(
                    self.handle,
                    c"".as_ptr(),
                    0,
                    keys.as_mut_ptr(),
                    &mut keys_len,
                    values.as_mut_ptr(),
                    &mut values_len,
                )
            };
            if rc == -libc::ERANGE {
                keys_cap = keys_len.max(keys_cap * 2);
                values_cap = values_len.max(values_cap * 2);
                continue;
            }
            self.check(rc.into(), "list metadata")?;
            // Both buffers are `entry\0entry\0...`; values may be empty, keys never.
            let split = |buf: &[c_char], len: usize| -> Vec<String> {
                let bytes: Vec<u8> = buf[..len.min(buf.len())].iter().map(|&c| c as u8).collect();
                let mut parts: Vec<String> = bytes
                    .split(|&b| b == 0)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect();
                // What follows the last NUL is not an entry.
                parts.pop();
                parts
            };
            let keys = split(&keys, keys_len);
            let values = split(&values, values_len);
            return Ok(pair_metadata(keys, values));
        }
    }

    /// Copies this image (at the version it was opened at) and its snapshots up to that
    /// version to a new image `dest_name` in `dest`, inside the cluster (no data passes
    /// through this process). `progress(done, total)` is called as it goes. The copy of
    /// an image opened at snapshot S gets a snapshot named S too.
    pub fn deep_copy<F>(
        &self,
        dest: &IoCtx,
        dest_name: &str,
        options: &ImageOptions,
        progress: F,
    ) -> Result<()>
    where
        F: FnMut(u64, u64) + Send,
    {
        let c_dest = c_string("deep copy", dest_name)?;
        let opts = OptionsHandle::new(self.api(), options)?;
        let state = CallbackState::new(progress);
        // SAFETY: valid image, context and options; `state` outlives the call and
        // librbd calls the progress function only before returning.
        let rc = unsafe {
            (self.api().rbd_deep_copy_with_progress)(
                self.handle,
                dest.inner.handle,
                c_dest.as_ptr(),
                opts.handle,
                Some(progress_callback::<F>),
                &state as *const CallbackState<F> as *mut c_void,
            )
        };
        state.finish(rc, "deep copy", || {
            format!("{} to {}", self.describe(), dest.path(dest_name))
        })
    }
}

/// Pairs metadata keys with values (both lists in librbd's order).
fn pair_metadata(keys: Vec<String>, values: Vec<String>) -> BTreeMap<String, String> {
    let mut values = values.into_iter();
    keys.into_iter()
        .map(|k| (k, values.next().unwrap_or_default()))
        .collect()
}

/// Appends an extent, merging it into the last one when adjacent and alike.
fn push_merged(extents: &mut Vec<Extent>, extent: Extent) {
    if extent.len == 0 {
        return;
    }
    if let Some(last) = extents.last_mut()
        && last.exists == extent.exists
        && last.offset + last.len == extent.offset
    {
        last.len += extent.len;
        return;
    }
    extents.push(extent);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_extents_merge_only_when_alike() {
        let mut extents = Vec::new();
        let e = |offset, len, exists| Extent {
            offset,
            len,
            exists,
        };
        for extent in [
            e(0, 4, true),
            e(4, 4, true),
            e(8, 4, false),
            e(20, 4, true),
            e(24, 0, true),
        ] {
            push_merged(&mut extents, extent);
        }
        assert_eq!(extents, [e(0, 8, true), e(8, 4, false), e(20, 4, true)]);
    }
}
