//! The state directory's lock: one daemon per `state_dir`, and what a refused start
//! says about the daemon that holds it (`serving <mountpoint>`, checked against
//! /proc/self/mounts).

use super::{EngineError, Result};
use crate::config::Config;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

/// How long a start waits for the state lock held by another backupfs: one that was
/// just unmounted takes a moment to exit and let go.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Takes an exclusive flock on `file`, waiting up to 10 s (and saying so) while another
/// process holds it; None if it is still held then.
fn lock_waiting(file: File, path: &Path) -> Option<nix::fcntl::Flock<File>> {
    use nix::fcntl::{Flock, FlockArg};
    let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(locked) => return Some(locked),
        Err((file, _)) => file,
    };
    tracing::warn!(
        "{} is held by another backupfs (one that is still stopping?): waiting up to {} s",
        path.display(),
        LOCK_WAIT.as_secs()
    );
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => return Some(locked),
            Err((file, _)) => file,
        };
    }
    None
}

pub(super) fn take_state_lock(config: &Config) -> Result<nix::fcntl::Flock<File>> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| {
        EngineError::io(
            format!("create state_dir {}", config.state_dir.display()),
            source,
        )
    })?;
    let lock_path = config.state_dir.join("backupfs.lock");
    // Never a link (it would have us truncate and write whatever it names) nor anything
    // but a regular file (a FIFO would hang the start): checked on what was opened.
    let state_lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(&lock_path)
        .and_then(|file| match file.metadata()?.file_type().is_file() {
            true => Ok(file),
            false => Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        })
        .map_err(|source| EngineError::io(format!("open {}", lock_path.display()), source))?;
    // A holder that still serves its mount is not about to let go: refused at once. The
    // wait below is for one that is stopping (right after an `umount`).
    if let Some(mountpoint) = serving_holder(&state_lock) {
        return Err(EngineError::Busy(format!(
            "state_dir {} is in use by the backupfs serving {mountpoint} (lock {})",
            config.state_dir.display(),
            lock_path.display()
        )));
    }
    let Some(state_lock) = lock_waiting(state_lock, &lock_path) else {
        return Err(EngineError::Busy(format!(
            "state_dir {} is in use by another backupfs (lock {})",
            config.state_dir.display(),
            lock_path.display()
        )));
    };
    // What an earlier holder wrote is not ours to keep.
    let _ = state_lock.set_len(0);
    Ok(state_lock)
}

/// What a serving daemon writes into the lock file, before its mountpoint.
pub(super) const SERVING: &str = "serving ";

/// The mountpoint that the backupfs holding the state lock wrote into it, if that process
/// still holds the lock and the mountpoint is still a backupfs mount.
fn serving_holder(lock: &File) -> Option<String> {
    let mut text = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(lock, 4096), &mut text).ok()?;
    let mountpoint = text.strip_prefix(SERVING)?.strip_suffix('\n')?.to_string();
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|mounts| is_backupfs_mount(&mounts, &mountpoint));
    // A lock we can take is held by nobody: the holder is gone, whatever it wrote.
    let held = nix::fcntl::Flock::lock(
        lock.try_clone().ok()?,
        nix::fcntl::FlockArg::LockExclusiveNonblock,
    )
    .is_err();
    (mounted && held).then_some(mountpoint)
}

/// Whether /proc/self/mountinfo (`mounts`) lists a backupfs mount at `mountpoint`.
pub(super) fn is_backupfs_mount(mounts: &str, mountpoint: &str) -> bool {
    mounts.lines().any(|line| {
        let mut halves = line.splitn(2, " - ");
        let (Some(ours), Some(theirs)) = (halves.next(), halves.next()) else {
            return false;
        };
        let mut fields = theirs.split(' ');
        let (fstype, source) = (fields.next(), fields.next());
        // Mounted by root without fusermount, the subtype is not shown: `fuse backupfs`.
        ours.split(' ').nth(4).map(unescape_octal).as_deref() == Some(mountpoint)
            && matches!(fstype, Some("fuse" | "fuse.backupfs"))
            && source == Some("backupfs")
    })
}

/// mountinfo's escapes (`\040` for a space, ...).
pub(super) fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], code) {
            (b'\\', Some(code)) => {
                out.push(code);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
