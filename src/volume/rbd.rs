//! Ceph RBD through librbd in-process (this kernel has neither the rbd module nor NBD):
//! `ffi` loads librados/librbd at run time, `client` is the safe API, `connection` the
//! process's shared connections, `driver` and `device` the `rbd` volume driver, `config`
//! its configuration keys and their checks against the cluster. RBD
//! targets (`target::rbd`) are built on the same connections.

pub mod client;
pub mod config;
pub mod connection;
pub mod device;
pub mod driver;
pub mod ffi;

pub use client::{
    AioDone, AioKind, AioQueue, Cluster, Extent, Image, ImageOptions, ImageStat, IoCtx, Locker,
    ObjectLock, ObjectStat, RbdError, Snapshot, Timeouts, Watcher,
};
pub use config::RbdConfig;
pub use connection::{Connection, PoolSpec};
pub use driver::RbdDriver;
pub use ffi::{LoadError, check_available};
