//! A safe client over librados/librbd: a connection with bounded timeouts, pools (RBD
//! images, RADOS objects, object locks) and open images (queued I/O, extents, snapshots,
//! watchers, metadata). It never waits without a timeout nor hands out librbd's memory.
//!
//! # Ownership and threads
//! Handles are reference counted: an [`IoCtx`] keeps its [`Cluster`] connection alive and
//! an [`Image`] keeps its `IoCtx`, so any of them may be stored on its own (in an
//! attachment, a target) and the connection shuts down when the last one goes.
//! librados documents its cluster and I/O-context handles as thread-safe, and librbd
//! serialises operations on one image internally (QEMU and rbd-nbd issue I/O on one image
//! from several threads), so `Cluster`, `IoCtx` and `Image` are `Send + Sync`: share them
//! with `Arc` or by reference. Two rules remain the caller's: an [`AioQueue`] belongs to
//! one thread at a time (`&mut`), and writes in flight at the same time must not overlap
//! (librbd does not order concurrent requests).

use super::ffi::{self, Api};
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::ops::{ControlFlow, Range};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// RBD feature bits (rbd/features.h).
pub const FEATURE_LAYERING: u64 = 1 << 0;
pub const FEATURE_STRIPINGV2: u64 = 1 << 1;
pub const FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
pub const FEATURE_OBJECT_MAP: u64 = 1 << 3;
pub const FEATURE_FAST_DIFF: u64 = 1 << 4;
pub const FEATURE_DEEP_FLATTEN: u64 = 1 << 5;
pub const FEATURE_JOURNALING: u64 = 1 << 6;
pub const FEATURE_DATA_POOL: u64 = 1 << 7;
/// librbd's own default (`RBD_FEATURES_DEFAULT`), what `rbd_default_features` is unless
/// the cluster's configuration says otherwise.
pub const FEATURES_DEFAULT: u64 = FEATURE_LAYERING
    | FEATURE_EXCLUSIVE_LOCK
    | FEATURE_OBJECT_MAP
    | FEATURE_FAST_DIFF
    | FEATURE_DEEP_FLATTEN;
/// Image flags (`rbd_get_flags`): the object map / fast-diff data cannot be trusted and
/// librbd falls back to asking every object.
pub const FLAG_OBJECT_MAP_INVALID: u64 = 1 << 0;
pub const FLAG_FAST_DIFF_INVALID: u64 = 1 << 1;

const FEATURE_NAMES: [(u64, &str); 12] = [
    (FEATURE_LAYERING, "layering"),
    (FEATURE_STRIPINGV2, "striping"),
    (FEATURE_EXCLUSIVE_LOCK, "exclusive-lock"),
    (FEATURE_OBJECT_MAP, "object-map"),
    (FEATURE_FAST_DIFF, "fast-diff"),
    (FEATURE_DEEP_FLATTEN, "deep-flatten"),
    (FEATURE_JOURNALING, "journaling"),
    (FEATURE_DATA_POOL, "data-pool"),
    (1 << 8, "operations"),
    (1 << 9, "migrating"),
    (1 << 10, "non-primary"),
    (1 << 11, "dirty-cache"),
];

/// Cinder's RBD object size (`rbd_store_chunk_size` = 4 MiB): 2^22 bytes.
pub const DEFAULT_ORDER: u8 = 22;

#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    /// librados/librbd could not be loaded; the message names the Debian package.
    #[error(transparent)]
    Unavailable(#[from] ffi::LoadError),
    /// A librados/librbd call failed with `-errno`.
    #[error("{op} {what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Ceph {
        op: &'static str,
        /// What it was done to: a conf path and client, `pool[/namespace]/name`, ...
        what: String,
        /// Positive errno (librados returns it negated).
        errno: i32,
    },
}

impl RbdError {
    fn ceph(op: &'static str, what: impl Into<String>, errno: i32) -> RbdError {
        RbdError::Ceph {
            op,
            what: what.into(),
            errno,
        }
    }

    /// The errno of the failure (`ELIBACC` when the libraries are missing).
    pub fn errno(&self) -> i32 {
        match self {
            RbdError::Unavailable(_) => libc::ELIBACC,
            RbdError::Ceph { errno, .. } => *errno,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.errno() == libc::ENOENT
    }

    pub fn is_exists(&self) -> bool {
        self.errno() == libc::EEXIST
    }

    pub fn is_busy(&self) -> bool {
        self.errno() == libc::EBUSY
    }

    pub fn is_timeout(&self) -> bool {
        self.errno() == libc::ETIMEDOUT
    }
}

impl From<RbdError> for std::io::Error {
    fn from(e: RbdError) -> std::io::Error {
        std::io::Error::new(
            std::io::Error::from_raw_os_error(e.errno()).kind(),
            e.to_string(),
        )
    }
}

pub type Result<T> = std::result::Result<T, RbdError>;

/// A librados return code as a result: negative is `-errno`.
fn check(rc: i64, op: &'static str, what: impl FnOnce() -> String) -> Result<u64> {
    if rc < 0 {
        let errno = i32::try_from(-rc).unwrap_or(libc::EIO);
        Err(RbdError::ceph(op, what(), errno))
    } else {
        Ok(rc as u64)
    }
}

/// A string for C; one with a NUL inside is refused as EINVAL before any call is made.
fn c_string(op: &'static str, value: &str) -> Result<CString> {
    CString::new(value).map_err(|_| RbdError::ceph(op, value.replace('\0', "\\0"), libc::EINVAL))
}

/// Copies a C string librados owns; invalid UTF-8 is replaced, never trusted.
///
/// # Safety
/// `ptr` is null or points to a NUL-terminated string valid for this call.
unsafe fn owned_string(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: the caller's contract.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

/// How long a call may wait for the cluster. librados' defaults wait forever for OSDs
/// and monitors (and five minutes to connect); backupfs always bounds them, so a
/// cluster that goes away turns requests into `ETIMEDOUT` instead of a hung mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting and authenticating (`client_mount_timeout`).
    pub connect: Duration,
    /// Each request to a monitor (`rados_mon_op_timeout`).
    pub mon_op: Duration,
    /// Each request to an OSD (`rados_osd_op_timeout`): one RBD read or write of up to
    /// an object's size is one such request, some librbd operations are a few in a row.
    /// Measured with the OSD stopped (Ceph 16.2): a read fails after 1x, the first
    /// write after 2x (the exclusive lock is taken first), closing an image that was
    /// written takes 3x (lock release, unwatch).
    pub osd_op: Duration,
}

impl Default for Timeouts {
    /// 30 s each: a librbd operation of up to four OSD requests in a row still fails
    /// within the two minutes the mount promises.
    fn default() -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(30),
            mon_op: Duration::from_secs(30),
            osd_op: Duration::from_secs(30),
        }
    }
}

impl Timeouts {
    /// The configuration options and values (whole seconds, at least 1: 0 means
    /// "forever" to librados).
    fn options(&self) -> [(&'static str, String); 3] {
        let secs = |d: Duration| d.as_secs().max(1).to_string();
        [
            ("client_mount_timeout", secs(self.connect)),
            ("rados_mon_op_timeout", secs(self.mon_op)),
            ("rados_osd_op_timeout", secs(self.osd_op)),
        ]
    }
}

/// Reads `rbd_default_features` as Ceph writes it: a number, or feature names separated
/// by commas. None for anything else.
pub fn parse_features(text: &str) -> Option<u64> {
    let text = text.trim();
    if let Ok(bits) = text.parse::<u64>() {
        return Some(bits);
    }
    let mut bits = 0;
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        bits |= FEATURE_NAMES.iter().find(|(_, n)| *n == name)?.0;
    }
    (!text.is_empty()).then_some(bits)
}

/// The names of the feature bits set in `features`, as `rbd info` prints them.
pub fn feature_names(features: u64) -> Vec<&'static str> {
    FEATURE_NAMES
        .iter()
        .filter(|(bit, _)| features & bit != 0)
        .map(|(_, name)| *name)
        .collect()
}

struct ClusterInner {
    api: &'static Api,
    handle: ffi::RadosHandle,
    /// `client.<name>@<conf path>`, for errors.
    describe: String,
}

// SAFETY: a rados_t is documented thread-safe once connected; configuration is only
// changed in `connect`, before the handle is shared.
unsafe impl Send for ClusterInner {}
// SAFETY: as above.
unsafe impl Sync for ClusterInner {}

impl Drop for ClusterInner {
    fn drop(&mut self) {
        // SAFETY: the handle came from rados_create2 and nothing uses it any more: every
        // IoCtx and Image holds an Arc to this and is gone.
        unsafe { (self.api.rados_shutdown)(self.handle) };
    }
}

/// A connection to a Ceph cluster as one cephx client.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<ClusterInner>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("client", &self.inner.describe)
            .finish()
    }
}

impl Cluster {
    /// Connects as `client.<client>` with the configuration (monitors, keyring) of
    /// `ceph_conf`, with every wait bounded by `timeouts` and librbd's cache off (each
    /// request's error is that request's). Errors: the libraries are
    /// missing (names the package), `ENOENT` for a missing conf file or keyring, an
    /// authentication errno (`EACCES`, `EPERM`) for an unknown client or a bad key,
    /// `ETIMEDOUT` when no monitor answers within `timeouts.connect`.
    pub fn connect(ceph_conf: &Path, client: &str, timeouts: Timeouts) -> Result<Cluster> {
        let api = ffi::api()?;
        let describe = format!("client.{client}@{}", ceph_conf.display());
        let cluster_name = c_string("connect", "ceph")?;
        let entity = c_string("connect", &format!("client.{client}"))?;
        let conf = c_string(
            "read conf",
            ceph_conf.to_str().ok_or_else(|| {
                RbdError::ceph("read conf", ceph_conf.display().to_string(), libc::EINVAL)
            })?,
        )?;
        let mut handle: ffi::RadosHandle = std::ptr::null_mut();
        // SAFETY: rados_create2 writes a new handle through the pointer; the strings
        // outlive the call.
        let rc =
            unsafe { (api.rados_create2)(&mut handle, cluster_name.as_ptr(), entity.as_ptr(), 0) };
        check(rc.into(), "create cluster handle", || describe.clone())?;
        // From here on Drop shuts the handle down, whatever fails next.
        let cluster = Cluster {
            inner: Arc::new(ClusterInner {
                api,
                handle,
                describe,
            }),
        };
        let what = || cluster.inner.describe.clone();
        // SAFETY: a valid, not yet connected handle and a NUL-terminated path.
        let rc = unsafe { (api.rados_conf_read_file)(handle, conf.as_ptr()) };
        check(rc.into(), "read conf", what)?;
        for (option, value) in timeouts.options() {
            cluster.conf_set(option, &value)?;
        }
        // No librbd cache: with it, a write "completes" into memory (writeback mode
        // after the first flush) and a failing cluster shows up only at the next flush;
        // our copier already keeps its own requests in flight, so the cache would only
        // add a copy of every block and up to rbd_cache_size of memory per image.
        cluster.conf_set("rbd_cache", "false")?;
        // Asynchronous writes hand librbd a buffer that their InFlight owns, unchanged,
        // until they complete: librbd may send it as it is instead of copying it first
        // (a copy of every block in flight, in memory and in time).
        cluster.conf_set("rbd_disable_zero_copy_writes", "false")?;
        // SAFETY: a valid handle; blocks at most client_mount_timeout.
        let rc = unsafe { (api.rados_connect)(handle) };
        check(rc.into(), "connect", what)?;
        Ok(cluster)
    }

    fn api(&self) -> &'static Api {
        self.inner.api
    }

    /// Sets a configuration option; only meaningful before the handle is shared, so
    /// this is private to `connect`.
    fn conf_set(&self, option: &str, value: &str) -> Result<()> {
        let c_option = c_string("set conf", option)?;
        let c_value = c_string("set conf", value)?;
        // SAFETY: a valid handle not yet shared with other threads; strings outlive it.
        let rc = unsafe {
            (self.api().rados_conf_set)(self.inner.handle, c_option.as_ptr(), c_value.as_ptr())
        };
        check(rc.into(), "set conf", || format!("{option}={value}")).map(|_| ())
    }

    /// A configuration option's value as this client sees it (conf file, defaults,
    /// and what the monitors' central configuration sent at connect).
    pub fn conf_get(&self, option: &str) -> Result<String> {
        let c_option = c_string("get conf", option)?;
        let mut buf = vec![0 as c_char; 4096];
        // SAFETY: the buffer is writable for its length; librados NUL-terminates.
        let rc = unsafe {
            (self.api().rados_conf_get)(
                self.inner.handle,
                c_option.as_ptr(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        check(rc.into(), "get conf", || option.to_string())?;
        // SAFETY: NUL-terminated by librados within the buffer.
        Ok(unsafe { owned_string(buf.as_ptr()) })
    }

    /// The features new images get unless told otherwise: the cluster's
    /// `rbd_default_features`, as Cinder's RBD driver reads it (and, like Cinder,
    /// layering alone when that is 0).
    pub fn default_features(&self) -> Result<u64> {
        let text = self.conf_get("rbd_default_features")?;
        match parse_features(&text) {
            Some(0) => Ok(FEATURE_LAYERING),
            Some(bits) => Ok(bits),
            None => Err(RbdError::ceph(
                "parse conf",
                format!("rbd_default_features={text}"),
                libc::EINVAL,
            )),
        }
    }

    /// The cluster's fsid (a UUID): its identity, for the same-storage rule.
    pub fn fsid(&self) -> Result<String> {
        let mut buf = vec![0 as c_char; 64];
        // SAFETY: the buffer is writable for its length; librados NUL-terminates.
        let rc = unsafe {
            (self.api().rados_cluster_fsid)(self.inner.handle, buf.as_mut_ptr(), buf.len())
        };
        check(rc.into(), "get fsid", || self.inner.describe.clone())?;
        // SAFETY: NUL-terminated within the buffer.
        Ok(unsafe { owned_string(buf.as_ptr()) })
    }

    /// This connection's global id: the `id` of the watches our open images hold.
    pub fn instance_id(&self) -> u64 {
        // SAFETY: a connected handle; a plain getter.
        unsafe { (self.api().rados_get_instance_id)(self.inner.handle) }
    }

    /// Sends a command to the monitors (`{"prefix": "df", "format": "json"}`) and
    /// returns its output; waits at most `rados_mon_op_timeout`.
    pub fn mon_command(&self, command: &str) -> Result<Vec<u8>> {
        let c_command = c_string("monitor command", command)?;
        let mut commands = [c_command.as_ptr()];
        let mut out: *mut c_char = std::ptr::null_mut();
        let mut out_len = 0usize;
        let mut status: *mut c_char = std::ptr::null_mut();
        let mut status_len = 0usize;
        // SAFETY: a connected handle; one NUL-terminated command; librados allocates
        // the two output buffers, freed below with rados_buffer_free.
        let rc = unsafe {
            (self.api().rados_mon_command)(
                self.inner.handle,
                commands.as_mut_ptr(),
                1,
                std::ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut status,
                &mut status_len,
            )
        };
        let output = if out.is_null() {
            Vec::new()
        } else {
            // SAFETY: librados wrote out_len bytes there.
            unsafe { std::slice::from_raw_parts(out.cast::<u8>(), out_len) }.to_vec()
        };
        // SAFETY: buffers librados allocated (or null, which it accepts), freed once.
        unsafe {
            (self.api().rados_buffer_free)(out);
            (self.api().rados_buffer_free)(status);
        }
        check(rc.into(), "monitor command", || command.to_string())?;
        Ok(output)
    }

    /// The pool's id, `ENOENT` when there is no such pool.
    pub fn pool_id(&self, pool: &str) -> Result<i64> {
        let c_pool = c_string("look up pool", pool)?;
        // SAFETY: a connected handle and a NUL-terminated name.
        let rc = unsafe { (self.api().rados_pool_lookup)(self.inner.handle, c_pool.as_ptr()) };
        check(rc, "look up pool", || pool.to_string()).map(|id| id as i64)
    }

    pub fn pool_exists(&self, pool: &str) -> Result<bool> {
        match self.pool_id(pool) {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// An I/O context on `pool`, in `namespace` ("" or None for the default one).
    /// `ENOENT` when the pool does not exist.
    pub fn ioctx(&self, pool: &str, namespace: Option<&str>) -> Result<IoCtx> {
        let namespace = namespace.unwrap_or("");
        let c_pool = c_string("open pool", pool)?;
        let c_namespace = c_string("open pool", namespace)?;
        let mut handle: ffi::IoctxHandle = std::ptr::null_mut();
        // SAFETY: a connected handle; rados_ioctx_create writes the new context.
        let rc = unsafe {
            (self.api().rados_ioctx_create)(self.inner.handle, c_pool.as_ptr(), &mut handle)
        };
        check(rc.into(), "open pool", || pool.to_string())?;
        // SAFETY: a fresh context nobody else sees yet; librados copies the string.
        unsafe { (self.api().rados_ioctx_set_namespace)(handle, c_namespace.as_ptr()) };
        Ok(IoCtx {
            inner: Arc::new(IoCtxInner {
                cluster: Arc::clone(&self.inner),
                handle,
                pool: pool.to_string(),
                namespace: namespace.to_string(),
            }),
        })
    }
}

struct IoCtxInner {
    cluster: Arc<ClusterInner>,
    handle: ffi::IoctxHandle,
    pool: String,
    namespace: String,
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
    inner: Arc<IoCtxInner>,
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
struct OptionsHandle<'a> {
    api: &'a Api,
    handle: ffi::OptionsHandle,
}

impl<'a> OptionsHandle<'a> {
    fn new(api: &'a Api, options: &ImageOptions) -> Result<OptionsHandle<'a>> {
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
    fn api(&self) -> &'static Api {
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

    fn path(&self, name: &str) -> String {
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
        Ok(Image {
            handle,
            ioctx: self.clone(),
            name: name.to_string(),
            snapshot: snapshot.map(str::to_string),
            read_only,
        })
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
        let lock = LockCall {
            ioctx: self.clone(),
            oid: c_string("lock object", oid)?,
            name: c_string("lock object", lock_name)?,
            cookie: c_string("lock object", cookie)?,
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
            (self.ioctx.api().rados_lock_exclusive)(
                self.ioctx.inner.handle,
                self.oid.as_ptr(),
                self.name.as_ptr(),
                self.cookie.as_ptr(),
                self.description.as_ptr(),
                &mut duration,
                flags,
            )
        };
        check(rc.into(), "lock object", || self.what()).map(|_| ())
    }
}

/// A held exclusive object lock, renewed in the background; unlocked on drop.
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
    handle: ffi::ImageHandle,
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
        // borrow of this image, so no request is in flight.
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

/// The shared state of a callback called from inside librbd.
struct CallbackState<F> {
    callback: Mutex<F>,
    stopped: AtomicBool,
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl<F> CallbackState<F> {
    fn new(callback: F) -> CallbackState<F> {
        CallbackState {
            callback: Mutex::new(callback),
            stopped: AtomicBool::new(false),
            panic: Mutex::new(None),
        }
    }

    /// Runs the callback, never letting a panic unwind into C: it is kept and resumed
    /// once librbd has returned.
    fn run(&self, call: impl FnOnce(&mut F) -> ControlFlow<()>) -> c_int {
        // librbd may still deliver results of requests it had in flight when we said
        // stop: the callback is promised not to see them.
        if self.stopped.load(Ordering::SeqCst) || self.panic.lock().is_some() {
            return -libc::ECANCELED;
        }
        match catch_unwind(AssertUnwindSafe(|| call(&mut self.callback.lock()))) {
            Ok(ControlFlow::Continue(())) => 0,
            Ok(ControlFlow::Break(())) => {
                self.stopped.store(true, Ordering::SeqCst);
                -libc::ECANCELED
            }
            Err(panic) => {
                *self.panic.lock() = Some(panic);
                -libc::ECANCELED
            }
        }
    }

    /// The call's result once librbd has returned `rc`: a stop asked for by the callback
    /// is success, a panic goes on unwinding.
    fn finish(self, rc: c_int, op: &'static str, what: impl FnOnce() -> String) -> Result<()> {
        if let Some(panic) = self.panic.into_inner() {
            resume_unwind(panic);
        }
        if rc == -libc::ECANCELED && self.stopped.load(Ordering::SeqCst) {
            return Ok(());
        }
        check(rc.into(), op, what).map(|_| ())
    }
}

unsafe extern "C" fn diff_callback<F>(
    offset: u64,
    len: usize,
    exists: c_int,
    arg: *mut c_void,
) -> c_int
where
    F: FnMut(Extent) -> ControlFlow<()>,
{
    // SAFETY: `arg` is the &CallbackState<F> diff_iterate passed, alive until
    // rbd_diff_iterate2 returns.
    let state = unsafe { &*(arg as *const CallbackState<F>) };
    state.run(|callback| {
        callback(Extent {
            offset,
            len: len as u64,
            exists: exists != 0,
        })
    })
}

unsafe extern "C" fn progress_callback<F>(done: u64, total: u64, arg: *mut c_void) -> c_int
where
    F: FnMut(u64, u64),
{
    // SAFETY: `arg` is the &CallbackState<F> deep_copy passed, alive until librbd returns.
    let state = unsafe { &*(arg as *const CallbackState<F>) };
    state.run(|callback| {
        callback(done, total);
        ControlFlow::Continue(())
    })
}

impl Image {
    fn api(&self) -> &'static Api {
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

/// What an asynchronous request did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AioKind {
    Read,
    Write,
    Discard,
    WriteZeroes,
}

/// A finished request, with its buffer handed back (filled, for a read) for reuse.
pub struct AioDone {
    pub kind: AioKind,
    pub offset: u64,
    pub len: u64,
    /// Bytes read or written (a read at the end of the image may be short).
    pub bytes: u64,
    /// The request's buffer (empty for discard and write-zeroes).
    pub buffer: Vec<u8>,
}

impl std::fmt::Debug for AioDone {
    /// Without the buffer's bytes: megabytes of them help nobody in a message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AioDone")
            .field("kind", &self.kind)
            .field("offset", &self.offset)
            .field("len", &self.len)
            .field("bytes", &self.bytes)
            .field("buffer_len", &self.buffer.len())
            .finish()
    }
}

/// One request in flight: the completion and the buffer librbd reads from or writes
/// into until it completes.
struct InFlight {
    api: &'static Api,
    completion: ffi::CompletionHandle,
    kind: AioKind,
    offset: u64,
    len: u64,
    buffer: Vec<u8>,
}

impl InFlight {
    /// Waits for completion; the return value.
    fn wait(&mut self) -> isize {
        // SAFETY: a valid completion of a submitted request; waiting is idempotent.
        unsafe {
            (self.api.rbd_aio_wait_for_complete)(self.completion);
            (self.api.rbd_aio_get_return_value)(self.completion)
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // The buffer must not be freed while librbd may still touch it: wait first
        // (bounded by rados_osd_op_timeout), then release the completion.
        self.wait();
        // SAFETY: complete, and released exactly once.
        unsafe { (self.api.rbd_aio_release)(self.completion) };
    }
}

// SAFETY: a completion may be waited for and released from any thread (librbd's
// completions are thread-safe), and the buffer is plain owned memory.
unsafe impl Send for InFlight {}

impl Image {
    /// Submits one asynchronous request; the returned InFlight keeps the buffer (and the
    /// completion) until librbd has finished with it.
    fn submit(
        &self,
        kind: AioKind,
        offset: u64,
        len: u64,
        mut buffer: Vec<u8>,
        op_flags: c_int,
    ) -> Result<InFlight> {
        let data = buffer.as_mut_ptr();
        // SAFETY: the buffer's heap memory does not move when the Vec is moved into the
        // InFlight, which keeps it until the request has completed (its Drop waits).
        unsafe { self.submit_at(kind, offset, len, data, buffer, op_flags) }
    }

    /// Submits one asynchronous request on the memory at `data` (`len` bytes; reads write
    /// it, writes read it); the InFlight keeps `keep` and the completion until librbd is
    /// done.
    ///
    /// # Safety
    /// `data` must stay valid for `len` bytes until the returned InFlight has been waited
    /// for or dropped (its Drop waits).
    unsafe fn submit_at(
        &self,
        kind: AioKind,
        offset: u64,
        len: u64,
        data: *mut u8,
        keep: Vec<u8>,
        op_flags: c_int,
    ) -> Result<InFlight> {
        let api = self.api();
        let mut completion: ffi::CompletionHandle = std::ptr::null_mut();
        // SAFETY: no callback; librbd writes the new completion through the pointer.
        let rc =
            unsafe { (api.rbd_aio_create_completion)(std::ptr::null_mut(), None, &mut completion) };
        check(rc.into(), "create completion", || self.describe())?;
        let handle = self.handle;
        let size = usize::try_from(len)
            .map_err(|_| RbdError::ceph("submit", self.describe(), libc::EINVAL))?;
        // SAFETY: valid image and completion; `data` stays valid until the request has
        // completed (the caller's promise).
        let rc = unsafe {
            match kind {
                AioKind::Read => {
                    (api.rbd_aio_read2)(handle, offset, size, data.cast(), completion, op_flags)
                }
                AioKind::Write => {
                    (api.rbd_aio_write2)(handle, offset, size, data.cast(), completion, op_flags)
                }
                AioKind::Discard => (api.rbd_aio_discard)(handle, offset, len, completion),
                AioKind::WriteZeroes => {
                    (api.rbd_aio_write_zeroes)(handle, offset, size, completion, 0, 0)
                }
            }
        };
        if rc < 0 {
            // Not submitted: nothing will complete it, release it here.
            // SAFETY: created above, never submitted, released once.
            unsafe { (api.rbd_aio_release)(completion) };
            return Err(RbdError::ceph("submit", self.describe(), -rc));
        }
        Ok(InFlight {
            api,
            completion,
            kind,
            offset,
            len,
            buffer: keep,
        })
    }

    /// Writes all of `buf` at `offset` (within the image's size) without copying it
    /// (with zero-copy writes, which the connection allows, librbd sends the caller's
    /// memory) and returns once the request is done.
    pub fn write_waiting(&self, buf: &[u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        // SAFETY: librbd only reads a write's memory, and the request is waited for
        // (also on an early return: InFlight's Drop waits) before the borrow ends.
        let mut request = unsafe {
            self.submit_at(
                AioKind::Write,
                offset,
                len,
                buf.as_ptr().cast_mut(),
                Vec::new(),
                0,
            )?
        };
        let rc = request.wait();
        check(rc as i64, "write", || {
            format!("{} at {offset}+{len}", self.describe())
        })
        .map(drop)
    }

    /// Starts writing all of `buffer` at `offset` (within the image's size) and returns
    /// at once; the write keeps its buffer until it is waited for (or dropped, which
    /// waits). With zero-copy writes (the connection allows them) librbd sends the
    /// buffer itself: it must not change meanwhile, which owning it guarantees.
    pub fn submit_write(&self, offset: u64, buffer: Vec<u8>) -> Result<PendingWrite> {
        let len = buffer.len() as u64;
        Ok(PendingWrite {
            request: self.submit(AioKind::Write, offset, len, buffer, 0)?,
            describe: self.describe(),
        })
    }
}

/// A write in flight on its own (see [`Image::submit_write`]). The image must stay open
/// until it is waited for.
pub struct PendingWrite {
    request: InFlight,
    describe: String,
}

impl std::fmt::Debug for PendingWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "write {}+{} to {}",
            self.request.offset, self.request.len, self.describe
        )
    }
}

impl PendingWrite {
    /// The range it writes.
    pub fn range(&self) -> Range<u64> {
        self.request.offset..self.request.offset + self.request.len
    }

    /// Waits until it is done: its buffer back (for reuse), or its error.
    pub fn wait(mut self) -> Result<Vec<u8>> {
        let rc = self.request.wait();
        let (offset, len) = (self.request.offset, self.request.len);
        check(rc as i64, "write", || {
            format!("{} at {offset}+{len}", self.describe)
        })?;
        Ok(std::mem::take(&mut self.request.buffer))
    }
}

/// Up to `depth` asynchronous requests in flight on one image, finished in submission
/// order: a copier submits reads (or writes) of large blocks and takes results from
/// the oldest. Every submit on a full queue first waits for the oldest request and
/// returns it; if that request failed, its error is returned and nothing new is
/// submitted. Dropping the queue waits for whatever is still in flight (each request
/// is bounded by `rados_osd_op_timeout`), so no buffer is freed under librbd.
pub struct AioQueue<'a> {
    image: &'a Image,
    depth: usize,
    in_flight: VecDeque<InFlight>,
    /// librados op flags (fadvise hints) for reads and writes.
    op_flags: c_int,
}

impl<'a> AioQueue<'a> {
    pub fn new(image: &'a Image, depth: usize) -> AioQueue<'a> {
        AioQueue {
            image,
            depth: depth.max(1),
            in_flight: VecDeque::with_capacity(depth.max(1)),
            op_flags: 0,
        }
    }

    /// Marks the reads and writes as one sequential pass that will not be read again
    /// soon (a backup or a restore): the OSDs are told not to keep the data cached.
    pub fn sequential(mut self) -> AioQueue<'a> {
        self.op_flags =
            ffi::LIBRADOS_OP_FLAG_FADVISE_SEQUENTIAL | ffi::LIBRADOS_OP_FLAG_FADVISE_NOCACHE;
        self
    }

    pub fn len(&self) -> usize {
        self.in_flight.len()
    }

    pub fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.in_flight.len() >= self.depth
    }

    /// Reads `buffer.len()` bytes at `offset` into `buffer`.
    pub fn read(&mut self, offset: u64, buffer: Vec<u8>) -> Result<Option<AioDone>> {
        let len = buffer.len() as u64;
        self.submit(AioKind::Read, offset, len, buffer)
    }

    /// Writes all of `buffer` at `offset` (within the image's size).
    pub fn write(&mut self, offset: u64, buffer: Vec<u8>) -> Result<Option<AioDone>> {
        let len = buffer.len() as u64;
        self.submit(AioKind::Write, offset, len, buffer)
    }

    pub fn discard(&mut self, offset: u64, len: u64) -> Result<Option<AioDone>> {
        self.submit(AioKind::Discard, offset, len, Vec::new())
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<Option<AioDone>> {
        self.submit(AioKind::WriteZeroes, offset, len, Vec::new())
    }

    /// Waits for the oldest request; None when nothing is in flight.
    pub fn wait_oldest(&mut self) -> Option<Result<AioDone>> {
        let mut request = self.in_flight.pop_front()?;
        let rc = request.wait();
        let what = || {
            format!(
                "{} at {}+{}",
                self.image.describe(),
                request.offset,
                request.len
            )
        };
        let op = match request.kind {
            AioKind::Read => "read",
            AioKind::Write => "write",
            AioKind::Discard => "discard",
            AioKind::WriteZeroes => "write zeroes",
        };
        Some(check(rc as i64, op, what).map(|bytes| AioDone {
            kind: request.kind,
            offset: request.offset,
            len: request.len,
            // librbd returns 0 for a successful write or discard: it did it all.
            bytes: if request.kind == AioKind::Read {
                bytes
            } else {
                request.len
            },
            buffer: std::mem::take(&mut request.buffer),
        }))
    }

    /// Waits for everything in flight; the first failure, after all have ended.
    pub fn drain(&mut self) -> Result<Vec<AioDone>> {
        let mut done = Vec::with_capacity(self.in_flight.len());
        let mut first_error = None;
        while let Some(result) = self.wait_oldest() {
            match result {
                Ok(d) => done.push(d),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(done),
        }
    }

    fn submit(
        &mut self,
        kind: AioKind,
        offset: u64,
        len: u64,
        buffer: Vec<u8>,
    ) -> Result<Option<AioDone>> {
        let made_room = if self.is_full() {
            self.wait_oldest().transpose()?
        } else {
            None
        };
        let request = self
            .image
            .submit(kind, offset, len, buffer, self.op_flags)?;
        self.in_flight.push_back(request);
        Ok(made_room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_parse_as_numbers_or_names() {
        assert_eq!(parse_features("61"), Some(FEATURES_DEFAULT));
        assert_eq!(
            parse_features("layering,exclusive-lock,object-map,fast-diff,deep-flatten"),
            Some(FEATURES_DEFAULT)
        );
        assert_eq!(parse_features(" layering "), Some(FEATURE_LAYERING));
        assert_eq!(parse_features("layering,warp-drive"), None);
        assert_eq!(parse_features(""), None);
        assert_eq!(
            feature_names(FEATURE_LAYERING | FEATURE_FAST_DIFF),
            ["layering", "fast-diff"]
        );
    }

    #[test]
    fn timeouts_are_whole_seconds_never_zero() {
        let t = Timeouts {
            connect: Duration::from_millis(1500),
            mon_op: Duration::from_millis(10),
            osd_op: Duration::from_secs(5),
        };
        let options = t.options();
        assert_eq!(options[0], ("client_mount_timeout", "1".to_string()));
        assert_eq!(options[1], ("rados_mon_op_timeout", "1".to_string()));
        assert_eq!(options[2], ("rados_osd_op_timeout", "5".to_string()));
    }

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

    #[test]
    fn errors_carry_operation_and_errno() {
        let e = RbdError::ceph("open image", "volumes/volume-1", libc::ENOENT);
        assert!(e.is_not_found());
        assert_eq!(e.errno(), libc::ENOENT);
        let text = e.to_string();
        assert!(
            text.starts_with("open image volumes/volume-1: No such file"),
            "{text}"
        );
        assert_eq!(std::io::Error::from(e).kind(), std::io::ErrorKind::NotFound);
        assert!(
            check(-(libc::ETIMEDOUT as i64), "read", || "x".into())
                .unwrap_err()
                .is_timeout()
        );
        assert_eq!(check(7, "read", || "x".into()).unwrap(), 7);
    }

    #[test]
    fn names_with_nul_are_refused_before_any_call() {
        assert_eq!(
            c_string("create image", "a\0b").unwrap_err().errno(),
            libc::EINVAL
        );
    }

    #[test]
    fn a_panicking_callback_is_resumed_after_the_call() {
        let state = CallbackState::new(|_: u64| -> ControlFlow<()> { panic!("boom") });
        assert_eq!(state.run(|f| f(1)), -libc::ECANCELED);
        let result = catch_unwind(AssertUnwindSafe(|| {
            state.finish(-libc::ECANCELED, "diff", String::new)
        }));
        assert!(result.is_err());
        let state = CallbackState::new(|_: u64| ControlFlow::Break(()));
        assert_eq!(state.run(|f| f(1)), -libc::ECANCELED);
        assert!(state.finish(-libc::ECANCELED, "diff", String::new).is_ok());
    }
}
