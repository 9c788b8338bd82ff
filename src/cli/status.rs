//! `backupfs status` and `backupfs wait`: a client of the mounted tree. They read only what
//! the README documents (`backups/<target>/jobs`, the records `<id>.json`, `restores`) with
//! plain file I/O, as any script could, and never the daemon's internals; a line or record
//! they cannot parse is skipped, never a panic.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backupfs::engine::error::one_line;
pub use backupfs::ids::is_backup_id;
pub use backupfs::targets::record::parse_rfc3339;

/// Where `status` and `wait` look when no `--mount` is given (the systemd unit's mountpoint).
pub const DEFAULT_MOUNT: &str = "/mnt/backupfs";
/// Ended backups shown per target, newest last.
pub const ENDED_SHOWN: usize = 5;
/// How often `wait` looks at the mount.
const POLL: Duration = Duration::from_millis(200);
/// How far apart the two samples of a one-shot `status` are, and a `--watch` frame's period.
const SAMPLE: Duration = Duration::from_secs(1);
/// A one-shot `status` looks again at most this many times to measure rates.
const MAX_EXTRA_SAMPLES: usize = 2;
/// Progress older than this is forgotten when measuring a rate (a rolling window).
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// In `--watch`, records of backups no job mentions are read again this often (a verify
/// can start and end between two frames).
const FULL_READ_EVERY: Duration = Duration::from_secs(10);

/// `backupfs status --help`, and its section of the manual page.
pub const STATUS_ABOUT: &str = "Show, per target, the backups and verifies running and queued \
(in a terminal with a progress bar, percentage, rate and ETA), the last five ended backups \
(newest last, failed ones with their error; from the records, so also those `jobs` no longer \
lists), each volume's newest available backup and its age \
(a backup a verify found damaged does not count), and the backups a verify found damaged; then \
the restores, when the mount lists them. It reads only the mounted tree (`jobs`, the records, \
`restores`), as any script could. Measuring rates takes a second or two when something is \
moving.\n\n\
When standard output is not a terminal it prints plain lines instead, one per item: fields \
separated by one space, `-` when unknown, a free text (an error) last, times as the records \
write them (RFC 3339), rates in bytes per second, ETA and age in seconds:\n\n  \
target TARGET\n  \
job TARGET BACKUP-ID VOLUME-ID STATE DONE TOTAL RATE ETA\n  \
ended TARGET BACKUP-ID VOLUME-ID available|error COMPLETED-AT [ERROR]\n  \
latest TARGET VOLUME-ID BACKUP-ID|- COMPLETED-AT AGE\n  \
damaged TARGET BACKUP-ID VOLUME-ID BLOCK,BLOCK... VERIFIED-AT\n  \
restore BACKEND VOLUME-ID STATE DONE TOTAL RATE ETA [ERROR]\n\n\
A `latest` line with `-` for BACKUP-ID names a volume with no usable backup in that target \
(all failed, still running, or damaged).\n\n\
With --watch it redraws every second until Ctrl-C (plain: one block of lines per second, each \
ended by an empty line).\n\n\
Exit status: 0; 1 when MOUNT is not there or not a backupfs mount, or cannot be read (one line \
on standard error says which).";
pub const STATUS_EXAMPLES: &str = "Examples:\n  backupfs status\n  backupfs status --watch\n  \
backupfs status --mount /mnt/backupfs | awk '$1 == \"damaged\"'";
/// `backupfs wait --help`, and its section of the manual page.
pub const WAIT_ABOUT: &str = "Wait until a backup has ended, for scripts that queued it \
without `wait`: it looks at every target's `jobs` and the backup's record every 200 ms.\n\n\
Exit status: 0 when the backup is available (`BACKUP-ID available` on standard output); 1 when \
it failed, with the reason from its record on standard error (also when a verify found it \
damaged, or MOUNT cannot be read); 2 for a malformed BACKUP-ID (or command line); 3 when no \
target has such a backup; 4 when --timeout ran out first.";
pub const WAIT_EXAMPLES: &str = "Examples:\n  \
exec 3<>/mnt/backupfs/backups/hdd/request; echo \"$VOL\" >&3; read -r id <&3; exec 3>&-\n  \
backupfs wait \"$id\" || echo \"backup $id failed\"\n  \
backupfs wait --timeout 3600 \"$id\"";

/// `wait`'s exit statuses, as documented in its help and the README.
pub mod exit {
    pub const AVAILABLE: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const MALFORMED_ID: u8 = 2;
    pub const NO_SUCH_BACKUP: u8 = 3;
    pub const TIMED_OUT: u8 = 4;
}

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
        let bytes = std::fs::read(&path).map_err(|e| MountError::of(&path, e))?;
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
        let bytes = std::fs::read(path).ok()?;
        RecordInfo::parse(&String::from_utf8_lossy(&bytes)).filter(|r| r.id == backup_id)
    }

    /// `<mnt>/restores`; None when the daemon does not provide it.
    pub fn restores(&self) -> Result<Option<Vec<RestoreLine>>, MountError> {
        let path = self.root.join("restores");
        match std::fs::read(&path) {
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

// ----------------------------------------------------------------------------------------
// Rates.

/// Progress seen over the last `RATE_WINDOW`, per job: its rate is what it did since the
/// oldest sample kept (two samples a second apart in a one-shot `status`).
#[derive(Debug, Default)]
pub struct Rates {
    samples: HashMap<String, VecDeque<(Instant, u64)>>,
}

fn job_key(target: &str, job: &JobLine) -> String {
    let kind = if job.is_verify() { "verify" } else { "backup" };
    format!("{target} {} {kind}", job.backup_id)
}

fn restore_key(restore: &RestoreLine) -> String {
    format!("restore {} {}", restore.backend, restore.volume_id)
}

impl Rates {
    pub fn observe(&mut self, snapshot: &Snapshot) {
        let mut seen = HashSet::new();
        for target in &snapshot.targets {
            for job in target.active_jobs().filter(|j| !j.is_queued()) {
                let key = job_key(&target.name, job);
                self.push(&key, snapshot.taken, job.done);
                seen.insert(key);
            }
        }
        for restore in snapshot.restores.iter().flatten() {
            if restore.is_active() {
                let key = restore_key(restore);
                self.push(&key, snapshot.taken, restore.done);
                seen.insert(key);
            }
        }
        self.samples.retain(|key, _| seen.contains(key));
    }

    fn push(&mut self, key: &str, at: Instant, done: u64) {
        let samples = self.samples.entry(key.to_string()).or_default();
        // Progress that went back is a new phase (a copy after a snapshot): start over.
        if samples.back().is_some_and(|(_, last)| done < *last) {
            samples.clear();
        }
        samples.push_back((at, done));
        while samples.len() > 2
            && samples
                .front()
                .is_some_and(|(t, _)| at.duration_since(*t) > RATE_WINDOW)
        {
            samples.pop_front();
        }
    }

    /// Bytes per second, once two samples at least half a second apart show progress.
    /// None while none is seen: the daemon counts progress in whole I/O blocks (2 MiB), so
    /// a slow copy can look still for a second without being stalled.
    pub fn rate(&self, key: &str) -> Option<f64> {
        let samples = self.samples.get(key)?;
        let ((first_at, first), (last_at, last)) = (samples.front()?, samples.back()?);
        let seconds = last_at.duration_since(*first_at).as_secs_f64();
        (seconds >= 0.5 && last > first).then(|| (last - first) as f64 / seconds)
    }

    /// Whether another sample would help: something is moving (not yet at its total)
    /// and has no rate yet.
    pub fn want_sample(&self, snapshot: &Snapshot) -> bool {
        let jobs = snapshot.targets.iter().flat_map(|t| {
            t.active_jobs()
                .filter(|j| !j.is_queued() && j.done < j.total)
                .map(|j| self.job_rate(&t.name, j))
        });
        let restores = snapshot
            .restores
            .iter()
            .flatten()
            .filter(|r| r.is_active() && (r.total == 0 || r.done < r.total))
            .map(|r| self.restore_rate(r));
        jobs.chain(restores).any(|rate| rate.is_none())
    }

    pub fn job_rate(&self, target: &str, job: &JobLine) -> Option<f64> {
        self.rate(&job_key(target, job))
    }

    pub fn restore_rate(&self, restore: &RestoreLine) -> Option<f64> {
        self.rate(&restore_key(restore))
    }
}

/// Seconds left at `rate`; None when unknown (no rate, no total, stalled).
pub fn eta(done: u64, total: u64, rate: Option<f64>) -> Option<u64> {
    let rate = rate.filter(|r| *r >= 1.0)?;
    (total > 0).then(|| (total.saturating_sub(done) as f64 / rate).ceil() as u64)
}

// ----------------------------------------------------------------------------------------
// Time.

/// `YYYY-MM-DD HH:MM:SS UTC`.
pub fn format_utc(time: SystemTime) -> String {
    let secs = time
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = backupfs::targets::record::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// A duration in its two largest units: `3d 4h`, `5h 12m`, `7m 3s`, `40s`.
pub fn format_duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// How long ago `then` was, seen at `now`: `3d 4h ago` (`just now` for a time ahead of
/// this machine's clock).
pub fn format_age(then: SystemTime, now: SystemTime) -> String {
    match now.duration_since(then) {
        Ok(age) => format!("{} ago", format_duration(age.as_secs())),
        Err(_) => "just now".to_string(),
    }
}

fn age_seconds(then: SystemTime, now: SystemTime) -> u64 {
    now.duration_since(then).map_or(0, |age| age.as_secs())
}

/// Bytes in binary units: `512 B`, `1.5 KiB`, `48.0 MiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

// ----------------------------------------------------------------------------------------
// Plain output: one line per item, the first word says what it is, fields separated by
// one space, `-` for unknown; a free text (an error) comes last. Stable: scripts parse it.

/// The plain (script) form of a snapshot; see the README for the line formats.
pub fn render_plain(snapshot: &Snapshot, rates: &Rates) -> String {
    let mut out = String::new();
    let dash = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    for target in &snapshot.targets {
        let t = &target.name;
        let _ = writeln!(out, "target {t}");
        for job in target.active_jobs() {
            let rate = rates.job_rate(t, job);
            let _ = writeln!(
                out,
                "job {t} {} {} {} {} {} {} {}",
                job.backup_id,
                job.volume_id,
                job.state,
                job.done,
                job.total,
                dash(rate.map(|r| r.round() as u64)),
                dash(eta(job.done, job.total, rate)),
            );
        }
        for r in target.ended() {
            let mut line = format!(
                "ended {t} {} {} {} {}",
                r.id,
                r.volume_id,
                r.status,
                r.completed_at.as_deref().unwrap_or("-")
            );
            if let Some(error) = target.failure(r) {
                line.push(' ');
                line.push_str(&error);
            }
            let _ = writeln!(out, "{line}");
        }
        for (volume_id, newest) in target.newest_per_volume() {
            let _ = match newest {
                Some(r) => writeln!(
                    out,
                    "latest {t} {volume_id} {} {} {}",
                    r.id,
                    r.completed_at.as_deref().unwrap_or("-"),
                    dash(r.completed().map(|c| age_seconds(c, snapshot.at)))
                ),
                None => writeln!(out, "latest {t} {volume_id} - - -"),
            };
        }
        for r in target.damaged() {
            let _ = writeln!(
                out,
                "damaged {t} {} {} {} {}",
                r.id,
                r.volume_id,
                r.damaged_list(),
                r.verified_at.as_deref().unwrap_or("-")
            );
        }
    }
    for restore in snapshot.restores.iter().flatten() {
        let rate = restore
            .is_active()
            .then(|| rates.restore_rate(restore))
            .flatten();
        let _ = write!(
            out,
            "restore {} {} {} {} {} {} {}",
            restore.backend,
            restore.volume_id,
            restore.state,
            restore.done,
            restore.total,
            dash(rate.map(|r| r.round() as u64)),
            dash(eta(restore.done, restore.total, rate)),
        );
        if let Some(error) = &restore.error {
            let _ = write!(out, " {error}");
        }
        out.push('\n');
    }
    out
}

// ----------------------------------------------------------------------------------------
// Terminal output: sections per target, progress bars, ages; cut to the terminal's width.

/// The terminal form of a snapshot, as lines no wider than `width` characters.
pub fn render_terminal(
    mount: &Path,
    snapshot: &Snapshot,
    rates: &Rates,
    width: usize,
) -> Vec<String> {
    let width = width.max(40);
    // Full ids need room; short ones (the first 8 characters) still tell backups apart.
    let id = |id: &str| -> String {
        if width >= 120 {
            id.to_string()
        } else {
            id.chars().take(8).collect()
        }
    };
    // Cinder's volume ids are UUIDs too: in a narrow terminal they shrink the same way,
    // so that a progress line keeps its percentage, rate and ETA (issue 23).
    let volume = |volume_id: &str| -> String {
        if width >= 120 || volume_id.chars().count() <= 12 {
            volume_id.to_string()
        } else {
            volume_id.chars().take(8).collect()
        }
    };
    let mut lines = vec![format!(
        "backupfs at {}, {}",
        mount.display(),
        format_utc(snapshot.at)
    )];
    if snapshot.targets.is_empty() {
        lines.push("no backup targets".to_string());
    }
    for target in &snapshot.targets {
        lines.push(String::new());
        lines.push(format!("target {}", target.name));
        let active: Vec<&JobLine> = target.active_jobs().collect();
        if active.is_empty() {
            lines.push("  no jobs running or queued".to_string());
        } else {
            lines.push("  running and queued".to_string());
            let volume_width = active
                .iter()
                .map(|j| volume(&j.volume_id).chars().count())
                .max()
                .unwrap_or(0)
                .min(24);
            for job in active {
                let head = format!(
                    "    {} {:<volume_width$} {:<13}",
                    id(&job.backup_id),
                    volume(&job.volume_id),
                    job.state
                );
                let rate = rates.job_rate(&target.name, job);
                lines.push(if job.is_queued() {
                    head.trim_end().to_string()
                } else {
                    progress_line(&head, job.done, job.total, rate, width)
                });
            }
        }
        let ended = target.ended();
        if !ended.is_empty() {
            lines.push("  ended".to_string());
            for r in ended {
                let when = r
                    .completed()
                    .map_or_else(|| "-".to_string(), |c| format_age(c, snapshot.at));
                let mut line = format!(
                    "    {} {} {:<9} {:>12}",
                    id(&r.id),
                    volume(&r.volume_id),
                    r.status,
                    when
                );
                match target.failure(r) {
                    Some(error) => line += &format!("  {error}"),
                    None => line += &format!("  {}", format_bytes(r.size)),
                }
                lines.push(line);
            }
        }
        let newest = target.newest_per_volume();
        if !newest.is_empty() {
            lines.push("  newest backup per volume".to_string());
            let volume_width = newest
                .keys()
                .map(|v| volume(v).chars().count())
                .max()
                .unwrap_or(0)
                .min(24);
            for (volume_id, record) in newest {
                let volume_id = volume(volume_id);
                lines.push(match record {
                    Some(r) => format!(
                        "    {volume_id:<volume_width$} {:>13}  {}",
                        r.completed()
                            .map_or_else(|| "-".to_string(), |c| format_age(c, snapshot.at)),
                        id(&r.id)
                    ),
                    None => format!("    {volume_id:<volume_width$}  no usable backup"),
                });
            }
        }
        let damaged = target.damaged();
        if !damaged.is_empty() {
            lines.push("  DAMAGED (reads of these blocks fail; make a new backup)".to_string());
            for r in damaged {
                let verified = r
                    .verified_at
                    .as_deref()
                    .and_then(parse_rfc3339)
                    .map_or_else(String::new, |v| {
                        format!(", verified {}", format_age(v, snapshot.at))
                    });
                lines.push(format!(
                    "    ! {} {} blocks {}{verified}",
                    id(&r.id),
                    volume(&r.volume_id),
                    r.damaged_list()
                ));
            }
        }
    }
    if let Some(restores) = &snapshot.restores {
        lines.push(String::new());
        if restores.is_empty() {
            lines.push("no restores".to_string());
        } else {
            lines.push("restores".to_string());
        }
        for restore in restores {
            let name = format!("{}/{}", restore.backend, volume(&restore.volume_id));
            let head = format!("  {name} {:<9}", restore.state);
            lines.push(match &restore.error {
                Some(error) => format!("{head}  {error}"),
                None if restore.is_active() => progress_line(
                    &head,
                    restore.done,
                    restore.total,
                    rates.restore_rate(restore),
                    width,
                ),
                None => format!("{head}  {}", format_bytes(restore.done)),
            });
        }
    }
    lines.into_iter().map(|line| fit(&line, width)).collect()
}

/// `head [#####-----]  45%  12.3 MiB/s  ETA 42s`, the bar taking the room left, and
/// dropped before any number is (an unknown total shows bytes done instead).
fn progress_line(head: &str, done: u64, total: u64, rate: Option<f64>, width: usize) -> String {
    let rate_text = rate.map_or_else(String::new, |r| format!("{}/s", format_bytes(r as u64)));
    if total == 0 {
        return format!("{head} {}  {rate_text}", format_bytes(done));
    }
    let fraction = (done as f64 / total as f64).clamp(0.0, 1.0);
    let eta_text = match eta(done, total, rate) {
        Some(seconds) => format!("ETA {}", format_duration(seconds)),
        None => String::new(),
    };
    let tail = format!(
        " {:>3}%  {rate_text:>12}  {eta_text}",
        (fraction * 100.0).floor() as u64
    );
    let room = width.saturating_sub(head.chars().count() + tail.chars().count() + 3);
    if room < 5 {
        return format!("{head}{}", tail.trim_end());
    }
    let bar_width = room.min(40);
    let filled = (fraction * bar_width as f64).round() as usize;
    format!(
        "{head} [{}{}]{}",
        "#".repeat(filled),
        "-".repeat(bar_width - filled),
        tail.trim_end()
    )
}

/// A line cut to `width` characters (an ellipsis marks the cut).
fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_string();
    }
    let mut cut: String = line.chars().take(width.saturating_sub(3)).collect();
    cut.push_str("...");
    cut
}

/// The terminal's columns and rows (80x24 when standard output is not one).
fn terminal_size() -> (usize, usize) {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes a winsize into the one we own.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    let or = |value: u16, default: usize| match usize::from(value) {
        0 => default,
        value => value,
    };
    if rc == 0 {
        (or(size.ws_col, 80), or(size.ws_row, 24))
    } else {
        (80, 24)
    }
}

// ----------------------------------------------------------------------------------------
// The commands.

/// Writes to standard output; false once it is gone (a closed pipe: `status | head`).
fn emit(text: &str) -> bool {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .is_ok()
}

/// `backupfs status`: its exit status (0, or 1 with one line on standard error when the
/// mount cannot be read).
pub fn status_command(mount: &Path, watch: bool) -> u8 {
    match status(mount, watch) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("backupfs status: {e}");
            1
        }
    }
}

fn status(mount: &Path, watch: bool) -> Result<(), MountError> {
    let terminal = std::io::stdout().is_terminal();
    let mut reader = Reader::new(Mount::open(mount)?);
    let mut rates = Rates::default();
    let mut snapshot = reader.snapshot()?;
    rates.observe(&snapshot);
    if !watch {
        // A rate needs another look a second later, sometimes two.
        for _ in 0..MAX_EXTRA_SAMPLES {
            if !rates.want_sample(&snapshot) {
                break;
            }
            std::thread::sleep(SAMPLE);
            snapshot = reader.snapshot()?;
            rates.observe(&snapshot);
        }
        let text = if terminal {
            let (width, _) = terminal_size();
            let mut text = render_terminal(mount, &snapshot, &rates, width).join("\n");
            text.push('\n');
            text
        } else {
            render_plain(&snapshot, &rates)
        };
        emit(&text);
        return Ok(());
    }
    let mut first = true;
    loop {
        let text = if terminal {
            let (width, height) = terminal_size();
            let mut lines = render_terminal(mount, &snapshot, &rates, width);
            lines.push("(Ctrl-C to stop)".to_string());
            // One row short of the screen, so that the last line never scrolls it.
            let room = height.saturating_sub(1).max(2);
            if lines.len() > room {
                let hidden = lines.len() - (room - 1);
                lines.truncate(room - 1);
                lines.push(format!(
                    "... {hidden} more lines (a taller terminal shows them)"
                ));
            }
            // Home, each line over the old one and the rest of the screen cleared: no flicker.
            let mut frame = String::from(if first { "\x1b[H\x1b[2J" } else { "\x1b[H" });
            frame += &lines.join("\x1b[K\n");
            frame += "\x1b[K\x1b[J";
            frame
        } else {
            // Blocks of plain lines, each ended by an empty line.
            render_plain(&snapshot, &rates) + "\n"
        };
        if !emit(&text) {
            return Ok(());
        }
        first = false;
        let next = snapshot.taken + SAMPLE;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        snapshot = reader.snapshot()?;
        rates.observe(&snapshot);
    }
}

/// Where a backup is, as `wait` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// No job line and no record in any target.
    Nowhere,
    Pending {
        volume_id: String,
        state: String,
        done: u64,
        total: u64,
    },
    Available {
        volume_id: String,
        damaged_blocks: Vec<u64>,
    },
    Failed {
        volume_id: String,
        reason: String,
    },
}

/// Looks for a backup in every target: a queued or running job line says it is pending;
/// otherwise its record says how it ended (the line of an ended job when the record is gone).
pub fn find_backup(mount: &Mount, backup_id: &str) -> Result<Found, MountError> {
    for target in mount.targets()? {
        let job = mount
            .jobs(&target)?
            .into_iter()
            .rfind(|j| j.backup_id == backup_id && !j.is_verify());
        if let Some(job) = &job
            && job.is_active()
        {
            return Ok(Found::Pending {
                volume_id: job.volume_id.clone(),
                state: job.state.clone(),
                done: job.done,
                total: job.total,
            });
        }
        if let Some(record) = mount.record(&target, backup_id) {
            let volume_id = record.volume_id.clone();
            return Ok(match record.status.as_str() {
                "available" if record.defect.is_some() => Found::Failed {
                    volume_id,
                    reason: format!(
                        "its record is damaged: {}",
                        record.defect.unwrap_or_default()
                    ),
                },
                "available" => Found::Available {
                    volume_id,
                    damaged_blocks: record.damaged_blocks,
                },
                "error" => Found::Failed {
                    volume_id,
                    reason: record
                        .error
                        .or_else(|| job.and_then(|j| j.error))
                        .unwrap_or_else(|| "failed (no reason recorded)".to_string()),
                },
                "deleting" => Found::Failed {
                    volume_id,
                    reason: "it is being deleted".to_string(),
                },
                // `creating`, or a status newer than this client: not ended yet.
                state => Found::Pending {
                    volume_id,
                    state: state.to_string(),
                    done: 0,
                    total: record.size,
                },
            });
        }
        if let Some(job) = job {
            return Ok(if job.state == "available" {
                Found::Available {
                    volume_id: job.volume_id,
                    damaged_blocks: Vec::new(),
                }
            } else {
                Found::Failed {
                    volume_id: job.volume_id,
                    reason: job
                        .error
                        .unwrap_or_else(|| "failed (no reason recorded)".to_string()),
                }
            });
        }
    }
    Ok(Found::Nowhere)
}

/// `backupfs wait`: its exit status (see `exit`), the reason on standard error.
pub fn wait_command(mount: &Path, backup_id: &str, timeout: Option<Duration>) -> u8 {
    if !is_backup_id(backup_id) {
        eprintln!(
            "backupfs wait: {backup_id:?} is not a backup id (a lowercase UUID such as \
             0c9e4a8e-5f7b-4d3a-9c1e-2b6f8d0a7e31)"
        );
        return exit::MALFORMED_ID;
    }
    let mount = match Mount::open(mount) {
        Ok(mount) => mount,
        Err(e) => {
            eprintln!("backupfs wait: {e}");
            return exit::FAILED;
        }
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut seen = false;
    loop {
        match find_backup(&mount, backup_id) {
            Err(e) => {
                eprintln!("backupfs wait: {e}");
                return exit::FAILED;
            }
            Ok(Found::Nowhere) => {
                if seen {
                    eprintln!("backupfs wait: backup {backup_id} was deleted while waiting");
                } else {
                    eprintln!(
                        "backupfs wait: no backup {backup_id} in any target of {}",
                        mount.root().display()
                    );
                }
                return exit::NO_SUCH_BACKUP;
            }
            Ok(Found::Available {
                volume_id,
                damaged_blocks,
            }) => {
                if damaged_blocks.is_empty() {
                    emit(&format!("{backup_id} available\n"));
                    return exit::AVAILABLE;
                }
                let blocks: Vec<String> = damaged_blocks.iter().map(u64::to_string).collect();
                eprintln!(
                    "backupfs wait: backup {backup_id} of {volume_id} is damaged: a verify \
                     found blocks {} bad",
                    blocks.join(",")
                );
                return exit::FAILED;
            }
            Ok(Found::Failed { volume_id, reason }) => {
                eprintln!("backupfs wait: backup {backup_id} of {volume_id} failed: {reason}");
                return exit::FAILED;
            }
            Ok(Found::Pending {
                volume_id,
                state,
                done,
                total,
            }) => {
                seen = true;
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    let percent = done
                        .saturating_mul(100)
                        .checked_div(total)
                        .map(|p| format!(" ({p}%)"))
                        .unwrap_or_default();
                    eprintln!(
                        "backupfs wait: timed out; backup {backup_id} of {volume_id} is still \
                         {state}{percent}"
                    );
                    return exit::TIMED_OUT;
                }
                std::thread::sleep(left.map_or(POLL, |left| left.min(POLL)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0c9e4a8e-5f7b-4d3a-9c1e-2b6f8d0a7e31";

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

    #[test]
    fn rfc3339_with_and_without_milliseconds_round_trips_through_the_calendar() {
        let t = parse_rfc3339("2026-11-30T07:58:41.123Z").unwrap();
        assert_eq!(format_utc(t), "2026-11-30 07:58:41 UTC");
        let whole = parse_rfc3339("2026-11-30T07:58:41Z").unwrap();
        assert_eq!(t.duration_since(whole).unwrap(), Duration::from_millis(123));
        assert_eq!(
            format_utc(parse_rfc3339("2024-02-29T23:59:59Z").unwrap()),
            "2024-02-29 23:59:59 UTC"
        );
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        for bad in [
            "",
            "2026-11-30T07:58:41",
            "2026-11-30 07:58:41Z",
            "2026-13-30T07:58:41Z",
            "2026-11-30T07:58:41.Z",
            "2026-11-30T07:5x:41Z",
            "+026-11-30T07:58:41Z",
            "2026-11-30T07:58:41.12aZ",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn durations_show_their_two_largest_units() {
        assert_eq!(format_duration(0), "0s");
        assert_eq!(format_duration(40), "40s");
        assert_eq!(format_duration(7 * 60 + 3), "7m 3s");
        assert_eq!(format_duration(5 * 3600 + 12 * 60 + 9), "5h 12m");
        assert_eq!(format_duration(3 * 86_400 + 4 * 3600 + 59), "3d 4h");
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            format_age(now - Duration::from_secs(3 * 86_400 + 4 * 3600), now),
            "3d 4h ago"
        );
        assert_eq!(format_age(now + Duration::from_secs(5), now), "just now");
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(48 << 20), "48.0 MiB");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(u64::MAX), "16.0 EiB");
    }

    fn job(id: &str, volume: &str, state: &str, done: u64, total: u64) -> JobLine {
        JobLine {
            backup_id: id.to_string(),
            volume_id: volume.to_string(),
            state: state.to_string(),
            done,
            total,
            error: None,
        }
    }

    fn snapshot(taken: Instant, jobs: Vec<JobLine>, records: Vec<RecordInfo>) -> Snapshot {
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

    fn record(id: &str, volume: &str, status: &str, completed: &str) -> RecordInfo {
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
    fn rate_comes_from_progress_since_first_seen_and_restarts_when_progress_goes_back() {
        let t0 = Instant::now();
        let at = |seconds: u64, done: u64| {
            snapshot(
                t0 + Duration::from_secs(seconds),
                vec![job(ID, "v", "copying", done, 1000)],
                vec![],
            )
        };
        let copying = job(ID, "v", "copying", 0, 1000);
        let mut rates = Rates::default();
        rates.observe(&at(0, 100));
        assert_eq!(rates.job_rate("hdd", &copying), None, "one sample");
        assert!(rates.want_sample(&at(0, 100)));
        rates.observe(&at(1, 100));
        assert_eq!(
            rates.job_rate("hdd", &copying),
            None,
            "no progress seen yet"
        );
        assert!(rates.want_sample(&at(1, 100)));
        rates.observe(&at(2, 300));
        assert_eq!(rates.job_rate("hdd", &copying), Some(100.0));
        assert!(!rates.want_sample(&at(2, 300)));
        rates.observe(&at(4, 300));
        assert_eq!(
            rates.job_rate("hdd", &copying),
            Some(50.0),
            "since first seen"
        );
        assert_eq!(eta(300, 1000, Some(100.0)), Some(7));
        assert_eq!(eta(300, 1000, Some(0.0)), None);
        assert_eq!(eta(300, 0, Some(10.0)), None);
        rates.observe(&at(5, 10));
        assert_eq!(
            rates.job_rate("hdd", &copying),
            None,
            "a new phase starts over"
        );
        rates.observe(&snapshot(t0 + Duration::from_secs(6), vec![], vec![]));
        assert!(rates.samples.is_empty(), "an ended job is forgotten");
    }

    #[test]
    fn plain_output_lists_jobs_ended_newest_and_damaged_in_its_documented_form() {
        let (a, b, c) = (
            "00000000-0000-4000-8000-00000000000a",
            "00000000-0000-4000-8000-00000000000b",
            "00000000-0000-4000-8000-00000000000c",
        );
        let mut failed = job(b, "vol-b", "error", 0, 100);
        failed.error = Some("no volume vol-b (ENOENT)".to_string());
        let mut damaged = record(c, "vol-a", "available", "2033-05-18T03:00:00.000Z");
        damaged.damaged_blocks = vec![5];
        damaged.verified_at = Some("2033-05-18T03:30:00.000Z".to_string());
        let mut error_record = record(b, "vol-b", "error", "2033-05-18T02:00:00.000Z");
        error_record.error = Some("no volume vol-b (ENOENT)".to_string());
        let snap = snapshot(
            Instant::now(),
            vec![
                job(a, "vol-a", "available", 100, 100),
                failed,
                job(c, "vol-a", "available", 100, 100),
                job(a, "vol-a", "verifying", 40, 100),
                job(ID, "vol-c", "queued", 0, 100),
            ],
            vec![
                record(a, "vol-a", "available", "2033-05-18T01:33:20.000Z"),
                error_record,
                damaged,
            ],
        );
        let text = render_plain(&snap, &Rates::default());
        let expected = format!(
            "target hdd\n\
             job hdd {a} vol-a verifying 40 100 - -\n\
             job hdd {ID} vol-c queued 0 100 - -\n\
             ended hdd {a} vol-a available 2033-05-18T01:33:20.000Z\n\
             ended hdd {b} vol-b error 2033-05-18T02:00:00.000Z no volume vol-b (ENOENT)\n\
             ended hdd {c} vol-a available 2033-05-18T03:00:00.000Z\n\
             latest hdd vol-a {a} 2033-05-18T01:33:20.000Z 7200\n\
             latest hdd vol-b - - -\n\
             damaged hdd {c} vol-a 5 2033-05-18T03:30:00.000Z\n"
        );
        assert_eq!(text, expected);
        let lines = render_terminal(Path::new("/mnt/backupfs"), &snap, &Rates::default(), 80);
        assert!(lines.iter().all(|l| l.chars().count() <= 80), "{lines:#?}");
        assert!(
            lines.iter().any(|l| l.contains("[") && l.contains("40%")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("! 00000000 vol-a blocks 5")),
            "{lines:#?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("vol-b") && l.contains("no usable backup"))
        );
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
    fn progress_bars_fit_narrow_and_wide_terminals() {
        for width in [40, 80, 200] {
            let head = "    abcdefgh vol copying      ";
            let line = progress_line(head, 60 << 20, 120 << 20, Some(1048576.0), width);
            for part in ["50%", "1.0 MiB/s", "ETA 1m 0s"] {
                assert!(line.contains(part), "{line}");
            }
            assert!(fit(&line, width).chars().count() <= width);
        }
        assert_eq!(fit("abcdef", 5), "ab...");
        let unknown = progress_line("x", 5 << 20, 0, None, 80);
        assert!(unknown.contains("5.0 MiB"), "{unknown}");
    }

    #[test]
    fn an_80_column_terminal_shows_percentage_rate_and_eta_of_cinders_uuid_volumes() {
        let volume_id = "5f0b7c1e-3a7d-4c2e-9b1a-0d6e2f4a8c31";
        let t0 = Instant::now();
        let at = |seconds: u64, done: u64| {
            snapshot(
                t0 + Duration::from_secs(seconds),
                vec![job(ID, volume_id, "copying", done, 120 << 20)],
                vec![],
            )
        };
        let mut rates = Rates::default();
        rates.observe(&at(0, 0));
        rates.observe(&at(1, 30 << 20));
        rates.observe(&at(2, 60 << 20));
        let lines = render_terminal(Path::new("/mnt/backupfs"), &at(2, 60 << 20), &rates, 80);
        let line = lines
            .iter()
            .find(|l| l.contains("copying"))
            .unwrap_or_else(|| panic!("{lines:#?}"));
        assert!(line.chars().count() <= 80, "{line}");
        for part in ["5f0b7c1e", "50%", "30.0 MiB/s", "ETA 2s"] {
            assert!(line.contains(part), "{part} missing: {line}");
        }
        assert!(!line.contains("..."), "cut: {line}");
        // Wide enough, the whole id is shown.
        let wide = render_terminal(Path::new("/mnt/backupfs"), &at(2, 60 << 20), &rates, 170);
        assert!(wide.iter().any(|l| l.contains(volume_id)), "{wide:#?}");
    }

    #[test]
    fn backup_ids_are_lowercase_hyphenated_uuids() {
        assert!(is_backup_id(ID));
        assert!(!is_backup_id(&ID.to_uppercase()));
        assert!(!is_backup_id(&ID.replace('-', "")));
        assert!(!is_backup_id("../etc"));
    }
}
