//! The TOML configuration (README.md, "Configuration reference"), parsed into typed
//! structs and checked against the spec's storage rules before anything is mounted.
//! It never touches volume data: it only reads directory metadata to compare storage.

use serde::Deserialize;
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

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DriverKind {
    File,
    Qcow2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub driver: DriverKind,
    pub pools: BTreeMap<String, PathBuf>,
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

    /// The storage rules of the spec, checked against the real directories.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_parallel_jobs == 0 || self.max_parallel_jobs > 64 {
            return Err(invalid("max_parallel_jobs", "must be between 1 and 64"));
        }
        if !self.state_dir.is_absolute() {
            return Err(invalid("state_dir", "must be an absolute path"));
        }
        if !self.admin_group.is_empty() && self.admin_gid().is_none() {
            return Err(invalid(
                "admin_group",
                format!("no such group {:?}", self.admin_group),
            ));
        }
        if self.backends.is_empty() {
            return Err(invalid("backends", "at least one backend is needed"));
        }
        for (name, backend) in &self.backends {
            if !crate::volume::is_valid_id(name) {
                return Err(invalid(format!("backends.{name}"), "not a valid name"));
            }
            if backend.pools.is_empty() {
                return Err(invalid(format!("backends.{name}.pools"), "no pools"));
            }
            for pool in backend.pools.keys() {
                if !crate::volume::is_valid_id(pool) {
                    return Err(invalid(
                        format!("backends.{name}.pools.{pool}"),
                        "not a valid name",
                    ));
                }
            }
        }
        let mut target_pools: Vec<(String, Place)> = Vec::new();
        for (name, target) in &self.targets {
            let key = format!("targets.{name}");
            if !crate::volume::is_valid_id(name) {
                return Err(invalid(key, "not a valid name"));
            }
            let backend = self.backends.get(&target.backend).ok_or_else(|| {
                invalid(
                    format!("{key}.backend"),
                    format!("no backend {:?}", target.backend),
                )
            })?;
            let dir = backend.pools.get(&target.pool).ok_or_else(|| {
                invalid(
                    format!("{key}.pool"),
                    format!(
                        "backend {:?} has no pool {:?}: a target needs a pool of its own",
                        target.backend, target.pool
                    ),
                )
            })?;
            let pool_key = format!("backends.{}.pools.{}", target.backend, target.pool);
            let place = Place::of(pool_key.clone(), dir)?;
            // A pool holding anything backupfs did not make is never a target: backups
            // there would sit among (and be mistaken for) someone else's files.
            crate::target::claim::inspect(&place.path, name).map_err(|e| {
                invalid(
                    format!("{key}.pool"),
                    format!("{pool_key} ({}) {e}", place.path.display()),
                )
            })?;
            if let Some((other, _)) = target_pools.iter().find(|(_, p)| p.overlaps(&place)) {
                return Err(invalid(
                    format!("{key}.pool"),
                    format!("targets.{other} already stores backups in {pool_key}"),
                ));
            }
            target_pools.push((name.clone(), place));
        }
        let mut volume_pools: Vec<Place> = Vec::new();
        for (name, backend) in &self.backends {
            for (pool, dir) in &backend.pools {
                if self.is_target_pool(name, pool) {
                    continue;
                }
                let place = Place::of(format!("backends.{name}.pools.{pool}"), dir)?;
                match crate::target::claim::read_marker(&place.path) {
                    Ok(None) => {}
                    Ok(Some(marker)) => {
                        return Err(invalid(
                            place.key.clone(),
                            format!(
                                "{} holds the backups of target {:?} (claim marker {}): backups never serve as volumes; name it as that target's pool, or give the volumes another directory",
                                place.path.display(),
                                marker.target,
                                crate::target::claim::MARKER
                            ),
                        ));
                    }
                    Err(e) => {
                        return Err(invalid(
                            place.key.clone(),
                            format!("{} {e}", place.path.display()),
                        ));
                    }
                }
                for (target, backup_place) in &target_pools {
                    if place.overlaps(backup_place) {
                        return Err(invalid(
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
                    return Err(invalid(
                        place.key.clone(),
                        format!(
                            "{} is the same directory as {}: a directory serves one pool only",
                            place.path.display(),
                            same.key
                        ),
                    ));
                }
                volume_pools.push(place);
            }
        }
        Ok(())
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
    fn unknown_driver_is_refused() {
        let err = Config::parse("[backends.a]\ndriver = \"ceph\"\npools = {}\n").unwrap_err();
        assert!(err.to_string().contains("ceph"), "{err}");
    }
}
