//! The backup record: one JSON object per backup, kept on the target beside its data.
//! Format version 1; a reader refuses versions it does not know instead of guessing.

use crate::copy::sums::{self, Sum};
use crate::ids::{BackupId, VolumeId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Available,
    Error,
    Deleting,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Available => "available",
            Status::Error => "error",
            Status::Deleting => "deleting",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checksums {
    /// `xxh3-64-leaves` (or `xxh3-64` for backups made before leaf sums; see
    /// `copy::SumKind`); an all-zero block is recorded as 0.
    pub algorithm: String,
    pub block_size: u64,
    pub blocks: u64,
    /// The file beside the record holding one little-endian u64 per block.
    pub file: String,
    /// xxh3-64 of that file, so a damaged checksum file is told from damaged data.
    pub digest: String,
    /// `xxh3-64-leaves` only: the file beside the record holding the sums of each block's
    /// 64 KiB leaves (16 little-endian u64 per block), which the next incremental backup
    /// starts from. Each block's entries are checked against its checksum before use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaves: Option<String>,
    /// On a keyed target: the MAC of the sums file's exact bytes (`hmac-sha256:<hex>`),
    /// checked whenever they are read; the record's own MAC covers this entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// On a keyed target: the MAC of the leaf-sums file `leaves` names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leaves_mac: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    pub id: BackupId,
    pub volume_id: VolumeId,
    /// The source volume's backend and pool.
    pub backend: String,
    pub pool: String,
    pub target: String,
    pub status: Status,
    pub size: u64,
    pub created_at: String,
    pub completed_at: Option<String>,
    pub name: Option<String>,
    pub snapshot_used: bool,
    pub parent_id: Option<BackupId>,
    pub checksums: Option<Checksums>,
    pub error: Option<String>,
    /// Bytes of data really stored (the rest are holes).
    #[serde(default)]
    pub stored_bytes: u64,
    /// When the whole backup was last checked against its checksums, and the blocks
    /// (of `checksums.block_size`) found damaged then.
    #[serde(default)]
    pub verified_at: Option<String>,
    #[serde(default)]
    pub damaged_blocks: Option<Vec<u64>>,
    /// A temporary snapshot backupfs made for this backup that may still exist: kept
    /// until its removal has succeeded, so that it is never forgotten.
    #[serde(default)]
    pub temporary_snapshot: Option<String>,
    /// The snapshot this backup was taken from, kept as the base of the next incremental
    /// backup of its volume to this target (one per volume and target).
    #[serde(default)]
    pub base_snapshot: Option<String>,
    /// An incremental backup: bytes of the volume found to differ from the parent (read
    /// and written); null for a full backup.
    #[serde(default)]
    pub changed_bytes: Option<u64>,
    /// How the changes were found: `snapshot-diff` (the storage's own map of what changed
    /// since the parent's snapshot) or `checksums` (everything read, compared with the
    /// parent's checksums); null for a full backup.
    #[serde(default)]
    pub changes_found_by: Option<String>,
    /// The block device a request named (`device=<path>`) that this backup read, as the
    /// request gave it; null for a volume of a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The node that made the backup (`node` in its daemon's configuration); null in
    /// records made before nodes had names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Operators' `user.*` extended attributes of the image (Cinder's backup metadata).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// On a keyed target: `hmac-sha256:<hex>` over every other field
    /// ([`Record::canonical_bytes`]), see `target::auth`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Why this record cannot be trusted (a MAC that does not check, checksums that do not
    /// fit its size), found by the catalogue that read it; such a record is damaged. Never
    /// read from storage (a writer of the target cannot clear it); shown in the mount's
    /// copy of the record; not stored.
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub defect: Option<String>,
}

impl Checksums {
    /// What a catalogue stores for `sums` (encoded by `copy::sums`, under `file`), and the
    /// record's entry for it.
    pub fn encode(
        sums: &[Sum],
        kind: crate::copy::SumKind,
        file: String,
        leaves: Option<String>,
    ) -> (Vec<u8>, Checksums) {
        let bytes = sums::encode_sums(sums);
        let entry = Checksums {
            algorithm: kind.name().to_string(),
            block_size: crate::copy::CHECKSUM_BLOCK,
            blocks: sums.len() as u64,
            file,
            digest: sums::sums_file_digest(&bytes),
            leaves,
            mac: None,
            leaves_mac: None,
        };
        (bytes, entry)
    }

    /// The sums stored as `bytes`, if they are what this entry describes.
    pub fn decode(&self, bytes: &[u8]) -> Option<Vec<Sum>> {
        (sums::sums_file_digest(bytes) == self.digest
            && bytes.len() as u64 == self.blocks * sums::SUM_BYTES as u64)
            .then(|| sums::decode_sums(bytes).collect())
    }
}

impl Record {
    /// Whether start-up recovery or the janitor may have work for this record: it is being
    /// made or deleted, names a temporary or base snapshot, or comes from before records
    /// named their snapshot and nodes had names (its snapshot is looked for by its old
    /// name). Only these are read whole on those rounds.
    pub fn needs_care(&self) -> bool {
        matches!(self.status, Status::Creating | Status::Deleting)
            || self.temporary_snapshot.is_some()
            || self.base_snapshot.is_some()
            || (self.snapshot_used && self.node.is_none())
    }

    /// The scalar fields, as `getfattr` shows them (`user.backupfs.<field>`).
    pub fn scalar_fields(&self) -> Vec<(&'static str, String)> {
        let opt = |v: &Option<String>| v.clone().unwrap_or_default();
        vec![
            ("id", self.id.to_string()),
            ("volume_id", self.volume_id.to_string()),
            ("backend", self.backend.clone()),
            ("pool", self.pool.clone()),
            ("target", self.target.clone()),
            ("status", self.status.as_str().to_string()),
            ("size", self.size.to_string()),
            ("created_at", self.created_at.clone()),
            ("completed_at", opt(&self.completed_at)),
            ("name", opt(&self.name)),
            ("snapshot_used", self.snapshot_used.to_string()),
            (
                "parent_id",
                self.parent_id
                    .as_ref()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
            ),
            ("error", opt(&self.error)),
            ("stored_bytes", self.stored_bytes.to_string()),
            ("verified_at", opt(&self.verified_at)),
        ]
    }

    /// Available, and no verify found it damaged: fit to be a parent, the newest, a
    /// restore's source.
    pub fn is_sound(&self) -> bool {
        self.status == Status::Available && !self.is_damaged()
    }

    /// A verify found damaged blocks, or the record itself cannot be trusted (`defect`).
    pub fn is_damaged(&self) -> bool {
        self.defect.is_some() || self.damaged_blocks.as_ref().is_some_and(|d| !d.is_empty())
    }

    /// What the record's MAC covers: the compact JSON of every field but `mac` and
    /// `defect`, in declaration order (attributes sorted), so every writer makes the same.
    /// None only if it cannot be serialized (strings, numbers and a map with string keys
    /// always can): such a record is never sealed, nor found authentic.
    pub fn canonical_bytes(&self) -> Option<Vec<u8>> {
        let mut fields = self.clone();
        fields.mac = None;
        fields.defect = None;
        serde_json::to_vec(&fields).ok()
    }

    /// The record as the mount shows it (`<id>.json`): pretty JSON and a newline.
    pub fn shown_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).unwrap_or_default();
        bytes.push(b'\n');
        bytes
    }

    pub fn completed_time(&self) -> SystemTime {
        self.completed_at
            .as_deref()
            .or(Some(&self.created_at))
            .and_then(parse_rfc3339)
            .unwrap_or(UNIX_EPOCH)
    }
}

pub use crate::ids::is_backup_id;

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` in UTC. Milliseconds, so that two backups made within one
/// second are still told apart by when they completed (`latest.img` is the newest).
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z` (records carry milliseconds; older ones whole
/// seconds). Strict: digits where digits belong, months and days in range.
pub fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.strip_suffix('Z')?;
    let (whole, fraction) = match text.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (text, None),
    };
    let b = whole.as_bytes();
    if b.len() != 19
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |at: std::ops::Range<usize>| -> Option<i64> {
        let digits = whole.get(at)?;
        digits
            .bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| digits.parse().ok())?
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    let mut time = UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?);
    if let Some(fraction) = fraction {
        if fraction.is_empty() || !fraction.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let digits = &fraction[..fraction.len().min(9)];
        let nanos: u64 = format!("{digits:0<9}").parse().ok()?;
        time += Duration::from_nanos(nanos);
    }
    Some(time)
}

// Howard Hinnant's civil calendar algorithms.
/// The (year, month, day) of a day counted from 1970-01-01; public for `backupfs status`,
/// which shows times as calendar dates.
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = year - i64::from(month <= 2);
    let era = year.div_euclid(400);
    let yoe = year - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_000_000_250);
        let text = rfc3339(t);
        assert_eq!(text, "2026-11-18T11:06:40.250Z");
        assert_eq!(parse_rfc3339(&text), Some(t));
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            parse_rfc3339("2026-11-18T11:06:40Z"),
            Some(UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
            "records of earlier versions have whole seconds"
        );
        assert_eq!(parse_rfc3339("2026-11-18T11:06:40.Z"), None);
        assert_eq!(
            parse_rfc3339("2000-02-29T23:59:59Z"),
            Some(UNIX_EPOCH + Duration::from_secs(951_868_799))
        );
        assert_eq!(parse_rfc3339("2000-02-29 23:59:59"), None);
    }

    #[test]
    fn only_records_that_name_work_need_care() {
        let plain: Record = serde_json::from_value(serde_json::json!({
            "format": 1, "id": "0b6a1f40-64b0-4a7e-9d2a-7f1c3a5e9d10",
            "volume_id": "5f0c2b1e-3a4d-4c6b-8e9f-0a1b2c3d4e5f", "backend": "ssd",
            "pool": "p", "target": "hdd", "status": "available", "size": 4096,
            "created_at": "2026-11-18T11:06:40.250Z", "completed_at": null, "name": null,
            "snapshot_used": true, "parent_id": null, "checksums": null, "error": null,
            "node": "a"
        }))
        .unwrap();
        assert!(!plain.needs_care(), "a finished backup of a named node");
        type Change = fn(&mut Record);
        let cases: [(&str, Change); 6] = [
            ("creating", |r| r.status = Status::Creating),
            ("deleting", |r| r.status = Status::Deleting),
            ("temporary snapshot", |r| {
                r.temporary_snapshot = Some("s".into())
            }),
            ("base snapshot", |r| r.base_snapshot = Some("s".into())),
            ("older record: snapshot only by snapshot_used", |r| {
                r.node = None
            }),
            ("error that still names its snapshot", |r| {
                r.status = Status::Error;
                r.temporary_snapshot = Some("s".into())
            }),
        ];
        for (what, change) in cases {
            let mut record = plain.clone();
            change(&mut record);
            assert!(record.needs_care(), "{what}");
        }
        let mut older_without_snapshot = plain.clone();
        older_without_snapshot.node = None;
        older_without_snapshot.snapshot_used = false;
        assert!(!older_without_snapshot.needs_care());
    }
}
