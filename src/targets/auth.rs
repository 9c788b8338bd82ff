//! The target key and the MAC that makes a target's records authentic: whoever can write
//! the target's storage (an NFS share, a Ceph pool) can replace an image and its xxh3 sums
//! consistently, but cannot make a record, or the sums it names, check against a key that
//! only the nodes serving the target hold. Never logs or prints a key.

use super::record::{Checksums, Record, Status};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

type HmacSha256 = Hmac<Sha256>;

/// How a MAC is written in a record, before its hex digits.
const MAC_PREFIX: &str = "hmac-sha256:";
/// Labels that keep the three things MAC'd apart: a record's MAC never checks as a sums
/// file's, nor one backup's sums as another's.
const RECORD_LABEL: &[u8] = b"backupfs record v1\n";
const SUMS_LABEL: &[u8] = b"backupfs sums v1\n";
const LEAVES_LABEL: &[u8] = b"backupfs leaves v1\n";
/// A key file is one line of 64 hex digits; anything much longer is not one.
const KEY_FILE_MAX: u64 = 256;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists already: a key is never overwritten")]
    Exists { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotRegular { path: PathBuf },
    #[error(
        "{path} has mode {mode:04o}: a key file must not be readable or writable by group or others (chmod 600)"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path} is owned by uid {owner}, not by uid {euid} that runs backupfs")]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "{path} is not a backupfs key (one line of 64 hex digits, as `backupfs keygen` writes)"
    )]
    Format { path: PathBuf },
}

/// A target's 256-bit key. Its `Debug` shows no key material.
pub struct TargetKey {
    bytes: [u8; 32],
}

impl std::fmt::Debug for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TargetKey(..)")
    }
}

/// Writes a new random key to `path`: created exclusively (an existing file, or a link, is
/// never replaced), mode 0600 set on the descriptor, synced with its directory.
pub fn generate(path: &Path) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(KeyError::Exists {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    let write = || -> std::io::Result<()> {
        // The umask may have taken bits away, never added: set exactly 0600 anyway.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        (&file).write_all(format!("{}\n", hex(&bytes)).as_bytes())?;
        file.sync_all()?;
        let dir = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        // Ours (created just now): a half-written key must not be mistaken for one.
        let _ = std::fs::remove_file(path);
        return Err(io(e));
    }
    Ok(())
}

impl TargetKey {
    /// Reads a key file: a regular file of this user's, not readable or writable by
    /// group or others, holding one line of 64 hex digits.
    pub fn load(path: &Path) -> Result<TargetKey, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let (file, meta) = crate::operator_file::open(path).map_err(|e| match e {
            crate::operator_file::OpenError::Io(e) => io(e),
            crate::operator_file::OpenError::NotRegular => KeyError::NotRegular {
                path: path.to_path_buf(),
            },
        })?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != euid {
            return Err(KeyError::Owner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                euid,
            });
        }
        let text = crate::operator_file::read_capped(file, KEY_FILE_MAX)
            .ok()
            .flatten()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(|| KeyError::Format {
                path: path.to_path_buf(),
            })?;
        parse_key(text.trim_end_matches('\n'))
            .map(|bytes| TargetKey { bytes })
            .ok_or_else(|| KeyError::Format {
                path: path.to_path_buf(),
            })
    }

    #[cfg(test)]
    pub(crate) fn from_bytes(bytes: [u8; 32]) -> TargetKey {
        TargetKey { bytes }
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        // Any key length is valid for HMAC: this cannot fail.
        let mut mac = <HmacSha256 as KeyInit>::new_from_slice(&self.bytes)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(label);
        for part in parts {
            // Length-prefixed: no two different splits give the same input.
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }

    fn tag(&self, label: &[u8], parts: &[&[u8]]) -> String {
        format!(
            "{MAC_PREFIX}{}",
            hex(&self.mac(label, parts).finalize().into_bytes())
        )
    }

    /// Whether `text` is the MAC of `parts` (compared in constant time).
    fn checks(&self, label: &[u8], parts: &[&[u8]], text: Option<&str>) -> bool {
        let Some(bytes) = text
            .and_then(|t| t.strip_prefix(MAC_PREFIX))
            .and_then(parse_hex)
        else {
            return false;
        };
        self.mac(label, parts).verify_slice(&bytes).is_ok()
    }

    /// A 256-bit key for one `purpose`, derived from the target key (HMAC-SHA256 of a
    /// label), so that no two uses (MACs of records, names of chunks, their encryption)
    /// share key material.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        self.mac(b"backupfs derived key v1\n", &[purpose.as_bytes()])
            .finalize()
            .into_bytes()
            .into()
    }

    /// The MAC of a backup's sums file (its exact bytes).
    pub fn sums_mac(&self, backup_id: &str, bytes: &[u8]) -> String {
        self.tag(SUMS_LABEL, &[backup_id.as_bytes(), bytes])
    }

    /// The MAC of a backup's leaf-sums file (its exact bytes).
    pub fn leaves_mac(&self, backup_id: &str, bytes: &[u8]) -> String {
        self.tag(LEAVES_LABEL, &[backup_id.as_bytes(), bytes])
    }

    /// Whether `bytes` are the sums the record's checksums name.
    pub fn sums_check(&self, backup_id: &str, checksums: &Checksums, bytes: &[u8]) -> bool {
        self.checks(
            SUMS_LABEL,
            &[backup_id.as_bytes(), bytes],
            checksums.mac.as_deref(),
        )
    }

    /// Whether `bytes` are the leaf sums the record's checksums name.
    pub fn leaves_check(&self, backup_id: &str, checksums: &Checksums, bytes: &[u8]) -> bool {
        self.checks(
            LEAVES_LABEL,
            &[backup_id.as_bytes(), bytes],
            checksums.leaves_mac.as_deref(),
        )
    }
}

/// What a catalogue does with a record it has just read: marks it defective, saying why,
/// if it could hand out unchecked data (see [`shape_defect`]) or, on a keyed target, its
/// MAC is missing or does not check. A defective record is damaged: listed, never served,
/// never a parent.
pub fn inspect(record: &mut Record, key: Option<&TargetKey>) {
    record.defect = shape_defect(record).or_else(|| {
        let key = key?;
        let authentic = |canonical: Option<Vec<u8>>| {
            canonical.is_some_and(|c| key.checks(RECORD_LABEL, &[&c], record.mac.as_deref()))
        };
        match &record.mac {
            None => Some("the record has no MAC: it was not written with the target key".into()),
            Some(_) if !authentic(record.canonical_bytes()) => {
                Some("the record's MAC does not check against the target key".into())
            }
            Some(_) => None,
        }
    });
}

/// What a catalogue writes for `record`: on a keyed target, with its MAC, unless the record
/// was found defective (then without one, so that a rewrite of it, by a verify or an
/// operator's attribute, never makes a forged record authentic); `defect` is not stored.
pub fn prepare(record: &Record, key: Option<&TargetKey>) -> Record {
    let mut written = record.clone();
    written.defect = None;
    written.mac = None;
    if let Some(key) = key
        && record.defect.is_none()
        && shape_defect(record).is_none()
    {
        written.mac = written
            .canonical_bytes()
            .map(|canonical| key.tag(RECORD_LABEL, &[&canonical]));
    }
    written
}

/// Why a record, whatever the key, cannot be trusted to check what it serves: an
/// `available` one without checksums, or whose checksums are not one per 1 MiB block of
/// its size.
pub fn shape_defect(record: &Record) -> Option<String> {
    match &record.checksums {
        None if record.status == Status::Available => {
            Some("the record is available but names no checksums".into())
        }
        None => None,
        Some(c) if c.block_size != crate::copy::CHECKSUM_BLOCK => Some(format!(
            "the record's checksums have blocks of {} bytes, not {}",
            c.block_size,
            crate::copy::CHECKSUM_BLOCK
        )),
        Some(c) if c.blocks != record.size.div_ceil(crate::copy::CHECKSUM_BLOCK) => Some(format!(
            "the record names {} checksums for {} bytes ({} blocks)",
            c.blocks,
            record.size,
            record.size.div_ceil(crate::copy::CHECKSUM_BLOCK)
        )),
        Some(_) => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn parse_key(text: &str) -> Option<[u8; 32]> {
    parse_hex(text)?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{BackupId, VolumeId};

    fn record() -> Record {
        let sums = [7u64, 0, 9];
        let (_, checksums) = Checksums::encode(
            &sums,
            crate::copy::SumKind::CURRENT,
            "backup-x.sums".to_string(),
            None,
        );
        Record {
            format: 1,
            id: BackupId::parse("0c1e2f3a-aaaa-4bbb-8ccc-123456789abc").unwrap(),
            volume_id: VolumeId::parse("1c1e2f3a-aaaa-4bbb-8ccc-123456789abc").unwrap(),
            backend: "hdd".into(),
            pool: "main".into(),
            target: "t".into(),
            status: Status::Available,
            size: 3 << 20,
            created_at: "2026-11-18T11:06:40.250Z".into(),
            completed_at: None,
            name: None,
            snapshot_used: false,
            parent_id: None,
            checksums: Some(checksums),
            error: None,
            stored_bytes: 0,
            verified_at: None,
            damaged_blocks: None,
            temporary_snapshot: None,
            base_snapshot: None,
            changed_bytes: None,
            changes_found_by: None,
            device: None,
            node: None,
            xattrs: Default::default(),
            mac: None,
            defect: None,
        }
    }

    #[test]
    fn a_key_is_64_hex_digits_and_nothing_else() {
        assert_eq!(parse_key(&"ab".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_key(&"AB".repeat(32)), Some([0xab; 32]));
        assert_eq!(parse_key(&"ab".repeat(31)), None);
        assert_eq!(parse_key(&"ab".repeat(33)), None);
        assert_eq!(parse_key(&format!("{}a", "ab".repeat(31))), None);
        // `from_str_radix` takes a sign: "+f" is 15 to it, and no hex digit here.
        assert_eq!(parse_key(&"+f".repeat(32)), None);
        assert_eq!(parse_key(&"zz".repeat(32)), None);
        assert_eq!(parse_hex("+f"), None);
    }

    #[test]
    fn a_keys_debug_shows_no_key_material() {
        let key = TargetKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{key:?}"), "TargetKey(..)");
    }

    #[test]
    fn a_sealed_record_checks_and_any_change_or_other_key_does_not() {
        let key = TargetKey::from_bytes([1; 32]);
        let mut read = prepare(&record(), Some(&key));
        assert!(read.mac.as_deref().unwrap().starts_with("hmac-sha256:"));
        inspect(&mut read, Some(&key));
        assert_eq!(read.defect, None);

        let mut edited = prepare(&record(), Some(&key));
        edited.size += 1;
        edited.checksums.as_mut().unwrap().blocks = 4;
        inspect(&mut edited, Some(&key));
        assert!(edited.defect.unwrap().contains("does not check"));

        let mut other = prepare(&record(), Some(&TargetKey::from_bytes([2; 32])));
        inspect(&mut other, Some(&key));
        assert!(other.defect.is_some());

        let mut unkeyed = prepare(&record(), None);
        assert_eq!(unkeyed.mac, None);
        inspect(&mut unkeyed, Some(&key));
        assert!(unkeyed.defect.unwrap().contains("no MAC"));
    }

    #[test]
    fn a_defective_record_is_never_sealed_by_a_rewrite() {
        let key = TargetKey::from_bytes([1; 32]);
        let mut forged = record();
        inspect(&mut forged, Some(&key));
        assert!(forged.defect.is_some());
        forged.verified_at = Some("2026-11-18T11:06:40.250Z".into());
        let mut written = prepare(&forged, Some(&key));
        assert_eq!(written.mac, None);
        inspect(&mut written, Some(&key));
        assert!(written.defect.is_some());
    }

    #[test]
    fn records_that_could_serve_unchecked_data_are_defective_without_a_key() {
        let mut none = record();
        none.checksums = None;
        inspect(&mut none, None);
        assert!(none.defect.unwrap().contains("no checksums"));

        let mut creating = record();
        creating.checksums = None;
        creating.status = Status::Creating;
        inspect(&mut creating, None);
        assert_eq!(creating.defect, None);

        let mut short = record();
        short.size = (3 << 20) + 1;
        inspect(&mut short, None);
        assert!(short.defect.unwrap().contains("3 checksums"));

        let mut big_blocks = record();
        big_blocks.checksums.as_mut().unwrap().block_size = 4 << 20;
        big_blocks.size = 12 << 20;
        inspect(&mut big_blocks, None);
        assert!(big_blocks.defect.is_some());
        // Blocks of another size, even where their count fits the size in 1 MiB blocks.
        let mut other_blocks = record();
        other_blocks.checksums.as_mut().unwrap().block_size = 4 << 20;
        inspect(&mut other_blocks, None);
        assert!(
            other_blocks
                .defect
                .as_deref()
                .is_some_and(|d| d.contains("blocks of 4194304 bytes")),
            "{:?}",
            other_blocks.defect
        );

        let mut fine = record();
        inspect(&mut fine, None);
        assert_eq!(fine.defect, None);
    }

    #[test]
    fn sums_macs_bind_bytes_and_backup() {
        let key = TargetKey::from_bytes([3; 32]);
        let mut checksums = record().checksums.unwrap();
        checksums.mac = Some(key.sums_mac("a", b"12345678"));
        assert!(key.sums_check("a", &checksums, b"12345678"));
        assert!(!key.sums_check("a", &checksums, b"12345679"));
        assert!(!key.sums_check("b", &checksums, b"12345678"));
        assert!(!key.leaves_check("a", &checksums, b"12345678"));
        checksums.mac = None;
        assert!(!key.sums_check("a", &checksums, b"12345678"));

        // Leaf sums the same way, under a label of their own.
        checksums.leaves_mac = Some(key.leaves_mac("a", b"leaves.."));
        assert!(key.leaves_check("a", &checksums, b"leaves.."));
        assert!(!key.leaves_check("a", &checksums, b"leaves.!"));
        assert!(!key.leaves_check("b", &checksums, b"leaves.."));
        checksums.mac = checksums.leaves_mac.clone();
        assert!(!key.sums_check("a", &checksums, b"leaves.."));
        assert_ne!(
            key.leaves_mac("a", b"leaves.."),
            key.sums_mac("a", b"leaves..")
        );
    }

    #[test]
    fn keygen_writes_a_0600_key_that_loads_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.key");
        generate(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        TargetKey::load(&path).unwrap();
        assert!(matches!(generate(&path), Err(KeyError::Exists { .. })));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        // A link at the name is not followed: its target is not written.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "x").unwrap();
        let link = dir.path().join("link.key");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(generate(&link).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "x");
        // A directory that is not there is an I/O error, not a key that exists.
        assert!(matches!(
            generate(&dir.path().join("missing").join("t.key")),
            Err(KeyError::Io { .. })
        ));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            TargetKey::load(&path),
            Err(KeyError::Exposed { mode: 0o644, .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(matches!(
            TargetKey::load(&path),
            Err(KeyError::Format { .. })
        ));
        assert!(matches!(
            TargetKey::load(dir.path()),
            Err(KeyError::NotRegular { .. })
        ));
        // A FIFO planted at the key's path is refused at once, never waited on.
        let fifo = dir.path().join("fifo.key");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            TargetKey::load(&fifo),
            Err(KeyError::NotRegular { .. })
        ));
    }
}
