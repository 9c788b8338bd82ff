//! The names of the snapshots backupfs makes on volumes, in one place: which forms it
//! makes, and whether a name (read from a record, which others may write) is one of
//! them. A driver deletes only names this module recognises; it never deletes by a
//! name it was merely handed.

use crate::ids::is_backup_id;

/// The form of every driver until Cinder-style names came (and still that of file and
/// qcow2 pools, where snapshots are files beside the volume):
/// `snapshot-backupfs-<backup-id>`.
pub const LEGACY_PREFIX: &str = "snapshot-backupfs-";

/// `snapshot-backupfs-<backup-id>`.
pub fn legacy(backup_id: &str) -> String {
    format!("{LEGACY_PREFIX}{backup_id}")
}

/// `backup.<backup-id>.snap.<unix-seconds>`: the form of Cinder's Ceph backup driver
/// (`backup_snapshot_name_pattern`), which Cinder's RBD volume driver removes before it
/// deletes a volume. Cinder's own are `time.time()`, a float (`.snap.1733550000.12`);
/// ours are whole seconds, so the two never take each other's name.
pub fn cinder_style(backup_id: &str, unix_seconds: u64) -> String {
    format!("backup.{backup_id}.snap.{unix_seconds}")
}

/// The backup ID a snapshot name of one of backupfs' forms carries; None for any other
/// name (a Cinder snapshot, one of Cinder's backup driver's, an operator's).
pub fn backup_id_of(name: &str) -> Option<&str> {
    if let Some(id) = name.strip_prefix(LEGACY_PREFIX) {
        return is_backup_id(id).then_some(id);
    }
    let (id, seconds) = name.strip_prefix("backup.")?.split_once(".snap.")?;
    let whole_seconds =
        (1..=20).contains(&seconds.len()) && seconds.bytes().all(|b| b.is_ascii_digit());
    (is_backup_id(id) && whole_seconds).then_some(id)
}

/// Whether `name` is a snapshot name backupfs makes.
pub fn is_ours(name: &str) -> bool {
    backup_id_of(name).is_some()
}

/// `NotOurSnapshot` for a name backupfs does not make: what a driver's
/// `delete_snapshot` checks first (the caller logs the refusal).
pub fn refuse_foreign(name: &str) -> super::Result<()> {
    if is_ours(name) {
        Ok(())
    } else {
        Err(super::VolumeError::NotOurSnapshot(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0c1e2f3a-aaaa-4bbb-8ccc-123456789abc";

    /// Cinder's `^backup\.([a-z0-9\-]+?)\.snap\.(.+)$`, by hand (no regex crate here).
    fn cinder_recognises(name: &str) -> bool {
        name.strip_prefix("backup.")
            .and_then(|rest| rest.split_once(".snap."))
            .is_some_and(|(id, stamp)| {
                !id.is_empty()
                    && id
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !stamp.is_empty()
            })
    }

    #[test]
    fn cinder_style_names_are_ours_and_cinders_rbd_driver_deletes_them() {
        let name = cinder_style(ID, 1_733_550_000);
        assert_eq!(name, format!("backup.{ID}.snap.1733550000"));
        assert!(cinder_recognises(&name));
        assert_eq!(backup_id_of(&name), Some(ID));
        assert_eq!(backup_id_of(&legacy(ID)), Some(ID));
    }

    #[test]
    fn names_backupfs_does_not_make_are_not_ours() {
        for name in [
            // Cinder's Ceph backup driver: time.time() is a float.
            format!("backup.{ID}.snap.1733550000.123456"),
            format!("backup.{ID}.snap."),
            format!("backup.{ID}.snap.-1"),
            format!("backup.{}.snap.1", ID.to_uppercase()),
            "backup.x.snap.1".to_string(),
            format!("snapshot-{ID}"),
            "snapshot-backupfs-../../etc/shadow".to_string(),
            "snapshot-backupfs-x".to_string(),
            format!("snapshot-backupfs-{ID}.x"),
            format!("backup.{ID}.snap.{}", "1".repeat(21)),
            "snap1".to_string(),
            String::new(),
        ] {
            assert!(!is_ours(&name), "{name}");
        }
    }
}
