//! The process's connections to Ceph clusters: one per (ceph.conf, client, timeout),
//! shared by the configuration check, the rbd backends and the RBD targets, so that our
//! own watches are always recognised as ours. Each connection knows whether the cluster
//! answers: a call that may run on a FUSE thread never waits longer than a few seconds,
//! and while a request has gone unanswered that long, further ones fail at once.

use super::client::{Cluster, RbdError, Timeouts};
use parking_lot::{Condvar, Mutex};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The errno of a request the cluster did not answer in time (librados' own for its
/// timeouts): what backupfs answers for a cluster that went away.
pub const STALLED: i32 = libc::ETIMEDOUT;
/// The longest a listing or a stat waits for the cluster (less when the configured
/// timeout is shorter): FUSE answers `ls` from its own threads.
const QUICK_LIMIT: Duration = Duration::from_secs(10);
/// Calls that may still be running in the background after their caller gave up.
const MAX_ABANDONED: u64 = 32;

/// One connection, and what it knows about the cluster's health.
pub struct Connection {
    pub cluster: Cluster,
    pub fsid: String,
    pub timeouts: Timeouts,
    /// `client.<name>@<conf>`, for messages.
    pub describe: String,
    /// Short requests in flight (id → start), to tell a stalled cluster at once.
    in_flight: Mutex<BTreeMap<u64, Instant>>,
    next_id: AtomicU64,
    /// Bounded calls whose caller gave up and that still run.
    abandoned: AtomicU64,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe)
    }
}

type Key = (PathBuf, String, Timeouts);

fn registry() -> &'static Mutex<Vec<(Key, Arc<Connection>)>> {
    static CONNECTIONS: Mutex<Vec<(Key, Arc<Connection>)>> = Mutex::new(Vec::new());
    &CONNECTIONS
}

/// The connection for `conf` and `client`, made on first use and kept for the life of
/// the process. A failed connect is not kept: the next call tries again.
pub fn connect(conf: &Path, client: &str, timeouts: Timeouts) -> Result<Arc<Connection>, RbdError> {
    let key = (conf.to_path_buf(), client.to_string(), timeouts);
    // Held while connecting: two backends naming one client connect once.
    let mut connections = registry().lock();
    if let Some((_, connection)) = connections.iter().find(|(k, _)| *k == key) {
        return Ok(connection.clone());
    }
    let cluster = Cluster::connect(conf, client, timeouts)?;
    let fsid = cluster.fsid()?;
    let connection = Arc::new(Connection {
        describe: format!("client.{client}@{}", conf.display()),
        cluster,
        fsid,
        timeouts,
        in_flight: Mutex::new(BTreeMap::new()),
        next_id: AtomicU64::new(0),
        abandoned: AtomicU64::new(0),
    });
    tracing::info!(
        "connected to Ceph cluster {} as {} (instance {})",
        connection.fsid,
        connection.describe,
        connection.cluster.instance_id()
    );
    connections.push((key, connection.clone()));
    Ok(connection)
}

/// The instance ids of every connection of this process: the watches backupfs holds.
pub fn our_instance_ids() -> Vec<u64> {
    registry()
        .lock()
        .iter()
        .map(|(_, c)| c.cluster.instance_id())
        .collect()
}

/// Forgets every connection; each shuts down once its last user (a driver, a target, an
/// open image) is gone. For a process that ends while librados would otherwise still
/// run its threads (a test, before its cluster stops).
pub fn disconnect_all() {
    let connections: Vec<_> = registry().lock().drain(..).collect();
    drop(connections);
}

fn stalled_error(what: &str, waited: Duration) -> RbdError {
    RbdError::Ceph {
        op: "wait for the cluster",
        what: format!(
            "{what}: the cluster has not answered a request for {} s",
            waited.as_secs()
        ),
        errno: STALLED,
    }
}

/// A short request in flight; it stops counting when dropped.
pub struct Probe<'a> {
    connection: &'a Connection,
    id: u64,
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.connection.in_flight.lock().remove(&self.id);
    }
}

impl Connection {
    /// How long a listing or stat may wait.
    pub fn quick_limit(&self) -> Duration {
        self.timeouts.osd_op.min(QUICK_LIMIT)
    }

    /// How long the oldest short request has been waiting, if longer than the quick
    /// limit: the cluster is not answering right now.
    pub fn stalled(&self) -> Option<Duration> {
        let oldest = self.in_flight.lock().values().min().copied()?;
        let waited = oldest.elapsed();
        (waited > self.quick_limit()).then_some(waited)
    }

    /// Registers a short request (one I/O, an open, a stat), or fails at once with
    /// ETIMEDOUT while another one has gone unanswered past the quick limit.
    pub fn probe(&self, what: &str) -> Result<Probe<'_>, RbdError> {
        if let Some(waited) = self.stalled() {
            return Err(stalled_error(what, waited));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.in_flight.lock().insert(id, Instant::now());
        Ok(Probe {
            connection: self,
            id,
        })
    }

    /// Runs a short call on a thread of its own and waits at most the quick limit for
    /// it (FUSE threads must never wait on a stalled cluster); the call itself goes on
    /// until librados' own timeout ends it. Fails at once while the cluster is known
    /// not to answer.
    pub fn bounded<T: Send + 'static>(
        self: &Arc<Self>,
        what: &str,
        call: impl FnOnce() -> Result<T, RbdError> + Send + 'static,
    ) -> Result<T, RbdError> {
        if self.abandoned.load(Ordering::Relaxed) >= MAX_ABANDONED {
            return Err(stalled_error(what, self.quick_limit()));
        }
        // Registered here, so the wait below and the call see the same start.
        if let Some(waited) = self.stalled() {
            return Err(stalled_error(what, waited));
        }
        let probe_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.in_flight.lock().insert(probe_id, Instant::now());
        let slot: Arc<(Mutex<Slot<T>>, Condvar)> = Arc::new((
            Mutex::new(Slot {
                result: None,
                gave_up: false,
            }),
            Condvar::new(),
        ));
        let (connection, shared, label) = (self.clone(), slot.clone(), what.to_string());
        let spawned = std::thread::Builder::new()
            .name("rbd-call".to_string())
            .spawn(move || {
                let result = call();
                connection.in_flight.lock().remove(&probe_id);
                let mut state = shared.0.lock();
                if state.gave_up {
                    connection.abandoned.fetch_sub(1, Ordering::Relaxed);
                    tracing::debug!("{label}: finished after its caller gave up");
                } else {
                    state.result = Some(result);
                    shared.1.notify_one();
                }
            });
        if let Err(e) = spawned {
            self.in_flight.lock().remove(&probe_id);
            return Err(RbdError::Ceph {
                op: "start a thread",
                what: what.to_string(),
                errno: e.raw_os_error().unwrap_or(libc::EAGAIN),
            });
        }
        let deadline = Instant::now() + self.quick_limit();
        let mut state = slot.0.lock();
        while state.result.is_none() {
            if slot.1.wait_until(&mut state, deadline).timed_out() {
                break;
            }
        }
        if let Some(result) = state.result.take() {
            return result;
        }
        state.gave_up = true;
        self.abandoned.fetch_add(1, Ordering::Relaxed);
        Err(stalled_error(what, self.quick_limit()))
    }
}

/// Where a bounded call leaves its result for a caller that may have given up.
struct Slot<T> {
    result: Option<Result<T, RbdError>>,
    gave_up: bool,
}

/// A backend's pool as configured: `pool` or `pool/namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub pool: String,
    /// None: the pool's default namespace.
    pub namespace: Option<String>,
}

impl PoolSpec {
    /// Parses `pool[/namespace]`; the reason when it is not one.
    pub fn parse(text: &str) -> Result<PoolSpec, String> {
        let (pool, namespace) = match text.split_once('/') {
            Some((pool, namespace)) => (pool, Some(namespace)),
            None => (text, None),
        };
        let valid = |part: &str| {
            !part.is_empty()
                && !part.contains('/')
                && part
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'@' && b != b'\\')
        };
        if !valid(pool) || namespace.is_some_and(|ns| !valid(ns)) {
            return Err(format!(
                "{text:?} is not a RADOS pool name with an optional /namespace"
            ));
        }
        Ok(PoolSpec {
            pool: pool.to_string(),
            namespace: namespace.map(str::to_string),
        })
    }

    /// Opens it: `ENOENT` when the pool, or the RBD namespace, does not exist.
    pub fn open(&self, connection: &Connection) -> Result<super::client::IoCtx, RbdError> {
        let default = connection.cluster.ioctx(&self.pool, None)?;
        let Some(namespace) = &self.namespace else {
            return Ok(default);
        };
        if !default.rbd_namespace_exists(namespace)? {
            return Err(RbdError::Ceph {
                op: "open namespace",
                what: self.to_string(),
                errno: libc::ENOENT,
            });
        }
        connection.cluster.ioctx(&self.pool, Some(namespace))
    }
}

impl std::fmt::Display for PoolSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{}/{namespace}", self.pool),
            None => f.write_str(&self.pool),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_specs_parse_with_and_without_a_namespace() {
        assert_eq!(
            PoolSpec::parse("volumes").unwrap(),
            PoolSpec {
                pool: "volumes".into(),
                namespace: None
            }
        );
        let spec = PoolSpec::parse("rbd/tenant-1").unwrap();
        assert_eq!(spec.namespace.as_deref(), Some("tenant-1"));
        assert_eq!(spec.to_string(), "rbd/tenant-1");
        for bad in ["", "/ns", "pool/", "a/b/c", "po ol", "pool@snap"] {
            assert!(PoolSpec::parse(bad).is_err(), "{bad:?}");
        }
    }
}
