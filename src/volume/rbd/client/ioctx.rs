//! A pool (and namespace) of a cluster: creating, listing, renaming and removing RBD
//! images, RADOS objects, and exclusive object locks renewed in the background. It never
//! changes the namespace of a context once it is shared.

use super::cluster::{Cluster, ClusterInner};
use super::ffi::{self, Api};
use super::image::Image;
use super::{DEFAULT_ORDER, RbdError, Result, c_string, check, owned_string};
use std::ffi::{CString, c_char, c_int};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub(super) struct IoCtxInner {
    pub(super) cluster: Arc<ClusterInner>,
    pub(super) handle: ffi::IoctxHandle,
    pub(super) pool: String,
    pub(super) namespace: String,
}

// SAFETY: librados I/O contexts are thread-safe for I/O; the namespace (the one setting
// that is not) is fixed before the context is shared.
unsafe impl Send for IoCtxInner {}
// SAFETY: as above.
unsafe impl Sync for IoCtxInner {}

impl Drop for IoCtxInner {
    fn drop(&mut self) {
        // SAFETY: the context came from rados_ioctx_create; images opened on it hold an
        // Arc to this, so nothing uses it any more. The cluster outlives it (Arc field).
        unsafe { (self.cluster.api.rados_ioctx_destroy)(self.handle) };
    }
}

/// A pool (and namespace) of a cluster: its RBD images and RADOS objects.
#[derive(Clone)]
pub struct IoCtx {
    pub(super) inner: Arc<IoCtxInner>,
}

impl std::fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.location())
    }
}

/// What a new image is made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageOptions {
    /// Feature bits; None = the client's `rbd_default_features` (librbd's own choice,
    /// which is also what Cinder passes).
    pub features: Option<u64>,
    /// Object size as a power of two; None = librbd's default (22 unless configured).
    pub order: Option<u8>,
}

impl Default for ImageOptions {
    /// Cinder's: the cluster's default features, 4 MiB objects.
    fn default() -> ImageOptions {
        ImageOptions {
            features: None,
            order: Some(DEFAULT_ORDER),
        }
    }
}

/// An `rbd_image_options_t`, destroyed on drop.
pub(super) struct OptionsHandle<'a> {
    api: &'a Api,
    pub(super) handle: ffi::OptionsHandle,
}

impl<'a> OptionsHandle<'a> {
    pub(super) fn new(api: &'a Api, options: &ImageOptions) -> Result<OptionsHandle<'a>> {
        let mut handle: ffi::OptionsHandle = std::ptr::null_mut();
        // SAFETY: writes a new options handle through the pointer.
        unsafe { (api.rbd_image_options_create)(&mut handle) };
        let this = OptionsHandle { api, handle };
        // Format 2: the only one with features (format 1 is long deprecated).
        this.set(ffi::RBD_IMAGE_OPTION_FORMAT, 2)?;
        if let Some(features) = options.features {
            this.set(ffi::RBD_IMAGE_OPTION_FEATURES, features)?;
        }
        if let Some(order) = options.order {
            this.set(ffi::RBD_IMAGE_OPTION_ORDER, order.into())?;
        }
        Ok(this)
    }

    fn set(&self, option: c_int, value: u64) -> Result<()> {
        // SAFETY: a valid options handle.
        let rc = unsafe { (self.api.rbd_image_options_set_uint64)(self.handle, option, value) };
        check(rc.into(), "set image option", || {
            format!("{option}={value}")
        })
        .map(|_| ())
    }
}

impl Drop for OptionsHandle<'_> {
    fn drop(&mut self) {
        // SAFETY: created by rbd_image_options_create, used by nobody else.
        unsafe { (self.api.rbd_image_options_destroy)(self.handle) };
    }
}

/// What `stat` says about an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageStat {
    pub size: u64,
    pub object_size: u64,
    pub objects: u64,
    pub order: u8,
}

/// A RADOS object's size and modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectStat {
    pub size: u64,
    pub mtime: SystemTime,
}

impl IoCtx {
    pub(super) fn api(&self) -> &'static Api {
        self.inner.cluster.api
    }

    pub fn pool(&self) -> &str {
        &self.inner.pool
    }

    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The pool's id: with the cluster's fsid and the namespace, what identifies this
    /// storage (pool names can be renamed, ids cannot).
    pub fn pool_id(&self) -> i64 {
        // SAFETY: a valid context; a plain getter.
        unsafe { (self.api().rados_ioctx_get_id)(self.inner.handle) }
    }

    /// `pool` or `pool/namespace`, as `rbd` writes it.
    pub fn location(&self) -> String {
        if self.inner.namespace.is_empty() {
            self.inner.pool.clone()
        } else {
            format!("{}/{}", self.inner.pool, self.inner.namespace)
        }
    }

    pub(super) fn path(&self, name: &str) -> String {
        format!("{}/{name}", self.location())
    }

    /// The connection this context belongs to.
    pub fn cluster(&self) -> Cluster {
        Cluster {
            inner: Arc::clone(&self.inner.cluster),
        }
    }

    // ---- RBD images

    /// Names of the RBD images here (not those in the trash), sorted.
    pub fn list_images(&self) -> Result<Vec<String>> {
        let mut capacity = 64usize;
        loop {
            let mut specs: Vec<ffi::ImageSpec> = Vec::with_capacity(capacity);
            let mut count = capacity;
            // SAFETY: the array has room for `count` specs; on success librbd fills
            // `count` of them with strings it allocated, freed by the cleanup below.
            let rc = unsafe {
                (self.api().rbd_list2)(self.inner.handle, specs.as_mut_ptr(), &mut count)
            };
            if rc == -libc::ERANGE {
                capacity = count.max(capacity * 2);
                continue;
            }
            check(rc.into(), "list images", || self.location())?;
            // SAFETY: librbd initialised `count` (<= capacity) elements.
            unsafe { specs.set_len(count) };
            let mut names: Vec<String> = specs
                .iter()
                // SAFETY: names are NUL-terminated strings owned by the specs.
                .map(|spec| unsafe { owned_string(spec.name) })
                .collect();
            // SAFETY: frees what rbd_list2 allocated inside the specs, exactly once.
            unsafe { (self.api().rbd_image_spec_list_cleanup)(specs.as_mut_ptr(), count) };
            names.sort();
            return Ok(names);
        }
    }

    /// Creates an empty (thin) image; `EEXIST` when the name is taken.
    pub fn create_image(&self, name: &str, size: u64, options: &ImageOptions) -> Result<()> {
        let c_name = c_string("create image", name)?;
        let opts = OptionsHandle::new(self.api(), options)?;
        // SAFETY: valid context and options; the name outlives the call.
        let rc = unsafe {
            (self.api().rbd_create4)(self.inner.handle, c_name.as_ptr(), size, opts.handle)
        };
        check(rc.into(), "create image", || self.path(name)).map(|_| ())
    }

    /// Removes an image with its data. `ENOENT` when it is gone, `EBUSY` while another
    /// client has it open (watches it), `ENOTEMPTY` while it has snapshots.
    pub fn remove_image(&self, name: &str) -> Result<()> {
        let c_name = c_string("remove image", name)?;
        // SAFETY: valid context; the name outlives the call.
        let rc = unsafe { (self.api().rbd_remove)(self.inner.handle, c_name.as_ptr()) };
        check(rc.into(), "remove image", || self.path(name)).map(|_| ())
    }

    /// Opens an image for reading and writing (its head). Opening takes a watch on it,
    /// which other clients see; the exclusive lock is taken only at the first write.
    pub fn open_image(&self, name: &str) -> Result<Image> {
        self.open(name, None, false)
    }

    /// Opens an image read-only, at `snapshot` or at its head. A read-only open takes no
    /// watch: other clients (and `rbd status`) do not see it.
    pub fn open_image_read_only(&self, name: &str, snapshot: Option<&str>) -> Result<Image> {
        self.open(name, snapshot, true)
    }

    fn open(&self, name: &str, snapshot: Option<&str>, read_only: bool) -> Result<Image> {
        let what = || match snapshot {
            Some(snapshot) => format!("{}@{snapshot}", self.path(name)),
            None => self.path(name),
        };
        let c_name = c_string("open image", name)?;
        let c_snapshot = snapshot.map(|s| c_string("open image", s)).transpose()?;
        let snapshot_ptr = c_snapshot.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
        let open = if read_only {
            self.api().rbd_open_read_only
        } else {
            self.api().rbd_open
        };
        let mut handle: ffi::ImageHandle = std::ptr::null_mut();
        // SAFETY: valid context; librbd writes the image handle; strings outlive the call.
        let rc = unsafe {
            open(
                self.inner.handle,
                c_name.as_ptr(),
                &mut handle,
                snapshot_ptr,
            )
        };
        check(rc.into(), "open image", what)?;
        Ok(Image::opened(
            handle,
            self.clone(),
            name,
            snapshot,
            read_only,
        ))
    }

    /// Size and layout of an image, without keeping it open.
    pub fn stat_image(&self, name: &str) -> Result<ImageStat> {
        self.open_image_read_only(name, None)?.stat()
    }

    // ---- RADOS objects (in this context's namespace)

    /// Replaces the whole object (or creates it) atomically: readers see the old or the
    /// new content, never a mix.
    pub fn write_object(&self, oid: &str, data: &[u8]) -> Result<()> {
        let c_oid = c_string("write object", oid)?;
        // SAFETY: valid context; the buffer is readable for its length during the call.
        let rc = unsafe {
            (self.api().rados_write_full)(
                self.inner.handle,
                c_oid.as_ptr(),
                data.as_ptr().cast(),
                data.len(),
            )
        };
        check(rc.into(), "write object", || self.path(oid)).map(|_| ())
    }

    /// Creates the object with `data` only if it does not exist (`EEXIST` otherwise),
    /// in one atomic operation: for markers that two nodes may race to write.
    pub fn create_object(&self, oid: &str, data: &[u8]) -> Result<()> {
        let api = self.api();
        let c_oid = c_string("create object", oid)?;
        // SAFETY: allocates an empty operation, released below.
        let op = unsafe { (api.rados_create_write_op)() };
        if op.is_null() {
            return Err(RbdError::ceph(
                "create object",
                self.path(oid),
                libc::ENOMEM,
            ));
        }
        // SAFETY: a valid op; the buffer and names outlive the operate call, which
        // completes the whole operation before returning.
        let rc = unsafe {
            (api.rados_write_op_create)(op, ffi::LIBRADOS_CREATE_EXCLUSIVE, std::ptr::null());
            (api.rados_write_op_write_full)(op, data.as_ptr().cast(), data.len());
            let rc = (api.rados_write_op_operate)(
                op,
                self.inner.handle,
                c_oid.as_ptr(),
                std::ptr::null_mut(),
                0,
            );
            (api.rados_release_write_op)(op);
            rc
        };
        check(rc.into(), "create object", || self.path(oid)).map(|_| ())
    }

    /// The whole object, read in one request (so one version of it).
    pub fn read_object(&self, oid: &str) -> Result<Vec<u8>> {
        const MAX: usize = 1 << 30;
        let c_oid = c_string("read object", oid)?;
        let mut capacity = 64 << 10;
        loop {
            let mut buf = vec![0u8; capacity];
            // SAFETY: valid context; the buffer is writable for its length.
            let rc = unsafe {
                (self.api().rados_read)(
                    self.inner.handle,
                    c_oid.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                )
            };
            let n = check(rc.into(), "read object", || self.path(oid))? as usize;
            if n < capacity {
                buf.truncate(n);
                return Ok(buf);
            }
            // A full buffer may be a cut: read again, larger, from the start.
            if capacity >= MAX {
                return Err(RbdError::ceph("read object", self.path(oid), libc::EFBIG));
            }
            capacity *= 4;
        }
    }

    /// Removes the object; `ENOENT` when it is gone.
    pub fn remove_object(&self, oid: &str) -> Result<()> {
        let c_oid = c_string("remove object", oid)?;
        // SAFETY: valid context and name.
        let rc = unsafe { (self.api().rados_remove)(self.inner.handle, c_oid.as_ptr()) };
        check(rc.into(), "remove object", || self.path(oid)).map(|_| ())
    }

    /// Size and mtime; `ENOENT` when the object does not exist.
    pub fn stat_object(&self, oid: &str) -> Result<ObjectStat> {
        let c_oid = c_string("stat object", oid)?;
        let mut size = 0u64;
        let mut mtime: libc::time_t = 0;
        // SAFETY: valid context; librados writes the two out-parameters.
        let rc = unsafe {
            (self.api().rados_stat)(self.inner.handle, c_oid.as_ptr(), &mut size, &mut mtime)
        };
        check(rc.into(), "stat object", || self.path(oid))?;
        Ok(ObjectStat {
            size,
            mtime: UNIX_EPOCH + Duration::from_secs(mtime.max(0) as u64),
        })
    }

    /// Names of the objects in this namespace that start with `prefix`, sorted. RADOS
    /// has no index: this walks every object of the namespace (so keep a catalogue in a
    /// namespace or pool of its own, not among millions of image data objects).
    pub fn list_objects(&self, prefix: &str) -> Result<Vec<String>> {
        let api = self.api();
        let mut list: ffi::ListHandle = std::ptr::null_mut();
        // SAFETY: valid context; librados writes the listing handle, closed below.
        let rc = unsafe { (api.rados_nobjects_list_open)(self.inner.handle, &mut list) };
        check(rc.into(), "list objects", || self.location())?;
        let mut names = Vec::new();
        let result = loop {
            let mut entry: *const c_char = std::ptr::null();
            let mut entry_len = 0usize;
            // SAFETY: a valid listing; the entry stays valid until the next call, and
            // is copied before that. Key and namespace are not asked for.
            let rc = unsafe {
                (api.rados_nobjects_list_next2)(
                    list,
                    &mut entry,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    &mut entry_len,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if rc == -libc::ENOENT {
                break Ok(());
            }
            if let Err(e) = check(rc.into(), "list objects", || self.location()) {
                break Err(e);
            }
            if entry.is_null() {
                continue;
            }
            // SAFETY: librados gives the entry's length; the bytes are valid until the
            // next call on this listing.
            let bytes = unsafe { std::slice::from_raw_parts(entry.cast::<u8>(), entry_len) };
            let name = String::from_utf8_lossy(bytes);
            if name.starts_with(prefix) {
                names.push(name.into_owned());
            }
        };
        // SAFETY: opened above, closed exactly once.
        unsafe { (api.rados_nobjects_list_close)(list) };
        result?;
        names.sort();
        Ok(names)
    }

    /// Takes the exclusive advisory lock `lock_name` on object `oid` (which it creates
    /// if missing) for `duration`, and keeps renewing it from a thread of its own until
    /// the returned guard is dropped, which unlocks. `EBUSY` when another holder has
    /// it. If the holder dies, the lock expires after `duration`; if renewal ever fails
    /// (the cluster was unreachable for longer than `duration` and another client took
    /// it), [`ObjectLock::is_held`] turns false and an error is logged.
    pub fn lock_exclusive(
        &self,
        oid: &str,
        lock_name: &str,
        description: &str,
        duration: Duration,
    ) -> Result<ObjectLock> {
        // Unique per holder, so a second holder in this very process is refused too.
        let cookie = uuid::Uuid::new_v4().to_string();
        self.lock_exclusive_as(oid, lock_name, &cookie, description, duration)
    }

    /// [`lock_exclusive`](Self::lock_exclusive) with a cookie of the caller's choosing
    /// (make it unique per holder): `rados lock list` and [`lockers`](Self::lockers)
    /// show it, so it can say who holds the lock. A renewal that fails because the
    /// cluster did not answer is retried: the lock is held again once a renewal gets
    /// through before anyone else took it; once another holder has it, never again.
    pub fn lock_exclusive_as(
        &self,
        oid: &str,
        lock_name: &str,
        cookie: &str,
        description: &str,
        duration: Duration,
    ) -> Result<ObjectLock> {
        self.hold_lock(oid, lock_name, cookie, None, description, duration)
    }

    /// [`lock_exclusive_as`](Self::lock_exclusive_as) in shared mode with `tag`: any
    /// number of holders with the same tag hold it together; an exclusive holder and
    /// they exclude each other (`EBUSY`).
    pub fn lock_shared_as(
        &self,
        oid: &str,
        lock_name: &str,
        cookie: &str,
        tag: &str,
        description: &str,
        duration: Duration,
    ) -> Result<ObjectLock> {
        self.hold_lock(oid, lock_name, cookie, Some(tag), description, duration)
    }

    fn hold_lock(
        &self,
        oid: &str,
        lock_name: &str,
        cookie: &str,
        tag: Option<&str>,
        description: &str,
        duration: Duration,
    ) -> Result<ObjectLock> {
        let lock = LockCall {
            ioctx: self.clone(),
            oid: c_string("lock object", oid)?,
            name: c_string("lock object", lock_name)?,
            cookie: c_string("lock object", cookie)?,
            tag: tag.map(|t| c_string("lock object", t)).transpose()?,
            description: c_string("lock object", description)?,
            duration,
        };
        lock.call(0)?;
        let held = Arc::new(AtomicBool::new(true));
        let (stop, stopped) = mpsc::channel::<()>();
        let renewer = {
            let what = lock.what();
            let lock = lock.clone();
            let held = Arc::clone(&held);
            let every = (duration / 3).max(Duration::from_millis(100));
            std::thread::Builder::new()
                .name("rbd-lock-renew".to_string())
                .spawn(move || {
                    // Wakes every `every`; a message or a dropped sender means stop.
                    while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                        let was_held = held.load(Ordering::SeqCst);
                        let flags = if was_held {
                            ffi::LIBRADOS_LOCK_FLAG_MUST_RENEW
                        } else {
                            0
                        };
                        match lock.call(flags) {
                            Ok(()) => {}
                            // Still ours: a renewal that timed out had got through.
                            Err(e) if e.is_exists() => {}
                            Err(e) if e.is_busy() => {
                                held.store(false, Ordering::SeqCst);
                                tracing::error!(
                                    "lost the lock to another holder: {e}; not taking it back"
                                );
                                return;
                            }
                            Err(e) => {
                                if was_held {
                                    tracing::error!("cannot renew the lock (retrying): {e}");
                                }
                                held.store(false, Ordering::SeqCst);
                                continue;
                            }
                        }
                        if !was_held {
                            tracing::info!("{}: lock held again", lock.what());
                        }
                        held.store(true, Ordering::SeqCst);
                    }
                })
                .map_err(|e| {
                    RbdError::ceph(
                        "lock object",
                        what,
                        e.raw_os_error().unwrap_or(libc::EAGAIN),
                    )
                })?
        };
        Ok(ObjectLock {
            lock,
            held,
            stop: Some(stop),
            renewer: Some(renewer),
        })
    }

    /// Who holds the lock `lock_name` on object `oid`: (client, cookie, address) of
    /// each holder; empty when nobody does (or the object does not exist).
    pub fn lockers(&self, oid: &str, lock_name: &str) -> Result<Vec<Locker>> {
        let c_oid = c_string("list lockers", oid)?;
        let c_name = c_string("list lockers", lock_name)?;
        let mut capacity = 1024usize;
        loop {
            let mut exclusive: c_int = 0;
            let mut tag = vec![0 as c_char; capacity];
            let mut clients = vec![0 as c_char; capacity];
            let mut cookies = vec![0 as c_char; capacity];
            let mut addrs = vec![0 as c_char; capacity];
            let (mut tag_len, mut clients_len, mut cookies_len, mut addrs_len) =
                (capacity, capacity, capacity, capacity);
            // SAFETY: valid context and names; every buffer is writable for the length
            // given with it, and librados writes the lengths it needs.
            let rc = unsafe {
                (self.api().rados_list_lockers)(
                    self.inner.handle,
                    c_oid.as_ptr(),
                    c_name.as_ptr(),
                    &mut exclusive,
                    tag.as_mut_ptr(),
                    &mut tag_len,
                    clients.as_mut_ptr(),
                    &mut clients_len,
                    cookies.as_mut_ptr(),
                    &mut cookies_len,
                    addrs.as_mut_ptr(),
                    &mut addrs_len,
                )
            };
            if rc == -(libc::ERANGE as isize) {
                let needed = tag_len.max(clients_len).max(cookies_len).max(addrs_len);
                capacity = needed.max(capacity * 2);
                continue;
            }
            if rc == -(libc::ENOENT as isize) {
                return Ok(Vec::new());
            }
            let count = check(rc as i64, "list lockers", || self.path(oid))? as usize;
            let split = |buf: &[c_char], len: usize| -> Vec<String> {
                let bytes: Vec<u8> = buf[..len.min(buf.len())].iter().map(|&c| c as u8).collect();
                bytes
                    .split(|&b| b == 0)
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            };
            let clients = split(&clients, clients_len);
            let cookies = split(&cookies, cookies_len);
            let addrs = split(&addrs, addrs_len);
            return Ok((0..count)
                .map(|i| Locker {
                    client: clients.get(i).cloned().unwrap_or_default(),
                    cookie: cookies.get(i).cloned().unwrap_or_default(),
                    address: addrs.get(i).cloned().unwrap_or_default(),
                })
                .collect());
        }
    }

    /// Breaks a lock that `client` holds with `cookie` (a holder known to be dead);
    /// `ENOENT` when that holder no longer has it.
    pub fn break_lock(&self, oid: &str, lock_name: &str, client: &str, cookie: &str) -> Result<()> {
        let c_oid = c_string("break lock", oid)?;
        let c_name = c_string("break lock", lock_name)?;
        let c_client = c_string("break lock", client)?;
        let c_cookie = c_string("break lock", cookie)?;
        // SAFETY: valid context and NUL-terminated strings.
        let rc = unsafe {
            (self.api().rados_break_lock)(
                self.inner.handle,
                c_oid.as_ptr(),
                c_name.as_ptr(),
                c_client.as_ptr(),
                c_cookie.as_ptr(),
            )
        };
        check(rc.into(), "break lock", || self.path(oid)).map(|_| ())
    }

    /// Whether the RBD namespace `namespace` exists in this context's pool (images can
    /// only be made in a namespace `rbd namespace create` made). Ask on a context of the
    /// pool's default namespace.
    pub fn rbd_namespace_exists(&self, namespace: &str) -> Result<bool> {
        let c_namespace = c_string("look up namespace", namespace)?;
        let mut exists = false;
        // SAFETY: valid context and name; writes one bool.
        let rc = unsafe {
            (self.api().rbd_namespace_exists)(self.inner.handle, c_namespace.as_ptr(), &mut exists)
        };
        check(rc.into(), "look up namespace", || {
            format!("{}/{namespace}", self.pool())
        })?;
        Ok(exists)
    }
}

/// One holder of an object lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locker {
    /// `client.<id>`.
    pub client: String,
    pub cookie: String,
    pub address: String,
}

/// The arguments of one lock (or renewal) call.
#[derive(Clone)]
struct LockCall {
    ioctx: IoCtx,
    oid: CString,
    name: CString,
    cookie: CString,
    /// Shared with every holder of this tag; exclusive without one.
    tag: Option<CString>,
    description: CString,
    duration: Duration,
}

impl LockCall {
    fn what(&self) -> String {
        format!(
            "{} (lock {})",
            self.ioctx.path(&self.oid.to_string_lossy()),
            self.name.to_string_lossy()
        )
    }

    fn call(&self, flags: u8) -> Result<()> {
        let mut duration = libc::timeval {
            tv_sec: self.duration.as_secs() as libc::time_t,
            tv_usec: self.duration.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: valid context and NUL-terminated strings; librados reads the timeval.
        let rc = unsafe {
            match &self.tag {
                None => (self.ioctx.api().rados_lock_exclusive)(
                    self.ioctx.inner.handle,
                    self.oid.as_ptr(),
                    self.name.as_ptr(),
                    self.cookie.as_ptr(),
                    self.description.as_ptr(),
                    &mut duration,
                    flags,
                ),
                Some(tag) => (self.ioctx.api().rados_lock_shared)(
                    self.ioctx.inner.handle,
                    self.oid.as_ptr(),
                    self.name.as_ptr(),
                    self.cookie.as_ptr(),
                    tag.as_ptr(),
                    self.description.as_ptr(),
                    &mut duration,
                    flags,
                ),
            }
        };
        check(rc.into(), "lock object", || self.what()).map(|_| ())
    }
}

/// A held object lock (exclusive or shared), renewed in the background; unlocked on drop.
pub struct ObjectLock {
    lock: LockCall,
    held: Arc<AtomicBool>,
    stop: Option<mpsc::Sender<()>>,
    renewer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ObjectLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectLock")
            .field("lock", &self.lock.what())
            .field("cookie", &self.lock.cookie)
            .field("held", &self.is_held())
            .finish()
    }
}

impl ObjectLock {
    /// False once a renewal has failed: the lock may now be someone else's.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// This holder's cookie (shown by `rados lock info`).
    pub fn cookie(&self) -> String {
        self.lock.cookie.to_string_lossy().into_owned()
    }
}

impl Drop for ObjectLock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.join();
        }
        let api = self.lock.ioctx.api();
        // SAFETY: valid context and strings.
        let rc = unsafe {
            (api.rados_unlock)(
                self.lock.ioctx.inner.handle,
                self.lock.oid.as_ptr(),
                self.lock.name.as_ptr(),
                self.lock.cookie.as_ptr(),
            )
        };
        // ENOENT: it expired or was broken; nothing of ours is left to release.
        if rc < 0 && rc != -libc::ENOENT {
            tracing::warn!(
                "unlock {}: {}",
                self.lock.what(),
                std::io::Error::from_raw_os_error(-rc)
            );
        }
    }
}
