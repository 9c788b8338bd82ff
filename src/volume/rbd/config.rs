//! The `rbd` driver's configuration: its keys (`ceph_conf`, `client`, `timeout`, pools as
//! `pool[/namespace]`), their defaults, and their checks against the cluster. It reads
//! the cluster (pool ids, claim markers) and never writes to it.

use super::{Connection, PoolSpec, Timeouts};
use crate::config::{Config, ConfigError, invalid};
use crate::registry::DriverConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

pub const DEFAULT_CEPH_CONF: &str = "/etc/ceph/ceph.conf";
pub const DEFAULT_CEPH_CLIENT: &str = "admin";
/// Seconds; librbd operations take up to three requests in a row, so a request of a
/// stalled cluster fails well within two minutes.
pub const DEFAULT_RBD_TIMEOUT: u64 = 30;
const MAX_RBD_TIMEOUT: u64 = 30;

/// `[backends.<name>]` with `driver = "rbd"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdConfig {
    /// Pool name → `pool[/namespace]`.
    pub pools: BTreeMap<String, PathBuf>,
    /// The cluster's configuration file (monitors, keyring).
    #[serde(default)]
    pub ceph_conf: Option<PathBuf>,
    /// The cephx user (`client.<name>`).
    #[serde(default)]
    pub client: Option<String>,
    /// Seconds any one request to the cluster may wait (connect, monitors, OSDs).
    #[serde(default)]
    pub timeout: Option<u64>,
}

impl RbdConfig {
    pub fn ceph_conf(&self) -> PathBuf {
        self.ceph_conf
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CEPH_CONF))
    }

    pub fn ceph_client(&self) -> &str {
        self.client.as_deref().unwrap_or(DEFAULT_CEPH_CLIENT)
    }

    pub fn timeouts(&self) -> Timeouts {
        let each = std::time::Duration::from_secs(self.timeout.unwrap_or(DEFAULT_RBD_TIMEOUT));
        Timeouts {
            connect: each,
            mon_op: each,
            osd_op: each,
        }
    }

    /// The pool spec of `pool` (checked by `check`).
    pub fn pool(&self, backend: &str, pool: &str) -> Result<PoolSpec, ConfigError> {
        let key = format!("backends.{backend}.pools.{pool}");
        let text = self
            .pools
            .get(pool)
            .ok_or_else(|| invalid(&key, "no such pool"))?;
        let text = text.to_str().ok_or_else(|| invalid(&key, "not UTF-8"))?;
        PoolSpec::parse(text).map_err(|reason| invalid(key, reason))
    }

    /// The backend's connection (shared by the whole process); an error names the key at
    /// fault: the library (`driver`), the conf file or an unreachable cluster
    /// (`ceph_conf`), a refused user or key (`client`).
    pub fn connect(&self, backend: &str) -> Result<Arc<Connection>, ConfigError> {
        let key = |k: &str| format!("backends.{backend}.{k}");
        super::check_available().map_err(|e| invalid(key("driver"), e.to_string()))?;
        let conf = self.ceph_conf();
        let client = self.ceph_client();
        let timeouts = self.timeouts();
        super::connection::connect(&conf, client, timeouts).map_err(|e| {
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

/// The `rbd` backends of `config`, against their clusters: each connects (bounded by its
/// timeout), each pool and namespace exists, a target's pool is empty or ours, a volume
/// pool carries no claim marker, and no target shares a pool (and namespace) of one
/// cluster with a volume pool or another target. Reads only.
pub fn check(config: &Config, errors: &mut Vec<ConfigError>) {
    // (key, cluster fsid, pool id, namespace)
    type Identity = (String, String, i64, String);
    let mut volume_pools: Vec<Identity> = Vec::new();
    let mut target_pools: Vec<(String, Identity)> = Vec::new();
    for (name, backend) in &config.backends {
        let DriverConfig::Rbd(backend) = &backend.driver else {
            continue;
        };
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
            match backend.pool(name, pool) {
                Ok(spec) => specs.push((pool.clone(), spec)),
                Err(e) => errors.push(e),
            }
        }
        if !usable {
            continue;
        }
        let connection = match backend.connect(name) {
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
                            None => {
                                format!("no pool {:?} in cluster {}", spec.pool, connection.fsid)
                            }
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
            let targets: Vec<&String> = config
                .targets
                .iter()
                .filter(|(_, t)| t.is_pool(name, &pool))
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

#[cfg(test)]
mod tests {
    use crate::config::Config;
    use crate::registry::DriverConfig;
    use std::path::PathBuf;

    #[test]
    fn rbd_keys_are_refused_on_other_drivers_and_parsed_on_rbd() {
        let config = Config::parse(
            "[backends.a]\ndriver = \"file\"\npools = { p = \"/x\" }\nclient = \"cinder\"\n",
        )
        .unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.to_string().starts_with("backends.a.client:"), "{err}");
        assert!(
            err.to_string().contains("only for driver = \"rbd\""),
            "{err}"
        );
        let config = Config::parse(
            "[backends.c]\ndriver = \"rbd\"\npools = { v = \"volumes\", b = \"rbd/backups\" }\n",
        )
        .unwrap();
        let DriverConfig::Rbd(backend) = &config.backends["c"].driver else {
            panic!("an rbd backend");
        };
        assert_eq!(backend.ceph_conf(), PathBuf::from("/etc/ceph/ceph.conf"));
        assert_eq!(backend.ceph_client(), "admin");
        assert_eq!(backend.timeouts().osd_op.as_secs(), 30);
        assert_eq!(
            backend.pool("c", "b").unwrap().namespace.as_deref(),
            Some("backups")
        );
        let bad =
            Config::parse("[backends.c]\ndriver = \"rbd\"\npools = { v = \"a/b/c\" }\n").unwrap();
        let DriverConfig::Rbd(bad) = &bad.backends["c"].driver else {
            panic!("an rbd backend");
        };
        let err = bad.pool("c", "v").unwrap_err();
        assert!(err.to_string().starts_with("backends.c.pools.v:"), "{err}");
    }
}
