//! Several nodes, one target, no coordinator: the target's own storage is the arbiter
//! (see ARCHITECTURE.md, "Several nodes"). Everything here is a few small objects of an
//! [`ObjectStore`] beside the catalogue:
//!
//! - `backupfs.node.<node>`: the node's heartbeat. A daemon joins a target only if no
//!   other live daemon beats under its node name; it rewrites the object every
//!   `lease / 6` and removes it when it stops.
//! - `backupfs.claim.<backend>.<volume>`: a backup in progress of that volume (made with
//!   put-if-absent, so of two nodes asking at once exactly one gets it; the other's
//!   request is EBUSY). It names the backup, its node and the parent it builds on, and
//!   its holder rewrites it (a heartbeat) like the node object.
//! - `backupfs.end.<backup>`: who decided how that backup ended, made with put-if-absent:
//!   the node that made it (`available` or `error`), or a node that found its claim
//!   unchanged for a whole lease and took it over (`reaped`). Exactly one decides.
//!
//! - `backupfs.lock.<backup>`: held (made with put-if-absent, removed after) while a node
//!   reads, changes and writes back that backup's record (an xattr, a verify, a delete),
//!   so that no node writes back a record another has just changed.
//! - `backupfs.gc.<node>`: a garbage collection of shared data in progress on that node
//!   (an `s3` target's chunks), with the handshake that keeps it from deleting what a
//!   backup in progress elsewhere names (`gc`).
//!
//! Liveness is observed, never compared across clocks: another node's claim is stale once
//! its bytes have not changed for `lease` by the observer's own monotonic clock. A holder
//! whose last successful renewal is older than two thirds of a lease (paused, cut off) no
//! longer writes a record or data: it is fenced, and its job ends `error`.

mod gc;
pub use gc::{Collection, InProgress};

use super::store::ObjectStore;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const NODE_PREFIX: &str = "backupfs.node.";
pub const CLAIM_PREFIX: &str = "backupfs.claim.";
pub const END_PREFIX: &str = "backupfs.end.";
pub const LOCK_PREFIX: &str = "backupfs.lock.";
pub use gc::GC_PREFIX;
/// How long a change of a record waits for another node's change of it to end.
const RECORD_LOCK_WAIT: Duration = Duration::from_secs(10);
/// The largest coordination object read (one is a few hundred bytes).
const CAP: u64 = 64 << 10;
/// How long a start waits for a daemon of the same node on this machine that is stopping
/// (right after an `umount`) to let go.
const STOPPING_WAIT: Duration = Duration::from_secs(10);

/// Whether `name` is one of the coordination objects (or a temporary of one).
pub fn is_coordination(name: &str) -> bool {
    let name = name.strip_prefix('.').unwrap_or(name);
    name.starts_with(NODE_PREFIX)
        || name.starts_with(CLAIM_PREFIX)
        || name.starts_with(END_PREFIX)
        || name.starts_with(LOCK_PREFIX)
        || name.starts_with(GC_PREFIX)
}

/// The claim object of a volume of a backend.
pub fn claim_object(backend: &str, volume: &str) -> String {
    format!("{CLAIM_PREFIX}{backend}.{volume}")
}

/// Whether `node` can name a node: what a host name may hold.
pub fn valid_node(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 64
        && node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// A node's or a claim's heartbeat, as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Beat {
    pub node: String,
    /// The process (`<boot id>.<pid>.<start time>.<random>`): a daemon on the same
    /// machine can tell that it is gone.
    pub holder: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub beat: u64,
}

/// How a backup ended, as the end object says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct End {
    pub node: String,
    /// `available`, `error` or `reaped`.
    pub outcome: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("node {node} already serves this target (its heartbeat {object} is alive)")]
    NodeTaken { node: String, object: String },
    #[error("{0}")]
    Busy(String),
    #[error("{op} {object}: {source}")]
    Io {
        op: &'static str,
        object: String,
        source: io::Error,
    },
}

fn io_err(op: &'static str, object: &str) -> impl FnOnce(io::Error) -> LeaseError {
    let object = object.to_string();
    move |source| LeaseError::Io { op, object, source }
}

/// A backup in progress that this node holds.
pub struct Claim {
    pub object: String,
    pub backup_id: String,
    parent: Mutex<Option<String>>,
    beat: AtomicU64,
    renewed: Mutex<Instant>,
    /// Another node decided this backup's end: nothing more is written for it.
    lost: AtomicBool,
    /// Released: the claim object is gone for good. Held while the object is written or
    /// removed, so that a renewal that found the claim just before its release (the
    /// nodes' round copies the claims, then writes each) cannot write the object back
    /// after the release removed it: that left a claim no one renews, and the volume
    /// refused with EBUSY by the very node that had finished its backup.
    released: Mutex<bool>,
}

impl Claim {
    /// Whether this node may still write for the backup: not taken over, and renewed
    /// recently enough that no other node can have found it stale.
    pub fn valid(&self, lease: Duration) -> bool {
        !self.lost.load(Ordering::Relaxed) && self.renewed.lock().elapsed() < lease * 2 / 3
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }
}

/// Another node's claim found stale: its backup may be taken over.
#[derive(Debug, Clone)]
pub struct Stale {
    pub object: String,
    pub beat: Beat,
}

/// This node's part in the coordination of one target.
pub struct Coordinator {
    store: Arc<dyn ObjectStore>,
    node: String,
    holder: String,
    lease: Duration,
    node_object: String,
    node_beat: AtomicU64,
    node_renewed: Mutex<Instant>,
    claims: Mutex<HashMap<String, Arc<Claim>>>,
    /// Claims of others: their bytes when first seen so, and when.
    observed: Mutex<HashMap<String, (Vec<u8>, Instant)>>,
}

impl Coordinator {
    /// Joins the target as `node`: refused while another live daemon beats under that
    /// name. A heartbeat left by a dead process of this machine is taken over at once; one
    /// from elsewhere once it has not changed for a whole lease.
    pub fn join(
        store: Arc<dyn ObjectStore>,
        node: &str,
        lease: Duration,
    ) -> Result<Coordinator, LeaseError> {
        let holder = holder_cookie();
        let node_object = format!("{NODE_PREFIX}{node}");
        let coordinator = Coordinator {
            store,
            node: node.to_string(),
            holder,
            lease,
            node_object: node_object.clone(),
            node_beat: AtomicU64::new(0),
            node_renewed: Mutex::new(Instant::now()),
            claims: Mutex::new(HashMap::new()),
            observed: Mutex::new(HashMap::new()),
        };
        let ours = coordinator.node_bytes(0);
        let taken = || LeaseError::NodeTaken {
            node: node.to_string(),
            object: format!("{}/{node_object}", coordinator.store.describe()),
        };
        if coordinator
            .store
            .put_if_absent(&node_object, &ours)
            .map_err(io_err("create", &node_object))?
        {
            coordinator.store.remove_leftovers(&node_object);
            return Ok(coordinator);
        }
        // Someone beats (or beat) under our name.
        let started = Instant::now();
        let mut seen: Option<Vec<u8>> = None;
        let mut seen_at = Instant::now();
        let mut waited = false;
        loop {
            let current = coordinator
                .store
                .get(&node_object, CAP)
                .map_err(io_err("read", &node_object))?;
            let Some(current) = current else {
                if coordinator
                    .store
                    .put_if_absent(&node_object, &ours)
                    .map_err(io_err("create", &node_object))?
                {
                    coordinator.store.remove_leftovers(&node_object);
                    return Ok(coordinator);
                }
                continue;
            };
            let beat: Option<Beat> = serde_json::from_slice(&current).ok();
            let holder = beat.as_ref().map(|b| b.holder.as_str()).unwrap_or("");
            if holder_is_dead(holder) {
                break;
            }
            if holder_is_alive_here(holder) {
                // A daemon of this machine: one that is stopping lets go in a moment.
                if !waited {
                    tracing::warn!(
                        "node {node} is held by another backupfs on this machine (one that is still stopping?): waiting up to {} s",
                        STOPPING_WAIT.as_secs()
                    );
                    waited = true;
                }
                if started.elapsed() >= STOPPING_WAIT {
                    return Err(taken());
                }
            } else if seen.as_ref() != Some(&current) {
                if seen.is_some() {
                    // It beats: alive.
                    return Err(taken());
                }
                seen = Some(current);
                seen_at = Instant::now();
                tracing::warn!(
                    "node {node}'s heartbeat on {} is there: waiting up to {} s to see whether it is alive",
                    coordinator.store.describe(),
                    lease.as_secs()
                );
            } else if seen_at.elapsed() >= lease {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        coordinator
            .store
            .put(&node_object, &ours)
            .map_err(io_err("write", &node_object))?;
        tracing::info!("node {node}: took over the heartbeat its earlier daemon left");
        coordinator.store.remove_leftovers(&node_object);
        Ok(coordinator)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    fn node_bytes(&self, beat: u64) -> Vec<u8> {
        encode(&Beat {
            node: self.node.clone(),
            holder: self.holder.clone(),
            backup_id: None,
            parent: None,
            beat,
        })
    }

    fn claim_bytes(&self, claim: &Claim, beat: u64) -> Vec<u8> {
        encode(&Beat {
            node: self.node.clone(),
            holder: self.holder.clone(),
            backup_id: Some(claim.backup_id.clone()),
            parent: claim.parent.lock().clone(),
            beat,
        })
    }

    /// Claims `volume` of `backend` for backup `backup_id`: EBUSY (`Busy`) while any node
    /// holds a claim on it.
    pub fn claim(
        &self,
        backend: &str,
        volume: &str,
        backup_id: &str,
    ) -> Result<Arc<Claim>, LeaseError> {
        let object = claim_object(backend, volume);
        let claim = Arc::new(Claim {
            object: object.clone(),
            backup_id: backup_id.to_string(),
            parent: Mutex::new(None),
            beat: AtomicU64::new(0),
            renewed: Mutex::new(Instant::now()),
            lost: AtomicBool::new(false),
            released: Mutex::new(false),
        });
        let bytes = self.claim_bytes(&claim, 0);
        if self
            .store
            .put_if_absent(&object, &bytes)
            .map_err(io_err("create", &object))?
        {
            *claim.renewed.lock() = Instant::now();
            self.claims.lock().insert(object, claim.clone());
            return Ok(claim);
        }
        let holder = self
            .store
            .get(&object, CAP)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Beat>(&b).ok());
        Err(LeaseError::Busy(match holder {
            Some(beat) => format!(
                "volume {volume} is being backed up by node {} (backup {})",
                beat.node,
                beat.backup_id.unwrap_or_default()
            ),
            None => format!("volume {volume} is being backed up by another node"),
        }))
    }

    /// Names the parent the claimed backup builds on, so that no node deletes it
    /// meanwhile. The caller then checks the parent is still there.
    pub fn set_parent(&self, claim: &Claim, parent: Option<&str>) -> Result<(), LeaseError> {
        *claim.parent.lock() = parent.map(str::to_string);
        self.renew_claim(claim)
    }

    fn renew_claim(&self, claim: &Claim) -> Result<(), LeaseError> {
        let released = claim.released.lock();
        if *released {
            return Ok(());
        }
        if !claim.valid(self.lease) {
            claim.lost.store(true, Ordering::Relaxed);
            return Err(LeaseError::Busy(format!(
                "backup {}: this node's claim lapsed (another node may have taken it over)",
                claim.backup_id
            )));
        }
        let beat = claim.beat.fetch_add(1, Ordering::Relaxed) + 1;
        let bytes = self.claim_bytes(claim, beat);
        self.store
            .rewrite(&claim.object, &bytes)
            .map_err(io_err("write", &claim.object))?;
        *claim.renewed.lock() = Instant::now();
        Ok(())
    }

    /// Renews the node's heartbeat and every claim it holds (call every `lease / 6`);
    /// a claim another node has decided the end of is marked lost. The claims lost now.
    pub fn renew(&self) -> Vec<Arc<Claim>> {
        let beat = self.node_beat.fetch_add(1, Ordering::Relaxed) + 1;
        let stolen = match self.store.get(&self.node_object, CAP) {
            Ok(Some(bytes)) => serde_json::from_slice::<Beat>(&bytes)
                .map(|b| b.holder != self.holder)
                .unwrap_or(true),
            _ => false,
        };
        if stolen {
            tracing::error!(
                "node {}: another backupfs took over this node's heartbeat on {}; this daemon no longer writes backups there",
                self.node,
                self.store.describe()
            );
        } else {
            match self
                .store
                .rewrite(&self.node_object, &self.node_bytes(beat))
            {
                Ok(()) => *self.node_renewed.lock() = Instant::now(),
                Err(e) => tracing::warn!("cannot renew node {}'s heartbeat: {e}", self.node),
            }
        }
        let claims: Vec<Arc<Claim>> = self.claims.lock().values().cloned().collect();
        let mut lost = Vec::new();
        for claim in claims {
            let decided = self
                .store
                .get(&format!("{END_PREFIX}{}", claim.backup_id), CAP)
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<End>(&b).ok())
                .is_some_and(|end| end.node != self.node || end.outcome == "reaped");
            if stolen || decided {
                claim.lost.store(true, Ordering::Relaxed);
            }
            if claim.is_lost() {
                lost.push(claim);
                continue;
            }
            if let Err(e) = self.renew_claim(&claim) {
                tracing::warn!("cannot renew the claim of backup {}: {e}", claim.backup_id);
                if claim.is_lost() {
                    lost.push(claim);
                }
            }
        }
        lost
    }

    /// Decides how the claimed backup ends (`available` or `error`): Ok(false), and
    /// nothing to write, if this node no longer may (another node took it over); an error
    /// if the decision could not be stored (the claim is still this node's).
    pub fn decide(&self, claim: &Claim, outcome: &str) -> io::Result<bool> {
        if !claim.valid(self.lease) {
            claim.lost.store(true, Ordering::Relaxed);
            return Ok(false);
        }
        let object = format!("{END_PREFIX}{}", claim.backup_id);
        let end = encode(&End {
            node: self.node.clone(),
            outcome: outcome.to_string(),
        });
        let won = self.store.put_if_absent(&object, &end)?;
        if !won {
            claim.lost.store(true, Ordering::Relaxed);
        }
        Ok(won)
    }

    /// Lets go of a claim once its record is written. A claim that was lost is left to
    /// the node that took it over.
    pub fn release(&self, claim: &Claim) {
        self.claims.lock().remove(&claim.object);
        let mut released = claim.released.lock();
        *released = true;
        if claim.is_lost() {
            return;
        }
        if let Err(e) = self.store.delete(&claim.object) {
            tracing::warn!("cannot remove {}: {e}", claim.object);
        }
        let end = format!("{END_PREFIX}{}", claim.backup_id);
        if let Err(e) = self.store.delete(&end) {
            tracing::warn!("cannot remove {end}: {e}");
        }
    }

    /// Every claim on the target (every node's), as stored.
    pub fn claims(&self) -> io::Result<Vec<(String, Beat)>> {
        let mut out = Vec::new();
        for object in self.store.list(CLAIM_PREFIX)? {
            if let Some(beat) = self
                .store
                .get(&object, CAP)?
                .and_then(|b| serde_json::from_slice::<Beat>(&b).ok())
            {
                out.push((object, beat));
            }
        }
        Ok(out)
    }

    /// Whether no daemon but this one may be writing for a backup of `volume` of
    /// `backend`: no claim on it, or this daemon's own (held, or taken over from a node
    /// whose claim lapsed), or one a dead process of this machine left. What another client still writes for it then is a dead or
    /// fenced node's, which may be cut off.
    pub fn volume_is_ours_or_free(&self, backend: &str, volume: &str) -> io::Result<bool> {
        let object = claim_object(backend, volume);
        Ok(match self.store.get(&object, CAP)? {
            None => true,
            Some(bytes) => serde_json::from_slice::<Beat>(&bytes)
                .is_ok_and(|beat| beat.holder == self.holder || holder_is_dead(&beat.holder)),
        })
    }

    /// The backups some node's backup in progress builds on.
    pub fn parents_in_use(&self) -> io::Result<HashSet<String>> {
        Ok(self
            .claims()?
            .into_iter()
            .filter_map(|(_, beat)| beat.parent)
            .collect())
    }

    /// The claims that are not this daemon's and have not changed for a whole lease (by
    /// this node's clock); this node's own from before a restart are stale at once.
    pub fn stale(&self) -> io::Result<Vec<Stale>> {
        let ours: HashSet<String> = self.claims.lock().keys().cloned().collect();
        let mut observed = self.observed.lock();
        let mut stale = Vec::new();
        let mut listed = HashSet::new();
        for object in self.store.list(CLAIM_PREFIX)? {
            if ours.contains(&object) {
                continue;
            }
            let Some(bytes) = self.store.get(&object, CAP)? else {
                continue;
            };
            listed.insert(object.clone());
            let Ok(beat) = serde_json::from_slice::<Beat>(&bytes) else {
                tracing::warn!("{object} cannot be read as a claim: left in place");
                continue;
            };
            let same_node_before = beat.node == self.node && beat.holder != self.holder;
            let entry = observed
                .entry(object.clone())
                .or_insert_with(|| (bytes.clone(), Instant::now()));
            if entry.0 != bytes {
                *entry = (bytes, Instant::now());
            } else if same_node_before || entry.1.elapsed() >= self.lease {
                stale.push(Stale { object, beat });
            }
        }
        observed.retain(|object, _| listed.contains(object));
        Ok(stale)
    }

    /// Takes over a stale claim's backup: true if this node now decides its end (or the
    /// node that held it had decided and is gone); the caller then records it `error`,
    /// removes its partial data and calls [`Coordinator::forget`].
    pub fn take_over(&self, stale: &Stale) -> bool {
        let Some(backup_id) = &stale.beat.backup_id else {
            return true;
        };
        // This node's own, from before a restart: the process that held it is gone (this
        // one holds the node's heartbeat), so nobody else can decide.
        if stale.beat.node == self.node {
            return true;
        }
        let object = format!("{END_PREFIX}{backup_id}");
        let end = encode(&End {
            node: self.node.clone(),
            outcome: "reaped".to_string(),
        });
        let won = match self.store.put_if_absent(&object, &end) {
            Ok(true) => true,
            // Decided by the node that then went stale: the holder after its decision, or
            // a taker cut short (it beat under its own name, see below).
            Ok(false) => self
                .store
                .get(&object, CAP)
                .ok()
                .flatten()
                .and_then(|b| serde_json::from_slice::<End>(&b).ok())
                .is_some_and(|end| end.node == stale.beat.node),
            Err(e) => {
                tracing::warn!("cannot take over backup {backup_id}: {e}");
                false
            }
        };
        if won {
            // The claim now beats under this node's name: if this node dies before it is
            // done, the next taker finds it stale and carries on.
            let beat = Beat {
                node: self.node.clone(),
                holder: self.holder.clone(),
                beat: stale.beat.beat.wrapping_add(1),
                ..stale.beat.clone()
            };
            let _ = self.store.put(&stale.object, &encode(&beat));
        }
        won
    }

    /// Removes a stale claim once its backup is recorded.
    pub fn forget(&self, stale: &Stale) {
        if let Err(e) = self.store.delete(&stale.object) {
            tracing::warn!("cannot remove {}: {e}", stale.object);
        }
        self.store.remove_leftovers(&stale.object);
        self.observed.lock().remove(&stale.object);
    }

    /// Removes what says how a backup ended, with its record.
    pub fn forget_end(&self, backup_id: &str) {
        let _ = self.store.delete(&format!("{END_PREFIX}{backup_id}"));
    }

    /// Whether another node's heartbeat is on the target (alive or not).
    pub fn others_present(&self) -> bool {
        self.store
            .list(NODE_PREFIX)
            .map(|names| names.iter().any(|n| *n != self.node_object))
            .unwrap_or(true)
    }

    /// Holds the record of `backup_id` for a read-change-write, waiting (up to 10 s) while
    /// another node holds it. A lock whose holder is a dead process of this machine, or
    /// that has not changed for a whole lease, is broken.
    pub fn lock_record(&self, backup_id: &str) -> Result<RecordLock<'_>, LeaseError> {
        let object = format!("{LOCK_PREFIX}{backup_id}");
        let bytes = encode(&Beat {
            node: self.node.clone(),
            holder: self.holder.clone(),
            backup_id: Some(backup_id.to_string()),
            parent: None,
            beat: u64::from_le_bytes(
                *uuid::Uuid::new_v4()
                    .as_bytes()
                    .first_chunk()
                    .unwrap_or(&[0; 8]),
            ),
        });
        let started = Instant::now();
        let mut seen: Option<(Vec<u8>, Instant)> = None;
        loop {
            if self
                .store
                .put_if_absent(&object, &bytes)
                .map_err(io_err("create", &object))?
            {
                return Ok(RecordLock {
                    coordinator: self,
                    object,
                    bytes: Mutex::new(bytes),
                });
            }
            let current = self
                .store
                .get(&object, CAP)
                .map_err(io_err("read", &object))?;
            let Some(current) = current else {
                continue;
            };
            let holder = serde_json::from_slice::<Beat>(&current).ok();
            let dead = holder.as_ref().is_some_and(|b| holder_is_dead(&b.holder));
            let alive_here = holder
                .as_ref()
                .is_some_and(|b| holder_is_alive_here(&b.holder));
            let unchanged_for = match &seen {
                Some((bytes, since)) if *bytes == current => since.elapsed(),
                _ => {
                    seen = Some((current.clone(), Instant::now()));
                    Duration::ZERO
                }
            };
            if dead || (!alive_here && unchanged_for >= self.lease) {
                tracing::warn!(
                    "breaking the lock on the record of backup {backup_id} that {} left",
                    holder.map_or_else(|| "a writer".to_string(), |b| format!("node {}", b.node))
                );
                let _ = self.store.delete(&object);
                continue;
            }
            if started.elapsed() >= RECORD_LOCK_WAIT {
                return Err(LeaseError::Busy(format!(
                    "the record of backup {backup_id} is being changed by node {}",
                    holder.map_or_else(|| "?".to_string(), |b| b.node)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Leaves the target (a clean stop): the node's heartbeat goes, so a restart need not
    /// wait for it.
    pub fn leave(&self) {
        let ours = self
            .store
            .get(&self.node_object, CAP)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Beat>(&b).ok())
            .is_some_and(|b| b.holder == self.holder);
        if ours {
            let _ = self.store.delete(&self.node_object);
        }
    }
}

/// A coordinator let go of (its catalogue closed) leaves the target, as a clean stop does.
impl Drop for Coordinator {
    fn drop(&mut self) {
        self.leave();
    }
}

/// A record held for a read-change-write ([`Coordinator::lock_record`]); let go on drop.
pub struct RecordLock<'a> {
    coordinator: &'a Coordinator,
    object: String,
    /// What the lock object holds while it is ours.
    bytes: Mutex<Vec<u8>>,
}

impl RecordLock<'_> {
    /// Rewrites the lock object with a new beat, so that nobody finds it unchanged for
    /// a lease while it is held for long (call every `lease / 6`); false once it is no
    /// longer ours (broken as stale).
    pub fn renew(&self) -> bool {
        let store = &self.coordinator.store;
        let mut bytes = self.bytes.lock();
        if store.get(&self.object, CAP).ok().flatten().as_ref() != Some(&*bytes) {
            return false;
        }
        let Ok(mut beat) = serde_json::from_slice::<Beat>(&bytes) else {
            return false;
        };
        beat.beat = beat.beat.wrapping_add(1);
        let next = encode(&beat);
        if store.rewrite(&self.object, &next).is_err() {
            return true;
        }
        *bytes = next;
        true
    }
}

impl Drop for RecordLock<'_> {
    fn drop(&mut self) {
        // Only while it is still ours (a lock broken as stale may be another's by now).
        let store = &self.coordinator.store;
        if store.get(&self.object, CAP).ok().flatten().as_ref() == Some(&*self.bytes.lock()) {
            let _ = store.delete(&self.object);
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// This process, as a holder: boot, pid and start time, so that a daemon on this machine
/// can tell that the holder is dead (after `kill -9`).
pub fn holder_cookie() -> String {
    format!(
        "{}.{}.{}.{}",
        boot_id(),
        std::process::id(),
        process_start(std::process::id()).unwrap_or(0),
        uuid::Uuid::new_v4()
    )
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// A live process's start time (clock ticks since boot), field 22 of /proc/<pid>/stat;
/// None for a zombie, which holds nothing any more.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    if matches!(fields.next(), Some("Z" | "X" | "x")) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn parse_holder(cookie: &str) -> Option<(&str, u32, u64)> {
    let mut parts = cookie.split('.');
    let (boot, pid, start) = (parts.next()?, parts.next()?, parts.next()?);
    Some((boot, pid.parse().ok()?, start.parse().ok()?))
}

/// Whether a holder cookie names a process of this boot that is gone.
pub fn holder_is_dead(cookie: &str) -> bool {
    parse_holder(cookie).is_some_and(|(boot, pid, start)| {
        !boot.is_empty() && boot == boot_id() && process_start(pid) != Some(start)
    })
}

/// Whether a holder cookie names a process of this boot that still runs.
fn holder_is_alive_here(cookie: &str) -> bool {
    parse_holder(cookie).is_some_and(|(boot, pid, start)| {
        !boot.is_empty() && boot == boot_id() && process_start(pid) == Some(start)
    })
}

#[cfg(test)]
mod tests;
