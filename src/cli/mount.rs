//! What `status` and `wait` read: the mount's files docs/operating.md documents (`jobs`, the
//! records `<id>.json`, `restores`), by plain file I/O as any script could, never the
//! daemon's internals; a line or record it cannot parse is skipped, never a panic.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use backupfs::engine::error::one_line;
use backupfs::ids::is_backup_id;
use backupfs::targets::record::parse_rfc3339;

/// Ended backups shown per target, newest last.
pub const ENDED_SHOWN: usize = 5;
/// In `--watch`, records of backups no job mentions are read again this often (a verify
/// can start and end between two frames).
const FULL_READ_EVERY: Duration = Duration::from_secs(10);

// ----------------------------------------------------------------------------------------
// What the mount's files say.

/// One line of `backups/<target>/jobs`: `<backup-id> <volume-id> <state> <done>/<total>`
/// and, for a failed job, the error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobLine {
    pub backup_id: String,
    pub volume_id: String,
    pub state: String,
    pub done: u64,
    pub total: u64,
    pub error: Option<String>,
}

/// States after which a line of `jobs` changes no more.
const ENDED_STATES: [&str; 4] = ["available", "error", "verified", "verify-failed"];

impl JobLine {
    pub fn parse(line: &str) -> Option<JobLine> {
        let (backup_id, volume_id, state, done, total, error) = split_progress_line(line)?;
        Some(JobLine {
            backup_id,
            volume_id,
            state,
            done,
            total,
            error,
        })
    }

    /// A verify of an available backup (`verify-queued`, `verifying`), not the backup's job.
    pub fn is_verify(&self) -> bool {
        self.state.starts_with("verif")
    }

    /// Still queued or running (an unknown state counts as running: it has not said it ended).
    pub fn is_active(&self) -> bool {
        !ENDED_STATES.contains(&self.state.as_str())
    }

    /// Waiting for a worker: no progress to measure.
    pub fn is_queued(&self) -> bool {
        self.state == "queued" || self.state == "verify-queued"
    }
}

/// One line of `<mnt>/restores`: `<backend> <volume-id> <state> <done>/<total>[ <error>]`,
/// states `restoring`, `restored`, `failed`; a total of 0 is unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreLine {
    pub backend: String,
    pub volume_id: String,
    pub state: String,
    pub done: u64,
    pub total: u64,
    pub error: Option<String>,
}

impl RestoreLine {
    pub fn parse(line: &str) -> Option<RestoreLine> {
        let (backend, volume_id, state, done, total, error) = split_progress_line(line)?;
        Some(RestoreLine {
            backend,
            volume_id,
            state,
            done,
            total,
            error,
        })
    }

    pub fn is_active(&self) -> bool {
        self.state != "restored" && self.state != "failed"
    }
}

type ProgressLine = (String, String, String, u64, u64, Option<String>);

/// `<name> <name> <state> <done>/<total>[ <text>]`; None for anything else.
fn split_progress_line(line: &str) -> Option<ProgressLine> {
    let mut fields = line.splitn(5, ' ');
    let mut word = || {
        fields
            .next()
            .filter(|w| !w.is_empty() && !w.chars().any(char::is_control))
            .map(str::to_string)
    };
    let (first, second, state, progress) = (word()?, word()?, word()?, word()?);
    let (done, total) = progress.split_once('/')?;
    let (done, total) = (done.parse().ok()?, total.parse().ok()?);
    let error = fields.next().map(one_line).filter(|e| !e.is_empty());
    Some((first, second, state, done, total, error))
}

/// The parts of a backup's record `status` and `wait` use, read leniently: a record needs
/// `id`, `volume_id` and `status`; any other field may be missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordInfo {
    pub id: String,
    pub volume_id: String,
    pub status: String,
    pub created_at: Option<String>,
    pub completed_at: Option<String>,
    pub verified_at: Option<String>,
    pub damaged_blocks: Vec<u64>,
    /// Why the daemon found the record itself damaged (a MAC that does not check, no
    /// checksums): `defect` in the mount's copy of the record.
    pub defect: Option<String>,
    pub error: Option<String>,
    pub size: u64,
}

impl RecordInfo {
    pub fn parse(json: &str) -> Option<RecordInfo> {
        let value: serde_json::Value = serde_json::from_str(json).ok()?;
        let text = |key: &str| value.get(key)?.as_str().map(str::to_string);
        Some(RecordInfo {
            id: text("id")?,
            volume_id: text("volume_id")?,
            status: text("status")?,
            created_at: text("created_at"),
            completed_at: text("completed_at"),
            verified_at: text("verified_at"),
            damaged_blocks: value
                .get("damaged_blocks")
                .and_then(|blocks| blocks.as_array())
                .map(|blocks| blocks.iter().filter_map(|b| b.as_u64()).collect())
                .unwrap_or_default(),
            defect: text("defect"),
            error: text("error").map(|e| one_line(&e)),
            size: value.get("size").and_then(|s| s.as_u64()).unwrap_or(0),
        })
    }

    /// When it ended (or, before that, was created); None when neither time parses.
    pub fn completed(&self) -> Option<SystemTime> {
        self.completed_at
            .as_deref()
            .or(self.created_at.as_deref())
            .and_then(parse_rfc3339)
    }

    pub fn is_damaged(&self) -> bool {
        self.defect.is_some() || !self.damaged_blocks.is_empty()
    }

    /// The damaged blocks, or `record` when the record itself cannot be trusted.
    pub fn damaged_list(&self) -> String {
        if self.defect.is_some() && self.damaged_blocks.is_empty() {
            return "record".to_string();
        }
        let blocks: Vec<String> = self.damaged_blocks.iter().map(u64::to_string).collect();
        blocks.join(",")
    }
}

// ----------------------------------------------------------------------------------------
// The mount.

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("{0}: no such directory")]
    Missing(PathBuf),
    #[error(
        "{0} is not a backupfs mount: it has no backups/ and volumes/ directories (is backupfs mounted there?)"
    )]
    NotBackupfs(PathBuf),
    #[error(
        "{0}: the daemon behind this mount is gone (Transport endpoint is not connected); `umount -l {0}` clears it"
    )]
    Stale(PathBuf),
    #[error("{0}: permission denied (backups are readable by root and the admin_group only)")]
    Denied(PathBuf),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl MountError {
    fn of(path: &Path, e: std::io::Error) -> MountError {
        let path = path.to_path_buf();
        match e.raw_os_error() {
            Some(libc::ENOTCONN) => MountError::Stale(path),
            Some(libc::EACCES) | Some(libc::EPERM) => MountError::Denied(path),
            _ => MountError::Io(path, e),
        }
    }
}

/// The most `status` and `wait` read of one file of the tree (`jobs`, a record,
/// `restores`): far more than the daemon ever serves.
const TREE_FILE_CAP: u64 = 64 << 20;

/// Reads a file of the mounted tree whole. `--mount` may name a directory that is no
/// backupfs mount, so this opens only a regular file, never through a link, never
/// waits on a FIFO, and reads at most `TREE_FILE_CAP` bytes (EFBIG past that).
fn read_tree_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let (dir, name) = backupfs::volume::dir::split(path)?;
    backupfs::volume::dir::Dir::open(dir)?.read_capped(name, TREE_FILE_CAP)
}

/// A directory laid out like a backupfs mount: `backups/` and `volumes/`.
#[derive(Debug, Clone)]
pub struct Mount {
    root: PathBuf,
}

impl Mount {
    pub fn open(root: &Path) -> Result<Mount, MountError> {
        match std::fs::metadata(root) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(MountError::NotBackupfs(root.to_path_buf())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(MountError::Missing(root.to_path_buf()));
            }
            Err(e) => return Err(MountError::of(root, e)),
        }
        for dir in ["backups", "volumes"] {
            match std::fs::metadata(root.join(dir)) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(MountError::NotBackupfs(root.to_path_buf())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(MountError::NotBackupfs(root.to_path_buf()));
                }
                Err(e) => return Err(MountError::of(root, e)),
            }
        }
        Ok(Mount {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn target_dir(&self, target: &str) -> PathBuf {
        self.root.join("backups").join(target)
    }

    /// The targets, by name.
    pub fn targets(&self) -> Result<Vec<String>, MountError> {
        let dir = self.root.join("backups");
        let mut names = Vec::new();
        // Gone: the daemon stopped and took its mount with it.
        let entries = std::fs::read_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => MountError::NotBackupfs(self.root.clone()),
            _ => MountError::of(&dir, e),
        })?;
        for entry in entries {
            let entry = entry.map_err(|e| MountError::of(&dir, e))?;
            if entry.file_type().is_ok_and(|t| t.is_dir())
                && let Some(name) = entry.file_name().to_str()
            {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// A target's `jobs`, in its order (oldest first); malformed lines skipped.
    pub fn jobs(&self, target: &str) -> Result<Vec<JobLine>, MountError> {
        let path = self.target_dir(target).join("jobs");
        let bytes = read_tree_file(&path).map_err(|e| MountError::of(&path, e))?;
        Ok(String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(JobLine::parse)
            .collect())
    }

    /// The ids of a target's records (`<id>.json`).
    pub fn record_ids(&self, target: &str) -> Result<Vec<String>, MountError> {
        let dir = self.target_dir(target);
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(|e| MountError::of(&dir, e))? {
            let entry = entry.map_err(|e| MountError::of(&dir, e))?;
            if let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                && is_backup_id(id)
            {
                ids.push(id.to_string());
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// A backup's record; None when there is none (or it cannot be read or parsed: a
    /// record removed meanwhile, or one this client does not understand).
    pub fn record(&self, target: &str, backup_id: &str) -> Option<RecordInfo> {
        let path = self.target_dir(target).join(format!("{backup_id}.json"));
        let bytes = read_tree_file(&path).ok()?;
        RecordInfo::parse(&String::from_utf8_lossy(&bytes)).filter(|r| r.id == backup_id)
    }

    /// `<mnt>/restores`; None when the daemon does not provide it.
    pub fn restores(&self) -> Result<Option<Vec<RestoreLine>>, MountError> {
        let path = self.root.join("restores");
        match read_tree_file(&path) {
            Ok(bytes) => Ok(Some(
                String::from_utf8_lossy(&bytes)
                    .lines()
                    .filter_map(RestoreLine::parse)
                    .collect(),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(MountError::of(&path, e)),
        }
    }
}

/// Everything the mount said at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub taken: Instant,
    pub at: SystemTime,
    pub targets: Vec<TargetState>,
    /// None when the mount has no `restores` file.
    pub restores: Option<Vec<RestoreLine>>,
}

#[derive(Debug, Clone)]
pub struct TargetState {
    pub name: String,
    pub jobs: Vec<JobLine>,
    /// Every record of the target, in id order.
    pub records: Vec<RecordInfo>,
}

impl TargetState {
    /// Backups and verifies queued or running, in `jobs`' order.
    pub fn active_jobs(&self) -> impl Iterator<Item = &JobLine> {
        self.jobs.iter().filter(|j| j.is_active())
    }

    /// The last `ENDED_SHOWN` backups that ended (available or failed), newest last. From
    /// the records, so that they are there also once `jobs` has forgotten them (after two
    /// hours): what happened last night.
    pub fn ended(&self) -> Vec<&RecordInfo> {
        let mut ended: Vec<&RecordInfo> = self
            .records
            .iter()
            .filter(|r| r.status == "available" || r.status == "error")
            .collect();
        ended.sort_by_key(|r| {
            (
                r.completed(),
                r.created_at.as_deref().and_then(parse_rfc3339),
            )
        });
        let skip = ended.len().saturating_sub(ENDED_SHOWN);
        ended.split_off(skip)
    }

    /// Why a backup failed: its record's error, else the one its line in `jobs` gives.
    pub fn failure(&self, record: &RecordInfo) -> Option<String> {
        if record.status != "error" {
            return None;
        }
        record
            .error
            .clone()
            .or_else(|| {
                self.jobs
                    .iter()
                    .rfind(|j| j.backup_id == record.id && !j.is_verify())
                    .and_then(|j| j.error.clone())
            })
            .or_else(|| Some("(no reason recorded)".to_string()))
    }

    /// Per volume with any record, its newest available backup not known to be damaged
    /// (None when it has none), by volume id.
    pub fn newest_per_volume(&self) -> BTreeMap<&str, Option<&RecordInfo>> {
        let mut newest: BTreeMap<&str, Option<&RecordInfo>> = BTreeMap::new();
        for record in &self.records {
            let slot = newest.entry(record.volume_id.as_str()).or_default();
            if record.status != "available" || record.is_damaged() {
                continue;
            }
            let key = |r: &RecordInfo| {
                (
                    r.completed(),
                    r.created_at.as_deref().and_then(parse_rfc3339),
                )
            };
            if slot.is_none_or(|best| key(record) > key(best)) {
                *slot = Some(record);
            }
        }
        newest
    }

    /// Backups whose last verify found damage, oldest first.
    pub fn damaged(&self) -> Vec<&RecordInfo> {
        let mut damaged: Vec<&RecordInfo> =
            self.records.iter().filter(|r| r.is_damaged()).collect();
        damaged.sort_by_key(|r| r.completed());
        damaged
    }
}

/// Reads snapshots of a mount. Records of ended backups do not change, so in `--watch`
/// one is read again only while a job or a verify mentions it, and every
/// `FULL_READ_EVERY`: thousands of records are not read through FUSE every second.
pub struct Reader {
    mount: Mount,
    records: HashMap<(String, String), RecordInfo>,
    /// Backups that `jobs` listed in the previous snapshot.
    listed: HashSet<(String, String)>,
    full_read_at: Option<Instant>,
}

impl Reader {
    pub fn new(mount: Mount) -> Reader {
        Reader {
            mount,
            records: HashMap::new(),
            listed: HashSet::new(),
            full_read_at: None,
        }
    }

    pub fn snapshot(&mut self) -> Result<Snapshot, MountError> {
        let taken = Instant::now();
        let full = self
            .full_read_at
            .is_none_or(|at| taken.duration_since(at) >= FULL_READ_EVERY);
        if full {
            self.full_read_at = Some(taken);
        }
        let mut targets = Vec::new();
        let mut listed = HashSet::new();
        let mut present = HashSet::new();
        for name in self.mount.targets()? {
            let jobs = self.mount.jobs(&name)?;
            for job in &jobs {
                listed.insert((name.clone(), job.backup_id.clone()));
            }
            let mut records = Vec::new();
            for id in self.mount.record_ids(&name)? {
                let key = (name.clone(), id);
                let settled = self
                    .records
                    .get(&key)
                    .is_some_and(|r| r.status == "available" || r.status == "error");
                let read_again =
                    full || !settled || listed.contains(&key) || self.listed.contains(&key);
                if read_again {
                    match self.mount.record(&key.0, &key.1) {
                        Some(record) => self.records.insert(key.clone(), record),
                        None => self.records.remove(&key),
                    };
                }
                if let Some(record) = self.records.get(&key) {
                    records.push(record.clone());
                }
                present.insert(key);
            }
            targets.push(TargetState {
                name,
                jobs,
                records,
            });
        }
        self.records.retain(|key, _| present.contains(key));
        self.listed = listed;
        Ok(Snapshot {
            taken,
            at: SystemTime::now(),
            targets,
            restores: self.mount.restores()?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    pub(crate) const ID: &str = "0c9e4a8e-5f7b-4d3a-9c1e-2b6f8d0a7e31";

    #[test]
    fn files_of_the_tree_are_read_only_when_regular_never_through_a_link_or_a_fifo() {
        let scratch = std::env::temp_dir().join(format!("backupfs-cli-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).unwrap();
        let host = scratch.join("host");
        std::fs::write(&host, b"secret").unwrap();
        std::fs::write(scratch.join("jobs"), b"a line").unwrap();
        std::os::unix::fs::symlink(&host, scratch.join("linked")).unwrap();
        nix::unistd::mkfifo(
            &scratch.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let read = |name: &str| read_tree_file(&scratch.join(name));
        assert_eq!(read("jobs").unwrap(), b"a line");
        assert!(read("linked").is_err(), "a link is never followed");
        // Would block forever if the FIFO were opened for reading.
        assert!(read("fifo").is_err(), "a FIFO is never opened");
        std::fs::remove_dir_all(&scratch).unwrap();
    }

    #[test]
    fn job_lines_parse_with_and_without_an_error_and_malformed_ones_are_refused() {
        let line = JobLine::parse(&format!("{ID} vol-a copying 10/100")).unwrap();
        assert_eq!(
            (
                line.volume_id.as_str(),
                line.state.as_str(),
                line.done,
                line.total
            ),
            ("vol-a", "copying", 10, 100)
        );
        assert_eq!(line.error, None);
        assert!(line.is_active() && !line.is_queued() && !line.is_verify());
        let failed =
            JobLine::parse(&format!("{ID} vol-a error 0/100 no volume vol-a (ENOENT)")).unwrap();
        assert_eq!(failed.error.as_deref(), Some("no volume vol-a (ENOENT)"));
        assert!(!failed.is_active());
        assert!(
            JobLine::parse(&format!("{ID} v verify-queued 0/5"))
                .unwrap()
                .is_verify()
        );
        for bad in [
            "",
            "   ",
            "a b c",
            "a b c 10",
            "a b c x/10",
            "a b c 10/-1",
            "a  b c 1/2",
            "a b c 1/2/3",
            "a b\tc 1/2",
        ] {
            assert_eq!(JobLine::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn restore_lines_parse_and_an_unknown_total_is_zero() {
        let line = RestoreLine::parse("ssd vol-a restoring 5/0").unwrap();
        assert!(line.is_active());
        assert_eq!((line.done, line.total), (5, 0));
        let failed = RestoreLine::parse("ssd vol-a failed 5/10 No space left (ENOSPC)").unwrap();
        assert!(!failed.is_active());
        assert_eq!(failed.error.as_deref(), Some("No space left (ENOSPC)"));
    }

    #[test]
    fn records_are_read_leniently_and_need_id_volume_and_status() {
        let r = RecordInfo::parse(&format!(
            r#"{{"id":"{ID}","volume_id":"v","status":"available","completed_at":"2026-11-30T07:58:41.123Z",
               "damaged_blocks":[5,17],"size":"not a number","error":"line one\nline two"}}"#
        ))
        .unwrap();
        assert_eq!(r.damaged_list(), "5,17");
        assert_eq!(r.size, 0);
        assert_eq!(r.error.as_deref(), Some("line one; line two"));
        assert!(r.completed().is_some());
        assert_eq!(
            RecordInfo::parse(r#"{"id":"x","status":"available"}"#),
            None
        );
        assert_eq!(RecordInfo::parse("not json"), None);
        assert_eq!(RecordInfo::parse("[1,2]"), None);
    }

    pub(crate) fn job(id: &str, volume: &str, state: &str, done: u64, total: u64) -> JobLine {
        JobLine {
            backup_id: id.to_string(),
            volume_id: volume.to_string(),
            state: state.to_string(),
            done,
            total,
            error: None,
        }
    }

    pub(crate) fn snapshot(
        taken: Instant,
        jobs: Vec<JobLine>,
        records: Vec<RecordInfo>,
    ) -> Snapshot {
        Snapshot {
            taken,
            at: UNIX_EPOCH + Duration::from_secs(2_000_000_000),
            targets: vec![TargetState {
                name: "hdd".to_string(),
                jobs,
                records,
            }],
            restores: None,
        }
    }

    #[test]
    fn a_record_the_daemon_found_damaged_is_listed_damaged() {
        let r = RecordInfo::parse(
            r#"{"id":"a","volume_id":"v","status":"available","size":1,
               "defect":"the record's MAC does not check against the target key"}"#,
        )
        .unwrap();
        assert!(r.is_damaged());
        assert_eq!(r.damaged_list(), "record");
    }

    pub(crate) fn record(id: &str, volume: &str, status: &str, completed: &str) -> RecordInfo {
        RecordInfo {
            id: id.to_string(),
            volume_id: volume.to_string(),
            status: status.to_string(),
            created_at: Some(completed.to_string()),
            completed_at: Some(completed.to_string()),
            verified_at: None,
            damaged_blocks: Vec::new(),
            defect: None,
            error: None,
            size: 100,
        }
    }

    #[test]
    fn only_the_last_few_ended_backups_are_shown_newest_last_even_when_jobs_forgot_them() {
        let ids: Vec<String> = (0..8)
            .map(|n| format!("00000000-0000-4000-8000-00000000000{n}"))
            .collect();
        // Made in id order; they ended in the reverse order.
        let records = ids
            .iter()
            .enumerate()
            .map(|(n, id)| {
                record(
                    id,
                    "v",
                    "available",
                    &format!("2030-01-01T00:00:0{}Z", 9 - n),
                )
            })
            .collect();
        let snap = snapshot(Instant::now(), Vec::new(), records);
        let shown: Vec<&str> = snap.targets[0]
            .ended()
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        let expected: Vec<&str> = ids[..ENDED_SHOWN]
            .iter()
            .rev()
            .map(String::as_str)
            .collect();
        assert_eq!(shown, expected);
    }

    #[test]
    fn backup_ids_are_lowercase_hyphenated_uuids() {
        assert!(is_backup_id(ID));
        assert!(!is_backup_id(&ID.to_uppercase()));
        assert!(!is_backup_id(&ID.replace('-', "")));
        assert!(!is_backup_id("../etc"));
    }
}
