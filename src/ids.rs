//! Identifiers that carry rules (docs/operating.md, "names"): a value of these types has been
//! checked, so it can reach a driver or a path. Anything else is refused with EINVAL at
//! the edge (the request parser, a lookup in the mount) and never gets this far.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The name rule for volume IDs (and for backend, pool and target names, which become
/// directory names in the mount): 1 to 128 of `[A-Za-z0-9._-]`, starting with a letter
/// or digit.
pub fn is_valid_id(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A backup ID is a UUID the daemon made, in its lowercase hyphenated form.
pub fn is_backup_id(text: &str) -> bool {
    // Checked for every record name of a listing: no string made.
    let mut form = [0; BACKUP_ID_LEN];
    uuid::Uuid::try_parse(text).is_ok_and(|id| *id.hyphenated().encode_lower(&mut form) == *text)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a valid {1}")]
pub struct InvalidId(pub String, pub &'static str);

macro_rules! id_type {
    ($name:ident, $check:path, $what:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(text: &str) -> Result<$name, InvalidId> {
                if $check(text) {
                    Ok($name(text.to_string()))
                } else {
                    Err(InvalidId(text.to_string(), $what))
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(text: String) -> Result<$name, InvalidId> {
                $name::parse(&text)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
    };
}

id_type!(VolumeId, is_valid_id, "volume id");

/// The length of a backup ID (a hyphenated UUID).
const BACKUP_ID_LEN: usize = 36;

/// A backup ID: held in place, not on the heap (a target of 100,000 backups keeps one
/// per backup in its listing and one per inode the kernel holds: issue 28). Otherwise as
/// the other IDs: checked when made, read as a `str`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId([u8; BACKUP_ID_LEN]);

impl BackupId {
    /// A new, random backup ID.
    pub fn new() -> BackupId {
        let mut bytes = [0; BACKUP_ID_LEN];
        uuid::Uuid::new_v4().hyphenated().encode_lower(&mut bytes);
        BackupId(bytes)
    }

    pub fn parse(text: &str) -> Result<BackupId, InvalidId> {
        match <[u8; BACKUP_ID_LEN]>::try_from(text.as_bytes()) {
            Ok(bytes) if is_backup_id(text) => Ok(BackupId(bytes)),
            _ => Err(InvalidId(text.to_string(), "backup id (a UUID)")),
        }
    }

    pub fn as_str(&self) -> &str {
        // ASCII, checked when made.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Debug for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("BackupId").field(&self.as_str()).finish()
    }
}

impl TryFrom<String> for BackupId {
    type Error = InvalidId;
    fn try_from(text: String) -> Result<BackupId, InvalidId> {
        BackupId::parse(&text)
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> String {
        id.as_str().to_string()
    }
}

impl std::ops::Deref for BackupId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for BackupId {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for BackupId {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for BackupId {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Default for BackupId {
    fn default() -> Self {
        BackupId::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_name_rule() {
        assert!(is_valid_id("a"));
        assert!(is_valid_id("0c1e2f3a-aaaa-bbbb-cccc-123456789abc"));
        assert!(is_valid_id("vol_1.raw"));
        assert!(is_valid_id(&"x".repeat(128)));
        assert!(!is_valid_id(&"x".repeat(129)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(".hidden"));
        assert!(!is_valid_id("-x"));
        assert!(!is_valid_id("a/b"));
        assert!(!is_valid_id("../a"));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("é"));
        assert!(!is_valid_id("a\0b"));
    }

    #[test]
    fn backup_ids_are_lowercase_uuids_and_survive_json() {
        let id = BackupId::new();
        assert!(is_backup_id(&id));
        assert!(BackupId::parse("0C1E2F3A-AAAA-4BBB-8CCC-123456789ABC").is_err());
        assert!(BackupId::parse("not-a-uuid").is_err());
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<BackupId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<BackupId>("\"../../etc\"").is_err());
        assert!(serde_json::from_str::<VolumeId>("\"a/b\"").is_err());
        assert_eq!(VolumeId::parse("vol-1").unwrap(), "vol-1");
    }
}
