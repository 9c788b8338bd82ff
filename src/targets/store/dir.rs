//! Objects as files of a directory: each written into a new temporary file (a random
//! name, `O_EXCL`, mode 0600), fsynced, then renamed over the name (`put`) or linked to
//! it (`put_if_absent`: `link` fails rather than replace, on NFS and CephFS too), and the
//! directory fsynced. Every file is opened relative to the directory's descriptor, never
//! through a link (`volume/dir.rs`). Temporaries start with `.` and are never listed.
//!
//! An object rewritten again and again (a heartbeat, `rewrite`) is not given a new file
//! each time:
//! where the file system can swap two names atomically (`RENAME_EXCHANGE`: ext4, XFS,
//! btrfs), the previous file is kept under its temporary name as a spare, rewritten with
//! the next bytes and swapped in (`.<name>.<random>.spare`). So a heartbeat needs no new block, and keeps beating on
//! a full target. A spare is used only while it is a regular file with one link.

use super::{ObjectStore, bad_name, valid_name};
use crate::volume::dir::Dir;
use nix::fcntl::OFlag;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

pub struct DirStore {
    dir: Dir,
    /// Object name → the temporary name of its previous file, kept to be rewritten.
    spares: Mutex<HashMap<String, String>>,
}

impl DirStore {
    pub fn open(path: &Path) -> io::Result<DirStore> {
        Ok(DirStore {
            dir: Dir::open(path)?,
            spares: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A new file holding `bytes`, named `.<name>.<random><suffix>`: `.tmp` for one
    /// that goes at once, `.spare` for one that may stay as the spare of `name`.
    fn temporary(&self, name: &str, bytes: &[u8], suffix: &str) -> io::Result<String> {
        let (tmp, file) = self.dir.create_temporary(&format!(".{name}."), suffix)?;
        let written = (&file).write_all(bytes).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = self.dir.remove(&tmp);
            return Err(e);
        }
        Ok(tmp)
    }
}

impl DirStore {
    /// Rewrites the spare of `name` with `bytes` and swaps it in; false (nothing changed)
    /// when there is no usable spare.
    fn put_by_spare(&self, name: &str, bytes: &[u8]) -> io::Result<bool> {
        let Some(spare) = self.spares.lock().remove(name) else {
            return Ok(false);
        };
        let file = match self.dir.open_file(&spare, OFlag::O_WRONLY) {
            Ok(file) if file.metadata().is_ok_and(|m| m.nlink() == 1) => file,
            // Gone, or another name for it was made: not ours to write any more.
            _ => return Ok(false),
        };
        // Cut short (a full disk), the spare holds neither version: it goes.
        let written = file
            .set_len(0)
            .and_then(|()| (&file).write_all(bytes))
            .and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = self.dir.remove(&spare);
            return Err(e);
        }
        self.swap_in(name, spare)?;
        Ok(true)
    }

    /// Puts the file `tmp` in place of `name`: swapped with the file there (which
    /// becomes the spare), or renamed over it.
    fn swap_in(&self, name: &str, tmp: String) -> io::Result<()> {
        match self.dir.exchange(&tmp, name) {
            Ok(()) => {
                self.spares.lock().insert(name.to_string(), tmp);
                Ok(())
            }
            Err(_) => {
                let renamed = self.dir.rename(&tmp, name);
                if renamed.is_err() {
                    let _ = self.dir.remove(&tmp);
                }
                renamed
            }
        }
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
            Err(e) => Err(e),
        }
    }

    fn put(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        let tmp = self.temporary(name, bytes, ".tmp")?;
        if let Err(e) = self.dir.rename(&tmp, name) {
            let _ = self.dir.remove(&tmp);
            return Err(e);
        }
        // A spare of an earlier rewrite holds older bytes: it goes.
        if let Some(spare) = self.spares.lock().remove(name) {
            let _ = self.dir.remove(&spare);
        }
        self.dir.sync()
    }

    fn rewrite(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        if !self.put_by_spare(name, bytes)? {
            let tmp = self.temporary(name, bytes, ".spare")?;
            self.swap_in(name, tmp)?;
        }
        self.dir.sync()
    }

    fn put_if_absent(&self, name: &str, bytes: &[u8]) -> io::Result<bool> {
        if !valid_name(name) {
            return Err(bad_name(name));
        }
        let tmp = self.temporary(name, bytes, ".tmp")?;
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
        if let Some(spare) = self.spares.lock().remove(name) {
            let _ = self.dir.remove(&spare);
        }
        match self.dir.remove(name) {
            Ok(()) => self.dir.sync(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn remove_leftovers(&self, name: &str) {
        let prefix = format!(".{name}.");
        let ours = self.spares.lock().get(name).cloned();
        let leftovers = self.dir.names_where(|leftover| {
            leftover.starts_with(&prefix)
                && (leftover.ends_with(".tmp") || leftover.ends_with(".spare"))
                && Some(leftover) != ours.as_deref()
        });
        for leftover in leftovers.unwrap_or_default() {
            let _ = self.dir.remove(&leftover);
        }
    }

    fn list(&self, prefix: &str) -> io::Result<Vec<String>> {
        // Filtered as read: the pool of a target holding 100,000 backups has 400,000
        // names, and the nodes' round lists the claims every few seconds (issue 28).
        self.dir
            .names_where(|n| n.starts_with(prefix) && !n.starts_with('.') && valid_name(n))
    }
}
