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
//!
//! # Files
//! This file holds what every handle shares (errors, timeouts, feature bits, C strings);
//! `cluster` the connection, `ioctx` pools with their objects and locks, `image` open
//! images (extents, snapshots, metadata), `callback` the calls librbd makes back into
//! Rust, `aio` requests in flight.

mod aio;
mod callback;
mod cluster;
mod image;
mod ioctx;

pub use aio::{AioDone, AioKind, AioQueue, PendingWrite};
pub use cluster::Cluster;
pub use image::{Extent, Image, Snapshot, Watcher};
pub use ioctx::{ImageOptions, ImageStat, IoCtx, Locker, ObjectLock, ObjectStat};

use super::ffi;
use std::ffi::{CStr, CString, c_char};
use std::time::Duration;

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
}
