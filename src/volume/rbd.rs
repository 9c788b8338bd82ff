//! Ceph RBD through librbd in-process (this kernel has neither the rbd module nor NBD):
//! `ffi` loads librados/librbd at run time, `client` is the safe API the `rbd` volume
//! driver and RBD targets are built on. Nothing here knows about volumes or backups.

pub mod ffi;

pub use ffi::{LoadError, check_available};
