//! The series images of an RBD target, as several nodes change them: which image holds a
//! backup (looked for in the pool when another node made it), the series' lock (this
//! daemon's mutex, then the series' lock object, every node's), continuing a series, and
//! cutting off a writer that is gone. It never cuts off a node that holds the claim on the
//! series' volume: that node is alive and the series' one writer.

use super::*;

impl RbdTarget {
    /// Runs `f` holding the series' lock: this daemon's first, then every node's (the
    /// object `backupfs.lock.<image>`, see `lease::Coordinator::lock_record`), renewed
    /// every `lease / 6` while `f` runs (a rollback of a big image takes long; a lock
    /// object left unchanged for a lease is broken by the others). Changes of metadata,
    /// snapshots and rollbacks run under it, never a copy.
    pub(super) fn with_series<T>(
        &self,
        image_name: &str,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        let local = self
            .series_locks
            .lock()
            .entry(image_name.to_string())
            .or_default()
            .clone();
        let _local = local.lock();
        let remote = self
            .catalogue
            .coordinator
            .lock_record(image_name)
            .map_err(|e| {
                // (The errno is what the caller answers with: EBUSY for a busy lock.)
                tracing::warn!(backup_target = self.name, "{image_name}: {e}");
                TargetError::Io {
                    op: "lock the series",
                    path: PathBuf::from(format!(
                        "rbd:{}/{}{image_name}",
                        self.io.location(),
                        super::super::lease::LOCK_PREFIX
                    )),
                    source: match e {
                        LeaseError::Io { source, .. } => source,
                        _ => std::io::Error::from_raw_os_error(libc::EBUSY),
                    },
                }
            })?;
        // Renewed while held: a rollback of a big image outlasts a lease.
        let every = self.catalogue.coordinator.lease() / 6;
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let renewer = s.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::park_timeout(every);
                    if !done.load(std::sync::atomic::Ordering::SeqCst) && !remote.renew() {
                        tracing::error!(
                            backup_target = self.name,
                            "{image_name}: another node broke this node's hold of the series' lock"
                        );
                        return;
                    }
                }
            });
            let result = f();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            renewer.thread().unpark();
            result
        })
    }

    /// The series image holding a backup's data; one this daemon does not know (another
    /// node made it) is looked for in the pool. None: no image holds it.
    pub(super) fn image_of(&self, backup_id: &str) -> Result<Option<String>> {
        if let Some(image) = self.members.lock().get(backup_id) {
            return Ok(Some(image.clone()));
        }
        let (found, _) = scan_members(&self.io)?;
        let mut members = self.members.lock();
        for (id, image) in found {
            members.entry(id).or_insert(image);
        }
        Ok(members.get(backup_id).cloned())
    }

    pub(super) fn attachment(&self, image: Image) -> Attachment {
        Attachment::new(RbdDevice::new(image, self.connection.clone()))
    }

    /// Takes the snapshot of the backup the head of `image` holds, if it has none yet;
    /// that backup's id (None: no head, or one being written). Call with the series lock
    /// held. A head whose backup is still `creating` is being written (by this daemon, or
    /// by the node that holds the volume's claim) and is never snapshotted; otherwise it
    /// holds an available backup not settled yet, or the data of a failed one whose
    /// removal failed too (kept: its removal, retried, takes the snapshot with it).
    pub(super) fn snapshot_held(&self, image_name: &str, image: &Image) -> Result<Option<String>> {
        let Some(head) = image.metadata_get(HEAD_KEY).map_err(target_error)? else {
            return Ok(None);
        };
        let snapshot = snapshot_name(&head);
        if image.snapshot_exists(&snapshot).map_err(target_error)? {
            return Ok(Some(head));
        }
        if self.writing.lock().contains(image_name) {
            return Ok(None);
        }
        let settled = match BackupId::parse(&head) {
            Ok(id) => match self.catalogue.record(&id) {
                Ok(record) => record.status != super::super::record::Status::Creating,
                // Data without a record (written through this type alone, or a record
                // removed by hand): as before nodes, its snapshot keeps it.
                Err(TargetError::NotFound(_)) => true,
                Err(e) => return Err(e),
            },
            Err(_) => false,
        };
        if !settled {
            return Ok(None);
        }
        match image.create_snapshot(&snapshot) {
            Err(e) if !e.is_exists() => return Err(target_error(e)),
            _ => {}
        }
        Ok(Some(head))
    }

    /// Takes the snapshot of the backup the head of `image_name` holds, if it has none
    /// yet ([`RbdTarget::snapshot_held`]); whether `backup_id`'s snapshot exists now.
    /// Call with the series lock held.
    pub(super) fn snapshot_head(&self, image_name: &str, backup_id: &BackupId) -> Result<bool> {
        let Some(image) = self.open_existing(image_name)? else {
            return Ok(false);
        };
        self.snapshot_held(image_name, &image)?;
        image
            .snapshot_exists(&snapshot_name(backup_id))
            .map_err(target_error)
    }

    /// The image for writing; None if it is gone.
    pub(super) fn open_existing(&self, image_name: &str) -> Result<Option<Image>> {
        match self.io.open_image(image_name) {
            Ok(image) => Ok(Some(image)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(target_error(e)),
        }
    }

    /// Continues the series of `base` with `backup_id`: the head is made to read as the
    /// base (it already does unless a later backup wrote it: then it is rolled back to
    /// the base's snapshot), named as `backup_id`'s before that, and grown. None when
    /// the base cannot be shared (its snapshot is gone, the head is being written, the
    /// volume shrank). Call with the series lock held (and the volume's claim, which makes
    /// this node the series' one writer).
    pub(super) fn extend_series(
        &self,
        image_name: &str,
        base: &BackupId,
        backup_id: &BackupId,
        size: u64,
    ) -> Result<Option<Attachment>> {
        if self.writing.lock().contains(image_name) {
            return Ok(None);
        }
        let Some(image) = self.open_existing(image_name)? else {
            return Ok(None);
        };
        // The backup the head holds (the base, or a later one about to be rolled back
        // over) keeps its data as a snapshot first, if it has none yet; a head still
        // being written (a node's backup not taken over yet) is not a base.
        let head = image.metadata_get(HEAD_KEY).map_err(target_error)?;
        let held = self.snapshot_held(image_name, &image)?;
        if head.is_some() && held.is_none() {
            return Ok(None);
        }
        let head_is_base = held.as_deref() == Some(base.as_str());
        let base_snapshot = snapshot_name(base);
        let Some(base_size) = image
            .snapshots()
            .map_err(target_error)?
            .into_iter()
            .find(|s| s.name == base_snapshot)
            .map(|snapshot| snapshot.size)
        else {
            return Ok(None);
        };
        if size < base_size {
            return Ok(None);
        }
        self.writing.lock().insert(image_name.to_string());
        let prepared = (|| -> std::result::Result<(), RbdError> {
            // Named first: from here a crash leaves a head that recovery rolls back.
            image.metadata_set(HEAD_KEY, backup_id.as_str())?;
            self.members
                .lock()
                .insert(backup_id.to_string(), image_name.to_string());
            if !head_is_base {
                image.rollback_to_snapshot(&base_snapshot)?;
            }
            if size > image.size()? {
                image.resize(size)?;
            }
            Ok(())
        })();
        if let Err(e) = prepared {
            self.writing.lock().remove(image_name);
            return Err(target_error(e));
        }
        Ok(Some(self.attachment(image)))
    }

    /// Whether a client that still holds the image of `backup_id`'s series may be cut
    /// off: no node holds the claim on the backup's volume but this daemon (or a dead
    /// process of this machine), so any other writer is a node that died or was fenced.
    /// Call with the series lock held: a node that claims the volume afterwards writes
    /// only after it has held the series' lock itself.
    fn may_fence(&self, backup_id: &BackupId) -> bool {
        match self.catalogue.record(backup_id) {
            Ok(record) => self
                .catalogue
                .coordinator
                .volume_is_ours_or_free(&record.backend, &record.volume_id)
                .unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Fences off another client that still writes the series image of `backup_id` and
    /// is no live node's writer ([`RbdTarget::may_fence`]): a daemon killed with -9 (its
    /// watch and exclusive lock linger for ~30 s, and librbd refuses to remove or roll
    /// back the image meanwhile) or a node paused past its lease. Its lock is broken, which
    /// blocklists it (nothing it still sends is written), and the OSDs drop its watch;
    /// then waits (bounded) until the watches of those it cut off are gone.
    pub(super) fn fence_other_writers(&self, image_name: &str, backup_id: &BackupId) {
        let ours = crate::volume::rbd::connection::our_instance_ids();
        let others = |image: &Image| -> Vec<u64> {
            image
                .watchers()
                .map(|watchers| {
                    watchers
                        .iter()
                        .map(|w| w.client_id)
                        .filter(|id| !ours.contains(id))
                        .collect()
                })
                .unwrap_or_default()
        };
        let Ok(image) = self.io.open_image_read_only(image_name, None) else {
            return;
        };
        if others(&image).is_empty() {
            return;
        }
        let fenced = self.with_series(image_name, || {
            if !self.may_fence(backup_id) {
                return Ok(Vec::new());
            }
            let watching = others(&image);
            // Breaking a lock needs a handle that may write.
            let owners = self
                .io
                .open_image(image_name)
                .and_then(|writable| Ok((writable.lock_owners()?, writable)));
            match owners {
                Ok((owners, writable)) => {
                    let owner_id = |owner: &str| {
                        owner
                            .strip_prefix("client.")
                            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                            .and_then(|id| id.parse::<u64>().ok())
                    };
                    for owner in owners
                        .into_iter()
                        .filter(|o| owner_id(o).is_none_or(|id| !ours.contains(&id)))
                    {
                        tracing::warn!(
                            backup_target = self.name,
                            "{image_name}: breaking the exclusive lock of {owner}, a writer that is no live node's (it died, or was paused past its lease)"
                        );
                        if let Err(e) = writable.break_lock(&owner) {
                            tracing::warn!(backup_target = self.name, "{e}");
                        }
                    }
                }
                Err(e) => tracing::warn!(backup_target = self.name, "{e}"),
            }
            Ok(watching)
        });
        let fenced = match fenced {
            Ok(fenced) => fenced,
            Err(e) => {
                tracing::warn!(backup_target = self.name, "{e}");
                return;
            }
        };
        let deadline = Instant::now() + WATCH_EXPIRY;
        while others(&image).iter().any(|id| fenced.contains(id)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}
