//! A connection to a Ceph cluster as one cephx client, with bounded timeouts. It never
//! changes the connection's configuration once the handle is shared.

use super::ffi::{self, Api};
use super::ioctx::{IoCtx, IoCtxInner};
use super::{
    FEATURE_LAYERING, RbdError, Result, Timeouts, c_string, check, owned_string, parse_features,
};
use std::ffi::c_char;
use std::path::Path;
use std::sync::Arc;

pub(super) struct ClusterInner {
    pub(super) api: &'static Api,
    pub(super) handle: ffi::RadosHandle,
    /// `client.<name>@<conf path>`, for errors.
    pub(super) describe: String,
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
    pub(super) inner: Arc<ClusterInner>,
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
