//! The `s3` target: backups kept in an S3 bucket (radosgw, AWS, any S3) under a prefix,
//! as fixed 4 MiB chunks deduplicated by a keyed digest, compressed and encrypted, with
//! one authenticated index per backup; every backup still reads as a whole image. It
//! writes only under a prefix that is empty or carries its marker, deletes only objects
//! of its own names, and never deletes a chunk that an index, or a backup being written
//! here, names (see `collect_garbage`).
//!
//! Layout under the prefix (ARCHITECTURE.md, "The s3 target"):
//! - `backupfs.target`: the claim marker (JSON, as `claim::Marker`), made create-only;
//! - `backupfs.keycheck`: a constant sealed with the target key: a wrong key is refused
//!   at open, never used to serve garbage;
//! - `record.<id>`, `sums.<id>`: the record and its checksums (`catalogue`);
//! - `index.<id>`: the backup's chunks in image order (`chunk::Index`);
//! - `chunk.<hex>`: one chunk (`chunk`), shared by every backup whose index names it;
//! - `backupfs.node.*`, `backupfs.claim.*`, `backupfs.end.*`, `backupfs.lock.*`,
//!   `backupfs.gc.*`: the coordination of the nodes that serve the target (`lease`).

mod buffers;
pub mod catalogue;
pub mod chunk;
pub mod chunks;
pub mod client;
pub mod config;
pub mod device;
mod gc;
pub mod sigv4;
pub mod tls;

pub use config::S3TargetConfig;

use super::auth::TargetKey;
use super::catalogue::Catalogue as _;
use super::claim::Marker;
use super::record::rfc3339;
use super::store::{ObjectStore, S3Store};
use super::{BackupTarget, NewData, Result, TargetError};
use crate::ids::BackupId;
use crate::volume::Attachment;
use catalogue::{StoreCatalogue, store_error};
use chunk::{CHUNK_PREFIX, INDEX_CAP, INDEX_PREFIX, Index, Keys, is_chunk_name};
use chunks::{ChunkBackend, ChunkStore};
use device::{ChunkReader, ChunkWriter, Writing};
pub use gc::GcReport;
use gc::Mark;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

/// How often the records in memory are brought in step with the store (other nodes'
/// backups and deletions show within about that).
const REFRESH: Duration = Duration::from_secs(1);
/// Every how many `REFRESH` ticks a node looks for other nodes' heartbeats (a node that
/// joins is noticed within that, its backups listed a tick later: within 5 s), and
/// refreshes while it finds none.
const ALONE_LOOK: u64 = 4;
const ALONE_REFRESH: u64 = 30;

pub const MARKER_OBJECT: &str = "backupfs.target";
pub const KEYCHECK_OBJECT: &str = "backupfs.keycheck";
const MARKER_FORMAT: u32 = 1;
const KEYCHECK_TEXT: &[u8] = b"backupfs s3 target key check v1";
/// How many names a refusal shows.
const NAMED: usize = 5;
/// Indexes of stored backups kept in memory (the last opened).
const CACHED_INDEXES: usize = 8;

/// Writes a new random target key to `path` (`backupfs keygen FILE`): mode 0600, never
/// replacing a file or following a link there. The same key file serves `key` and
/// `encryption_key`: what each protects uses a key derived from it for that purpose alone.
pub fn keygen(path: &std::path::Path) -> std::result::Result<(), crate::targets::auth::KeyError> {
    crate::targets::auth::generate(path)
}

/// Why an `s3` target cannot be opened: a problem of one configuration key (what
/// `check-config` prints), or of the target itself.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    #[error(transparent)]
    Target(#[from] TargetError),
}

fn index_object(backup_id: &str) -> String {
    format!("{INDEX_PREFIX}{backup_id}")
}

/// Whether `name` (under the prefix) is one backupfs makes in an `s3` target.
fn is_ours(name: &str) -> bool {
    name == MARKER_OBJECT
        || name == KEYCHECK_OBJECT
        || is_chunk_name(name)
        || crate::targets::lease::is_coordination(name)
        || [
            catalogue::RECORD_PREFIX,
            catalogue::SUMS_PREFIX,
            INDEX_PREFIX,
        ]
        .iter()
        .any(|p| name.strip_prefix(p).is_some_and(crate::ids::is_backup_id))
}

struct Inner {
    name: String,
    store: Arc<dyn ChunkBackend>,
    chunks: Arc<ChunkStore>,
    catalogue: StoreCatalogue,
    /// Backups being written here: their indexes live in memory until `finish_data`.
    writing: Mutex<HashMap<String, Arc<Writing>>>,
    /// Indexes of stored backups (immutable once written).
    indexes: Mutex<HashMap<String, Arc<Index>>>,
    /// Held for a whole collection; the mark it leaves for the next one.
    gc: Mutex<Mark>,
    /// A collection is wanted (a backup was removed) or running in the background.
    gc_wanted: AtomicBool,
    gc_running: AtomicBool,
    /// A collection found another node's backup in progress and deleted nothing: tried
    /// again (by the background thread) once that may have ended.
    gc_deferred: Mutex<Option<std::time::Instant>>,
}

/// Backups as chunks in an S3 bucket.
pub struct S3Target {
    inner: Arc<Inner>,
}

/// Opens target `name` as `config` says, as a node named after this host with the
/// default lease (see [`open_as`]).
pub fn open(name: &str, config: &S3TargetConfig) -> std::result::Result<S3Target, S3Error> {
    open_as(
        name,
        config,
        &crate::config::host_name(),
        Duration::from_secs(30),
    )
}

/// Opens target `name` as `config` says, as node `node`: checks the keys, reads the
/// credentials, the key and the CA file, checks the bucket (over https, the gateway's
/// certificate), claims the prefix if it is empty (a prefix
/// holding anything else without our marker is refused), checks the key against the
/// target's, joins the nodes that serve it (refused while a live daemon serves it under
/// the same node name), reads the catalogue.
pub fn open_as(
    name: &str,
    config: &S3TargetConfig,
    node: &str,
    lease: Duration,
) -> std::result::Result<S3Target, S3Error> {
    let key_of = |k: &str| format!("targets.{name}.{k}");
    let (client, key) = connect(name, config)?;
    let client = Arc::new(client);
    let store = Arc::new(S3Store::new(client.clone(), &config.prefix));
    let keys = Keys::new(key.as_deref(), config.compression == "zstd");
    claim(name, &client, &store, &config.prefix, &keys).map_err(|e| match e {
        ClaimFailure::Prefix(message) => S3Error::Config {
            key: key_of("prefix"),
            message,
        },
        ClaimFailure::Key(message) => S3Error::Config {
            key: key_of("encryption_key"),
            message,
        },
        ClaimFailure::Store(e) => S3Error::Config {
            key: key_of("endpoint"),
            message: e.to_string(),
        },
    })?;
    let coordinator = crate::targets::lease::Coordinator::join(store.clone(), node, lease)
        .map_err(|e| match e {
            crate::targets::lease::LeaseError::NodeTaken { object, node } => {
                S3Error::Target(TargetError::NodeTaken {
                    target: name.to_string(),
                    node,
                    path: PathBuf::from(object),
                })
            }
            other => S3Error::Config {
                key: key_of("endpoint"),
                message: other.to_string(),
            },
        })?;
    Ok(S3Target::assemble(name, store, keys, key, coordinator)?)
}

/// What `check-config` asks of an `s3` target, and nothing more (it writes nothing):
/// its keys, its files (credentials, `encryption_key`, `ca_file`) read, and the gateway
/// reached over them (its TLS certificate, the credentials, the bucket). Each failure
/// names its key.
pub fn probe(name: &str, config: &S3TargetConfig) -> std::result::Result<(), S3Error> {
    connect(name, config).map(drop)
}

/// The keys checked, the files read and the bucket asked for: a client of it, and the
/// target key (None with `encryption = "none"`).
fn connect(
    name: &str,
    config: &S3TargetConfig,
) -> std::result::Result<(client::Client, Option<Arc<TargetKey>>), S3Error> {
    let key_of = |k: &str| format!("targets.{name}.{k}");
    if let Some(first) = config.validate(name).into_iter().next() {
        let (key, message) = first
            .split_once(": ")
            .map(|(k, m)| (k.to_string(), m.to_string()))
            .unwrap_or((key_of("?"), first.clone()));
        return Err(S3Error::Config { key, message });
    }
    let credentials =
        client::read_credentials(&config.credentials, &config.profile).map_err(|message| {
            S3Error::Config {
                key: key_of("credentials"),
                message,
            }
        })?;
    let key = match (&config.encryption_key, config.encryption.as_str()) {
        (Some(path), "aes-256-gcm") => Some(Arc::new(TargetKey::load(path).map_err(|e| {
            S3Error::Config {
                key: key_of("encryption_key"),
                message: e.to_string(),
            }
        })?)),
        _ => None,
    };
    let ca_file = match &config.ca_file {
        Some(path) => Some(tls::read_ca_file(path).map_err(|message| S3Error::Config {
            key: key_of("ca_file"),
            message,
        })?),
        None => None,
    };
    let client = client::Client::with_ca_file(
        client::Endpoint {
            url: config.endpoint.clone(),
            bucket: config.bucket.clone(),
            region: config.region.clone(),
        },
        credentials,
        Duration::from_secs(config.timeout),
        ca_file.as_ref(),
    )
    .map_err(|message| S3Error::Config {
        key: key_of("endpoint"),
        message,
    })?;
    if let Err(e) = client.head_bucket() {
        let key = match client::errno_of(&e) {
            Some(libc::ENOENT) => "bucket",
            Some(libc::EACCES) => "credentials",
            _ => "endpoint",
        };
        return Err(S3Error::Config {
            key: key_of(key),
            message: e.to_string(),
        });
    }
    Ok((client, key))
}

enum ClaimFailure {
    Prefix(String),
    Key(String),
    Store(std::io::Error),
}

/// Claims the prefix for `target` (or finds it claimed by it), then checks the key.
fn claim(
    target: &str,
    client: &client::Client,
    store: &S3Store,
    prefix: &str,
    keys: &Keys,
) -> std::result::Result<(), ClaimFailure> {
    let where_ = || format!("s3://{}/{prefix}", client.endpoint().bucket);
    let marker = match store.get(MARKER_OBJECT, 64 << 10) {
        Ok(marker) => marker,
        Err(e) => return Err(ClaimFailure::Store(e)),
    };
    match marker {
        Some(bytes) => {
            let marker: Marker = serde_json::from_slice(&bytes).map_err(|e| {
                ClaimFailure::Prefix(format!("{}: unreadable claim marker: {e}", where_()))
            })?;
            if marker.target != target {
                return Err(ClaimFailure::Prefix(format!(
                    "{} is claimed by target {:?} (claimed {})",
                    where_(),
                    marker.target,
                    marker.created_at
                )));
            }
        }
        None => {
            // Every object under the prefix, whatever its name (`a/b` included).
            let found: Vec<String> = client
                .list(prefix)
                .map_err(ClaimFailure::Store)?
                .into_iter()
                .map(|o| o.key)
                // (Another node that starts at this moment writes the key check and the
                // marker, which is read below when this node's create of it fails; a node
                // that has joined, its heartbeat.)
                .filter(|k| {
                    k.strip_prefix(prefix).is_none_or(|name| {
                        name != KEYCHECK_OBJECT
                            && name != MARKER_OBJECT
                            && !crate::targets::lease::is_coordination(name)
                    })
                })
                .collect();
            if !found.is_empty() {
                return Err(ClaimFailure::Prefix(format!(
                    "{} is not empty and carries no backupfs claim marker ({MARKER_OBJECT}): found {}{}; a target needs an empty prefix of its own",
                    where_(),
                    found
                        .iter()
                        .take(NAMED)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if found.len() > NAMED {
                        format!(" (and {} more)", found.len() - NAMED)
                    } else {
                        String::new()
                    }
                )));
            }
            // The key check first: a prefix with a marker always has one.
            let check = keys
                .seal_chunk(KEYCHECK_OBJECT, KEYCHECK_TEXT)
                .map_err(ClaimFailure::Store)?;
            store
                .put_if_absent(KEYCHECK_OBJECT, &check)
                .map_err(ClaimFailure::Store)?;
            let marker = Marker {
                format: MARKER_FORMAT,
                target: target.to_string(),
                id: uuid::Uuid::new_v4().to_string(),
                created_at: rfc3339(SystemTime::now()),
            };
            let mut bytes = serde_json::to_vec_pretty(&marker)
                .map_err(|e| ClaimFailure::Store(std::io::Error::other(e)))?;
            bytes.push(b'\n');
            if store
                .put_if_absent(MARKER_OBJECT, &bytes)
                .map_err(ClaimFailure::Store)?
            {
                tracing::info!(backup_target = target, "claimed {} for backups", where_());
            } else {
                // Another node claimed it first: fine if for this very target.
                return claim(target, client, store, prefix, keys);
            }
        }
    }
    let check = store
        .get(KEYCHECK_OBJECT, 4096)
        .map_err(ClaimFailure::Store)?
        .ok_or_else(|| {
            ClaimFailure::Key(format!("{} has no key check ({KEYCHECK_OBJECT})", where_()))
        })?;
    match keys.open_chunk(KEYCHECK_OBJECT, &check) {
        Ok(text) if text == KEYCHECK_TEXT => Ok(()),
        _ if keys.encrypted() => Err(ClaimFailure::Key(format!(
            "not the key of the target at {}: its objects do not open with it",
            where_()
        ))),
        _ => Err(ClaimFailure::Key(format!(
            "the target at {} is encrypted: encryption_key is needed",
            where_()
        ))),
    }
}

impl S3Target {
    /// The target over `store`, claimed and its key checked already.
    fn assemble(
        name: &str,
        store: Arc<dyn ChunkBackend>,
        keys: Keys,
        key: Option<Arc<TargetKey>>,
        coordinator: crate::targets::lease::Coordinator,
    ) -> Result<S3Target> {
        let catalogue = StoreCatalogue::open(name, store.clone(), key, Some(coordinator))?;
        let inner = Arc::new(Inner {
            name: name.to_string(),
            chunks: Arc::new(ChunkStore::new(store.clone(), keys)),
            store,
            catalogue,
            writing: Mutex::new(HashMap::new()),
            indexes: Mutex::new(HashMap::new()),
            gc: Mutex::new(Mark::default()),
            gc_wanted: AtomicBool::new(false),
            gc_running: AtomicBool::new(false),
            gc_deferred: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let _ = std::thread::Builder::new()
            .name(format!("s3-{name}"))
            .spawn(move || background(weak));
        Ok(S3Target { inner })
    }

    /// A target in memory, for the fast tests of everything above the store.
    #[cfg(test)]
    fn in_memory(key: Option<Arc<TargetKey>>) -> (S3Target, Arc<super::store::MemStore>) {
        let store = Arc::new(super::store::MemStore::default());
        (S3Target::on_memory(&store, "n", key), store)
    }

    /// Node `node`'s target over a store in memory (several nodes may share one).
    #[cfg(test)]
    fn on_memory(
        store: &Arc<super::store::MemStore>,
        node: &str,
        key: Option<Arc<TargetKey>>,
    ) -> S3Target {
        let keys = Keys::new(key.as_deref(), true);
        let coordinator =
            crate::targets::lease::Coordinator::join(store.clone(), node, Duration::from_secs(3))
                .unwrap_or_else(|e| panic!("{e}"));
        S3Target::assemble("t", store.clone(), keys, key, coordinator)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    pub fn store(&self) -> &Arc<dyn ChunkBackend> {
        &self.inner.store
    }

    /// Bytes uploaded and downloaded (compressed, encrypted) since open, and chunks
    /// uploaded: what a backup really sent.
    pub fn traffic(&self) -> (u64, u64, u64) {
        let c = &self.inner.chunks;
        (
            c.uploaded_bytes.load(Ordering::Relaxed),
            c.downloaded_bytes.load(Ordering::Relaxed),
            c.uploaded_chunks.load(Ordering::Relaxed),
        )
    }

    /// Chunks stored and their bytes.
    pub fn stored(&self) -> Result<(usize, u64)> {
        let listed = self
            .inner
            .store
            .list_sizes(CHUNK_PREFIX)
            .map_err(store_error("list", self.inner.store.as_ref(), CHUNK_PREFIX))?;
        let chunks: Vec<_> = listed.iter().filter(|(n, _)| is_chunk_name(n)).collect();
        Ok((chunks.len(), chunks.iter().map(|(_, s)| s).sum()))
    }

    /// Waits for the collection a removal started in the background, if one runs.
    pub fn wait_for_collections(&self) {
        while self.inner.gc_running.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Frees the chunks no backup names (see `Inner::collect_garbage`).
    pub fn collect_garbage(&self) -> Result<GcReport> {
        self.inner.collect_garbage()
    }
}

impl Inner {
    /// A stored backup's index, from the cache of the last few opened.
    fn index(&self, backup_id: &str) -> Result<Arc<Index>> {
        if let Some(index) = self.indexes.lock().get(backup_id) {
            return Ok(index.clone());
        }
        let index = Arc::new(self.load_index(backup_id)?);
        let mut indexes = self.indexes.lock();
        // A 1 TiB image's index is ~25 MiB in memory: keep only a few.
        if indexes.len() >= CACHED_INDEXES
            && let Some(old) = indexes.keys().next().cloned()
        {
            indexes.remove(&old);
        }
        indexes.insert(backup_id.to_string(), index.clone());
        Ok(index)
    }

    /// A stored backup's index, read and checked (not cached).
    fn load_index(&self, backup_id: &str) -> Result<Index> {
        if let Some(index) = self.indexes.lock().get(backup_id) {
            return Ok((**index).clone());
        }
        let name = index_object(backup_id);
        let bytes = self
            .store
            .get(&name, INDEX_CAP)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EFBIG) {
                    TargetError::BadRecord {
                        path: PathBuf::from(&name),
                        message: format!("damaged: larger than {INDEX_CAP} bytes"),
                    }
                } else {
                    store_error("read", self.store.as_ref(), &name)(e)
                }
            })?
            .ok_or_else(|| TargetError::NotFound(backup_id.to_string()))?;
        let index = self
            .chunks
            .keys
            .open_index(backup_id, &bytes)
            .map_err(|e| {
                tracing::error!(backup_target = self.name, "index {name}: {e}: damaged");
                TargetError::BadRecord {
                    path: PathBuf::from(&name),
                    message: format!("damaged: {e}"),
                }
            })?;
        Ok(index)
    }
}

/// The target's background work while it is open: the records in memory follow the store
/// (every `REFRESH`: other nodes' backups and deletions), and a collection that found
/// another node's backup in progress is tried again now and then.
fn background(inner: std::sync::Weak<Inner>) {
    let mut failing = false;
    let mut others = true;
    for tick in 1u64.. {
        std::thread::sleep(REFRESH);
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let again = inner
            .catalogue
            .coordinator()
            .map_or(Duration::from_secs(15), |c| c.lease() / 2);
        let deferred = inner
            .gc_deferred
            .lock()
            .is_some_and(|at| at.elapsed() >= again);
        if deferred {
            // Listing every chunk and index again is for when it can free something: while
            // another node still backs up (one cheap look at the claims), wait on.
            let busy_elsewhere = inner.catalogue.coordinator().is_some_and(|c| {
                c.claims()
                    .map(|claims| claims.iter().any(|(_, beat)| beat.node != c.node()))
                    .unwrap_or(true)
            });
            *inner.gc_deferred.lock() = busy_elsewhere.then(std::time::Instant::now);
            if !busy_elsewhere {
                inner.collect_garbage_soon();
            }
        }
        // Alone on the target (no other node's heartbeat, looked for every few seconds),
        // the records in memory are this node's own writes: a LIST now and then will do.
        if tick.is_multiple_of(ALONE_LOOK) {
            others = inner
                .catalogue
                .coordinator()
                .is_none_or(|c| c.others_present());
        }
        if !others && !tick.is_multiple_of(ALONE_REFRESH) {
            continue;
        }
        match inner.catalogue.refresh() {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        backup_target = inner.name,
                        "cannot read the records of other nodes (tried again every second): {e}"
                    );
                }
                failing = true;
            }
        }
    }
}

impl BackupTarget for S3Target {
    fn name(&self) -> &str {
        &self.inner.name
    }

    fn catalogue(&self) -> &dyn super::catalogue::Catalogue {
        &self.inner.catalogue
    }

    /// With a `base`, the new backup starts as the base's index (same chunks, nothing
    /// stored) and the copy uploads only the chunks it changes.
    fn shares_data(&self) -> bool {
        true
    }

    fn create_data(
        &self,
        backup_id: &BackupId,
        size: u64,
        base: Option<&BackupId>,
    ) -> Result<NewData> {
        // Written after the backup's claim, before its first decision that a chunk is
        // stored: a collection elsewhere that may not have seen the claim ends first
        // (`lease::gc`); what this node knew to be stored may have gone meanwhile.
        if let Some(coordinator) = self.inner.catalogue.coordinator() {
            coordinator.await_collections().map_err(store_error(
                "read the garbage collections of",
                self.inner.store.as_ref(),
                crate::targets::lease::GC_PREFIX,
            ))?;
        }
        self.inner.chunks.forget_known();
        let mut shared = false;
        let mut index = Index::new(backup_id, size);
        if let Some(base) = base {
            let base_index = self.inner.index(base)?;
            if base_index.size <= size {
                index = Index {
                    backup_id: backup_id.to_string(),
                    ..(*base_index).clone()
                };
                index.grow(size);
                shared = true;
            }
        }
        let writing = Arc::new(Writing::new(self.inner.chunks.clone(), index));
        self.inner
            .writing
            .lock()
            .insert(backup_id.to_string(), writing.clone());
        Ok(NewData {
            attachment: Attachment::new(ChunkWriter {
                writing,
                describe: format!("{}{}", self.inner.store.describe(), index_object(backup_id)),
            }),
            shared,
        })
    }

    /// Uploads what is left, then writes the index (create-only): from now on the backup
    /// is its index.
    fn finish_data(&self, backup_id: &BackupId) -> Result<()> {
        let writing = self
            .inner
            .writing
            .lock()
            .get(backup_id.as_str())
            .cloned()
            .ok_or_else(|| TargetError::NotFound(backup_id.to_string()))?;
        let name = index_object(backup_id);
        writing
            .flush_all()
            .map_err(store_error("write", self.inner.store.as_ref(), &name))?;
        let index = writing.index.lock().clone();
        let bytes = self
            .inner
            .chunks
            .keys
            .seal_index(&index)
            .map_err(store_error("write", self.inner.store.as_ref(), &name))?;
        self.inner.store.put(&name, &bytes).map_err(store_error(
            "write",
            self.inner.store.as_ref(),
            &name,
        ))?;
        self.inner.writing.lock().remove(backup_id.as_str());
        Ok(())
    }

    fn open_data(&self, backup_id: &BackupId) -> Result<Attachment> {
        if let Some(writing) = self.inner.writing.lock().get(backup_id.as_str()) {
            return Ok(Attachment::new(ChunkWriter {
                writing: writing.clone(),
                describe: format!("{}{}", self.inner.store.describe(), index_object(backup_id)),
            }));
        }
        let index = self.inner.index(backup_id)?;
        Ok(Attachment::new(ChunkReader::new(
            index,
            self.inner.chunks.clone(),
            format!("{}{}", self.inner.store.describe(), index_object(backup_id)),
        )))
    }

    /// Removes the backup's index; its chunks are freed by the next garbage collection
    /// (started now, in the background) if no other backup names them.
    fn remove_data(&self, backup_id: &BackupId) -> Result<()> {
        let name = index_object(backup_id);
        self.inner.writing.lock().remove(backup_id.as_str());
        self.inner.store.delete(&name).map_err(store_error(
            "remove",
            self.inner.store.as_ref(),
            &name,
        ))?;
        self.inner.indexes.lock().remove(backup_id.as_str());
        self.inner.collect_garbage_soon();
        Ok(())
    }

    fn data_ids(&self) -> Result<Vec<String>> {
        let mut ids: HashSet<String> = self
            .inner
            .store
            .list(INDEX_PREFIX)
            .map_err(store_error("list", self.inner.store.as_ref(), INDEX_PREFIX))?
            .into_iter()
            .filter_map(|n| n.strip_prefix(INDEX_PREFIX).map(str::to_string))
            .filter(|id| crate::ids::is_backup_id(id))
            .collect();
        ids.extend(self.inner.writing.lock().keys().cloned());
        let mut ids: Vec<String> = ids.into_iter().collect();
        ids.sort();
        Ok(ids)
    }

    /// What the copy wrote for it (the record's `stored_bytes`): a backup's own share of
    /// deduplicated chunks has no single answer.
    fn allocated(&self, backup_id: &BackupId) -> Result<u64> {
        Ok(self.record(backup_id)?.stored_bytes)
    }

    fn free_space(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    fn strays(&self) -> Result<Vec<String>> {
        let mut strays: Vec<String> = self
            .inner
            .store
            .list("")
            .map_err(store_error("list", self.inner.store.as_ref(), ""))?
            .into_iter()
            .filter(|n| !is_ours(n))
            .map(|n| format!("object {n}"))
            .collect();
        for id in self.data_ids()? {
            let owned = BackupId::parse(&id)
                .map(|id| !matches!(self.record(&id), Err(TargetError::NotFound(_))))
                .unwrap_or(false);
            if !owned {
                strays.push(format!("the data of backup {id}"));
            }
        }
        Ok(strays)
    }
}

#[cfg(test)]
mod tests;
