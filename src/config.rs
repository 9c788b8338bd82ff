//! The TOML configuration (docs/configuration.md), parsed into typed
//! structs and checked against the spec's storage rules before anything is mounted.
//! Each storage kind's own keys and checks live beside its driver and are listed once in
//! `registry`; here are the keys every backend and target has and the rules every pool
//! directory follows. It never touches volume data nor writes anything.

use crate::registry::{DriverConfig, TargetKind};
use crate::targets::PoolTargetConfig;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_default()
}

pub(crate) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
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

/// `[backends.<name>]`: a driver kind and its keys (`registry::DriverConfig`, each kind's
/// beside its driver).
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub driver: DriverConfig,
    /// Keys of another driver kind given to this one, with that kind (`client` on a
    /// `file` backend): refused by the check, naming the key and its kind.
    misplaced: Vec<(String, &'static str)>,
}

impl BackendConfig {
    /// Pool name → what the driver makes of it (a directory, `pool[/namespace]`).
    pub fn pools(&self) -> &BTreeMap<String, PathBuf> {
        self.driver.pools()
    }
}

impl<'de> Deserialize<'de> for BackendConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(deserializer)?;
        let misplaced = crate::registry::misplaced_keys(&mut table);
        let driver =
            DriverConfig::deserialize(toml::Value::Table(table)).map_err(D::Error::custom)?;
        Ok(BackendConfig { driver, misplaced })
    }
}

/// `[targets.<name>]`: its kind with that kind's keys (`kind`, `pool` when absent: a pool
/// of a volume backend), and the keys every target has.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub kind: TargetKind,
    /// Per volume, the newest available backups kept; older ones are deleted after each
    /// successful backup. 0 keeps all.
    pub keep_last: u32,
    /// The target key file (`backupfs keygen`), the same on every node serving the target:
    /// records and their checksums are then authenticated. Without one they are not.
    pub key: Option<PathBuf>,
}

/// The keys of `TargetConfig` that every kind of target has.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetCommon {
    #[serde(default)]
    keep_last: u32,
    #[serde(default)]
    key: Option<PathBuf>,
}

impl<'de> Deserialize<'de> for TargetConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut table = toml::Table::deserialize(deserializer)?;
        let mut common = toml::Table::new();
        for key in crate::registry::keys_of::<TargetCommon>() {
            if let Some(value) = table.remove(*key) {
                common.insert(key.to_string(), value);
            }
        }
        let TargetCommon { keep_last, key } =
            TargetCommon::deserialize(toml::Value::Table(common)).map_err(D::Error::custom)?;
        if !table.contains_key("kind") {
            table.insert(
                "kind".to_string(),
                crate::registry::DEFAULT_TARGET_KIND.into(),
            );
        }
        let kind = TargetKind::deserialize(toml::Value::Table(table)).map_err(D::Error::custom)?;
        Ok(TargetConfig {
            kind,
            keep_last,
            key,
        })
    }
}

/// Every key a configuration takes, as docs/configuration.md names them
/// (`backends.<name>.client`): each kind's keys come from its options struct, so a test
/// can hold the reference to the code.
pub fn keys() -> Vec<String> {
    use crate::registry::{driver_kinds, keys_of, target_kinds};
    let mut keys: Vec<String> = Vec::new();
    let mut add = |key: String| {
        if !keys.contains(&key) {
            keys.push(key);
        }
    };
    for key in keys_of::<Config>() {
        match *key {
            "backends" | "targets" => add(format!("{key}.<name>")),
            _ => add(key.to_string()),
        }
    }
    add("backends.<name>.driver".to_string());
    for (_, kind_keys) in driver_kinds() {
        for key in kind_keys {
            add(format!("backends.<name>.{key}"));
        }
    }
    add("targets.<name>.kind".to_string());
    for (_, kind_keys) in target_kinds() {
        for key in kind_keys {
            add(format!("targets.<name>.{key}"));
        }
    }
    for key in keys_of::<TargetCommon>() {
        add(format!("targets.<name>.{key}"));
    }
    keys
}

/// What a driver whose pools are directories asks of them beyond the rules every pool
/// directory follows (absolute, readable, no overlap with another pool, no foreign claim
/// marker): each kind's own, beside its driver (`registry::DriverConfig::dir_rules`).
#[derive(Debug, Clone, Copy)]
pub struct DirRules {
    /// Why its pools cannot hold a target's backups (None: they can).
    pub no_backups: Option<&'static str>,
    /// Why only root may change its pool directories (None: no such rule).
    pub root_only: Option<&'static str>,
}

impl DirRules {
    pub const PLAIN: DirRules = DirRules {
        no_backups: None,
        root_only: None,
    };
}

impl TargetConfig {
    /// The backend and pool of a target kept in a pool of a volume backend.
    pub fn pool_target(&self) -> Option<&PoolTargetConfig> {
        match &self.kind {
            TargetKind::Pool(pool_target) => Some(pool_target),
            TargetKind::S3(_) => None,
        }
    }

    /// Whether this target keeps its backups in `pool` of `backend`.
    pub fn is_pool(&self, backend: &str, pool: &str) -> bool {
        self.pool_target()
            .is_some_and(|t| t.backend == backend && t.pool == pool)
    }

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
            if backend.pools().is_empty() {
                errors.push(invalid(format!("backends.{name}.pools"), "no pools"));
            }
            for pool in backend.pools().keys() {
                if !crate::volume::is_valid_id(pool) {
                    errors.push(invalid(
                        format!("backends.{name}.pools.{pool}"),
                        "not a valid name",
                    ));
                }
            }
            for (key, kind) in &backend.misplaced {
                errors.push(invalid(
                    format!("backends.{name}.{key}"),
                    format!("only for driver = \"{kind}\""),
                ));
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
            let Some(target) = target.pool_target() else {
                // A kind of its own checks itself (`registry::check`).
                continue;
            };
            let Some(backend) = self.backends.get(&target.backend) else {
                errors.push(invalid(
                    format!("{key}.backend"),
                    format!("no backend {:?}", target.backend),
                ));
                continue;
            };
            let Some(dir) = backend.pools().get(&target.pool) else {
                errors.push(invalid(
                    format!("{key}.pool"),
                    format!(
                        "backend {:?} has no pool {:?}: a target needs a pool of its own",
                        target.backend, target.pool
                    ),
                ));
                continue;
            };
            let Some(rules) = backend.driver.dir_rules() else {
                // Checked by its kind (`registry::check`).
                continue;
            };
            if let Some(why) = rules.no_backups {
                errors.push(invalid(
                    format!("{key}.pool"),
                    format!(
                        "backends.{}.pools.{} is a pool of driver = \"{}\" {why}",
                        target.backend,
                        target.pool,
                        backend.driver.name()
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
            let Some(rules) = backend.driver.dir_rules() else {
                continue;
            };
            for (pool, dir) in backend.pools() {
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
                if let Some(reason) = rules.root_only
                    && let Some(why) = writable_by_others(&place.path)
                {
                    errors.push(invalid(
                        place.key.clone(),
                        format!("{} {why}: {reason}", place.path.display()),
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
        crate::registry::check(self, errors);
    }

    /// A pool named by a target serves no volumes.
    pub fn is_target_pool(&self, backend: &str, pool: &str) -> bool {
        self.targets.values().any(|t| t.is_pool(backend, pool))
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
    fn unknown_driver_is_refused() {
        let err = Config::parse("[backends.a]\ndriver = \"ceph\"\npools = {}\n").unwrap_err();
        assert!(err.to_string().contains("ceph"), "{err}");
    }
}
