//! The chunks of one `s3` target: stored once each (a name already there is not
//! uploaded again), read back checked, and kept decrypted in a small shared cache so
//! that 1 MiB image reads do not fetch a 4 MiB chunk four times. A chunk that fails its
//! check is EIO, never zeros and never unchecked bytes.
//!
//! Garbage collection and uploads exclude each other through `uses`: a writer holds it
//! (read) from deciding that a chunk is there until the chunk's name is in its index in
//! memory, which is where a collection looks (write) before deleting anything.

use super::chunk::{CHUNK_CAP, Keys};
use crate::targets::store::{MemStore, ObjectStore, S3Store};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Decrypted chunks kept for readers: 20 × 4 MiB. A sequential reader's window ahead
/// (`device::AHEAD`, 16) and the copier's chunks in progress behind it fit: a chunk read
/// to its end leaves at once (`release`), so the cache holds mostly what is still ahead.
const CACHE_CHUNKS: usize = 20;
/// Names known to be stored (uploaded or seen), so that dedup costs no request.
const KNOWN_NAMES: usize = 1 << 16;

/// What the chunks need of a store beyond `ObjectStore`: a cheap existence check and
/// sizes in a listing. An S3 bucket (HEAD, ListObjectsV2) in service; memory in the
/// fast unit tests.
pub trait ChunkBackend: ObjectStore {
    fn exists(&self, name: &str) -> io::Result<bool>;
    /// The objects whose names start with `prefix`, with their sizes in bytes.
    fn list_sizes(&self, prefix: &str) -> io::Result<Vec<(String, u64)>>;
    /// The objects whose names start with `prefix`, each with a tag that changes when it
    /// is rewritten with other bytes (one LIST: how other nodes' records are noticed).
    fn list_tags(&self, prefix: &str) -> io::Result<Vec<(String, String)>>;
}

impl ChunkBackend for S3Store {
    fn exists(&self, name: &str) -> io::Result<bool> {
        S3Store::exists(self, name)
    }

    fn list_sizes(&self, prefix: &str) -> io::Result<Vec<(String, u64)>> {
        S3Store::list_sizes(self, prefix)
    }

    fn list_tags(&self, prefix: &str) -> io::Result<Vec<(String, String)>> {
        S3Store::list_tags(self, prefix)
    }
}

impl ChunkBackend for MemStore {
    fn exists(&self, name: &str) -> io::Result<bool> {
        Ok(self.get(name, u64::MAX)?.is_some())
    }

    fn list_sizes(&self, prefix: &str) -> io::Result<Vec<(String, u64)>> {
        let mut sizes = Vec::new();
        for name in self.list(prefix)? {
            if let Some(bytes) = self.get(&name, u64::MAX)? {
                sizes.push((name, bytes.len() as u64));
            }
        }
        Ok(sizes)
    }

    fn list_tags(&self, prefix: &str) -> io::Result<Vec<(String, String)>> {
        use std::hash::{Hash, Hasher};
        let mut tags = Vec::new();
        for name in self.list(prefix)? {
            if let Some(bytes) = self.get(&name, u64::MAX)? {
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut hasher);
                tags.push((name, format!("{:016x}", hasher.finish())));
            }
        }
        Ok(tags)
    }
}

pub struct ChunkStore {
    pub store: Arc<dyn ChunkBackend>,
    pub keys: Keys,
    /// Held (read) while a chunk is found or uploaded and named in an index in memory;
    /// held (write) by garbage collection while it decides and deletes.
    pub uses: RwLock<()>,
    known: Mutex<KnownNames>,
    cache: Mutex<Cache>,
    /// Loads in flight, so that a reader joins a prefetch of the same chunk.
    loading: Mutex<HashMap<String, Arc<Loading>>>,
    pub uploaded_bytes: AtomicU64,
    pub uploaded_chunks: AtomicU64,
    pub downloaded_bytes: AtomicU64,
}

#[derive(Default)]
struct KnownNames {
    set: HashSet<String>,
    order: VecDeque<String>,
}

impl KnownNames {
    fn insert(&mut self, name: &str) {
        if self.set.insert(name.to_string()) {
            self.order.push_back(name.to_string());
            if self.order.len() > KNOWN_NAMES
                && let Some(old) = self.order.pop_front()
            {
                self.set.remove(&old);
            }
        }
    }
}

#[derive(Default)]
struct Cache {
    chunks: HashMap<String, Arc<Vec<u8>>>,
    order: VecDeque<String>,
}

/// A finished load as its waiters see it: the chunk, or the errno and message.
type Loaded = Result<Arc<Vec<u8>>, (i32, String)>;

#[derive(Default)]
struct Loading {
    done: Mutex<Option<Loaded>>,
    ready: Condvar,
}

impl ChunkStore {
    pub fn new(store: Arc<dyn ChunkBackend>, keys: Keys) -> ChunkStore {
        ChunkStore {
            store,
            keys,
            uses: RwLock::new(()),
            known: Mutex::new(KnownNames::default()),
            cache: Mutex::new(Cache::default()),
            loading: Mutex::new(HashMap::new()),
            uploaded_bytes: AtomicU64::new(0),
            uploaded_chunks: AtomicU64::new(0),
            downloaded_bytes: AtomicU64::new(0),
        }
    }

    /// Stores `plaintext` as a chunk (unless it is there already) and returns its name;
    /// None for all zeros (a hole: nothing stored). Call with `uses` held (read) until
    /// the name is in an index in memory.
    pub fn save(&self, plaintext: &[u8]) -> io::Result<Option<String>> {
        if plaintext.iter().all(|&b| b == 0) {
            return Ok(None);
        }
        let name = self.keys.chunk_name(plaintext);
        if self.known.lock().set.contains(&name) {
            return Ok(Some(name));
        }
        if !self.store.exists(&name)? {
            let object = self.keys.seal_chunk(&name, plaintext)?;
            // Create-only: another node storing the same chunk at once is fine.
            if self.store.put_if_absent(&name, &object)? {
                self.uploaded_bytes
                    .fetch_add(object.len() as u64, Ordering::Relaxed);
                self.uploaded_chunks.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.known.lock().insert(&name);
        Ok(Some(name))
    }

    /// Forgets every name known to be stored: a collection on another node may have
    /// deleted it (called as a backup begins, after the handshake of `lease::gc`).
    pub fn forget_known(&self) {
        let mut known = self.known.lock();
        known.set.clear();
        known.order.clear();
    }

    /// Forgets names (deleted by garbage collection).
    pub fn forget(&self, names: &HashSet<String>) {
        let mut known = self.known.lock();
        known.set.retain(|n| !names.contains(n));
        known.order.retain(|n| !names.contains(n));
        let mut cache = self.cache.lock();
        cache.chunks.retain(|n, _| !names.contains(n));
        cache.order.retain(|n| !names.contains(n));
    }

    /// Whether chunk `name` is in the cache or being fetched (a prefetch need not start).
    pub fn is_at_hand(&self, name: &str) -> bool {
        self.cache.lock().chunks.contains_key(name) || self.loading.lock().contains_key(name)
    }

    /// Lets chunk `name` go from the cache (a sequential reader read all of it): its
    /// buffer goes back for the next fetch unless someone still holds it. A later read
    /// of it fetches it again.
    pub fn release(&self, name: &str) {
        let mut cache = self.cache.lock();
        let Some(chunk) = cache.chunks.remove(name) else {
            return;
        };
        cache.order.retain(|n| n != name);
        drop(cache);
        if let Ok(buffer) = Arc::try_unwrap(chunk) {
            super::buffers::give_back(buffer);
        }
    }

    /// Chunks being fetched now (by readers and their prefetches).
    pub fn loads_in_flight(&self) -> usize {
        self.loading.lock().len()
    }

    /// The plaintext of chunk `name`, checked (from the cache, or joined to a load in
    /// flight, or fetched). A chunk that is missing or fails its check is EIO.
    pub fn load(&self, name: &str) -> io::Result<Arc<Vec<u8>>> {
        if let Some(chunk) = self.cache.lock().chunks.get(name) {
            return Ok(chunk.clone());
        }
        let (loading, mine) = {
            let mut loading = self.loading.lock();
            match loading.get(name) {
                Some(l) => (l.clone(), false),
                None => {
                    let l = Arc::new(Loading::default());
                    loading.insert(name.to_string(), l.clone());
                    (l, true)
                }
            }
        };
        if mine {
            let result = self.fetch(name);
            if let Ok(chunk) = &result {
                let mut cache = self.cache.lock();
                if cache
                    .chunks
                    .insert(name.to_string(), chunk.clone())
                    .is_none()
                {
                    cache.order.push_back(name.to_string());
                }
                while cache.order.len() > CACHE_CHUNKS {
                    if let Some(old) = cache.order.pop_front()
                        && let Some(chunk) = cache.chunks.remove(&old)
                        && let Ok(buffer) = Arc::try_unwrap(chunk)
                    {
                        // Nobody reads it any more: the next fetch receives into it.
                        super::buffers::give_back(buffer);
                    }
                }
            }
            let shared = match &result {
                Ok(chunk) => Ok(chunk.clone()),
                Err(e) => Err((e.raw_os_error().unwrap_or(libc::EIO), e.to_string())),
            };
            *loading.done.lock() = Some(shared);
            loading.ready.notify_all();
            self.loading.lock().remove(name);
            return result;
        }
        let mut done = loading.done.lock();
        while done.is_none() {
            loading.ready.wait(&mut done);
        }
        match done.as_ref() {
            Some(Ok(chunk)) => Ok(chunk.clone()),
            Some(Err((code, _))) => Err(io::Error::from_raw_os_error(*code)),
            None => Err(io::Error::from_raw_os_error(libc::EIO)),
        }
    }

    fn fetch(&self, name: &str) -> io::Result<Arc<Vec<u8>>> {
        let object = match self.store.get(name, CHUNK_CAP) {
            Ok(Some(object)) => object,
            Ok(None) => {
                tracing::error!(
                    "chunk {name} of {} is missing: damaged",
                    self.store.describe()
                );
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                tracing::error!(
                    "chunk {name} of {} is too big: damaged",
                    self.store.describe()
                );
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            Err(e) => return Err(e),
        };
        self.downloaded_bytes
            .fetch_add(object.len() as u64, Ordering::Relaxed);
        match self.keys.open_chunk_owned(name, object) {
            Ok(plaintext) => {
                self.known.lock().insert(name);
                Ok(Arc::new(plaintext))
            }
            Err(e) => {
                tracing::error!("chunk {name} of {}: {e}: damaged", self.store.describe());
                Err(io::Error::from_raw_os_error(libc::EIO))
            }
        }
    }
}
