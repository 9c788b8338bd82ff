//! Ceph RBD through librbd in-process (this kernel has neither the rbd module nor NBD):
//! `ffi` loads librados/librbd at run time, `client` is the safe API the `rbd` volume
//! driver and RBD targets are built on. Nothing here knows about volumes or backups.

pub mod client;
pub mod ffi;

pub use client::{
    AioDone, AioKind, AioQueue, Cluster, Extent, Image, ImageOptions, ImageStat, IoCtx, ObjectLock,
    ObjectStat, RbdError, Snapshot, Timeouts, Watcher,
};
pub use ffi::{LoadError, check_available};
