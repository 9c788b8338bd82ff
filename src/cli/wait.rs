//! `backupfs wait`: polls the mount until a backup has ended and says how in its exit
//! status, for scripts that queued a backup without `wait`. It reads only the mounted tree
//! (`jobs`, the records) and never writes to it.

use std::path::Path;
use std::time::{Duration, Instant};

use backupfs::ids::is_backup_id;

use super::emit;
use super::mount::{Mount, MountError};

/// How often `wait` looks at the mount.
const POLL: Duration = Duration::from_millis(200);

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

/// `wait`'s exit statuses, as documented in its help and docs/operating.md.
pub mod exit {
    pub const AVAILABLE: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const MALFORMED_ID: u8 = 2;
    pub const NO_SUCH_BACKUP: u8 = 3;
    pub const TIMED_OUT: u8 = 4;
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
