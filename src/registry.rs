//! The one place that knows every storage kind: a backend's `driver` and a target's
//! `kind` name a variant here; each variant's options and checks live beside its driver,
//! and `open` builds the drivers and targets the engine runs on. Adding a kind touches
//! this file and the kind's own module only. It never does I/O of its own.

use crate::config::{Config, ConfigError, DirRules};
use crate::engine::{EngineError, Result};
use crate::targets::catalogue::DirCatalogue;
use crate::targets::{BackupTarget, PoolTargetConfig, VolumeTarget};
use crate::volume::VolumeDriver;
use crate::volume::block::BlockDriver;
use crate::volume::file::FileDriver;
use crate::volume::pools::{DirPoolsConfig, PoolDirs};
use crate::volume::qcow2::Qcow2Driver;
use crate::volume::rbd::RbdConfig;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

/// A backend's driver and that driver's own keys (`[backends.<name>]`, tagged by
/// `driver`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "driver", rename_all = "lowercase")]
pub enum DriverConfig {
    /// Block devices (or links to them) named `volume-<id>` in a directory (LVM's
    /// `/dev/<vg>/`): volumes only, never a target.
    Block(DirPoolsConfig),
    File(DirPoolsConfig),
    Qcow2(DirPoolsConfig),
    Rbd(RbdConfig),
}

/// Every driver kind, as `driver` names it, with the keys its options take.
pub(crate) fn driver_kinds() -> [(&'static str, &'static [&'static str]); 4] {
    [
        ("block", keys_of::<DirPoolsConfig>()),
        ("file", keys_of::<DirPoolsConfig>()),
        ("qcow2", keys_of::<DirPoolsConfig>()),
        ("rbd", keys_of::<RbdConfig>()),
    ]
}

impl DriverConfig {
    /// The kind, as `driver` names it.
    pub fn name(&self) -> &'static str {
        match self {
            DriverConfig::Block(_) => "block",
            DriverConfig::File(_) => "file",
            DriverConfig::Qcow2(_) => "qcow2",
            DriverConfig::Rbd(_) => "rbd",
        }
    }

    /// Pool name → what the kind makes of it (a directory, `pool[/namespace]`).
    pub fn pools(&self) -> &BTreeMap<String, PathBuf> {
        match self {
            DriverConfig::Block(c) | DriverConfig::File(c) | DriverConfig::Qcow2(c) => &c.pools,
            DriverConfig::Rbd(c) => &c.pools,
        }
    }

    /// Whether opening a backup image kept on this driver starts (or shares) a process of
    /// its own (a qcow2 export), which the FUSE layer counts against its caps.
    pub fn holds_export(&self) -> bool {
        matches!(self, DriverConfig::Qcow2(_))
    }

    /// For a kind whose pools are directories, what it asks of them beyond every pool
    /// directory's rules (config.rs checks both); None for a kind that checks its own
    /// storage (`check`).
    pub fn dir_rules(&self) -> Option<DirRules> {
        match self {
            DriverConfig::Block(_) => Some(crate::volume::block::DIR_RULES),
            DriverConfig::File(_) | DriverConfig::Qcow2(_) => Some(DirRules::PLAIN),
            DriverConfig::Rbd(_) => None,
        }
    }
}

/// What kind of target a `[targets.<name>]` is (tagged by `kind`, `pool` when absent),
/// with that kind's own keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum TargetKind {
    /// Backups kept in a pool of a volume backend (the spec's generic target).
    Pool(PoolTargetConfig),
    /// Backups as deduplicated, compressed, encrypted chunks in an S3 bucket.
    S3(Box<crate::targets::s3::S3TargetConfig>),
}

/// The kind a target without `kind` is.
pub const DEFAULT_TARGET_KIND: &str = "pool";

/// Every target kind, as `kind` names it, with the keys its options take.
pub(crate) fn target_kinds() -> [(&'static str, &'static [&'static str]); 2] {
    [
        ("pool", keys_of::<PoolTargetConfig>()),
        ("s3", keys_of::<crate::targets::s3::S3TargetConfig>()),
    ]
}

/// The checks of each kind that checks its own storage (`dir_rules` None), over the
/// whole configuration (a kind may compare its backends and targets with each other).
pub fn check(config: &Config, errors: &mut Vec<ConfigError>) {
    crate::volume::rbd::config::check(config, errors);
    crate::targets::s3::config::check(config, errors);
}

/// The keys of a backend table that belong to another driver kind than the one it names
/// (`client` on a `file` backend), taken out before parsing, so that the check names
/// them as such instead of as unknown keys.
pub fn misplaced_keys(table: &mut toml::Table) -> Vec<(String, &'static str)> {
    let kinds = driver_kinds();
    let named = table.get("driver").and_then(toml::Value::as_str);
    let Some((_, own)) = kinds.iter().find(|(kind, _)| Some(*kind) == named) else {
        return Vec::new();
    };
    let mut misplaced = Vec::new();
    for (kind, keys) in &kinds {
        for key in *keys {
            if !own.contains(key) && table.remove(*key).is_some() {
                misplaced.push((key.to_string(), *kind));
            }
        }
    }
    misplaced
}

/// The keys struct `T` takes, read from its `Deserialize` (serde hands a struct's field
/// names to the deserializer), so that no list of them can drift from the struct.
pub(crate) fn keys_of<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error, Visitor};
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(
            self,
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

/// A backend as the engine runs it.
pub struct OpenBackend {
    pub driver: Arc<dyn VolumeDriver>,
    /// Pools that serve volumes (not those a target holds backups in).
    pub volume_pools: Vec<String>,
}

/// Everything `config` names, opened.
pub struct Opened {
    pub backends: BTreeMap<String, OpenBackend>,
    pub targets: BTreeMap<String, Arc<dyn BackupTarget>>,
}

/// Opens every backend's driver and every target (claiming target pools).
pub fn open(config: &Config) -> Result<Opened> {
    let mut backends = BTreeMap::new();
    for (name, backend) in &config.backends {
        let backup_pools: Vec<String> = config
            .targets
            .values()
            .filter_map(|t| t.pool_target())
            .filter(|t| &t.backend == name)
            .map(|t| t.pool.clone())
            .collect();
        let volume_pools: Vec<String> = backend
            .pools()
            .keys()
            .filter(|pool| !backup_pools.contains(pool))
            .cloned()
            .collect();
        let dirs = || PoolDirs::new(name, backend.pools(), &backup_pools);
        let driver: Arc<dyn VolumeDriver> = match &backend.driver {
            DriverConfig::Block(_) => Arc::new(BlockDriver::new(dirs())),
            DriverConfig::File(_) => Arc::new(FileDriver::new(dirs())),
            DriverConfig::Qcow2(_) => Arc::new(Qcow2Driver::new(dirs())?),
            DriverConfig::Rbd(rbd) => Arc::new(rbd_driver(name, rbd, &volume_pools)?),
        };
        backends.insert(
            name.clone(),
            OpenBackend {
                driver,
                volume_pools,
            },
        );
    }
    let mut targets: BTreeMap<String, Arc<dyn BackupTarget>> = BTreeMap::new();
    for (name, target) in &config.targets {
        // Loaded again: the key file may have changed since the configuration was checked.
        let key = target.load_key(name).map_err(invalid)?.map(Arc::new);
        let opened: Arc<dyn BackupTarget> = match &target.kind {
            TargetKind::Pool(pool_target) => {
                let backend = &backends[&pool_target.backend];
                match &config.backends[&pool_target.backend].driver {
                    DriverConfig::Rbd(rbd) => {
                        let connection = rbd.connect(&pool_target.backend).map_err(invalid)?;
                        let spec = rbd
                            .pool(&pool_target.backend, &pool_target.pool)
                            .map_err(invalid)?;
                        Arc::new(
                            crate::targets::rbd::RbdTarget::open(
                                name,
                                connection,
                                &spec,
                                &config.node_name(),
                                config.lease(),
                            )?
                            .with_key(key),
                        )
                    }
                    // Refused by the check: backups are files.
                    DriverConfig::Block(_) => {
                        return Err(EngineError::Invalid(format!(
                            "targets.{name}.pool: a pool of driver = \"block\" cannot hold backups"
                        )));
                    }
                    DriverConfig::File(dirs) | DriverConfig::Qcow2(dirs) => {
                        let dir = &dirs.pools[&pool_target.pool];
                        let catalogue =
                            DirCatalogue::open(name, dir, &config.node_name(), config.lease())?
                                .with_key(key);
                        Arc::new(VolumeTarget::new(
                            name,
                            backend.driver.clone(),
                            &pool_target.pool,
                            Box::new(catalogue),
                        ))
                    }
                }
            }
            TargetKind::S3(s3) => {
                let s3 = crate::targets::s3::S3TargetConfig {
                    keep_last: target.keep_last,
                    ..(**s3).clone()
                };
                let opened =
                    crate::targets::s3::open_as(name, &s3, &config.node_name(), config.lease());
                Arc::new(opened.map_err(|e| match e {
                    crate::targets::s3::S3Error::Config { key, message } => {
                        EngineError::Invalid(format!("{key}: {message}"))
                    }
                    crate::targets::s3::S3Error::Target(e) => e.into(),
                })?)
            }
        };
        targets.insert(name.clone(), opened);
    }
    Ok(Opened { backends, targets })
}

/// The configuration was checked before; what fails now (a key file changed, a cluster
/// gone) is reported the same way.
fn invalid(e: ConfigError) -> EngineError {
    EngineError::Invalid(e.to_string())
}

/// An `rbd` backend's driver over its volume pools, on the process's connection to its
/// cluster (made while the configuration was checked).
fn rbd_driver(
    name: &str,
    rbd: &RbdConfig,
    volume_pools: &[String],
) -> Result<crate::volume::rbd::RbdDriver> {
    let connection = rbd.connect(name).map_err(invalid)?;
    let mut pools = BTreeMap::new();
    for pool in volume_pools {
        pools.insert(pool.clone(), rbd.pool(name, pool).map_err(invalid)?);
    }
    Ok(crate::volume::rbd::RbdDriver::open(
        name, connection, &pools,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_driver_kind_is_listed_with_its_keys() {
        for (kind, keys) in driver_kinds() {
            assert!(keys.contains(&"pools"), "{kind}: {keys:?}");
            let text = format!("[backends.a]\ndriver = \"{kind}\"\npools = {{}}\n");
            let config = Config::parse(&text).unwrap();
            assert_eq!(config.backends["a"].driver.name(), kind);
        }
        assert_eq!(
            keys_of::<RbdConfig>(),
            ["pools", "ceph_conf", "client", "timeout"]
        );
    }

    #[test]
    fn a_target_without_kind_is_a_pool_of_a_backend() {
        let text = "[targets.t]\nbackend = \"a\"\npool = \"p\"\nkeep_last = 3\n";
        let config = Config::parse(text).unwrap();
        let target = &config.targets["t"];
        assert_eq!(target.keep_last, 3);
        assert!(target.is_pool("a", "p"));
        let explicit =
            Config::parse("[targets.t]\nkind = \"pool\"\nbackend = \"a\"\npool = \"p\"\n").unwrap();
        assert!(explicit.targets["t"].is_pool("a", "p"));
        let err = Config::parse("[targets.t]\nkind = \"tape\"\n").unwrap_err();
        assert!(err.to_string().contains("tape"), "{err}");
        let err =
            Config::parse("[targets.t]\nbackend = \"a\"\npool = \"p\"\nbucket = 1\n").unwrap_err();
        assert!(err.to_string().contains("bucket"), "{err}");
    }
}
