//! Pool directories of the drivers that keep volumes as files (`file`, `qcow2`): which
//! directory a pool is, what it holds by configuration, and the one naming rule for the
//! files in it. A volume pool holds Cinder's `volume-<id>`; a target's pool holds
//! backupfs' own `backup-<id>.img`, a name no volume driver uses, so neither is ever
//! taken for the other. Every file in a pool is opened relative to
//! the pool's directory descriptor (`dir.rs`): a link or a special file planted under a
//! volume's name is no volume. It never creates or removes a file on its own.

use super::dir::{Dir, is_not_regular, xattr};
use super::{Result, VolumeError, is_valid_id};
use nix::fcntl::OFlag;
use nix::sys::stat::FileStat;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// `[backends.<name>]` of a driver whose pools are directories (`file`, `qcow2`, `block`):
/// pool name → absolute path of the directory.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirPoolsConfig {
    pub pools: BTreeMap<String, PathBuf>,
}

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
    /// Names refused as not regular files and logged already: a listing logs each once.
    skipped: Arc<Mutex<HashSet<PathBuf>>>,
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
            skipped: Arc::default(),
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

    /// The pool's directory, open: every file of the pool is opened relative to it.
    fn open_dir(&self, pool: &str) -> Result<Dir> {
        let dir = self.dir(pool)?;
        Dir::open(dir).map_err(|e| VolumeError::io("open pool", dir, e))
    }

    /// [`PoolDirs::open_dir`], for a look at object `id`: a pool directory that is gone
    /// holds no such object (so `find` goes on to the next pool, as a stat by path did).
    fn open_dir_for(&self, pool: &str, id: &str) -> Result<Dir> {
        match self.open_dir(pool) {
            Err(VolumeError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err(VolumeError::NotFound(id.to_string()))
            }
            other => other,
        }
    }

    /// The file name of object `id` (a volume, or a backup in a target's pool).
    fn object_name(&self, pool: &str, id: &str) -> Result<String> {
        // Callers validate IDs; this is the last guard before a name is built.
        if !is_valid_id(id) {
            return Err(VolumeError::NotFound(id.to_string()));
        }
        Ok(object_file_name(self.role(pool)?, id))
    }

    /// The file name of a temporary snapshot `name` (made by the engine, always
    /// `snapshot-backupfs-<backup-id>`).
    fn snapshot_name<'a>(&self, name: &'a str) -> Result<&'a str> {
        if !is_valid_id(name) || !name.starts_with(SNAPSHOT_PREFIX) {
            return Err(VolumeError::NotFound(name.to_string()));
        }
        Ok(name)
    }

    /// Where object `id` is, for messages and for the tools that take a path (qemu-img);
    /// backupfs itself opens it with [`PoolDirs::open_object`].
    pub fn object_path(&self, pool: &str, id: &str) -> Result<PathBuf> {
        Ok(self.dir(pool)?.join(self.object_name(pool, id)?))
    }

    /// Where temporary snapshot `name` is (see [`PoolDirs::object_path`]).
    pub fn snapshot_path(&self, pool: &str, name: &str) -> Result<PathBuf> {
        Ok(self.dir(pool)?.join(self.snapshot_name(name)?))
    }

    /// What a failed look at `what` (object or snapshot `id`, at `path`) means: a name
    /// that is gone, or is not a regular file (a link, a FIFO, a device someone put in
    /// the pool), is no volume of ours (`NotFound`, ENOENT at the mount). `quiet`: a
    /// listing or a stat, logged once per name for the daemon's life, where an operation
    /// on the name is logged each time.
    fn refused(
        &self,
        op: &'static str,
        id: &str,
        path: PathBuf,
        e: io::Error,
        quiet: bool,
    ) -> VolumeError {
        if e.kind() == io::ErrorKind::NotFound {
            return VolumeError::NotFound(id.to_string());
        }
        if is_not_regular(&e) {
            if !quiet || self.skipped.lock().insert(path.clone()) {
                tracing::warn!("{} {e}: not a volume, refused ({op})", path.display());
            }
            return VolumeError::NotFound(id.to_string());
        }
        VolumeError::io(op, path, e)
    }

    /// The objects of a pool: (ID, path), for the regular files named by the pool's role
    /// only (a link or a special file under such a name is skipped, and logged once).
    pub fn list(&self, pool: &str) -> Result<Vec<(String, PathBuf)>> {
        Ok(self
            .list_stats(pool)?
            .into_iter()
            .map(|(id, path, _)| (id, path))
            .collect())
    }

    /// Names in the pool that start with volume `id`'s file name and a dot: Cinder's
    /// RemoteFS snapshot overlays (`volume-<id>.<snapshot-id>`) and their info file.
    pub fn overlays(&self, pool: &str, id: &str) -> Result<Vec<String>> {
        let prefix = format!("{}.", self.object_name(pool, id)?);
        let dir = self.open_dir_for(pool, id)?;
        let mut found = dir
            .names_where(|name| name.starts_with(&prefix) && !name.ends_with(".info"))
            .map_err(|e| VolumeError::io("list", dir.path(), e))?;
        found.sort();
        Ok(found)
    }

    /// The ids of [`PoolDirs::list`] as the names give them, sorted: no file is looked at
    /// (a name that is not a regular file is listed too).
    pub fn list_ids(&self, pool: &str) -> Result<Vec<String>> {
        let role = self.role(pool)?;
        let dir = self.open_dir(pool)?;
        let mut ids = Vec::new();
        dir.for_each_name(|name| {
            if let Some(id) = object_id(role, name) {
                ids.push(id.to_string());
            }
        })
        .map_err(|e| VolumeError::io("list", dir.path(), e))?;
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// [`PoolDirs::list`], with what each file is (from the same look at it).
    pub fn list_stats(&self, pool: &str) -> Result<Vec<(String, PathBuf, FileStat)>> {
        let role = self.role(pool)?;
        let dir = self.open_dir(pool)?;
        let names = dir
            .names_where(|name| object_id(role, name).is_some())
            .map_err(|e| VolumeError::io("list", dir.path(), e))?;
        let mut found = Vec::new();
        for name in names {
            let Some(id) = object_id(role, &name) else {
                continue;
            };
            match dir.stat_regular(&name) {
                Ok(stat) => found.push((id.to_string(), dir.join(&name), stat)),
                // Gone since readdir: not listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.refused("list", id, dir.join(&name), e, true);
                }
            }
        }
        found.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(found)
    }

    /// What object `id`'s file is (a regular file, never what a link points at).
    pub fn stat_object(&self, pool: &str, id: &str) -> Result<FileStat> {
        let (dir, name) = (self.open_dir_for(pool, id)?, self.object_name(pool, id)?);
        dir.stat_regular(&name)
            .map_err(|e| self.refused("stat", id, dir.join(&name), e, true))
    }

    /// Opens object `id`'s file with `flags` (see [`Dir::open_file`]); `op` names the
    /// operation in messages.
    pub fn open_object(
        &self,
        op: &'static str,
        pool: &str,
        id: &str,
        flags: OFlag,
    ) -> Result<(File, PathBuf)> {
        let (dir, name) = (self.open_dir_for(pool, id)?, self.object_name(pool, id)?);
        match dir.open_file(&name, flags) {
            Ok(file) => Ok((file, dir.join(&name))),
            Err(e) => Err(self.refused(op, id, dir.join(&name), e, false)),
        }
    }

    /// Opens temporary snapshot `name` for reading (see [`PoolDirs::open_object`]).
    pub fn open_snapshot(&self, pool: &str, name: &str, flags: OFlag) -> Result<(File, PathBuf)> {
        let (dir, file_name) = (self.open_dir_for(pool, name)?, self.snapshot_name(name)?);
        match dir.open_file(file_name, flags) {
            Ok(file) => Ok((file, dir.join(file_name))),
            Err(e) => Err(self.refused("open snapshot", name, dir.join(file_name), e, false)),
        }
    }

    /// Creates object `id`'s file, new (O_EXCL: `Exists` if anything has the name),
    /// mode 0600, open for reading and writing.
    pub fn create_object(&self, pool: &str, id: &str) -> Result<(File, PathBuf)> {
        let (dir, name) = (self.open_dir(pool)?, self.object_name(pool, id)?);
        match dir.create_new(&name, OFlag::O_RDWR, 0o600) {
            Ok(file) => Ok((file, dir.join(&name))),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(VolumeError::Exists(id.to_string()))
            }
            Err(e) => Err(VolumeError::io("create", dir.join(&name), e)),
        }
    }

    /// Deletes object `id`'s name (a link is removed, never what it points at); one that
    /// is gone already is fine.
    pub fn remove_object(&self, pool: &str, id: &str) -> Result<()> {
        let name = self.object_name(pool, id)?;
        match self.open_dir_for(pool, id) {
            Ok(dir) => remove_name(&dir, &name, "delete"),
            Err(VolumeError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// A snapshot of object `id` as a reflink of its file, `name` beside it.
    pub fn reflink_snapshot(&self, pool: &str, id: &str, name: &str) -> Result<()> {
        let (source, _) = self.open_object("snapshot", pool, id, OFlag::O_RDONLY)?;
        let dir = self.open_dir(pool)?;
        let snapshot = self.snapshot_name(name)?;
        super::file::reflink_copy(&source, &dir, snapshot).map_err(|e| {
            if super::file::is_no_reflink(&e) {
                VolumeError::SnapshotUnsupported(format!(
                    "pool {}/{pool} ({}) has no reflinks: {e}",
                    self.backend,
                    dir.path().display()
                ))
            } else {
                VolumeError::io("snapshot", dir.join(snapshot), e)
            }
        })
    }

    /// A new object `new_id` as a reflink of `source_id`'s file (same bytes, shared
    /// blocks); false where the filesystem has no reflinks.
    pub fn reflink_object(&self, pool: &str, source_id: &str, new_id: &str) -> Result<bool> {
        let (source, _) = self.open_object("clone", pool, source_id, OFlag::O_RDONLY)?;
        let (dir, name) = (self.open_dir(pool)?, self.object_name(pool, new_id)?);
        match super::file::reflink_copy(&source, &dir, &name) {
            Ok(()) => Ok(true),
            Err(e) if super::file::is_no_reflink(&e) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(VolumeError::Exists(new_id.to_string()))
            }
            Err(e) => Err(VolumeError::io("clone", dir.join(&name), e)),
        }
    }

    /// Removes snapshot `name`; one that is gone already is fine.
    pub fn remove_snapshot(&self, pool: &str, name: &str) -> Result<()> {
        let file_name = self.snapshot_name(name)?;
        match self.open_dir_for(pool, name) {
            Ok(dir) => remove_name(&dir, file_name, "delete snapshot"),
            Err(VolumeError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
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
    /// `user.backupfs.<key>` of its file, set on the descriptor. A filesystem without user
    /// attributes keeps none.
    pub fn set_note(&self, pool: &str, id: &str, key: &str, value: Option<&str>) -> Result<()> {
        let (file, path) = self.open_object("note", pool, id, OFlag::O_RDONLY)?;
        let name = format!("user.backupfs.{key}");
        let done = match value {
            Some(value) => xattr::set(&file, &name, value.as_bytes()),
            None => xattr::remove(&file, &name),
        };
        match done {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => Ok(()),
            Err(e) => Err(VolumeError::io("note", path, e)),
            Ok(()) => Ok(()),
        }
    }

    /// The note `key` of object `id`.
    pub fn note(&self, pool: &str, id: &str, key: &str) -> Result<Option<String>> {
        let (file, path) = self.open_object("note", pool, id, OFlag::O_RDONLY)?;
        match xattr::get(&file, &format!("user.backupfs.{key}")) {
            Ok(value) => Ok(Some(String::from_utf8_lossy(&value).into_owned())),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA | libc::EOPNOTSUPP)) => {
                Ok(None)
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

/// Removes `name` from `dir`; gone already is fine.
fn remove_name(dir: &Dir, name: &str, op: &'static str) -> Result<()> {
    match dir.remove(name) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(VolumeError::io(op, dir.join(name), e)),
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
