//! Objects in a RADOS pool (or namespace): each written whole (`write_full`, atomic on
//! the OSD), created with an exclusive create, listed by prefix.

use super::{ObjectStore, bad_name, valid_name};
use crate::volume::rbd::client::{IoCtx, RbdError};
use std::io;

pub struct RadosStore {
    io: IoCtx,
}

impl RadosStore {
    pub fn new(io: IoCtx) -> RadosStore {
        RadosStore { io }
    }
}

/// Keeps the errno (what callers decide on) and the message (what the log shows).
fn io_error(e: RbdError) -> io::Error {
    let errno = e.errno();
    let error = io::Error::from_raw_os_error(errno);
    io::Error::new(error.kind(), format!("{e} (errno {errno})"))
}

impl ObjectStore for RadosStore {
    fn describe(&self) -> String {
        format!("rbd:{}", self.io.location())
    }

    fn get(&self, name: &str, cap: u64) -> io::Result<Option<Vec<u8>>> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        match self.io.stat_object(name) {
            Ok(stat) if stat.size > cap => return Err(io::Error::from_raw_os_error(libc::EFBIG)),
            Ok(_) => {}
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(io_error(e)),
        }
        match self.io.read_object(name) {
            Ok(bytes) if bytes.len() as u64 > cap => Err(io::Error::from_raw_os_error(libc::EFBIG)),
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        self.io.write_object(name, bytes).map_err(io_error)
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> io::Result<bool> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        match self.io.create_object(name, bytes) {
            Ok(()) => Ok(true),
            Err(e) if e.is_exists() => Ok(false),
            Err(e) => Err(io_error(e)),
        }
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        match self.io.remove_object(name) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(io_error(e)),
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        self.io.list_objects(prefix).map_err(io_error)
    }
}
