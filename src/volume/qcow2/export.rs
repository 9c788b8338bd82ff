//! qemu-storage-daemon FUSE exports: the guest-visible raw contents of a qcow2 image as a
//! regular file under the runtime directory. Each daemon owns a directory there, held by
//! a lock; a directory whose lock is free is a crashed daemon's and is cleaned at start.
//! An export never outlives its attachments: dropping the last one stops qsd and unmounts.
//! qsd gets the image as a descriptor backupfs opened and checked, with its format and
//! `backing: null` pinned, and no export is used before qsd is seen to hold no other file.

mod files;
mod qsd;

pub use qsd::{hand_over, handed_over};

use files::{
    clean_stale, detach_mount, flock_nb, read_log, remove_export_dir, remove_files, with_suffix,
};
use nix::fcntl::Flock;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use parking_lot::{Condvar, Mutex};
use qsd::{foreign_files, id, qsd_args, spawn_tied};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

pub const QSD: &str = "qemu-storage-daemon";

/// How long qsd may take to mount its export, and to stop.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// A daemon's directory still being set up (not yet locked and renamed into place) is
/// left alone this long by other daemons' clean-up.
const SETUP_GRACE: Duration = Duration::from_secs(60);
const LOCK_FILE: &str = "lock";
const EXPORT_PREFIX: &str = "export-";

/// Why an export could not be had.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// qsd opened a file besides the image: the header it read was not the one backupfs
    /// checked. It was stopped before anything read or wrote through it.
    #[error("{0}")]
    Foreign(String),
}

/// Where exports are mounted: systemd's RuntimeDirectory when set, else /run/backupfs.
pub fn runtime_base() -> PathBuf {
    std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/backupfs"))
        .join("qcow2-exports")
}

/// How an image is exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub writable: bool,
    /// qsd reads the image with O_DIRECT (a backup's one pass: no page cache churn).
    pub direct: bool,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    /// qsd is being started for this key; others wait for it.
    Starting,
    Live,
}

/// An export's key: the canonical image path and whether it is writable.
type Key = (PathBuf, bool);

/// The exports of this daemon.
pub struct Exports {
    dir: PathBuf,
    dir_dev: u64,
    _lock: Flock<File>,
    next: AtomicU64,
    slots: Mutex<HashMap<Key, (Slot, Weak<Export>)>>,
    changed: Condvar,
}

/// One running qsd exporting one image; stopped when dropped.
pub struct Export {
    exports: Arc<Exports>,
    key: Key,
    pub mountpoint: PathBuf,
    child: Mutex<Child>,
}

impl Exports {
    /// This daemon's export directory under `base`, after cleaning what crashed daemons
    /// left there. One per process: every qcow2 backend shares it.
    pub fn open(base: &Path) -> std::io::Result<Arc<Exports>> {
        let mut instance = INSTANCE.lock();
        if let Some(exports) = instance.upgrade() {
            return Ok(exports);
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(base)?;
        clean_stale(base);
        let pid = std::process::id();
        // Made under a hidden name and renamed once locked, so no other daemon's clean-up
        // can take it for a crashed daemon's while it is being set up.
        let setup = base.join(format!(".{pid}.setup"));
        let _ = remove_export_dir(&setup);
        std::fs::DirBuilder::new().mode(0o700).create(&setup)?;
        let lock = flock_nb(
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(setup.join(LOCK_FILE))?,
        )?;
        let dir = base.join(pid.to_string());
        if let Err(e) = std::fs::rename(&setup, &dir) {
            let _ = remove_export_dir(&setup);
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot take {}: {e}", dir.display()),
            ));
        }
        let dir_dev = std::fs::metadata(&dir)?.dev();
        let exports = Arc::new(Exports {
            dir,
            dir_dev,
            _lock: lock,
            next: AtomicU64::new(0),
            slots: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
        });
        *instance = Arc::downgrade(&exports);
        info!(
            "qcow2 exports: at most {} running at once (docs/operating.md, \"limits\")",
            live_cap()
        );
        static AT_EXIT: std::sync::Once = std::sync::Once::new();
        // SAFETY: registers a plain function; it runs once, at exit.
        AT_EXIT.call_once(|| unsafe {
            libc::atexit(remove_dir_at_exit);
        });
        Ok(exports)
    }

    /// An export of `image` fit for `mode`: a running one when there is one (a writable
    /// export also serves readers, who then see what the writer wrote), else a new qsd.
    /// `file` is the image, opened by backupfs and its header checked; `image` its name.
    pub fn get(
        self: &Arc<Exports>,
        image: &Path,
        file: &File,
        mode: Mode,
    ) -> Result<Arc<Export>, ExportError> {
        let key = (image.to_path_buf(), mode.writable);
        let fits: &[bool] = if mode.writable {
            &[true]
        } else {
            &[true, false]
        };
        {
            let mut slots = self.slots.lock();
            loop {
                let mut wait = false;
                for &writable in fits {
                    match slots.get(&(image.to_path_buf(), writable)) {
                        Some((Slot::Live, weak)) => match weak.upgrade() {
                            Some(export) => return Ok(export),
                            // Stopping: a new qsd could not take the image's locks yet.
                            None => wait = true,
                        },
                        Some((Slot::Starting, _)) => wait = true,
                        None => {}
                    }
                }
                if !wait {
                    break;
                }
                self.changed.wait(&mut slots);
            }
            room_for_another(slots.len(), live_cap())?;
            slots.insert(key.clone(), (Slot::Starting, Weak::new()));
        }
        let started = self.start(image, file, mode);
        let mut slots = self.slots.lock();
        match &started {
            Ok(export) => {
                slots.insert(key, (Slot::Live, Arc::downgrade(export)));
            }
            Err(_) => {
                slots.remove(&key);
            }
        }
        self.changed.notify_all();
        started
    }

    /// Whether a qsd of ours has `image` open for writing (and so holds its locks).
    pub fn holds_writable(&self, image: &Path) -> bool {
        self.slots.lock().contains_key(&(image.to_path_buf(), true))
    }

    fn start(
        self: &Arc<Exports>,
        image: &Path,
        file: &File,
        mode: Mode,
    ) -> Result<Arc<Export>, ExportError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mountpoint = self.dir.join(format!("{EXPORT_PREFIX}{n}"));
        let pidfile = with_suffix(&mountpoint, ".pid");
        let log_path = with_suffix(&mountpoint, ".log");
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&mountpoint)?;
        let log = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)?;
        // What qsd may hold besides the image: its log and its pidfile.
        let log_id = id(&log.metadata()?);
        let mut command = Command::new(QSD);
        command
            .args(qsd_args(&handed_over(file), &mountpoint, &pidfile, mode))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        hand_over(&mut command, file);
        let child = match spawn_tied(command) {
            Ok(child) => child,
            Err(e) => {
                remove_files(&mountpoint);
                return Err(
                    std::io::Error::new(e.kind(), format!("cannot start {QSD}: {e}")).into(),
                );
            }
        };
        // From here the export's Drop stops qsd and removes the files, also on errors.
        let export = Arc::new(Export {
            exports: self.clone(),
            key: (image.to_path_buf(), mode.writable),
            mountpoint,
            child: Mutex::new(child),
        });
        let started = Instant::now();
        loop {
            match std::fs::metadata(&export.mountpoint) {
                Ok(meta) if meta.dev() != self.dir_dev => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {}
                Err(e) => return Err(e.into()),
            }
            if let Some(status) = export.child.lock().try_wait()? {
                return Err(std::io::Error::other(format!(
                    "{QSD} for {} exited ({status}) before its export was mounted: {}",
                    image.display(),
                    read_log(&log_path).trim()
                ))
                .into());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "{QSD} did not mount the export of {} within {}s: {}",
                        image.display(),
                        START_TIMEOUT.as_secs(),
                        read_log(&log_path).trim()
                    ),
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // qsd opened every file of its block graph before it mounted the export. A header
        // rewritten between backupfs' check and qsd's read could have named one (a data
        // file cannot be pinned away: QEMU refuses the option on an image without one):
        // such an export is stopped (its Drop) before anyone reads or writes through it.
        let allowed = [
            id(&file.metadata()?),
            log_id,
            id(&std::fs::metadata(&pidfile)?),
        ];
        let foreign = foreign_files(export.child.lock().id(), &allowed)?;
        if !foreign.is_empty() {
            return Err(ExportError::Foreign(format!(
                "{QSD} exporting {} opened {} besides the image: its qcow2 header changed after backupfs checked it; export stopped unused",
                image.display(),
                foreign.join(", ")
            )));
        }
        debug!(
            image = %image.display(),
            mountpoint = %export.mountpoint.display(),
            writable = mode.writable,
            "qcow2 export started"
        );
        Ok(export)
    }
}

impl Drop for Exports {
    fn drop(&mut self) {
        // Every export holds an Arc of this: none is left. The lock goes with the file.
        if let Err(e) = remove_export_dir(&self.dir) {
            warn!("cannot remove {}: {e}", self.dir.display());
        }
    }
}

/// This process's exports, while a driver uses them.
static INSTANCE: Mutex<Weak<Exports>> = Mutex::new(Weak::new());

/// The daemon exits without dropping its engine (and so its drivers): the export
/// directory goes here when no export is left in it; otherwise the next start cleans it.
extern "C" fn remove_dir_at_exit() {
    let Some(instance) = INSTANCE.try_lock() else {
        return;
    };
    if let Some(exports) = instance.upgrade()
        && exports
            .slots
            .try_lock()
            .is_some_and(|slots| slots.is_empty())
    {
        let _ = remove_export_dir(&exports.dir);
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        let mut child = self.child.lock();
        let pid = Pid::from_raw(child.id() as libc::pid_t);
        // SIGTERM: qsd flushes the image (its qcow2 metadata caches) and unmounts. Our own
        // child, not yet reaped: the pid is still its.
        let _ = kill(pid, Signal::SIGTERM);
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if started.elapsed() < STOP_TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Ok(None) => {
                    error!(
                        "{QSD} exporting {} did not stop within {}s: killing it; the image may need `qemu-img check -r leaks`",
                        self.key.0.display(),
                        STOP_TIMEOUT.as_secs()
                    );
                    let _ = child.kill();
                    break child.wait().ok();
                }
                Err(e) => {
                    error!("cannot wait for {QSD} (pid {pid}): {e}");
                    break None;
                }
            }
        };
        drop(child);
        let log = read_log(&with_suffix(&self.mountpoint, ".log"));
        match status {
            Some(status) if status.success() => {}
            _ => warn!(
                "{QSD} exporting {} ended with {status:?}: {}",
                self.key.0.display(),
                log.trim()
            ),
        }
        // qsd unmounts when it stops; a mount left by one that was killed goes here.
        detach_mount(&self.mountpoint);
        remove_files(&self.mountpoint);
        let mut slots = self.exports.slots.lock();
        if let Some((_, weak)) = slots.get(&self.key)
            && std::ptr::eq(weak.as_ptr(), self)
        {
            slots.remove(&self.key);
        }
        self.exports.changed.notify_all();
    }
}

/// Descriptors kept back for everything but exports (the same reserve as the FUSE
/// layer's open-file caps, docs/operating.md, "limits").
const RESERVED_DESCRIPTORS: u64 = 256;
/// Exports running at once, at most: each is a qemu-storage-daemon process.
const MAX_LIVE_EXPORTS: usize = 64;

/// How many exports may run at once: one per 16 spare descriptors of RLIMIT_NOFILE (an
/// export holds a few of ours, and a process), between 1 and `MAX_LIVE_EXPORTS`.
fn live_cap_for(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(RESERVED_DESCRIPTORS) / 16)
        .unwrap_or(MAX_LIVE_EXPORTS)
        .clamp(1, MAX_LIVE_EXPORTS)
}

/// How many exports may run at once in this process (from its RLIMIT_NOFILE).
pub fn live_cap() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    live_cap_for(getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft))
}

/// EMFILE once `live` exports (running, starting or stopping) reach `cap`: a user
/// opening many qcow2 volumes must not start hundreds of processes.
fn room_for_another(live: usize, cap: usize) -> std::io::Result<()> {
    if live >= cap {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_exports_are_capped_by_the_descriptor_limit() {
        assert_eq!(live_cap_for(1024), 48);
        assert_eq!(live_cap_for(320), 4);
        assert_eq!(live_cap_for(0), 1);
        assert_eq!(live_cap_for(u64::MAX), MAX_LIVE_EXPORTS);
        assert!(room_for_another(3, 4).is_ok());
        let refused = room_for_another(4, 4).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EMFILE));
    }

    /// What a header rewritten between backupfs' check and qsd's open would do: qsd is
    /// handed an image whose header names a data file. It is stopped before the export is
    /// used, the data file untouched. (Needs root, FUSE and qemu-utils, as the tests in
    /// tests/ do.)
    #[test]
    fn an_export_whose_qsd_opened_a_file_besides_the_image_is_refused_unused() {
        let dir = tempfile::tempdir().unwrap();
        let (image, victim) = (dir.path().join("image"), dir.path().join("victim"));
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("data_file={},data_file_raw=on", victim.display()))
            .arg(&image)
            .arg("1M")
            .status()
            .unwrap();
        assert!(made.success());
        // Written after qemu-img create, which makes the data file empty.
        let contents: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&victim, &contents).unwrap();
        let exports = Exports::open(&dir.path().join("exports")).unwrap();
        let file = File::open(&image).unwrap();
        let mode = Mode {
            writable: true,
            direct: false,
        };
        match exports.get(&image, &file, mode) {
            Err(ExportError::Foreign(message)) => {
                assert!(message.contains(&victim.display().to_string()), "{message}")
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("exported an image whose qsd opened its data file"),
        }
        assert!(
            std::fs::read(&victim).unwrap() == contents,
            "the data file changed"
        );
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        assert!(
            !mounts.contains(&dir.path().display().to_string()),
            "{mounts}"
        );
        assert!(exports.slots.lock().is_empty());
    }
}
