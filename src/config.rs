//! The TOML configuration (README.md, "Configuration reference"), parsed into typed
//! structs and checked against the spec's storage rules before anything is mounted.
//! It never touches volume data nor writes anything: it reads directory metadata, and
//! for `rbd` backends connects to the cluster to read pool ids and claim markers.

use crate::volume::rbd::{Connection, PoolSpec};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const DEFAULT_PATH: &str = "/etc/backupfs/backupfs.toml";

/// A configuration error always names the key it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// Every error of a configuration, one per line.
    #[error("{}", lines(.0))]
    Several(Vec<ConfigError>),
}

fn lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The machine's host name (the kernel's, as `hostname` prints it).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_parallel")]
    pub max_parallel_jobs: usize,
    #[serde(default)]
    pub copy_bps_limit: u64,
    #[serde(default)]
    pub allow_other: bool,
    #[serde(default)]
    pub admin_group: String,
    #[serde(default = "default_true")]
    pub verify_reads: bool,
    /// This daemon's name among the nodes that serve the same targets (default: the host
    /// name); records say which node made a backup.
    #[serde(default)]
    pub node: Option<String>,
    /// How long a node's claim on a backup in progress outlives its last renewal: another
    /// node takes the backup over (records it `error`, removes its partial data) once the
    /// claim has not changed for this long.
    #[serde(default = "default_lease")]
    pub lease_seconds: u64,
    #[serde(default)]
    pub backends: BTreeMap<String, BackendConfig>,
    #[serde(default)]
    pub targets: BTreeMap<String, TargetConfig>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/backupfs")
}
fn default_parallel() -> usize {
    4
}
fn default_true() -> bool {
    true
}
fn default_lease() -> u64 {
    30
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    /// Block devices (or links to them) named `volume-<id>` in a directory (LVM's
    /// `/dev/<vg>/`): volumes only, never a target.
    Block,
    File,
    Qcow2,
    Rbd,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub driver: DriverKind,
    /// Pool name → directory (`file`, `qcow2`) or `pool[/namespace]` (`rbd`).
    pub pools: BTreeMap<String, PathBuf>,
    /// `rbd`: the cluster's configuration file (monitors, keyring).
    #[serde(default)]
    pub ceph_conf: Option<PathBuf>,
    /// `rbd`: the cephx user (`client.<name>`).
    #[serde(default)]
    pub client: Option<String>,
    /// `rbd`: seconds any one request to the cluster may wait (connect, monitors, OSDs).
    #[serde(default)]
    pub timeout: Option<u64>,
}

pub const DEFAULT_CEPH_CONF: &str = "/etc/ceph/ceph.conf";
pub const DEFAULT_CEPH_CLIENT: &str = "admin";
/// Seconds; librbd operations take up to three requests in a row, so a request of a
/// stalled cluster fails well within two minutes.
pub const DEFAULT_RBD_TIMEOUT: u64 = 30;
const MAX_RBD_TIMEOUT: u64 = 30;

impl BackendConfig {
    pub fn ceph_conf(&self) -> PathBuf {
        self.ceph_conf
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CEPH_CONF))
    }

    pub fn ceph_client(&self) -> &str {
        self.client.as_deref().unwrap_or(DEFAULT_CEPH_CLIENT)
    }

    pub fn rbd_timeouts(&self) -> crate::volume::rbd::Timeouts {
        let each = std::time::Duration::from_secs(self.timeout.unwrap_or(DEFAULT_RBD_TIMEOUT));
        crate::volume::rbd::Timeouts {
            connect: each,
            mon_op: each,
            osd_op: each,
        }
    }

    /// The `rbd` pool spec of `pool` (checked by `validate`).
    pub fn rbd_pool(&self, backend: &str, pool: &str) -> Result<PoolSpec, ConfigError> {
        let key = format!("backends.{backend}.pools.{pool}");
        let text = self
            .pools
            .get(pool)
            .ok_or_else(|| invalid(&key, "no such pool"))?;
        let text = text.to_str().ok_or_else(|| invalid(&key, "not UTF-8"))?;
        PoolSpec::parse(text).map_err(|reason| invalid(key, reason))
    }

    /// The connection of an `rbd` backend (shared by the whole process); an error names
    /// the key at fault: the library (`driver`), the conf file or an unreachable
    /// cluster (`ceph_conf`), a refused user or key (`client`).
    pub fn rbd_connect(&self, backend: &str) -> Result<Arc<Connection>, ConfigError> {
        let key = |k: &str| format!("backends.{backend}.{k}");
        crate::volume::rbd::check_available().map_err(|e| invalid(key("driver"), e.to_string()))?;
        let conf = self.ceph_conf();
        let client = self.ceph_client();
        let timeouts = self.rbd_timeouts();
        crate::volume::rbd::connection::connect(&conf, client, timeouts).map_err(|e| {
            let (which, why) = match e.errno() {
                libc::ETIMEDOUT => (
                    "ceph_conf",
                    format!(
                        "no monitor of {} answered within {} s (mon host in that file)",
                        conf.display(),
                        timeouts.connect.as_secs()
                    ),
                ),
                libc::EACCES | libc::EPERM => (
                    "client",
                    format!("the cluster refused client.{client}: unknown user or wrong key"),
                ),
                libc::ENOENT if e.to_string().starts_with("read conf") => {
                    ("ceph_conf", format!("cannot read {}", conf.display()))
                }
                libc::ENOENT => (
                    "client",
                    format!(
                        "no keyring for client.{client} (the keyring named in {}, or /etc/ceph/ceph.client.{client}.keyring)",
                        conf.display()
                    ),
                ),
                _ => ("ceph_conf", "cannot connect".to_string()),
            };
            invalid(key(which), format!("{why}: {e}"))
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub backend: String,
    pub pool: String,
    /// Per volume, the newest available backups kept; older ones are deleted after each
    /// successful backup. 0 keeps all.
    #[serde(default)]
    pub keep_last: u32,
    /// The target key file (`backupfs keygen`), the same on every node serving the target:
    /// records and their checksums are then authenticated. Without one they are not.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

impl TargetConfig {
    /// The key of target `name`, if it names one: a regular file of root's (the user
    /// running backupfs) that group and others cannot read or write.
    pub fn load_key(
        &self,
        name: &str,
    ) -> Result<Option<crate::targets::auth::TargetKey>, ConfigError> {
        let Some(path) = &self.key else {
            return Ok(None);
        };
        let key = format!("targets.{name}.key");
        if !path.is_absolute() {
            return Err(invalid(
                key,
                format!("{} is not an absolute path", path.display()),
            ));
        }
        crate::targets::auth::TargetKey::load(path)
            .map(Some)
            .map_err(|e| invalid(key, e.to_string()))
    }
}

/// Why someone other than root may change the directory at `path`: not root's, or
/// writable by its group or others; None when only root may.
fn writable_by_others(path: &Path) -> Option<String> {
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) => return Some(format!("cannot be checked ({e})")),
    };
    if meta.uid() != 0 {
        return Some(format!("is owned by uid {}, not root", meta.uid()));
    }
    if meta.mode() & 0o022 != 0 {
        return Some(format!(
            "is writable by its group or others (mode {:o})",
            meta.mode() & 0o7777
        ));
    }
    None
}

/// Where a directory really is: its canonical path and its device and inode, so that a
/// symlink or a bind mount of the same directory is recognised.
#[derive(Debug, Clone)]
struct Place {
    key: String,
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Place {
    fn of(key: String, path: &Path) -> Result<Place, ConfigError> {
        if !path.is_absolute() {
            return Err(invalid(
                key,
                format!("{} is not an absolute path", path.display()),
            ));
        }
        let canonical = path
            .canonicalize()
            .map_err(|e| invalid(&key, format!("{}: {e}", path.display())))?;
        let meta = std::fs::metadata(&canonical)
            .map_err(|e| invalid(&key, format!("{}: {e}", path.display())))?;
        if !meta.is_dir() {
            return Err(invalid(
                key,
                format!("{} is not a directory", path.display()),
            ));
        }
        // Reading the directory proves we may list volumes in it.
        std::fs::read_dir(&canonical)
            .map_err(|e| invalid(&key, format!("{} is not readable: {e}", path.display())))?;
        Ok(Place {
            key,
            path: canonical,
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Same directory, or one inside the other.
    fn overlaps(&self, other: &Place) -> bool {
        (self.dev == other.dev && self.ino == other.ino)
            || self.path.starts_with(&other.path)
            || other.path.starts_with(&self.path)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses without looking at the disk.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            message: e.to_string(),
        })
    }

    /// This daemon's node name: `node`, else the host name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(host_name)
    }

    pub fn lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.lease_seconds)
    }

    /// What `check-config` says of a valid configuration besides `ok`: one line per target
    /// without a key.
    pub fn notes(&self) -> Vec<String> {
        self.targets
            .iter()
            .filter(|(_, target)| target.key.is_none())
            .map(|(name, _)| format!("target {name}: no key: records are not authenticated"))
            .collect()
    }

    /// The storage rules of the spec, checked against the real directories. Every error
    /// is found in one run (`ConfigError::Several` when there is more than one).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        self.check(&mut errors);
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Several(errors)),
        }
    }

    fn check(&self, errors: &mut Vec<ConfigError>) {
        if self.max_parallel_jobs == 0 || self.max_parallel_jobs > 64 {
            errors.push(invalid("max_parallel_jobs", "must be between 1 and 64"));
        }
        if let Some(node) = &self.node
            && !crate::targets::lease::valid_node(node)
        {
            errors.push(invalid(
                "node",
                "must be 1 to 64 letters, digits, '.', '-' or '_'",
            ));
        }
        if self.node.is_none() && !crate::targets::lease::valid_node(&host_name()) {
            errors.push(invalid(
                "node",
                format!(
                    "the host name {:?} cannot name a node: set node",
                    host_name()
                ),
            ));
        }
        if !(3..=3600).contains(&self.lease_seconds) {
            errors.push(invalid("lease_seconds", "must be between 3 and 3600"));
        }
        if !self.state_dir.is_absolute() {
            errors.push(invalid("state_dir", "must be an absolute path"));
        }
        if !self.admin_group.is_empty() && self.admin_gid().is_none() {
            errors.push(invalid(
                "admin_group",
                format!("no such group {:?}", self.admin_group),
            ));
        }
        if self.backends.is_empty() {
            errors.push(invalid("backends", "at least one backend is needed"));
        }
        for (name, backend) in &self.backends {
            if !crate::volume::is_valid_id(name) {
                errors.push(invalid(format!("backends.{name}"), "not a valid name"));
            }
            if backend.pools.is_empty() {
                errors.push(invalid(format!("backends.{name}.pools"), "no pools"));
            }
            for pool in backend.pools.keys() {
                if !crate::volume::is_valid_id(pool) {
                    errors.push(invalid(
                        format!("backends.{name}.pools.{pool}"),
                        "not a valid name",
                    ));
                }
            }
            if backend.driver != DriverKind::Rbd {
                for (set, key) in [
                    (backend.ceph_conf.is_some(), "ceph_conf"),
                    (backend.client.is_some(), "client"),
                    (backend.timeout.is_some(), "timeout"),
                ] {
                    if set {
                        errors.push(invalid(
                            format!("backends.{name}.{key}"),
                            "only for driver = \"rbd\"",
                        ));
                    }
                }
            }
        }
        let mut target_pools: Vec<(String, Place)> = Vec::new();
        for (name, target) in &self.targets {
            let key = format!("targets.{name}");
            if !crate::volume::is_valid_id(name) {
                errors.push(invalid(key, "not a valid name"));
                continue;
            }
            if let Err(e) = target.load_key(name) {
                errors.push(e);
            }
            let Some(backend) = self.backends.get(&target.backend) else {
                errors.push(invalid(
                    format!("{key}.backend"),
                    format!("no backend {:?}", target.backend),
                ));
                continue;
            };
            let Some(dir) = backend.pools.get(&target.pool) else {
                errors.push(invalid(
                    format!("{key}.pool"),
                    format!(
                        "backend {:?} has no pool {:?}: a target needs a pool of its own",
                        target.backend, target.pool
                    ),
                ));
                continue;
            };
            if backend.driver == DriverKind::Rbd {
                // Checked against the cluster below.
                continue;
            }
            if backend.driver == DriverKind::Block {
                // Backups are files; a block pool holds devices only.
                errors.push(invalid(
                    format!("{key}.pool"),
                    format!(
                        "backends.{}.pools.{} is a pool of driver = \"block\" (devices): it cannot hold backups; give the target a pool of a \"file\", \"qcow2\" or \"rbd\" backend",
                        target.backend, target.pool
                    ),
                ));
                continue;
            }
            let pool_key = format!("backends.{}.pools.{}", target.backend, target.pool);
            let place = match Place::of(pool_key.clone(), dir) {
                Ok(place) => place,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            // A pool holding anything backupfs did not make is never a target: backups
            // there would sit among (and be mistaken for) someone else's files.
            if let Err(e) = crate::targets::claim::inspect(&place.path, name) {
                errors.push(invalid(
                    format!("{key}.pool"),
                    format!("{pool_key} ({}) {e}", place.path.display()),
                ));
                continue;
            }
            if let Some((other, _)) = target_pools.iter().find(|(_, p)| p.overlaps(&place)) {
                errors.push(invalid(
                    format!("{key}.pool"),
                    format!("targets.{other} already stores backups in {pool_key}"),
                ));
                continue;
            }
            target_pools.push((name.clone(), place));
        }
        let mut volume_pools: Vec<Place> = Vec::new();
        for (name, backend) in &self.backends {
            if backend.driver == DriverKind::Rbd {
                continue;
            }
            for (pool, dir) in &backend.pools {
                if self.is_target_pool(name, pool) {
                    continue;
                }
                let place = match Place::of(format!("backends.{name}.pools.{pool}"), dir) {
                    Ok(place) => place,
                    Err(e) => {
                        errors.push(e);
                        continue;
                    }
                };
                if backend.driver == DriverKind::Block
                    && let Some(why) = writable_by_others(&place.path)
                {
                    // Its links name the devices backupfs reads and restores into: whoever
                    // may add one could have the node's own disks backed up (and readable
                    // to admin_group) or written over.
                    errors.push(invalid(
                        place.key.clone(),
                        format!(
                            "{} {why}: a block pool's links choose the devices backupfs reads and writes, so only root may change it (as /dev/<volume_group>/ is)",
                            place.path.display()
                        ),
                    ));
                    continue;
                }
                match crate::targets::claim::read_marker(&place.path) {
                    Ok(None) => {}
                    Ok(Some(marker)) => {
                        errors.push(invalid(
                            place.key.clone(),
                            format!(
                                "{} holds the backups of target {:?} (claim marker {}): backups never serve as volumes; name it as that target's pool, or give the volumes another directory",
                                place.path.display(),
                                marker.target,
                                crate::targets::claim::MARKER
                            ),
                        ));
                        continue;
                    }
                    Err(e) => {
                        errors.push(invalid(
                            place.key.clone(),
                            format!("{} {e}", place.path.display()),
                        ));
                        continue;
                    }
                }
                for (target, backup_place) in &target_pools {
                    if place.overlaps(backup_place) {
                        errors.push(invalid(
                            format!("targets.{target}"),
                            format!(
                                "its pool {} ({}) overlaps the volume pool {} ({}): volumes and backups must not share storage",
                                backup_place.key,
                                backup_place.path.display(),
                                place.key,
                                place.path.display()
                            ),
                        ));
                    }
                }
                if let Some(same) = volume_pools
                    .iter()
                    .find(|p| p.dev == place.dev && p.ino == place.ino)
                {
                    errors.push(invalid(
                        place.key.clone(),
                        format!(
                            "{} is the same directory as {}: a directory serves one pool only",
                            place.path.display(),
                            same.key
                        ),
                    ));
                    continue;
                }
                volume_pools.push(place);
            }
        }
        self.check_rbd(errors);
    }

    /// The `rbd` backends, against their clusters: each connects (bounded by its
    /// timeout), each pool and namespace exists, a target's pool is empty or ours, a
    /// volume pool carries no claim marker, and no target shares a pool (and namespace)
    /// of one cluster with a volume pool or another target. Reads only.
    fn check_rbd(&self, errors: &mut Vec<ConfigError>) {
        // (key, cluster fsid, pool id, namespace)
        type Identity = (String, String, i64, String);
        let mut volume_pools: Vec<Identity> = Vec::new();
        let mut target_pools: Vec<(String, Identity)> = Vec::new();
        for (name, backend) in &self.backends {
            if backend.driver != DriverKind::Rbd {
                continue;
            }
            let mut usable = true;
            if let Some(timeout) = backend.timeout
                && !(1..=MAX_RBD_TIMEOUT).contains(&timeout)
            {
                errors.push(invalid(
                    format!("backends.{name}.timeout"),
                    format!("must be between 1 and {MAX_RBD_TIMEOUT} seconds"),
                ));
                usable = false;
            }
            if backend.ceph_client().is_empty()
                || backend.ceph_client().starts_with("client.")
                || !backend.ceph_client().bytes().all(|b| b.is_ascii_graphic())
            {
                errors.push(invalid(
                    format!("backends.{name}.client"),
                    "a cephx user name without \"client.\" (e.g. \"cinder\")",
                ));
                usable = false;
            }
            let mut specs: Vec<(String, PoolSpec)> = Vec::new();
            for pool in backend.pools.keys() {
                match backend.rbd_pool(name, pool) {
                    Ok(spec) => specs.push((pool.clone(), spec)),
                    Err(e) => errors.push(e),
                }
            }
            if !usable {
                continue;
            }
            let connection = match backend.rbd_connect(name) {
                Ok(connection) => connection,
                Err(e) => {
                    errors.push(e);
                    continue;
                }
            };
            for (pool, spec) in specs {
                let key = format!("backends.{name}.pools.{pool}");
                let io = match spec.open(&connection) {
                    Ok(io) => io,
                    Err(e) => {
                        let why = if e.is_not_found() {
                            match &spec.namespace {
                                Some(ns) => format!(
                                    "no pool {:?} with an RBD namespace {ns:?} in cluster {}",
                                    spec.pool, connection.fsid
                                ),
                                None => format!(
                                    "no pool {:?} in cluster {}",
                                    spec.pool, connection.fsid
                                ),
                            }
                        } else {
                            e.to_string()
                        };
                        errors.push(invalid(&key, why));
                        continue;
                    }
                };
                let identity = (
                    key.clone(),
                    connection.fsid.clone(),
                    io.pool_id(),
                    io.namespace().to_string(),
                );
                let targets: Vec<&String> = self
                    .targets
                    .iter()
                    .filter(|(_, t)| t.backend == *name && t.pool == pool)
                    .map(|(t, _)| t)
                    .collect();
                if let Some(target) = targets.first() {
                    if let Err(e) = crate::targets::rbd::inspect(&io, target) {
                        errors.push(invalid(
                            format!("targets.{target}.pool"),
                            format!("{key} (rbd:{spec}) {e}"),
                        ));
                        continue;
                    }
                    target_pools.push((target.to_string(), identity));
                } else {
                    match crate::targets::rbd::read_marker(&io) {
                        Ok(None) => {}
                        Ok(Some(marker)) => {
                            errors.push(invalid(
                                &key,
                                format!(
                                    "rbd:{spec} holds the backups of target {:?} (claim marker {}): backups never serve as volumes; name it as that target's pool, or give the volumes another pool",
                                    marker.target,
                                    crate::targets::rbd::MARKER_OBJECT
                                ),
                            ));
                            continue;
                        }
                        Err(e) => {
                            errors.push(invalid(&key, format!("rbd:{spec} {e}")));
                            continue;
                        }
                    }
                    volume_pools.push(identity);
                }
            }
        }
        let same = |a: &Identity, b: &Identity| a.1 == b.1 && a.2 == b.2 && a.3 == b.3;
        for (i, (target, place)) in target_pools.iter().enumerate() {
            if let Some(volume) = volume_pools.iter().find(|v| same(v, place)) {
                errors.push(invalid(
                    format!("targets.{target}"),
                    format!(
                        "its pool {} is the volume pool {} (cluster {}, the same RADOS pool and namespace): volumes and backups must not share storage; another pool (or RBD namespace) of the cluster is fine",
                        place.0, volume.0, place.1
                    ),
                ));
            }
            if let Some((other, _)) = target_pools[..i].iter().find(|(_, p)| same(p, place)) {
                errors.push(invalid(
                    format!("targets.{target}.pool"),
                    format!("targets.{other} already stores backups in {}", place.0),
                ));
            }
        }
        for (i, volume) in volume_pools.iter().enumerate() {
            if let Some(same_pool) = volume_pools[..i].iter().find(|v| same(v, volume)) {
                errors.push(invalid(
                    &volume.0,
                    format!(
                        "is the same RADOS pool and namespace as {}: a pool serves one backend pool only",
                        same_pool.0
                    ),
                ));
            }
        }
    }

    /// A pool named by a target serves no volumes.
    pub fn is_target_pool(&self, backend: &str, pool: &str) -> bool {
        self.targets
            .values()
            .any(|t| t.backend == backend && t.pool == pool)
    }

    pub fn admin_gid(&self) -> Option<u32> {
        if self.admin_group.is_empty() {
            return None;
        }
        nix::unistd::Group::from_name(&self.admin_group)
            .ok()
            .flatten()
            .map(|g| g.gid.as_raw())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::parse("state_dir = \"/x\"\nmax_paralel_jobs = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_paralel_jobs"), "{err}");
        let err =
            Config::parse("[backends.a]\ndriver = \"file\"\npools = {}\ncolour = 1\n").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn rbd_keys_are_refused_on_other_drivers_and_parsed_on_rbd() {
        let config = Config::parse(
            "[backends.a]\ndriver = \"file\"\npools = { p = \"/x\" }\nclient = \"cinder\"\n",
        )
        .unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.to_string().starts_with("backends.a.client:"), "{err}");
        let config = Config::parse(
            "[backends.c]\ndriver = \"rbd\"\npools = { v = \"volumes\", b = \"rbd/backups\" }\n",
        )
        .unwrap();
        let backend = &config.backends["c"];
        assert_eq!(backend.ceph_conf(), PathBuf::from("/etc/ceph/ceph.conf"));
        assert_eq!(backend.ceph_client(), "admin");
        assert_eq!(backend.rbd_timeouts().osd_op.as_secs(), 30);
        assert_eq!(
            backend.rbd_pool("c", "b").unwrap().namespace.as_deref(),
            Some("backups")
        );
        let bad =
            Config::parse("[backends.c]\ndriver = \"rbd\"\npools = { v = \"a/b/c\" }\n").unwrap();
        let err = bad.backends["c"].rbd_pool("c", "v").unwrap_err();
        assert!(err.to_string().starts_with("backends.c.pools.v:"), "{err}");
    }

    #[test]
    fn unknown_driver_is_refused() {
        let err = Config::parse("[backends.a]\ndriver = \"ceph\"\npools = {}\n").unwrap_err();
        assert!(err.to_string().contains("ceph"), "{err}");
    }
}
