//! Operators' notes on a backup: `user.*` extended attributes of its image (other than the
//! record's own `user.backupfs.*`), kept in the record so they travel with the target and
//! a second node sees them. Cinder's backup metadata is kept this way.

use super::*;
use crate::ids::BackupId;
use crate::targets::record::Status;

/// Room for all of a backup's attributes together (the record stays small).
const XATTRS_MAX: usize = 256 << 10;

/// What a name or value takes in the record's JSON, escapes included (quotes not): the
/// limit holds for the record as stored, or text within it could make a record larger
/// than the catalogue reads back (a control character takes six bytes there), leaving
/// the backup unreadable.
fn stored_len(text: &str) -> usize {
    serde_json::to_string(text).map_or(usize::MAX, |json| json.len().saturating_sub(2))
}

/// setxattr's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrMode {
    Any,
    /// Fails if the attribute exists.
    Create,
    /// Fails if it does not.
    Replace,
}

impl Inner {
    pub(super) fn set_xattr(
        &self,
        target_name: &str,
        backup_id: &BackupId,
        name: &str,
        value: Option<String>,
        mode: XattrMode,
    ) -> Result<()> {
        let target = self.target(target_name)?;
        let _updating = self.updating(target.as_ref(), backup_id)?;
        let mut record = target.record(backup_id)?;
        if record.status != Status::Available {
            return Err(EngineError::NotFound(format!(
                "backup {backup_id} is {}",
                record.status.as_str()
            )));
        }
        let exists = record.xattrs.contains_key(name);
        match (&value, mode, exists) {
            (Some(_), XattrMode::Create, true) => {
                return Err(EngineError::Exists(format!("{name} is set already")));
            }
            (Some(_), XattrMode::Replace, false) | (None, _, false) => {
                return Err(EngineError::NoAttribute(format!("{name} is not set")));
            }
            _ => {}
        }
        match value {
            Some(value) => {
                let others = record
                    .xattrs
                    .iter()
                    .filter(|(k, _)| k.as_str() != name)
                    .fold(0usize, |sum, (k, v)| {
                        sum.saturating_add(stored_len(k))
                            .saturating_add(stored_len(v))
                    });
                let total = others
                    .saturating_add(stored_len(name))
                    .saturating_add(stored_len(&value));
                if total > XATTRS_MAX {
                    return Err(EngineError::NoSpace(format!(
                        "a backup's attributes hold at most {XATTRS_MAX} bytes together"
                    )));
                }
                record.xattrs.insert(name.to_string(), value);
            }
            None => {
                record.xattrs.remove(name);
            }
        }
        target.write_record(&record)?;
        info!(
            backup_target = target_name,
            backup_id = %backup_id,
            name,
            "attribute of backup updated"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_len_counts_json_escapes() {
        assert_eq!(stored_len("plain text"), 10);
        assert_eq!(stored_len("\u{1}"), 6);
        assert_eq!(stored_len("\"\\"), 4);
        assert_eq!(stored_len("é"), 2);
    }
}
