//! Objects as files of a directory: each written into a new temporary file (a random
//! name, `O_EXCL`, mode 0600), fsynced, then renamed over the name (`put`) or linked to
//! it (`put_if_absent`: `link` fails rather than replace, on NFS and CephFS too), and the
//! directory fsynced. Every file is opened relative to the directory's descriptor, never
//! through a link (`volume/dir.rs`). Temporaries start with `.` and are never listed.

use super::{ObjectStore, bad_name, valid_name};
use crate::volume::dir::Dir;
use std::io::{self, Write};
use std::path::Path;

pub struct DirStore {
    dir: Dir,
}

impl DirStore {
    pub fn open(path: &Path) -> io::Result<DirStore> {
        Ok(DirStore {
            dir: Dir::open(path)?,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    fn temporary(&self, name: &str, bytes: &[u8]) -> io::Result<String> {
        let (tmp, file) = self.dir.create_temporary(&format!(".{name}."), ".tmp")?;
        let written = (&file).write_all(bytes).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = self.dir.remove(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }
}

impl ObjectStore for DirStore {
    fn describe(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn get(&self, name: &str, cap: u64) -> io::Result<Option<Vec<u8>>> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        match self.dir.read_capped(name, cap) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) if crate::volume::dir::is_not_regular(&e) => {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            }
            Err(e) => Err(e),
        }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        let tmp = self.temporary(name, bytes)?;
        if let Err(e) = self.dir.rename(&tmp, name) {
            let _ = self.dir.remove(&tmp);
            return Err(e);
        }
        self.dir.sync()
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> io::Result<bool> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        let tmp = self.temporary(name, bytes)?;
        let linked = self.dir.link(&tmp, name);
        let _ = self.dir.remove(&tmp);
        match linked {
            Ok(()) => self.dir.sync().map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        match self.dir.remove(name) {
            Ok(()) => self.dir.sync(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        Ok(self
            .dir
            .names()?
            .into_iter()
            .filter(|n| n.starts_with(prefix) && !n.starts_with('.') && valid_name(n))
            .collect())
    }
}
