//! The claim of a target's pool directory: backupfs writes a marker of its own (target
//! name, a random id, a format version) into a pool only while the pool is empty, and a
//! pool that holds anything else without that marker is never used as a target. So a
//! misconfigured `pool = ...` can never make backupfs delete an operator's volumes.
//! Inspecting writes nothing; only `claim` (called by the daemon, under the target lock)
//! writes, and it renames or removes only files that a record names. Like every file in
//! a target, the marker is opened relative to the directory's descriptor, never through a
//! link (`volume/dir.rs`), and written under an unpredictable temporary name.

use super::LOCK_FILE;
use super::record::{is_backup_id, rfc3339};
use crate::volume::dir::{Dir, is_not_regular};
use crate::volume::pools::{PoolRole, object_file_name};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

/// The marker's file name in a claimed pool.
pub const MARKER: &str = ".backupfs-target";
const FORMAT: u32 = 1;
/// How many of the files found a refusal names.
const NAMED_FILES: usize = 5;
/// The largest marker read (one is about 150 bytes).
const MARKER_CAP: u64 = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub format: u32,
    /// The target that owns the pool.
    pub target: String,
    /// A random id, so that two pools claimed by the same target name are told apart.
    pub id: String,
    pub created_at: String,
}

/// What a pool directory is, as far as claiming it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolState {
    /// Claimed by the target named in the marker.
    Claimed(Marker),
    /// Holds nothing (but perhaps backupfs' own lock file): claimed at start.
    Empty,
    /// Holds nothing but an earlier backupfs's own files, every data file owned by a
    /// record: claimed (and its data renamed) at start.
    Legacy { backups: usize },
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(
        "is not empty and carries no backupfs claim marker ({MARKER}): found {}; a target needs an empty directory of its own (backupfs claims it at its first start)",
        name_files(files, *total)
    )]
    Foreign { files: Vec<String>, total: usize },
    #[error("is claimed by target {owner:?} (marker {MARKER}, claimed {created_at})")]
    OtherTarget { owner: String, created_at: String },
    #[error("has a claim marker {MARKER} backupfs cannot read: {0}")]
    BadMarker(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn name_files(files: &[String], total: usize) -> String {
    let mut text = files.join(", ");
    if total > files.len() {
        text.push_str(&format!(" (and {} more)", total - files.len()));
    }
    text
}

/// The marker of a pool directory, if it has one.
pub fn read_marker(dir: &Path) -> Result<Option<Marker>, ClaimError> {
    let text = match Dir::open(dir)?.read_capped(MARKER, MARKER_CAP) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if is_not_regular(&e) => return Err(ClaimError::BadMarker(e.to_string())),
        Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
            return Err(ClaimError::BadMarker(format!(
                "larger than {MARKER_CAP} bytes"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let marker: Marker =
        serde_json::from_slice(&text).map_err(|e| ClaimError::BadMarker(e.to_string()))?;
    if marker.format != FORMAT {
        return Err(ClaimError::BadMarker(format!(
            "unknown format {}",
            marker.format
        )));
    }
    Ok(Some(marker))
}

/// The backup IDs an earlier backupfs's files in `names` belong to, or the files that are
/// not backupfs' own: records (`backup-<id>.json`) own their checksums and data, whether
/// under the old data name (`volume-<id>`) or the new one (a migration cut short).
fn legacy_backups(names: &BTreeSet<String>) -> Result<BTreeSet<String>, Vec<String>> {
    let records: BTreeSet<String> = names
        .iter()
        .filter_map(|n| n.strip_prefix("backup-")?.strip_suffix(".json"))
        .filter(|id| is_backup_id(id))
        .map(str::to_string)
        .collect();
    let owned = |id: &str| records.contains(id);
    let foreign: Vec<String> = names
        .iter()
        .filter(|name| {
            let name = name.as_str();
            let ours = name == LOCK_FILE
                || is_temporary(name)
                || super::lease::is_coordination(name)
                || name
                    .strip_prefix("backup-")
                    .and_then(|n| {
                        n.strip_suffix(".json")
                            .filter(|id| is_backup_id(id))
                            .or_else(|| n.strip_suffix(".sums"))
                            .or_else(|| n.strip_suffix(".leaves"))
                            .or_else(|| n.strip_suffix(".img"))
                    })
                    .is_some_and(owned)
                || name.strip_prefix("volume-").is_some_and(owned)
                || name
                    .strip_prefix(".volume-")
                    .and_then(|n| n.split_once(".creating-"))
                    .is_some_and(|(id, _)| owned(id));
            !ours
        })
        .cloned()
        .collect();
    if foreign.is_empty() {
        Ok(records)
    } else {
        Err(foreign)
    }
}

fn entries(dir: &Path) -> Result<BTreeSet<String>, ClaimError> {
    Ok(Dir::open(dir)?.names()?.into_iter().collect())
}

/// What `dir` is for target `target`; refuses a pool that another target claimed or that
/// holds files backupfs did not make. Writes nothing.
pub fn inspect(dir: &Path, target: &str) -> Result<PoolState, ClaimError> {
    let claimed = |marker: Marker| {
        if marker.target != target {
            return Err(ClaimError::OtherTarget {
                owner: marker.target,
                created_at: marker.created_at,
            });
        }
        Ok(PoolState::Claimed(marker))
    };
    if let Some(marker) = read_marker(dir)? {
        return claimed(marker);
    }
    let mut names = entries(dir)?;
    // Another node starting at the same moment claimed it between the two looks.
    if names.contains(MARKER)
        && let Some(marker) = read_marker(dir)?
    {
        return claimed(marker);
    }
    names.remove(LOCK_FILE);
    // Other nodes that start at the same moment beat here before the marker is written.
    names.retain(|name| !super::lease::is_coordination(name));
    if names.is_empty() {
        return Ok(PoolState::Empty);
    }
    match legacy_backups(&names) {
        Ok(records) => Ok(PoolState::Legacy {
            backups: records.len(),
        }),
        Err(foreign) => Err(ClaimError::Foreign {
            total: foreign.len(),
            files: foreign.into_iter().take(NAMED_FILES).collect(),
        }),
    }
}

/// Claims `dir` for `target` (call with the target's lock held): renames an earlier
/// backupfs's data to today's names, then writes the marker. Crash-safe and idempotent:
/// each rename is atomic, and the marker comes last, so a start after a crash finds the
/// pool still legacy (or claimed) and carries on.
pub fn claim(dir: &Path, target: &str) -> Result<Marker, ClaimError> {
    if let PoolState::Claimed(marker) = inspect(dir, target)? {
        return Ok(marker);
    }
    let names = entries(dir)?;
    let records = legacy_backups(&names).map_err(|foreign| ClaimError::Foreign {
        total: foreign.len(),
        files: foreign.into_iter().take(NAMED_FILES).collect(),
    })?;
    let pool = Dir::open(dir)?;
    // Names only: a link is renamed as a link (and never opened as data later).
    let exists = |name: &str| pool.stat(name).is_ok();
    for id in &records {
        let old = format!("volume-{id}");
        let new = object_file_name(PoolRole::Backups, id);
        if !exists(&old) {
            continue;
        }
        if exists(&new) {
            tracing::error!(
                "{}: both {old} and {new} exist; leaving both for an operator to look at",
                dir.display(),
            );
            continue;
        }
        pool.rename(&old, &new)?;
        tracing::info!(
            "{}: backup {id}'s data renamed from {old} to {new}",
            dir.display(),
        );
    }
    for name in &names {
        // A qcow2 image an earlier version was creating when it crashed: a temporary name
        // only backupfs makes, for a record it names.
        if name.starts_with(".volume-") && name.contains(".creating-") {
            let _ = pool.remove(name);
        }
    }
    pool.sync()?;
    let marker = Marker {
        format: FORMAT,
        target: target.to_string(),
        id: uuid::Uuid::new_v4().to_string(),
        created_at: rfc3339(SystemTime::now()),
    };
    write_new(dir, &marker)?;
    if !records.is_empty() {
        tracing::info!(
            "{}: claimed for target {target} with the data of {} earlier backups",
            dir.display(),
            records.len()
        );
    }
    Ok(marker)
}

/// Writes the marker so that it appears whole or not at all, and never replaces one that
/// is there (link(2) fails with EEXIST).
fn write_new(dir: &Path, marker: &Marker) -> Result<(), ClaimError> {
    let mut bytes = serde_json::to_vec_pretty(marker).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    let pool = Dir::open(dir)?;
    // A new file under a random name (O_EXCL, mode 0600 set on the descriptor): a link
    // planted in the pool is never written through.
    let (tmp, mut file) = pool.create_temporary(&format!("{MARKER}."), ".tmp")?;
    let result = (|| -> std::io::Result<()> {
        file.write_all(&bytes)?;
        file.sync_all()?;
        pool.link(&tmp, MARKER)
    })();
    let _ = pool.remove(&tmp);
    match result {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // Someone claimed it first: fine if for the same target (another target's
            // marker, or one that cannot be read, is refused by `inspect`). A name that
            // was there at the link and is gone now claims nothing: an error, never a
            // start on a pool without a marker.
            if !matches!(inspect(dir, &marker.target)?, PoolState::Claimed(_)) {
                return Err(e.into());
            }
        }
        // Anything else (a full disk, an I/O error) is the start's error too: taken for
        // a concurrent claim, it would let the daemon go on with no marker written.
        Err(e) => return Err(e.into()),
    }
    Ok(pool.sync()?)
}

/// Whether `name` is a temporary file of a marker write that a crash interrupted.
pub fn is_marker_temporary(name: &str) -> bool {
    name.strip_prefix(MARKER)
        .and_then(|rest| rest.strip_prefix('.'))
        .is_some_and(|rest| rest.ends_with(".tmp"))
}

/// Whether `name` is one of the temporary names only backupfs makes in a target pool (a
/// record or checksum rewrite, a marker write, a reflink probe): what a crash can leave
/// behind, removed at start-up, never counted as someone else's file.
pub fn is_temporary(name: &str) -> bool {
    (name.starts_with(".backup-") && name.ends_with(".tmp"))
        || (super::lease::is_coordination(name)
            && name.starts_with('.')
            && (name.ends_with(".tmp") || name.ends_with(".spare")))
        || is_marker_temporary(name)
        || name.starts_with(crate::volume::file::REFLINK_PROBE_PREFIX)
}

/// Every name in a claimed target pool that backupfs did not make (for the start-up log).
pub fn foreign_files(dir: &Path) -> Vec<String> {
    // Filtered as read, not every name of a pool holding 400,000 (issue 28).
    let Ok(mut names) = Dir::open(dir).and_then(|dir| {
        dir.names_where(|name| {
            let ours = name == MARKER
                || name == LOCK_FILE
                || is_temporary(name)
                || super::lease::is_coordination(name)
                || name
                    .strip_prefix("backup-")
                    .and_then(|n| {
                        n.strip_suffix(".json")
                            .or_else(|| n.strip_suffix(".sums"))
                            .or_else(|| n.strip_suffix(".leaves"))
                            .or_else(|| n.strip_suffix(".img"))
                    })
                    .is_some_and(is_backup_id);
            !ours
        })
    }) else {
        return Vec::new();
    };
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0c1e2f3a-aaaa-4bbb-8ccc-123456789abc";
    const B: &str = "6b0c2f1e-1111-4222-8333-444455556666";

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn an_earlier_backupfs_pool_is_recognised_by_its_records() {
        let names = set(&[
            &format!("backup-{A}.json"),
            &format!("backup-{A}.sums"),
            &format!("volume-{A}"),
            &format!("backup-{B}.json"),
            &format!("backup-{B}.img"),
            ".backupfs.lock",
            &format!(".backup-{B}.json.77.0.tmp"),
        ]);
        assert_eq!(legacy_backups(&names).unwrap().len(), 2);
    }

    #[test]
    fn a_volume_without_a_record_is_foreign() {
        let names = set(&[&format!("backup-{A}.json"), &format!("volume-{B}")]);
        assert_eq!(
            legacy_backups(&names).unwrap_err(),
            vec![format!("volume-{B}")]
        );
        let names = set(&[&format!("volume-{A}")]);
        assert!(legacy_backups(&names).is_err());
        let names = set(&["notes.txt"]);
        assert!(legacy_backups(&names).is_err());
    }

    #[test]
    fn a_marker_that_is_a_link_a_fifo_or_too_big_is_refused_never_followed_or_waited_on() {
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        let elsewhere = scratch.path().join("marker");
        let marker = Marker {
            format: FORMAT,
            target: "t".into(),
            id: "x".into(),
            created_at: "2026-01-01T00:00:00.000Z".into(),
        };
        std::fs::write(&elsewhere, serde_json::to_vec(&marker).unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, pool.join(MARKER)).unwrap();
        assert!(matches!(read_marker(&pool), Err(ClaimError::BadMarker(m)) if m.contains("link")));
        std::fs::remove_file(pool.join(MARKER)).unwrap();
        nix::unistd::mkfifo(
            &pool.join(MARKER),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert!(matches!(read_marker(&pool), Err(ClaimError::BadMarker(m)) if m.contains("FIFO")));
        std::fs::remove_file(pool.join(MARKER)).unwrap();
        std::fs::File::create(pool.join(MARKER))
            .unwrap()
            .set_len(MARKER_CAP + 1)
            .unwrap();
        assert!(
            matches!(read_marker(&pool), Err(ClaimError::BadMarker(m)) if m.contains("larger"))
        );
    }

    #[test]
    fn marker_temporaries_are_recognised() {
        assert!(is_marker_temporary(".backupfs-target.123.tmp"));
        assert!(is_marker_temporary(
            ".backupfs-target.0c1e2f3aaaaa4bbb8ccc123456789abc.tmp"
        ));
        assert!(!is_marker_temporary(".backupfs-target"));
        assert!(!is_marker_temporary(".backupfs-targetx.tmp"));
        // Temporaries are removed at start-up: an operator's names never count as ours.
        assert!(is_temporary(&format!(".backup-{A}.json.77.0.tmp")));
        assert!(!is_temporary("notes.tmp"));
        assert!(!is_temporary(".backup-notes"));
    }

    #[test]
    fn foreign_files_names_what_backupfs_did_not_make_in_a_claimed_pool() {
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path();
        claim(pool, "t").unwrap();
        for name in [
            format!("backup-{A}.json"),
            format!("backup-{A}.img"),
            "notes.tmp".to_string(),
            "volume-x".to_string(),
        ] {
            std::fs::write(pool.join(name), b"x").unwrap();
        }
        let mut foreign = foreign_files(pool);
        foreign.sort();
        assert_eq!(foreign, ["notes.tmp", "volume-x"]);
    }

    #[test]
    fn a_pool_holding_only_what_a_crash_left_mid_claim_or_mid_probe_is_claimed() {
        // A crash between the marker's temporary and its link, or inside a reflink probe,
        // left a name only backupfs makes: the next start must not call the pool foreign.
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path().join("pool");
        std::fs::create_dir(&pool).unwrap();
        std::fs::write(pool.join(".backupfs-target.5d1c0e2b.tmp"), b"{").unwrap();
        std::fs::write(
            pool.join(format!(
                "{}0c1e2f3a",
                crate::volume::file::REFLINK_PROBE_PREFIX
            )),
            [0u8; 4096],
        )
        .unwrap();
        std::fs::write(pool.join("someone-elses"), b"x").unwrap();
        assert!(matches!(
            inspect(&pool, "t"),
            Err(ClaimError::Foreign { total: 1, .. })
        ));
        std::fs::remove_file(pool.join("someone-elses")).unwrap();
        assert!(matches!(
            claim(&pool, "t").map(|m| m.target),
            Ok(target) if target == "t"
        ));
        assert!(
            foreign_files(&pool).is_empty(),
            "{:?}",
            foreign_files(&pool)
        );
    }

    #[test]
    fn a_claimed_pool_reads_back_its_marker_and_is_refused_to_another_target() {
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path();
        let marker = claim(pool, "t").unwrap();
        assert_eq!(read_marker(pool).unwrap(), Some(marker.clone()));
        assert_eq!(
            inspect(pool, "t").unwrap(),
            PoolState::Claimed(marker.clone())
        );
        assert!(matches!(
            inspect(pool, "u"),
            Err(ClaimError::OtherTarget { owner, .. }) if owner == "t"
        ));
        assert_eq!(claim(pool, "t").unwrap(), marker, "claimed once");
        // A marker of a format this version does not know is not guessed at.
        let newer = Marker {
            format: FORMAT + 1,
            ..marker
        };
        std::fs::write(pool.join(MARKER), serde_json::to_vec(&newer).unwrap()).unwrap();
        assert!(matches!(read_marker(pool), Err(ClaimError::BadMarker(m)) if m.contains("format")));
    }

    #[test]
    fn claiming_an_earlier_backupfs_pool_renames_its_data_and_drops_its_temporaries() {
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path();
        std::fs::write(pool.join(format!("backup-{A}.json")), b"{}").unwrap();
        std::fs::write(pool.join(format!("backup-{A}.sums")), [1u8; 8]).unwrap();
        std::fs::write(pool.join(format!("volume-{A}")), b"data of A").unwrap();
        std::fs::write(pool.join(format!(".volume-{A}.creating-1234")), b"half").unwrap();
        assert_eq!(
            inspect(pool, "t").unwrap(),
            PoolState::Legacy { backups: 1 }
        );
        claim(pool, "t").unwrap();
        assert_eq!(
            std::fs::read(pool.join(object_file_name(PoolRole::Backups, A))).unwrap(),
            b"data of A"
        );
        let mut names: Vec<String> = entries(pool).unwrap().into_iter().collect();
        names.sort();
        let mut expected = vec![
            MARKER.to_string(),
            format!("backup-{A}.img"),
            format!("backup-{A}.json"),
            format!("backup-{A}.sums"),
        ];
        expected.sort();
        assert_eq!(names, expected);
    }

    #[test]
    fn a_refusal_names_a_few_files_and_counts_the_rest() {
        let files = ["a".to_string(), "b".to_string()];
        assert_eq!(name_files(&files, 2), "a, b");
        assert_eq!(name_files(&files, 5), "a, b (and 3 more)");
        let refused = ClaimError::Foreign {
            files: files.to_vec(),
            total: 3,
        };
        assert!(
            refused.to_string().contains("found a, b (and 1 more)"),
            "{refused}"
        );
    }

    #[test]
    fn a_marker_written_second_never_replaces_the_first_and_is_refused_for_another_target() {
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path();
        let first = claim(pool, "t").unwrap();
        // Another daemon of the same target got there first: fine, the first one stays.
        let second = Marker {
            id: "another".into(),
            ..first.clone()
        };
        write_new(pool, &second).unwrap();
        assert_eq!(read_marker(pool).unwrap(), Some(first.clone()));
        let other = Marker {
            target: "u".into(),
            ..first.clone()
        };
        assert!(matches!(
            write_new(pool, &other),
            Err(ClaimError::OtherTarget { .. })
        ));
        assert_eq!(read_marker(pool).unwrap(), Some(first));
        assert!(foreign_files(pool).is_empty(), "no temporary is left");
    }

    #[test]
    fn a_marker_that_cannot_be_linked_in_is_the_claims_error_not_a_concurrent_claim() {
        // A tmpfs of two inodes (its root and the marker's temporary): tmpfs counts a
        // hard link as an inode, so link(2) fails with ENOSPC, as on a full pool. The
        // mount lives in a mount namespace of this thread alone and goes with it.
        let scratch = tempfile::tempdir().unwrap();
        let pool = scratch.path().to_path_buf();
        let outcome = std::thread::spawn(move || {
            use nix::mount::{MsFlags, mount};
            // SAFETY: unshare(2) takes flags only; CLONE_NEWNS gives this thread its
            // own copy of the mounts.
            let unshared = unsafe { libc::unshare(libc::CLONE_NEWNS) };
            assert_eq!(
                unshared,
                0,
                "unshare (the lib's tests run as root): {}",
                std::io::Error::last_os_error()
            );
            // Private, so the tmpfs never propagates to the host's mounts.
            mount(
                None::<&str>,
                "/",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap();
            mount(
                Some("tmpfs"),
                &pool,
                Some("tmpfs"),
                MsFlags::empty(),
                Some("nr_inodes=2,mode=0700"),
            )
            .unwrap();
            let claimed = claim(&pool, "t");
            let left = entries(&pool).unwrap();
            (
                claimed.map(|_| ()).map_err(|e| match e {
                    ClaimError::Io(e) => e.raw_os_error(),
                    other => panic!("{other}"),
                }),
                left,
            )
        })
        .join()
        .unwrap();
        assert_eq!(
            outcome.0,
            Err(Some(libc::ENOSPC)),
            "the link's error is returned"
        );
        assert!(
            outcome.1.is_empty(),
            "no marker, no temporary: {:?}",
            outcome.1
        );
    }
}
