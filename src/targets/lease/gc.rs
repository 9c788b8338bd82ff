//! Garbage collection of data that backups share across nodes (the chunks of an `s3`
//! target), safe while other nodes back up: a handshake in which each side writes first
//! and reads second (ARCHITECTURE.md, "Garbage collection across nodes").
//!
//! - A collection writes its marker `backupfs.gc.<node>`, then reads every claim. A claim
//!   of another node: it deletes nothing. Before each deletion it checks again whenever
//!   its last look is `lease / 6` old, rewriting its marker (new bytes) just before each
//!   look, and never deletes on a look older than `lease / 3`. It removes the marker at
//!   the end.
//! - A backup, once its claim is written and before its first decision that a chunk is
//!   stored, reads the markers and waits while one it has not seen unchanged for a whole
//!   lease is there (one unchanged that long, or left by a dead process of this machine,
//!   it removes).
//!
//! Of a collection and a backup, at least one sees the other: the collection's look comes
//! after its marker, the backup's after its claim. A collection whose look missed the
//! claim deletes within `lease / 3` of that look; the backup, having seen its marker,
//! waits for it to go (the collection's end), or to stay unchanged for a lease (its last
//! look, just after its last rewrite, is then more than a lease old: its deletions are
//! over), or to change (a look after the claim: it sees the claim and stops).

use super::{Beat, CAP, Coordinator, encode, holder_is_dead};
use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

pub const GC_PREFIX: &str = "backupfs.gc.";

/// Backups in progress on a target, as a collection saw them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InProgress {
    /// No node holds a claim.
    None,
    /// Only this node does.
    Here,
    /// Another node (named) does: nothing is deleted.
    Elsewhere(String),
}

/// A collection in progress on this node: its marker is on the target until it ends.
pub struct Collection<'a> {
    coordinator: &'a Coordinator,
    object: String,
    beat: u64,
    /// When the last look at the claims began.
    looked: Instant,
    found: InProgress,
}

impl Coordinator {
    /// Begins a collection: this node's marker first, then a look at every claim.
    pub fn begin_collection(&self) -> io::Result<Collection<'_>> {
        let mut collection = Collection {
            coordinator: self,
            object: format!("{GC_PREFIX}{}", self.node),
            beat: uuid::Uuid::new_v4().as_u64_pair().0,
            looked: Instant::now(),
            found: InProgress::None,
        };
        collection.look()?;
        Ok(collection)
    }

    /// Who holds claims on the target. A claim that cannot be read counts as another
    /// node's.
    fn in_progress(&self) -> io::Result<InProgress> {
        let mut found = InProgress::None;
        for object in self.store.list(super::CLAIM_PREFIX)? {
            let Some(bytes) = self.store.get(&object, CAP)? else {
                continue;
            };
            match serde_json::from_slice::<Beat>(&bytes) {
                Ok(beat) if beat.node == self.node => found = InProgress::Here,
                Ok(beat) => return Ok(InProgress::Elsewhere(beat.node)),
                Err(_) => return Ok(InProgress::Elsewhere(format!("? ({object})"))),
            }
        }
        Ok(found)
    }

    /// Waits, before a backup's first decision that a chunk is stored (its claim is
    /// written), while another collection may still delete what that decision relies on:
    /// while a marker of another daemon is there that has not stayed unchanged for a
    /// lease (by this node's clock). This daemon's own collection is left out: it excludes
    /// this daemon's backups itself. Bounded by about a lease; how long it waited.
    pub fn await_collections(&self) -> io::Result<Duration> {
        let started = Instant::now();
        let mut seen: HashMap<String, (Vec<u8>, Instant)> = HashMap::new();
        let mut told = false;
        loop {
            let mut live = Vec::new();
            for object in self.store.list(GC_PREFIX)? {
                let Some(bytes) = self.store.get(&object, CAP)? else {
                    continue;
                };
                let beat = serde_json::from_slice::<Beat>(&bytes).ok();
                let holder = beat.as_ref().map(|b| b.holder.as_str()).unwrap_or("");
                if holder == self.holder {
                    continue;
                }
                let entry = seen
                    .entry(object.clone())
                    .or_insert_with(|| (bytes.clone(), Instant::now()));
                if entry.0 != bytes {
                    *entry = (bytes, Instant::now());
                }
                if holder_is_dead(holder) || entry.1.elapsed() >= self.lease {
                    // Its collection is over, or looked last more than a lease ago: it
                    // looks again (and sees this node's claim) before it deletes more.
                    tracing::warn!(
                        "removing {object}: the garbage collection it stands for ended or stopped"
                    );
                    let _ = self.store.delete(&object);
                    continue;
                }
                live.push((object, beat.map(|b| b.node).unwrap_or_default()));
            }
            let Some((object, node)) = live.first() else {
                return Ok(started.elapsed());
            };
            if !told {
                tracing::info!(
                    "waiting for the garbage collection of node {node} ({object}) before deciding which chunks are stored"
                );
                told = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Collection<'_> {
    /// Rewrites the marker (new bytes: observers see it alive), then looks at the claims.
    fn look(&mut self) -> io::Result<()> {
        self.beat = self.beat.wrapping_add(1);
        let marker = encode(&Beat {
            node: self.coordinator.node.clone(),
            holder: self.coordinator.holder.clone(),
            backup_id: None,
            parent: None,
            beat: self.beat,
        });
        self.coordinator.store.put(&self.object, &marker)?;
        let started = Instant::now();
        self.found = self.coordinator.in_progress()?;
        self.looked = started;
        Ok(())
    }

    /// What the last look found.
    pub fn found(&self) -> &InProgress {
        &self.found
    }

    /// Whether a chunk may be deleted now: looks again if the last look is `lease / 6`
    /// old; never on a look older than `lease / 3` or one that found another node's
    /// backup in progress.
    pub fn may_delete(&mut self) -> io::Result<bool> {
        let lease = self.coordinator.lease;
        if self.looked.elapsed() >= lease / 6 {
            self.look()?;
        }
        Ok(!matches!(self.found, InProgress::Elsewhere(_)) && self.looked.elapsed() < lease / 3)
    }
}

impl Drop for Collection<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.coordinator.store.delete(&self.object) {
            tracing::warn!("cannot remove {}: {e}", self.object);
        }
    }
}
