//! What a listing of a target shows of each record ([`Listed`]), and how a directory
//! catalogue keeps it between listings ([`ListingCache`]). A listing is shared, not
//! copied: every caller of an unchanged target gets the same [`Listing`] (start-up's
//! passes, `ls`, the janitor), and its entries hold no heap memory of their own, so that
//! memory follows the count of backups and nothing else (issue 28: 100,000 backups).

use super::record::{Record, Status};
use crate::ids::BackupId;
use std::sync::Arc;
use std::time::SystemTime;

/// A whole listing of a target, oldest first (ties by id), shared by whoever asked for
/// it while the target did not change.
pub type Listing = Arc<Vec<Listed>>;

/// What a listing shows of a record: enough for `ls -l` of the backup's image and
/// record without reading the record again, and to find a volume's backups without
/// reading the others. 120 bytes, none on the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub id: BackupId,
    pub status: Status,
    /// The order of a listing: oldest first, ties by id.
    pub created_at: Stamp,
    /// The backup's size (its image's).
    pub size: u64,
    /// [`Record::completed_time`].
    pub completed: SystemTime,
    /// The length of [`Record::shown_json`] (a few KiB).
    pub shown_len: u32,
    /// The record names work that start-up or the janitor may have to finish (see
    /// [`Record::needs_care`]); the others are never read whole by them.
    pub needs_care: bool,
    /// [`Record::is_damaged`].
    pub damaged: bool,
    /// The record keeps a base snapshot of its volume.
    pub base: bool,
    /// The record's volume, as [`volume_key`] gives it.
    pub volume: u64,
}

impl Listed {
    pub fn of(record: Record) -> Listed {
        Listed {
            shown_len: u32::try_from(record.shown_json().len()).unwrap_or(u32::MAX),
            needs_care: record.needs_care(),
            damaged: record.is_damaged(),
            base: record.base_snapshot.is_some(),
            volume: volume_key(record.volume_id.as_str()),
            completed: record.completed_time(),
            size: record.size,
            id: record.id,
            status: record.status,
            created_at: Stamp::new(&record.created_at),
        }
    }

    /// The order of a listing (as [`super::records::sort`] orders records).
    pub fn order(&self) -> (&str, &str) {
        (self.created_at.as_str(), self.id.as_str())
    }

    /// Available, and no verify found it damaged (as [`Record::is_sound`]).
    pub fn is_sound(&self) -> bool {
        self.status == Status::Available && !self.damaged
    }

    /// Which of a volume's backups is its newest: the last completed (then the last
    /// created, then by id).
    pub fn recency(&self) -> (SystemTime, &str, &str) {
        (self.completed, self.created_at.as_str(), self.id.as_str())
    }
}

/// A volume id's key in listings, so that a volume's backups are found without reading
/// every record: a hash keyed anew by each process (whoever names volumes cannot make two
/// share one on purpose). Two ids may still share a key: what a key finds is read and its
/// volume id compared.
pub fn volume_key(volume_id: &str) -> u64 {
    use std::hash::BuildHasher;
    static KEYS: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEYS.get_or_init(Default::default).hash_one(volume_id)
}

/// Bytes of a record's `created_at` a listing keeps (one backupfs writes has 24,
/// `2026-12-07T14:18:30.123Z`; RFC 3339 with nanoseconds and an offset has 35).
const STAMP_LEN: usize = 40;

/// A record's `created_at` as the record writes it, held in place: the first
/// 40 bytes (at a character boundary) of one that is longer, which no record
/// backupfs wrote is.
#[derive(Clone, PartialEq, Eq)]
pub struct Stamp {
    len: u8,
    bytes: [u8; STAMP_LEN],
}

impl Stamp {
    pub fn new(text: &str) -> Stamp {
        let mut len = text.len().min(STAMP_LEN);
        while !text.is_char_boundary(len) {
            len -= 1;
        }
        let mut bytes = [0; STAMP_LEN];
        bytes[..len].copy_from_slice(&text.as_bytes()[..len]);
        Stamp {
            len: len as u8,
            bytes,
        }
    }

    pub fn as_str(&self) -> &str {
        // Cut at a character boundary of a `str` when made.
        std::str::from_utf8(&self.bytes[..self.len as usize]).unwrap_or_default()
    }
}

impl std::fmt::Debug for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

/// What a directory catalogue's last listing read of each record file, with the file's
/// identity when it was read: a record is only ever replaced whole (a new file renamed
/// or exchanged over the name: another inode, and the ctime no writer sets), so while the
/// identity holds what was read holds. `ls` of 100,000 backups then costs a listing of
/// the directory and a `stat` per record, not a read and a parse of each (issue 28).
/// It holds the last [`Listing`] (120 bytes a record) and a file entry per record
/// file (104 bytes); a listing that finds nothing changed hands out the same one.
#[derive(Default)]
pub struct ListingCache {
    last: parking_lot::Mutex<Known>,
}

#[derive(Default)]
struct Known {
    listing: Listing,
    /// Every record file the last listing saw, by the id in its name.
    files: Vec<File>,
}

impl Known {
    /// The files of `ids` (sorted, each one of `files` and unchanged) and their records,
    /// to go on with (room for `all`).
    fn unchanged(&self, ids: &[BackupId], all: usize) -> (Vec<File>, Vec<Listed>) {
        let mut files = Vec::with_capacity(all);
        let mut listing = Vec::with_capacity(all);
        let mut known = self.files.iter();
        for id in ids {
            if let Some(file) = known.find(|f| f.id == *id) {
                listing.push(self.listing[file.at as usize].clone());
                files.push(File {
                    id: id.clone(),
                    identity: file.identity,
                    at: 0,
                });
            }
        }
        (files, listing)
    }
}

/// A record file as a listing saw it: the id its name gives, its identity (None: it
/// could not be had, so the record is read again next time), and where in the
/// [`Listing`] its record is.
struct File {
    id: BackupId,
    identity: Option<Identity>,
    at: u32,
}

/// Reads a record file for a listing: None when it is gone or cannot be read (the
/// reader says why), and then it is not listed.
pub type Read<'a> = &'a mut dyn FnMut(&BackupId) -> Option<Listed>;

impl ListingCache {
    /// The listing of the record files named by `ids` (any order): each one's identity
    /// from `stat`, what it holds from the last listing while the identity holds, else
    /// from `read` (None: not listed).
    pub fn list(
        &self,
        mut ids: Vec<BackupId>,
        stat: &dyn Fn(&BackupId) -> Option<Identity>,
        read: Read,
    ) -> Listing {
        ids.sort_unstable();
        ids.dedup();
        let mut known = self.last.lock();
        // Both in the order of the ids (as `known.files`); each file's record is at the
        // same index of `listing` until it is sorted. Nothing is built while every file
        // so far is as the last listing saw it: an unchanged target costs the ids and
        // the `stat`s, and hands out the same listing.
        let mut built: Option<(Vec<File>, Vec<Listed>)> = None;
        let mut next_known = 0;
        for (k, id) in ids.iter().enumerate() {
            let identity = stat(id);
            // One pass over the last listing's files, in step.
            while known.files.get(next_known).is_some_and(|f| f.id < *id) {
                next_known += 1;
            }
            let before = known
                .files
                .get(next_known)
                .filter(|f| f.id == *id && f.identity.is_some() && f.identity == identity);
            if before.is_some() && built.is_none() {
                continue;
            }
            let (files, listing) =
                built.get_or_insert_with(|| known.unchanged(&ids[..k], ids.len()));
            match before {
                Some(before) => listing.push(known.listing[before.at as usize].clone()),
                None => {
                    let Some(listed) = read(id) else {
                        continue;
                    };
                    listing.push(listed);
                }
            }
            files.push(File {
                id: id.clone(),
                identity,
                at: 0,
            });
        }
        let (mut files, mut listing) = match built {
            Some(built) => built,
            None if ids.len() == known.files.len() => return known.listing.clone(),
            // Only removals.
            None => known.unchanged(&ids, ids.len()),
        };
        // Oldest first: sort the listing in place, and tell each file where its record went.
        let mut order: Vec<u32> = (0..listing.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            listing[a as usize]
                .order()
                .cmp(&listing[b as usize].order())
        });
        for (to, &from) in order.iter().enumerate() {
            files[from as usize].at = to as u32;
        }
        // Where each entry (in file order) goes, followed cycle by cycle, swapping
        // entries into place.
        let mut to: Vec<u32> = files.iter().map(|f| f.at).collect();
        drop(order);
        for i in 0..listing.len() {
            while to[i] as usize != i {
                let j = to[i] as usize;
                listing.swap(i, j);
                to.swap(i, j);
            }
        }
        let listing = Arc::new(listing);
        *known = Known {
            listing: listing.clone(),
            files,
        };
        listing
    }

    #[cfg(test)]
    pub fn files(&self) -> usize {
        self.last.lock().files.len()
    }
}

/// A record file's identity (see [`ListingCache`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Identity {
    pub fn of(stat: &nix::sys::stat::FileStat) -> Identity {
        Identity {
            dev: stat.st_dev,
            ino: stat.st_ino,
            size: stat.st_size,
            mtime: (stat.st_mtime, stat.st_mtime_nsec),
            ctime: (stat.st_ctime, stat.st_ctime_nsec),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::{Duration, UNIX_EPOCH};

    fn id(n: u32) -> BackupId {
        BackupId::parse(&uuid::Uuid::from_u128(n.into()).hyphenated().to_string()).unwrap()
    }

    /// Record files as a test holds them: by id, (identity's inode, created_at).
    type Files = BTreeMap<u32, (u64, String)>;

    fn list(cache: &ListingCache, files: &Files, reads: &mut usize) -> Listing {
        let stat = |i: &BackupId| {
            let n = files.keys().find(|&&n| id(n) == *i)?;
            Some(Identity {
                dev: 1,
                ino: files[n].0,
                size: 1,
                mtime: (0, 0),
                ctime: (0, 0),
            })
        };
        let mut read = |i: &BackupId| {
            *reads += 1;
            let n = files.keys().find(|&&n| id(n) == *i)?;
            Some(Listed {
                id: i.clone(),
                status: Status::Available,
                created_at: Stamp::new(&files[n].1),
                size: files[n].0,
                completed: UNIX_EPOCH + Duration::from_secs(files[n].0),
                shown_len: 1,
                needs_care: false,
                damaged: false,
                base: false,
                volume: volume_key("v"),
            })
        };
        // In the directory's order (none in particular): here, the reverse of the ids'.
        let ids = files.keys().rev().map(|&n| id(n)).collect();
        cache.list(ids, &stat, &mut read)
    }

    #[test]
    fn an_entry_holds_nothing_on_the_heap_and_stays_small() {
        // 100,000 backups: 12 MiB of listing (issue 28).
        assert_eq!(std::mem::size_of::<Listed>(), 120);
        assert_eq!(volume_key("vol-1"), volume_key("vol-1"));
        assert_ne!(volume_key("vol-1"), volume_key("vol-2"));
    }

    fn expected(files: &Files) -> Vec<(BackupId, u64)> {
        let mut all: Vec<(String, BackupId, u64)> = files
            .iter()
            .map(|(&n, (ino, at))| (at.clone(), id(n), *ino))
            .collect();
        all.sort();
        all.into_iter().map(|(_, id, ino)| (id, ino)).collect()
    }

    fn shown(listing: &Listing) -> Vec<(BackupId, u64)> {
        listing.iter().map(|l| (l.id.clone(), l.size)).collect()
    }

    #[test]
    fn a_listing_reads_only_what_changed_sorts_oldest_first_and_is_shared_while_unchanged() {
        let cache = ListingCache::default();
        // Created out of the ids' order, some at the same time (then by id).
        let mut files: Files = (0..500u32)
            .map(|n| {
                (
                    n,
                    (
                        u64::from(n) + 1,
                        format!("2026-01-01T00:{:02}:00.000Z", (n * 7) % 60),
                    ),
                )
            })
            .collect();
        let mut reads = 0;
        let first = list(&cache, &files, &mut reads);
        assert_eq!((shown(&first), reads), (expected(&files), 500));
        let again = list(&cache, &files, &mut reads);
        assert!(Arc::ptr_eq(&first, &again), "unchanged: the same listing");
        assert_eq!(reads, 500, "and nothing read");

        // One replaced (a new inode), one removed, two made (one oldest of all).
        files.get_mut(&17).unwrap().0 = 10_017;
        files.remove(&300);
        files.insert(900, (900, "2026-01-01T00:30:00.000Z".into()));
        files.insert(901, (901, "2025-01-01T00:00:00.000Z".into()));
        let changed = list(&cache, &files, &mut reads);
        assert_eq!(reads, 503, "the replaced and the new ones only");
        assert_eq!(shown(&changed), expected(&files));
        assert_eq!(changed[0].id, id(901));
        assert_eq!(
            shown(&first).len(),
            500,
            "a holder of the old listing keeps it"
        );
        assert_eq!(cache.files(), 501);
        let again = list(&cache, &files, &mut reads);
        assert!(Arc::ptr_eq(&changed, &again));
        assert_eq!(reads, 503);
        // Removals alone: nothing read.
        files.remove(&0);
        files.remove(&901);
        let fewer = list(&cache, &files, &mut reads);
        assert_eq!((shown(&fewer), reads), (expected(&files), 503));
    }

    #[test]
    fn a_stamp_keeps_what_a_record_writes_and_cuts_a_longer_one_at_a_character() {
        assert_eq!(
            Stamp::new("2026-12-07T14:18:30.123Z").as_str(),
            "2026-12-07T14:18:30.123Z"
        );
        assert_eq!(Stamp::new("").as_str(), "");
        let long = format!("{}é", "x".repeat(STAMP_LEN - 1));
        assert_eq!(Stamp::new(&long).as_str(), "x".repeat(STAMP_LEN - 1));
    }
}
