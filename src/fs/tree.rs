//! The mounted tree (docs/operating.md, "The mounted tree") as data: which node a path is, its
//! stable inode number, its attributes and its children. Asks the engine; never touches a
//! pool itself.

use crate::engine::{Engine, EngineError};
use crate::ids::{BackupId, VolumeId};
use crate::targets::catalogue::Listed;
use crate::targets::record::{Record, Status};
use fuser::{FileAttr, FileType, INodeNo};
use std::time::{Duration, SystemTime};

pub const ROOT: u64 = 1;
const BACKUPS: u64 = 2;
const VOLUMES: u64 = 3;

pub const REQUEST: &str = "request";
pub const VERIFY: &str = "verify";
pub const JOBS: &str = "jobs";
pub const BY_VOLUME: &str = "by-volume";
pub const LATEST: &str = "latest.img";
pub const RESTORES: &str = "restores";
pub const METRICS: &str = "metrics";
pub const METRICS_FILE: &str = "backupfs.prom";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    Backups,
    Volumes,
    /// `restores`: one line per restore through the mount.
    Restores,
    /// `metrics/` and its `backupfs.prom`.
    Metrics,
    MetricsFile,
    Target(String),
    Request(String),
    Verify(String),
    Jobs(String),
    /// (target, backup id)
    Image(String, BackupId),
    Record(String, BackupId),
    ByVolume(String),
    /// (target, volume id)
    ByVolumeDir(String, VolumeId),
    Latest(String, VolumeId),
    Backend(String),
    /// (backend, volume id)
    Volume(String, VolumeId),
}

impl Node {
    /// Stable across restarts: fixed numbers for the top, a hash of the path below.
    pub fn ino(&self) -> u64 {
        let key = match self {
            Node::Root => return ROOT,
            Node::Backups => return BACKUPS,
            Node::Volumes => return VOLUMES,
            Node::Restores => "restores".to_string(),
            Node::Metrics => "metrics".to_string(),
            Node::MetricsFile => "metrics/backupfs.prom".to_string(),
            Node::Target(t) => format!("t/{t}"),
            Node::Request(t) => format!("t/{t}/request"),
            Node::Verify(t) => format!("t/{t}/verify"),
            Node::Jobs(t) => format!("t/{t}/jobs"),
            Node::Image(t, id) => format!("t/{t}/{id}.img"),
            Node::Record(t, id) => format!("t/{t}/{id}.json"),
            Node::ByVolume(t) => format!("t/{t}/by-volume"),
            Node::ByVolumeDir(t, v) => format!("t/{t}/by-volume/{v}"),
            Node::Latest(t, v) => format!("t/{t}/by-volume/{v}/latest.img"),
            Node::Backend(b) => format!("v/{b}"),
            Node::Volume(b, v) => format!("v/{b}/{v}"),
        };
        // The top bit keeps hashed numbers clear of the fixed ones.
        xxhash_rust::xxh3::xxh3_64(key.as_bytes()) | (1 << 63)
    }

    pub fn kind(&self) -> FileType {
        match self {
            Node::Root
            | Node::Backups
            | Node::Volumes
            | Node::Metrics
            | Node::Target(_)
            | Node::ByVolume(_)
            | Node::ByVolumeDir(..)
            | Node::Backend(_) => FileType::Directory,
            Node::Latest(..) => FileType::Symlink,
            _ => FileType::RegularFile,
        }
    }
}

/// Who may see what: root always; the admin group reads images, records and jobs.
#[derive(Debug, Clone, Copy)]
pub struct Modes {
    pub gid: u32,
    pub group_read: bool,
}

impl Modes {
    fn perm(&self, node: &Node) -> u16 {
        let group_read = if self.group_read { 0o040 } else { 0 };
        let group_dir = if self.group_read { 0o050 } else { 0 };
        match node {
            Node::Root | Node::Backups | Node::Volumes => 0o755,
            Node::Target(_) | Node::ByVolume(_) | Node::ByVolumeDir(..) | Node::Metrics => {
                0o700 | group_dir
            }
            Node::Backend(_) => 0o700,
            Node::Request(_) | Node::Verify(_) => 0o600,
            Node::Jobs(_)
            | Node::Image(..)
            | Node::Record(..)
            | Node::Restores
            | Node::MetricsFile => 0o400 | group_read,
            Node::Latest(..) => 0o777,
            Node::Volume(..) => 0o600,
        }
    }
}

/// How long the kernel may trust what we said about a node (a record's: [`record_ttl`]).
pub fn ttl(node: &Node) -> Duration {
    match node {
        // Immutable once it exists.
        Node::Image(..) => Duration::from_secs(3600),
        Node::Root | Node::Backups | Node::Volumes => Duration::from_secs(60),
        // These change with every backup and deletion (where latest.img points, what
        // the status files say): always ask. Control files get a new inode per lookup.
        Node::Record(..)
        | Node::ByVolume(_)
        | Node::ByVolumeDir(..)
        | Node::Latest(..)
        | Node::Request(_)
        | Node::Verify(_)
        | Node::Restores
        | Node::MetricsFile => Duration::ZERO,
        _ => Duration::from_secs(1),
    }
}

/// How long the kernel may keep a record's attributes (its size, the length of the JSON
/// the mount shows, and its time) and its name. A record still `creating` or `deleting`
/// is about to change: never. An `available` or `error` one changes only when an
/// operator sets an attribute (through this mount: the kernel is told at once, see
/// `Core::record_changed`), a verify notes damage or another node changes it: then
/// `ls -l` may show the old size for up to this long; what a read of the record returns
/// is never cached (direct I/O). Without it, `ls -l` asked for every record's
/// attributes, and looked it up again for each of two `getxattr`: at 20,000 backups it
/// spent most of its 3-6 s on these round trips (issue 28). With READDIRPLUS the listing
/// hands over these attributes with the names, so `ls -l` then asks nothing per record.
pub fn record_ttl(record: &Record) -> Duration {
    status_ttl(record.status)
}

/// [`record_ttl`] of a record with `status`.
pub fn status_ttl(status: Status) -> Duration {
    match status {
        Status::Available | Status::Error => Duration::from_secs(1),
        Status::Creating | Status::Deleting => Duration::ZERO,
    }
}

/// How long the kernel may trust that `name` is `node` (a lookup's entry), given how
/// long it may keep the node's attributes (`attr_ttl`). A backup's names (its image's
/// and its record's) only go with a deletion: through this mount the kernel drops the
/// name itself, but a deletion on another node (or by the janitor) is seen only when the
/// name is looked up again. So they are kept 1 s, whatever their attributes: an image's
/// attributes never change (an hour), but its name must be gone from every node within
/// seconds of its deletion (docs/operating.md, "Several nodes on one target").
pub fn entry_ttl(node: &Node, attr_ttl: Duration) -> Duration {
    match node {
        Node::Record(..) | Node::Image(..) => NAME_TTL,
        _ => attr_ttl,
    }
}

/// How long the kernel keeps a backup's names ([`entry_ttl`]).
pub const NAME_TTL: Duration = Duration::from_secs(1);

/// The attributes of `node`, known to the kernel as inode `ino`.
pub fn attr(
    node: &Node,
    ino: u64,
    modes: &Modes,
    size: u64,
    blocks: u64,
    mtime: SystemTime,
) -> FileAttr {
    let kind = node.kind();
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks,
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm: modes.perm(node),
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: match node {
            Node::Volume(..) | Node::Backend(_) | Node::Request(_) | Node::Verify(_) => 0,
            _ => modes.gid,
        },
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

pub fn record_json(record: &Record) -> Vec<u8> {
    record.shown_json()
}

/// The newest available, undamaged backup of a volume in a target.
/// Finds the child `name` of `parent`, asking the engine whether it exists; for an image
/// or a record, also the record that told (read once per lookup: its attributes come
/// from it too).
pub fn child(
    engine: &Engine,
    parent: &Node,
    name: &str,
) -> Result<(Node, Option<Record>), EngineError> {
    let missing = || EngineError::NotFound(format!("no {name}"));
    let node = match parent {
        Node::Root => match name {
            "backups" => Node::Backups,
            "volumes" => Node::Volumes,
            RESTORES => Node::Restores,
            METRICS => Node::Metrics,
            _ => return Err(missing()),
        },
        Node::Metrics if name == METRICS_FILE => Node::MetricsFile,
        Node::Backups => {
            if !engine.target_names().iter().any(|t| t == name) {
                return Err(missing());
            }
            Node::Target(name.to_string())
        }
        Node::Volumes => {
            if !engine.backend_names().iter().any(|b| b == name) {
                return Err(missing());
            }
            Node::Backend(name.to_string())
        }
        Node::Target(t) => match name {
            REQUEST => Node::Request(t.clone()),
            VERIFY => Node::Verify(t.clone()),
            JOBS => Node::Jobs(t.clone()),
            BY_VOLUME => Node::ByVolume(t.clone()),
            _ => {
                let (stem, image) = match (name.strip_suffix(".img"), name.strip_suffix(".json")) {
                    (Some(stem), _) => (stem, true),
                    (None, Some(stem)) => (stem, false),
                    (None, None) => return Err(missing()),
                };
                let id = BackupId::parse(stem).map_err(|e| EngineError::Invalid(e.to_string()))?;
                let record = engine.record(t, &id).map_err(|_| missing())?;
                let node = if image {
                    if record.status != Status::Available {
                        return Err(missing());
                    }
                    Node::Image(t.clone(), id)
                } else {
                    Node::Record(t.clone(), id)
                };
                return Ok((node, Some(record)));
            }
        },
        Node::ByVolume(t) => {
            let volume_id = VolumeId::parse(name).map_err(|_| missing())?;
            engine.latest_backup(t, &volume_id)?.ok_or_else(missing)?;
            Node::ByVolumeDir(t.clone(), volume_id)
        }
        Node::ByVolumeDir(t, v) if name == LATEST => {
            engine.latest_backup(t, v)?.ok_or_else(missing)?;
            Node::Latest(t.clone(), v.clone())
        }
        Node::Backend(b) => {
            let volume_id =
                VolumeId::parse(name).map_err(|e| EngineError::Invalid(e.to_string()))?;
            engine.volume(b, &volume_id)?;
            Node::Volume(b.clone(), volume_id)
        }
        _ => return Err(missing()),
    };
    Ok((node, None))
}

pub fn parent(node: &Node) -> Node {
    match node {
        Node::Root | Node::Backups | Node::Volumes | Node::Restores | Node::Metrics => Node::Root,
        Node::MetricsFile => Node::Metrics,
        Node::Target(_) => Node::Backups,
        Node::Backend(_) => Node::Volumes,
        Node::ByVolume(t) => Node::Target(t.clone()),
        Node::ByVolumeDir(t, _) => Node::ByVolume(t.clone()),
        Node::Latest(t, v) => Node::ByVolumeDir(t.clone(), v.clone()),
        Node::Volume(b, _) => Node::Backend(b.clone()),
        Node::Request(t)
        | Node::Verify(t)
        | Node::Jobs(t)
        | Node::Image(t, _)
        | Node::Record(t, _) => Node::Target(t.clone()),
    }
}

/// A directory's entries as an open handle keeps them: a target's backups (an image, if
/// available, and a record each) as the catalogue's listing (shared with every other
/// holder of the same listing) and 4 bytes an entry; nodes and names are made as they
/// are asked for (issue 28).
pub struct Listing {
    /// `.`, `..` and the named entries; a target's backups come after them.
    fixed: Vec<(Node, String)>,
    /// A backend's volumes as the driver listed them (size, allocated bytes, mtime), by
    /// index in `fixed`: a listing with attributes asks the driver nothing more (an RBD
    /// volume's `stat` is a round trip to the cluster); they are handed over to be kept
    /// no time (see `listing.rs`).
    volumes: std::collections::HashMap<usize, (u64, u64, SystemTime)>,
    target: String,
    /// What the catalogue listed of the target's backups: a listing with attributes
    /// (READDIRPLUS) reads nothing more.
    listed: crate::targets::catalogue::Listing,
    /// The backup entries, each a backup in `listed` and whether it is its image rather
    /// than its record.
    backups: Vec<Backup>,
}

/// A backup entry of a [`Listing`]: the index of the backup in the listing, times two,
/// plus one for its image (one for its record is even).
#[derive(Clone, Copy)]
struct Backup(u32);

impl Backup {
    fn image(at: u32) -> Backup {
        Backup(at << 1 | 1)
    }

    fn record(at: u32) -> Backup {
        Backup(at << 1)
    }

    fn at(self) -> usize {
        (self.0 >> 1) as usize
    }

    fn is_image(self) -> bool {
        self.0 & 1 == 1
    }
}

impl Listing {
    pub fn len(&self) -> usize {
        self.fixed.len() + self.backups.len()
    }

    /// Never: `.` and `..` are always there.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What the driver listed of the volume entry `i`: (size, allocated bytes, mtime).
    pub fn volume(&self, i: usize) -> Option<(u64, u64, SystemTime)> {
        self.volumes.get(&i).copied()
    }

    /// What the catalogue listed of the backup entry `i` is the image or record of.
    pub fn listed(&self, i: usize) -> Option<&Listed> {
        let at = i.checked_sub(self.fixed.len())?;
        let backup = self.backups.get(at)?;
        self.listed.get(backup.at())
    }

    /// Entry `i`: its node and name.
    pub fn get(&self, i: usize) -> Option<(Node, String)> {
        if let Some(entry) = self.fixed.get(i) {
            return Some(entry.clone());
        }
        let backup = self.backups.get(i - self.fixed.len())?;
        let id = &self.listed.get(backup.at())?.id;
        Some(if backup.is_image() {
            (
                Node::Image(self.target.clone(), id.clone()),
                format!("{id}.img"),
            )
        } else {
            (
                Node::Record(self.target.clone(), id.clone()),
                format!("{id}.json"),
            )
        })
    }
}

/// The entries of a directory, `.` and `..` included.
pub fn children(engine: &Engine, dir: &Node) -> Result<Listing, EngineError> {
    let mut backups = Vec::new();
    let mut listed = crate::targets::catalogue::Listing::default();
    let mut volumes = std::collections::HashMap::new();
    let mut out = vec![
        (dir.clone(), ".".to_string()),
        (parent(dir), "..".to_string()),
    ];
    match dir {
        Node::Root => {
            out.push((Node::Backups, "backups".into()));
            out.push((Node::Volumes, "volumes".into()));
            out.push((Node::Restores, RESTORES.into()));
            out.push((Node::Metrics, METRICS.into()));
        }
        Node::Metrics => {
            out.push((Node::MetricsFile, METRICS_FILE.into()));
        }
        Node::Backups => {
            for t in engine.target_names() {
                out.push((Node::Target(t.clone()), t));
            }
        }
        Node::Volumes => {
            for b in engine.backend_names() {
                out.push((Node::Backend(b.clone()), b));
            }
        }
        Node::Target(t) => {
            out.push((Node::Request(t.clone()), REQUEST.into()));
            out.push((Node::Jobs(t.clone()), JOBS.into()));
            out.push((Node::Verify(t.clone()), VERIFY.into()));
            out.push((Node::ByVolume(t.clone()), BY_VOLUME.into()));
            let all = engine.listing(t)?;
            backups.reserve_exact(2 * all.len());
            for (at, record) in all.iter().enumerate() {
                let at = at as u32;
                if record.status == Status::Available {
                    backups.push(Backup::image(at));
                }
                backups.push(Backup::record(at));
            }
            listed = all;
        }
        Node::ByVolume(t) => {
            for v in engine.volumes_backed_up(t)? {
                let name = v.to_string();
                out.push((Node::ByVolumeDir(t.clone(), v), name));
            }
        }
        Node::ByVolumeDir(t, v) => {
            out.push((Node::Latest(t.clone(), v.clone()), LATEST.into()));
        }
        Node::Backend(b) => {
            for volume in engine.volumes(b)? {
                // Drivers list valid ids only; anything else is not shown.
                if let Ok(volume_id) = VolumeId::parse(&volume.id) {
                    volumes.insert(out.len(), (volume.size, volume.allocated, volume.mtime));
                    out.push((Node::Volume(b.clone(), volume_id), volume.id));
                }
            }
        }
        _ => {
            return Err(EngineError::Invalid("not a directory".into()));
        }
    }
    let target = match dir {
        Node::Target(t) => t.clone(),
        _ => String::new(),
    };
    Ok(Listing {
        fixed: out,
        volumes,
        target,
        listed,
        backups,
    })
}
