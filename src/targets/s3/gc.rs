//! Garbage collection of an `s3` target's chunks, safe while backups are written on this
//! node and on others (ARCHITECTURE.md, "Garbage collection across nodes"). Across nodes
//! it follows the handshake of `lease::gc`: this node's marker first, then a look at every
//! claim; another node's backup in progress, and nothing is deleted (the candidates are
//! kept as the mark, and the collection is tried again later).

use super::catalogue::store_error;
use super::chunk::{CHUNK_PREFIX, INDEX_PREFIX, is_chunk_name};
use super::device::Writing;
use super::{Inner, Result, TargetError};
use crate::targets::catalogue::Catalogue;
use crate::targets::lease::InProgress;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

/// What one garbage collection found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub chunks: usize,
    pub referenced: usize,
    /// Unreferenced chunks deleted, and their stored bytes.
    pub deleted: usize,
    pub freed_bytes: u64,
    /// Unreferenced chunks kept because a backup in progress may still name them.
    pub kept: usize,
    /// Another node's backup was in progress (that node): nothing was deleted.
    pub deferred: Option<String>,
}

/// The last collection's view: which chunks were unreferenced, and when.
#[derive(Default)]
pub(super) struct Mark {
    at: Option<SystemTime>,
    unreferenced: HashSet<String>,
}

impl Inner {
    /// Deletes the chunks that no index names, safely while backups are written here
    /// and elsewhere:
    /// - the chunks named by every backup being written here (its index in memory) and
    ///   by every index in the store are kept; `uses` is held (write) for the whole
    ///   collection, so no upload here decides to reuse a chunk meanwhile (uploads wait
    ///   for it), and a backup that finishes meanwhile was counted as being written;
    /// - with no backup in progress here, every other chunk goes;
    /// - otherwise only the chunks that were already unreferenced at the last
    ///   collection, if that collection ran before the oldest backup in progress began
    ///   (what a backup that began later may have found and reused is never deleted).
    ///
    /// Across nodes: this node's marker is written, then the claims are read (`lease::gc`).
    /// Another node's backup in progress: nothing is deleted (the unreferenced chunks are
    /// kept as the mark); else the rules above, every deletion preceded by
    /// `Collection::may_delete` (which looks at the claims again when its last look is
    /// `lease / 6` old, and stops at another node's claim).
    ///
    /// An index that cannot be read or authenticated stops the collection: what it names
    /// is unknown, so nothing is deleted.
    pub(super) fn collect_garbage(&self) -> Result<GcReport> {
        let mut mark = self.gc.lock();
        let started = SystemTime::now();
        let coordinator = self.catalogue.coordinator();
        let mut collection = match coordinator.map(|c| c.begin_collection()).transpose() {
            Ok(collection) => collection,
            Err(e) => {
                return Err(store_error(
                    "read the claims of",
                    self.store.as_ref(),
                    "backupfs.claim.",
                )(e));
            }
        };
        let elsewhere = match collection.as_ref().map(|c| c.found().clone()) {
            Some(InProgress::Elsewhere(node)) => Some(node),
            _ => None,
        };
        // First: from here no upload decides anything, and a backup that finishes while
        // the indexes are listed is among these (its index may be listed or not).
        let _uses = self.chunks.uses.write();
        // A backup this node was writing that another node took over (this one was
        // paused past its lease) ended `error` there: it names nothing any more.
        let ids: Vec<String> = self.writing.lock().keys().cloned().collect();
        for id in ids {
            let ended = crate::ids::BackupId::parse(&id)
                .ok()
                .and_then(|id| self.catalogue.record(&id).ok())
                .is_some_and(|r| r.status == crate::targets::record::Status::Error);
            if ended {
                self.writing.lock().remove(&id);
            }
        }
        let writing: Vec<Arc<Writing>> = self.writing.lock().values().cloned().collect();
        let mut referenced: HashSet<String> = HashSet::new();
        for backup in &writing {
            referenced.extend(backup.names());
        }
        let listed = self.store.list_sizes(CHUNK_PREFIX).map_err(store_error(
            "list",
            self.store.as_ref(),
            CHUNK_PREFIX,
        ))?;
        let sizes: HashMap<String, u64> = listed
            .into_iter()
            .filter(|(n, _)| is_chunk_name(n))
            .collect();
        let index_names = self.store.list(INDEX_PREFIX).map_err(store_error(
            "list",
            self.store.as_ref(),
            INDEX_PREFIX,
        ))?;
        for name in index_names {
            let Some(id) = name.strip_prefix(INDEX_PREFIX) else {
                continue;
            };
            if !crate::ids::is_backup_id(id) {
                continue;
            }
            match self.load_index(id) {
                Ok(index) => referenced.extend(index.names()),
                // Removed meanwhile: names nothing any more.
                Err(TargetError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(
                        backup_target = self.name,
                        "garbage collection stopped, nothing deleted: {e}"
                    );
                    return Err(e);
                }
            }
        }
        let unreferenced: HashSet<String> = sizes
            .keys()
            .filter(|n| !referenced.contains(*n))
            .cloned()
            .collect();
        let oldest = writing.iter().map(|w| w.started).min();
        let doomed: HashSet<String> = match oldest {
            _ if elsewhere.is_some() => HashSet::new(),
            None => unreferenced.clone(),
            Some(oldest) if mark.at.is_some_and(|at| at < oldest) => unreferenced
                .intersection(&mark.unreferenced)
                .cloned()
                .collect(),
            Some(_) => HashSet::new(),
        };
        let mut report = GcReport {
            chunks: sizes.len(),
            referenced: sizes.len() - unreferenced.len(),
            kept: unreferenced.len() - doomed.len(),
            deferred: elsewhere.clone(),
            ..GcReport::default()
        };
        let mut deleted = HashSet::new();
        for name in &doomed {
            if let Some(collection) = collection.as_mut() {
                match collection.may_delete() {
                    Ok(true) => {}
                    Ok(false) => {
                        if let InProgress::Elsewhere(node) = collection.found() {
                            report.deferred = Some(node.clone());
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(
                            backup_target = self.name,
                            "garbage collection stopped: cannot read the claims: {e}"
                        );
                        break;
                    }
                }
            }
            match self.store.delete(name) {
                Ok(()) => {
                    report.deleted += 1;
                    report.freed_bytes += sizes.get(name).copied().unwrap_or(0);
                    deleted.insert(name.clone());
                }
                Err(e) => {
                    tracing::warn!(backup_target = self.name, "garbage collection: {name}: {e}")
                }
            }
        }
        report.kept = unreferenced.len() - report.deleted;
        self.chunks.forget(&deleted);
        drop(collection);
        *self.gc_deferred.lock() = report.deferred.is_some().then(std::time::Instant::now);
        *mark = Mark {
            at: Some(started),
            unreferenced: unreferenced.difference(&deleted).cloned().collect(),
        };
        tracing::info!(
            backup_target = self.name,
            "garbage collection: {} chunks, {} referenced, {} deleted ({} bytes), {} kept for backups in progress{}",
            report.chunks,
            report.referenced,
            report.deleted,
            report.freed_bytes,
            report.kept,
            match &report.deferred {
                Some(node) =>
                    format!(" (node {node} is backing up: nothing deleted, tried again later)"),
                None => String::new(),
            }
        );
        Ok(report)
    }

    /// Runs a collection in the background soon (one at a time; a request made while one
    /// runs makes it run again).
    pub(super) fn collect_garbage_soon(self: &Arc<Self>) {
        self.gc_wanted.store(true, Ordering::Release);
        if self.gc_running.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.clone();
        let spawned = std::thread::Builder::new()
            .name("s3-gc".to_string())
            .spawn(move || {
                loop {
                    while inner.gc_wanted.swap(false, Ordering::AcqRel) {
                        if let Err(e) = inner.collect_garbage() {
                            tracing::warn!(backup_target = inner.name, "garbage collection: {e}");
                        }
                    }
                    inner.gc_running.store(false, Ordering::Release);
                    // A request that came after the last check but before the flag fell.
                    if !inner.gc_wanted.load(Ordering::Acquire)
                        || inner.gc_running.swap(true, Ordering::AcqRel)
                    {
                        return;
                    }
                }
            });
        if spawned.is_err() {
            self.gc_running.store(false, Ordering::Release);
        }
    }
}
