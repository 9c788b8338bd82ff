//! qemu-storage-daemon FUSE exports: the guest-visible raw contents of a qcow2 image as a
//! regular file under the runtime directory. Each daemon owns a directory there, held by
//! a lock; a directory whose lock is free is a crashed daemon's and is cleaned at start.
//! An export never outlives its attachments: dropping the last one stops qsd and unmounts.

use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak, mpsc};
use std::time::{Duration, Instant, SystemTime};
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
    _lock: File,
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
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(setup.join(LOCK_FILE))?;
        flock_nb(&lock)?;
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
            "qcow2 exports: at most {} running at once (README.md, \"limits\")",
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
    pub fn get(self: &Arc<Exports>, image: &Path, mode: Mode) -> std::io::Result<Arc<Export>> {
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
        let started = self.start(image, mode);
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

    /// The running writable export of `image`, waiting out one that is starting or
    /// stopping; None when there is none.
    pub fn writable(&self, image: &Path) -> Option<Arc<Export>> {
        let key = (image.to_path_buf(), true);
        let mut slots = self.slots.lock();
        loop {
            match slots.get(&key) {
                None => return None,
                Some((Slot::Live, weak)) => {
                    if let Some(export) = weak.upgrade() {
                        return Some(export);
                    }
                }
                Some((Slot::Starting, _)) => {}
            }
            self.changed.wait(&mut slots);
        }
    }

    /// Whether a qsd of ours has `image` open for writing (and so holds its locks).
    pub fn holds_writable(&self, image: &Path) -> bool {
        self.slots.lock().contains_key(&(image.to_path_buf(), true))
    }

    fn start(self: &Arc<Exports>, image: &Path, mode: Mode) -> std::io::Result<Arc<Export>> {
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
        let mut command = Command::new(QSD);
        command
            .args(qsd_args(image, &mountpoint, &pidfile, mode))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = match spawn_tied(command) {
            Ok(child) => child,
            Err(e) => {
                remove_files(&mountpoint);
                return Err(std::io::Error::new(
                    e.kind(),
                    format!("cannot start {QSD}: {e}"),
                ));
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
                Err(e) => return Err(e),
            }
            if let Some(status) = export.child.lock().try_wait()? {
                return Err(std::io::Error::other(format!(
                    "{QSD} for {} exited ({status}) before its export was mounted: {}",
                    image.display(),
                    read_log(&log_path).trim()
                )));
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
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
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
        let pid = child.id() as libc::pid_t;
        // SIGTERM: qsd flushes the image (its qcow2 metadata caches) and unmounts.
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
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
/// layer's open-file caps, README.md "Limits").
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
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit into the struct we own.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    live_cap_for(if got == 0 { limit.rlim_cur } else { 1024 })
}

/// EMFILE once `live` exports (running, starting or stopping) reach `cap`: a user
/// opening many qcow2 volumes must not start hundreds of processes.
fn room_for_another(live: usize, cap: usize) -> std::io::Result<()> {
    if live >= cap {
        return Err(std::io::Error::from_raw_os_error(libc::EMFILE));
    }
    Ok(())
}

/// The command line of one export, in qsd's JSON syntax (no comma escaping of paths).
fn qsd_args(image: &Path, mountpoint: &Path, pidfile: &Path, mode: Mode) -> Vec<String> {
    let image = image.to_string_lossy();
    let file = serde_json::json!({
        "driver": "file",
        "node-name": "file",
        "filename": image,
        "read-only": !mode.writable,
        // Readers take no image locks: our own reads must not look like a hypervisor to
        // in-use checks, and never stop one from starting. A writer takes them, so no
        // hypervisor can open a volume while we restore into it.
        "locking": if mode.writable { "on" } else { "off" },
        "cache": { "direct": mode.direct },
        "discard": "unmap",
    });
    let mut qcow2 = serde_json::json!({
        "driver": "qcow2",
        "node-name": "volume",
        "file": "file",
        "read-only": !mode.writable,
    });
    if mode.writable {
        // Holes stay holes: discards free clusters, written zeros become zero clusters.
        qcow2["discard"] = "unmap".into();
        qcow2["detect-zeroes"] = "unmap".into();
    }
    let export = serde_json::json!({
        "type": "fuse",
        "id": "export",
        "node-name": "volume",
        "mountpoint": mountpoint.to_string_lossy(),
        "writable": mode.writable,
        // Only this daemon (root) reads it.
        "allow-other": "off",
    });
    vec![
        "--blockdev".into(),
        file.to_string(),
        "--blockdev".into(),
        qcow2.to_string(),
        "--export".into(),
        export.to_string(),
        "--pidfile".into(),
        pidfile.to_string_lossy().into_owned(),
    ]
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Starts a qsd that dies with this daemon: its parent-death signal is SIGTERM (qsd then
/// flushes and unmounts). The kernel sends it when the parent *thread* ends, so every qsd
/// is started by one thread that lives as long as the process.
fn spawn_tied(mut command: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    let spawner = match SPAWNER.get() {
        Some(spawner) => spawner,
        None => {
            let (sender, requests) = mpsc::channel::<SpawnRequest>();
            std::thread::Builder::new()
                .name("qsd-spawner".into())
                .spawn(move || {
                    for (mut command, reply) in requests {
                        let _ = reply.send(command.spawn());
                    }
                })?;
            // Of two racing first calls, one thread ends when its sender is dropped.
            SPAWNER.get_or_init(|| sender)
        }
    };
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls.
    unsafe {
        command.pre_exec(move || {
            // The daemon blocks SIGTERM and friends in its threads (it waits for them);
            // a blocked mask survives exec and qsd would never see its stop signal.
            let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(none.as_mut_ptr());
            if libc::pthread_sigmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon died before prctl: nobody would ever stop this qsd.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner
        .send((command, reply))
        .map_err(|_| std::io::Error::other("the qsd spawner thread is gone"))?;
    answer
        .recv()
        .map_err(|_| std::io::Error::other("the qsd spawner thread is gone"))?
}

/// Cleans the directories of daemons that are gone (their lock is free): stops their
/// qsd processes, detaches their export mounts, removes the files.
fn clean_stale(base: &Path) {
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
            .is_some_and(|lock| flock_nb(&lock).is_err());
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
    // SAFETY: kill(2); the pid holds the pidfile's lock, so it is that qsd.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let started = Instant::now();
    while posix_lock_holder(&file) == Some(pid) {
        if started.elapsed() > Duration::from_secs(10) {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
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
    // SAFETY: F_GETLK reads and writes the flock struct we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut lock) };
    (rc == 0 && lock.l_type != libc::F_UNLCK as i16 && lock.l_pid > 0).then_some(lock.l_pid)
}

fn flock_nb(file: &File) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Lazily unmounts whatever is mounted on `path`; nothing mounted is fine.
fn detach_mount(path: &Path) {
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
fn remove_export_dir(dir: &Path) -> std::io::Result<()> {
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

fn remove_files(mountpoint: &Path) {
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

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The first 4 KiB of a qsd log, for error messages.
fn read_log(path: &Path) -> String {
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
    fn live_exports_are_capped_by_the_descriptor_limit() {
        assert_eq!(live_cap_for(1024), 48);
        assert_eq!(live_cap_for(320), 4);
        assert_eq!(live_cap_for(0), 1);
        assert_eq!(live_cap_for(u64::MAX), MAX_LIVE_EXPORTS);
        assert!(room_for_another(3, 4).is_ok());
        let refused = room_for_another(4, 4).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EMFILE));
    }

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

    #[test]
    fn args_are_json_and_readers_take_no_locks() {
        let args = qsd_args(
            Path::new("/pool,with,commas/volume-a"),
            Path::new("/run/x/export-0"),
            Path::new("/run/x/export-0.pid"),
            Mode {
                writable: false,
                direct: true,
            },
        );
        let file: serde_json::Value = serde_json::from_str(&args[1]).unwrap();
        assert_eq!(file["filename"], "/pool,with,commas/volume-a");
        assert_eq!(file["locking"], "off");
        assert_eq!(file["read-only"], true);
        assert_eq!(file["cache"]["direct"], true);
        let export: serde_json::Value = serde_json::from_str(&args[5]).unwrap();
        assert_eq!(export["writable"], false);
        assert_eq!(args[7], "/run/x/export-0.pid");

        let args = qsd_args(
            Path::new("/p/volume-a"),
            Path::new("/run/x/export-1"),
            Path::new("/run/x/export-1.pid"),
            Mode {
                writable: true,
                direct: false,
            },
        );
        let file: serde_json::Value = serde_json::from_str(&args[1]).unwrap();
        assert_eq!(file["locking"], "on");
        let qcow2: serde_json::Value = serde_json::from_str(&args[3]).unwrap();
        assert_eq!(qcow2["detect-zeroes"], "unmap");
    }
}
