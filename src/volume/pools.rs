//! Pool directories of the drivers that keep volumes as files (`file`, `qcow2`): which
//! directory a pool is, what it holds by configuration, and the one naming rule for the
//! files in it. A volume pool holds Cinder's `volume-<id>`; a target's pool holds
//! backupfs' own `backup-<id>.img`, a name no volume driver uses, so neither is ever
//! taken for the other. It never creates or removes a file itself.

use super::{Result, VolumeError, is_valid_id};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a pool holds, as the configuration says: a pool named by a target holds backups
/// only and serves no volumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolRole {
    Volumes,
    Backups,
}

const VOLUME_PREFIX: &str = "volume-";
const BACKUP_PREFIX: &str = "backup-";
const BACKUP_SUFFIX: &str = ".img";
/// Temporary snapshots of in-use volumes, beside them: `snapshot-backupfs-<backup-id>`.
pub const SNAPSHOT_PREFIX: &str = "snapshot-backupfs-";

/// The file name of object `id` in a pool of `role`.
pub fn object_file_name(role: PoolRole, id: &str) -> String {
    match role {
        PoolRole::Volumes => format!("{VOLUME_PREFIX}{id}"),
        PoolRole::Backups => format!("{BACKUP_PREFIX}{id}{BACKUP_SUFFIX}"),
    }
}

/// The object ID a file name stands for in a pool of `role`; None for any other file.
pub fn object_id(role: PoolRole, file_name: &str) -> Option<&str> {
    let id = match role {
        PoolRole::Volumes => file_name.strip_prefix(VOLUME_PREFIX)?,
        PoolRole::Backups => file_name
            .strip_prefix(BACKUP_PREFIX)?
            .strip_suffix(BACKUP_SUFFIX)?,
    };
    is_valid_id(id).then_some(id)
}

/// The pools of one backend, by name.
#[derive(Debug, Clone)]
pub struct PoolDirs {
    backend: String,
    pools: BTreeMap<String, (PathBuf, PoolRole)>,
}

impl PoolDirs {
    /// `backup_pools` are the pools targets store backups in.
    pub fn new(
        backend: &str,
        pools: &BTreeMap<String, PathBuf>,
        backup_pools: &[String],
    ) -> PoolDirs {
        let pools = pools
            .iter()
            .map(|(name, dir)| {
                let role = if backup_pools.contains(name) {
                    PoolRole::Backups
                } else {
                    PoolRole::Volumes
                };
                (name.clone(), (dir.clone(), role))
            })
            .collect();
        PoolDirs {
            backend: backend.to_string(),
            pools,
        }
    }

    pub fn backend(&self) -> &str {
        &self.backend
    }

    pub fn names(&self) -> Vec<String> {
        self.pools.keys().cloned().collect()
    }

    fn entry(&self, pool: &str) -> Result<&(PathBuf, PoolRole)> {
        self.pools
            .get(pool)
            .ok_or_else(|| VolumeError::NoPool(format!("{}/{pool}", self.backend)))
    }

    pub fn dir(&self, pool: &str) -> Result<&Path> {
        Ok(&self.entry(pool)?.0)
    }

    pub fn role(&self, pool: &str) -> Result<PoolRole> {
        Ok(self.entry(pool)?.1)
    }

    /// The file of object `id` (a volume, or a backup in a target's pool).
    pub fn object_path(&self, pool: &str, id: &str) -> Result<PathBuf> {
        // Callers validate IDs; this is the last guard before a path is built.
        if !is_valid_id(id) {
            return Err(VolumeError::NotFound(id.to_string()));
        }
        let (dir, role) = self.entry(pool)?;
        Ok(dir.join(object_file_name(*role, id)))
    }

    /// The file of a temporary snapshot `name` (made by the engine, always
    /// `snapshot-backupfs-<backup-id>`).
    pub fn snapshot_path(&self, pool: &str, name: &str) -> Result<PathBuf> {
        if !is_valid_id(name) || !name.starts_with(SNAPSHOT_PREFIX) {
            return Err(VolumeError::NotFound(name.to_string()));
        }
        Ok(self.dir(pool)?.join(name))
    }

    /// The objects of a pool: (ID, path), for the files named by the pool's role only.
    pub fn list(&self, pool: &str) -> Result<Vec<(String, PathBuf)>> {
        let (dir, role) = self.entry(pool)?;
        let entries = std::fs::read_dir(dir).map_err(|e| VolumeError::io("list", dir, e))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            if let Some(id) = name.to_str().and_then(|n| object_id(*role, n)) {
                found.push((id.to_string(), entry.path()));
            }
        }
        found.sort();
        Ok(found)
    }

    /// Deletes object `id`'s file; one that is gone already is fine.
    pub fn remove_object(&self, pool: &str, id: &str) -> Result<()> {
        super::file::remove_volume_file(&self.object_path(pool, id)?)
    }

    /// A snapshot of object `id` as a reflink of its file, `name` beside it.
    pub fn reflink_snapshot(&self, pool: &str, id: &str, name: &str) -> Result<()> {
        super::file::reflink_snapshot(
            &self.backend,
            pool,
            id,
            &self.object_path(pool, id)?,
            &self.snapshot_path(pool, name)?,
        )
    }

    /// A new object `new_id` as a reflink of `source_id`'s file (same bytes, shared
    /// blocks); false where the filesystem has no reflinks.
    pub fn reflink_object(&self, pool: &str, source_id: &str, new_id: &str) -> Result<bool> {
        let (source, dest) = (
            self.object_path(pool, source_id)?,
            self.object_path(pool, new_id)?,
        );
        match super::file::reflink_copy(&source, &dest) {
            Ok(()) => Ok(true),
            Err(e) if super::file::is_no_reflink(&e) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(VolumeError::NotFound(source_id.to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(VolumeError::Exists(new_id.to_string()))
            }
            Err(e) => Err(VolumeError::io("clone", dest, e)),
        }
    }

    /// Removes snapshot `name`; one that is gone already is fine.
    pub fn remove_snapshot(&self, pool: &str, name: &str) -> Result<()> {
        super::file::remove_snapshot_file(&self.snapshot_path(pool, name)?)
    }

    /// What reflinks allow in a pool (probed: a pool on ext4 has none): snapshots, and
    /// volumes that share their data.
    pub fn reflink_capabilities(&self, pool: &str) -> super::Capabilities {
        let reflinks = self
            .dir(pool)
            .map_err(|e| e.to_string())
            .and_then(|dir| super::file::reflink_support(&self.backend, pool, dir));
        super::Capabilities {
            shares_data: reflinks.is_ok(),
            snapshots: reflinks,
        }
    }

    /// Sets (None: removes) the note `key` of object `id`: an extended attribute
    /// `user.backupfs.<key>` of its file. A filesystem without user attributes keeps none.
    pub fn set_note(&self, pool: &str, id: &str, key: &str, value: Option<&str>) -> Result<()> {
        let path = self.object_path(pool, id)?;
        let name = format!("user.backupfs.{key}");
        let done = match value {
            Some(value) => xattr::set(&path, &name, value.as_bytes()),
            None => xattr::remove(&path, &name),
        };
        match done {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(VolumeError::NotFound(id.to_string()))
            }
            Err(e) => Err(VolumeError::io("note", path, e)),
            Ok(()) => Ok(()),
        }
    }

    /// The note `key` of object `id`.
    pub fn note(&self, pool: &str, id: &str, key: &str) -> Result<Option<String>> {
        let path = self.object_path(pool, id)?;
        match xattr::get(&path, &format!("user.backupfs.{key}")) {
            Ok(value) => Ok(Some(String::from_utf8_lossy(&value).into_owned())),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => {
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(VolumeError::NotFound(id.to_string()))
            }
            Err(e) => Err(VolumeError::io("note", path, e)),
        }
    }

    /// Bytes free for new data in a pool's filesystem.
    pub fn free_space(&self, pool: &str) -> Result<Option<u64>> {
        let dir = self.dir(pool)?;
        let stat = nix::sys::statvfs::statvfs(dir)
            .map_err(|e| VolumeError::io("statvfs", dir, e.into()))?;
        Ok(Some(
            stat.blocks_available() as u64 * stat.fragment_size() as u64,
        ))
    }
}

/// Extended attributes of a file, by path.
mod xattr {
    use std::ffi::CString;
    use std::io;
    use std::os::unix::ffi::OsStrExt;
    use std::path::Path;

    fn c(text: &[u8]) -> io::Result<CString> {
        CString::new(text).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    pub fn set(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
        let (path, name) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
        // SAFETY: valid C strings and a buffer of value.len() bytes.
        let rc = unsafe {
            libc::setxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn remove(path: &Path, name: &str) -> io::Result<()> {
        let (path, name) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
        // SAFETY: valid C strings.
        if unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn get(path: &Path, name: &str) -> io::Result<Vec<u8>> {
        let (path, name) = (c(path.as_os_str().as_bytes())?, c(name.as_bytes())?);
        let mut value = vec![0u8; 4096];
        // SAFETY: valid C strings and a buffer of value.len() bytes.
        let n = unsafe {
            libc::getxattr(
                path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        value.truncate(n as usize);
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_and_backups_never_share_a_name() {
        let id = "0c1e2f3a-aaaa-4bbb-8ccc-123456789abc";
        let volume = object_file_name(PoolRole::Volumes, id);
        let backup = object_file_name(PoolRole::Backups, id);
        assert_eq!(volume, format!("volume-{id}"));
        assert_eq!(backup, format!("backup-{id}.img"));
        assert_eq!(object_id(PoolRole::Volumes, &volume), Some(id));
        assert_eq!(object_id(PoolRole::Backups, &backup), Some(id));
        assert_eq!(object_id(PoolRole::Backups, &volume), None);
        assert_eq!(object_id(PoolRole::Volumes, &backup), None);
        assert_eq!(object_id(PoolRole::Backups, "backup-x.json"), None);
        assert_eq!(object_id(PoolRole::Volumes, "volume-../x"), None);
        assert_eq!(object_id(PoolRole::Volumes, ".volume-a"), None);
    }
}
