//! An export directory's files: which names are an export's (its lock, each export's
//! mountpoint, pidfile and log), removing them, and cleaning the directories of daemons
//! that are gone (their lock free: their qsd stopped, mounts detached, files removed).
//! It removes nothing but those names, and never a directory whose lock is held.

use super::{EXPORT_PREFIX, LOCK_FILE, QSD, SETUP_GRACE};
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, info, warn};

/// Cleans the directories of daemons that are gone (their lock is free): stops their
/// qsd processes, detaches their export mounts, removes the files.
pub(super) fn clean_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if name.starts_with('.') {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > SETUP_GRACE);
            if !old {
                continue;
            }
        }
        let held = File::open(path.join(LOCK_FILE))
            .ok()
            .is_some_and(|lock| flock_nb(lock).is_err());
        if held {
            continue;
        }
        let mut cleaned = 0;
        if let Ok(files) = std::fs::read_dir(&path) {
            for file in files.flatten() {
                let file_name = file.file_name().to_string_lossy().into_owned();
                if file_name.starts_with(EXPORT_PREFIX) && !file_name.contains('.') {
                    let mountpoint = file.path();
                    stop_stale_qsd(&with_suffix(&mountpoint, ".pid"));
                    detach_mount(&mountpoint);
                    cleaned += 1;
                }
            }
        }
        match remove_export_dir(&path) {
            Ok(()) => info!(
                "removed {} left by a backupfs that is gone ({cleaned} qcow2 exports)",
                path.display()
            ),
            Err(e) => warn!(
                "cleaned the qcow2 exports left in {} by a backupfs that is gone ({cleaned}), but kept the directory: {e}",
                path.display()
            ),
        }
    }
}

/// A crashed daemon's qsd (normally gone already: it gets SIGTERM when the daemon dies).
/// qsd holds a lock on its pidfile while it runs, which names it reliably.
fn stop_stale_qsd(pidfile: &Path) {
    let Ok(file) = File::open(pidfile) else {
        return;
    };
    let Some(pid) = posix_lock_holder(&file) else {
        return;
    };
    warn!("stopping {QSD} pid {pid} left by a backupfs that is gone");
    // The pid holds the pidfile's lock, so it is that qsd.
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let started = Instant::now();
    while posix_lock_holder(&file) == Some(pid) {
        if started.elapsed() > Duration::from_secs(10) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid holding a POSIX lock on `file` (qemu's pidfile lock is one).
fn posix_lock_holder(file: &File) -> Option<libc::pid_t> {
    let mut lock = libc::flock {
        l_type: libc::F_WRLCK as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    let got = nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETLK(&mut lock));
    (got.is_ok() && lock.l_type != libc::F_UNLCK as i16 && lock.l_pid > 0).then_some(lock.l_pid)
}

/// `file` locked (flock, exclusive), or the error at once if another holds it.
pub(super) fn flock_nb(file: File) -> std::io::Result<Flock<File>> {
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| e.into())
}

/// Lazily unmounts whatever is mounted on `path`; nothing mounted is fine.
pub(super) fn detach_mount(path: &Path) {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) => debug!("detached the export mount {}", path.display()),
        Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => warn!("cannot detach the export mount {}: {e}", path.display()),
    }
}

/// Whether `name` is a file an export directory's owner makes: its lock, and each
/// export's mountpoint, pidfile and log.
fn is_export_file(name: &str) -> bool {
    if name == LOCK_FILE {
        return true;
    }
    let Some(rest) = name.strip_prefix(EXPORT_PREFIX) else {
        return false;
    };
    let number = rest
        .strip_suffix(".pid")
        .or_else(|| rest.strip_suffix(".log"))
        .unwrap_or(rest);
    !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())
}

/// Removes an export directory: the files backupfs made in it, then the directory. A file
/// someone else put there stays, and so does the directory (the error names the files).
pub(super) fn remove_export_dir(dir: &Path) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut foreign = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if is_export_file(&name) && entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::remove_file(entry.path())?;
        } else {
            foreign.push(name);
        }
    }
    if !foreign.is_empty() {
        return Err(std::io::Error::other(format!(
            "it holds files backupfs did not make: {}",
            foreign.join(", ")
        )));
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

pub(super) fn remove_files(mountpoint: &Path) {
    for path in [
        mountpoint.to_path_buf(),
        with_suffix(mountpoint, ".pid"),
        with_suffix(mountpoint, ".log"),
    ] {
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!("cannot remove {}: {e}", path.display()),
        }
    }
}

pub(super) fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The first 4 KiB of a qsd log, for error messages.
pub(super) fn read_log(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(file) = File::open(path) {
        let _ = file.take(4096).read_to_string(&mut text);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_export_files_are_ours() {
        for ours in ["lock", "export-0", "export-12.pid", "export-7.log"] {
            assert!(is_export_file(ours), "{ours}");
        }
        for theirs in [
            "export-",
            "export-a",
            "export-1.txt",
            "notes",
            "export-1.pid.bak",
        ] {
            assert!(!is_export_file(theirs), "{theirs}");
        }
    }
}
